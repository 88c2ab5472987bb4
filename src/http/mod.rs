//! The HTTP API: enqueue and follow jobs from any language, the tenant taken from the caller's
//! verified login token (a JWT from your identity provider), never from the request.
//!
//! `tenant-worker serve` runs it with the built-in kinds; an application with kinds of its own
//! mounts [`Api::router`] in its own binary, with its own [`Registry`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tenant_worker::{Client, Settings, http::Api};
//!
//! let settings = Settings::load(None)?;          // [http] and [http.jwt] in worker.toml
//! let client = Client::connect(&settings).await?;
//! let kinds = Arc::new(client.builtins());       // register your own kinds here too
//! let api = Api::new(&client, kinds).await?;
//! let listener = tokio::net::TcpListener::bind(&settings.http.listen).await?;
//! tenant_worker::http::serve(api, listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```
//!
//! | Route | What |
//! |---|---|
//! | `POST /v1/jobs` | `{kind, args, run_at?, priority?, idempotency_key?}` → `201` and the job (`200` for a repeated idempotency key) |
//! | `GET /v1/jobs/{id}` | the caller's tenant's job; any other id is `404` |
//! | `GET /v1/jobs?state=&kind=&limit=&after=` | the tenant's jobs, newest first, a page at a time |
//! | `POST /v1/jobs/{id}/cancel` | cancels a job that has not started |
//! | `GET /healthz`, `GET /readyz` | the process is up; the database answers and keys are loaded |
//!
//! Errors are `{"error": {"code", "message"}}` with a stable `code` (see [`ApiError`]).
//! Every request is limited in body size and time, and each tenant in requests per second.

mod auth;
mod error;
mod jobs;
mod keys;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;

pub use auth::Caller;
pub use error::ApiError;
pub use jobs::{EnqueueRequest, JobPage, JobView, ListQuery};

use crate::client::Client;
use crate::config::{HttpSettings, Settings};
use crate::ids::TenantId;
use crate::job::Registry;
use crate::queue::{self, Enqueuer};

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `[http]` is incomplete or wrong.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The token-verifying keys do not load.
    #[error("login token keys: {0}")]
    Keys(String),
    /// The client could not provide a signer or pools.
    #[error(transparent)]
    Client(#[from] crate::client::Error),
    /// Serving failed.
    #[error("serving HTTP failed")]
    Io(#[from] std::io::Error),
}

/// The API's state: what every request needs. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    enqueuer: Enqueuer,
    pool: PgPool,
    settings: Settings,
    verifier: auth::Verifier,
    limiter: DefaultKeyedRateLimiter<TenantId>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("listen", &self.inner.settings.http.listen)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// The API of `client`'s settings (`[http]`, checked here), enqueueing the kinds of
    /// `registry` that `http.kinds.allowed` lists, signing with the client's signing key.
    ///
    /// # Errors
    /// [`Error::Config`] for an incomplete `[http]`, [`Error::Keys`] when the token keys do
    /// not load, [`Error::Client`] without a signing key.
    pub async fn new(client: &Client, registry: Arc<Registry>) -> Result<Self, Error> {
        let settings = client.settings().clone();
        settings.http.validate()?;
        for kind in &settings.http.kinds.allowed {
            if !registry.contains(kind) {
                return Err(Error::Config(crate::config::Error::Invalid {
                    key: "http.kinds.allowed",
                    reason: format!("`{kind}` is not a registered kind"),
                }));
            }
        }
        let verifier = auth::Verifier::new(&settings.http.jwt).await?;
        let per_sec = NonZeroU32::new(settings.http.rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.http.rate_burst).unwrap_or(NonZeroU32::MIN);
        let limiter = RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst));
        Ok(Self {
            inner: Arc::new(Inner {
                enqueuer: client.enqueuer(registry)?,
                pool: client.queue_pool().clone(),
                settings,
                verifier,
                limiter,
            }),
        })
    }

    /// The routes, with body-size, timeout and rate limits applied.
    pub fn router(&self) -> Router {
        let http = &self.inner.settings.http;
        let api = Router::new()
            .route("/v1/jobs", post(jobs::enqueue).get(jobs::list))
            .route("/v1/jobs/{id}", get(jobs::get))
            .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .fallback(|| async {
                ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route")
            })
            .layer(DefaultBodyLimit::max(http.max_body_bytes))
            .layer(middleware::from_fn_with_state(
                Duration::from_millis(http.request_timeout_ms),
                time_limit,
            ));
        api.with_state(self.clone())
    }

    pub(crate) fn settings(&self) -> &HttpSettings {
        &self.inner.settings.http
    }

    pub(crate) fn enqueuer(&self) -> &Enqueuer {
        &self.inner.enqueuer
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub(crate) fn queue(&self) -> &str {
        &self.inner.settings.worker.queue
    }

    /// The verified caller of a request, within its tenant's rate.
    pub(crate) async fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = self.inner.verifier.verify(authorization).await?;
        if let Err(not_until) = self.inner.limiter.check_key(&caller.tenant) {
            use governor::clock::{Clock, DefaultClock};
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this tenant; retry later",
            );
            e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
            return Err(e);
        }
        Ok(caller)
    }

    /// [`Api::caller`], refused unless its tenant is registered and active (enqueueing
    /// checks this itself, in its insert's transaction).
    pub(crate) async fn active_caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let caller = self.caller(headers).await?;
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(queue::Error::from)?;
        queue::enqueue::check_tenants(&mut conn, [caller.tenant]).await?;
        Ok(caller)
    }

    /// A job of the caller's tenant; another tenant's job is "not found", like an unknown id.
    pub(crate) async fn own_job(&self, caller: &Caller, id: &str) -> Result<JobView, ApiError> {
        // An id that does not parse is `NotFound` too.
        let job = queue::show(&self.inner.pool, id).await?;
        if job.tenant_id.as_deref() != Some(caller.tenant.to_string().as_str()) {
            return Err(ApiError::not_found());
        }
        Ok(job.into())
    }

    /// Refuses kinds the caller may not enqueue.
    pub(crate) fn allow_kind(&self, caller: &Caller, kind: &str) -> Result<(), ApiError> {
        let kinds = &self.inner.settings.http.kinds;
        if !self.inner.enqueuer.registry().contains(kind) {
            return Err(ApiError::bad_request(
                "unknown_kind",
                format!("no kind `{kind}`"),
            ));
        }
        if !kinds.allowed.iter().any(|k| k == kind) {
            return Err(ApiError::forbidden(
                "kind_not_allowed",
                format!("kind `{kind}` cannot be enqueued over HTTP"),
            ));
        }
        if let Some(scope) = kinds.scopes.get(kind)
            && !caller.scopes.contains(scope)
        {
            return Err(ApiError::forbidden(
                "missing_scope",
                format!("enqueueing `{kind}` needs the scope `{scope}`"),
            ));
        }
        Ok(())
    }

    /// The attempt limit a job of `kind` gets.
    pub(crate) fn max_attempts(&self, kind: &str) -> i32 {
        let policy = self
            .inner
            .enqueuer
            .registry()
            .policy(kind, &self.inner.settings);
        policy.max_attempts.min(i32::MAX as u32) as i32
    }
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(api): State<Api>) -> Response {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("select 1").execute(&api.inner.pool),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let keys = api.inner.verifier.keys().ready();
    let status = if db && keys {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "database": db, "keys": keys })),
    )
        .into_response()
}

async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            ApiError::unavailable("timeout", "the request took too long; try again").into_response()
        }
    }
}

/// Serves `api` on `listener` until `shutdown` completes, then finishes the requests in
/// flight.
///
/// # Errors
/// [`Error::Io`] when serving fails.
pub async fn serve(
    api: Api,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    axum::serve(listener, api.router())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
