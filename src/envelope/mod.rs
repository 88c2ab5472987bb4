//! The signed job envelope.
//!
//! A job is `{ job id, tenant id, kind, arguments }` plus an issue time, an expiry and a key id,
//! all covered by an Ed25519 signature made when the job was enqueued. Workers only hold public
//! keys, so a worker host cannot mint jobs; key ids let keys rotate.
//!
//! # Wire format
//! The envelope is stored as UTF-8 JSON:
//! ```json
//! {"v":1,"job_id":"0192…","tenant_id":"…","kind":"export","args":{"source":"v_property"},
//!  "issued_at":1764150000,"expires_at":1764754800,"key_id":"dev","sig":"<base64>"}
//! ```
//!
//! # Signed bytes (the canonical encoding)
//! The signature is Ed25519 (RFC 8032, pure) over these bytes:
//! ```text
//! "tenant-worker/job/v1\n"                       (21 ASCII bytes, the domain separator)
//! then, for each field in this order:
//!     job_id, tenant_id, kind, args, issued_at, expires_at, key_id
//! a 4-byte big-endian unsigned length followed by that many bytes of the field, where
//!     job_id, tenant_id  = the UUID as 36 lowercase hyphenated ASCII characters
//!     kind, key_id       = the UTF-8 string
//!     args               = the exact JSON text of `args` as it appears in the envelope
//!                          (byte for byte: sign the text you embed, embed the text you sign)
//!     issued_at, expires_at = Unix seconds as decimal ASCII, no sign for positives
//! ```
//! `sig` is the 64-byte signature in standard base64 with padding. Keys are PKCS#8 (private)
//! and SPKI (public) PEM files, so `openssl genpkey -algorithm ed25519` keys work too.
//! With OpenSSL 3: `openssl pkeyutl -sign -inkey K.key.pem -rawin -in bytes.bin -out sig.bin`
//! (the keys `tenant-worker keys generate` writes are PKCS#8 v1, which OpenSSL and Python's
//! `cryptography` read).
//!
//! # The queue row
//! A program in another language that enqueues without this crate inserts one row into
//! `apalis.jobs` as the queue role, as [`crate::queue::Enqueuer`] does:
//! ```sql
//! insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
//!                          priority, metadata, idempotency_key)
//! values ('<the job id as a 26-character ULID>', '<worker.queue, default tenant-jobs>',
//!         convert_to('<the envelope JSON>', 'UTF8'), 'Pending', 0, 5, now(), 0,
//!         hstore(array['tenant_id', 'kind'], array['<tenant id>', '<kind>']), null)
//! on conflict do nothing;
//! ```
//! The row id is the envelope's `job_id` (a UUID) written as a ULID (the same 128 bits); the
//! `metadata` copy of the tenant and kind only routes the job (which jobs are fetched
//! together, which workers fetch it): the worker runs every job in the tenant its signed
//! envelope names, and rejects a job whose row id and `job_id` differ.

pub mod keys;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{JobId, TenantId};

/// Domain separator that starts the signed bytes.
pub const DOMAIN: &[u8] = b"tenant-worker/job/v1\n";

/// Allowed clock skew between enqueuer and worker for `issued_at` in the future.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// Why a job was rejected. Rejected jobs are never retried; the text is shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The stored payload is not a JSON envelope.
    #[error("payload is not a valid job envelope: {0}")]
    Malformed(String),
    /// The payload exceeds `worker.max_payload_bytes`.
    #[error("payload is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Actual size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Envelope version not understood.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u32),
    /// No verifying key with this id (never listed, or removed by rotation).
    #[error("signed with unknown key id `{0}`")]
    UnknownKey(String),
    /// The signature does not match the envelope's contents.
    #[error("signature does not verify (payload altered or signed for another job)")]
    BadSignature,
    /// Past `expires_at`.
    #[error("expired at {} (the worker's clock says {})", unix_time(*.expires_at), unix_time(*.now))]
    Expired {
        /// Expiry (Unix seconds).
        expires_at: i64,
        /// Worker time (Unix seconds).
        now: i64,
    },
    /// `issued_at` lies in the future beyond the allowed skew.
    #[error("issued in the future, at {} (the worker's clock says {})", unix_time(*.issued_at), unix_time(*.now))]
    NotYetValid {
        /// Issue time (Unix seconds).
        issued_at: i64,
        /// Worker time (Unix seconds).
        now: i64,
    },
    /// The job id in the envelope differs from the queue row's id.
    #[error("envelope job id does not match the queued job id")]
    JobIdMismatch,
    /// The kind is not one this worker (or enqueuer) has registered.
    #[error("unknown job kind `{kind}` (registered here: {known})")]
    UnknownKind {
        /// The kind asked for.
        kind: String,
        /// The kinds registered, comma-separated.
        known: String,
    },
    /// Arguments do not validate for the kind.
    #[error("invalid arguments for `{kind}`: {reason}")]
    InvalidArgs {
        /// The job kind.
        kind: String,
        /// What is wrong.
        reason: String,
    },
    /// The tenant does not exist.
    #[error("unknown tenant")]
    UnknownTenant,
    /// The tenant is suspended.
    #[error("tenant is suspended")]
    SuspendedTenant,
}

/// The envelope as stored in the queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Format version (1).
    pub v: u32,
    /// The job id.
    pub job_id: JobId,
    /// The tenant the job acts for.
    pub tenant_id: TenantId,
    /// The job kind.
    pub kind: String,
    /// Arguments, kept as the exact signed JSON text.
    pub args: Box<RawValue>,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Which key signed it.
    pub key_id: String,
    /// Base64 Ed25519 signature.
    pub sig: String,
}

/// The fields a job is signed over, before signing.
#[derive(Debug, Clone)]
pub struct Unsigned {
    /// Job id.
    pub job_id: JobId,
    /// Tenant id (from the caller's verified context).
    pub tenant_id: TenantId,
    /// Kind.
    pub kind: String,
    /// Arguments (JSON value; serialized once, compactly, and that text is what is signed).
    pub args: serde_json::Value,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A verified job: the only way to obtain a [`TenantId`] for the worker's scoped transaction.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Job id.
    pub job_id: JobId,
    /// Verified tenant.
    pub tenant_id: TenantId,
    /// Kind.
    pub kind: String,
    /// Arguments: the exact JSON text that was signed (the job kind parses it).
    pub args: Box<RawValue>,
    /// Key that signed it.
    pub key_id: String,
}

/// Builds the canonical signed bytes (see the module docs).
pub fn signing_bytes(
    job_id: JobId,
    tenant_id: TenantId,
    kind: &str,
    args_json: &str,
    issued_at: i64,
    expires_at: i64,
    key_id: &str,
) -> Vec<u8> {
    let job_id = job_id.0.hyphenated().to_string();
    let tenant_id = tenant_id.0.hyphenated().to_string();
    let issued_at = issued_at.to_string();
    let expires_at = expires_at.to_string();
    let fields: [&str; 7] = [
        &job_id,
        &tenant_id,
        kind,
        args_json,
        &issued_at,
        &expires_at,
        key_id,
    ];
    let mut out = Vec::with_capacity(DOMAIN.len() + 200 + args_json.len());
    out.extend_from_slice(DOMAIN);
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

/// Unix seconds as an RFC 3339 time for messages (the number itself when out of range).
fn unix_time(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn canonical_bytes_are_length_prefixed() {
        let id = JobId(Uuid::nil());
        let t = TenantId(Uuid::nil());
        let b = signing_bytes(id, t, "noop", "{}", 1, 2, "k");
        assert!(b.starts_with(DOMAIN));
        let rest = &b[DOMAIN.len()..];
        assert_eq!(&rest[..4], &36u32.to_be_bytes());
        assert_eq!(
            &rest[4..40],
            Uuid::nil().hyphenated().to_string().as_bytes()
        );
    }

    #[test]
    fn expiry_reads_as_a_time() {
        let r = Rejection::Expired {
            expires_at: 1_796_298_206,
            now: 1_796_298_300,
        };
        assert_eq!(
            r.to_string(),
            "expired at 2026-12-03T11:43:26Z (the worker's clock says 2026-12-03T11:45:00Z)"
        );
    }
}
