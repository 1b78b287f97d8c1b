//! [`TokenProvider`]: the app-only Graph token, by OAuth2 client credentials.
//!
//! One token serves every request. It is reused until a margin before its expiry
//! (`auth.refresh_before_expiry`, but never more than a tenth of the token's lifetime,
//! so short-lived tokens are not refreshed on every request), and only one refresh runs at
//! a time: concurrent callers share the one token request (`core::flight`). When
//! Graph rejects a token, [`TokenProvider::invalidate`] drops exactly that token, so a
//! burst of 401s leads to one refresh, not one per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, AuthType, Client, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    RefreshToken, RequestTokenError, Scope, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::time::Instant;

use crate::config::{AssertionAlgorithm, ClientCertificate};
use crate::core::clock::Clock;
use crate::core::flight::Flight;
use crate::core::remembered::Recent;
use crate::telemetry::{names, Causes, Metrics, Wait};
use crate::upstream::bounded::{self, ReadError};

/// Entra's token response: the standard fields, with `expires_in` as a number or a string,
/// and the Microsoft extras kept rather than dropped.
#[derive(Debug, Deserialize, Serialize)]
pub struct EntraTokenResponse {
    access_token: AccessToken,
    #[serde(deserialize_with = "oauth2::helpers::deserialize_untagged_enum_case_insensitive")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    ext_expires_in: Option<u64>,
    /// When MSAL would refresh in the background; the token stays valid until `expires_in`.
    #[serde(default, deserialize_with = "seconds")]
    refresh_in: Option<u64>,
}

impl TokenResponse for EntraTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        None
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        None
    }
}

/// `3599` or `"3599"`.
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Number(n)) => Ok(Some(n)),
        Some(Raw::Text(s)) => s.trim().parse().map(Some).map_err(serde::de::Error::custom),
    }
}

type EntraClient = Client<
    BasicErrorResponse,
    EntraTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Why no token could be had. Never carries the secret or a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The identity platform answered with an OAuth error (bad secret, unknown app, ...).
    #[error("token endpoint refused: {}", refusal(error, aadsts.as_deref()))]
    Refused {
        /// OAuth error code, e.g. `invalid_client`.
        error: String,
        /// `AADSTS7000215` and the like, parsed from the description.
        aadsts: Option<String>,
        /// Entra's description; logged, not shown to callers.
        description: String,
    },
    #[error("token endpoint is throttling (retry in {})", Wait(*.0))]
    Throttled(Duration),
    #[error("token endpoint answered HTTP {0}")]
    Status(u16),
    #[error("token endpoint unreachable")]
    Unreachable(#[source] reqwest::Error),
    #[error("token endpoint's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("token endpoint answer not understood: {0}")]
    Malformed(String),
    #[error("no token within the request's deadline")]
    TimedOut,
}

impl TokenError {
    /// The text a caller sees: which AADSTS code, never the secret or Entra's full text.
    pub fn caller_message(&self) -> String {
        match self {
            TokenError::Refused { error, aadsts, .. } => match aadsts {
                Some(code) => format!(
                    "the identity platform refused the proxy's credentials: {code} ({error})"
                ),
                None => format!("the identity platform refused the proxy's credentials ({error})"),
            },
            TokenError::Throttled(_) => "the identity platform is throttling the proxy".to_string(),
            TokenError::Status(status) => format!("the token endpoint answered HTTP {status}"),
            TokenError::Unreachable(_) => "the token endpoint could not be reached".to_string(),
            TokenError::TooLarge(_) => "the token endpoint's answer was too large".to_string(),
            TokenError::Malformed(_) => {
                "the token endpoint's answer was not understood".to_string()
            }
            TokenError::TimedOut => "the token endpoint did not answer in time".to_string(),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Throttled(wait) => Some(*wait),
            TokenError::Refused { .. }
            | TokenError::Status(_)
            | TokenError::Unreachable(_)
            | TokenError::TooLarge(_)
            | TokenError::Malformed(_)
            | TokenError::TimedOut => None,
        }
    }
}

/// `invalid_client (AADSTS7000215)`: what a refusal is called in logs (Entra's full
/// description is logged once, where the refusal is first seen).
fn refusal(error: &str, aadsts: Option<&str>) -> String {
    match aadsts {
        Some(code) => format!("{error} ({code})"),
        None => error.to_string(),
    }
}

/// `AADSTS7000215: Invalid client secret provided...` -> `AADSTS7000215`.
fn aadsts_code(description: &str) -> Option<String> {
    let start = description.find("AADSTS")?;
    let digits: String = description[start + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

/// A token and when to stop using it.
pub struct CachedToken {
    secret: SecretString,
    /// From here on the next caller refreshes.
    refresh_at: Instant,
    /// Never sent after this.
    expires_at: Instant,
    /// Identifies the token for [`TokenProvider::invalidate`].
    serial: u64,
}

impl CachedToken {
    pub fn bearer(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedToken")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// What the HTTP exchange saw besides the body, for classification.
#[derive(Debug, Default, Clone)]
struct Exchange {
    status: u16,
    retry_after: Option<Duration>,
}

/// Signs client assertions: `aud` = the token URL, `iss` = `sub` = the client id, a fresh
/// `jti`, `nbf`/`exp` around now; header `x5t#S256` (and `x5t` for RS256).
struct AssertionSigner {
    certificate: ClientCertificate,
    algorithm: AssertionAlgorithm,
    client_id: String,
    audience: String,
}

impl AssertionSigner {
    fn sign(&self) -> Result<String, TokenError> {
        let (alg, x5t) = match self.algorithm {
            AssertionAlgorithm::Ps256 => (jsonwebtoken::Algorithm::PS256, None),
            AssertionAlgorithm::Rs256 => (
                jsonwebtoken::Algorithm::RS256,
                Some(self.certificate.x5t.clone()),
            ),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.x5t_s256 = Some(self.certificate.x5t_s256.clone());
        header.x5t = x5t;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = serde_json::json!({
            "aud": self.audience,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(
            self.certificate.key_pem.expose_secret().as_bytes(),
        )
        .map_err(|e| TokenError::Malformed(format!("private key: {e}")))?;
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| TokenError::Malformed(format!("client assertion: {e}")))
    }
}

pub struct TokenProvider {
    oauth: EntraClient,
    /// Set for certificate credentials.
    assertion: Option<AssertionSigner>,
    /// Shared with the Graph client: one pool, redirects off.
    http: reqwest::Client,
    scope: Scope,
    refresh_before: Duration,
    timeout: Duration,
    clock: Clock,
    /// The token in use; a read lock on the hot path, written only by a refresh.
    current: RwLock<Option<Arc<CachedToken>>>,
    /// The one token request in progress, its result shared by its waiters. Attached: it
    /// runs in their tasks and ends with the last of them (bounded by their deadlines).
    requests: Flight<Result<Arc<CachedToken>, Arc<TokenError>>>,
    /// The last failure and until when it stands: a 429's `Retry-After`, or a short pause
    /// so that a burst of requests during an identity outage makes one token request,
    /// not one each.
    failed: Recent<Arc<TokenError>>,
    /// The background refresh task while it runs (at most one).
    background: Flight<()>,
    serial: AtomicU64,
    metrics: Arc<Metrics>,
}

/// After a failed token request, callers get that failure for this long without a new
/// request (unless the endpoint asked for longer with `Retry-After`).
const FAILURE_PAUSE: Duration = Duration::from_secs(1);
/// Longest token lifetime believed.
/// A token answer is well under 10 KiB; anything past this is not one.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Background refresh retries: first pause and cap.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);

/// The proxy's identity towards the token endpoint.
pub struct TokenOptions {
    pub client_id: String,
    pub credential: Credential,
    pub token_url: String,
    pub scope: String,
    pub refresh_before: Duration,
    /// Longest one token request may take (a hung endpoint must not hold up the one
    /// token request forever).
    pub timeout: Duration,
}

/// How the proxy proves its identity to the token endpoint.
#[derive(Clone)]
pub enum Credential {
    /// `client_secret` in the form body, as Microsoft documents it.
    Secret(SecretString),
    /// A client assertion (RFC 7523) signed with the certificate's key, fresh per request.
    Certificate {
        certificate: ClientCertificate,
        algorithm: AssertionAlgorithm,
    },
}

/// Lifetime of a client assertion (Entra accepts at most 10 minutes).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(9 * 60);

impl TokenProvider {
    pub fn new(
        http: reqwest::Client,
        options: TokenOptions,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<TokenProvider, oauth2::url::ParseError> {
        let mut oauth = Client::new(ClientId::new(options.client_id.clone()))
            // Microsoft documents the credential in the form body.
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(TokenUrl::new(options.token_url.clone())?);
        let mut assertion = None;
        match options.credential {
            Credential::Secret(secret) => {
                oauth =
                    oauth.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
            }
            Credential::Certificate {
                certificate,
                algorithm,
            } => {
                assertion = Some(AssertionSigner {
                    certificate,
                    algorithm,
                    client_id: options.client_id,
                    audience: options.token_url,
                });
            }
        }
        Ok(TokenProvider {
            oauth,
            assertion,
            http,
            scope: Scope::new(options.scope),
            refresh_before: options.refresh_before,
            timeout: options.timeout,
            clock,
            metrics,
            current: RwLock::new(None),
            requests: Flight::attached(),
            failed: Recent::new(),
            background: Flight::new(|| ()),
            serial: AtomicU64::new(0),
        })
    }

    fn current(&self) -> Option<Arc<CachedToken>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A token valid now. The cached one while it is not due for refresh; once due but
    /// still valid, the cached one while a background task refreshes it (callers never
    /// wait for a refresh they do not need); with no valid token, a new one from the token
    /// endpoint (one request at a time, shared by all waiters).
    pub async fn token(self: &Arc<Self>) -> Result<Arc<CachedToken>, Arc<TokenError>> {
        let now = self.clock.now();
        if let Some(token) = self.current() {
            if now < token.refresh_at {
                return Ok(token);
            }
            if now < token.expires_at {
                self.refresh_in_background();
                return Ok(token);
            }
        }
        self.refresh().await
    }

    fn refresh_in_background(self: &Arc<Self>) {
        let this = Arc::clone(self);
        self.background.start(move || this.retry_until_refreshed());
    }

    /// Refreshes, retrying with backoff while the current token stays valid.
    async fn retry_until_refreshed(self: Arc<Self>) {
        let mut pause = RETRY_FIRST;
        loop {
            match self.refresh().await {
                Ok(_) => break,
                Err(e) => {
                    let now = self.clock.now();
                    let Some(expires_at) =
                        self.current().map(|t| t.expires_at).filter(|at| now < *at)
                    else {
                        // Expired: requests now ask in the foreground.
                        break;
                    };
                    let wait = e.retry_after().unwrap_or(pause).min(expires_at - now);
                    tracing::warn!(error = %e, retry_in = %Wait(wait), "background token refresh failed; the current token stays in use");
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(RETRY_CAP);
                }
            }
        }
    }

    /// One token request at a time; waiters take its result.
    async fn refresh(self: &Arc<Self>) -> Result<Arc<CachedToken>, Arc<TokenError>> {
        let ready = || {
            let now = self.clock.now();
            // The request before ours may have refreshed already...
            if let Some(token) = self.current().filter(|t| now < t.refresh_at) {
                return Some(Ok(token));
            }
            // ...or failed moments ago.
            self.failed.get(now).map(Err)
        };
        let this = Arc::clone(self);
        self.requests
            .run(ready, move || async move { this.request().await })
            .await
    }

    /// Asks the token endpoint, and keeps the token (or remembers the failure).
    async fn request(&self) -> Result<Arc<CachedToken>, Arc<TokenError>> {
        let fetched = self.fetch().await;
        let outcome = match &fetched {
            Ok(_) => "ok",
            Err(TokenError::Refused { .. }) => "refused",
            Err(TokenError::Throttled(_)) => "throttled",
            Err(
                TokenError::Status(_)
                | TokenError::Unreachable(_)
                | TokenError::TooLarge(_)
                | TokenError::Malformed(_)
                | TokenError::TimedOut,
            ) => "error",
        };
        self.metrics
            .counter(names::TOKEN_REQUESTS, &[("outcome", outcome)])
            .increment(1);
        match fetched {
            Ok(token) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
                self.failed.forget();
                Ok(token)
            }
            Err(e) => {
                let e = Arc::new(e);
                let now = self.clock.now();
                let pause = e.retry_after().unwrap_or(FAILURE_PAUSE);
                match &*e {
                    TokenError::Refused { description, .. } => tracing::warn!(
                        error = %e,
                        description = description.as_str(),
                        "token request failed"
                    ),
                    _ => tracing::warn!(error = %e, cause = %Causes(&*e), "token request failed"),
                }
                self.failed.remember(e.clone(), now + pause);
                Err(e)
            }
        }
    }

    /// Graph rejected `token`: forget it (unless a newer one replaced it already).
    pub fn invalidate(&self, token: &CachedToken) {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_some_and(|t| t.serial == token.serial) {
            *guard = None;
        }
    }

    /// Seconds the current token has left, for metrics and readiness.
    pub fn remaining(&self) -> Option<Duration> {
        let now = self.clock.now();
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .map(|t| t.expires_at.saturating_duration_since(now))
    }

    async fn fetch(&self) -> Result<Arc<CachedToken>, TokenError> {
        let exchange = Arc::new(std::sync::Mutex::new(Exchange::default()));
        let seen = exchange.clone();
        let http = self.http.clone();
        let timeout = self.timeout;
        // oauth2 only hands back the body on failure; this closure also records the
        // status and Retry-After so a 429 can be told from a refusal.
        let send = move |request: oauth2::HttpRequest| {
            let http = http.clone();
            let seen = seen.clone();
            async move {
                let mut request = reqwest::Request::try_from(request).map_err(ReadError::Http)?;
                *request.timeout_mut() = Some(timeout);
                let response = http.execute(request).await.map_err(ReadError::Http)?;
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        crate::core::http::parse_retry_after(v, std::time::SystemTime::now())
                    });
                if let Ok(mut seen) = seen.lock() {
                    *seen = Exchange {
                        status: status.as_u16(),
                        retry_after,
                    };
                }
                let mut out = http::Response::builder().status(status);
                for (name, value) in response.headers() {
                    out = out.header(name, value);
                }
                let body = bounded::read(response, MAX_ANSWER_BYTES).await?;
                Ok::<_, ReadError>(out.body(body.to_vec()).unwrap_or_default())
            }
        };
        let started = self.clock.now();
        let mut request = self
            .oauth
            .exchange_client_credentials()
            .add_scope(self.scope.clone());
        if let Some(signer) = &self.assertion {
            request = request
                .add_extra_param(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                )
                .add_extra_param("client_assertion", signer.sign()?);
        }
        let result = request.request_async(&send).await;
        let seen = exchange.lock().map(|e| e.clone()).unwrap_or_default();
        let response = result.map_err(|e| classify(e, &seen))?;
        let lifetime = response
            .expires_in
            .map(Duration::from_secs)
            .ok_or_else(|| TokenError::Malformed("no expires_in".to_string()))?;
        if lifetime.is_zero() {
            return Err(TokenError::Malformed("expires_in is 0".to_string()));
        }
        // Entra issues tokens for 60-90 minutes; an absurd value is capped, not trusted.
        let lifetime = lifetime.min(MAX_LIFETIME);
        let margin = self.refresh_before.min(lifetime / 10);
        // Entra's `refresh_in` (about half the lifetime) asks for an earlier refresh, which
        // runs in the background while this token keeps serving.
        let refresh_after = match response.refresh_in {
            Some(secs) if secs > 0 => {
                Duration::from_secs(secs.min(MAX_LIFETIME.as_secs())).min(lifetime - margin)
            }
            _ => lifetime - margin,
        };
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(
            lifetime_s = lifetime.as_secs(),
            serial,
            "obtained a Graph access token"
        );
        Ok(Arc::new(CachedToken {
            secret: SecretString::from(response.access_token.secret().to_string()),
            refresh_at: started + refresh_after,
            expires_at: started + lifetime,
            serial,
        }))
    }
}

fn classify(e: RequestTokenError<ReadError, BasicErrorResponse>, seen: &Exchange) -> TokenError {
    if seen.status == 429 {
        return TokenError::Throttled(seen.retry_after.unwrap_or(Duration::from_secs(60)));
    }
    match e {
        RequestTokenError::ServerResponse(body) => {
            let description = body.error_description().cloned().unwrap_or_default();
            TokenError::Refused {
                error: body.error().to_string(),
                aadsts: aadsts_code(&description),
                description,
            }
        }
        RequestTokenError::Request(ReadError::Http(e)) => TokenError::Unreachable(e),
        RequestTokenError::Request(ReadError::TooLarge { limit }) => TokenError::TooLarge(limit),
        RequestTokenError::Parse(e, _) if seen.status == 200 => {
            TokenError::Malformed(e.to_string())
        }
        RequestTokenError::Parse(..) | RequestTokenError::Other(_) if seen.status != 200 => {
            TokenError::Status(seen.status)
        }
        RequestTokenError::Parse(e, _) => TokenError::Malformed(e.to_string()),
        RequestTokenError::Other(e) => TokenError::Malformed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_codes_are_found() {
        assert_eq!(
            aadsts_code("AADSTS7000215: Invalid client secret provided.").as_deref(),
            Some("AADSTS7000215")
        );
        assert_eq!(aadsts_code("no code here"), None);
        assert_eq!(aadsts_code("AADSTS: none"), None);
    }

    #[test]
    fn expires_in_as_number_or_string() {
        let a: EntraTokenResponse = serde_json::from_str(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"x"}"#,
        )
        .unwrap();
        assert_eq!(a.expires_in(), Some(Duration::from_secs(3599)));
        let b: EntraTokenResponse = serde_json::from_str(
            r#"{"token_type":"bearer","expires_in":"3599","refresh_in":"1799","access_token":"x"}"#,
        )
        .unwrap();
        assert_eq!(b.expires_in(), Some(Duration::from_secs(3599)));
        assert_eq!(b.refresh_in, Some(1799));
    }

    #[test]
    fn refusal_message_names_code_not_description() {
        let e = TokenError::Refused {
            error: "invalid_client".into(),
            aadsts: Some("AADSTS7000215".into()),
            description: "AADSTS7000215: Invalid client secret provided. Secret hint: abc".into(),
        };
        let m = e.caller_message();
        assert!(m.contains("AADSTS7000215") && !m.contains("hint"), "{m}");
    }
}
