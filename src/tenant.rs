//! The tenant registry: one row per customer organisation (`tenant add/list/suspend/activate`),
//! with its scheduling settings (`tenant set/pause/resume`: weight, cap, pause; see
//! [`crate::worker::FetchOrder`] for what the fair fetch does with them). Tenant data itself is reached
//! only through a [`crate::ScopedTx`].

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
    /// A weight outside 1..=1000.
    #[error("invalid weight {0}: must be a whole number from 1 to {MAX_WEIGHT}")]
    InvalidWeight(i64),
    /// A cap outside 1..=100000 (0 is not "pause": pausing is its own command).
    #[error(
        "invalid max-running {0}: must be a whole number from 1 to {MAX_RUNNING} (to stop a tenant's jobs for a while, use `tenant pause`)"
    )]
    InvalidMaxRunning(i64),
}

/// The largest accepted [`Share::weight`].
pub const MAX_WEIGHT: i64 = 1_000;
/// The largest accepted [`Share::max_running`].
pub const MAX_RUNNING: i64 = 100_000;

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
    /// Its share of worker time relative to other tenants with work (default 1).
    pub weight: i32,
    /// At most this many of its jobs run at once, across all workers (`None`: no cap).
    pub max_running: Option<i32>,
    /// Its jobs wait in the queue until it is resumed.
    pub paused: bool,
}

/// A change to a tenant's scheduling settings; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    /// New weight, 1 to [`MAX_WEIGHT`].
    pub weight: Option<i64>,
    /// New cap: `Some(None)` removes it, `Some(Some(n))` sets 1 to [`MAX_RUNNING`].
    pub max_running: Option<Option<i64>>,
}

impl Share {
    /// Checks the values before anything is written.
    ///
    /// # Errors
    /// [`Error::InvalidWeight`] or [`Error::InvalidMaxRunning`].
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = self.weight
            && !(1..=MAX_WEIGHT).contains(&w)
        {
            return Err(Error::InvalidWeight(w));
        }
        if let Some(Some(n)) = self.max_running
            && !(1..=MAX_RUNNING).contains(&n)
        {
            return Err(Error::InvalidMaxRunning(n));
        }
        Ok(())
    }
}

const COLUMNS: &str = "id, name, status, created_at, weight, max_running, paused";

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
    let tenant: Tenant = sqlx::query_as(AssertSqlSafe(format!(
        "insert into tenants (id, name) values ($1, $2) returning {COLUMNS}"
    )))
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
    let rows = sqlx::query_as(AssertSqlSafe(format!(
        "select {COLUMNS} from tenants order by created_at, name"
    )))
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

/// Changes a tenant's weight and/or cap (both checked first: a bad value changes nothing) and
/// returns the tenant as it is now. Workers use the new values from their next fetch.
///
/// # Errors
/// [`Error::InvalidWeight`], [`Error::InvalidMaxRunning`], [`Error::NotFound`] or a database
/// error.
pub async fn set_share(admin: &PgPool, owner: &str, id: TenantId, share: Share) -> Result<Tenant> {
    share.validate()?;
    let mut tx = as_owner(admin, owner).await?;
    let tenant: Option<Tenant> = sqlx::query_as(AssertSqlSafe(format!(
        "update tenants
         set weight = coalesce($2, weight),
             max_running = case when $3 then $4 else max_running end
         where id = $1
         returning {COLUMNS}"
    )))
    .bind(id)
    .bind(share.weight.map(|w| w as i32))
    .bind(share.max_running.is_some())
    .bind(share.max_running.flatten().map(|n| n as i32))
    .fetch_optional(&mut *tx)
    .await?;
    let tenant = tenant.ok_or(Error::NotFound(id))?;
    tx.commit().await?;
    Ok(tenant)
}

/// Pauses a tenant (its queued jobs wait, new ones queue behind them; nothing is refused) or
/// resumes it (its jobs run again, in their order). Unlike [`set_status`], pausing loses
/// nothing and rejects nothing.
///
/// # Errors
/// [`Error::NotFound`] or a database error.
pub async fn set_paused(admin: &PgPool, owner: &str, id: TenantId, paused: bool) -> Result<()> {
    let mut tx = as_owner(admin, owner).await?;
    let n = sqlx::query("update tenants set paused = $2 where id = $1")
        .bind(id)
        .bind(paused)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(Error::NotFound(id));
    }
    if !paused {
        // The fair fetch parked the tenant's lanes while it was paused: make them ready again,
        // in the queue's current virtual time (a pause earns no credit). The queue schema is
        // the admin's, not the owner's.
        tx.execute("reset role").await?;
        sqlx::query(
            "update apalis.tenant_lanes l
             set waiting = false,
                 vtime = greatest(l.vtime, coalesce((
                     select r.vtime from apalis.tenant_lanes r
                     where r.queue = l.queue and r.active and not r.waiting
                     order by r.vtime limit 1), l.vtime))
             where l.registry_id = $1 and l.active and l.waiting and l.ready_at = 'infinity'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
