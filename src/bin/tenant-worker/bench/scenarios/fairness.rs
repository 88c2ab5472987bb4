//! The fairness scenario: the fair fetch (the default) against strict FIFO between tenants
//! (`worker.fairness = false`), in the same run with the same settings otherwise.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use chrono::{DateTime, Utc};
use serde_json::json;
use tenant_worker::jobs::noop::NoopArgs;
use tenant_worker::worker::{FetchOrder, fetch_once};
use tenant_worker::{JobId, NewJob, RunOptions, Settings, TenantId};
use tokio_util::sync::CancellationToken;

use crate::bench::harness::Ctx;
use crate::bench::report::*;
use crate::bench::{Outcome, Scenario};

/// Jobs each small tenant enqueues into the flood.
const SMALL_JOBS: usize = 10;
/// Small tenants arriving during the flood.
const SMALL_TENANTS: usize = 10;
/// Jobs per tenant of the many-tenants drain.
const MANY_JOBS_EACH: usize = 20;
/// How long each job of the cap case sleeps.
const CAP_SLEEP_MS: u64 = 200;
/// The cap of the capped tenant.
const CAP: i64 = 2;
/// How long each job of the slow tenant in the unequal-cost case takes.
const UNEQUAL_SLOW_MS: u64 = 50;
/// Fetches timed per order in the fetch-at-scale case.
const SCALE_FETCHES: usize = 100;
/// Fetches per order before those, not counted.
const SCALE_WARMUP: usize = 20;

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let s = &ctx.sizes;
    let mut rows = Vec::new();

    // Flood: fair first, then FIFO.
    let fair = flood(ctx, true).await?;
    ctx.reset().await?;
    let fifo = flood(ctx, false).await?;
    ctx.reset().await?;
    let (f99, b99) = (
        percentile(&fair.small_ms, 0.99),
        percentile(&fifo.small_ms, 0.99),
    );
    let metric = format!(
        "flood: small tenants' enqueue-to-done p99 ({} queued ahead)",
        s.fair_flood_jobs
    );
    let mut r = Row::new(Scenario::Fairness, &metric, "ms");
    r.ours = f99;
    r.baseline = b99;
    r.baseline_is = "FIFO between tenants (fairness off), same run".into();
    r.ratio = ratio(f99, b99);
    r.target = "≤ 100 ms".into();
    r.met = f99.map(|v| v <= 100.0);
    rows.push(r);
    let mut r = Row::new(Scenario::Fairness, "flood: whole drain", "jobs/s");
    r.ours = Some(fair.jobs_per_sec);
    r.baseline = Some(fifo.jobs_per_sec);
    r.baseline_is = "FIFO between tenants (fairness off), same run".into();
    r.ratio = Some(fair.jobs_per_sec / fifo.jobs_per_sec);
    r.target = "≥ 0.95×".into();
    r.met = r.ratio.map(|x| x >= 0.95);
    rows.push(r);

    // Many tenants: FIFO first, then fair (the other order from the flood's).
    let many_fifo = many(ctx, false).await?;
    ctx.reset().await?;
    let many_fair = many(ctx, true).await?;
    ctx.reset().await?;
    let metric = format!(
        "{} tenants × {MANY_JOBS_EACH} jobs: drain",
        s.fair_many_tenants
    );
    let mut r = Row::new(Scenario::Fairness, &metric, "jobs/s");
    r.ours = Some(many_fair);
    r.baseline = Some(many_fifo);
    r.baseline_is = "FIFO between tenants (fairness off), same run".into();
    r.ratio = Some(many_fair / many_fifo);
    r.target = "≥ 0.95×".into();
    r.met = r.ratio.map(|x| x >= 0.95);
    rows.push(r);

    // Cap.
    let capped = cap(ctx, true).await?;
    ctx.reset().await?;
    let alone = cap(ctx, false).await?;
    ctx.reset().await?;
    let mut r = Row::new(
        Scenario::Fairness,
        &format!("cap {CAP}: most of the capped tenant's jobs running at once"),
        "jobs",
    );
    r.ours = Some(capped.most_a as f64);
    r.target = format!("≤ {CAP}");
    r.met = Some(capped.most_a <= CAP);
    rows.push(r);
    let concurrency = ctx.settings.worker.concurrency as f64;
    // The capped tenant takes its CAP slots; the other gets the rest, no less.
    let fair_share = concurrency / (concurrency - CAP as f64).max(1.0);
    let mut r = Row::new(
        Scenario::Fairness,
        "cap: other tenant's drain beside the capped one",
        "s",
    );
    r.ours = Some(capped.b_secs);
    r.baseline = Some(alone.b_secs);
    r.baseline_is = "the same tenant's jobs alone".into();
    r.ratio = Some(capped.b_secs / alone.b_secs);
    r.target = format!(
        "≤ {:.2}× (its slots minus the cap's, +10%)",
        fair_share * 1.1
    );
    r.met = r.ratio.map(|x| x <= fair_share * 1.1);
    rows.push(r);

    // Weights.
    let (shares, weight_lanes) = weights(ctx).await?;
    ctx.reset().await?;
    let worst = furthest(&shares.time, 3.0);
    let mut r = Row::new(
        Scenario::Fairness,
        &format!(
            "weights 3:1, both flooded: worker time A:B, worst {:.0} s window",
            s.fair_window_secs
        ),
        "ratio",
    );
    r.ours = worst;
    r.target = "3 ± 15%".into();
    r.met = worst.map(|w| (w - 3.0).abs() <= 0.45);
    rows.push(r);
    let mut r = Row::new(
        Scenario::Fairness,
        "weights 3:1: completed jobs A:B, worst window (info)",
        "ratio",
    );
    r.ours = furthest(&shares.jobs, 3.0);
    rows.push(r);

    // Unequal cost.
    let share = unequal_cost(ctx).await?;
    ctx.reset().await?;
    let mut r = Row::new(
        Scenario::Fairness,
        &format!("unequal cost, equal weights: {UNEQUAL_SLOW_MS} ms jobs' share of worker time"),
        "share",
    );
    r.ours = Some(share.slow_share);
    r.target = "0.5 ± 15%".into();
    r.met = Some((share.slow_share - 0.5).abs() <= 0.075);
    rows.push(r);

    // Fetch at scale.
    let (fair_ms, fifo_ms) = fetch_at_scale(ctx).await?;
    ctx.reset().await?;
    let (f99, b99) = (percentile(&fair_ms, 0.99), percentile(&fifo_ms, 0.99));
    let metric = format!(
        "fetch of {} with {} queued, {} tenants with work: p99",
        ctx.settings.worker.batch_size, s.fair_scale_jobs, s.fair_scale_tenants
    );
    let mut r = Row::new(Scenario::Fairness, &metric, "ms");
    r.ours = f99;
    r.baseline = b99;
    r.baseline_is = "FIFO fetch (fairness off), same queue".into();
    r.ratio = ratio(f99, b99);
    r.target = "≤ 10 ms".into();
    r.met = f99.map(|v| v <= 10.0);
    rows.push(r);

    Ok(Outcome {
        rows,
        details: json!({
            "flood": {
                "flood_jobs": s.fair_flood_jobs,
                "small_tenants": SMALL_TENANTS, "small_jobs_each": SMALL_JOBS,
                "small_enqueued_after_ms": s.fair_flood_after_ms,
                "fair": fair.json(), "fifo": fifo.json(),
                "measure": "job_runs.finished_at (clock before commit) - apalis.jobs.run_at (enqueuer's clock)",
            },
            "many_tenants": { "tenants": s.fair_many_tenants, "jobs_each": MANY_JOBS_EACH,
                              "fair_jobs_per_sec": many_fair, "fifo_jobs_per_sec": many_fifo },
            "cap": { "cap": CAP, "jobs_each": s.fair_cap_jobs, "sleep_ms": CAP_SLEEP_MS,
                     "most_running_capped": capped.most_a, "most_running_other": capped.most_b,
                     "other_drain_secs": capped.b_secs, "other_alone_drain_secs": alone.b_secs,
                     "sampled": "count of Running rows per tenant every 10 ms" },
            "weights": { "weight_a": 3, "weight_b": 1, "window_secs": s.fair_window_secs,
                         "ratios_per_window": shares, "lanes_at_the_end": weight_lanes,
                         "worker_time": "per tenant, the sum over its transactions (a round is one: its jobs share started_at) of the last finished_at - started_at" },
            "unequal_cost": { "slow_job_ms": UNEQUAL_SLOW_MS, "fast": "noop (rounds)",
                              "slow_share_of_worker_time": share.slow_share,
                              "slow_jobs_done": share.slow_jobs, "fast_jobs_done": share.fast_jobs,
                              "slow_worker_secs": share.slow_secs, "fast_worker_secs": share.fast_secs,
                              "lanes_at_the_end": share.lanes,
                              "worker_time": "per tenant, the sum over its transactions (a round is one: its jobs share started_at) of the last finished_at - started_at, for those finished in the counted windows" },
            "fetch_at_scale": {
                "queued": s.fair_scale_jobs, "tenants": s.fair_scale_tenants,
                "fetches_each": SCALE_FETCHES, "warmup_fetches_each_not_counted": SCALE_WARMUP,
                "fair_ms": { "p50": percentile(&fair_ms, 0.5), "p99": percentile(&fair_ms, 0.99), "max": percentile(&fair_ms, 1.0) },
                "fifo_ms": { "p50": percentile(&fifo_ms, 0.5), "p99": percentile(&fifo_ms, 0.99), "max": percentile(&fifo_ms, 1.0) },
                "measure": "client round trip of one fetch statement (claims and marks Running)",
            },
        }),
    })
}

fn with_fairness(ctx: &Ctx, fair: bool) -> Settings {
    let mut s = ctx.settings.clone();
    s.worker.fairness = fair;
    s
}

fn noop(sleep_ms: Option<u64>) -> NewJob {
    NewJob::new(
        "noop",
        serde_json::to_value(NoopArgs {
            sleep_ms,
            ..NoopArgs::default()
        })
        .expect("noop args serialise"),
    )
}

/// Enqueues `jobs` in batches of 1,000 (enqueue time is not measured).
async fn enqueue(ctx: &Ctx, jobs: Vec<(TenantId, NewJob)>) -> Result<Vec<JobId>> {
    let enqueuer = ctx.enqueuer();
    let mut ids = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let batch: Vec<_> = jobs.by_ref().take(1_000).collect();
        let done = enqueuer.enqueue_batch(batch).await?;
        ensure!(done.iter().all(|e| e.created), "a job was not enqueued");
        ids.extend(done.into_iter().map(|e| e.id));
    }
    Ok(ids)
}

/// Our worker in this process, with `settings`, until stopped.
fn spawn_worker(
    ctx: &Ctx,
    settings: &Settings,
    name: &str,
) -> Result<(
    tokio::task::JoinHandle<tenant_worker::worker::Result<tenant_worker::Summary>>,
    CancellationToken,
)> {
    let stop = CancellationToken::new();
    let worker = ctx.worker_with(settings)?;
    let handle = tokio::spawn(worker.run(
        RunOptions {
            until_idle: false,
            name: Some(format!("bench-{name}")),
        },
        stop.clone(),
    ));
    Ok((handle, stop))
}

async fn wait_drained(ctx: &Ctx) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    while ctx.not_done(&ctx.settings.worker.queue).await? {
        ensure!(Instant::now() < deadline, "the queue did not drain in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Enqueue-to-done of each job, in ms.
async fn enqueue_to_done_ms(ctx: &Ctx, ids: &[JobId]) -> Result<Vec<f64>> {
    let rows: Vec<String> = ids.iter().map(|j| j.to_ulid().to_string()).collect();
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|j| j.0).collect();
    let times: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "select j.run_at, r.finished_at
         from unnest($1::text[], $2::uuid[]) as x(row_id, job_id)
         join apalis.jobs j on j.id = x.row_id
         join public.job_runs r on r.job_id = x.job_id",
    )
    .bind(&rows)
    .bind(&uuids)
    .fetch_all(&ctx.admin)
    .await?;
    ensure!(
        times.len() == ids.len(),
        "{} of {} jobs have a run record",
        times.len(),
        ids.len()
    );
    Ok(times.into_iter().map(|(e, d)| ms_between(e, d)).collect())
}

struct Flood {
    small_ms: Vec<f64>,
    jobs_per_sec: f64,
    drain_secs: f64,
}

impl Flood {
    fn json(&self) -> serde_json::Value {
        json!({
            "small_p50_ms": percentile(&self.small_ms, 0.5),
            "small_p99_ms": percentile(&self.small_ms, 0.99),
            "small_max_ms": percentile(&self.small_ms, 1.0),
            "drain_jobs_per_sec": self.jobs_per_sec,
            "drain_secs": self.drain_secs,
        })
    }
}

/// A's backlog is queued; `fair_flood_after_ms` into its drain, ten small tenants enqueue ten
/// jobs each.
async fn flood(ctx: &Ctx, fair: bool) -> Result<Flood> {
    let n = ctx.sizes.fair_flood_jobs;
    let a = ctx.add_tenants(1, "Flooding tenant").await?[0];
    let small = ctx.add_tenants(SMALL_TENANTS, "Small tenant").await?;
    enqueue(ctx, (0..n).map(|_| (a, noop(None))).collect()).await?;
    ctx.settle().await?;
    eprintln!(
        "bench: fairness: flood of {n} with fairness {} ...",
        if fair { "on" } else { "off" }
    );
    let t0 = ctx.server_now().await?;
    let (handle, stop) = spawn_worker(ctx, &with_fairness(ctx, fair), "flood")?;
    tokio::time::sleep(Duration::from_millis(ctx.sizes.fair_flood_after_ms)).await;
    let mut small_ids = Vec::new();
    for t in &small {
        small_ids.extend(enqueue(ctx, (0..SMALL_JOBS).map(|_| (*t, noop(None))).collect()).await?);
    }
    wait_drained(ctx).await?;
    stop.cancel();
    let summary = handle.await??;
    let total = n + small_ids.len();
    ensure!(
        summary.done == total as u64,
        "flood: {} of {total} done ({summary:?})",
        summary.done
    );
    let drain_secs = secs_between(t0, ctx.last_done(&ctx.settings.worker.queue).await?);
    Ok(Flood {
        small_ms: enqueue_to_done_ms(ctx, &small_ids).await?,
        jobs_per_sec: total as f64 / drain_secs,
        drain_secs,
    })
}

/// `fair_many_tenants` tenants with `MANY_JOBS_EACH` jobs each, interleaved: jobs per second.
async fn many(ctx: &Ctx, fair: bool) -> Result<f64> {
    let m = ctx.sizes.fair_many_tenants;
    let tenants = ctx.add_tenants(m, "Bench tenant").await?;
    let n = m * MANY_JOBS_EACH;
    enqueue(ctx, (0..n).map(|i| (tenants[i % m], noop(None))).collect()).await?;
    ctx.settle().await?;
    eprintln!(
        "bench: fairness: {m} tenants × {MANY_JOBS_EACH} with fairness {} ...",
        if fair { "on" } else { "off" }
    );
    let t0 = ctx.server_now().await?;
    let summary = ctx
        .worker_with(&with_fairness(ctx, fair))?
        .run(
            RunOptions {
                until_idle: true,
                name: Some("bench-many".into()),
            },
            CancellationToken::new(),
        )
        .await?;
    ensure!(
        summary.done == n as u64,
        "many: {} of {n} done",
        summary.done
    );
    Ok(n as f64 / secs_between(t0, ctx.last_done(&ctx.settings.worker.queue).await?))
}

struct Capped {
    most_a: i64,
    most_b: i64,
    b_secs: f64,
}

/// With `with_a`: A (max-running 2) and B each have `fair_cap_jobs` slow jobs, A's queued
/// first; without, B's alone. Samples each tenant's running jobs; times B's drain.
async fn cap(ctx: &Ctx, with_a: bool) -> Result<Capped> {
    let jobs = ctx.sizes.fair_cap_jobs;
    let a = ctx.add_tenants(1, "Capped tenant").await?[0];
    let b = ctx.add_tenants(1, "Other tenant").await?[0];
    sqlx::query("update public.tenants set max_running = $2 where id = $1")
        .bind(a)
        .bind(CAP as i32)
        .execute(&ctx.admin)
        .await?;
    if with_a {
        enqueue(
            ctx,
            (0..jobs).map(|_| (a, noop(Some(CAP_SLEEP_MS)))).collect(),
        )
        .await?;
    }
    let b_ids = enqueue(
        ctx,
        (0..jobs).map(|_| (b, noop(Some(CAP_SLEEP_MS)))).collect(),
    )
    .await?;
    eprintln!(
        "bench: fairness: cap {CAP}, {jobs} slow jobs{} ...",
        if with_a {
            " each"
        } else {
            " of the other tenant alone"
        }
    );
    let t0 = ctx.server_now().await?;
    let (handle, stop) = spawn_worker(ctx, &ctx.settings, "cap")?;
    let (mut most_a, mut most_b) = (0i64, 0i64);
    let running = |t: TenantId| {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from apalis.jobs where status = 'Running' and metadata -> 'tenant_id' = $1",
        )
        .bind(t.to_string())
        .fetch_one(&ctx.admin)
    };
    while ctx.not_done(&ctx.settings.worker.queue).await? {
        most_a = most_a.max(running(a).await?);
        most_b = most_b.max(running(b).await?);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    handle.await??;
    let b_rows: Vec<String> = b_ids.iter().map(|j| j.to_ulid().to_string()).collect();
    let b_last: DateTime<Utc> =
        sqlx::query_scalar("select max(done_at) from apalis.jobs where id = any($1)")
            .bind(&b_rows)
            .fetch_one(&ctx.admin)
            .await?;
    Ok(Capped {
        most_a,
        most_b,
        b_secs: secs_between(t0, b_last),
    })
}

/// A (weight 3) and B (weight 1) both flooded; completed A:B per window, after a warm-up window.
async fn weights(ctx: &Ctx) -> Result<(Shares, serde_json::Value)> {
    let s = &ctx.sizes;
    let a = ctx.add_tenants(1, "Weight 3").await?[0];
    let b = ctx.add_tenants(1, "Weight 1").await?[0];
    sqlx::query("update public.tenants set weight = 3 where id = $1")
        .bind(a)
        .execute(&ctx.admin)
        .await?;
    // Enough that neither runs dry: 15,000 jobs/s for the whole run, 80% A's, 35% B's.
    let secs = (s.fair_windows + 1) as f64 * s.fair_window_secs;
    let total = (15_000.0 * secs) as usize;
    let (na, nb) = (total * 8 / 10, total * 35 / 100);
    enqueue(
        ctx,
        (0..na.max(nb))
            .flat_map(|i| {
                let mut v = Vec::new();
                if i < na {
                    v.push((a, noop(None)));
                }
                if i < nb {
                    v.push((b, noop(None)));
                }
                v
            })
            .collect(),
    )
    .await?;
    ctx.settle().await?;
    eprintln!("bench: fairness: weights 3:1, {na} and {nb} jobs queued ...");
    let t0 = ctx.server_now().await?;
    let (handle, stop) = spawn_worker(ctx, &ctx.settings, "weights")?;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.cancel();
    handle.await??;
    let per: Vec<(i64, uuid::Uuid, i64, f64)> = sqlx::query_as(
        "with tx as (
             select tenant_id, started_at, max(finished_at) as finished_at, count(*) as jobs
             from public.job_runs
             where finished_at >= $1 + make_interval(secs => $2)
               and finished_at < $1 + make_interval(secs => $2 * ($3 + 1))
             group by 1, 2
         )
         select floor(extract(epoch from finished_at - $1) / $2)::bigint, tenant_id,
                sum(jobs)::bigint, sum(extract(epoch from finished_at - started_at))::float8
         from tx group by 1, 2",
    )
    .bind(t0)
    .bind(s.fair_window_secs)
    .bind(s.fair_windows as f64)
    .fetch_all(&ctx.admin)
    .await?;
    let claimed: Vec<(i64, String, i64)> = sqlx::query_as(
        "select floor(extract(epoch from lock_at - $1) / $2)::bigint as w,
                metadata -> 'tenant_id', count(*)
         from apalis.jobs
         where lock_at >= $1 + make_interval(secs => $2)
           and lock_at < $1 + make_interval(secs => $2 * ($3 + 1))
         group by 1, 2 order by 1, 2",
    )
    .bind(t0)
    .bind(s.fair_window_secs)
    .bind(s.fair_windows as f64)
    .fetch_all(&ctx.admin)
    .await?;
    let mut lanes = lanes(ctx, &[("weight_3", a), ("weight_1", b)]).await?;
    lanes["claimed_per_window"] = json!(claimed
        .iter()
        .map(|(w, t, n)| json!({ "window": w, "weight": if *t == a.to_string() { 3 } else { 1 }, "jobs": n }))
        .collect::<Vec<_>>());
    let mut shares = Shares::default();
    for w in 1..=s.fair_windows as i64 {
        let of = |t: TenantId| {
            per.iter()
                .find(|(win, tenant, ..)| *win == w && *tenant == t.0)
                .map_or((0, 0.0), |p| (p.2, p.3))
        };
        let ((ca, ta), (cb, tb)) = (of(a), of(b));
        // A window where B got nothing is as unfair as it gets: reported, not a failure.
        shares.jobs.push(ca as f64 / cb.max(1) as f64);
        shares
            .time
            .push(if tb > 0.0 { ta / tb } else { f64::INFINITY });
    }
    Ok((shares, lanes))
}

/// Per counted window, A's to B's: completed jobs, and worker time (the sum of their
/// transactions' durations, a round counted once).
#[derive(Debug, Default, serde::Serialize)]
struct Shares {
    jobs: Vec<f64>,
    time: Vec<f64>,
}

/// The value of `v` furthest from `to`.
fn furthest(v: &[f64], to: f64) -> Option<f64> {
    v.iter()
        .copied()
        .max_by(|a, b| (a - to).abs().total_cmp(&(b - to).abs()))
}

/// The lanes of `tenants` as the run left them (cost estimate, virtual time), by name.
async fn lanes(ctx: &Ctx, tenants: &[(&str, TenantId)]) -> Result<serde_json::Value> {
    let rows: Vec<(String, Option<f64>, f64)> =
        sqlx::query_as("select tenant, cost, vtime from apalis.tenant_lanes")
            .fetch_all(&ctx.admin)
            .await?;
    let mut out = serde_json::Map::new();
    for (name, t) in tenants {
        if let Some(l) = rows.iter().find(|l| l.0 == t.to_string()) {
            out.insert(
                name.to_string(),
                json!({ "cost_estimate_secs": l.1, "vtime": l.2 }),
            );
        }
    }
    Ok(out.into())
}

struct Unequal {
    slow_share: f64,
    slow_jobs: i64,
    fast_jobs: i64,
    slow_secs: f64,
    fast_secs: f64,
    lanes: serde_json::Value,
}

/// A slow tenant (`UNEQUAL_SLOW_MS` jobs, each alone) and a fast one (`noop`s, in rounds), equal
/// weights, both flooded: the slow tenant's share of the worker time spent in the counted
/// windows (the same windows as the weights case).
async fn unequal_cost(ctx: &Ctx) -> Result<Unequal> {
    let s = &ctx.sizes;
    let slow = ctx.add_tenants(1, "Slow jobs").await?[0];
    let fast = ctx.add_tenants(1, "Fast jobs").await?[0];
    let secs = (s.fair_windows + 1) as f64 * s.fair_window_secs;
    let (ns, nf) = ((300.0 * secs) as usize, (15_000.0 * secs) as usize);
    let mut jobs: Vec<(TenantId, NewJob)> = (0..ns)
        .map(|_| (slow, noop(Some(UNEQUAL_SLOW_MS))))
        .collect();
    jobs.extend((0..nf).map(|_| (fast, noop(None))));
    enqueue(ctx, jobs).await?;
    ctx.settle().await?;
    eprintln!("bench: fairness: unequal cost, {ns} slow and {nf} fast jobs queued ...");
    let t0 = ctx.server_now().await?;
    let (handle, stop) = spawn_worker(ctx, &ctx.settings, "unequal")?;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.cancel();
    handle.await??;
    let per: Vec<(uuid::Uuid, f64, i64)> = sqlx::query_as(
        "with tx as (
             -- A round's jobs share their transaction's start (`now()`); each job's
             -- `finished_at` is its own clock reading, the last one is the round's end.
             select tenant_id, started_at, max(finished_at) as finished_at, count(*) as jobs
             from public.job_runs
             where finished_at >= $1 + make_interval(secs => $2)
               and finished_at < $1 + make_interval(secs => $2 * ($3 + 1))
             group by 1, 2
         )
         select tenant_id, sum(extract(epoch from finished_at - started_at))::float8,
                sum(jobs)::bigint
         from tx group by 1",
    )
    .bind(t0)
    .bind(s.fair_window_secs)
    .bind(s.fair_windows as f64)
    .fetch_all(&ctx.admin)
    .await?;
    let lanes = lanes(ctx, &[("slow", slow), ("fast", fast)]).await?;
    let of = |t: TenantId| {
        per.iter()
            .find(|p| p.0 == t.0)
            .map_or((0.0, 0), |p| (p.1, p.2))
    };
    let ((slow_secs, slow_jobs), (fast_secs, fast_jobs)) = (of(slow), of(fast));
    // One of them getting nothing in the windows is a share of 0 or 1: reported, not a failure.
    ensure!(
        slow_jobs + fast_jobs > 0,
        "unequal cost: no job finished in the counted windows"
    );
    Ok(Unequal {
        slow_share: slow_secs / (slow_secs + fast_secs).max(1e-9),
        slow_jobs,
        fast_jobs,
        slow_secs,
        fast_secs,
        lanes,
    })
}

/// `fair_scale_jobs` runnable rows over `fair_scale_tenants` tenants, inserted set-based (the
/// fetch reads the routing metadata, never the payload); then one fetch after another,
/// alternating orders, timed at the client.
async fn fetch_at_scale(ctx: &Ctx) -> Result<(Vec<f64>, Vec<f64>)> {
    let s = &ctx.sizes;
    let queue = &ctx.settings.worker.queue;
    ctx.add_tenants(s.fair_scale_tenants as usize, "Scale tenant")
        .await?;
    eprintln!(
        "bench: fairness: inserting {} queued jobs of {} tenants ...",
        s.fair_scale_jobs, s.fair_scale_tenants
    );
    sqlx::query(
        "with t as (select id::text as id, (row_number() over (order by id)) - 1 as k
                    from public.tenants)
         insert into apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                                  priority, metadata)
         select '\\x7b7d'::bytea, 'scale' || lpad(g::text, 12, '0'), $1, 'Pending', 0, 5,
                now() - interval '1 hour' + g * interval '1 microsecond', 0,
                hstore(array['tenant_id', t.id, 'kind', 'noop'])
         from generate_series(1, $2) g
         join t on t.k = g % $3",
    )
    .bind(queue)
    .bind(s.fair_scale_jobs)
    .bind(s.fair_scale_tenants)
    .execute(&ctx.admin)
    .await?;
    ctx.settle().await?;
    let worker = format!("bench-scale-{}", short_id());
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen)
         values ($1, $2, 'bench', '', now())",
    )
    .bind(&worker)
    .bind(queue)
    .execute(&ctx.admin)
    .await?;
    let kinds = vec!["noop".to_string()];
    let batch = ctx.settings.worker.batch_size;
    let fair_order = FetchOrder::Fair {
        quantum: Duration::from_millis(ctx.settings.worker.fair_quantum_ms)
            * ctx.settings.worker.concurrency as u32,
    };
    let (mut fair, mut fifo) = (Vec::new(), Vec::new());
    // The first fetches on each pooled connection compile the fetch function and read cold
    // index pages: run, not counted.
    for i in 0..2 * (SCALE_WARMUP + SCALE_FETCHES) {
        let (order, into) = if i % 2 == 0 {
            (fair_order, &mut fair)
        } else {
            (FetchOrder::Oldest, &mut fifo)
        };
        let t = Instant::now();
        let n = fetch_once(&ctx.queue, &worker, queue, batch, &kinds, order).await?;
        if i >= 2 * SCALE_WARMUP {
            into.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ensure!(n > 0, "a fetch at scale claimed nothing");
    }
    Ok((fair, fifo))
}
