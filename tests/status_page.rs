//! The admin listener's status page: `/status.json` against the traffic that made it,
//! the admin token, and `/status` in a real headless Chromium (Debian's, driven by
//! playwright-core from `tests/browser/`), which `.ci/test` installs.
//!
//! Without Chromium or `tests/browser/node_modules` the browser test says so and passes,
//! unless `GSP_BROWSER_TESTS=required` (set by `.ci/test`), where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use graph_session_proxy::sim::Faults;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn status_json(h: &Harness) -> Value {
    h.http
        .get(format!("http://{}/status.json", h.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Four hits, one miss, one 404, one unauthenticated request.
async fn a_little_load(h: &Harness) {
    for _ in 0..5 {
        assert_eq!(h.get(&h.seed_url()).await.status(), 200);
    }
    let missing = h.url("webinars", SEED_EVENT, "no-such-session");
    assert_eq!(h.get(&missing).await.status(), 404);
    let anonymous = h.http.get(h.seed_url()).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn status_json_reports_the_last_minute() {
    let h = Harness::start().await;
    a_little_load(&h).await;
    let s = status_json(&h).await;
    let r = &s["requests"];
    assert_eq!(r["total"], 7, "{s:#}");
    assert_eq!(r["hits"], 4);
    assert_eq!(
        r["misses"], 2,
        "the first seed read and the 404 asked Graph"
    );
    assert_eq!(r["hit_ratio"], 4.0 / 6.0);
    assert!(r["p50_seconds"].as_f64().unwrap() > 0.0);
    assert!(r["p99_seconds"].as_f64().unwrap() >= r["p50_seconds"].as_f64().unwrap());
    assert_eq!(r["sparkline_per_second"].as_array().unwrap().len(), 90);
    assert_eq!(s["graph"]["total"], 2);
    assert_eq!(s["graph"]["outcomes"]["ok"], 1);
    assert_eq!(s["graph"]["outcomes"]["not_found"], 1);
    assert_eq!(s["token"]["state"], "valid");
    assert!(s["token"]["expires_in_seconds"].as_u64().unwrap() > 3000);
    assert_eq!(s["token"]["last_error"], Value::Null);
    assert_eq!(s["gate"]["state"], "open");
    assert_eq!(s["shared"], Value::Null, "no shared tier configured");
    assert_eq!(
        s["cache"]["entries"], 2,
        "the session and the remembered 404"
    );
    assert_eq!(s["cache"]["max_bytes"], h.settings.cache.max_bytes.as_u64());
    let callers = s["callers"].as_array().unwrap();
    assert_eq!(callers[0]["requests"], 6);
    let names: Vec<&str> = callers
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains(API_KEY)),
        "callers are named, never by key: {names:?}"
    );
}

#[tokio::test]
async fn a_closed_gate_and_a_refused_token_show() {
    let h = Harness::start().await;
    h.faults(Faults {
        graph_status: Some(429),
        graph_status_count: Some(1),
        retry_after: Some("60".into()),
        ..Faults::default()
    });
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-throttled")).await;
    assert_eq!(r.status(), 503);
    let s = status_json(&h).await;
    assert_eq!(s["gate"]["state"], "throttled", "{s:#}");
    let left = s["gate"]["closed_for_seconds"].as_u64().unwrap();
    assert!((58..=60).contains(&left), "{left}");
    assert!(s["gate"]["until"].as_str().unwrap().ends_with('Z'));
    assert!(s["gate"]["reason"].as_str().unwrap().contains("429"));
    let closure = &s["gate"]["last_closure"];
    assert!(
        closure["why"]
            .as_str()
            .unwrap()
            .contains("asked to wait 60s"),
        "{closure}"
    );
    assert!(closure["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s["graph"]["outcomes"]["throttled"], 1);
    assert_eq!(s["requests"]["server_errors"], 1);
}

#[tokio::test]
async fn a_refused_token_shows_its_aadsts_code_escaped_and_no_key_appears() {
    let h = Harness::start().await;
    // Graph rejects the token in use; the token endpoint then refuses a new one.
    h.faults(Faults {
        reject_tokens: 1,
        token_status: Some(400),
        ..Faults::default()
    });
    let r = h.get(&h.url("webinars", SEED_EVENT, "gen-no-token")).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    let s = status_json(&h).await;
    let error = &s["token"]["last_error"];
    assert_eq!(error["aadsts"], "AADSTS90000", "{s:#}");
    assert!(error["message"].as_str().unwrap().contains("AADSTS90000"));
    let html = h
        .http
        .get(format!("http://{}/status", h.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("<span class=\"bad\">AADSTS90000</span>"),
        "{html}"
    );
    for body in [html, s.to_string()] {
        assert!(!body.contains(API_KEY), "a caller's key on the status page");
    }
}

#[tokio::test]
async fn the_admin_token_guards_the_page_as_bearer_or_basic_password() {
    let h = Harness::with(
        |s| s.server.admin_token_sha256 = Some(sha256_hex("admin-secret-1")),
        Default::default(),
    )
    .await;
    for path in ["/status", "/status.json"] {
        let url = format!("http://{}{path}", h.admin);
        let r = h.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let challenges: Vec<_> = r.headers().get_all("www-authenticate").iter().collect();
        assert!(challenges
            .iter()
            .any(|c| c.to_str().unwrap().starts_with("Basic ")));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthenticated");
        let wrong = h
            .http
            .get(&url)
            .bearer_auth("admin-secret-2")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let bearer = h
            .http
            .get(&url)
            .bearer_auth("admin-secret-1")
            .send()
            .await
            .unwrap();
        assert_eq!(bearer.status(), 200, "{path}");
        let basic = base64::engine::general_purpose::STANDARD.encode("oncall:admin-secret-1");
        let r = h
            .http
            .get(&url)
            .header("authorization", format!("Basic {basic}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn the_page_holds_its_numbers_and_a_strict_policy() {
    let h = Harness::start().await;
    a_little_load(&h).await;
    let r = h
        .http
        .get(format!("http://{}/status", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    assert!(
        !csp.contains("unsafe") && !csp.contains("script-src"),
        "{csp}"
    );
    let html = r.text().await.unwrap();
    assert!(
        !html.contains("<script"),
        "readable without JavaScript: no scripts at all"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing external"
    );
    assert!(html.contains("<dd id=\"hit-ratio\">66.7%</dd>"), "{html}");
    assert!(html.contains("<dd id=\"token-state\" class=\"ok\">valid</dd>"));
    assert!(html.contains("<dd id=\"gate-state\" class=\"ok\">open</dd>"));
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
}

fn browser_required() -> bool {
    std::env::var("GSP_BROWSER_TESTS").is_ok_and(|v| v == "required")
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    path.exists().then_some(path)
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

#[tokio::test]
async fn headless_chromium_renders_the_page_and_sees_the_gate_close() {
    let tools = browser_dir().join("node_modules/playwright-core");
    let Some(chromium) = chromium().filter(|_| tools.exists()) else {
        assert!(
            !browser_required(),
            "GSP_BROWSER_TESTS=required but Chromium or {} is missing (.ci/test installs both)",
            tools.display()
        );
        eprintln!("skipped: no Chromium or playwright-core (run .ci/test to install them)");
        return;
    };
    let h = Harness::start().await;
    a_little_load(&h).await;
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let refresh_ms = 5_000;
    let mut child = tokio::process::Command::new("node")
        .arg(browser_dir().join("status-page.mjs"))
        .arg(format!("http://{}/status", h.admin))
        .arg(&shot)
        .arg("throttled")
        .arg((2 * refresh_ms + 3_000).to_string())
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let read = |line: Option<String>| -> Value {
        serde_json::from_str(&line.expect("the browser script printed a line")).unwrap()
    };
    let loaded = read(
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    );
    let expected = status_json(&h).await;
    assert_eq!(loaded["status"], 200, "{loaded:#}");
    assert_eq!(
        loaded["errors"],
        serde_json::json!([]),
        "no console or page errors: {loaded:#}"
    );
    let shows = &loaded["shows"];
    let ratio = expected["requests"]["hit_ratio"].as_f64().unwrap();
    assert_eq!(
        shows["hit_ratio"],
        format!("{:.1}%", ratio * 100.0),
        "{loaded:#}"
    );
    assert_eq!(shows["token_state"], expected["token"]["state"]);
    assert_eq!(shows["gate_state"], expected["gate"]["state"]);
    assert_eq!(shows["scripts"], 0);
    assert_eq!(shows["sparkline"], true);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot at {}",
        shot.display()
    );

    // Graph throttles: the page, reloading itself, shows it within its refresh interval.
    h.faults(Faults {
        graph_status: Some(429),
        graph_status_count: Some(1),
        retry_after: Some("120".into()),
        ..Faults::default()
    });
    assert_eq!(
        h.get(&h.url("webinars", SEED_EVENT, "gen-page-429"))
            .await
            .status(),
        503
    );
    assert_eq!(status_json(&h).await["gate"]["state"], "throttled");
    // Closed: the script's clock starts now.
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"closed\n")
        .await
        .unwrap();
    drop(stdin);
    let waited = read(
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    );
    let seen = waited["seen_after_ms"].as_u64();
    assert!(
        // The next reload starts within the refresh interval of the closure; the slack is
        // for loading and rendering the page on a busy machine.
        seen.is_some_and(|ms| ms <= refresh_ms + 2_500),
        "the page showed the closed gate within its {refresh_ms} ms refresh: {waited:#}"
    );
    assert_eq!(waited["errors"], serde_json::json!([]), "{waited:#}");
    assert!(waited["shows"]["gate_until"]
        .as_str()
        .unwrap()
        .contains("left"));
    assert!(child.wait().await.unwrap().success());
}
