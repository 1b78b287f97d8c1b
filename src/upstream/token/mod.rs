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

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::core::clock::Clock;
use crate::core::flight::Flight;
use crate::core::remembered::Recent;
use crate::telemetry::{names, Causes, Metrics, Wait};

mod error;
mod exchange;
mod managed;

pub use error::TokenError;
use exchange::ClientCredentials;
pub use exchange::Credential;
pub use managed::ManagedIdentity;
use managed::ManagedSource;

/// A token and when to stop using it.
pub struct CachedToken {
    secret: SecretString,
    /// From here on the next caller refreshes.
    refresh_at: Instant,
    /// Never sent after this.
    expires_at: Instant,
    /// Identifies the token for [`TokenProvider::invalidate`].
    serial: u64,
    /// When the token was asked for (its age on the status page).
    obtained_at: Instant,
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

/// What a token source hands back.
struct Granted {
    access_token: SecretString,
    expires_in: Option<u64>,
    /// Entra's hint to refresh early.
    refresh_in: Option<u64>,
}

/// Where tokens come from.
enum Source {
    /// Entra's token endpoint: a secret, a certificate or a federated assertion.
    Client(Box<ClientCredentials>),
    /// IMDS or App Service.
    Managed(ManagedSource),
}

pub struct TokenProvider {
    source: Source,
    refresh_before: Duration,
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
    /// The last failed token request (when, the caller-safe text, the AADSTS code), kept
    /// after later successes too (a flapping refresh stays visible), for the status page.
    last_error: std::sync::Mutex<Option<TokenTrouble>>,
}

/// A failed token request, as the status page shows it.
#[derive(Debug, Clone)]
pub struct TokenTrouble {
    pub at: std::time::SystemTime,
    pub message: String,
    pub aadsts: Option<String>,
}

/// The token in use, as the status page shows it.
#[derive(Debug, Clone, Default)]
pub struct TokenState {
    /// How long ago the token in use was obtained, and how long it has left.
    pub age: Option<Duration>,
    pub expires_in: Option<Duration>,
    pub last_error: Option<TokenTrouble>,
}

/// After a failed token request, callers get that failure for this long without a new
/// request (unless the endpoint asked for longer with `Retry-After`).
const FAILURE_PAUSE: Duration = Duration::from_secs(1);
/// Longest token lifetime believed.
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

impl TokenProvider {
    pub fn new(
        http: reqwest::Client,
        options: TokenOptions,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<TokenProvider, oauth2::url::ParseError> {
        let source = match ClientCredentials::new(http, &options, metrics.clone())? {
            Some(credentials) => Source::Client(Box::new(credentials)),
            None => match options.credential {
                Credential::Managed(identity) => {
                    Source::Managed(ManagedSource::new(identity, options.timeout))
                }
                _ => unreachable!("only a managed identity has no client credentials"),
            },
        };
        Ok(TokenProvider {
            source,
            refresh_before: options.refresh_before,
            clock,
            metrics,
            current: RwLock::new(None),
            requests: Flight::attached(),
            failed: Recent::new(),
            background: Flight::new(|| ()),
            serial: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
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
                | TokenError::TimedOut
                | TokenError::Credential(_),
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
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(TokenTrouble {
                    at: self.clock.wall(),
                    message: e.caller_message(),
                    aadsts: match &*e {
                        TokenError::Refused { aadsts, .. } => aadsts.clone(),
                        _ => None,
                    },
                });
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

    /// The token in use and the last failure (the token's age tells whether it came after).
    pub fn state(&self) -> TokenState {
        let now = self.clock.now();
        let current = self.current();
        TokenState {
            age: current
                .as_ref()
                .map(|t| now.saturating_duration_since(t.obtained_at)),
            expires_in: current
                .as_ref()
                .map(|t| t.expires_at.saturating_duration_since(now)),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
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
        let started = self.clock.now();
        let response = match &self.source {
            Source::Client(credentials) => {
                let answer = credentials.request().await?;
                Granted {
                    access_token: SecretString::from(answer.access_token.secret().to_string()),
                    expires_in: answer.expires_in,
                    refresh_in: answer.refresh_in,
                }
            }
            Source::Managed(managed) => managed.request().await?,
        };
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
            secret: response.access_token,
            refresh_at: started + refresh_after,
            expires_at: started + lifetime,
            obtained_at: started,
            serial,
        }))
    }
}
