//! Per-tenant cron schedules, turned into signed jobs by one leader at a time.
//!
//! - [`cron`]: parsing cron expressions and time zones, fire times (a leaf: no database).
//! - [`store`]: adding, listing and removing schedules (each tenant's through its scoped
//!   transaction; all tenants' through the scheduler role's one narrow policy).
//! - [`leader`]: the [`Scheduler`] that turns due fires into jobs, led by one process at a
//!   time.

pub mod cron;
pub mod leader;
pub mod store;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::ids::TenantId;

pub use leader::Scheduler;

/// Errors of schedule management and ticking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad cron or time zone.
    #[error(transparent)]
    Parse(#[from] cron::Error),
    /// The job the schedule would create is invalid.
    #[error("invalid scheduled job: {0}")]
    Job(#[from] crate::envelope::Rejection),
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Scoped transaction error.
    #[error(transparent)]
    Scope(#[from] crate::scope::Error),
    /// Enqueue error.
    #[error(transparent)]
    Queue(#[from] crate::queue::Error),
    /// No schedule with this id.
    #[error("no schedule with id {0}")]
    NotFound(Uuid),
    /// No registered tenant with this id.
    #[error("no tenant with id {0} (see `tenant-worker tenant list`)")]
    UnknownTenant(crate::ids::TenantId),
    /// The tenant is suspended: its jobs would be refused.
    #[error("tenant {0} is suspended: activate it first (`tenant-worker tenant activate {0}`)")]
    SuspendedTenant(crate::ids::TenantId),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
