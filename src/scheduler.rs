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
///
/// # Errors
/// [`Error::Cron`].
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, Error> {
    let fields = expr.split_whitespace().count();
    let full = match fields {
        5 => format!("0 {}", expr.trim()),
        6 => expr.trim().to_string(),
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

/// Parses an IANA time zone name.
///
/// # Errors
/// [`Error::TimeZone`].
pub fn parse_tz(name: &str) -> Result<chrono_tz::Tz, Error> {
    chrono_tz::Tz::from_str(name).map_err(|_| Error::TimeZone(name.chars().take(100).collect()))
}
