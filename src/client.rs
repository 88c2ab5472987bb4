//! [`Client`]: everything an application or the command line needs to use tenant-worker,
//! from one [`Settings`]: the database (the configured one, or the local default cluster,
//! created and set up on first use), scoped transactions, the signing and verifying keys, the
//! declared jobs, an [`Enqueuer`] and a [`WorkerBuilder`].

use std::path::PathBuf;
use std::sync::Arc;

use sqlx::PgPool;

use crate::config::Settings;
use crate::db::{self, DbUrls};
use crate::envelope::keys::{self, DEV_KEY_ID, KeyError, Keyring, Signer};
use crate::ids::KeyId;
use crate::job::Registry;
use crate::jobs::declared::{Catalog, LoadError};
use crate::queue::Enqueuer;
use crate::runtime::worker::{Worker, WorkerBuilder};
use crate::scope::Scope;
use crate::tenant::{self, Tenant};

/// Errors of [`Client`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached, created or set up.
    #[error(transparent)]
    Db(#[from] db::Error),
    /// Keys are missing or unreadable.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A declared job in `jobs/` does not load.
    #[error(transparent)]
    Catalog(#[from] LoadError),
    /// Tenant registry error.
    #[error(transparent)]
    Tenant(#[from] tenant::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connection to tenant-worker's database, with the keys and declared jobs of its settings.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tenant_worker::{Client, Settings, jobs::noop::{Noop, NoopArgs}};
///
/// let settings = Settings::load(None)?;            // worker.toml + TENANT_WORKER__* variables
/// let client = Client::connect(&settings).await?;  // no database configured: the local default
/// let tenant = client.add_tenant("Northwind").await?.id;
/// let enqueuer = client.enqueuer(client.builtins().into())?;
/// enqueuer.enqueue::<Noop>(tenant, &NoopArgs::default()).await?;
/// let worker = client.worker()?.registry(&client.builtins()).build()?;
/// worker.run_until_idle().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    settings: Settings,
    urls: DbUrls,
    scope: Scope,
    queue: PgPool,
    catalog: Arc<Catalog>,
}

impl Client {
    /// Connects as `settings` say: to `database.admin_url` and the role URLs derived from it,
    /// or, when none is configured, to the persistent local cluster in `dev.data_dir`
    /// (created, started and set up on first use). Loads the declared jobs of `jobs.dir`.
    ///
    /// # Errors
    /// [`Error::Db`] when the database cannot be reached; [`Error::Catalog`] for a declared job
    /// that does not load.
    pub async fn connect(settings: &Settings) -> Result<Self> {
        let (dir, required) = settings.jobs.source();
        let catalog = Arc::new(Catalog::load(dir, required)?);
        let urls = DbUrls::resolve(settings).await?;
        let app = db::app_pool(settings, &urls).await?;
        let queue = db::queue_pool(settings, &urls).await?;
        let scope = Scope::new(app, db::context_key(settings, &urls).await?)
            .refreshing_from(urls.admin.clone());
        Ok(Self {
            settings: settings.clone(),
            urls,
            scope,
            queue,
            catalog,
        })
    }

    /// The settings this client was made from.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The resolved connection URLs.
    pub fn urls(&self) -> &DbUrls {
        &self.urls
    }

    /// Scoped transactions on the app role's pool.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The queue role's pool.
    pub fn queue_pool(&self) -> &PgPool {
        &self.queue
    }

    /// The declared jobs.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// A pool as the admin role (setup, tenants, audit). Opened on each call: keep it short.
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn admin_pool(&self) -> Result<PgPool> {
        Ok(db::admin_pool(&self.settings, &self.urls).await?)
    }

    /// A registry of the built-in kinds, with this client's declared jobs and folders.
    pub fn builtins(&self) -> Registry {
        crate::jobs::builtins(&self.settings, self.catalog.clone())
    }

    /// Where the development keys are, when the local default cluster is in use.
    fn dev_keys(&self) -> Option<PathBuf> {
        self.urls
            .local_default
            .then(|| self.settings.dev.data_dir.join("keys"))
    }

    /// The signing key of the settings; with none configured, on the local default cluster,
    /// the development key (created on first use).
    ///
    /// # Errors
    /// [`KeyError::NoSigningKey`] when none is configured on a configured database, or a
    /// loading error.
    pub fn signer(&self) -> Result<Signer> {
        Ok(signer(&self.settings, self.dev_keys())?)
    }

    /// The verifying keys of the settings; with none configured, on the local default
    /// cluster, the development key.
    ///
    /// # Errors
    /// [`KeyError::NoVerifyingKeys`] when none is configured on a configured database, or a
    /// loading error.
    pub fn keyring(&self) -> Result<Keyring> {
        Ok(keyring(&self.settings, self.dev_keys())?)
    }

    /// An enqueuer signing with [`Client::signer`] and checking jobs against `registry`.
    ///
    /// # Errors
    /// See [`Client::signer`].
    pub fn enqueuer(&self, registry: Arc<Registry>) -> Result<Enqueuer> {
        Ok(Enqueuer::new(
            self.queue.clone(),
            self.signer()?,
            &self.settings,
            registry,
        ))
    }

    /// A worker builder with this client's connections and keys; register its kinds next.
    ///
    /// # Errors
    /// See [`Client::keyring`].
    pub fn worker(&self) -> Result<WorkerBuilder> {
        Ok(Worker::builder(
            self.scope.clone(),
            self.queue.clone(),
            self.keyring()?,
            &self.settings,
        ))
    }

    /// Adds a tenant (through the admin connection, as the owner role).
    ///
    /// # Errors
    /// [`Error::Tenant`] for a bad name, or a database error.
    pub async fn add_tenant(&self, name: &str) -> Result<Tenant> {
        let admin = self.admin_pool().await?;
        let tenant = tenant::add(&admin, &self.settings.roles.owner, name).await;
        admin.close().await;
        Ok(tenant?)
    }
}

/// The signing key of `settings`, else (with `dev_keys`, the local default) the development
/// key, created on first use.
///
/// # Errors
/// [`KeyError::NoSigningKey`] when nothing is configured and there is no development key
/// folder, or a loading error.
pub fn signer(settings: &Settings, dev_keys: Option<PathBuf>) -> Result<Signer, KeyError> {
    let k = &settings.keys;
    match (&k.signing_key_file, &k.signing_key_id, dev_keys) {
        (Some(file), Some(kid), _) => Signer::from_file(KeyId::parse(kid)?, file),
        (_, _, Some(dir)) => {
            let (private, _, created) = keys::ensure_dev_keys(&dir)?;
            if created {
                tracing::info!(dir = %dir.display(), key_id = DEV_KEY_ID, "created a development signing key pair");
            }
            Signer::from_file(KeyId::parse(DEV_KEY_ID)?, &private)
        }
        _ => Err(KeyError::NoSigningKey),
    }
}

/// The verifying keys of `settings`. The development key (with `dev_keys`, the local default)
/// is trusted only when no verifying key is configured: a configured keyring means exactly
/// what it lists, so a key-rotation rehearsal on the local cluster gives the real answer.
///
/// # Errors
/// [`KeyError::NoVerifyingKeys`] when no key is listed, or a loading error.
pub fn keyring(settings: &Settings, dev_keys: Option<PathBuf>) -> Result<Keyring, KeyError> {
    let mut ring = Keyring::new();
    for (kid, path) in &settings.keys.verifying {
        ring.insert(KeyId::parse(kid)?, Keyring::load_public(path)?);
    }
    if ring.is_empty()
        && let Some(dir) = dev_keys
    {
        let (_, public, created) = keys::ensure_dev_keys(&dir)?;
        if created {
            tracing::info!(dir = %dir.display(), key_id = DEV_KEY_ID, "created a development signing key pair");
        }
        tracing::info!(
            key_id = DEV_KEY_ID,
            "trusting the development key: no [keys.verifying] is configured"
        );
        ring.insert(KeyId::parse(DEV_KEY_ID)?, Keyring::load_public(&public)?);
    }
    if ring.is_empty() {
        return Err(KeyError::NoVerifyingKeys);
    }
    Ok(ring)
}
