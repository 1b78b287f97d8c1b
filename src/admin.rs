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
        (&Method::DELETE, "/cache") => {
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

fn purge_one(state: &AppState, key: &SessionKey) -> Response<Full<Bytes>> {
    let was_cached = state.cache.purge(key);
    tracing::info!(%key, was_cached, "purged a session");
    json_response(
        StatusCode::OK,
        json!({"purged": key.to_string(), "wasCached": was_cached}),
    )
}
