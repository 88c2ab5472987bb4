//! Executing one job: verify its envelope and parse its arguments through the registry
//! ([`Executor::prepare`]), run it in its own scoped transaction within its limits
//! ([`Executor::run_alone`]), and classify how it ended into what is written back to its row
//! ([`Executor::finish`]). Rounds ([`super::rounds`]) build on the same claim and completion
//! statements ([`begin_and_claim`], [`complete_statement`]): a lone job is a round of one.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt as _;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, field};
use uuid::Uuid;

use super::ack::ProgressWriter;
use super::backend::Delivery;
use crate::config::Settings;
use crate::envelope::Rejection;
use crate::envelope::keys::Keyring;
use crate::ids::{JobId, TenantId};
use crate::job::{ErasedJob, JobContext, JobError, Parsed, Progress, Registry};
use crate::queue::{RowOutcome, scrub, scrub_json};
use crate::scope::{Scope, ScopedTx};
use crate::sql::dollar_quote;

/// How one delivery ended, before it is written back.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// It took effect, with this result.
    Done(serde_json::Value),
    /// Its run record existed: a redelivery of a job that already took effect.
    Duplicate,
    /// It failed verification (or its tenant is unknown or suspended): never retried.
    Rejected(Rejection),
    /// Its run ended with this error (its transaction rolled back).
    Failed(JobError),
}

impl From<sqlx::Error> for Outcome {
    fn from(e: sqlx::Error) -> Self {
        Outcome::Failed(e.into())
    }
}

impl From<crate::scope::Error> for Outcome {
    fn from(e: crate::scope::Error) -> Self {
        Outcome::Failed(e.into())
    }
}

/// Counters for one worker run.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    done: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    snoozed: AtomicU64,
}

/// A summary of a finished worker run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Jobs that took effect.
    pub done: u64,
    /// Redeliveries that were no-ops (the job had taken effect already).
    pub duplicates: u64,
    /// Jobs rejected before touching tenant data.
    pub rejected: u64,
    /// Attempts that failed (to be retried, or dead).
    pub failed: u64,
    /// Jobs that cancelled themselves.
    pub cancelled: u64,
    /// Runs that snoozed (to run again later).
    pub snoozed: u64,
}

impl Stats {
    pub(crate) fn summary(&self) -> Summary {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Summary {
            done: n(&self.done),
            duplicates: n(&self.duplicates),
            rejected: n(&self.rejected),
            failed: n(&self.failed),
            cancelled: n(&self.cancelled),
            snoozed: n(&self.snoozed),
        }
    }
}

/// One verified job, ready to run alone or in a round.
pub(crate) struct UnitJob {
    pub job_id: JobId,
    pub kind: &'static str,
    pub runner: Arc<dyn ErasedJob>,
    /// The signed arguments, to parse again when the job runs again alone after its round.
    args_json: Box<RawValue>,
    /// Parsed arguments not used yet.
    parsed: Option<Parsed>,
    pub ctx: JobContext,
    pub timeout: Duration,
    /// Its `job` span, so that what it logs carries its tenant and job ids.
    pub span: tracing::Span,
}

impl UnitJob {
    /// True when this job may share a round with other jobs of its tenant.
    pub(crate) fn shares_rounds(&self) -> bool {
        self.parsed.as_ref().is_some_and(|p| p.shares_rounds)
    }

    /// Runs the body once (parsing the arguments again if an earlier run used them up).
    pub(crate) async fn run(&mut self, tx: &mut ScopedTx) -> Result<serde_json::Value, JobError> {
        let parsed = match self.parsed.take() {
            Some(p) => p,
            None => self.runner.parse(self.args_json.get()).map_err(|reason| {
                JobError::fail(format!("the arguments no longer parse: {reason}"))
            })?,
        };
        let mut out = self.runner.run(tx, &self.ctx, parsed.args).await?;
        scrub_json(&mut out);
        Ok(out)
    }
}

/// A verified job with its delivery.
pub(crate) struct Ready {
    pub delivery: Delivery,
    pub tenant: TenantId,
    pub job: UnitJob,
}

/// What one job's delivery ended with: what to write to its row, and whether to write it
/// (`false` for a job cut off by the shutdown timeout, which the worker releases to the queue
/// instead).
pub(crate) struct Ended {
    pub id: String,
    pub attempt: u32,
    pub outcome: RowOutcome,
    pub progress: Option<Progress>,
    pub ack: bool,
}

/// What executing jobs needs: where scoped transactions come from, how to verify envelopes,
/// which kinds exist and how they behave.
pub(crate) struct Executor {
    pub scope: Scope,
    pub keyring: Keyring,
    pub registry: Arc<Registry>,
    pub settings: Arc<Settings>,
    pub stats: Stats,
    pub progress: Arc<ProgressWriter>,
    /// Cancelled when shutdown starts: jobs see it through [`JobContext::is_cancelled`].
    pub stopping: CancellationToken,
    /// Cancelled when the shutdown timeout cuts in-flight jobs off: their transactions roll
    /// back, so they take effect once when run again.
    pub abort: CancellationToken,
}

impl Executor {
    /// The routing kinds this worker fetches: its registered kinds, and rows without a routing
    /// kind (written by an enqueuer that set none), which it verifies like any other: their
    /// signed kind decides whether they run or are rejected.
    pub(crate) fn fetch_kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.registry.kinds().map(str::to_string).collect();
        kinds.push(String::new());
        kinds
    }

    /// Verifies one delivery's envelope and parses its arguments with its kind; a rejection is
    /// returned as the ended delivery to write back.
    pub(crate) fn prepare(&self, delivery: Delivery) -> Result<Ready, Ended> {
        let queued_id = JobId::parse_any(&delivery.id);
        let span = tracing::info_span!(
            "job",
            job_id = %queued_id.map(|j| j.to_string()).unwrap_or_else(|| delivery.id.clone()),
            tenant_id = field::Empty,
            kind = field::Empty,
            attempt = delivery.attempt
        );
        let _enter = span.enter();
        let rejected = |r: Rejection, delivery: Delivery| {
            let outcome = self.count(&Outcome::Rejected(r.clone()));
            tracing::warn!(reason = %r, "job rejected");
            Ended {
                id: delivery.id,
                attempt: delivery.attempt,
                outcome: RowOutcome::Rejected(scrub(&outcome)),
                progress: None,
                ack: true,
            }
        };
        let now = chrono::Utc::now().timestamp();
        let verified = match self.keyring.verify(
            &delivery.payload,
            self.settings.worker.max_payload_bytes,
            queued_id,
            now,
        ) {
            Ok(v) => v,
            Err(r) => return Err(rejected(r, delivery)),
        };
        span.record("tenant_id", field::display(verified.tenant_id));
        span.record("kind", field::display(&verified.kind));
        let Some(runner) = self.registry.get(&verified.kind).cloned() else {
            let r = self.registry.unknown(&verified.kind);
            return Err(rejected(r, delivery));
        };
        let parsed = match runner.parse(verified.args.get()) {
            Ok(p) => p,
            Err(reason) => {
                let r = Rejection::InvalidArgs {
                    kind: verified.kind,
                    reason,
                };
                return Err(rejected(r, delivery));
            }
        };
        let policy = self.registry.policy(runner.kind(), &self.settings);
        let mut parsed = parsed;
        parsed.shares_rounds &= policy.rounds_allowed;
        let ctx = JobContext::new(
            verified.tenant_id,
            verified.job_id,
            delivery.attempt,
            delivery.max_attempts,
            policy.timeout,
        )
        .with_cancellation(self.stopping.clone())
        .with_progress(self.progress.clone(), delivery.id.clone());
        drop(_enter);
        Ok(Ready {
            tenant: verified.tenant_id,
            job: UnitJob {
                job_id: verified.job_id,
                kind: runner.kind(),
                runner,
                args_json: verified.args,
                parsed: Some(parsed),
                ctx,
                timeout: policy.timeout,
                span,
            },
            delivery,
        })
    }

    /// Runs one job alone in its own scoped transaction, within its time limit.
    pub(crate) async fn run_alone(&self, ready: Ready) -> Ended {
        let Ready {
            delivery,
            tenant,
            mut job,
        } = ready;
        let span = job.span.clone();
        async {
            let run = within_limits(job.timeout, execute(&self.scope, tenant, &mut job));
            let outcome = tokio::select! {
                r = run => r.unwrap_or_else(Outcome::Failed),
                () = self.abort.cancelled() => {
                    tracing::warn!("job cut off by the shutdown timeout; its transaction rolls back");
                    return Ended {
                        id: delivery.id,
                        attempt: delivery.attempt,
                        outcome: RowOutcome::Dead("cut off by shutdown".into()),
                        progress: None,
                        ack: false,
                    };
                }
            };
            self.finish(delivery, &job, outcome)
        }
        .instrument(span)
        .await
    }

    /// Counts an outcome; returns the text of a rejection (for its row).
    fn count(&self, outcome: &Outcome) -> String {
        let s = &self.stats;
        let counter = match outcome {
            Outcome::Done(_) => &s.done,
            Outcome::Duplicate => &s.duplicates,
            Outcome::Rejected(_) => &s.rejected,
            Outcome::Failed(JobError::Cancel(_)) => &s.cancelled,
            Outcome::Failed(JobError::Snooze(_)) => &s.snoozed,
            Outcome::Failed(_) => &s.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Rejected(r) => r.to_string(),
            _ => String::new(),
        }
    }

    /// Classifies one job's outcome (counting and logging it, in the job's span when called
    /// inside it) into what is written back.
    pub(crate) fn finish(&self, delivery: Delivery, job: &UnitJob, outcome: Outcome) -> Ended {
        let attempt = delivery.attempt;
        let max = delivery.max_attempts;
        let text = self.count(&outcome);
        let row = match outcome {
            Outcome::Done(out) => {
                tracing::debug!("job done");
                RowOutcome::Done(out)
            }
            Outcome::Duplicate => {
                tracing::info!("job already took effect; redelivery ignored");
                RowOutcome::Done(serde_json::json!({ "duplicate": true }))
            }
            Outcome::Rejected(r) => {
                tracing::warn!(reason = %r, "job rejected");
                RowOutcome::Rejected(scrub(&text))
            }
            Outcome::Failed(JobError::Fail(msg)) => {
                tracing::error!(error.message = %msg, attempt, max_attempts = max, "job failed permanently; it is dead");
                RowOutcome::Dead(scrub(&msg))
            }
            Outcome::Failed(JobError::Cancel(msg)) => {
                tracing::info!(reason = %msg, "job cancelled itself");
                RowOutcome::Cancelled(scrub(&msg))
            }
            Outcome::Failed(JobError::Snooze(after)) => {
                tracing::info!(
                    after_ms = after.as_millis() as u64,
                    "job snoozed; this attempt does not count"
                );
                RowOutcome::Snoozed(after)
            }
            Outcome::Failed(JobError::Retry { reason, after }) => {
                if attempt < max {
                    let delay = after.unwrap_or_else(|| {
                        self.registry.backoff(job.kind, attempt, &self.settings)
                    });
                    tracing::warn!(error.message = %reason, attempt, max_attempts = max,
                        retry_in_ms = delay.as_millis() as u64, "job failed; it will be retried");
                    RowOutcome::Failed {
                        reason: scrub(&reason),
                        retry_in: delay,
                    }
                } else {
                    tracing::error!(error.message = %reason, attempt, max_attempts = max,
                        "job failed on its last attempt; it is dead");
                    RowOutcome::Failed {
                        reason: scrub(&reason),
                        retry_in: Duration::ZERO,
                    }
                }
            }
        };
        Ended {
            id: delivery.id,
            attempt,
            outcome: row,
            progress: job.ctx.unsaved_progress(),
            ack: true,
        }
    }
}

/// Runs a job's future within its time limit. A panic must not take the worker down or leave
/// the job "running": it becomes a permanent failure with the panic message (a panic is a bug,
/// not a hiccup); the limit is a retryable failure. `Err` also tells the caller that the body
/// was cut short, possibly in the middle of a statement.
pub(crate) async fn within_limits<T>(
    timeout: Duration,
    body: impl Future<Output = T>,
) -> Result<T, JobError> {
    match tokio::time::timeout(timeout, std::panic::AssertUnwindSafe(body).catch_unwind()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(panic)) => Err(JobError::fail(format!(
            "job panicked: {}",
            panic_message(&panic)
        ))),
        Err(_) => Err(JobError::retry(format!(
            "timed out after {}s",
            timeout.as_secs_f64()
        ))),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The scoped part of a lone job: one transaction, tenant set first, tenant checked, run record
/// claimed, job body, run record completed (with a tenant-context check), commit.
///
/// Two round trips besides the body's own: `BEGIN`, `set_config` and the claim travel in one
/// message, the completion and `COMMIT` in another.
async fn execute(scope: &Scope, tenant: TenantId, job: &mut UnitJob) -> Outcome {
    let (mut tx, claimed) = match begin_and_claim(scope, tenant, std::iter::once(&*job)).await {
        Ok(c) => c,
        Err(outcome) => return outcome,
    };
    if claimed.is_empty() {
        let _ = tx.rollback().await;
        return Outcome::Duplicate;
    }
    let out = match job.run(&mut tx).await {
        Ok(out) => out,
        Err(e) => {
            let _ = tx.rollback().await;
            return Outcome::Failed(e);
        }
    };
    // Completing the run record doubles as the tenant-context check: if the job switched
    // app.tenant_id, `complete_job_runs` raises, the COMMIT sent with it is skipped and the
    // work is rolled back. A refusal comes back as `ContextTampered`, a permanent failure.
    let complete = complete_statement(&tx, std::iter::once((job.job_id, &out)), std::iter::empty());
    match tx.commit_after(&complete).await {
        Ok(()) => Outcome::Done(out),
        Err(e) => e.into(),
    }
}

/// Begins a scoped transaction for `tenant` and, in the same round trip, checks the tenant and
/// claims the run records of `jobs`. Returns the transaction and the ids it claimed: a job
/// whose record already exists (a redelivery) is not among them, and a second delivery
/// running concurrently waits here for the first to commit. Under RLS the app role sees only
/// this tenant's row of `tenants`, so "no row" means an unknown tenant.
///
/// Every value inlined into the statement is one this crate formatted: UUIDs, kind names from
/// the registry (checked names), integers.
///
/// # Errors
/// [`Outcome::Rejected`] for an unknown or suspended tenant (rolled back), or
/// [`Outcome::Failed`] with the database error.
pub(crate) async fn begin_and_claim<'a>(
    scope: &Scope,
    tenant: TenantId,
    jobs: impl Iterator<Item = &'a UnitJob>,
) -> Result<(ScopedTx, HashSet<Uuid>), Outcome> {
    let t = tenant.0.hyphenated();
    let mut longest = Duration::ZERO;
    let values: Vec<String> = jobs
        .map(|job| {
            longest = longest.max(job.timeout);
            format!(
                "('{}'::uuid, '{}', {})",
                job.job_id.0.hyphenated(),
                job.kind,
                job.ctx.attempt()
            )
        })
        .collect();
    let claim = format!(
        "with t as (select status from tenants where id = '{t}'),
              ins as (insert into job_runs (tenant_id, job_id, kind, attempt)
                      select '{t}', j.id, j.kind, j.attempt
                      from t, (values {values}) as j(id, kind, attempt)
                      where t.status = 'active'
                      on conflict do nothing
                      returning job_id)
         select (select status from t) as status,
                coalesce((select string_agg(job_id::text, ',') from ins), '') as claimed",
        values = values.join(", "),
    );
    // The context outlives the longest job by a margin (the jobs of a round run one after
    // another, each within its own limit, but the round's limit is theirs).
    let ttl = longest * values.len() as u32 + Duration::from_secs(60);
    let (tx, row) = scope.begin_then(tenant, ttl, true, Some(&claim)).await?;
    let row = row.ok_or(sqlx::Error::RowNotFound)?;
    let status: Option<String> = sqlx::Row::try_get(&row, "status")?;
    let claimed: String = sqlx::Row::try_get(&row, "claimed")?;
    let rejection = match status.as_deref() {
        None => Rejection::UnknownTenant,
        Some("active") => {
            let ids = claimed
                .split(',')
                .filter_map(|id| id.parse().ok())
                .collect();
            return Ok((tx, ids));
        }
        Some(_) => Rejection::SuspendedTenant,
    };
    let _ = tx.rollback().await;
    Err(Outcome::Rejected(rejection))
}

/// The statement that ends a scoped transaction's jobs, sent with `COMMIT`:
/// `public.complete_job_runs` completes the run records of the jobs `done` (with their
/// results), drops those of the jobs that `failed` (their work was rolled back to their
/// savepoints), raises when the tenant context changed, so that the `COMMIT` never runs, and
/// with the transaction's completion seal releases its guard (without which it cannot
/// commit).
pub(crate) fn complete_statement<'a>(
    tx: &ScopedTx,
    done: impl Iterator<Item = (JobId, &'a serde_json::Value)>,
    failed: impl Iterator<Item = JobId>,
) -> String {
    let tenant = tx.tenant_id();
    let outs: Vec<serde_json::Value> = done
        .map(|(id, out)| serde_json::json!({ "job_id": id.0, "result": out }))
        .collect();
    let failed: Vec<String> = failed
        .map(|id| format!("'{}'::uuid", id.0.hyphenated()))
        .collect();
    format!(
        "select public.complete_job_runs('{}', {}::jsonb, array[{}]::uuid[], '{}')",
        tenant.0.hyphenated(),
        dollar_quote(&serde_json::Value::Array(outs).to_string()),
        failed.join(", "),
        tx.done_seal(),
    )
}
