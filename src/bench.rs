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
//!   transaction that first sets the tenant, running `\copy (select * from public.v_property)
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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use sqlx::{AssertSqlSafe, Executor as _, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Settings};
use crate::db::{self, DbUrls};
use crate::demo::CITIES;
use crate::embedded::EphemeralCluster;
use crate::envelope::{self, JobId, KeyId, Signer, TenantId};
use crate::jobs::import::copy_escape;
use crate::queue::{Enqueuer, NewJob};
use crate::tenant::TenantTx;
use crate::worker::{self, RunOptions, Summary, WorkerState};

/// A benchmark scenario.
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
}

impl Scenario {
    /// Every scenario, in the order they run.
    pub const ALL: [Scenario; 6] = [
        Scenario::Throughput,
        Scenario::Latency,
        Scenario::Export,
        Scenario::Import,
        Scenario::Rollup,
        Scenario::Scale,
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
const LATENCY_WARMUP: Duration = Duration::from_secs(1);

/// Data sizes of one run.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    throughput_jobs: usize,
    throughput_tenants: usize,
    latency_secs: u64,
    latency_rate_per_sec: u32,
    export_rows: i64,
    import_rows: i64,
    rollup_rows: i64,
    scale_tenant_rows: i64,
    scale_small_table: i64,
    scale_large_table: i64,
    scale_runs: usize,
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
            }
        }
    }
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
struct Row {
    scenario: &'static str,
    metric: String,
    unit: &'static str,
    ours: Option<f64>,
    baseline: Option<f64>,
    /// What the baseline column holds.
    baseline_is: String,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(scenario: Scenario, metric: &str, unit: &'static str) -> Self {
        Row {
            scenario: scenario.name(),
            metric: metric.to_string(),
            unit,
            ours: None,
            baseline: None,
            baseline_is: String::new(),
            ratio: None,
            target: "-".into(),
            met: None,
        }
    }
}

/// What one scenario produced.
struct Outcome {
    rows: Vec<Row>,
    details: serde_json::Value,
}

const STREETS: &[&str] = &["Elm", "Maple", "Cedar", "Birch", "Oak", "Pine"];
/// created_at of generated rows spreads over this many days before now.
const SPAN_DAYS: f64 = 730.0;
/// Id ranges of generated rows per kind (time-ordered ids, like UUIDv7).
const PROPERTY_IDS: i64 = 1 << 40;
const CUSTOMER_IDS: i64 = 2 << 40;
const INVOICE_IDS: i64 = 3 << 40;
/// The plain apalis-postgres baseline's queue.
const PLAIN_QUEUE: &str = "bench-plain-apalis";
/// A child worker that runs longer than this is killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(1800);

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
    let (rows, details, server, worker_settings) = result?;
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
            Scenario::Throughput => ctx.throughput().await,
            Scenario::Latency => ctx.latency().await,
            Scenario::Export => ctx.export().await,
            Scenario::Import => ctx.import().await,
            Scenario::Rollup => ctx.rollup().await,
            Scenario::Scale => ctx.scale().await,
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

// ---------------------------------------------------------------------------------------------
// Where the benchmark runs
// ---------------------------------------------------------------------------------------------

enum Server {
    Embedded(EphemeralCluster),
    Configured { maintenance: SecretString },
}

/// The database the benchmark uses: on a throwaway cluster or a fresh one on the configured
/// server.
struct Target {
    server: Server,
    name: String,
    url: SecretString,
}

impl Target {
    async fn open(base: &Settings) -> Result<Target> {
        match &base.database.admin_url {
            Some(admin) => {
                let name = format!(
                    "tw_bench_{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                );
                let url = config::with_database(admin.expose_secret(), &name);
                let maintenance =
                    SecretString::from(config::with_database(admin.expose_secret(), "postgres"));
                eprintln!(
                    "bench: on the configured server, in a new database {name} (dropped at the end)"
                );
                Ok(Target {
                    server: Server::Configured { maintenance },
                    name,
                    url: SecretString::from(url),
                })
            }
            None => {
                eprintln!("bench: starting a private throwaway PostgreSQL cluster...");
                let cluster = tokio::task::spawn_blocking(EphemeralCluster::start)
                    .await
                    .context("cluster start panicked")?
                    .context("could not start a throwaway PostgreSQL")?;
                let name = "tenant_worker_bench".to_string();
                let url = config::with_database(&cluster.admin_url(), &name);
                Ok(Target {
                    server: Server::Embedded(cluster),
                    name,
                    url: SecretString::from(url),
                })
            }
        }
    }

    fn describe(&self) -> serde_json::Value {
        match &self.server {
            Server::Embedded(_) => json!({
                "kind": "embedded throwaway cluster (fsync on, shared_buffers 128MB)",
                "database": self.name,
            }),
            Server::Configured { .. } => json!({
                "kind": "configured server (database.admin_url)",
                "database": self.name,
                "url": config::redact_url(self.url.expose_secret()),
            }),
        }
    }

    async fn close(self) {
        match self.server {
            Server::Embedded(cluster) => {
                let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
            }
            Server::Configured { maintenance } => {
                let dropped = async {
                    let mut conn = db::connect("admin", &maintenance).await?;
                    conn.execute(AssertSqlSafe(format!(
                        r#"drop database if exists "{}" with (force)"#,
                        self.name
                    )))
                    .await?;
                    Ok::<(), anyhow::Error>(())
                }
                .await;
                if let Err(e) = dropped {
                    eprintln!(
                        "bench: could not drop the database {}: {e:#}; drop it by hand",
                        self.name
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark context
// ---------------------------------------------------------------------------------------------

struct Ctx {
    settings: Settings,
    urls: DbUrls,
    admin: PgPool,
    app: PgPool,
    queue: PgPool,
    signer: Signer,
    work: tempfile::TempDir,
    sizes: Sizes,
}

/// One job's times and result, read back from the run record and the queue.
#[derive(Debug)]
struct JobTimes {
    started_at: DateTime<Utc>,
    /// The run record's completion (the job's last statement before COMMIT).
    finished_at: Option<DateTime<Utc>>,
    lock_at: Option<DateTime<Utc>>,
    done_at: Option<DateTime<Utc>>,
    result: serde_json::Value,
}

impl JobTimes {
    /// When the job's work ended: the run record's `finished_at` (written with
    /// `clock_timestamp()` just before the commit). A worker that still wrote it with `now()`
    /// (the transaction's start, so equal to `started_at`) falls back to the queue's `done_at`,
    /// which apalis may set up to a poll interval late.
    fn end(&self) -> Result<DateTime<Utc>> {
        match (self.finished_at, self.done_at) {
            (Some(f), _) if f > self.started_at => Ok(f),
            (_, Some(d)) => Ok(d),
            _ => bail!("the job has neither finished_at nor done_at"),
        }
    }
}

/// Row counts per kind for [`Ctx::generate`].
#[derive(Debug, Clone, Copy)]
struct Mix {
    properties: i64,
    customers: i64,
    invoices: i64,
}

impl Mix {
    /// 60% properties, 10% customers, 30% invoices (other tenants' rows).
    fn mixed(total: i64) -> Self {
        let properties = total * 6 / 10;
        let customers = (total / 10).max(1);
        Mix {
            properties,
            customers,
            invoices: total - properties - customers,
        }
    }
}

/// A finished child process.
#[derive(Debug, Serialize)]
struct ChildRun {
    wall_secs: f64,
    peak_rss_kib: u64,
    rss_method: String,
    sampled_vm_hwm_kib: u64,
    rusage_children_maxrss_before_kib: u64,
    rusage_children_maxrss_after_kib: u64,
    #[serde(skip)]
    output: String,
}

impl Ctx {
    async fn prepare(base: &Settings, target: &Target, sizes: Sizes) -> Result<Ctx> {
        let work = tempfile::Builder::new()
            .prefix("tenant-worker-bench-")
            .tempdir()
            .context("creating a work directory")?;
        let url = target.url.expose_secret().to_string();
        let mut settings = base.clone();
        settings.database.admin_url = Some(SecretString::from(url.clone()));
        settings.database.app_url = None;
        settings.database.queue_url = None;
        settings.exports.dir = work.path().join("exports");
        settings.imports.dir = work.path().join("imports");
        settings.jobs.dir = None;
        let keys = work.path().join("keys");
        let (kid, private, public) =
            envelope::generate_key_pair(&keys, Some(KeyId::parse("bench")?))?;
        settings.keys.signing_key_file = Some(private.clone());
        settings.keys.signing_key_id = Some(kid.to_string());
        settings.keys.verifying.clear();
        settings.keys.verifying.insert(kid.to_string(), public);
        let signer = Signer::from_file(kid, &private)?;
        for d in ["exports", "imports", "child"] {
            std::fs::create_dir_all(work.path().join(d))?;
        }
        let urls = DbUrls::derive(&settings, &url, false);
        eprintln!("bench: setting up {} ...", target.name);
        db::setup(&settings, &urls).await.context("setup failed")?;
        let admin = db::admin_pool(&settings, &urls).await?;
        let superuser: bool =
            sqlx::query_scalar("select rolsuper from pg_roles where rolname = current_user")
                .fetch_one(&admin)
                .await?;
        ensure!(
            superuser,
            "the benchmark needs a superuser in database.admin_url: it generates every tenant's \
             data in bulk, reads all run records and runs CHECKPOINT"
        );
        let app = db::app_pool(&settings, &urls).await?;
        let queue = db::queue_pool(&settings, &urls).await?;
        Ok(Ctx {
            settings,
            urls,
            admin,
            app,
            queue,
            signer,
            work,
            sizes,
        })
    }

    async fn close(self) {
        self.admin.close().await;
        self.app.close().await;
        self.queue.close().await;
    }

    async fn server_info(&self) -> Result<serde_json::Value> {
        let version: String = sqlx::query_scalar("select version()")
            .fetch_one(&self.admin)
            .await?;
        let settings: Vec<(String, String)> = sqlx::query_as(
            "select name, setting || coalesce(' ' || unit, '') from pg_settings
             where name in ('fsync', 'synchronous_commit', 'shared_buffers', 'work_mem',
                            'max_wal_size', 'wal_level', 'max_connections', 'jit')
             order by name",
        )
        .fetch_all(&self.admin)
        .await?;
        Ok(json!({
            "version": version,
            "settings": settings
                .into_iter()
                .map(|(k, v)| (k, json!(v)))
                .collect::<serde_json::Map<_, _>>(),
        }))
    }

    /// Empty tables for the next scenario.
    async fn reset(&self) -> Result<()> {
        self.admin
            .execute(
                "truncate public.rollup_changes, public.rollup_runs, public.rollups,
                          public.job_runs, public.schedule_fires, public.schedules,
                          public.records, public.tenants cascade;
                 truncate apalis.jobs, apalis.workers cascade;
                 drop table if exists public.bench_scratch",
            )
            .await?;
        for d in ["exports", "imports"] {
            let dir = self.work.path().join(d);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
        }
        Ok(())
    }

    /// `vacuum (analyze)` and a checkpoint after a bulk load.
    async fn settle(&self) -> Result<()> {
        self.admin
            .execute("vacuum (analyze) public.records")
            .await?;
        self.admin.execute("vacuum (analyze) apalis.jobs").await?;
        self.admin.execute("checkpoint").await?;
        Ok(())
    }

    async fn add_tenants(&self, n: usize, name: &str) -> Result<Vec<TenantId>> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "insert into public.tenants (id, name)
             select gen_random_uuid(), $1 || ' ' || g from generate_series(1, $2) g
             returning id",
        )
        .bind(name)
        .bind(n as i32)
        .fetch_all(&self.admin)
        .await?;
        Ok(ids.into_iter().map(TenantId).collect())
    }

    /// Bulk rows for one tenant, set-based, as the admin. `created_at` spreads over two years
    /// (row i of n is `(n - i) / n * SPAN_DAYS` days old); invoices are issued the day they
    /// were created and name one of the tenant's customers.
    async fn generate(&self, tenant: TenantId, mix: Mix) -> Result<()> {
        let cities: Vec<String> = CITIES.iter().map(|c| c.to_string()).collect();
        let streets: Vec<String> = STREETS.iter().map(|c| c.to_string()).collect();
        let span_secs = SPAN_DAYS * 86_400.0;
        let mut tx = self.admin.begin().await?;
        tx.execute("set local session_replication_role = replica")
            .await?;
        if mix.properties > 0 {
            sqlx::query(
                r#"insert into public.records (tenant_id, id, kind, data, created_at, updated_at)
                   select $1, lpad(to_hex($2::bigint + i), 32, '0')::uuid, 'property',
                          jsonb_build_object(
                              'name', ($5::text[])[1 + i % 6] || ' Court ' || i,
                              'address', (10 + i * 7 % 990) || ' ' || ($6::text[])[1 + i % 6] || ' Street',
                              'city', ($5::text[])[1 + (i * 13) % 6],
                              'units', 4 + (i * 17) % 60),
                          t.ts, t.ts
                   from generate_series(1, $3::int) as i,
                        lateral (select now() - make_interval(secs => $4::float8 * ($3 - i)::float8 / $3)) as t(ts)"#,
            )
            .bind(tenant)
            .bind(PROPERTY_IDS)
            .bind(mix.properties as i32)
            .bind(span_secs)
            .bind(&cities)
            .bind(&streets)
            .execute(&mut *tx)
            .await?;
        }
        if mix.customers > 0 {
            sqlx::query(
                r#"insert into public.records (tenant_id, id, kind, data, created_at, updated_at)
                   select $1, lpad(to_hex($2::bigint + i), 32, '0')::uuid, 'customer',
                          jsonb_build_object('name', 'Customer ' || i,
                                             'email', 'customer' || i || '@example.test'),
                          t.ts, t.ts
                   from generate_series(1, $3::int) as i,
                        lateral (select now() - make_interval(secs => $4::float8 * ($3 - i)::float8 / $3)) as t(ts)"#,
            )
            .bind(tenant)
            .bind(CUSTOMER_IDS)
            .bind(mix.customers as i32)
            .bind(span_secs)
            .execute(&mut *tx)
            .await?;
        }
        if mix.invoices > 0 {
            ensure!(mix.customers > 0, "invoices need customers");
            sqlx::query(
                r#"insert into public.records (tenant_id, id, kind, data, created_at, updated_at)
                   select $1, lpad(to_hex($2::bigint + i), 32, '0')::uuid, 'invoice',
                          jsonb_build_object(
                              'customer_id', lpad(to_hex($5::bigint + 1 + i % $6::int), 32, '0')::uuid,
                              'number', 'INV-' || lpad(i::text, 7, '0'),
                              'amount', round((50 + (i * 37) % 4950)::numeric + 0.99, 2),
                              'currency', (array['EUR', 'USD', 'GBP'])[1 + i % 3],
                              'status', (array['paid', 'open', 'overdue'])[1 + (i / 3) % 3],
                              'issued_on', to_char(t.ts, 'YYYY-MM-DD'),
                              'due_on', to_char(t.ts + interval '30 days', 'YYYY-MM-DD')),
                          t.ts, t.ts
                   from generate_series(1, $3::int) as i,
                        lateral (select now() - make_interval(secs => $4::float8 * ($3 - i)::float8 / $3)) as t(ts)"#,
            )
            .bind(tenant)
            .bind(INVOICE_IDS)
            .bind(mix.invoices as i32)
            .bind(span_secs)
            .bind(CUSTOMER_IDS)
            .bind(mix.customers as i32)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("select count(*) from public.records")
            .fetch_one(&self.admin)
            .await?)
    }

    fn enqueuer(&self) -> Enqueuer {
        Enqueuer::new(self.queue.clone(), self.signer.clone(), &self.settings)
    }

    async fn enqueue(
        &self,
        tenant: TenantId,
        kind: &str,
        args: serde_json::Value,
    ) -> Result<JobId> {
        self.enqueuer()
            .enqueue(tenant, NewJob::new(kind, args))
            .await?
            .context("job not enqueued")
    }

    fn state(&self) -> Result<WorkerState> {
        let keyring = envelope::keyring_from_settings(&self.settings.keys, None)?;
        Ok(WorkerState::new(
            self.app.clone(),
            self.queue.clone(),
            keyring,
            &self.settings,
        ))
    }

    /// Our worker, in this process, until the queue is idle.
    async fn run_in_process(&self, name: &str) -> Result<Summary> {
        Ok(worker::run(
            self.state()?,
            RunOptions {
                until_idle: true,
                name: Some(format!("bench-{name}")),
            },
            CancellationToken::new(),
        )
        .await?)
    }

    async fn server_now(&self) -> Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar("select clock_timestamp()")
            .fetch_one(&self.admin)
            .await?)
    }

    /// The run record and queue row of one job (admin: sees every tenant).
    async fn job_times(&self, job: JobId) -> Result<JobTimes> {
        let (started_at, finished_at, result): (
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            Option<serde_json::Value>,
        ) = sqlx::query_as(
            "select started_at, finished_at, result from public.job_runs where job_id = $1",
        )
        .bind(job)
        .fetch_optional(&self.admin)
        .await?
        .with_context(|| format!("job {job} has no run record: it did not take effect"))?;
        let (status, lock_at, done_at): (String, Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            sqlx::query_as("select status, lock_at, done_at from apalis.jobs where id = $1")
                .bind(job.to_ulid().to_string())
                .fetch_one(&self.admin)
                .await?;
        ensure!(status == "Done", "job {job} is {status}, not Done");
        Ok(JobTimes {
            started_at,
            finished_at,
            lock_at,
            done_at,
            result: result.unwrap_or_default(),
        })
    }

    /// True while `queue` has a job that is not finished, delayed ones included. The worker's
    /// own index-probe check, so that watching a drain takes no CPU from the workers being
    /// measured; both sides are watched the same way.
    async fn not_done(&self, queue: &str) -> Result<bool> {
        Ok(worker::has_unfinished_jobs(&self.admin, queue, true).await?)
    }

    async fn last_done(&self, queue: &str) -> Result<DateTime<Utc>> {
        let t: Option<DateTime<Utc>> =
            sqlx::query_scalar("select max(done_at) from apalis.jobs where job_type = $1")
                .bind(queue)
                .fetch_one(&self.admin)
                .await?;
        t.context("no job was done")
    }

    /// Environment for the child worker: this database, key, folders and the same worker
    /// settings; nothing inherited from the caller's `TENANT_WORKER__*`.
    fn child_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        let w = &s.worker;
        let mut v: Vec<(String, String)> = vec![
            (
                "DATABASE__ADMIN_URL".into(),
                self.urls.admin.expose_secret().to_string(),
            ),
            (
                "DATABASE__MAX_CONNECTIONS".into(),
                s.database.max_connections.to_string(),
            ),
            (
                "DATABASE__CONNECT_TIMEOUT_SECS".into(),
                s.database.connect_timeout_secs.to_string(),
            ),
            (
                "KEYS__SIGNING_KEY_FILE".into(),
                path_string(s.keys.signing_key_file.as_deref()),
            ),
            (
                "KEYS__SIGNING_KEY_ID".into(),
                s.keys.signing_key_id.clone().unwrap_or_default(),
            ),
            ("KEYS__JOB_TTL_SECS".into(), s.keys.job_ttl_secs.to_string()),
            ("EXPORTS__DIR".into(), path_string(Some(&s.exports.dir))),
            ("IMPORTS__DIR".into(), path_string(Some(&s.imports.dir))),
            (
                "DEV__DATA_DIR".into(),
                path_string(Some(&self.work.path().join("child").join(".tenant-worker"))),
            ),
            ("ROLES__OWNER".into(), s.roles.owner.clone()),
            ("ROLES__APP".into(), s.roles.app.clone()),
            ("ROLES__QUEUE".into(), s.roles.queue.clone()),
            ("ROLES__SCHEDULER".into(), s.roles.scheduler.clone()),
            ("WORKER__QUEUE".into(), w.queue.clone()),
            ("WORKER__CONCURRENCY".into(), w.concurrency.to_string()),
            ("WORKER__BATCH_SIZE".into(), w.batch_size.to_string()),
            ("WORKER__MAX_ATTEMPTS".into(), w.max_attempts.to_string()),
            (
                "WORKER__BACKOFF_BASE_MS".into(),
                w.backoff_base_ms.to_string(),
            ),
            (
                "WORKER__BACKOFF_MAX_MS".into(),
                w.backoff_max_ms.to_string(),
            ),
            (
                "WORKER__POLL_INTERVAL_MS".into(),
                w.poll_interval_ms.to_string(),
            ),
            (
                "WORKER__HEARTBEAT_SECS".into(),
                w.heartbeat_secs.to_string(),
            ),
            (
                "WORKER__MISSED_HEARTBEATS".into(),
                w.missed_heartbeats.to_string(),
            ),
            (
                "WORKER__SHUTDOWN_TIMEOUT_SECS".into(),
                w.shutdown_timeout_secs.to_string(),
            ),
            (
                "WORKER__JOB_TIMEOUT_SECS".into(),
                w.job_timeout_secs.to_string(),
            ),
            (
                "WORKER__MAX_PAYLOAD_BYTES".into(),
                w.max_payload_bytes.to_string(),
            ),
            (
                "WORKER__AUDIT_ON_START".into(),
                w.audit_on_start.to_string(),
            ),
        ];
        for (kind, secs) in &w.timeouts {
            v.push((format!("WORKER__TIMEOUTS__{kind}"), secs.to_string()));
        }
        for (kid, path) in &s.keys.verifying {
            v.push((format!("KEYS__VERIFYING__{kid}"), path_string(Some(path))));
        }
        for (role, pw) in [
            ("APP", &s.roles.app_password),
            ("QUEUE", &s.roles.queue_password),
            ("SCHEDULER", &s.roles.scheduler_password),
        ] {
            if let Some(pw) = pw {
                v.push((
                    format!("ROLES__{role}_PASSWORD"),
                    pw.expose_secret().to_string(),
                ));
            }
        }
        v.into_iter()
            .map(|(k, val)| (format!("TENANT_WORKER__{k}"), val))
            .collect()
    }

    /// Runs this binary's `run --until-idle` as a child process and measures its peak RSS.
    async fn run_worker_child(&self) -> Result<ChildRun> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["run", "--until-idle"])
            .current_dir(self.work.path().join("child"));
        for (k, _) in std::env::vars() {
            if k.starts_with("TENANT_WORKER__") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.child_env());
        let log = self.work.path().join("worker-child.log");
        let run = run_measured(cmd, &log).await;
        keep_log(&log);
        run
    }

    // -----------------------------------------------------------------------------------------
    // throughput
    // -----------------------------------------------------------------------------------------

    async fn throughput(&self) -> Result<Outcome> {
        let n = self.sizes.throughput_jobs;
        let tenants = self
            .add_tenants(self.sizes.throughput_tenants, "Bench tenant")
            .await?;
        let w = &self.settings.worker;

        // Enqueue both sides first; enqueue time is not measured.
        let t = Instant::now();
        let enqueuer = self.enqueuer();
        let mut enqueued = 0usize;
        while enqueued < n {
            let k = (n - enqueued).min(1000);
            let jobs = (enqueued..enqueued + k)
                .map(|i| (tenants[i % tenants.len()], NewJob::new("noop", json!({}))))
                .collect();
            let ids = enqueuer.enqueue_batch(jobs).await?;
            ensure!(ids.iter().all(Option::is_some), "a job was not enqueued");
            enqueued += k;
        }
        let ours_enqueue_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut pushed = 0usize;
        while pushed < n {
            let k = (n - pushed).min(1000);
            plain::push(
                &self.queue,
                PLAIN_QUEUE,
                vec![b"{}".to_vec(); k],
                w.max_attempts as usize,
            )
            .await?;
            pushed += k;
        }
        let plain_enqueue_secs = t.elapsed().as_secs_f64();
        self.settle().await?;

        // Baseline: plain apalis-postgres drains its queue.
        eprintln!("bench: throughput: plain apalis-postgres draining {n} jobs ...");
        let t0 = self.server_now().await?;
        let wall = Instant::now();
        self.drain_plain(|stop| {
            plain::run_noop(
                self.queue.clone(),
                w.clone(),
                format!("bench-plain-{}", short_id()),
                stop,
            )
        })
        .await?;
        let plain_wall = wall.elapsed().as_secs_f64();
        let plain_secs = secs_between(t0, self.last_done(PLAIN_QUEUE).await?);
        let plain_done: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs where job_type = $1 and status = 'Done'",
        )
        .bind(PLAIN_QUEUE)
        .fetch_one(&self.admin)
        .await?;
        ensure!(
            plain_done == n as i64,
            "plain apalis: {plain_done} of {n} done"
        );
        self.settle().await?;

        // Ours.
        eprintln!("bench: throughput: our worker draining {n} signed jobs ...");
        let t0 = self.server_now().await?;
        let wall = Instant::now();
        let summary = self.run_in_process("throughput").await?;
        let ours_wall = wall.elapsed().as_secs_f64();
        let ours_secs = secs_between(t0, self.last_done(&w.queue).await?);
        let runs: i64 = sqlx::query_scalar("select count(*) from public.job_runs")
            .fetch_one(&self.admin)
            .await?;
        ensure!(
            summary.done == n as u64 && runs == n as i64,
            "our worker: {} done, {runs} run records, expected {n} ({summary:?})",
            summary.done
        );

        let ours = n as f64 / ours_secs;
        let plain = n as f64 / plain_secs;
        let ratio = ours / plain;
        let mut row = Row::new(Scenario::Throughput, "noop jobs per second", "jobs/s");
        row.ours = Some(ours);
        row.baseline = Some(plain);
        row.baseline_is = "plain apalis-postgres, same settings".into();
        row.ratio = Some(ratio);
        row.target = "≥ 0.9× and ≥ 8,000 jobs/s".into();
        row.met = Some(ratio >= 0.9 && ours >= 8_000.0);
        Ok(Outcome {
            rows: vec![row],
            details: json!({
                "jobs": n,
                "tenants": tenants.len(),
                "ours": {
                    "jobs_per_sec": ours,
                    "drain_secs": ours_secs,
                    "wall_secs_incl_idle_detection": ours_wall,
                    "enqueue_secs_not_measured": ours_enqueue_secs,
                    "summary": { "done": summary.done, "duplicates": summary.duplicates,
                                 "rejected": summary.rejected, "failed": summary.failed },
                },
                "baseline_plain_apalis": {
                    "jobs_per_sec": plain,
                    "drain_secs": plain_secs,
                    "wall_secs_incl_drain_polling": plain_wall,
                    "enqueue_secs_not_measured": plain_enqueue_secs,
                },
                "ratio": ratio,
                "window": "server clock just before the worker starts -> last done_at of its queue",
            }),
        })
    }

    /// Runs a plain apalis worker until its queue has no job that is not Done.
    async fn drain_plain<F, Fut>(&self, worker: F) -> Result<()>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), apalis_core::error::WorkerError>>,
    {
        let stop = CancellationToken::new();
        let fut = worker(stop.clone());
        tokio::pin!(fut);
        let deadline = Instant::now() + Duration::from_secs(1800);
        let drained = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if !self.not_done(PLAIN_QUEUE).await? {
                    return Ok::<(), anyhow::Error>(());
                }
                ensure!(
                    Instant::now() < deadline,
                    "plain apalis did not drain in time"
                );
            }
        };
        tokio::select! {
            r = &mut fut => bail!("the plain apalis worker stopped early: {r:?}"),
            d = drained => d?,
        }
        stop.cancel();
        fut.await
            .map_err(|e| anyhow::anyhow!("plain apalis worker: {e}"))?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // latency
    // -----------------------------------------------------------------------------------------

    async fn latency(&self) -> Result<Outcome> {
        let tenants = self.add_tenants(10, "Bench tenant").await?;
        let secs = self.sizes.latency_secs;
        let rate = self.sizes.latency_rate_per_sec;
        let period = Duration::from_secs_f64(1.0 / f64::from(rate));
        let queue = self.settings.worker.queue.clone();

        // Ours.
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(worker::run(
            self.state()?,
            RunOptions {
                until_idle: false,
                name: Some("bench-latency".into()),
            },
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let enqueuer = self.enqueuer();
        let mut ids = Vec::new();
        let mut tick = tokio::time::interval(period);
        let start = Instant::now();
        let end = start + LATENCY_WARMUP + Duration::from_secs(secs);
        let mut i = 0usize;
        while Instant::now() < end {
            tick.tick().await;
            let id = enqueuer
                .enqueue(tenants[i % tenants.len()], NewJob::new("noop", json!({})))
                .await?
                .context("job not enqueued")?;
            ids.push(id);
            i += 1;
        }
        let ours_rate = ids.len() as f64 / start.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.not_done(&queue).await? {
            ensure!(Instant::now() < deadline, "our worker did not catch up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        let summary = worker.await??;
        let run_at: HashMap<String, DateTime<Utc>> =
            sqlx::query_as("select id, run_at from apalis.jobs where job_type = $1")
                .bind(&queue)
                .fetch_all(&self.admin)
                .await?
                .into_iter()
                .collect();
        let started: HashMap<uuid::Uuid, DateTime<Utc>> =
            sqlx::query_as("select job_id, started_at from public.job_runs")
                .fetch_all(&self.admin)
                .await?
                .into_iter()
                .collect();
        let mut ours: Vec<f64> = Vec::with_capacity(ids.len());
        let mut slowest: Vec<(f64, f64)> = Vec::new();
        let first = ids
            .first()
            .and_then(|id| run_at.get(&id.to_ulid().to_string()))
            .copied();
        let warmup_ms = LATENCY_WARMUP.as_secs_f64() * 1000.0;
        for id in &ids {
            let enq = run_at
                .get(&id.to_ulid().to_string())
                .with_context(|| format!("job {id} missing from the queue"))?;
            let st = started
                .get(&id.0)
                .with_context(|| format!("job {id} has no run record ({summary:?})"))?;
            let at = first.map(|f| ms_between(f, *enq)).unwrap_or(0.0);
            if at < warmup_ms {
                continue;
            }
            let ms = ms_between(*enq, *st);
            ours.push(ms);
            slowest.push((at, ms));
        }
        slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        slowest.truncate(10);

        // Baseline: plain apalis-postgres, same rate, handler notes the time.
        let latencies = plain::Latencies::default();
        let pushed_rate;
        {
            let w = self.settings.worker.clone();
            let stop = CancellationToken::new();
            let fut = plain::run_latency(
                self.queue.clone(),
                w.clone(),
                format!("bench-plain-{}", short_id()),
                stop.clone(),
                latencies.clone(),
            );
            tokio::pin!(fut);
            let produce = async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut tick = tokio::time::interval(period);
                let start = Instant::now();
                let end = start + LATENCY_WARMUP + Duration::from_secs(secs);
                let mut n = 0usize;
                while Instant::now() < end {
                    tick.tick().await;
                    let payload = serde_json::to_vec(
                        &json!({ "enqueued_at_us": Utc::now().timestamp_micros() }),
                    )?;
                    plain::push(
                        &self.queue,
                        PLAIN_QUEUE,
                        vec![payload],
                        w.max_attempts as usize,
                    )
                    .await?;
                    n += 1;
                }
                let rate = n as f64 / start.elapsed().as_secs_f64();
                let deadline = Instant::now() + Duration::from_secs(120);
                while self.not_done(PLAIN_QUEUE).await? {
                    ensure!(Instant::now() < deadline, "plain apalis did not catch up");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok::<f64, anyhow::Error>(rate)
            };
            tokio::select! {
                r = &mut fut => bail!("the plain apalis worker stopped early: {r:?}"),
                p = produce => pushed_rate = p?,
            }
            stop.cancel();
            fut.await
                .map_err(|e| anyhow::anyhow!("plain apalis worker: {e}"))?;
        }
        let mut plain_slowest = latencies.take_after(LATENCY_WARMUP);
        let plain: Vec<f64> = plain_slowest.iter().map(|(_, ms)| *ms).collect();
        plain_slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        plain_slowest.truncate(10);

        let (o50, o99, omax) = (
            percentile(&ours, 0.50),
            percentile(&ours, 0.99),
            percentile(&ours, 1.0),
        );
        let (b50, b99, bmax) = (
            percentile(&plain, 0.50),
            percentile(&plain, 0.99),
            percentile(&plain, 1.0),
        );
        let mut p50 = Row::new(Scenario::Latency, "enqueue-to-start p50", "ms");
        p50.ours = o50;
        p50.baseline = b50;
        p50.baseline_is = "plain apalis-postgres, same settings".into();
        p50.ratio = ratio(o50, b50);
        let mut p99 = Row::new(Scenario::Latency, "enqueue-to-start p99", "ms");
        p99.ours = o99;
        p99.baseline = b99;
        p99.baseline_is = p50.baseline_is.clone();
        p99.ratio = ratio(o99, b99);
        p99.target = "< 20 ms".into();
        p99.met = o99.map(|v| v < 20.0);
        Ok(Outcome {
            rows: vec![p50, p99],
            details: json!({
                "rate_per_sec": rate,
                "secs": secs,
                "warmup_secs_not_counted": LATENCY_WARMUP.as_secs_f64(),
                "ours": { "jobs": ours.len(), "achieved_rate_per_sec": ours_rate,
                          "p50_ms": o50, "p99_ms": o99, "max_ms": omax,
                          "slowest_at_ms_since_first_enqueue": slowest_json(&slowest),
                          "measure": "job_runs.started_at (server now() at the job's transaction start) - apalis.jobs.run_at (enqueuer's clock before the insert)" },
                "baseline_plain_apalis": { "jobs": plain.len(), "achieved_rate_per_sec": pushed_rate,
                          "p50_ms": b50, "p99_ms": b99, "max_ms": bmax,
                          "slowest_at_ms_since_first_enqueue": slowest_json(&plain_slowest),
                          "measure": "handler start (client clock) - client clock before the push" },
            }),
        })
    }

    // -----------------------------------------------------------------------------------------
    // export
    // -----------------------------------------------------------------------------------------

    async fn export(&self) -> Result<Outcome> {
        let n = self.sizes.export_rows;
        let tenant = self.add_tenants(1, "Bench export tenant").await?[0];
        eprintln!("bench: export: generating {n} property rows ...");
        self.generate(
            tenant,
            Mix {
                properties: n,
                customers: 0,
                invoices: 0,
            },
        )
        .await?;
        self.settle().await?;
        // Warm the cache for both sides alike.
        let mut tx = TenantTx::begin(&self.app, tenant).await?;
        let visible: i64 = sqlx::query_scalar("select count(*) from public.v_property")
            .fetch_one(tx.conn().await?)
            .await?;
        tx.rollback().await?;
        ensure!(visible == n, "the tenant sees {visible} of {n} rows");

        // Baseline: psql's \copy as the app role in the tenant's context.
        eprintln!("bench: export: psql \\copy ...");
        let file = self.work.path().join("baseline-export.csv");
        let psql = self.psql_copy(tenant, &file).await?;
        ensure!(
            psql.rows == n,
            "psql copied {} rows, expected {n}",
            psql.rows
        );
        let (baseline_bytes, baseline_sha) = crate::jobs::export::hash_file(&file)?;
        let _ = std::fs::remove_file(&file);

        // Ours: the real binary as a child process.
        eprintln!("bench: export: our worker (child process) ...");
        let job = self
            .enqueue(
                tenant,
                "export",
                json!({ "source": "v_property", "format": "csv" }),
            )
            .await?;
        let child = self.run_worker_child().await?;
        let times = self
            .job_times(job)
            .await
            .with_context(|| format!("worker output:\n{}", child.output))?;
        let finished_at: DateTime<Utc> =
            serde_json::from_value(times.result["finished_at"].clone())
                .context("the export result has no finished_at")?;
        let rows = times.result["rows"].as_i64().unwrap_or(-1);
        ensure!(rows == n, "our export wrote {rows} rows, expected {n}");
        let same_file = times.result["sha256"].as_str() == Some(baseline_sha.as_str());
        ensure!(
            same_file,
            "our export differs from psql's (sha256 {} vs {baseline_sha})",
            times.result["sha256"]
        );
        let ours_secs = secs_between(times.started_at, finished_at);
        let ours = n as f64 / ours_secs;
        let base = n as f64 / psql.copy_secs;
        let mut speed = Row::new(Scenario::Export, "v_property rows per second", "rows/s");
        speed.ours = Some(ours);
        speed.baseline = Some(base);
        speed.baseline_is = "psql \\copy as the app role".into();
        speed.ratio = Some(ours / base);
        speed.target = "≥ 0.9×".into();
        speed.met = Some(ours / base >= 0.9);
        let mut rss = Row::new(Scenario::Export, "peak RSS of the worker process", "MiB");
        rss.ours = Some(child.peak_rss_kib as f64 / 1024.0);
        rss.baseline = psql.run.as_ref().map(|r| r.peak_rss_kib as f64 / 1024.0);
        rss.baseline_is = "psql".into();
        rss.target = "< 64 MiB".into();
        rss.met = rss.ours.map(|m| m < 64.0);
        Ok(Outcome {
            rows: vec![speed, rss],
            details: json!({
                "rows": n,
                "bytes": baseline_bytes,
                "same_sha256_as_psql": same_file,
                "ours": {
                    "rows_per_sec": ours,
                    "secs": ours_secs,
                    "measure": "job_runs.started_at -> manifest finished_at (fsync, hash and rename included)",
                    "queue_lock_to_done_secs": opt_secs(times.lock_at, times.done_at),
                    "child": child,
                },
                "baseline_psql": {
                    "rows_per_sec": base,
                    "copy_secs": psql.copy_secs,
                    "process_wall_secs": psql.wall_secs,
                    "measure": "psql \\timing of the \\copy (no fsync of the file)",
                    "process": psql.run,
                },
            }),
        })
    }

    /// psql's `\copy` of `v_property` for `tenant` as the app role.
    async fn psql_copy(&self, tenant: TenantId, file: &Path) -> Result<PsqlRun> {
        let psql = find_psql().context(
            "psql not found (on PATH or next to the PostgreSQL server binaries): \
             the export baseline needs it",
        )?;
        let mut url = url::Url::parse(self.urls.app.expose_secret())
            .context("the app role URL is not a URL")?;
        let password = url.password().map(percent_decode);
        let _ = url.set_password(None);
        let path = file.display().to_string();
        ensure!(
            !path.contains('\''),
            "the work directory path contains a quote"
        );
        let mut cmd = tokio::process::Command::new(psql);
        cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-d", url.as_str()])
            .args(["-c", "\\timing on", "-c", "begin"])
            .arg("-c")
            .arg(format!(
                "select set_config('app.tenant_id', '{}', true)",
                tenant.0.hyphenated()
            ))
            .arg("-c")
            .arg(format!(
                "\\copy (select * from public.v_property) to '{path}' with (format csv, header true)"
            ))
            .args(["-c", "commit"])
            .current_dir(self.work.path());
        for v in [
            "PGOPTIONS",
            "PGSERVICE",
            "PGPASSWORD",
            "PGTZ",
            "PGCLIENTENCODING",
        ] {
            cmd.env_remove(v);
        }
        if let Some(pw) = password {
            cmd.env("PGPASSWORD", pw);
        }
        let log = self.work.path().join("psql.log");
        let run = run_measured(cmd, &log).await?;
        let out = run.output.clone();
        // "COPY <n>" then "Time: <ms> ms ..." for the \copy.
        let mut lines = out.lines();
        let mut rows = None;
        let mut copy_ms = None;
        while let Some(line) = lines.next() {
            if let Some(count) = line.strip_prefix("COPY ") {
                rows = count.trim().parse::<i64>().ok();
                copy_ms = lines.next().and_then(parse_psql_time);
                break;
            }
        }
        let (Some(rows), Some(copy_ms)) = (rows, copy_ms) else {
            bail!("unexpected psql output:\n{out}");
        };
        Ok(PsqlRun {
            rows,
            copy_secs: copy_ms / 1000.0,
            wall_secs: run.wall_secs,
            run: Some(run),
        })
    }

    // -----------------------------------------------------------------------------------------
    // import
    // -----------------------------------------------------------------------------------------

    async fn import(&self) -> Result<Outcome> {
        let n = self.sizes.import_rows;
        let tenants = self.add_tenants(2, "Bench import tenant").await?;
        let (tenant, ceiling_tenant) = (tenants[0], tenants[1]);
        let inbox = self.settings.imports.dir.join(tenant.to_string());
        std::fs::create_dir_all(&inbox)?;
        let jsonl = inbox.join("bench.jsonl");
        let copy_text = self.work.path().join("baseline-import.copy");
        let ceiling_text = self.work.path().join("ceiling-import.copy");
        eprintln!("bench: import: writing {n} records ...");
        {
            let (jsonl, copy_text, ceiling_text) =
                (jsonl.clone(), copy_text.clone(), ceiling_text.clone());
            tokio::task::spawn_blocking(move || {
                write_import_files(
                    &jsonl,
                    &[(copy_text, tenant), (ceiling_text, ceiling_tenant)],
                    n,
                )
            })
            .await??;
        }
        let file_bytes = std::fs::metadata(&jsonl)?.len();
        self.admin.execute("checkpoint").await?;

        // Baseline: COPY of the same rows into an unconstrained scratch table.
        eprintln!("bench: import: plain COPY into an unconstrained table ...");
        self.admin
            .execute("create table public.bench_scratch (like public.records)")
            .await?;
        let base_secs = {
            let mut conn = self.admin.acquire().await?;
            let start = Instant::now();
            copy_file(&mut conn, "public.bench_scratch", &copy_text, n).await?;
            start.elapsed().as_secs_f64()
        };
        let _ = std::fs::remove_file(&copy_text);
        self.admin
            .execute("drop table public.bench_scratch")
            .await?;
        self.admin.execute("checkpoint").await?;

        // Ours.
        eprintln!("bench: import: our worker (child process) ...");
        let job = self
            .enqueue(tenant, "import", json!({ "file": "bench.jsonl" }))
            .await?;
        let child = self.run_worker_child().await?;
        let times = self
            .job_times(job)
            .await
            .with_context(|| format!("worker output:\n{}", child.output))?;
        let inserted = times.result["inserted"].as_i64().unwrap_or(-1);
        ensure!(
            inserted == n,
            "our import inserted {inserted}, expected {n}: {}",
            times.result
        );
        let ours_secs = secs_between(times.started_at, times.end()?);

        // For reference: the same rows COPYed straight into `records` (every index, check and
        // key), rolled back. Only a role that bypasses RLS may do this: PostgreSQL refuses
        // COPY FROM into a table with row-level security, which is why an import must INSERT.
        // So this is a ceiling that no RLS-respecting import can reach, not a baseline.
        self.admin.execute("checkpoint").await?;
        eprintln!("bench: import: ceiling, COPY straight into records as the admin ...");
        let ceiling_secs = {
            let mut tx = self.admin.begin().await?;
            let start = Instant::now();
            copy_file(&mut tx, "public.records", &ceiling_text, n).await?;
            let secs = start.elapsed().as_secs_f64();
            tx.rollback().await?;
            secs
        };
        let _ = std::fs::remove_file(&ceiling_text);

        let ours = n as f64 / ours_secs;
        let base = n as f64 / base_secs;
        let ceiling = n as f64 / ceiling_secs;
        let mut speed = Row::new(Scenario::Import, "JSONL records per second", "rows/s");
        speed.ours = Some(ours);
        speed.baseline = Some(base);
        speed.baseline_is = "COPY into an unconstrained table".into();
        speed.ratio = Some(ours / base);
        speed.target = "≥ 0.4×".into();
        speed.met = Some(ours / base >= 0.4);
        let mut ceiling_row = Row::new(
            Scenario::Import,
            "ceiling: COPY straight into records, RLS bypassed (info)",
            "rows/s",
        );
        ceiling_row.ours = Some(ceiling);
        ceiling_row.baseline = Some(base);
        ceiling_row.baseline_is = "COPY into an unconstrained table".into();
        ceiling_row.ratio = Some(ceiling / base);
        let mut rss = Row::new(Scenario::Import, "peak RSS of the worker process", "MiB");
        rss.ours = Some(child.peak_rss_kib as f64 / 1024.0);
        rss.target = "< 64 MiB".into();
        rss.met = rss.ours.map(|m| m < 64.0);
        Ok(Outcome {
            rows: vec![speed, ceiling_row, rss],
            details: json!({
                "rows": n,
                "jsonl_bytes": file_bytes,
                "ceiling_copy_into_records": {
                    "rows_per_sec": ceiling,
                    "secs": ceiling_secs,
                    "measure": "copy_in_raw of the same rows for a second tenant straight into public.records (admin, RLS bypassed), rolled back, client-timed",
                },
                "ours": {
                    "rows_per_sec": ours,
                    "secs": ours_secs,
                    "measure": "job_runs.started_at -> job_runs.finished_at (clock_timestamp() just before the commit)",
                    "started_to_acked_secs": opt_secs(Some(times.started_at), times.done_at),
                    "result": times.result,
                    "child": child,
                },
                "baseline_copy": {
                    "rows_per_sec": base,
                    "secs": base_secs,
                    "measure": "copy_in_raw of COPY text in the table's shape (admin), client-timed",
                },
            }),
        })
    }

    // -----------------------------------------------------------------------------------------
    // rollup
    // -----------------------------------------------------------------------------------------

    async fn rollup(&self) -> Result<Outcome> {
        let n = self.sizes.rollup_rows;
        let tenant = self.add_tenants(1, "Bench rollup tenant").await?[0];
        let mix = Mix {
            properties: n * 4 / 10,
            customers: n / 10,
            invoices: n - n * 4 / 10 - n / 10,
        };
        eprintln!("bench: rollup: generating {n} rows ...");
        self.generate(tenant, mix).await?;
        self.settle().await?;

        // Baseline: the same aggregations as one statement, app role, tenant context.
        let mut tx = TenantTx::begin(&self.app, tenant).await?;
        let _: i64 = sqlx::query_scalar("select count(*) from public.records")
            .fetch_one(tx.conn().await?)
            .await?; // warm-up, for both sides
        let start = Instant::now();
        let base_rows = sqlx::query(AssertSqlSafe(format!(
            "create temp table bench_rollup_baseline on commit drop as {FRESH_ROLLUPS}"
        )))
        .execute(tx.conn().await?)
        .await?
        .rows_affected();
        let base_secs = start.elapsed().as_secs_f64();
        tx.rollback().await?;

        // Ours: full.
        eprintln!("bench: rollup: full run ...");
        let full = self.rollup_job(tenant, true).await?;
        let full_consistent = self.rollups_match(tenant).await?;

        // 1% newest rows change, then incremental.
        let changed = (n / 100).max(1);
        let updated = sqlx::query(
            r#"update public.records r
               set data = r.data || jsonb_build_object('rev', 1)
                          || case when r.kind = 'invoice' then '{"status": "paid"}'::jsonb else '{}'::jsonb end
               where r.tenant_id = $1
                 and r.id in (select id from public.records where tenant_id = $1
                              order by created_at desc limit $2)"#,
        )
        .bind(tenant)
        .bind(changed)
        .execute(&self.admin)
        .await?
        .rows_affected();
        eprintln!("bench: rollup: incremental run after {updated} newest rows changed ...");
        let newest = self.rollup_job(tenant, false).await?;
        let newest_consistent = self.rollups_match(tenant).await?;

        // 1% random rows change (worst case for incremental), then incremental.
        let random_updated = sqlx::query(
            r#"update public.records r
               set data = r.data || jsonb_build_object('rev', 2)
               where r.tenant_id = $1 and abs(hashtext(r.id::text)) % 100 = 7"#,
        )
        .bind(tenant)
        .execute(&self.admin)
        .await?
        .rows_affected();
        eprintln!("bench: rollup: incremental run after {random_updated} random rows changed ...");
        let random = self.rollup_job(tenant, false).await?;
        let random_consistent = self.rollups_match(tenant).await?;
        ensure!(
            full.mode == ["full", "full"]
                && newest.mode == ["incremental", "incremental"]
                && random.mode == ["incremental", "incremental"],
            "unexpected rollup modes: {:?} {:?} {:?}",
            full.mode,
            newest.mode,
            random.mode
        );

        let mut full_row = Row::new(Scenario::Rollup, "full built-in rollups", "s");
        full_row.ours = Some(full.secs);
        full_row.baseline = Some(base_secs);
        full_row.baseline_is = "one aggregate statement, app role".into();
        full_row.ratio = Some(full.secs / base_secs);
        full_row.target = "≤ 1.2× the time".into();
        full_row.met = Some(full.secs / base_secs <= 1.2);
        let mut inc = Row::new(Scenario::Rollup, "incremental, 1% newest rows changed", "s");
        inc.ours = Some(newest.secs);
        inc.baseline = Some(full.secs);
        inc.baseline_is = "our full run".into();
        inc.ratio = Some(newest.secs / full.secs);
        inc.target = "≤ 0.1× the full time".into();
        inc.met = Some(newest.secs / full.secs <= 0.1);
        let mut rnd = Row::new(
            Scenario::Rollup,
            "incremental, 1% random rows changed (info)",
            "s",
        );
        rnd.ours = Some(random.secs);
        rnd.baseline = Some(full.secs);
        rnd.baseline_is = "our full run".into();
        rnd.ratio = Some(random.secs / full.secs);
        ensure!(
            full_consistent && newest_consistent && random_consistent,
            "stored rollups differ from a fresh aggregation (full {full_consistent}, \
             newest {newest_consistent}, random {random_consistent})"
        );
        Ok(Outcome {
            rows: vec![full_row, inc, rnd],
            details: json!({
                "rows": n,
                "mix": { "properties": mix.properties, "customers": mix.customers, "invoices": mix.invoices },
                "baseline_statement": { "secs": base_secs, "rows": base_rows },
                "measure": "job_runs.started_at -> job_runs.finished_at, in-process worker",
                "full": full.details,
                "incremental_newest": { "rows_changed": updated, "run": newest.details },
                "incremental_random": { "rows_changed": random_updated, "run": random.details },
                "stored_rollups_match_fresh_aggregation": true,
            }),
        })
    }

    async fn rollup_job(&self, tenant: TenantId, full: bool) -> Result<RollupRun> {
        let job = self
            .enqueue(tenant, "rollup", json!({ "full": full }))
            .await?;
        let summary = self.run_in_process("rollup").await?;
        let times = self
            .job_times(job)
            .await
            .with_context(|| format!("{summary:?}"))?;
        let done = times.end()?;
        let mode = ["records_per_kind_per_day", "invoices_per_month"]
            .iter()
            .map(|n| times.result[n]["mode"].as_str().unwrap_or("?").to_string())
            .collect();
        Ok(RollupRun {
            secs: secs_between(times.started_at, done),
            mode,
            details: json!({
                "secs": secs_between(times.started_at, done),
                "started_to_acked_secs": opt_secs(Some(times.started_at), times.done_at),
                "result": times.result,
            }),
        })
    }

    /// Whether the tenant's stored built-in rollups equal a fresh aggregation.
    async fn rollups_match(&self, tenant: TenantId) -> Result<bool> {
        let mut tx = TenantTx::begin(&self.app, tenant).await?;
        let diff: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "with fresh as ({FRESH_ROLLUPS}),
                  stored as (select name, bucket, dims, count, sum from public.rollups
                             where name in ('records_per_kind_per_day', 'invoices_per_month'))
             select count(*) from ((select * from fresh except all select * from stored)
                                   union all
                                   (select * from stored except all select * from fresh)) d"
        )))
        .fetch_one(tx.conn().await?)
        .await?;
        tx.rollback().await?;
        Ok(diff == 0)
    }

    // -----------------------------------------------------------------------------------------
    // scale
    // -----------------------------------------------------------------------------------------

    async fn scale(&self) -> Result<Outcome> {
        let sz = self.sizes;
        let tenant = self.add_tenants(1, "Bench small tenant").await?[0];
        self.generate(
            tenant,
            Mix {
                properties: sz.scale_tenant_rows,
                customers: 0,
                invoices: 0,
            },
        )
        .await?;
        let others_small = self.add_tenants(9, "Bench neighbour").await?;
        let rest = sz.scale_small_table - sz.scale_tenant_rows;
        for (i, t) in others_small.iter().enumerate() {
            let share = split(rest, others_small.len(), i);
            self.generate(*t, Mix::mixed(share)).await?;
        }
        self.settle().await?;
        let small_total = self.record_count().await?;
        eprintln!("bench: scale: exports with {small_total} rows in the table ...");
        let small = self.scale_phase(tenant).await?;

        let big_tenants = if sz.scale_large_table >= 1_000_000 {
            50
        } else {
            10
        };
        let others_big = self.add_tenants(big_tenants, "Bench big neighbour").await?;
        let extra = sz.scale_large_table - small_total;
        eprintln!("bench: scale: generating {extra} more rows for {big_tenants} other tenants ...");
        for (i, t) in others_big.iter().enumerate() {
            let share = split(extra, others_big.len(), i);
            self.generate(*t, Mix::mixed(share)).await?;
        }
        self.settle().await?;
        let large_total = self.record_count().await?;
        eprintln!("bench: scale: exports with {large_total} rows in the table ...");
        let large = self.scale_phase(tenant).await?;

        let ratio_v = large.median_ms / small.median_ms;
        let mut row = Row::new(
            Scenario::Scale,
            &format!(
                "{}-row tenant's export, table {} vs {} rows",
                sz.scale_tenant_rows,
                human(large_total as f64),
                human(small_total as f64)
            ),
            "ms",
        );
        row.ours = Some(large.median_ms);
        row.baseline = Some(small.median_ms);
        row.baseline_is = "the same export on the small table".into();
        row.ratio = Some(ratio_v);
        row.target = "≤ 1.5× the time".into();
        row.met = Some(ratio_v <= 1.5);
        let mut q = Row::new(
            Scenario::Scale,
            "its export query alone (EXPLAIN ANALYZE, info)",
            "ms",
        );
        q.ours = large.query_ms;
        q.baseline = small.query_ms;
        q.baseline_is = "on the small table".into();
        q.ratio = ratio(large.query_ms, small.query_ms);
        Ok(Outcome {
            rows: vec![row, q],
            details: json!({
                "tenant_rows": sz.scale_tenant_rows,
                "small": { "table_rows": small_total, "phase": small.details },
                "large": { "table_rows": large_total, "phase": large.details },
                "ratio": ratio_v,
                "measure": "median over runs of job_runs.started_at -> manifest finished_at, in-process worker, one export at a time",
            }),
        })
    }

    async fn scale_phase(&self, tenant: TenantId) -> Result<ScalePhase> {
        let mut tx = TenantTx::begin(&self.app, tenant).await?;
        let plan: Vec<String> = sqlx::query_scalar(
            "explain (analyze, buffers, format text) select * from public.v_property",
        )
        .fetch_all(tx.conn().await?)
        .await?;
        tx.rollback().await?;
        let query_ms = plan
            .iter()
            .find_map(|l| l.trim().strip_prefix("Execution Time:"))
            .and_then(|v| v.trim().trim_end_matches("ms").trim().parse::<f64>().ok());
        let uses_index = plan.iter().any(|l| l.contains("Index"));
        let mut times = Vec::new();
        for _ in 0..self.sizes.scale_runs {
            let job = self
                .enqueue(
                    tenant,
                    "export",
                    json!({ "source": "v_property", "format": "csv" }),
                )
                .await?;
            self.run_in_process("scale").await?;
            let t = self.job_times(job).await?;
            let finished_at: DateTime<Utc> =
                serde_json::from_value(t.result["finished_at"].clone())
                    .context("the export result has no finished_at")?;
            ensure!(
                t.result["rows"].as_i64() == Some(self.sizes.scale_tenant_rows),
                "the export wrote {} rows",
                t.result["rows"]
            );
            times.push(ms_between(t.started_at, finished_at));
        }
        let median_ms = percentile(&times, 0.5).context("no runs")?;
        Ok(ScalePhase {
            median_ms,
            query_ms,
            details: json!({
                "export_ms": times,
                "median_ms": median_ms,
                "query_execution_ms": query_ms,
                "plan_uses_an_index": uses_index,
                "explain_analyze": plan,
            }),
        })
    }
}

/// Both built-in rollups of the current tenant, freshly aggregated, in the `rollups` shape
/// (name, bucket, dims, count, sum): what `jobs::rollup` computes.
const FRESH_ROLLUPS: &str =
    "select 'records_per_kind_per_day'::text as name, r.created_day as bucket,
            jsonb_build_object('kind', r.kind) as dims, count(*) as count, null::numeric as sum
     from public.records r
     group by r.created_day, r.kind
     union all
     select 'invoices_per_month', r.invoice_month,
            jsonb_build_object('status', coalesce(r.data ->> 'status', ''),
                               'currency', coalesce(r.data ->> 'currency', '')),
            count(*), sum((r.data ->> 'amount')::numeric)
     from public.records r
     where r.kind = 'invoice' and r.invoice_month is not null
     group by r.invoice_month, 3";

struct RollupRun {
    secs: f64,
    mode: Vec<String>,
    details: serde_json::Value,
}

struct ScalePhase {
    median_ms: f64,
    query_ms: Option<f64>,
    details: serde_json::Value,
}

struct PsqlRun {
    rows: i64,
    copy_secs: f64,
    wall_secs: f64,
    run: Option<ChildRun>,
}

// ---------------------------------------------------------------------------------------------
// Plain apalis-postgres, the baseline
// ---------------------------------------------------------------------------------------------

mod plain {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use apalis::prelude::*;
    use apalis_postgres::PostgresStorage;
    use sqlx::PgPool;
    use tokio_util::sync::CancellationToken;

    use crate::config::WorkerSettings;

    /// The same queue configuration our worker uses (see `worker::run_generation`).
    fn config(s: &WorkerSettings) -> apalis_postgres::Config {
        apalis_postgres::Config::default()
            .queue(super::PLAIN_QUEUE)
            .batch_size(s.batch_size)
            .heartbeat_interval(Duration::from_secs(s.heartbeat_secs))
            .missed_heartbeats(s.missed_heartbeats)
    }

    /// Pushes payloads (JSON bytes) in one statement with apalis-postgres's own sink query.
    pub async fn push(
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

    async fn noop(_job: serde_json::Value) -> Result<(), BoxDynError> {
        Ok(())
    }

    /// A plain worker: same storage config, wake-ups, concurrency and parallelism as ours;
    /// the handler returns at once.
    pub async fn run_noop(
        pool: PgPool,
        s: WorkerSettings,
        name: String,
        stop: CancellationToken,
    ) -> Result<(), WorkerError> {
        // Its own pool for the run, closed after, as our worker's generations have.
        let pool = crate::worker::generation_pool(&pool);
        let strategy = crate::worker::wake_strategy(
            &pool,
            super::PLAIN_QUEUE,
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
        crate::worker::close_generation_pool(pool).await;
        result
    }

    /// What the latency handler recorded: (enqueue time in µs, latency in ms) per job.
    #[derive(Debug, Clone, Default)]
    pub struct Latencies(Arc<Mutex<Vec<(i64, f64)>>>);

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

    async fn record(job: serde_json::Value, lat: Data<Latencies>) -> Result<(), BoxDynError> {
        let now = chrono::Utc::now().timestamp_micros();
        if let Some(t) = job.get("enqueued_at_us").and_then(|v| v.as_i64()) {
            lat.push(t, (now - t) as f64 / 1000.0);
        }
        Ok(())
    }

    /// Like [`run_noop`], with a handler that records enqueue-to-start latency.
    pub async fn run_latency(
        pool: PgPool,
        s: WorkerSettings,
        name: String,
        stop: CancellationToken,
        latencies: Latencies,
    ) -> Result<(), WorkerError> {
        // Its own pool for the run, closed after, as our worker's generations have.
        let pool = crate::worker::generation_pool(&pool);
        let strategy = crate::worker::wake_strategy(
            &pool,
            super::PLAIN_QUEUE,
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
        crate::worker::close_generation_pool(pool).await;
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes and peak RSS
// ---------------------------------------------------------------------------------------------

/// Peak RSS so far (`VmHWM`, KiB) of a running process; `None` once it exited.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn children_maxrss_kib() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss().max(0) as u64)
        .unwrap_or(0)
}

/// Runs `cmd` to completion with output to `log`, measuring its peak RSS (see the module docs).
async fn run_measured(mut cmd: tokio::process::Command, log: &Path) -> Result<ChildRun> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    let before = children_maxrss_kib();
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting a child process")?;
    let pid = child.id().context("the child has no pid")?;
    let mut sampled = 0u64;
    let status = loop {
        if let Some(v) = vm_hwm_kib(pid) {
            sampled = sampled.max(v);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill().await;
            bail!("a child process ran longer than {CHILD_TIMEOUT:?}; killed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let wall_secs = start.elapsed().as_secs_f64();
    let after = children_maxrss_kib();
    let output = std::fs::read_to_string(log).unwrap_or_default();
    ensure!(
        status.success(),
        "child process failed ({status}); its output:\n{}",
        tail(&output, 40)
    );
    let (peak, method) = if after > before {
        (
            after.max(sampled),
            "getrusage(RUSAGE_CHILDREN).ru_maxrss rose when this child was reaped: exact",
        )
    } else {
        (
            sampled,
            "VmHWM from /proc/<pid>/status sampled every 10 ms (an earlier child had a larger \
             peak, so the children's ru_maxrss did not rise)",
        )
    };
    Ok(ChildRun {
        wall_secs,
        peak_rss_kib: peak,
        rss_method: method.to_string(),
        sampled_vm_hwm_kib: sampled,
        rusage_children_maxrss_before_kib: before,
        rusage_children_maxrss_after_kib: after,
        output,
    })
}

/// With `TENANT_WORKER_BENCH_LOGS=DIR`, child process logs are kept there (the child inherits
/// `RUST_LOG`, so `RUST_LOG=sqlx::query=debug` shows each statement's time).
fn keep_log(log: &Path) {
    if let Some(dir) = std::env::var_os("TENANT_WORKER_BENCH_LOGS") {
        let dir = PathBuf::from(dir);
        let name = format!(
            "{}-{}",
            Utc::now().format("%H%M%S%.3f"),
            log.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        if std::fs::create_dir_all(&dir).is_ok() {
            let _ = std::fs::copy(log, dir.join(name));
        }
    }
}

fn find_psql() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("psql"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| {
            crate::embedded::find_binaries()
                .ok()
                .map(|d| d.join("psql"))
                .filter(|p| p.is_file())
        })
        .or_else(|| Some(PathBuf::from("/usr/bin/psql")).filter(|p| p.is_file()))
}

/// "Time: 1234.567 ms (00:01.235)" -> 1234.567
fn parse_psql_time(line: &str) -> Option<f64> {
    let rest = line.trim().strip_prefix("Time:")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Import files
// ---------------------------------------------------------------------------------------------

/// Streams a COPY text file into `table` (columns in the order [`write_import_files`] writes)
/// and checks the row count.
async fn copy_file(
    conn: &mut sqlx::PgConnection,
    table: &str,
    path: &Path,
    expected: i64,
) -> Result<()> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "copy {table} (tenant_id, id, kind, data, external_id, created_at, updated_at) from stdin"
        ))
        .await?;
    let mut f = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
        if k == 0 {
            break;
        }
        copy.send(&buf[..k]).await?;
    }
    let copied = copy.finish().await?;
    ensure!(
        copied == expected as u64,
        "COPY into {table} loaded {copied} rows, expected {expected}"
    );
    Ok(())
}

/// The import's JSONL file and the same rows as COPY text in the table's shape (tenant_id,
/// id, kind, data, external_id, created_at, updated_at), one COPY file per (path, tenant).
fn write_import_files(jsonl: &Path, copies: &[(PathBuf, TenantId)], n: i64) -> Result<()> {
    let mut j = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(jsonl)?);
    let mut c = copies
        .iter()
        .map(|(path, tenant)| {
            let file = std::fs::File::create(path)?;
            Ok((std::io::BufWriter::with_capacity(1 << 20, file), *tenant))
        })
        .collect::<Result<Vec<_>>>()?;
    let now = Utc::now().to_rfc3339();
    let mut line = Vec::with_capacity(512);
    let mut row = Vec::with_capacity(512);
    for i in 1..=n {
        let u = i as usize;
        let data = json!({
            "name": format!("{} Court {i}", CITIES[u % 6]),
            "address": format!("{} {} Street", 10 + i * 7 % 990, STREETS[u % 6]),
            "city": CITIES[(u * 13) % 6],
            "units": 4 + (i * 17) % 60,
        });
        let external_id = format!("P-{i:07}");
        line.clear();
        serde_json::to_writer(
            &mut line,
            &json!({ "kind": "property", "external_id": external_id, "data": data }),
        )?;
        line.push(b'\n');
        j.write_all(&line)?;
        let data_text = data.to_string();
        for (out, tenant) in &mut c {
            row.clear();
            write!(
                row,
                "{tenant}\t{}\tproperty\t",
                uuid::Uuid::new_v4().hyphenated()
            )?;
            copy_escape(&mut row, &data_text);
            writeln!(row, "\t{external_id}\t{now}\t{now}")?;
            out.write_all(&row)?;
        }
    }
    j.flush()?;
    for (out, _) in &mut c {
        out.flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Numbers and the table
// ---------------------------------------------------------------------------------------------

/// Nearest-rank percentile (`q` in 0..=1) of unsorted values.
fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn secs_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// (ms since the first enqueue, latency in ms) pairs as JSON.
fn slowest_json(slowest: &[(f64, f64)]) -> Vec<serde_json::Value> {
    slowest
        .iter()
        .map(|(at, ms)| json!({ "at_ms": at, "latency_ms": ms }))
        .collect()
}

fn ms_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    secs_between(a, b) * 1000.0
}

fn opt_secs(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<f64> {
    Some(secs_between(a?, b?))
}

/// `total` split into `parts` nearly equal shares; share `i`.
fn split(total: i64, parts: usize, i: usize) -> i64 {
    let parts = parts as i64;
    total / parts + i64::from((i as i64) < total % parts)
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

fn path_string(p: Option<&Path>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// 1234567 -> "1,234,567"; 5000000 -> "5M" style only for round millions.
fn human(v: f64) -> String {
    if v >= 1e6 && (v / 1e6).fract() == 0.0 {
        return format!("{}M", v / 1e6);
    }
    thousands(v.round() as i64)
}

fn thousands(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0 { format!("-{out}") } else { out }
}

fn value(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    match unit {
        "jobs/s" | "rows/s" => format!("{} {unit}", thousands(v.round() as i64)),
        "ms" if v < 10.0 => format!("{v:.2} ms"),
        "ms" => format!("{v:.1} ms"),
        "s" if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        "s" => format!("{v:.2} s"),
        "MiB" => format!("{v:.1} MiB"),
        other => format!("{v:.3} {other}"),
    }
}

fn render_line(r: &Row) -> String {
    format!(
        "{} / {}: ours {}, baseline {} ({}), ratio {}, target {}, met {}",
        r.scenario,
        r.metric,
        value(r.ours, r.unit),
        value(r.baseline, r.unit),
        if r.baseline_is.is_empty() {
            "-"
        } else {
            &r.baseline_is
        },
        r.ratio.map(|x| format!("{x:.2}×")).unwrap_or("-".into()),
        r.target,
        met(r.met)
    )
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

/// The results as a Markdown table (pasteable into the README).
fn render_table(rows: &[Row]) -> String {
    let header = [
        "scenario", "metric", "ours", "baseline", "ratio", "target", "met?",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.to_string(),
                r.metric.clone(),
                value(r.ours, r.unit),
                match (&r.baseline, r.baseline_is.as_str()) {
                    (Some(_), "") => value(r.baseline, r.unit),
                    (Some(_), what) => format!("{} ({what})", value(r.baseline, r.unit)),
                    (None, _) => "-".into(),
                },
                r.ratio.map(|x| format!("{x:.2}×")).unwrap_or("-".into()),
                r.target.clone(),
                met(r.met).to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<&str>| -> String {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(widths) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(&line(widths.iter().map(|_| "").collect()).replace(' ', "-"));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// The machine: cores, memory, CPU, kernel, OS.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let mem_kib: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string());
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string());
    json!({
        "loadavg_at_end": read("/proc/loadavg").trim(),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_mib": mem_kib.map(|k| k / 1024),
        "cpu": cpu,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "os": os,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn splits_add_up() {
        let total: i64 = (0..7).map(|i| split(4_990_000, 7, i)).sum();
        assert_eq!(total, 4_990_000);
    }

    #[test]
    fn psql_timing_lines_parse() {
        assert_eq!(parse_psql_time("Time: 72.536 ms"), Some(72.536));
        assert_eq!(
            parse_psql_time("Time: 1234.500 ms (00:01.235)"),
            Some(1234.5)
        );
        assert_eq!(parse_psql_time("COPY 3"), None);
    }

    #[test]
    fn numbers_render() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(human(5_000_000.0), "5M");
        assert_eq!(human(10_000.0), "10,000");
        assert_eq!(percent_decode("a%40b"), "a@b");
    }
}
