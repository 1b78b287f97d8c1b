//! Behind a corporate egress proxy: Graph and the token endpoint reached only through an
//! HTTP CONNECT proxy (`graph.proxy_url`, credentials in its userinfo), over TLS that a
//! private CA vouches for (`graph.ca_file`).

mod common;

use std::sync::atomic::Ordering;

use common::egress::Egress;
use common::*;

#[tokio::test]
async fn every_graph_and_token_request_goes_through_the_connect_proxy() {
    let e = Egress::new().await;
    let url = format!("http://egress-user:egress%20pass@{}", e.proxy);
    let h = e.proxy_with(Some(url), Some(&e.ca_pem)).await;
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-egress")).await;
    assert_eq!(r.status(), 200);
    let stats = e.backend.stats();
    assert_eq!(
        stats.token_requests, 1,
        "the token request reached the simulator"
    );
    assert_eq!(stats.graph_requests, 2);
    let tunnels = e.log.tunnels.load(Ordering::SeqCst);
    assert!(tunnels >= 1);
    assert_eq!(e.log.other.load(Ordering::SeqCst), 0);
    assert_eq!(
        e.reached.load(Ordering::SeqCst),
        tunnels,
        "every connection to the upstream came through the proxy"
    );
    for (target, auth) in e.log.seen.lock().unwrap().iter() {
        assert_eq!(*target, format!("localhost:{}", e.front.port()));
        // base64("egress-user:egress pass")
        assert_eq!(
            auth.as_deref(),
            Some("Basic ZWdyZXNzLXVzZXI6ZWdyZXNzIHBhc3M=")
        );
    }
}

#[tokio::test]
async fn tls_signed_by_a_private_ca_needs_ca_file_and_the_failure_says_so() {
    let e = Egress::new().await;
    let url = format!("http://{}", e.proxy);
    let h = e.proxy_with(Some(url.clone()), None).await;
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "tokenUnavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("TLS to localhost") && message.contains("graph.ca_file"),
        "{message}"
    );
    assert_eq!(e.backend.stats().token_requests, 0);

    let h = e.proxy_with(Some(url), Some(&e.ca_pem)).await;
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    assert_eq!(e.backend.stats().token_requests, 1);
}
