//! Enqueueing signed jobs and inspecting the queue.
//!
//! Jobs live in apalis-postgres's `apalis.jobs` table (queue = `worker.queue`). The row id is
//! the job's UUID v7 written as a ULID (same 128 bits), so `jobs show` accepts either form.
//! The tenant id and kind are also copied, unsigned, into the row's metadata for listing; the
//! worker never trusts them, it reads the signed envelope.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::config::Settings;
use crate::envelope::{JobId, Rejection, Signer, TenantId, Unsigned};
use crate::jobs::declared::Catalog;
use crate::jobs::{Job, JobSpec};

/// Errors of queue operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The job would be rejected by the worker; refused at enqueue.
    #[error("refusing to enqueue")]
    Invalid(#[from] Rejection),
    /// No job with this id.
    #[error("no job with id {0}")]
    NotFound(String),
    /// The job is in a state that does not allow the operation.
    #[error("job {id} is {state}: {what} is not possible")]
    WrongState {
        /// Job id.
        id: String,
        /// Its state.
        state: String,
        /// The refused operation.
        what: &'static str,
    },
    /// Encoding failed (should not happen).
    #[error("could not encode the job")]
    Encode(#[from] serde_json::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Kind name.
    pub kind: String,
    /// Arguments.
    pub args: serde_json::Value,
    /// Earliest start (default: now).
    pub run_at: Option<DateTime<Utc>>,
    /// Higher runs first (default 0).
    pub priority: i32,
    /// When set, a second job with the same key in the queue is not created.
    pub idempotency_key: Option<String>,
}

impl NewJob {
    /// A job of `kind` with `args`, to run now.
    pub fn new(kind: impl Into<String>, args: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            args,
            run_at: None,
            priority: 0,
            idempotency_key: None,
        }
    }

    /// A typed job.
    ///
    /// # Errors
    /// When the arguments cannot be serialized.
    pub fn typed<J: Job>(job: &J) -> Result<Self> {
        Ok(Self::new(J::KIND, serde_json::to_value(job)?))
    }
}

/// Signs jobs for a tenant the caller has verified and pushes them onto the queue.
#[derive(Debug, Clone)]
pub struct Enqueuer {
    catalog: std::sync::Arc<Catalog>,
    pool: PgPool,
    signer: Signer,
    queue: String,
    max_attempts: i32,
    ttl_secs: i64,
    max_payload_bytes: usize,
}

/// One signed row, ready to insert.
struct Prepared {
    id: JobId,
    payload: Vec<u8>,
    tenant: TenantId,
    kind: String,
    run_at: DateTime<Utc>,
    priority: i32,
    key: Option<String>,
}

impl Enqueuer {
    /// An enqueuer pushing through `pool` (queue role, or any role allowed to insert into
    /// `apalis.jobs`).
    pub fn new(pool: PgPool, signer: Signer, settings: &Settings) -> Self {
        Self {
            catalog: std::sync::Arc::new(Catalog::new()),
            pool,
            signer,
            queue: settings.worker.queue.clone(),
            max_attempts: settings.worker.max_attempts as i32,
            ttl_secs: settings.keys.job_ttl_secs as i64,
            max_payload_bytes: settings.worker.max_payload_bytes,
        }
    }

    /// Validates named sources against these declared jobs (the worker checks again).
    pub fn with_catalog(mut self, catalog: std::sync::Arc<Catalog>) -> Self {
        self.catalog = catalog;
        self
    }

    fn prepare(&self, tenant: TenantId, job: NewJob) -> Result<Prepared> {
        let spec = JobSpec::parse(&job.kind, &job.args, &self.catalog)?;
        let now = Utc::now();
        let run_at = job.run_at.unwrap_or(now);
        let issued_at = now.timestamp();
        // A job scheduled for later must still be valid when it runs.
        let expires_at = run_at.timestamp().max(issued_at) + self.ttl_secs;
        let id = JobId::new();
        let envelope = self.signer.sign(&Unsigned {
            job_id: id,
            tenant_id: tenant,
            kind: spec.kind().to_string(),
            args: job.args,
            issued_at,
            expires_at,
        });
        let payload = serde_json::to_vec(&envelope)?;
        // Workers refuse payloads over this size; refuse them here, where the caller can act.
        if payload.len() > self.max_payload_bytes {
            return Err(Rejection::TooLarge {
                size: payload.len(),
                limit: self.max_payload_bytes,
            }
            .into());
        }
        Ok(Prepared {
            id,
            payload,
            tenant,
            kind: spec.kind().to_string(),
            run_at,
            priority: job.priority,
            key: job.idempotency_key,
        })
    }

    /// Signs and enqueues one job for `tenant`. Returns its id, or the id of nothing when an
    /// idempotency key already exists (then `Ok(None)`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unknown kind or bad arguments; database errors.
    pub async fn enqueue(&self, tenant: TenantId, job: NewJob) -> Result<Option<JobId>> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_in(&mut conn, tenant, job).await
    }

    /// Signs and enqueues a typed job.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`].
    pub async fn enqueue_typed<J: Job>(&self, tenant: TenantId, job: &J) -> Result<Option<JobId>> {
        self.enqueue(tenant, NewJob::typed(job)?).await
    }

    /// Enqueues inside the caller's own connection or transaction
    /// (`enqueuer.enqueue_in(&mut tx, ..)`): the job exists only if the caller commits.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`].
    pub async fn enqueue_in(
        &self,
        conn: &mut PgConnection,
        tenant: TenantId,
        job: NewJob,
    ) -> Result<Option<JobId>> {
        let ids = self.enqueue_batch_in(conn, vec![(tenant, job)]).await?;
        Ok(ids.into_iter().next().flatten())
    }

    /// Signs and enqueues many jobs in one statement. Returns, per input, its id or `None`
    /// when its idempotency key already existed.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`]; nothing is enqueued when any job is invalid.
    pub async fn enqueue_batch(&self, jobs: Vec<(TenantId, NewJob)>) -> Result<Vec<Option<JobId>>> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_batch_in(&mut conn, jobs).await
    }

    /// [`Enqueuer::enqueue_batch`] on the caller's connection or transaction.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`].
    pub async fn enqueue_batch_in(
        &self,
        conn: &mut PgConnection,
        jobs: Vec<(TenantId, NewJob)>,
    ) -> Result<Vec<Option<JobId>>> {
        let prepared = jobs
            .into_iter()
            .map(|(t, j)| self.prepare(t, j))
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<String> = prepared
            .iter()
            .map(|p| p.id.to_ulid().to_string())
            .collect();
        let payloads: Vec<Vec<u8>> = prepared.iter().map(|p| p.payload.clone()).collect();
        let run_ats: Vec<DateTime<Utc>> = prepared.iter().map(|p| p.run_at).collect();
        let priorities: Vec<i32> = prepared.iter().map(|p| p.priority).collect();
        let tenants: Vec<String> = prepared.iter().map(|p| p.tenant.to_string()).collect();
        let kinds: Vec<String> = prepared.iter().map(|p| p.kind.clone()).collect();
        let keys: Vec<Option<String>> = prepared.iter().map(|p| p.key.clone()).collect();
        // Same columns as apalis-postgres's own sink, plus ON CONFLICT so that a repeated
        // idempotency key is "already enqueued" instead of failing the whole batch.
        let inserted: Vec<String> = sqlx::query_scalar(
            r#"insert into apalis.jobs
                   (id, job_type, job, status, attempts, max_attempts, run_at, priority,
                    metadata, idempotency_key)
               select t.id, $1, t.job, 'Pending', 0, $2, t.run_at, t.priority,
                      hstore(array['tenant_id', 'kind'], array[t.tenant, t.kind]), t.key
               from unnest($3::text[], $4::bytea[], $5::timestamptz[], $6::int[], $7::text[],
                           $8::text[], $9::text[])
                    as t(id, job, run_at, priority, tenant, kind, key)
               on conflict do nothing
               returning id"#,
        )
        .bind(&self.queue)
        .bind(self.max_attempts)
        .bind(&ids)
        .bind(&payloads)
        .bind(&run_ats)
        .bind(&priorities)
        .bind(&tenants)
        .bind(&kinds)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
        let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();
        Ok(prepared
            .iter()
            .zip(ids)
            .map(|(p, id)| inserted.contains(&id).then_some(p.id))
            .collect())
    }
}

/// A job as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobInfo {
    /// Job id (UUID).
    pub id: String,
    /// Tenant (from metadata; unsigned, display only).
    pub tenant_id: Option<String>,
    /// Kind (from metadata).
    pub kind: Option<String>,
    /// pending, scheduled, running, retrying, done, dead, rejected, cancelled.
    pub state: String,
    /// Attempts made.
    pub attempts: i32,
    /// Attempt limit.
    pub max_attempts: i32,
    /// Next or last start time.
    pub run_at: Option<DateTime<Utc>>,
    /// When a worker took it.
    pub lock_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub done_at: Option<DateTime<Utc>>,
    /// Last result or error, as stored by the queue.
    pub last_result: Option<serde_json::Value>,
    /// Which worker holds or held it.
    pub lock_by: Option<String>,
}

type JobRow = (
    String,
    String,
    i32,
    i32,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<serde_json::Value>,
    Option<String>,
    Option<String>,
    Option<String>,
);

const SELECT_JOBS: &str = r#"select id, status, attempts, max_attempts, run_at, lock_at, done_at,
        last_result, metadata -> 'tenant_id', metadata -> 'kind', lock_by
    from apalis.jobs"#;

/// The error text stored for a rejected job starts with this.
pub const REJECTED_PREFIX: &str = "rejected: ";
/// The error text stored for an operator-cancelled job.
pub const CANCELLED: &str = "cancelled by operator";

fn last_error(v: &Option<serde_json::Value>) -> Option<String> {
    let v = v.as_ref()?;
    let err = v.get("Err").unwrap_or(v);
    let text = match err {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // apalis stores the error's Display, which prefixes the wrapper type's name.
    Some(
        text.strip_prefix("AbortError: ")
            .map(str::to_string)
            .unwrap_or(text),
    )
}

fn to_info(r: JobRow) -> JobInfo {
    let (
        id,
        status,
        attempts,
        max_attempts,
        run_at,
        lock_at,
        done_at,
        last_result,
        tenant,
        kind,
        lock_by,
    ) = r;
    let err = last_error(&last_result).unwrap_or_default();
    let now = Utc::now();
    let state = match status.as_str() {
        "Pending" if attempts > 0 && run_at.is_some_and(|t| t > now) => "retrying",
        "Pending" if run_at.is_some_and(|t| t > now) => "scheduled",
        "Pending" => "pending",
        // apalis marks a fetched job `Queued` (claimed by `lock_by`) and `Running` only once
        // the worker's batched lock message lands, up to a poll interval later; the handler
        // may already be writing by then. Claimed is running, as in River.
        "Queued" | "Running" => "running",
        "Done" => "done",
        "Failed" if attempts < max_attempts => "retrying",
        "Failed" => "dead",
        "Killed" if err.starts_with(REJECTED_PREFIX) || err.contains(REJECTED_PREFIX) => "rejected",
        "Killed" if err.contains(CANCELLED) => "cancelled",
        "Killed" => "dead",
        other => other,
    }
    .to_string();
    let id = JobId::parse_any(&id).map(|j| j.to_string()).unwrap_or(id);
    JobInfo {
        id,
        tenant_id: tenant,
        kind,
        state,
        attempts,
        max_attempts,
        run_at,
        lock_at,
        done_at,
        last_result,
        lock_by,
    }
}

impl JobInfo {
    /// The stored error text, if the job failed or was rejected.
    pub fn error(&self) -> Option<String> {
        if self.state == "done" {
            return None;
        }
        let e = last_error(&self.last_result)?;
        Some(
            e.strip_prefix(REJECTED_PREFIX)
                .map(str::to_string)
                .unwrap_or(e),
        )
    }
}

/// Lists jobs, newest first, optionally filtered by tenant and state.
///
/// # Errors
/// Database errors.
pub async fn list(
    pool: &PgPool,
    queue: &str,
    tenant: Option<TenantId>,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<JobInfo>> {
    let rows: Vec<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_JOBS} where job_type = $1 and ($2::text is null or metadata -> 'tenant_id' = $2)
         order by id desc limit $3"
    )))
    .bind(queue)
    .bind(tenant.map(|t| t.to_string()))
    .bind(if state.is_some() { 100_000 } else { limit })
    .fetch_all(pool)
    .await?;
    let mut out: Vec<JobInfo> = rows.into_iter().map(to_info).collect();
    if let Some(s) = state {
        out.retain(|j| j.state == s);
        out.truncate(limit as usize);
    }
    Ok(out)
}

/// The `apalis.jobs` row id (ULID text) of a job id given in UUID or ULID form.
fn row_id(id: &str) -> Result<String> {
    JobId::parse_any(id)
        .map(|j| j.to_ulid().to_string())
        .ok_or_else(|| Error::NotFound(id.chars().take(64).collect()))
}

/// One job by id (UUID or ULID form).
///
/// # Errors
/// [`Error::NotFound`] or database errors.
pub async fn show(pool: &PgPool, id: &str) -> Result<JobInfo> {
    let row: Option<JobRow> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_JOBS} where id = $1")))
            .bind(row_id(id)?)
            .fetch_optional(pool)
            .await?;
    row.map(to_info)
        .ok_or_else(|| Error::NotFound(id.to_string()))
}

/// Makes a dead, rejected or cancelled job run again (attempts reset). A rejected job will be
/// rejected again unless what made it invalid changed (a tenant re-activated, a key restored).
///
/// # Errors
/// [`Error::NotFound`], [`Error::WrongState`] or database errors.
pub async fn retry(pool: &PgPool, id: &str) -> Result<()> {
    let info = show(pool, id).await?;
    if !matches!(
        info.state.as_str(),
        "dead" | "rejected" | "cancelled" | "retrying"
    ) {
        return Err(Error::WrongState {
            id: info.id,
            state: info.state,
            what: "retry",
        });
    }
    let ulid = row_id(id)?;
    sqlx::query(
        "update apalis.jobs set status = 'Pending', attempts = 0, run_at = now(), lock_by = null,
                lock_at = null, done_at = null
         where id = $1 and status in ('Failed', 'Killed', 'Pending')",
    )
    .bind(ulid)
    .execute(pool)
    .await?;
    Ok(())
}

/// Cancels a job that has not started. Running jobs finish (their work is transactional).
///
/// # Errors
/// [`Error::NotFound`], [`Error::WrongState`] or database errors.
pub async fn cancel(pool: &PgPool, id: &str) -> Result<()> {
    let info = show(pool, id).await?;
    let ulid = row_id(id)?;
    let n = sqlx::query(
        "update apalis.jobs set status = 'Killed', done_at = now(), lock_by = null,
                last_result = jsonb_build_object('Err', $2::text)
         where id = $1 and (status = 'Pending' or (status = 'Failed' and attempts < max_attempts))",
    )
    .bind(ulid)
    .bind(CANCELLED)
    .execute(pool)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(Error::WrongState {
            id: info.id,
            state: info.state,
            what: "cancel",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, lock_by: Option<&str>) -> JobRow {
        (
            JobId::new().to_ulid().to_string(),
            status.to_string(),
            0,
            25,
            Some(Utc::now() - chrono::Duration::seconds(1)),
            lock_by.map(|_| Utc::now()),
            None,
            None,
            None,
            None,
            lock_by.map(str::to_string),
        )
    }

    #[test]
    fn a_claimed_job_is_running_before_its_lock_message_lands() {
        assert_eq!(to_info(row("Pending", None)).state, "pending");
        assert_eq!(to_info(row("Queued", Some("worker-1"))).state, "running");
        assert_eq!(to_info(row("Running", Some("worker-1"))).state, "running");
    }
}
