//! The throughput scenario.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde_json::json;
use tenant_worker::NewJob;
use tokio_util::sync::CancellationToken;

use crate::bench::harness::Ctx;
use crate::bench::plain;
use crate::bench::report::*;
use crate::bench::{Outcome, PLAIN_QUEUE, Scenario};

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.throughput_jobs;
    let tenants = ctx
        .add_tenants(ctx.sizes.throughput_tenants, "Bench tenant")
        .await?;
    let w = &ctx.settings.worker;

    // Enqueue both sides first; enqueue time is not measured.
    let t = Instant::now();
    let enqueuer = ctx.enqueuer();
    let mut enqueued = 0usize;
    while enqueued < n {
        let k = (n - enqueued).min(1000);
        let jobs = (enqueued..enqueued + k)
            .map(|i| (tenants[i % tenants.len()], NewJob::new("noop", json!({}))))
            .collect();
        let ids = enqueuer.enqueue_batch(jobs).await?;
        ensure!(ids.iter().all(|e| e.created), "a job was not enqueued");
        enqueued += k;
    }
    let ours_enqueue_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut pushed = 0usize;
    while pushed < n {
        let k = (n - pushed).min(1000);
        plain::push(
            &ctx.queue,
            PLAIN_QUEUE,
            vec![b"{}".to_vec(); k],
            w.max_attempts as usize,
        )
        .await?;
        pushed += k;
    }
    let plain_enqueue_secs = t.elapsed().as_secs_f64();
    ctx.settle().await?;

    // Baseline: plain apalis-postgres drains its queue.
    eprintln!("bench: throughput: plain apalis-postgres draining {n} jobs ...");
    let t0 = ctx.server_now().await?;
    let wall = Instant::now();
    drain_plain(ctx, |stop| {
        plain::run_noop(
            ctx.queue.clone(),
            w.clone(),
            format!("bench-plain-{}", short_id()),
            stop,
        )
    })
    .await?;
    let plain_wall = wall.elapsed().as_secs_f64();
    let plain_secs = secs_between(t0, ctx.last_done(PLAIN_QUEUE).await?);
    let plain_done: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs where job_type = $1 and status = 'Done'",
    )
    .bind(PLAIN_QUEUE)
    .fetch_one(&ctx.admin)
    .await?;
    ensure!(
        plain_done == n as i64,
        "plain apalis: {plain_done} of {n} done"
    );
    ctx.settle().await?;

    // Ours.
    eprintln!("bench: throughput: our worker draining {n} signed jobs ...");
    let t0 = ctx.server_now().await?;
    let wall = Instant::now();
    let summary = ctx.run_in_process("throughput").await?;
    let ours_wall = wall.elapsed().as_secs_f64();
    let ours_secs = secs_between(t0, ctx.last_done(&w.queue).await?);
    let runs: i64 = sqlx::query_scalar("select count(*) from public.job_runs")
        .fetch_one(&ctx.admin)
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
async fn drain_plain<F, Fut>(ctx: &Ctx, worker: F) -> Result<()>
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
            if !ctx.not_done(PLAIN_QUEUE).await? {
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
