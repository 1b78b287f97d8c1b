//! `GET /openapi.json` on the admin listener: the embedded docs/openapi.yaml as JSON.

use super::*;
use crate::http::admin;

async fn admin_answer(
    state: &AppState,
    method: http::Method,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri("/openapi.json")
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
