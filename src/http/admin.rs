//! The admin listener: liveness, readiness, metrics and cache purges. Bound to loopback
//! by default; anywhere else the configuration must name an admin token, which purges
//! then require. Nothing here ever calls Graph.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tower::Service;

use crate::cache::tier2::Purge;
use crate::cache::PurgeReport;
use crate::core::http::{bearer_token, json_response};
use crate::core::request_id;
use crate::http::error::error_response;
use crate::http::routes;
use crate::http::status;
use crate::http::AppState;
use crate::telemetry::names;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub fn service(
    state: Arc<AppState>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, &req).await) }
    })
}

/// One admin request, answered with its request id (`x-request-id`, also in JSON errors).
pub async fn handle<B>(state: &AppState, req: &Request<B>) -> Response<Full<Bytes>> {
    let id = request_id(req.headers());
    let mut response = answer(state, req, &id).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID, value);
    }
    response
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The caller's `x-request-id` when [`request_id::is_usable`] keeps it (it is echoed
/// into a header, a JSON body and the logs), else a fresh one.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(X_REQUEST_ID)
        .map(HeaderValue::as_bytes)
        .filter(|id| request_id::is_usable(id))
        .and_then(|id| std::str::from_utf8(id).ok())
        .map_or_else(request_id::fresh, str::to_string)
}

/// Probes and metrics are open (kubelets and Prometheus call them); purges need the admin
/// token when one is configured.
async fn answer<B>(state: &AppState, req: &Request<B>, request_id: &str) -> Response<Full<Bytes>> {
    let (method, path) = (req.method(), req.uri().path());
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            json_response(StatusCode::OK, &json!({"status": "ok"}))
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.ready.load(Ordering::SeqCst) {
                json_response(StatusCode::OK, &json!({"status": "ready"}))
            } else if state.draining.load(Ordering::SeqCst) {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "draining"}),
                )
            } else {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "starting", "reason": state.not_ready_reason()}),
                )
            }
        }
        (&Method::GET | &Method::HEAD, "/metrics") => metrics(state),
        (&Method::GET | &Method::HEAD, "/openapi.json") => crate::http::openapi::answer(request_id),
        (&Method::GET | &Method::HEAD, "/status" | "/status.json") => {
            if !page_authorized(state, req.headers()) {
                return unauthorized(
                    "the admin token is required: Authorization: Bearer <admin token> (or, from a browser, any user name with the admin token as password)",
                    Some("Basic realm=\"graph-session-proxy-admin\", charset=\"UTF-8\""),
                    request_id,
                );
            }
            if path == "/status" {
                status::html(state)
            } else {
                status::json(state)
            }
        }
        (&Method::DELETE, p) if p == "/cache" || p.starts_with("/cache/") => {
            if !authorized(state, req.headers()) {
                return unauthorized(
                    "the admin token is required: Authorization: Bearer <admin token>",
                    None,
                    request_id,
                );
            }
            purge(state, p, request_id).await
        }
        // Purges are DELETE only: anything else on their paths is a 405, not a 404.
        (_, p) if p == "/cache" || p.starts_with("/cache/") => {
            let mut r = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "methodNotAllowed",
                "purges take DELETE only",
                request_id,
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("DELETE"));
            r
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/status" | "/status.json" | "/openapi.json") => {
            let mut r = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "methodNotAllowed",
                "only GET and HEAD",
                request_id,
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "notFound",
            "no such admin route",
            request_id,
        ),
    }
}

/// 401 with the admin realm's challenges: `Bearer`, after `first` when given.
fn unauthorized(
    message: &str,
    first: Option<&'static str>,
    request_id: &str,
) -> Response<Full<Bytes>> {
    let mut r = error_response(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        message,
        request_id,
    );
    let headers = r.headers_mut();
    if let Some(first) = first {
        headers.append(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(first),
        );
    }
    headers.append(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"graph-session-proxy-admin\""),
    );
    r
}

/// `Authorization: Bearer <admin token>`, checked against its configured SHA-256 in
/// constant time.
fn authorized(state: &AppState, headers: &http::HeaderMap) -> bool {
    let Some(expected) = &state.admin_token_sha256 else {
        return true;
    };
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer_token(v).ok());
    presented.is_some_and(|token| {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        bool::from(digest.ct_eq(expected))
    })
}

/// The status page's check: the admin token as a bearer token, or (so that a browser can
/// ask for it) as the password of HTTP Basic authentication, any user name.
fn page_authorized(state: &AppState, headers: &http::HeaderMap) -> bool {
    if authorized(state, headers) {
        return true;
    }
    let Some(expected) = &state.admin_token_sha256 else {
        return true;
    };
    let password = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|raw| {
            let colon = raw.iter().position(|b| *b == b':')?;
            Some(raw[colon + 1..].to_vec())
        });
    password.is_some_and(|password| {
        let digest: [u8; 32] = Sha256::digest(&password).into();
        bool::from(digest.ct_eq(expected))
    })
}

/// `DELETE /cache`, `/cache/sessions/{kind}/{event}[/{session}]`, `/cache/events/{kind}/{event}`.
/// How a purge went beyond this replica, for the log line: `off` without a shared tier.
fn shared_label(shared: Option<bool>) -> &'static str {
    match shared {
        None => "off",
        Some(true) => "every replica",
        Some(false) => "this replica only (Redis unavailable)",
    }
}

/// With a shared tier, the purge also leaves Redis and reaches every replica
/// (`"shared": true`), or could not (`false`: Redis unavailable; this replica is purged).
async fn purge(state: &AppState, path: &str, request_id: &str) -> Response<Full<Bytes>> {
    if path == "/cache" {
        state
            .metrics
            .counter(names::PURGES, &[("scope", "all")])
            .increment(1);
        let shared = state.cache.purge_everywhere(Purge::All).await.shared;
        tracing::info!(shared = shared_label(shared), "purged the whole cache");
        return json_response(StatusCode::OK, &json!({"purged": "all", "shared": shared}));
    }
    if let Some(rest) = path.strip_prefix("/cache/sessions/") {
        return match routes::purge_target(rest) {
            Ok(key) => {
                state
                    .metrics
                    .counter(names::PURGES, &[("scope", "session")])
                    .increment(1);
                let name = key.to_string();
                let PurgeReport {
                    was_cached, shared, ..
                } = state.cache.purge_everywhere(Purge::Key(key)).await;
                tracing::info!(
                    key = name,
                    was_cached,
                    shared = shared_label(shared),
                    "purged a session"
                );
                json_response(
                    StatusCode::OK,
                    &json!({"purged": name, "wasCached": was_cached, "shared": shared}),
                )
            }
            Err(e) => e.to_response(request_id),
        };
    }
    if let Some(rest) = path.strip_prefix("/cache/events/") {
        return match routes::event_purge_target(rest) {
            Ok(key) => {
                state
                    .metrics
                    .counter(names::PURGES, &[("scope", "event")])
                    .increment(1);
                let PurgeReport {
                    removed, shared, ..
                } = state
                    .cache
                    .purge_everywhere(Purge::Event(key.kind, key.event.to_string()))
                    .await;
                tracing::info!(kind = %key.kind, event = %key.event, removed, shared = shared_label(shared), "purged an event");
                json_response(
                    StatusCode::OK,
                    &json!({"purged": format!("{}/{}", key.kind, key.event), "sessions": removed, "shared": shared}),
                )
            }
            Err(e) => e.to_response(request_id),
        };
    }
    error_response(
        StatusCode::NOT_FOUND,
        "notFound",
        "no such admin route",
        request_id,
    )
}
/// Prometheus text; gauges that are cheaper to read than to maintain are set here.
fn metrics(state: &AppState) -> Response<Full<Bytes>> {
    let m = &state.metrics;
    let (entries, bytes) = state.cache.usage();
    m.gauge(names::CACHE_ENTRIES, &[]).set(entries as f64);
    m.gauge(names::CACHE_BYTES, &[]).set(bytes as f64);
    m.gauge(names::LIMITED_CALLERS, &[])
        .set(state.limits.tracked() as f64);
    let expiry = state.tokens.remaining().unwrap_or_default();
    m.gauge(names::TOKEN_EXPIRY, &[]).set(expiry.as_secs_f64());
    let gate = state.cache.gate().describe(state.cache.now());
    for s in ["open", "probing", "throttled", "circuit_open"] {
        m.gauge(names::GATE_STATE, &[("state", s)])
            .set(if s == gate { 1.0 } else { 0.0 });
    }
    if let Some(shared) = state.cache.shared() {
        m.gauge(names::SHARED_UP, &[])
            .set(if shared.is_up() { 1.0 } else { 0.0 });
    }
    m.gauge(names::READY, &[])
        .set(if state.ready.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        });
    let mut response = Response::new(Full::new(Bytes::from(m.render())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
