//! The worker: fetch a group of jobs through our apalis backend, verify each envelope and
//! parse it with its kind, run the jobs in tenant-scoped transactions (several short jobs of
//! one tenant in one shared round), record the runs, write the outcomes back.
//!
//! Three weaknesses of apalis-postgres 1.0 are handled here and in the backend:
//! - **Payloads that fail to decode stop an apalis worker.** The backend's codec passes the
//!   stored bytes through undecoded, so decoding can never fail; the bytes are parsed and
//!   verified by our handler, which rejects bad ones like any other bad envelope.
//! - **Retries are immediate.** A retryable failure is written back with its `run_at` moved
//!   into the future (exponential backoff with jitter), in the same statement as the failure;
//!   the fetch only takes jobs whose `run_at` has passed.
//! - **Any database error ends its worker.** [`Worker::run`] supervises the apalis worker: on
//!   error it logs, releases the jobs the dead generation held, backs off and starts a new
//!   generation, until shutdown.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::layers::WorkerBuilderExt as _;
use apalis::prelude::*;
use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy, Strategy};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ack::{Ack, Acker, ProgressWriter};
use super::backend::{CostBook, Group, TenantStorage};
pub use super::backend::{FetchOrder, fetch_once};
pub use super::execute::Summary;
use super::execute::{Ended, Executor, Ready, Stats};
use crate::config::Settings;
use crate::envelope::keys::Keyring;
use crate::ids::TenantId;
use crate::job::{RegisterError, Registry, TenantJob};
use crate::scope::Scope;

/// Errors that stop a worker from starting (everything else is logged and survived).
///
/// **Note:** a worker does not audit the security posture itself; callers run
/// [`crate::db::audit::run`] first, as `tenant-worker run` does.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Database error during start-up.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A kind was registered twice (or has an invalid name).
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The worker has no kinds to run.
    #[error("the worker has no job kinds registered: register some (or the built-ins) first")]
    NoKinds,
    /// The queue pool is too small to run the worker.
    #[error(
        "the queue pool allows {0} connections; the worker needs at least {min} (one is held \
         for LISTEN while others fetch and write outcomes)",
        min = crate::config::MIN_CONNECTIONS
    )]
    PoolTooSmall(u32),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A worker process's job runner: it fetches the jobs of the kinds it has registered, verifies
/// each, runs it in its tenant's scoped transaction and records the outcome.
///
/// ```no_run
/// # async fn demo(
/// #     scope: tenant_worker::Scope,
/// #     queue_pool: sqlx::PgPool,
/// #     keyring: tenant_worker::Keyring,
/// #     settings: tenant_worker::Settings,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// # use tenant_worker::{JobContext, JobError, ScopedTx, TenantJob};
/// # struct Ping;
/// # impl TenantJob for Ping {
/// #     const KIND: &'static str = "ping";
/// #     type Args = ();
/// #     type Output = ();
/// #     async fn run(&self, _: &mut ScopedTx, _: &JobContext, _: ()) -> Result<(), JobError> { Ok(()) }
/// # }
/// use tenant_worker::{RunOptions, Worker};
///
/// let worker = Worker::builder(scope, queue_pool, keyring, &settings)
///     .register(Ping)
///     .build()?;
/// let summary = worker.run_until_idle().await?;
/// println!("{} jobs done", summary.done);
/// # Ok(()) }
/// ```
pub struct Worker {
    state: WorkerState,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("kinds", &self.state.exec.registry)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Worker`]: its connections and keys, and the kinds it runs.
pub struct WorkerBuilder {
    scope: Scope,
    queue_pool: PgPool,
    keyring: Keyring,
    settings: Settings,
    registry: Registry,
    error: Option<RegisterError>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("kinds", &self.registry)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// Adds a kind. A kind registered twice is refused by [`WorkerBuilder::build`].
    pub fn register<J: TenantJob>(mut self, job: J) -> Self {
        if let Err(e) = self.registry.register(job)
            && self.error.is_none()
        {
            self.error = Some(e);
        }
        self
    }

    /// Adds every kind of `registry` (e.g. [`crate::jobs::builtins`]).
    pub fn registry(mut self, registry: &Registry) -> Self {
        if let Err(e) = self.registry.merge(registry)
            && self.error.is_none()
        {
            self.error = Some(e);
        }
        self
    }

    /// The worker.
    ///
    /// # Errors
    /// [`Error::Register`] when a kind was registered twice; [`Error::NoKinds`] when none was.
    pub fn build(self) -> Result<Worker> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        if self.registry.is_empty() {
            return Err(Error::NoKinds);
        }
        let max = self.queue_pool.options().get_max_connections();
        if max < crate::config::MIN_CONNECTIONS {
            return Err(Error::PoolTooSmall(max));
        }
        // The worker's bookkeeping (outcomes, progress, the idle check, releasing jobs) runs on
        // a pool of its own with the given pool's settings, never on connections the
        // application also uses: a BEGIN the application cancels mid-flight can leave one of
        // its connections inside a transaction (see `generation_pool`), where an outcome
        // would never commit and the idle check would see a frozen `now()`.
        let queue_pool = generation_pool(&self.queue_pool);
        let settings = Arc::new(self.settings);
        let exec = Executor {
            scope: self.scope,
            keyring: self.keyring,
            registry: Arc::new(self.registry),
            stats: Stats::default(),
            progress: Arc::new(ProgressWriter::new(queue_pool.clone())),
            stopping: CancellationToken::new(),
            abort: CancellationToken::new(),
            settings: settings.clone(),
        };
        Ok(Worker {
            state: WorkerState {
                acker: Arc::new(Acker::new(queue_pool.clone())),
                costs: Arc::default(),
                queue_pool,
                slots: Arc::new(tokio::sync::Semaphore::new(
                    settings.worker.concurrency.max(1),
                )),
                exec: Arc::new(exec),
            },
        })
    }
}

impl Worker {
    /// A worker running tenant-data work through `scope` and reading the queue on
    /// `queue_pool` (the queue role's), verifying envelopes with `keyring`.
    pub fn builder(
        scope: Scope,
        queue_pool: PgPool,
        keyring: Keyring,
        settings: &Settings,
    ) -> WorkerBuilder {
        WorkerBuilder {
            scope,
            queue_pool,
            keyring,
            settings: settings.clone(),
            registry: Registry::new(),
            error: None,
        }
    }

    /// The kinds this worker runs.
    pub fn registry(&self) -> &Registry {
        &self.state.exec.registry
    }

    /// Runs until `shutdown` is cancelled (or, with `until_idle`, until the queue has no
    /// runnable job). Survives database outages: each apalis worker generation that fails is
    /// replaced after a backoff.
    ///
    /// On shutdown the worker stops fetching, tells running jobs (their
    /// [`crate::JobContext::is_cancelled`]) and lets them finish for up to
    /// `worker.shutdown_timeout_secs`; jobs cut off are re-run later and take effect once.
    ///
    /// # Errors
    /// Only start-up errors; failures while running are logged and survived.
    pub async fn run(self, opts: RunOptions, shutdown: CancellationToken) -> Result<Summary> {
        run(self.state, opts, shutdown).await
    }

    /// Runs until no job is runnable now, then returns.
    ///
    /// # Errors
    /// See [`Worker::run`].
    pub async fn run_until_idle(self) -> Result<Summary> {
        let opts = RunOptions {
            until_idle: true,
            name: None,
        };
        self.run(opts, CancellationToken::new()).await
    }
}

/// What the apalis handler shares: the executor, the queue, the slots and the writer.
#[derive(Clone)]
struct WorkerState {
    exec: Arc<Executor>,
    queue_pool: PgPool,
    /// One per job or round running: `concurrency` in all.
    slots: Arc<tokio::sync::Semaphore>,
    /// Writes job outcomes back to the queue.
    acker: Arc<Acker>,
    /// Worker time per tenant, for the fair fetch.
    costs: Arc<CostBook>,
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
) -> std::result::Result<serde_json::Value, BoxDynError> {
    let state: &WorkerState = &state;
    let worker = worker.name();
    let jobs = group.jobs.len();
    let mut rejected = Vec::new();
    let mut rounds: Vec<(TenantId, Vec<Ready>)> = Vec::new();
    let mut alone = Vec::new();
    for delivery in group.jobs {
        match state.exec.prepare(delivery) {
            Ok(ready) if ready.job.shares_rounds() => {
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
            if state.exec.abort.is_cancelled() {
                return;
            }
            let started = std::time::Instant::now();
            let tenant = ready.tenant;
            let ended = state.exec.run_alone(ready).await;
            let secs = started.elapsed().as_secs_f64();
            state.costs.record(&tenant.to_string(), secs, 1);
            write_back(state, worker, vec![ended]).await;
        }));
    }
    futures::future::join_all(units).await;
    Ok(serde_json::json!({ "jobs": jobs }))
}

/// Runs `members` (two or more jobs of `tenant`) as one round; jobs the round hands back run
/// alone, within the same slot.
async fn run_round_unit(
    state: &WorkerState,
    worker: &str,
    tenant: TenantId,
    mut members: Vec<Ready>,
) {
    let Ok(_slot) = state.slots.acquire().await else {
        return;
    };
    let exec = &state.exec;
    if exec.abort.is_cancelled() {
        return;
    }
    let started = std::time::Instant::now();
    let results = {
        let mut jobs: Vec<&mut super::execute::UnitJob> =
            members.iter_mut().map(|r| &mut r.job).collect();
        tokio::select! {
            r = super::rounds::run_round(&exec.scope, tenant, &mut jobs) => r,
            () = exec.abort.cancelled() => {
                // Dropping the round closes its connection, which rolls it back; `run` releases
                // the jobs to the queue.
                tracing::warn!(%tenant, jobs = jobs.len(), "round cut off by the shutdown timeout; its transaction rolls back");
                return;
            }
        }
    };
    let mut ended = Vec::with_capacity(members.len());
    let mut again = Vec::new();
    for (ready, result) in members.into_iter().zip(results) {
        match result {
            Some(outcome) => {
                let span = ready.job.span.clone();
                ended.push(span.in_scope(|| exec.finish(ready.delivery, &ready.job, outcome)));
            }
            None => again.push(ready),
        }
    }
    let again = futures::future::join_all(again.into_iter().map(|r| exec.run_alone(r)));
    ended.extend(again.await);
    let secs = started.elapsed().as_secs_f64();
    state.costs.record(&tenant.to_string(), secs, ended.len());
    write_back(state, worker, ended).await;
}

/// Writes the outcomes of ended deliveries back to the queue, in one statement.
async fn write_back(state: &WorkerState, worker: &str, ended: Vec<Ended>) {
    let acks: Vec<Ack> = ended
        .into_iter()
        .filter(|e| e.ack)
        .map(|e| Ack::new(e.id, worker, e.attempt, &e.outcome, e.progress))
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
        () = state.exec.abort.cancelled() => {}
    }
}

/// Options of [`Worker::run`].
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
/// count; with `kinds`, neither do waiting jobs of other kinds (a worker that does not run
/// them is idle while they wait).
///
/// A paused tenant's waiting jobs do not count either: they wait for `tenant resume`.
///
/// `exists` probes, each the exact predicate of a partial index that `setup` keeps (the
/// in-flight `lock_by` index, and per tenant lane with work the fetch index), so the check
/// costs a few index pages per tenant with work however long the queue's history is; a
/// `count(*)` here was a sequential scan of the whole table ten times a second, which took a
/// third of a core from the workers it was watching.
///
/// # Errors
/// Database errors.
pub async fn has_unfinished_jobs(
    pool: &PgPool,
    queue: &str,
    include_delayed: bool,
    kinds: Option<&[String]>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "select exists(select 1 from apalis.jobs
                       where (status = 'Queued' or status = 'Running') and job_type = $1)
             or exists(select 1 from apalis.tenant_lanes l
                       left join public.tenants t on t.id = l.registry_id
                       where l.queue = $1 and l.active and not coalesce(t.paused, false)
                         and exists(select 1 from apalis.jobs j
                                    where j.job_type = $1
                                      and coalesce(j.metadata -> 'tenant_id', '') = l.tenant
                                      and (j.status = 'Pending'
                                           or (j.status = 'Failed' and j.attempts < j.max_attempts))
                                      and ($2 or j.run_at <= clock_timestamp())
                                      and ($3::text[] is null
                                           or coalesce(j.metadata -> 'kind', '') = any($3))))",
    )
    .bind(queue)
    .bind(include_delayed)
    .bind(kinds)
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

/// See [`Worker::run`].
async fn run(state: WorkerState, opts: RunOptions, shutdown: CancellationToken) -> Result<Summary> {
    let settings = state.exec.settings.clone();
    let settings = &settings.worker;
    let stop = CancellationToken::new();
    if opts.until_idle {
        tokio::spawn(idle_watch(
            state.queue_pool.clone(),
            settings.queue.clone(),
            state.exec.fetch_kinds(),
            stop.clone(),
        ));
    }
    {
        let stop = stop.clone();
        let shutdown = shutdown.clone();
        let stopping = state.exec.stopping.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.cancel();
            stopping.cancel();
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
                state.exec.abort.cancel();
                // Let the cut-off transactions roll back, then hand their jobs back at once
                // instead of after the heartbeat timeout.
                tokio::time::sleep(Duration::from_millis(200)).await;
                match release_jobs(&state.queue_pool, &name).await {
                    Ok(n) => tracing::info!(worker = %name, jobs = n, "released cut-off jobs"),
                    Err(e) => tracing::warn!(worker = %name, error.message = %e, "could not release cut-off jobs; the heartbeat timeout will"),
                }
                return Ok(state.exec.stats.summary());
            }
        };
        close_generation_pool(pool).await;
        match result {
            Ok(()) => {
                tracing::info!(worker = %name, "worker stopped");
                return Ok(state.exec.stats.summary());
            }
            Err(e) => {
                if stop.is_cancelled() {
                    tracing::warn!(worker = %name, error.message = %e, "worker ended with an error during shutdown");
                    return Ok(state.exec.stats.summary());
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
                    () = stop.cancelled() => return Ok(state.exec.stats.summary()),
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
#[doc(hidden)]
pub fn generation_pool(queue_pool: &PgPool) -> PgPool {
    queue_pool
        .options()
        .clone()
        .connect_lazy_with((*queue_pool.connect_options()).clone())
}

/// Closes a generation's pool, rolling back whatever its connections left open. Bounded: a
/// connection still held by a cut-off job is closed when it comes back.
#[doc(hidden)]
pub async fn close_generation_pool(pool: PgPool) {
    if tokio::time::timeout(Duration::from_secs(5), pool.close())
        .await
        .is_err()
    {
        tracing::debug!("a worker generation's connection was still in use at close");
    }
}

async fn idle_watch(
    queue_pool: PgPool,
    queue: String,
    kinds: Vec<String>,
    stop: CancellationToken,
) {
    let mut idle_checks = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match has_unfinished_jobs(&queue_pool, &queue, false, Some(&kinds)).await {
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
#[doc(hidden)]
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
        let s = &state.exec.settings.worker;
        let kinds = state.exec.fetch_kinds();
        let config = apalis_postgres::Config::default()
            .queue(s.queue.as_str())
            .batch_size(s.batch_size)
            .heartbeat_interval(Duration::from_secs(s.heartbeat_secs))
            .missed_heartbeats(s.missed_heartbeats);
        let strategy = wake_strategy(&pool, &s.queue, Duration::from_millis(s.poll_interval_ms));
        let order = if s.fairness {
            FetchOrder::Fair {
                // With every slot busy, one frees about every `fair_quantum_ms`.
                quantum: Duration::from_millis(s.fair_quantum_ms) * s.concurrency.max(1) as u32,
            }
        } else {
            FetchOrder::Oldest
        };
        let backend = TenantStorage::new(&pool, config, kinds, order, state.costs.clone())
            .poll_with_strategy(strategy);
        apalis_core::worker::builder::WorkerBuilder::new(name.as_str())
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
    const _: fn(Worker) = |worker| {
        let _handle = tokio::spawn(worker.run(RunOptions::default(), CancellationToken::new()));
    };
}
