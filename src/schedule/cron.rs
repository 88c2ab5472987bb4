//! Cron expressions and time zones: parsing (standard 5-field cron, or 6 fields with seconds
//! first, with standard weekday numbering) and fire times. Depends on nothing else of the
//! crate, so declared jobs can validate their schedules without the scheduler.

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

/// Parses a cron expression for a new schedule: [`parse_cron`], and refused when no date
/// matches all its fields (`0 0 30 2 *`: February the 30th), since such a schedule would never
/// fire. (Only at input: the scheduler's parse of stored schedules on every tick skips the
/// search.)
///
/// # Errors
/// [`Error::Cron`].
pub fn parse_new_cron(expr: &str) -> Result<cron::Schedule, Error> {
    let schedule = parse_cron(expr)?;
    if schedule.upcoming(chrono::Utc).next().is_none() {
        return Err(Error::Cron {
            expr: expr.chars().take(100).collect(),
            reason: "it never fires (no date matches all its fields)".into(),
        });
    }
    Ok(schedule)
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

/// The latest fire time of `cron` in `tz` strictly before `now`, if any.
pub fn latest_fire_before(
    schedule: &cron::Schedule,
    tz: chrono_tz::Tz,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    schedule
        .after(&now.with_timezone(&tz))
        .next_back()
        .map(|t| t.with_timezone(&chrono::Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cron_that_never_fires_is_refused() {
        let err = parse_new_cron("0 0 30 2 *").unwrap_err().to_string();
        assert!(err.contains("never fires"), "{err}");
        assert!(parse_new_cron("0 0 29 2 *").is_ok(), "leap days exist");
        assert!(parse_new_cron("*/5 * * * *").is_ok());
    }
}
