//! Job kinds. Each kind parses its arguments at the job boundary ("parse, don't validate") and
//! runs with nothing but a [`TenantTx`]: there is no other path to tenant data in its
//! signature.
//!
//! Declarative jobs (TOML + SQL) live in the top-level `jobs/` folder; the Rust kinds live here.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::envelope::{JobId, Rejection};
use crate::tenant::{self, TenantTx};

pub mod declared;
pub mod export;
pub mod import;
pub mod noop;
pub mod process;
pub mod rollup;

use std::path::PathBuf;
use std::sync::Arc;

use declared::Catalog;

/// How a job run failed. Call sites classify where the failure happens.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth retrying later (database hiccup, lock timeout, ...).
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time; the job is dead at once.
    #[error("{0}")]
    Fatal(String),
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        // Data errors (constraint violations, bad casts) will not fix themselves; connection
        // and server-side transient errors might.
        match e.as_database_error().and_then(|d| d.code()) {
            Some(code)
                if code.starts_with("23") || code.starts_with("22") || code.starts_with("42") =>
            {
                JobError::Fatal(e.to_string())
            }
            _ => JobError::Retryable(e.to_string()),
        }
    }
}

impl From<tenant::Error> for JobError {
    fn from(e: tenant::Error) -> Self {
        match e {
            tenant::Error::Database(e) => e.into(),
            other => JobError::Fatal(other.to_string()),
        }
    }
}

/// Extension trait to classify any error at the call site: `parse(x).fatal()?`.
pub trait Classify<T> {
    /// Marks the error as worth retrying.
    fn retryable(self) -> Result<T, JobError>;
    /// Marks the error as permanent.
    fn fatal(self) -> Result<T, JobError>;
}

impl<T, E: std::fmt::Display> Classify<T> for Result<T, E> {
    fn retryable(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::Retryable(e.to_string()))
    }
    fn fatal(self) -> Result<T, JobError> {
        self.map_err(|e| JobError::Fatal(e.to_string()))
    }
}

/// A typed job that can be enqueued: its kind name and serializable arguments.
pub trait Job: Serialize + DeserializeOwned {
    /// The kind name in the envelope.
    const KIND: &'static str;
}

/// What the worker knows about the job it runs (never a path to data).
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job id.
    pub job_id: JobId,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Root folder of exports.
    pub exports_dir: PathBuf,
    /// Root folder of tenant inboxes for imports.
    pub imports_dir: PathBuf,
    /// Declared jobs.
    pub catalog: Arc<Catalog>,
}

/// Every kind this worker runs, with parsed arguments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobSpec {
    /// See [`noop`].
    Noop(noop::Noop),
    /// See [`export`].
    Export(export::Export),
    /// See [`import`].
    Import(import::Import),
    /// See [`rollup`].
    Rollup(rollup::Rollup),
    /// See [`process`].
    Process(process::Process),
}

/// The kind names, for help texts and validation.
pub const KINDS: &[&str] = &[
    noop::Noop::KIND,
    export::Export::KIND,
    import::Import::KIND,
    rollup::Rollup::KIND,
    process::Process::KIND,
];

fn parse_args<T: DeserializeOwned>(kind: &str, args: &serde_json::Value) -> Result<T, Rejection> {
    serde_json::from_value(args.clone()).map_err(|e| Rejection::InvalidArgs {
        kind: kind.to_string(),
        reason: e.to_string(),
    })
}

impl JobSpec {
    /// Parses `(kind, args)` into a runnable job.
    ///
    /// # Errors
    /// [`Rejection::UnknownKind`] or [`Rejection::InvalidArgs`].
    pub fn parse(
        kind: &str,
        args: &serde_json::Value,
        catalog: &Catalog,
    ) -> Result<Self, Rejection> {
        let spec = match kind {
            noop::Noop::KIND => JobSpec::Noop(parse_args(kind, args)?),
            export::Export::KIND => JobSpec::Export(parse_args(kind, args)?),
            import::Import::KIND => JobSpec::Import(parse_args(kind, args)?),
            rollup::Rollup::KIND => JobSpec::Rollup(parse_args(kind, args)?),
            process::Process::KIND => JobSpec::Process(parse_args(kind, args)?),
            other => return Err(Rejection::UnknownKind(other.chars().take(64).collect())),
        };
        spec.validate(catalog)?;
        Ok(spec)
    }

    /// The kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Noop(_) => noop::Noop::KIND,
            JobSpec::Export(_) => export::Export::KIND,
            JobSpec::Import(_) => import::Import::KIND,
            JobSpec::Rollup(_) => rollup::Rollup::KIND,
            JobSpec::Process(_) => process::Process::KIND,
        }
    }

    fn validate(&self, catalog: &Catalog) -> Result<(), Rejection> {
        match self {
            JobSpec::Noop(a) => a.validate(),
            JobSpec::Export(a) => a.validate(catalog),
            JobSpec::Import(a) => a.validate(),
            JobSpec::Rollup(a) => a.validate(catalog),
            JobSpec::Process(a) => a.validate(catalog),
        }
        .map_err(|reason| Rejection::InvalidArgs {
            kind: self.kind().to_string(),
            reason,
        })
    }

    /// Runs the job inside its scoped transaction and returns its result document.
    ///
    /// # Errors
    /// [`JobError`] classified by the kind.
    pub async fn run(
        &self,
        tx: &mut TenantTx,
        ctx: &JobContext,
    ) -> Result<serde_json::Value, JobError> {
        match self {
            JobSpec::Noop(a) => a.run(tx, ctx).await,
            JobSpec::Export(a) => a.run(tx, ctx).await,
            JobSpec::Import(a) => a.run(tx, ctx).await,
            JobSpec::Rollup(a) => a.run(tx, ctx).await,
            JobSpec::Process(a) => a.run(tx, ctx).await,
        }
    }
}
