//! The tenant registry: one row per customer organisation (`tenant add/list/suspend/activate`).
//! Tenant data itself is reached only through a [`crate::ScopedTx`].

use sqlx::{AssertSqlSafe, Executor, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::ids::TenantId;

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
