//! Service tests of the limit phase: request rates and Graph budgets per caller.

use super::*;

fn calls(origin: &FakeOrigin) -> usize {
    origin.calls.load(Ordering::SeqCst)
}

fn session(n: usize) -> String {
    format!("/sessions/webinars/ev1/s{n}")
}

fn no_cache(path: &str) -> Request<Full<Bytes>> {
    get(path)
        .header("cache-control", "no-cache")
        .body(Full::default())
        .unwrap()
}

/// A GET by the "towns" caller.
fn as_towns(path: &str) -> Request<Full<Bytes>> {
    let mut req = get(path).body(Full::default()).unwrap();
    req.headers_mut()
        .insert("x-api-key", http::HeaderValue::from_static("town-key"));
    req
}

/// A 429 `rateLimited` with `Retry-After` and both draft fields for `policy`.
fn assert_limited(answer: &Answer, policy: &str) {
    answer.assert_error(429, "rateLimited");
    let retry: u64 = answer.header("retry-after").parse().unwrap();
    assert!(retry >= 1, "{retry}");
    assert_eq!(answer.header("ratelimit-policy"), policy);
    let name = policy.split(';').next().unwrap();
    assert_eq!(answer.header("ratelimit"), format!("{name};r=0;t={retry}"));
}

#[tokio::test(start_paused = true)]
async fn a_graph_budget_bounds_graph_calls_and_spares_other_callers() {
    let (state, origin) = state_with(Graph::Found, "", "graph_per_minute = 60");
    let (mut answered, mut refused, mut others) = (0, 0, 0);
    // 500 distinct uncached ids over one minute; another caller reads uncached
    // sessions meanwhile.
    for n in 0..500 {
        let answer = send_get(&state, &session(n)).await;
        if answer.status == 200 {
            answered += 1;
        } else {
            assert_limited(&answer, "\"graph\";q=60;w=60");
            refused += 1;
        }
        if n % 50 == 0 {
            let other = send(&state, as_towns(&format!("/sessions/townhalls/ev1/t{n}"))).await;
            assert_eq!(other.status, 200, "{}", other.body);
            others += 1;
        }
        tokio::time::advance(Duration::from_millis(119)).await;
    }
    // 60 a minute plus the burst of 10 (graph_per_minute / 6).
    assert!(answered <= 70, "{answered} answered");
    assert!(answered >= 60, "{answered} answered");
    assert_eq!(answered + refused, 500);
    assert_eq!(calls(&origin), answered + others);
    let metrics = state.metrics.render();
    assert!(
        metrics.contains(&format!(
            "graph_session_proxy_rate_limited_total{{caller=\"full\",limit=\"graph\"}} {refused}"
        )),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn hits_are_never_refused_by_the_graph_budget() {
    let (state, origin) = state_with(Graph::Found, "", "graph_per_minute = 60");
    assert_eq!(send_get(&state, SESSION).await.status, 200);
    for _ in 0..10_000 {
        let hit = send_get(&state, SESSION).await;
        assert_eq!(hit.status, 200);
    }
    assert_eq!(calls(&origin), 1);
    // 100 no-cache reads: Graph is asked while the budget lasts (the rest of the
    // burst of 10), then the cached copy answers as if no revalidation was asked.
    for _ in 0..100 {
        let answer = send(&state, no_cache(SESSION)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert!(calls(&origin) <= 10, "{} Graph calls", calls(&origin));
    let last = send(&state, no_cache(SESSION)).await;
    assert!(
        last.header("cache-status").contains("; hit;"),
        "{:?}",
        last.headers
    );
}

#[tokio::test(start_paused = true)]
async fn over_budget_a_stale_copy_within_stale_if_error_is_served() {
    let (state, origin) = state_with(
        Graph::Found,
        "[cache]\nttl = \"2s\"\nstale_while_revalidate = \"1s\"\nrefresh_ahead = 0.0",
        "graph_per_minute = 1",
    );
    assert_eq!(send_get(&state, SESSION).await.status, 200);
    tokio::time::advance(Duration::from_secs(4)).await;
    let stale = send_get(&state, SESSION).await;
    assert_eq!(stale.status, 200, "{}", stale.body);
    assert!(
        stale.header("cache-status").contains("detail=graph-budget"),
        "{:?}",
        stale.headers
    );
    assert_limited(&send_get(&state, &session(2)).await, "\"graph\";q=1;w=60");
    assert_eq!(calls(&origin), 1);
    // A minute on, the budget has one more call.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(send_get(&state, &session(2)).await.status, 200);
    assert_eq!(calls(&origin), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_rate_refuses_past_the_bucket_and_resumes() {
    let (state, origin) = state_with(Graph::Found, "", "requests_per_second = 50");
    let (mut answered, mut refused) = (0, 0);
    for _ in 0..200 {
        let answer = send_get(&state, SESSION).await;
        if answer.status == 200 {
            answered += 1;
        } else {
            assert_limited(&answer, "\"requests\";q=50;w=1");
            refused += 1;
        }
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    // The bucket of 50 and the 50 that refill within the second.
    assert!((50..=101).contains(&answered), "{answered} answered");
    assert_eq!(answered + refused, 200);
    assert_eq!(calls(&origin), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(send_get(&state, SESSION).await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn a_refused_request_makes_no_graph_call_and_changes_nothing_cached() {
    let (state, origin) = state_with(Graph::Found, "", "requests_per_second = 1");
    assert_eq!(send_get(&state, SESSION).await.status, 200);
    assert_limited(&send_get(&state, &session(9)).await, "\"requests\";q=1;w=1");
    assert_limited(
        &send(&state, no_cache(SESSION)).await,
        "\"requests\";q=1;w=1",
    );
    assert_eq!(calls(&origin), 1);
    assert_eq!(state.cache.usage().0, 1);
}

#[tokio::test(start_paused = true)]
async fn the_defaults_give_each_caller_its_own_bucket() {
    let (state, _origin) = state_with(Graph::Found, "[limits]\nrequests_per_second = 1", "");
    assert_eq!(send_get(&state, SESSION).await.status, 200);
    assert_eq!(send_get(&state, SESSION).await.status, 429);
    let towns = send(&state, as_towns("/sessions/townhalls/ev1/t1")).await;
    assert_eq!(towns.status, 200, "{}", towns.body);
}

#[tokio::test(start_paused = true)]
async fn a_graph_call_is_charged_once_to_the_caller_that_starts_it() {
    // Both callers: a Graph budget of one call (the burst), none refilled within the test.
    let (state, origin) = state_with(
        Graph::Slow,
        "[limits]\ngraph_per_minute = 1",
        "graph_burst = 2",
    );
    let townhall = |n: usize| format!("/sessions/townhalls/ev1/t{n}");
    // "full" starts the call; ten more of its requests and five of "towns" join it.
    let requests = (0..16).map(|n| {
        let state = &state;
        let path = townhall(0);
        async move {
            if (1..=5).contains(&n) {
                send(state, as_towns(&path)).await
            } else {
                send_get(state, &path).await
            }
        }
    });
    for answer in futures::future::join_all(requests).await {
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert_eq!(calls(&origin), 1);
    // Joining cost "towns" nothing: its one call is still there.
    assert_eq!(send(&state, as_towns(&townhall(1))).await.status, 200);
    assert_limited(
        &send(&state, as_towns(&townhall(2))).await,
        "\"graph\";q=1;w=60",
    );
    // "full" paid once for its eleven requests: its second call is still there.
    assert_eq!(send_get(&state, &session(1)).await.status, 200);
    assert_limited(&send_get(&state, &session(2)).await, "\"graph\";q=1;w=60");
    assert_eq!(calls(&origin), 3);
}
