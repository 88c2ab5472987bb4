//! The tenant-scoped transaction: the only way tenant-worker touches tenant data.
//!
//! A [`Scope`] hands out [`ScopedTx`]s on the app role's pool. Every scoped transaction's first
//! statement sets `app.tenant_id` transaction-locally, so every query through it sees one
//! tenant, whatever its SQL says: Row-Level Security, enabled and forced on every tenant table,
//! filters the rest.

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

/// Where scoped transactions come from: the app role's connection pool.
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
#[derive(Debug, Clone)]
pub struct Scope {
    pool: PgPool,
}

impl Scope {
    /// Scoped transactions on `pool`, which must connect as the app role (the role that is
    /// subject to Row-Level Security; see `tenant-worker audit`).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
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
        Ok(self.begin_then(tenant, None).await?.0)
    }

    /// Begins a scoped transaction and runs `then` right after `set_config`, in the same round
    /// trip (one simple-query message). Returns the last row `then` produced. `then` must be a
    /// statement built from values this crate formatted itself (it cannot take parameters).
    ///
    /// # Errors
    /// Database errors; the connection is then closed (see [`ScopedTx`]).
    pub(crate) async fn begin_then(
        &self,
        tenant: TenantId,
        then: Option<&str>,
    ) -> Result<(ScopedTx, Option<PgRow>)> {
        let conn = self.pool.acquire().await?;
        // From here on, dropping `tx` before commit or rollback closes the connection.
        let mut tx = ScopedTx {
            conn,
            tenant,
            open: true,
            savepoint: Savepoint::None,
        };
        // The tenant id is a parsed UUID, formatted by us: safe to inline, and inlining lets
        // BEGIN, set_config and `then` travel in one round trip.
        let mut sql = format!(
            "begin; select set_config('app.tenant_id', '{}', true)",
            tenant.0.hyphenated()
        );
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
                "savepoint j{n}; select set_config('app.tenant_id', '{}', true)",
                self.tenant.0.hyphenated()
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
        let current: Option<String> =
            sqlx::query_scalar("select current_setting('app.tenant_id', true)")
                .fetch_one(&mut *self.conn)
                .await?;
        if current.as_deref() != Some(self.tenant.0.hyphenated().to_string().as_str()) {
            return Err(Error::ContextTampered);
        }
        Ok(())
    }

    /// Commits after checking the tenant context is unchanged.
    ///
    /// # Errors
    /// [`Error::ContextTampered`] (the transaction is rolled back) or database errors.
    pub async fn commit(mut self) -> Result<()> {
        if let Err(e) = self.check_context().await {
            let _ = self.rollback().await;
            return Err(e);
        }
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
        let sql = format!("{last};\ncommit");
        match sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *self.conn)
            .await
        {
            Ok(_) => {
                self.open = false;
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
        sqlx::raw_sql(statement).execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }
}
