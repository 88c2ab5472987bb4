//! The job queue: enqueueing signed jobs ([`enqueue`]) and inspecting and managing them
//! ([`inspect`]).
//!
//! Jobs live in apalis-postgres's `apalis.jobs` table (queue = `worker.queue`). A row holds:
//! - `id`: the job's UUID v7 written as a ULID (the same 128 bits), so `jobs show` accepts
//!   either form;
//! - `job_type`: the queue name; `job`: the signed envelope (JSON bytes);
//! - `metadata` (hstore): unsigned routing copies of the tenant id and the kind (`tenant_id`,
//!   `kind`), used to group, filter and list; the worker never trusts them, it reads the signed
//!   envelope; and the job's latest `progress`;
//! - `status`, `attempts`, `max_attempts` (stored at enqueue: the one limit every worker
//!   honours), `run_at`, `priority`, `idempotency_key`, `last_result`, `lock_by`, `done_at`.
//!
//! This module owns the row format: how an outcome is written into `status` and `last_result`
//! (by the worker) and read back into a [`JobState`] (by `jobs show`, `jobs list`).

pub mod enqueue;
pub mod inspect;

pub use enqueue::{Enqueued, Enqueuer, NewJob};
pub use inspect::{
    JobInfo, TenantLoad, cancel, list, list_of_kind, page, retry, show, tenant_loads,
};

use crate::envelope::Rejection;

/// Errors of queue operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The job would be rejected by the worker, so it is refused now and nothing is enqueued.
    #[error("refusing to enqueue: {0}")]
    Invalid(#[from] Rejection),
    /// The idempotency key is already used, within this tenant, by a job of another kind.
    #[error(
        "idempotency key `{key}` is already used by job {existing} of kind `{kind}` for this \
         tenant; use another key"
    )]
    KeyConflict {
        /// The key.
        key: String,
        /// The job that holds it.
        existing: crate::ids::JobId,
        /// That job's kind.
        kind: String,
    },
    /// No tenant with this id: nothing is enqueued for it.
    #[error("no tenant with id {0}")]
    UnknownTenant(crate::ids::TenantId),
    /// The tenant is suspended: nothing is enqueued for it until it is activated again.
    #[error(
        "tenant {0} is suspended: its jobs are refused until `tenant-worker tenant activate {0}`"
    )]
    SuspendedTenant(crate::ids::TenantId),
    /// No job with this id.
    #[error("no job with id {0}")]
    NotFound(String),
    /// The job is in a state that does not allow the operation.
    #[error("job {id} is {state}: {what} is not possible")]
    WrongState {
        /// Job id.
        id: String,
        /// Its state.
        state: JobState,
        /// The refused operation.
        what: &'static str,
    },
    /// Encoding failed (should not happen).
    #[error("could not encode the job")]
    Encode(#[from] serde_json::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a job is in its life, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting to run now.
    Pending,
    /// Waiting for a later `run_at` (enqueued for later, or snoozed).
    Scheduled,
    /// A worker has claimed it.
    Running,
    /// Failed; waiting out its backoff before its next attempt.
    Retrying,
    /// Took effect.
    Done,
    /// Out of attempts, or failed permanently; its last error is kept.
    Dead,
    /// Failed verification before touching data (signature, key, expiry, tenant, kind,
    /// arguments); never retried.
    Rejected,
    /// Cancelled by an operator or by the job itself.
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Scheduled,
        JobState::Running,
        JobState::Retrying,
        JobState::Done,
        JobState::Dead,
        JobState::Rejected,
        JobState::Cancelled,
    ];

    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Done => "done",
            JobState::Dead => "dead",
            JobState::Rejected => "rejected",
            JobState::Cancelled => "cancelled",
        }
    }

    /// True for states a job never leaves by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Dead | JobState::Rejected | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown state `{}`; use one of {}",
                    s.chars().take(40).collect::<String>(),
                    names.join(", ")
                )
            })
    }
}

/// The error text stored for a rejected job starts with this.
pub(crate) const REJECTED_PREFIX: &str = "rejected: ";
/// The error text stored for a cancelled job starts with this.
pub(crate) const CANCELLED_PREFIX: &str = "cancelled: ";
/// The reason stored for an operator's cancel.
pub(crate) const CANCELLED_BY_OPERATOR: &str = "cancelled: by an operator";

/// How one delivery ended, as written into its row (`status`, `last_result`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RowOutcome {
    /// `Done`, `{"Ok": result}`.
    Done(serde_json::Value),
    /// `Killed`, `{"Err": "rejected: <reason>"}`: never retried.
    Rejected(String),
    /// `Killed`, `{"Err": "cancelled: <reason>"}`.
    Cancelled(String),
    /// `Killed`, `{"Err": <reason>}`: dead now, whatever attempts remain.
    Dead(String),
    /// `Failed`, `{"Err": <reason>}`: fetched again after `retry_in` while attempts remain
    /// (dead once they are used up).
    Failed {
        /// What went wrong.
        reason: String,
        /// The backoff before the next attempt.
        retry_in: std::time::Duration,
    },
    /// `Pending` again after `after`, the attempt not counted.
    Snoozed(std::time::Duration),
}

impl RowOutcome {
    /// The row's `status`.
    pub(crate) fn status(&self) -> &'static str {
        match self {
            RowOutcome::Done(_) => "Done",
            RowOutcome::Rejected(_) | RowOutcome::Cancelled(_) | RowOutcome::Dead(_) => "Killed",
            RowOutcome::Failed { .. } => "Failed",
            RowOutcome::Snoozed(_) => "Pending",
        }
    }

    /// The row's `last_result`.
    pub(crate) fn last_result(&self) -> serde_json::Value {
        let err = |text: String| serde_json::json!({ "Err": scrub(&text) });
        match self {
            RowOutcome::Done(v) => serde_json::json!({ "Ok": v }),
            RowOutcome::Rejected(r) => err(format!("{REJECTED_PREFIX}{r}")),
            RowOutcome::Cancelled(r) => err(format!("{CANCELLED_PREFIX}{r}")),
            RowOutcome::Dead(r) | RowOutcome::Failed { reason: r, .. } => err(r.clone()),
            RowOutcome::Snoozed(d) => serde_json::json!({ "Snoozed": d.as_secs_f64() }),
        }
    }

    /// How long until the job may run again (`run_at` moves), if it runs again.
    pub(crate) fn run_again_in(&self) -> Option<std::time::Duration> {
        match self {
            RowOutcome::Failed { retry_in, .. } => Some(*retry_in),
            RowOutcome::Snoozed(d) => Some(*d),
            _ => None,
        }
    }
}

impl From<&Rejection> for RowOutcome {
    fn from(r: &Rejection) -> Self {
        RowOutcome::Rejected(r.to_string())
    }
}

/// Replaces NUL characters, which PostgreSQL text and jsonb cannot store: an error or result
/// that echoes hostile input must not make the queue's ack (or the run record) fail.
pub(crate) fn scrub(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// [`scrub`] for every key and string of a result document.
pub(crate) fn scrub_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.contains('\0') => *s = scrub(s),
        serde_json::Value::Array(a) => a.iter_mut().for_each(scrub_json),
        serde_json::Value::Object(o) => {
            if o.keys().any(|k| k.contains('\0')) {
                *o = std::mem::take(o)
                    .into_iter()
                    .map(|(k, v)| (scrub(&k), v))
                    .collect();
            }
            o.values_mut().for_each(scrub_json);
        }
        _ => {}
    }
}
