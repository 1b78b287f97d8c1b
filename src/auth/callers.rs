//! Caller authentication and per-caller limits.
//!
//! `api_key`: the key comes as `Authorization: Bearer KEY` or `x-api-key: KEY`; only its
//! SHA-256 is configured. The presented key's digest is compared with every configured
//! digest in constant time (no early exit), so timing reveals neither a prefix nor which
//! entry matched. `jwt`: an Entra ID app token in `Authorization: Bearer`, verified by
//! [`JwtVerifier`]; the caller is its `azp`/`appid`. Both may be enabled at once: a
//! bearer credential shaped like a JWT is verified as one, anything else is an API key.
//! `none`: everyone is the anonymous caller (warned about at start-up).

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::error::AuthError;
use crate::auth::jwt::{Claims, JwtOptions, JwtVerifier};
use crate::config::{CallerMode, CallersSettings, JwtAppSettings, LimitOverrides};
use crate::core::clock::Clock;
use crate::core::http::{bearer_token, sha256_from_hex, NotBearer};
use crate::core::model::{Kind, SessionKey};

/// Who is calling and what they may read.
#[derive(Debug)]
pub struct Caller {
    /// For logs and metrics; never the key.
    pub name: Arc<str>,
    /// `None` = every kind.
    kinds: Option<Vec<Kind>>,
    /// `None` = every event; entries are exact ids or `*@<tenant>`.
    events: Option<Vec<String>>,
    /// This caller's overrides of `[limits]`.
    pub limits: LimitOverrides,
    /// Whose buckets this caller's requests are counted in: one per API key, one per JWT
    /// app id (`key:NAME`, `app:ID`), so names of the two kinds never share one.
    pub bucket: Arc<str>,
    /// Named in the configuration (an API key, an app listed by client id, the anonymous
    /// caller), as opposed to an app id only its token names: only these get their own
    /// metric label.
    pub configured: bool,
    /// A number of its own among the callers built once at start-up (API keys, the
    /// anonymous caller), below [`Callers::slots`]: upper layers index their per-caller
    /// state by it instead of hashing `bucket`. `None` for callers a token stands for.
    pub slot: Option<usize>,
}

/// The metric label of every caller not configured by name.
static OTHER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("other"));

impl Caller {
    /// Its `caller` label in metrics: the configured name, or `other` for app ids only
    /// a token names (so a flood of app ids cannot grow `/metrics`).
    pub fn metric_label(&self) -> Arc<str> {
        if self.configured {
            self.name.clone()
        } else {
            OTHER.clone()
        }
    }

    /// 403 unless this caller may read `key`.
    pub fn authorize(&self, key: &SessionKey) -> Result<(), AuthError> {
        if let Some(kinds) = &self.kinds {
            if !kinds.contains(&key.kind) {
                return Err(AuthError::Forbidden {
                    caller: self.name.to_string(),
                    what: "this kind of event",
                });
            }
        }
        if let Some(events) = &self.events {
            if !events
                .iter()
                .any(|pattern| event_matches(pattern, &key.event))
            {
                return Err(AuthError::Forbidden {
                    caller: self.name.to_string(),
                    what: "this event",
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
impl Caller {
    /// A caller with every kind and event, for tests of the layers that use callers.
    pub(crate) fn for_tests(bucket: &str, configured: bool, limits: LimitOverrides) -> Caller {
        Caller {
            name: bucket.into(),
            kinds: None,
            events: None,
            limits,
            bucket: bucket.into(),
            configured,
            slot: None,
        }
    }
}

/// `pattern` is an exact event id, or `*@<tenant>` for every event organised in a tenant
/// (event ids look like `{guid}@{tenant guid}`). GUIDs compare case-insensitively.
fn event_matches(pattern: &str, event: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('@') => {
            event.len() > suffix.len()
                && event.is_char_boundary(event.len() - suffix.len())
                && event[event.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        _ => pattern.eq_ignore_ascii_case(event),
    }
}

struct KeyEntry {
    digest: [u8; 32],
    caller: Arc<Caller>,
}

struct JwtCallers {
    verifier: JwtVerifier,
    apps: Vec<JwtAppSettings>,
    /// Tokens verified already, by SHA-256 of the token: a caller repeating its token
    /// (as clients do for its lifetime) pays one signature check, not one per request.
    /// Bounded in number, and each kept no longer than the verifying key set's
    /// `jwks_cache` (a key removed from the set stops counting when the set is due for a
    /// refetch, as without this memory) nor past its own `exp` (+ leeway).
    verified: moka::sync::Cache<[u8; 32], Verified>,
    leeway: u64,
    /// `jwks_cache`, judged by the proxy's clock: a remembered verification ends when
    /// the key set that verified it is due to be fetched again.
    max_age: std::time::Duration,
    clock: Clock,
}

/// A verified token's caller and expiry.
#[derive(Clone)]
struct Verified {
    caller: Arc<Caller>,
    exp: u64,
    at: tokio::time::Instant,
}

/// Most verified tokens remembered.
const MAX_VERIFIED_TOKENS: u64 = 10_000;

impl JwtCallers {
    async fn caller(&self, token: &str) -> Result<Arc<Caller>, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(known) = self.verified.get(&digest) {
            let fresh = self.clock.now().saturating_duration_since(known.at) < self.max_age;
            if fresh && now <= known.exp.saturating_add(self.leeway) {
                return Ok(known.caller);
            }
            self.verified.invalidate(&digest);
        }
        // Read before verifying: a refetch meanwhile only makes the memory end sooner.
        let key_set_at = self.verifier.key_set_fetched_at();
        // Boxed: verifying may fetch the key set, a large future that would otherwise be
        // part of (and copied with) every request's future, remembered tokens included.
        let claims = Box::pin(self.verifier.verify(token)).await?;
        let exp = claims.exp;
        let caller = jwt_caller(&self.apps, claims)?;
        if let Some(at) = key_set_at {
            // Remembered no longer than the verifying key set may be used unrefreshed.
            self.verified.insert(
                digest,
                Verified {
                    caller: caller.clone(),
                    exp,
                    at,
                },
            );
        }
        Ok(caller)
    }
}

pub struct Callers {
    /// `None` when API keys are not an accepted credential.
    keys: Option<Vec<KeyEntry>>,
    jwt: Option<JwtCallers>,
    /// `mode = "none"`: everyone is this caller.
    anonymous: Option<Arc<Caller>>,
    /// One per API key, one for the anonymous caller.
    slots: usize,
}

impl Callers {
    pub fn new(settings: &CallersSettings, http: reqwest::Client, clock: Clock) -> Callers {
        let modes = settings.enabled_modes();
        let keys = modes.contains(&CallerMode::ApiKey).then(|| {
            settings
                .api_keys
                .iter()
                .enumerate()
                .filter_map(|(slot, k)| {
                    // validate() checked the hex; skip rather than panic if it did not.
                    let digest = sha256_from_hex(&k.sha256)?;
                    Some(KeyEntry {
                        digest,
                        caller: Arc::new(Caller {
                            name: k.name.as_str().into(),
                            kinds: k.kinds.clone(),
                            events: k.events.clone(),
                            limits: k.limits(),
                            bucket: format!("key:{}", k.name).into(),
                            configured: true,
                            slot: Some(slot),
                        }),
                    })
                })
                .collect()
        });
        let jwt = match (&settings.jwt, modes.contains(&CallerMode::Jwt)) {
            (Some(jwt), true) => Some(JwtCallers {
                verifier: JwtVerifier::new(
                    http,
                    JwtOptions {
                        issuer: jwt.issuer.clone().unwrap_or_default(),
                        audience: jwt.audience.clone().unwrap_or_default(),
                        jwks_url: jwt.jwks_url.clone().unwrap_or_default(),
                        required_roles: jwt.required_roles.clone(),
                        leeway: jwt.leeway,
                        max_age: jwt.jwks_cache,
                    },
                    clock.clone(),
                ),
                apps: jwt.apps.clone(),
                verified: moka::sync::Cache::builder()
                    .max_capacity(MAX_VERIFIED_TOKENS)
                    .time_to_live(jwt.jwks_cache.max(std::time::Duration::from_secs(1)))
                    .build(),
                leeway: jwt.leeway.as_secs(),
                max_age: jwt.jwks_cache,
                clock,
            }),
            _ => None,
        };
        let anonymous = modes.contains(&CallerMode::None).then(|| {
            Arc::new(Caller {
                name: "anonymous".into(),
                kinds: None,
                events: None,
                limits: LimitOverrides::default(),
                bucket: "anonymous".into(),
                configured: true,
                slot: Some(settings.api_keys.len()),
            })
        });
        Callers {
            keys,
            jwt,
            anonymous,
            slots: settings.api_keys.len() + 1,
        }
    }

    /// How many [`Caller::slot`] numbers there are.
    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn is_open(&self) -> bool {
        self.anonymous.is_some()
    }

    /// Who sent these headers, or 400/401 (403 for a token without a required role).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Caller>, AuthError> {
        if let Some(anonymous) = &self.anonymous {
            return Ok(anonymous.clone());
        }
        let credential = presented_credential(headers)?;
        match (&self.jwt, &self.keys) {
            (Some(jwt), _) if credential.bearer && looks_like_jwt(credential.value) => {
                jwt.caller(credential.value).await
            }
            (_, Some(keys)) => api_key_caller(keys, credential.value),
            (Some(_), None) => Err(AuthError::Unauthenticated(
                "a bearer token (JWT) is required",
            )),
            (None, None) => Err(AuthError::Unauthenticated(
                "no caller credentials are accepted",
            )),
        }
    }
}

fn api_key_caller(keys: &[KeyEntry], presented: &str) -> Result<Arc<Caller>, AuthError> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found: Option<&Arc<Caller>> = None;
    for entry in keys {
        if bool::from(entry.digest.ct_eq(&digest)) {
            found = Some(&entry.caller);
        }
    }
    found
        .cloned()
        .ok_or(AuthError::Unauthenticated("unknown API key"))
}

/// The caller a verified token stands for. With apps listed, the first that matches (by
/// client id, else by role) gives the limits, and a token matching none is refused.
fn jwt_caller(apps: &[JwtAppSettings], claims: Claims) -> Result<Arc<Caller>, AuthError> {
    let id = claims.caller_id().ok_or(AuthError::Unauthenticated(
        "token names no application (azp, appid or sub)",
    ))?;
    let name: Arc<str> = id.into();
    let bucket: Arc<str> = format!("app:{}", id.to_ascii_lowercase()).into();
    if apps.is_empty() {
        return Ok(Arc::new(Caller {
            name,
            kinds: None,
            events: None,
            limits: LimitOverrides::default(),
            bucket,
            configured: false,
            slot: None,
        }));
    }
    let by_client = apps.iter().find(|a| {
        a.client_id
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case(id))
    });
    let by_role = || {
        apps.iter().find(|a| {
            a.role
                .as_deref()
                .is_some_and(|r| claims.roles.iter().any(|have| have == r))
        })
    };
    let configured = by_client.is_some();
    match by_client.or_else(by_role) {
        Some(app) => Ok(Arc::new(Caller {
            name,
            kinds: app.kinds.clone(),
            events: app.events.clone(),
            limits: app.limits(),
            bucket,
            configured,
            slot: None,
        })),
        None => Err(AuthError::Forbidden {
            caller: id.to_string(),
            what: "sessions (this application is not configured)",
        }),
    }
}

/// `header.payload.signature`, base64url parts, header starting `{"` (`eyJ`).
fn looks_like_jwt(value: &str) -> bool {
    value.starts_with("eyJ") && value.bytes().filter(|b| *b == b'.').count() == 2
}

struct Credential<'a> {
    value: &'a str,
    /// From `Authorization: Bearer` rather than `x-api-key`.
    bearer: bool,
}

/// The API key from `Authorization: Bearer` or `x-api-key`. Repeated or conflicting
/// credentials are a bad request rather than a guess.
fn presented_credential(headers: &HeaderMap) -> Result<Credential<'_>, AuthError> {
    let mut bearer = None;
    let mut auths = headers.get_all(AUTHORIZATION).iter();
    if let Some(value) = auths.next() {
        if auths.next().is_some() {
            return Err(AuthError::Ambiguous("more than one Authorization header"));
        }
        bearer = Some(bearer_token(value).map_err(|e| {
            AuthError::Unauthenticated(match e {
                NotBearer::Malformed => "malformed Authorization header",
                NotBearer::OtherScheme => "Authorization must be: Bearer <API key>",
            })
        })?);
    }
    let mut api_keys = headers.get_all("x-api-key").iter();
    let header_key = match api_keys.next() {
        Some(value) => {
            if api_keys.next().is_some() {
                return Err(AuthError::Ambiguous("more than one x-api-key header"));
            }
            Some(
                value
                    .to_str()
                    .map_err(|_| AuthError::Unauthenticated("malformed x-api-key header"))?
                    .trim(),
            )
        }
        None => None,
    };
    match (bearer, header_key) {
        (Some(a), Some(b)) if a != b => Err(AuthError::Ambiguous(
            "Authorization and x-api-key carry different keys",
        )),
        (Some(key), _) if !key.is_empty() => Ok(Credential {
            value: key,
            bearer: true,
        }),
        (None, Some(key)) if !key.is_empty() => Ok(Credential {
            value: key,
            bearer: false,
        }),
        _ => Err(AuthError::Unauthenticated(
            "an API key is required: Authorization: Bearer <key> or x-api-key: <key>",
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn jwt_shapes() {
        assert!(super::looks_like_jwt(
            "eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln"
        ));
        assert!(!super::looks_like_jwt("an-api-key"));
        assert!(!super::looks_like_jwt("eyJ.only-one-dot"));
    }

    use super::*;
    use crate::config::ApiKeySettings;

    fn callers() -> Callers {
        let digest = hex::encode(Sha256::digest(b"key-one"));
        let settings = CallersSettings {
            mode: CallerMode::ApiKey,
            modes: Vec::new(),
            api_keys: vec![
                ApiKeySettings {
                    name: "one".into(),
                    sha256: digest.to_uppercase(),
                    kinds: None,
                    events: None,
                    ..ApiKeySettings::default()
                },
                ApiKeySettings {
                    name: "limited".into(),
                    sha256: hex::encode(Sha256::digest(b"key-two")),
                    kinds: Some(vec![Kind::Townhalls]),
                    events: Some(vec!["*@TENANT-A".into(), "exact-event".into()]),
                    ..ApiKeySettings::default()
                },
            ],
            jwt: None,
        };
        Callers::new(&settings, reqwest::Client::new(), Clock::new())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[tokio::test]
    async fn keys_by_either_header() {
        let c = callers();
        let a = c
            .authenticate(&headers(&[("authorization", "Bearer key-one")]))
            .await
            .unwrap();
        assert_eq!(&*a.name, "one");
        let b = c
            .authenticate(&headers(&[("x-api-key", "key-two")]))
            .await
            .unwrap();
        assert_eq!(&*b.name, "limited");
        let same = c
            .authenticate(&headers(&[
                ("authorization", "bearer key-one"),
                ("x-api-key", "key-one"),
            ]))
            .await
            .unwrap();
        assert_eq!(&*same.name, "one");
    }

    #[tokio::test]
    async fn refusals() {
        let c = callers();
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer wrong")]),
            headers(&[("authorization", "Basic a2V5LW9uZQ==")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("x-api-key", "key-one "), ("x-api-key", "x")]),
        ] {
            assert!(c.authenticate(&h).await.is_err(), "{h:?}");
        }
        let conflicting = headers(&[
            ("authorization", "Bearer key-one"),
            ("x-api-key", "key-two"),
        ]);
        assert!(matches!(
            c.authenticate(&conflicting).await,
            Err(AuthError::Ambiguous(_))
        ));
    }

    #[tokio::test]
    async fn limits() {
        let c = callers();
        let limited = c
            .authenticate(&headers(&[("x-api-key", "key-two")]))
            .await
            .unwrap();
        let th = |event: &str| SessionKey::new(Kind::Townhalls, event, "s").unwrap();
        assert!(limited.authorize(&th("guid@tenant-a")).is_ok());
        assert!(limited.authorize(&th("exact-event")).is_ok());
        assert!(limited.authorize(&th("guid@tenant-b")).is_err());
        assert!(limited.authorize(&th("@tenant-a")).is_err());
        assert!(limited
            .authorize(&SessionKey::new(Kind::Webinars, "guid@tenant-a", "s").unwrap())
            .is_err());
    }
}
