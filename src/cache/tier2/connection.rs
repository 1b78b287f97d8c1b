//! [`Connection`]: the shared tier's link to Redis. Every command is bounded by
//! `timeout`; after a failure Redis is left alone for `retry_interval`; failures are
//! logged once per incident and counted; a connection that keeps timing out is rebuilt.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use secrecy::ExposeSecret;

use crate::cache::tier2::Unavailable;
use crate::config::SharedSettings;
use crate::telemetry::{names, Metrics};

/// Consecutive timeouts after which the connection is rebuilt (a dead socket times out
/// rather than failing).
const REBUILD_AFTER_TIMEOUTS: u32 = 3;

pub(super) struct Connection {
    pub(super) client: redis::Client,
    /// Rebuilt after repeated timeouts.
    conn: Mutex<ConnectionManager>,
    manager_config: ConnectionManagerConfig,
    pub(super) timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) retry_interval: Duration,
    metrics: Arc<Metrics>,
    /// Whether the last command worked (for logging once per incident).
    healthy: AtomicBool,
    /// Redis is left alone until then after a failure (real time).
    pause_until: Mutex<Option<std::time::Instant>>,
    consecutive_timeouts: AtomicU32,
    /// The last failed step: when, which, why (for the status page).
    last_error: Mutex<Option<(std::time::SystemTime, &'static str, String)>>,
}

impl Connection {
    /// Prepares the connection; nothing is sent until first use.
    pub(super) fn new(
        settings: &SharedSettings,
        metrics: Arc<Metrics>,
    ) -> redis::RedisResult<Connection> {
        let url = settings
            .redis_url
            .as_ref()
            .map(|u| u.expose_secret().to_string())
            .unwrap_or_default();
        let mut info = url.as_str().into_connection_info()?;
        if let Some(password) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose_secret());
            info = info.set_redis_settings(redis);
        }
        info = info.set_tcp_settings(tcp_settings(settings.timeout));
        let client = match &settings.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(settings.retry_interval);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        Ok(Connection {
            client,
            conn: Mutex::new(conn),
            manager_config,
            timeout: settings.timeout,
            connect_timeout: settings.connect_timeout,
            retry_interval: settings.retry_interval,
            metrics,
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            pause_until: Mutex::new(None),
            consecutive_timeouts: AtomicU32::new(0),
        })
    }

    pub(super) fn conn(&self) -> ConnectionManager {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn paused(&self) -> bool {
        let mut pause = self.pause_until.lock().unwrap_or_else(|e| e.into_inner());
        match *pause {
            Some(until) if std::time::Instant::now() < until => true,
            Some(_) => {
                *pause = None;
                false
            }
            None => false,
        }
    }

    fn failed(&self, op: &'static str, why: &str, timed_out: bool) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::SystemTime::now(), op, shown(why)));
        *self.pause_until.lock().unwrap_or_else(|e| e.into_inner()) =
            std::time::Instant::now().checked_add(self.retry_interval);
        self.metrics
            .counter(names::SHARED_ERRORS, &[("op", op)])
            .increment(1);
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                op,
                error = why,
                retry_in_ms = self.retry_interval.as_millis() as u64,
                "shared cache (Redis) unavailable: carrying on with memory and Graph"
            );
        }
        if timed_out {
            let timeouts = self.consecutive_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
            if timeouts >= REBUILD_AFTER_TIMEOUTS {
                self.rebuild();
            }
        }
    }

    /// A connection that keeps timing out may be dead without the socket knowing: start
    /// a new one.
    fn rebuild(&self) {
        self.consecutive_timeouts.store(0, Ordering::Relaxed);
        match ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(fresh) => {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                tracing::debug!("shared cache connection rebuilt after repeated timeouts");
            }
            Err(e) => tracing::debug!(error = %e, "cannot rebuild the shared cache connection"),
        }
    }

    fn succeeded(&self) {
        self.consecutive_timeouts.store(0, Ordering::Relaxed);
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("shared cache (Redis) reachable again");
        }
    }

    /// The last failed step: when, which, why.
    pub(super) fn last_error(&self) -> Option<(std::time::SystemTime, &'static str, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the last Redis command worked.
    pub(super) fn is_up(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Runs one Redis step within `timeout`, recording failure or recovery.
    pub(super) async fn run<T>(
        &self,
        op: &'static str,
        step: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        if self.paused() {
            return Err(Unavailable);
        }
        match tokio::time::timeout(self.timeout, step).await {
            Ok(Ok(value)) => {
                self.succeeded();
                Ok(value)
            }
            Ok(Err(e)) => {
                self.failed(op, &e.to_string(), e.is_timeout());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed(op, "timed out", true);
                Err(Unavailable)
            }
        }
    }

    /// Connects ahead of the first caller, so a miss does not pay for the connection (and
    /// a TLS handshake) within `timeout`.
    pub(super) async fn warm_up(&self) {
        let mut conn = self.conn();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(
            self.timeout + self.connect_timeout,
            ping.query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!("shared cache (Redis) connected"),
            Ok(Err(e)) => self.failed("connect", &e.to_string(), false),
            Err(_) => self.failed("connect", "timed out", false),
        }
    }
}

/// An error text as the status page may show it: at most 200 characters, and any
/// `scheme://user:password@` credentials in it replaced by `[redacted]`.
fn shown(why: &str) -> String {
    let text: String = why.chars().take(200).collect();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(scheme) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme + 3);
        out.push_str(head);
        let authority = tail
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..authority].rfind('@') {
            Some(at) => {
                out.push_str("[redacted]");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// TCP keepalive and a user timeout, so a connection whose peer vanished (failover, NAT
/// timeout) fails instead of waiting forever.
fn tcp_settings(timeout: Duration) -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let settings = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(
            TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(5)),
        );
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(timeout.max(Duration::from_secs(10)));
    #[cfg(not(target_os = "linux"))]
    let _ = timeout;
    settings
}

#[cfg(test)]
mod shown_tests {
    #[test]
    fn credentials_are_redacted_and_texts_bounded() {
        assert_eq!(
            super::shown("connect to rediss://default:s3cret@cache:6380/0 failed"),
            "connect to rediss://[redacted]@cache:6380/0 failed"
        );
        assert_eq!(super::shown("timed out"), "timed out");
        assert_eq!(super::shown("redis://host:6379"), "redis://host:6379");
        assert_eq!(super::shown(&"x".repeat(500)).len(), 200);
    }
}
