//! Secretless and rotating credentials against the simulator: workload identity (a
//! federated token file kubelet rotates), managed identities (IMDS and App Service, system-
//! and user-assigned), and a client secret file rewritten while the proxy runs.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use graph_session_proxy::config::CredentialKind;
use graph_session_proxy::sim::{Faults, FederatedTrust, SimConfig};
use serde_json::json;

const ISSUER: &str = "https://oidc.prod-aks.azure.com/5466a424-aadf-425c-9b24-034ca28d4bdd/";
const SUBJECT: &str = "system:serviceaccount:graph-session-proxy:graph-session-proxy";
const RSA_KEY: &[u8] = include_bytes!("fixtures/jwt-rsa.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/jwt-rsa.pub.pem");

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A projected service-account token as the Workload ID webhook mounts it.
fn assertion(exp: i64, jti: &str) -> String {
    let claims = json!({
        "iss": ISSUER, "sub": SUBJECT, "aud": ["api://AzureADTokenExchange"],
        "iat": now() - 60, "nbf": now() - 60, "exp": exp, "jti": jti,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
    )
    .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gsp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces a file as kubelet and the CSI driver do: a new file renamed over the old.
fn rewrite(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Waits (real time, up to 10 s) until `done` holds of the simulator's stats.
async fn until(h: &Harness, what: &str, done: impl Fn(&graph_session_proxy::sim::Stats) -> bool) {
    for _ in 0..1000 {
        if done(&h.stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: {:?}", h.stats());
}

fn session(h: &Harness, n: &str) -> String {
    h.url("webinars", SEED_EVENT, &format!("gen-identity-{n}"))
}

/// Past the token's refresh point (3599 s tokens, 300 s margin), before its expiry.
const TO_REFRESH: Duration = Duration::from_secs(3300);

#[tokio::test]
async fn workload_identity_sends_the_files_current_token_and_an_expired_one_fails_only_after_expiry(
) {
    let dir = temp_dir("federated");
    let file = dir.join("azure-identity-token");
    let first = assertion(now() + 3600, "first");
    rewrite(&file, &first);
    let path = file.clone();
    let h = Harness::with(
        move |s| {
            s.auth.client_secret = None;
            s.auth.credential = Some(CredentialKind::WorkloadIdentity);
            s.auth.federated_token_file = Some(path);
        },
        SimConfig {
            federated: Some(FederatedTrust {
                issuer: ISSUER.into(),
                subject: SUBJECT.into(),
                public_key_pem: RSA_PUBLIC.into(),
            }),
            ..SimConfig::default()
        },
    )
    .await;
    assert_eq!(h.get(&session(&h, "1")).await.status(), 200);
    assert_eq!(h.stats().last_assertion.as_deref(), Some(first.as_str()));

    // kubelet rotates the token: the next token request carries the new one.
    let second = assertion(now() + 3600, "second");
    rewrite(&file, &second);
    h.clock.advance(TO_REFRESH);
    assert_eq!(h.get(&session(&h, "2")).await.status(), 200);
    until(&h, "a refresh with the new assertion", |s| {
        s.tokens_issued == 2 && s.last_assertion.as_deref() == Some(second.as_str())
    })
    .await;

    // An expired assertion: the refresh fails, but the token in hand serves until it expires.
    rewrite(&file, &assertion(now() - 600, "expired"));
    h.clock.advance(TO_REFRESH);
    assert_eq!(h.get(&session(&h, "3")).await.status(), 200);
    until(&h, "a refused refresh", |s| s.token_failures >= 1).await;
    assert_eq!(
        h.get(&session(&h, "4")).await.status(),
        200,
        "never before expiry"
    );
    h.clock.advance(Duration::from_secs(400));
    let r = h.get(&session(&h, "5")).await;
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "tokenUnavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("AADSTS700024"),
        "{body}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn managed(endpoint: &str, client_id: Option<&str>, header: Option<&str>) -> Harness {
    let (endpoint, client_id, header) = (
        endpoint.to_string(),
        client_id.map(str::to_string),
        header.map(str::to_string),
    );
    Harness::with(
        move |s| {
            let sim = s.graph.base_url.clone().unwrap();
            s.auth.client_secret = None;
            s.auth.client_id = None;
            s.auth.tenant_id = None;
            s.auth.credential = Some(CredentialKind::ManagedIdentity);
            s.auth.managed_identity_endpoint = Some(format!("{sim}{endpoint}"));
            s.auth.managed_identity_client_id = client_id;
            s.auth.azure_env.identity_header = header.map(Into::into);
        },
        SimConfig::default(),
    )
    .await
}

#[tokio::test]
async fn managed_identities_of_imds_and_app_service_serve_sessions() {
    let user_assigned = SimConfig::default().user_assigned_client_id;
    for (endpoint, client_id, header) in [
        ("/metadata/identity/oauth2/token", None, None),
        (
            "/metadata/identity/oauth2/token",
            Some(user_assigned.as_str()),
            None,
        ),
        ("/msi/token", None, Some("sim-identity-header")),
        (
            "/msi/token",
            Some(user_assigned.as_str()),
            Some("sim-identity-header"),
        ),
    ] {
        let h = managed(endpoint, client_id, header).await;
        let r = h.get(&h.seed_url()).await;
        assert_eq!(
            r.status(),
            200,
            "{endpoint} {client_id:?}: {}",
            r.text().await.unwrap()
        );
        let stats = h.stats();
        assert_eq!(stats.managed_requests, 1, "{endpoint}");
        assert_eq!(stats.token_requests, 0, "no client credentials at all");
        assert_eq!(stats.last_managed_client_id.as_deref(), client_id);
    }
    // The wrong App Service header is refused, and named.
    let h = managed("/msi/token", None, Some("not-the-header")).await;
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("tokenUnavailable")
            && body.contains("refused")
            && body.contains("invalid_request"),
        "{body}"
    );
}

#[tokio::test]
async fn imds_failing_twice_is_retried_with_backoff() {
    let h = managed("/metadata/identity/oauth2/token", None, None).await;
    h.faults(Faults {
        imds_status: Some(503),
        imds_status_count: Some(2),
        ..Faults::default()
    });
    let started = Instant::now();
    let r = h.get(&h.seed_url()).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(h.stats().managed_requests, 3);
    // Pauses of 1 s and then 2 s between the three attempts.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_rewritten_client_secret_file_is_used_without_a_restart() {
    let dir = temp_dir("secret-file");
    let file = dir.join("client-secret");
    rewrite(&file, "sim-client-secret\n");
    let path = file.clone();
    let h = Harness::with(
        move |s| {
            s.auth.client_secret = None;
            s.auth.client_secret_file = Some(path);
        },
        SimConfig::default(),
    )
    .await;
    assert_eq!(h.get(&session(&h, "s1")).await.status(), 200);

    // Rotated in Key Vault and synced to the file, the old one revoked at once: the next
    // token request uses the new secret.
    h.faults(Faults {
        client_secrets: Some(vec!["second-secret".into()]),
        ..Faults::default()
    });
    rewrite(&file, "second-secret\n");
    h.clock.advance(TO_REFRESH);
    assert_eq!(h.get(&session(&h, "s2")).await.status(), 200);
    until(&h, "a token with the new secret", |s| s.tokens_issued == 2).await;
    assert_eq!(h.stats().token_failures, 0);

    // Revoked before the file catches up: one failed token request, then the new secret.
    h.faults(Faults {
        client_secrets: Some(vec!["third-secret".into()]),
        ..Faults::default()
    });
    h.clock.advance(TO_REFRESH);
    assert_eq!(h.get(&session(&h, "s3")).await.status(), 200);
    until(&h, "the refused refresh", |s| s.token_failures == 1).await;
    rewrite(&file, "third-secret\n");
    until(&h, "a token with the third secret", |s| {
        s.tokens_issued == 3
    })
    .await;
    assert_eq!(
        h.stats().token_failures,
        1,
        "at most one failed token request"
    );

    // Rotated while a token request is on its way, and revoked before Entra answers: the
    // answer is invalid_client, the proxy reads the file again, finds it changed and asks
    // once more, so a caller waiting for a token (the old one has expired) is served.
    h.faults(Faults {
        client_secrets: Some(vec!["third-secret".into()]),
        token_latency_ms: 800,
        ..Faults::default()
    });
    h.clock.advance(Duration::from_secs(3600));
    let url = session(&h, "s4");
    let waiting = tokio::spawn({
        let http = h.http.clone();
        async move { http.get(&url).bearer_auth(API_KEY).send().await.unwrap() }
    });
    until(&h, "the token request on its way", |s| {
        s.token_requests >= 5
    })
    .await;
    rewrite(&file, "fourth-secret\n");
    h.faults(Faults {
        client_secrets: Some(vec!["fourth-secret".into()]),
        token_latency_ms: 800,
        ..Faults::default()
    });
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    assert_eq!(h.stats().tokens_issued, 4);
    assert_eq!(h.stats().token_failures, 2, "the one refused on its way");

    let metrics = metrics(&h, h.admin).await;
    assert!(
        metrics.contains("graph_session_proxy_credential_reloads_total{outcome=\"ok\"} 3"),
        "{metrics}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
