//! Per-tenant cron schedules turned into signed jobs by one leader at a time.

use std::str::FromStr;

/// Errors of schedule parsing and the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad cron expression.
    #[error("invalid cron expression `{expr}`: {reason}")]
    Cron {
        /// The expression (truncated).
        expr: String,
        /// Parser message.
        reason: String,
    },
    /// Unknown time zone.
    #[error("unknown time zone `{0}`: use an IANA name such as Europe/Berlin or UTC")]
    TimeZone(String),
}

/// Parses a cron expression: 5 fields (minute hour day month weekday) or 6 with seconds first.
/// Weekdays use standard cron numbering: 0 or 7 = Sunday, 1 = Monday, ..., 6 = Saturday.
///
/// # Errors
/// [`Error::Cron`].
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, Error> {
    let fields = expr.split_whitespace().count();
    let mut parts: Vec<String> = expr.split_whitespace().map(str::to_string).collect();
    if let Some(weekday) = parts.last_mut()
        && (fields == 5 || fields == 6)
    {
        *weekday = standard_weekdays(weekday).map_err(|reason| Error::Cron {
            expr: expr.chars().take(100).collect(),
            reason,
        })?;
    }
    let full = match fields {
        5 => format!("0 {}", parts.join(" ")),
        6 => parts.join(" "),
        n => {
            return Err(Error::Cron {
                expr: expr.chars().take(100).collect(),
                reason: format!("expected 5 fields (or 6 with seconds), found {n}"),
            });
        }
    };
    cron::Schedule::from_str(&full).map_err(|e| Error::Cron {
        expr: expr.chars().take(100).collect(),
        reason: e.to_string(),
    })
}

/// Translates a weekday field from standard cron numbering (0 or 7 = Sunday, 1 = Monday, ...,
/// 6 = Saturday) to the `cron` crate's (1 = Sunday, ..., 7 = Saturday). Names (`MON`), `*` and
/// `?` pass through; ranges ending on 7 (Sunday) are split.
fn standard_weekdays(field: &str) -> Result<String, String> {
    let day = |t: &str| -> Result<String, String> {
        match t.parse::<u32>() {
            Ok(n @ 0..=6) => Ok((n + 1).to_string()),
            Ok(7) => Ok("1".into()),
            Ok(n) => Err(format!(
                "weekday {n} is out of range (0-7, 0 and 7 = Sunday)"
            )),
            Err(_) => Ok(t.to_string()),
        }
    };
    let mut out = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let with_step = |r: String| match step {
            Some(s) => format!("{r}/{s}"),
            None => r,
        };
        match range.split_once('-') {
            Some((a, "7")) if a.parse::<u32>().is_ok() => {
                // a-7 reaches Sunday: a..Saturday plus Sunday.
                let a = day(a)?;
                out.push(with_step(format!("{a}-7")));
                if step.is_none() {
                    out.push("1".into());
                }
            }
            Some((a, b)) => out.push(with_step(format!("{}-{}", day(a)?, day(b)?))),
            None => out.push(with_step(day(range)?)),
        }
    }
    Ok(out.join(","))
}

/// Parses an IANA time zone name.
///
/// # Errors
/// [`Error::TimeZone`].
pub fn parse_tz(name: &str) -> Result<chrono_tz::Tz, Error> {
    chrono_tz::Tz::from_str(name).map_err(|_| Error::TimeZone(name.chars().take(100).collect()))
}

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::envelope::{JobId, TenantId};
use crate::jobs::JobSpec;
use crate::jobs::declared::Catalog;
use crate::queue::{Enqueuer, NewJob};
use crate::tenant::TenantTx;

/// Errors of schedule management and ticking.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Bad cron or time zone.
    #[error(transparent)]
    Parse(#[from] Error),
    /// The job the schedule would create is invalid.
    #[error("invalid scheduled job: {0}")]
    Job(crate::envelope::Rejection),
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Scoped transaction error.
    #[error(transparent)]
    Tenant(#[from] crate::tenant::Error),
    /// Enqueue error.
    #[error(transparent)]
    Queue(#[from] crate::queue::Error),
    /// No schedule with this id.
    #[error("no schedule with id {0}")]
    NotFound(Uuid),
}

impl From<crate::envelope::Rejection> for ScheduleError {
    fn from(r: crate::envelope::Rejection) -> Self {
        Self::Job(r)
    }
}

/// Advisory-lock key of the scheduler leader (one per database).
pub const LEADER_LOCK_KEY: i64 = 0x7465_6e61_6e74_7363; // "tenantsc"

/// A stored schedule.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Schedule {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: TenantId,
    /// Cron expression.
    pub cron: String,
    /// IANA time zone.
    pub timezone: String,
    /// Job kind.
    pub kind: String,
    /// Job arguments.
    pub args: serde_json::Value,
    /// Enabled?
    pub enabled: bool,
    /// Created at (fires before this are never due).
    pub created_at: DateTime<Utc>,
}

/// The latest fire time of `cron` in `tz` strictly before `now`, if any.
pub fn latest_fire_before(
    schedule: &cron::Schedule,
    tz: chrono_tz::Tz,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    schedule
        .after(&now.with_timezone(&tz))
        .next_back()
        .map(|t| t.with_timezone(&Utc))
}

/// Adds a schedule for `tenant` (validated: cron, time zone, kind and arguments) through the
/// tenant's scoped transaction. Returns its id.
///
/// # Errors
/// [`ScheduleError`] naming what is wrong.
pub async fn add(
    app: &PgPool,
    catalog: &Catalog,
    tenant: TenantId,
    cron_expr: &str,
    tz: &str,
    kind: &str,
    args: &serde_json::Value,
) -> Result<Uuid, ScheduleError> {
    parse_cron(cron_expr)?;
    parse_tz(tz)?;
    JobSpec::parse(kind, args, catalog)?;
    let mut tx = TenantTx::begin(app, tenant).await?;
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
pub async fn list_for_tenant(
    app: &PgPool,
    tenant: TenantId,
) -> Result<Vec<Schedule>, ScheduleError> {
    let mut tx = TenantTx::begin(app, tenant).await?;
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
pub async fn list_all(scheduler: &PgPool) -> Result<Vec<Schedule>, ScheduleError> {
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
/// [`ScheduleError::NotFound`] or database errors.
pub async fn remove(scheduler: &PgPool, app: &PgPool, id: Uuid) -> Result<TenantId, ScheduleError> {
    let tenant: Option<TenantId> =
        sqlx::query_scalar("select tenant_id from schedules where id = $1")
            .bind(id)
            .fetch_optional(scheduler)
            .await?;
    let tenant = tenant.ok_or(ScheduleError::NotFound(id))?;
    let mut tx = TenantTx::begin(app, tenant).await?;
    sqlx::query("delete from schedules where id = $1")
        .bind(id)
        .execute(tx.conn().await?)
        .await?;
    tx.commit().await?;
    Ok(tenant)
}

/// Turns due schedules into signed jobs.
#[derive(Clone)]
pub struct Scheduler {
    pool: PgPool,
    enqueuer: Arc<Enqueuer>,
}

impl Scheduler {
    /// A scheduler reading schedules on `pool` (scheduler role) and enqueueing with `enqueuer`.
    pub fn new(pool: PgPool, enqueuer: Enqueuer) -> Self {
        Self {
            pool,
            enqueuer: Arc::new(enqueuer),
        }
    }

    /// One pass at time `now`: for every enabled schedule whose latest fire time before `now`
    /// is newer than the last one handled (or than its creation), enqueue ONE job for that
    /// fire time. Missed fires collapse into the latest. The idempotency key
    /// `schedule:<id>:<fire unix seconds>` makes concurrent schedulers and restarts enqueue a
    /// fire at most once. Returns the jobs enqueued by this call.
    ///
    /// # Errors
    /// Database errors; a schedule that no longer parses is logged and skipped.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<Vec<JobId>, ScheduleError> {
        let schedules = sqlx::query_as::<_, (Uuid, TenantId, String, String, String, serde_json::Value, DateTime<Utc>, Option<DateTime<Utc>>)>(
            "select s.id, s.tenant_id, s.cron, s.timezone, s.kind, s.args, s.created_at, f.last_fire
             from schedules s left join schedule_fires f on f.schedule_id = s.id
             where s.enabled",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut enqueued = Vec::new();
        for (id, tenant, expr, tz, kind, args, created_at, last_fire) in schedules {
            let (cron, tz) = match (parse_cron(&expr), parse_tz(&tz)) {
                (Ok(c), Ok(t)) => (c, t),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(schedule.id = %id, tenant_id = %tenant, error.message = %e, "skipping a schedule that does not parse");
                    continue;
                }
            };
            let Some(fire) = latest_fire_before(&cron, tz, now) else {
                continue;
            };
            let handled = last_fire.unwrap_or(created_at);
            if fire <= handled {
                continue;
            }
            let job = NewJob {
                kind: kind.clone(),
                args,
                run_at: None,
                priority: 0,
                idempotency_key: Some(format!("schedule:{id}:{}", fire.timestamp())),
            };
            match self.enqueuer.enqueue(tenant, job).await {
                Ok(Some(job_id)) => {
                    tracing::info!(schedule.id = %id, tenant_id = %tenant, job_id = %job_id, fire = %fire, "scheduled job enqueued");
                    enqueued.push(job_id);
                }
                Ok(None) => {
                    tracing::debug!(schedule.id = %id, fire = %fire, "fire already enqueued by another scheduler");
                }
                Err(e) => {
                    tracing::warn!(schedule.id = %id, tenant_id = %tenant, error.message = %e, "could not enqueue a scheduled job");
                    continue;
                }
            }
            sqlx::query(
                "insert into schedule_fires (schedule_id, last_fire) values ($1, $2)
                 on conflict (schedule_id) do update set last_fire = greatest(schedule_fires.last_fire, excluded.last_fire)",
            )
            .bind(id)
            .bind(fire)
            .execute(&self.pool)
            .await?;
        }
        Ok(enqueued)
    }

    /// Tries to become the leader: a session advisory lock on a dedicated connection, released
    /// when that connection (or the process) goes away.
    async fn try_lead(&self) -> Option<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        let mut conn = self.pool.acquire().await.ok()?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await
            .ok()?;
        if locked { Some(conn) } else { None }
    }

    /// Runs until `shutdown`: one leader at a time ticks every `interval`; the others retry the
    /// leader lock and take over when the leader dies.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            let lead = tokio::select! {
                l = self.try_lead() => l,
                () = shutdown.cancelled() => return,
            };
            let Some(mut conn) = lead else {
                tokio::select! {
                    () = tokio::time::sleep(interval * 2) => continue,
                    () = shutdown.cancelled() => return,
                }
            };
            tracing::info!("this process leads the scheduler");
            loop {
                if let Err(e) = self.tick(Utc::now()).await {
                    tracing::warn!(error.message = %e, "scheduler tick failed");
                }
                // Losing the lock connection means losing leadership.
                if !still_connected(&mut conn).await {
                    tracing::warn!("scheduler lost its leader connection");
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = shutdown.cancelled() => {
                        let _ = sqlx::query("select pg_advisory_unlock($1)").bind(LEADER_LOCK_KEY).execute(&mut *conn).await;
                        return;
                    }
                }
            }
        }
    }
}

async fn still_connected(conn: &mut PgConnection) -> bool {
    sqlx::query("select 1").execute(conn).await.is_ok()
}
