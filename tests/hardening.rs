//! Input hardening on the caller listener: header count and size limits, slow clients,
//! bodies on GET, HTTP/2 — each refused clearly without disturbing other connections.

mod common;

use std::time::Duration;

use common::*;
use graph_session_proxy::sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn request_with_headers(extra: &str) -> Vec<u8> {
    format!(
        "GET /sessions/webinars/{SEED_EVENT}/{SEED_SESSION} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n{extra}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_a_json_431() {
    let h = Harness::start().await;
    let many: String = (0..80).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let r = raw_exchange(h.proxy, &request_with_headers(&many)).await;
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "invalidRequest");

    let large = format!("X-Large: {}\r\n", "a".repeat(20 * 1024));
    let r = raw_exchange(h.proxy, &request_with_headers(&large)).await;
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "invalidRequest");

    // Far beyond: hyper refuses before any handler runs (a 431 without a body).
    let huge: String = (0..400).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let r = raw_exchange(h.proxy, &request_with_headers(&huge)).await;
    assert_eq!(r.status, 431, "{}", r.head);
    let enormous = format!("X-Large: {}\r\n", "a".repeat(512 * 1024));
    let r = raw_exchange(h.proxy, &request_with_headers(&enormous)).await;
    assert!(
        r.status == 431 || r.status == 0,
        "refused or cut off: {}",
        r.head
    );

    assert_eq!(h.stats().graph_requests, 0);
    // A normal request is unaffected.
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
}

#[tokio::test]
async fn an_overlong_request_target_gets_a_json_414() {
    let h = Harness::start().await;
    let target = format!("/sessions/webinars/{}/{}", "a".repeat(3000), "b");
    let r = raw_get(h.proxy, target.as_bytes()).await;
    assert_eq!(r.status, 414, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "invalidRequest");
}

#[tokio::test]
async fn a_slow_header_client_is_cut_off_without_affecting_others() {
    let h = Harness::with(
        |s| s.server.header_read_timeout = Duration::from_secs(1),
        SimConfig::default(),
    )
    .await;
    let mut slow = TcpStream::connect(h.proxy).await.unwrap();
    slow.write_all(b"GET /sessions/webinars/a/b HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Others are served promptly meanwhile.
    for _ in 0..20 {
        assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    }
    // The slow client never finishes its headers: the server closes the connection.
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the slow connection was not closed");
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test]
async fn a_body_on_get_is_refused_and_the_connection_closed() {
    let h = Harness::start().await;
    let mut request = format!(
        "GET /sessions/webinars/{SEED_EVENT}/{SEED_SESSION} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    // A second request smuggled into the body must never be answered.
    request.extend_from_slice(
        b"30\r\nGET /sessions/webinars/x/y HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
    );
    let r = raw_exchange(h.proxy, &request).await;
    assert_eq!(r.status, 400, "{}", r.head);
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
    assert_eq!(r.json()["error"]["code"], "invalidRequest");
    assert_eq!(
        String::from_utf8_lossy(&r.body).matches("HTTP/1.1").count(),
        0,
        "one answer only"
    );
    assert_eq!(h.stats().graph_requests, 0);
}

#[tokio::test]
async fn http2_is_served() {
    let h = Harness::start().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..3 {
        let r = client
            .get(h.seed_url())
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
    }
    let r = client
        .get(h.url("webinars", "a%2Fb", "c"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn odd_request_framing_is_refused_with_json() {
    let h = Harness::start().await;
    for target in [
        format!("ftp://evil.example/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}"),
        format!("http://user:pass@evil.example/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}"),
        format!("/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}\rX"),
    ] {
        let r = raw_get(h.proxy, target.as_bytes()).await;
        assert_eq!(r.status, 400, "{target}: {}", r.head);
        assert_eq!(r.json()["error"]["code"], "invalidRequest", "{target}");
    }
    let two_hosts = format!(
        "GET /sessions/webinars/{SEED_EVENT}/{SEED_SESSION} HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    );
    let r = raw_exchange(h.proxy, two_hosts.as_bytes()).await;
    assert_eq!(r.status, 400, "{}", r.head);
    // An absolute-form http target is allowed (RFC 9112 3.2.2) and means the same path.
    let r = raw_get(
        h.proxy,
        format!("http://proxy.internal/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn a_pri_request_does_not_disable_the_fragment_guard() {
    let h = Harness::start().await;
    let pipelined = format!(
        "PRI /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {API_KEY}\r\n\r\nGET /sessions/webinars/{SEED_EVENT}/{SEED_SESSION}#frag HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    );
    let r = raw_exchange(h.proxy, pipelined.as_bytes()).await;
    let all = format!("{}{}", r.head, String::from_utf8_lossy(&r.body));
    assert!(!all.contains("200 OK"), "{all}");
    assert_eq!(h.stats().graph_requests, 0);
}
