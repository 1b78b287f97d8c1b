//! Tokens of a managed identity: from the Instance Metadata Service (VMs, scale sets, AKS
//! nodes) or App Service's identity endpoint. No credential of our own: the platform
//! vouches for the machine. Its answers carry numbers as strings; IMDS throttles (429) and
//! answers 5xx while it updates, so those are retried with exponential backoff.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::error::{aadsts_code, TokenError};
use super::exchange::seconds;
use super::Granted;
use crate::config::ManagedFlavour;
use crate::upstream::bounded::{self, ReadError};

/// Which managed identity, and where its tokens come from.
#[derive(Clone)]
pub struct ManagedIdentity {
    pub endpoint: String,
    pub flavour: ManagedFlavour,
    /// App Service: `IDENTITY_HEADER`, sent as `X-IDENTITY-HEADER`.
    pub header: Option<SecretString>,
    /// A user-assigned identity's client id (absent: system-assigned).
    pub client_id: Option<String>,
    /// `{graph root}/`.
    pub resource: String,
}

/// Attempts after the first, and the first pause (doubled each time, up to
/// `LONGEST_PAUSE`, with up to a quarter more as jitter), as Azure advises.
const RETRIES: u32 = 4;
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(10);
/// IMDS answers 410 while it updates, for up to 70 s: retried for that long.
const GONE_FOR: Duration = Duration::from_secs(70);
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The identity endpoint's answer.
#[derive(Deserialize)]
struct Answer {
    access_token: String,
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<u64>,
    /// Epoch seconds.
    #[serde(default, deserialize_with = "seconds")]
    expires_on: Option<u64>,
}

impl Answer {
    /// Seconds left at `now` (epoch seconds). The absolute expiry first, as
    /// azure-identity does: a host's `expires_in` may be that of a token it cached a while.
    fn lifetime(&self, now: u64) -> Option<u64> {
        self.expires_on
            .map(|on| on.saturating_sub(now))
            .or(self.expires_in)
    }
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

pub(super) struct ManagedSource {
    identity: ManagedIdentity,
    /// Its own client: the endpoint is link-local or loopback, never behind an egress proxy.
    http: reqwest::Client,
    timeout: Duration,
}

impl ManagedSource {
    pub(super) fn new(identity: ManagedIdentity, timeout: Duration) -> ManagedSource {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .build()
            // Only a TLS backend that cannot start fails here, and the Graph client built
            // before this one would have failed first; a default client would honour
            // HTTP(S)_PROXY, which the identity endpoint must never go through.
            .expect("the managed identity client builds");
        ManagedSource {
            identity,
            http,
            timeout,
        }
    }

    /// A token, retrying 404 (identity not assigned yet), 410, 429 and 5xx, and
    /// connection failures, with backoff (`Retry-After` when given).
    pub(super) async fn request(&self) -> Result<Granted, TokenError> {
        let mut pause = FIRST_PAUSE;
        let mut attempt = 0;
        let started = tokio::time::Instant::now();
        loop {
            let result = self.once().await;
            let more = match &result {
                Err(TokenError::Status(410)) => started.elapsed() < GONE_FOR,
                _ => attempt < RETRIES,
            };
            let retryable = match &result {
                Err(TokenError::Status(status)) => {
                    matches!(status, 404 | 410 | 500..=599)
                }
                Err(
                    TokenError::Throttled(_) | TokenError::Unreachable(_) | TokenError::TimedOut,
                ) => true,
                _ => false,
            };
            if !retryable || !more {
                return result;
            }
            let wait = result
                .as_ref()
                .err()
                .and_then(TokenError::retry_after)
                .unwrap_or(pause)
                .min(Duration::from_secs(30))
                .mul_f64(1.0 + rand::random::<f64>() / 4.0);
            if let Err(e) = &result {
                tracing::debug!(error = %e, attempt, retry_in_ms = wait.as_millis() as u64, "managed identity endpoint failed; retrying");
            }
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
            attempt += 1;
        }
    }

    async fn once(&self) -> Result<Granted, TokenError> {
        let id = &self.identity;
        let mut query = vec![("resource", id.resource.as_str())];
        let mut request = self.http.get(&id.endpoint).timeout(self.timeout);
        match id.flavour {
            ManagedFlavour::Imds => {
                query.push(("api-version", "2018-02-01"));
                request = request.header("Metadata", "true");
            }
            ManagedFlavour::AppService => {
                query.push(("api-version", "2019-08-01"));
                if let Some(header) = &id.header {
                    request = request.header("X-IDENTITY-HEADER", header.expose_secret());
                }
            }
        }
        if let Some(client_id) = &id.client_id {
            query.push(("client_id", client_id));
        }
        let response = request
            .query(&query)
            .send()
            .await
            .map_err(|e| match e.is_timeout() {
                true => TokenError::TimedOut,
                false => TokenError::Unreachable(e),
            })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::core::http::parse_retry_after(v, SystemTime::now()));
        let body = bounded::read(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::Http(e) => TokenError::Unreachable(e),
                ReadError::TooLarge { limit } => TokenError::TooLarge(limit),
            })?;
        if status == 429 {
            return Err(TokenError::Throttled(
                retry_after.unwrap_or(Duration::from_secs(5)),
            ));
        }
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ErrorAnswer>(&body) {
                Ok(e) if (400..500).contains(&status) && status != 404 && !e.error.is_empty() => {
                    TokenError::Refused {
                        aadsts: aadsts_code(&e.error_description),
                        error: e.error,
                        description: e.error_description,
                    }
                }
                _ => TokenError::Status(status),
            });
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| TokenError::Malformed(format!("managed identity answer: {e}")))?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let expires_in = answer.lifetime(now);
        Ok(Granted {
            access_token: SecretString::from(answer.access_token),
            expires_in,
            refresh_in: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_may_be_strings_and_expires_on_stands_in_for_expires_in() {
        let imds: Answer = serde_json::from_str(
            r#"{"access_token":"x","client_id":"c","expires_in":"86399","expires_on":"1700000000","ext_expires_in":"86399","not_before":"1699913300","resource":"https://graph.microsoft.com/","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(imds.expires_in, Some(86399));
        let app_service: Answer = serde_json::from_str(
            r#"{"access_token":"x","expires_on":1700000000,"resource":"https://graph.microsoft.com/","token_type":"Bearer","client_id":"c"}"#,
        )
        .unwrap();
        assert_eq!(app_service.expires_in, None);
        assert_eq!(app_service.expires_on, Some(1_700_000_000));
        assert_eq!(app_service.lifetime(1_699_999_000), Some(1000));
        // A host's cached token: its expires_in is stale, expires_on is not.
        assert_eq!(imds.lifetime(1_699_990_000), Some(10_000));
        let bare: Answer = serde_json::from_str(r#"{"access_token":"x","expires_in":60}"#).unwrap();
        assert_eq!(bare.lifetime(1_699_990_000), Some(60));
    }
}
