//! Connections, roles, migrations and grants: the structural side of the data layer.
//!
//! Three connections matter at run time, each as its own least-privilege role:
//! - **admin** (`database.admin_url`): `setup`, `migrate`, tenant management, `audit`;
//! - **app** (`roles.app`): every tenant-data query, always inside a scoped transaction;
//! - **queue** (`roles.queue`): the apalis job tables and nothing of the tenant data.
//!
//! Roles are cluster-wide, so `setup` creates them idempotently ([`setup()`]) rather than in a
//! per-database migration. Grants and role-specific policies are applied by code after the
//! migrations because role names are configurable. [`audit`] checks the posture all of this
//! builds.

pub mod audit;
pub mod setup;

pub use setup::{migrate, setup};

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

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
    /// The audit (or a repair it proposed) failed to run.
    #[error("the security audit could not run")]
    Audit(#[from] audit::Error),
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
            setup::setup(settings, &urls).await?;
        }
        Ok(urls)
    }
}

/// Connection options from a URL, with a friendly error.
pub(crate) fn options(what: &'static str, url: &SecretString) -> Result<PgConnectOptions> {
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

/// The key that seals tenant contexts, read through a short admin connection.
///
/// # Errors
/// [`Error::NotSetUp`] when the database has no key yet; connection errors.
pub async fn context_key(settings: &Settings, urls: &DbUrls) -> Result<crate::scope::ContextKey> {
    let admin = pool("admin", &urls.admin, 1, connect_timeout(settings)).await?;
    let key = crate::scope::ContextKey::load(&admin).await;
    admin.close().await;
    match key {
        Ok(key) => Ok(key),
        Err(sqlx::Error::RowNotFound) => Err(Error::NotSetUp),
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") => {
            Err(Error::NotSetUp)
        }
        Err(e) => Err(e.into()),
    }
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
