//! Signing and verifying keys: the enqueuer's [`Signer`] (an Ed25519 private key and its id)
//! and the worker's [`Keyring`] (public keys by id), their PEM files, and the development key
//! pair used on the local default database.
//!
//! Private keys are written as PKCS#8 v1 (RFC 8410) and public keys as SPKI, the forms OpenSSL
//! (`openssl genpkey -algorithm ed25519`), Python's `cryptography` and most JWT libraries read
//! and write; PKCS#8 v2 private keys are read too.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::{Envelope, MAX_CLOCK_SKEW_SECS, Rejection, Unsigned, Verified, signing_bytes};
use crate::ids::{BadKeyId, JobId, KeyId};

/// Errors loading or generating keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Bad key id text.
    #[error(transparent)]
    BadKeyId(#[from] BadKeyId),
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
        self.keys.insert(key_id.as_str().to_string(), key);
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
        Ok(Verified {
            job_id: env.job_id,
            tenant_id: env.tenant_id,
            kind: env.kind,
            args: env.args,
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
    KeyId::parse(&format!("k{}", &hex::encode(digest)[..12])).expect("a valid key id")
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
    // PKCS#8 v1 (RFC 8410: the private key alone), which OpenSSL 3 and Python's
    // `cryptography` read; ed25519-dalek's own encoder writes v2 (with the public key
    // attached), which they refuse.
    let v1 = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    let private_pem = v1
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
    let (_, private, public) =
        generate_key_pair(dir, Some(KeyId::parse(DEV_KEY_ID).expect("a valid key id")))?;
    Ok((private, public, true))
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::ids::TenantId;

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
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(v.args.get()).unwrap(),
            j.args
        );

        let mut other = env.clone();
        other.tenant_id = TenantId(Uuid::new_v4());
        let b = serde_json::to_vec(&other).unwrap();
        assert_eq!(
            ring(&s).verify(&b, 1 << 20, None, now).unwrap_err(),
            Rejection::BadSignature
        );

        let mut other = env.clone();
        other.args = RawValue::from_string(r#"{"b":2,"a":[true,null,"x"]}"#.into()).unwrap();
        let b = serde_json::to_vec(&other).unwrap();
        assert_eq!(
            ring(&s).verify(&b, 1 << 20, None, now).unwrap_err(),
            Rejection::BadSignature
        );

        assert!(matches!(
            ring(&s).verify(&bytes, 1 << 20, None, now + 61),
            Err(Rejection::Expired { .. })
        ));
        assert_eq!(
            Keyring::new()
                .verify(&bytes, 1 << 20, None, now)
                .unwrap_err(),
            Rejection::UnknownKey("test".into())
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
            ring(&s)
                .verify(&bytes, 1 << 20, Some(JobId::new()), now)
                .unwrap_err(),
            Rejection::JobIdMismatch
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
            ring(&s).verify(&bytes, 1 << 20, None, now).unwrap_err(),
            Rejection::BadSignature
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
