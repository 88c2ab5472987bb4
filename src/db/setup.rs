//! `tenant-worker setup` and `migrate`: the database, the roles, both migrators, the queue
//! schema's tuning, and the grants and role policies each role needs.

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};

use super::{DbUrls, Error, MIGRATOR, Result, admin_pool, connect, options};
use crate::config::{self, Settings, redact_url};

/// Creates the database named in the admin URL if it does not exist (connecting to the
/// `postgres` maintenance database of the same server to do so).
///
/// # Errors
/// Connection or permission errors.
pub async fn ensure_database(admin_url: &SecretString) -> Result<()> {
    let name = config::database_name(admin_url.expose_secret());
    let maintenance =
        SecretString::from(config::with_database(admin_url.expose_secret(), "postgres"));
    let mut conn = connect("admin", &maintenance).await?;
    let exists: bool =
        sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let stmt: String = sqlx::query_scalar("select format('create database %I', $1::text)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
        conn.execute(AssertSqlSafe(stmt)).await?;
        tracing::info!(database = %name, "created database");
    }
    Ok(())
}

/// `tenant-worker setup`: roles, extensions, both migrators, grants and role policies, then
/// the repair of every `audit` check whose fix is unambiguous (RLS flags, ownership and
/// privileges of the objects it made). Returns the names of the checks it repaired. Running
/// it again changes nothing.
///
/// # Errors
/// [`Error::AdminLacksCreateRole`] when the admin role cannot create roles; any database or
/// migration error.
pub async fn setup(settings: &Settings, urls: &DbUrls) -> Result<Vec<String>> {
    ensure_database(&urls.admin).await?;
    let mut conn = connect("admin", &urls.admin).await?;
    ensure_roles(&mut conn, settings).await?;
    // apalis-postgres needs these; create them as admin so the queue role needs no CREATE.
    conn.execute("create extension if not exists hstore; create extension if not exists pgcrypto")
        .await?;
    let owner = &settings.roles.owner;
    // Only the owner creates objects in `public` (PostgreSQL before 15 let every role).
    conn.execute(AssertSqlSafe(format!(
        r#"revoke create on schema public from public; grant usage, create on schema public to "{owner}""#
    )))
    .await?;
    conn.close().await?;
    migrate(settings, urls).await?;
    // Bring back what someone changed since (FORCE turned off, a grant added, ...).
    let admin = super::admin_pool(settings, urls).await?;
    let repaired = super::audit::repair(&admin, &settings.roles).await;
    admin.close().await;
    Ok(repaired?)
}

/// `tenant-worker migrate`: our migrations (as the owner role), apalis-postgres's migrations,
/// then grants. Assumes the roles exist.
///
/// # Errors
/// Any database or migration error.
pub async fn migrate(settings: &Settings, urls: &DbUrls) -> Result<()> {
    let owner = settings.roles.owner.clone();
    // One connection that acts as the owner, so every object the migrations create is owned by
    // the owner role and not by the admin.
    let owner_pool = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            let stmt = format!(r#"set role "{owner}""#);
            Box::pin(async move {
                conn.execute(AssertSqlSafe(stmt)).await?;
                Ok(())
            })
        })
        .connect_with(options("admin", &urls.admin)?)
        .await
        .map_err(|source| Error::Connect {
            what: "admin",
            url: redact_url(urls.admin.expose_secret()),
            source,
        })?;
    MIGRATOR.run(&owner_pool).await?;
    owner_pool.close().await;

    let admin = admin_pool(settings, urls).await?;
    apalis_postgres::PostgresStorage::setup(&admin).await?;
    tune_queue(&admin).await?;
    apply_grants(&admin, settings).await?;
    admin.close().await;
    Ok(())
}

/// The tenant-fair fetch: lanes, their triggers on `apalis.jobs` and `apalis.fair_fetch`.
const FAIR_FETCH: &str = include_str!("fair_fetch.sql");

/// Fixes three performance problems of apalis-postgres 1.0's schema, adds the index our own
/// fetch uses, and scopes idempotency keys to the tenant. They are properties of the queue tables and functions, so every worker on
/// this database gets them: plain apalis-postgres workers (the benchmark's baseline) fetch with
/// `apalis.get_jobs` and ack with `handle_result.sql`, which the first two fixes are about; ours
/// ([`crate::backend`]) fetches by tenant through `apalis_jobs_tenant_fetch` (a partial index
/// over runnable rows, so it is written only when a job is enqueued or retried) and writes its
/// outcomes by primary key. Idempotent; `setup` applies them after every apalis migration run.
/// Measured with 100,000 rows in `apalis.jobs` (`EXPLAIN ANALYZE`):
///
/// - **The fetch's generic plan.** `apalis.get_jobs` is a SQL function, so PostgreSQL plans its
///   `UPDATE ... FROM (SELECT ... LIMIT $3 FOR UPDATE SKIP LOCKED)` with generic parameters,
///   cannot see that the limit is a batch of a few dozen rows and hash-joins a sequential scan
///   of the whole table, on every fetch (25 to 33 ms per fetch of 32 jobs); with only the
///   sequential scan disabled it merge-joins a full primary-key scan instead, which grows with
///   the table (7 ms at the start of a 50,000-job drain, 50 ms near its end). With hash and
///   merge joins disabled too, the plan is the nested loop of 32 key probes: 0.75 to 1 ms,
///   flat.
/// - **The ack reads the worker's whole history.** apalis keeps `lock_by` on finished jobs, and
///   its batched ack (`handle_result.sql`) finds the acked jobs through `lock_by = $worker`. With
///   statistics taken while `lock_by` was still empty, the planner walks the `lock_by` index
///   over every job that worker ever ran (25,000 rows, 9.7 ms per ack, growing with each job,
///   so a long drain is quadratic). A partial index over in-flight jobs only (`Queued`,
///   `Running`), which is exactly what the other `lock_by` queries (orphan and shutdown
///   re-enqueue, our `release_jobs`) filter on, leaves the ack its primary-key probes: 2.5 ms.
/// - **Duplicate indexes.** `unique_job_id` repeats the primary key and `lidx` the `lock_by`
///   index. Every job row is updated three times (queued, running, done), never as a HOT
///   update (`status` is in the fetch index's predicate), so each index costs on every update.
///
/// Idempotency keys: apalis-postgres makes `(job_type, idempotency_key)` unique, so one
/// tenant's key would suppress (and reveal) another tenant's job with the same key. The
/// unique index is `(job_type, tenant, idempotency_key)` instead: a key is one tenant's.
///
/// Fairness: the lanes table, its triggers and the fair fetch function of
/// [`crate::backend`], from `fair_fetch.sql`.
async fn tune_queue(admin: &PgPool) -> Result<()> {
    admin
        .execute(
            "alter function apalis.get_jobs(text, text, integer) set enable_seqscan = off;
             alter function apalis.get_jobs(text, text, integer) set enable_hashjoin = off;
             alter function apalis.get_jobs(text, text, integer) set enable_mergejoin = off;
             create index if not exists apalis_jobs_in_flight_lock_by on apalis.jobs (lock_by)
                 where status = 'Queued' or status = 'Running';
             create index if not exists apalis_jobs_tenant_fetch on apalis.jobs
                 (job_type, (coalesce(metadata -> 'tenant_id', '')), priority desc, run_at)
                 where status = 'Pending' or (status = 'Failed' and attempts < max_attempts);
             drop index if exists apalis.idx_apalis_jobs_lock_by;
             drop index if exists apalis.lidx;
             drop index if exists apalis.unique_job_id;
             create unique index if not exists apalis_jobs_idempotency_per_tenant on apalis.jobs
                 (job_type, (metadata -> 'tenant_id'), idempotency_key)
                 where idempotency_key is not null;
             drop index if exists apalis.idx_jobs_idempotency_key;",
        )
        .await?;
    admin.execute(FAIR_FETCH).await?;
    Ok(())
}

/// Creates the four roles when missing and pins their attributes (no superuser, no
/// BYPASSRLS; only the owner cannot log in). Passwords are set from the settings.
async fn ensure_roles(conn: &mut PgConnection, settings: &Settings) -> Result<()> {
    let (me, superuser, createrole): (String, bool, bool) = sqlx::query_as(
        "select rolname::text, rolsuper, rolcreaterole from pg_roles where rolname = current_user",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !superuser && !createrole {
        return Err(Error::AdminLacksCreateRole { role: me });
    }
    let roles = &settings.roles;
    let wanted = [
        (&roles.owner, "nologin", None),
        (&roles.app, "login", roles.app_password.as_ref()),
        (&roles.queue, "login", roles.queue_password.as_ref()),
        (&roles.scheduler, "login", roles.scheduler_password.as_ref()),
    ];
    for (name, login, password) in wanted {
        let exists: bool =
            sqlx::query_scalar("select exists(select 1 from pg_roles where rolname = $1)")
                .bind(name)
                .fetch_one(&mut *conn)
                .await?;
        if !exists {
            conn.execute(AssertSqlSafe(format!(r#"create role "{name}" {login}"#)))
                .await?;
            tracing::info!(role = %name, "created role");
        }
        conn.execute(AssertSqlSafe(format!(
            r#"alter role "{name}" {login} nosuperuser nobypassrls nocreatedb nocreaterole"#
        )))
        .await?;
        if let Some(pw) = password {
            // The statement is built server-side with %L quoting and never logged.
            let stmt: String = sqlx::query_scalar(
                "select format('alter role %I with password %L', $1::text, $2::text)",
            )
            .bind(name)
            .bind(pw.expose_secret())
            .fetch_one(&mut *conn)
            .await?;
            conn.execute(AssertSqlSafe(stmt)).await?;
        }
    }
    if !superuser {
        // A CREATEROLE admin must be a member of the owner role to run migrations as it.
        conn.execute(AssertSqlSafe(format!(
            r#"grant "{}" to "{me}""#,
            roles.owner
        )))
        .await?;
    }
    Ok(())
}

/// The privileges each role needs and nothing more. Idempotent.
async fn apply_grants(admin: &PgPool, settings: &Settings) -> Result<()> {
    let r = &settings.roles;
    let (owner, app, queue, scheduler) = (&r.owner, &r.app, &r.queue, &r.scheduler);
    let statements = [
        // The app role: only the DML it needs on tenant tables, through RLS.
        format!(r#"grant usage on schema public to "{app}""#),
        format!(r#"grant select on public.tenants to "{app}""#),
        format!(
            r#"grant select, insert, update, delete on public.records, public.job_runs to "{app}""#
        ),
        format!(
            r#"grant select on public.v_property, public.v_customer, public.v_invoice to "{app}""#
        ),
        // The queue role: the apalis schema, and of the registry only whether a tenant exists
        // and is active (enqueue refuses jobs for other tenants), through a narrow policy.
        format!(r#"grant usage on schema apalis to "{queue}""#),
        format!(
            r#"grant select (id, status, weight, max_running, paused) on public.tenants to "{queue}""#
        ),
        "drop policy if exists queue_reads_status on public.tenants".to_string(),
        format!(
            r#"create policy queue_reads_status on public.tenants as permissive for select to "{queue}" using (true)"#
        ),
        format!(
            r#"grant select, insert, update, delete on all tables in schema apalis to "{queue}""#
        ),
        format!(r#"grant execute on all functions in schema apalis to "{queue}""#),
        format!(r#"grant usage on schema public to "{queue}""#),
        format!(
            r#"grant select, insert, update, delete on public.rollups, public.rollup_changes, public.rollup_runs to "{app}""#
        ),
        // A job transaction's guard: the worker inserts it as the app role; only
        // `complete_job_runs` (as the owner) removes it.
        format!(r#"grant insert on public.scope_guards to "{app}""#),
        // The app role manages one tenant's schedules through RLS like any tenant data.
        format!(r#"grant select, insert, update, delete on public.schedules to "{app}""#),
        // The scheduler role: every tenant's schedules, read-only, through one narrow policy
        // on that table; its own bookkeeping table; nothing else of the tenant data.
        format!(r#"grant usage on schema public to "{scheduler}""#),
        format!(r#"grant select on public.schedules to "{scheduler}""#),
        format!(
            r#"grant select, insert, update, delete on public.schedule_fires to "{scheduler}""#
        ),
        format!(
            r#"alter policy tenant_isolation on public.schedules
                 using ((tenant_id = public.current_tenant_id() and (select public.tenant_context_valid()))
                        or current_user = '{scheduler}')"#
        ),
        "drop policy if exists scheduler_reads_all on public.schedules".to_string(),
        format!(
            r#"create policy scheduler_reads_all on public.schedules as permissive for select to "{scheduler}" using (true)"#
        ),
        // Tenant management (`tenant add/list/...`) runs as the owner, which FORCE subjects to
        // RLS on `tenants` too: this policy lets it see the registry, and only the registry.
        "drop policy if exists tenant_registry on public.tenants".to_string(),
        format!(
            r#"create policy tenant_registry on public.tenants as permissive for all to "{owner}" using (true) with check (true)"#
        ),
    ];
    let mut tx = admin.begin().await?;
    for stmt in statements {
        tx.execute(AssertSqlSafe(stmt)).await?;
    }
    tx.commit().await?;
    revoke_dynamic_sql(admin).await
}

/// Revokes EXECUTE on [`super::audit::DYNAMIC_SQL_FUNCTIONS`] from PUBLIC in this database
/// (function privileges are per database). Needs a superuser (they belong to the bootstrap superuser);
/// without one it warns, and `audit` reports what is left.
async fn revoke_dynamic_sql(admin: &PgPool) -> Result<()> {
    let functions: Vec<String> = sqlx::query_scalar(super::audit::DYNAMIC_SQL_FUNCTIONS)
        .fetch_all(admin)
        .await?;
    for f in functions {
        // `f` is a regprocedure printed by the server: a valid, quoted signature.
        if let Err(e) = admin
            .execute(AssertSqlSafe(format!(
                "revoke execute on function {f} from public"
            )))
            .await
        {
            tracing::warn!(function = %f, error.message = %e, "could not revoke EXECUTE from PUBLIC");
        }
    }
    Ok(())
}
