//! [`SubscriptionsApi`]: Graph's `/subscriptions` for change notifications on a webinar's
//! sessions (create, renew, reauthorize, delete). The only URLs it builds are
//! `{graph root}/v1.0/subscriptions` and `.../subscriptions/{id}` with an id of letters,
//! digits and dashes (Graph's are GUIDs), so nothing Graph or a notification says can send
//! the token elsewhere.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::json;

use crate::core::http::parse_retry_after;
use crate::upstream::bounded;
use crate::upstream::graph::graph_error_code;
use crate::upstream::token::TokenProvider;

/// Graph validates the notification URL before it answers a create: give it time.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// A subscription's answer is small.
const MAX_ANSWER: usize = 64 * 1024;

/// A subscription as Graph answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    pub id: String,
    pub expires: SystemTime,
}

/// Why a subscription call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}")]
pub struct SubscriptionError {
    /// Graph's status (0: no answer, a timeout, or a token failure).
    pub status: u16,
    /// Graph's error code, or what went wrong on our side.
    pub code: String,
    /// Graph's `Retry-After`, when it throttled.
    pub retry_after: Option<Duration>,
}

impl SubscriptionError {
    fn local(code: impl Into<String>) -> SubscriptionError {
        SubscriptionError {
            status: 0,
            code: code.into(),
            retry_after: None,
        }
    }

    /// The subscription is gone (Graph 404).
    pub fn is_gone(&self) -> bool {
        self.status == 404
    }
}

/// What a create asks for.
pub struct Request<'a> {
    pub webinar: &'a str,
    pub notification_url: &'a str,
    pub client_state: &'a str,
    pub expires: SystemTime,
}

pub struct SubscriptionsApi {
    http: reqwest::Client,
    /// `{graph root}/v1.0/subscriptions`.
    base: String,
    tokens: Arc<TokenProvider>,
    timeout: Duration,
}

/// Whether `id` may name a subscription in a URL.
pub fn is_subscription_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `resource` of a webinar's session subscription.
pub fn resource_of(webinar: &str) -> String {
    format!("solutions/virtualEvents/webinars/{webinar}/sessions")
}

impl SubscriptionsApi {
    pub fn new(
        http: reqwest::Client,
        graph_root: &str,
        tokens: Arc<TokenProvider>,
        timeout: Duration,
    ) -> SubscriptionsApi {
        SubscriptionsApi {
            http,
            base: format!("{}/v1.0/subscriptions", graph_root.trim_end_matches('/')),
            tokens,
            timeout,
        }
    }

    /// `POST /subscriptions` for the webinar's sessions (`created,updated`), the
    /// lifecycle notifications to the same URL.
    pub async fn create(&self, request: &Request<'_>) -> Result<Subscribed, SubscriptionError> {
        let body = json!({
            "changeType": "created,updated",
            "notificationUrl": request.notification_url,
            "lifecycleNotificationUrl": request.notification_url,
            "resource": resource_of(request.webinar),
            "expirationDateTime": rfc3339(request.expires),
            "clientState": request.client_state,
        });
        let answer = self
            .call(
                reqwest::Method::POST,
                self.base.clone(),
                Some(body),
                CREATE_TIMEOUT.max(self.timeout),
            )
            .await?;
        subscribed(&answer)
    }

    /// `PATCH /subscriptions/{id}` with a new expiry.
    pub async fn renew(
        &self,
        id: &str,
        expires: SystemTime,
    ) -> Result<Subscribed, SubscriptionError> {
        let url = self.url_of(id)?;
        let body = json!({ "expirationDateTime": rfc3339(expires) });
        let answer = self
            .call(reqwest::Method::PATCH, url, Some(body), self.timeout)
            .await?;
        subscribed(&answer)
    }

    /// `POST /subscriptions/{id}/reauthorize`.
    pub async fn reauthorize(&self, id: &str) -> Result<(), SubscriptionError> {
        let url = format!("{}/reauthorize", self.url_of(id)?);
        self.call(reqwest::Method::POST, url, None, self.timeout)
            .await
            .map(drop)
    }

    /// `DELETE /subscriptions/{id}`; a subscription already gone counts as deleted.
    pub async fn delete(&self, id: &str) -> Result<(), SubscriptionError> {
        let url = self.url_of(id)?;
        match self
            .call(reqwest::Method::DELETE, url, None, self.timeout)
            .await
        {
            Err(e) if !e.is_gone() => Err(e),
            _ => Ok(()),
        }
    }

    fn url_of(&self, id: &str) -> Result<String, SubscriptionError> {
        if !is_subscription_id(id) {
            return Err(SubscriptionError::local("invalidSubscriptionId"));
        }
        Ok(format!("{}/{id}", self.base))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<bytes::Bytes, SubscriptionError> {
        let token = tokio::time::timeout(self.timeout, self.tokens.token())
            .await
            .map_err(|_| SubscriptionError::local("tokenTimedOut"))?
            .map_err(|_| SubscriptionError::local("tokenUnavailable"))?;
        let mut request = self
            .http
            .request(method, url)
            .bearer_auth(token.bearer())
            .header("client-request-id", uuid::Uuid::new_v4().to_string())
            .header(http::header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let answer = tokio::time::timeout(timeout, async {
            let response = request.send().await.map_err(|e| {
                SubscriptionError::local(if e.is_timeout() {
                    "timeout"
                } else {
                    "unreachable"
                })
            })?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let body = bounded::read(response, MAX_ANSWER)
                .await
                .map_err(|_| SubscriptionError::local("unreadableAnswer"))?;
            Ok::<_, SubscriptionError>((status, retry_after, body))
        })
        .await
        .map_err(|_| SubscriptionError::local("timeout"))??;
        let (status, retry_after, body) = answer;
        if status == 401 {
            // A token Graph no longer takes: the next call gets a new one.
            self.tokens.invalidate(&token);
        }
        if (200..300).contains(&status) {
            return Ok(body);
        }
        Err(SubscriptionError {
            status,
            code: graph_error_code(&body),
            retry_after,
        })
    }
}

fn subscribed(body: &[u8]) -> Result<Subscribed, SubscriptionError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer {
        id: String,
        expiration_date_time: String,
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|_| SubscriptionError::local("invalidAnswer"))?;
    if !is_subscription_id(&answer.id) {
        return Err(SubscriptionError::local("invalidSubscriptionId"));
    }
    let expires = humantime::parse_rfc3339_weak(&answer.expiration_date_time)
        .map_err(|_| SubscriptionError::local("invalidExpiration"))?;
    Ok(Subscribed {
        id: answer.id,
        expires,
    })
}

/// `2026-12-05T10:00:00.000Z` (UTC, milliseconds), as Graph writes it.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_answers_and_dates() {
        assert!(is_subscription_id("7f105c7d-2dc5-4530-97cd-4e7ae6534c07"));
        for bad in ["", "../x", "a/b", "a?b", "a b", &"a".repeat(65)] {
            assert!(!is_subscription_id(bad), "{bad}");
        }
        let t = humantime::parse_rfc3339("2026-12-05T10:00:00Z").unwrap();
        assert_eq!(rfc3339(t), "2026-12-05T10:00:00.000Z");
        let ok = subscribed(
            br#"{"id":"7f105c7d-2dc5-4530-97cd-4e7ae6534c07","expirationDateTime":"2026-12-05T10:00:00.1234567Z"}"#,
        )
        .unwrap();
        assert_eq!(ok.id, "7f105c7d-2dc5-4530-97cd-4e7ae6534c07");
        assert!(ok.expires > t);
        assert!(
            subscribed(br#"{"id":"../../me","expirationDateTime":"2026-12-05T10:00:00Z"}"#)
                .is_err()
        );
        assert!(subscribed(b"not json").is_err());
        assert_eq!(
            graph_error_code(br#"{"error":{"code":"ExtensionError"}}"#),
            "ExtensionError"
        );
        assert_eq!(graph_error_code(b"<html>"), "unknown");
    }
}
