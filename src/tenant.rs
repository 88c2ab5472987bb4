//! Tenants: the registry (`tenant add/list/suspend/activate`) and the tenant-scoped
//! transaction, the only way the worker touches tenant data.

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Executor, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::envelope::TenantId;

/// Errors of tenant operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// No tenant with this id.
    #[error("no tenant with id {0}")]
    NotFound(TenantId),
    /// Name empty or too long.
    #[error("invalid tenant name: must be 1 to 200 characters")]
    InvalidName,
    /// The tenant context was changed inside a scoped transaction; it was rolled back.
    #[error("the job changed the tenant context (app.tenant_id); its transaction was rolled back")]
    ContextTampered,
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A tenant row.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Tenant {
    /// Id.
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Tenant management runs on the admin connection acting as the owner role, which sees the
/// registry through the `tenant_registry` policy (and nothing of the tenant data).
async fn as_owner(admin: &PgPool, owner: &str) -> Result<Transaction<'static, Postgres>> {
    let mut tx = admin.begin().await?;
    tx.execute(AssertSqlSafe(format!(r#"set local role "{owner}""#)))
        .await?;
    Ok(tx)
}

/// Creates a tenant and returns it.
///
/// # Errors
/// [`Error::InvalidName`] or a database error.
pub async fn add(admin: &PgPool, owner: &str, name: &str) -> Result<Tenant> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(Error::InvalidName);
    }
    let mut tx = as_owner(admin, owner).await?;
    let tenant: Tenant = sqlx::query_as(
        "insert into tenants (id, name) values ($1, $2) returning id, name, status, created_at",
    )
    .bind(Uuid::new_v4())
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(tenant)
}

/// All tenants, oldest first.
///
/// # Errors
/// Database errors.
pub async fn list(admin: &PgPool, owner: &str) -> Result<Vec<Tenant>> {
    let mut tx = as_owner(admin, owner).await?;
    let rows = sqlx::query_as(
        "select id, name, status, created_at from tenants order by created_at, name",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Sets a tenant's status (`active` or `suspended`). Jobs of a suspended tenant are rejected.
///
/// # Errors
/// [`Error::NotFound`] or a database error.
pub async fn set_status(admin: &PgPool, owner: &str, id: TenantId, active: bool) -> Result<()> {
    let mut tx = as_owner(admin, owner).await?;
    let n = sqlx::query("update tenants set status = $2 where id = $1")
        .bind(id)
        .bind(if active { "active" } else { "suspended" })
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    if n == 0 {
        return Err(Error::NotFound(id));
    }
    Ok(())
}

/// A transaction on the app role's pool whose first statement set `app.tenant_id`
/// transaction-locally. Every query through it sees one tenant, whatever its SQL says.
///
/// The setting is made with `is_local = true` (the function form of `SET LOCAL`), so it ends
/// with the transaction and cannot leak to the next user of the pooled connection. `commit`
/// first checks the setting is unchanged, so a job that tried to switch tenants mid-way has
/// its work rolled back.
///
/// The transaction is driven with plain `BEGIN`/`COMMIT` statements on a pooled connection
/// rather than sqlx's `Transaction`, so that the statements around a job can share round trips
/// (see [`TenantTx::begin_then`] and [`TenantTx::commit_after`]). **Dropping it while the
/// transaction is open closes the connection** instead of returning it to the pool: the server
/// rolls back and the tenant context dies with the session. That covers every way a job can
/// end early (an error, a timeout or shutdown cut-off dropping its future mid-statement, a
/// panic), including a `BEGIN` cancelled in flight, which sqlx's own `Transaction` can return
/// to the pool still open (transact-rs/sqlx#4385). So no connection ever goes back to the pool
/// with a tenant set, without a check on every release.
pub struct TenantTx {
    conn: PoolConnection<Postgres>,
    tenant: TenantId,
    /// A transaction may be open on `conn` (set before `BEGIN` is sent).
    open: bool,
    /// A savepoint to take before the next statement (see [`TenantTx::conn`]).
    savepoint: Savepoint,
}

/// The worker's per-job savepoint inside a shared round (see `rounds`): taken lazily, with the
/// tenant context set again, so a job that sends no statement costs no round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Savepoint {
    /// None wanted (a transaction of its own).
    None,
    /// Wanted: `savepoint j<n>` goes out before the job's first statement.
    Pending(u32),
    /// Taken: the job's statements since it can be rolled back with `rollback to j<n>`.
    Taken(u32),
}

impl std::fmt::Debug for TenantTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTx")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Drop for TenantTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// SQLSTATE raised by `public.complete_job_runs` when the tenant context changed.
const CONTEXT_CHANGED: &str = "TW001";

impl TenantTx {
    /// Begins a scoped transaction for `tenant` in one round trip.
    ///
    /// # Errors
    /// Database errors (pool exhausted, connection lost).
    pub async fn begin(pool: &PgPool, tenant: TenantId) -> Result<Self> {
        Ok(Self::begin_then(pool, tenant, None).await?.0)
    }

    /// Begins a scoped transaction and runs `then` right after `set_config`, in the same round
    /// trip (one simple-query message). Returns the last row `then` produced. `then` must be a
    /// statement built from values this crate formatted itself (it cannot take parameters).
    ///
    /// # Errors
    /// Database errors; the connection is then closed (see the type's docs).
    pub(crate) async fn begin_then(
        pool: &PgPool,
        tenant: TenantId,
        then: Option<&str>,
    ) -> Result<(Self, Option<PgRow>)> {
        let conn = pool.acquire().await?;
        // From here on, dropping `tx` before commit or rollback closes the connection.
        let mut tx = Self {
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

    /// The tenant this transaction is scoped to.
    pub fn tenant_id(&self) -> TenantId {
        self.tenant
    }

    /// The connection, for running queries: `query.fetch_all(tx.conn().await?.await?)`.
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
            // that changed it also fails the whole round at its end, see `rounds`).
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

/// `text` as a dollar-quoted SQL literal whose tag does not occur in it, so it is safe to
/// inline whatever it contains (dollar quotes have no escapes).
pub(crate) fn dollar_quote(text: &str) -> String {
    let mut tag = String::from("$tw$");
    let mut n = 0u32;
    while text.contains(&tag[..tag.len() - 1]) {
        n += 1;
        tag = format!("$tw{n}$");
    }
    format!("{tag}{text}{tag}")
}

#[cfg(test)]
mod tests {
    use super::dollar_quote;

    #[test]
    fn dollar_quote_picks_a_tag_absent_from_the_text() {
        assert_eq!(dollar_quote(r#"{"a":1}"#), r#"$tw${"a":1}$tw$"#);
        assert_eq!(dollar_quote("x$tw$y"), "$tw1$x$tw$y$tw1$");
        assert_eq!(dollar_quote("$tw1$ $tw"), "$tw2$$tw1$ $tw$tw2$");
        assert_eq!(dollar_quote("ends with $tw"), "$tw1$ends with $tw$tw1$");
    }
}
