//! Connection hardening on the caller listener: requests without `Host`, silent and idle
//! connections, a full listener, and the listen backlog. Real loopback sockets, every
//! wait bounded.

mod common;

use common::*;

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
