//! The binary's `check-config`: exit 0 on the shipped example, 2 naming the key otherwise.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_graph-session-proxy");

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .env_remove("GSP__AUTH__CLIENT_SECRET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/graph-session-proxy.toml"
    ))
    .unwrap()
}

fn write(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn shipped_example_passes_and_hides_secrets() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/graph-session-proxy.toml"
    ));
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("token url:   https://login.microsoftonline.com/"),
        "{stdout}"
    );
    let with_secret = write(
        "with-secret.toml",
        &example().replace(
            "client_secret_file = \"/run/secrets/graph-client-secret\"",
            "client_secret = \"hunter2-very-secret\"",
        ),
    );
    let (code, stdout, stderr) = check(&with_secret);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    assert!(stdout.contains("[redacted]"));
}

#[test]
fn demo_config_passes() {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"));
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn bad_configurations_exit_2_naming_the_key() {
    let cases = [
        (
            "unknown-key.toml",
            example().replace(
                "negative_ttl = \"30s\"",
                "negative_ttl = \"30s\"\nnegativ_ttl = \"30s\"",
            ),
            "negativ_ttl",
        ),
        (
            "missing-tenant.toml",
            example().replace("tenant_id = \"00000000-0000-0000-0000-000000000000\"", ""),
            "auth.tenant_id",
        ),
        (
            "bad-duration.toml",
            example().replace("ttl = \"5m\"", "ttl = \"5 parsecs\""),
            "cache.ttl",
        ),
        (
            "bad-listen.toml",
            example().replace("0.0.0.0:8080", "nowhere"),
            "server.listen",
        ),
        (
            "bad-mode.toml",
            example().replace("mode = \"api_key\"", "mode = \"apikey\""),
            "callers.mode",
        ),
    ];
    for (name, text, key) in cases {
        let (code, _, stderr) = check(&write(name, &text));
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(
            stderr.contains(key),
            "{name}: message should name {key}: {stderr}"
        );
    }
}

#[test]
fn environment_overrides_win_and_are_validated() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/graph-session-proxy.toml"
    ));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("GSP__CACHE__TTL", "90s")
        .env("GSP__GRAPH__MAX_RETRIES", "5")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ttl = \"1m 30s\""), "{stdout}");
    assert!(stdout.contains("max_retries = 5"), "{stdout}");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("GSP__CACHE__TTL", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cache.ttl"));
}

#[test]
fn numeric_looking_text_from_the_environment_stays_text() {
    let path = write(
        "no-secret-file.toml",
        &example().replace(
            "client_secret_file = \"/run/secrets/graph-client-secret\"",
            "",
        ),
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("GSP__AUTH__CLIENT_ID", "0123")
        .env("GSP__AUTH__CLIENT_SECRET", "0123")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("client_id = \"0123\""), "{stdout}");
    assert!(
        stdout.contains("client_secret = \"[redacted]\""),
        "{stdout}"
    );
}

#[test]
fn the_redis_url_from_the_environment_turns_the_shared_tier_on_and_stays_secret() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/graph-session-proxy.toml"
    ));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env(
            "GSP__CACHE__SHARED__REDIS_URL",
            "redis://:s3cr3t-redis@redis:6379/0",
        )
        .env("GSP__CACHE__SHARED__TIMEOUT", "100ms")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[cache.shared]"), "{stdout}");
    assert!(stdout.contains("redis_url = \"[redacted]\""), "{stdout}");
    assert!(stdout.contains("timeout = \"100ms\""), "{stdout}");
    assert!(!stdout.contains("s3cr3t-redis"), "{stdout}");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env(
            "GSP__CACHE__SHARED__REDIS_URL",
            "http://:s3cr3t-redis@redis",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cache.shared.redis_url"), "{stderr}");
    assert!(!stderr.contains("s3cr3t-redis"), "{stderr}");
}

#[test]
fn toml_syntax_errors_are_reported_once() {
    let (code, _, stderr) = check(&write("syntax.toml", "[server\nlisten = 1\n"));
    assert_eq!(code, 2);
    assert_eq!(stderr.matches("TOML parse error").count(), 1, "{stderr}");
}

/// `serve` as a process: SIGTERM while a request is in flight, the request completes, the
/// process exits 0.
#[tokio::test]
async fn serve_exits_0_on_sigterm_after_draining() {
    use graph_session_proxy::sim::{Faults, SimConfig, Simulator, SEED_EVENT, SEED_SESSION};
    use std::io::BufRead;

    let sim = Simulator::new(
        SimConfig::default(),
        graph_session_proxy::clock::Clock::new(),
    );
    let sim_addr = sim.clone().spawn().await.unwrap();
    let key = "cli-key-1";
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(key))
    };
    let config = write(
        "serve.toml",
        &format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            admin_listen = "127.0.0.1:0"
            shutdown_grace = "5s"
            [graph]
            base_url = "http://{sim_addr}"
            [auth]
            tenant_id = "5466a424-aadf-425c-9b24-034ca28d4bdd"
            client_id = "00000000-0000-0000-0000-00000000c11e"
            client_secret = "sim-client-secret"
            token_url = "http://{sim_addr}/{{tenant}}/oauth2/v2.0/token"
            [callers]
            mode = "api_key"
            [[callers.api_keys]]
            name = "cli"
            sha256 = "{sha}"
            [log]
            format = "json"
            "#
        ),
    );
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(listen) = v["listen"].as_str() {
                    let _ = addr_tx.send(listen.to_string());
                }
            }
        }
    });
    let listen = addr_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the proxy logs its address");
    sim.set_faults(Faults {
        graph_latency_ms: 700,
        ..Faults::default()
    });
    let url = format!("http://{listen}/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}");
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the request in flight completes"
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
