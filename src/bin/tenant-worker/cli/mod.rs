//! The command line. Each command builds a [`Client`] from the settings (the configured
//! database, or the local default cluster) and calls into the library; `main.rs` only parses
//! arguments and reports errors.

mod admin;
mod args;
mod jobs;
mod run;
mod schedules;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tenant_worker::queue::JobState;
use tenant_worker::{Client, Settings, TenantId};

pub use args::ArgShortcuts;

const ENQUEUE_HELP: &str = "\
Kinds and their arguments (--args JSON, or the shortcut flags):
  noop     sleep_ms, fail, count                    (nothing but the scoped transaction)
  export   source, format (csv|jsonl), gzip, since  (--source, --format, --gzip, --since)
  import   file or records, format, mode            (--file, --format, --mode)
  rollup   name, full                               (--name, --full)
  process  name                                     (--name)";

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
    /// Sign and enqueue a job for a tenant; prints the job id (the existing job's id when the
    /// idempotency key was used already).
    #[command(after_help = ENQUEUE_HELP)]
    Enqueue {
        /// Job kind: noop, export, import, rollup or process (kinds an application registers
        /// are enqueued by that application, or over HTTP).
        kind: String,
        /// The tenant the job acts for.
        #[arg(long)]
        tenant: TenantId,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Earliest start, RFC 3339 (e.g. 2026-12-01T03:00:00Z); a time in the past means now.
        #[arg(long)]
        run_at: Option<DateTime<Utc>>,
        /// Higher runs first; negative values run after the default 0.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// At most one job with this key per tenant: a repeat prints the first job's id.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Attempts before the job is dead (default: the kind's, else worker.max_attempts).
        #[arg(long)]
        max_attempts: Option<u32>,
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
    /// Change a tenant's share of the workers: its weight against other tenants with work,
    /// and a cap on its jobs running at once across all workers.
    Set {
        /// Tenant id.
        id: TenantId,
        /// Share of worker time relative to other tenants with work (1 to 1000; default 1).
        #[arg(long, allow_negative_numbers = true, value_parser = whole_number)]
        weight: Option<i64>,
        /// At most this many of its jobs at once (1 to 100000), or `none` for no cap.
        #[arg(long, value_name = "N|none", allow_negative_numbers = true, value_parser = cap)]
        max_running: Option<Cap>,
    },
    /// Pause a tenant: its jobs stay queued (new ones too) until `tenant resume`.
    Pause {
        /// Tenant id.
        id: TenantId,
    },
    /// Resume a paused tenant: its queued jobs run again, in order.
    Resume {
        /// Tenant id.
        id: TenantId,
    },
}

/// `--max-running`: a number, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// No cap.
    None,
    /// This many.
    At(i64),
}

fn whole_number(s: &str) -> Result<i64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))
}

fn cap(s: &str) -> Result<Cap, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Cap::None);
    }
    whole_number(s)
        .map(Cap::At)
        .map_err(|e| format!("{e} (or `none` for no cap)"))
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
    /// Replace the key that seals tenant contexts inside the database. The old key keeps
    /// verifying for the grace period, so running workers (which pick up the new key within a
    /// minute) and transactions in flight carry on.
    RotateContext {
        /// How long contexts sealed with the old key stay valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
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
        state: Option<JobState>,
        /// Only jobs of this kind.
        #[arg(long)]
        kind: Option<String>,
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
    /// Per-tenant load: runnable, delayed and running jobs, the oldest wait, weight, cap and
    /// pause, the longest-waiting tenants first.
    Stats {
        /// At most this many tenants.
        #[arg(long, default_value_t = 20)]
        limit: i64,
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

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the command fails with, with context.
pub async fn run(cli: Cli) -> Result<i32> {
    let settings = Settings::load(cli.config.as_deref()).context("failed to load settings")?;
    match cli.command {
        Command::Setup => admin::setup(&settings).await?,
        Command::Migrate => admin::migrate(&settings).await?,
        Command::Tenant(cmd) => admin::tenant(&settings, cmd).await?,
        Command::Keys(cmd) => admin::keys(&settings, cmd).await?,
        Command::Enqueue {
            kind,
            tenant,
            args,
            run_at,
            priority,
            idempotency_key,
            max_attempts,
            shortcuts,
        } => {
            let job = jobs::EnqueueArgs {
                kind,
                tenant,
                args,
                run_at,
                priority,
                idempotency_key,
                max_attempts,
                shortcuts,
            };
            jobs::enqueue(&settings, job).await?
        }
        Command::Jobs(cmd) => jobs::command(&settings, cmd).await?,
        Command::Schedule(cmd) => schedules::command(&settings, cmd).await?,
        Command::Rollups(cmd) => schedules::rollups(&settings, cmd).await?,
        Command::Run { until_idle } => return run::worker(&settings, until_idle).await,
        Command::Audit => return admin::audit(&settings).await,
        Command::Dev(cmd) => admin::dev(&settings, cmd)?,
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

/// Says on stderr, when no database is configured, that the local cluster is used.
fn note_local_default(settings: &Settings) {
    if !settings.database_configured() {
        eprintln!(
            "note: no database configured (database.admin_url): using the local cluster in {}",
            settings.dev.data_dir.join("pg").display()
        );
    }
}

/// Connects as the settings say. When that is the local default cluster, says so on stderr:
/// a misspelt database setting must not pass silently for "no database configured".
async fn connect(settings: &Settings) -> Result<Client> {
    note_local_default(settings);
    Client::connect(settings)
        .await
        .context("could not reach the database")
}
