//! The keys login tokens are verified with: a JSON Web Key Set from a file or the identity
//! provider's URL, or a shared HS256 secret.
//!
//! A key set is cached for `jwks_ttl_secs`. A token naming a key id the set lacks (a key the
//! provider just rotated in) makes one fetch, and then no other for
//! `jwks_refetch_cooldown_secs`: fetches are single-flight behind one lock, so a burst of tokens
//! with random key ids costs at most one fetch. When a fetch fails, the last good keys stay in
//! use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::Error;
use crate::config::JwtSettings;

/// One verifying key, with the algorithm its JWK pins (if it does).
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) decoding: DecodingKey,
    pub(crate) algorithm: Option<Algorithm>,
}

/// Keys by key id.
#[derive(Clone, Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    /// Keys without a `kid` (a single-key set, or the HS256 secret).
    unnamed: Vec<Key>,
}

impl KeySet {
    fn find(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            // A token naming no key is verified only when the set has exactly one key.
            None => match (self.by_kid.len(), self.unnamed.as_slice()) {
                (1, []) => self.by_kid.values().next(),
                (0, [one]) => Some(one),
                _ => None,
            },
        }
    }

    fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }
}

enum Source {
    File(PathBuf),
    Url(reqwest::Client, String),
    Secret,
}

struct Loaded {
    keys: Arc<KeySet>,
    /// When the set should be fetched again.
    due: Instant,
}

/// Why no key was found for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// The set has no key of that id (after the one refetch allowed).
    UnknownKid,
    /// The token names no key and the set has several.
    NoKid,
    /// No key set could be loaded yet.
    NoKeys,
}

/// The cached key set and how to refresh it.
pub(crate) struct KeyStore {
    source: Source,
    loaded: RwLock<Option<Loaded>>,
    /// Held while fetching; holds when the last fetch was tried.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    ttl: Duration,
    cooldown: Duration,
}

impl KeyStore {
    /// Loads the keys `jwt` names. A key file or secret that does not load is an error; an
    /// unreachable `jwks_url` is logged and retried on use (`/readyz` says not ready until
    /// keys have loaded).
    ///
    /// # Errors
    /// [`Error::Keys`].
    pub(crate) async fn open(jwt: &JwtSettings) -> Result<Self, Error> {
        let (source, initial) = if let Some(file) = &jwt.hs256_secret_file {
            let secret = std::fs::read(file)
                .map_err(|e| Error::Keys(format!("cannot read {}: {e}", file.display())))?;
            let secret = trim_newline(&secret);
            if secret.len() < 32 {
                return Err(Error::Keys(format!(
                    "the HS256 secret in {} is {} bytes; use at least 32",
                    file.display(),
                    secret.len()
                )));
            }
            let key = Key {
                decoding: DecodingKey::from_secret(secret),
                algorithm: Some(Algorithm::HS256),
            };
            let set = KeySet {
                by_kid: HashMap::new(),
                unnamed: vec![key],
            };
            (Source::Secret, Some(set))
        } else if let Some(file) = &jwt.jwks_file {
            let source = Source::File(file.clone());
            let set = fetch(&source).await?;
            (source, Some(set))
        } else if let Some(url) = &jwt.jwks_url {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| Error::Keys(format!("cannot make an HTTP client: {e}")))?;
            let source = Source::Url(client, url.clone());
            let set = match fetch(&source).await {
                Ok(set) => Some(set),
                Err(e) => {
                    tracing::warn!(error = %e, "the key set could not be fetched; retrying when tokens arrive");
                    None
                }
            };
            (source, set)
        } else {
            return Err(Error::Keys("no key source is configured".into()));
        };
        let fetched = initial.is_some() && !matches!(source, Source::Secret);
        Ok(Self {
            source,
            loaded: RwLock::new(initial.map(|keys| Loaded {
                keys: Arc::new(keys),
                due: Instant::now() + Duration::from_secs(jwt.jwks_ttl_secs),
            })),
            refresh: tokio::sync::Mutex::new(fetched.then(Instant::now)),
            ttl: Duration::from_secs(jwt.jwks_ttl_secs),
            cooldown: Duration::from_secs(jwt.jwks_refetch_cooldown_secs),
        })
    }

    /// Whether any keys are loaded.
    pub(crate) fn ready(&self) -> bool {
        self.current().is_some_and(|(k, _)| k.len() > 0)
    }

    fn current(&self) -> Option<(Arc<KeySet>, Instant)> {
        let guard = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|l| (l.keys.clone(), l.due))
    }

    /// The key for a token's `kid`.
    pub(crate) async fn key(&self, kid: Option<&str>) -> Result<Key, Missing> {
        let current = self.current();
        if let Some((keys, due)) = &current {
            if Instant::now() >= *due && !matches!(self.source, Source::Secret) {
                // Stale: one caller refreshes, the others go on with what is loaded.
                if let Ok(mut last) = self.refresh.try_lock() {
                    self.refetch(&mut last).await;
                }
            } else if let Some(key) = keys.find(kid) {
                return Ok(key.clone());
            }
        }
        if let Some((keys, _)) = self.current()
            && let Some(key) = keys.find(kid)
        {
            return Ok(key.clone());
        }
        if matches!(self.source, Source::Secret) || (kid.is_none() && current.is_some()) {
            return Err(if current.is_some() {
                Missing::NoKid
            } else {
                Missing::NoKeys
            });
        }
        // An unknown key id (or nothing loaded yet): one fetch per cooldown, single flight.
        let mut last = self.refresh.lock().await;
        if last.is_none_or(|t| t.elapsed() >= self.cooldown) {
            self.refetch(&mut last).await;
        }
        drop(last);
        match self.current() {
            Some((keys, _)) => keys.find(kid).cloned().ok_or(if kid.is_some() {
                Missing::UnknownKid
            } else {
                Missing::NoKid
            }),
            None => Err(Missing::NoKeys),
        }
    }

    /// Fetches the set; on failure keeps the last good one.
    async fn refetch(&self, last: &mut Option<Instant>) {
        *last = Some(Instant::now());
        match fetch(&self.source).await {
            Ok(set) => {
                let mut guard = self.loaded.write().unwrap_or_else(|e| e.into_inner());
                *guard = Some(Loaded {
                    keys: Arc::new(set),
                    due: Instant::now() + self.ttl,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the key set could not be refreshed; keeping the last good keys");
                // Try again after the cooldown, not on every request.
                let mut guard = self.loaded.write().unwrap_or_else(|e| e.into_inner());
                if let Some(l) = guard.as_mut() {
                    l.due = Instant::now() + self.cooldown.min(self.ttl);
                }
            }
        }
    }
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let mut b = b;
    while let [rest @ .., b'\n' | b'\r'] = b {
        b = rest;
    }
    b
}

async fn fetch(source: &Source) -> Result<KeySet, Error> {
    let body = match source {
        Source::File(path) => tokio::fs::read(path)
            .await
            .map_err(|e| Error::Keys(format!("cannot read {}: {e}", path.display())))?,
        Source::Url(client, url) => {
            let response = client
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| Error::Keys(format!("cannot fetch the key set: {e}")))?;
            let bytes = response
                .bytes()
                .await
                .map_err(|e| Error::Keys(format!("cannot fetch the key set: {e}")))?;
            if bytes.len() > 1 << 20 {
                return Err(Error::Keys("the key set is larger than 1 MiB".into()));
            }
            bytes.to_vec()
        }
        Source::Secret => return Ok(KeySet::default()),
    };
    parse_jwks(&body)
}

/// Parses a JWKS document. Keys that are not for signatures, or of a type this build cannot
/// verify, are skipped; a document with no usable key is an error.
fn parse_jwks(body: &[u8]) -> Result<KeySet, Error> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body)
        .map_err(|e| Error::Keys(format!("the key set is not a JWKS document: {e}")))?;
    let mut set = KeySet::default();
    for raw in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        if matches!(
            jwk.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            // A symmetric key in a public key set would let its readers sign.
            continue;
        }
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let algorithm = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        let key = Key {
            decoding,
            algorithm,
        };
        match jwk.common.key_id {
            Some(kid) => {
                set.by_kid.insert(kid, key);
            }
            None => set.unnamed.push(key),
        }
    }
    if set.len() == 0 {
        return Err(Error::Keys(
            "the key set holds no usable signing key".into(),
        ));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_and_encryption_keys_in_a_public_set_are_skipped() {
        let doc = br#"{"keys": [
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "e", "use": "enc",
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ok",
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let set = parse_jwks(doc).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.find(Some("ok")).is_some());
        assert!(set.find(Some("s")).is_none());
        assert!(
            set.find(None).is_some(),
            "one key: a token without kid uses it"
        );
    }

    #[test]
    fn a_set_without_usable_keys_is_refused() {
        assert!(parse_jwks(br#"{"keys": []}"#).is_err());
        assert!(parse_jwks(b"not json").is_err());
    }
}
