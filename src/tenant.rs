//! Tenants: the registry (`tenant add/list/suspend/activate`) and the tenant-scoped
//! transaction, the only way the worker touches tenant data.

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
pub struct TenantTx {
    tx: Transaction<'static, Postgres>,
    tenant: TenantId,
}

impl std::fmt::Debug for TenantTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTx")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl TenantTx {
    /// Begins a scoped transaction for `tenant` in one round trip.
    ///
    /// # Errors
    /// Database errors (pool exhausted, connection lost).
    pub async fn begin(pool: &PgPool, tenant: TenantId) -> Result<Self> {
        // The tenant id is a parsed UUID, formatted by us: safe to inline, and inlining lets
        // BEGIN and set_config travel in one round trip.
        let tx = pool
            .begin_with(AssertSqlSafe(format!(
                "begin; select set_config('app.tenant_id', '{}', true)",
                tenant.0.hyphenated()
            )))
            .await?;
        Ok(Self { tx, tenant })
    }

    /// The tenant this transaction is scoped to.
    pub fn tenant_id(&self) -> TenantId {
        self.tenant
    }

    /// The connection, for running queries: `query.fetch_all(tx.conn())`.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Checks the tenant context is still this transaction's tenant.
    ///
    /// # Errors
    /// [`Error::ContextTampered`] when it changed.
    pub async fn check_context(&mut self) -> Result<()> {
        let current: Option<String> =
            sqlx::query_scalar("select current_setting('app.tenant_id', true)")
                .fetch_one(&mut *self.tx)
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
            let _ = self.tx.rollback().await;
            return Err(e);
        }
        self.tx.commit().await?;
        Ok(())
    }

    /// Commits without the context check, for callers whose last statement already made it
    /// (the worker folds the check into completing the run record).
    pub(crate) async fn commit_checked_by_caller(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Rolls back.
    ///
    /// # Errors
    /// Database errors.
    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}
