//! Service tests of the caller handler without sockets: requests go through
//! `tower::ServiceExt::oneshot` on [`handle`], the cache fetches from a fake
//! [`Origin`] with canned answers, and `tokio::time::pause()` moves time.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::auth::callers::Callers;
use crate::cache::{Origin, SessionCache};
use crate::config::{Purpose, Settings};
use crate::core::clock::Clock;
use crate::core::model::SessionKey;
use crate::http::handler::handle;
use crate::http::AppState;
use crate::telemetry::Metrics;
use crate::upstream::error::UpstreamError;
use crate::upstream::gate::Gate;
use crate::upstream::graph::{Fetched, GraphAnswer};
use crate::upstream::token::{Credential, TokenError, TokenOptions, TokenProvider};

const KEY: &str = "test-key";
const SESSION: &str = "/sessions/webinars/ev1/s1";
const LIST: &str = "/sessions/webinars/ev1";
const BODY: &str = r#"{"id":"s1","endDateTime":"2999-01-01T00:00:00Z"}"#;

/// What the fake Graph answers next (for every key).
#[derive(Clone, Copy)]
enum Graph {
    Found,
    NotFound,
    Status,
    Forbidden,
    Token,
    Throttled,
    CircuitOpen,
    Hang,
    /// Found, after a second (so that other requests can join the call).
    Slow,
}

struct FakeOrigin {
    gate: Gate,
    next: Mutex<Graph>,
    calls: AtomicUsize,
}

impl FakeOrigin {
    fn answer(&self) -> Graph {
        *self.next.lock().unwrap()
    }
}

impl Origin for FakeOrigin {
    fn fetch<'a>(
        &'a self,
        _key: &'a SessionKey,
        _deadline: Instant,
    ) -> BoxFuture<'a, Result<GraphAnswer, UpstreamError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let found = |fetched| {
            Ok(GraphAnswer {
                fetched,
                graph_request_id: Some("graph-rid".into()),
            })
        };
        let result = match self.answer() {
            Graph::Found => found(Fetched::Found {
                session: Bytes::from_static(BODY.as_bytes()),
                raw: Bytes::from_static(BODY.as_bytes()),
            }),
            Graph::NotFound => found(Fetched::NotFound),
            Graph::Status => Err(UpstreamError::Status {
                status: 500,
                code: "generalException".into(),
            }),
            Graph::Forbidden => Err(UpstreamError::Forbidden {
                code: "Forbidden".into(),
            }),
            Graph::Token => Err(UpstreamError::Token(Arc::new(TokenError::Status(500)))),
            Graph::Throttled => Err(UpstreamError::Throttled {
                retry_after: Duration::from_secs(7),
            }),
            Graph::CircuitOpen => Err(UpstreamError::CircuitOpen {
                retry_after: Duration::from_secs(9),
            }),
            Graph::Hang => return std::future::pending().boxed(),
            Graph::Slow => {
                return async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    found(Fetched::Found {
                        session: Bytes::from_static(BODY.as_bytes()),
                        raw: Bytes::from_static(BODY.as_bytes()),
                    })
                }
                .boxed()
            }
        };
        std::future::ready(result).boxed()
    }

    fn gate(&self) -> &Gate {
        &self.gate
    }
}

/// The handler's state with `Graph` as the first answer; callers need the API key
/// [`KEY`] ("full", every kind) or "town-key" ("towns", town halls only).
fn state(first: Graph) -> (Arc<AppState>, Arc<FakeOrigin>) {
    state_with(first, "", "")
}

/// As [`state`], with more top-level tables (`[limits]`, `[cache]`) and more keys for the
/// "full" caller (its limits).
fn state_with(first: Graph, tables: &str, full: &str) -> (Arc<AppState>, Arc<FakeOrigin>) {
    let hex = |key: &str| hex::encode(Sha256::digest(key.as_bytes()));
    let toml = format!(
        r#"
        [auth]
        tenant_id = "11111111-2222-3333-4444-555555555555"
        client_id = "app"
        client_secret = "s3cret-value"
        [server]
        max_headers = 20
        request_timeout = "2s"
        [callers]
        mode = "api_key"
        [[callers.api_keys]]
        name = "full"
        sha256 = "{}"
        {full}
        [[callers.api_keys]]
        name = "towns"
        sha256 = "{}"
        kinds = ["townhalls"]
        {tables}
        "#,
        hex(KEY),
        hex("town-key"),
    );
    let settings = Settings::from_toml(&toml, Purpose::Embedded).unwrap();
    let clock = Clock::new();
    let metrics = Arc::new(Metrics::new());
    let http = reqwest::Client::new();
    let origin = Arc::new(FakeOrigin {
        gate: Gate::new(5, Duration::from_secs(30), Duration::from_secs(5)),
        next: Mutex::new(first),
        calls: AtomicUsize::new(0),
    });
    let cache = SessionCache::new(
        &settings.cache,
        origin.clone(),
        settings.server.request_timeout,
        clock.clone(),
        metrics.clone(),
        None,
    );
    // Only readiness uses it; it points nowhere reachable and is never asked.
    let tokens = Arc::new(
        TokenProvider::new(
            http.clone(),
            TokenOptions {
                client_id: "app".into(),
                credential: Credential::Secret {
                    secret: "unused".to_string().into(),
                    file: None,
                },
                token_url: "http://127.0.0.1:9/token".into(),
                scope: "https://graph.microsoft.com/.default".into(),
                refresh_before: Duration::from_secs(300),
                timeout: Duration::from_secs(1),
            },
            clock.clone(),
            metrics.clone(),
        )
        .unwrap(),
    );
    let callers = Callers::new(&settings.callers, http, clock);
    let state = AppState::new(&settings, callers, cache, metrics, tokens);
    (Arc::new(state), origin)
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path)
        .header("host", "proxy.test")
        .header("x-request-id", "rid-1")
        .header("x-api-key", KEY)
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: serde_json::Value,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    /// A JSON error with this status and code, naming our request id.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["error"]["code"], code, "{}", self.body);
        assert_eq!(self.body["error"]["requestId"], "rid-1");
        assert_eq!(self.header("content-type"), "application/json");
    }
}

async fn send(state: &Arc<AppState>, req: Request<Full<Bytes>>) -> Answer {
    let state = state.clone();
    let service = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let response: Response<Full<Bytes>> = service.oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn send_get(state: &Arc<AppState>, path: &str) -> Answer {
    send(state, get(path).body(Full::default()).unwrap()).await
}

#[tokio::test(start_paused = true)]
async fn miss_then_hit_then_304() {
    let (state, origin) = state(Graph::Found);
    let miss = send_get(&state, SESSION).await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.body["id"], "s1");
    assert_eq!(
        miss.header("cache-status"),
        "graph-session-proxy; fwd=miss; fwd-status=200; stored"
    );
    assert_eq!(miss.header("age"), "0");
    assert_eq!(miss.header("x-graph-request-id"), "graph-rid");
    let etag = miss.header("etag").to_string();

    tokio::time::advance(Duration::from_secs(10)).await;
    let hit = send_get(&state, SESSION).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.body["id"], "s1");
    assert_eq!(
        hit.header("cache-status"),
        "graph-session-proxy; hit; ttl=290"
    );
    assert_eq!(hit.header("age"), "10");
    assert_eq!(hit.header("etag"), etag);
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);

    let req = get(SESSION)
        .header("if-none-match", etag.as_str())
        .body(Full::default())
        .unwrap();
    let not_modified = send(&state, req).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_null());
    assert_eq!(not_modified.header("etag"), etag);
    assert!(not_modified.header("cache-status").contains("hit"));
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_then_stale_if_error() {
    let (state, origin) = state(Graph::Found);
    assert_eq!(send_get(&state, SESSION).await.status, 200);
    // Past the ttl, inside stale-while-revalidate: the stale copy, refreshed behind.
    tokio::time::advance(Duration::from_secs(330)).await;
    let stale = send_get(&state, SESSION).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body["id"], "s1");
    assert_eq!(stale.header("age"), "330");
    assert!(
        stale
            .header("cache-status")
            .contains("detail=stale-while-revalidate"),
        "{}",
        stale.header("cache-status")
    );
    // Let the refresh settle, then Graph fails once the copy is past revalidation.
    tokio::task::yield_now().await;
    *origin.next.lock().unwrap() = Graph::Status;
    tokio::time::advance(Duration::from_secs(1000)).await;
    let kept = send_get(&state, SESSION).await;
    assert_eq!(kept.status, 200, "{}", kept.body);
    assert_eq!(kept.body["id"], "s1");
    assert!(
        kept.header("cache-status")
            .contains("detail=stale-if-error"),
        "{}",
        kept.header("cache-status")
    );
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_when_graph_hangs_past_the_request_timeout() {
    let (state, origin) = state(Graph::Found);
    assert_eq!(send_get(&state, SESSION).await.status, 200);
    *origin.next.lock().unwrap() = Graph::Hang;
    tokio::time::advance(Duration::from_secs(1000)).await;
    let kept = send_get(&state, SESSION).await;
    assert_eq!(kept.status, 200, "{}", kept.body);
    assert!(kept
        .header("cache-status")
        .contains("detail=stale-if-error"));
}

#[tokio::test(start_paused = true)]
async fn graph_404s_for_a_session_and_a_list() {
    let (state, _) = state(Graph::NotFound);
    let session = send_get(&state, SESSION).await;
    session.assert_error(404, "notFound");
    assert_eq!(
        session.body["error"]["message"],
        "Graph has no such session"
    );
    assert_eq!(
        session.header("cache-status"),
        "graph-session-proxy; fwd=miss; fwd-status=404; stored"
    );
    assert!(!session.headers.contains_key("etag"));
    let list = send_get(&state, LIST).await;
    list.assert_error(404, "notFound");
    assert_eq!(list.body["error"]["message"], "Graph has no such event");
}

#[tokio::test(start_paused = true)]
async fn caller_refusals() {
    let (state, origin) = state(Graph::Found);
    // 400: a query string.
    send_get(&state, "/sessions/webinars/ev1/s1?$select=id")
        .await
        .assert_error(400, "invalidRequest");
    // 431: more headers than server.max_headers.
    let mut req = get(SESSION);
    for i in 0..30 {
        req = req.header(format!("x-h{i}"), "v");
    }
    send(&state, req.body(Full::default()).unwrap())
        .await
        .assert_error(431, "invalidRequest");
    // 414: a path longer than any two ids.
    let long = format!("/sessions/webinars/{}/s1", "a".repeat(2000));
    send_get(&state, &long)
        .await
        .assert_error(414, "invalidRequest");
    // 401 with its challenge.
    let req = Request::get(SESSION)
        .header("host", "proxy.test")
        .header("x-request-id", "rid-1")
        .body(Full::default())
        .unwrap();
    let anonymous = send(&state, req).await;
    anonymous.assert_error(401, "unauthenticated");
    assert_eq!(
        anonymous.header("www-authenticate"),
        "Bearer realm=\"graph-session-proxy\""
    );
    // 403: this caller may read town halls only.
    let mut req = get(SESSION).body(Full::default()).unwrap();
    req.headers_mut()
        .insert("x-api-key", http::HeaderValue::from_static("town-key"));
    send(&state, req).await.assert_error(403, "forbidden");
    // 404: no such route.
    send_get(&state, "/nope")
        .await
        .assert_error(404, "notFound");
    // 405 with Allow.
    let req = Request::post(SESSION)
        .header("host", "proxy.test")
        .header("x-request-id", "rid-1")
        .header("x-api-key", KEY)
        .body(Full::default())
        .unwrap();
    let post = send(&state, req).await;
    post.assert_error(405, "methodNotAllowed");
    assert_eq!(post.header("allow"), "GET, HEAD");
    // 504 notCached: only-if-cached and nothing cached.
    let req = get(SESSION)
        .header("cache-control", "only-if-cached")
        .body(Full::default())
        .unwrap();
    send(&state, req).await.assert_error(504, "notCached");
    assert_eq!(origin.calls.load(Ordering::SeqCst), 0, "Graph never asked");
}

#[tokio::test(start_paused = true)]
async fn graph_style_paths_get_graph_errors() {
    let (state, _) = state(Graph::Found);
    let req = Request::get("/v1.0/me")
        .header("host", "proxy.test")
        .header("x-request-id", "rid-1")
        .header("client-request-id", "client-7")
        .header("x-api-key", KEY)
        .body(Full::default())
        .unwrap();
    let answer = send(&state, req).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.body["error"]["code"], "notSupported");
    assert_eq!(answer.body["error"]["innerError"]["request-id"], "rid-1");
    assert_eq!(
        answer.body["error"]["innerError"]["client-request-id"],
        "client-7"
    );
    assert!(answer.body["error"].get("requestId").is_none());
    assert_eq!(answer.header("request-id"), "rid-1");
    assert_eq!(answer.header("client-request-id"), "client-7");
}

#[tokio::test(start_paused = true)]
async fn upstream_failures() {
    for (graph, status, code, retry_after) in [
        (Graph::Status, 502, "upstreamError", None),
        (Graph::Forbidden, 502, "upstreamForbidden", None),
        (Graph::Token, 502, "tokenUnavailable", None),
        (Graph::Throttled, 503, "upstreamThrottled", Some("7")),
        (Graph::CircuitOpen, 503, "upstreamUnavailable", Some("9")),
        (Graph::Hang, 504, "upstreamTimeout", None),
    ] {
        let (state, _) = state(graph);
        let answer = send_get(&state, SESSION).await;
        answer.assert_error(status, code);
        assert_eq!(
            answer.header("cache-status"),
            "graph-session-proxy; fwd=miss",
            "{code}"
        );
        assert_eq!(
            answer
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            retry_after,
            "{code}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn overloaded_and_draining() {
    let (state, _) = state(Graph::Found);
    let all = state.limit.available_permits() as u32;
    let held = state.limit.clone().try_acquire_many_owned(all).unwrap();
    let busy = send_get(&state, SESSION).await;
    busy.assert_error(503, "overloaded");
    drop(held);
    assert_eq!(send_get(&state, SESSION).await.status, 200);
    state.draining.store(true, Ordering::SeqCst);
    send_get(&state, SESSION)
        .await
        .assert_error(503, "draining");
}

/// The limit phase: request rates and Graph budgets.
mod limits;
/// `GET /openapi.json` on the admin listener.
mod openapi;

/// Every request's future is moved (copied) several times between the layers and hyper:
/// the paths past a memory hit (Graph, the shared tier, limits in Redis, a key-set fetch)
/// are boxed so that their futures are not part of it. Fails when a large future joins
/// the hit path unboxed (2,448 bytes before they were boxed, 1,128 after, with rustc 1.95;
/// the bounds leave room for other compilers and dependency versions).
#[test]
fn the_request_future_stays_small() {
    fn future_size<S: tower::Service<Request<hyper::body::Incoming>>>(_: &S) -> usize {
        std::mem::size_of::<S::Future>()
    }
    let (state, _) = state(Graph::Found);
    let req = Request::get(SESSION).body(Full::new(Bytes::new())).unwrap();
    let handled = std::mem::size_of_val(&handle(&state, req));
    assert!(handled <= 1_536, "handle's future: {handled} bytes");
    let service = future_size(&crate::http::handler::caller_service(state));
    assert!(
        service <= 1_600,
        "the caller service's future: {service} bytes"
    );
}

/// Graph's request id, kept in the entry's one buffer, is copied for HTTP/2 answers: HPACK's
/// table keeps the header values it indexes for the connection's life, and a slice would
/// keep the whole entry with it.
#[tokio::test(start_paused = true)]
async fn an_http2_answer_holds_no_slice_of_the_entry() {
    let (state, _) = state(Graph::Found);
    let _ = send_get(&state, SESSION).await;
    for (version, shares) in [
        (http::Version::HTTP_11, true),
        (http::Version::HTTP_2, false),
    ] {
        let req = get(SESSION)
            .version(version)
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = handle(&state, req).await;
        let id = response.headers()["x-graph-request-id"].clone();
        assert_eq!(id, "graph-rid");
        let body = response
            .into_body()
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        // The entry's buffer: Graph's body, the validators, then the id.
        let buffer = body.as_ptr() as usize..body.as_ptr() as usize + body.len() + 128;
        let inside = buffer.contains(&(id.as_bytes().as_ptr() as usize));
        assert_eq!(inside, shares, "{version:?}");
    }
}
