//! `[cache]`: the in-memory tier and its lifetimes, and `[cache.shared]`, the optional
//! Redis tier that replicas share.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use redis::IntoConnectionInfo;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{at_most_ten_years, files, positive, ConfigError};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// How long a Graph answer is fresh.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a Graph 404 is remembered.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// After `ttl`: serve the stale entry at once and refresh it in the background.
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// After `ttl`: serve the stale entry instead of an error while Graph or the token
    /// endpoint fail.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// Bound on the bytes held by the cache (bodies, keys and per-entry overhead).
    pub max_bytes: ByteSize,
    /// A fresh entry read within this last fraction of its `ttl` is refreshed in the
    /// background, so a hot session never expires in front of a caller; 0 = off.
    pub refresh_ahead: f64,
    /// A failed Graph call for a key is remembered this long: requests in that time get
    /// the same error (or a stale entry) without calling Graph again; 0s = off.
    #[serde(with = "humantime_serde")]
    pub failure_ttl: Duration,
    /// Keep sessions that ended more than an hour ago fresh for `ttl_ended` instead of `ttl`.
    pub smart_ttl: bool,
    #[serde(with = "humantime_serde")]
    pub ttl_ended: Duration,
    /// How long an event's session list is fresh.
    #[serde(with = "humantime_serde")]
    pub list_ttl: Duration,
    /// A second cache tier in Redis, shared by replicas; absent = memory only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedSettings>,
}

/// `[cache.shared]`: Redis as the second tier, cross-replica single flight, shared throttle
/// gate and purge broadcast.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharedSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://...` (TLS). Prefer
    /// `GSP__CACHE__SHARED__REDIS_URL` or `redis_url_file` when it carries a password.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "super::redact"
    )]
    pub redis_url: Option<SecretString>,
    /// A file holding the URL (read once at start-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url_file: Option<PathBuf>,
    /// A file holding the password, used with a URL that has none (read once at start-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// `rediss://` only: the CA certificate(s) (PEM) to trust instead of the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Bound on one Redis command; a slower Redis counts as down for that request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// After a Redis failure, Redis is left alone this long (memory and Graph only).
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Expiry of the cross-replica single-flight lock, renewed by its holder every third of
    /// it while Graph answers: a replica that dies holding it blocks the others at most
    /// this long.
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// Larger bodies stay in memory only.
    pub max_body_bytes: ByteSize,
    /// From `password_file`, at start-up.
    #[serde(skip)]
    pub password: Option<SecretString>,
    /// From `ca_file`, at start-up.
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for SharedSettings {
    fn default() -> Self {
        SharedSettings {
            redis_url: None,
            redis_url_file: None,
            password_file: None,
            key_prefix: "gsp:".to_string(),
            timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            retry_interval: Duration::from_secs(1),
            lock_ttl: Duration::from_secs(5),
            max_body_bytes: ByteSize::mib(1),
            password: None,
            ca_file: None,
            ca_pem: None,
        }
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(3600),
            max_bytes: ByteSize::mib(256),
            refresh_ahead: 0.2,
            failure_ttl: Duration::from_secs(1),
            smart_ttl: true,
            ttl_ended: Duration::from_secs(3600),
            list_ttl: Duration::from_secs(60),
            shared: None,
        }
    }
}

impl CacheSettings {
    /// Checks values the types cannot: names the key and the reason. `[cache.shared]`'s
    /// timeout must be shorter than `request_timeout`.
    pub(super) fn validate(&self, request_timeout: Duration) -> Result<(), ConfigError> {
        for (key, d) in [
            ("cache.ttl", self.ttl),
            ("cache.negative_ttl", self.negative_ttl),
            ("cache.stale_while_revalidate", self.stale_while_revalidate),
            ("cache.stale_if_error", self.stale_if_error),
            ("cache.failure_ttl", self.failure_ttl),
            ("cache.ttl_ended", self.ttl_ended),
            ("cache.list_ttl", self.list_ttl),
        ] {
            at_most_ten_years(key, d)?;
        }
        if let Some(shared) = &self.shared {
            shared.validate(request_timeout)?;
        }
        positive("cache.ttl", self.ttl)?;
        positive("cache.ttl_ended", self.ttl_ended)?;
        if !(0.0..1.0).contains(&self.refresh_ahead) {
            return Err(ConfigError::invalid(
                "cache.refresh_ahead",
                "a fraction of ttl from 0 (off) to below 1, e.g. 0.2",
            ));
        }
        if self.max_bytes.as_u64() < 64 * 1024 {
            return Err(ConfigError::invalid(
                "cache.max_bytes",
                "must be at least 64KiB",
            ));
        }
        Ok(())
    }
}

impl SharedSettings {
    /// Checks `[cache.shared]`; `request_timeout` is `server.request_timeout`.
    pub(super) fn validate(&self, request_timeout: Duration) -> Result<(), ConfigError> {
        for (key, d) in [
            ("cache.shared.timeout", self.timeout),
            ("cache.shared.connect_timeout", self.connect_timeout),
            ("cache.shared.retry_interval", self.retry_interval),
            ("cache.shared.lock_ttl", self.lock_ttl),
        ] {
            if d > Duration::from_secs(3600) {
                return Err(ConfigError::invalid(key, "at most 1h"));
            }
        }
        if self.timeout >= request_timeout {
            return Err(ConfigError::invalid(
                "cache.shared.timeout",
                "must be shorter than server.request_timeout (Redis is a shortcut, not a wait)",
            ));
        }
        match (&self.redis_url, &self.redis_url_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "cache.shared.redis_url_file",
                    "set either cache.shared.redis_url or cache.shared.redis_url_file, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    "cache.shared.redis_url",
                    "required in [cache.shared] (or GSP__CACHE__SHARED__REDIS_URL, or cache.shared.redis_url_file)",
                ))
            }
            (Some(url), None) => {
                check_redis_url("cache.shared.redis_url", url.expose_secret())?
            }
            (None, Some(_)) => {}
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || !self.key_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::invalid(
                "cache.shared.key_prefix",
                "1 to 64 printable ASCII characters without spaces",
            ));
        }
        positive("cache.shared.timeout", self.timeout)?;
        positive("cache.shared.connect_timeout", self.connect_timeout)?;
        if self.lock_ttl < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "cache.shared.lock_ttl",
                "at least 100ms (its holder renews it every third of it)",
            ));
        }
        if self.max_body_bytes.as_u64() > 512 * 1024 * 1024 {
            return Err(ConfigError::invalid(
                "cache.shared.max_body_bytes",
                "at most 512MiB (Redis's limit for one value)",
            ));
        }
        Ok(())
    }

    /// Files this section names that cannot be used where `check-config` runs (serve and
    /// `--strict` refuse them): missing, or empty.
    pub fn warnings(&self) -> Vec<String> {
        let files = [
            ("cache.shared.redis_url_file", &self.redis_url_file),
            ("cache.shared.password_file", &self.password_file),
            ("cache.shared.ca_file", &self.ca_file),
        ];
        let mut out = Vec::new();
        for (key, path) in files {
            let Some(path) = path else { continue };
            match std::fs::metadata(path) {
                Err(_) => out.push(format!(
                    "{key} {} does not exist here: serve reads it at start-up",
                    path.display()
                )),
                Ok(meta) if meta.len() == 0 => out.push(format!(
                    "{key} {} is empty: serve refuses it",
                    path.display()
                )),
                Ok(_) => {}
            }
        }
        out
    }

    /// Reads `redis_url_file`, `password_file` and `ca_file` once, at start-up.
    pub(super) fn read_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.redis_url_file {
            let url = files::read_value("cache.shared.redis_url_file", path)?
                .trim()
                .to_string();
            check_redis_url("cache.shared.redis_url_file", &url)?;
            self.redis_url = Some(SecretString::from(url));
        }
        if let Some(path) = &self.password_file {
            let in_url = self
                .redis_url
                .as_ref()
                .and_then(|url| url.expose_secret().into_connection_info().ok())
                .is_some_and(|info| info.redis_settings().password().is_some());
            if in_url {
                return Err(ConfigError::invalid(
                    "cache.shared.password_file",
                    "the Redis URL carries a password already: use one or the other",
                ));
            }
            let password = files::read_value("cache.shared.password_file", path)?;
            self.password = Some(SecretString::from(password));
        }
        if let Some(path) = &self.ca_file {
            let tls = self
                .redis_url
                .as_ref()
                .is_some_and(|url| url.expose_secret().starts_with("rediss://"));
            if !tls {
                return Err(ConfigError::invalid(
                    "cache.shared.ca_file",
                    "only for a rediss:// URL",
                ));
            }
            let pem = files::read_value("cache.shared.ca_file", path)?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(ConfigError::invalid(
                    "cache.shared.ca_file",
                    "not a PEM certificate",
                ));
            }
            self.ca_pem = Some(pem.into_bytes());
        }
        Ok(())
    }
}

/// `redis://`, `rediss://` (TLS) or `redis+unix://` / `unix://` URLs that the client accepts.
fn check_redis_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    if !scheme_ok || redis::Client::open(url).is_err() {
        // Never echo the URL: it may carry a password.
        return Err(ConfigError::invalid(
            key,
            "not a redis://, rediss:// or redis+unix:// URL",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::SharedSettings;

    use secrecy::ExposeSecret;

    use crate::config::tests::MINIMAL;
    use crate::config::{Purpose, Settings};

    #[test]
    fn missing_or_empty_shared_files_are_warned_about() {
        let dir = std::env::temp_dir().join(format!("gsp-shared-warn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        let full = dir.join("full");
        std::fs::write(&full, "secret").unwrap();
        let shared = SharedSettings {
            redis_url_file: Some(dir.join("missing")),
            password_file: Some(empty.clone()),
            ca_file: Some(full),
            ..SharedSettings::default()
        };
        let warnings = shared.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("cache.shared.redis_url_file"),
            "{warnings:?}"
        );
        assert!(warnings[0].contains("does not exist"), "{warnings:?}");
        assert!(
            warnings[1].starts_with("cache.shared.password_file"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("empty"), "{warnings:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shared_tier_settings_are_checked_without_echoing_passwords() {
        let with = |table: &str| format!("{MINIMAL}\n[cache.shared]\n{table}\n");
        let s = Settings::from_toml(
            &with("redis_url = \"rediss://:pa55word@redis.internal:6380/2\""),
            Purpose::Serve,
        )
        .unwrap();
        let shared = s.cache.shared.as_ref().unwrap();
        assert_eq!(shared.key_prefix, "gsp:");
        assert_eq!(shared.timeout, Duration::from_millis(250));
        let shown = s.redacted_toml();
        assert!(!shown.contains("pa55word"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        for (table, key) in [
            ("key_prefix = \"gsp:\"", "cache.shared.redis_url"),
            (
                "redis_url = \"http://:pa55word@redis:6379\"",
                "cache.shared.redis_url",
            ),
            (
                "redis_url = \"redis://:pa55word@[::1\"",
                "cache.shared.redis_url",
            ),
            (
                "redis_url = \"redis://r\"\nredis_url_file = \"/x\"",
                "cache.shared.redis_url_file",
            ),
            (
                "redis_url = \"redis://r\"\nkey_prefix = \"\"",
                "cache.shared.key_prefix",
            ),
            (
                "redis_url = \"redis://r\"\nkey_prefix = \"a b\"",
                "cache.shared.key_prefix",
            ),
            (
                "redis_url = \"redis://r\"\ntimeout = \"0s\"",
                "cache.shared.timeout",
            ),
            (
                "redis_url = \"redis://r\"\nlock_ttl = \"0s\"",
                "cache.shared.lock_ttl",
            ),
            (
                "redis_url = \"redis://r\"\nmax_body_bytes = \"1GiB\"",
                "cache.shared.max_body_bytes",
            ),
            (
                "redis_url = \"redis://r\"\nredis_host = \"r\"",
                "redis_host",
            ),
        ] {
            let err = Settings::from_toml(&with(table), Purpose::Serve)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{table}: {err}");
            assert!(!err.contains("pa55word"), "{table}: {err}");
        }
    }

    #[test]
    fn shared_tier_limits() {
        let with = |table: &str| {
            format!("{MINIMAL}\n[cache.shared]\nredis_url = \"redis://r\"\n{table}\n")
        };
        for (table, key) in [
            ("timeout = \"2h\"", "cache.shared.timeout"),
            ("timeout = \"30s\"", "cache.shared.timeout"),
            (
                "retry_interval = \"3000years\"",
                "cache.shared.retry_interval",
            ),
            ("lock_ttl = \"2h\"", "cache.shared.lock_ttl"),
            ("lock_ttl = \"1ms\"", "cache.shared.lock_ttl"),
        ] {
            let err = Settings::from_toml(&with(table), Purpose::Serve)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{table}: {err}");
        }
    }

    #[test]
    fn shared_tier_secrets_come_from_files() {
        let dir = std::env::temp_dir().join(format!("gsp-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = dir.join("url");
        let password = dir.join("password");
        std::fs::write(&url, "redis://redis.internal:6379/0\n").unwrap();
        std::fs::write(&password, "from-a-file\n").unwrap();
        let text = format!(
            "{MINIMAL}\n[cache.shared]\nredis_url_file = {:?}\npassword_file = {:?}\n",
            url.display().to_string(),
            password.display().to_string()
        );
        let s = Settings::from_toml(&text, Purpose::Serve).unwrap();
        let shared = s.cache.shared.unwrap();
        assert_eq!(
            shared.redis_url.unwrap().expose_secret(),
            "redis://redis.internal:6379/0"
        );
        assert_eq!(shared.password.unwrap().expose_secret(), "from-a-file");
        // Both a password in the URL and a password file: which one? Refused.
        std::fs::write(&url, "redis://:inline@redis.internal:6379/0\n").unwrap();
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.shared.password_file"), "{err}");
        assert!(!err.contains("inline"), "{err}");
        std::fs::write(&url, "redis://redis.internal:6379/0\n").unwrap();
        // A password keeps its spaces; only the line ending goes.
        std::fs::write(&password, " spaced \n").unwrap();
        let s = Settings::from_toml(&text, Purpose::Serve).unwrap();
        assert_eq!(
            s.cache.shared.unwrap().password.unwrap().expose_secret(),
            " spaced "
        );
        // A CA only makes sense for TLS, and must be a certificate.
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let with_ca = |url: &str| {
            format!(
                "{MINIMAL}\n[cache.shared]\nredis_url = {url:?}\nca_file = {:?}\n",
                ca.display().to_string()
            )
        };
        for (url, expected) in [
            ("redis://r:6379", "only for a rediss:// URL"),
            ("rediss://r:6380", "not a PEM certificate"),
        ] {
            let err = Settings::from_toml(&with_ca(url), Purpose::Serve)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("cache.shared.ca_file") && err.contains(expected),
                "{err}"
            );
        }
        std::fs::write(&url, "ftp://nope\n").unwrap();
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.shared.redis_url_file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
