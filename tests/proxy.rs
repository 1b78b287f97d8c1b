//! End-to-end: the proxy in front of the simulator, over real loopback sockets.

mod common;

use std::time::Duration;

use common::*;
use graph_session_proxy::sim::{Faults, SimConfig};

#[tokio::test]
async fn thousand_sequential_gets_make_one_token_and_one_graph_request() {
    let h = Harness::start().await;
    let url = h.seed_url();
    let first = h.get(&url).await;
    assert_eq!(first.status(), 200);
    let body = first.bytes().await.unwrap();
    for _ in 1..1000 {
        let r = h.get(&url).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("; hit;"));
        assert_eq!(r.bytes().await.unwrap(), body);
    }
    let stats = h.stats();
    assert_eq!(stats.token_requests, 1, "{stats:?}");
    assert_eq!(stats.graph_requests, 1, "{stats:?}");
}

#[tokio::test]
async fn two_hundred_concurrent_misses_share_one_graph_call() {
    let h = Harness::start().await;
    h.faults(Faults {
        graph_latency_ms: 300,
        ..Faults::default()
    });
    let url = h.url("townhalls", TOWNHALL_EVENT, "gen-concurrent-1");
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let http = h.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let r = http.get(&url).bearer_auth(API_KEY).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        bodies[0],
        h.sim
            .generated_body("townhalls", TOWNHALL_EVENT, "gen-concurrent-1")
    );
    assert_eq!(h.stats().graph_requests, 1, "{:?}", h.stats());
}

#[tokio::test]
async fn a_disconnecting_caller_does_not_cancel_the_graph_call() {
    let h = Harness::start().await;
    h.faults(Faults {
        graph_latency_ms: 400,
        ..Faults::default()
    });
    let url = h.url("webinars", SEED_EVENT, "gen-disconnect");
    // Gives up long before Graph answers: the connection is dropped mid-request.
    let impatient = h
        .http
        .get(&url)
        .bearer_auth(API_KEY)
        .timeout(Duration::from_millis(50))
        .send()
        .await;
    assert!(impatient.is_err(), "the caller should have timed out");
    // Wait (bounded) until the call has finished and been stored.
    let mut cached = false;
    for _ in 0..100 {
        let r = h
            .http
            .get(&url)
            .bearer_auth(API_KEY)
            .header("cache-control", "only-if-cached")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            cached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cached, "the Graph answer was never stored");
    let r = h.get(&url).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("; hit;"));
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn tokens_are_reused_for_their_lifetime() {
    let h = Harness::with(
        |_| {},
        SimConfig {
            token_lifetime: Duration::from_secs(4),
            ..SimConfig::default()
        },
    )
    .await;
    let url = h.seed_url();
    // 60 requests that each reach Graph (no-cache), half a second of token time apart:
    // 30 s over 4 s tokens is 7.5 lifetimes.
    for _ in 0..60 {
        let r = h
            .http
            .get(&url)
            .bearer_auth(API_KEY)
            .header("cache-control", "no-cache")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=request"));
        h.clock.advance(Duration::from_millis(500));
    }
    let stats = h.stats();
    assert_eq!(stats.graph_requests, 60);
    assert!(
        (8..=12).contains(&stats.token_requests),
        "about one token per 4 s lifetime over 30 s (plus the real time the test took), got {}",
        stats.token_requests
    );
}

#[tokio::test]
async fn expires_in_as_a_string_is_accepted() {
    let h = Harness::start().await;
    h.faults(Faults {
        expires_in_as_string: true,
        ..Faults::default()
    });
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    h.clock.advance(Duration::from_secs(600));
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-2"))
            .await
            .status(),
        200
    );
    assert_eq!(h.stats().token_requests, 1);
}

#[tokio::test]
async fn a_rejected_token_is_replaced_once() {
    let h = Harness::start().await;
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    assert_eq!(h.stats().token_requests, 1);
    h.faults(Faults {
        reject_tokens: 1,
        ..Faults::default()
    });
    let r = h
        .get(&h.url("webinars", SEED_EVENT, "gen-after-reject"))
        .await;
    assert_eq!(r.status(), 200);
    let stats = h.stats();
    assert_eq!(
        stats.token_requests, 2,
        "exactly one extra token request: {stats:?}"
    );
    assert_eq!(
        stats.graph_requests, 3,
        "the rejected call and its one retry: {stats:?}"
    );
}

#[tokio::test]
async fn both_kinds_and_negative_caching() {
    let h = Harness::start().await;
    let webinar = h.get(&h.seed_url()).await;
    assert_eq!(webinar.status(), 200);
    assert_eq!(webinar.headers()["content-type"], "application/json");
    let townhall = h
        .get(&h.url("townhalls", TOWNHALL_EVENT, TOWNHALL_SESSION))
        .await;
    assert_eq!(townhall.status(), 200);

    let missing = h.url(
        "townhalls",
        TOWNHALL_EVENT,
        "6a0b1c2d-0000-0000-0000-000000000000",
    );
    let r = h.get(&missing).await;
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-graph-request-id"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "notFound");
    let before = h.stats().graph_requests;
    let again = h.get(&missing).await;
    assert_eq!(again.status(), 404);
    assert!(again.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("hit"));
    assert_eq!(
        h.stats().graph_requests,
        before,
        "a 404 within negative_ttl is not asked again"
    );
    // After negative_ttl (30 s) Graph is asked again.
    h.clock.advance(Duration::from_secs(31));
    assert_eq!(h.get(&missing).await.status(), 404);
    assert_eq!(h.stats().graph_requests, before + 1);
}

#[tokio::test]
async fn bodies_pass_through_and_envelopes_are_unwrapped() {
    let h = Harness::start().await;
    // The seed is served by the simulator as {"value": {...}}: the proxy returns the inner object.
    let seed: serde_json::Value = h.get(&h.seed_url()).await.json().await.unwrap();
    assert_eq!(seed["id"], SEED_SESSION);
    assert_eq!(seed["subject"], "Session one");
    assert!(seed.get("value").is_none());
    // A bare object is returned byte for byte.
    let url = h.url("webinars", SEED_EVENT, "gen-bytes");
    let body = h.get(&url).await.bytes().await.unwrap();
    assert_eq!(
        body,
        h.sim.generated_body("webinars", SEED_EVENT, "gen-bytes")
    );
    // Ids with @ = + reach Graph encoded as one segment each.
    let r = h.get(&h.url("webinars", "a%40b", "gen-MSpk%3D%2B")).await;
    assert_eq!(r.status(), 200);
    let paths: Vec<String> = h.stats().paths.keys().cloned().collect();
    assert!(
        paths.contains(
            &"/v1.0/solutions/virtualEvents/webinars/a%40b/sessions/gen-MSpk%3D%2B".to_string()
        ),
        "{paths:?}"
    );
}

#[tokio::test]
async fn http_contract_headers_etag_head_and_methods() {
    let h = Harness::start().await;
    let url = h.seed_url();
    let first = h.get(&url).await;
    let headers = first.headers().clone();
    assert_eq!(
        headers["cache-status"],
        "graph-session-proxy; fwd=miss; fwd-status=200; stored"
    );
    assert_eq!(headers["age"], "0");
    assert!(headers.contains_key("x-request-id"));
    assert!(headers.contains_key("x-graph-request-id"));
    let etag = headers["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.len() > 10);

    h.clock.advance(Duration::from_secs(41));
    let second = h.get(&url).await;
    assert_eq!(second.headers()["age"], "41");
    // The seed session is upcoming (the simulator dates it a week ahead): plain ttl (5m).
    assert_eq!(
        second.headers()["cache-status"],
        "graph-session-proxy; hit; ttl=259"
    );

    let not_modified = h
        .http
        .get(&url)
        .bearer_auth(API_KEY)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], etag.as_str());
    assert!(not_modified.bytes().await.unwrap().is_empty());

    let head = h.http.head(&url).bearer_auth(API_KEY).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["etag"], etag.as_str());

    let post = h.http.post(&url).bearer_auth(API_KEY).send().await.unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    let v: serde_json::Value = post.json().await.unwrap();
    assert_eq!(v["error"]["code"], "methodNotAllowed");

    let caller_id = h
        .http
        .get(&url)
        .bearer_auth(API_KEY)
        .header("x-request-id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(caller_id.headers()["x-request-id"], "trace-me-123");

    let only = h
        .http
        .get(h.url("webinars", SEED_EVENT, "gen-never-fetched"))
        .bearer_auth(API_KEY)
        .header("cache-control", "only-if-cached")
        .send()
        .await
        .unwrap();
    assert_eq!(only.status(), 504);
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn callers_must_authenticate() {
    let h = Harness::start().await;
    let url = h.seed_url();
    for request in [
        h.http.get(&url),
        h.http.get(&url).bearer_auth("wrong-key"),
        h.http.get(&url).header("x-api-key", "wrong-key"),
        h.http.get(&url).basic_auth("user", Some(API_KEY)),
    ] {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("www-authenticate"));
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthenticated");
        assert!(v["error"]["requestId"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    }
    let ok = h
        .http
        .get(&url)
        .header("x-api-key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn caller_limits_are_enforced_before_graph() {
    let h = Harness::with(
        |s| {
            s.callers.api_keys[0].kinds = Some(vec![graph_session_proxy::Kind::Townhalls]);
        },
        SimConfig::default(),
    )
    .await;
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden");
    assert_eq!(
        h.get(&h.url("townhalls", TOWNHALL_EVENT, TOWNHALL_SESSION))
            .await
            .status(),
        200
    );
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn graph_and_identity_failures_are_classified() {
    let h = Harness::start().await;
    h.faults(Faults {
        graph_status: Some(403),
        ..Faults::default()
    });
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-forbidden")).await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstreamForbidden");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Grant-CsApplicationAccessPolicy"));

    h.faults(Faults {
        graph_status: Some(500),
        ..Faults::default()
    });
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-500")).await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstreamError");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("InternalServerError"));

    // A failure is remembered briefly (cache.failure_ttl, 1 s): no new Graph call...
    h.faults(Faults::default());
    let calls = h.stats().graph_requests;
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-500"))
            .await
            .status(),
        502
    );
    assert_eq!(h.stats().graph_requests, calls);
    // ...but not cached: once that has passed and Graph has recovered, the key succeeds.
    h.clock.advance(Duration::from_secs(2));
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-500"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn transient_graph_errors_are_retried() {
    let h = Harness::start().await;
    h.faults(Faults {
        graph_status: Some(503),
        graph_status_count: Some(1),
        retry_after: Some("0.1".into()),
        ..Faults::default()
    });
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.stats().graph_requests, 2);

    h.faults(Faults {
        graph_status: Some(429),
        retry_after: Some("30".into()),
        ..Faults::default()
    });
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-throttled")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "30");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstreamThrottled");
}

#[tokio::test]
async fn wrong_client_secret_is_token_unavailable_naming_the_aadsts_code() {
    let h = Harness::with(
        |s| s.auth.client_secret = Some("not-the-secret".to_string().into()),
        SimConfig::default(),
    )
    .await;
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "tokenUnavailable");
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(!text.contains("not-the-secret"), "{text}");
    assert_eq!(h.stats().graph_requests, 0);
}

#[tokio::test]
async fn graph_down_is_an_upstream_error_and_stale_entries_are_served() {
    let h = Harness::start().await;
    let url = h.url("webinars", SEED_EVENT, "gen-kept");
    assert_eq!(h.get(&url).await.status(), 200);
    h.faults(Faults {
        graph_reset: true,
        ..Faults::default()
    });
    // Past ttl and stale_while_revalidate: Graph is asked, fails, and the stale entry is served.
    h.clock.advance(Duration::from_secs(400));
    let r = h.get(&url).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("detail=stale-if-error"));
    // Nothing cached: a JSON 502 (or, once the failures have opened the circuit, a 503
    // that says when to retry).
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-down")).await;
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    match status {
        502 => assert_eq!(v["error"]["code"], "upstreamError"),
        503 => assert_eq!(v["error"]["code"], "upstreamUnavailable"),
        other => panic!("unexpected {other}: {v}"),
    }
}

#[tokio::test]
async fn hostile_paths_never_reach_graph() {
    let h = Harness::start().await;
    let long = "a".repeat(257);
    let very_long = "b".repeat(5000);
    let targets: Vec<Vec<u8>> = [
        "/sessions/webinars/a%2Fb/c",
        "/sessions/webinars/a%2fb/c",
        "/sessions/webinars/a%252Fb/c",
        "/sessions/webinars/a%25252Fb/c",
        "/sessions/webinars/../c",
        "/sessions/webinars/./c",
        "/sessions/webinars/%2e%2e/c",
        "/sessions/webinars/%2E/c",
        "/sessions/webinars/a/..",
        "/sessions/webinars/%2e%2e%2f%2e%2e%2fusers/c",
        "/sessions/webinars/a/b?x=1",
        "/sessions/webinars/a/b?",
        "/sessions/webinars/a/b?$select=id",
        "/sessions/webinars/a%3Fx=1/b",
        "/sessions/webinars/a%23frag/b",
        "/sessions/webinars/a%00/b",
        "/sessions/webinars/a%0d%0aX-Injected:%201/b",
        "/sessions/webinars/a%09/b",
        "/sessions/webinars/a%7F/b",
        "/sessions/webinars/%C3%A9v%C3%A9nement/b",
        "/sessions/webinars/%FF%FE/b",
        "/sessions/webinars/a%5Cb/c",
        "/sessions/webinars/a\\b/c",
        "/sessions/webinars/a;b/c",
        "/sessions/webinars/a%20b/c",
        "/sessions/webinars/%/b",
        "/sessions/webinars/a%zz/b",
        &format!("/sessions/webinars/{long}/b"),
        &format!("/sessions/webinars/a/{very_long}"),
        "/sessions/meetings/a/b",
        "/sessions/Webinars/a/b",
        "/sessions/%77ebinars/a/b",
        "/sessions/webinars/a/b/",
        "/sessions/webinars/a/",
        "/sessions/webinars/a/b/c",
        "/sessions/webinars//b",
        "//sessions/webinars/a/b",
        "/sessions//webinars/a/b",
        "/sessions/webinars/a/b/../../../users",
        "/solutions/virtualEvents/webinars/a/sessions/b",
        "/v1.0/users",
        "/v1.0/solutions/virtualEvents/webinars/a/sessions/b/attendanceReports",
        "/v1.0/solutions/virtualEvents/webinars/a/sessions/%2e%2e",
        "/",
        "*",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([
        // Raw non-ASCII bytes (UTF-8 and not), raw control bytes.
        b"/sessions/webinars/\xc3\xa9/b".to_vec(),
        b"/sessions/webinars/\xff/b".to_vec(),
        b"/sessions/webinars/a\tb/c".to_vec(),
        b"/sessions/webinars/a\x7fb/c".to_vec(),
        b"/sessions/webinars/a\x00b/c".to_vec(),
        // A raw fragment on an otherwise valid, cached-able session: not silently dropped.
        format!("/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}#frag").into_bytes(),
        format!("/sessions/webinars/{SEED_EVENT}#/{SEED_SESSION}").into_bytes(),
    ])
    .collect();
    assert!(targets.len() >= 30);
    for target in &targets {
        let r = raw_get(h.proxy, target).await;
        let shown = String::from_utf8_lossy(target);
        assert!(
            (400..500).contains(&r.status),
            "{shown}: {} {}",
            r.status,
            r.head
        );
        let v = r.json();
        assert!(
            v["error"]["code"].is_string(),
            "{shown}: not a JSON error: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{shown}"
        );
    }
    let stats = h.stats();
    assert_eq!(stats.graph_requests, 0, "{stats:?}");
    assert_eq!(stats.token_requests, 0, "{stats:?}");
}

#[tokio::test]
async fn admin_health_readiness_and_purge() {
    let h = Harness::start().await;
    let admin = format!("http://{}", h.admin);
    assert_eq!(
        h.http
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        h.http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    let purge = h
        .http
        .delete(format!(
            "{admin}/cache/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 200);
    let r = h.get(&h.seed_url()).await;
    assert!(r.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("fwd=miss"));
    assert_eq!(h.stats().graph_requests, 2);
    let bad = h
        .http
        .delete(format!("{admin}/cache/sessions/webinars/a%2Fb/c"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}
