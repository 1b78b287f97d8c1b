//! [`GraphClient`]: one session from Microsoft Graph, with retries and classification.
//!
//! The URL is `{graph root}/{api version}` + [`SessionKey::graph_path`], nothing else: the
//! key's ids were validated by `routes` and are encoded again as single segments there.
//! Every attempt carries a fresh `client-request-id` so Microsoft support can trace it.
//! 429/503/504, timeouts and connection errors are retried (`Retry-After` honoured, else
//! exponential backoff with jitter) within `graph.max_retries` and the caller's deadline;
//! a 401 `InvalidAuthenticationToken` drops the token and is retried once with a new one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::core::clock::Clock;
use crate::core::http::parse_retry_after;
use crate::core::model::SessionKey;
use crate::core::request_id;
use crate::telemetry::{names, Metrics};
use crate::upstream::bounded::{self, ReadError};
use crate::upstream::error::UpstreamError;
use crate::upstream::gate::{Closed, Gate, Report};
use crate::upstream::list::{next_page, ListMerger};
use crate::upstream::token::{CachedToken, TokenError, TokenProvider};

/// Largest body accepted from Graph; sessions are a few KiB.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// First backoff step without `Retry-After` (Microsoft's SDK uses 3 s; a proxy whose
/// caller is waiting retries sooner and leaves long waits to the throttle answer).
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// What Graph said about a session.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// The session object, unwrapped from a `{"value": {...}}` envelope if Graph sent one
    /// (`session`, a slice of `raw`), and Graph's body exactly as sent (`raw`).
    Found { session: Bytes, raw: Bytes },
    /// Graph 404: the session does not exist (cached for `negative_ttl`).
    NotFound,
}

#[derive(Debug, Clone)]
pub struct GraphAnswer {
    pub fetched: Fetched,
    /// Graph's `request-id` header.
    pub graph_request_id: Option<String>,
}

pub struct GraphClient {
    http: reqwest::Client,
    /// `{graph root}`, no trailing slash.
    root: String,
    tokens: Arc<TokenProvider>,
    timeout: Duration,
    max_retries: u32,
    max_list_pages: u32,
    /// Closed while Graph throttles us or keeps failing; shared by every key.
    pub gate: Gate,
    clock: Clock,
    metrics: Arc<Metrics>,
}

/// How to reach Graph.
pub struct GraphOptions {
    pub root: String,
    /// Per attempt.
    pub timeout: Duration,
    pub max_retries: u32,
    /// Consecutive failures that open the circuit (0 = never) and for how long.
    pub circuit_failures: u32,
    pub circuit_cooldown: Duration,
    /// Session lists: pages followed at most.
    pub max_list_pages: u32,
}

/// How outbound connections leave the network: through a CONNECT proxy, trusting more
/// roots than the bundled ones.
#[derive(Default)]
pub struct Egress<'a> {
    /// `graph.proxy_url` (absent: `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`, as reqwest
    /// reads them).
    pub proxy_url: Option<&'a str>,
    /// `graph.ca_file`'s PEM bundle.
    pub ca_pem: Option<&'a [u8]>,
}

/// Outbound HTTP client for Graph, the token endpoint and JWKS: rustls, pooled, no
/// redirects (a redirect could carry the bearer token, or the secret, somewhere else).
pub fn http_client(timeout: Duration, egress: &Egress) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("graph-session-proxy/", env!("CARGO_PKG_VERSION")));
    if let Some(url) = egress.proxy_url {
        // Credentials in the URL's userinfo become Proxy-Authorization (Basic).
        builder = builder.proxy(reqwest::Proxy::all(url)?);
    }
    if let Some(pem) = egress.ca_pem {
        for root in reqwest::Certificate::from_pem_bundle(pem)? {
            builder = builder.add_root_certificate(root);
        }
    }
    builder.build()
}

impl GraphClient {
    pub fn new(
        http: reqwest::Client,
        options: GraphOptions,
        tokens: Arc<TokenProvider>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> GraphClient {
        GraphClient {
            http,
            root: options.root.trim_end_matches('/').to_string(),
            tokens,
            timeout: options.timeout,
            max_retries: options.max_retries,
            max_list_pages: options.max_list_pages.max(1),
            gate: Gate::new(
                options.circuit_failures,
                options.circuit_cooldown,
                options.timeout,
            ),
            clock,
            metrics,
        }
    }

    pub fn url(&self, key: &SessionKey) -> String {
        format!("{}/{}{}", self.root, key.version.as_str(), key.graph_path())
    }

    /// Fetches `key` (a session, or an event's whole session list), giving up at `deadline`.
    pub async fn fetch(
        &self,
        key: &SessionKey,
        deadline: Instant,
    ) -> Result<GraphAnswer, UpstreamError> {
        if key.is_list() {
            return self.fetch_list(key, deadline).await;
        }
        let got = self.get(&self.url(key), deadline).await?;
        let fetched = match got.body {
            Some(raw) => {
                let session =
                    unwrap_envelope(raw.clone()).ok_or_else(|| UpstreamError::Status {
                        status: 200,
                        code: "invalidJson".to_string(),
                    })?;
                Fetched::Found { session, raw }
            }
            None => Fetched::NotFound,
        };
        Ok(GraphAnswer {
            fetched,
            graph_request_id: got.graph_request_id,
        })
    }

    /// An event's session list: the first page and every `@odata.nextLink` after it (up to
    /// `max_list_pages`), merged into one collection. Each next link must name the same
    /// Graph endpoint (same origin, same decoded path) with only a different query.
    async fn fetch_list(
        &self,
        key: &SessionKey,
        deadline: Instant,
    ) -> Result<GraphAnswer, UpstreamError> {
        let first = reqwest::Url::parse(&self.url(key))
            .map_err(|_| UpstreamError::Internal("Graph list URL does not parse"))?;
        let mut url = first.clone();
        let mut merged = ListMerger::default();
        let mut graph_request_id = None;
        let mut pages = 0u32;
        loop {
            let got = self.get(url.as_str(), deadline).await?;
            pages += 1;
            let Some(body) = got.body else {
                if pages == 1 {
                    return Ok(GraphAnswer {
                        fetched: Fetched::NotFound,
                        graph_request_id: got.graph_request_id,
                    });
                }
                return Err(UpstreamError::BadListPage("a next page answered 404"));
            };
            if graph_request_id.is_none() {
                graph_request_id = got.graph_request_id;
            }
            let next = merged.add(&body)?;
            match next {
                None => break,
                Some(_) if pages >= self.max_list_pages => {
                    tracing::warn!(
                        list = %key,
                        pages,
                        "session list longer than graph.max_list_pages: answered truncated"
                    );
                    self.metrics
                        .counter(names::LIST_TRUNCATED, &[])
                        .increment(1);
                    merged.truncated = true;
                    break;
                }
                Some(next) => url = next_page(&first, &next)?,
            }
        }
        let body = merged.finish();
        Ok(GraphAnswer {
            fetched: Fetched::Found {
                session: body.clone(),
                raw: body,
            },
            graph_request_id,
        })
    }

    /// One Graph URL with retries: `Some(body)` for 200, `None` for 404, else the error.
    async fn get(&self, url: &str, deadline: Instant) -> Result<Got, UpstreamError> {
        let mut retries = 0u32;
        let mut renewed_token = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let token = tokio::time::timeout(left, self.tokens.token())
                .await
                .map_err(|_| UpstreamError::Token(Arc::new(TokenError::TimedOut)))?
                .map_err(UpstreamError::Token)?;
            // After the token: a probe admitted here must be the one that calls Graph.
            self.gate
                .admit(self.clock.now())
                .map_err(|closed| match closed {
                    Closed::Throttled { retry_after } => UpstreamError::Throttled { retry_after },
                    Closed::CircuitOpen { retry_after } => {
                        UpstreamError::CircuitOpen { retry_after }
                    }
                })?;
            let client_request_id = uuid::Uuid::new_v4().to_string();
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt_timeout = self.timeout.min(left);
            if attempt_timeout.is_zero() {
                return Err(UpstreamError::Timeout);
            }
            let attempt_started = std::time::Instant::now();
            let outcome = self
                .attempt(url, &token, &client_request_id, retries, attempt_timeout)
                .await;
            self.record_attempt(&outcome, attempt_started.elapsed(), retries > 0);
            let step = self.judge(url, &client_request_id, outcome, retries, !renewed_token);
            let Retry::After(retry_after, error) = match step {
                Step::Done(result) => return result,
                Step::RenewToken => {
                    self.tokens.invalidate(&token);
                    renewed_token = true;
                    continue;
                }
                Step::Retry(retry) => retry,
            };
            if retries >= self.max_retries {
                return Err(error);
            }
            let wait = retry_after.unwrap_or_else(|| backoff(retries));
            if Instant::now() + wait >= deadline {
                // Waiting would outlast the caller: answer now.
                return Err(error);
            }
            tokio::time::sleep(wait).await;
            retries += 1;
        }
    }

    /// One request to Graph with `token`, its whole body read (bounded) within `timeout`.
    async fn attempt(
        &self,
        url: &str,
        token: &CachedToken,
        client_request_id: &str,
        retries: u32,
        timeout: Duration,
    ) -> Attempt {
        let mut request = self
            .http
            .get(url)
            .bearer_auth(token.bearer())
            .header("client-request-id", client_request_id)
            .header(http::header::ACCEPT, "application/json");
        if retries > 0 {
            request = request.header("Retry-Attempt", retries.to_string());
        }
        tokio::time::timeout(timeout, async {
            let response = request.send().await.map_err(ReadError::Http)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = bounded::read(response, MAX_BODY).await?;
            Ok::<_, ReadError>((status, headers, body))
        })
        .await
    }

    /// What one attempt's outcome means: an answer, a retry (after how long), or a token
    /// to renew (once, when `may_renew`). Reports to the gate as it goes.
    fn judge(
        &self,
        url: &str,
        client_request_id: &str,
        outcome: Attempt,
        retries: u32,
        may_renew: bool,
    ) -> Step {
        let now = self.clock.now();
        match outcome {
            Err(_elapsed) => {
                tracing::warn!(%url, client_request_id, "Graph attempt timed out");
                self.gate.report(now, Report::Failed);
                Step::Retry(Retry::After(None, UpstreamError::Timeout))
            }
            Ok(Err(e)) if e.is_timeout() => {
                self.gate.report(now, Report::Failed);
                Step::Retry(Retry::After(None, UpstreamError::Timeout))
            }
            Ok(Err(ReadError::TooLarge { limit })) => {
                // Not worth retrying: the same request gets the same answer.
                tracing::warn!(%url, client_request_id, limit, "Graph's answer is too large");
                self.gate.report(now, Report::Answered);
                Step::Done(Err(UpstreamError::TooLarge { limit }))
            }
            Ok(Err(ReadError::Http(e))) => {
                tracing::warn!(%url, client_request_id, error = %e, "Graph request failed");
                self.gate.report(now, Report::Failed);
                Step::Retry(Retry::After(None, UpstreamError::Unreachable(e)))
            }
            Ok(Ok((status, headers, body))) => {
                let graph_request_id =
                    graph_request_id(headers.get("request-id"), client_request_id);
                let retry_after = headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                // 429 (and 503 with Retry-After) close the gate for every key.
                let throttle = match (status.as_u16(), retry_after) {
                    (429 | 503, Some(wait)) => Some(wait),
                    (429, None) => Some(backoff(retries)),
                    _ => None,
                };
                self.gate.report(
                    now,
                    match (throttle, status.as_u16()) {
                        (Some(wait), _) => Report::Throttled(wait),
                        (None, 500..=599) => Report::Failed,
                        (None, _) => Report::Answered,
                    },
                );
                match status {
                    StatusCode::OK => {
                        return Step::Done(Ok(Got {
                            body: Some(body),
                            graph_request_id,
                        }))
                    }
                    StatusCode::NOT_FOUND => {
                        return Step::Done(Ok(Got {
                            body: None,
                            graph_request_id,
                        }))
                    }
                    _ => {}
                }
                let code = graph_error_code(&body);
                tracing::warn!(
                    %url,
                    client_request_id,
                    graph_request_id = graph_request_id.as_deref().unwrap_or(""),
                    status = status.as_u16(),
                    code,
                    "Graph answered with an error"
                );
                error_step(status.as_u16(), code, throttle, may_renew)
            }
        }
    }
}

/// What a Graph error status means for the call.
fn error_step(status: u16, code: String, throttle: Option<Duration>, may_renew: bool) -> Step {
    match status {
        401 if code == "InvalidAuthenticationToken" && may_renew => Step::RenewToken,
        403 => Step::Done(Err(UpstreamError::Forbidden { code })),
        429 => Step::Retry(Retry::After(
            throttle,
            UpstreamError::Throttled {
                retry_after: throttle.unwrap_or(Duration::from_secs(1)),
            },
        )),
        503 | 504 => Step::Retry(Retry::After(
            throttle,
            UpstreamError::Status { status, code },
        )),
        other => Step::Done(Err(UpstreamError::Status {
            status: other,
            code,
        })),
    }
}

/// Where one attempt leaves the call.
enum Step {
    Done(Result<Got, UpstreamError>),
    /// Graph said the token expired: forget it and try again with a new one (once).
    RenewToken,
    Retry(Retry),
}

/// One Graph answer worth keeping: `body` is `None` for a 404.
struct Got {
    body: Option<Bytes>,
    graph_request_id: Option<String>,
}

type Attempt =
    Result<Result<(StatusCode, http::HeaderMap, Bytes), ReadError>, tokio::time::error::Elapsed>;

impl GraphClient {
    fn record_attempt(&self, outcome: &Attempt, took: Duration, retry: bool) {
        let (label, status) = match outcome {
            Err(_) => ("timeout", None),
            Ok(Err(e)) if e.is_timeout() => ("timeout", None),
            Ok(Err(ReadError::TooLarge { .. })) => ("too_large", None),
            Ok(Err(ReadError::Http(_))) => ("unreachable", None),
            Ok(Ok((status, _, _))) => (
                match status.as_u16() {
                    200 => "ok",
                    404 => "not_found",
                    429 => "throttled",
                    _ => "error",
                },
                Some(status.as_u16()),
            ),
        };
        self.metrics.pulse().graph(label);
        let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
        self.metrics
            .counter(
                names::GRAPH_REQUESTS,
                &[("outcome", label), ("status", &status)],
            )
            .increment(1);
        self.metrics
            .histogram(names::GRAPH_DURATION, &[])
            .record(took.as_secs_f64());
        if retry {
            self.metrics.counter(names::GRAPH_RETRIES, &[]).increment(1);
        }
    }
}

enum Retry {
    /// Retry after the server's `Retry-After` (or backoff), or fail with the error.
    After(Option<Duration>, UpstreamError),
}

/// Exponential backoff with up to 50% jitter.
fn backoff(retries: u32) -> Duration {
    let base = BACKOFF_BASE
        .saturating_mul(1 << retries.min(16))
        .min(BACKOFF_CAP);
    let jitter = rand::rng().random_range(0.0..0.5);
    base.mul_f64(1.0 + jitter)
}

/// Graph's `request-id` as callers and logs may see it: kept when
/// [`request_id::is_usable`], else our own `client-request-id` of the call, which Graph's
/// support can trace just as well (the original is not logged).
fn graph_request_id(header: Option<&HeaderValue>, client_request_id: &str) -> Option<String> {
    let value = header?;
    match value.to_str() {
        Ok(id) if request_id::is_usable(id.as_bytes()) => Some(id.to_string()),
        _ => {
            tracing::debug!(
                bytes = value.len(),
                client_request_id,
                "Graph's request-id is not usable; the client-request-id stands in for it"
            );
            Some(client_request_id.to_string())
        }
    }
}

/// Graph's `error.code`, or `unknown` when the body is not Graph's error shape.
pub(crate) fn graph_error_code(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
    }
    serde_json::from_slice::<Envelope>(body)
        .ok()
        .map(|e| e.error.code)
        .filter(|c| {
            !c.is_empty()
                && c.len() <= 100
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// The body to cache: Graph's bytes unchanged, or, when Graph wrapped the object as
/// `{"value": {...}}`, the inner object's bytes. `None` when the body is not a JSON object.
pub fn unwrap_envelope(body: Bytes) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        value: Option<&'a RawValue>,
        #[serde(default)]
        id: Option<serde::de::IgnoredAny>,
    }
    let probe: Probe = serde_json::from_slice(&body).ok()?;
    if body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_none_or(|b| *b != b'{')
    {
        return None;
    }
    match probe.value {
        Some(inner) if probe.id.is_none() && inner.get().starts_with('{') => {
            let start = inner.get().as_ptr() as usize - body.as_ptr() as usize;
            Some(body.slice(start..start + inner.get().len()))
        }
        _ => Some(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_unwrapped_byte_for_byte() {
        let inner = r#"{ "id":"s1", "subject":"x\u00e9",  "n":1.50 }"#;
        let wrapped = Bytes::from(format!("{{\"value\": {inner} }}"));
        assert_eq!(unwrap_envelope(wrapped).unwrap(), inner.as_bytes());
        let bare = Bytes::from_static(br#"{"@odata.context":"c","id":"s1","n":1.50}"#);
        assert_eq!(unwrap_envelope(bare.clone()).unwrap(), bare);
        assert!(unwrap_envelope(Bytes::from_static(b"[1,2]")).is_none());
        assert!(unwrap_envelope(Bytes::from_static(b"not json")).is_none());
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(0) >= BACKOFF_BASE && backoff(0) < BACKOFF_BASE * 2);
        assert!(backoff(2) >= BACKOFF_BASE * 4);
        assert!(backoff(30) <= BACKOFF_CAP.mul_f64(1.5));
    }

    #[test]
    fn graph_codes() {
        assert_eq!(
            graph_error_code(br#"{"error":{"code":"Forbidden","message":"m"}}"#),
            "Forbidden"
        );
        assert_eq!(graph_error_code(b"<html>"), "unknown");
        assert_eq!(
            graph_error_code(br#"{"error":{"code":"a b<script>"}}"#),
            "unknown"
        );
    }
}
