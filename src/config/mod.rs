//! Typed settings, loaded from `worker.toml` and overridden by the environment.
//!
//! Layering (later wins): built-in defaults, then the TOML file (path from `--config`, default
//! `worker.toml`, optional), then environment variables named
//! `TENANT_WORKER__<SECTION>__<KEY>` (for example `TENANT_WORKER__DATABASE__ADMIN_URL`).
//!
//! Connection URLs and passwords are [`SecretString`]s: they never reach `Debug` output, logs or
//! error messages. When a URL has to be shown (an unreachable database, say), it is shown by
//! [`redact_url`], which drops the password.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

mod http;

pub use http::{ALGORITHMS, HttpKindSettings, HttpSettings, JwtSettings};

/// Errors from loading or validating settings. Each names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config crate could not read or deserialize a source.
    #[error("invalid configuration")]
    Load(#[from] config::ConfigError),
    /// A value was read but is not acceptable.
    #[error("invalid configuration value for `{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `database.admin_url`.
        key: &'static str,
        /// Why it was refused (never contains a secret).
        reason: String,
    },
    /// A key that no setting has, usually a misspelling: refused, so that a typo in, say,
    /// `database.admin_url` cannot quietly select the local default cluster.
    #[error(
        "unknown setting `{key}` (in the config file, or the environment variable `{env}`){}",
        suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default()
    )]
    Unknown {
        /// The dotted key as given.
        key: String,
        /// The environment variable that would set it.
        env: String,
        /// The nearest known key, when one is near.
        suggestion: Option<String>,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The fewest connections per pool with which the worker runs (see
/// [`Settings::validate`]).
pub const MIN_CONNECTIONS: u32 = 3;

/// The error for a key no setting has, with the nearest known key of its section.
fn unknown_key(key: String) -> Error {
    use serde_aux::serde_introspection::serde_introspect as fields;
    let (section, name) = key.rsplit_once('.').unwrap_or(("", key.as_str()));
    let known: &[&str] = match section {
        "" => fields::<Settings>(),
        "database" => fields::<DatabaseSettings>(),
        "roles" => fields::<RoleSettings>(),
        "keys" => fields::<KeySettings>(),
        "worker" => fields::<WorkerSettings>(),
        "dev" => fields::<DevSettings>(),
        "exports" => fields::<ExportSettings>(),
        "imports" => fields::<ImportSettings>(),
        "jobs" => fields::<JobsSettings>(),
        "http" => fields::<HttpSettings>(),
        "http.jwt" => fields::<JwtSettings>(),
        "http.kinds" => fields::<HttpKindSettings>(),
        s if s.starts_with("kinds.") && !s["kinds.".len()..].contains('.') => {
            fields::<KindSettings>()
        }
        _ => &[],
    };
    // Keys that were renamed.
    let renamed = match key.as_str() {
        k if k == "worker.timeouts" || k.starts_with("worker.timeouts.") => {
            Some("kinds.<kind>.timeout_secs".to_string())
        }
        _ => None,
    };
    let suggestion = renamed.or_else(|| {
        known
            .iter()
            .map(|k| (strsim::damerau_levenshtein(name, k), k))
            .filter(|(d, k)| *d <= (k.len() / 4).max(1))
            .min()
            .map(|(_, k)| {
                if section.is_empty() {
                    k.to_string()
                } else {
                    format!("{section}.{k}")
                }
            })
    });
    let env = format!("TENANT_WORKER__{}", key.replace('.', "__").to_uppercase());
    Error::Unknown {
        key,
        env,
        suggestion,
    }
}

/// The whole settings tree.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where PostgreSQL is.
    pub database: DatabaseSettings,
    /// The least-privilege roles `setup` creates.
    pub roles: RoleSettings,
    /// Job signing and verifying keys.
    pub keys: KeySettings,
    /// Worker behaviour.
    pub worker: WorkerSettings,
    /// The persistent local development cluster used when no database is configured.
    pub dev: DevSettings,
    /// Where exports are written.
    pub exports: ExportSettings,
    /// Where import files are read from.
    pub imports: ImportSettings,
    /// Where declared jobs are read from.
    pub jobs: JobsSettings,
    /// The HTTP enqueue API (`tenant-worker serve`); checked by [`HttpSettings::validate`]
    /// when it is served.
    pub http: HttpSettings,
    /// Per-kind policy overrides, by kind name (`[kinds.export] timeout_secs = 3600`): they
    /// win over the kind's own defaults.
    pub kinds: BTreeMap<String, KindSettings>,
}

/// Overrides of one job kind's policy. Every field is optional; what is unset comes from the
/// kind itself, then from `[worker]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct KindSettings {
    /// How long one run may take.
    pub timeout_secs: Option<u64>,
    /// Attempts before a failing job is dead (stored with each job at enqueue).
    pub max_attempts: Option<u32>,
    /// First retry delay; doubles per attempt, with jitter.
    pub backoff_base_ms: Option<u64>,
    /// Upper bound of the retry delay.
    pub backoff_max_ms: Option<u64>,
    /// Whether short jobs of this kind may share a transaction with other such jobs of their
    /// tenant (`false` turns rounds off for the kind; `true` cannot turn them on for a kind
    /// that does not allow it).
    pub shares_rounds: Option<bool>,
}

/// Export output.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ExportSettings {
    /// Root folder; files go to `<dir>/<tenant id>/<source>/<job id>.<ext>`.
    pub dir: PathBuf,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("exports"),
        }
    }
}

/// Import inboxes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ImportSettings {
    /// Root folder; a tenant's files are read from `<dir>/<tenant id>/` only.
    pub dir: PathBuf,
}

impl Default for ImportSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("imports"),
        }
    }
}

/// Declared jobs (TOML + SQL).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct JobsSettings {
    /// Folder of `*.toml` declared jobs. Unset: `./jobs` if it exists.
    pub dir: Option<PathBuf>,
}

impl JobsSettings {
    /// The folder to load declared jobs from, and whether it must exist: the configured
    /// folder (required), else `./jobs` (used when present).
    pub fn source(&self) -> (&Path, bool) {
        match &self.dir {
            Some(dir) => (dir, true),
            None => (Path::new("jobs"), false),
        }
    }
}

/// Database connection settings. With no `admin_url`, the local development cluster is used.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// A connection URL with a role that may create roles and databases (used by `setup`,
    /// `migrate`, `tenant` and `audit`). Absent: the embedded local default.
    pub admin_url: Option<SecretString>,
    /// The worker's data connection (app role). Derived from `admin_url` when absent.
    pub app_url: Option<SecretString>,
    /// The queue connection (queue role). Derived from `admin_url` when absent.
    pub queue_url: Option<SecretString>,
    /// Pool size of each of the worker's pools.
    pub max_connections: u32,
    /// How long to wait for a connection before failing.
    pub connect_timeout_secs: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            admin_url: None,
            app_url: None,
            queue_url: None,
            max_connections: 10,
            connect_timeout_secs: 10,
        }
    }
}

/// Role names (cluster-wide) and their passwords.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RoleSettings {
    /// Owns tables and views; never used by the worker at run time. `NOLOGIN`.
    pub owner: String,
    /// The locked-down role every tenant-data query runs as.
    pub app: String,
    /// The job-queue role (apalis schema only).
    pub queue: String,
    /// The scheduler's role: reads all tenants' schedules through one narrow policy.
    pub scheduler: String,
    /// Password given to the app role (optional: trust/peer setups need none).
    pub app_password: Option<SecretString>,
    /// Password given to the queue role.
    pub queue_password: Option<SecretString>,
    /// Password given to the scheduler role.
    pub scheduler_password: Option<SecretString>,
}

impl Default for RoleSettings {
    fn default() -> Self {
        Self {
            owner: "tw_owner".into(),
            app: "tw_app".into(),
            queue: "tw_queue".into(),
            scheduler: "tw_scheduler".into(),
            app_password: None,
            queue_password: None,
            scheduler_password: None,
        }
    }
}

/// Signing (enqueue side) and verifying (worker side) keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct KeySettings {
    /// PKCS#8 PEM file with the Ed25519 private key used to sign jobs.
    pub signing_key_file: Option<PathBuf>,
    /// The key id written into envelopes signed with `signing_key_file`.
    pub signing_key_id: Option<String>,
    /// Public keys accepted by workers, by key id: `kid = "path/to/key.pub.pem"`.
    pub verifying: BTreeMap<String, PathBuf>,
    /// How long a signed job stays valid after it was issued (seconds).
    pub job_ttl_secs: u64,
}

impl Default for KeySettings {
    fn default() -> Self {
        Self {
            signing_key_file: None,
            signing_key_id: None,
            verifying: BTreeMap::new(),
            job_ttl_secs: 7 * 24 * 3600,
        }
    }
}

/// How the worker fetches, runs and retries jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// The apalis queue (job_type) all tenant jobs go through.
    pub queue: String,
    /// Jobs run at the same time by one worker process.
    pub concurrency: usize,
    /// Jobs fetched per round trip.
    pub batch_size: usize,
    /// Attempts before a failing job is dead.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with full jitter.
    pub backoff_base_ms: u64,
    /// Upper bound of the retry delay.
    pub backoff_max_ms: u64,
    /// Fallback poll for delayed jobs (LISTEN/NOTIFY wakes the worker for new ones).
    pub poll_interval_ms: u64,
    /// Worker heartbeat; a worker silent for `heartbeat_secs * missed_heartbeats` is
    /// presumed dead and its jobs are re-enqueued.
    pub heartbeat_secs: u64,
    /// See `heartbeat_secs`.
    pub missed_heartbeats: usize,
    /// On SIGTERM/SIGINT, how long in-flight jobs may take to finish.
    pub shutdown_timeout_secs: u64,
    /// Default per-job timeout (a kind may set its own; `[kinds.<kind>]` overrides both).
    pub job_timeout_secs: u64,
    /// Largest accepted job payload in bytes (envelope included).
    pub max_payload_bytes: usize,
    /// Refuse to start when the security audit fails (keep this on).
    pub audit_on_start: bool,
    /// Share workers between tenants by weight (on), or serve the oldest runnable job's
    /// tenant first (off: strict FIFO between tenants, one tenant's backlog holds up all).
    pub fairness: bool,
    /// With `fairness`, about how long another tenant's job waits for a slot while this
    /// worker's slots are all busy: one fetch takes about `fair_quantum_ms × concurrency` of a
    /// tenant's worker time, so one slot frees about every `fair_quantum_ms`.
    pub fair_quantum_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            queue: "tenant-jobs".into(),
            concurrency: 8,
            batch_size: 32,
            max_attempts: 5,
            backoff_base_ms: 1_000,
            backoff_max_ms: 300_000,
            poll_interval_ms: 500,
            heartbeat_secs: 5,
            missed_heartbeats: 3,
            shutdown_timeout_secs: 30,
            job_timeout_secs: 300,
            max_payload_bytes: 256 * 1024,
            audit_on_start: true,
            fairness: true,
            fair_quantum_ms: 20,
        }
    }
}

/// The persistent local development cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DevSettings {
    /// Directory holding the local cluster (`pg/`) and development keys (`keys/`).
    pub data_dir: PathBuf,
}

impl Default for DevSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".tenant-worker"),
        }
    }
}

impl Settings {
    /// Loads settings from `path` (optional file; an explicitly given path must exist) and the
    /// environment, then validates them.
    ///
    /// # Errors
    /// [`Error::Load`] when a source cannot be read or a value has the wrong type (the message
    /// names the key), [`Error::Invalid`] when a value is refused by validation.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut builder = config::Config::builder();
        builder = match path {
            Some(p) => builder.add_source(config::File::from(p).required(true)),
            None => builder.add_source(config::File::with_name("worker.toml").required(false)),
        };
        let config = builder
            .add_source(
                config::Environment::with_prefix("TENANT_WORKER")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?;
        let mut unknown = Vec::new();
        let settings: Settings =
            serde_ignored::deserialize(config, |path| unknown.push(path.to_string()))?;
        if let Some(key) = unknown.into_iter().next() {
            return Err(unknown_key(key));
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values the types alone cannot.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        for (key, name) in [
            ("roles.owner", &self.roles.owner),
            ("roles.app", &self.roles.app),
            ("roles.queue", &self.roles.queue),
            ("roles.scheduler", &self.roles.scheduler),
        ] {
            check_identifier(key, name)?;
        }
        let names = [
            &self.roles.owner,
            &self.roles.app,
            &self.roles.queue,
            &self.roles.scheduler,
        ];
        for (i, a) in names.iter().enumerate() {
            if names[i + 1..].contains(a) {
                return Err(Error::Invalid {
                    key: "roles",
                    reason: format!("role `{a}` is used for two purposes; each role must differ"),
                });
            }
        }
        for (key, url) in [
            ("database.admin_url", &self.database.admin_url),
            ("database.app_url", &self.database.app_url),
            ("database.queue_url", &self.database.queue_url),
        ] {
            if let Some(url) = url {
                parse_pg_url(key, url.expose_secret())?;
            }
        }
        if self.database.admin_url.is_none()
            && (self.database.app_url.is_some() || self.database.queue_url.is_some())
        {
            return Err(Error::Invalid {
                key: "database.admin_url",
                reason: "app_url/queue_url are set but admin_url is not; set admin_url too".into(),
            });
        }
        if self.database.max_connections < MIN_CONNECTIONS {
            return Err(Error::Invalid {
                key: "database.max_connections",
                reason: format!(
                    "{} is too few: the worker needs at least {MIN_CONNECTIONS} per pool (the \
                     queue pool holds one for LISTEN and fetches and writes outcomes on others)",
                    self.database.max_connections
                ),
            });
        }
        // (key, value, must it be positive, the largest accepted value).
        let ranges: [(&'static str, u64, bool, u64); 12] = [
            (
                "database.max_connections",
                self.database.max_connections as u64,
                true,
                1_000,
            ),
            (
                "database.connect_timeout_secs",
                self.database.connect_timeout_secs,
                false,
                3_600,
            ),
            (
                "worker.concurrency",
                self.worker.concurrency as u64,
                true,
                1_024,
            ),
            (
                "worker.batch_size",
                self.worker.batch_size as u64,
                true,
                10_000,
            ),
            (
                "worker.max_attempts",
                self.worker.max_attempts as u64,
                true,
                1_000,
            ),
            (
                "worker.poll_interval_ms",
                self.worker.poll_interval_ms,
                true,
                3_600_000,
            ),
            (
                "worker.fair_quantum_ms",
                self.worker.fair_quantum_ms,
                true,
                60_000,
            ),
            (
                "worker.heartbeat_secs",
                self.worker.heartbeat_secs,
                true,
                3_600,
            ),
            (
                "worker.missed_heartbeats",
                self.worker.missed_heartbeats as u64,
                true,
                1_000,
            ),
            (
                "worker.job_timeout_secs",
                self.worker.job_timeout_secs,
                true,
                7 * 24 * 3_600,
            ),
            (
                "worker.max_payload_bytes",
                self.worker.max_payload_bytes as u64,
                true,
                64 << 20,
            ),
            (
                "keys.job_ttl_secs",
                self.keys.job_ttl_secs,
                true,
                366 * 24 * 3_600,
            ),
        ];
        for (key, value, positive, most) in ranges {
            let reason = if positive && value == 0 {
                "must be greater than 0".to_string()
            } else if value > most {
                format!("{value} is more than the largest accepted value, {most}")
            } else {
                continue;
            };
            return Err(Error::Invalid { key, reason });
        }
        if self.worker.backoff_base_ms > self.worker.backoff_max_ms {
            return Err(Error::Invalid {
                key: "worker.backoff_base_ms",
                reason: "must not exceed worker.backoff_max_ms".into(),
            });
        }
        if self.worker.queue.is_empty() {
            return Err(Error::Invalid {
                key: "worker.queue",
                reason: "must not be empty".into(),
            });
        }
        if let Some(kid) = &self.keys.signing_key_id {
            crate::ids::KeyId::parse(kid).map_err(|e| Error::Invalid {
                key: "keys.signing_key_id",
                reason: e.to_string(),
            })?;
        }
        for kid in self.keys.verifying.keys() {
            crate::ids::KeyId::parse(kid).map_err(|e| Error::Invalid {
                key: "keys.verifying",
                reason: e.to_string(),
            })?;
        }
        if self.keys.signing_key_file.is_some() != self.keys.signing_key_id.is_some() {
            return Err(Error::Invalid {
                key: "keys.signing_key_id",
                reason: "signing_key_file and signing_key_id must be set together".into(),
            });
        }
        Ok(())
    }

    /// True when a database is configured; false means "use the local default cluster".
    pub fn database_configured(&self) -> bool {
        self.database.admin_url.is_some()
    }
}

/// Refuses role names that would need quoting; keeps generated SQL simple and safe.
fn check_identifier(key: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            key,
            reason: format!(
                "`{name}` is not a plain identifier (lowercase letters, digits, _; at most 63)"
            ),
        })
    }
}

/// Parses a `postgres://` URL, naming `key` (and never the URL's password) on failure.
fn parse_pg_url(key: &'static str, raw: &str) -> Result<url::Url> {
    let url = url::Url::parse(raw).map_err(|e| Error::Invalid {
        key,
        reason: format!("not a URL: {e}"),
    })?;
    if url.scheme() != "postgres" && url.scheme() != "postgresql" {
        return Err(Error::Invalid {
            key,
            reason: format!(
                "scheme must be postgres:// (got `{}://`) in {}",
                url.scheme(),
                redact_url(raw)
            ),
        });
    }
    PgConnectOptions::from_str(raw).map_err(|e| Error::Invalid {
        key,
        reason: format!(
            "{} in {}",
            strip_secret(&e.to_string(), &url),
            redact_url(raw)
        ),
    })?;
    Ok(url)
}

fn strip_secret(message: &str, url: &url::Url) -> String {
    match url.password() {
        Some(p) if !p.is_empty() => message.replace(p, "***"),
        _ => message.to_string(),
    }
}

/// Shows a connection URL without its password (`postgres://app:***@host/db`).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

/// Returns `admin_url` with the user (and password) replaced: how the app and queue URLs are
/// derived when they are not configured.
pub fn derive_url(admin_url: &str, user: &str, password: Option<&SecretString>) -> String {
    match url::Url::parse(admin_url) {
        Ok(mut url) => {
            let _ = url.set_username(user);
            let _ = url.set_password(password.map(|p| p.expose_secret()));
            url.to_string()
        }
        Err(_) => admin_url.to_string(),
    }
}

/// Replaces the database name of a URL (used for per-test databases and `setup`).
pub fn with_database(url: &str, database: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_path(&format!("/{database}"));
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// The database name in a URL (`postgres` when none is given).
pub fn database_name(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .map(|u| u.path().trim_start_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_password() {
        let shown = redact_url("postgres://app:hunter2@db.example:5432/x");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@db.example"), "{shown}");
    }

    #[test]
    fn derived_url_swaps_user() {
        let pw = SecretString::from("pw");
        let d = derive_url("postgres://root:secret@h:1/db", "tw_app", Some(&pw));
        assert_eq!(d, "postgres://tw_app:pw@h:1/db");
        let d = derive_url("postgres://root:secret@h:1/db", "tw_app", None);
        assert_eq!(d, "postgres://tw_app@h:1/db");
    }

    #[test]
    fn bad_role_name_names_key() {
        let mut s = Settings::default();
        s.roles.app = "App; drop".into();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("roles.app"), "{err}");
    }

    #[test]
    fn bad_url_names_key_without_password() {
        let mut s = Settings::default();
        s.database.admin_url = Some(SecretString::from("mysql://u:topsecret@h/db"));
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("database.admin_url"), "{err}");
        assert!(!err.contains("topsecret"), "{err}");
    }
}
