//! Graph change notifications (`[notifications]`), end to end: the simulator validates the
//! proxy's notification URL and posts to it over loopback, exactly as Graph does; time
//! moves on the shared clock.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::*;
use graph_session_proxy::config::{NotificationSettings, Settings, SharedSettings};
use graph_session_proxy::sim::{Faults, SimConfig};
use serde_json::{json, Value};

const CLIENT_STATE: &str = "notification-secret-2f7c";

fn notifications_at(s: &mut Settings, addr: SocketAddr) {
    s.notifications = Some(NotificationSettings {
        notification_url: format!("http://{addr}/notifications"),
        client_state: Some(CLIENT_STATE.to_string().into()),
        ..NotificationSettings::default()
    });
}

async fn harness() -> Harness {
    Harness::with_addr(notifications_at, SimConfig::default()).await
}

/// A proxy with notifications and a shared tier in `redis` (`another_instance()` shares both).
async fn shared_harness(redis: &RedisServer) -> Harness {
    let redis_url = redis.url();
    let h = Harness::with_addr(
        move |s, addr| {
            notifications_at(s, addr);
            s.cache.shared = Some(SharedSettings {
                redis_url: Some(redis_url.into()),
                retry_interval: Duration::from_millis(200),
                timeout: Duration::from_secs(2),
                ..SharedSettings::default()
            });
        },
        SimConfig::default(),
    )
    .await;
    h
}

/// Waits (real time, up to 5 s) for `check` to hold.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The simulator's live subscriptions.
fn subscriptions(h: &Harness) -> Vec<Value> {
    h.sim.subscriptions()
}

fn expires(sub: &Value) -> SystemTime {
    humantime::parse_rfc3339_weak(sub["expirationDateTime"].as_str().unwrap()).unwrap()
}

/// The end of the seed session's Graph path (the event id is percent-encoded on the way).
fn session_path(_event: &str, session: &str) -> String {
    format!("/sessions/{session}")
}

/// Graph calls the simulator saw whose raw path ends with `tail`.
fn calls(h: &Harness, tail: &str) -> u64 {
    h.stats()
        .paths
        .iter()
        .filter(|(p, _)| p.ends_with(tail))
        .map(|(_, n)| *n)
        .sum()
}

fn subscription_posts(h: &Harness) -> u64 {
    h.stats()
        .paths
        .get("/v1.0/subscriptions")
        .copied()
        .unwrap_or(0)
}

/// The sum of one metric's samples whose labels contain `labels`.
async fn metric(h: &Harness, admin: SocketAddr, name: &str, labels: &str) -> f64 {
    metrics(h, admin)
        .await
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn body_of(h: &Harness, url: &str) -> (Value, String) {
    let r = h.get(url).await;
    assert_eq!(r.status(), 200, "{url}");
    let status = cache_status(&r);
    (r.json().await.unwrap(), status)
}

/// Whether the seed session is served as `changed`, fresh by push, within about a second.
async fn served_pushed(h: &Harness, changed: &Value) -> bool {
    for _ in 0..50 {
        let (body, status) = body_of(h, &h.seed_url()).await;
        if body == *changed && status.contains("detail=push") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The first read of a webinar session, and the subscription it brings.
async fn subscribed(h: &Harness) -> Value {
    body_of(h, &h.seed_url()).await;
    until("a subscription", || subscriptions(h).len() == 1).await;
    let sub = subscriptions(h).remove(0);
    // The proxy learns of the 201 just after the simulator stored it.
    until("the subscription to be live in the proxy", || {
        h.stats().paths.contains_key("/v1.0/subscriptions")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    sub
}

#[tokio::test]
async fn one_subscription_per_webinar_renewed_across_three_days() {
    let h = harness().await;
    let sub = subscribed(&h).await;
    assert_eq!(
        sub["resource"],
        format!("solutions/virtualEvents/webinars/{SEED_EVENT}/sessions")
    );
    assert_eq!(sub["changeType"], "created,updated");
    assert_eq!(sub["clientState"], CLIENT_STATE);
    assert_eq!(sub["notificationUrl"], sub["lifecycleNotificationUrl"]);
    for round in 0..10 {
        for i in 0..10 {
            let url = h.url("webinars", SEED_EVENT, &format!("gen-{i}"));
            assert_eq!(h.get(&url).await.status(), 200, "round {round}");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(subscriptions(&h).len(), 1);
    assert_eq!(h.stats().subscriptions_created, 1);
    assert_eq!(subscription_posts(&h), 1);
    // Three days in steps shorter than renew_before (2h): renewed each time it is due.
    let renew_before = Duration::from_secs(2 * 3600);
    for _ in 0..(3 * 24 * 2) {
        h.clock.advance(Duration::from_secs(1800));
        // Read now and then, so the webinar is not idle.
        assert_eq!(h.get(&h.seed_url()).await.status(), 200);
        let clock = h.clock.clone();
        until("a renewal once due", || {
            let subs = h.sim.subscriptions();
            subs.len() == 1 && expires(&subs[0]) > clock.wall() + renew_before
        })
        .await;
    }
    let stats = h.stats();
    assert_eq!(stats.subscriptions_created, 1, "{stats:?}");
    assert!(stats.subscriptions_renewed >= 3, "{stats:?}");
    assert_eq!(subscriptions(&h)[0]["id"], sub["id"]);
}

#[tokio::test]
async fn a_change_is_served_within_a_second_and_kept_for_six_hours_without_graph() {
    let h = harness().await;
    subscribed(&h).await;
    let path = session_path(SEED_EVENT, SEED_SESSION);
    let (mut changed, _) = body_of(&h, &h.seed_url()).await;
    changed["title"] = json!("Moved to Thursday");
    let statuses = h
        .sim
        .change_session("webinars", SEED_EVENT, SEED_SESSION, changed.clone())
        .await;
    assert_eq!(statuses, vec![202]);
    let started = std::time::Instant::now();
    loop {
        let (body, status) = body_of(&h, &h.seed_url()).await;
        if body == changed {
            assert!(status.contains("detail=push"), "{status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the change was not served within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let graph_calls = calls(&h, &path);
    assert!(
        graph_calls >= 2,
        "the first read and the notification's refresh"
    );
    for _ in 0..12 {
        h.clock.advance(Duration::from_secs(1799));
        let (body, status) = body_of(&h, &h.seed_url()).await;
        assert_eq!(body, changed);
        assert!(
            status.contains("hit") && status.contains("detail=push"),
            "{status}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        calls(&h, &path),
        graph_calls,
        "no Graph call for the session in 6 h"
    );
}

#[tokio::test]
async fn bad_notifications_change_nothing_and_are_counted() {
    let h = harness().await;
    let sub = subscribed(&h).await;
    let id = sub["id"].as_str().unwrap().to_string();
    let (before, _) = body_of(&h, &h.seed_url()).await;
    let graph_before = h.stats().graph_requests;
    let url = format!("http://{}/notifications", h.proxy);
    let item = |subscription: &str, client_state: &str| {
        json!({"value": [{
            "subscriptionId": subscription,
            "clientState": client_state,
            "changeType": "updated",
            "resource": format!("solutions/virtualEvents/webinars/{SEED_EVENT}/sessions"),
            "resourceData": {
                "id": format!("solutions/virtualEvents/webinars/{SEED_EVENT}/sessions/{SEED_SESSION}"),
            },
        }]})
        .to_string()
    };
    let post = |body: Vec<u8>| {
        let (http, url) = (h.http.clone(), url.clone());
        async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let wrong_state = post(item(&id, "not-the-secret").into_bytes()).await;
    assert_eq!(wrong_state.status(), 202);
    // Without the secret nothing is looked up, not even whether the subscription is ours.
    let forged = post(item("5b1e0d8a-9c33-4f0e-a1c2-7d9e3b6f4a21", "guess").into_bytes()).await;
    assert_eq!(forged.status(), 202);
    let unknown =
        post(item("7f105c7d-2dc5-4530-97cd-4e7ae6534c07", CLIENT_STATE).into_bytes()).await;
    assert_eq!(unknown.status(), 202);
    let malformed = post(b"{\"value\": [".to_vec()).await;
    assert_eq!(malformed.status(), 400);
    assert_eq!(
        malformed.json::<Value>().await.unwrap()["error"]["code"],
        "invalidRequest"
    );
    let huge = post(vec![b' '; 2 << 20]).await;
    assert_eq!(huge.status(), 413);
    // Nothing on the route but POST; validation echoes the decoded token.
    let get = h.http.get(&url).send().await.unwrap();
    assert_eq!(get.status(), 405);
    let validation = h
        .http
        .post(format!(
            "{url}?validationToken=Validation%3A%20Testing%20%2B%3D"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(validation.status(), 200);
    assert!(validation.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(validation.text().await.unwrap(), "Validation: Testing +=");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.stats().graph_requests, graph_before, "no Graph call");
    let (after, status) = body_of(&h, &h.seed_url()).await;
    assert_eq!(after, before);
    assert!(
        status.contains("hit"),
        "nothing refreshed or purged: {status}"
    );
    for outcome in [
        "bad_client_state",
        "unknown_subscription",
        "malformed",
        "too_large",
    ] {
        let n = metric(
            &h,
            h.admin,
            "graph_session_proxy_notifications_total",
            &format!("outcome=\"{outcome}\""),
        )
        .await;
        let expected = if outcome == "bad_client_state" {
            2.0
        } else {
            1.0
        };
        assert_eq!(n, expected, "{outcome}");
    }
}

#[tokio::test]
async fn missed_goes_to_graph_and_removed_subscribes_again() {
    let h = harness().await;
    let sub = subscribed(&h).await;
    let id = sub["id"].as_str().unwrap().to_string();
    let path = session_path(SEED_EVENT, SEED_SESSION);
    body_of(&h, &h.seed_url()).await;
    let before = calls(&h, &path);
    assert_eq!(h.sim.lifecycle(&id, "missed").await, Some(202));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, status) = body_of(&h, &h.seed_url()).await;
    assert!(status.contains("fwd=miss"), "{status}");
    assert_eq!(calls(&h, &path), before + 1);
    assert_eq!(h.sim.lifecycle(&id, "subscriptionRemoved").await, Some(202));
    until("a new subscription", || {
        let subs = h.sim.subscriptions();
        subs.len() == 1 && subs[0]["id"] != sub["id"]
    })
    .await;
    assert_eq!(h.stats().subscriptions_created, 2);
    // Reauthorization is asked for and done.
    let new_id = subscriptions(&h)[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        h.sim.lifecycle(&new_id, "reauthorizationRequired").await,
        Some(202)
    );
    until("a reauthorization", || {
        h.stats().subscriptions_reauthorized == 1
    })
    .await;
}

#[tokio::test]
async fn a_refused_subscription_falls_back_to_ttl_polling() {
    let h = harness().await;
    h.faults(Faults {
        subscription_status: Some(403),
        ..Faults::default()
    });
    body_of(&h, &h.seed_url()).await;
    until("the refusal", || h.stats().subscription_refusals >= 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(subscriptions(&h).is_empty());
    let failed = metric(
        &h,
        h.admin,
        "graph_session_proxy_subscriptions",
        "state=\"failed\"",
    )
    .await;
    assert_eq!(failed, 1.0);
    let calls_403 = metric(
        &h,
        h.admin,
        "graph_session_proxy_subscription_calls_total",
        "outcome=\"403\"",
    )
    .await;
    assert_eq!(calls_403, 1.0);
    // Polled by cache.ttl (5 min): a refresh after it.
    let (_, status) = body_of(&h, &h.seed_url()).await;
    assert!(!status.contains("push"), "{status}");
    let path = session_path(SEED_EVENT, SEED_SESSION);
    let before = calls(&h, &path);
    h.clock.advance(Duration::from_secs(301));
    let (_, status) = body_of(&h, &h.seed_url()).await;
    assert!(status.contains("fwd="), "{status}");
    until("a poll", || calls(&h, &path) == before + 1).await;
    // Retried with backoff once the fault is gone: then pushed.
    h.faults(Faults::default());
    h.clock.advance(Duration::from_secs(600));
    until("a subscription after the backoff", || {
        subscriptions(&h).len() == 1
    })
    .await;
}

#[tokio::test]
async fn town_halls_are_polled_without_a_subscription() {
    let h = harness().await;
    let url = h.url("townhalls", TOWNHALL_EVENT, TOWNHALL_SESSION);
    for _ in 0..3 {
        assert_eq!(h.get(&url).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(subscriptions(&h).is_empty());
    assert_eq!(subscription_posts(&h), 0);
    let (_, status) = body_of(&h, &url).await;
    assert!(!status.contains("push"), "{status}");
}

#[tokio::test]
async fn two_replicas_share_one_subscription_and_a_notification_to_either_refreshes_both() {
    let redis = RedisServer::start();
    let h = shared_harness(&redis).await;
    let b = h.another_instance().await;
    let sub = subscribed(&h).await;
    let on_b = b.url("webinars", SEED_EVENT, SEED_SESSION);
    let (original, _) = body_of(&h, &on_b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.stats().subscriptions_created,
        1,
        "one subscription in total"
    );
    assert_eq!(subscriptions(&h).len(), 1);
    // The session changes at Graph; the notification reaches replica B.
    let mut changed = original.clone();
    changed["title"] = json!("Changed at Graph");
    h.sim.put_session(
        "webinars",
        SEED_EVENT,
        SEED_SESSION,
        serde_json::to_vec(&changed).unwrap(),
    );
    let notification = json!({"value": [{
        "subscriptionId": sub["id"],
        "clientState": CLIENT_STATE,
        "changeType": "updated",
        "resource": sub["resource"],
        "resourceData": {
            "@odata.type": "#microsoft.graph.virtualEventSession",
            "id": format!("solutions/virtualEvents/webinars/{SEED_EVENT}/sessions/{SEED_SESSION}"),
        },
    }]});
    let posted = h
        .http
        .post(format!("http://{}/notifications", b.proxy))
        .json(&notification)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 202);
    let started = std::time::Instant::now();
    loop {
        let (body, _) = body_of(&h, &h.seed_url()).await;
        if body == changed {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "A still serves the old body"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (on_b_now, _) = body_of(&h, &on_b).await;
    assert_eq!(on_b_now, changed);
}

/// Graph calls (sessions, lists, subscriptions) for a day of 10 sessions and their list
/// read every 5 minutes.
async fn a_day_of_reads(h: &Harness) -> u64 {
    let before = h.stats().graph_requests;
    let list = format!("http://{}/sessions/webinars/{SEED_EVENT}", h.proxy);
    for _ in 0..(24 * 12) {
        for i in 0..10 {
            let url = h.url("webinars", SEED_EVENT, &format!("gen-{i}"));
            assert_eq!(h.get(&url).await.status(), 200);
        }
        assert_eq!(h.get(&list).await.status(), 200);
        // Background refreshes and subscription steps run meanwhile.
        tokio::time::sleep(Duration::from_millis(5)).await;
        h.clock.advance(Duration::from_secs(300));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.stats().graph_requests - before
}

#[tokio::test]
async fn push_saves_graph_calls() {
    let polled = a_day_of_reads(&Harness::start().await).await;
    let pushed = a_day_of_reads(&harness().await).await;
    eprintln!("a day of 10 sessions and their list read every 5 minutes: {polled} Graph calls polled, {pushed} with change notifications");
    assert!(pushed * 10 <= polled, "polled {polled}, pushed {pushed}");
}

#[tokio::test]
async fn an_idle_webinar_is_unsubscribed() {
    let h = Harness::with_addr(
        |s, addr| {
            notifications_at(s, addr);
            s.notifications.as_mut().unwrap().idle_unsubscribe = Duration::from_secs(3600);
        },
        SimConfig::default(),
    )
    .await;
    subscribed(&h).await;
    h.clock.advance(Duration::from_secs(3601));
    until("the idle webinar unsubscribed", || {
        h.sim.subscriptions().is_empty()
    })
    .await;
    assert_eq!(h.stats().subscriptions_deleted, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let active = metric(
        &h,
        h.admin,
        "graph_session_proxy_subscriptions",
        "state=\"active\"",
    )
    .await;
    assert_eq!(active, 0.0);
}

#[tokio::test]
async fn beyond_max_subscriptions_the_least_recently_read_webinar_is_polled() {
    let h = Harness::with_addr(
        |s, addr| {
            notifications_at(s, addr);
            s.notifications.as_mut().unwrap().max_subscriptions = 1;
        },
        SimConfig::default(),
    )
    .await;
    let a = subscribed(&h).await;
    // A pushed entry for webinar A.
    let (mut changed, _) = body_of(&h, &h.seed_url()).await;
    changed["title"] = json!("Pushed");
    h.sim
        .change_session("webinars", SEED_EVENT, SEED_SESSION, changed.clone())
        .await;
    assert!(served_pushed(&h, &changed).await);
    // Webinar B, read just after A: no slot (A was read as recently).
    let b_url = h.url("webinars", "other-webinar", "gen-1");
    assert_eq!(h.get(&b_url).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(subscriptions(&h).len(), 1);
    assert_eq!(subscriptions(&h)[0]["id"], a["id"]);
    let capped = metric(
        &h,
        h.admin,
        "graph_session_proxy_subscriptions",
        "state=\"capped\"",
    )
    .await;
    assert_eq!(capped, 1.0);
    // Only B is read for two minutes: A's slot goes to B, A is polled again.
    h.clock.advance(Duration::from_secs(120));
    assert_eq!(h.get(&b_url).await.status(), 200);
    until("B subscribed instead of A", || {
        let subs = h.sim.subscriptions();
        subs.len() == 1
            && subs[0]["resource"]
                .as_str()
                .unwrap()
                .contains("other-webinar")
    })
    .await;
    assert_eq!(h.stats().subscriptions_deleted, 1);
    let (body, status) = body_of(&h, &h.seed_url()).await;
    assert_eq!(body, changed);
    assert!(
        !status.contains("push"),
        "A is fresh by cache.ttl again: {status}"
    );
}

#[tokio::test]
async fn a_lapsed_subscription_puts_pushed_entries_back_on_cache_ttl() {
    let h = Harness::with_addr(
        |s, addr| {
            notifications_at(s, addr);
            let n = s.notifications.as_mut().unwrap();
            n.lifetime = Duration::from_secs(3 * 3600);
            n.renew_before = Duration::from_secs(600);
        },
        SimConfig::default(),
    )
    .await;
    subscribed(&h).await;
    let (mut changed, _) = body_of(&h, &h.seed_url()).await;
    changed["title"] = json!("Pushed before the lapse");
    h.sim
        .change_session("webinars", SEED_EVENT, SEED_SESSION, changed.clone())
        .await;
    assert!(served_pushed(&h, &changed).await);
    // Past the subscription's end in one step (no renewal window seen): it lapsed, and the
    // entry (pushed 6h) is fresh by cache.ttl (5 min) from when it was stored: stale now.
    h.faults(Faults {
        subscription_status: Some(503),
        ..Faults::default()
    });
    h.clock.advance(Duration::from_secs(3 * 3600 + 60));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, status) = body_of(&h, &h.seed_url()).await;
    assert!(!status.contains("detail=push"), "{status}");
    assert!(!status.starts_with("graph-session-proxy; hit"), "{status}");
}

#[tokio::test]
async fn a_subscription_granted_less_than_renew_before_is_renewed_halfway_not_on_every_tick() {
    let h = harness().await;
    // Graph grants 30 minutes, whatever the proxy asks (23 h); renew_before is 2 h.
    h.faults(Faults {
        subscription_granted_secs: Some(1800),
        ..Faults::default()
    });
    let sub = subscribed(&h).await;
    assert!(expires(&sub) <= h.clock.wall() + Duration::from_secs(1800));
    // The upkeep loop looks every 250 ms: two seconds are eight looks, none a renewal.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.stats().subscriptions_renewed, 0, "{:?}", h.stats());
    // Halfway through the 30 minutes: renewed once (for another 30).
    h.clock.advance(Duration::from_secs(15 * 60 + 1));
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    until("the renewal halfway", || {
        h.stats().subscriptions_renewed == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.stats().subscriptions_renewed, 1, "{:?}", h.stats());
    let renewed = subscriptions(&h).remove(0);
    assert_eq!(renewed["id"], sub["id"]);
    assert!(expires(&renewed) > h.clock.wall() + Duration::from_secs(1700));
    assert_eq!(h.stats().subscriptions_created, 1);
}

#[tokio::test]
async fn a_subscription_record_lost_with_redis_is_written_again_not_made_twice() {
    let mut redis = RedisServer::start();
    let h = shared_harness(&redis).await;
    let b = h.another_instance().await;
    let sub = subscribed(&h).await;
    body_of(&h, &b.url("webinars", SEED_EVENT, SEED_SESSION)).await;
    let record = format!("gsp:sub:{SEED_EVENT}");
    let id_in_redis = |redis: &RedisServer| -> Option<String> {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        redis::cmd("HGET")
            .arg(&record)
            .arg("id")
            .query(&mut conn)
            .unwrap()
    };
    assert_eq!(id_in_redis(&redis).as_deref(), sub["id"].as_str());
    // Redis restarts empty (no persistence): the record is gone, the subscription lives.
    redis.stop();
    redis.resume();
    assert_eq!(id_in_redis(&redis), None);
    // A third replica, which never knew the subscription, is asked first: it may take the
    // empty record and ask Graph for one (refused: 409, one per webinar). Within a few
    // claims (every 5 s) a replica that knows the live one records it again, and renews it
    // at once to check that it still lives.
    let c = h.another_instance().await;
    body_of(&h, &c.url("webinars", SEED_EVENT, SEED_SESSION)).await;
    for _ in 0..200 {
        if id_in_redis(&redis).is_some() && h.stats().subscriptions_renewed >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(id_in_redis(&redis).as_deref(), sub["id"].as_str());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = h.stats();
    assert_eq!(
        stats.subscriptions_created, 1,
        "no second subscription: {stats:?}"
    );
    assert!(
        stats.subscriptions_renewed >= 1,
        "checked by a renewal: {stats:?}"
    );
    let renewed = stats.subscriptions_renewed;
    // And it is renewed when due, the same one.
    h.clock.advance(Duration::from_secs(21 * 3600 + 60));
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    until("the renewal", || h.stats().subscriptions_renewed > renewed).await;
    let subs = subscriptions(&h);
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0]["id"], sub["id"]);
    assert!(expires(&subs[0]) > h.clock.wall() + Duration::from_secs(20 * 3600));
}
