//! Never fail a caller who could have been served: stale windows, refresh-ahead,
//! Retry-After and the throttle gate, the circuit breaker, identity outages.
//! Time moves through the shared test clock; nothing sleeps for long.

mod common;

use std::time::Duration;

use common::*;
use graph_session_proxy::sim::{Faults, SimConfig};

fn status_of(r: &reqwest::Response) -> String {
    r.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Polls (bounded) until the simulator has seen `n` Graph requests.
#[tokio::test]
async fn graph_503_after_ttl_serves_stale_if_error_to_every_caller() {
    let h = Harness::start().await;
    let url = h.url("webinars", SEED_EVENT, "gen-sie");
    let body = h.get(&url).await.bytes().await.unwrap();
    h.faults(Faults {
        graph_status: Some(503),
        ..Faults::default()
    });
    // Past ttl (5m) and stale_while_revalidate (1m), within stale_if_error (1h).
    h.clock.advance(Duration::from_secs(400));
    let real = std::time::Instant::now();
    for i in 0..100 {
        let r = h.get(&url).await;
        assert_eq!(r.status(), 200, "request {i}");
        let cs = status_of(&r);
        assert!(
            cs.contains("fwd=stale") && cs.contains("detail=stale-if-error"),
            "{cs}"
        );
        assert!(cs.contains("ttl=-"), "{cs}");
        let age: u64 = r.headers()["age"].to_str().unwrap().parse().unwrap();
        // 400 s, plus 0.5 s per ten requests, plus the real time the loop took.
        let most = 406 + real.elapsed().as_secs();
        assert!((400..=most).contains(&age), "{age} > {most}");
        assert_eq!(r.bytes().await.unwrap(), body);
        if i % 10 == 0 {
            h.clock.advance(Duration::from_millis(500));
        }
    }
    // A key that was never cached gets a JSON 5xx.
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-never")).await;
    assert!(
        [502, 503, 504].contains(&r.status().as_u16()),
        "{}",
        r.status()
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        ["upstreamError", "upstreamUnavailable", "upstreamTimeout"]
            .contains(&v["error"]["code"].as_str().unwrap()),
        "{v}"
    );
    // Far fewer Graph calls than requests: failure memory and the circuit protect Graph.
    assert!(
        h.stats().graph_requests < 30,
        "{:?}",
        h.stats().graph_requests
    );
}

#[tokio::test]
async fn graph_and_token_endpoint_down_for_a_minute() {
    let h = Harness::with(
        |s| {
            s.cache.ttl = Duration::from_secs(10);
            s.cache.stale_while_revalidate = Duration::from_secs(5);
        },
        SimConfig {
            token_lifetime: Duration::from_secs(20),
            ..SimConfig::default()
        },
    )
    .await;
    let keys: Vec<String> = (0..5)
        .map(|i| h.url("townhalls", TOWNHALL_EVENT, &format!("gen-outage-{i}")))
        .collect();
    for key in &keys {
        assert_eq!(h.get(key).await.status(), 200);
    }
    h.faults(Faults {
        graph_reset: true,
        token_down: true,
        ..Faults::default()
    });
    // A minute of simulated time, a second at a time: the cached keys go stale, the token
    // expires, Graph and the token endpoint fail throughout; every answer is a 200.
    for second in 0..60 {
        h.clock.advance(Duration::from_secs(1));
        for key in &keys {
            let r = h.get(key).await;
            assert_eq!(r.status(), 200, "second {second}: {}", status_of(&r));
        }
    }
    // Graph and the identity platform come back, with a changed session.
    h.faults(Faults::default());
    let changed = br#"{"id":"gen-outage-0","subject":"Moved to room 2"}"#;
    h.sim
        .put_session("townhalls", TOWNHALL_EVENT, "gen-outage-0", &changed[..]);
    let mut updated = false;
    for _ in 0..100 {
        h.clock.advance(Duration::from_secs(1));
        let r = h.get(&keys[0]).await;
        assert_eq!(r.status(), 200);
        if r.bytes().await.unwrap() == changed[..] {
            updated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        updated,
        "the refresh after the outage stores Graph's new body"
    );
}

#[tokio::test]
async fn retry_after_30_stops_all_graph_calls_for_30_seconds() {
    let h = Harness::start().await;
    h.faults(Faults {
        graph_status: Some(429),
        graph_status_count: Some(1),
        retry_after: Some("30".into()),
        ..Faults::default()
    });
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-429-first")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "30");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstreamThrottled");
    assert_eq!(h.stats().graph_requests, 1);

    // Load on many keys, for the whole 30 s: not one Graph request.
    for step in 0..6 {
        let mut tasks = Vec::new();
        for i in 0..50 {
            let http = h.http.clone();
            let url = h.url("webinars", SEED_EVENT, &format!("gen-429-{step}-{i}"));
            tasks.push(tokio::spawn(async move {
                let r = http.get(&url).bearer_auth(API_KEY).send().await.unwrap();
                (r.status().as_u16(), r.headers().get("retry-after").cloned())
            }));
        }
        for t in tasks {
            let (status, retry_after) = t.await.unwrap();
            assert_eq!(status, 503);
            let left: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
            let most = (30.0 - step as f64 * 4.5).ceil() as u64;
            assert!(
                left <= most && left >= 1,
                "Retry-After {left} at {}s",
                step as f64 * 4.5
            );
        }
        assert_eq!(h.stats().graph_requests, 1, "at {}s", step as f64 * 4.5);
        h.clock.advance(Duration::from_millis(4500));
    }
    // 27 s (plus the little real time the test took): still closed.
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-429-late"))
            .await
            .status(),
        503
    );
    assert_eq!(h.stats().graph_requests, 1);
    // After them: one request goes through, and Graph is open again.
    h.clock.advance(Duration::from_millis(3500));
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-429-after")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.stats().graph_requests, 2);
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-429-after-2"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn throttled_graph_still_serves_cached_keys() {
    let h = Harness::start().await;
    let cached = h.url("webinars", SEED_EVENT, "gen-cached-during-429");
    assert_eq!(h.get(&cached).await.status(), 200);
    h.clock.advance(Duration::from_secs(400)); // stale, past stale_while_revalidate
    h.faults(Faults {
        graph_status: Some(429),
        retry_after: Some("60".into()),
        ..Faults::default()
    });
    let r = h.get(&cached).await;
    assert_eq!(r.status(), 200);
    assert!(status_of(&r).contains("stale-if-error"));
    let calls = h.stats().graph_requests;
    for _ in 0..20 {
        assert_eq!(h.get(&cached).await.status(), 200);
    }
    assert_eq!(
        h.stats().graph_requests,
        calls,
        "the gate is closed: no Graph calls"
    );
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_with_one_background_refresh() {
    let h = Harness::start().await;
    let url = h.url("townhalls", TOWNHALL_EVENT, "gen-swr");
    assert_eq!(h.get(&url).await.status(), 200);
    h.clock.advance(Duration::from_secs(310)); // stale by 10 s, within the 1 m window
    h.faults(Faults {
        graph_latency_ms: 1500,
        ..Faults::default()
    });
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let http = h.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = http.get(&url).bearer_auth(API_KEY).send().await.unwrap();
            let cs = status_of(&r);
            (r.status().as_u16(), cs, started.elapsed())
        }));
    }
    for t in tasks {
        let (status, cs, took) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            cs.contains("fwd=stale") && cs.contains("detail=stale-while-revalidate"),
            "{cs}"
        );
        assert!(
            took < Duration::from_millis(1500),
            "a stale answer waited for Graph: {took:?}"
        );
    }
    h.wait_for_graph_requests(2).await;
    // Let the one refresh finish, then check nobody started a second one.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(
        h.stats().graph_requests,
        2,
        "exactly one background refresh"
    );
    let r = h.get(&url).await;
    assert!(status_of(&r).contains("; hit;"), "{}", status_of(&r));
}

#[tokio::test]
async fn a_hot_key_never_misses_after_the_first_request() {
    let h = Harness::with(
        |s| {
            s.cache.ttl = Duration::from_secs(10);
            s.cache.refresh_ahead = 0.5;
        },
        SimConfig::default(),
    )
    .await;
    let url = h.url("webinars", SEED_EVENT, "gen-hot");
    let first = h.get(&url).await;
    assert!(status_of(&first).contains("fwd=miss"));
    // Read continuously for 60 s of simulated time: six ttl periods.
    for i in 0..240 {
        h.clock.advance(Duration::from_millis(250));
        let r = h.get(&url).await;
        assert_eq!(r.status(), 200);
        let cs = status_of(&r);
        assert!(cs.contains("; hit;"), "read {i}: {cs}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let calls = h.stats().graph_requests;
    assert!(
        (6..=14).contains(&calls),
        "about one refresh per half ttl, got {calls}"
    );
}

#[tokio::test]
async fn no_cache_revalidations_are_coalesced() {
    let h = Harness::start().await;
    let url = h.seed_url();
    assert_eq!(h.get(&url).await.status(), 200);
    h.faults(Faults {
        graph_latency_ms: 300,
        ..Faults::default()
    });
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let http = h.http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            http.get(&url)
                .bearer_auth(API_KEY)
                .header("cache-control", "no-cache")
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        h.stats().graph_requests,
        2,
        "one miss, one shared revalidation"
    );
}

#[tokio::test]
async fn max_stale_and_only_if_cached() {
    let h = Harness::start().await;
    let url = h.url("webinars", SEED_EVENT, "gen-max-stale");
    assert_eq!(h.get(&url).await.status(), 200);
    h.faults(Faults {
        graph_reset: true,
        ..Faults::default()
    });
    h.clock.advance(Duration::from_secs(300 + 120)); // stale by 120 s
    let get = |cc: &'static str| {
        h.http
            .get(&url)
            .bearer_auth(API_KEY)
            .header("cache-control", cc)
            .send()
    };
    let r = get("max-stale=600").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        status_of(&r).contains("detail=max-stale"),
        "{}",
        status_of(&r)
    );
    let r = get("only-if-cached").await.unwrap();
    assert_eq!(r.status(), 504, "stale and not accepted: {}", status_of(&r));
    let r = get("only-if-cached, max-stale=600").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = get("only-if-cached, max-stale=60").await.unwrap();
    assert_eq!(r.status(), 504);
}

#[tokio::test]
async fn token_endpoint_outage_is_invisible_while_the_token_is_valid() {
    let h = Harness::with(
        |_| {},
        SimConfig {
            token_lifetime: Duration::from_secs(100),
            ..SimConfig::default()
        },
    )
    .await;
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-id-0"))
            .await
            .status(),
        200
    );
    h.faults(Faults {
        token_status: Some(503),
        ..Faults::default()
    });
    // Due for refresh (within the last tenth), not expired: requests keep using the token
    // while the refresh fails in the background.
    h.clock.advance(Duration::from_secs(95));
    for i in 1..20 {
        let r = h
            .get(&h.url("webinars", SEED_EVENT, &format!("gen-id-{i}")))
            .await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert!(h.stats().token_requests >= 2, "a refresh was attempted");
    // Past expiry with the endpoint still down: the expired token is never sent.
    h.clock.advance(Duration::from_secs(10));
    let before = h.stats().graph_requests;
    let r = h
        .get(&h.url("webinars", SEED_EVENT, "gen-id-expired"))
        .await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "tokenUnavailable");
    assert_eq!(
        h.stats().graph_requests,
        before,
        "no Graph call without a valid token"
    );
    // The endpoint recovers.
    h.faults(Faults::default());
    h.clock.advance(Duration::from_secs(2));
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-id-back"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn token_endpoint_429_is_honoured() {
    let h = Harness::start().await;
    h.faults(Faults {
        token_status: Some(429),
        retry_after: Some("60".into()),
        ..Faults::default()
    });
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["retry-after"], "60");
    h.faults(Faults::default());
    for _ in 0..10 {
        h.clock.advance(Duration::from_secs(5));
        assert_eq!(h.get(&h.seed_url()).await.status(), 502);
    }
    assert_eq!(
        h.stats().token_requests,
        1,
        "no token request before Retry-After has passed"
    );
    h.clock.advance(Duration::from_secs(11));
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    assert_eq!(h.stats().token_requests, 2);
}

#[tokio::test]
async fn circuit_opens_after_consecutive_failures_and_probes() {
    let h = Harness::with(
        |s| {
            s.graph.max_retries = 0;
            s.graph.circuit_failures = 3;
            s.graph.circuit_cooldown = Duration::from_secs(20);
            s.cache.failure_ttl = Duration::ZERO;
        },
        SimConfig::default(),
    )
    .await;
    h.faults(Faults {
        graph_status: Some(500),
        ..Faults::default()
    });
    for i in 0..3 {
        assert_eq!(
            h.get(&h.url("webinars", SEED_EVENT, &format!("gen-cb-{i}")))
                .await
                .status(),
            502
        );
    }
    assert_eq!(h.stats().graph_requests, 3);
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-cb-open")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "20");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstreamUnavailable");
    assert_eq!(h.stats().graph_requests, 3, "open circuit: no call");
    h.faults(Faults::default());
    h.clock.advance(Duration::from_secs(21));
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-cb-probe"))
            .await
            .status(),
        200
    );
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-cb-after"))
            .await
            .status(),
        200
    );
    assert_eq!(h.stats().graph_requests, 5);
}

#[tokio::test]
async fn ended_sessions_stay_fresh_longer() {
    let h = Harness::start().await;
    // `gen-ended-*` sessions ended two days ago; a `gen-live-*` one is under way.
    let ended_url = h.url("webinars", SEED_EVENT, "gen-ended-1");
    assert_eq!(h.get(&ended_url).await.status(), 200);
    let live = h.url("webinars", SEED_EVENT, "gen-live");
    assert_eq!(
        h.get(&live).await.bytes().await.unwrap(),
        h.sim.generated_body("webinars", SEED_EVENT, "gen-live")
    );
    h.clock.advance(Duration::from_secs(600));
    let ended = h.get(&ended_url).await;
    assert!(
        status_of(&ended).contains("; hit;"),
        "{}",
        status_of(&ended)
    );
    let live_again = h.get(&live).await;
    assert!(
        !status_of(&live_again).contains("; hit;"),
        "{}",
        status_of(&live_again)
    );
}

#[tokio::test]
async fn a_hung_token_endpoint_times_out_and_the_proxy_recovers() {
    let h = Harness::with(
        |s| s.graph.timeout = Duration::from_secs(1),
        SimConfig::default(),
    )
    .await;
    h.faults(Faults {
        token_latency_ms: 60_000,
        ..Faults::default()
    });
    let started = std::time::Instant::now();
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "tokenUnavailable");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "bounded by graph.timeout, not the endpoint"
    );
    h.faults(Faults::default());
    h.clock.advance(Duration::from_secs(2)); // past the pause after a failed token request
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
}

#[tokio::test]
async fn a_hanging_graph_still_gets_stale_entries_served() {
    let h = Harness::with(
        |s| {
            s.server.request_timeout = Duration::from_secs(1);
            s.graph.timeout = Duration::from_secs(5);
        },
        SimConfig::default(),
    )
    .await;
    let url = h.url("webinars", SEED_EVENT, "gen-hang");
    assert_eq!(h.get(&url).await.status(), 200);
    h.clock.advance(Duration::from_secs(400)); // past ttl and stale_while_revalidate
    h.faults(Faults {
        graph_latency_ms: 3000,
        ..Faults::default()
    });
    let r = h.get(&url).await;
    assert_eq!(r.status(), 200);
    assert!(
        status_of(&r).contains("detail=stale-if-error"),
        "{}",
        status_of(&r)
    );
    // Uncached: the timeout, as JSON.
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-hang-new")).await;
    assert_eq!(r.status(), 504);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstreamTimeout");
}

#[tokio::test]
async fn an_absurd_token_lifetime_is_capped_not_trusted() {
    let h = Harness::start().await;
    h.faults(Faults {
        token_lifetime_secs: Some(u64::MAX),
        ..Faults::default()
    });
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    // Capped at a day: after it a new token is fetched.
    h.clock.advance(Duration::from_secs(25 * 3600));
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-after-a-day"))
            .await
            .status(),
        200
    );
    assert_eq!(h.stats().token_requests, 2);
}
