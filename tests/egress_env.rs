//! `HTTPS_PROXY` and `NO_PROXY` when `graph.proxy_url` is absent. The environment is the
//! process's, so this binary holds this one test alone.

mod common;

use std::sync::atomic::Ordering;

use common::egress::Egress;

#[tokio::test]
async fn https_proxy_is_honoured_and_no_proxy_exempts_hosts() {
    let e = Egress::new().await;
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
    std::env::set_var("HTTPS_PROXY", format!("http://{}", e.proxy));
    let h = e.proxy_with(None, Some(&e.ca_pem)).await;
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    let tunnels = e.log.tunnels.load(Ordering::SeqCst);
    assert!(tunnels >= 1, "through HTTPS_PROXY");
    assert_eq!(e.reached.load(Ordering::SeqCst), tunnels, "nothing direct");

    std::env::set_var("NO_PROXY", "localhost");
    let direct = e.proxy_with(None, Some(&e.ca_pem)).await;
    assert_eq!(direct.get(&direct.seed_url()).await.status(), 200);
    assert_eq!(
        e.log.tunnels.load(Ordering::SeqCst),
        tunnels,
        "NO_PROXY: direct"
    );
    assert!(e.reached.load(Ordering::SeqCst) > tunnels);
    std::env::remove_var("HTTPS_PROXY");
    std::env::remove_var("NO_PROXY");
}
