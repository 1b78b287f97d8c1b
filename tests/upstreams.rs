//! Hostile and broken upstreams (issue #12, items 3, 4 and 12): endless answers from the
//! token endpoint, the caller-token key set and Graph are cut at a limit and nothing is
//! stored; over-long or unsafe request ids (Graph's and callers') never reach callers or
//! logs; the Graph-compatible routes answer with Graph's error shape and headers.
//!
//! The hostile upstreams are tiny raw-TCP servers written here, not the simulator: they
//! answer what no real upstream should.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use graph_session_proxy::config::{CallerMode, JwtSettings};
use graph_session_proxy::sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a hostile upstream does once it has read a request's head.
#[derive(Clone)]
enum Behaviour {
    /// `200`, `Transfer-Encoding: chunked`, then 64 KiB chunks until the peer goes away.
    Endless { content_type: &'static str },
    /// `200` announcing this `Content-Length` (and sending it, slowly, if read).
    Announced(u64),
    /// `200` with this JSON body and this `request-id` header value.
    RequestId { body: String, request_id: Vec<u8> },
}

/// A raw HTTP/1.1 server answering every request with `behaviour`; counts the body bytes
/// it managed to write and records each request head.
struct Hostile {
    addr: SocketAddr,
    written: Arc<AtomicU64>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    async fn start(behaviour: Behaviour) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (w, hd) = (written.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, behaviour.clone(), w.clone(), hd.clone()));
            }
        });
        Hostile {
            addr,
            written,
            heads,
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    behaviour: Behaviour,
    written: Arc<AtomicU64>,
    heads: Arc<Mutex<Vec<String>>>,
) {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).to_string();
        // A token request has a form body: read what Content-Length announces.
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        heads.lock().unwrap().push(head);
        match &behaviour {
            Behaviour::Endless { content_type } => {
                let start = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
                );
                if stream.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
                // A JSON-looking start, so that only the size can stop a reader.
                let _ = stream.write_all(b"6\r\n{\"a\":\"\r\n").await;
                while stream.write_all(chunk.as_bytes()).await.is_ok() {
                    written.fetch_add(0x10000, Ordering::SeqCst);
                }
                return;
            }
            Behaviour::Announced(length) => {
                let start = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
                );
                if stream.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'a'; 0x10000];
                let mut left = *length;
                while left > 0 {
                    let n = left.min(chunk.len() as u64);
                    if stream.write_all(&chunk[..n as usize]).await.is_err() {
                        return;
                    }
                    written.fetch_add(n, Ordering::SeqCst);
                    left -= n;
                }
            }
            Behaviour::RequestId { body, request_id } => {
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nrequest-id: ",
                    body.len()
                )
                .into_bytes();
                out.extend_from_slice(request_id);
                out.extend_from_slice(b"\r\n\r\n");
                out.extend_from_slice(body.as_bytes());
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Resident set size of this test process, in bytes (Linux).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn an_endless_token_answer_is_cut_at_the_limit() {
    let token = Hostile::start(Behaviour::Endless {
        content_type: "application/json",
    })
    .await;
    let url = format!("http://{}/tenant/oauth2/v2.0/token", token.addr);
    let h = Harness::with(move |s| s.auth.token_url = Some(url), SimConfig::default()).await;
    let before = rss();
    let started = Instant::now();
    let r = h.get(&h.seed_url()).await;
    let took = started.elapsed();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "tokenUnavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too large"),
        "{body}"
    );
    // Cut at the limit, not after graph.timeout (2 s) of reading as fast as loopback goes.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = token.written();
    assert!(
        written < 32 * 1024 * 1024,
        "the proxy kept reading: {written} bytes written to it"
    );
    assert!(
        rss().saturating_sub(before) < 64 * 1024 * 1024,
        "RSS grew by {} bytes",
        rss().saturating_sub(before)
    );
    // An announced length over the limit is refused without reading it.
    let announced = Hostile::start(Behaviour::Announced(10 * 1024 * 1024)).await;
    let url = format!("http://{}/tenant/oauth2/v2.0/token", announced.addr);
    let h2 = Harness::with(move |s| s.auth.token_url = Some(url), SimConfig::default()).await;
    let r = h2.get(&h2.seed_url()).await;
    assert_eq!(r.status(), 502);
    assert_eq!(h2.stats().graph_requests, 0);
    assert_eq!(h.stats().graph_requests, 0);
}

#[tokio::test]
async fn an_endless_graph_answer_is_an_error_and_nothing_is_stored() {
    let graph = Hostile::start(Behaviour::Endless {
        content_type: "application/json",
    })
    .await;
    let root = format!("http://{}", graph.addr);
    let h = Harness::with(move |s| s.graph.base_url = Some(root), SimConfig::default()).await;
    for round in 0..2 {
        let started = Instant::now();
        let r = h.get(&h.seed_url()).await;
        assert_eq!(r.status(), 502, "round {round}");
        assert_eq!(
            r.headers()["cache-status"],
            "graph-session-proxy; fwd=miss",
            "round {round}"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstreamError");
        // Said for what it is, not as an unreadable body.
        assert_eq!(
            body["error"]["message"], "Graph's answer was too large to pass on",
            "round {round}"
        );
        assert!(started.elapsed() < Duration::from_millis(1500));
        // Past failure_ttl (1 s), the next request asks Graph again: nothing was stored.
        h.clock.advance(Duration::from_secs(2));
    }
    assert_eq!(
        graph.heads().len(),
        2,
        "one Graph call per request, no retries"
    );
    assert!(graph.written() < 64 * 1024 * 1024);
}

#[tokio::test]
async fn an_endless_key_set_is_cut_at_the_limit() {
    let jwks = Hostile::start(Behaviour::Endless {
        content_type: "application/json",
    })
    .await;
    let jwks_url = format!("http://{}/tenant/discovery/v2.0/keys", jwks.addr);
    let h = Harness::with(
        move |s| {
            s.callers.modes = vec![CallerMode::ApiKey, CallerMode::Jwt];
            s.callers.jwt = Some(JwtSettings {
                issuer: Some("https://login.microsoftonline.com/t/v2.0".to_string()),
                audience: Some("api://graph-session-proxy".to_string()),
                jwks_url: Some(jwks_url),
                ..JwtSettings::default()
            });
        },
        SimConfig::default(),
    )
    .await;
    // A token naming a key id the proxy does not know yet makes it fetch the key set.
    let header = base64_url(br#"{"alg":"RS256","kid":"unknown-kid","typ":"JWT"}"#);
    let claims = base64_url(br#"{"aud":"api://graph-session-proxy"}"#);
    let token = format!("{header}.{claims}.c2lnbmF0dXJl");
    let started = Instant::now();
    let r = h
        .http
        .get(h.seed_url())
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(3000));
    assert!(r.status() == 503 || r.status() == 401, "{}", r.status());
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"]["code"].is_string());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        jwks.written() < 32 * 1024 * 1024,
        "the proxy kept reading the key set: {} bytes",
        jwks.written()
    );
    assert_eq!(h.stats().graph_requests, 0);
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The session a hostile Graph serves (any valid JSON object is a session to the proxy).
fn session_body() -> String {
    r#"{"id":"8d62dd52-4dff-4c75-96a9-f905cc3ff942","subject":"hostile"}"#.to_string()
}

#[tokio::test]
async fn graphs_request_id_is_kept_only_when_short_and_plain() {
    for (id, kept) in [
        (b"4f2a1c3e-9d1b-4c7e-8a6f-0b1c2d3e4f5a".to_vec(), true),
        (vec![b'r'; 50 * 1024], false),
        (b"abc\"; x=<y>".to_vec(), false),
        (b"caf\xe9-\xff".to_vec(), false),
        (b"id with spaces".to_vec(), false),
    ] {
        let graph = Hostile::start(Behaviour::RequestId {
            body: session_body(),
            request_id: id.clone(),
        })
        .await;
        let root = format!("http://{}", graph.addr);
        let h = Harness::with(move |s| s.graph.base_url = Some(root), SimConfig::default()).await;
        for round in ["miss", "hit"] {
            let r = h.get(&h.seed_url()).await;
            assert_eq!(
                r.status(),
                200,
                "{round} {}",
                String::from_utf8_lossy(&id[..id.len().min(20)])
            );
            let seen = r.headers()["x-graph-request-id"].as_bytes().to_vec();
            if kept {
                assert_eq!(seen, id, "{round}");
            } else {
                assert!(seen.len() <= 128, "{round}: {} bytes", seen.len());
                assert_ne!(seen, id);
                // The stand-in is the client-request-id the proxy sent for that call.
                let heads = graph.heads();
                let sent = heads[0]
                    .lines()
                    .find_map(|l| l.strip_prefix("client-request-id: "))
                    .unwrap()
                    .to_string();
                assert_eq!(String::from_utf8(seen).unwrap(), sent, "{round}");
            }
        }
    }
}

#[tokio::test]
async fn a_callers_request_id_is_echoed_only_when_short_and_plain() {
    let h = Harness::start().await;
    let long = "x".repeat(8 * 1024);
    for (id, kept) in [
        ("trace-0af7651916cd43dd8448eb211c80319c", true),
        (long.as_str(), false),
        ("has space", false),
        ("semi;colon", false),
    ] {
        for url in [h.seed_url(), h.url("webinars", SEED_EVENT, "bad%20id")] {
            let r = h
                .http
                .get(&url)
                .bearer_auth(API_KEY)
                .header("x-request-id", id)
                .send()
                .await
                .unwrap();
            let echoed = r.headers()["x-request-id"].to_str().unwrap().to_string();
            if kept {
                assert_eq!(echoed, id);
            } else {
                assert_eq!(echoed.len(), 36, "a fresh UUID, not {} bytes", echoed.len());
            }
            if r.status() != 200 {
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["error"]["requestId"], echoed.as_str());
            }
        }
    }
}

#[tokio::test]
async fn graph_compatible_errors_carry_graphs_shape_and_headers() {
    let h = Harness::start().await;
    let base = format!("http://{}", h.proxy);
    // 404 notSupported, 401, 400, and a 200 on the Graph-compatible routes.
    let cases = [
        (
            format!("{base}/v1.0/me"),
            Some(API_KEY),
            404,
            "notSupported",
        ),
        (
            format!(
                "{base}/v1.0/solutions/virtualEvents/webinars/{SEED_EVENT}/sessions/{SEED_SESSION}"
            ),
            None,
            401,
            "unauthenticated",
        ),
        (
            format!("{base}/v1.0/solutions/virtualEvents/webinars/{SEED_EVENT}/sessions/bad%20id"),
            Some(API_KEY),
            400,
            "invalidRequest",
        ),
    ];
    for (url, key, status, code) in cases {
        let mut request = h
            .http
            .get(&url)
            .header("client-request-id", "7d1a36f0-5b2c-4f8e-9a3d-2e1f0c9b8a7d");
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), status, "{url}");
        let request_id = r.headers()["request-id"].to_str().unwrap().to_string();
        assert_eq!(request_id, r.headers()["x-request-id"].to_str().unwrap());
        assert_eq!(
            r.headers()["client-request-id"],
            "7d1a36f0-5b2c-4f8e-9a3d-2e1f0c9b8a7d"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        let inner = &body["error"]["innerError"];
        assert_eq!(body["error"]["code"], code);
        assert_eq!(inner["request-id"], request_id.as_str());
        assert_eq!(
            inner["client-request-id"],
            "7d1a36f0-5b2c-4f8e-9a3d-2e1f0c9b8a7d"
        );
        // ISO 8601 as Graph writes it (`2026-12-02T18:48:27`), not an HTTP date.
        let date = inner["date"].as_str().unwrap();
        assert_eq!(date.len(), 19, "{date}");
        assert_eq!(&date[10..11], "T", "{date}");
        assert!(humantime::parse_rfc3339_weak(date).is_ok(), "{date}");
    }
    // A success on the Graph route names the call too; without the caller's
    // client-request-id, ours stands in.
    let r = h
        .get(&format!(
            "{base}/v1.0/solutions/virtualEvents/webinars/{SEED_EVENT}/sessions/{SEED_SESSION}"
        ))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["request-id"], r.headers()["x-request-id"]);
    assert_eq!(
        r.headers()["client-request-id"],
        r.headers()["x-request-id"]
    );
    // The proxy's own routes keep their contract (no Graph headers).
    let r = h.get(&h.seed_url()).await;
    assert!(r.headers().get("request-id").is_none());
}
