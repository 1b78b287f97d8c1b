//! `[notifications]`: Graph change notifications for webinar sessions (absent: off, every
//! session is polled by `cache.ttl`).

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{files, positive, ConfigError};

/// Graph's limit on a virtual event subscription's lifetime.
pub const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// Graph's limit on `clientState`.
pub const MAX_CLIENT_STATE: usize = 128;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationSettings {
    /// The public HTTPS URL Graph posts to (also the lifecycle notification URL).
    pub notification_url: String,
    /// Where the caller listener receives them.
    pub path: String,
    #[serde(
        serialize_with = "super::redact",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_state: Option<SecretString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_state_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_unsubscribe: Duration,
    pub max_subscriptions: usize,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        NotificationSettings {
            notification_url: String::new(),
            path: "/notifications".to_string(),
            client_state: None,
            client_state_file: None,
            lifetime: Duration::from_secs(23 * 3600),
            renew_before: Duration::from_secs(2 * 3600),
            ttl: Duration::from_secs(6 * 3600),
            idle_unsubscribe: Duration::from_secs(24 * 3600),
            max_subscriptions: 1000,
        }
    }
}

/// Paths the caller listener already answers: `path` must not shadow them.
const TAKEN: &[&str] = &[
    "/sessions",
    "/v1.0",
    "/beta",
    "/healthz",
    "/readyz",
    "/metrics",
];

impl NotificationSettings {
    /// Checks values the types cannot: names the key and the reason.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let url = reqwest::Url::parse(&self.notification_url).map_err(|e| {
            ConfigError::invalid(
                "notifications.notification_url",
                format!("required, the public HTTPS URL Graph posts to ({e})"),
            )
        })?;
        let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(ConfigError::invalid(
                "notifications.notification_url",
                "must be https (Graph posts only to HTTPS; plain http only on loopback, for tests)",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::invalid(
                "notifications.notification_url",
                "must not carry a query or fragment (Graph appends ?validationToken=)",
            ));
        }
        let path = self.path.as_str();
        let plain = path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b));
        if !path.starts_with('/') || path.len() < 2 || !plain || path.contains("//") {
            return Err(ConfigError::invalid(
                "notifications.path",
                "must be an absolute path of letters, digits and - . _ ~, such as \"/notifications\"",
            ));
        }
        if let Some(taken) = TAKEN
            .iter()
            .find(|t| path == **t || path.starts_with(&format!("{t}/")))
        {
            return Err(ConfigError::invalid(
                "notifications.path",
                format!("must not be under {taken}, which the caller listener already serves"),
            ));
        }
        match (&self.client_state, &self.client_state_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "notifications.client_state_file",
                    "set either notifications.client_state or notifications.client_state_file, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    "notifications.client_state",
                    "required: a secret Graph echoes back with every notification (set client_state or client_state_file)",
                ))
            }
            (Some(secret), None) => check_client_state("notifications.client_state", secret)?,
            (None, Some(_)) => {}
        }
        positive("notifications.lifetime", self.lifetime)?;
        if self.lifetime > MAX_LIFETIME {
            return Err(ConfigError::invalid(
                "notifications.lifetime",
                "at most 1 day (Graph's limit for virtual event subscriptions)",
            ));
        }
        positive("notifications.renew_before", self.renew_before)?;
        if self.renew_before >= self.lifetime {
            return Err(ConfigError::invalid(
                "notifications.renew_before",
                "must be shorter than notifications.lifetime",
            ));
        }
        positive("notifications.ttl", self.ttl)?;
        super::at_most_ten_years("notifications.ttl", self.ttl)?;
        positive("notifications.idle_unsubscribe", self.idle_unsubscribe)?;
        super::at_most_ten_years("notifications.idle_unsubscribe", self.idle_unsubscribe)?;
        if self.max_subscriptions == 0 {
            return Err(ConfigError::invalid(
                "notifications.max_subscriptions",
                "must be at least 1 (remove [notifications] to turn them off)",
            ));
        }
        Ok(())
    }

    /// Reads `client_state_file` once, at start-up.
    pub(super) fn read_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.client_state_file {
            let secret =
                SecretString::from(files::read_value("notifications.client_state_file", path)?);
            check_client_state("notifications.client_state_file", &secret)?;
            self.client_state = Some(secret);
        }
        Ok(())
    }
}

fn check_client_state(key: &str, secret: &SecretString) -> Result<(), ConfigError> {
    let value = secret.expose_secret();
    if value.is_empty() || value.chars().count() > MAX_CLIENT_STATE {
        return Err(ConfigError::invalid(
            key,
            format!("must be 1 to {MAX_CLIENT_STATE} characters (Graph's limit)"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::invalid(
            key,
            "must not contain control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Purpose, Settings};

    const BASE: &str = "[auth]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[callers]\nmode = \"none\"\n";

    fn with(section: &str) -> Result<Settings, super::ConfigError> {
        Settings::from_toml(
            &format!("{BASE}[notifications]\n{section}\n"),
            Purpose::Embedded,
        )
    }

    fn key_of(section: &str) -> String {
        match with(section) {
            Err(super::ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn absent_is_off_and_the_defaults_match_the_contract() {
        let s = Settings::from_toml(BASE, Purpose::Embedded).unwrap();
        assert!(s.notifications.is_none());
        let s = with(
            "notification_url = \"https://gsp.example.com/notifications\"\nclient_state = \"x\"",
        )
        .unwrap();
        let n = s.notifications.unwrap();
        assert_eq!(n.path, "/notifications");
        assert_eq!(n.lifetime.as_secs(), 23 * 3600);
        assert_eq!(n.renew_before.as_secs(), 2 * 3600);
        assert_eq!(n.ttl.as_secs(), 6 * 3600);
        assert_eq!(n.idle_unsubscribe.as_secs(), 24 * 3600);
        assert_eq!(n.max_subscriptions, 1000);
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let ok = "notification_url = \"https://gsp.example.com/n\"\nclient_state = \"x\"";
        assert_eq!(
            key_of("client_state = \"x\""),
            "notifications.notification_url"
        );
        assert_eq!(
            key_of("notification_url = \"http://gsp.example.com/n\"\nclient_state = \"x\""),
            "notifications.notification_url"
        );
        assert_eq!(
            key_of("notification_url = \"https://gsp.example.com/n?a=1\"\nclient_state = \"x\""),
            "notifications.notification_url"
        );
        assert_eq!(
            key_of("notification_url = \"https://gsp.example.com/n\""),
            "notifications.client_state"
        );
        let long = "x".repeat(129);
        assert_eq!(
            key_of(&format!(
                "notification_url = \"https://g.example/n\"\nclient_state = \"{long}\""
            )),
            "notifications.client_state"
        );
        assert_eq!(
            key_of(&format!("{ok}\nlifetime = \"25h\"")),
            "notifications.lifetime"
        );
        assert_eq!(
            key_of(&format!("{ok}\nrenew_before = \"23h\"")),
            "notifications.renew_before"
        );
        assert_eq!(
            key_of(&format!("{ok}\npath = \"notif\"")),
            "notifications.path"
        );
        assert_eq!(
            key_of(&format!("{ok}\npath = \"/sessions/x\"")),
            "notifications.path"
        );
        assert_eq!(
            key_of(&format!("{ok}\npath = \"/a b\"")),
            "notifications.path"
        );
        assert_eq!(key_of(&format!("{ok}\nttl = \"0s\"")), "notifications.ttl");
        assert_eq!(
            key_of(&format!("{ok}\nmax_subscriptions = 0")),
            "notifications.max_subscriptions"
        );
        let err = with(&format!("{ok}\nlifetmie = \"1h\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("notifications") && err.contains("lifetmie"),
            "{err}"
        );
        // Loopback http is allowed (tests, a local ingress).
        with("notification_url = \"http://127.0.0.1:8080/n\"\nclient_state = \"x\"").unwrap();
    }

    #[test]
    fn the_client_state_never_prints() {
        let s =
            with("notification_url = \"https://g.example/n\"\nclient_state = \"hunter2-secret\"")
                .unwrap();
        assert!(!format!("{s:?}").contains("hunter2-secret"));
        assert!(!s.redacted_toml().contains("hunter2-secret"));
    }
}
