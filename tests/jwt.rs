//! Entra ID app tokens from callers, verified against a key set served by the simulator,
//! alongside API keys; per-app limits.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use graph_session_proxy::config::{CallerMode, JwtAppSettings, JwtSettings};
use graph_session_proxy::sim::{Faults, SimConfig};
use graph_session_proxy::Kind;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const TENANT: &str = "5466a424-aadf-425c-9b24-034ca28d4bdd";
const AUDIENCE: &str = "api://graph-session-proxy";
const RSA_KEY: &[u8] = include_bytes!("fixtures/jwt-rsa.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/jwt-rsa.pub.pem");
const OTHER_RSA_KEY: &[u8] = include_bytes!("fixtures/jwt-rsa-other.pem");
const EC_KEY: &[u8] = include_bytes!("fixtures/jwt-ec.pem");

fn issuer() -> String {
    format!("https://login.microsoftonline.com/{TENANT}/v2.0")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(app: &str) -> serde_json::Value {
    json!({
        "iss": issuer(),
        "aud": AUDIENCE,
        "azp": app,
        "sub": app,
        "roles": ["Sessions.Read"],
        "iat": now(),
        "nbf": now() - 10,
        "exp": now() + 3600,
    })
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_KEY).unwrap()
}

fn valid(app: &str) -> String {
    sign(Algorithm::RS256, "test-rsa", &rsa(), &claims(app))
}

fn b64(value: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

async fn harness(apps: Vec<JwtAppSettings>) -> Harness {
    Harness::with(
        move |s| {
            let sim = s.graph.base_url.clone().unwrap();
            s.callers.modes = vec![CallerMode::ApiKey, CallerMode::Jwt];
            s.callers.jwt = Some(JwtSettings {
                issuer: Some(issuer()),
                audience: Some(AUDIENCE.to_string()),
                jwks_url: Some(format!("{sim}/{TENANT}/discovery/v2.0/keys")),
                required_roles: vec!["Sessions.Read".to_string()],
                leeway: Duration::from_secs(30),
                apps,
                ..JwtSettings::default()
            });
        },
        SimConfig {
            jwks: Some(include_str!("fixtures/jwks.json").to_string()),
            ..SimConfig::default()
        },
    )
    .await
}

async fn status_with(h: &Harness, url: &str, token: &str) -> (u16, serde_json::Value) {
    let r = h.http.get(url).bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn valid_tokens_pass_and_every_bad_token_is_refused_before_graph() {
    let h = harness(Vec::new()).await;
    let url = h.seed_url();
    for (what, token) in [
        ("RS256", valid("app-a")),
        (
            "PS256",
            sign(Algorithm::PS256, "test-rsa", &rsa(), &claims("app-a")),
        ),
        (
            "ES256",
            sign(
                Algorithm::ES256,
                "test-ec",
                &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
                &claims("app-a"),
            ),
        ),
    ] {
        let (status, body) = status_with(&h, &url, &token).await;
        assert_eq!(status, 200, "{what}: {body}");
    }
    let graph_calls = h.stats().graph_requests;
    assert_eq!(graph_calls, 1);

    let mut expired = claims("app-a");
    expired["exp"] = json!(now() - 120);
    let mut not_yet = claims("app-a");
    not_yet["nbf"] = json!(now() + 600);
    let mut wrong_iss = claims("app-a");
    wrong_iss["iss"] = json!("https://login.microsoftonline.com/another-tenant/v2.0");
    let mut wrong_aud = claims("app-a");
    wrong_aud["aud"] = json!("api://something-else");
    let mut no_role = claims("app-a");
    no_role["roles"] = json!(["Other.Read"]);
    let mut no_exp = claims("app-a");
    no_exp.as_object_mut().unwrap().remove("exp");
    let none_alg = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "test-rsa"})),
        b64(&claims("app-a"))
    );
    let hs256_with_public_key = sign(
        Algorithm::HS256,
        "test-rsa",
        &EncodingKey::from_secret(RSA_PUBLIC).unwrap(),
        &claims("app-a"),
    );
    let other_key = EncodingKey::from_rsa_pem(OTHER_RSA_KEY).unwrap();
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "expired",
            sign(Algorithm::RS256, "test-rsa", &rsa(), &expired),
            401,
        ),
        (
            "not yet valid",
            sign(Algorithm::RS256, "test-rsa", &rsa(), &not_yet),
            401,
        ),
        (
            "wrong issuer",
            sign(Algorithm::RS256, "test-rsa", &rsa(), &wrong_iss),
            401,
        ),
        (
            "wrong audience",
            sign(Algorithm::RS256, "test-rsa", &rsa(), &wrong_aud),
            401,
        ),
        (
            "no exp",
            sign(Algorithm::RS256, "test-rsa", &rsa(), &no_exp),
            401,
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, "rotated-away", &rsa(), &claims("app-a")),
            401,
        ),
        ("alg none", none_alg, 401),
        ("HS256 with the public key", hs256_with_public_key, 401),
        (
            "bad signature",
            sign(Algorithm::RS256, "test-rsa", &other_key, &claims("app-a")),
            401,
        ),
        (
            "EC alg on the RSA key",
            sign(
                Algorithm::ES256,
                "test-rsa",
                &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
                &claims("app-a"),
            ),
            401,
        ),
        (
            "missing role",
            sign(Algorithm::RS256, "test-rsa", &rsa(), &no_role),
            403,
        ),
        (
            "tampered payload",
            {
                let t = valid("app-a");
                let parts: Vec<&str> = t.split('.').collect();
                let mut forged = claims("app-a");
                forged["roles"] = json!(["Sessions.Read", "Admin"]);
                format!("{}.{}.{}", parts[0], b64(&forged), parts[2])
            },
            401,
        ),
        ("garbage", "eyJhbGciOi.not-json.x".to_string(), 401),
    ];
    for (what, token, expected) in cases {
        let (status, body) = status_with(
            &h,
            &h.url("webinars", SEED_EVENT, "gen-jwt-refused"),
            &token,
        )
        .await;
        assert_eq!(status, expected, "{what}: {body}");
        assert!(body["error"]["code"].is_string(), "{what}: {body}");
    }
    assert_eq!(
        h.stats().graph_requests,
        graph_calls,
        "no refused token reached Graph"
    );
    // API keys still work alongside tokens.
    assert_eq!(h.get(&url).await.status(), 200);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_the_key_set_a_handful_of_times() {
    let h = harness(Vec::new()).await;
    assert_eq!(status_with(&h, &h.seed_url(), &valid("app-a")).await.0, 200);
    assert_eq!(h.stats().jwks_requests, 1);
    // Unknown kids are refused before any signature check, so a cheap HS256 signature is
    // enough for the flood (and keeps the test fast in debug builds).
    let cheap = EncodingKey::from_secret(b"flood").unwrap();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let http = h.http.clone();
        let url = h.seed_url();
        let token = sign(
            Algorithm::HS256,
            &format!("random-kid-{i}-{}", uuid::Uuid::new_v4()),
            &cheap,
            &claims("app-a"),
        );
        tasks.push(tokio::spawn(async move {
            http.get(&url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
        if tasks.len() == 100 {
            for t in tasks.drain(..) {
                assert_eq!(t.await.unwrap(), 401);
            }
            h.clock.advance(Duration::from_secs(3));
        }
    }
    let fetches = h.stats().jwks_requests;
    assert!(
        fetches <= 3,
        "{fetches} key set fetches for 1000 unknown kids over 30 s"
    );
    // Valid tokens are unaffected.
    assert_eq!(status_with(&h, &h.seed_url(), &valid("app-a")).await.0, 200);
}

#[tokio::test]
async fn the_key_set_is_kept_while_its_endpoint_is_down() {
    let h = harness(Vec::new()).await;
    assert_eq!(status_with(&h, &h.seed_url(), &valid("app-a")).await.0, 200);
    h.faults(Faults {
        jwks_down: true,
        ..Faults::default()
    });
    // Past jwks_cache (1h): a refetch is due and fails; the known keys keep working.
    h.clock.advance(Duration::from_secs(3700));
    assert_eq!(status_with(&h, &h.seed_url(), &valid("app-a")).await.0, 200);
    assert!(h.stats().jwks_requests >= 2);
}

#[tokio::test]
async fn per_app_limits() {
    let h = harness(vec![
        JwtAppSettings {
            client_id: Some("townhall-app".into()),
            kinds: Some(vec![Kind::Townhalls]),
            ..JwtAppSettings::default()
        },
        JwtAppSettings {
            client_id: Some("tenant-a-app".into()),
            events: Some(vec!["*@5466a424-aadf-425c-9b24-034ca28d4bdd".into()]),
            ..JwtAppSettings::default()
        },
        JwtAppSettings {
            role: Some("Sessions.Read".into()),
            kinds: Some(vec![Kind::Webinars]),
            ..JwtAppSettings::default()
        },
    ])
    .await;
    let townhall = h.url("townhalls", TOWNHALL_EVENT, "gen-limits");
    let webinar_tenant_a = h.seed_url();
    let webinar_other_tenant = h.url(
        "webinars",
        "c0ffee00-0000-0000-0000-000000000000@another-tenant",
        "gen-limits",
    );

    let (status, body) = status_with(&h, &webinar_tenant_a, &valid("townhall-app")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(
        status_with(&h, &webinar_other_tenant, &valid("tenant-a-app"))
            .await
            .0,
        403
    );
    // Apps matched by role only: webinars only.
    assert_eq!(
        status_with(&h, &townhall, &valid("some-other-app")).await.0,
        403
    );
    assert_eq!(h.stats().graph_requests, 0, "refusals never reach Graph");

    assert_eq!(
        status_with(&h, &townhall, &valid("townhall-app")).await.0,
        200
    );
    assert_eq!(
        status_with(&h, &webinar_tenant_a, &valid("tenant-a-app"))
            .await
            .0,
        200
    );
    assert_eq!(
        status_with(&h, &webinar_other_tenant, &valid("some-other-app"))
            .await
            .0,
        200
    );
}

/// Apps only their tokens name each get buckets of their own, but a flood of them keeps
/// at most 10,000 (least recently seen dropped first), and `/metrics` counts them all as
/// one `other` caller: memory stays bounded however many app ids arrive.
#[tokio::test]
async fn a_flood_of_unknown_app_ids_with_valid_tokens_keeps_memory_bounded() {
    const APPS: usize = 12_000;
    const BOUND: f64 = 10_000.0;
    let h = Harness::with(
        |s| {
            let sim = s.graph.base_url.clone().unwrap();
            s.limits.requests_per_second = 1_000;
            s.callers.modes = vec![CallerMode::Jwt];
            s.callers.jwt = Some(JwtSettings {
                issuer: Some(issuer()),
                audience: Some(AUDIENCE.to_string()),
                jwks_url: Some(format!("{sim}/{TENANT}/discovery/v2.0/keys")),
                ..JwtSettings::default()
            });
        },
        SimConfig {
            jwks: Some(include_str!("fixtures/jwks.json").to_string()),
            ..SimConfig::default()
        },
    )
    .await;
    let url = h.seed_url();
    let key = EncodingKey::from_ec_pem(EC_KEY).unwrap();
    let tokens: Vec<String> = (0..APPS)
        .map(|n| {
            sign(
                Algorithm::ES256,
                "test-ec",
                &key,
                &claims(&format!("flood-{n}")),
            )
        })
        .collect();
    let gauge = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("graph_session_proxy_limited_callers "))
            .expect("limited_callers gauge")
            .parse()
            .unwrap()
    };
    for (n, chunk) in tokens.chunks(500).enumerate() {
        let answers = chunk.iter().map(|t| status_with(&h, &url, t));
        for (status, body) in futures::future::join_all(answers).await {
            assert_eq!(status, 200, "{body}");
        }
        let tracked = gauge(&metrics(&h, h.admin).await);
        assert!(
            tracked <= BOUND,
            "after {} apps: {tracked} tracked",
            (n + 1) * 500
        );
    }
    let text = metrics(&h, h.admin).await;
    let tracked = gauge(&text);
    assert!(
        tracked >= BOUND * 0.9,
        "the recent apps keep their buckets: {tracked}"
    );
    let series = text
        .lines()
        .filter(|l| l.starts_with("graph_session_proxy_requests_total{"))
        .count();
    assert!(series <= 3, "one series for all unnamed apps: {text}");
    assert!(!text.contains("flood-"), "no app id in /metrics");
    assert_eq!(h.stats().graph_requests, 1);
}

#[tokio::test]
async fn a_remembered_token_stops_counting_at_its_expiry() {
    let h = harness(Vec::new()).await;
    // Expired 27 s ago: still within the 30 s leeway, for about three more seconds.
    let mut almost = claims("app-a");
    almost["exp"] = json!(now() - 27);
    let token = sign(Algorithm::RS256, "test-rsa", &rsa(), &almost);
    assert_eq!(status_with(&h, &h.seed_url(), &token).await.0, 200);
    assert_eq!(status_with(&h, &h.seed_url(), &token).await.0, 200);
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let (status, body) = status_with(&h, &h.seed_url(), &token).await;
    assert_eq!(status, 401, "{body}");
}
