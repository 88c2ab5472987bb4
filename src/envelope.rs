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

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Domain separator that starts the signed bytes.
pub const DOMAIN: &[u8] = b"tenant-worker/job/v1\n";

/// Allowed clock skew between enqueuer and worker for `issued_at` in the future.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// A tenant id. Only ever constructed from a verified envelope or an operator's explicit input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
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

/// A job id (UUID v7: time-ordered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
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

/// A key id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyId(String);

impl KeyId {
    /// Validates a key id.
    ///
    /// # Errors
    /// [`KeyError::BadKeyId`] when empty, too long or with other characters.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let ok = (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(KeyError::BadKeyId(s.chars().take(80).collect()))
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

/// Errors loading or generating keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Bad key id text.
    #[error("invalid key id `{0}`: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadKeyId(String),
    /// A key file could not be read or written.
    #[error("key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key file is not a valid Ed25519 PEM key.
    #[error("key file {path} is not an Ed25519 {expected} PEM key: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// "private (PKCS#8)" or "public (SPKI)".
        expected: &'static str,
        /// Parser message (never key material).
        reason: String,
    },
    /// Nothing to sign with.
    #[error(
        "no signing key configured: create one with `tenant-worker keys generate --out keys/` \
         and set keys.signing_key_file and keys.signing_key_id (see the README)"
    )]
    NoSigningKey,
    /// Nothing to verify with.
    #[error(
        "no verifying keys configured: list the public keys under [keys.verifying] in \
         worker.toml (key id = path to .pub.pem)"
    )]
    NoVerifyingKeys,
}

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
    #[error("expired at {expires_at} (now {now})")]
    Expired {
        /// Expiry (Unix seconds).
        expires_at: i64,
        /// Worker time (Unix seconds).
        now: i64,
    },
    /// `issued_at` lies in the future beyond the allowed skew.
    #[error("issued in the future ({issued_at}, now {now})")]
    NotYetValid {
        /// Issue time (Unix seconds).
        issued_at: i64,
        /// Worker time (Unix seconds).
        now: i64,
    },
    /// The job id in the envelope differs from the queue row's id.
    #[error("envelope job id does not match the queued job id")]
    JobIdMismatch,
    /// The kind is not one this worker knows.
    #[error("unknown job kind `{0}`")]
    UnknownKind(String),
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
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Job id.
    pub job_id: JobId,
    /// Verified tenant.
    pub tenant_id: TenantId,
    /// Kind.
    pub kind: String,
    /// Arguments as parsed JSON.
    pub args: serde_json::Value,
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

/// Signs jobs. Held by anything that enqueues (apps, CLI, scheduler), never needed by workers.
#[derive(Clone)]
pub struct Signer {
    key_id: KeyId,
    key: SigningKey,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a key and its id.
    pub fn new(key_id: KeyId, key: SigningKey) -> Self {
        Self { key_id, key }
    }

    /// Loads a PKCS#8 PEM private key.
    ///
    /// # Errors
    /// [`KeyError::Io`] or [`KeyError::Format`].
    pub fn from_file(key_id: KeyId, path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            expected: "private (PKCS#8)",
            reason: e.to_string(),
        })?;
        Ok(Self { key_id, key })
    }

    /// The key id written into envelopes.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs and returns the envelope.
    pub fn sign(&self, job: &Unsigned) -> Envelope {
        let args_text = serde_json::to_string(&job.args).unwrap_or_else(|_| "null".into());
        let bytes = signing_bytes(
            job.job_id,
            job.tenant_id,
            &job.kind,
            &args_text,
            job.issued_at,
            job.expires_at,
            self.key_id.as_str(),
        );
        let sig = self.key.sign(&bytes);
        Envelope {
            v: 1,
            job_id: job.job_id,
            tenant_id: job.tenant_id,
            kind: job.kind.clone(),
            args: RawValue::from_string(args_text)
                .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON")),
            issued_at: job.issued_at,
            expires_at: job.expires_at,
            key_id: self.key_id.to_string(),
            sig: B64.encode(sig.to_bytes()),
        }
    }
}

/// The public keys a worker accepts, by key id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: HashMap<String, VerifyingKey>,
}

impl Keyring {
    /// An empty keyring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key.
    pub fn insert(&mut self, key_id: KeyId, key: VerifyingKey) {
        self.keys.insert(key_id.0, key);
    }

    /// Removes a key (rotation): jobs signed with it are rejected from now on.
    pub fn remove(&mut self, key_id: &str) {
        self.keys.remove(key_id);
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is listed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Loads an SPKI PEM public key file.
    ///
    /// # Errors
    /// [`KeyError::Io`] or [`KeyError::Format`].
    pub fn load_public(path: &Path) -> Result<VerifyingKey, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        VerifyingKey::from_public_key_pem(&pem).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            expected: "public (SPKI)",
            reason: e.to_string(),
        })
    }

    /// Parses and verifies a stored payload. Checks size, JSON shape, version, key id,
    /// signature, the queue row's id and the validity window; kinds, arguments and the tenant
    /// are checked by the worker afterwards.
    ///
    /// # Errors
    /// The [`Rejection`] that explains why the job must not run.
    pub fn verify(
        &self,
        payload: &[u8],
        limit: usize,
        expected_job_id: Option<JobId>,
        now: i64,
    ) -> Result<Verified, Rejection> {
        if payload.len() > limit {
            return Err(Rejection::TooLarge {
                size: payload.len(),
                limit,
            });
        }
        let env: Envelope = serde_json::from_slice(payload)
            .map_err(|e| Rejection::Malformed(truncate(&e.to_string(), 200)))?;
        if env.v != 1 {
            return Err(Rejection::UnsupportedVersion(env.v));
        }
        let key = self
            .keys
            .get(&env.key_id)
            .ok_or_else(|| Rejection::UnknownKey(truncate(&env.key_id, 64)))?;
        let sig_bytes = B64
            .decode(env.sig.as_bytes())
            .map_err(|_| Rejection::BadSignature)?;
        let sig = Signature::from_slice(&sig_bytes).map_err(|_| Rejection::BadSignature)?;
        let bytes = signing_bytes(
            env.job_id,
            env.tenant_id,
            &env.kind,
            env.args.get(),
            env.issued_at,
            env.expires_at,
            &env.key_id,
        );
        key.verify(&bytes, &sig)
            .map_err(|_| Rejection::BadSignature)?;
        if let Some(expected) = expected_job_id
            && expected != env.job_id
        {
            return Err(Rejection::JobIdMismatch);
        }
        if now >= env.expires_at {
            return Err(Rejection::Expired {
                expires_at: env.expires_at,
                now,
            });
        }
        if env.issued_at > now + MAX_CLOCK_SKEW_SECS {
            return Err(Rejection::NotYetValid {
                issued_at: env.issued_at,
                now,
            });
        }
        let args = serde_json::from_str(env.args.get())
            .map_err(|e| Rejection::Malformed(truncate(&e.to_string(), 200)))?;
        Ok(Verified {
            job_id: env.job_id,
            tenant_id: env.tenant_id,
            kind: env.kind,
            args,
            key_id: env.key_id,
        })
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A key id derived from a public key: `k` + the first 12 hex digits of its SHA-256.
pub fn fingerprint(key: &VerifyingKey) -> KeyId {
    let digest = Sha256::digest(key.as_bytes());
    KeyId(format!("k{}", &hex::encode(digest)[..12]))
}

/// Writes a new key pair as `<dir>/<kid>.key.pem` (mode 0600) and `<dir>/<kid>.pub.pem`.
/// Refuses to overwrite existing files.
///
/// # Errors
/// [`KeyError::Io`] when a file exists or cannot be written.
pub fn generate_key_pair(
    dir: &Path,
    key_id: Option<KeyId>,
) -> Result<(KeyId, PathBuf, PathBuf), KeyError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let kid = key_id.unwrap_or_else(|| fingerprint(&key.verifying_key()));
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let private = dir.join(format!("{kid}.key.pem"));
    let public = dir.join(format!("{kid}.pub.pem"));
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Format {
            path: private.clone(),
            expected: "private (PKCS#8)",
            reason: e.to_string(),
        })?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Format {
            path: public.clone(),
            expected: "public (SPKI)",
            reason: e.to_string(),
        })?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| KeyError::Io { path, source }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .map_err(io(&private))?;
    f.write_all(private_pem.as_bytes()).map_err(io(&private))?;
    f.sync_all().map_err(io(&private))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&public)
        .map_err(io(&public))?;
    f.write_all(public_pem.as_bytes()).map_err(io(&public))?;
    f.sync_all().map_err(io(&public))?;
    Ok((kid, private, public))
}

/// Key id of the development key pair made on first use of the local default cluster.
pub const DEV_KEY_ID: &str = "dev";

/// Makes sure the development key pair exists in `dir` (created on first use). Returns the
/// private and public key paths and whether they were just created.
///
/// # Errors
/// [`KeyError::Io`] when the directory or files cannot be written.
pub fn ensure_dev_keys(dir: &Path) -> Result<(PathBuf, PathBuf, bool), KeyError> {
    let private = dir.join(format!("{DEV_KEY_ID}.key.pem"));
    let public = dir.join(format!("{DEV_KEY_ID}.pub.pem"));
    if private.exists() && public.exists() {
        return Ok((private, public, false));
    }
    let (_, private, public) = generate_key_pair(dir, Some(KeyId(DEV_KEY_ID.to_string())))?;
    Ok((private, public, true))
}

/// The signer from the settings; with no key configured and `dev_keys` given (local default
/// database), the development key.
///
/// # Errors
/// [`KeyError::NoSigningKey`] when nothing is configured on a configured database, or a
/// loading error.
pub fn signer_from_settings(
    keys: &crate::config::KeySettings,
    dev_keys: Option<&Path>,
) -> Result<Signer, KeyError> {
    match (&keys.signing_key_file, &keys.signing_key_id, dev_keys) {
        (Some(file), Some(kid), _) => Signer::from_file(KeyId::parse(kid)?, file),
        (_, _, Some(dir)) => {
            let (private, _, created) = ensure_dev_keys(dir)?;
            if created {
                eprintln!(
                    "created a development signing key pair in {} (key id `{DEV_KEY_ID}`)",
                    dir.display()
                );
            }
            Signer::from_file(KeyId(DEV_KEY_ID.into()), &private)
        }
        _ => Err(KeyError::NoSigningKey),
    }
}

/// The verifying keyring from the settings, plus the development key on the local default.
///
/// # Errors
/// [`KeyError::NoVerifyingKeys`] when no key is listed, or a loading error.
pub fn keyring_from_settings(
    keys: &crate::config::KeySettings,
    dev_keys: Option<&Path>,
) -> Result<Keyring, KeyError> {
    let mut ring = Keyring::new();
    for (kid, path) in &keys.verifying {
        ring.insert(KeyId::parse(kid)?, Keyring::load_public(path)?);
    }
    if let Some(dir) = dev_keys {
        let (_, public, created) = ensure_dev_keys(dir)?;
        if created {
            eprintln!(
                "created a development signing key pair in {} (key id `{DEV_KEY_ID}`)",
                dir.display()
            );
        }
        ring.insert(KeyId(DEV_KEY_ID.into()), Keyring::load_public(&public)?);
    }
    if ring.is_empty() {
        return Err(KeyError::NoVerifyingKeys);
    }
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(
            KeyId::parse("test").unwrap(),
            SigningKey::generate(&mut rand::rngs::OsRng),
        )
    }

    fn job(now: i64) -> Unsigned {
        Unsigned {
            job_id: JobId::new(),
            tenant_id: TenantId(Uuid::new_v4()),
            kind: "noop".into(),
            args: serde_json::json!({"b": 1, "a": [true, null, "x"]}),
            issued_at: now,
            expires_at: now + 60,
        }
    }

    fn ring(s: &Signer) -> Keyring {
        let mut k = Keyring::new();
        k.insert(s.key_id().clone(), s.verifying_key());
        k
    }

    #[test]
    fn round_trip_and_tampering() {
        let s = signer();
        let now = 1_800_000_000;
        let j = job(now);
        let env = s.sign(&j);
        let bytes = serde_json::to_vec(&env).unwrap();
        let v = ring(&s)
            .verify(&bytes, 1 << 20, Some(j.job_id), now)
            .unwrap();
        assert_eq!(v.tenant_id, j.tenant_id);
        assert_eq!(v.args, j.args);

        let mut other = env.clone();
        other.tenant_id = TenantId(Uuid::new_v4());
        let b = serde_json::to_vec(&other).unwrap();
        assert_eq!(
            ring(&s).verify(&b, 1 << 20, None, now),
            Err(Rejection::BadSignature)
        );

        let mut other = env.clone();
        other.args = RawValue::from_string(r#"{"b":2,"a":[true,null,"x"]}"#.into()).unwrap();
        let b = serde_json::to_vec(&other).unwrap();
        assert_eq!(
            ring(&s).verify(&b, 1 << 20, None, now),
            Err(Rejection::BadSignature)
        );

        assert!(matches!(
            ring(&s).verify(&bytes, 1 << 20, None, now + 61),
            Err(Rejection::Expired { .. })
        ));
        assert_eq!(
            Keyring::new().verify(&bytes, 1 << 20, None, now),
            Err(Rejection::UnknownKey("test".into()))
        );
        assert!(matches!(
            ring(&s).verify(b"\xff\xfe not json", 1 << 20, None, now),
            Err(Rejection::Malformed(_))
        ));
        assert!(matches!(
            ring(&s).verify(&bytes, 10, None, now),
            Err(Rejection::TooLarge { .. })
        ));
        assert_eq!(
            ring(&s).verify(&bytes, 1 << 20, Some(JobId::new()), now),
            Err(Rejection::JobIdMismatch)
        );
    }

    #[test]
    fn signature_copied_from_another_job_fails() {
        let s = signer();
        let now = 1_800_000_000;
        let a = s.sign(&job(now));
        let mut b = s.sign(&job(now));
        b.sig = a.sig.clone();
        let bytes = serde_json::to_vec(&b).unwrap();
        assert_eq!(
            ring(&s).verify(&bytes, 1 << 20, None, now),
            Err(Rejection::BadSignature)
        );
    }

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
    fn generated_keys_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let (kid, private, public) = generate_key_pair(dir.path(), None).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s = Signer::from_file(kid.clone(), &private).unwrap();
        let p = Keyring::load_public(&public).unwrap();
        assert_eq!(s.verifying_key(), p);
        assert!(
            generate_key_pair(dir.path(), Some(kid)).is_err(),
            "must not overwrite"
        );
    }
}
