//! Certificate credentials: a client assertion signed with the certificate's key, verified
//! by the simulator against the registered certificate.

mod common;

use std::path::PathBuf;

use common::*;
use graph_session_proxy::config::{AssertionAlgorithm, ClientCertificate, Purpose, Settings};
use graph_session_proxy::sim::SimConfig;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name)
}

async fn harness(cert: &str, key: &str, algorithm: AssertionAlgorithm) -> Harness {
    let certificate = ClientCertificate::load(&fixture(cert), &fixture(key)).unwrap();
    Harness::with(
        move |s| {
            s.auth.client_secret = None;
            s.auth.certificate = Some(certificate);
            s.auth.assertion_algorithm = algorithm;
        },
        SimConfig {
            client_certificate: Some(std::fs::read_to_string(fixture("client-cert.pem")).unwrap()),
            ..SimConfig::default()
        },
    )
    .await
}

#[tokio::test]
async fn the_matching_key_is_accepted_with_ps256_and_rs256() {
    for algorithm in [AssertionAlgorithm::Ps256, AssertionAlgorithm::Rs256] {
        let h = harness("client-cert.pem", "jwt-rsa.pem", algorithm).await;
        let r = h.get(&h.seed_url()).await;
        assert_eq!(
            r.status(),
            200,
            "{algorithm:?}: {}",
            r.text().await.unwrap()
        );
        assert_eq!(h.stats().tokens_issued, 1);
    }
}

#[tokio::test]
async fn an_assertion_signed_by_another_key_is_rejected() {
    // The other certificate's key: signature (and thumbprint) do not match the registration.
    let h = harness(
        "client-cert-other.pem",
        "jwt-rsa-other.pem",
        AssertionAlgorithm::Ps256,
    )
    .await;
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "tokenUnavailable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("AADSTS700027"),
        "{v}"
    );
    // The right certificate named, the wrong key signing: rejected too.
    let h = harness(
        "client-cert.pem",
        "jwt-rsa-other.pem",
        AssertionAlgorithm::Ps256,
    )
    .await;
    assert_eq!(h.get(&h.seed_url()).await.status(), 502);
    assert_eq!(h.stats().tokens_issued, 0);
    assert_eq!(h.stats().graph_requests, 0);
}

#[test]
fn certificate_configuration_is_validated() {
    let base = base_toml().replace("client_secret = \"sim-client-secret\"", "");
    let cert = fixture("client-cert.pem").display().to_string();
    let key = fixture("jwt-rsa.pem").display().to_string();
    let text = base.replace(
        "[auth]",
        &format!("[auth]\ncertificate_file = {cert:?}\nprivate_key_file = {key:?}\nassertion_algorithm = \"RS256\""),
    );
    let s = Settings::from_toml(&text, Purpose::Serve).unwrap();
    assert!(s.auth.certificate.is_some());
    assert!(!format!("{s:?}").contains("PRIVATE KEY"));
    assert!(!s.redacted_toml().contains("PRIVATE KEY"));
    let only_cert = base.replace("[auth]", &format!("[auth]\ncertificate_file = {cert:?}"));
    let err = Settings::from_toml(&only_cert, Purpose::Serve)
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth.private_key_file"), "{err}");
    let swapped = base.replace(
        "[auth]",
        &format!("[auth]\ncertificate_file = {key:?}\nprivate_key_file = {cert:?}"),
    );
    let err = Settings::from_toml(&swapped, Purpose::Serve)
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth.certificate_file"), "{err}");
}
