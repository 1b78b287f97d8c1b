//! Several replicas sharing one real `redis-server` (`[cache.shared]`): tier-2 hits,
//! one Graph call between replicas, a shared throttle gate, purges that reach every
//! replica, and Redis failures that no caller notices.

mod common;

use std::time::{Duration, Instant};

use common::*;
use graph_session_proxy::config::SharedSettings;
use graph_session_proxy::sim::{Faults, SimConfig};

async fn harness(redis: &RedisServer, tweak: impl FnOnce(&mut SharedSettings)) -> Harness {
    harness_with(redis, tweak, |_| {}).await
}

async fn harness_with(
    redis: &RedisServer,
    tweak: impl FnOnce(&mut SharedSettings),
    tweak_all: impl FnOnce(&mut graph_session_proxy::config::Settings),
) -> Harness {
    let url = redis.url();
    Harness::with(
        move |s| {
            tweak_all(s);
            // Generous Redis timeouts: CI machines are noisy, and a step that times out
            // makes a replica go it alone (a second Graph call) by design.
            let mut shared = SharedSettings {
                redis_url: Some(url.into()),
                retry_interval: Duration::from_millis(200),
                timeout: Duration::from_secs(2),
                ..SharedSettings::default()
            };
            tweak(&mut shared);
            s.cache.shared = Some(shared);
        },
        SimConfig::default(),
    )
    .await
}

async fn get(h: &Harness, url: &str, extra: Option<(&str, &str)>) -> reqwest::Response {
    let mut request = h.http.get(url).bearer_auth(API_KEY);
    if let Some((name, value)) = extra {
        request = request.header(name, value);
    }
    request.send().await.unwrap()
}

/// Tokens (and a first entry) for each replica, so that the Graph traffic a test counts
/// afterwards is its own.
async fn warm<const N: usize>(h: &Harness, urls: [String; N]) {
    for url in urls {
        assert_eq!(get(h, &url, None).await.status(), 200, "{url}");
    }
}

/// Until `n` replicas follow the purge channel.
async fn wait_for_subscribers(redis: &RedisServer, n: i64) {
    let mut conn = redis.connection().await;
    for _ in 0..300 {
        let (_, count): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("gsp:purge")
            .query_async(&mut conn)
            .await
            .unwrap();
        if count >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} replicas subscribed to purges");
}

#[tokio::test]
async fn three_replicas_make_one_graph_call_for_300_concurrent_first_gets() {
    let redis = RedisServer::start();
    let h = harness(&redis, |_| {}).await;
    let b = h.another_instance().await;
    let c = h.another_instance().await;
    h.faults(Faults {
        graph_latency_ms: 300,
        ..Faults::default()
    });
    let urls = [
        h.url("webinars", "shared-event", "gen-stampede"),
        b.url("webinars", "shared-event", "gen-stampede"),
        c.url("webinars", "shared-event", "gen-stampede"),
    ];
    let requests = (0..300).map(|i| {
        let url = urls[i % 3].clone();
        let h = &h;
        async move {
            let r = get(h, &url, None).await;
            (r.status(), cache_status(&r), r.bytes().await.unwrap())
        }
    });
    let answers = futures::future::join_all(requests).await;
    let stats = h.stats();
    assert_eq!(stats.graph_requests, 1, "{stats:?}");
    let first = &answers[0].2;
    for (status, cache, body) in &answers {
        assert_eq!(*status, 200, "{cache}");
        assert_eq!(body, first);
    }
    let tier2 = answers
        .iter()
        .filter(|a| a.1.contains("detail=tier2"))
        .count();
    assert!(
        tier2 >= 200,
        "replicas B and C got it from Redis: {tier2} tier-2 answers"
    );
}

#[tokio::test]
async fn a_session_fetched_through_a_is_a_tier2_hit_on_b_with_a_truthful_age() {
    let redis = RedisServer::start();
    let h = harness(&redis, |_| {}).await;
    let b = h.another_instance().await;
    let first = get(&h, &h.url("townhalls", "ev", "gen-t2"), None).await;
    assert!(cache_status(&first).contains("fwd=miss"));
    let body = first.bytes().await.unwrap();
    h.clock.advance(Duration::from_secs(100));
    let on_b = get(&h, &b.url("townhalls", "ev", "gen-t2"), None).await;
    assert_eq!(on_b.status(), 200);
    let status = cache_status(&on_b);
    assert!(status.contains("; hit; ttl=200; detail=tier2"), "{status}");
    assert_eq!(on_b.headers()["age"], "100");
    assert_eq!(on_b.bytes().await.unwrap(), body);
    // Now in B's memory: a plain hit.
    let again = get(&h, &b.url("townhalls", "ev", "gen-t2"), None).await;
    assert!(cache_status(&again).contains("; hit; ttl=200"), "{again:?}");
    assert!(!cache_status(&again).contains("tier2"));
    // Lists and 404s are shared too.
    let list = format!("http://{}/sessions/webinars/gen-list-3", h.proxy);
    assert_eq!(get(&h, &list, None).await.status(), 200);
    let list_b = get(
        &h,
        &format!("http://{}/sessions/webinars/gen-list-3", b.proxy),
        None,
    )
    .await;
    assert!(cache_status(&list_b).contains("detail=tier2"));
    assert_eq!(
        get(&h, &h.url("webinars", "ev", "missing"), None)
            .await
            .status(),
        404
    );
    let missing_b = get(&h, &b.url("webinars", "ev", "missing"), None).await;
    assert_eq!(missing_b.status(), 404);
    assert!(cache_status(&missing_b).contains("detail=tier2"));
    assert_eq!(h.stats().graph_requests, 3, "{:?}", h.stats());
    let m = metrics(&h, b.admin).await;
    assert!(m.contains("graph_session_proxy_shared_up 1"), "{m}");
    assert!(
        m.contains("graph_session_proxy_shared_lookups_total{result=\"hit\"} 3"),
        "{m}"
    );
}

#[tokio::test]
async fn a_429_seen_by_a_keeps_b_and_c_away_from_graph_until_retry_after() {
    let redis = RedisServer::start();
    // No retries: A answers the 429 at once instead of waiting it out.
    let h = harness_with(&redis, |_| {}, |s| s.graph.max_retries = 0).await;
    let b = h.another_instance().await;
    let c = h.another_instance().await;
    // Tokens first, so the only Graph traffic below is what the gate lets through.
    warm(
        &h,
        [
            h.url("webinars", "ev", "gen-warm-a"),
            b.url("webinars", "ev", "gen-warm-b"),
            c.url("webinars", "ev", "gen-warm-c"),
        ],
    )
    .await;
    // The gate lives in Redis for Retry-After of Redis's own (real) time: 2 s here.
    h.faults(Faults {
        graph_status: Some(429),
        graph_status_count: Some(1),
        retry_after: Some("2".into()),
        ..Faults::default()
    });
    let throttled_at = Instant::now();
    let throttled = get(&h, &h.url("webinars", "ev", "gen-429-a"), None).await;
    assert_eq!(throttled.status(), 503);
    let before = h.stats().graph_requests;
    assert_eq!(before, 4);
    let mut conn = redis.connection().await;
    let gate: Option<String> = redis::cmd("GET")
        .arg("gsp:gate")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gate.as_deref(), Some("throttled"), "published");
    for url in [
        b.url("webinars", "ev", "gen-429-b"),
        c.url("townhalls", "other", "gen-429-c"),
        b.url("webinars", "ev2", "gen-429-d"),
    ] {
        let r = get(&h, &url, None).await;
        assert_eq!(r.status(), 503, "{url}");
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (1..=2).contains(&retry_after),
            "{url}: Retry-After {retry_after}"
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "upstreamThrottled");
    }
    assert_eq!(h.stats().graph_requests, before, "B and C kept away");
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(throttled_at.elapsed())).await;
    assert_eq!(
        get(&h, &b.url("webinars", "ev", "gen-429-b"), None)
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&h, &c.url("townhalls", "other", "gen-429-c"), None)
            .await
            .status(),
        200
    );
    assert_eq!(h.stats().graph_requests, before + 2);
}

#[tokio::test]
async fn a_purge_through_b_leaves_the_memory_of_a_and_c() {
    let redis = RedisServer::start();
    let h = harness(&redis, |_| {}).await;
    let b = h.another_instance().await;
    let c = h.another_instance().await;
    let path =
        |proxy: std::net::SocketAddr| format!("http://{proxy}/sessions/webinars/ev/gen-purge");
    for proxy in [h.proxy, b.proxy, c.proxy] {
        assert_eq!(get(&h, &path(proxy), None).await.status(), 200);
    }
    assert_eq!(h.stats().graph_requests, 1);
    for proxy in [h.proxy, c.proxy] {
        let r = get(&h, &path(proxy), Some(("cache-control", "only-if-cached"))).await;
        assert_eq!(r.status(), 200, "cached everywhere before the purge");
    }
    wait_for_subscribers(&redis, 3).await;
    let r = h
        .http
        .delete(format!(
            "http://{}/cache/sessions/webinars/ev/gen-purge",
            b.admin
        ))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["shared"], true, "{v}");
    for proxy in [h.proxy, c.proxy] {
        let mut gone = false;
        for _ in 0..200 {
            let r = get(&h, &path(proxy), Some(("cache-control", "only-if-cached"))).await;
            if r.status() == 504 {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "{proxy} still has the purged session in memory");
    }
    // And Redis no longer has it: the next read asks Graph.
    let r = get(&h, &path(c.proxy), None).await;
    assert!(cache_status(&r).contains("fwd=miss"), "{r:?}");
    assert_eq!(h.stats().graph_requests, 2);
}

#[tokio::test]
async fn redis_stopped_mid_load_is_invisible_and_sharing_resumes_when_it_returns() {
    let mut redis = RedisServer::start();
    let h = harness(&redis, |_| {}).await;
    let b = h.another_instance().await;
    let proxies = [h.proxy, b.proxy];
    let mut statuses = Vec::new();
    for round in 0..3 {
        if round == 1 {
            redis.stop();
        }
        let requests = (0..100).map(|i| {
            let url = format!(
                "http://{}/sessions/webinars/ev/gen-load-{round}-{}",
                proxies[i % 2],
                i / 2
            );
            let h = &h;
            async move { get(h, &url, None).await.status() }
        });
        statuses.extend(futures::future::join_all(requests).await);
    }
    assert_eq!(statuses.len(), 300);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let m = metrics(&h, h.admin).await;
    assert!(m.contains("graph_session_proxy_shared_up 0"), "{m}");
    assert!(m.contains("graph_session_proxy_shared_errors_total"), "{m}");

    redis.resume();
    let started = Instant::now();
    let mut resumed = false;
    for i in 0..100 {
        let url = |proxy| format!("http://{proxy}/sessions/webinars/ev/gen-back-{i}");
        assert_eq!(get(&h, &url(h.proxy), None).await.status(), 200);
        let on_b = get(&h, &url(b.proxy), None).await;
        assert_eq!(on_b.status(), 200);
        if cache_status(&on_b).contains("detail=tier2") {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        resumed,
        "sharing did not resume within {:?}",
        started.elapsed()
    );
    let m = metrics(&h, h.admin).await;
    assert!(m.contains("graph_session_proxy_shared_up 1"), "{m}");
}

#[tokio::test]
async fn a_slow_redis_costs_callers_at_most_its_timeout() {
    let redis = RedisServer::start();
    let h = harness(&redis, |s| s.timeout = Duration::from_millis(100)).await;
    assert_eq!(
        get(&h, &h.url("webinars", "ev", "gen-warm"), None)
            .await
            .status(),
        200
    );
    let mut conn = redis.connection().await;
    let sleeper = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(1.5)
            .query_async(&mut conn)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = get(&h, &h.url("webinars", "ev", "gen-while-slow"), None).await;
    assert_eq!(r.status(), 200);
    let m = metrics(&h, h.admin).await;
    assert!(
        m.contains("graph_session_proxy_shared_errors_total{op=\"lookup\"} 1"),
        "the slow step was cut off at the timeout: {m}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "took {:?} while Redis slept 1.5 s",
        started.elapsed()
    );
    sleeper.await.unwrap();
}

#[tokio::test]
async fn a_dead_lock_holder_blocks_the_others_only_until_the_lock_expires() {
    let redis = RedisServer::start();
    let h = harness(&redis, |_| {}).await;
    // A replica that took the lock and died: nobody will release it. (Redis expires keys
    // in real time, so this test waits for real, briefly.)
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg("gsp:lock:webinars:ev:v1.0:s:gen-orphan")
        .arg("dead-replica")
        .arg("PX")
        .arg(700)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let r = get(&h, &h.url("webinars", "ev", "gen-orphan"), None).await;
    assert_eq!(r.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn bodies_over_max_body_bytes_stay_in_memory() {
    let redis = RedisServer::start();
    let h = harness(&redis, |s| s.max_body_bytes = bytesize::ByteSize::b(200)).await;
    let b = h.another_instance().await;
    assert_eq!(
        get(&h, &h.url("webinars", "ev", "gen-big"), None)
            .await
            .status(),
        200
    );
    let on_b = get(&h, &b.url("webinars", "ev", "gen-big"), None).await;
    assert!(cache_status(&on_b).contains("fwd=miss"), "{on_b:?}");
    assert_eq!(h.stats().graph_requests, 2);
    let m = metrics(&h, h.admin).await;
    assert!(
        m.contains("graph_session_proxy_shared_skipped_total{reason=\"too_large\"} 1"),
        "{m}"
    );
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gsp:e:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn rediss_with_a_private_ca_is_shared_like_plain_redis() {
    let redis = RedisServer::start_tls();
    let ca = redis.dir.join("redis.crt");
    let h = harness(&redis, |s| s.ca_pem = Some(std::fs::read(&ca).unwrap())).await;
    let b = h.another_instance().await;
    assert_eq!(
        get(&h, &h.url("webinars", "ev", "gen-tls"), None)
            .await
            .status(),
        200
    );
    let on_b = get(&h, &b.url("webinars", "ev", "gen-tls"), None).await;
    assert!(cache_status(&on_b).contains("detail=tier2"), "{on_b:?}");
    assert_eq!(h.stats().graph_requests, 1);
    // Without the CA the certificate is not trusted: memory and Graph only, callers fine.
    let untrusting = harness(&redis, |_| {}).await;
    let r = get(
        &untrusting,
        &untrusting.url("webinars", "ev", "gen-tls"),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(cache_status(&r).contains("fwd=miss"), "{r:?}");
    let m = metrics(&untrusting, untrusting.admin).await;
    assert!(m.contains("graph_session_proxy_shared_up 0"), "{m}");
}

#[tokio::test]
async fn a_full_redis_is_invisible_to_callers() {
    let redis = RedisServer::start_with(
        &["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"],
        false,
    );
    let h = harness(&redis, |_| {}).await;
    let b = h.another_instance().await;
    // Redis full before the first caller: every write (lock, entry) is refused with OOM.
    let mut conn = redis.connection().await;
    let filler = "x".repeat(64 * 1024);
    for i in 0..200 {
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler-{i}"))
            .arg(&filler)
            .query_async(&mut conn)
            .await;
        if stored.is_err() {
            break;
        }
    }
    // Every answer stays 200.
    let requests = (0..200).map(|i| {
        let url = if i % 2 == 0 {
            h.url("webinars", "ev", &format!("gen-full-{i}"))
        } else {
            b.url("webinars", "ev", &format!("gen-full-{i}"))
        };
        let h = &h;
        async move { get(h, &url, None).await.status() }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let m = metrics(&h, h.admin).await;
    assert!(
        m.contains("graph_session_proxy_shared_errors_total{op="),
        "steps refused by a full Redis are counted: {m}"
    );
}

#[tokio::test]
async fn the_password_may_come_apart_from_the_url() {
    let redis = RedisServer::start();
    let bare = format!("redis://127.0.0.1:{}/0", redis.port);
    let password = redis.password.clone();
    let h = harness(&redis, move |s| {
        s.redis_url = Some(bare.into());
        s.password = Some(password.into());
    })
    .await;
    let b = h.another_instance().await;
    assert_eq!(
        get(&h, &h.url("webinars", "ev", "gen-pw"), None)
            .await
            .status(),
        200
    );
    let on_b = get(&h, &b.url("webinars", "ev", "gen-pw"), None).await;
    assert!(cache_status(&on_b).contains("detail=tier2"), "{on_b:?}");
}

#[tokio::test]
async fn a_published_gate_closes_graph_for_its_keys_life_whatever_the_clocks() {
    let redis = RedisServer::start();
    let h = harness(&redis, |_| {}).await;
    warm(&h, [h.url("webinars", "ev", "gen-warm")]).await;
    // The gate's only clock is Redis's: a key that lives 700 ms closes Graph for 700 ms,
    // on replicas whose clocks are far ahead (moved a day forward here) or behind.
    h.clock.advance(Duration::from_secs(86_400));
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg("gsp:gate")
        .arg("throttled")
        .arg("PX")
        .arg(700)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = get(&h, &h.url("webinars", "ev", "gen-skew-1"), None).await;
    assert_eq!(r.status(), 503);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_after <= 1,
        "closed for the key's life only: {retry_after}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = get(&h, &h.url("webinars", "ev", "gen-skew-2"), None).await;
    assert_eq!(r.status(), 200, "{:?}", r.headers().get("retry-after"));
}

#[tokio::test]
async fn a_slow_graph_keeps_the_lock_with_its_holder() {
    let redis = RedisServer::start();
    let h = harness(&redis, |s| s.lock_ttl = Duration::from_millis(300)).await;
    let b = h.another_instance().await;
    warm(
        &h,
        [
            h.url("webinars", "ev", "gen-w1"),
            b.url("webinars", "ev", "gen-w2"),
        ],
    )
    .await;
    let before = h.stats().graph_requests;
    h.faults(Faults {
        graph_latency_ms: 1500,
        ..Faults::default()
    });
    let slow_on_a = h.url("webinars", "ev", "gen-slow");
    let (on_a, on_b) = tokio::join!(get(&h, &slow_on_a, None), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        get(&h, &b.url("webinars", "ev", "gen-slow"), None).await
    });
    assert_eq!(on_a.status(), 200);
    assert_eq!(on_b.status(), 200);
    assert!(cache_status(&on_b).contains("detail=tier2"), "{on_b:?}");
    assert_eq!(
        h.stats().graph_requests - before,
        1,
        "the lock (300 ms) outlived a 1.5 s Graph call by renewal"
    );
}

#[tokio::test]
async fn replicas_do_not_queue_behind_a_holder_that_could_not_share() {
    let redis = RedisServer::start();
    let h = harness(&redis, |s| s.max_body_bytes = bytesize::ByteSize::b(100)).await;
    let b = h.another_instance().await;
    let c = h.another_instance().await;
    warm(
        &h,
        [
            h.url("webinars", "ev", "gen-a"),
            b.url("webinars", "ev", "gen-b"),
            c.url("webinars", "ev", "gen-c"),
        ],
    )
    .await;
    h.faults(Faults {
        graph_latency_ms: 500,
        ..Faults::default()
    });
    let started = Instant::now();
    let timed = |url: String| {
        let h = &h;
        async move {
            let r = get(h, &url, None).await;
            (r.status(), started.elapsed())
        }
    };
    let results = futures::future::join_all([
        timed(h.url("webinars", "ev", "gen-big")),
        timed(b.url("webinars", "ev", "gen-big")),
        timed(c.url("webinars", "ev", "gen-big")),
    ])
    .await;
    assert!(results.iter().all(|r| r.0 == 200), "{results:?}");
    let slowest = results.iter().map(|r| r.1).max().unwrap();
    // One holder's call, then the others at once: about 2 Graph latencies, not 3.
    assert!(slowest < Duration::from_millis(1400), "{results:?}");
}

#[tokio::test]
async fn a_429_is_shared_while_its_replica_still_waits_out_retry_after() {
    let redis = RedisServer::start();
    let h = harness(&redis, |_| {}).await;
    let b = h.another_instance().await;
    warm(
        &h,
        [
            h.url("webinars", "ev", "gen-w1"),
            b.url("webinars", "ev", "gen-w2"),
        ],
    )
    .await;
    h.faults(Faults {
        graph_status: Some(429),
        graph_status_count: Some(1),
        retry_after: Some("2".into()),
        ..Faults::default()
    });
    let before = h.stats().graph_requests;
    let throttled_on_a = h.url("webinars", "ev", "gen-thr-a");
    let (on_a, on_b) = tokio::join!(get(&h, &throttled_on_a, None), async {
        // A got the 429 and sleeps 2 s before its retry; B asks meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
        get(&h, &b.url("townhalls", "other", "gen-thr-b"), None).await
    });
    assert_eq!(on_a.status(), 200, "A's retry after 2 s succeeds");
    assert_eq!(on_b.status(), 503, "B stays away while A waits");
    assert_eq!(
        h.stats().graph_requests - before,
        2,
        "the 429 and A's retry only"
    );
}

#[tokio::test]
async fn two_replicas_enforce_one_graph_budget_and_redis_stopping_fails_no_caller() {
    let mut redis = RedisServer::start();
    let h = harness_with(&redis, |_| {}, |s| s.limits.graph_per_minute = 60).await;
    let b = h.another_instance().await;
    let proxies = [h.proxy, b.proxy];
    let started = Instant::now();
    let before = h.stats().graph_requests;
    let mut statuses = Vec::new();
    for batch in 0..6 {
        let requests = (0..50).map(|i| {
            let url = format!(
                "http://{}/sessions/webinars/ev/gen-budget-{batch}-{i}",
                proxies[i % 2]
            );
            let h = &h;
            async move { get(h, &url, None).await }
        });
        for response in futures::future::join_all(requests).await {
            let status = response.status().as_u16();
            if status == 429 {
                assert!(response.headers().contains_key("retry-after"));
                assert_eq!(
                    response.headers()["ratelimit-policy"],
                    "\"graph\";q=60;w=60"
                );
            }
            statuses.push(status);
        }
    }
    let calls = h.stats().graph_requests - before;
    // 60 a minute (one a second) plus the burst of 10, for both replicas together.
    let allowed = 10 + started.elapsed().as_secs() + 1;
    assert!(calls <= allowed, "{calls} Graph calls, at most {allowed}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 200).count() as u64, calls);

    // Redis gone: each replica decides on its own; nobody gets anything but the limits.
    redis.stop();
    let requests = (0..60).map(|i| {
        let url = format!(
            "http://{}/sessions/webinars/ev/gen-no-redis-{i}",
            proxies[i % 2]
        );
        let h = &h;
        async move { get(h, &url, None).await.status().as_u16() }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&200),
        "the local buckets still admit: {statuses:?}"
    );
}

#[tokio::test]
async fn a_spent_graph_budget_still_gets_what_another_replica_stored() {
    let redis = RedisServer::start();
    let h = harness_with(
        &redis,
        |_| {},
        |s| {
            s.limits.graph_per_minute = 6;
            s.limits.graph_burst = 1;
        },
    )
    .await;
    let b = h.another_instance().await;
    let stored = |proxy| format!("http://{proxy}/sessions/webinars/ev/gen-budget-shared");
    let before = h.stats().graph_requests;
    // The one call the budget allows, through A: stored in Redis too.
    assert_eq!(get(&h, &stored(h.proxy), None).await.status(), 200);
    let other = format!("http://{}/sessions/webinars/ev/gen-budget-other", b.proxy);
    let refused = get(&h, &other, None).await;
    assert_eq!(refused.status(), 429, "the budget is one for both replicas");
    // Not in B's memory, but in Redis: servable without Graph, so not refused.
    for extra in [None, Some(("cache-control", "no-cache"))] {
        let r = get(&h, &stored(b.proxy), extra).await;
        assert_eq!(r.status(), 200, "{extra:?}: {}", cache_status(&r));
        assert_eq!(
            r.json::<serde_json::Value>().await.unwrap()["id"],
            "gen-budget-shared"
        );
    }
    assert_eq!(h.stats().graph_requests - before, 1);
}
