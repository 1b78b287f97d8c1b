//! [`ProxyError`] and its one mapping to an HTTP answer.
//!
//! Classified by who is at fault: the caller (4xx), Graph or the identity platform (5xx
//! with an `upstream*` / `tokenUnavailable` code), or the proxy itself (500). Callers get a
//! short, fixed text; the whole `#[source]` chain goes to the log only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::auth::error::AuthError;
use crate::cache::CacheError;
use crate::core::http::json_response;
use crate::core::model::{IdError, Style};
use crate::http::limits::{Limit, Refusal};
use crate::upstream::error::UpstreamError;

/// Everything that can stop a request from getting its session: the HTTP layer's own
/// refusals, and the lower layers' errors as they are (each classified once, below).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("invalid {0}")]
    InvalidId(&'static str),
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("request target too long")]
    UriTooLong,
    #[error("no such route")]
    RouteNotFound,
    #[error("Graph path not served by this proxy")]
    NotSupported,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("Graph has no such session")]
    SessionNotFound,
    #[error("Graph has no such event")]
    EventNotFound,
    #[error("only-if-cached and nothing is cached")]
    NotCached,
    #[error("too many concurrent requests")]
    Overloaded,
    #[error("shutting down")]
    Draining,
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The caller could not be let in.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Graph or the identity platform failed (possibly remembered by the cache).
    #[error(transparent)]
    Upstream(Arc<UpstreamError>),
    /// The caller's request rate or Graph budget is spent (and nothing servable cached).
    #[error("{} limit reached", .0.limit.name())]
    RateLimited(Refusal),
}

impl From<CacheError> for ProxyError {
    fn from(e: CacheError) -> ProxyError {
        match e {
            CacheError::NotCached => ProxyError::NotCached,
            CacheError::Upstream(e) => ProxyError::Upstream(e),
        }
    }
}

impl From<IdError> for ProxyError {
    fn from(e: IdError) -> ProxyError {
        ProxyError::InvalidId(e.what)
    }
}

/// How an error is answered.
struct Answer {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The one header this status needs, if any.
    header: Option<(http::HeaderName, HeaderValue)>,
    /// `RateLimit-Policy` and `RateLimit`, for a 429.
    rate_limit: Option<(HeaderValue, HeaderValue)>,
}

fn answer(status: StatusCode, code: &'static str, message: impl Into<String>) -> Answer {
    Answer {
        status,
        code,
        message: message.into(),
        header: None,
        rate_limit: None,
    }
}

const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

impl ProxyError {
    /// Exhaustive on purpose: a new variant must be classified here before the crate
    /// compiles.
    fn classify(&self) -> Answer {
        use ProxyError as E;
        match self {
            E::InvalidRequest(why) => answer(StatusCode::BAD_REQUEST, "invalidRequest", *why),
            E::InvalidId(what) => answer(
                StatusCode::BAD_REQUEST,
                "invalidRequest",
                format!("malformed {what}: 1 to 256 characters from A-Z a-z 0-9 - _ . @ = + after one percent-decoding, not . or .."),
            ),
            E::HeadersTooLarge => answer(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalidRequest",
                "too many request headers, or too large",
            ),
            E::UriTooLong => answer(StatusCode::URI_TOO_LONG, "invalidRequest", "request target too long"),
            E::Auth(AuthError::Ambiguous(why)) => {
                answer(StatusCode::BAD_REQUEST, "invalidRequest", *why)
            }
            E::Auth(AuthError::Unauthenticated(why)) => Answer {
                header: Some((
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"graph-session-proxy\""),
                )),
                ..answer(StatusCode::UNAUTHORIZED, "unauthenticated", *why)
            },
            E::Auth(AuthError::Forbidden { what, .. }) => answer(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this caller may not read {what}"),
            ),
            E::Auth(AuthError::Unavailable) => Answer {
                header: Some((RETRY_AFTER, retry_after_value(Duration::from_secs(30)))),
                ..answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "authUnavailable",
                    "caller tokens cannot be verified right now: the signing key set is unavailable",
                )
            },
            E::RouteNotFound => answer(
                StatusCode::NOT_FOUND,
                "notFound",
                "no such route: use GET /sessions/{webinars|townhalls}/{event}/{session} or /sessions/{webinars|townhalls}/{event}",
            ),
            E::NotSupported => answer(
                StatusCode::NOT_FOUND,
                "notSupported",
                "this proxy serves only GET /{v1.0|beta}/solutions/virtualEvents/{webinars|townhalls}/{event}/sessions[/{session}]",
            ),
            E::SessionNotFound => answer(StatusCode::NOT_FOUND, "notFound", "Graph has no such session"),
            E::EventNotFound => answer(StatusCode::NOT_FOUND, "notFound", "Graph has no such event"),
            E::MethodNotAllowed => Answer {
                header: Some((ALLOW, HeaderValue::from_static("GET, HEAD"))),
                ..answer(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "methodNotAllowed",
                    "only GET and HEAD are allowed",
                )
            },
            E::NotCached => answer(
                StatusCode::GATEWAY_TIMEOUT,
                "notCached",
                "only-if-cached was requested and this session is not cached",
            ),
            E::Upstream(u) => upstream(u),
            E::Overloaded => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many concurrent requests; retry shortly",
            ),
            E::Draining => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "the proxy is shutting down; retry on another instance",
            ),
            E::Internal(_) => answer(StatusCode::INTERNAL_SERVER_ERROR, "internalError", "internal error"),
            E::RateLimited(refusal) => Answer {
                header: Some((RETRY_AFTER, HeaderValue::from(refusal.retry_after_secs()))),
                rate_limit: Some(refusal.headers()),
                ..answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rateLimited",
                    match refusal.limit {
                        Limit::Requests => format!(
                            "this caller's request rate ({} per second) is spent; retry after the Retry-After delay",
                            refusal.rate.quota
                        ),
                        Limit::Graph => format!(
                            "this caller's Graph budget ({} Graph calls per minute) is spent and this session is not cached; retry after the Retry-After delay",
                            refusal.rate.quota
                        ),
                    },
                )
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().status
    }

    pub fn code(&self) -> &'static str {
        self.classify().code
    }

    /// The error as docs/DESIGN.md's JSON body, with the header its status needs.
    pub fn to_response(&self, request_id: &str) -> Response<Full<Bytes>> {
        self.to_response_in(Style::Proxy, request_id, request_id)
    }

    /// The error in the shape callers of that contract expect: docs/DESIGN.md's body, or
    /// Graph's (`{"error": {"code", "message", "innerError": {...}}}`) so that Graph SDK
    /// error handling works on the Graph-compatible routes. `client_request_id` (the
    /// caller's, or ours) is only part of Graph's shape.
    pub fn to_response_in(
        &self,
        style: Style,
        request_id: &str,
        client_request_id: &str,
    ) -> Response<Full<Bytes>> {
        let a = self.classify();
        let mut response = match style {
            Style::Proxy => error_response(a.status, a.code, &a.message, request_id),
            Style::Graph => graph_error_response(
                a.status,
                a.code,
                &a.message,
                request_id,
                client_request_id,
                std::time::SystemTime::now(),
            ),
        };
        if let Some((name, value)) = a.header {
            response.headers_mut().insert(name, value);
        }
        if let Some((policy, now)) = a.rate_limit {
            response.headers_mut().insert(RATELIMIT_POLICY, policy);
            response.headers_mut().insert(RATELIMIT, now);
        }
        response
    }
}

/// How an upstream failure is answered: the caller hears which side failed and what to
/// do, never Graph's or Entra's own text.
fn upstream(e: &UpstreamError) -> Answer {
    use UpstreamError as U;
    match e {
        U::BadListPage(why) => answer(
            StatusCode::BAD_GATEWAY,
            "upstreamError",
            format!("Graph sent a session list page that cannot be followed: {why}"),
        ),
        U::Status { status, code } => answer(
            StatusCode::BAD_GATEWAY,
            "upstreamError",
            format!("Graph answered {status} {code}"),
        ),
        U::Forbidden { code } => answer(
            StatusCode::BAD_GATEWAY,
            "upstreamForbidden",
            format!(
                "Graph refused the proxy's application ({code}). Grant it the VirtualEvent.Read.All application permission and an application access policy for the event organizer: New-CsApplicationAccessPolicy -Identity NAME -AppIds APPID; Grant-CsApplicationAccessPolicy -PolicyName NAME -Identity ORGANIZER (or -Global); allow up to 30 minutes"
            ),
        ),
        U::Unreachable(_) => answer(
            StatusCode::BAD_GATEWAY,
            "upstreamError",
            "Graph could not be reached",
        ),
        U::Throttled { retry_after } => Answer {
            header: Some((RETRY_AFTER, retry_after_value(*retry_after))),
            ..answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstreamThrottled",
                "Graph is throttling the proxy and this session is not cached; retry after the Retry-After delay",
            )
        },
        U::CircuitOpen { retry_after } => Answer {
            header: Some((RETRY_AFTER, retry_after_value(*retry_after))),
            ..answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstreamUnavailable",
                "Graph has been failing; the proxy pauses calls to it and this session is not cached; retry after the Retry-After delay",
            )
        },
        U::TooLarge { .. } => answer(
            StatusCode::BAD_GATEWAY,
            "upstreamError",
            "Graph's answer was too large to pass on",
        ),
        U::Timeout => answer(
            StatusCode::GATEWAY_TIMEOUT,
            "upstreamTimeout",
            "Graph did not answer in time",
        ),
        U::Token(e) => Answer {
            header: e.retry_after().map(|wait| (RETRY_AFTER, retry_after_value(wait))),
            ..answer(StatusCode::BAD_GATEWAY, "tokenUnavailable", e.caller_message())
        },
        U::Internal(_) => answer(StatusCode::INTERNAL_SERVER_ERROR, "internalError", "internal error"),
    }
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// Graph's error shape, field by field as Graph writes it: `innerError.date` in ISO 8601
/// without a zone (`2026-12-02T18:48:27`, UTC; SDKs parse it as a date-time), the
/// request ids both in `innerError` and as the `request-id` / `client-request-id`
/// response headers that SDKs surface in their errors.
fn graph_error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
    client_request_id: &str,
    now: std::time::SystemTime,
) -> Response<Full<Bytes>> {
    let date = humantime::format_rfc3339_seconds(now).to_string();
    let date = date.trim_end_matches('Z');
    let body = json!({"error": {
        "code": code,
        "message": message,
        "innerError": {
            "date": date,
            "request-id": request_id,
            "client-request-id": client_request_id,
        }
    }});
    let mut response = json_response(status, &body);
    let headers = response.headers_mut();
    for (name, value) in [
        (REQUEST_ID, request_id),
        (CLIENT_REQUEST_ID, client_request_id),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    response
}

/// Graph's response headers naming the call: its own id and the echo of the client's.
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("request-id");
pub const CLIENT_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("client-request-id");

/// A JSON error body; also used for refusals that happen before a request is routed.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message, "requestId": request_id}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONTENT_TYPE;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_are_json_with_request_id() {
        let r = ProxyError::MethodNotAllowed.to_response("req-1");
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "methodNotAllowed");
        assert_eq!(v["error"]["requestId"], "req-1");
    }

    /// Microsoft's Graph SDKs (Kiota's generated `ODataError` / `MainError` /
    /// `InnerError`, in .NET, Python, JavaScript, Go alike) read these fields and types;
    /// `date` is a date-time (`DateTimeOffset`, Python `datetime`), so it must parse as ISO
    /// 8601. The mirror below fails where those models fail.
    mod sdk {
        use serde::Deserialize;

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ODataError {
            pub error: MainError,
        }

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct MainError {
            pub code: String,
            pub message: String,
            #[serde(default)]
            pub target: Option<String>,
            #[serde(rename = "innerError")]
            pub inner_error: InnerError,
        }

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct InnerError {
            #[serde(deserialize_with = "iso_date_time")]
            pub date: std::time::SystemTime,
            #[serde(rename = "request-id")]
            pub request_id: String,
            #[serde(rename = "client-request-id")]
            pub client_request_id: String,
        }

        /// ISO 8601 date-time, with or without a zone (Python's `fromisoformat`, .NET's
        /// `DateTimeOffset.Parse` of Graph's `2026-12-02T18:48:27`).
        fn iso_date_time<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<std::time::SystemTime, D::Error> {
            let text = String::deserialize(d)?;
            if text.as_bytes().get(10).is_none_or(|b| *b != b'T') {
                return Err(serde::de::Error::custom(format!("not ISO 8601: {text}")));
            }
            humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
        }
    }

    #[tokio::test]
    async fn graph_style_errors_parse_with_the_sdk_error_model() {
        use std::time::{Duration, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(1_796_237_307); // 2026-12-02T18:48:27Z
        let r = graph_error_response(
            StatusCode::NOT_FOUND,
            "notSupported",
            "only sessions",
            "rid-1",
            "client-7",
            now,
        );
        assert_eq!(r.headers()["request-id"], "rid-1");
        assert_eq!(r.headers()["client-request-id"], "client-7");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let raw: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(raw["error"]["innerError"]["date"], "2026-12-02T18:48:27");
        let parsed: sdk::ODataError = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.error.code, "notSupported");
        assert_eq!(parsed.error.message, "only sessions");
        assert!(parsed.error.target.is_none());
        assert_eq!(parsed.error.inner_error.date, now);
        assert_eq!(parsed.error.inner_error.request_id, "rid-1");
        assert_eq!(parsed.error.inner_error.client_request_id, "client-7");

        // What the proxy used to send (an HTTP date) is refused by the same model.
        let old = r#"{"error":{"code":"x","message":"y","innerError":{"date":"Wed, 02 Dec 2026 18:48:27 GMT","request-id":"a","client-request-id":"a"}}}"#;
        assert!(serde_json::from_str::<sdk::ODataError>(old).is_err());
    }

    #[tokio::test]
    async fn every_error_has_the_graph_shape_on_graph_routes() {
        for e in [
            ProxyError::NotSupported,
            ProxyError::Auth(AuthError::Unauthenticated("no key")),
            ProxyError::InvalidRequest("bad"),
            ProxyError::Upstream(Arc::new(UpstreamError::Timeout)),
            ProxyError::Upstream(Arc::new(UpstreamError::Throttled {
                retry_after: Duration::from_secs(3),
            })),
        ] {
            let r = e.to_response_in(Style::Graph, "rid", "cid");
            assert_eq!(r.headers()["request-id"], "rid");
            let body = r.into_body().collect().await.unwrap().to_bytes();
            let parsed: sdk::ODataError = serde_json::from_slice(&body).unwrap();
            assert_eq!(parsed.error.code, e.code());
            assert_eq!(parsed.error.inner_error.client_request_id, "cid");
        }
    }

    #[test]
    fn throttled_rounds_retry_after_up() {
        let r = ProxyError::Upstream(Arc::new(UpstreamError::Throttled {
            retry_after: Duration::from_millis(2128),
        }))
        .to_response("x");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "3");
        let r = ProxyError::Auth(AuthError::Unauthenticated("no key")).to_response("x");
        assert!(r.headers().contains_key(WWW_AUTHENTICATE));
    }
}
