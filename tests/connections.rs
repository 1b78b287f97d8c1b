//! Connection hardening on the caller listener: requests without `Host`, silent and idle
//! connections, a full listener, and the listen backlog. Real loopback sockets, every
//! wait bounded.

mod common;

use std::time::Duration;

use common::*;
use graph_session_proxy::sim::{Faults, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn session_path() -> String {
    format!("/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}")
}

#[tokio::test]
async fn http11_without_host_is_a_json_400_and_http10_is_served() {
    let h = Harness::start().await;
    let path = session_path();
    let no_host = format!(
        "GET {path} HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    );
    let r = raw_exchange(h.proxy, no_host.as_bytes()).await;
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "invalidRequest");
    assert_eq!(
        r.json()["error"]["message"],
        "HTTP/1.1 requests must carry a Host header"
    );
    assert_eq!(h.stats().graph_requests, 0, "refused before any Graph call");

    // HTTP/1.0 has no Host requirement.
    let old = format!("GET {path} HTTP/1.0\r\nAuthorization: Bearer {API_KEY}\r\n\r\n");
    let r = raw_exchange(h.proxy, old.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.head);

    // HTTP/2 carries :authority, which hyper puts in the URI, not a Host header.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .get(h.seed_url())
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
}

/// The listener `serve` binds takes a burst of connects in its backlog while nobody
/// accepts; with the standard 128, most of 1,500 would wait for a SYN retransmit (1 s).
#[tokio::test]
async fn a_burst_of_connects_fits_in_the_listen_backlog() {
    const BURST: usize = 1500;
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok());
    match somaxconn {
        Some(n) if n >= BURST => {}
        other => {
            eprintln!("skipped: net.core.somaxconn is {other:?}, below {BURST}");
            return;
        }
    }
    let listener = graph_session_proxy::bind("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let connects: Vec<_> = (0..BURST)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                let connected =
                    tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await;
                (connected.ok().and_then(Result::ok), started.elapsed())
            })
        })
        .collect();
    // Kept open to the end, so that every connection holds its place in the queue.
    let mut open = Vec::new();
    let mut slow = 0;
    for connect in connects {
        match connect.await.unwrap() {
            (Some(stream), took) if took <= Duration::from_millis(500) => open.push(stream),
            _ => slow += 1,
        }
    }
    assert_eq!(slow, 0, "{} of {BURST} connected within 500 ms", open.len());
    drop(listener);
}

/// A harness whose connections time out quickly: `first_byte` (header_read_timeout) and
/// `idle` (idle_timeout), at most `max_connections` open.
async fn quick(first_byte: Duration, idle: Duration, max_connections: usize) -> Harness {
    Harness::with(
        |s| {
            s.server.header_read_timeout = first_byte;
            s.server.idle_timeout = idle;
            s.server.max_connections = max_connections;
        },
        SimConfig::default(),
    )
    .await
}

/// Waits (at most `within`) for the proxy to close `stream`: true at EOF or reset.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Reads one HTTP/1.1 answer with a `Content-Length` off a keep-alive connection.
async fn read_answer(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return (status, head, buf[end + 4..end + 4 + length].to_vec());
            }
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before a whole answer: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn keep_alive_request(session: &str) -> Vec<u8> {
    format!(
        "GET /sessions/webinars/{SEED_EVENT}/{session} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_first_byte_deadline() {
    let h = quick(Duration::from_millis(300), Duration::from_secs(60), 100).await;
    let mut silent = TcpStream::connect(h.proxy).await.unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(2)).await,
        "a connection that never sent a byte is still open"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn a_quiet_http2_connection_gets_a_goaway_and_is_closed() {
    let h = quick(Duration::from_millis(300), Duration::from_millis(300), 100).await;
    let mut h2 = TcpStream::connect(h.proxy).await.unwrap();
    // The client preface and an empty SETTINGS frame, then nothing.
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let goaway = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let mut header = [0u8; 9];
            if h2.read_exact(&mut header).await.is_err() {
                return false; // closed without a GOAWAY
            }
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; length];
            if h2.read_exact(&mut payload).await.is_err() {
                return false;
            }
            if header[3] == 0x7 {
                return true;
            }
        }
    })
    .await;
    assert_eq!(goaway, Ok(true), "no GOAWAY on an idle HTTP/2 connection");
    assert!(
        closed_within(&mut h2, Duration::from_secs(2)).await,
        "the idle HTTP/2 connection stayed open after its GOAWAY"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_close_but_requests_in_flight_are_never_cut() {
    let h = quick(Duration::from_secs(10), Duration::from_millis(500), 100).await;
    let mut idle = TcpStream::connect(h.proxy).await.unwrap();
    idle.write_all(&keep_alive_request(SEED_SESSION))
        .await
        .unwrap();
    assert_eq!(read_answer(&mut idle).await.0, 200);
    let answered = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(2)).await,
        "an idle keep-alive connection is still open"
    );
    assert!(answered.elapsed() >= Duration::from_millis(400));

    // Graph takes longer than idle_timeout: the request is in flight, not idle.
    h.faults(Faults {
        graph_latency_ms: 1200,
        ..Faults::default()
    });
    let mut busy = TcpStream::connect(h.proxy).await.unwrap();
    busy.write_all(&keep_alive_request("gen-slow"))
        .await
        .unwrap();
    let (status, head, _) = tokio::time::timeout(Duration::from_secs(4), read_answer(&mut busy))
        .await
        .expect("no answer");
    assert!(status == 200 || status == 404, "{head}");
    assert_eq!(h.stats().graph_requests, 2);
}

#[tokio::test]
async fn at_the_connection_limit_the_longest_idle_makes_room() {
    const N: usize = 4;
    let h = quick(Duration::from_secs(10), Duration::from_secs(60), N).await;
    let mut silent = Vec::new();
    for _ in 0..N {
        silent.push(TcpStream::connect(h.proxy).await.unwrap());
    }
    // A newcomer beyond the limit.
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        raw_get(h.proxy, session_path().as_bytes()),
    )
    .await
    .expect("the newcomer hung at the connection limit");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(started.elapsed() < Duration::from_secs(1));
    // Its place was the oldest silent connection's.
    assert!(closed_within(&mut silent[0], Duration::from_secs(1)).await);
}

#[tokio::test]
async fn at_the_connection_limit_with_every_connection_busy_a_newcomer_gets_a_prompt_503() {
    const N: usize = 2;
    let h = quick(Duration::from_secs(10), Duration::from_secs(60), N).await;
    h.faults(Faults {
        graph_latency_ms: 1500,
        ..Faults::default()
    });
    let mut busy = Vec::new();
    for session in [SEED_SESSION, "gen-busy"] {
        let mut stream = TcpStream::connect(h.proxy).await.unwrap();
        stream
            .write_all(&keep_alive_request(session))
            .await
            .unwrap();
        busy.push(stream);
    }
    h.wait_for_graph_requests(2).await;
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        raw_get(h.proxy, session_path().as_bytes()),
    )
    .await
    .expect("the newcomer hung at the connection limit");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(r.status, 503, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "overloaded");
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
    // The busy connections still get their answers.
    for mut stream in busy {
        let (status, head, _) =
            tokio::time::timeout(Duration::from_secs(4), read_answer(&mut stream))
                .await
                .expect("a busy connection got no answer");
        assert!(status == 200 || status == 404, "{head}");
    }
}
