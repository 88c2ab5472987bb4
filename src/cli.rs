//! The command line. Each command resolves the database (configured, or the local default
//! cluster) and calls into the library; `main.rs` only parses arguments and reports errors.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::{self, DbUrls};
use crate::envelope::{self, KeyId, TenantId};
use crate::queue::{self, Enqueuer, NewJob};
use crate::{audit, embedded, scheduler, tenant, worker};

/// tenant-worker: background jobs for multi-tenant PostgreSQL data, isolated by Row-Level
/// Security.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Settings file (default: ./worker.toml when present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create roles, run migrations (ours and the job queue's) and apply grants. Idempotent.
    Setup,
    /// Run migrations and grants only (roles must exist).
    Migrate,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Sign and enqueue a job for a tenant; prints the job id.
    Enqueue {
        /// Job kind (noop, ...).
        kind: String,
        /// The tenant the job acts for.
        #[arg(long)]
        tenant: TenantId,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Earliest start, RFC 3339 (e.g. 2026-12-01T03:00:00Z).
        #[arg(long)]
        run_at: Option<DateTime<Utc>>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Do not enqueue if a job with this key exists.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        shortcuts: ArgShortcuts,
    },
    /// Inspect and manage queued jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Per-tenant cron schedules (run by `run`'s scheduler).
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Show a tenant's rollup results.
    #[command(subcommand)]
    Rollups(RollupsCommand),
    /// Run the worker (Ctrl-C / SIGTERM: finish in-flight jobs, then exit).
    Run {
        /// Exit once no runnable job remains.
        #[arg(long)]
        until_idle: bool,
    },
    /// Check the security posture; exit 1 on any failure.
    Audit,
    /// The local development cluster used when no database is configured.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Run the demo on a private throwaway cluster.
    Demo,
    /// Run the benchmark suite (ours versus a baseline per scenario) on a throwaway cluster,
    /// or in a fresh database on the configured server; prints a table.
    Bench {
        /// Small sizes (about a minute; what CI runs).
        #[arg(long)]
        quick: bool,
        /// Only this scenario (repeatable; default: all).
        #[arg(long = "scenario", value_name = "NAME", value_enum)]
        scenarios: Vec<crate::bench::Scenario>,
        /// Also write every number, the machine and the server as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

/// Flags that fill common arguments, so `enqueue export --source v_property --format csv`
/// works without hand-written JSON. They override keys of `--args`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ArgShortcuts {
    /// export: a view, record kind or named export.
    #[arg(long)]
    pub source: Option<String>,
    /// export: csv or jsonl.
    #[arg(long)]
    pub format: Option<String>,
    /// export: gzip the file.
    #[arg(long)]
    pub gzip: bool,
    /// export: only rows updated since this time (RFC 3339).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// import: a file inside the tenant's inbox (<imports.dir>/<tenant id>/), relative to it.
    #[arg(long)]
    pub file: Option<String>,
    /// import: all-or-nothing (default) or skip-invalid.
    #[arg(long)]
    pub mode: Option<String>,
    /// rollup / process: the rollup or declared job to run.
    #[arg(long)]
    pub name: Option<String>,
    /// rollup: recompute everything, not only the changed buckets.
    #[arg(long)]
    pub full: bool,
}

impl ArgShortcuts {
    /// Merges the flags into a JSON arguments object.
    ///
    /// # Errors
    /// When `args` is not a JSON object.
    pub fn apply(&self, args: &str) -> Result<serde_json::Value> {
        let mut value: serde_json::Value =
            serde_json::from_str(args).context("--args is not valid JSON")?;
        let Some(map) = value.as_object_mut() else {
            bail!("--args must be a JSON object");
        };
        if let Some(s) = &self.source {
            map.insert("source".into(), s.clone().into());
        }
        if let Some(f) = &self.format {
            map.insert("format".into(), f.clone().into());
        }
        if self.gzip {
            map.insert("gzip".into(), true.into());
        }
        if let Some(t) = &self.since {
            map.insert("since".into(), t.to_rfc3339().into());
        }
        if let Some(f) = &self.file {
            map.insert("file".into(), f.clone().into());
        }
        if let Some(m) = &self.mode {
            map.insert("mode".into(), m.clone().into());
        }
        if let Some(n) = &self.name {
            map.insert("name".into(), n.clone().into());
        }
        if self.full {
            map.insert("full".into(), true.into());
        }
        Ok(value)
    }
}

/// `tenant` subcommands.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; prints its id.
    Add {
        /// Display name.
        #[arg(long)]
        name: String,
    },
    /// List tenants.
    List,
    /// Suspend a tenant: its jobs are rejected.
    Suspend {
        /// Tenant id.
        id: TenantId,
    },
    /// Re-activate a tenant.
    Activate {
        /// Tenant id.
        id: TenantId,
    },
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new Ed25519 key pair (<kid>.key.pem, mode 0600, and <kid>.pub.pem).
    Generate {
        /// Directory to write to.
        #[arg(long)]
        out: PathBuf,
        /// Key id (default: derived from the public key).
        #[arg(long)]
        key_id: Option<String>,
    },
}

/// `jobs` subcommands.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only this tenant's jobs.
        #[arg(long)]
        tenant: Option<TenantId>,
        /// Only jobs in this state (pending, scheduled, running, retrying, done, dead,
        /// rejected, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Show one job.
    Show {
        /// Job id (UUID or ULID).
        id: String,
    },
    /// Run a dead, rejected or cancelled job again.
    Retry {
        /// Job id.
        id: String,
    },
    /// Cancel a job that has not started.
    Cancel {
        /// Job id.
        id: String,
    },
}

/// `rollups` subcommands.
#[derive(Debug, Subcommand)]
pub enum RollupsCommand {
    /// Print a tenant's rollup rows.
    Show {
        /// The tenant.
        #[arg(long)]
        tenant: TenantId,
        /// Only this rollup.
        #[arg(long)]
        name: Option<String>,
    },
}

/// `schedule` subcommands.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule: `schedule add --tenant ID --cron "0 3 * * *" --tz Europe/Berlin export
    /// --source v_property --format csv`. Prints its id.
    Add {
        /// The tenant.
        #[arg(long)]
        tenant: TenantId,
        /// Cron expression: 5 fields (minute hour day month weekday) or 6 with seconds first.
        #[arg(long)]
        cron: String,
        /// IANA time zone the cron expression is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Job kind.
        kind: String,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        #[command(flatten)]
        shortcuts: Box<ArgShortcuts>,
    },
    /// List schedules (one tenant's, or all).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<TenantId>,
    },
    /// Remove a schedule.
    Remove {
        /// Schedule id.
        id: uuid::Uuid,
    },
}

/// `dev` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Is the local cluster running?
    Status,
    /// Stop the local cluster.
    Stop,
}

const JOB_STATES: &[&str] = &[
    "pending",
    "scheduled",
    "running",
    "retrying",
    "done",
    "dead",
    "rejected",
    "cancelled",
];

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the command fails with, with context.
pub async fn run(cli: Cli) -> Result<i32> {
    let settings = Settings::load(cli.config.as_deref()).context("failed to load settings")?;
    match cli.command {
        Command::Setup => {
            let urls = resolve(&settings).await?;
            if !urls.local_default {
                db::setup(&settings, &urls).await.context("setup failed")?;
            }
            println!("setup complete: roles, migrations and grants are in place");
        }
        Command::Migrate => {
            let urls = resolve(&settings).await?;
            db::migrate(&settings, &urls)
                .await
                .context("migration failed")?;
            println!("migrations applied");
        }
        Command::Tenant(cmd) => tenant_command(&settings, cmd).await?,
        Command::Keys(KeysCommand::Generate { out, key_id }) => {
            let kid = key_id.map(|k| KeyId::parse(&k)).transpose()?;
            let (kid, private, public) = envelope::generate_key_pair(&out, kid)?;
            println!("key id:      {kid}");
            println!(
                "private key: {} (mode 0600; enqueuers only)",
                private.display()
            );
            println!("public key:  {} (workers)", public.display());
            println!();
            println!("# worker.toml");
            println!("[keys]");
            println!("signing_key_file = {:?}", private.display().to_string());
            println!("signing_key_id = \"{kid}\"");
            println!("[keys.verifying]");
            println!("{kid} = {:?}", public.display().to_string());
        }
        Command::Enqueue {
            kind,
            tenant,
            args,
            run_at,
            priority,
            idempotency_key,
            shortcuts,
        } => {
            let args = shortcuts.apply(&args)?;
            let catalog = std::sync::Arc::new(settings.jobs.catalog()?);
            let urls = resolve(&settings).await?;
            let signer = envelope::signer_from_settings(
                &settings.keys,
                dev_keys(&settings, &urls).as_deref(),
            )?;
            let pool = db::queue_pool(&settings, &urls).await?;
            let enqueuer = Enqueuer::new(pool, signer, &settings).with_catalog(catalog);
            let job = NewJob {
                kind,
                args,
                run_at,
                priority,
                idempotency_key,
            };
            match enqueuer.enqueue(tenant, job).await? {
                Some(id) => println!("{id}"),
                None => println!("already enqueued (idempotency key exists)"),
            }
        }
        Command::Jobs(cmd) => jobs_command(&settings, cmd).await?,
        Command::Schedule(cmd) => schedule_command(&settings, cmd).await?,
        Command::Rollups(RollupsCommand::Show { tenant, name }) => {
            let urls = resolve(&settings).await?;
            let app = db::app_pool(&settings, &urls).await?;
            let mut tx = tenant::TenantTx::begin(&app, tenant).await?;
            let rows = crate::jobs::rollup::show(&mut tx, name.as_deref()).await?;
            tx.rollback().await?;
            if rows.is_empty() {
                println!("no rollup rows: run `tenant-worker enqueue rollup --tenant {tenant}`");
            }
            for r in rows {
                println!(
                    "{:<26} {}  {:<40} count {:>8}  sum {}",
                    r.name,
                    r.bucket,
                    r.dims.to_string(),
                    r.count.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    r.sum.unwrap_or_else(|| "-".into())
                );
            }
        }
        Command::Run { until_idle } => return run_worker(&settings, until_idle).await,
        Command::Audit => {
            let urls = resolve(&settings).await?;
            let admin = db::admin_pool(&settings, &urls).await?;
            let checks = audit::run(&admin, &settings.roles).await?;
            print_checks(&checks);
            if audit::failures(&checks) > 0 {
                return Ok(1);
            }
        }
        Command::Dev(cmd) => {
            let dir = settings.dev.data_dir.join("pg");
            match cmd {
                DevCommand::Status => match embedded::LocalCluster::status(&dir)? {
                    embedded::ClusterStatus::NotInitialized => {
                        println!("no local cluster in {}", dir.display())
                    }
                    embedded::ClusterStatus::Stopped { port } => {
                        println!(
                            "local cluster in {} is stopped (port {port})",
                            dir.display()
                        )
                    }
                    embedded::ClusterStatus::Running { port, pid } => println!(
                        "local cluster in {} is running on 127.0.0.1:{port} (pid {pid})",
                        dir.display()
                    ),
                },
                DevCommand::Stop => {
                    if embedded::LocalCluster::stop(&dir)? {
                        println!("stopped the local cluster in {}", dir.display());
                    } else {
                        println!("the local cluster in {} was not running", dir.display());
                    }
                }
            }
        }
        Command::Demo => crate::demo::run(&settings).await?,
        Command::Bench {
            quick,
            scenarios,
            json,
        } => {
            crate::bench::run(
                &settings,
                crate::bench::Options {
                    quick,
                    scenarios,
                    json,
                },
            )
            .await?
        }
    }
    Ok(0)
}

async fn resolve(settings: &Settings) -> Result<DbUrls> {
    DbUrls::resolve(settings)
        .await
        .context("could not reach the database")
}

/// Where the development keys live, when the local default cluster is in use.
fn dev_keys(settings: &Settings, urls: &DbUrls) -> Option<PathBuf> {
    urls.local_default
        .then(|| settings.dev.data_dir.join("keys"))
}

async fn tenant_command(settings: &Settings, cmd: TenantCommand) -> Result<()> {
    let urls = resolve(settings).await?;
    let admin = db::admin_pool(settings, &urls).await?;
    let owner = &settings.roles.owner;
    match cmd {
        TenantCommand::Add { name } => {
            let t = tenant::add(&admin, owner, &name).await?;
            println!("{}", t.id);
        }
        TenantCommand::List => {
            let tenants = tenant::list(&admin, owner).await?;
            if tenants.is_empty() {
                println!("no tenants yet: add one with `tenant-worker tenant add --name NAME`");
            }
            for t in tenants {
                println!("{}  {:<9}  {}", t.id, t.status, t.name);
            }
        }
        TenantCommand::Suspend { id } => {
            tenant::set_status(&admin, owner, id, false).await?;
            println!("suspended {id}: its jobs will be rejected");
        }
        TenantCommand::Activate { id } => {
            tenant::set_status(&admin, owner, id, true).await?;
            println!("activated {id}");
        }
    }
    Ok(())
}

async fn jobs_command(settings: &Settings, cmd: JobsCommand) -> Result<()> {
    let urls = resolve(settings).await?;
    let pool = db::queue_pool(settings, &urls).await?;
    match cmd {
        JobsCommand::List {
            tenant,
            state,
            limit,
        } => {
            if let Some(s) = &state
                && !JOB_STATES.contains(&s.as_str())
            {
                bail!("unknown state `{s}`; use one of {}", JOB_STATES.join(", "));
            }
            let jobs = queue::list(
                &pool,
                &settings.worker.queue,
                tenant,
                state.as_deref(),
                limit,
            )
            .await?;
            for j in jobs {
                println!(
                    "{}  {:<9}  {:<8}  tenant {}  attempts {}/{}",
                    j.id,
                    j.state,
                    j.kind.as_deref().unwrap_or("?"),
                    j.tenant_id.as_deref().unwrap_or("?"),
                    j.attempts,
                    j.max_attempts
                );
            }
        }
        JobsCommand::Show { id } => {
            let j = queue::show(&pool, &id).await?;
            println!("id:        {}", j.id);
            println!("state:     {}", j.state);
            println!("kind:      {}", j.kind.as_deref().unwrap_or("?"));
            println!("tenant:    {}", j.tenant_id.as_deref().unwrap_or("?"));
            println!("attempts:  {}/{}", j.attempts, j.max_attempts);
            let t =
                |v: Option<DateTime<Utc>>| v.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into());
            println!("run at:    {}", t(j.run_at));
            println!("locked at: {}", t(j.lock_at));
            println!("done at:   {}", t(j.done_at));
            if let Some(err) = j.error() {
                let label = if j.state == "rejected" {
                    "reason"
                } else {
                    "error"
                };
                println!("{label}:    {err}");
            } else if let Some(r) = &j.last_result {
                println!("result:    {r}");
            }
        }
        JobsCommand::Retry { id } => {
            queue::retry(&pool, &id).await?;
            println!("{id} will run again");
        }
        JobsCommand::Cancel { id } => {
            queue::cancel(&pool, &id).await?;
            println!("cancelled {id}");
        }
    }
    Ok(())
}

async fn schedule_command(settings: &Settings, cmd: ScheduleCommand) -> Result<()> {
    let catalog = settings.jobs.catalog()?;
    let urls = resolve(settings).await?;
    let app = db::app_pool(settings, &urls).await?;
    match cmd {
        ScheduleCommand::Add {
            tenant,
            cron,
            tz,
            kind,
            args,
            shortcuts,
        } => {
            let args = shortcuts.apply(&args)?;
            let id = scheduler::add(&app, &catalog, tenant, &cron, &tz, &kind, &args).await?;
            println!("{id}");
        }
        ScheduleCommand::List { tenant } => {
            let rows = match tenant {
                Some(t) => scheduler::list_for_tenant(&app, t).await?,
                None => scheduler::list_all(&db::scheduler_pool(settings, &urls).await?).await?,
            };
            for s in rows {
                println!(
                    "{}  tenant {}  {:<16} {:<14} {} {}{}",
                    s.id,
                    s.tenant_id,
                    format!("\"{}\"", s.cron),
                    s.timezone,
                    s.kind,
                    s.args,
                    if s.enabled { "" } else { "  (disabled)" }
                );
            }
        }
        ScheduleCommand::Remove { id } => {
            let sched = db::scheduler_pool(settings, &urls).await?;
            let tenant = scheduler::remove(&sched, &app, id).await?;
            println!("removed schedule {id} of tenant {tenant}");
        }
    }
    Ok(())
}

/// Prints audit results.
pub fn print_checks(checks: &[audit::Check]) {
    for c in checks {
        if c.ok {
            println!("PASS  {}", c.name);
        } else {
            println!("FAIL  {}: {}", c.name, c.detail);
            println!("      fix: {}", c.fix);
        }
    }
    let failed = audit::failures(checks);
    println!("{} checks, {} failed", checks.len(), failed);
}

async fn run_worker(settings: &Settings, until_idle: bool) -> Result<i32> {
    let catalog = settings.jobs.catalog()?;
    let urls = resolve(settings).await?;
    let keyring =
        envelope::keyring_from_settings(&settings.keys, dev_keys(settings, &urls).as_deref())?;
    if settings.worker.audit_on_start {
        let admin = db::admin_pool(settings, &urls).await?;
        let checks = audit::run(&admin, &settings.roles).await?;
        admin.close().await;
        let failed = audit::failures(&checks);
        if failed > 0 {
            print_checks(&checks);
            eprintln!("refusing to start: the security audit failed ({failed} problem(s))");
            return Ok(1);
        }
    }
    let app = db::app_pool(settings, &urls).await?;
    let queue = db::queue_pool(settings, &urls).await?;
    let catalog = std::sync::Arc::new(catalog);
    let state = worker::WorkerState::new(app, queue.clone(), keyring, settings)
        .with_catalog((*catalog).clone());
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    match envelope::signer_from_settings(&settings.keys, dev_keys(settings, &urls).as_deref()) {
        Ok(signer) => {
            let enqueuer = Enqueuer::new(queue, signer, settings).with_catalog(catalog);
            let sched =
                scheduler::Scheduler::new(db::scheduler_pool(settings, &urls).await?, enqueuer);
            if until_idle {
                // One pass, so runs that became due while nothing ran fire (once) now.
                let jobs = sched.tick(Utc::now()).await?;
                if !jobs.is_empty() {
                    eprintln!("scheduler enqueued {} due job(s)", jobs.len());
                }
            } else {
                tokio::spawn(sched.run(std::time::Duration::from_secs(1), shutdown.clone()));
            }
        }
        Err(envelope::KeyError::NoSigningKey) => {
            tracing::warn!("no signing key configured: the scheduler is off in this process");
        }
        Err(e) => return Err(e.into()),
    }
    let summary = worker::run(
        state,
        worker::RunOptions {
            until_idle,
            name: None,
        },
        shutdown,
    )
    .await?;
    eprintln!(
        "worker finished: {} done, {} duplicate deliveries ignored, {} rejected, {} failed attempts",
        summary.done, summary.duplicates, summary.rejected, summary.failed
    );
    Ok(0)
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error.message = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested: finishing in-flight jobs");
        token.cancel();
    });
}

/// Path helper for tests and the demo.
pub fn display(p: &Path) -> String {
    p.display().to_string()
}
