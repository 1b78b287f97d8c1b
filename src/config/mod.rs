//! Settings: one TOML file plus `GSP__SECTION__KEY` environment overrides.
//!
//! Loading goes file -> environment -> `serde_path_to_error` (so a type error names the
//! key, e.g. `cache.ttl`) -> [`Settings::validate`] (so a bad value names the key and the
//! reason). Unknown keys are errors everywhere: a typo must never silently fall back to a
//! default. Secrets are [`SecretString`]s; neither `Debug` nor [`Settings::redacted_toml`]
//! ever shows them.

mod auth;
mod azure;
mod cache;
mod callers;
mod files;
mod graph;
mod limits;
mod log;
mod notifications;
mod placeholders;
mod server;
pub mod tls_files;

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize, Serializer};

pub use crate::core::model::{ApiVersion, Kind};
pub use auth::{AssertionAlgorithm, AuthSettings, ClientCertificate};
pub use azure::{CredentialKind, ManagedFlavour, IMDS_ENDPOINT};
pub use cache::{CacheSettings, SharedSettings};
pub use callers::{ApiKeySettings, CallerMode, CallersSettings, JwtAppSettings, JwtSettings};
pub use graph::{Cloud, GraphSettings};
pub use limits::{LimitOverrides, LimitSettings, Rate};
pub use log::{LogFormat, LogSettings};
pub use notifications::NotificationSettings;
pub use server::ServerSettings;

/// Why a configuration could not be used. Every variant names the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration")]
    Load(#[source] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration key `{key}`: cannot read {path}")]
    File {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration; see `config/graph-session-proxy.toml` for every key.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub graph: GraphSettings,
    pub auth: AuthSettings,
    pub cache: CacheSettings,
    pub callers: CallersSettings,
    pub limits: LimitSettings,
    pub log: LogSettings,
    /// Graph change notifications (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notifications: Option<NotificationSettings>,
}

/// What `validate` must check beyond the shape of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `serve`: the proxy's Graph identity is required, the secret file is read.
    Serve,
    /// `check-config`: as `Serve`, but the secret may come later (environment or a file
    /// that exists only where the proxy runs); its absence is reported, not an error.
    Check,
    /// `demo` and tests: the identity may be filled in afterwards.
    Embedded,
}

/// Keys whose environment overrides stay text even when they look like numbers.
/// (`GSP__AUTH__CLIENT_SECRET` is not among them: [`AuthSettings::use_env_secret`] applies
/// it, because it also replaces the secret source the file names.)
const TEXT_KEYS: &[&str] = &[
    "auth.client_id",
    "auth.tenant_id",
    "auth.scope",
    "auth.token_url",
    "auth.managed_identity_client_id",
    "auth.managed_identity_endpoint",
    "graph.base_url",
    "graph.proxy_url",
    "cache.shared.redis_url",
    "cache.shared.key_prefix",
    "log.level",
    "callers.jwt.issuer",
    "callers.jwt.audience",
    "callers.jwt.jwks_url",
    "notifications.notification_url",
    "notifications.path",
    "notifications.client_state",
];

/// The environment variable that supplies the client secret.
const ENV_SECRET: &str = "GSP__AUTH__CLIENT_SECRET";

/// The other secret sources, when they too come from the environment.
const SECRET_SOURCE_VARS: &[&str] = &[
    "GSP__AUTH__CLIENT_SECRET_FILE",
    "GSP__AUTH__CERTIFICATE_FILE",
    "GSP__AUTH__PRIVATE_KEY_FILE",
];

impl Settings {
    /// Reads `path` (TOML), applies `GSP__SECTION__KEY` overrides, and validates.
    pub fn load(path: &Path, purpose: Purpose) -> Result<Settings, ConfigError> {
        let source = config::File::from(path).format(config::FileFormat::Toml);
        Self::build(source, purpose)
    }

    /// Same as [`Settings::load`] for TOML text (the embedded demo configuration).
    pub fn from_toml(text: &str, purpose: Purpose) -> Result<Settings, ConfigError> {
        let source = config::File::from_str(text, config::FileFormat::Toml);
        Self::build(source, purpose)
    }

    fn build<S>(source: S, purpose: Purpose) -> Result<Settings, ConfigError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        // `try_parsing` turns numeric-looking environment values into numbers, which is
        // right for `GSP__GRAPH__MAX_RETRIES=5` and wrong for a secret like `0123`: keys
        // that are text are taken out and set as strings.
        let mut env: std::collections::HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("GSP__"))
            .collect();
        let env_secret = env.remove(ENV_SECRET);
        let env_names_a_source = SECRET_SOURCE_VARS.iter().any(|v| env.contains_key(*v));
        let mut builder = config::Config::builder().add_source(source);
        let mut text_overrides = Vec::new();
        for key in TEXT_KEYS {
            let var = format!("GSP__{}", key.replace('.', "__").to_ascii_uppercase());
            if let Some(value) = env.remove(&var) {
                text_overrides.push((*key, value));
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("GSP")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        for (key, value) in text_overrides {
            builder = builder
                .set_override(key, value)
                .map_err(ConfigError::Load)?;
        }
        let raw = builder.build().map_err(ConfigError::Load)?;
        // Through serde_json so that serde_path_to_error can name the failing key.
        let value: serde_json::Value = raw.try_deserialize().map_err(ConfigError::Load)?;
        let mut settings: Settings = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                key,
                reason: e.into_inner().to_string(),
            }
        })?;
        if let Some(secret) = env_secret {
            settings.auth.use_env_secret(secret, env_names_a_source)?;
        }
        settings
            .auth
            .apply_azure_env(|name| std::env::var(name).ok());
        settings.validate(purpose)?;
        if purpose != Purpose::Check {
            settings.read_secret_file()?;
        } else if settings.graph.ca_file.as_ref().is_some_and(|p| p.exists()) {
            // As the TLS files: checked where it exists (it may exist only in the pod).
            settings.graph.read_files()?;
        }
        settings.server.check_tls_files(purpose)?;
        Ok(settings)
    }

    /// Reads the files that hold secrets (`auth.client_secret_file`, the certificate and
    /// its key, `[cache.shared]`'s URL, password and CA) once, at start-up.
    fn read_secret_file(&mut self) -> Result<(), ConfigError> {
        self.auth.read_files()?;
        self.graph.read_files()?;
        if let Some(shared) = &mut self.cache.shared {
            shared.read_files()?;
        }
        if let Some(notifications) = &mut self.notifications {
            notifications.read_files()?;
        }
        Ok(())
    }

    /// Checks values the types cannot: names the key and the reason. Each section checks
    /// its own keys; `[cache.shared]`'s timeout is checked against `server.request_timeout`.
    pub fn validate(&self, purpose: Purpose) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.graph.validate()?;
        self.auth.validate(purpose)?;
        self.cache.validate(self.server.request_timeout)?;
        self.callers.validate()?;
        self.limits.validate("limits.")?;
        self.callers.validate_limits(&self.limits)?;
        self.log.validate()?;
        if let Some(notifications) = &self.notifications {
            notifications.validate()?;
        }
        if purpose == Purpose::Serve {
            if let Some(placeholder) = self.placeholders().into_iter().next() {
                return Err(placeholder);
            }
        }
        Ok(())
    }

    /// What `check-config` should warn about: things that only the running proxy can tell.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.server.warnings();
        out.extend(self.graph.warnings());
        out.extend(self.auth.warnings());
        out.extend(self.callers.warnings());
        if let Some(shared) = &self.cache.shared {
            out.extend(shared.warnings());
        }
        for placeholder in self.placeholders() {
            out.push(format!(
                "{placeholder} (serve and check-config --strict refuse it)"
            ));
        }
        out
    }

    /// Token endpoint in effect.
    pub fn token_url(&self) -> String {
        let tenant = self.auth.tenant_id.as_deref().unwrap_or("{tenant}");
        match &self.auth.token_url {
            Some(url) => url.replace("{tenant}", tenant),
            None => format!(
                "https://{}/{tenant}/oauth2/v2.0/token",
                self.graph.cloud.login_host()
            ),
        }
    }

    /// Scope in effect: `{graph root}/.default` unless overridden.
    pub fn scope(&self) -> String {
        match &self.auth.scope {
            Some(scope) => scope.clone(),
            None => format!("{}/.default", self.graph.cloud.graph_root()),
        }
    }

    /// The effective configuration as TOML, secrets replaced by `[redacted]`, with the
    /// derived endpoints added as comments.
    pub fn redacted_toml(&self) -> String {
        let body = toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"));
        format!(
            "# effective configuration (secrets redacted)\n# graph root:  {}\n# token url:   {}\n# scope:       {}\n\n{body}",
            self.graph.root(),
            self.token_url(),
            self.scope()
        )
    }
}

impl AuthSettings {
    /// `GSP__AUTH__CLIENT_SECRET` wins over the secret source the file names
    /// (`client_secret`, `client_secret_file`, or `certificate_file` + `private_key_file`):
    /// a deployment keeps the shipped file and hands the secret over in the environment.
    /// Two sources named by the file itself, or a second source also from the
    /// environment, are left for [`Settings::validate`] to refuse: which one was meant
    /// cannot be told.
    fn use_env_secret(
        &mut self,
        secret: String,
        env_names_a_source: bool,
    ) -> Result<(), ConfigError> {
        if secret.is_empty() {
            // An empty value cannot stand for a secret, nor unset the file's source.
            return Err(ConfigError::invalid(
                "auth.client_secret",
                "GSP__AUTH__CLIENT_SECRET is set but empty: unset it to use the secret source the file names",
            ));
        }
        let file_names_two = self.client_secret.is_some()
            && (self.client_secret_file.is_some() || self.certificate_file.is_some());
        if !env_names_a_source && !file_names_two {
            self.client_secret_file = None;
            self.certificate_file = None;
            self.private_key_file = None;
        }
        self.client_secret = Some(SecretString::from(secret));
        Ok(())
    }
}

/// A file holding one secret value (a client secret, a federated token), read as at
/// start-up: for the token layer, which re-reads such files for every token request.
pub fn read_secret_value(key: &'static str, path: &Path) -> Result<SecretString, ConfigError> {
    files::read_value(key, path).map(SecretString::from)
}

/// Instants are computed from durations: absurd values must not overflow them.
fn at_most_ten_years(key: &str, d: Duration) -> Result<(), ConfigError> {
    const MAX: Duration = Duration::from_secs(10 * 365 * 86_400);
    if d > MAX {
        return Err(ConfigError::invalid(key, "at most 10 years"));
    }
    Ok(())
}

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::invalid(key, "must be longer than 0s"));
    }
    Ok(())
}

fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConfigError::invalid(key, format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(key, "must be an http or https URL"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ConfigError::invalid(
            key,
            "must not carry a query or fragment",
        ));
    }
    Ok(())
}

/// The host of an `http://` URL whose host is not loopback (127.0.0.0/8, ::1, localhost).
fn plain_http_host(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    if parsed.scheme() != "http" {
        return None;
    }
    let host = parsed.host_str()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| host.to_string())
}

/// The warning for `key`'s URL when it is plain `http://` off loopback.
fn plain_http_warning(key: &str, url: Option<&str>) -> Option<String> {
    let host = url.and_then(plain_http_host)?;
    Some(format!(
        "{key} is plain http:// to {host}, which is not loopback: tokens and session data cross the network unencrypted"
    ))
}

fn redact<S: Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;
    use secrecy::ExposeSecret;

    pub(crate) const MINIMAL: &str = r#"
        [auth]
        tenant_id = "11111111-2222-3333-4444-555555555555"
        client_id = "app"
        client_secret = "s3cret-value"
        [callers]
        mode = "none"
    "#;

    #[test]
    fn defaults_match_design() {
        let s = Settings::from_toml(MINIMAL, Purpose::Serve).unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(s.cache.ttl, Duration::from_secs(300));
        assert_eq!(s.cache.max_bytes, ByteSize::mib(256));
        assert_eq!(s.graph.api_version, ApiVersion::V1);
        assert_eq!(s.scope(), "https://graph.microsoft.com/.default");
        assert_eq!(
            s.token_url(),
            "https://login.microsoftonline.com/11111111-2222-3333-4444-555555555555/oauth2/v2.0/token"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{MINIMAL}\n[cache]\nttll = \"5m\"\n");
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache") && err.contains("ttll"), "{err}");
    }

    #[test]
    fn malformed_duration_is_named() {
        let text = format!("{MINIMAL}\n[cache]\nttl = \"five minutes\"\n");
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.ttl"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::from_toml(MINIMAL, Purpose::Serve).unwrap();
        assert!(!format!("{s:?}").contains("s3cret-value"));
        let shown = s.redacted_toml();
        assert!(!shown.contains("s3cret-value"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }

    #[test]
    fn a_secret_from_the_environment_replaces_the_files_source() {
        let dir = std::env::temp_dir().join(format!("gsp-env-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let absent = dir.join("absent");
        for source in [
            format!("client_secret_file = {:?}", absent.display().to_string()),
            "certificate_file = \"/absent/c.pem\"\nprivate_key_file = \"/absent/k.pem\""
                .to_string(),
            "client_secret = \"from-the-file\"".to_string(),
        ] {
            let text = MINIMAL.replace("client_secret = \"s3cret-value\"", &source);
            let mut s = Settings::from_toml(&text, Purpose::Check).unwrap();
            s.auth.use_env_secret("from-env".into(), false).unwrap();
            s.validate(Purpose::Serve).unwrap();
            s.read_secret_file().unwrap();
            let a = &s.auth;
            assert_eq!(
                a.client_secret.as_ref().unwrap().expose_secret(),
                "from-env"
            );
            assert!(a.client_secret_file.is_none() && a.certificate_file.is_none());
            assert!(a.private_key_file.is_none() && a.certificate.is_none());
        }
        // Two sources in the file, or a second one from the environment: refused.
        let two = MINIMAL.replace(
            "client_secret = \"s3cret-value\"",
            "client_secret = \"x\"\nclient_secret_file = \"/absent\"",
        );
        let mut raw: Settings = toml::from_str(&two).unwrap();
        raw.auth.use_env_secret("from-env".into(), false).unwrap();
        let err = raw.validate(Purpose::Serve).unwrap_err().to_string();
        assert!(err.contains("auth.client_secret_file"), "{err}");
        let file = MINIMAL.replace(
            "client_secret = \"s3cret-value\"",
            "client_secret_file = \"/absent\"",
        );
        let mut s = Settings::from_toml(&file, Purpose::Check).unwrap();
        s.auth.use_env_secret("from-env".into(), true).unwrap();
        assert!(s.validate(Purpose::Serve).is_err());
        // Empty: not a secret, and not a way to unset the file's source.
        let mut s = Settings::from_toml(&file, Purpose::Check).unwrap();
        let err = s
            .auth
            .use_env_secret(String::new(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.client_secret") && err.contains("empty"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plain_http_off_loopback_is_warned_about() {
        for (url, warned) in [
            ("http://graph.example.com", true),
            ("http://10.0.0.1:8080/", true),
            ("http://127.0.0.1:9", false),
            ("http://127.8.0.1:9", false),
            ("http://[::1]:9", false),
            ("http://LocalHost:9", false),
            ("https://graph.example.com", false),
        ] {
            let text = format!("{MINIMAL}\n[graph]\nbase_url = \"{url}\"\n").replace(
                "client_secret = \"s3cret-value\"",
                &format!(
                    "client_secret = \"s3cret-value\"\ntoken_url = \"{url}/{{tenant}}/token\""
                ),
            );
            let s = Settings::from_toml(&text, Purpose::Serve).unwrap();
            let warnings = s.warnings();
            for key in ["graph.base_url", "auth.token_url"] {
                assert_eq!(
                    warnings
                        .iter()
                        .any(|w| w.contains(key) && w.contains("http://")),
                    warned,
                    "{url}: {warnings:?}"
                );
            }
        }
    }
}
