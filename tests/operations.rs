//! Operating the proxy: Prometheus metrics on the admin listener.

mod common;

use common::*;
use graph_session_proxy::sim::Faults;

fn parse(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn sum(scrape: &prometheus_parse::Scrape, name: &str, filter: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| filter.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.last().map(|b| b.count).unwrap_or(0.0)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn metrics_after_traffic_are_plausible() {
    let h = Harness::start().await;
    for _ in 0..1000 {
        assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    }
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-metrics"))
            .await
            .status(),
        200
    );
    assert_eq!(h.http.get(h.seed_url()).send().await.unwrap().status(), 401);
    assert_eq!(h.get(&h.url("webinars", "a%2Fb", "c")).await.status(), 400);
    h.faults(Faults {
        graph_status: Some(429),
        retry_after: Some("30".into()),
        ..Faults::default()
    });
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-throttled"))
            .await
            .status(),
        503
    );

    let response = h
        .http
        .get(format!("http://{}/metrics", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let scrape = parse(&text);

    let requests = "graph_session_proxy_requests_total";
    let total = sum(&scrape, requests, &[]);
    assert_eq!(total, 1004.0, "{text}");
    let hits = sum(&scrape, requests, &[("cache", "hit")]);
    let misses = sum(&scrape, requests, &[("cache", "miss")]);
    let refused = sum(&scrape, requests, &[("cache", "none")]);
    assert_eq!(hits, 999.0);
    assert_eq!(misses, 3.0, "two stored misses and one throttled miss");
    assert_eq!(hits + misses + refused, total);
    assert_eq!(sum(&scrape, requests, &[("code", "unauthenticated")]), 1.0);
    assert_eq!(sum(&scrape, requests, &[("code", "invalidRequest")]), 1.0);
    assert_eq!(
        sum(&scrape, requests, &[("code", "upstreamThrottled")]),
        1.0
    );
    assert_eq!(
        sum(&scrape, requests, &[("caller", "tests"), ("status", "2xx")]),
        1001.0
    );

    assert_eq!(
        sum(
            &scrape,
            "graph_session_proxy_token_requests_total",
            &[("outcome", "ok")]
        ),
        1.0
    );
    let expiry = sum(&scrape, "graph_session_proxy_token_expiry_seconds", &[]);
    assert!(expiry > 3000.0 && expiry <= 3599.0, "{expiry}");
    assert_eq!(
        sum(
            &scrape,
            "graph_session_proxy_graph_requests_total",
            &[("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &scrape,
            "graph_session_proxy_graph_requests_total",
            &[("outcome", "throttled")]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &scrape,
            "graph_session_proxy_graph_request_duration_seconds_count",
            &[]
        ),
        3.0
    );
    assert_eq!(sum(&scrape, "graph_session_proxy_cache_entries", &[]), 2.0);
    assert!(sum(&scrape, "graph_session_proxy_cache_bytes", &[]) > 2000.0);
    assert_eq!(
        sum(
            &scrape,
            "graph_session_proxy_graph_gate_state",
            &[("state", "throttled")]
        ),
        1.0
    );
    assert_eq!(sum(&scrape, "graph_session_proxy_ready", &[]), 1.0);
    assert_eq!(
        sum(
            &scrape,
            "graph_session_proxy_request_duration_seconds_count",
            &[]
        ),
        1004.0
    );
}

#[tokio::test]
async fn purging_an_event_removes_its_sessions_and_nothing_else() {
    let h = Harness::start().await;
    let a: Vec<String> = (0..3)
        .map(|i| h.url("webinars", "event-a@tenant", &format!("gen-{i}")))
        .collect();
    let b = h.url("webinars", "event-b@tenant", "gen-0");
    let other_kind = h.url("townhalls", "event-a@tenant", "gen-0");
    for url in a.iter().chain([&b, &other_kind]) {
        assert_eq!(h.get(url).await.status(), 200);
    }
    let r = h
        .http
        .delete(format!(
            "http://{}/cache/events/webinars/event-a%40tenant",
            h.admin
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["sessions"], 3);
    for url in &a {
        let r = h.get(url).await;
        assert!(r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=miss"));
    }
    for url in [&b, &other_kind] {
        let r = h.get(url).await;
        assert!(r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("; hit;"));
    }
    let bad = h
        .http
        .delete(format!("http://{}/cache/events/webinars/a%2Fb", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn purges_need_the_admin_token_when_one_is_configured() {
    let h = Harness::with(
        |s| s.server.admin_token_sha256 = Some(sha256_hex("admin-secret-1")),
        graph_session_proxy::sim::SimConfig::default(),
    )
    .await;
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
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let refused = h
        .http
        .delete(format!("{admin}/cache"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let wrong = h
        .http
        .delete(format!("{admin}/cache"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = h
        .http
        .delete(format!("{admin}/cache"))
        .bearer_auth("admin-secret-1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn readiness_can_wait_for_the_first_token() {
    let clock_faults = Faults {
        token_status: Some(503),
        ..Faults::default()
    };
    let h = Harness::with(
        |s| s.server.ready_requires_token = true,
        graph_session_proxy::sim::SimConfig::default(),
    )
    .await;
    h.faults(clock_faults);
    let ready = format!("http://{}/readyz", h.admin);
    // The first attempt may already have failed or be under way: not ready either way.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(h.http.get(&ready).send().await.unwrap().status(), 503);
    h.faults(Faults::default());
    h.clock.advance(std::time::Duration::from_secs(2));
    let mut became_ready = false;
    for _ in 0..100 {
        if h.http.get(&ready).send().await.unwrap().status() == 200 {
            became_ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(became_ready);
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn load_beyond_the_limit_is_shed_at_once() {
    let h = Harness::with(
        |s| s.server.max_concurrent_requests = 10,
        graph_session_proxy::sim::SimConfig::default(),
    )
    .await;
    h.faults(Faults {
        graph_latency_ms: 1000,
        ..Faults::default()
    });
    // Five bursts of 100: every burst serves 10 and sheds 90 at once; memory (RSS of this
    // whole test process) does not grow from burst to burst, since nothing queues.
    let mut rss_after = Vec::new();
    for burst in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let http = h.http.clone();
            let url = h.url("webinars", SEED_EVENT, &format!("gen-shed-{burst}-{i}"));
            tasks.push(tokio::spawn(async move {
                let started = std::time::Instant::now();
                let r = http.get(&url).bearer_auth(API_KEY).send().await.unwrap();
                let status = r.status().as_u16();
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                (
                    status,
                    v["error"]["code"].as_str().map(str::to_string),
                    started.elapsed(),
                )
            }));
        }
        let mut served = 0;
        let mut shed = 0;
        for t in tasks {
            let (status, code, took) = t.await.unwrap();
            match status {
                200 => served += 1,
                503 => {
                    assert_eq!(code.as_deref(), Some("overloaded"));
                    assert!(
                        took < std::time::Duration::from_millis(900),
                        "shed after {took:?}: it waited"
                    );
                    shed += 1;
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!((served, shed), (10, 90), "burst {burst}");
        rss_after.push(rss_kib());
    }
    // Allow allocator noise, not growth per burst.
    let growth = rss_after[4].saturating_sub(rss_after[1]);
    assert!(
        growth < 8 * 1024,
        "RSS grew {growth} KiB over three bursts: {rss_after:?}"
    );
}

#[tokio::test]
async fn shutdown_drains_fifty_requests_and_reports_draining() {
    let mut h = Harness::start().await;
    h.faults(Faults {
        graph_latency_ms: 800,
        ..Faults::default()
    });
    let mut tasks = Vec::new();
    for i in 0..50 {
        let http = h.http.clone();
        let url = h.url("webinars", SEED_EVENT, &format!("gen-drain-{i}"));
        tasks.push(tokio::spawn(async move {
            http.get(&url)
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    h.stop();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let ready = reqwest::Client::new()
        .get(format!("http://{}/readyz", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "draining");
    assert!(
        tokio::net::TcpStream::connect(h.proxy).await.is_err(),
        "no new caller connections"
    );
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    tokio::time::timeout(std::time::Duration::from_secs(5), h.done.take().unwrap())
        .await
        .unwrap()
        .unwrap();
}

/// With a wrong secret the pod stays out of rotation, and `/readyz` says why with the
/// token error's caller-safe text (the AADSTS code), never the secret.
#[tokio::test]
async fn readiness_says_why_there_is_no_token() {
    let h = Harness::with(
        |s| {
            s.server.ready_requires_token = true;
            s.auth.client_secret = Some("a-wrong-secret-7f3e".to_string().into());
        },
        graph_session_proxy::sim::SimConfig::default(),
    )
    .await;
    let ready = format!("http://{}/readyz", h.admin);
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let answer = h.http.get(&ready).send().await.unwrap();
        assert_eq!(answer.status(), 503);
        last = answer.json().await.unwrap();
        if last["reason"]
            .as_str()
            .is_some_and(|r| r.contains("AADSTS"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(last["status"], "starting", "{last}");
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("no Graph token yet") && reason.contains("AADSTS7000215"),
        "{last}"
    );
    assert!(!reason.contains("a-wrong-secret"), "{last}");
}

/// Admin error answers carry a request id: the caller's when it is short and plain,
/// else a fresh one; always echoed as `x-request-id`.
#[tokio::test]
async fn admin_errors_carry_a_request_id() {
    let h = Harness::with(
        |s| s.server.admin_token_sha256 = Some(sha256_hex("admin-secret-2")),
        graph_session_proxy::sim::SimConfig::default(),
    )
    .await;
    let admin = format!("http://{}", h.admin);
    let long = "a".repeat(129);
    for (sent, echoed) in [
        (None, false),
        (Some("ops-1234.a_b:c-d"), true),
        (Some("not plain!"), false),
        (Some(long.as_str()), false),
    ] {
        for request in [
            h.http.delete(format!("{admin}/cache")),
            h.http.get(format!("{admin}/nowhere")),
            h.http.post(format!("{admin}/healthz")),
        ] {
            let request = match sent {
                Some(id) => request.header("x-request-id", id),
                None => request,
            };
            let answer = request.send().await.unwrap();
            assert!([401, 404, 405].contains(&answer.status().as_u16()));
            let header = answer.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_string();
            let body: serde_json::Value = answer.json().await.unwrap();
            let id = body["error"]["requestId"].as_str().unwrap();
            assert_eq!(id, header, "{body}");
            if echoed {
                assert_eq!(Some(id), sent);
            } else {
                assert!(uuid::Uuid::parse_str(id).is_ok(), "{sent:?}: {body}");
            }
        }
    }
}
