//! Connections, roles, migrations and grants: the structural side of the data layer.
//!
//! Three connections matter at run time, each as its own least-privilege role:
//! - **admin** (`database.admin_url`): `setup`, `migrate`, tenant management, `audit`;
//! - **app** (`roles.app`): every tenant-data query, always inside a scoped transaction;
//! - **queue** (`roles.queue`): the apalis job tables and nothing of the tenant data.
//!
//! Roles are cluster-wide, so `setup` creates them idempotently here rather than in a
//! per-database migration. Grants and role-specific policies are applied by code after the
//! migrations because role names are configurable.

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};

use crate::config::{self, Settings, redact_url};
use crate::embedded;

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A connection could not be opened. `url` has its password removed.
    #[error("cannot connect to the {what} database at {url}")]
    Connect {
        /// Which connection (admin, app, queue).
        what: &'static str,
        /// The URL without password.
        url: String,
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
    /// Any other database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Our migrations failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// apalis-postgres's migrations failed.
    #[error("job queue migration failed")]
    QueueMigrate(#[from] apalis_postgres::Error),
    /// The admin role cannot do what `setup` needs.
    #[error(
        "the admin role `{role}` cannot create roles: setup needs a superuser or a role with \
         CREATEROLE (e.g. `alter role {role} createrole`), or create the roles yourself"
    )]
    AdminLacksCreateRole {
        /// The admin role's name.
        role: String,
    },
    /// The schema is not there yet.
    #[error("the database is not set up yet: run `tenant-worker setup` first")]
    NotSetUp,
    /// The embedded cluster failed.
    #[error(transparent)]
    Embedded(#[from] embedded::Error),
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] config::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Our own migrations, embedded at build time. Their history lives in
/// `public._sqlx_migrations`; apalis-postgres keeps its own in `apalis._sqlx_migrations`, so
/// the two migrators never see each other's versions.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The resolved connection URLs (secrets) for one database.
#[derive(Clone)]
pub struct DbUrls {
    /// Admin connection.
    pub admin: SecretString,
    /// App-role connection.
    pub app: SecretString,
    /// Queue-role connection.
    pub queue: SecretString,
    /// Scheduler-role connection.
    pub scheduler: SecretString,
    /// True when this is the embedded local default cluster.
    pub local_default: bool,
}

impl std::fmt::Debug for DbUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbUrls")
            .field("admin", &redact_url(self.admin.expose_secret()))
            .field("local_default", &self.local_default)
            .finish_non_exhaustive()
    }
}

/// Name of the database created in the local default cluster.
pub const LOCAL_DATABASE: &str = "tenant_worker";

impl DbUrls {
    /// Derives the role URLs from an admin URL and the settings (explicit `app_url` /
    /// `queue_url` win over derivation).
    pub fn derive(settings: &Settings, admin_url: &str, local_default: bool) -> Self {
        let roles = &settings.roles;
        let pick = |explicit: &Option<SecretString>, user: &str, pw: &Option<SecretString>| {
            explicit.clone().unwrap_or_else(|| {
                SecretString::from(config::derive_url(admin_url, user, pw.as_ref()))
            })
        };
        Self {
            admin: SecretString::from(admin_url.to_string()),
            app: pick(&settings.database.app_url, &roles.app, &roles.app_password),
            queue: pick(
                &settings.database.queue_url,
                &roles.queue,
                &roles.queue_password,
            ),
            scheduler: SecretString::from(config::derive_url(
                admin_url,
                &roles.scheduler,
                roles.scheduler_password.as_ref(),
            )),
            local_default,
        }
    }

    /// Resolves where to connect: the configured database, or the persistent local cluster
    /// (created, started and set up on first use).
    ///
    /// # Errors
    /// Embedded-cluster failures, or setup failures on first use of the local cluster.
    pub async fn resolve(settings: &Settings) -> Result<Self> {
        if let Some(admin) = &settings.database.admin_url {
            return Ok(Self::derive(settings, admin.expose_secret(), false));
        }
        let dir = settings.dev.data_dir.join("pg");
        let cluster =
            tokio::task::spawn_blocking(move || embedded::LocalCluster::ensure_running(&dir))
                .await
                .map_err(|e| Error::Database(sqlx::Error::Io(std::io::Error::other(e))))??;
        let admin = config::with_database(&cluster.admin_url(), LOCAL_DATABASE);
        let urls = Self::derive(settings, &admin, true);
        if !is_set_up(&urls).await? {
            tracing::info!("first use of the local cluster: running setup");
            setup(settings, &urls).await?;
        }
        Ok(urls)
    }
}

/// Connection options from a URL, with a friendly error.
fn options(what: &'static str, url: &SecretString) -> Result<PgConnectOptions> {
    PgConnectOptions::from_str(url.expose_secret()).map_err(|source| Error::Connect {
        what,
        url: redact_url(url.expose_secret()),
        source,
    })
}

/// Opens a pool. `what` names the connection in errors.
///
/// # Errors
/// [`Error::Connect`] with the URL minus its password.
pub async fn pool(
    what: &'static str,
    url: &SecretString,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool> {
    open_pool(
        what,
        url,
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout),
    )
    .await
}

async fn open_pool(
    what: &'static str,
    url: &SecretString,
    options_: PgPoolOptions,
) -> Result<PgPool> {
    // One direct attempt first: a pool retries a refused connection until its acquire
    // timeout and then only says "timed out"; the driver's own error is the useful one.
    connect(what, url).await?.close().await?;
    options_
        .connect_with(options(what, url)?)
        .await
        .map_err(|source| Error::Connect {
            what,
            url: redact_url(url.expose_secret()),
            source,
        })
}

/// Opens one connection.
///
/// # Errors
/// [`Error::Connect`] with the URL minus its password.
pub async fn connect(what: &'static str, url: &SecretString) -> Result<PgConnection> {
    PgConnection::connect_with(&options(what, url)?)
        .await
        .map_err(|source| Error::Connect {
            what,
            url: redact_url(url.expose_secret()),
            source,
        })
}

/// Opens the admin pool with the settings' limits.
///
/// # Errors
/// See [`pool`].
pub async fn admin_pool(settings: &Settings, urls: &DbUrls) -> Result<PgPool> {
    pool("admin", &urls.admin, 4, connect_timeout(settings)).await
}

/// Opens the app-role pool (tenant data, always through a scoped transaction).
///
/// # Errors
/// See [`pool`].
pub async fn app_pool(settings: &Settings, urls: &DbUrls) -> Result<PgPool> {
    // No release check: the only code that sets a tenant on these connections is
    // `TenantTx`, which closes its connection instead of returning it whenever it is dropped
    // with its transaction open (an error, a cut-off, a panic, a cancelled BEGIN). A check on
    // every release cost one round trip per job.
    let options = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(connect_timeout(settings));
    open_pool("app", &urls.app, options).await
}

/// Opens the scheduler-role pool (schedules of all tenants, read-only).
///
/// # Errors
/// See [`pool`].
pub async fn scheduler_pool(settings: &Settings, urls: &DbUrls) -> Result<PgPool> {
    pool("scheduler", &urls.scheduler, 3, connect_timeout(settings)).await
}

/// Opens the queue-role pool (apalis tables only).
///
/// # Errors
/// See [`pool`].
pub async fn queue_pool(settings: &Settings, urls: &DbUrls) -> Result<PgPool> {
    // No release check here (unlike the app pool): one extra round trip per release cost the
    // queue's hot path about 5x in enqueue-to-start latency. The only BEGINs on the queue
    // role are apalis's, and each worker generation runs apalis on its own copy of this pool,
    // closed when the generation stops, so a BEGIN cancelled then (sqlx#4385) cannot leave a
    // connection inside a transaction here (see `worker::generation_pool`).
    pool(
        "queue",
        &urls.queue,
        settings.database.max_connections,
        connect_timeout(settings),
    )
    .await
}

fn connect_timeout(settings: &Settings) -> Duration {
    Duration::from_secs(settings.database.connect_timeout_secs)
}

/// True when our migrations have been applied to the database.
async fn is_set_up(urls: &DbUrls) -> Result<bool> {
    let mut conn = match connect("admin", &urls.admin).await {
        Ok(c) => c,
        Err(Error::Connect { source, .. })
            if source
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|c| c == "3D000") =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let exists: bool = sqlx::query_scalar("select to_regclass('public.records') is not null")
        .fetch_one(&mut conn)
        .await?;
    Ok(exists)
}

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

/// `tenant-worker setup`: roles, extensions, both migrators, grants and role policies.
/// Running it again changes nothing.
///
/// # Errors
/// [`Error::AdminLacksCreateRole`] when the admin role cannot create roles; any database or
/// migration error.
pub async fn setup(settings: &Settings, urls: &DbUrls) -> Result<()> {
    ensure_database(&urls.admin).await?;
    let mut conn = connect("admin", &urls.admin).await?;
    ensure_roles(&mut conn, settings).await?;
    // apalis-postgres needs these; create them as admin so the queue role needs no CREATE.
    conn.execute("create extension if not exists hstore; create extension if not exists pgcrypto")
        .await?;
    let owner = &settings.roles.owner;
    conn.execute(AssertSqlSafe(format!(
        r#"grant usage, create on schema public to "{owner}""#
    )))
    .await?;
    conn.close().await?;
    migrate(settings, urls).await
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

/// Fixes three performance problems of apalis-postgres 1.0's schema, and adds the index our
/// own fetch uses. They are properties of the queue tables and functions, so every worker on
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
             drop index if exists apalis.unique_job_id;",
        )
        .await?;
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
        // The queue role: the apalis schema only.
        format!(r#"grant usage on schema apalis to "{queue}""#),
        format!(
            r#"grant select, insert, update, delete on all tables in schema apalis to "{queue}""#
        ),
        format!(r#"grant execute on all functions in schema apalis to "{queue}""#),
        format!(r#"grant usage on schema public to "{queue}""#),
        format!(
            r#"grant select, insert, update, delete on public.rollups, public.rollup_changes, public.rollup_runs to "{app}""#
        ),
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
                 using (tenant_id = public.current_tenant_id() or current_user = '{scheduler}')"#
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
    Ok(())
}
