//! The import scenario.

use sqlx::Executor as _;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use serde_json::json;

use crate::bench::data::{copy_file, write_import_files};
use crate::bench::harness::Ctx;
use crate::bench::report::*;
use crate::bench::{Outcome, Scenario};

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.import_rows;
    let tenants = ctx.add_tenants(2, "Bench import tenant").await?;
    let (tenant, ceiling_tenant) = (tenants[0], tenants[1]);
    let inbox = ctx.settings.imports.dir.join(tenant.to_string());
    std::fs::create_dir_all(&inbox)?;
    let jsonl = inbox.join("bench.jsonl");
    let copy_text = ctx.work.path().join("baseline-import.copy");
    let ceiling_text = ctx.work.path().join("ceiling-import.copy");
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
    ctx.admin.execute("checkpoint").await?;

    // Baseline: COPY of the same rows into an unconstrained scratch table.
    eprintln!("bench: import: plain COPY into an unconstrained table ...");
    ctx.admin
        .execute("create table public.bench_scratch (like public.records)")
        .await?;
    let base_secs = {
        let mut conn = ctx.admin.acquire().await?;
        let start = Instant::now();
        copy_file(&mut conn, "public.bench_scratch", &copy_text, n).await?;
        start.elapsed().as_secs_f64()
    };
    let _ = std::fs::remove_file(&copy_text);
    ctx.admin.execute("drop table public.bench_scratch").await?;
    ctx.admin.execute("checkpoint").await?;

    // Ours.
    eprintln!("bench: import: our worker (child process) ...");
    let job = ctx
        .enqueue(tenant, "import", json!({ "file": "bench.jsonl" }))
        .await?;
    let child = ctx.run_worker_child().await?;
    let times = ctx
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
    ctx.admin.execute("checkpoint").await?;
    eprintln!("bench: import: ceiling, COPY straight into records as the admin ...");
    let ceiling_secs = {
        let mut tx = ctx.admin.begin().await?;
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
