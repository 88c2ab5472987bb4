//! `enqueue` and `jobs list/show/retry/cancel`.

use std::sync::Arc;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tenant_worker::queue::{self, JobInfo, JobState, NewJob};
use tenant_worker::{Settings, TenantId};

use super::{ArgShortcuts, JobsCommand, connect};

/// What `enqueue` was asked.
pub struct EnqueueArgs {
    pub kind: String,
    pub tenant: TenantId,
    pub args: String,
    pub run_at: Option<DateTime<Utc>>,
    pub priority: i32,
    pub idempotency_key: Option<String>,
    pub max_attempts: Option<u32>,
    pub shortcuts: ArgShortcuts,
}

pub async fn enqueue(settings: &Settings, a: EnqueueArgs) -> Result<()> {
    let args = a.shortcuts.apply(&a.args)?;
    let client = connect(settings).await?;
    let enqueuer = client.enqueuer(Arc::new(client.builtins()))?;
    let mut job = NewJob::new(a.kind, args).priority(a.priority);
    job.run_at = a.run_at;
    job.idempotency_key = a.idempotency_key;
    job.max_attempts = a.max_attempts;
    if let Some(t) = a.run_at
        && t < Utc::now()
    {
        eprintln!(
            "note: --run-at {} is in the past: the job runs now",
            t.to_rfc3339()
        );
    }
    let done = enqueuer.enqueue_job(a.tenant, job).await?;
    if !done.created {
        eprintln!("already enqueued: the idempotency key belongs to this job");
    }
    println!("{}", done.id);
    Ok(())
}

pub async fn command(settings: &Settings, cmd: JobsCommand) -> Result<()> {
    let client = connect(settings).await?;
    let pool = client.queue_pool();
    match cmd {
        JobsCommand::List {
            tenant,
            state,
            kind,
            limit,
        } => {
            let limit = limit.max(1);
            let mut jobs = queue::list_of_kind(
                pool,
                &settings.worker.queue,
                tenant,
                state,
                kind.as_deref(),
                limit + 1,
            )
            .await?;
            let more = jobs.len() as i64 > limit;
            jobs.truncate(limit as usize);
            if jobs.is_empty() {
                println!("no jobs match");
            }
            for j in jobs {
                println!(
                    "{}  {:<9}  {:<8}  tenant {}  attempts {}/{}{}",
                    j.id,
                    j.state,
                    j.kind.as_deref().unwrap_or("?"),
                    j.tenant_id.as_deref().unwrap_or("?"),
                    j.attempts,
                    j.max_attempts,
                    j.note
                        .as_deref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default()
                );
            }
            if more {
                println!("(more jobs match: --limit {} shows more)", limit * 2);
            }
        }
        JobsCommand::Show { id } => show(&queue::show(pool, &id).await?),
        JobsCommand::Retry { id } => {
            queue::retry(pool, &id).await?;
            println!("{id} will run again");
        }
        JobsCommand::Cancel { id } => {
            queue::cancel(pool, &id).await?;
            println!("cancelled {id}");
        }
        JobsCommand::Stats { limit } => {
            let limit = limit.max(1);
            let mut loads = queue::tenant_loads(pool, &settings.worker.queue, limit + 1).await?;
            let more = loads.len() as i64 > limit;
            loads.truncate(limit as usize);
            if loads.is_empty() {
                println!("no unfinished jobs");
                return Ok(());
            }
            println!(
                "{:<36}  {:>8}  {:>7}  {:>7}  {:>11}  {:>6}  {:>11}  paused",
                "tenant", "runnable", "delayed", "running", "oldest wait", "weight", "max-running"
            );
            for l in loads {
                let wait = l
                    .oldest_wait_secs
                    .map_or("-".to_string(), |s| format!("{s:.1}s"));
                let cap = l.max_running.map_or("-".to_string(), |n| n.to_string());
                println!(
                    "{:<36}  {:>8}  {:>7}  {:>7}  {:>11}  {:>6}  {:>11}  {}",
                    if l.tenant_id.is_empty() {
                        "(none)"
                    } else {
                        &l.tenant_id
                    },
                    l.runnable,
                    l.delayed,
                    l.running,
                    wait,
                    l.weight,
                    cap,
                    if l.paused { "yes" } else { "-" }
                );
            }
            if more {
                println!("(more tenants have jobs: --limit {} shows more)", limit * 2);
            }
        }
    }
    Ok(())
}

fn show(j: &JobInfo) {
    println!("id:        {}", j.id);
    println!("state:     {}", j.state);
    println!("kind:      {}", j.kind.as_deref().unwrap_or("?"));
    println!("tenant:    {}", j.tenant_id.as_deref().unwrap_or("?"));
    println!("attempts:  {}/{}", j.attempts, j.max_attempts);
    let t = |v: Option<DateTime<Utc>>| v.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into());
    println!("run at:    {}", t(j.run_at));
    println!("locked at: {}", t(j.lock_at));
    println!("done at:   {}", t(j.done_at));
    if let Some(note) = &j.note {
        println!("note:      {note}");
    }
    if let Some(p) = &j.progress {
        let total = p.total.map(|t| format!(" of {t}")).unwrap_or_default();
        let message = p
            .message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        println!("progress:  {}{total}{message}", p.done);
    }
    if let Some(err) = j.error() {
        let label = if j.state == JobState::Rejected {
            "reason"
        } else {
            "error"
        };
        println!("{label}:    {err}");
    } else if let Some(r) = j.result() {
        println!("result:    {r}");
    }
}
