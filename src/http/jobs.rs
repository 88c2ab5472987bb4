//! `/v1/jobs`: enqueue, follow, list and cancel the caller's tenant's jobs.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Api, ApiError};
use crate::ids::JobId;
use crate::job::Progress;
use crate::queue::{self, JobInfo, JobState, NewJob};

/// `POST /v1/jobs`. The tenant is the token's; a body naming one is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// The job's kind; one of `http.kinds.allowed`.
    pub kind: String,
    /// The kind's arguments.
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
    /// Run no earlier than this (RFC 3339).
    pub run_at: Option<DateTime<Utc>>,
    /// Higher runs first, within the tenant.
    #[serde(default)]
    pub priority: i32,
    /// A repeat with the same key (within the tenant) answers with the job it made.
    pub idempotency_key: Option<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    /// Job id (UUID).
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Where it is in its life.
    pub state: JobState,
    /// Attempts made.
    pub attempts: i32,
    /// Attempt limit.
    pub max_attempts: i32,
    /// Its priority.
    pub priority: i32,
    /// When it runs (or last ran).
    pub run_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub done_at: Option<DateTime<Utc>>,
    /// The latest progress it reported.
    pub progress: Option<Progress>,
    /// What it returned, once done.
    pub result: Option<serde_json::Value>,
    /// Why it did not take effect (dead, rejected, cancelled; or the last failure of a retry).
    pub error: Option<String>,
}

impl From<JobInfo> for JobView {
    fn from(j: JobInfo) -> Self {
        Self {
            result: j.result().cloned(),
            error: j.error(),
            id: j.id,
            kind: j.kind.unwrap_or_default(),
            state: j.state,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            priority: j.priority,
            run_at: j.run_at,
            done_at: j.done_at,
            progress: j.progress,
        }
    }
}

/// A page of `GET /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobPage {
    /// Newest first.
    pub jobs: Vec<JobView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

/// `GET /v1/jobs` filters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// At most this many (default `http.page_size`, at most 1000).
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

/// Refuses a body that names a tenant anywhere: the tenant is the token's alone.
fn names_tenant(value: &serde_json::Value, claim: &str) -> Option<String> {
    match value {
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            // A JSON-pointer claim (`/org/id`) names no one field; the plain names still count.
            if k == "tenant" || k == "tenant_id" || (!claim.starts_with('/') && k == claim) {
                Some(k.clone())
            } else {
                names_tenant(v, claim)
            }
        }),
        serde_json::Value::Array(items) => items.iter().find_map(|v| names_tenant(v, claim)),
        _ => None,
    }
}

pub(super) async fn enqueue(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = api.caller(&headers).await?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the body is larger than {} bytes",
                    api.settings().max_body_bytes
                ),
            )
        } else {
            ApiError::bad_request("invalid_request", e.body_text())
        }
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object",
        ));
    }
    if let Some(field) = names_tenant(&value, &api.settings().jwt.tenant_claim) {
        return Err(ApiError::bad_request(
            "tenant_in_body",
            format!("the body names a tenant (`{field}`): the tenant comes only from the token"),
        ));
    }
    let request: EnqueueRequest = serde_path_to_error::deserialize(value)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?;
    api.allow_kind(&caller, &request.kind)?;
    let mut job = NewJob::new(request.kind.clone(), request.args).priority(request.priority);
    if let Some(at) = request.run_at {
        job = job.run_at(at);
    }
    if let Some(key) = request.idempotency_key {
        job = job.idempotency_key(key);
    }
    let run_at = request.run_at;
    let done = api.enqueuer().enqueue_job(caller.tenant, job).await?;
    let location = format!("/v1/jobs/{}", done.id);
    if !done.created {
        let existing = api.own_job(&caller, &done.id.to_string()).await?;
        return Ok(located(StatusCode::OK, &location, existing));
    }
    tracing::info!(tenant_id = %caller.tenant, job_id = %done.id, kind = %request.kind, "enqueued over HTTP");
    let state = if run_at.is_some_and(|t| t > Utc::now()) {
        JobState::Scheduled
    } else {
        JobState::Pending
    };
    let view = JobView {
        max_attempts: api.max_attempts(&request.kind),
        id: done.id.to_string(),
        kind: request.kind,
        state,
        attempts: 0,
        priority: request.priority,
        run_at,
        done_at: None,
        progress: None,
        result: None,
        error: None,
    };
    Ok(located(StatusCode::CREATED, &location, view))
}

fn located(status: StatusCode, location: &str, view: JobView) -> Response {
    let mut response = (status, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

pub(super) async fn get(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let caller = api.active_caller(&headers).await?;
    Ok(Json(api.own_job(&caller, &id).await?))
}

pub(super) async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let caller = api.active_caller(&headers).await?;
    let Query(query) =
        query.map_err(|e| ApiError::bad_request("invalid_request", e.body_text()))?;
    let limit = query
        .limit
        .unwrap_or(api.settings().page_size)
        .clamp(1, 1000);
    let after =
        match &query.after {
            None => None,
            Some(a) => Some(JobId::parse_any(a).ok_or_else(|| {
                ApiError::bad_request("invalid_request", "`after` is not a job id")
            })?),
        };
    let jobs = queue::page(
        api.pool(),
        api.queue(),
        caller.tenant,
        query.state,
        query.kind.as_deref(),
        after,
        i64::from(limit) + 1,
    )
    .await?;
    let more = jobs.len() > limit as usize;
    let jobs: Vec<JobView> = jobs
        .into_iter()
        .take(limit as usize)
        .map(JobView::from)
        .collect();
    let next = more.then(|| jobs.last().map(|j| j.id.clone())).flatten();
    Ok(Json(JobPage { jobs, next }))
}

pub(super) async fn cancel(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let caller = api.active_caller(&headers).await?;
    let job = api.own_job(&caller, &id).await?;
    queue::cancel(api.pool(), &job.id).await?;
    tracing::info!(tenant_id = %caller.tenant, job_id = %job.id, "cancelled over HTTP");
    Ok(Json(api.own_job(&caller, &id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_anywhere_in_the_body_is_found() {
        let claim = "org_id";
        let found = |v: serde_json::Value| names_tenant(&v, claim);
        assert_eq!(
            found(serde_json::json!({"kind": "x", "tenant_id": "a"})).as_deref(),
            Some("tenant_id")
        );
        assert_eq!(
            found(serde_json::json!({"args": {"deep": [{"tenant": 1}]}})).as_deref(),
            Some("tenant")
        );
        assert_eq!(
            found(serde_json::json!({"args": {"org_id": "a"}})).as_deref(),
            Some("org_id")
        );
        assert_eq!(names_tenant(&serde_json::json!({"id": 1}), "/org/id"), None);
        assert_eq!(
            found(serde_json::json!({"kind": "x", "args": {"source": "invoice"}})),
            None
        );
    }
}
