//! `tenant-worker demo`: the product in one command, on a private throwaway cluster.
//!
//! Starts PostgreSQL in a temporary directory, sets it up, creates two tenants with realistic
//! data, enqueues signed jobs for both (and one tampered job), runs the worker until idle, and
//! prints what ran plus a live isolation proof: the "view without FORCE" gotcha on a scratch
//! copy, and a job of the demo's own that forges `app.tenant_id` and sees nothing of the other
//! tenant (where a policy that trusted the setting would have shown it all). Everything is
//! removed on exit.

use std::time::Instant;

use anyhow::{Context as _, Result};
use secrecy::SecretString;
use sqlx::{AssertSqlSafe, Executor, PgPool};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use tenant_worker::config::{self, Settings};
use tenant_worker::db::{self, DbUrls};
use tenant_worker::embedded::EphemeralCluster;
use tenant_worker::envelope::keys;
use tenant_worker::jobs::declared::Catalog;
use tenant_worker::queue::{self, NewJob};
use tenant_worker::schedule::{Scheduler, store};
use tenant_worker::scope::ContextKey;
use tenant_worker::{
    Enqueuer, JobContext, JobError, KeyId, RunOptions, Scope, ScopedTx, Signer, TenantId,
    TenantJob, Worker, client, jobs, tenant,
};

/// Cities of the sample properties.
const CITIES: &[&str] = &[
    "Springfield",
    "Riverton",
    "Lakeside",
    "Hillcrest",
    "Fairview",
    "Oakdale",
];

/// Runs the demo.
///
/// # Errors
/// Any failure, with context.
pub async fn run(base: &Settings) -> Result<()> {
    let started = Instant::now();
    println!("tenant-worker demo: starting a private PostgreSQL cluster...");
    let cluster = tokio::task::spawn_blocking(EphemeralCluster::start)
        .await
        .context("cluster start panicked")?
        .context("could not start a throwaway PostgreSQL")?;
    let result = demo(base, &cluster, started).await;
    println!("removing the throwaway cluster");
    drop(cluster);
    result
}

async fn demo(base: &Settings, cluster: &EphemeralCluster, started: Instant) -> Result<()> {
    let url = config::with_database(&cluster.admin_url(), "tenant_worker_demo");
    let mut settings = base.clone();
    settings.database.admin_url = Some(SecretString::from(url.clone()));
    settings.database.app_url = None;
    settings.database.queue_url = None;
    settings.worker.poll_interval_ms = 100;
    let keys = tempfile::tempdir().context("temporary key directory")?;
    let (kid, private, public) = keys::generate_key_pair(keys.path(), Some(KeyId::parse("demo")?))?;
    settings.keys.signing_key_file = Some(private.clone());
    settings.keys.signing_key_id = Some(kid.to_string());
    settings.keys.verifying.clear();
    settings.keys.verifying.insert(kid.to_string(), public);
    let urls = DbUrls::derive(&settings, &url, false);

    db::setup(&settings, &urls).await.context("setup failed")?;
    println!(
        "set up roles ({}, {}, {}, {}), forced RLS and the job queue",
        settings.roles.owner, settings.roles.app, settings.roles.queue, settings.roles.scheduler
    );

    let admin = db::admin_pool(&settings, &urls).await?;
    let app = Scope::new(
        db::app_pool(&settings, &urls).await?,
        db::context_key(&settings, &urls).await?,
    );
    let queue_pool = db::queue_pool(&settings, &urls).await?;
    let owner = &settings.roles.owner;
    let northwind = tenant::add(&admin, owner, "Northwind Properties").await?.id;
    let helios = tenant::add(&admin, owner, "Helios Solar").await?.id;
    let n_north = seed(&app, northwind, 900, 250, 1100).await?;
    let n_helios = seed(&app, helios, 400, 120, 600).await?;
    println!(
        "created Northwind Properties ({n_north} records) and Helios Solar ({n_helios} records)"
    );

    // Signed jobs for each tenant, plus one whose stored tenant id is tampered with.
    let (jobs_dir, required) = settings.jobs.source();
    let catalog = Arc::new(Catalog::load(jobs_dir, required).context("loading declared jobs")?);
    let mut kinds = jobs::builtins(&settings, catalog.clone());
    kinds.register(Trespass)?;
    let kinds = Arc::new(kinds);
    let signer = Signer::from_file(kid, &private)?;
    let enqueuer = Enqueuer::new(queue_pool.clone(), signer, &settings, kinds.clone());
    let mut jobs = Vec::new();
    let mut sources = vec![("v_property", "csv"), ("v_invoice", "jsonl")];
    if catalog.get("properties_by_city").is_some() {
        sources.push(("properties_by_city", "csv"));
    }
    for (name, t) in [
        ("Northwind Properties", northwind),
        ("Helios Solar", helios),
    ] {
        let id = enqueuer
            .enqueue_job(t, NewJob::new("noop", serde_json::json!({ "count": true })))
            .await?
            .id;
        jobs.push((name, t, id));
        for (source, format) in &sources {
            let args = serde_json::json!({ "source": source, "format": format });
            let id = enqueuer
                .enqueue_job(t, NewJob::new("export", args))
                .await?
                .id;
            jobs.push((name, t, id));
        }
    }
    // A job of the demo's own, written as an attacker would: Northwind's job forges Helios.
    let trespass = enqueuer
        .enqueue::<Trespass>(northwind, &TrespassArgs { other: helios })
        .await?
        .id;
    jobs.push(("Northwind Properties", northwind, trespass));
    // A schedule that fires every second, for Northwind: the scheduler turns its due fire
    // into one signed job.
    let sched_pool = db::scheduler_pool(&settings, &urls).await?;
    store::add(
        &app,
        &kinds,
        northwind,
        "* * * * * *",
        "UTC",
        "export",
        &serde_json::json!({ "source": "v_customer", "format": "csv", "gzip": true }),
    )
    .await?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let scheduler = Scheduler::new(sched_pool.clone(), enqueuer.clone());
    for id in scheduler.tick(chrono::Utc::now()).await? {
        jobs.push(("Northwind (scheduled)", northwind, id));
    }
    let victim = enqueuer
        .enqueue_job(
            helios,
            NewJob::new("noop", serde_json::json!({ "count": true })),
        )
        .await?
        .id;
    sqlx::query(
        "update apalis.jobs set job = convert_to(replace(convert_from(job, 'UTF8'), $1, $2), 'UTF8') where id = $3",
    )
    .bind(helios.to_string())
    .bind(northwind.to_string())
    .bind(victim.to_ulid().to_string())
    .execute(&admin)
    .await?;
    println!(
        "enqueued {} signed jobs ({} of them by a schedule that fires every second) and 1 job \
         whose tenant id was edited after signing",
        jobs.len(),
        jobs.iter()
            .filter(|(name, _, _)| name.ends_with("(scheduled)"))
            .count()
    );

    let keyring = client::keyring(&settings, None)?;
    let worker = Worker::builder(app.clone(), queue_pool.clone(), keyring, &settings)
        .registry(&kinds)
        .build()?;
    let summary = worker
        .run(
            RunOptions {
                until_idle: true,
                name: Some("demo".into()),
            },
            CancellationToken::new(),
        )
        .await?;
    println!(
        "worker ran until idle: {} done, {} rejected",
        summary.done, summary.rejected
    );
    println!();
    for (name, _tenant, id) in &jobs {
        let info = queue::show(&queue_pool, &id.to_string()).await?;
        let result = info.result();
        let what = match (info.kind.as_deref(), result) {
            (Some("noop"), Some(r)) => format!(
                "saw {} records",
                r.get("records_visible")
                    .and_then(|v| v.as_i64())
                    .unwrap_or(-1)
            ),
            (Some("export"), Some(r)) => format!(
                "{:>5} rows -> {}",
                r.get("rows").and_then(|v| v.as_u64()).unwrap_or(0),
                r.get("path").and_then(|v| v.as_str()).unwrap_or("?")
            ),
            (Some(Trespass::KIND), Some(r)) => format!(
                "set app.tenant_id to Helios's id, then saw {} records",
                r.get("records_seen_as_other")
                    .and_then(|v| v.as_i64())
                    .unwrap_or(-1)
            ),
            _ => info.error().unwrap_or_default(),
        };
        println!(
            "  {name:<22} {:<13} {:<8} {what}",
            info.kind.as_deref().unwrap_or("?"),
            info.state
        );
    }
    let info = queue::show(&queue_pool, &victim.to_string()).await?;
    println!(
        "  {:<22} {:<13} {:<8} {}",
        "(tampered job)",
        info.kind.as_deref().unwrap_or("?"),
        info.state,
        info.error().unwrap_or_default()
    );

    println!();
    println!(
        "isolation proof, live, as the app role `{}`:",
        settings.roles.app
    );
    let a = visible_as(&app, Some(northwind)).await?;
    let b = visible_as(&app, Some(helios)).await?;
    let none = visible_as(&app, None).await?;
    println!("  Northwind context sees {a} records (it has {n_north})");
    println!("  Helios context sees    {b} records (it has {n_helios})");
    println!("  no tenant context sees {none} records");
    let (leaky, forced) = force_gotcha(&admin, owner, &app.key(), northwind).await?;
    println!("the gotcha, on a scratch copy of the table WITHOUT `force row level security`:");
    println!(
        "  the owner's view over the copy, in Northwind's context, shows {leaky} rows (both tenants!)"
    );
    println!("  the real view (FORCE on) in the same session shows {forced} rows");
    let (trusting, verified) = forged_setting(&admin, owner, &settings.roles.app, helios).await?;
    println!(
        "a forged `app.tenant_id` (Helios's id, set by SQL as the app role, no sealed context):"
    );
    println!(
        "  a policy that trusts the setting (a scratch copy of the table) shows {trusting} rows"
    );
    println!("  the real policy, which verifies the sealed context, shows {verified} rows");
    let trespass_saw = queue::show(&queue_pool, &trespass.to_string())
        .await?
        .result()
        .and_then(|r| r.get("records_seen_as_other").and_then(|v| v.as_i64()));
    let ok = a == n_north
        && b == n_helios
        && none == 0
        && leaky == n_north + n_helios
        && trusting == n_helios
        && verified == 0
        && trespass_saw == Some(0)
        && summary.rejected == 1;
    println!();
    println!(
        "{} in {:.1}s",
        if ok {
            "demo passed"
        } else {
            "DEMO FOUND A PROBLEM"
        },
        started.elapsed().as_secs_f64()
    );
    admin.close().await;
    sched_pool.close().await;
    app.pool().close().await;
    queue_pool.close().await;
    anyhow::ensure!(ok, "isolation proof failed");
    Ok(())
}

/// A job kind of the demo's own, written as an attacker would: it points `app.tenant_id` at
/// another tenant, counts the records it can see, and points it back before it returns (so a
/// commit-time check of the setting alone would not notice). The sealed context makes the
/// count 0.
struct Trespass;

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TrespassArgs {
    /// The tenant it tries to reach.
    other: TenantId,
}

#[derive(serde::Serialize)]
struct TrespassOutput {
    records_seen_as_other: i64,
}

impl TenantJob for Trespass {
    const KIND: &'static str = "demo_trespass";
    type Args = TrespassArgs;
    type Output = TrespassOutput;

    async fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        args: TrespassArgs,
    ) -> Result<TrespassOutput, JobError> {
        let conn = tx.conn().await?;
        sqlx::query("select set_config('app.tenant_id', $1, true)")
            .bind(args.other.to_string())
            .execute(&mut *conn)
            .await?;
        let records_seen_as_other: i64 = sqlx::query_scalar("select count(*) from records")
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query("select set_config('app.tenant_id', $1, true)")
            .bind(ctx.tenant_id().to_string())
            .execute(&mut *conn)
            .await?;
        Ok(TrespassOutput {
            records_seen_as_other,
        })
    }
}

/// What a forged `app.tenant_id` shows as the app role: through a scratch copy of `records`
/// under the policy that trusts the setting (round 1's), and through the real table.
async fn forged_setting(admin: &PgPool, owner: &str, app: &str, t: TenantId) -> Result<(i64, i64)> {
    let mut tx = admin.begin().await?;
    tx.execute(AssertSqlSafe(format!(
        r#"create temp table records_trusting (like public.records including defaults);
           insert into records_trusting select * from public.records;
           alter table records_trusting owner to "{owner}";
           alter table records_trusting enable row level security;
           alter table records_trusting force row level security;
           create policy tenant_isolation on records_trusting
               using (tenant_id = public.current_tenant_id());
           grant select on records_trusting to "{app}";
           set local role "{app}";"#
    )))
    .await?;
    sqlx::query("select set_config('app.tenant_id', $1, true)")
        .bind(t.to_string())
        .execute(&mut *tx)
        .await?;
    let trusting: i64 = sqlx::query_scalar("select count(*) from records_trusting")
        .fetch_one(&mut *tx)
        .await?;
    let verified: i64 = sqlx::query_scalar("select count(*) from public.records")
        .fetch_one(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok((trusting, verified))
}

/// Realistic sample data, written through the scoped transaction as the app role.
async fn seed(
    app: &Scope,
    t: TenantId,
    properties: i64,
    customers: i64,
    invoices: i64,
) -> Result<i64> {
    let mut tx = app.begin(t).await?;
    let cities: Vec<String> = CITIES.iter().map(|c| c.to_string()).collect();
    sqlx::query(
        r#"insert into records (tenant_id, kind, data)
           select $1, 'property', jsonb_build_object(
               'name', initcap(($2::text[])[1 + i % array_length($2::text[], 1)]) || ' Court ' || i,
               'address', (10 + i * 7 % 990) || ' ' || (array['Elm', 'Maple', 'Cedar', 'Birch'])[1 + i % 4] || ' Street',
               'city', ($2::text[])[1 + (i * 13) % array_length($2::text[], 1)],
               'units', 4 + (i * 17) % 60)
           from generate_series(1, $3) as i"#,
    )
    .bind(t)
    .bind(&cities)
    .bind(properties)
    .execute(tx.conn().await?)
    .await?;
    sqlx::query(
        r#"insert into records (tenant_id, kind, data)
           select $1, 'customer', jsonb_build_object(
               'name', 'Customer ' || i,
               'email', 'customer' || i || '@example.test')
           from generate_series(1, $2) as i"#,
    )
    .bind(t)
    .bind(customers)
    .execute(tx.conn().await?)
    .await?;
    sqlx::query(
        r#"with c as (select id, row_number() over (order by id) as n from records where kind = 'customer'),
                cnt as (select count(*) as k from c)
           insert into records (tenant_id, kind, data)
           select $1, 'invoice', jsonb_build_object(
               'customer_id', c.id,
               'number', 'INV-' || lpad(i::text, 6, '0'),
               'amount', round((50 + (i * 37) % 4950)::numeric + 0.99, 2),
               'currency', (array['EUR', 'USD', 'GBP'])[1 + i % 3],
               'status', (array['paid', 'open', 'overdue'])[1 + i % 3],
               'issued_on', to_char(date '2026-01-01' + (i % 300)::int, 'YYYY-MM-DD'),
               'due_on', to_char(date '2026-01-31' + (i % 300)::int, 'YYYY-MM-DD'))
           from generate_series(1, $2) as i
           join c on c.n = 1 + i % (select k from cnt)"#,
    )
    .bind(t)
    .bind(invoices)
    .execute(tx.conn().await?)
    .await?;
    let n: i64 = sqlx::query_scalar("select count(*) from records")
        .fetch_one(tx.conn().await?)
        .await?;
    tx.commit().await?;
    Ok(n)
}

async fn visible_as(app: &Scope, t: Option<TenantId>) -> Result<i64> {
    Ok(match t {
        Some(t) => {
            let mut tx = app.begin(t).await?;
            let n = sqlx::query_scalar("select count(*) from records")
                .fetch_one(tx.conn().await?)
                .await?;
            tx.rollback().await?;
            n
        }
        None => {
            sqlx::query_scalar("select count(*) from records")
                .fetch_one(app.pool())
                .await?
        }
    })
}

/// Builds a scratch copy of `records` with RLS enabled but not forced, and a view over it
/// owned by the owner role; reads both views as the owner in one tenant's context.
async fn force_gotcha(
    admin: &PgPool,
    owner: &str,
    key: &ContextKey,
    t: TenantId,
) -> Result<(i64, i64)> {
    let mut tx = admin.begin().await?;
    tx.execute(AssertSqlSafe(format!(
        r#"create temp table records_without_force (like public.records including defaults);
           insert into records_without_force select * from public.records;
           alter table records_without_force owner to "{owner}";
           alter table records_without_force enable row level security;
           create policy tenant_isolation on records_without_force
               using (tenant_id = public.current_tenant_id());
           create temp view v_records_without_force as select * from records_without_force;
           alter view v_records_without_force owner to "{owner}";
           set local role "{owner}";"#
    )))
    .await?;
    // The tenant's context, sealed for this transaction like the worker's.
    key.enter(&mut tx, t, chrono::Utc::now().timestamp() + 60)
        .await?;
    let leaky: i64 = sqlx::query_scalar("select count(*) from v_records_without_force")
        .fetch_one(&mut *tx)
        .await?;
    let forced: i64 = sqlx::query_scalar("select count(*) from public.records")
        .fetch_one(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok((leaky, forced))
}
