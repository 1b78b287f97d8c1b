//! Log fields are written for people (issue #12, item 11): causes as their own texts
//! (`invalid_client (AADSTS7000215)`), waits in whole seconds (`30s`), in the text and the
//! JSON format alike; never Rust's `Debug` spelling of structs, `Some(..)` or
//! `29.786486933s`. (Its own test binary: the log capture is process-global.)

mod common;

use common::*;
use graph_session_proxy::sim::{Faults, SimConfig};

/// Runs the failures whose log lines people read: a refused secret, Graph throttling
/// with a fractional `Retry-After`, an open circuit.
async fn failures() {
    let h = Harness::with(
        |s| s.auth.client_secret = Some("wrong-secret-456".to_string().into()),
        SimConfig::default(),
    )
    .await;
    assert_eq!(h.get(&h.seed_url()).await.status(), 502);

    let h = Harness::with(|s| s.graph.max_retries = 0, SimConfig::default()).await;
    h.faults(Faults {
        graph_status: Some(429),
        retry_after: Some("29.786486933".to_string()),
        ..Faults::default()
    });
    assert_eq!(h.get(&h.seed_url()).await.status(), 503);
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-other"))
            .await
            .status(),
        503
    );
}

fn assert_readable(logs: &str) {
    for debug_form in [
        "Some(",
        "Refused {",
        "error: \\\"",
        "{ error:",
        "Duration",
        ".786486933s",
        "retry_in_ms",
        "cooldown_s",
    ] {
        assert!(
            !logs.contains(debug_form),
            "`{debug_form}` in the logs:\n{logs}"
        );
    }
    assert!(
        logs.contains("invalid_client (AADSTS7000215)"),
        "the refusal named by its code:\n{logs}"
    );
    assert!(
        logs.contains("retry in 30s"),
        "the wait in whole seconds:\n{logs}"
    );
}

#[tokio::test]
async fn text_and_json_log_fields_are_human_readable() {
    let text = LogCapture::default();
    let json = LogCapture::default();
    let (t, j) = (text.clone(), json.clone());
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || t.clone())
                .with_ansi(false),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(move || j.clone()),
        );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    failures().await;

    let text = text.text();
    assert_readable(&text);
    assert!(
        text.contains("cause=token endpoint refused: invalid_client (AADSTS7000215)"),
        "{text}"
    );
    let json = json.text();
    assert_readable(&json);
    // Every JSON line is JSON, and the request failure's cause is one readable string.
    let mut causes = Vec::new();
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(cause) = v["fields"]["cause"].as_str() {
            causes.push(cause.to_string());
        }
    }
    assert!(
        causes
            .iter()
            .any(|c| c == "token endpoint refused: invalid_client (AADSTS7000215)"),
        "{causes:?}"
    );
}
