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
//! the next one's in a weighted fair order across every worker on the queue: `apalis.fair_fetch`
//! (in `db/fair_fetch.sql`, installed by `setup`) keeps one *lane* per tenant with work and a
//! virtual time per lane. Each fetch serves the ready lane with the lowest virtual time, takes
//! up to about `worker.fair_quantum_ms` of its jobs (by the lane's measured cost per job, at
//! most `batch_size`, at most what the tenant's `max_running` cap leaves) and advances the
//! lane by their cost divided by the tenant's weight; the acks feed the measured cost back.
//! So each tenant with work gets a share of worker time in proportion to its weight, whatever
//! the length of its backlog; a lone tenant gets everything (work-conserving); a tenant at its
//! cap is passed over, not waited for; a paused tenant's lane waits. Claims of one tenant are
//! serialised on its lane row, so a cap holds across workers without a count-then-claim race,
//! and a fetch never waits for a lock another fetch holds (it takes the next lane, and tries
//! again at once when all it found were held). Within a tenant the order is apalis's:
//! priority, then `run_at`.
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
/// marker rows (`id` null) saying why it returned none.
const FAIR_FETCH: &str = "select id, job, job_type, attempts, max_attempts, note
from apalis.fair_fetch($1, $2, $3, $4, $5)";

/// How often an empty fair fetch that skipped lanes held by other fetches is tried again at
/// once, before the worker waits for its next wake-up.
const BUSY_RETRIES: usize = 3;

#[derive(sqlx::FromRow)]
struct FairRow {
    id: Option<String>,
    job: Option<Vec<u8>>,
    job_type: Option<String>,
    attempts: Option<i32>,
    max_attempts: Option<i32>,
    note: Option<String>,
}

/// How [`TenantStorage`] picks the tenant of a fetch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FetchOrder {
    /// The oldest runnable job's tenant (strict FIFO between tenants).
    Oldest,
    /// Weighted fair share between tenants, each fetch about `quantum` of one tenant's work.
    Fair {
        /// Worker time one fetch aims to take from one tenant.
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
}

impl TenantPersistence {
    async fn fetch_fair(
        &self,
        worker: &WorkerContext,
        quantum: std::time::Duration,
    ) -> Result<Vec<Row>, Error> {
        for retry in 0..=BUSY_RETRIES {
            let found: Vec<FairRow> = sqlx::query_as(FAIR_FETCH)
                .bind(worker.name())
                .bind(self.config.queue.as_ref())
                .bind(self.config.batch_size as i32)
                .bind(&self.kinds)
                .bind(quantum.as_secs_f64())
                .fetch_all(&self.pool)
                .await?;
            let mut rows = Vec::with_capacity(found.len());
            let mut busy = false;
            for row in found {
                match row {
                    FairRow {
                        id: Some(id),
                        job: Some(job),
                        job_type: Some(job_type),
                        attempts: Some(attempts),
                        max_attempts: Some(max_attempts),
                        ..
                    } => rows.push(Row {
                        id,
                        job,
                        job_type,
                        attempts,
                        max_attempts,
                    }),
                    FairRow {
                        note: Some(note), ..
                    } if note == "busy" => busy = true,
                    FairRow {
                        note: Some(note), ..
                    } => {
                        if let Some(tenant) = note.strip_prefix("capped ") {
                            tracing::debug!(%tenant, "tenant held at its max_running cap");
                        }
                    }
                    FairRow { .. } => {}
                }
            }
            if !rows.is_empty() || !busy || retry == BUSY_RETRIES {
                return Ok(rows);
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        Ok(Vec::new())
    }
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
        let rows: Vec<Row> = match self.order {
            FetchOrder::Oldest => {
                sqlx::query_as(FETCH)
                    .bind(worker.name())
                    .bind(self.config.queue.as_ref())
                    .bind(self.config.batch_size as i32)
                    .bind(&self.kinds)
                    .fetch_all(&self.pool)
                    .await?
            }
            FetchOrder::Fair { quantum } => self.fetch_fair(worker, quantum).await?,
        };
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
    /// in `order`.
    pub fn new(pool: &PgPool, config: Config, kinds: Vec<String>, order: FetchOrder) -> Self {
        Self {
            persistence: Persisted::new(TenantPersistence {
                pool: pool.clone(),
                config,
                kinds,
                order,
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
