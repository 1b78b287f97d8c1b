//! At debug level, the logs of a whole run show neither the client secret, nor any access
//! token, nor a caller's API key. (Its own test binary: the log capture is process-global.)

mod common;

use common::*;
use graph_session_proxy::sim::{Faults, SimConfig};

#[tokio::test]
async fn debug_logs_never_show_secrets_or_tokens() {
    let capture = LogCapture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let h = Harness::start().await;
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    h.faults(Faults {
        reject_tokens: 1,
        ..Faults::default()
    });
    assert_eq!(
        h.get(&h.url("townhalls", TOWNHALL_EVENT, "gen-log"))
            .await
            .status(),
        200
    );
    h.faults(Faults {
        graph_status: Some(403),
        ..Faults::default()
    });
    assert_eq!(
        h.get(&h.url("townhalls", TOWNHALL_EVENT, "gen-403"))
            .await
            .status(),
        502
    );
    assert_eq!(
        h.http
            .get(h.seed_url())
            .bearer_auth("wrong-key-123")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let tokens = h.sim.issued_tokens();
    assert_eq!(tokens.len(), 2);

    let wrong = Harness::with(
        |s| s.auth.client_secret = Some("wrong-secret-456".to_string().into()),
        SimConfig::default(),
    )
    .await;
    assert_eq!(wrong.get(&wrong.seed_url()).await.status(), 502);

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("request"), "the capture works: {logs}");
    assert!(
        logs.contains("AADSTS7000215"),
        "the refusal is logged with its code"
    );
    for secret in [
        "sim-client-secret",
        "wrong-secret-456",
        API_KEY,
        "wrong-key-123",
    ]
    .into_iter()
    .map(str::to_string)
    .chain(tokens)
    {
        assert!(!logs.contains(&secret), "{secret} appears in the logs");
    }
}
