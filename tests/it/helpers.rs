//! Test harness: a real PostgreSQL per test process (a private throwaway cluster, or the
//! server named by `TENANT_WORKER__DATABASE__ADMIN_URL`), one fresh database per test cloned
//! from a template that `setup` prepared once, per-test signing keys, and helpers that drive
//! the real worker and the real binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use std::sync::Arc;

use tenant_worker::config::{self, Settings};
use tenant_worker::db::{self, DbUrls};
use tenant_worker::embedded::EphemeralCluster;
use tenant_worker::envelope::keys;
use tenant_worker::jobs::declared::Catalog;
use tenant_worker::queue::{Enqueuer, NewJob};
use tenant_worker::scope::ContextKey;
use tenant_worker::{
    JobId, KeyId, Keyring, Registry, RunOptions, Scope, ScopedTx, Signer, Summary, TenantId,
    Worker, client, jobs, tenant,
};
use tokio_util::sync::CancellationToken;

/// The server every test of this process uses: (admin URL to the `postgres` database, the
/// cluster if we own it).
struct Server {
    url: String,
    _cluster: Option<EphemeralCluster>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("TEST_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        match std::env::var("TENANT_WORKER__DATABASE__ADMIN_URL") {
            Ok(url) => Server {
                url: config::with_database(&url, "postgres"),
                _cluster: None,
            },
            Err(_) => {
                let cluster = EphemeralCluster::start().expect("start a throwaway PostgreSQL");
                Server {
                    url: cluster.admin_url(),
                    _cluster: Some(cluster),
                }
            }
        }
    })
}

/// The admin URL of the test server's database `name`.
pub fn server_url(name: &str) -> String {
    config::with_database(&server().url, name)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Settings every test starts from: fast polling, short backoff and heartbeats.
pub fn base_settings(admin_url: &str) -> Settings {
    let mut s = Settings::default();
    s.database.admin_url = Some(SecretString::from(admin_url.to_string()));
    s.database.max_connections = 8;
    s.worker.poll_interval_ms = 100;
    s.worker.heartbeat_secs = 1;
    s.worker.missed_heartbeats = 3;
    s.worker.backoff_base_ms = 200;
    s.worker.backoff_max_ms = 2_000;
    s.worker.max_attempts = 3;
    s.worker.shutdown_timeout_secs = 10;
    s
}

async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let admin = server_url("postgres");
            // Databases of earlier runs on a shared server (tests run one binary at a time).
            let pool = db::pool("admin", &SecretString::from(admin.clone()), 2, Duration::from_secs(10))
                .await
                .expect("connect to the test server");
            let stale: Vec<String> = sqlx::query_scalar(
                "select datname::text from pg_database where datname like 'tw\\_test\\_%' or datname like 'tw\\_tpl\\_%'",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            for d in stale {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(r#"drop database if exists "{d}" with (force)"#)))
                    .execute(&pool)
                    .await;
            }
            pool.close().await;
            let name = unique("tw_tpl_");
            let url = server_url(&name);
            let settings = base_settings(&url);
            let urls = DbUrls::derive(&settings, &url, false);
            db::setup(&settings, &urls).await.expect("setup the template database");
            name
        })
        .await
}

/// One test's database with the schema set up, its settings and its signing key.
pub struct TestDb {
    /// Database name.
    pub name: String,
    /// Settings pointing at it (keys included).
    pub settings: Settings,
    /// Resolved URLs.
    pub urls: DbUrls,
    /// Per-test signing key.
    pub signer: Signer,
    /// Key files live here.
    pub keys_dir: tempfile::TempDir,
}

impl TestDb {
    /// A fresh database cloned from the set-up template.
    pub async fn new() -> TestDb {
        let template = template().await;
        let name = unique("tw_test_");
        let admin = db::pool(
            "admin",
            &SecretString::from(server_url("postgres")),
            1,
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"create database "{name}" template "{template}""#
        )))
        .execute(&admin)
        .await
        .expect("create test database");
        admin.close().await;
        Self::for_database(name, base_settings(&server_url("unused")))
    }

    /// A fresh, empty database (no setup): for tests of setup itself.
    pub async fn empty() -> TestDb {
        let _ = template().await; // makes sure stale databases were cleaned first
        let name = unique("tw_test_");
        Self::for_database(name, base_settings(&server_url("unused")))
    }

    fn for_database(name: String, mut settings: Settings) -> TestDb {
        let url = server_url(&name);
        settings.database.admin_url = Some(SecretString::from(url.clone()));
        let keys_dir = tempfile::tempdir().expect("tempdir");
        let (kid, private, public) =
            keys::generate_key_pair(keys_dir.path(), Some(KeyId::parse("test").unwrap()))
                .expect("keys");
        settings.keys.signing_key_file = Some(private.clone());
        settings.keys.signing_key_id = Some(kid.to_string());
        settings.keys.verifying.insert(kid.to_string(), public);
        let signer = Signer::from_file(kid, &private).expect("signer");
        let urls = DbUrls::derive(&settings, &url, false);
        TestDb {
            name,
            settings,
            urls,
            signer,
            keys_dir,
        }
    }

    /// Re-derives URLs after a test changed `settings` (e.g. role names).
    pub fn refresh(&mut self) {
        let url = self
            .settings
            .database
            .admin_url
            .as_ref()
            .unwrap()
            .expose_secret()
            .to_string();
        self.urls = DbUrls::derive(&self.settings, &url, false);
    }

    /// The admin URL of this database.
    pub fn admin_url(&self) -> String {
        self.urls.admin.expose_secret().to_string()
    }

    /// A superuser pool (for arranging fixtures and reading ground truth).
    pub async fn admin(&self) -> PgPool {
        db::admin_pool(&self.settings, &self.urls)
            .await
            .expect("admin pool")
    }

    /// A pool connected as the locked-down app role.
    pub async fn app(&self) -> PgPool {
        db::app_pool(&self.settings, &self.urls)
            .await
            .expect("app pool")
    }

    /// Scoped transactions on a pool connected as the app role.
    pub async fn scope(&self) -> Scope {
        self.scope_of(self.app().await).await
    }

    /// Scoped transactions on `pool` (an app-role pool the test made itself).
    pub async fn scope_of(&self, pool: PgPool) -> Scope {
        Scope::new(pool, self.context_key().await)
    }

    /// The key that seals tenant contexts in this database.
    pub async fn context_key(&self) -> ContextKey {
        db::context_key(&self.settings, &self.urls)
            .await
            .expect("the context key")
    }

    /// A pool connected as the queue role.
    pub async fn queue(&self) -> PgPool {
        db::queue_pool(&self.settings, &self.urls)
            .await
            .expect("queue pool")
    }

    /// Creates a tenant.
    pub async fn tenant(&self, name: &str) -> TenantId {
        let admin = self.admin().await;
        let t = tenant::add(&admin, &self.settings.roles.owner, name)
            .await
            .expect("add tenant");
        admin.close().await;
        t.id
    }

    /// The verifying keyring matching [`TestDb::signer`].
    pub fn keyring(&self) -> Keyring {
        client::keyring(&self.settings, None).expect("keyring")
    }

    /// The built-in kinds, with the declared jobs of `catalog`.
    pub fn kinds(&self, catalog: Catalog) -> Arc<Registry> {
        Arc::new(jobs::builtins(&self.settings, Arc::new(catalog)))
    }

    /// An enqueuer on the queue role, for the built-in kinds (no declared jobs).
    pub async fn enqueuer(&self) -> Enqueuer {
        self.enqueuer_with(Catalog::new()).await
    }

    /// An enqueuer on the queue role, for the built-in kinds with the declared jobs of
    /// `catalog`.
    pub async fn enqueuer_with(&self, catalog: Catalog) -> Enqueuer {
        self.enqueuer_for(self.kinds(catalog)).await
    }

    /// An enqueuer on the queue role for the kinds of `kinds`.
    pub async fn enqueuer_for(&self, kinds: Arc<Registry>) -> Enqueuer {
        Enqueuer::new(
            self.queue().await,
            self.signer.clone(),
            &self.settings,
            kinds,
        )
    }

    /// Enqueues one job and returns its id.
    pub async fn enqueue(&self, tenant: TenantId, kind: &str, args: serde_json::Value) -> JobId {
        let done = self
            .enqueuer()
            .await
            .enqueue_job(tenant, NewJob::new(kind, args))
            .await
            .expect("enqueue");
        assert!(done.created, "a new job");
        done.id
    }

    /// A worker for the built-in kinds with the declared jobs of `catalog`.
    pub async fn worker(&self, catalog: Catalog) -> Worker {
        self.worker_for(&self.kinds(catalog)).await
    }

    /// A worker for the kinds of `registry`.
    pub async fn worker_for(&self, registry: &Registry) -> Worker {
        Worker::builder(
            self.scope().await,
            self.queue().await,
            self.keyring(),
            &self.settings,
        )
        .registry(registry)
        .build()
        .expect("worker")
    }

    /// Runs the real worker until the queue is idle.
    pub async fn run_until_idle(&self) -> Summary {
        self.run_with(
            RunOptions {
                until_idle: true,
                name: None,
            },
            CancellationToken::new(),
        )
        .await
    }

    /// Runs the real worker with options and a shutdown token.
    pub async fn run_with(&self, opts: RunOptions, shutdown: CancellationToken) -> Summary {
        let worker = self.worker(Catalog::new()).await;
        tokio::time::timeout(Duration::from_secs(120), worker.run(opts, shutdown))
            .await
            .expect("worker finished in time")
            .expect("worker ran")
    }

    /// A scoped transaction for `tenant` on the app role.
    pub async fn scoped(&self, scope: &Scope, tenant: TenantId) -> ScopedTx {
        scope.begin(tenant).await.expect("begin scoped")
    }

    /// Environment for the binary so it uses this database and key.
    pub fn env(&self) -> Vec<(String, String)> {
        let k = &self.settings.keys;
        let mut v = vec![
            (
                "TENANT_WORKER__DATABASE__ADMIN_URL".to_string(),
                self.admin_url(),
            ),
            (
                "TENANT_WORKER__KEYS__SIGNING_KEY_FILE".into(),
                k.signing_key_file.as_ref().unwrap().display().to_string(),
            ),
            (
                "TENANT_WORKER__KEYS__SIGNING_KEY_ID".into(),
                k.signing_key_id.clone().unwrap(),
            ),
            (
                "TENANT_WORKER__WORKER__POLL_INTERVAL_MS".into(),
                "100".into(),
            ),
            ("TENANT_WORKER__WORKER__HEARTBEAT_SECS".into(), "1".into()),
            (
                "TENANT_WORKER__WORKER__BACKOFF_BASE_MS".into(),
                "200".into(),
            ),
            (
                "TENANT_WORKER__WORKER__BACKOFF_MAX_MS".into(),
                "2000".into(),
            ),
        ];
        for (kid, path) in &k.verifying {
            v.push((
                format!("TENANT_WORKER__KEYS__VERIFYING__{kid}"),
                path.display().to_string(),
            ));
        }
        for (role, name) in [
            ("OWNER", &self.settings.roles.owner),
            ("APP", &self.settings.roles.app),
            ("QUEUE", &self.settings.roles.queue),
            ("SCHEDULER", &self.settings.roles.scheduler),
        ] {
            v.push((format!("TENANT_WORKER__ROLES__{role}"), name.clone()));
        }
        v
    }

    /// Runs the real binary with this database's environment, in an empty directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with_env(args, &self.env())
    }
}

/// Runs the binary with exactly these `TENANT_WORKER__*` variables (others removed).
pub fn cli_with_env(args: &[&str], env: &[(String, String)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args).current_dir(dir.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("TENANT_WORKER__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().cloned());
    cmd.output().expect("run tenant-worker")
}

/// The built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tenant-worker"))
}

/// stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Generates a key pair with id `kid` in `dir`, makes it the signing key of `settings` and adds
/// it to the verifying keys. Returns its signer. (The same steps `TestDb::for_database` takes for
/// the per-test key, for tests that build their own settings or rotate keys.)
pub fn add_key(settings: &mut Settings, dir: &std::path::Path, kid: &str) -> Signer {
    let (kid, private, public) =
        keys::generate_key_pair(dir, Some(KeyId::parse(kid).expect("key id"))).expect("keys");
    settings.keys.signing_key_file = Some(private.clone());
    settings.keys.signing_key_id = Some(kid.to_string());
    settings.keys.verifying.insert(kid.to_string(), public);
    Signer::from_file(kid, &private).expect("signer")
}

impl TestDb {
    /// A set-up database `tw_test_*` on a server of the test's own (a throwaway cluster it
    /// restarts or loads hard), with a per-test signing key like [`TestDb::new`].
    /// `server_admin_url` is a superuser URL of that server (any database).
    pub async fn on_server(server_admin_url: &str) -> TestDb {
        let name = unique("tw_test_");
        let url = config::with_database(server_admin_url, &name);
        let mut settings = base_settings(&url);
        let keys_dir = tempfile::tempdir().expect("tempdir");
        let signer = add_key(&mut settings, keys_dir.path(), "test");
        let urls = DbUrls::derive(&settings, &url, false);
        db::setup(&settings, &urls)
            .await
            .expect("setup the test database");
        TestDb {
            name,
            settings,
            urls,
            signer,
            keys_dir,
        }
    }
}

/// Writes `n` property records ("Tower <i>") for `tenant` through a scoped transaction on the
/// app role.
pub async fn seed_towers(app: &Scope, tenant: TenantId, n: usize) {
    let mut tx = app.begin(tenant).await.unwrap();
    for i in 0..n {
        sqlx::query("insert into records (tenant_id, kind, data) values ($1, 'property', $2)")
            .bind(tenant)
            .bind(serde_json::json!({"name": format!("Tower {i}"), "units": i}))
            .execute(tx.conn().await.unwrap())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Enqueues `jobs` in one batch through `enqueuer`; every one must be new. Their ids, in order.
pub async fn enqueue_all(enqueuer: &Enqueuer, jobs: Vec<(TenantId, NewJob)>) -> Vec<JobId> {
    enqueuer
        .enqueue_batch(jobs)
        .await
        .expect("enqueue")
        .into_iter()
        .map(|done| {
            assert!(done.created, "a new job");
            done.id
        })
        .collect()
}

/// Signs a job with the test key and inserts it straight into the queue, the way
/// `Enqueuer::enqueue_batch_in` does but without its validation (a caller that bypasses it).
pub async fn insert_signed(
    db: &TestDb,
    admin: &PgPool,
    tenant: TenantId,
    kind: &str,
    args: serde_json::Value,
) -> JobId {
    let now = chrono::Utc::now().timestamp();
    let job = tenant_worker::envelope::Unsigned {
        job_id: JobId::new(),
        tenant_id: tenant,
        kind: kind.to_string(),
        args,
        issued_at: now,
        expires_at: now + 3600,
    };
    let payload = serde_json::to_vec(&db.signer.sign(&job)).unwrap();
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata)
         values ($1, $2, $3, 'Pending', 0, $4, now(), 0, hstore(array['tenant_id', 'kind'], array[$5, $6]))",
    )
    .bind(job.job_id.to_ulid().to_string())
    .bind(&db.settings.worker.queue)
    .bind(payload)
    .bind(db.settings.worker.max_attempts as i32)
    .bind(tenant.to_string())
    .bind(kind)
    .execute(admin)
    .await
    .unwrap();
    job.job_id
}

/// The apalis row id of a job (its id as a ULID).
pub fn row_id(job: JobId) -> String {
    job.to_ulid().to_string()
}

/// A job as `jobs show` sees it.
pub async fn job_info(queue_pool: &PgPool, job: JobId) -> tenant_worker::queue::JobInfo {
    tenant_worker::queue::show(queue_pool, &job.to_string())
        .await
        .expect("job exists")
}

/// Runs the real worker with `catalog` until the queue is idle.
pub async fn run_worker(db: &TestDb, catalog: Catalog) -> Summary {
    let worker = db.worker(catalog).await;
    tokio::time::timeout(
        Duration::from_secs(120),
        worker.run(
            RunOptions {
                until_idle: true,
                name: None,
            },
            CancellationToken::new(),
        ),
    )
    .await
    .expect("worker finished in time")
    .expect("worker ran")
}

/// Creates the job-history table and trigger (every change of an apalis row, stamped by the
/// database clock).
pub async fn record_queue_history(admin: &PgPool) {
    sqlx::Executor::execute(
        admin,
        r#"create table public.job_history (
                   seq bigserial primary key, id text, status text, attempts int,
                   run_at timestamptz, lock_at timestamptz, done_at timestamptz,
                   at timestamptz not null default clock_timestamp());
               create function public.log_job() returns trigger language plpgsql security definer
                   set search_path = pg_catalog, public as $$
               begin
                   insert into public.job_history (id, status, attempts, run_at, lock_at, done_at)
                   values (new.id, new.status, new.attempts, new.run_at, new.lock_at, new.done_at);
                   return new;
               end $$;
               create trigger log_job after insert or update on apalis.jobs
                   for each row execute function public.log_job();"#,
    )
    .await
    .unwrap();
}

/// The repository's `jobs/` folder.
pub fn shipped_jobs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("jobs")
}

/// The declared jobs shipped in `jobs/`.
pub fn shipped_catalog() -> Catalog {
    Catalog::load(&shipped_jobs_dir(), true).expect("the shipped declared jobs load")
}
