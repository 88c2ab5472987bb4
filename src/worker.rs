//! The worker: fetch a group of jobs through our apalis backend ([`crate::backend`]), verify
//! each envelope, run the jobs in tenant-scoped transactions (several short jobs of one tenant
//! in one shared round, [`crate::rounds`]), record the runs, write the outcomes back.
//!
//! Three weaknesses of apalis-postgres 1.0 are handled here and in the backend (see the shared
//! research note):
//! - **Payloads that fail to decode stop an apalis worker.** The backend's codec passes the
//!   stored bytes through undecoded, so decoding can never fail; the bytes are parsed and
//!   verified by our handler, which rejects bad ones like any other bad envelope.
//! - **Retries are immediate.** A retryable failure is written back with its `run_at` moved
//!   into the future (exponential backoff with jitter), in the same statement as the failure;
//!   the fetch only takes jobs whose `run_at` has passed.
//! - **Any database error ends `Worker::run`.** [`run`] supervises the apalis worker: on error it
//!   logs, releases the jobs the dead generation held, backs off and starts a new generation,
//!   until shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::layers::WorkerBuilderExt as _;
use apalis::prelude::*;
use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy, Strategy};
use futures::FutureExt as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, field};
use uuid::Uuid;

use crate::backend::{Delivery, Group, TenantStorage};
use crate::config::{Settings, WorkerSettings};
use crate::envelope::{JobId, Keyring, Rejection, TenantId};
use crate::jobs::declared::Catalog;
use crate::jobs::{JobContext, JobError, JobSpec};
use crate::queue::REJECTED_PREFIX;
use crate::rounds::RoundJob;

/// Errors that stop [`run`] (everything else is logged and survived).
///
/// **Note:** `run` does not audit the security posture itself; callers run
/// [`crate::audit::run`] first, as `tenant-worker run` does.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Database error during start-up.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a job handler needs. Job bodies only ever see a [`crate::tenant::TenantTx`] from it.
#[derive(Clone)]
pub struct WorkerState {
    app_pool: PgPool,
    queue_pool: PgPool,
    keyring: Arc<Keyring>,
    settings: Arc<WorkerSettings>,
    stats: Arc<Stats>,
    catalog: Arc<Catalog>,
    exports_dir: std::path::PathBuf,
    imports_dir: std::path::PathBuf,
    /// Cancelled when the shutdown timeout cuts in-flight jobs off: their transactions roll
    /// back, so they take effect once when run again.
    abort: CancellationToken,
    /// One per job or round running: `concurrency` in all.
    slots: Arc<tokio::sync::Semaphore>,
    /// Writes job outcomes back to the queue.
    acker: Arc<crate::backend::Acker>,
}

/// Counters for one [`run`].
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs that took effect.
    pub done: AtomicU64,
    /// Jobs skipped because their run record existed (redelivery / replay).
    pub duplicates: AtomicU64,
    /// Jobs rejected before touching tenant data.
    pub rejected: AtomicU64,
    /// Attempts that failed and will be retried (or are dead).
    pub failed: AtomicU64,
}

/// A summary of a finished [`run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Jobs that took effect.
    pub done: u64,
    /// Redeliveries that were no-ops.
    pub duplicates: u64,
    /// Rejected jobs.
    pub rejected: u64,
    /// Failed attempts.
    pub failed: u64,
}

impl WorkerState {
    /// State for a worker process.
    pub fn new(
        app_pool: PgPool,
        queue_pool: PgPool,
        keyring: Keyring,
        settings: &Settings,
    ) -> Self {
        Self {
            acker: Arc::new(crate::backend::Acker::new(queue_pool.clone())),
            app_pool,
            queue_pool,
            keyring: Arc::new(keyring),
            settings: Arc::new(settings.worker.clone()),
            stats: Arc::new(Stats::default()),
            catalog: Arc::new(Catalog::new()),
            exports_dir: settings.exports.dir.clone(),
            imports_dir: settings.imports.dir.clone(),
            abort: CancellationToken::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(
                settings.worker.concurrency.max(1),
            )),
        }
    }

    /// Uses these declared jobs (named exports, ...).
    pub fn with_catalog(mut self, catalog: Catalog) -> Self {
        self.catalog = Arc::new(catalog);
        self
    }

    fn summary(&self) -> Summary {
        Summary {
            done: self.stats.done.load(Ordering::Relaxed),
            duplicates: self.stats.duplicates.load(Ordering::Relaxed),
            rejected: self.stats.rejected.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
        }
    }
}

/// Error reported to apalis for a rejected job (becomes `Killed`, never retried).
#[derive(Debug, thiserror::Error)]
#[error("{REJECTED_PREFIX}{0}")]
struct Rejected(String);

/// What happened to one delivery.
pub(crate) enum Outcome {
    Done(serde_json::Value),
    Duplicate,
}

pub(crate) enum ExecError {
    Rejected(Rejection),
    Job(JobError),
}

impl From<sqlx::Error> for ExecError {
    fn from(e: sqlx::Error) -> Self {
        ExecError::Job(e.into())
    }
}

impl From<crate::tenant::Error> for ExecError {
    fn from(e: crate::tenant::Error) -> Self {
        ExecError::Job(e.into())
    }
}

/// The retry delay before attempt `attempt + 1`: `base * 2^(attempt-1)`, capped, with "equal
/// jitter" (uniform in the upper half) so retries of many jobs spread out.
pub fn backoff_delay(settings: &WorkerSettings, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let raw = settings
        .backoff_base_ms
        .saturating_mul(1u64 << exp)
        .min(settings.backoff_max_ms);
    let half = raw / 2;
    let jitter = if half > 0 {
        rand::Rng::gen_range(&mut rand::thread_rng(), 0..=half)
    } else {
        0
    };
    Duration::from_millis(raw - half + jitter)
}

/// A verified job, ready to run alone or in a round.
struct Ready {
    delivery: Delivery,
    tenant: TenantId,
    job: RoundJob,
}

/// What one job's delivery ended with: the outcome reported for it, when to retry it, and
/// whether to write it back (`false` for a job cut off by the shutdown timeout, which `run`
/// releases to the queue instead).
struct Ended {
    id: String,
    attempt: u32,
    result: Result<serde_json::Value, BoxDynError>,
    retry_in: Option<Duration>,
    ack: bool,
}

/// The apalis handler: one fetched [`Group`] of jobs, normally all of one tenant.
///
/// Each job is verified on its own (a bad envelope is rejected alone). The verified jobs that
/// share rounds run as one round per signed tenant; every other job runs alone. Rounds and
/// lone jobs run concurrently, each holding one of the worker's `concurrency` slots, and each
/// writes its jobs' outcomes back to the queue as soon as it ends.
async fn handle(
    group: Group,
    state: Data<WorkerState>,
    worker: WorkerContext,
) -> Result<serde_json::Value, BoxDynError> {
    let state: &WorkerState = &state;
    let worker = worker.name();
    let jobs = group.jobs.len();
    let mut rejected = Vec::new();
    let mut rounds: Vec<(TenantId, Vec<Ready>)> = Vec::new();
    let mut alone = Vec::new();
    for delivery in group.jobs {
        match prepare(state, delivery) {
            Ok(ready) if crate::rounds::shares_rounds(&ready.job.spec) => {
                match rounds.iter_mut().find(|(t, _)| *t == ready.tenant) {
                    Some((_, members)) => members.push(ready),
                    None => rounds.push((ready.tenant, vec![ready])),
                }
            }
            Ok(ready) => alone.push(ready),
            Err(ended) => rejected.push(ended),
        }
    }
    let mut units: Vec<futures::future::BoxFuture<'_, ()>> = Vec::new();
    if !rejected.is_empty() {
        units.push(Box::pin(write_back(state, worker, rejected)));
    }
    for (tenant, members) in rounds {
        if members.len() == 1 {
            alone.extend(members);
        } else {
            units.push(Box::pin(run_round_unit(state, worker, tenant, members)));
        }
    }
    for ready in alone {
        units.push(Box::pin(async move {
            let Ok(_slot) = state.slots.acquire().await else {
                return;
            };
            // Cut off while it waited for a slot: `run` releases it to the queue.
            if state.abort.is_cancelled() {
                return;
            }
            let ended = run_alone(state, ready).await;
            write_back(state, worker, vec![ended]).await;
        }));
    }
    futures::future::join_all(units).await;
    Ok(serde_json::json!({ "jobs": jobs }))
}

/// Verifies one delivery's envelope and parses its job; a rejection is returned as the ended
/// delivery to write back.
fn prepare(state: &WorkerState, delivery: Delivery) -> Result<Ready, Ended> {
    let queued_id = JobId::parse_any(&delivery.id);
    let span = tracing::info_span!(
        "job",
        job_id = %queued_id.map(|j| j.to_string()).unwrap_or_else(|| delivery.id.clone()),
        tenant_id = field::Empty,
        kind = field::Empty,
        attempt = delivery.attempt
    );
    let _enter = span.enter();
    let rejected = |r: Rejection, delivery: Delivery| Ended {
        id: delivery.id,
        attempt: delivery.attempt,
        result: Err(reject(state, r)),
        retry_in: None,
        ack: true,
    };
    let now = chrono::Utc::now().timestamp();
    let verified = match state.keyring.verify(
        &delivery.payload,
        state.settings.max_payload_bytes,
        queued_id,
        now,
    ) {
        Ok(v) => v,
        Err(r) => return Err(rejected(r, delivery)),
    };
    span.record("tenant_id", field::display(verified.tenant_id));
    span.record("kind", field::display(&verified.kind));
    let spec = match JobSpec::parse(&verified.kind, &verified.args, &state.catalog) {
        Ok(s) => s,
        Err(r) => return Err(rejected(r, delivery)),
    };
    let ctx = JobContext {
        job_id: verified.job_id,
        attempt: delivery.attempt,
        exports_dir: state.exports_dir.clone(),
        imports_dir: state.imports_dir.clone(),
        catalog: state.catalog.clone(),
    };
    let timeout = state.settings.timeout_for(spec.kind());
    drop(_enter);
    Ok(Ready {
        delivery,
        tenant: verified.tenant_id,
        job: RoundJob {
            spec,
            ctx,
            timeout,
            span,
        },
    })
}

/// Runs one job alone in its own scoped transaction, within its time limit.
async fn run_alone(state: &WorkerState, ready: Ready) -> Ended {
    let Ready {
        delivery,
        tenant,
        job:
            RoundJob {
                spec,
                ctx,
                timeout,
                span,
            },
    } = ready;
    async {
        let run = within_limits(timeout, execute(&state.app_pool, tenant, &spec, &ctx));
        let result = tokio::select! {
            r = run => r.unwrap_or_else(|e| Err(ExecError::Job(e))),
            () = state.abort.cancelled() => {
                tracing::warn!("job cut off by the shutdown timeout; its transaction rolls back");
                return Ended {
                    id: delivery.id,
                    attempt: delivery.attempt,
                    result: Err(Box::new(JobFailed("cut off by shutdown".into()))),
                    retry_in: None,
                    ack: false,
                };
            }
        };
        finish(state, delivery, result)
    }
    .instrument(span.clone())
    .await
}

/// Runs `members` (two or more jobs of `tenant`) as one round; jobs the round hands back run
/// alone, within the same slot.
async fn run_round_unit(state: &WorkerState, worker: &str, tenant: TenantId, members: Vec<Ready>) {
    let Ok(_slot) = state.slots.acquire().await else {
        return;
    };
    if state.abort.is_cancelled() {
        return;
    }
    let jobs: Vec<&RoundJob> = members.iter().map(|r| &r.job).collect();
    let results = tokio::select! {
        r = crate::rounds::run_round(&state.app_pool, tenant, &jobs) => r,
        () = state.abort.cancelled() => {
            // Dropping the round closes its connection, which rolls it back; `run` releases
            // the jobs to the queue.
            tracing::warn!(%tenant, jobs = members.len(), "round cut off by the shutdown timeout; its transaction rolls back");
            return;
        }
    };
    let mut ended = Vec::with_capacity(members.len());
    let mut again = Vec::new();
    for (ready, result) in members.into_iter().zip(results) {
        match result {
            Some(result) => {
                let span = ready.job.span.clone();
                ended.push(span.in_scope(|| finish(state, ready.delivery, result)));
            }
            None => again.push(ready),
        }
    }
    let again = futures::future::join_all(again.into_iter().map(|r| run_alone(state, r)));
    ended.extend(again.await);
    write_back(state, worker, ended).await;
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
        Ok(Err(panic)) => Err(JobError::Fatal(format!(
            "job panicked: {}",
            panic_message(&panic)
        ))),
        Err(_) => Err(JobError::Retryable(format!(
            "timed out after {}s",
            timeout.as_secs()
        ))),
    }
}

/// Classifies one job's result (counting and logging it in its span) into what is written back.
fn finish(state: &WorkerState, delivery: Delivery, result: Result<Outcome, ExecError>) -> Ended {
    let attempt = delivery.attempt;
    let (result, retry_in) = match result {
        Ok(Outcome::Done(out)) => {
            state.stats.done.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("job done");
            (Ok(out), None)
        }
        Ok(Outcome::Duplicate) => {
            state.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::info!("job already took effect; redelivery ignored");
            (Ok(serde_json::json!({ "duplicate": true })), None)
        }
        Err(ExecError::Rejected(r)) => (Err(reject(state, r)), None),
        Err(ExecError::Job(JobError::Fatal(msg))) => {
            state.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error.message = %msg, "job failed permanently");
            (Err(AbortError::new(JobFailed(scrub(&msg))).into()), None)
        }
        Err(ExecError::Job(JobError::Retryable(msg))) => {
            state.stats.failed.fetch_add(1, Ordering::Relaxed);
            let retry_in = if attempt < state.settings.max_attempts {
                let delay = backoff_delay(&state.settings, attempt);
                tracing::warn!(error.message = %msg, retry_in_ms = delay.as_millis() as u64, "job failed; will retry");
                Some(delay)
            } else {
                tracing::error!(error.message = %msg, "job failed on its last attempt; it is dead");
                None
            };
            let failed: BoxDynError = Box::new(JobFailed(scrub(&msg)));
            (Err(failed), retry_in)
        }
    };
    Ended {
        id: delivery.id,
        attempt,
        result,
        retry_in,
        ack: true,
    }
}

/// Writes the outcomes of ended deliveries back to the queue, in one statement.
async fn write_back(state: &WorkerState, worker: &str, ended: Vec<Ended>) {
    let acks: Vec<crate::backend::Ack> = ended
        .into_iter()
        .filter(|e| e.ack)
        .map(|e| ack_of(&e.result, e.id, worker, e.attempt, e.retry_in))
        .collect();
    if acks.is_empty() {
        return;
    }
    let n = acks.len();
    tokio::select! {
        written = state.acker.ack(acks) => if let Err(e) = written {
            tracing::error!(error.message = %e, jobs = n, "could not record the jobs' outcomes in the queue");
        },
        // Cut off: the rows stay `Running` until `run` releases them (or orphan recovery
        // does); the re-runs find their run records and do nothing.
        () = state.abort.cancelled() => {}
    }
}

/// The row update for one finished delivery, as apalis's lifecycle would classify it: `Ok` is
/// `Done`, an [`AbortError`] is `Killed` (never retried), any other error is `Failed` (fetched
/// again while attempts remain, once `run_at` has passed).
fn ack_of(
    result: &Result<serde_json::Value, BoxDynError>,
    id: String,
    worker: &str,
    attempt: u32,
    retry_in: Option<Duration>,
) -> crate::backend::Ack {
    let (status, result) = match result {
        Ok(v) => ("Done", serde_json::json!({ "Ok": v })),
        Err(e) if e.downcast_ref::<AbortError>().is_some() => {
            ("Killed", serde_json::json!({ "Err": e.to_string() }))
        }
        Err(e) => ("Failed", serde_json::json!({ "Err": e.to_string() })),
    };
    crate::backend::Ack {
        id,
        worker: worker.to_string(),
        status,
        attempt,
        result,
        retry_in_ms: retry_in.map(|d| d.as_millis() as f64),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct JobFailed(String);

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Replaces NUL characters, which PostgreSQL text and jsonb cannot store: an error or result
/// that echoes hostile input must not make the queue's ack (or the run record) fail.
fn scrub(s: &str) -> String {
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

fn reject(state: &WorkerState, r: Rejection) -> BoxDynError {
    state.stats.rejected.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(reason = %r, "job rejected");
    AbortError::new(Rejected(scrub(&r.to_string()))).into()
}

/// The scoped part: one transaction, tenant set first, tenant checked, run record claimed,
/// job body, run record completed (with a tenant-context check), commit.
///
/// Two round trips besides the body's own: `BEGIN`, `set_config` and the claim travel in one
/// message, the completion and `COMMIT` in another. Every value inlined into them is one this
/// crate formatted (UUIDs, a kind name from a fixed set, an integer) or dollar-quoted JSON.
async fn execute(
    pool: &PgPool,
    tenant: TenantId,
    spec: &JobSpec,
    ctx: &JobContext,
) -> Result<Outcome, ExecError> {
    let (mut tx, claimed) =
        crate::rounds::begin_and_claim(pool, tenant, std::iter::once((spec, ctx))).await?;
    if claimed.is_empty() {
        let _ = tx.rollback().await;
        return Ok(Outcome::Duplicate);
    }
    let out = match spec.run(&mut tx, ctx).await {
        Ok(mut out) => {
            scrub_json(&mut out);
            out
        }
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(ExecError::Job(e));
        }
    };
    // Completing the run record doubles as the tenant-context check: if the job switched
    // app.tenant_id, `complete_job_runs` raises, the COMMIT sent with it is skipped and the
    // work is rolled back. A refusal comes back as `ContextTampered`, a permanent failure.
    let complete = crate::rounds::complete_statement(
        tenant,
        std::iter::once((ctx.job_id, &out)),
        std::iter::empty(),
    );
    tx.commit_after(&complete).await?;
    Ok(Outcome::Done(out))
}

/// Options of [`run`].
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Exit once no runnable job remains in the queue.
    pub until_idle: bool,
    /// Unique name prefix of this worker process (default: host-pid).
    pub name: Option<String>,
}

/// True while `queue` has a job that is not finished: one a worker is working on, one it could
/// pick up now, and with `include_delayed` also one waiting for a later `run_at` (scheduled,
/// or retrying after its backoff). Jobs that are done, dead, rejected or cancelled do not
/// count.
///
/// Two `exists` probes, each the exact predicate of a partial index that `setup` keeps (the
/// in-flight `lock_by` index and apalis's fetch index), so the check costs a few index pages
/// however long the queue's history is; a `count(*)` here was a sequential scan of the whole
/// table ten times a second, which took a third of a core from the workers it was watching.
///
/// # Errors
/// Database errors.
pub async fn has_unfinished_jobs(
    pool: &PgPool,
    queue: &str,
    include_delayed: bool,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "select exists(select 1 from apalis.jobs
                       where (status = 'Queued' or status = 'Running') and job_type = $1)
             or exists(select 1 from apalis.jobs
                       where job_type = $1
                         and (status = 'Pending' or (status = 'Failed' and attempts < max_attempts))
                         and ($2 or run_at <= clock_timestamp()))",
    )
    .bind(queue)
    .bind(include_delayed)
    .fetch_one(pool)
    .await
}

fn worker_name(prefix: &Option<String>, generation: u64) -> String {
    let base = prefix.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        format!("{host}-{}", std::process::id())
    });
    format!(
        "tw-{base}-{}-g{generation}",
        &Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Puts back the jobs a dead worker generation still held, so they run again now rather than
/// after the heartbeat timeout. Safe even if one of them is still finishing: the run record
/// makes the second execution a no-op.
async fn release_jobs(queue_pool: &PgPool, worker: &str) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "update apalis.jobs set status = 'Pending', lock_by = null, lock_at = null
         where lock_by = $1 and status in ('Queued', 'Running')",
    )
    .bind(worker)
    .execute(queue_pool)
    .await?
    .rows_affected())
}

/// Runs the worker until `shutdown` is cancelled (or, with `until_idle`, until the queue has
/// no runnable job). Survives database outages: each apalis worker generation that fails is
/// replaced after a backoff.
///
/// On shutdown the worker stops fetching and lets in-flight jobs finish for up to
/// `worker.shutdown_timeout_secs`; jobs cut off are re-run later and take effect once.
///
/// # Errors
/// Only start-up errors; failures while running are logged and survived.
pub async fn run(
    state: WorkerState,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<Summary> {
    let settings = state.settings.clone();
    let stop = CancellationToken::new();
    if opts.until_idle {
        tokio::spawn(idle_watch(
            state.queue_pool.clone(),
            settings.queue.clone(),
            stop.clone(),
        ));
    }
    {
        let stop = stop.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.cancel();
        });
    }
    let mut generation = 0u64;
    let mut backoff = Duration::from_millis(200);
    loop {
        generation += 1;
        let name = worker_name(&opts.name, generation);
        let started = std::time::Instant::now();
        let signal = {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                Ok::<(), std::io::Error>(())
            }
        };
        tracing::info!(worker = %name, "worker started");
        let pool = generation_pool(&state.queue_pool);
        let run = run_generation(state.clone(), pool.clone(), name.clone(), signal);
        let grace = {
            let stop = stop.clone();
            let t = Duration::from_secs(settings.shutdown_timeout_secs);
            async move {
                stop.cancelled().await;
                tokio::time::sleep(t).await;
            }
        };
        let result = tokio::select! {
            r = run => r,
            () = grace => {
                close_generation_pool(pool).await;
                tracing::warn!(worker = %name, "shutdown timeout reached; cutting off the jobs still running (they roll back and run again later)");
                state.abort.cancel();
                // Let the cut-off transactions roll back, then hand their jobs back at once
                // instead of after the heartbeat timeout.
                tokio::time::sleep(Duration::from_millis(200)).await;
                match release_jobs(&state.queue_pool, &name).await {
                    Ok(n) => tracing::info!(worker = %name, jobs = n, "released cut-off jobs"),
                    Err(e) => tracing::warn!(worker = %name, error.message = %e, "could not release cut-off jobs; the heartbeat timeout will"),
                }
                return Ok(state.summary());
            }
        };
        close_generation_pool(pool).await;
        match result {
            Ok(()) => {
                tracing::info!(worker = %name, "worker stopped");
                return Ok(state.summary());
            }
            Err(e) => {
                if stop.is_cancelled() {
                    tracing::warn!(worker = %name, error.message = %e, "worker ended with an error during shutdown");
                    return Ok(state.summary());
                }
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(200);
                }
                tracing::error!(worker = %name, error.message = %e, retry_in_ms = backoff.as_millis() as u64,
                    "worker failed (database unavailable?); restarting after a pause");
                match release_jobs(&state.queue_pool, &name).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(worker = %name, jobs = n, "released jobs of the failed worker")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error.message = %e, "could not release jobs yet; the heartbeat timeout will")
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return Ok(state.summary()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A connection pool for one apalis worker generation, with the queue pool's settings.
///
/// apalis's futures are dropped when a generation stops, and a BEGIN dropped mid-flight hands
/// its connection back still inside a transaction (sqlx#4385, seen here as `tw_queue` sessions
/// "idle in transaction" for seconds after a worker stopped). On a shared pool such a
/// connection poisons what uses it next: a fetch sees a frozen `now()` and misses new jobs, a
/// LISTEN taken inside the transaction never hears a NOTIFY, and an enqueue would sit
/// uncommitted. A release check would catch it at one round trip per release, which cost the
/// queue's hot path about 5x in enqueue-to-start latency; a pool that dies with its generation
/// costs nothing per job. Public so that the benchmark's plain-apalis baseline gets the same.
pub fn generation_pool(queue_pool: &PgPool) -> PgPool {
    queue_pool
        .options()
        .clone()
        .connect_lazy_with((*queue_pool.connect_options()).clone())
}

/// Closes a generation's pool, rolling back whatever its connections left open. Bounded: a
/// connection still held by a cut-off job is closed when it comes back.
pub async fn close_generation_pool(pool: PgPool) {
    if tokio::time::timeout(Duration::from_secs(5), pool.close())
        .await
        .is_err()
    {
        tracing::debug!("a worker generation's connection was still in use at close");
    }
}

async fn idle_watch(queue_pool: PgPool, queue: String, stop: CancellationToken) {
    let mut idle_checks = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match has_unfinished_jobs(&queue_pool, &queue, false).await {
            Ok(false) => idle_checks += 1,
            Ok(true) => idle_checks = 0,
            Err(e) => {
                tracing::debug!(error.message = %e, "idle check failed");
                idle_checks = 0;
            }
        }
        if idle_checks >= 3 {
            tracing::info!("queue idle; stopping");
            stop.cancel();
            return;
        }
    }
}

/// One job's future as apalis hands it to the executor.
type JobFuture = apalis_core::worker::lifecycle::LifecycleFuture<
    std::pin::Pin<
        Box<dyn Future<Output = Result<serde_json::Value, BoxDynError>> + Send + 'static>,
    >,
>;

/// Spawns one job's future on tokio. A non-generic function with `'static` types spelled out
/// (rather than passing `tokio::spawn`) keeps the worker's own future provably `Send`, so
/// applications can `tokio::spawn(worker::run(..))`.
fn spawn_task(fut: JobFuture) -> tokio::task::JoinHandle<Result<serde_json::Value, BoxDynError>> {
    tokio::spawn(fut)
}

/// How a worker wakes up to fetch: LISTEN/NOTIFY wakes it within milliseconds of an insert;
/// the interval picks up delayed jobs (scheduled, or retrying after backoff), which NOTIFY does
/// not announce. Public so that the benchmark's plain-apalis baseline wakes exactly the same way.
pub fn wake_strategy(pool: &PgPool, queue: &str, poll_interval: Duration) -> Strategy {
    Strategy::new()
        .apply(DrainingStream(apalis_postgres::Pubsub::new(
            pool.clone(),
            queue.to_string(),
        )))
        .interval(poll_interval)
}

/// A wake-up stream that is always polled until it is pending.
///
/// apalis-core's `StreamStrategy` polls its stream once per worker poll and ignores a ready
/// item. A stream that has just returned an item has no waker registered, so when the worker
/// then parks (e.g. its fetch came back empty because the insert committed a moment later), the
/// NOTIFYs that follow wake nobody and jobs wait for the poll interval. Measured with
/// `bench --scenario latency` at 200 jobs/s: p99 enqueue-to-start of about 400 ms with the
/// stock strategy. Draining the stream to `Pending` keeps the waker registered.
struct DrainingStream<S>(S);

impl<S: futures::Stream + Unpin> PollStrategy for DrainingStream<S> {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        use futures::StreamExt as _;
        let mut woke = false;
        // Bounded, so a flood of notifications cannot starve the worker's own task.
        for _ in 0..1024 {
            match self.0.poll_next_unpin(cx) {
                Poll::Ready(Some(_)) => woke = true,
                Poll::Ready(None) => return Poll::Ready(woke.then_some(())),
                Poll::Pending => {
                    return if woke {
                        Poll::Ready(Some(()))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Ready(Some(()))
    }
}

/// Builds one apalis worker generation and runs it until `signal` resolves.
fn run_generation<F>(
    state: WorkerState,
    pool: PgPool,
    name: String,
    signal: F,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), WorkerError>> + Send>>
where
    F: Future<Output = Result<(), std::io::Error>> + Send + 'static,
{
    Box::pin(async move {
        let s = &state.settings;
        let config = apalis_postgres::Config::default()
            .queue(s.queue.as_str())
            .batch_size(s.batch_size)
            .heartbeat_interval(Duration::from_secs(s.heartbeat_secs))
            .missed_heartbeats(s.missed_heartbeats);
        let strategy = wake_strategy(&pool, &s.queue, Duration::from_millis(s.poll_interval_ms));
        let backend = TenantStorage::new(&pool, config).poll_with_strategy(strategy);
        WorkerBuilder::new(name.as_str())
            .backend(backend)
            .data(state.clone())
            .concurrency(s.concurrency)
            .parallelize(spawn_task)
            .build(handle)
            .run_until(signal)
            .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applications spawn the worker on their runtime: its future must be `Send + 'static`.
    #[allow(dead_code)]
    fn run_can_be_spawned(state: WorkerState) {
        let _handle = tokio::spawn(run(state, RunOptions::default(), CancellationToken::new()));
    }

    #[test]
    fn backoff_doubles_with_jitter_within_bounds() {
        let s = WorkerSettings {
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
            ..WorkerSettings::default()
        };
        for attempt in 1..=6u32 {
            let raw = (100u64 << (attempt - 1)).min(1_000);
            for _ in 0..50 {
                let d = backoff_delay(&s, attempt).as_millis() as u64;
                assert!(
                    d >= raw / 2 && d <= raw,
                    "attempt {attempt}: {d}ms outside [{}, {raw}]",
                    raw / 2
                );
            }
        }
    }
}
