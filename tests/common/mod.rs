//! Shared by the end-to-end tests: the simulator and the proxy on ephemeral loopback
//! ports, sharing one movable clock, plus a raw HTTP/1.1 client for paths that ordinary
//! clients would normalise.

#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::time::Duration;

pub mod egress;

use graph_session_proxy::config::{Purpose, Settings};
use graph_session_proxy::sim::{Faults, SimConfig, Simulator, Stats};
use graph_session_proxy::Clock;
use graph_session_proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub use graph_session_proxy::sim::{SEED_EVENT, SEED_SESSION, TOWNHALL_EVENT, TOWNHALL_SESSION};

pub const API_KEY: &str = "test-key-9f2c41";

/// The proxy's test configuration; the sim's address is filled in by [`Harness`].
pub fn base_toml() -> String {
    let sha = sha256_hex(API_KEY);
    format!(
        r#"
        [server]
        request_timeout = "5s"
        shutdown_grace = "2s"
        [graph]
        timeout = "2s"
        max_retries = 2
        [auth]
        tenant_id = "5466a424-aadf-425c-9b24-034ca28d4bdd"
        client_id = "00000000-0000-0000-0000-00000000c11e"
        client_secret = "sim-client-secret"
        [callers]
        mode = "api_key"
        [[callers.api_keys]]
        name = "tests"
        sha256 = "{sha}"
        "#
    )
}

pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

pub struct Harness {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub sim: Simulator,
    pub sim_addr: SocketAddr,
    pub clock: Clock,
    pub http: reqwest::Client,
    /// The settings the proxy was built from (for more instances of it).
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

/// Another proxy instance beside the harness's own (same simulator, same clock).
pub struct Instance {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Instance {
    pub fn url(&self, kind: &str, event: &str, session: &str) -> String {
        format!("http://{}/sessions/{kind}/{event}/{session}", self.proxy)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a proxy from `settings` on fresh loopback ports.
pub async fn spawn_proxy(
    settings: &Settings,
    clock: &Clock,
) -> (
    SocketAddr,
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    spawn_proxy_on(listener, settings, clock).await
}

/// [`spawn_proxy`] on a listener already bound (whose address the settings may name).
pub async fn spawn_proxy_on(
    listener: TcpListener,
    settings: &Settings,
    clock: &Clock,
) -> (
    SocketAddr,
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let proxy = Proxy::build(settings, clock.clone()).unwrap();
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(proxy.serve(listener, admin_listener, async {
        let _ = stopped.await;
    }));
    (addr, admin, stop, done)
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with(|_| {}, SimConfig::default()).await
    }

    /// `tweak` edits the settings after the simulator's address is known.
    pub async fn with(tweak: impl FnOnce(&mut Settings), sim_config: SimConfig) -> Harness {
        Harness::with_addr(|s, _| tweak(s), sim_config).await
    }

    /// As [`Harness::with`]; `tweak` also gets the caller listener's address.
    pub async fn with_addr(
        tweak: impl FnOnce(&mut Settings, SocketAddr),
        sim_config: SimConfig,
    ) -> Harness {
        let clock = Clock::new();
        let sim = Simulator::new(sim_config, clock.clone());
        let sim_addr = sim.clone().spawn().await.unwrap();
        let mut settings = Settings::from_toml(&base_toml(), Purpose::Embedded).unwrap();
        settings.graph.base_url = Some(format!("http://{sim_addr}"));
        settings.auth.token_url = Some(format!("http://{sim_addr}/{{tenant}}/oauth2/v2.0/token"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tweak(&mut settings, listener.local_addr().unwrap());
        settings.validate(Purpose::Embedded).unwrap();
        let (addr, admin, stop, done) = spawn_proxy_on(listener, &settings, &clock).await;
        Harness {
            proxy: addr,
            admin,
            sim,
            sim_addr,
            clock,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .unwrap(),
            settings,
            stop: Some(stop),
            done: Some(done),
        }
    }

    pub fn url(&self, kind: &str, event: &str, session: &str) -> String {
        format!("http://{}/sessions/{kind}/{event}/{session}", self.proxy)
    }

    /// One more proxy with the same settings, simulator and clock.
    pub async fn another_instance(&self) -> Instance {
        let (proxy, admin, stop, _done) = spawn_proxy(&self.settings, &self.clock).await;
        Instance {
            proxy,
            admin,
            stop: Some(stop),
        }
    }

    pub fn seed_url(&self) -> String {
        self.url("webinars", SEED_EVENT, SEED_SESSION)
    }

    /// GET with the test key.
    pub async fn get(&self, url: &str) -> reqwest::Response {
        self.http
            .get(url)
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
    }

    pub fn stats(&self) -> Stats {
        self.sim.stats()
    }

    /// Waits (real time, up to 3 s) until the simulator has seen `n` Graph requests:
    /// background refreshes run on their own tasks.
    pub async fn wait_for_graph_requests(&self, n: u64) {
        for _ in 0..300 {
            if self.stats().graph_requests >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "the simulator saw {} Graph requests, expected {n}",
            self.stats().graph_requests
        );
    }

    /// `DELETE {admin}{path}` without an admin token.
    pub async fn admin_delete(&self, path: &str) -> reqwest::Response {
        self.http
            .delete(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap()
    }

    pub fn faults(&self, faults: Faults) {
        self.sim.set_faults(faults);
    }

    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a raw exchange returned.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `target` byte for byte in a request line, with the test key, and reads one answer
/// (the request asks the server to close the connection afterwards).
pub async fn raw_get(addr: SocketAddr, target: &[u8]) -> RawResponse {
    let mut request = b"GET ".to_vec();
    request.extend_from_slice(target);
    request.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    raw_exchange(addr, &request).await
}

pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head,
        body: buf[split..].to_vec(),
    }
}

/// A real `redis-server` of our own on a free loopback port, with a password, no
/// persistence; stopped (and started again on the same port) at will, killed on drop.
pub struct RedisServer {
    pub port: u16,
    pub password: String,
    pub dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    /// More `redis-server` arguments.
    extra: Vec<String>,
    /// Serving TLS only (a certificate for `localhost` in `dir/redis.crt`).
    tls: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[], false)
    }

    /// A TLS-only server with a self-signed certificate for `localhost`, which is also its
    /// own CA (`dir/redis.crt`).
    pub fn start_tls() -> RedisServer {
        RedisServer::start_with(&[], true)
    }

    pub fn start_with(extra: &[&str], tls: bool) -> RedisServer {
        // A free port is only free until someone takes it: a test running beside this one
        // may pick the same one. Then our server exits at once and another port is tried.
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = std::env::temp_dir().join(format!("gsp-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut server = RedisServer {
                port,
                password: format!("pw-{port}"),
                dir,
                child: None,
                extra: extra.iter().map(|a| a.to_string()).collect(),
                tls,
            };
            if tls {
                let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
                std::fs::write(server.dir.join("redis.crt"), made.cert.pem()).unwrap();
                std::fs::write(
                    server.dir.join("redis.key"),
                    made.signing_key.serialize_pem(),
                )
                .unwrap();
            }
            if server.try_resume() {
                return server;
            }
        }
        panic!("could not start redis-server on a free loopback port");
    }

    /// (Re)starts the server on its port and waits until it answers.
    pub fn resume(&mut self) {
        assert!(
            self.try_resume(),
            "redis-server could not listen on 127.0.0.1:{} again",
            self.port
        );
    }

    /// Starts the server; false when it exited (its port was taken meanwhile).
    fn try_resume(&mut self) -> bool {
        let mut command = std::process::Command::new("redis-server");
        if self.tls {
            let file = |name: &str| self.dir.join(name).display().to_string();
            command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", &file("redis.crt")])
                .args(["--tls-key-file", &file("redis.key")])
                .args(["--tls-ca-cert-file", &file("redis.crt")])
                .args(["--tls-auth-clients", "no"]);
        } else {
            command.args(["--port", &self.port.to_string()]);
        }
        let mut child = command
            .args(["--bind", "127.0.0.1"])
            .args(&self.extra)
            .args(["--requirepass", &self.password])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the shared-cache tests need a real Redis. \
                     Install it (Debian/Ubuntu: apt-get install redis-server) or run .ci/test, \
                     which installs it when missing"
                )
            });
        for _ in 0..500 {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Ours, not another test's: still running a moment later.
                std::thread::sleep(std::time::Duration::from_millis(50));
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        false
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://:{}@localhost:{}/0", self.password, self.port)
        } else {
            format!("redis://:{}@127.0.0.1:{}/0", self.password, self.port)
        }
    }

    /// A direct connection, for the tests' own inspection.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `tracing` writer that keeps everything written, for tests that read the logs (each
/// in its own test binary: a subscriber is process-global).
#[derive(Clone, Default)]
pub struct LogCapture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

/// The text of `/metrics` on the admin listener at `admin` (this harness's or another
/// instance's).
pub async fn metrics(h: &Harness, admin: SocketAddr) -> String {
    h.http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The response's `Cache-Status`, empty when it has none.
pub fn cache_status(r: &reqwest::Response) -> String {
    r.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}
