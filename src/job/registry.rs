//! The kinds a worker runs and an enqueuer checks: [`Registry`].

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::{JobContext, JobError, TenantJob, is_valid_kind};
use crate::config::Settings;
use crate::envelope::Rejection;
use crate::scope::ScopedTx;

/// Job kinds by name. A worker runs (and fetches) only the kinds of its registry; an enqueuer
/// refuses a job whose kind its registry lacks, or whose arguments that kind refuses.
///
/// ```
/// # use tenant_worker::{JobContext, JobError, Registry, ScopedTx, TenantJob};
/// # struct Ping;
/// # impl TenantJob for Ping {
/// #     const KIND: &'static str = "ping";
/// #     type Args = ();
/// #     type Output = ();
/// #     async fn run(&self, _: &mut ScopedTx, _: &JobContext, _: ()) -> Result<(), JobError> { Ok(()) }
/// # }
/// let mut registry = Registry::new();
/// registry.register(Ping).unwrap();
/// assert!(registry.register(Ping).is_err(), "a kind is registered once");
/// assert_eq!(registry.kinds().collect::<Vec<_>>(), ["ping"]);
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn ErasedJob>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.kinds.keys()).finish()
    }
}

/// A kind registered twice, or a kind name that is not `^[a-z][a-z0-9_]{0,39}$`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job kind `{kind}` {why}")]
pub struct RegisterError {
    /// The kind.
    pub kind: String,
    why: &'static str,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind.
    ///
    /// # Errors
    /// [`RegisterError`] when a kind of that name is registered already (nothing changes), or
    /// when the name is not a valid kind name.
    pub fn register<J: TenantJob>(&mut self, job: J) -> Result<&mut Self, RegisterError> {
        if !is_valid_kind(J::KIND) {
            return Err(RegisterError {
                kind: J::KIND.to_string(),
                why: "is not a valid kind name (use ^[a-z][a-z0-9_]{0,39}$)",
            });
        }
        if self.kinds.contains_key(J::KIND) {
            return Err(RegisterError {
                kind: J::KIND.to_string(),
                why: "is registered twice",
            });
        }
        self.kinds.insert(J::KIND, Arc::new(Erased(job)));
        Ok(self)
    }

    /// Adds every kind of `other`.
    ///
    /// # Errors
    /// [`RegisterError`] for the first kind both have (the kinds before it are added).
    pub fn merge(&mut self, other: &Registry) -> Result<&mut Self, RegisterError> {
        for (kind, job) in &other.kinds {
            if self.kinds.contains_key(kind) {
                return Err(RegisterError {
                    kind: kind.to_string(),
                    why: "is registered twice",
                });
            }
            self.kinds.insert(kind, job.clone());
        }
        Ok(self)
    }

    /// The registered kind names, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    /// True when `kind` is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// The number of kinds.
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    /// True when no kind is registered.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Arc<dyn ErasedJob>> {
        self.kinds.get(kind)
    }

    /// Checks that `kind` is registered and accepts `args`, as an enqueue does.
    ///
    /// # Errors
    /// [`Rejection::UnknownKind`] or [`Rejection::InvalidArgs`] (with the path to the field
    /// serde refused).
    pub fn check(&self, kind: &str, args: &serde_json::Value) -> Result<(), Rejection> {
        let job = self.get(kind).ok_or_else(|| self.unknown(kind))?;
        job.check(args).map_err(|reason| Rejection::InvalidArgs {
            kind: kind.to_string(),
            reason,
        })
    }

    /// The rejection of a kind this registry lacks, naming the kinds it has.
    pub(crate) fn unknown(&self, kind: &str) -> Rejection {
        Rejection::UnknownKind {
            kind: kind.chars().take(64).collect(),
            known: self.kinds().collect::<Vec<_>>().join(", "),
        }
    }
}

/// A kind's own policy (its trait methods), before `worker.toml` overrides it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KindPolicy {
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
}

/// A kind's effective policy: `[kinds.<kind>]` first, then the kind's own methods, then the
/// `[worker]` defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    pub timeout: Duration,
    pub max_attempts: u32,
    /// False when `[kinds.<kind>] shares_rounds = false` turned rounds off for the kind.
    pub rounds_allowed: bool,
}

impl Registry {
    /// The effective policy of `kind` (the `[worker]` defaults for a kind it lacks).
    pub(crate) fn policy(&self, kind: &str, settings: &Settings) -> Policy {
        let own = self.get(kind).map(|j| j.policy()).unwrap_or_default();
        let over = settings.kinds.get(kind);
        Policy {
            timeout: over
                .and_then(|o| o.timeout_secs)
                .map(Duration::from_secs)
                .or(own.timeout)
                .unwrap_or(Duration::from_secs(settings.worker.job_timeout_secs)),
            max_attempts: over
                .and_then(|o| o.max_attempts)
                .or(own.max_attempts)
                .unwrap_or(settings.worker.max_attempts),
            rounds_allowed: over.and_then(|o| o.shares_rounds) != Some(false),
        }
    }

    /// How long to wait before attempt `attempt + 1` of a `kind` job: `[kinds.<kind>]`'s
    /// backoff settings, else the kind's own [`TenantJob::backoff`], else `[worker]`'s.
    pub(crate) fn backoff(&self, kind: &str, attempt: u32, settings: &Settings) -> Duration {
        let w = &settings.worker;
        if let Some(over) = settings.kinds.get(kind)
            && (over.backoff_base_ms.is_some() || over.backoff_max_ms.is_some())
        {
            return backoff_delay(
                over.backoff_base_ms.unwrap_or(w.backoff_base_ms),
                over.backoff_max_ms.unwrap_or(w.backoff_max_ms),
                attempt,
            );
        }
        self.get(kind)
            .and_then(|j| j.backoff(attempt))
            .unwrap_or_else(|| backoff_delay(w.backoff_base_ms, w.backoff_max_ms, attempt))
    }
}

/// The retry delay before attempt `attempt + 1`: `base * 2^(attempt-1)` milliseconds, capped
/// at `max`, with "equal jitter" (uniform in the upper half) so retries of many jobs spread out.
pub(crate) fn backoff_delay(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let raw = base_ms.saturating_mul(1u64 << exp).min(max_ms);
    let half = raw / 2;
    let jitter = if half > 0 {
        rand::Rng::gen_range(&mut rand::thread_rng(), 0..=half)
    } else {
        0
    };
    Duration::from_millis(raw - half + jitter)
}

/// Arguments parsed and checked for one job, ready to run.
pub(crate) struct Parsed {
    pub args: Box<dyn Any + Send + Sync>,
    pub shares_rounds: bool,
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("shares_rounds", &self.shares_rounds)
            .finish_non_exhaustive()
    }
}

/// A [`TenantJob`] with its types erased, so kinds of different types share one map.
pub(crate) trait ErasedJob: Send + Sync {
    fn kind(&self) -> &'static str;
    fn policy(&self) -> KindPolicy;
    fn backoff(&self, attempt: u32) -> Option<Duration>;
    /// Deserializes `args` (JSON text) into the kind's arguments and validates them.
    fn parse(&self, args: &str) -> Result<Parsed, String>;
    /// Checks arguments given as a JSON value (at enqueue).
    fn check(&self, args: &serde_json::Value) -> Result<(), String>;
    fn run<'a>(
        &'a self,
        tx: &'a mut ScopedTx,
        ctx: &'a JobContext,
        args: Box<dyn Any + Send + Sync>,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>>;
}

struct Erased<J>(J);

/// A serde error with the path to the field it concerns (`records[3].kind: ...`).
fn with_path<T>(
    result: Result<T, serde_path_to_error::Error<serde_json::Error>>,
) -> Result<T, String> {
    result.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

impl<J: TenantJob> ErasedJob for Erased<J> {
    fn kind(&self) -> &'static str {
        J::KIND
    }

    fn policy(&self) -> KindPolicy {
        KindPolicy {
            timeout: self.0.timeout(),
            max_attempts: self.0.max_attempts(),
        }
    }

    fn backoff(&self, attempt: u32) -> Option<Duration> {
        self.0.backoff(attempt)
    }

    fn parse(&self, args: &str) -> Result<Parsed, String> {
        let mut de = serde_json::Deserializer::from_str(args);
        let args: J::Args = with_path(serde_path_to_error::deserialize(&mut de))?;
        self.0.validate(&args)?;
        Ok(Parsed {
            shares_rounds: self.0.shares_rounds(&args),
            args: Box::new(args),
        })
    }

    fn check(&self, args: &serde_json::Value) -> Result<(), String> {
        let args: J::Args = with_path(serde_path_to_error::deserialize(args))?;
        self.0.validate(&args)
    }

    fn run<'a>(
        &'a self,
        tx: &'a mut ScopedTx,
        ctx: &'a JobContext,
        args: Box<dyn Any + Send + Sync>,
    ) -> BoxFuture<'a, Result<serde_json::Value, JobError>> {
        Box::pin(async move {
            let args = *args
                .downcast::<J::Args>()
                .map_err(|_| JobError::fail("internal error: arguments of another kind"))?;
            let output = self.0.run(tx, ctx, args).await?;
            serde_json::to_value(output)
                .map_err(|e| JobError::fail(format!("the job's output does not serialize: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_within_bounds() {
        for attempt in 1..=6u32 {
            let raw = (100u64 << (attempt - 1)).min(1_000);
            for _ in 0..50 {
                let d = backoff_delay(100, 1_000, attempt).as_millis() as u64;
                assert!(
                    d >= raw / 2 && d <= raw,
                    "attempt {attempt}: {d}ms outside [{}, {raw}]",
                    raw / 2
                );
            }
        }
    }
}
