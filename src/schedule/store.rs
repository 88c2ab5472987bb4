//! Schedule management: each tenant's schedules through its scoped transaction (RLS forced,
//! like any tenant data); every tenant's through the scheduler role's read-only policy.

use sqlx::PgPool;
use uuid::Uuid;

use super::cron::{parse_new_cron, parse_tz};
use super::{Error, Result, Schedule};
use crate::ids::TenantId;
use crate::job::Registry;
use crate::scope::Scope;

/// Adds a schedule for `tenant` (validated: cron, time zone, kind and arguments, the kind
/// against `registry`) through the tenant's scoped transaction. Returns its id.
///
/// # Errors
/// [`Error`] naming what is wrong.
pub async fn add(
    scope: &Scope,
    registry: &Registry,
    tenant: TenantId,
    cron_expr: &str,
    tz: &str,
    kind: &str,
    args: &serde_json::Value,
) -> Result<Uuid> {
    parse_new_cron(cron_expr)?;
    parse_tz(tz)?;
    registry.check(kind, args)?;
    let mut tx = scope.begin(tenant).await?;
    // The tenant's own registry row is visible in its context (policy `tenant_self`).
    let status: Option<String> = sqlx::query_scalar("select status from tenants where id = $1")
        .bind(tenant)
        .fetch_optional(tx.conn().await?)
        .await?;
    match status.as_deref() {
        None => return Err(Error::UnknownTenant(tenant)),
        Some("active") => {}
        Some(_) => return Err(Error::SuspendedTenant(tenant)),
    }
    let id: Uuid = sqlx::query_scalar(
        "insert into schedules (tenant_id, cron, timezone, kind, args) values ($1, $2, $3, $4, $5) returning id",
    )
    .bind(tenant)
    .bind(cron_expr.trim())
    .bind(tz)
    .bind(kind)
    .bind(args)
    .fetch_one(tx.conn().await?)
    .await?;
    tx.commit().await?;
    Ok(id)
}

const SELECT_SCHEDULES: &str =
    "select id, tenant_id, cron, timezone, kind, args, enabled, created_at from schedules";

/// One tenant's schedules (app role, scoped).
///
/// # Errors
/// Database errors.
pub async fn list_for_tenant(scope: &Scope, tenant: TenantId) -> Result<Vec<Schedule>> {
    let mut tx = scope.begin(tenant).await?;
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_SCHEDULES} order by created_at"
    )))
    .fetch_all(tx.conn().await?)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Every tenant's schedules (scheduler role).
///
/// # Errors
/// Database errors.
pub async fn list_all(scheduler: &PgPool) -> Result<Vec<Schedule>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_SCHEDULES} order by tenant_id, created_at"
    )))
    .fetch_all(scheduler)
    .await?)
}

/// Removes a schedule: found through the scheduler role, deleted in its tenant's scoped
/// transaction.
///
/// # Errors
/// [`Error::NotFound`] or database errors.
pub async fn remove(scheduler: &PgPool, scope: &Scope, id: Uuid) -> Result<TenantId> {
    let tenant: Option<TenantId> =
        sqlx::query_scalar("select tenant_id from schedules where id = $1")
            .bind(id)
            .fetch_optional(scheduler)
            .await?;
    let tenant = tenant.ok_or(Error::NotFound(id))?;
    let mut tx = scope.begin(tenant).await?;
    sqlx::query("delete from schedules where id = $1")
        .bind(id)
        .execute(tx.conn().await?)
        .await?;
    tx.commit().await?;
    // The scheduler's bookkeeping of its fires (no foreign key: see the migrations).
    sqlx::query("delete from schedule_fires where schedule_id = $1")
        .bind(id)
        .execute(scheduler)
        .await?;
    Ok(tenant)
}
