//! HTTPS on the caller listener: HTTP/1.1 and HTTP/2 (ALPN) through rustls, certificate
//! reloads without a restart, and clients that do not speak TLS or do not speak at all.
//!
//! Certificates are made with rcgen for `localhost` into a temporary directory. Reloads
//! are polled every 100 ms here; the tests wait for them in bounded loops (at most 5 s).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use graph_session_proxy::config::Settings;
use graph_session_proxy::sim::SimConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A certificate for `localhost` and 127.0.0.1 with its own new key.
struct Identity {
    cert: String,
    key: String,
}

impl Identity {
    fn new() -> Identity {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        Identity {
            cert: made.cert.pem(),
            key: made.signing_key.serialize_pem(),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).unwrap()
    }
}

/// The certificate and key files, in a directory removed at the end of the test.
struct Files {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(name: &str, identity: &Identity) -> Files {
        let dir = std::env::temp_dir().join(format!("gsp-tls-e2e-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Files {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            dir,
        };
        files.install(identity);
        files
    }

    /// Replaces both files the way a certificate manager does: write aside, then rename.
    fn install(&self, identity: &Identity) {
        replace(&self.key, &identity.key);
        replace(&self.cert, &identity.cert);
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

async fn tls_harness(files: &Files, tweak: impl FnOnce(&mut Settings)) -> Harness {
    let (cert, key) = (files.cert.clone(), files.key.clone());
    Harness::with(
        move |s| {
            s.server.tls_cert_file = Some(cert);
            s.server.tls_key_file = Some(key);
            s.server.tls_reload_interval = Duration::from_millis(100);
            tweak(s);
        },
        SimConfig::default(),
    )
    .await
}

fn https_url(h: &Harness, path: &str) -> String {
    format!("https://localhost:{}{path}", h.proxy.port())
}

fn seed_path() -> String {
    format!("/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}")
}

/// A reqwest client that trusts only `identity` and finds `localhost` at the proxy.
fn client(h: &Harness, identity: &Identity) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(identity.cert.as_bytes()).unwrap())
        .resolve("localhost", h.proxy)
}

/// A TLS handshake trusting any of `trusted`: the certificate the proxy presented.
async fn presented(
    addr: SocketAddr,
    trusted: &[&Identity],
) -> std::io::Result<CertificateDer<'static>> {
    let stream = connect(addr, trusted, &[]).await?;
    let (_, connection) = stream.get_ref();
    Ok(connection.peer_certificates().unwrap()[0].clone())
}

async fn connect(
    addr: SocketAddr,
    trusted: &[&Identity],
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for identity in trusted {
        roots.add(identity.der()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The value of a counter on the admin listener's /metrics, 0 when absent.
async fn reloads(h: &Harness, outcome: &str) -> f64 {
    let text = metrics(h, h.admin).await;
    let wanted = format!("graph_session_proxy_tls_reloads_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Polls `check` every 50 ms for at most 5 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sessions_are_served_over_http1_and_http2() {
    let identity = Identity::new();
    let files = Files::new("versions", &identity);
    let h = tls_harness(&files, |_| {}).await;

    let http1 = client(&h, &identity).http1_only().build().unwrap();
    let r1 = http1
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r1.status(), 200);
    assert_eq!(r1.version(), reqwest::Version::HTTP_11);
    let body1 = r1.bytes().await.unwrap();

    // No http2_prior_knowledge: HTTP/2 is chosen by ALPN in the handshake.
    let http2 = client(&h, &identity).build().unwrap();
    let r2 = http2
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 200);
    assert_eq!(r2.version(), reqwest::Version::HTTP_2);
    assert_eq!(r2.bytes().await.unwrap(), body1);
    let v: serde_json::Value = serde_json::from_slice(&body1).unwrap();
    assert_eq!(v["id"], SEED_SESSION);

    // The Graph-compatible route, as a Graph SDK pointed at the proxy calls it.
    let graph_path =
        format!("/v1.0/solutions/virtualEvents/webinars/{SEED_EVENT}/sessions/{SEED_SESSION}");
    let r = http2
        .get(https_url(&h, &graph_path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);

    // The admin listener stays plain HTTP.
    let health = h
        .http
        .get(format!("http://{}/healthz", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn the_request_line_guard_applies_inside_tls() {
    let identity = Identity::new();
    let files = Files::new("guard", &identity);
    let h = tls_harness(&files, |_| {}).await;
    let mut stream = connect(h.proxy, &[&identity], &[b"http/1.1"])
        .await
        .unwrap();
    // Without the guard, the `http` crate would drop `#frag` and serve the session.
    let request = format!(
        "GET {}#frag HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n",
        seed_path()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("\"invalidRequest\""), "{text}");
    assert_eq!(h.stats().graph_requests, 0);
}

#[tokio::test]
async fn a_renewed_certificate_is_presented_without_a_restart() {
    let first = Identity::new();
    let second = Identity::new();
    let files = Files::new("reload", &first);
    let h = tls_harness(&files, |_| {}).await;
    assert_eq!(
        presented(h.proxy, &[&first, &second]).await.unwrap(),
        first.der()
    );
    // An HTTP/2 connection opened now, by a client that trusts only the first certificate.
    let old_client = client(&h, &first).build().unwrap();
    let r = old_client
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    files.install(&second);
    eventually("the second certificate presented", || async {
        presented(h.proxy, &[&first, &second]).await.unwrap() == second.der()
    })
    .await;
    assert!(reloads(&h, "ok").await >= 1.0);

    // New handshakes: trusted with the second certificate only, refused with the first only.
    let new_client = client(&h, &second).build().unwrap();
    let r = new_client
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(presented(h.proxy, &[&first]).await.is_err());
    // The connection opened before the reload keeps going (a new one would fail: it trusts
    // only the first certificate).
    let r = old_client
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_broken_file_keeps_the_current_certificate() {
    let first = Identity::new();
    let second = Identity::new();
    let files = Files::new("broken", &first);
    let h = tls_harness(&files, |_| {}).await;

    // Half a certificate, as a reader sees a file mid-write.
    replace(&files.cert, &first.cert[..first.cert.len() / 2]);
    eventually("a failed reload counted", || async {
        reloads(&h, "error").await >= 1.0
    })
    .await;
    assert_eq!(presented(h.proxy, &[&first]).await.unwrap(), first.der());
    // A new key, then the old certificate back: a key that does not fit its certificate.
    // One file at a time, so that each change is tried once.
    replace(&files.key, &second.key);
    eventually("a second failed reload counted", || async {
        reloads(&h, "error").await >= 2.0
    })
    .await;
    replace(&files.cert, &first.cert);
    eventually("a third failed reload counted", || async {
        reloads(&h, "error").await >= 3.0
    })
    .await;
    assert_eq!(presented(h.proxy, &[&first]).await.unwrap(), first.der());
    let r = client(&h, &first)
        .build()
        .unwrap()
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(reloads(&h, "ok").await, 0.0);

    // Fixed: the next change is picked up.
    replace(&files.cert, &second.cert);
    eventually("the second certificate presented", || async {
        presented(h.proxy, &[&first, &second]).await.unwrap() == second.der()
    })
    .await;
}

#[tokio::test]
async fn plain_http_on_the_tls_port_fails_cleanly() {
    let identity = Identity::new();
    let files = Files::new("plain", &identity);
    let h = tls_harness(&files, |_| {}).await;
    for _ in 0..3 {
        let mut stream = TcpStream::connect(h.proxy).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        // Closed at once (after a TLS alert), not left hanging until a timeout.
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer))
            .await
            .expect("the connection is closed")
            .ok();
        assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    }
    let r = client(&h, &identity)
        .build()
        .unwrap()
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the listener still serves");
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let identity = Identity::new();
    let files = Files::new("silent", &identity);
    let h = tls_harness(&files, |s| {
        s.server.header_read_timeout = Duration::from_secs(3);
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(h.proxy).await.unwrap();

    // Served while the silent client is still connected: its handshake does not hold up
    // the accept loop.
    let r = client(&h, &identity)
        .build()
        .unwrap()
        .get(https_url(&h, &seed_path()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(10), silent.read(&mut byte))
            .await
            .is_err(),
        "the silent client is still connected"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte))
        .await
        .expect("disconnected within the handshake timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(2900), "{waited:?}");
}

fn run(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_graph-session-proxy"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn unusable_tls_files_exit_2_naming_the_key() {
    let identity = Identity::new();
    let files = Files::new("cli", &identity);
    let config = files.dir.join("proxy.toml");
    let base = base_toml().replacen(
        "[server]",
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{tls}",
        1,
    );
    let write = |tls: &str| std::fs::write(&config, base.replace("{tls}", tls)).unwrap();
    let path = config.to_str().unwrap();

    let cert = format!("tls_cert_file = {:?}", files.cert.display().to_string());
    let key = format!("tls_key_file = {:?}", files.key.display().to_string());
    write(&format!("{cert}\n{key}"));
    let (code, stderr) = run(&["check-config", "--config", path]);
    assert_eq!(code, 0, "{stderr}");

    write(&cert);
    let (code, stderr) = run(&["check-config", "--config", path]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("server.tls_key_file"), "{stderr}");

    std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\nAAAA\n").unwrap();
    write(&format!("{cert}\n{key}"));
    for command in ["check-config", "serve"] {
        let (code, stderr) = run(&[command, "--config", path]);
        assert_eq!(code, 2, "{command}: {stderr}");
        assert!(
            stderr.contains("server.tls_key_file"),
            "{command}: {stderr}"
        );
    }
}
