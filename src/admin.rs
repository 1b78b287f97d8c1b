//! The admin listener: liveness, readiness and cache purges. Bound to loopback by
//! default; nothing here ever calls Graph.

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

use crate::error::error_response;
use crate::routes::{self, SessionKey};
use crate::server::AppState;
use crate::telemetry::names;

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
        async move { Ok::<_, Infallible>(handle(&state, req.method(), req.uri().path())) }
    })
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub fn handle(state: &AppState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            json_response(StatusCode::OK, json!({"status": "ok"}))
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.ready.load(Ordering::SeqCst) {
                json_response(StatusCode::OK, json!({"status": "ready"}))
            } else if state.draining.load(Ordering::SeqCst) {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "draining"}),
                )
            } else {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "starting"}),
                )
            }
        }
        (&Method::GET, "/metrics") => metrics(state),
        (&Method::DELETE, "/cache") => {
            state
                .metrics
                .counter(names::PURGES, &[("scope", "all")])
                .increment(1);
            state.cache.purge_all();
            tracing::info!("purged the whole cache");
            json_response(StatusCode::OK, json!({"purged": "all"}))
        }
        (&Method::DELETE, p) if p.starts_with("/cache/sessions/") => {
            let session_path = &p["/cache".len()..];
            match routes::route(&Method::GET, session_path, None) {
                Ok(key) => purge_one(state, &key),
                Err(e) => e.to_response(""),
            }
        }
        (_, "/healthz" | "/readyz") => {
            let mut r = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "methodNotAllowed",
                "only GET and HEAD",
                "",
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => error_response(StatusCode::NOT_FOUND, "notFound", "no such admin route", ""),
    }
}

/// Prometheus text; gauges that are cheaper to read than to maintain are set here.
fn metrics(state: &AppState) -> Response<Full<Bytes>> {
    let m = &state.metrics;
    let (entries, bytes) = state.cache.usage();
    m.gauge(names::CACHE_ENTRIES, &[]).set(entries as f64);
    m.gauge(names::CACHE_BYTES, &[]).set(bytes as f64);
    let expiry = state.tokens.remaining().unwrap_or_default();
    m.gauge(names::TOKEN_EXPIRY, &[]).set(expiry.as_secs_f64());
    let gate = state.cache.graph().gate.describe(state.cache.now());
    for s in ["open", "probing", "throttled", "circuit_open"] {
        m.gauge(names::GATE_STATE, &[("state", s)])
            .set(if s == gate { 1.0 } else { 0.0 });
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

fn purge_one(state: &AppState, key: &SessionKey) -> Response<Full<Bytes>> {
    state
        .metrics
        .counter(names::PURGES, &[("scope", "session")])
        .increment(1);
    let was_cached = state.cache.purge(key);
    tracing::info!(%key, was_cached, "purged a session");
    json_response(
        StatusCode::OK,
        json!({"purged": key.to_string(), "wasCached": was_cached}),
    )
}
