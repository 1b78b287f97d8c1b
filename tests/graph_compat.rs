//! The proxy as a drop-in for Graph SDKs: Graph's own session paths, Graph's bytes,
//! Graph-style errors, and nothing else of Graph reachable.

mod common;

use common::*;

/// What a Graph SDK does once its base URL points at the proxy: `{base}/solutions/...`
/// with the API key as the bearer token.
fn sdk_url(h: &Harness, version: &str, rest: &str) -> String {
    format!("http://{}/{version}{rest}", h.proxy)
}

#[tokio::test]
async fn graph_paths_serve_graphs_exact_bytes_from_the_cache() {
    let h = Harness::start().await;
    let url = sdk_url(
        &h,
        "v1.0",
        &format!("/solutions/virtualEvents/webinars/{SEED_EVENT}/sessions/{SEED_SESSION}"),
    );
    let first = h.get(&url).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("fwd=miss"));
    let body = first.bytes().await.unwrap();
    // The simulator serves the seed wrapped as {"value": {...}}, pretty-printed: the
    // Graph-compatible route passes that through untouched.
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["value"]["id"], SEED_SESSION);
    assert!(
        body.starts_with(b"{\n"),
        "byte for byte, pretty-printing included"
    );
    let second = h.get(&url).await;
    assert!(second.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("; hit;"));
    assert_eq!(second.bytes().await.unwrap(), body);
    // The proxy's own route shares the entry (and unwraps the envelope).
    let own = h.get(&h.seed_url()).await;
    assert!(own.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("; hit;"));
    let own: serde_json::Value = own.json().await.unwrap();
    assert_eq!(own["id"], SEED_SESSION);
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn v1_and_beta_are_cached_separately() {
    let h = Harness::start().await;
    let path = format!("/solutions/virtualEvents/townhalls/{TOWNHALL_EVENT}/sessions/gen-versions");
    for version in ["v1.0", "beta", "v1.0", "beta"] {
        assert_eq!(h.get(&sdk_url(&h, version, &path)).await.status(), 200);
    }
    let paths: Vec<String> = h.stats().paths.keys().cloned().collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths.iter().any(|p| p.starts_with("/beta/")));
    assert!(paths.iter().any(|p| p.starts_with("/v1.0/")));
}

#[tokio::test]
async fn other_graph_paths_are_not_supported_graph_style() {
    let h = Harness::start().await;
    let s = format!("/solutions/virtualEvents/webinars/{SEED_EVENT}");
    let others = [
        "/v1.0/me".to_string(),
        "/v1.0/users".to_string(),
        "/v1.0/users/someone@contoso.com".to_string(),
        "/v1.0/groups".to_string(),
        "/v1.0/$batch".to_string(),
        "/beta/me/events".to_string(),
        "/v1.0/solutions".to_string(),
        "/v1.0/solutions/virtualEvents".to_string(),
        "/v1.0/solutions/virtualEvents/webinars".to_string(),
        format!("/v1.0{s}"),
        format!("/v1.0{s}/registrations"),
        format!("/v1.0{s}/presenters"),
        format!("/v1.0{s}/sessions/{SEED_SESSION}/attendanceReports"),
        format!("/v1.0{s}/sessions/{SEED_SESSION}/attendanceReports/x/attendanceRecords"),
        format!("/beta{s}/sessions/{SEED_SESSION}/registrations"),
        "/v1.0/solutions/virtualEvents/events/x/sessions/y".to_string(),
        "/v1.0/solutions/virtualEvents/webinars/a/sessions/b/".to_string(),
        "/v2.0/solutions/virtualEvents/webinars/a/sessions/b".to_string(),
        "/v1.0/solutions/virtualEvents/webinars/a/sessions%2Fb".to_string(),
        "/v1.0/solutions/virtualEvents/%77ebinars/a/sessions/b".to_string(),
        "/v1.0/communications/onlineMeetings/x".to_string(),
    ];
    for path in &others {
        let r = raw_get(h.proxy, path.as_bytes()).await;
        assert!((400..500).contains(&r.status), "{path}: {}", r.head);
        let v = r.json();
        if path.starts_with("/v1.0") || path.starts_with("/beta") {
            assert!(
                v["error"]["innerError"]["request-id"].is_string(),
                "{path}: Graph-style error: {v}"
            );
        }
        assert!(v["error"]["code"].is_string(), "{path}: {v}");
    }
    let notsupported = raw_get(h.proxy, b"/v1.0/me").await;
    assert_eq!(notsupported.status, 404);
    assert_eq!(notsupported.json()["error"]["code"], "notSupported");
    let stats = h.stats();
    assert_eq!(stats.graph_requests, 0, "{stats:?}");
    assert_eq!(stats.token_requests, 0);
    // Unauthenticated on a Graph path: Graph-style 401.
    let r = h
        .http
        .get(sdk_url(&h, "v1.0", &format!("{s}/sessions/{SEED_SESSION}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthenticated");
    assert!(v["error"]["innerError"].is_object());
}
