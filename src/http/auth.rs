//! Login tokens: who is calling, and for which tenant.
//!
//! A request's tenant comes only from its bearer token, a JWT verified here: the algorithm must
//! be one of `http.jwt.algorithms` (the token's header only picks among them, so `none` and an
//! HS256 token signed with a public key are refused before any key is used), the signature
//! must verify with a key of the configured set, and `exp`, `iss`, `aud` and `iat` are
//! required (`nbf` is honoured when present), with `leeway_secs` of clock skew and at most
//! `max_token_age_secs` since issue.

use std::collections::BTreeSet;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};

use super::keys::{KeyStore, Missing};
use super::{ApiError, Error};
use crate::config::JwtSettings;
use crate::ids::TenantId;

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant the token is for.
    pub tenant: TenantId,
    /// The token's subject (the user), when it has one; for logs.
    pub subject: Option<String>,
    /// The scopes the token grants.
    pub scopes: BTreeSet<String>,
}

/// Verifies bearer tokens.
pub(crate) struct Verifier {
    keys: KeyStore,
    algorithms: Vec<Algorithm>,
    validation: Validation,
    tenant_claim: String,
    scope_claim: String,
    leeway: u64,
    max_age: u64,
}

impl Verifier {
    /// A verifier for `jwt` (already validated), with its keys loaded.
    ///
    /// # Errors
    /// [`Error::Keys`] when the keys do not load.
    pub(crate) async fn new(jwt: &JwtSettings) -> Result<Self, Error> {
        let algorithms: Vec<Algorithm> = jwt
            .algorithms
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| Error::Keys(format!("unknown algorithm `{a}`")))
            })
            .collect::<Result<_, _>>()?;
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.clone();
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&jwt.issuer]);
        validation.set_audience(&[&jwt.audience]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = jwt.leeway_secs;
        Ok(Self {
            keys: KeyStore::open(jwt).await?,
            algorithms,
            validation,
            tenant_claim: jwt.tenant_claim.clone(),
            scope_claim: jwt.scope_claim.clone(),
            leeway: jwt.leeway_secs,
            max_age: jwt.max_token_age_secs,
        })
    }

    /// The key store (for readiness and its fetch count).
    pub(crate) fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Verifies an `Authorization` header value.
    pub(crate) async fn verify(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let token = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("missing_token", "send `Authorization: Bearer <token>`")
            })?;
        let header = peek_header(token)?;
        let alg = header
            .alg
            .parse::<Algorithm>()
            .ok()
            .filter(|a| self.algorithms.contains(a))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "algorithm_not_allowed",
                    "the token's algorithm is not accepted",
                )
            })?;
        let key = self
            .keys
            .key(header.kid.as_deref())
            .await
            .map_err(|m| match m {
                Missing::UnknownKid => ApiError::unauthorized(
                    "unknown_key",
                    "the token's key id is not in the key set",
                ),
                Missing::NoKid => ApiError::unauthorized(
                    "unknown_key",
                    "the token names no key id and the key set has several keys",
                ),
                Missing::NoKeys => {
                    ApiError::unavailable("keys_unavailable", "no verifying keys are loaded yet")
                }
            })?;
        if key.algorithm.is_some_and(|a| a != alg) {
            return Err(ApiError::unauthorized(
                "algorithm_not_allowed",
                "the token's algorithm is not the one its key is for",
            ));
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.decoding,
            &self.validation,
        )
        .map_err(|e| token_error(e.kind()))?;
        let claims = data.claims;
        let now = jsonwebtoken::get_current_timestamp();
        let Some(iat) = claims.get("iat").and_then(serde_json::Value::as_u64) else {
            return Err(ApiError::unauthorized(
                "missing_claim",
                "the token has no `iat` (issued at)",
            ));
        };
        if iat > now + self.leeway {
            return Err(ApiError::unauthorized(
                "token_not_yet_valid",
                "the token is issued in the future",
            ));
        }
        if now.saturating_sub(iat) > self.max_age + self.leeway {
            return Err(ApiError::unauthorized(
                "token_too_old",
                "the token was issued too long ago; log in again",
            ));
        }
        let claim = if self.tenant_claim.starts_with('/') {
            serde_json::Value::Object(claims.clone())
                .pointer(&self.tenant_claim)
                .cloned()
        } else {
            claims.get(&self.tenant_claim).cloned()
        };
        let tenant = match claim {
            None | Some(serde_json::Value::Null) => {
                return Err(ApiError::forbidden(
                    "missing_tenant_claim",
                    "the token names no tenant",
                ));
            }
            Some(serde_json::Value::String(s)) => s.parse::<TenantId>().map_err(|_| {
                ApiError::forbidden("unknown_tenant", "the token's tenant is not registered")
            })?,
            Some(_) => {
                return Err(ApiError::forbidden(
                    "unknown_tenant",
                    "the token's tenant is not registered",
                ));
            }
        };
        let scopes = match claims.get(&self.scope_claim) {
            Some(serde_json::Value::String(s)) => {
                s.split_whitespace().map(str::to_string).collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => BTreeSet::new(),
        };
        Ok(Caller {
            tenant,
            subject: claims
                .get("sub")
                .and_then(|s| s.as_str())
                .map(str::to_string),
            scopes,
        })
    }
}

struct PeekedHeader {
    alg: String,
    kid: Option<String>,
}

/// The token's header, read without trusting it: only to pick among the accepted algorithms
/// and the loaded keys.
fn peek_header(token: &str) -> Result<PeekedHeader, ApiError> {
    let malformed = || ApiError::unauthorized("malformed_token", "the token is not a JWT");
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| malformed())?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    let alg = value
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or_else(malformed)?;
    let kid = match value.get("kid") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(malformed()),
    };
    Ok(PeekedHeader {
        alg: alg.to_string(),
        kid,
    })
}

fn token_error(kind: &ErrorKind) -> ApiError {
    let (code, message) = match kind {
        ErrorKind::ExpiredSignature => ("token_expired", "the token has expired"),
        ErrorKind::ImmatureSignature => ("token_not_yet_valid", "the token is not valid yet (nbf)"),
        ErrorKind::InvalidIssuer => (
            "wrong_issuer",
            "the token is not from the configured issuer",
        ),
        ErrorKind::InvalidAudience => ("wrong_audience", "the token is not for this API"),
        ErrorKind::InvalidSignature => ("bad_signature", "the token's signature does not verify"),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => (
            "algorithm_not_allowed",
            "the token's algorithm is not accepted",
        ),
        ErrorKind::MissingRequiredClaim(_) => (
            "missing_claim",
            "the token lacks a required claim (exp, iss, aud)",
        ),
        ErrorKind::InvalidClaimFormat(_) => {
            ("malformed_token", "a claim of the token has the wrong type")
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => ("malformed_token", "the token is not a JWT"),
        _ => ("invalid_token", "the token does not verify"),
    };
    ApiError::unauthorized(code, message)
}
