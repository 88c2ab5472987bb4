//! The context scenario.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde_json::json;
use sqlx::{AssertSqlSafe, Executor as _, PgConnection};
use tenant_worker::{Scope, TenantId};
use tokio::task::JoinSet;

use crate::bench::data::Mix;
use crate::bench::harness::Ctx;
use crate::bench::report::*;
use crate::bench::{CONTEXT_WARMUP, Outcome, Scenario};

/// The tenant's query on our table (verified context) ...
const OURS_QUERY: &str = "select count(*), sum((data ->> 'units')::int)
     from public.records where kind = 'property'";
/// ... and on the baseline's copy of it (trusting policy).
const TRUSTING_QUERY: &str = "select count(*), sum((data ->> 'units')::int)
     from public.bench_trusting where kind = 'property'";

/// The columns of `records` that are not generated.
const COLUMNS: &str = "tenant_id, id, kind, data, external_id, created_at, updated_at";

pub(crate) async fn run(ctx: &Ctx) -> Result<Outcome> {
    let sz = ctx.sizes;
    let tenant = ctx.add_tenants(1, "Bench context tenant").await?[0];
    ctx.generate(
        tenant,
        Mix {
            properties: sz.context_tenant_rows,
            customers: 0,
            invoices: 0,
        },
    )
    .await?;
    let others = ctx.add_tenants(10, "Bench neighbour").await?;
    for (i, t) in others.iter().enumerate() {
        let share = split(sz.context_other_rows, others.len(), i);
        ctx.generate(*t, Mix::mixed(share)).await?;
    }
    ctx.settle().await?;
    let table_rows = ctx.record_count().await?;
    eprintln!("bench: context: baseline table bench_trusting ({table_rows} rows) ...");
    let outcome = match trusting_table(ctx).await {
        Ok(()) => measure(ctx, tenant, table_rows).await,
        Err(e) => Err(e),
    };
    ctx.admin
        .execute("drop table if exists public.bench_trusting")
        .await?;
    outcome
}

/// `bench_trusting`: a copy of `records` with its indexes, owned by the owner role, under
/// forced RLS with the policies `records` had before the verified context.
async fn trusting_table(ctx: &Ctx) -> Result<()> {
    let roles = &ctx.settings.roles;
    let (owner, app) = (&roles.owner, &roles.app);
    ctx.admin
        .execute(AssertSqlSafe(format!(
            r#"drop table if exists public.bench_trusting;
               create table public.bench_trusting (like public.records including all);
               insert into public.bench_trusting ({COLUMNS})
                   select {COLUMNS} from public.records;
               alter table public.bench_trusting owner to "{owner}";
               alter table public.bench_trusting enable row level security;
               alter table public.bench_trusting force row level security;
               create policy tenant_isolation on public.bench_trusting
                   as restrictive for all to public
                   using (tenant_id = public.current_tenant_id());
               create policy tenant_access on public.bench_trusting
                   as permissive for all to public
                   using (tenant_id = public.current_tenant_id());
               grant select on public.bench_trusting to "{app}";"#
        )))
        .await?;
    ctx.admin
        .execute("vacuum (analyze) public.bench_trusting")
        .await?;
    ctx.admin.execute("checkpoint").await?;
    Ok(())
}

async fn measure(ctx: &Ctx, tenant: TenantId, table_rows: i64) -> Result<Outcome> {
    let sz = ctx.sizes;
    let n = sz.context_tenant_rows;
    // Both sides see the tenant's rows, and the same ones (this also warms the cache).
    let ours_sum = {
        let mut tx = ctx.app.begin(tenant).await?;
        let sum = tenant_query(tx.conn().await?, Side::Ours, n).await?;
        tx.rollback().await?;
        sum
    };
    let trusting_sum = {
        let mut tx = trusting_begin(ctx.app.pool(), tenant).await?;
        let sum = tenant_query(&mut tx, Side::Trusting, n).await?;
        tx.rollback().await?;
        sum
    };
    ensure!(
        ours_sum == trusting_sum,
        "the tenant's units add up to {ours_sum:?} in records but {trusting_sum:?} in \
         bench_trusting"
    );

    let ours_plan = explain(ctx, tenant, Side::Ours).await?;
    let trusting_plan = explain(ctx, tenant, Side::Trusting).await?;
    if !ours_plan.index_scan {
        eprintln!(
            "bench: context: WARNING: our {n}-row query is not an index scan on records \
             (the trusting baseline's {}); see the plans in the JSON",
            if trusting_plan.index_scan {
                "is"
            } else {
                "is not either"
            }
        );
    }

    let k = ctx.settings.worker.concurrency.max(1);
    let secs = Duration::from_secs(sz.context_secs);
    eprintln!(
        "bench: context: minimal scoped transactions, {k} tasks, {}s per run ...",
        sz.context_secs
    );
    let minimal = compare(ctx, tenant, Work::Minimal, k, secs).await?;
    eprintln!("bench: context: {}-row scoped queries ...", thousands(n));
    let query = compare(ctx, tenant, Work::Query, k, secs).await?;

    let mut min_row = Row::new(Scenario::Context, "minimal scoped transaction", "tx/s");
    min_row.ours = Some(minimal.ours);
    min_row.baseline = Some(minimal.trusting);
    min_row.baseline_is = "set_config only, trusting policy".into();
    min_row.ratio = Some(minimal.ours / minimal.trusting);
    min_row.target = "≤ 10% slower".into();
    min_row.met = Some(minimal.ours / minimal.trusting >= 0.9);
    let mut q_row = Row::new(
        Scenario::Context,
        &format!("{}-row scoped query", thousands(n)),
        "tx/s",
    );
    q_row.ours = Some(query.ours);
    q_row.baseline = Some(query.trusting);
    q_row.baseline_is = "the same query on bench_trusting, set_config only".into();
    q_row.ratio = Some(query.ours / query.trusting);
    q_row.target = "≤ 10% slower".into();
    q_row.met = Some(query.ours / query.trusting >= 0.9);
    Ok(Outcome {
        rows: vec![min_row, q_row],
        details: json!({
            "tenant_rows": n,
            "table_rows": table_rows,
            "concurrent_tasks": k,
            "secs_per_run": sz.context_secs,
            "warmup_secs_not_counted": CONTEXT_WARMUP.as_secs_f64(),
            "order": ["ours", "trusting", "trusting", "ours"],
            "query": OURS_QUERY,
            "baseline_query": TRUSTING_QUERY,
            "minimal_transaction": minimal.details,
            "scoped_query": query.details,
            "ours": {
                "measure": "Scope::begin (BEGIN and the transaction binding, then the sealed context), the statement, commit (the context check and COMMIT in one message)",
                "index_scan": ours_plan.index_scan,
                "query_execution_ms": ours_plan.execution_ms,
                "explain_analyze": ours_plan.lines,
            },
            "baseline_trusting": {
                "measure": "BEGIN, select set_config('app.tenant_id', $1, true), the statement, COMMIT; on the app pool",
                "index_scan": trusting_plan.index_scan,
                "query_execution_ms": trusting_plan.execution_ms,
                "explain_analyze": trusting_plan.lines,
            },
        }),
    })
}

/// Which table and tenant context a transaction uses.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// `records` in a transaction of [`Scope::begin`] (the verified context).
    Ours,
    /// `bench_trusting` in a plain transaction that only sets `app.tenant_id`.
    Trusting,
}

impl Side {
    fn query(self) -> &'static str {
        match self {
            Side::Ours => OURS_QUERY,
            Side::Trusting => TRUSTING_QUERY,
        }
    }

    fn table(self) -> &'static str {
        match self {
            Side::Ours => "records",
            Side::Trusting => "bench_trusting",
        }
    }
}

/// What one transaction does between its start and its commit.
#[derive(Debug, Clone, Copy)]
enum Work {
    /// `select 1`.
    Minimal,
    /// The tenant's query.
    Query,
}

/// The baseline's transaction: the tenant's id in one statement, nothing else.
async fn trusting_begin(
    pool: &sqlx::PgPool,
    tenant: TenantId,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("select set_config('app.tenant_id', $1, true)")
        .bind(tenant.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The tenant's query; checks it saw the tenant's `expected` rows and returns their units.
async fn tenant_query(conn: &mut PgConnection, side: Side, expected: i64) -> Result<Option<i64>> {
    let (count, sum): (i64, Option<i64>) = sqlx::query_as(side.query()).fetch_one(conn).await?;
    ensure!(
        count == expected,
        "the tenant sees {count} of its {expected} properties in {}",
        side.table()
    );
    Ok(sum)
}

async fn work(conn: &mut PgConnection, side: Side, work: Work, expected: i64) -> Result<()> {
    match work {
        Work::Minimal => {
            let one: i32 = sqlx::query_scalar("select 1").fetch_one(conn).await?;
            ensure!(one == 1, "select 1 returned {one}");
        }
        Work::Query => {
            tenant_query(conn, side, expected).await?;
        }
    }
    Ok(())
}

/// One whole transaction of `side`.
async fn transaction(
    app: &Scope,
    tenant: TenantId,
    side: Side,
    what: Work,
    expected: i64,
) -> Result<()> {
    match side {
        Side::Ours => {
            let mut tx = app.begin(tenant).await?;
            work(tx.conn().await?, side, what, expected).await?;
            tx.commit().await?;
        }
        Side::Trusting => {
            let mut tx = trusting_begin(app.pool(), tenant).await?;
            work(&mut tx, side, what, expected).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Transactions per second of `side` with `k` concurrent tasks: those that end within
/// `secs` after the warm-up.
async fn rate(
    ctx: &Ctx,
    tenant: TenantId,
    side: Side,
    what: Work,
    k: usize,
    secs: Duration,
) -> Result<(u64, f64)> {
    let from = Instant::now() + CONTEXT_WARMUP;
    let until = from + secs;
    let expected = ctx.sizes.context_tenant_rows;
    let mut tasks = JoinSet::new();
    for _ in 0..k {
        let app = ctx.app.clone();
        tasks.spawn(async move {
            let mut done = 0u64;
            loop {
                transaction(&app, tenant, side, what, expected).await?;
                let now = Instant::now();
                if now >= until {
                    break;
                }
                if now >= from {
                    done += 1;
                }
            }
            Ok::<u64, anyhow::Error>(done)
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done??;
    }
    Ok((total, total as f64 / secs.as_secs_f64()))
}

/// Both sides' rates, each the total over two runs in the order ours, baseline, baseline,
/// ours.
async fn compare(
    ctx: &Ctx,
    tenant: TenantId,
    what: Work,
    k: usize,
    secs: Duration,
) -> Result<Comparison> {
    let mut runs = Vec::new();
    let (mut ours, mut trusting) = (0u64, 0u64);
    for side in [Side::Ours, Side::Trusting, Side::Trusting, Side::Ours] {
        let (n, per_sec) = rate(ctx, tenant, side, what, k, secs).await?;
        match side {
            Side::Ours => ours += n,
            Side::Trusting => trusting += n,
        }
        runs.push(json!({
            "side": format!("{side:?}").to_lowercase(),
            "transactions": n,
            "tx_per_sec": per_sec,
        }));
    }
    let window = 2.0 * secs.as_secs_f64();
    let (ours, trusting) = (ours as f64 / window, trusting as f64 / window);
    Ok(Comparison {
        ours,
        trusting,
        details: json!({
            "ours_tx_per_sec": ours,
            "baseline_tx_per_sec": trusting,
            "ratio": ours / trusting,
            "runs": runs,
        }),
    })
}

struct Comparison {
    ours: f64,
    trusting: f64,
    details: serde_json::Value,
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the tenant's query as the app role, in `side`'s context.
async fn explain(ctx: &Ctx, tenant: TenantId, side: Side) -> Result<Plan> {
    let sql = AssertSqlSafe(format!(
        "explain (analyze, buffers, format text) {}",
        side.query()
    ));
    let lines: Vec<String> = match side {
        Side::Ours => {
            let mut tx = ctx.app.begin(tenant).await?;
            let lines = sqlx::query_scalar(sql).fetch_all(tx.conn().await?).await?;
            tx.rollback().await?;
            lines
        }
        Side::Trusting => {
            let mut tx = trusting_begin(ctx.app.pool(), tenant).await?;
            let lines = sqlx::query_scalar(sql).fetch_all(&mut *tx).await?;
            tx.rollback().await?;
            lines
        }
    };
    let execution_ms = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("Execution Time:"))
        .and_then(|v| v.trim().trim_end_matches("ms").trim().parse::<f64>().ok());
    let index_scan = lines.iter().any(|l| {
        (l.contains("Index Scan") || l.contains("Index Only Scan")) && l.contains(side.table())
    });
    Ok(Plan {
        lines,
        execution_ms,
        index_scan,
    })
}

struct Plan {
    lines: Vec<String>,
    execution_ms: Option<f64>,
    index_scan: bool,
}
