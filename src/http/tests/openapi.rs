//! `GET /openapi.json` on the admin listener: the embedded docs/openapi.yaml as JSON.

use super::*;
use crate::http::admin;

async fn admin_answer(
    state: &AppState,
    method: http::Method,
) -> (StatusCode, http::HeaderMap, Bytes) {
    admin_at(state, method, "/openapi.json").await
}

async fn admin_at(
    state: &AppState,
    method: http::Method,
    path: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("x-request-id", "rid-1")
        .body(Full::<Bytes>::default())
        .unwrap();
    let (parts, body) = admin::handle(state, &req).await.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn openapi_json_is_the_yaml_document() {
    let (state, _) = state(Graph::Found);
    let (status, headers, body) = admin_answer(&state, http::Method::GET).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-request-id"], "rid-1");
    let served: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let version = served["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "{version}");
    let written: serde_json::Value = serde_yaml_ng::from_str(crate::http::openapi::YAML).unwrap();
    assert_eq!(served, written);
    // Both listeners' routes are in it.
    for path in [
        "/sessions/{kind}/{event}/{session}",
        "/healthz",
        "/openapi.json",
        "/status.json",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path}");
    }

    let (status, headers, _) = admin_answer(&state, http::Method::HEAD).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let (status, headers, body) = admin_answer(&state, http::Method::POST).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, HEAD");
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "methodNotAllowed");
}

/// What `.ci/openapi`'s schemathesis run found: `HEAD /metrics` was a 405 whose own
/// `Allow` named HEAD, and another method than DELETE on a purge path was a 404.
#[tokio::test]
async fn admin_methods_agree_with_allow() {
    let (state, _) = state(Graph::Found);
    let (status, headers, _) = admin_at(&state, http::Method::HEAD, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for path in [
        "/cache",
        "/cache/sessions/webinars/a/b",
        "/cache/events/webinars/a",
    ] {
        for method in [http::Method::GET, http::Method::POST, http::Method::TRACE] {
            let (status, headers, body) = admin_at(&state, method.clone(), path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(headers["allow"], "DELETE");
            let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(error["error"]["code"], "methodNotAllowed");
            assert_eq!(error["error"]["requestId"], "rid-1");
        }
    }
}
