//! Who is buying: optional verification of a signed bearer token (JWT).
//!
//! Off by default, and then the body's `user_id` is taken at its word: the
//! gateway must sit behind something that authenticates buyers. On (one of
//! the `FLASHSALE_GATEWAY_AUTH_*` key settings is given), the token's
//! subject is the buyer: the per-buyer limits, the request id and the
//! status board all key on it, and a body naming someone else is refused.
//!
//! Only asymmetric algorithms are accepted from a public key or a JWKS, and
//! only HS256 from a shared secret, each key with its own algorithm: a
//! token cannot pick how it is checked (`alg: none`, or an RSA public key
//! used as an HMAC secret, are refused).

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use flashsale_core::ids::UserId;
use flashsale_core::service::problem::Problem;
use flashsale_core::service::settings::{Env, SettingError};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The `realm` of our `WWW-Authenticate` challenges.
const REALM: &str = "flashsale";

/// Where the keys that sign buyers' tokens come from.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// `FLASHSALE_GATEWAY_AUTH_HS256_SECRET`: a secret shared with the
    /// issuer; tokens are HS256.
    SharedSecret(String),
    /// `FLASHSALE_GATEWAY_AUTH_PUBLIC_KEY_FILE`: the issuer's public key,
    /// PEM; tokens are RS256 for an RSA key, ES256 for a P-256 one.
    PublicKeyFile(PathBuf),
    /// `FLASHSALE_GATEWAY_AUTH_JWKS_FILE`: the issuer's key set (RFC 7517);
    /// a token names its key with `kid` (it may not when the set has one).
    JwksFile(PathBuf),
}

/// `FLASHSALE_GATEWAY_AUTH_*`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSettings {
    /// None: authentication is off.
    pub key: Option<KeySource>,
    /// `_ISSUER`: the `iss` every token must carry (required when on).
    pub issuer: String,
    /// `_AUDIENCE`: the `aud` every token must include (required when on).
    pub audience: String,
    /// `_LEEWAY_S`: how far `exp` and `nbf` may be off, for issuers' clocks.
    pub leeway: Duration,
}

impl AuthSettings {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        let given = |suffix: &str| {
            Some(env.string(suffix, ""))
                .filter(|v| !v.trim().is_empty())
                .map(|v| (suffix.to_owned(), v))
        };
        let sources: Vec<(String, String)> = [
            "GATEWAY_AUTH_HS256_SECRET",
            "GATEWAY_AUTH_PUBLIC_KEY_FILE",
            "GATEWAY_AUTH_JWKS_FILE",
        ]
        .iter()
        .filter_map(|s| given(s))
        .collect();
        let refuse = |suffix: &str, value: &str, problem: &str| SettingError {
            name: format!("FLASHSALE_{suffix}"),
            value: value.to_owned(),
            problem: problem.to_owned(),
        };
        let key = match sources.as_slice() {
            [] => None,
            [(suffix, value)] => Some(match suffix.as_str() {
                "GATEWAY_AUTH_HS256_SECRET" if value.len() < 32 => {
                    // RFC 7518 §3.2: an HS256 key at least as long as the hash.
                    return Err(refuse(
                        suffix,
                        "(hidden)",
                        "use a secret of 32 bytes or more",
                    ));
                }
                "GATEWAY_AUTH_HS256_SECRET" => KeySource::SharedSecret(value.clone()),
                "GATEWAY_AUTH_PUBLIC_KEY_FILE" => KeySource::PublicKeyFile(value.into()),
                _ => KeySource::JwksFile(value.into()),
            }),
            [(suffix, value), ..] => {
                return Err(refuse(
                    suffix,
                    value,
                    "give one of GATEWAY_AUTH_HS256_SECRET, _PUBLIC_KEY_FILE and _JWKS_FILE",
                ));
            }
        };
        let issuer = env.string("GATEWAY_AUTH_ISSUER", "");
        let audience = env.string("GATEWAY_AUTH_AUDIENCE", "");
        if key.is_some() {
            for (suffix, value) in [
                ("GATEWAY_AUTH_ISSUER", &issuer),
                ("GATEWAY_AUTH_AUDIENCE", &audience),
            ] {
                if value.trim().is_empty() {
                    return Err(refuse(
                        suffix,
                        value,
                        "required when tokens are verified: a token minted for another \
                         service or by another issuer must not buy here",
                    ));
                }
            }
        }
        Ok(Self {
            key,
            issuer,
            audience,
            leeway: Duration::from_secs(env.get("GATEWAY_AUTH_LEEWAY_S", 30)?),
        })
    }
}

/// A key setting that names a file or key the gateway cannot use.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no key the gateway can use: {problem}")]
    Key { path: PathBuf, problem: String },
}

/// One key a token may be signed with, and the one algorithm it checks.
struct TrustedKey {
    id: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// Checks buyers' bearer tokens against the configured keys.
pub struct Authenticator {
    keys: Vec<TrustedKey>,
}

/// The keys' ids and algorithms, never their material.
impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.keys
                    .iter()
                    .map(|k| (k.id.as_deref(), &k.validation.algorithms)),
            )
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Authenticator {
    /// None when authentication is off.
    pub fn from_settings(settings: &AuthSettings) -> Result<Option<Self>, AuthSetupError> {
        let Some(source) = &settings.key else {
            return Ok(None);
        };
        let keys: Vec<(Option<String>, DecodingKey, Algorithm)> = match source {
            KeySource::SharedSecret(secret) => {
                let key = DecodingKey::from_secret(secret.as_bytes()).map_err(|e| {
                    AuthSetupError::Key {
                        path: "FLASHSALE_GATEWAY_AUTH_HS256_SECRET".into(),
                        problem: e.to_string(),
                    }
                })?;
                vec![(None, key, Algorithm::HS256)]
            }
            KeySource::PublicKeyFile(path) => {
                let pem = read(path)?;
                let key = DecodingKey::from_ec_pem(&pem)
                    .map(|k| (k, Algorithm::ES256))
                    .or_else(|_| DecodingKey::from_rsa_pem(&pem).map(|k| (k, Algorithm::RS256)))
                    .map_err(|_| AuthSetupError::Key {
                        path: path.clone(),
                        problem: "not a PEM public key of RSA or of the P-256 curve".into(),
                    })?;
                vec![(None, key.0, key.1)]
            }
            KeySource::JwksFile(path) => jwks(path)?,
        };
        Ok(Some(Self {
            keys: keys
                .into_iter()
                .map(|(id, key, algorithm)| TrustedKey {
                    id,
                    key,
                    validation: validation(settings, algorithm),
                })
                .collect(),
        }))
    }

    /// The buyer a request's `Authorization: Bearer` token names.
    pub fn buyer(&self, headers: &HeaderMap) -> Result<UserId, Problem> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthenticated(
                "missing-token",
                "this gateway sells only to buyers who send a bearer token \
                 (Authorization: Bearer <JWT>)",
                None,
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                unauthenticated(
                    "invalid-token",
                    "the Authorization header must be 'Bearer <JWT>'",
                    Some("invalid_request"),
                )
            })?;
        let invalid =
            |detail: String| unauthenticated("invalid-token", &detail, Some("invalid_token"));
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| invalid(format!("the token cannot be read: {}", explain(e.kind()))))?;
        let trusted = match &header.kid {
            Some(kid) => self.keys.iter().find(|k| k.id.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or_else(|| {
            invalid(match &header.kid {
                Some(kid) => format!("the token's key {kid:?} is not one this gateway trusts"),
                None => "the token names no key (kid), and this gateway trusts several".into(),
            })
        })?;
        let claims = jsonwebtoken::decode::<Claims>(token, &trusted.key, &trusted.validation)
            .map_err(|e| invalid(format!("the token is not valid: {}", explain(e.kind()))))?
            .claims;
        UserId::parse(&claims.sub).map_err(|e| {
            invalid(format!(
                "the token's subject is not a user id this gateway takes: {e}"
            ))
        })
    }
}

fn validation(settings: &AuthSettings, algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    validation.set_issuer(&[&settings.issuer]);
    validation.set_audience(&[&settings.audience]);
    validation.validate_nbf = true;
    validation.leeway = settings.leeway.as_secs();
    validation
}

fn read(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|source| AuthSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The RS256 and ES256 keys of a JWKS file; a set with none is an error,
/// and keys of other kinds (symmetric ones above all) are left out.
fn jwks(path: &Path) -> Result<Vec<(Option<String>, DecodingKey, Algorithm)>, AuthSetupError> {
    let set: JwkSet = serde_json::from_slice(&read(path)?).map_err(|e| AuthSetupError::Key {
        path: path.to_owned(),
        problem: format!("not a JWKS: {e}"),
    })?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => {
                tracing::warn!(
                    kid = ?jwk.common.key_id,
                    "a JWKS key that is neither RS256 nor ES256 is not trusted"
                );
                continue;
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthSetupError::Key {
            path: path.to_owned(),
            problem: format!("key {:?}: {e}", jwk.common.key_id),
        })?;
        keys.push((jwk.common.key_id.clone(), key, algorithm));
    }
    if keys.is_empty() {
        return Err(AuthSetupError::Key {
            path: path.to_owned(),
            problem: "no RS256 or ES256 key".into(),
        });
    }
    Ok(keys)
}

/// What a buyer (or the developer of their client) can act on; never the
/// key material or the token itself.
fn explain(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "it has expired".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "it was issued by an issuer this gateway does not trust".into(),
        ErrorKind::InvalidAudience => "it was not issued for this gateway (aud)".into(),
        ErrorKind::InvalidSignature => "its signature does not match".into(),
        ErrorKind::InvalidAlgorithm => {
            "it is signed with an algorithm this gateway does not accept for its key".into()
        }
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("its {claim} claim is malformed"),
        _ => "it is not a well-formed JWT signed with a supported algorithm".into(),
    }
}

/// `401` with the challenge RFC 6750 asks for.
fn unauthenticated(kind: &str, detail: &str, error: Option<&str>) -> Problem {
    let challenge = match error {
        None => format!("Bearer realm=\"{REALM}\""),
        Some(error) => format!(
            "Bearer realm=\"{REALM}\", error=\"{error}\", error_description=\"{}\"",
            detail.replace(['"', '\\'], "'")
        ),
    };
    Problem::new(StatusCode::UNAUTHORIZED, kind, detail).header("www-authenticate", challenge)
}

/// `403`: a valid token, and a body that names another buyer.
pub fn not_this_buyer(token_subject: &UserId, named: &str) -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        "user-mismatch",
        format!(
            "the token is {token_subject}'s, and the body names user_id {named:?}: \
             a buyer buys only for themselves (leave user_id out, or give your own)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::from_map(
            vars.iter()
                .map(|(k, v)| (format!("FLASHSALE_{k}"), v.to_string()))
                .collect::<HashMap<_, _>>(),
        )
    }

    #[test]
    fn off_unless_a_key_is_given() {
        let settings = AuthSettings::from_env(&env(&[])).expect("valid");
        assert_eq!(settings.key, None);
    }

    #[test]
    fn on_needs_an_issuer_an_audience_and_one_long_enough_key() {
        let secret = "s".repeat(32);
        let error = AuthSettings::from_env(&env(&[("GATEWAY_AUTH_HS256_SECRET", &secret)]))
            .expect_err("no issuer");
        assert_eq!(error.name, "FLASHSALE_GATEWAY_AUTH_ISSUER");
        let error = AuthSettings::from_env(&env(&[
            ("GATEWAY_AUTH_HS256_SECRET", "short"),
            ("GATEWAY_AUTH_ISSUER", "i"),
            ("GATEWAY_AUTH_AUDIENCE", "a"),
        ]))
        .expect_err("a short secret");
        assert!(!error.to_string().contains("short"), "{error}");
        let error = AuthSettings::from_env(&env(&[
            ("GATEWAY_AUTH_HS256_SECRET", &secret),
            ("GATEWAY_AUTH_JWKS_FILE", "/keys.json"),
            ("GATEWAY_AUTH_ISSUER", "i"),
            ("GATEWAY_AUTH_AUDIENCE", "a"),
        ]))
        .expect_err("two key sources");
        assert!(error.problem.contains("one of"), "{error}");
        let settings = AuthSettings::from_env(&env(&[
            ("GATEWAY_AUTH_JWKS_FILE", "/keys.json"),
            ("GATEWAY_AUTH_ISSUER", "i"),
            ("GATEWAY_AUTH_AUDIENCE", "a"),
        ]))
        .expect("valid");
        assert_eq!(settings.key, Some(KeySource::JwksFile("/keys.json".into())));
    }
}
