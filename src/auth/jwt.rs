//! [`JwtVerifier`]: Entra ID (or any OIDC) app tokens from callers.
//!
//! A token is accepted only if its header names a key (`kid`) from the configured key set
//! and an asymmetric algorithm that key can verify (RS256/384/512 and PS256/384/512 for RSA
//! keys, ES256/384 for EC keys: never `none`, never HMAC, so a public key cannot be used as
//! an HMAC secret), its signature verifies, `iss` and `aud` match, and `exp`/`nbf` hold
//! within a small leeway. `required_roles` must all be in the `roles` claim.
//!
//! The key set is fetched from `jwks_url`, kept for `jwks_cache`, and refetched early when a
//! token names an unknown `kid` (key rotation) — but at most once per
//! [`MIN_REFETCH`], so a flood of tokens with made-up `kid`s cannot hammer the key
//! endpoint. A failed fetch keeps the keys already known.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;

use crate::auth::error::AuthError;
use crate::core::clock::Clock;
use crate::core::flight::{Flight, Joined};
use crate::core::remembered::Recent;
use crate::upstream::bounded::{self, ReadError};

/// Shortest time between two key-set fetches caused by unknown `kid`s.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);
/// Largest key set document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Longest accepted token (Entra app tokens are 1-2 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The claims the proxy uses; everything else in the token is ignored.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// v2 tokens: the calling application's client id.
    pub azp: Option<String>,
    /// v1 tokens: the calling application's client id.
    pub appid: Option<String>,
    pub sub: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Expiry (epoch seconds); verification requires it.
    #[serde(default)]
    pub exp: u64,
}

impl Claims {
    /// Who is calling, for limits and logs: `azp`, else `appid`, else `sub`.
    pub fn caller_id(&self) -> Option<&str> {
        self.azp
            .as_deref()
            .or(self.appid.as_deref())
            .or(self.sub.as_deref())
    }
}

struct VerifyingKey {
    key: DecodingKey,
    algorithms: &'static [Algorithm],
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<VerifyingKey>>,
    /// When the keys were last fetched successfully.
    fetched_at: Option<Instant>,
}

pub struct JwtVerifier {
    http: reqwest::Client,
    jwks_url: String,
    validation_template: Validation,
    required_roles: Vec<String>,
    /// How long a fetched key set is used before it is refetched.
    max_age: Duration,
    /// Shared with the fetch in progress, which stores what it fetched.
    keys: Arc<RwLock<KeySet>>,
    /// One fetch at a time, its waiters sharing it. Attached: it runs in its waiters'
    /// tasks and ends with the last of them.
    fetches: Flight<()>,
    /// The last fetch attempt (success or not) stands for [`MIN_REFETCH`]: the rate limit.
    attempted: Recent<()>,
    clock: Clock,
}

/// What [`JwtVerifier::new`] needs.
pub struct JwtOptions {
    pub issuer: String,
    pub audience: String,
    pub jwks_url: String,
    pub required_roles: Vec<String>,
    pub leeway: Duration,
    pub max_age: Duration,
}

impl JwtVerifier {
    pub fn new(http: reqwest::Client, options: JwtOptions, clock: Clock) -> JwtVerifier {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[options.issuer]);
        validation.set_audience(&[options.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = options.leeway.as_secs();
        validation.validate_nbf = true;
        JwtVerifier {
            http,
            jwks_url: options.jwks_url,
            validation_template: validation,
            required_roles: options.required_roles,
            max_age: options.max_age,
            keys: Arc::new(RwLock::new(KeySet::default())),
            fetches: Flight::attached(),
            attempted: Recent::new(),
            clock,
        }
    }

    /// A verifier that starts with `jwks` (a JWK set document) instead of fetching it, and
    /// does not fetch again within [`MIN_REFETCH`] (fuzzing, tests, benchmarks).
    pub fn with_key_set(
        http: reqwest::Client,
        options: JwtOptions,
        jwks: &str,
        clock: Clock,
    ) -> Result<JwtVerifier, serde_json::Error> {
        let set: JwkSet = serde_json::from_str(jwks)?;
        let verifier = JwtVerifier::new(http, options, clock);
        let now = verifier.clock.now();
        *verifier.keys.write().unwrap_or_else(|e| e.into_inner()) = KeySet {
            keys: usable_keys(&set),
            fetched_at: Some(now),
        };
        verifier.attempted.remember((), now + MIN_REFETCH);
        Ok(verifier)
    }

    /// Verifies `token`; the caller's claims, or why not (401, 403, or 503 when no key
    /// set could ever be fetched).
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Unauthenticated("token too long"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Unauthenticated("malformed token"))?;
        let kid = header
            .kid
            .as_deref()
            .ok_or(AuthError::Unauthenticated("token header has no kid"))?;
        let key = match self.key(kid) {
            Some(key) => key,
            None => {
                self.refresh().await?;
                self.key(kid)
                    .ok_or(AuthError::Unauthenticated("token signed by an unknown key"))?
            }
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(AuthError::Unauthenticated(
                "token algorithm not allowed for its key",
            ));
        }
        let mut validation = self.validation_template.clone();
        validation.algorithms = vec![header.alg];
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            AuthError::Unauthenticated(match e.kind() {
                K::ExpiredSignature => "token expired",
                K::ImmatureSignature => "token not yet valid",
                K::InvalidIssuer => "token issuer not accepted",
                K::InvalidAudience => "token audience not accepted",
                K::InvalidSignature => "token signature invalid",
                K::MissingRequiredClaim(_) => "token lacks a required claim",
                K::InvalidAlgorithm => "token algorithm not allowed",
                _ => "token not accepted",
            })
        })?;
        let claims = data.claims;
        if let Some(missing) = self
            .required_roles
            .iter()
            .find(|r| !claims.roles.contains(r))
        {
            tracing::debug!(role = %missing, "token lacks a required role");
            return Err(AuthError::Forbidden {
                caller: claims.caller_id().unwrap_or("-").to_string(),
                what: "sessions (a required role is missing)",
            });
        }
        Ok(claims)
    }

    /// When the key set in use was fetched (by the proxy's clock), if one was.
    pub fn key_set_fetched_at(&self) -> Option<Instant> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fetched_at
    }

    fn key(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        let set = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let fresh = set
            .fetched_at
            .is_some_and(|at| self.clock.now() < at + self.max_age);
        // An old set is still used while a refetch fails, but an unknown kid, or a set past
        // its age, sends us to `refresh`.
        set.keys.get(kid).filter(|_| fresh).cloned()
    }

    /// Fetches the key set unless one was attempted within [`MIN_REFETCH`] (then the keys
    /// at hand stand). Errs only when there are no keys at all.
    async fn refresh(&self) -> Result<(), AuthError> {
        let now = self.clock.now();
        let joined = self.fetches.join_or_start(
            || self.attempted.get(now),
            || {
                self.attempted.remember((), now + MIN_REFETCH);
                self.fetch_and_keep(now)
            },
        );
        // A caller that waited for another's fetch judges the keys as of its end.
        let now = match joined {
            Joined::Ready(()) => now,
            Joined::Call { call, started } => {
                call.await;
                if started {
                    now
                } else {
                    self.clock.now()
                }
            }
        };
        let mut set = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if set.keys.is_empty() {
            return Err(AuthError::Unavailable);
        }
        // Keys past their age stay usable until a fetch succeeds.
        if set.fetched_at.is_some_and(|at| now >= at + self.max_age) {
            set.fetched_at = Some(now - self.max_age + MIN_REFETCH);
        }
        Ok(())
    }

    /// One fetch of the key set, begun at `started`: the keys it brings replace those at
    /// hand; a failure keeps them.
    fn fetch_and_keep(&self, started: Instant) -> impl Future<Output = ()> + Send + 'static {
        let http = self.http.clone();
        let url = self.jwks_url.clone();
        let keys = Arc::clone(&self.keys);
        async move {
            match fetch(&http, &url).await {
                Ok(fetched) => {
                    tracing::info!(keys = fetched.len(), url = %url, "fetched the caller token key set");
                    *keys.write().unwrap_or_else(|e| e.into_inner()) = KeySet {
                        keys: fetched,
                        fetched_at: Some(started),
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, url = %url, "cannot fetch the caller token key set; keeping the keys at hand")
                }
            }
        }
    }
}

async fn fetch(
    http: &reqwest::Client,
    url: &str,
) -> Result<HashMap<String, Arc<VerifyingKey>>, JwksError> {
    let response = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(JwksError::Http)?;
    if !response.status().is_success() {
        return Err(JwksError::Status(response.status().as_u16()));
    }
    let body = bounded::read(response, MAX_JWKS_BYTES)
        .await
        .map_err(|e| match e {
            ReadError::Http(e) => JwksError::Http(e),
            ReadError::TooLarge { .. } => JwksError::TooLarge,
        })?;
    let set: JwkSet = serde_json::from_slice(&body).map_err(JwksError::Json)?;
    Ok(usable_keys(&set))
}

/// Signing keys with a `kid` that this verifier can use, by `kid`.
fn usable_keys(set: &JwkSet) -> HashMap<String, Arc<VerifyingKey>> {
    const RSA: &[Algorithm] = &[
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ];
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let algorithms: &'static [Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                &[Algorithm::ES256]
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                &[Algorithm::ES384]
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        keys.insert(kid.clone(), Arc::new(VerifyingKey { key, algorithms }));
    }
    keys
}

#[derive(Debug, thiserror::Error)]
enum JwksError {
    #[error("key set request failed{}", crate::upstream::error::tls_hint(.0))]
    Http(#[source] reqwest::Error),
    #[error("key set endpoint answered HTTP {0}")]
    Status(u16),
    #[error("key set larger than 1 MiB")]
    TooLarge,
    #[error("key set is not a JWK set")]
    Json(#[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_signing_keys_with_kids_are_kept() {
        let set: JwkSet =
            serde_json::from_str(include_str!("../../tests/fixtures/jwks.json")).unwrap();
        let keys = usable_keys(&set);
        assert_eq!(keys.len(), 2);
        assert!(keys["test-rsa"].algorithms.contains(&Algorithm::PS256));
        assert_eq!(keys["test-ec"].algorithms, &[Algorithm::ES256]);
    }

    #[test]
    fn caller_id_prefers_azp() {
        let c: Claims = serde_json::from_str(r#"{"azp":"a","appid":"b","sub":"c"}"#).unwrap();
        assert_eq!(c.caller_id(), Some("a"));
        let c: Claims = serde_json::from_str(r#"{"appid":"b","sub":"c","roles":["x"]}"#).unwrap();
        assert_eq!(c.caller_id(), Some("b"));
    }
}
