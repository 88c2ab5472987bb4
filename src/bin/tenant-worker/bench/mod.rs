//! `tenant-worker bench`: the benchmark suite. Every scenario measures our worker and, in the
//! same run on the same database, a baseline that does the same work without what this project
//! adds (signed envelopes, the tenant-scoped transaction, run records, forced RLS), and reports
//! both and their ratio against a target. Speed is never asserted: the command exits 0 whatever
//! the numbers (it fails only when something did not work, e.g. a job failed or counts differ),
//! so `bench --quick` can run in CI to keep the suite from rotting.
//!
//! # Where it runs
//!
//! With no `database.admin_url`, on a private throwaway cluster (like the demo). With one, in a
//! fresh database `tw_bench_<random>` on that server, dropped at the end (an interrupted run
//! leaves it behind: `drop database tw_bench_... with (force)`). `setup` runs there first. Each
//! scenario starts from empty tables (`truncate`); bulk data is made with set-based SQL
//! (`generate_series`) by the admin role, with `session_replication_role = replica` so the
//! foreign-key and rollup-change triggers do not run for the bulk load (the rows are valid by
//! construction: every invoice names a customer of its own tenant). The rows look like the
//! demo's (properties with names, addresses, cities and units; customers with unique emails;
//! invoices with amounts, currencies, statuses and dates), spread over two years of
//! `created_at`, with time-ordered ids. After a bulk load: `vacuum (analyze)` and `checkpoint`,
//! so neither side pays for hint bits or a checkpoint the load caused.
//!
//! Both sides always get the same worker settings (`[worker]`: concurrency, batch size,
//! poll interval, heartbeat), the same wake-up strategy (`worker::wake_strategy`:
//! LISTEN/NOTIFY plus the poll interval), the same pools and the same server.
//!
//! # Scenarios and baselines
//!
//! - **throughput**: N `noop` jobs over 100 tenants, each verified and run in its scoped
//!   transaction by our worker in-process (`worker::run` with `until_idle`). Baseline: plain
//!   apalis-postgres on its own queue: a `PostgresStorage<serde_json::Value>` with the same
//!   `Config` and wake-up strategy, a `WorkerBuilder` worker with the same `.concurrency(n)` and
//!   `.parallelize(tokio::spawn)`, a handler that returns `Ok` at once; no envelope, no
//!   transaction. Everything is enqueued first (both queues), then each side drains its own
//!   queue alone; the window is from the server's clock just before the worker starts to the
//!   last `done_at` of its queue. `apalis.jobs` is vacuumed between the two.
//! - **latency**: a steady 200 jobs/s (one insert each) while our worker runs;
//!   enqueue-to-start per job is `job_runs.started_at` (server `now()` at the job's transaction
//!   start) minus `apalis.jobs.run_at` (the enqueuer's clock just before the insert). Baseline:
//!   plain apalis-postgres at the same rate, its handler recording the client clock minus the
//!   enqueue time carried in the payload. On both sides the jobs enqueued in the first
//!   [`LATENCY_WARMUP`] are run but not counted: they pay for new connections and cold caches,
//!   which at 200 jobs/s were most of the slowest 1% (the steady state is what is measured).
//! - **export**: one tenant's `v_property` to CSV. Baseline: `psql` as the app role, in a
//!   transaction that first sets the tenant and its sealed context (from `bench_seal`, a
//!   function made for this scenario only, since psql cannot compute the seal), running `\copy (select * from public.v_property)
//!   to FILE with (format csv, header true)`; its time is psql's own `\timing` of the `\copy`
//!   (no process start-up). Ours: the real binary as a child process (`run --until-idle`),
//!   timed from the run record's `started_at` to the manifest's `finished_at` (no start-up,
//!   audit or connecting; but the file's fsync, hash and rename are in). Both files must have
//!   the same SHA-256.
//! - **import**: JSONL records (properties with external ids) for one tenant. Baseline: `COPY
//!   FROM STDIN` (sqlx `copy_in_raw`, admin) of the same rows, already in the table's shape and
//!   COPY text format, into `bench_scratch (like records)`: no constraints beyond NOT NULL, no
//!   indexes, no RLS, no triggers. Ours: the child process as above, timed from the run record's
//!   `started_at` to its `finished_at` (see "End of a job" below).
//! - **rollup**: full built-in rollups over one tenant's rows (40% properties, 10% customers,
//!   50% invoices), in-process, timed from `started_at` to `finished_at`. Baseline: the same two
//!   aggregations as one `create temp table ... as select ... union all select ...` as the app
//!   role in the tenant's context. Then 1% of the rows change (the newest 1%, which is how
//!   records usually change: recent invoices get paid) and an incremental run is timed against
//!   the full one; a second incremental run after 1% *random* rows change is reported for
//!   information (it touches nearly every bucket, so it cannot be much cheaper than a full run).
//!   After each run, the stored rollups are compared with a fresh aggregation.
//! - **scale**: a 1,000-row tenant's `v_property` export while `records` holds a small total,
//!   then again after other tenants' rows grow it to a large total: the median of several
//!   in-process export jobs each time (run record `started_at` to manifest `finished_at`).
//!   `EXPLAIN (ANALYZE, BUFFERS)` of the export query as the app role in the tenant's context
//!   goes into the JSON, to show the index use under RLS.
//! - **context**: what the verified tenant context costs, against the "trusting" policy it
//!   replaced (`tenant_id = current_tenant_id()` alone). A 1,000-row tenant among other
//!   tenants' rows; the baseline table `bench_trusting` is a copy of `records` (`like ...
//!   including all`, so the same indexes) owned by the owner role, with forced RLS and the
//!   trusting policies, dropped at the end. Ours: `Scope::begin` (the binding, then the sealed
//!   context), then `select 1` (a minimal scoped transaction), or the tenant's
//!   `count(*), sum(units)` of its properties, then commit. Baseline: a plain transaction on
//!   the same app pool that only runs `set_config('app.tenant_id', ..)`, then the same
//!   statement (on `bench_trusting`). Transactions per second with `worker.concurrency`
//!   concurrent tasks, each side for a fixed time after a [`CONTEXT_WARMUP`] that is not
//!   counted, run twice in the order ours, baseline, baseline, ours (so a drift of the machine
//!   favours neither); the rate is over both runs. `EXPLAIN (ANALYZE, BUFFERS)` of the query
//!   on each side goes into the JSON, with whether it is an index scan (a warning is printed
//!   when ours is not).
//! - **fairness**: the fair fetch (the default) against strict FIFO between tenants
//!   (`worker.fairness = false`, the fetch before fairness), each case in the same run with
//!   otherwise equal settings, our worker in-process. *Flood*: one tenant's backlog is queued,
//!   the worker starts, and after a moment ten small tenants enqueue ten jobs each; their
//!   enqueue-to-done (`apalis.jobs.run_at`, the enqueuer's clock, to `job_runs.finished_at`) and
//!   the drain's rate (server clock before the start to the last `done_at`). *Many tenants*:
//!   many tenants' jobs interleaved, drained (FIFO first, the flood's other order). *Cap*: a
//!   tenant at `max_running = 2` and another, each with slow `noop`s (`sleep_ms`); running rows
//!   per tenant sampled every 10 ms; the other tenant's drain against its jobs alone.
//!   *Weights*: 3 against 1, both flooded; completed jobs per window by `finished_at`, the first
//!   window not counted. *Fetch at scale*: rows inserted set-based (the fetch reads only the
//!   routing metadata), then [`tenant_worker::worker::fetch_once`] in each order, alternating,
//!   timed at the client.
//!
//! # Peak memory of the child worker
//!
//! Exact where possible: `getrusage(RUSAGE_CHILDREN).ru_maxrss` is the largest peak RSS of all
//! children reaped so far, so when it rises across reaping the worker child, the new value is
//! exactly that child's peak. When it does not rise (an earlier child, e.g. `initdb`'s
//! bootstrap backend, was bigger), the child's `VmHWM` (the kernel's peak RSS high-water mark in
//! `/proc/<pid>/status`, which only grows) sampled every 10 ms is used; it can only miss growth
//! in the last 10 ms before exit. The JSON says which method gave each number.
//!
//! # End of a job
//!
//! The run record's `finished_at` is written with `clock_timestamp()` by the job's last
//! statement before its commit. The queue's `done_at` is not used for single jobs: apalis sets
//! it when its worker loop drains the ack, which can be up to a poll interval later (its loop
//! can park with acks still queued). For throughput, where thousands of acks flow, the last
//! `done_at` of the queue is the end of the window on both sides.
//!
//! # Layout
//!
//! [`harness`] holds the shared context (the database, pools, keys, running our worker in
//! process or as a child), [`data`] generates rows and import files, [`plain`] is the
//! plain apalis-postgres baseline worker, [`measure`] runs child processes and reads their peak
//! memory, [`report`] renders the table; each scenario is a file of [`scenarios`].

mod data;
mod harness;
mod measure;
mod plain;
mod report;
mod scenarios;
mod target;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::Utc;
use serde::Serialize;
use serde_json::json;
use tenant_worker::Settings;

use harness::Ctx;
use report::{Row, machine, render_line, render_table};
use target::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// noop jobs per second, ours versus plain apalis-postgres.
    Throughput,
    /// Enqueue-to-start latency at a steady rate.
    Latency,
    /// One tenant's view to CSV, ours versus psql's \copy.
    Export,
    /// JSONL import, ours versus a plain COPY into an unconstrained table.
    Import,
    /// Full and incremental rollups versus one aggregate statement.
    Rollup,
    /// A small tenant's export while the table grows.
    Scale,
    /// Scoped transactions with the verified context versus the trusting policy.
    Context,
    /// Small tenants' latency behind a flooding tenant, shares, caps: fair fetch versus FIFO.
    Fairness,
}

impl Scenario {
    /// Every scenario, in the order they run.
    pub const ALL: [Scenario; 8] = [
        Scenario::Throughput,
        Scenario::Latency,
        Scenario::Export,
        Scenario::Import,
        Scenario::Rollup,
        Scenario::Scale,
        Scenario::Context,
        Scenario::Fairness,
    ];

    /// The scenario's name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Latency => "latency",
            Scenario::Export => "export",
            Scenario::Import => "import",
            Scenario::Rollup => "rollup",
            Scenario::Scale => "scale",
            Scenario::Context => "context",
            Scenario::Fairness => "fairness",
        }
    }
}

/// Options of [`run`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Small sizes (CI).
    pub quick: bool,
    /// Scenarios to run (empty: all).
    pub scenarios: Vec<Scenario>,
    /// Write the report as JSON here.
    pub json: Option<PathBuf>,
}

/// Jobs enqueued this long after the first are the ones the latency scenario counts.
pub(crate) const LATENCY_WARMUP: Duration = Duration::from_secs(1);

/// Each measurement of the context scenario runs this long before it starts counting.
pub(crate) const CONTEXT_WARMUP: Duration = Duration::from_millis(500);

/// Data sizes of one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Sizes {
    pub(crate) throughput_jobs: usize,
    pub(crate) throughput_tenants: usize,
    pub(crate) latency_secs: u64,
    pub(crate) latency_rate_per_sec: u32,
    pub(crate) export_rows: i64,
    pub(crate) import_rows: i64,
    pub(crate) rollup_rows: i64,
    pub(crate) scale_tenant_rows: i64,
    pub(crate) scale_small_table: i64,
    pub(crate) scale_large_table: i64,
    pub(crate) scale_runs: usize,
    pub(crate) context_tenant_rows: i64,
    pub(crate) context_other_rows: i64,
    pub(crate) context_secs: u64,
    /// The flooding tenant's backlog.
    pub(crate) fair_flood_jobs: usize,
    /// Into the drain when the small tenants enqueue.
    pub(crate) fair_flood_after_ms: u64,
    /// Tenants × jobs each of the many-tenants drain.
    pub(crate) fair_many_tenants: usize,
    /// Slow (200 ms) jobs per tenant of the cap case.
    pub(crate) fair_cap_jobs: usize,
    /// Windows (and their length) of the weights case.
    pub(crate) fair_windows: usize,
    pub(crate) fair_window_secs: f64,
    /// Queued jobs and tenants with work for the fetch-at-scale case.
    pub(crate) fair_scale_jobs: i64,
    pub(crate) fair_scale_tenants: i64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                throughput_jobs: 5_000,
                throughput_tenants: 100,
                latency_secs: 3,
                latency_rate_per_sec: 200,
                export_rows: 50_000,
                import_rows: 50_000,
                rollup_rows: 50_000,
                scale_tenant_rows: 1_000,
                scale_small_table: 10_000,
                scale_large_table: 200_000,
                scale_runs: 3,
                context_tenant_rows: 1_000,
                context_other_rows: 20_000,
                context_secs: 1,
                fair_flood_jobs: 5_000,
                fair_flood_after_ms: 200,
                fair_many_tenants: 200,
                fair_cap_jobs: 12,
                fair_windows: 2,
                fair_window_secs: 1.0,
                fair_scale_jobs: 50_000,
                fair_scale_tenants: 1_000,
            }
        } else {
            Sizes {
                throughput_jobs: 50_000,
                throughput_tenants: 100,
                latency_secs: 30,
                latency_rate_per_sec: 200,
                export_rows: 1_000_000,
                import_rows: 1_000_000,
                rollup_rows: 1_000_000,
                scale_tenant_rows: 1_000,
                scale_small_table: 10_000,
                scale_large_table: 5_000_000,
                scale_runs: 5,
                context_tenant_rows: 1_000,
                context_other_rows: 200_000,
                context_secs: 3,
                fair_flood_jobs: 50_000,
                fair_flood_after_ms: 1_000,
                fair_many_tenants: 1_000,
                fair_cap_jobs: 100,
                fair_windows: 3,
                fair_window_secs: 5.0,
                fair_scale_jobs: 1_000_000,
                fair_scale_tenants: 10_000,
            }
        }
    }
}

/// What one scenario produced.
pub(crate) struct Outcome {
    pub(crate) rows: Vec<Row>,
    pub(crate) details: serde_json::Value,
}

/// The plain apalis-postgres baseline's queue.
pub(crate) const PLAIN_QUEUE: &str = "bench-plain-apalis";
/// A child worker that runs longer than this is killed.
pub(crate) const CHILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// Runs the benchmark and prints the table; writes the JSON report when asked.
///
/// # Errors
/// When the database cannot be prepared or a scenario fails to do its work (a job failed,
/// counts differ, the baseline tool is missing). Missed targets are not errors.
pub async fn run(base: &Settings, opts: Options) -> Result<()> {
    let started = Instant::now();
    let started_at = Utc::now();
    let mut scenarios = if opts.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        opts.scenarios.clone()
    };
    scenarios.sort();
    scenarios.dedup();
    let sizes = Sizes::new(opts.quick);
    let loadavg_at_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let target = Target::open(base).await?;
    let result = run_on(base, &target, sizes, &scenarios).await;
    let database = target.describe();
    target.close().await;
    let (mut rows, details, server, worker_settings) = result?;
    if opts.quick {
        report::not_judged_at_quick_sizes(&mut rows);
    }
    let table = render_table(&rows);
    println!();
    println!("{table}");
    let report = json!({
        "tool": "tenant-worker bench",
        "version": env!("CARGO_PKG_VERSION"),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "quick": opts.quick,
        "started_at": started_at,
        "duration_secs": started.elapsed().as_secs_f64(),
        "machine": machine(),
        "loadavg_at_start": loadavg_at_start.trim(),
        "database": database,
        "server": server,
        "worker_settings": worker_settings,
        "sizes": sizes,
        "rows": rows,
        "scenarios": details,
    });
    println!(
        "bench finished in {:.0}s{}",
        started.elapsed().as_secs_f64(),
        if opts.quick { " (quick sizes)" } else { "" }
    );
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("JSON report written to {}", path.display());
    }
    Ok(())
}

type RunResult = (
    Vec<Row>,
    serde_json::Map<String, serde_json::Value>,
    serde_json::Value,
    serde_json::Value,
);

async fn run_on(
    base: &Settings,
    target: &Target,
    sizes: Sizes,
    scenarios: &[Scenario],
) -> Result<RunResult> {
    let ctx = Ctx::prepare(base, target, sizes).await?;
    let server = ctx.server_info().await?;
    let s = &ctx.settings.worker;
    let worker_settings = json!({
        "queue": s.queue,
        "concurrency": s.concurrency,
        "batch_size": s.batch_size,
        "poll_interval_ms": s.poll_interval_ms,
        "heartbeat_secs": s.heartbeat_secs,
        "missed_heartbeats": s.missed_heartbeats,
        "max_connections_per_pool": ctx.settings.database.max_connections,
    });
    let mut rows = Vec::new();
    let mut details = serde_json::Map::new();
    for &scenario in scenarios {
        let t = Instant::now();
        eprintln!("bench: {} ...", scenario.name());
        ctx.reset().await?;
        let outcome = match scenario {
            Scenario::Throughput => scenarios::throughput::run(&ctx).await,
            Scenario::Latency => scenarios::latency::run(&ctx).await,
            Scenario::Export => scenarios::export::run(&ctx).await,
            Scenario::Import => scenarios::import::run(&ctx).await,
            Scenario::Rollup => scenarios::rollup::run(&ctx).await,
            Scenario::Scale => scenarios::scale::run(&ctx).await,
            Scenario::Context => scenarios::context::run(&ctx).await,
            Scenario::Fairness => scenarios::fairness::run(&ctx).await,
        }
        .with_context(|| format!("scenario `{}` failed", scenario.name()))?;
        for r in &outcome.rows {
            eprintln!("bench: {}", render_line(r));
        }
        eprintln!(
            "bench: {} done in {:.1}s",
            scenario.name(),
            t.elapsed().as_secs_f64()
        );
        let mut d = outcome.details;
        d["scenario_secs"] = json!(t.elapsed().as_secs_f64());
        details.insert(scenario.name().to_string(), d);
        rows.extend(outcome.rows);
    }
    ctx.close().await;
    Ok((rows, details, server, worker_settings))
}
