//! The tenant-scoped transaction: the only way tenant-worker touches tenant data.
//!
//! A [`Scope`] hands out [`ScopedTx`]s on the app role's pool. Every scoped transaction begins
//! by setting, transaction-locally, `app.tenant_id` and `app.tenant_ctx`: a context *sealed*
//! for this one transaction with a key the app role cannot read ([`ContextKey`]). Every tenant
//! policy requires the seal to verify (`public.tenant_context_valid()`), so whatever the SQL in
//! the transaction says, and whatever it sets, it sees one tenant's rows or none.
//!
//! What the seal stops: job SQL that sets `app.tenant_id` (or `SET LOCAL`, `RESET`, a
//! function that runs SQL text) to reach another tenant; a context copied from an earlier
//! transaction (it names that transaction's server process and start); a context past its
//! expiry. What it does not stop: a process that holds the key (the worker itself,
//! compromised), or a superuser.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac as _};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres};

use crate::ids::TenantId;

/// Errors of scoped transactions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The tenant context was changed inside a scoped transaction; it was rolled back.
    #[error("the job changed the tenant context (app.tenant_id); its transaction was rolled back")]
    ContextTampered,
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The key that seals tenant contexts: its id and 32 secret bytes, from the owner-only table
/// `tenant_context_keys` (made by `setup`, replaced by `tenant-worker keys rotate-context`).
#[derive(Clone)]
pub struct ContextKey {
    id: i32,
    key: Arc<SecretBox<[u8; 32]>>,
}

impl std::fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ContextKey {
    /// The key in force, read through `admin` (a connection that may read the owner's
    /// tables: the admin or owner role).
    ///
    /// # Errors
    /// Database errors; [`sqlx::Error::RowNotFound`] when the database has no key (run
    /// `tenant-worker setup`).
    pub async fn load(admin: &PgPool) -> sqlx::Result<Self> {
        let (id, key): (i32, Vec<u8>) = sqlx::query_as(
            "select id, key from public.tenant_context_keys
             where valid_until is null order by id desc limit 1",
        )
        .fetch_one(admin)
        .await?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| sqlx::Error::Protocol("a context key is not 32 bytes".into()))?;
        Ok(Self {
            id,
            key: Arc::new(SecretBox::new(Box::new(key))),
        })
    }

    /// Puts a new key in force and retires the keys in force until now: they keep verifying
    /// contexts for `grace` (so running workers, which look for a new key once a minute, and
    /// transactions already sealed with an old key, carry on), then stop. Keys retired longer
    /// ago are deleted. Returns the new key's id.
    ///
    /// `admin` must be able to write the owner's tables (the admin or owner role).
    ///
    /// # Errors
    /// Database errors; nothing changes unless all of it succeeds.
    pub async fn rotate(admin: &PgPool, grace: Duration) -> sqlx::Result<i32> {
        let mut tx = admin.begin().await?;
        sqlx::query("delete from public.tenant_context_keys where valid_until <= now()")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "update public.tenant_context_keys
                set valid_until = now() + make_interval(secs => $1)
              where valid_until is null",
        )
        .bind(grace.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        let id: i32 = sqlx::query_scalar(
            "insert into public.tenant_context_keys (key) select public.gen_random_bytes(32)
             returning id",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The key's id.
    pub fn id(&self) -> i32 {
        self.id
    }

    fn mac(&self, text: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose_secret())
            .expect("HMAC takes a key of any length");
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The sealed context for `tenant` in the transaction whose binding is `binding` (what
    /// [`BINDING`] returns in it), valid until `expires` (Unix seconds):
    /// `v1.<key>.<tenant>.<expires>.<binding>.<hmac>`.
    pub fn seal(&self, tenant: TenantId, expires: i64, binding: &str) -> String {
        let text = format!(
            "v1.{}.{}.{expires}.{binding}",
            self.id,
            tenant.0.hyphenated()
        );
        let mac = self.mac(&text);
        format!("{text}.{mac}")
    }

    /// Sets `tenant`'s context in the transaction open on `conn`, sealed with this key for that
    /// transaction and valid until `expires` (Unix seconds), as [`Scope::begin`] does for its
    /// own: for a transaction that [`Scope`] does not make (another role's, say) that must run
    /// in one tenant's context.
    ///
    /// # Errors
    /// Database errors. Outside a transaction the settings end with their statement.
    pub async fn enter(
        &self,
        conn: &mut PgConnection,
        tenant: TenantId,
        expires: i64,
    ) -> sqlx::Result<()> {
        let binding: String = sqlx::query_scalar(BINDING).fetch_one(&mut *conn).await?;
        sqlx::query(SET_CONTEXT)
            .bind(tenant.0.hyphenated().to_string())
            .bind(self.seal(tenant, expires, &binding))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// The seal that lets `public.complete_job_runs` release the guard of the transaction
    /// with this binding.
    fn done_seal(&self, binding: &str) -> String {
        self.mac(&format!("v1.done.{binding}"))
    }
}

/// The query that returns what a context is bound to, in the transaction it runs in: the
/// server process and the transaction's start (`public.tenant_context_binding()`).
pub const BINDING: &str = "select public.tenant_context_binding()";

/// Sets a transaction's tenant and its sealed context: `$1` the tenant id, `$2` the seal.
const SET_CONTEXT: &str =
    "select set_config('app.tenant_id', $1, true), set_config('app.tenant_ctx', $2, true)";

/// Where the [`Scope`] reads a newer context key from after a rotation.
struct KeySource {
    admin_url: SecretString,
    checked: std::sync::Mutex<Instant>,
}

/// How often a scope with a key source looks for a newer key.
const KEY_REFRESH: Duration = Duration::from_secs(60);

/// How long a context made by [`Scope::begin`] stays valid (it is bound to its transaction
/// anyway; this bounds a transaction left open).
const DEFAULT_CONTEXT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where scoped transactions come from: the app role's connection pool and the context key.
///
/// Hold one per process and clone it freely (it is a handle). Application code uses it for
/// its own tenant-scoped reads and writes outside jobs:
///
/// ```no_run
/// # async fn demo(scope: tenant_worker::Scope, tenant: tenant_worker::TenantId) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = scope.begin(tenant).await?;
/// let n: i64 = sqlx::query_scalar("select count(*) from v_invoice")
///     .fetch_one(tx.conn().await?)
///     .await?;
/// tx.commit().await?;
/// println!("{tenant} has {n} invoices");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Scope {
    pool: PgPool,
    key: Arc<RwLock<ContextKey>>,
    source: Option<Arc<KeySource>>,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("key", &self.key())
            .finish_non_exhaustive()
    }
}

impl Scope {
    /// Scoped transactions on `pool`, which must connect as the app role (the role that is
    /// subject to Row-Level Security; see `tenant-worker audit`), sealed with `key`.
    pub fn new(pool: PgPool, key: ContextKey) -> Self {
        Self {
            pool,
            key: Arc::new(RwLock::new(key)),
            source: None,
        }
    }

    /// Looks for a newer context key through `admin_url` once a minute (in the background),
    /// so a long-running process follows `keys rotate-context` within the old key's grace.
    pub fn refreshing_from(mut self, admin_url: SecretString) -> Self {
        self.source = Some(Arc::new(KeySource {
            admin_url,
            checked: std::sync::Mutex::new(Instant::now()),
        }));
        self
    }

    /// The key contexts are sealed with now.
    pub fn key(&self) -> ContextKey {
        self.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn refresh_if_due(&self) {
        let Some(source) = &self.source else {
            return;
        };
        {
            let mut checked = source.checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.elapsed() < KEY_REFRESH {
                return;
            }
            *checked = Instant::now();
        }
        let (source, cell) = (source.clone(), self.key.clone());
        tokio::spawn(async move {
            let url = source.admin_url.expose_secret().to_string();
            let loaded = async {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await?;
                let key = ContextKey::load(&pool).await;
                pool.close().await;
                key
            }
            .await;
            match loaded {
                Ok(key) => {
                    let mut current = cell.write().unwrap_or_else(|e| e.into_inner());
                    if key.id != current.id {
                        tracing::info!(key_id = key.id, "sealing tenant contexts with a new key");
                        *current = key;
                    }
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "could not look for a newer context key")
                }
            }
        });
    }

    /// The app role's pool. Queries on it outside a scoped transaction see no tenant data.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a scoped transaction for `tenant` in one round trip.
    ///
    /// # Errors
    /// Database errors (pool exhausted, connection lost).
    pub async fn begin(&self, tenant: TenantId) -> Result<ScopedTx> {
        Ok(self
            .begin_then(tenant, DEFAULT_CONTEXT_TTL, false, None)
            .await?
            .0)
    }

    /// Begins a scoped transaction whose context is valid for `ttl`, and runs `then` right
    /// after setting it, in the same round trip (one simple-query message). Returns the last
    /// row `then` produced. `then` must be a statement built from values this crate formatted
    /// itself (it cannot take parameters). With `guard`, the transaction can only commit
    /// through the worker's completion (`public.complete_job_runs`): a job's own `COMMIT`
    /// fails.
    ///
    /// Two round trips: `BEGIN` with the transaction's binding (which the seal names), then
    /// the context, the guard and `then`.
    ///
    /// # Errors
    /// Database errors; the connection is then closed (see [`ScopedTx`]).
    pub(crate) async fn begin_then(
        &self,
        tenant: TenantId,
        ttl: Duration,
        guard: bool,
        then: Option<&str>,
    ) -> Result<(ScopedTx, Option<PgRow>)> {
        self.refresh_if_due();
        let key = self.key();
        let conn = self.pool.acquire().await?;
        // From here on, dropping `tx` before commit or rollback closes the connection.
        let mut tx = ScopedTx {
            conn,
            tenant,
            open: true,
            savepoint: Savepoint::None,
            ctx: String::new(),
            done_seal: String::new(),
        };
        let row = sqlx::raw_sql("begin; select public.tenant_context_binding()")
            .fetch_all(&mut *tx.conn)
            .await?
            .pop()
            .ok_or(sqlx::Error::RowNotFound)?;
        let binding: String = sqlx::Row::try_get(&row, 0)?;
        let expires = chrono::Utc::now().timestamp() + ttl.as_secs().max(1) as i64;
        tx.ctx = key.seal(tenant, expires, &binding);
        tx.done_seal = key.done_seal(&binding);
        if !guard && then.is_none() {
            // Alone, the context goes as a prepared statement: cheaper for the server than a
            // simple query it parses and plans every time.
            sqlx::query(SET_CONTEXT)
                .bind(tenant.0.hyphenated().to_string())
                .bind(&tx.ctx)
                .execute(&mut *tx.conn)
                .await?;
            return Ok((tx, None));
        }
        // Every value inlined is one this crate formatted (a parsed UUID, the seal's digits and
        // hex), so BEGIN's follow-up, the context and `then` can travel in one round trip.
        let mut sql = tx.set_context();
        if guard {
            sql.push_str(";\ninsert into public.scope_guards default values");
        }
        if let Some(then) = then {
            sql.push_str(";\n");
            sql.push_str(then);
        }
        let rows = sqlx::raw_sql(AssertSqlSafe(sql))
            .fetch_all(&mut *tx.conn)
            .await?;
        let last = then.and_then(|_| rows.into_iter().next_back());
        Ok((tx, last))
    }
}

/// A transaction on the app role's pool whose first statement set `app.tenant_id`
/// transaction-locally. Every query through it sees one tenant, whatever its SQL says.
///
/// Jobs receive `&mut ScopedTx` and reach the database only through [`ScopedTx::conn`]: there
/// is no pool, URL or second connection behind it, and the job cannot commit or roll it back
/// (that takes the value, which only the worker holds).
///
/// The setting is made with `is_local = true` (the function form of `SET LOCAL`), so it ends
/// with the transaction and cannot leak to the next user of the pooled connection. `commit`
/// first checks the setting is unchanged, so a job that tried to switch tenants mid-way has
/// its work rolled back.
///
/// The transaction is driven with plain `BEGIN`/`COMMIT` statements on a pooled connection
/// rather than sqlx's `Transaction`, so that the statements around a job can share round trips.
/// **Dropping it while the transaction is open closes the connection** instead of returning it
/// to the pool: the server rolls back and the tenant context dies with the session. That covers
/// every way a job can end early (an error, a timeout or shutdown cut-off dropping its future
/// mid-statement, a panic), including a `BEGIN` cancelled in flight, which sqlx's own
/// `Transaction` can return to the pool still open (transact-rs/sqlx#4385). So no connection
/// ever goes back to the pool with a tenant set, without a check on every release.
pub struct ScopedTx {
    conn: PoolConnection<Postgres>,
    tenant: TenantId,
    /// A transaction may be open on `conn` (set before `BEGIN` is sent).
    open: bool,
    /// A savepoint to take before the next statement (see [`ScopedTx::conn`]).
    savepoint: Savepoint,
    /// The sealed context of this transaction.
    ctx: String,
    /// What lets `complete_job_runs` release this transaction's guard.
    done_seal: String,
}

/// The worker's per-job savepoint inside a shared round: taken lazily, with the tenant context
/// set again, so a job that sends no statement costs no round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Savepoint {
    /// None wanted (a transaction of its own).
    None,
    /// Wanted: `savepoint j<n>` goes out before the job's first statement.
    Pending(u32),
    /// Taken: the job's statements since it can be rolled back with `rollback to j<n>`.
    Taken(u32),
}

impl std::fmt::Debug for ScopedTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedTx")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Drop for ScopedTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// SQLSTATE raised by `public.complete_job_runs` when the tenant context changed.
const CONTEXT_CHANGED: &str = "TW001";

impl ScopedTx {
    /// The tenant this transaction is scoped to.
    pub fn tenant_id(&self) -> TenantId {
        self.tenant
    }

    /// The statement that sets this transaction's tenant context (again).
    fn set_context(&self) -> String {
        format!(
            "select set_config('app.tenant_id', '{}', true), set_config('app.tenant_ctx', '{}', true)",
            self.tenant.0.hyphenated(),
            self.ctx
        )
    }

    /// The seal `public.complete_job_runs` wants for this transaction.
    pub(crate) fn done_seal(&self) -> &str {
        &self.done_seal
    }

    /// The connection, for running queries: `query.fetch_all(tx.conn().await?).await?`.
    ///
    /// Async because a job that shares its transaction with other jobs of its tenant (a round)
    /// first takes its savepoint here, on its first statement.
    ///
    /// # Errors
    /// Database errors taking that savepoint.
    pub async fn conn(&mut self) -> sqlx::Result<&mut PgConnection> {
        if let Savepoint::Pending(n) = self.savepoint {
            // The tenant is set again with the savepoint: whatever a job before it in the
            // round did, this job's statements run in its own verified tenant's context (a job
            // that changed it also fails the whole round at its end).
            sqlx::raw_sql(AssertSqlSafe(format!(
                "savepoint j{n}; {}",
                self.set_context()
            )))
            .execute(&mut *self.conn)
            .await?;
            self.savepoint = Savepoint::Taken(n);
        }
        Ok(&mut self.conn)
    }

    /// The connection without taking a pending savepoint: for the round's own statements.
    pub(crate) fn raw_conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Replaces the savepoint state; returns the old one.
    pub(crate) fn set_savepoint(&mut self, savepoint: Savepoint) -> Savepoint {
        std::mem::replace(&mut self.savepoint, savepoint)
    }

    /// Checks the tenant context is still this transaction's tenant.
    ///
    /// # Errors
    /// [`Error::ContextTampered`] when it changed.
    pub async fn check_context(&mut self) -> Result<()> {
        let intact: Option<bool> = sqlx::query_scalar(
            "select current_setting('app.tenant_id', true) = $1
                    and current_setting('app.tenant_ctx', true) = $2
                    and public.tenant_context_valid()",
        )
        .bind(self.tenant.0.hyphenated().to_string())
        .bind(&self.ctx)
        .fetch_one(&mut *self.conn)
        .await?;
        if intact != Some(true) {
            return Err(Error::ContextTampered);
        }
        Ok(())
    }

    /// Commits. What the transaction did was done under its verified context: had SQL in it
    /// changed the context, it would have read and written nothing of any tenant from then on
    /// (the policies verify the seal on every statement), so there is nothing to check here;
    /// [`ScopedTx::check_context`] tells whether it changed, for code that wants to know.
    ///
    /// # Errors
    /// Database errors.
    pub async fn commit(self) -> Result<()> {
        self.end("commit").await
    }

    /// Runs `last` and commits, in one round trip. When `last` fails nothing is committed
    /// (the server skips the rest of the message) and the transaction is rolled back. The
    /// worker's `last` completes the run records through `public.complete_job_runs`, which is
    /// also the tenant-context check: its refusal comes back as [`Error::ContextTampered`].
    ///
    /// # Errors
    /// [`Error::ContextTampered`] or database errors.
    pub(crate) async fn commit_after(mut self, last: &str) -> Result<()> {
        let sql = format!("{last};\ncommit;\n{LEFTOVER}");
        match sqlx::raw_sql(AssertSqlSafe(sql))
            .fetch_all(&mut *self.conn)
            .await
        {
            Ok(rows) => {
                self.open = false;
                self.close_if_leftover(rows.last());
                Ok(())
            }
            Err(e) => {
                let _ = self.rollback().await;
                let changed = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == CONTEXT_CHANGED);
                Err(if changed {
                    Error::ContextTampered
                } else {
                    e.into()
                })
            }
        }
    }

    /// Rolls back.
    ///
    /// # Errors
    /// Database errors (the connection is then closed).
    pub async fn rollback(self) -> Result<()> {
        self.end("rollback").await
    }

    async fn end(mut self, statement: &'static str) -> Result<()> {
        let rows = sqlx::raw_sql(AssertSqlSafe(format!("{statement};\n{LEFTOVER}")))
            .fetch_all(&mut *self.conn)
            .await?;
        self.open = false;
        self.close_if_leftover(rows.last());
        Ok(())
    }

    /// Closes the connection instead of returning it to the pool when the session carries
    /// something one tenant's SQL could use against the next tenant's on that connection.
    /// Session-level settings are reset at the end of every scoped transaction (`RESET ALL`
    /// in [`LEFTOVER`]): job SQL can set any of them session-wide (`set_config(.., false)`), a
    /// tenant's or its own. What a reset cannot undo closes the connection:
    /// - a temporary object: a temporary table comes first in name resolution, so a table
    ///   `pg_temp.records` left by one tenant's job would receive the next tenant's unqualified
    ///   `insert into records` on that connection, for the first tenant to read later;
    /// - a statement prepared with SQL `PREPARE`: it could take the name of one sqlx prepared
    ///   for its own cached queries, and run in the next tenant's transaction in its place.
    fn close_if_leftover(&mut self, row: Option<&PgRow>) {
        let unsafe_session: Option<bool> = row.and_then(|r| sqlx::Row::try_get(r, 0).ok());
        if unsafe_session != Some(false) {
            // Imports and rollups use temporary tables: expected, and a reconnect is cheap
            // beside them.
            tracing::debug!(
                "the session has temporary objects or SQL-prepared statements; closing the connection"
            );
            self.conn.close_on_drop();
        }
    }
}

/// Sent after a scoped transaction ends: resets every session-level setting (to the values
/// the session started with), then asks whether the session has a schema of temporary objects
/// (made on the first temporary object, it stays for the session: a cheap test, with no
/// catalog scan) or statements prepared with SQL `PREPARE`.
const LEFTOVER: &str = "reset all;
    select pg_catalog.pg_my_temp_schema() <> 0::oid
        or exists (select 1 from pg_catalog.pg_prepared_statements where from_sql)";
