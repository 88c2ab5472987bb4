//! `[http]`: the HTTP enqueue API (`tenant-worker serve`) and the login tokens it accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use super::{Error, Result};

/// The HTTP API: where it listens, its limits, the tokens it accepts and the kinds callers may
/// enqueue.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    /// Listen address, `host:port`.
    pub listen: String,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// A request that takes longer is answered `503 timeout` (its transaction rolled back).
    pub request_timeout_ms: u64,
    /// Requests per second each tenant may make (a token bucket refilled at this rate).
    pub rate_per_sec: u32,
    /// How many requests a tenant may make at once before the rate applies.
    pub rate_burst: u32,
    /// Jobs per page of `GET /v1/jobs` when the caller does not ask for fewer.
    pub page_size: u32,
    /// Login tokens.
    pub jwt: JwtSettings,
    /// Which kinds callers may enqueue.
    pub kinds: HttpKindSettings,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            rate_per_sec: 100,
            rate_burst: 200,
            page_size: 50,
            jwt: JwtSettings::default(),
            kinds: HttpKindSettings::default(),
        }
    }
}

/// How login tokens are verified. Exactly one key source: `jwks_file`, `jwks_url` or
/// `hs256_secret_file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct JwtSettings {
    /// A JSON Web Key Set on disk (re-read when a token names a key it lacks, at most once per
    /// `jwks_refetch_cooldown_secs`).
    pub jwks_file: Option<PathBuf>,
    /// A JSON Web Key Set served by the identity provider (`https://…/.well-known/jwks.json`),
    /// cached for `jwks_ttl_secs`; while it is unreachable the last good keys stay in use.
    pub jwks_url: Option<String>,
    /// A file holding a shared HS256 secret (at least 32 bytes). Only for providers that
    /// cannot sign asymmetrically.
    pub hs256_secret_file: Option<PathBuf>,
    /// The required `iss`.
    pub issuer: String,
    /// The required `aud` (one of the token's audiences).
    pub audience: String,
    /// The claim holding the tenant id: a top-level claim name (`org_id`, or a namespaced
    /// `https://example.com/tenant`), or a JSON pointer into the claims (`/org/id`).
    pub tenant_claim: String,
    /// The claim holding the caller's scopes (a space-separated string or an array), checked
    /// against `[http.kinds.scopes]`.
    pub scope_claim: String,
    /// The accepted signing algorithms; a token's own `alg` header only selects among these.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds (at most 30).
    pub leeway_secs: u64,
    /// Tokens issued (`iat`) longer ago than this are refused, whatever their `exp`.
    pub max_token_age_secs: u64,
    /// How long a fetched key set is used before it is fetched again.
    pub jwks_ttl_secs: u64,
    /// A token naming an unknown key makes at most one fetch per this many seconds.
    pub jwks_refetch_cooldown_secs: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            jwks_file: None,
            jwks_url: None,
            hs256_secret_file: None,
            issuer: String::new(),
            audience: String::new(),
            tenant_claim: "tenant_id".into(),
            scope_claim: "scope".into(),
            algorithms: vec!["RS256".into()],
            leeway_secs: 5,
            max_token_age_secs: 24 * 3600,
            jwks_ttl_secs: 300,
            jwks_refetch_cooldown_secs: 30,
        }
    }
}

/// The kinds callers may enqueue over HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpKindSettings {
    /// Kinds a caller may enqueue (and which `GET` shows all kinds of the tenant's jobs).
    pub allowed: Vec<String>,
    /// A scope a caller's token must hold to enqueue a kind, by kind.
    pub scopes: BTreeMap<String, String>,
}

impl Default for HttpKindSettings {
    fn default() -> Self {
        Self {
            allowed: vec!["export".into(), "import".into(), "rollup".into()],
            scopes: BTreeMap::new(),
        }
    }
}

/// The signing algorithms a token may use.
pub const ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
];

impl HttpSettings {
    /// Checks what `serve` needs: a key source, an issuer and audience, algorithms that fit the
    /// keys, sane limits. The rest of the settings do not need `[http]`, so `Settings::load`
    /// leaves it to this.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &'static str, reason: String| Err(Error::Invalid { key, reason });
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "http.listen",
                format!("`{}` is not an address like 127.0.0.1:8080", self.listen),
            );
        }
        let ranges: [(&'static str, u64, u64); 5] = [
            ("http.max_body_bytes", self.max_body_bytes as u64, 16 << 20),
            ("http.request_timeout_ms", self.request_timeout_ms, 600_000),
            ("http.rate_per_sec", self.rate_per_sec.into(), 1_000_000),
            ("http.rate_burst", self.rate_burst.into(), 1_000_000),
            ("http.page_size", self.page_size.into(), 1_000),
        ];
        for (key, value, most) in ranges {
            if value == 0 {
                return invalid(key, "must be greater than 0".into());
            }
            if value > most {
                return invalid(
                    key,
                    format!("{value} is more than the largest accepted, {most}"),
                );
            }
        }
        let jwt = &self.jwt;
        let sources = [
            jwt.jwks_file.is_some(),
            jwt.jwks_url.is_some(),
            jwt.hs256_secret_file.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return invalid(
                    "http.jwt",
                    "set one of jwks_file, jwks_url or hs256_secret_file: tokens cannot be \
                     verified without keys"
                        .into(),
                );
            }
            1 => {}
            _ => {
                return invalid(
                    "http.jwt",
                    "set only one of jwks_file, jwks_url and hs256_secret_file".into(),
                );
            }
        }
        if let Some(url) = &jwt.jwks_url {
            match url::Url::parse(url) {
                Ok(u) if u.scheme() == "https" || is_loopback_http(&u) => {}
                _ => {
                    return invalid(
                        "http.jwt.jwks_url",
                        "must be an https:// URL (plain http only on loopback)".into(),
                    );
                }
            }
        }
        if jwt.issuer.is_empty() {
            return invalid(
                "http.jwt.issuer",
                "is required: tokens must name their issuer".into(),
            );
        }
        if jwt.audience.is_empty() {
            return invalid(
                "http.jwt.audience",
                "is required: tokens must name this API".into(),
            );
        }
        if jwt.tenant_claim.is_empty() {
            return invalid("http.jwt.tenant_claim", "must not be empty".into());
        }
        if jwt.algorithms.is_empty() {
            return invalid("http.jwt.algorithms", "list at least one algorithm".into());
        }
        let mut seen = BTreeSet::new();
        for alg in &jwt.algorithms {
            if !ALGORITHMS.contains(&alg.as_str()) {
                return invalid(
                    "http.jwt.algorithms",
                    format!("`{alg}` is not one of {}", ALGORITHMS.join(", ")),
                );
            }
            seen.insert(alg.as_str());
        }
        let symmetric = jwt.hs256_secret_file.is_some();
        if symmetric && seen.iter().any(|a| *a != "HS256") {
            return invalid(
                "http.jwt.algorithms",
                "with hs256_secret_file only HS256 verifies; list just HS256".into(),
            );
        }
        if !symmetric && seen.contains("HS256") {
            return invalid(
                "http.jwt.algorithms",
                "HS256 with a public key set would let anyone holding the public key sign \
                 tokens; remove it"
                    .into(),
            );
        }
        if jwt.leeway_secs > 30 {
            return invalid("http.jwt.leeway_secs", "must be at most 30".into());
        }
        for (key, value) in [
            ("http.jwt.max_token_age_secs", jwt.max_token_age_secs),
            ("http.jwt.jwks_ttl_secs", jwt.jwks_ttl_secs),
            (
                "http.jwt.jwks_refetch_cooldown_secs",
                jwt.jwks_refetch_cooldown_secs,
            ),
        ] {
            if value == 0 || value > 30 * 24 * 3600 {
                return invalid(key, "must be between 1 and 2592000 seconds".into());
            }
        }
        for kind in self.kinds.scopes.keys() {
            if !self.kinds.allowed.contains(kind) {
                return invalid(
                    "http.kinds.scopes",
                    format!("`{kind}` has a scope but is not in http.kinds.allowed"),
                );
            }
        }
        Ok(())
    }
}

fn is_loopback_http(u: &url::Url) -> bool {
    u.scheme() == "http"
        && match u.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> HttpSettings {
        let mut s = HttpSettings::default();
        s.jwt.jwks_file = Some("jwks.json".into());
        s.jwt.issuer = "https://login.example.com/".into();
        s.jwt.audience = "tenant-worker".into();
        s
    }

    fn refused(f: impl FnOnce(&mut HttpSettings)) -> String {
        let mut s = good();
        f(&mut s);
        match s.validate() {
            Err(Error::Invalid { key, .. }) => key.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_complete_section_passes() {
        good().validate().unwrap();
    }

    #[test]
    fn keys_algorithms_and_limits_are_checked() {
        assert_eq!(refused(|s| s.jwt.jwks_file = None), "http.jwt");
        assert_eq!(
            refused(|s| s.jwt.hs256_secret_file = Some("s".into())),
            "http.jwt"
        );
        assert_eq!(refused(|s| s.jwt.issuer.clear()), "http.jwt.issuer");
        assert_eq!(refused(|s| s.jwt.audience.clear()), "http.jwt.audience");
        assert_eq!(
            refused(|s| s.jwt.algorithms = vec!["none".into()]),
            "http.jwt.algorithms"
        );
        assert_eq!(
            refused(|s| s.jwt.algorithms.push("HS256".into())),
            "http.jwt.algorithms"
        );
        assert_eq!(
            refused(|s| {
                s.jwt.jwks_file = None;
                s.jwt.hs256_secret_file = Some("s".into());
            }),
            "http.jwt.algorithms"
        );
        assert_eq!(refused(|s| s.jwt.leeway_secs = 31), "http.jwt.leeway_secs");
        assert_eq!(refused(|s| s.rate_per_sec = 0), "http.rate_per_sec");
        assert_eq!(refused(|s| s.listen = "8080".into()), "http.listen");
        assert_eq!(
            refused(|s| {
                s.jwt.jwks_file = None;
                s.jwt.jwks_url = Some("http://idp.example.com/jwks".into());
            }),
            "http.jwt.jwks_url"
        );
        assert_eq!(
            refused(|s| {
                s.kinds.scopes.insert("noop".into(), "x".into());
            }),
            "http.kinds.scopes"
        );
    }
}
