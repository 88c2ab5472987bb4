//! The export scenario.

use std::path::Path;

use anyhow::{Context as _, Result, bail, ensure};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret as _;
use serde_json::json;
use tenant_worker::TenantId;

use crate::bench::data::Mix;
use crate::bench::harness::Ctx;
use crate::bench::measure::ChildRun;
use crate::bench::measure::*;
use crate::bench::report::*;
use crate::bench::{Outcome, Scenario};

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let n = ctx.sizes.export_rows;
    let tenant = ctx.add_tenants(1, "Bench export tenant").await?[0];
    eprintln!("bench: export: generating {n} property rows ...");
    ctx.generate(
        tenant,
        Mix {
            properties: n,
            customers: 0,
            invoices: 0,
        },
    )
    .await?;
    ctx.settle().await?;
    // Warm the cache for both sides alike.
    let mut tx = ctx.app.begin(tenant).await?;
    let visible: i64 = sqlx::query_scalar("select count(*) from public.v_property")
        .fetch_one(tx.conn().await?)
        .await?;
    tx.rollback().await?;
    ensure!(visible == n, "the tenant sees {visible} of {n} rows");

    // Baseline: psql's \copy as the app role in the tenant's context.
    eprintln!("bench: export: psql \\copy ...");
    let file = ctx.work.path().join("baseline-export.csv");
    let psql = psql_copy(ctx, tenant, &file).await?;
    ensure!(
        psql.rows == n,
        "psql copied {} rows, expected {n}",
        psql.rows
    );
    let (baseline_bytes, baseline_sha) = tenant_worker::jobs::export::hash_file(&file)?;
    let _ = std::fs::remove_file(&file);

    // Ours: the real binary as a child process.
    eprintln!("bench: export: our worker (child process) ...");
    let job = ctx
        .enqueue(
            tenant,
            "export",
            json!({ "source": "v_property", "format": "csv" }),
        )
        .await?;
    let child = ctx.run_worker_child().await?;
    let times = ctx
        .job_times(job)
        .await
        .with_context(|| format!("worker output:\n{}", child.output))?;
    let finished_at: DateTime<Utc> = serde_json::from_value(times.result["finished_at"].clone())
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

/// A function, for the baseline's psql only, that seals a tenant context for the transaction
/// it runs in, as the worker does: psql cannot compute the HMAC itself. Owned by the owner
/// (it reads the key) and executable by the app role, in the benchmark's throwaway database
/// only, and dropped when the scenario ends.
const BENCH_SEAL: &str = r#"
    create or replace function public.bench_seal(p_tenant uuid) returns text
        language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
    declare
        k record;
        t text;
    begin
        select c.id, c.key into k from public.tenant_context_keys c
         where c.valid_until is null order by c.id desc limit 1;
        t := 'v1.' || k.id || '.' || p_tenant::text || '.'
             || (extract(epoch from now())::bigint + 3600) || '.'
             || public.tenant_context_binding();
        return t || '.' || encode(public.hmac(convert_to(t, 'UTF8'), k.key, 'sha256'), 'hex');
    end $$;
    revoke all on function public.bench_seal(uuid) from public"#;

/// psql's `\copy` of `v_property` for `tenant` as the app role, in a sealed context.
async fn psql_copy(ctx: &Ctx, tenant: TenantId, file: &Path) -> Result<PsqlRun> {
    let roles = &ctx.settings.roles;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"{BENCH_SEAL};
           alter function public.bench_seal(uuid) owner to "{}";
           grant execute on function public.bench_seal(uuid) to "{}""#,
        roles.owner, roles.app
    )))
    .execute(&ctx.admin)
    .await?;
    let run = psql_copy_sealed(ctx, tenant, file).await;
    sqlx::raw_sql("drop function public.bench_seal(uuid)")
        .execute(&ctx.admin)
        .await?;
    run
}

async fn psql_copy_sealed(ctx: &Ctx, tenant: TenantId, file: &Path) -> Result<PsqlRun> {
    let psql = find_psql().context(
        "psql not found (on PATH or next to the PostgreSQL server binaries): \
         the export baseline needs it",
    )?;
    let mut url =
        url::Url::parse(ctx.urls.app.expose_secret()).context("the app role URL is not a URL")?;
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
            "select set_config('app.tenant_id', '{t}', true), \
                    set_config('app.tenant_ctx', public.bench_seal('{t}'), true)",
            t = tenant.0.hyphenated()
        ))
        .arg("-c")
        .arg(format!(
            "\\copy (select * from public.v_property) to '{path}' with (format csv, header true)"
        ))
        .args(["-c", "commit"])
        .current_dir(ctx.work.path());
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
    let log = ctx.work.path().join("psql.log");
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

struct PsqlRun {
    rows: i64,
    copy_secs: f64,
    wall_secs: f64,
    run: Option<ChildRun>,
}
