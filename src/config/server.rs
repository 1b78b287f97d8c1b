//! `[server]`: the caller and admin listeners, their limits and TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::core::http::sha256_from_hex;

use super::{at_most_ten_years, files, positive, tls_files, ConfigError, Purpose};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_concurrent_requests: usize,
    /// SHA-256 (hex) of the token the admin purge calls need; required when
    /// `admin_listen` is not a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_sha256: Option<String>,
    /// Readiness waits for a first Graph token (so a bad secret keeps a pod out of rotation).
    pub ready_requires_token: bool,
    /// Open caller connections at most; beyond, a newcomer takes the place of the
    /// longest-idle connection, or gets a 503 `overloaded` when all are busy.
    pub max_connections: usize,
    /// A client that has not sent all request headers in this time is disconnected.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Pending connections the kernel queues for `listen` and `admin_listen` before they
    /// are accepted (capped by the kernel, on Linux by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// More request headers than this (count or bytes) is a 431.
    pub max_headers: usize,
    pub max_header_bytes: ByteSize,
    /// PEM certificate chain (end-entity first); with `tls_key_file`, the caller listener
    /// serves HTTPS (ALPN h2 and http/1.1). The admin listener stays plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// How often the two TLS files are checked for changes (modification time and size);
    /// a change reloads them for new connections.
    #[serde(with = "humantime_serde")]
    pub tls_reload_interval: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(20),
            max_concurrent_requests: 10_000,
            admin_token_sha256: None,
            ready_requires_token: false,
            max_connections: 20_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            listen_backlog: 4096,
            max_headers: 64,
            max_header_bytes: ByteSize::kib(16),
            tls_cert_file: None,
            tls_key_file: None,
            tls_reload_interval: Duration::from_secs(10),
        }
    }
}

impl ServerSettings {
    /// Checks values the types cannot: names the key and the reason.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, d) in [
            ("server.request_timeout", self.request_timeout),
            ("server.shutdown_grace", self.shutdown_grace),
            ("server.tls_reload_interval", self.tls_reload_interval),
            ("server.header_read_timeout", self.header_read_timeout),
            ("server.idle_timeout", self.idle_timeout),
        ] {
            at_most_ten_years(key, d)?;
        }
        if self.max_concurrent_requests == 0 {
            return Err(ConfigError::invalid(
                "server.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        positive("server.request_timeout", self.request_timeout)?;
        positive("server.header_read_timeout", self.header_read_timeout)?;
        positive("server.idle_timeout", self.idle_timeout)?;
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if !(1..=65535).contains(&self.listen_backlog) {
            return Err(ConfigError::invalid(
                "server.listen_backlog",
                "from 1 to 65535",
            ));
        }
        match &self.admin_token_sha256 {
            Some(digest) if sha256_from_hex(digest).is_none() => {
                return Err(ConfigError::invalid(
                    "server.admin_token_sha256",
                    "must be 64 hex characters: printf %s \"$TOKEN\" | sha256sum",
                ));
            }
            None if !self.admin_listen.ip().is_loopback() => {
                return Err(ConfigError::invalid(
                    "server.admin_token_sha256",
                    "required when server.admin_listen is not a loopback address (purges would be open to the network)",
                ));
            }
            _ => {}
        }
        if !(8..=1000).contains(&self.max_headers) {
            return Err(ConfigError::invalid("server.max_headers", "from 8 to 1000"));
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes.as_u64()) {
            return Err(ConfigError::invalid(
                "server.max_header_bytes",
                "from 1KiB to 1MiB",
            ));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "server.tls_key_file",
                    "required with server.tls_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "server.tls_cert_file",
                    "required with server.tls_key_file",
                ));
            }
            _ => {}
        }
        positive("server.tls_reload_interval", self.tls_reload_interval)?;
        Ok(())
    }

    /// What `check-config` should warn about in `[server]`.
    pub(super) fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            for (name, path) in [("server.tls_cert_file", cert), ("server.tls_key_file", key)] {
                if !path.exists() {
                    out.push(format!(
                        "{name} {} does not exist here: serve reads it at start-up",
                        path.display()
                    ));
                }
            }
            if let Some(mode) = files::loose_permissions(key) {
                out.push(format!(
                    "server.tls_key_file {} is readable by group or others (mode {mode:o}): chmod 600 it",
                    key.display()
                ));
            }
        }
        out
    }

    /// Reads and parses the TLS certificate and key, so that a file serve could not use is
    /// a configuration error (exit 2) at start-up rather than a listener that fails every
    /// handshake. `check-config` skips files that do not exist where it runs (they may be
    /// mounted only where the proxy runs; [`Settings::warnings`](super::Settings::warnings) says so).
    pub(super) fn check_tls_files(&self, purpose: Purpose) -> Result<(), ConfigError> {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(());
        };
        if purpose == Purpose::Check && !(cert.exists() && key.exists()) {
            return Ok(());
        }
        tls_files::load(cert, key).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::config::tests::MINIMAL;
    use crate::config::{Purpose, Settings};

    #[test]
    fn connection_settings_are_checked() {
        let with = |table: &str| format!("{MINIMAL}\n[server]\n{table}\n");
        let s = Settings::from_toml(MINIMAL, Purpose::Serve).unwrap();
        assert_eq!(s.server.listen_backlog, 4096);
        assert_eq!(s.server.idle_timeout, Duration::from_secs(60));
        for (table, key) in [
            ("idle_timeout = \"0s\"", "server.idle_timeout"),
            ("idle_timeout = \"20years\"", "server.idle_timeout"),
            ("listen_backlog = 0", "server.listen_backlog"),
            ("listen_backlog = 65536", "server.listen_backlog"),
        ] {
            let err = Settings::from_toml(&with(table), Purpose::Serve)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{table}: {err}");
        }
        let s = Settings::from_toml(&with("listen_backlog = 65535"), Purpose::Serve).unwrap();
        assert_eq!(s.server.listen_backlog, 65535);
    }

    #[test]
    fn tls_keys_come_in_pairs() {
        for (set, missing) in [
            ("tls_cert_file = \"/x/tls.crt\"", "server.tls_key_file"),
            ("tls_key_file = \"/x/tls.key\"", "server.tls_cert_file"),
        ] {
            let text = format!("[server]\n{set}\n{MINIMAL}");
            for purpose in [Purpose::Serve, Purpose::Check, Purpose::Embedded] {
                let err = Settings::from_toml(&text, purpose).unwrap_err().to_string();
                assert!(err.contains(missing), "{err}");
            }
        }
        let text = format!("[server]\ntls_reload_interval = \"0s\"\n{MINIMAL}");
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.tls_reload_interval"), "{err}");
    }

    #[test]
    fn tls_files_are_read_at_load_except_where_absent_for_check_config() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gsp-tls-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = |cert: &Path, key: &Path| {
            format!(
                "[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n{MINIMAL}",
                cert.display().to_string(),
                key.display().to_string()
            )
        };
        let good = Settings::from_toml(&text(&cert, &key), Purpose::Serve).unwrap();
        assert!(
            !good.warnings().iter().any(|w| w.contains("tls")),
            "{:?}",
            good.warnings()
        );
        assert_eq!(good.server.tls_reload_interval, Duration::from_secs(10));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(
            good.warnings()
                .iter()
                .any(|w| w.contains("server.tls_key_file") && w.contains("chmod 600")),
            "{:?}",
            good.warnings()
        );

        // Absent: an error for serve; for check-config a warning (mounted elsewhere).
        let absent = dir.join("absent.key");
        let err = Settings::from_toml(&text(&cert, &absent), Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.tls_key_file") && err.contains("cannot read"),
            "{err}"
        );
        let checked = Settings::from_toml(&text(&cert, &absent), Purpose::Check).unwrap();
        assert!(
            checked
                .warnings()
                .iter()
                .any(|w| w.contains("server.tls_key_file") && w.contains("does not exist")),
            "{:?}",
            checked.warnings()
        );

        // Present but unusable: an error for check-config too.
        std::fs::write(&cert, "not a certificate\n").unwrap();
        for purpose in [Purpose::Serve, Purpose::Check] {
            let err = Settings::from_toml(&text(&cert, &key), purpose)
                .unwrap_err()
                .to_string();
            assert!(err.contains("server.tls_cert_file"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
