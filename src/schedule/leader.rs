//! The scheduler: one leader at a time (a session advisory lock on a dedicated connection)
//! turns each due fire of every tenant's schedules into one signed job, with an idempotency key
//! per fire, so replicas and restarts never enqueue a fire twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Result;
use super::cron::{latest_fire_before, parse_cron, parse_tz};
use crate::ids::{JobId, TenantId};
use crate::queue::{Enqueuer, NewJob};

/// Advisory-lock key of the scheduler leader (one per database).
pub const LEADER_LOCK_KEY: i64 = 0x7465_6e61_6e74_7363; // "tenantsc"

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
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<Vec<JobId>> {
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
            let job = NewJob::new(kind.clone(), args)
                .idempotency_key(format!("schedule:{id}:{}", fire.timestamp()));
            match self.enqueuer.enqueue_job(tenant, job).await {
                Ok(done) if done.created => {
                    let job_id = done.id;
                    tracing::info!(schedule.id = %id, tenant_id = %tenant, job_id = %job_id, fire = %fire, "scheduled job enqueued");
                    enqueued.push(job_id);
                }
                Ok(_) => {
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
