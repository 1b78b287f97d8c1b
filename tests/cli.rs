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
fn toml_syntax_errors_are_reported_once() {
    let (code, _, stderr) = check(&write("syntax.toml", "[server\nlisten = 1\n"));
    assert_eq!(code, 2);
    assert_eq!(stderr.matches("TOML parse error").count(), 1, "{stderr}");
}
