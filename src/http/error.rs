//! Errors as the API answers them: a status and `{"error": {"code", "message"}}`, with codes
//! that stay stable across releases (clients branch on `code`, people read `message`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::queue;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `token_expired`.
    pub code: &'static str,
    /// What went wrong, for a person (never a secret or record contents).
    pub message: String,
    /// Seconds to wait, for `429`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// `400`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// `401`: the token is missing or does not verify.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// `403`: the token verifies but does not allow this.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// `404`, the same for an unknown job and another tenant's job.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such job")
    }

    /// `503`.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// `500`: logged with its cause; the caller learns nothing of it.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request failed; it is logged on the server",
        )
    }
}

impl From<queue::Error> for ApiError {
    fn from(e: queue::Error) -> Self {
        use queue::Error as Q;
        match &e {
            Q::Invalid(r) => Self::bad_request("invalid_args", r.to_string()),
            Q::KeyConflict { .. } => {
                Self::new(StatusCode::CONFLICT, "idempotency_conflict", e.to_string())
            }
            Q::UnknownTenant(_) => {
                Self::forbidden("unknown_tenant", "the token's tenant is not registered")
            }
            Q::SuspendedTenant(_) => {
                Self::forbidden("suspended_tenant", "the token's tenant is suspended")
            }
            Q::NotFound(_) => Self::not_found(),
            Q::WrongState { state, .. } => Self::new(
                StatusCode::CONFLICT,
                "wrong_state",
                format!("the job is {state}: it cannot be cancelled"),
            ),
            Q::Database(d) if is_unavailable(d) => Self::unavailable(
                "database_unavailable",
                "the database is not reachable; try again",
            ),
            Q::Database(_) | Q::Encode(_) => Self::internal(&e),
        }
    }
}

/// True for database errors that mean "not reachable now" rather than a bug.
fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            let value = format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                self.code
            );
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
