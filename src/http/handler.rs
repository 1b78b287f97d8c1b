//! The caller-facing tower stack and the request handler.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, PRAGMA, TRANSFER_ENCODING,
};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::auth::callers::Caller;
use crate::cache::{CacheError, Directives, Lookup, MISS_STATUS};
use crate::core::model::{SessionKey, Style};
use crate::core::request_id;
use crate::http::access_log::AccessLog;
use crate::http::error::{error_response, ProxyError, CLIENT_REQUEST_ID, REQUEST_ID};
use crate::http::limits::Refusal;
use crate::http::routes;
use crate::http::AppState;
use crate::telemetry::Causes;
use crate::upstream::error::UpstreamError;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_GRAPH_REQUEST_ID: HeaderName = HeaderName::from_static("x-graph-request-id");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// Longest path worth routing: two 256-character ids, each up to 3 bytes per character
/// when percent-encoded, and the fixed segments.
const MAX_PATH_BYTES: usize = 2 * 256 * 3 + 64;

/// The caller-facing stack. Order, outside in: credentials are marked sensitive before
/// anything can log them; a request id is set (or the caller's kept) and copied to the
/// response; a panic becomes a JSON 500 instead of a dropped connection.
pub fn caller_service(
    state: Arc<AppState>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<
        impl hyper::body::Body<
                Data = Bytes,
                Error = impl Into<Box<dyn std::error::Error + Send + Sync>>,
            > + Send
            + 'static,
    >,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]))
        // A caller's id is kept only when short and plain (it is echoed and logged);
        // otherwise it is dropped here and the next layer sets a fresh one.
        .map_request(|mut req: Request<Incoming>| {
            drop_unusable_request_id(req.headers_mut());
            req
        })
        .layer(SetRequestIdLayer::x_request_id(request_id::MakeUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(CatchPanicLayer::custom(
            |_panic: Box<dyn std::any::Any + Send>| {
                tracing::error!("request handler panicked");
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internalError",
                    "internal error",
                    "",
                )
            },
        ))
        .service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move {
                if let Some(n) = state.notifications.clone() {
                    if req.uri().path() == n.path() {
                        return Ok::<_, Infallible>(
                            crate::http::notifications::receive(&state, &n, req).await,
                        );
                    }
                }
                Ok::<_, Infallible>(handle(&state, req).await)
            }
        })
}

/// Removes `x-request-id` unless there is exactly one and [`request_id::is_usable`] keeps it.
pub(crate) fn drop_unusable_request_id(headers: &mut http::HeaderMap) {
    let mut ids = headers.get_all(X_REQUEST_ID).iter();
    let keep = matches!((ids.next(), ids.next()), (Some(id), None) if request_id::is_usable(id.as_bytes()));
    if !keep {
        headers.remove(X_REQUEST_ID);
    }
}

/// The two ids a request is answered with: ours (`x-request-id`, set by the stack) and,
/// for Graph's contract, the caller's `client-request-id` echo. Kept as the header values
/// they came in (a reference count, not a copy); both are visible ASCII.
struct RequestIds {
    request_id: HeaderValue,
    client_request_id: HeaderValue,
}

impl RequestIds {
    fn of(headers: &http::HeaderMap) -> RequestIds {
        let request_id = headers
            .get(X_REQUEST_ID)
            .filter(|v| v.to_str().is_ok())
            .cloned()
            .unwrap_or(HeaderValue::from_static("-"));
        // Graph echoes the client's `client-request-id`; so do the Graph-compatible routes.
        let client_request_id = match headers.get(CLIENT_REQUEST_ID) {
            Some(id) if request_id::is_usable(id.as_bytes()) && id.to_str().is_ok() => id.clone(),
            _ => request_id.clone(),
        };
        RequestIds {
            request_id,
            client_request_id,
        }
    }

    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }

    fn client_request_id(&self) -> &str {
        self.client_request_id.to_str().unwrap_or("-")
    }
}

/// One request, start to finish: never fails, every refusal is docs/DESIGN.md's JSON error.
pub async fn handle<B: hyper::body::Body>(
    state: &AppState,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let ids = RequestIds::of(req.headers());
    let mut log = AccessLog {
        style: Style::of(req.uri().path()),
        ..AccessLog::default()
    };
    let mut response = match answer(state, &req, &mut log, &ids).await {
        Ok(response) => response,
        Err(error) => fail(&error, &mut log, &ids),
    };
    graph_ids(&mut response, log.style, &ids);
    log.write(
        &state.metrics,
        ids.request_id(),
        req.method(),
        response.status(),
        started,
    );
    response
}

/// The phases, in order; each may refuse the request with its [`ProxyError`]. A new
/// policy is one more phase here (as the limits are).
async fn answer<B: hyper::body::Body>(
    state: &AppState,
    req: &Request<B>,
    log: &mut AccessLog,
    ids: &RequestIds,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let _permit = admit(state, req, log)?;
    let key = route(state, req, log)?;
    refuse_body(log)?;
    let caller = authenticate(state, req.headers(), log).await?;
    caller.authorize(&key)?;
    let directives = directives(req.headers());
    limit_requests(state, &caller).await?;
    // The paths past a memory hit are boxed: their futures (Graph, the shared tier)
    // would otherwise be part of, and copied with, every request's future.
    let lookup = match state.cache.cached(&key, directives) {
        Some(hit) => hit,
        None => match graph_budget(state, &caller, &key, directives).await {
            None => Box::pin(lookup(state, &key, directives, log)).await?,
            Some(spent) => Box::pin(without_graph(state, &caller, &key, directives, spent)).await?,
        },
    };
    Ok(respond(state, req, &key, &lookup, log, ids))
}

/// Admission: not draining, a concurrency permit (held until the answer is built), sane
/// framing, headers within their limits, a path worth routing.
fn admit<B: hyper::body::Body>(
    state: &AppState,
    req: &Request<B>,
    log: &mut AccessLog,
) -> Result<OwnedSemaphorePermit, ProxyError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ProxyError::Draining);
    }
    let permit = state
        .limit
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let headers = req.headers();
    // Whatever the answer, a body we do not read means the connection cannot be reused.
    // (HTTP/2 may send DATA without announcing a length: the stream is not at its end.)
    log.close = has_body(headers) || !req.body().is_end_stream();
    if let Some(why) = bad_framing(req) {
        return Err(ProxyError::InvalidRequest(why));
    }
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > state.max_headers || header_bytes > state.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    if req.uri().path().len() > MAX_PATH_BYTES {
        return Err(ProxyError::UriTooLong);
    }
    Ok(permit)
}

/// The session (or list) the request names, in the configured API version for
/// `/sessions/...` paths.
fn route<B>(
    state: &AppState,
    req: &Request<B>,
    log: &mut AccessLog,
) -> Result<SessionKey, ProxyError> {
    let mut key = routes::route(req.method(), req.uri().path(), req.uri().query())?;
    if log.style == Style::Proxy {
        key = key.with_version(state.api_version);
    }
    log.kind = Some(key.kind.as_str());
    log.list = key.is_list();
    Ok(key)
}

/// A routed GET or HEAD that announced a body is refused (after routing, so a wrong path
/// still answers 404 or 405).
fn refuse_body(log: &AccessLog) -> Result<(), ProxyError> {
    if log.close {
        return Err(ProxyError::InvalidRequest(
            "GET and HEAD requests must not have a body",
        ));
    }
    Ok(())
}

/// Who is calling (authorization against the key is [`Caller::authorize`]).
async fn authenticate(
    state: &AppState,
    headers: &http::HeaderMap,
    log: &mut AccessLog,
) -> Result<Arc<Caller>, ProxyError> {
    let caller = state.callers.authenticate(headers).await?;
    log.caller = Some(caller.name.clone());
    log.metric_caller = Some(caller.metric_label());
    Ok(caller)
}

/// The caller's request rate: every request is charged (over it: 429 and nothing else
/// happens).
async fn limit_requests(state: &AppState, caller: &Caller) -> Result<(), ProxyError> {
    state.limits.request(caller).await.map_err(|refusal| {
        state.limits.count_refusal(caller, refusal.limit);
        ProxyError::RateLimited(refusal)
    })
}

/// The caller's Graph budget, for a request memory cannot serve: one that would start a
/// Graph call is charged; one that joins a call in progress (or meets a remembered
/// failure) is not. Answers the refusal when the budget is spent: the request may then
/// use only the cache.
async fn graph_budget(
    state: &AppState,
    caller: &Caller,
    key: &SessionKey,
    directives: Directives,
) -> Option<Refusal> {
    if !state.limits.has_graph_budget(caller) || !state.cache.would_call_graph(key, directives) {
        return None;
    }
    state.limits.graph_call(caller).await.err()
}

/// The answer for a caller whose Graph budget is spent: whatever the cache can serve
/// without Graph (fresh here or in the shared tier, or stale within `stale_if_error`),
/// else 429.
async fn without_graph(
    state: &AppState,
    caller: &Caller,
    key: &SessionKey,
    directives: Directives,
    spent: Refusal,
) -> Result<Lookup, ProxyError> {
    state
        .cache
        .get_without_graph(key, directives)
        .await
        .ok_or_else(|| {
            state.limits.count_refusal(caller, spent.limit);
            ProxyError::RateLimited(spent)
        })
}

/// The cache's answer within the request timeout; when Graph hangs past it, a stale copy
/// (stale-if-error) still beats a timeout.
async fn lookup(
    state: &AppState,
    key: &SessionKey,
    directives: Directives,
    log: &mut AccessLog,
) -> Result<Lookup, ProxyError> {
    match tokio::time::timeout(state.request_timeout, state.cache.get(key, directives)).await {
        Ok(Ok(lookup)) => Ok(lookup),
        Ok(Err(error)) => {
            if !matches!(error, CacheError::NotCached) {
                log.cache = Some(MISS_STATUS);
            }
            Err(error.into())
        }
        Err(_elapsed) => match state.cache.stale_if_error(key) {
            Some(lookup) => Ok(lookup),
            None => {
                log.cache = Some(MISS_STATUS);
                Err(ProxyError::Upstream(Arc::new(UpstreamError::Timeout)))
            }
        },
    }
}

/// The served lookup as an answer: the body in the request's contract (Graph-style
/// callers get Graph's bytes exactly as sent, envelope and all), a 404 for what Graph
/// does not have, a 304 for a matching `If-None-Match`; with Cache-Status, Age, ETag.
fn respond<B>(
    state: &AppState,
    req: &Request<B>,
    key: &SessionKey,
    lookup: &Lookup,
    log: &mut AccessLog,
    ids: &RequestIds,
) -> Response<Full<Bytes>> {
    let now = state.cache.now();
    let cache_status = lookup.cache_status(now);
    log.cache = Some(cache_status.clone());
    log.outcome = Some(lookup.outcome);
    let headers = req.headers();
    let entry = &lookup.entry;
    // Over HTTP/1 the id may be a slice of the entry's buffer: it is written and dropped.
    // HTTP/2's HPACK table keeps the header values it indexes (`etag` it never does) for
    // as long as the connection lives: a slice would keep the whole entry, evicted or not,
    // outside `cache.max_bytes`. It gets a copy of its own.
    log.graph_request_id = entry.graph_request_id().map(|id| match req.version() {
        http::Version::HTTP_2 | http::Version::HTTP_3 => {
            HeaderValue::from_bytes(id.as_bytes()).unwrap_or(id)
        }
        _ => id,
    });
    let (body, etag) = match log.style {
        Style::Proxy => (entry.body(), entry.etag()),
        Style::Graph => (entry.has_body().then(|| entry.raw()), entry.raw_etag()),
    };
    let (request_id, client_request_id) = (ids.request_id(), ids.client_request_id());
    let mut response = match body {
        None if key.is_list() => {
            ProxyError::EventNotFound.to_response_in(log.style, request_id, client_request_id)
        }
        None => {
            ProxyError::SessionNotFound.to_response_in(log.style, request_id, client_request_id)
        }
        Some(body) if !if_none_match(headers, &etag) => {
            let mut response = Response::new(Full::new(body));
            response.headers_mut().insert(CONTENT_TYPE, JSON);
            response
        }
        Some(_) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        }
    };
    let out = response.headers_mut();
    out.insert(CACHE_STATUS, cache_status);
    out.insert(AGE, HeaderValue::from(entry.age(now)));
    if entry.has_body() {
        out.insert(ETAG, etag);
    }
    if let Some(id) = log.graph_request_id.clone() {
        out.insert(X_GRAPH_REQUEST_ID, id);
    }
    response
}

/// The one rescue: a refusal or failure as its JSON error, logged by who is at fault.
fn fail(error: &ProxyError, log: &mut AccessLog, ids: &RequestIds) -> Response<Full<Bytes>> {
    let request_id = ids.request_id();
    let status = error.status();
    log.code = Some(error.code());
    if status.is_server_error() {
        tracing::warn!(request_id, error = %error, cause = %Causes(error), "request failed");
    } else {
        tracing::debug!(request_id, error = %error, "request refused");
    }
    let mut response = error.to_response_in(log.style, request_id, ids.client_request_id());
    if log.close {
        // The unread body would otherwise be taken for the next request.
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(cache) = &log.cache {
        response.headers_mut().insert(CACHE_STATUS, cache.clone());
    }
    response
}

/// Graph-style answers name the call as Graph does: `request-id`, `client-request-id`.
fn graph_ids(response: &mut Response<Full<Bytes>>, style: Style, ids: &RequestIds) {
    if style == Style::Graph {
        let headers = response.headers_mut();
        headers.insert(REQUEST_ID, ids.request_id.clone());
        headers.insert(CLIENT_REQUEST_ID, ids.client_request_id.clone());
    }
}

/// Request-target and `Host` forms this origin server refuses: an absolute-form target
/// with another scheme than http(s) or with userinfo, repeated `Host` headers, and an
/// HTTP/1.1 request without one (RFC 9112 3.2; HTTP/1.0 may omit it, and HTTP/2 carries
/// `:authority` instead).
fn bad_framing<B>(req: &Request<B>) -> Option<&'static str> {
    let uri = req.uri();
    if uri
        .scheme_str()
        .is_some_and(|s| !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https"))
    {
        return Some("only http and https request targets are accepted");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some("request targets must not carry userinfo");
    }
    if req
        .headers()
        .get_all(http::header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return Some("more than one Host header");
    }
    if req.version() == http::Version::HTTP_11 && !req.headers().contains_key(http::header::HOST) {
        return Some("HTTP/1.1 requests must carry a Host header");
    }
    None
}

/// A GET or HEAD that announces a body is refused rather than half-read.
fn has_body(headers: &http::HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().map(|s| s.trim() != "0").unwrap_or(true))
}

/// `Cache-Control` request directives (and the old `Pragma: no-cache`).
fn directives(headers: &http::HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            let is = |name: &str| directive.eq_ignore_ascii_case(name);
            if is("no-cache") || is("max-age=0") {
                d.no_cache = true;
            } else if is("only-if-cached") {
                d.only_if_cached = true;
            } else if is("max-stale") {
                d.max_stale = Some(Duration::MAX);
            } else if let Some(secs) = directive
                .get(..10)
                .filter(|p| p.eq_ignore_ascii_case("max-stale="))
                .and_then(|_| directive.get(10..))
            {
                if let Ok(secs) = secs.trim_matches('"').parse::<u64>() {
                    d.max_stale = Some(Duration::from_secs(secs));
                }
            }
        }
    }
    if headers
        .get(PRAGMA)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("no-cache"))
        && !headers.contains_key(CACHE_CONTROL)
    {
        d.no_cache = true;
    }
    d
}

/// `If-None-Match` with weak comparison (RFC 9110 13.1.2): `*` or any listed tag.
fn if_none_match(headers: &http::HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers.get_all(IF_NONE_MATCH).iter().any(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',').any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cache_control_directives() {
        assert!(directives(&headers(&[("cache-control", "No-Cache")])).no_cache);
        assert!(directives(&headers(&[("cache-control", "max-age=0")])).no_cache);
        assert!(
            directives(&headers(&[("cache-control", "public, only-if-cached")])).only_if_cached
        );
        assert!(directives(&headers(&[("pragma", "no-cache")])).no_cache);
        assert!(!directives(&headers(&[("cache-control", "max-age=60")])).no_cache);
        assert_eq!(
            directives(&headers(&[("cache-control", "max-stale=120")])).max_stale,
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            directives(&headers(&[("cache-control", "max-stale")])).max_stale,
            Some(Duration::MAX)
        );
        assert_eq!(
            directives(&headers(&[("cache-control", "max-stale=soon")])).max_stale,
            None
        );
    }

    #[test]
    fn if_none_match_lists() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(if_none_match(
            &headers(&[("if-none-match", "\"x\", \"abc\"")]),
            &etag
        ));
        assert!(if_none_match(
            &headers(&[("if-none-match", "W/\"abc\"")]),
            &etag
        ));
        assert!(if_none_match(&headers(&[("if-none-match", "*")]), &etag));
        assert!(!if_none_match(
            &headers(&[("if-none-match", "\"abcd\"")]),
            &etag
        ));
        assert!(!if_none_match(&headers(&[]), &etag));
    }

    #[test]
    fn bodies_on_get_are_detected() {
        assert!(has_body(&headers(&[("content-length", "5")])));
        assert!(has_body(&headers(&[("transfer-encoding", "chunked")])));
        assert!(!has_body(&headers(&[("content-length", "0")])));
        assert!(!has_body(&headers(&[])));
    }
}
