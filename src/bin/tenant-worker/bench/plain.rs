//! Plain apalis-postgres, the baseline: the same queue configuration, wake-ups, concurrency
//! and parallelism as ours, with a handler that does nothing (or records latency).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use tenant_worker::config::WorkerSettings;

/// The same queue configuration our worker uses (see `worker::run_generation`).
pub(crate) fn config(s: &WorkerSettings) -> apalis_postgres::Config {
    apalis_postgres::Config::default()
        .queue(crate::bench::PLAIN_QUEUE)
        .batch_size(s.batch_size)
        .heartbeat_interval(Duration::from_secs(s.heartbeat_secs))
        .missed_heartbeats(s.missed_heartbeats)
}

/// Pushes payloads (JSON bytes) in one statement with apalis-postgres's own sink query.
pub(crate) async fn push(
    pool: &PgPool,
    queue: &str,
    payloads: Vec<Vec<u8>>,
    max_attempts: usize,
) -> anyhow::Result<()> {
    let tasks = payloads
        .into_iter()
        .map(|p| TaskBuilder::new(p).max_attempts(max_attempts).build())
        .collect();
    let mut conn = pool.acquire().await?;
    apalis_postgres::queries::push_tasks(&mut *conn, queue, tasks).await?;
    Ok(())
}

pub(crate) async fn noop(_job: serde_json::Value) -> Result<(), BoxDynError> {
    Ok(())
}

/// A plain worker: same storage config, wake-ups, concurrency and parallelism as ours;
/// the handler returns at once.
pub(crate) async fn run_noop(
    pool: PgPool,
    s: WorkerSettings,
    name: String,
    stop: CancellationToken,
) -> Result<(), WorkerError> {
    // Its own pool for the run, closed after, as our worker's generations have.
    let pool = tenant_worker::worker::generation_pool(&pool);
    let strategy = tenant_worker::worker::wake_strategy(
        &pool,
        crate::bench::PLAIN_QUEUE,
        Duration::from_millis(s.poll_interval_ms),
    );
    let backend = PostgresStorage::<serde_json::Value>::new(&pool)
        .with_config(config(&s))
        .poll_with_strategy(strategy);
    let result = WorkerBuilder::new(name.as_str())
        .backend(backend)
        .concurrency(s.concurrency)
        .parallelize(tokio::spawn)
        .build(noop)
        .run_until(async move {
            stop.cancelled().await;
            Ok::<(), std::io::Error>(())
        })
        .await;
    tenant_worker::worker::close_generation_pool(pool).await;
    result
}

/// What the latency handler recorded: (enqueue time in µs, latency in ms) per job.
#[derive(Debug, Clone, Default)]
pub(crate) struct Latencies(Arc<Mutex<Vec<(i64, f64)>>>);

impl Latencies {
    fn push(&self, enqueued_at_us: i64, ms: f64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((enqueued_at_us, ms));
    }

    /// (ms since the first enqueue, latency in ms) of the jobs enqueued at least `warmup`
    /// after the first one.
    pub fn take_after(&self, warmup: Duration) -> Vec<(f64, f64)> {
        let all = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let first = all.iter().map(|(t, _)| *t).min().unwrap_or(0);
        let from = first + warmup.as_micros() as i64;
        all.into_iter()
            .filter(|(t, _)| *t >= from)
            .map(|(t, ms)| ((t - first) as f64 / 1000.0, ms))
            .collect()
    }
}

pub(crate) async fn record(
    job: serde_json::Value,
    lat: Data<Latencies>,
) -> Result<(), BoxDynError> {
    let now = chrono::Utc::now().timestamp_micros();
    if let Some(t) = job.get("enqueued_at_us").and_then(|v| v.as_i64()) {
        lat.push(t, (now - t) as f64 / 1000.0);
    }
    Ok(())
}

/// Like [`run_noop`], with a handler that records enqueue-to-start latency.
pub(crate) async fn run_latency(
    pool: PgPool,
    s: WorkerSettings,
    name: String,
    stop: CancellationToken,
    latencies: Latencies,
) -> Result<(), WorkerError> {
    // Its own pool for the run, closed after, as our worker's generations have.
    let pool = tenant_worker::worker::generation_pool(&pool);
    let strategy = tenant_worker::worker::wake_strategy(
        &pool,
        crate::bench::PLAIN_QUEUE,
        Duration::from_millis(s.poll_interval_ms),
    );
    let backend = PostgresStorage::<serde_json::Value>::new(&pool)
        .with_config(config(&s))
        .poll_with_strategy(strategy);
    let result = WorkerBuilder::new(name.as_str())
        .backend(backend)
        .data(latencies)
        .concurrency(s.concurrency)
        .parallelize(tokio::spawn)
        .build(record)
        .run_until(async move {
            stop.cancelled().await;
            Ok::<(), std::io::Error>(())
        })
        .await;
    tenant_worker::worker::close_generation_pool(pool).await;
    result
}
