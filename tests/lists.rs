//! Session lists: `GET /sessions/{kind}/{event}` and Graph's `.../sessions`, every
//! `@odata.nextLink` page merged into one answer, cached with `cache.list_ttl`, never
//! seeding the per-session cache, and never following a next link off the allow-list.

mod common;

use std::time::Duration;

use common::*;
use graph_session_proxy::sim::{Faults, SimConfig};

fn list_url(h: &Harness, kind: &str, event: &str) -> String {
    format!("http://{}/sessions/{kind}/{event}", h.proxy)
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v["value"]
        .as_array()
        .unwrap_or_else(|| panic!("no value array: {v}"))
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn three_pages_come_back_as_one_list_cached_for_list_ttl() {
    let h = Harness::with(
        |s| {
            s.cache.list_ttl = Duration::from_secs(30);
        },
        SimConfig::default(),
    )
    .await;
    h.faults(Faults {
        list_page_size: Some(3),
        ..Faults::default()
    });
    let url = list_url(&h, "webinars", "gen-list-8");
    let first = h.get(&url).await;
    assert_eq!(first.status(), 200);
    assert!(cache_status(&first).contains("fwd=miss"), "{first:?}");
    assert!(first.headers().contains_key("etag"));
    let body = first.bytes().await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let expected: Vec<String> = (0..8).map(|i| format!("gen-{i:04}")).collect();
    assert_eq!(ids(&v), expected, "all three pages, in order, once each");
    assert!(v["@odata.context"].as_str().unwrap().contains("sessions"));
    assert!(v.get("@odata.nextLink").is_none(), "no next link to follow");
    assert!(v.get("@graphSessionProxy.truncated").is_none());
    // Summaries, as Graph sends them: the rest of the session is null.
    assert!(v["value"][0]["subject"].is_string());
    assert!(v["value"][0]["chatInfo"].is_null());

    let stats = h.stats();
    assert_eq!(stats.graph_requests, 3, "{stats:?}");
    let paths: Vec<&String> = stats.paths.keys().collect();
    assert!(paths.iter().any(|p| p.ends_with("/sessions?$skiptoken=3")));
    assert!(paths.iter().any(|p| p.ends_with("/sessions?$skiptoken=6")));

    // Within list_ttl: from memory, on both routes (the Graph one gets the same bytes).
    h.clock.advance(Duration::from_secs(20));
    let again = h.get(&url).await;
    assert!(cache_status(&again).contains("; hit;"), "{again:?}");
    assert_eq!(again.bytes().await.unwrap(), body);
    let graph_style = h
        .get(&format!(
            "http://{}/v1.0/solutions/virtualEvents/webinars/gen-list-8/sessions",
            h.proxy
        ))
        .await;
    assert!(cache_status(&graph_style).contains("; hit;"));
    assert_eq!(graph_style.bytes().await.unwrap(), body);
    assert_eq!(h.stats().graph_requests, 3);

    // List items are summaries: they never become session entries.
    let session = h.get(&h.url("webinars", "gen-list-8", "gen-0000")).await;
    assert_eq!(session.status(), 200);
    assert!(cache_status(&session).contains("fwd=miss"));
    let full: serde_json::Value = session.json().await.unwrap();
    assert!(
        full["chatInfo"].is_object(),
        "the full session, not a summary"
    );
    assert_eq!(h.stats().graph_requests, 4);

    // Past list_ttl (30 s) but well within the sessions' ttl (5 m): the list is stale and
    // refreshed (three pages again), the session is still fresh.
    h.clock.advance(Duration::from_secs(15));
    let stale = h.get(&url).await;
    assert!(cache_status(&stale).contains("fwd=stale"), "{stale:?}");
    h.wait_for_graph_requests(7).await;
    let session = h.get(&h.url("webinars", "gen-list-8", "gen-0000")).await;
    assert!(cache_status(&session).contains("; hit;"));
    assert_eq!(h.stats().graph_requests, 7);
}

#[tokio::test]
async fn a_list_longer_than_max_list_pages_is_marked_truncated() {
    let h = Harness::with(|s| s.graph.max_list_pages = 2, SimConfig::default()).await;
    h.faults(Faults {
        list_page_size: Some(2),
        ..Faults::default()
    });
    let r = h.get(&list_url(&h, "townhalls", "gen-list-9")).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(ids(&v), ["gen-0000", "gen-0001", "gen-0002", "gen-0003"]);
    assert_eq!(v["@graphSessionProxy.truncated"], true);
    assert_eq!(h.stats().graph_requests, 2);
    let metrics = metrics(&h, h.admin).await;
    assert!(
        metrics.contains("graph_session_proxy_list_truncated_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("route=\"list\""));
}

#[tokio::test]
async fn next_links_off_the_allow_list_are_never_followed() {
    let h = Harness::start().await;
    let sim = h.sim_addr;
    let hostile = [
        format!("http://{sim}/v1.0/users?$skiptoken=2"),
        format!("http://{sim}/v1.0/solutions/virtualEvents/webinars/gen-list-5/sessions/../../../../../users?$top=1"),
        format!("http://{sim}/v1.0/solutions/virtualEvents/webinars/gen-list-5/sessions/gen-0001?$skiptoken=2"),
        format!("http://{sim}/v1.0/solutions/virtualEvents/webinars/other-event/sessions?$skiptoken=2"),
        format!("http://{sim}/beta/solutions/virtualEvents/webinars/gen-list-5/sessions?$skiptoken=2"),
        "http://127.0.0.1:9/v1.0/solutions/virtualEvents/webinars/gen-list-5/sessions?$skiptoken=2".to_string(),
        format!("http://user:pw@{sim}/v1.0/solutions/virtualEvents/webinars/gen-list-5/sessions?$skiptoken=2"),
        format!("http://{sim}/v1.0/solutions/virtualEvents/webinars/gen-list-5/sessions"),
        "/v1.0/solutions/virtualEvents/webinars/gen-list-5/sessions?$skiptoken=2".to_string(),
    ];
    for (i, next_link) in hostile.iter().enumerate() {
        h.faults(Faults {
            list_page_size: Some(2),
            next_link: Some(next_link.clone()),
            ..Faults::default()
        });
        // A new event each round, so no failure memory or cache entry answers for Graph.
        let r = h
            .get(&list_url(&h, "webinars", &format!("gen-list-{}", 5 + i)))
            .await;
        assert_eq!(r.status(), 502, "{next_link}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "upstreamError", "{next_link}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("nextLink"),
            "{v}"
        );
    }
    let stats = h.stats();
    assert_eq!(
        stats.graph_requests,
        hostile.len() as u64,
        "only first pages: {stats:?}"
    );
    assert!(
        stats.paths.keys().all(|p| p.ends_with("/sessions")),
        "{stats:?}"
    );
}

#[tokio::test]
async fn unknown_events_and_bad_ids_in_lists() {
    let h = Harness::start().await;
    let r = h.get(&list_url(&h, "webinars", "no-such-event")).await;
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "notFound");
    assert!(v["error"]["message"].as_str().unwrap().contains("event"));
    // Remembered for negative_ttl.
    assert_eq!(
        h.get(&list_url(&h, "webinars", "no-such-event"))
            .await
            .status(),
        404
    );
    assert_eq!(h.stats().graph_requests, 1);
    // Graph-style on the Graph route.
    let r = h
        .get(&format!(
            "http://{}/beta/solutions/virtualEvents/webinars/no-such-event/sessions",
            h.proxy
        ))
        .await;
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"]["innerError"]["request-id"].is_string(), "{v}");
    let before = h.stats().graph_requests;
    for target in [
        "/sessions/webinars/a%2Fb",
        "/sessions/webinars/..",
        "/sessions/webinars/%2E%2E",
        "/sessions/webinars/gen-list-3?$top=1",
        "/sessions/webinars/gen-list-3/",
        "/v1.0/solutions/virtualEvents/webinars/gen-list-3/sessions?$skiptoken=3",
        "/v1.0/solutions/virtualEvents/webinars/gen-list-3/sessions/",
        "/v1.0/solutions/virtualEvents/webinars/a%2F..%2F..%2Fusers/sessions",
    ] {
        let r = raw_get(h.proxy, target.as_bytes()).await;
        assert_eq!(r.status, 400, "{target}: {}", r.head);
        assert!(r.json()["error"]["code"].is_string(), "{target}");
    }
    assert_eq!(h.stats().graph_requests, before);
}

#[tokio::test]
async fn purging_a_session_or_its_event_drops_the_list() {
    let h = Harness::start().await;
    let url = list_url(&h, "webinars", "gen-list-4");
    assert_eq!(h.get(&url).await.status(), 200);
    assert_eq!(
        h.get(&h.url("webinars", "gen-list-4", "gen-0001"))
            .await
            .status(),
        200
    );
    let r = h
        .admin_delete("/cache/sessions/webinars/gen-list-4/gen-0001")
        .await;
    assert_eq!(r.status(), 200);
    let r = h.get(&url).await;
    assert!(cache_status(&r).contains("fwd=miss"), "{r:?}");
    let r = h.admin_delete("/cache/events/webinars/gen-list-4").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["sessions"], 0,
        "the list is not counted as a session: {v}"
    );
    let r = h.get(&url).await;
    assert!(cache_status(&r).contains("fwd=miss"), "{r:?}");
    assert_eq!(h.stats().graph_requests, 4);
}
