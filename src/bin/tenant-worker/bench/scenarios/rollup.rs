//! The rollup scenario.

use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use serde_json::json;
use sqlx::AssertSqlSafe;
use tenant_worker::TenantId;

use crate::bench::data::Mix;
use crate::bench::harness::Ctx;
use crate::bench::report::*;
use crate::bench::{Outcome, Scenario};

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.rollup_rows;
    let tenant = ctx.add_tenants(1, "Bench rollup tenant").await?[0];
    let mix = Mix {
        properties: n * 4 / 10,
        customers: n / 10,
        invoices: n - n * 4 / 10 - n / 10,
    };
    eprintln!("bench: rollup: generating {n} rows ...");
    ctx.generate(tenant, mix).await?;
    ctx.settle().await?;

    // Baseline: the same aggregations as one statement, app role, tenant context.
    let mut tx = ctx.app.begin(tenant).await?;
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
    let full = rollup_job(ctx, tenant, true).await?;
    let full_consistent = rollups_match(ctx, tenant).await?;

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
    .execute(&ctx.admin)
    .await?
    .rows_affected();
    eprintln!("bench: rollup: incremental run after {updated} newest rows changed ...");
    let newest = rollup_job(ctx, tenant, false).await?;
    let newest_consistent = rollups_match(ctx, tenant).await?;

    // 1% random rows change (worst case for incremental), then incremental.
    let random_updated = sqlx::query(
        r#"update public.records r
           set data = r.data || jsonb_build_object('rev', 2)
           where r.tenant_id = $1 and abs(hashtext(r.id::text)) % 100 = 7"#,
    )
    .bind(tenant)
    .execute(&ctx.admin)
    .await?
    .rows_affected();
    eprintln!("bench: rollup: incremental run after {random_updated} random rows changed ...");
    let random = rollup_job(ctx, tenant, false).await?;
    let random_consistent = rollups_match(ctx, tenant).await?;
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

async fn rollup_job(ctx: &Ctx, tenant: TenantId, full: bool) -> Result<RollupRun> {
    let job = ctx
        .enqueue(tenant, "rollup", json!({ "full": full }))
        .await?;
    let summary = ctx.run_in_process("rollup").await?;
    let times = ctx
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
async fn rollups_match(ctx: &Ctx, tenant: TenantId) -> Result<bool> {
    let mut tx = ctx.app.begin(tenant).await?;
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
