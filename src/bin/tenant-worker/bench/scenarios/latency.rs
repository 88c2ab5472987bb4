//! The latency scenario.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use chrono::{DateTime, Utc};
use serde_json::json;
use tenant_worker::{NewJob, RunOptions};
use tokio_util::sync::CancellationToken;

use crate::bench::harness::Ctx;
use crate::bench::plain;
use crate::bench::report::*;
use crate::bench::{LATENCY_WARMUP, Outcome, PLAIN_QUEUE, Scenario};

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let tenants = ctx.add_tenants(10, "Bench tenant").await?;
    let secs = ctx.sizes.latency_secs;
    let rate = ctx.sizes.latency_rate_per_sec;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let queue = ctx.settings.worker.queue.clone();

    // Ours.
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(ctx.worker()?.run(
        RunOptions {
            until_idle: false,
            name: Some("bench-latency".into()),
        },
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let enqueuer = ctx.enqueuer();
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(period);
    let start = Instant::now();
    let end = start + LATENCY_WARMUP + Duration::from_secs(secs);
    let mut i = 0usize;
    while Instant::now() < end {
        tick.tick().await;
        let done = enqueuer
            .enqueue_job(tenants[i % tenants.len()], NewJob::new("noop", json!({})))
            .await?;
        ensure!(done.created, "job not enqueued");
        let id = done.id;
        ids.push(id);
        i += 1;
    }
    let ours_rate = ids.len() as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ctx.not_done(&queue).await? {
        ensure!(Instant::now() < deadline, "our worker did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    let summary = worker.await??;
    let run_at: HashMap<String, DateTime<Utc>> =
        sqlx::query_as("select id, run_at from apalis.jobs where job_type = $1")
            .bind(&queue)
            .fetch_all(&ctx.admin)
            .await?
            .into_iter()
            .collect();
    let started: HashMap<uuid::Uuid, DateTime<Utc>> =
        sqlx::query_as("select job_id, started_at from public.job_runs")
            .fetch_all(&ctx.admin)
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
        let w = ctx.settings.worker.clone();
        let stop = CancellationToken::new();
        let fut = plain::run_latency(
            ctx.queue.clone(),
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
                    &ctx.queue,
                    PLAIN_QUEUE,
                    vec![payload],
                    w.max_attempts as usize,
                )
                .await?;
                n += 1;
            }
            let rate = n as f64 / start.elapsed().as_secs_f64();
            let deadline = Instant::now() + Duration::from_secs(120);
            while ctx.not_done(PLAIN_QUEUE).await? {
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
