//! Our apalis backend over apalis-postgres's `apalis.jobs` table: the same rows, states and
//! maintenance queries, with a fetch designed for scoped transactions. (Outcomes are written
//! back by [`super::ack`].)
//!
//! apalis-postgres's fetch (`apalis.get_jobs`) takes the oldest runnable jobs whatever their
//! tenant, so a batch of 32 from a queue shared by 100 tenants holds 32 different tenants and
//! every job needs its own scoped transaction. [`TenantStorage`] fetches **the oldest runnable
//! job and more runnable jobs of the same tenant** (by the unsigned routing copy of the tenant
//! id in the row's metadata), so the worker can run them in one scoped transaction (see
//! [`super::rounds`]). The routing copy decides only which jobs travel together: every job's signed
//! envelope is still verified, and a job whose signed tenant differs from its batch's runs in
//! its own round. The fetch also marks the rows `Running` at once, so apalis's separate per-job
//! lock update is not needed (`lock_tasks` off); the shutdown and orphan re-enqueue queries
//! accept `Running` rows as well as `Queued` ones.
//!
//! ## Fairness
//!
//! With fairness on (the default, `worker.fairness`), the tenant is not the oldest job's but
//! the next one's in a weighted fair order across every worker on the queue: see
//! [`FetchOrder`], and the repository's `docs/design.md` for the lanes and their locking.
//! The worker measures the time each tenant's jobs take ([`CostBook`]) and reports it with
//! its next fetch.
//!
//! Everything else (registering, heartbeats, orphan re-enqueue, acks, pushes) runs
//! apalis-postgres's own queries, so `jobs show`, retries, the scheduler and plain apalis
//! workers on the same table keep working unchanged.

use std::task::{Context, Poll};

use apalis_codec::json::JsonCodec;
use apalis_core::backend::codec::Codec;
use apalis_core::backend::persistence::{Persisted, Persistence, TaskEvent, TaskPersistLayer};
use apalis_core::backend::{Backend, BackendConfig, WireFormatBackend, finalize::Durable};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use apalis_postgres::{Config, Error, queries};
use serde_json::Value;
use sqlx::PgPool;
use ulid::Ulid;

/// The fetch: the oldest runnable job of a kind this worker runs (apalis's order: priority,
/// then `run_at`) picks the tenant; up to `$3` runnable jobs of that tenant and those kinds are
/// taken, oldest first, and marked `Running` for worker `$1` in the same statement. `SKIP
/// LOCKED` in both steps lets workers fetch concurrently; two workers take different heads, so
/// usually different tenants. A row without a routing tenant groups with the other such rows
/// (`''`). Jobs of kinds this worker has not registered (`$4`) stay pending for a worker that
/// has.
///
/// Served by the partial index `apalis_jobs_tenant_fetch` (see `db::setup`).
const FETCH: &str = "
with head as (
    select coalesce(metadata -> 'tenant_id', '') as tenant
    from apalis.jobs
    where job_type = $2
      and (status = 'Pending' or (status = 'Failed' and attempts < max_attempts))
      and run_at < now()
      and coalesce(metadata -> 'kind', '') = any($4)
    order by priority desc, run_at asc
    limit 1
    for update skip locked
),
picked as (
    select j.id
    from apalis.jobs j
    where j.job_type = $2
      and (j.status = 'Pending' or (j.status = 'Failed' and j.attempts < j.max_attempts))
      and j.run_at < now()
      and coalesce(j.metadata -> 'tenant_id', '') = (select tenant from head)
      and coalesce(j.metadata -> 'kind', '') = any($4)
    order by j.priority desc, j.run_at asc
    limit $3
    for update skip locked
)
update apalis.jobs j
set status = 'Running', lock_by = $1, lock_at = now()
from picked
where j.id = picked.id
returning j.id, j.job, j.job_type, j.attempts, j.max_attempts";

/// apalis-postgres's `queries/worker/register.sql` (its function takes a private type).
const REGISTER: &str = "
insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
values ($1, $2, $3, $4, now())
on conflict (id) do update
set worker_type = excluded.worker_type,
    storage_name = excluded.storage_name,
    layers = excluded.layers,
    last_seen = now()
where pg_try_advisory_lock(hashtext(workers.id))";

/// The fair fetch (see the module's documentation): `apalis.fair_fetch` returns job rows and
/// marker rows (`id` null) saying why it returned none. `$6`..`$9` are the [`CostBook`]'s
/// report.
const FAIR_FETCH: &str = "select id, job, job_type, attempts, max_attempts, tenant, charged, note
from apalis.fair_fetch($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// How often an empty fair fetch that skipped lanes held by other fetches is tried again,
/// 1 ms apart, before the worker waits for its next wake-up. A lane is held only for one
/// fetch statement, so this is about 20 of them.
const BUSY_RETRIES: usize = 20;

/// The fair fetch's accounting in this process, per routing tenant: what its claims were
/// charged (the lane's cost estimate at the time, per job) and what the jobs then took. The
/// next fetch corrects each lane's virtual time by the difference, so a tenant whose jobs were
/// underestimated (a new tenant's first claim, a tenant whose jobs got slower) pays what it
/// used, and folds the measured time into the lane's estimate, under the lane lock the fetch
/// takes anyway: accounting costs no write of its own and never waits for a lock.
#[derive(Debug, Default)]
pub(crate) struct CostBook {
    tenants: std::sync::Mutex<std::collections::HashMap<String, Account>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Account {
    /// Claimed, not finished: jobs and what they were charged.
    open_jobs: f64,
    open_charged: f64,
    /// Finished since the last report: jobs, seconds they took, what they were charged.
    jobs: f64,
    secs: f64,
    charged: f64,
}

/// What one fetch reports per tenant: jobs finished, the mean seconds each took, and what
/// their claims were charged in all.
#[derive(Debug, Default)]
struct Report {
    tenants: Vec<String>,
    jobs: Vec<f64>,
    secs_per_job: Vec<f64>,
    charged: Vec<f64>,
}

impl CostBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Account>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fetch claimed `jobs` jobs of `tenant`, charging `per_job` seconds each.
    fn claimed(&self, tenant: &str, jobs: usize, per_job: f64) {
        let mut tenants = self.lock();
        let a = tenants.entry(tenant.to_string()).or_default();
        a.open_jobs += jobs as f64;
        a.open_charged += jobs as f64 * per_job;
    }

    /// `jobs` jobs of `tenant` took `secs` of worker time in all.
    pub(crate) fn record(&self, tenant: &str, secs: f64, jobs: usize) {
        if jobs == 0 || !secs.is_finite() {
            return;
        }
        let mut tenants = self.lock();
        let a = tenants.entry(tenant.to_string()).or_default();
        let jobs = jobs as f64;
        // What these jobs were charged: the average over the tenant's open claims.
        let charged = if a.open_jobs > 0.0 {
            let share = (jobs / a.open_jobs).min(1.0);
            let c = a.open_charged * share;
            a.open_charged -= c;
            a.open_jobs = (a.open_jobs - jobs).max(0.0);
            c
        } else {
            secs
        };
        a.jobs += jobs;
        a.secs += secs;
        a.charged += charged;
    }

    /// Everything finished since the last report, and forgets it.
    fn report(&self) -> Report {
        let mut tenants = self.lock();
        let mut r = Report::default();
        for (tenant, a) in tenants.iter_mut() {
            if a.jobs > 0.0 {
                r.tenants.push(tenant.clone());
                r.jobs.push(a.jobs);
                r.secs_per_job.push(a.secs / a.jobs);
                r.charged.push(a.charged);
                (a.jobs, a.secs, a.charged) = (0.0, 0.0, 0.0);
            }
        }
        tenants.retain(|_, a| a.open_jobs > 0.0);
        r
    }

    /// A report the fetch could not apply (the lane was held): kept for the next one.
    fn keep(&self, report: &Report, i: usize) {
        let mut tenants = self.lock();
        let a = tenants.entry(report.tenants[i].clone()).or_default();
        a.jobs += report.jobs[i];
        a.secs += report.secs_per_job[i] * report.jobs[i];
        a.charged += report.charged[i];
    }
}

#[derive(sqlx::FromRow)]
struct FairRow {
    id: Option<String>,
    job: Option<Vec<u8>>,
    job_type: Option<String>,
    attempts: Option<i32>,
    max_attempts: Option<i32>,
    tenant: Option<String>,
    charged: Option<f64>,
    note: Option<String>,
}

/// How the worker picks the tenant of each fetch (`worker.fairness`).
///
/// With [`FetchOrder::Fair`] (the default), `apalis.fair_fetch` keeps one *lane* per tenant
/// with work and a virtual time per lane. Each fetch serves the ready lane with the lowest
/// virtual time, takes up to about `quantum` of its jobs (by the lane's measured worker time
/// per job; at most `batch_size`, at most what the tenant's `max_running` leaves) and advances
/// the lane by their cost divided by the tenant's weight. So each tenant with work gets worker
/// time in proportion to its weight whatever the length of its backlog, a tenant alone gets
/// all of it, a tenant at its cap is passed over (never waited for), and a paused tenant's
/// jobs wait. Within a tenant: priority, then `run_at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FetchOrder {
    /// The oldest runnable job's tenant (strict FIFO between tenants).
    Oldest,
    /// Weighted fair share between tenants, each fetch about `quantum` of one tenant's work.
    Fair {
        /// Worker (slot) time one fetch aims to take from one tenant; the worker uses
        /// `worker.fair_quantum_ms × worker.concurrency`, so that with every slot busy one
        /// frees about every `fair_quantum_ms`.
        quantum: std::time::Duration,
    },
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    job: Vec<u8>,
    job_type: String,
    attempts: i32,
    max_attempts: i32,
}

/// One job of a fetched [`Group`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Row id (the job id as a ULID).
    pub id: String,
    /// The 1-based attempt this delivery is.
    pub attempt: u32,
    /// The job's attempt limit, stored with it at enqueue.
    pub max_attempts: u32,
    /// The stored payload, undecoded: the handler verifies it.
    pub payload: Vec<u8>,
}

/// What one fetch hands the worker: up to `batch_size` jobs, all with the same routing tenant.
/// apalis sees it as one task, so its concurrency limit counts groups; the worker runs the
/// group's jobs (see `worker`), in one round where it can.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// The jobs, oldest first.
    pub jobs: Vec<Delivery>,
}

impl Group {
    /// The apalis task carrying `rows`, identified by its first job; `None` for no rows.
    fn task(rows: Vec<Row>) -> Option<Task<Vec<u8>>> {
        let first = rows.first()?;
        // apalis wants a task id; the group's is its first job's (any id if that one is not a
        // ULID: the group's own id is never written anywhere).
        let id = first
            .id
            .parse::<TaskId>()
            .unwrap_or_else(|_| TaskId::from_ulid(Ulid::generate()));
        let queue = first.job_type.clone();
        let group = Group {
            jobs: rows
                .into_iter()
                .map(|r| Delivery {
                    id: r.id,
                    attempt: r.attempts.max(0) as u32 + 1,
                    max_attempts: r.max_attempts.max(1) as u32,
                    payload: r.job,
                })
                .collect(),
        };
        Some(
            TaskBuilder::new(GroupCodec::encode_bytes(&group))
                .queue(queue.into())
                .task_id(id)
                .build(),
        )
    }
}

/// The wire form of a [`Group`] inside apalis: per job, the id's length (u16) and bytes, the
/// attempt (u32), the attempt limit (u32) and the payload's length (u32) and bytes,
/// little-endian. Decoding never fails:
/// a truncated tail (which our own encoder never writes) is dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupCodec;

impl GroupCodec {
    fn encode_bytes(group: &Group) -> Vec<u8> {
        let size: usize = group
            .jobs
            .iter()
            .map(|j| 14 + j.id.len() + j.payload.len())
            .sum();
        let mut out = Vec::with_capacity(size);
        for j in &group.jobs {
            out.extend_from_slice(&(j.id.len() as u16).to_le_bytes());
            out.extend_from_slice(j.id.as_bytes());
            out.extend_from_slice(&j.attempt.to_le_bytes());
            out.extend_from_slice(&j.max_attempts.to_le_bytes());
            out.extend_from_slice(&(j.payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&j.payload);
        }
        out
    }

    fn decode_bytes(mut bytes: &[u8]) -> Group {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, tail) = (bytes.get(..n)?, bytes.get(n..)?);
            *bytes = tail;
            Some(head)
        }
        fn u32_le(b: &[u8]) -> u32 {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        let mut jobs = Vec::new();
        while let Some(len) = take(&mut bytes, 2) {
            let len = u16::from_le_bytes([len[0], len[1]]) as usize;
            let Some(id) = take(&mut bytes, len) else {
                break;
            };
            let Some(attempt) = take(&mut bytes, 4) else {
                break;
            };
            let Some(max_attempts) = take(&mut bytes, 4) else {
                break;
            };
            let Some(size) = take(&mut bytes, 4) else {
                break;
            };
            let Some(payload) = take(&mut bytes, u32_le(size) as usize) else {
                break;
            };
            jobs.push(Delivery {
                id: String::from_utf8_lossy(id).into_owned(),
                attempt: u32_le(attempt),
                max_attempts: u32_le(max_attempts),
                payload: payload.to_vec(),
            });
        }
        Group { jobs }
    }
}

impl Codec<Group> for GroupCodec {
    type Error = std::convert::Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, group: &Group) -> Result<Vec<u8>, Self::Error> {
        Ok(Self::encode_bytes(group))
    }

    fn decode(&self, bytes: &Vec<u8>) -> Result<Group, Self::Error> {
        Ok(Self::decode_bytes(bytes))
    }
}

/// The persistence half: what [`Persisted`] drives.
#[derive(Debug, Clone)]
pub struct TenantPersistence {
    pool: PgPool,
    config: Config,
    /// The kinds this worker runs: the only ones it fetches.
    kinds: Vec<String>,
    order: FetchOrder,
    costs: std::sync::Arc<CostBook>,
}

/// One fetch exactly as the worker makes it: claims up to `batch` runnable jobs of `kinds`, all
/// of one tenant, for the registered worker `worker`, marking them `Running`, and returns how
/// many it claimed. For measuring the fetch (`bench`) and for tools that drive the queue
/// directly; a [`crate::Worker`] fetches the same way through its apalis backend.
///
/// # Errors
/// Database errors.
pub async fn fetch_once(
    pool: &PgPool,
    worker: &str,
    queue: &str,
    batch: usize,
    kinds: &[String],
    order: FetchOrder,
) -> Result<usize, sqlx::Error> {
    let costs = CostBook::default();
    Ok(fetch(pool, worker, queue, batch, kinds, order, &costs)
        .await?
        .len())
}

async fn fetch(
    pool: &PgPool,
    worker: &str,
    queue: &str,
    batch: usize,
    kinds: &[String],
    order: FetchOrder,
    costs: &CostBook,
) -> Result<Vec<Row>, sqlx::Error> {
    let quantum = match order {
        FetchOrder::Oldest => {
            return sqlx::query_as(FETCH)
                .bind(worker)
                .bind(queue)
                .bind(batch as i32)
                .bind(kinds)
                .fetch_all(pool)
                .await;
        }
        FetchOrder::Fair { quantum } => quantum,
    };
    for retry in 0..=BUSY_RETRIES {
        let report = costs.report();
        let found: Vec<FairRow> = sqlx::query_as(FAIR_FETCH)
            .bind(worker)
            .bind(queue)
            .bind(batch as i32)
            .bind(kinds)
            .bind(quantum.as_secs_f64())
            .bind(&report.tenants)
            .bind(&report.jobs)
            .bind(&report.secs_per_job)
            .bind(&report.charged)
            .fetch_all(pool)
            .await?;
        let mut rows = Vec::with_capacity(found.len());
        let mut busy = false;
        let mut claimed: Option<(String, f64)> = None;
        for row in found {
            match row {
                FairRow {
                    id: Some(id),
                    job: Some(job),
                    job_type: Some(job_type),
                    attempts: Some(attempts),
                    max_attempts: Some(max_attempts),
                    tenant,
                    charged,
                    ..
                } => {
                    if claimed.is_none() {
                        claimed = Some((tenant.unwrap_or_default(), charged.unwrap_or(0.0)));
                    }
                    rows.push(Row {
                        id,
                        job,
                        job_type,
                        attempts,
                        max_attempts,
                    });
                }
                FairRow {
                    note: Some(note), ..
                } if note == "busy" => busy = true,
                FairRow {
                    note: Some(note), ..
                } => {
                    if let Some(tenant) = note.strip_prefix("capped ") {
                        tracing::debug!(%tenant, "tenant held at its max_running cap");
                    } else if let Some(tenant) = note.strip_prefix("kept ")
                        && let Some(i) = report.tenants.iter().position(|t| t == tenant)
                    {
                        costs.keep(&report, i);
                    }
                }
                FairRow { .. } => {}
            }
        }
        if let Some((tenant, per_job)) = claimed {
            costs.claimed(&tenant, rows.len(), per_job);
        }
        if !rows.is_empty() || !busy || retry == BUSY_RETRIES {
            return Ok(rows);
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Ok(Vec::new())
}

impl Persistence for TenantPersistence {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = Error;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.as_ref();
        let mut tx = self.pool.begin().await?;
        let dead_for = self.config.orphaned_duration().as_secs();
        queries::reenqueue_orphaned(&mut *tx, queue, dead_for).await?;
        let res = sqlx::query(REGISTER)
            .bind(worker.name())
            .bind(queue)
            .bind("TenantStorage")
            .bind(format!("kinds:{}", self.kinds.join(",")))
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() == 0 {
            return Err(Error::WorkerAlreadyExists(worker.name().to_owned()));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.as_ref();
        let mut tx = self.pool.begin().await?;
        queries::keep_alive(&mut *tx, queue, worker).await?;
        let dead_for = self.config.orphaned_duration().as_secs();
        queries::reenqueue_orphaned(&mut *tx, queue, dead_for).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_next(&mut self, worker: &WorkerContext) -> Result<Vec<Task<Vec<u8>>>, Error> {
        // One statement, so no explicit transaction: its autocommit is the whole claim.
        let rows = fetch(
            &self.pool,
            worker.name(),
            self.config.queue.as_ref(),
            self.config.batch_size,
            &self.kinds,
            self.order,
            &self.costs,
        )
        .await?;
        Ok(Group::task(rows).into_iter().collect())
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Vec<Task<Vec<u8>>>,
        worker: &WorkerContext,
    ) -> Result<u64, Error> {
        // Each task is a group: re-enqueue every job in it.
        let ids: Vec<String> = tasks
            .iter()
            .flat_map(|t| GroupCodec::decode_bytes(&t.args).jobs)
            .map(|j| j.id)
            .collect();
        let queue = self.config.queue.as_ref();
        let mut tx = self.pool.begin().await?;
        let count = queries::reenqueue_abandoned(&mut *tx, queue, worker.name(), &ids).await?;
        if count as usize != ids.len() {
            return Err(Error::ReenqueueMismatch {
                queued: ids.len(),
                abandoned: count as usize,
            });
        }
        tx.commit().await?;
        Ok(count)
    }

    async fn handle_events(
        &mut self,
        _events: Vec<TaskEvent<Value>>,
        _worker: &WorkerContext,
    ) -> Result<(), Error> {
        // None arrive: the fetch already marks rows `Running` (`lock_tasks` off) and the
        // worker writes outcomes itself through [`Acker`] (`persist_results` off).
        Ok(())
    }

    async fn push_tasks(&mut self, tasks: Vec<Task<Vec<u8>>>) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        queries::push_tasks(&mut *tx, self.config.queue.as_ref(), tasks).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The worker's apalis backend: [`TenantPersistence`] driven by apalis-core's [`Persisted`];
/// each task is a [`Group`] of same-tenant jobs, payloads undecoded.
#[pin_project::pin_project]
pub struct TenantStorage {
    #[pin]
    persistence: Persisted<TenantPersistence>,
    codec: GroupCodec,
}

impl TenantStorage {
    /// A backend for `config.queue` on `pool` (the queue role's), fetching jobs of `kinds`
    /// in `order`, with the worker time the worker records in `costs`.
    pub(crate) fn new(
        pool: &PgPool,
        config: Config,
        kinds: Vec<String>,
        order: FetchOrder,
        costs: std::sync::Arc<CostBook>,
    ) -> Self {
        Self {
            persistence: Persisted::new(TenantPersistence {
                pool: pool.clone(),
                config,
                kinds,
                order,
                costs,
            }),
            codec: GroupCodec,
        }
    }
}

impl Backend for TenantStorage {
    type Task = Task<Vec<u8>>;
    type Error = Error;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        let interval = self.persistence.config.heartbeat_interval;
        self.persistence.poll_ready(cx, worker, interval)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Task<Vec<u8>>, Error>>> {
        self.persistence.poll_next(cx, worker)
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        self.persistence.poll_close(cx, worker)
    }
}

impl BackendConfig for TenantStorage {
    type Args = Group;
    type Kind = Durable;
    type Id = Ulid;
    type Config = Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &Config {
        &self.persistence.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let batch = self.persistence.config.batch_size;
        self.persistence
            .layer(JsonCodec::<Value>::default(), batch)
            .persist_results(false)
            .lock_tasks(false)
    }
}

impl WireFormatBackend for TenantStorage {
    type Codec = GroupCodec;
    type Compact = Vec<u8>;

    fn codec(&self) -> &GroupCodec {
        &self.codec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: &str, attempt: u32, payload: &[u8]) -> Delivery {
        Delivery {
            id: id.into(),
            attempt,
            max_attempts: attempt + 2,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn a_group_survives_its_wire_form_whatever_the_payloads_hold() {
        let group = Group {
            jobs: vec![
                delivery("01J0000000000000000000000A", 1, b"{\"sig\":\"...\"}"),
                delivery("01J0000000000000000000000B", 5, &[0, 255, 0, 10, 13]),
                delivery("", 0, b""),
            ],
        };
        let bytes = GroupCodec.encode(&group).unwrap();
        assert_eq!(GroupCodec.decode(&bytes).unwrap(), group);
        assert_eq!(GroupCodec.decode(&Vec::new()).unwrap(), Group::default());
    }

    #[test]
    fn a_truncated_group_keeps_its_whole_jobs_and_drops_the_rest() {
        let group = Group {
            jobs: vec![delivery("a", 1, b"first"), delivery("b", 2, b"second")],
        };
        let bytes = GroupCodec.encode(&group).unwrap();
        let first_len = 2 + 1 + 4 + 4 + 4 + 5;
        for cut in first_len..bytes.len() {
            let decoded = GroupCodec.decode(&bytes[..cut].to_vec()).unwrap();
            assert_eq!(decoded.jobs, group.jobs[..1], "cut at {cut}");
        }
        for cut in 0..first_len {
            assert!(
                GroupCodec
                    .decode(&bytes[..cut].to_vec())
                    .unwrap()
                    .jobs
                    .is_empty()
            );
        }
    }
}
