//! The scale scenario.

use anyhow::{Context as _, Result, ensure};
use chrono::{DateTime, Utc};
use serde_json::json;
use tenant_worker::TenantId;

use crate::bench::data::Mix;
use crate::bench::harness::Ctx;
use crate::bench::report::*;
use crate::bench::{Outcome, Scenario};

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let sz = ctx.sizes;
    let tenant = ctx.add_tenants(1, "Bench small tenant").await?[0];
    ctx.generate(
        tenant,
        Mix {
            properties: sz.scale_tenant_rows,
            customers: 0,
            invoices: 0,
        },
    )
    .await?;
    let others_small = ctx.add_tenants(9, "Bench neighbour").await?;
    let rest = sz.scale_small_table - sz.scale_tenant_rows;
    for (i, t) in others_small.iter().enumerate() {
        let share = split(rest, others_small.len(), i);
        ctx.generate(*t, Mix::mixed(share)).await?;
    }
    ctx.settle().await?;
    let small_total = ctx.record_count().await?;
    eprintln!("bench: scale: exports with {small_total} rows in the table ...");
    let small = scale_phase(ctx, tenant).await?;

    let big_tenants = if sz.scale_large_table >= 1_000_000 {
        50
    } else {
        10
    };
    let others_big = ctx.add_tenants(big_tenants, "Bench big neighbour").await?;
    let extra = sz.scale_large_table - small_total;
    eprintln!("bench: scale: generating {extra} more rows for {big_tenants} other tenants ...");
    for (i, t) in others_big.iter().enumerate() {
        let share = split(extra, others_big.len(), i);
        ctx.generate(*t, Mix::mixed(share)).await?;
    }
    ctx.settle().await?;
    let large_total = ctx.record_count().await?;
    eprintln!("bench: scale: exports with {large_total} rows in the table ...");
    let large = scale_phase(ctx, tenant).await?;

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

async fn scale_phase(ctx: &Ctx, tenant: TenantId) -> Result<ScalePhase> {
    let mut tx = ctx.app.begin(tenant).await?;
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
    for _ in 0..ctx.sizes.scale_runs {
        let job = ctx
            .enqueue(
                tenant,
                "export",
                json!({ "source": "v_property", "format": "csv" }),
            )
            .await?;
        ctx.run_in_process("scale").await?;
        let t = ctx.job_times(job).await?;
        let finished_at: DateTime<Utc> = serde_json::from_value(t.result["finished_at"].clone())
            .context("the export result has no finished_at")?;
        ensure!(
            t.result["rows"].as_i64() == Some(ctx.sizes.scale_tenant_rows),
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

struct ScalePhase {
    median_ms: f64,
    query_ms: Option<f64>,
    details: serde_json::Value,
}
