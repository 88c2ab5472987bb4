//! The job API: what a kind of job is, what it is handed, and how it ends.
//!
//! - [`TenantJob`]: one kind of job. Its typed arguments, its per-kind policy (timeout,
//!   attempts, backoff, whether it may share a transaction with other short jobs of its
//!   tenant) and its body, which runs inside the verified tenant's scoped transaction.
//! - [`JobContext`]: what the body knows about the run: tenant, job id, attempt, deadline,
//!   cancellation, and where to report progress.
//! - [`JobError`]: the one vocabulary for a run that does not succeed: retry (optionally after
//!   a delay), fail permanently, cancel, or snooze.
//! - [`Registry`]: the kinds a worker runs and an enqueuer checks, by name.
//!
//! The built-in kinds (`noop`, `export`, `import`, `rollup`, `process`) are implementations of
//! the same trait, in [`crate::jobs`].
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tenant_worker::{JobContext, JobError, ScopedTx, TenantJob};
//!
//! /// Counts a tenant's overdue invoices.
//! struct OverdueCount;
//!
//! #[derive(Serialize, Deserialize)]
//! struct OverdueArgs {
//!     /// Only invoices due before this date (YYYY-MM-DD).
//!     before: chrono::NaiveDate,
//! }
//!
//! impl TenantJob for OverdueCount {
//!     const KIND: &'static str = "overdue_count";
//!     type Args = OverdueArgs;
//!     type Output = serde_json::Value;
//!
//!     async fn run(
//!         &self,
//!         tx: &mut ScopedTx,
//!         _ctx: &JobContext,
//!         args: OverdueArgs,
//!     ) -> Result<serde_json::Value, JobError> {
//!         // No `where tenant_id = ...`: the transaction sees one tenant.
//!         let n: i64 = sqlx::query_scalar(
//!             "select count(*) from v_invoice where status <> 'paid' and due_on < $1",
//!         )
//!         .bind(args.before)
//!         .fetch_one(tx.conn().await?)
//!         .await?;
//!         Ok(serde_json::json!({ "overdue": n }))
//!     }
//! }
//! ```

mod context;
mod registry;

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) use context::ProgressSink;
pub use context::{JobContext, Progress};
pub(crate) use registry::{ErasedJob, Parsed};
pub use registry::{RegisterError, Registry};

use crate::scope::ScopedTx;

/// One kind of job, run inside the scoped transaction of the tenant its signed envelope names.
///
/// The kind's name ([`TenantJob::KIND`]) is written into every envelope: never change it once
/// jobs of the kind exist. Its arguments are [`TenantJob::Args`], checked when the job is
/// enqueued and again before its transaction begins; the body, [`TenantJob::run`], receives
/// the transaction and nothing else that reaches tenant data.
///
/// The policy methods have defaults; each can be overridden per kind in `worker.toml`
/// (`[kinds.<kind>]`), which wins over the method.
pub trait TenantJob: Send + Sync + 'static {
    /// The kind name: `^[a-z][a-z0-9_]{0,39}$`, unique among the kinds a worker registers.
    const KIND: &'static str;

    /// The arguments. Serialized into the signed envelope at enqueue; deserialized before the
    /// run. Add `#[serde(deny_unknown_fields)]` to refuse misspelt fields.
    type Args: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// What a successful run returns: stored in the job's run record and shown by
    /// `tenant-worker jobs show`.
    type Output: Serialize + Send + 'static;

    /// Checks arguments beyond what deserializing them checks. Called at enqueue (a refusal
    /// enqueues nothing) and again before the transaction (a refusal rejects the job, which is
    /// never retried).
    ///
    /// # Errors
    /// A reason the caller can act on.
    fn validate(&self, args: &Self::Args) -> Result<(), String> {
        let _ = args;
        Ok(())
    }

    /// True when a job with these arguments is short, database-only work that may share one
    /// transaction with other such jobs of its tenant (a *round*: each job gets its own
    /// savepoint and is rolled back alone when it fails, but the round commits once). Default:
    /// false, a transaction of its own.
    fn shares_rounds(&self, args: &Self::Args) -> bool {
        let _ = args;
        false
    }

    /// How long one run may take. `None` (the default): `worker.job_timeout_secs`.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// How many attempts a job of this kind gets before it is dead. `None` (the default):
    /// `worker.max_attempts`. Stored with each job when it is enqueued.
    fn max_attempts(&self) -> Option<u32> {
        None
    }

    /// How long to wait before attempt `attempt + 1` after attempt `attempt` failed with
    /// [`JobError::Retry`] (without a delay of its own). `None` (the default): the worker's
    /// exponential backoff with jitter.
    fn backoff(&self, attempt: u32) -> Option<Duration> {
        let _ = attempt;
        None
    }

    /// The job's body. `tx` is scoped to the verified tenant: its queries see that tenant's
    /// rows only, whatever they say. The worker commits it, with the run record, when `run`
    /// returns `Ok`; on `Err` (or a panic, or the timeout) it is rolled back.
    fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        args: Self::Args,
    ) -> impl Future<Output = Result<Self::Output, JobError>> + Send;
}

/// How a run that did not succeed ends. Whatever the variant, the job's transaction is rolled
/// back: nothing it did takes effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Worth another attempt: the job runs again after `after` (or the kind's backoff) while
    /// attempts remain, then it is dead with this reason.
    #[error("{reason}")]
    Retry {
        /// What went wrong.
        reason: String,
        /// When to try again; `None`: the kind's backoff.
        after: Option<Duration>,
    },
    /// Will fail the same way every time: the job is dead now, with this reason.
    #[error("{0}")]
    Fail(String),
    /// The job should not run at all any more: it ends cancelled, with this reason.
    #[error("cancelled: {0}")]
    Cancel(String),
    /// Not now: the job runs again after this long, and the attempt does not count.
    #[error("snoozed for {}s", .0.as_secs_f64())]
    Snooze(Duration),
}

impl JobError {
    /// [`JobError::Retry`] after the kind's backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            reason: reason.into(),
            after: None,
        }
    }

    /// [`JobError::Retry`] after `after`.
    pub fn retry_after(reason: impl Into<String>, after: Duration) -> Self {
        Self::Retry {
            reason: reason.into(),
            after: Some(after),
        }
    }

    /// [`JobError::Fail`].
    pub fn fail(reason: impl Into<String>) -> Self {
        Self::Fail(reason.into())
    }

    /// [`JobError::Cancel`].
    pub fn cancel(reason: impl Into<String>) -> Self {
        Self::Cancel(reason.into())
    }

    /// [`JobError::Snooze`].
    pub fn snooze(after: Duration) -> Self {
        Self::Snooze(after)
    }
}

impl From<sqlx::Error> for JobError {
    /// Data errors (constraint violations, bad casts, SQL the server refuses) will not fix
    /// themselves: [`JobError::Fail`]. Connection and transient server errors might:
    /// [`JobError::Retry`].
    fn from(e: sqlx::Error) -> Self {
        let message = chain(&e);
        match e.as_database_error().and_then(|d| d.code()) {
            Some(code)
                if code.starts_with("23") || code.starts_with("22") || code.starts_with("42") =>
            {
                JobError::Fail(message)
            }
            _ => JobError::retry(message),
        }
    }
}

impl From<crate::scope::Error> for JobError {
    fn from(e: crate::scope::Error) -> Self {
        match e {
            crate::scope::Error::Database(e) => e.into(),
            other => JobError::Fail(other.to_string()),
        }
    }
}

/// Classifies any error where it happens: `parse(x).fatal()?`, `fetch(..).await.retryable()?`.
/// The reason kept is the error's message with its sources.
pub trait Classify<T> {
    /// Marks the error as worth retrying ([`JobError::Retry`]).
    ///
    /// # Errors
    /// The error, classified.
    fn retryable(self) -> Result<T, JobError>;
    /// Marks the error as permanent ([`JobError::Fail`]).
    ///
    /// # Errors
    /// The error, classified.
    fn fatal(self) -> Result<T, JobError>;
}

impl<T, E: std::error::Error> Classify<T> for Result<T, E> {
    fn retryable(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::retry(chain(&e)))
    }
    fn fatal(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::Fail(chain(&e)))
    }
}

/// An error's message followed by those of its sources that it does not already include.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// True for names a kind (or a declared job) may have: `^[a-z][a-z0-9_]{0,39}$`, safe as an
/// identifier and a path component.
pub fn is_valid_kind(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 40
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classified_errors_keep_their_sources() {
        let io = std::io::Error::other("disk full");
        let wrapped: Result<(), std::io::Error> = Err(std::io::Error::other(io));
        assert_eq!(
            wrapped.fatal().unwrap_err(),
            JobError::Fail("disk full".into())
        );
        let r: Result<(), std::fmt::Error> = Err(std::fmt::Error);
        assert!(matches!(
            r.retryable(),
            Err(JobError::Retry { after: None, .. })
        ));
    }

    #[test]
    fn kind_names_are_plain_identifiers() {
        assert!(is_valid_kind("invoice_reminders"));
        assert!(!is_valid_kind("Invoice"));
        assert!(!is_valid_kind("1x"));
        assert!(!is_valid_kind(""));
        assert!(!is_valid_kind(&"a".repeat(41)));
    }
}
