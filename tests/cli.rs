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

    let sim = Simulator::new(SimConfig::default(), graph_session_proxy::Clock::new());
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

/// A `check-config` (or `serve`) run: the binary with `args` and `env` (the test's own
/// `GSP__*` variables removed first, so only `env` counts).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command.args(args);
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("GSP__")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const SHIPPED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/config/graph-session-proxy.toml"
);

/// The placeholders a user replaces by environment: the proxy's identity and secret.
const IDENTITY_ENV: [(&str, &str); 3] = [
    (
        "GSP__AUTH__TENANT_ID",
        "5466a424-aadf-425c-9b24-034ca28d4bdd",
    ),
    (
        "GSP__AUTH__CLIENT_ID",
        "00000000-0000-0000-0000-00000000c11e",
    ),
    ("GSP__AUTH__CLIENT_SECRET", "sim-client-secret"),
];

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text))
}

/// The shipped file with its caller key digest set, as the steps of docs/operations.md say.
fn shipped_with_a_key(name: &str, key: &str) -> PathBuf {
    write(name, &example().replace(&"0".repeat(64), &sha256_hex(key)))
}

#[test]
fn a_secret_from_the_environment_replaces_the_shipped_secret_file() {
    let (code, stdout, stderr) = run(&["check-config", "--config", SHIPPED], &IDENTITY_ENV);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("client_secret = \"[redacted]\""),
        "{stdout}"
    );
    assert!(!stdout.contains("client_secret_file"), "{stdout}");
    assert!(!stdout.contains("sim-client-secret") && !stderr.contains("sim-client-secret"));
    // With the key digest set, nothing is left for serve to refuse.
    let edited = shipped_with_a_key("env-secret.toml", "a-caller-key");
    let path = edited.to_str().unwrap();
    let (code, _, stderr) = run(
        &["check-config", "--strict", "--config", path],
        &IDENTITY_ENV,
    );
    assert_eq!(code, 0, "{stderr}");
    // Empty is not a secret, and does not unset the file's.
    let mut env = IDENTITY_ENV;
    env[2].1 = "";
    let (code, _, stderr) = run(&["check-config", "--config", path], &env);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("auth.client_secret"), "{stderr}");
}

#[test]
fn strict_check_refuses_what_serve_refuses() {
    // Plain: the placeholders are warnings, exit 0.
    let (code, _, stderr) = run(&["check-config", "--config", SHIPPED], &[]);
    assert_eq!(code, 0, "{stderr}");
    for key in [
        "auth.tenant_id",
        "auth.client_id",
        "callers.api_keys[0].sha256",
    ] {
        assert!(
            stderr.contains(&format!("warning: configuration key `{key}`")),
            "{key}: {stderr}"
        );
    }
    let (code, _, stderr) = run(&["check-config", "--strict", "--config", SHIPPED], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("auth.tenant_id"), "{stderr}");
    let (code, _, stderr) = run(
        &["check-config", "--strict", "--config", SHIPPED],
        &IDENTITY_ENV,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("callers.api_keys[0].sha256"), "{stderr}");

    // The secret file: absent or empty is a warning, and an error with --strict.
    let empty = write("empty-secret", "\n");
    let identity_only = &IDENTITY_ENV[..2];
    let keyed = shipped_with_a_key("strict-files.toml", "a-caller-key");
    let keyed = keyed.to_str().unwrap();
    for (file, expected) in [
        ("/nonexistent/graph-client-secret", "cannot read"),
        (empty.to_str().unwrap(), "empty"),
    ] {
        let mut env = identity_only.to_vec();
        env.push(("GSP__AUTH__CLIENT_SECRET_FILE", file));
        let (code, _, stderr) = run(&["check-config", "--config", keyed], &env);
        assert_eq!(code, 0, "{file}: {stderr}");
        let (code, _, stderr) = run(&["check-config", "--strict", "--config", keyed], &env);
        assert_eq!(code, 2, "{file}: {stderr}");
        assert!(
            stderr.contains("auth.client_secret_file") && stderr.contains(expected),
            "{file}: {stderr}"
        );
    }
    // And serve refuses the shipped file the same way, before binding anything.
    let (code, _, stderr) = run(&["serve", "--config", SHIPPED], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("auth.tenant_id"), "{stderr}");
    // The demo's configuration is no placeholder.
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml");
    let (code, _, stderr) = run(&["check-config", "--strict", "--config", demo], &[]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn plain_http_off_loopback_is_a_warning_not_an_error() {
    let edited = shipped_with_a_key("http-warning.toml", "a-caller-key");
    let path = edited.to_str().unwrap();
    for (url, warned) in [
        ("http://graph.example.com", true),
        ("http://127.0.0.1:9", false),
    ] {
        let mut env = IDENTITY_ENV.to_vec();
        env.push(("GSP__GRAPH__BASE_URL", url));
        let (code, _, stderr) = run(&["check-config", "--strict", "--config", path], &env);
        assert_eq!(code, 0, "{url}: {stderr}");
        assert_eq!(
            stderr.contains("graph.base_url is plain http://"),
            warned,
            "{url}: {stderr}"
        );
    }
}

#[test]
fn config_goes_before_the_subcommand_too() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml");
    let (code, stdout, stderr) = run(&["--config", demo, "check-config"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("sim-client-secret") && stdout.contains("[redacted]"));
    assert!(
        stdout.contains("5466a424-aadf-425c-9b24-034ca28d4bdd"),
        "{stdout}"
    );
    // Without a subcommand it is serve: the shipped placeholders are refused by name.
    let (code, _, stderr) = run(&["--config", SHIPPED], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("auth.tenant_id"), "{stderr}");
    // demo and sim have no configuration file: --config is refused, not ignored.
    let (code, _, stderr) = run(&["--config", demo, "demo"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
}

#[test]
fn help_names_the_environment_overrides_and_the_exit_codes() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["check-config", "--help"],
    ] {
        let (code, stdout, _) = run(args, &[]);
        assert_eq!(code, 0);
        for needle in [
            "GSP__SECTION__KEY",
            "GSP__AUTH__CLIENT_SECRET",
            "GSP__CACHE__TTL=90s",
            "0  clean shutdown",
            "1  runtime failure",
            "2  bad configuration",
            "--config <FILE>",
        ] {
            assert!(stdout.contains(needle), "{args:?}: {needle}: {stdout}");
        }
    }
    let (_, stdout, _) = run(&["check-config", "--help"], &[]);
    assert!(
        stdout.contains("--strict") && stdout.contains("serve would refuse"),
        "{stdout}"
    );
    let (_, stdout, _) = run(&["demo", "--help"], &[]);
    assert!(
        stdout.contains("--listen <ADDR>") && stdout.contains("--admin-listen <ADDR>"),
        "{stdout}"
    );
}

/// `demo --listen 127.0.0.1:0`: the printed lines carry the port the system chose, and
/// the proxy answers there.
#[tokio::test]
async fn demo_listens_where_it_is_told() {
    let (mut child, rx) = demo_on_free_ports();
    let mut base = None;
    let mut curl = None;
    while curl.is_none() {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the demo prints its lines");
        if let Some(rest) = line.split_once("proxy on ").map(|(_, r)| r) {
            base = rest.split(',').next().map(str::to_string);
        }
        if line.contains("curl -si -H 'Authorization: Bearer demo-key'") {
            curl = Some(line);
        }
    }
    let base = base.expect("the address line");
    assert!(
        base.starts_with("http://127.0.0.1:") && !base.ends_with(":0"),
        "{base}"
    );
    let curl = curl.unwrap();
    assert!(curl.contains(&format!("'{base}/sessions/")), "{curl}");
    let url = curl.split('\'').nth(3).unwrap().to_string();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reqwest::Client::new()
            .get(&url)
            .bearer_auth("demo-key")
            .send(),
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer.unwrap().unwrap().status(), 200, "{url}");
}

/// The last step of connecting to a real tenant (docs/operations.md), as a process: the
/// shipped file with a caller key digest, the identity and secret from the environment,
/// `graph-session-proxy --config FILE` (serve is the default). The shipped
/// `ready_requires_token = true` makes `/readyz` 200 only once the simulator accepted the
/// secret from the environment.
#[tokio::test]
async fn the_shipped_file_serves_with_the_secret_from_the_environment() {
    use graph_session_proxy::sim::{SimConfig, Simulator};
    use std::io::BufRead;

    let sim = Simulator::new(SimConfig::default(), graph_session_proxy::Clock::new());
    let sim_addr = sim.clone().spawn().await.unwrap();
    let config = shipped_with_a_key("shipped-serve.toml", "a-caller-key");
    let base_url = format!("http://{sim_addr}");
    let token_url = format!("http://{sim_addr}/{{tenant}}/oauth2/v2.0/token");
    let mut command = std::process::Command::new(BIN);
    command.arg("--config").arg(&config);
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("GSP__")) {
        command.env_remove(name);
    }
    let mut child = command
        .envs(IDENTITY_ENV)
        .env("GSP__SERVER__LISTEN", "127.0.0.1:0")
        .env("GSP__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("GSP__LOG__FORMAT", "json")
        .env("GSP__GRAPH__BASE_URL", &base_url)
        .env("GSP__AUTH__TOKEN_URL", &token_url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(admin) = v["admin"].as_str() {
                    let _ = tx.send(admin.to_string());
                }
            }
        }
    });
    let admin = rx.recv_timeout(std::time::Duration::from_secs(20));
    let mut ready = None;
    if let Ok(admin) = &admin {
        let http = reqwest::Client::new();
        for _ in 0..100 {
            let answer = http
                .get(format!("http://{admin}/readyz"))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            ready = Some((status, answer.text().await.unwrap()));
            if status == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    admin.unwrap_or_else(|_| panic!("the proxy logs its admin address: {stderr}"));
    let (status, body) = ready.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// The demo's printed curl lines, run as printed, answer what the README's tour says:
/// a miss then `hit; ttl=300` counting down, the town hall by `x-api-key`, the 25-session list, a JSON
/// 401 without a key, the simulator's stats.
#[tokio::test]
async fn the_demo_answers_what_the_readme_says() {
    let (mut child, rx) = demo_on_free_ports();
    let mut curls = Vec::new();
    while curls.len() < 5 {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the demo prints five curl lines");
        if line.trim_start().starts_with("curl ") {
            curls.push(line.trim().to_string());
        }
    }
    // `curl -s[i] [-H 'Name: value'] 'URL'`, run with reqwest.
    let http = reqwest::Client::new();
    let run = |line: String| {
        let http = http.clone();
        async move {
            let quoted: Vec<&str> = line.split('\'').skip(1).step_by(2).collect();
            let (url, headers) = quoted.split_last().unwrap();
            let mut request = http.get(*url);
            for header in headers {
                let (name, value) = header.split_once(": ").unwrap();
                request = request.header(name, value);
            }
            tokio::time::timeout(std::time::Duration::from_secs(10), request.send())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let first = run(curls[0].clone()).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["cache-status"],
        "graph-session-proxy; fwd=miss; fwd-status=200; stored"
    );
    let again = run(curls[0].clone()).await;
    // Fresh for the demo's ttl (5m) counting down; never the hour an ended session gets.
    let status = again.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_string();
    let ttl: i64 = status
        .strip_prefix("graph-session-proxy; hit; ttl=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!((290..=300).contains(&ttl), "{status}");
    let townhall = run(curls[1].clone()).await;
    assert!(curls[1].contains("x-api-key: demo-key"), "{}", curls[1]);
    assert_eq!(townhall.status(), 200);
    let list: serde_json::Value = run(curls[2].clone()).await.json().await.unwrap();
    assert_eq!(list["value"].as_array().map(Vec::len), Some(25), "{list}");
    let anonymous = run(curls[3].clone()).await;
    assert_eq!(anonymous.status(), 401);
    let body: serde_json::Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");
    let stats: serde_json::Value = run(curls[4].clone()).await.json().await.unwrap();
    assert!(stats["graph_requests"].as_u64().unwrap() >= 4, "{stats}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process killed when the test ends, also when it fails before its own kill:
/// a demo left running would hold its ports and its CPU.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `demo` on free loopback ports (killed when the test ends), and its stdout line by line.
fn demo_on_free_ports() -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = KillOnDrop(
        std::process::Command::new(BIN)
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}
