//! Identifiers every layer shares: tenants, jobs and signing keys. This module depends on
//! nothing else of the crate, so configuration, the envelope, the queue and the job kinds can
//! all use it without depending on each other.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A tenant id. The worker only ever takes one from a verified envelope; operators and
/// applications name one explicitly (a CLI argument, the tenant of a verified login).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[sqlx(transparent)]
pub struct TenantId(pub Uuid);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for TenantId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TenantId)
    }
}

/// A job id: a UUID v7, so ids sort by creation time.
///
/// The job's row in the queue table (`apalis.jobs.id`) holds the same 128 bits written as a
/// ULID; [`JobId::parse_any`] reads either form.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[sqlx(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The same 128 bits as a ULID: the id of the job's row in `apalis.jobs`.
    pub fn to_ulid(self) -> ulid::Ulid {
        ulid::Ulid::from(self.0.as_u128())
    }

    /// Parses either the UUID form or the ULID form of a job id.
    pub fn parse_any(s: &str) -> Option<Self> {
        if let Ok(u) = Uuid::parse_str(s) {
            return Some(Self(u));
        }
        ulid::Ulid::from_string(s)
            .ok()
            .map(|u| Self(Uuid::from_u128(u.0)))
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of a signing key: 1 to 64 characters of `A-Z a-z 0-9 . _ -`. Envelopes name the key
/// that signed them, so keys can rotate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(String);

/// A key id that is not 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key id `{0}`: use 1-64 characters of A-Z a-z 0-9 . _ -")]
pub struct BadKeyId(pub String);

impl KeyId {
    /// Validates a key id.
    ///
    /// # Errors
    /// [`BadKeyId`] when it is empty, too long or has other characters.
    ///
    /// ```
    /// use tenant_worker::KeyId;
    /// assert_eq!(KeyId::parse("k2026-01").unwrap().as_str(), "k2026-01");
    /// assert!(KeyId::parse("no spaces").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self, BadKeyId> {
        let ok = (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(BadKeyId(s.chars().take(80).collect()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_id_reads_back_from_its_ulid_form() {
        let id = JobId::new();
        assert_eq!(JobId::parse_any(&id.to_ulid().to_string()), Some(id));
        assert_eq!(JobId::parse_any(&id.to_string()), Some(id));
        assert_eq!(JobId::parse_any("neither"), None);
    }
}
