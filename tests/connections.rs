//! Connection hardening on the caller listener: requests without `Host`, silent and idle
//! connections, a full listener, and the listen backlog. Real loopback sockets, every
//! wait bounded.

mod common;

use std::time::Duration;

use common::*;
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
    let listener = graph_session_proxy::server::bind("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
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
