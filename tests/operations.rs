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
