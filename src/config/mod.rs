//! Settings: one TOML file plus `GSP__SECTION__KEY` environment overrides.
//!
//! Loading goes file -> environment -> `serde_path_to_error` (so a type error names the
//! key, e.g. `cache.ttl`) -> [`Settings::validate`] (so a bad value names the key and the
//! reason). Unknown keys are errors everywhere: a typo must never silently fall back to a
//! default. Secrets are [`SecretString`]s; neither `Debug` nor [`Settings::redacted_toml`]
//! ever shows them.

pub mod tls_files;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use redis::IntoConnectionInfo;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::core::http::sha256_from_hex;
pub use crate::core::model::{ApiVersion, Kind};

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
    pub log: LogSettings,
}

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
    /// Reads and parses the TLS certificate and key, so that a file serve could not use is
    /// a configuration error (exit 2) at start-up rather than a listener that fails every
    /// handshake. `check-config` skips files that do not exist where it runs (they may be
    /// mounted only where the proxy runs; [`Settings::warnings`] says so).
    fn check_tls_files(&self, purpose: Purpose) -> Result<(), ConfigError> {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(());
        };
        if purpose == Purpose::Check && !(cert.exists() && key.exists()) {
            return Ok(());
        }
        tls_files::load(cert, key).map(drop)
    }
}

/// Microsoft cloud instance: decides the Graph root, the token host and the default scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum AssertionAlgorithm {
    #[default]
    #[serde(rename = "PS256")]
    Ps256,
    #[serde(rename = "RS256")]
    Rs256,
}

/// A certificate credential: the private key (PEM) and the certificate's thumbprints.
#[derive(Clone)]
pub struct ClientCertificate {
    pub key_pem: SecretString,
    /// base64url SHA-256 of the certificate's DER (`x5t#S256`).
    pub x5t_s256: String,
    /// base64url SHA-1 of the DER (`x5t`, which Entra wants with RS256).
    pub x5t: String,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t_s256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

impl ClientCertificate {
    /// Reads and checks a PEM certificate and its PEM RSA private key.
    pub fn load(
        certificate_file: &Path,
        private_key_file: &Path,
    ) -> Result<ClientCertificate, ConfigError> {
        use base64::Engine;
        use sha2::Digest;
        let read = |key: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                key,
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_text = read("auth.certificate_file", certificate_file)?;
        let cert = pem::parse(&cert_text)
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE")
            .ok_or_else(|| {
                ConfigError::invalid("auth.certificate_file", "not a PEM certificate")
            })?;
        let key_pem = read("auth.private_key_file", private_key_file)?;
        jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.as_bytes()).map_err(|_| {
            ConfigError::invalid("auth.private_key_file", "not a PEM RSA private key")
        })?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Ok(ClientCertificate {
            key_pem: SecretString::from(key_pem),
            x5t_s256: b64.encode(sha2::Sha256::digest(cert.contents())),
            x5t: b64.encode(sha1::Sha1::digest(cert.contents())),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    #[default]
    Global,
    Usgov,
    Dod,
    China,
}

impl Cloud {
    pub fn name(self) -> &'static str {
        match self {
            Cloud::Global => "global",
            Cloud::Usgov => "usgov",
            Cloud::Dod => "dod",
            Cloud::China => "china",
        }
    }

    /// Graph root without a trailing slash (docs/reference/graph-facts.md, national clouds).
    pub fn graph_root(self) -> &'static str {
        match self {
            Cloud::Global => "https://graph.microsoft.com",
            Cloud::Usgov => "https://graph.microsoft.us",
            Cloud::Dod => "https://dod-graph.microsoft.us",
            Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
        }
    }

    /// Host of the identity platform's token endpoint.
    pub fn login_host(self) -> &'static str {
        match self {
            Cloud::Global => "login.microsoftonline.com",
            Cloud::Usgov | Cloud::Dod => "login.microsoftonline.us",
            Cloud::China => "login.chinacloudapi.cn",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraphSettings {
    pub cloud: Cloud,
    pub api_version: ApiVersion,
    /// Override of the Graph root (tests, egress proxies); default from `cloud`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Per attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub max_retries: u32,
    /// Consecutive Graph failures (5xx, timeouts, connection errors) that open the
    /// circuit; 0 = never.
    pub circuit_failures: u32,
    /// How long an open circuit stops calls before one probe is let through.
    #[serde(with = "humantime_serde")]
    pub circuit_cooldown: Duration,
    /// Session lists: `@odata.nextLink` pages followed at most (the first page included).
    pub max_list_pages: u32,
}

impl Default for GraphSettings {
    fn default() -> Self {
        GraphSettings {
            cloud: Cloud::Global,
            api_version: ApiVersion::V1,
            base_url: None,
            timeout: Duration::from_secs(10),
            max_retries: 3,
            circuit_failures: 5,
            circuit_cooldown: Duration::from_secs(30),
            max_list_pages: 20,
        }
    }
}

impl GraphSettings {
    /// Graph root in effect, without a trailing slash.
    pub fn root(&self) -> String {
        match &self.base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => self.cloud.graph_root().to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    #[serde(serialize_with = "redact", skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<SecretString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// PEM certificate registered on the app; with `private_key_file`, a signed client
    /// assertion replaces the secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_file: Option<PathBuf>,
    /// PEM RSA private key of `certificate_file` (PKCS#1 or PKCS#8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_file: Option<PathBuf>,
    /// Signature of the client assertion: PS256 (Microsoft's recommendation) or RS256.
    pub assertion_algorithm: AssertionAlgorithm,
    /// Read from the two files at start-up; never printed.
    #[serde(skip)]
    pub certificate: Option<ClientCertificate>,
    /// `{tenant}` is replaced by `tenant_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(with = "humantime_serde")]
    pub refresh_before_expiry: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            tenant_id: None,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            certificate_file: None,
            private_key_file: None,
            assertion_algorithm: AssertionAlgorithm::Ps256,
            certificate: None,
            token_url: None,
            scope: None,
            refresh_before_expiry: Duration::from_secs(300),
        }
    }
}

/// The tenant and client id in the shipped examples.
const PLACEHOLDER_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// SHA-256 digests in the shipped examples (config/, deploy/), with what they are.
const SAMPLE_DIGESTS: &[(&str, &str)] = &[
    (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "all zeros",
    ),
    (
        "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f",
        "the digest of \"change-me\"",
    ),
];

/// The environment variable that supplies the client secret.
const ENV_SECRET: &str = "GSP__AUTH__CLIENT_SECRET";

/// The other secret sources, when they too come from the environment.
const SECRET_SOURCE_VARS: &[&str] = &[
    "GSP__AUTH__CLIENT_SECRET_FILE",
    "GSP__AUTH__CERTIFICATE_FILE",
    "GSP__AUTH__PRIVATE_KEY_FILE",
];

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
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redact")]
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerMode {
    #[default]
    ApiKey,
    Jwt,
    None,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallersSettings {
    pub mode: CallerMode,
    /// Several modes at once, e.g. `["api_key", "jwt"]`; when set, `mode` is ignored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modes: Vec<CallerMode>,
    pub api_keys: Vec<ApiKeySettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// Appears in logs as the caller.
    pub name: String,
    /// Hex SHA-256 of the key; keys are never stored in clear.
    pub sha256: String,
    /// Optional limit to these kinds; absent = all kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<Kind>>,
    /// Optional limit to these event ids, exact or `*@<tenant id>`; absent = all events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
}

/// `[callers.jwt]`: Entra ID (or any OIDC) app tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// Required `iss`, e.g. `https://login.microsoftonline.com/<tenant>/v2.0`.
    pub issuer: Option<String>,
    /// Required `aud`, e.g. `api://graph-session-proxy`.
    pub audience: Option<String>,
    pub jwks_url: Option<String>,
    /// Every one of these must be in the token's `roles` claim.
    pub required_roles: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// How long a fetched key set is used before it is fetched again.
    #[serde(with = "humantime_serde")]
    pub jwks_cache: Duration,
    /// Per-app limits; when any are listed, apps that match none are refused (403).
    pub apps: Vec<JwtAppSettings>,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            issuer: None,
            audience: None,
            jwks_url: None,
            required_roles: Vec::new(),
            leeway: Duration::from_secs(60),
            jwks_cache: Duration::from_secs(3600),
            apps: Vec::new(),
        }
    }
}

/// One calling application (by `client_id`: the token's `azp`/`appid`) or every holder of
/// an app role (by `role`), with optional limits.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtAppSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<Kind>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
}

impl CallersSettings {
    /// The modes in force: `modes` when given, else `mode`.
    pub fn enabled_modes(&self) -> Vec<CallerMode> {
        if self.modes.is_empty() {
            vec![self.mode]
        } else {
            self.modes.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// Keys whose environment overrides stay text even when they look like numbers.
/// (`GSP__AUTH__CLIENT_SECRET` is not among them: [`AuthSettings::use_env_secret`] applies
/// it, because it also replaces the secret source the file names.)
const TEXT_KEYS: &[&str] = &[
    "auth.client_id",
    "auth.tenant_id",
    "auth.scope",
    "auth.token_url",
    "graph.base_url",
    "cache.shared.redis_url",
    "cache.shared.key_prefix",
    "log.level",
    "callers.jwt.issuer",
    "callers.jwt.audience",
    "callers.jwt.jwks_url",
];

fn redact<S: Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
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
        settings.validate(purpose)?;
        if purpose != Purpose::Check {
            settings.read_secret_file()?;
        }
        settings.server.check_tls_files(purpose)?;
        Ok(settings)
    }

    /// Reads `auth.client_secret_file` once, at start-up.
    fn read_secret_file(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.auth.client_secret_file {
            let secret = read_text_file("auth.client_secret_file", path)?;
            self.auth.client_secret = Some(SecretString::from(secret));
        }
        if let (Some(cert), Some(key)) = (&self.auth.certificate_file, &self.auth.private_key_file)
        {
            self.auth.certificate = Some(ClientCertificate::load(cert, key)?);
        }
        if let Some(shared) = &mut self.cache.shared {
            if let Some(path) = &shared.redis_url_file {
                let url = read_text_file("cache.shared.redis_url_file", path)?
                    .trim()
                    .to_string();
                check_redis_url("cache.shared.redis_url_file", &url)?;
                shared.redis_url = Some(SecretString::from(url));
            }
            if let Some(path) = &shared.password_file {
                let in_url = shared
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
                let password = read_text_file("cache.shared.password_file", path)?;
                shared.password = Some(SecretString::from(password));
            }
            if let Some(path) = &shared.ca_file {
                let tls = shared
                    .redis_url
                    .as_ref()
                    .is_some_and(|url| url.expose_secret().starts_with("rediss://"));
                if !tls {
                    return Err(ConfigError::invalid(
                        "cache.shared.ca_file",
                        "only for a rediss:// URL",
                    ));
                }
                let pem = read_text_file("cache.shared.ca_file", path)?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(ConfigError::invalid(
                        "cache.shared.ca_file",
                        "not a PEM certificate",
                    ));
                }
                shared.ca_pem = Some(pem.into_bytes());
            }
        }
        Ok(())
    }

    /// Checks values the types cannot: names the key and the reason.
    pub fn validate(&self, purpose: Purpose) -> Result<(), ConfigError> {
        // Instants are computed from these: absurd values must not overflow them.
        const MAX: Duration = Duration::from_secs(10 * 365 * 86_400);
        for (key, d) in [
            ("server.request_timeout", self.server.request_timeout),
            ("server.shutdown_grace", self.server.shutdown_grace),
            (
                "server.tls_reload_interval",
                self.server.tls_reload_interval,
            ),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.idle_timeout", self.server.idle_timeout),
            ("graph.timeout", self.graph.timeout),
            ("graph.circuit_cooldown", self.graph.circuit_cooldown),
            (
                "auth.refresh_before_expiry",
                self.auth.refresh_before_expiry,
            ),
            ("cache.ttl", self.cache.ttl),
            ("cache.negative_ttl", self.cache.negative_ttl),
            (
                "cache.stale_while_revalidate",
                self.cache.stale_while_revalidate,
            ),
            ("cache.stale_if_error", self.cache.stale_if_error),
            ("cache.failure_ttl", self.cache.failure_ttl),
            ("cache.ttl_ended", self.cache.ttl_ended),
            ("cache.list_ttl", self.cache.list_ttl),
        ] {
            if d > MAX {
                return Err(ConfigError::invalid(key, "at most 10 years"));
            }
        }
        if let Some(shared) = &self.cache.shared {
            for (key, d) in [
                ("cache.shared.timeout", shared.timeout),
                ("cache.shared.connect_timeout", shared.connect_timeout),
                ("cache.shared.retry_interval", shared.retry_interval),
                ("cache.shared.lock_ttl", shared.lock_ttl),
            ] {
                if d > Duration::from_secs(3600) {
                    return Err(ConfigError::invalid(key, "at most 1h"));
                }
            }
            if shared.timeout >= self.server.request_timeout {
                return Err(ConfigError::invalid(
                    "cache.shared.timeout",
                    "must be shorter than server.request_timeout (Redis is a shortcut, not a wait)",
                ));
            }
        }
        let s = &self.server;
        if s.max_concurrent_requests == 0 {
            return Err(ConfigError::invalid(
                "server.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        positive("server.request_timeout", s.request_timeout)?;
        positive("server.header_read_timeout", s.header_read_timeout)?;
        positive("server.idle_timeout", s.idle_timeout)?;
        if s.max_connections == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if !(1..=65535).contains(&s.listen_backlog) {
            return Err(ConfigError::invalid(
                "server.listen_backlog",
                "from 1 to 65535",
            ));
        }
        match &s.admin_token_sha256 {
            Some(digest) if sha256_from_hex(digest).is_none() => {
                return Err(ConfigError::invalid(
                    "server.admin_token_sha256",
                    "must be 64 hex characters: printf %s \"$TOKEN\" | sha256sum",
                ));
            }
            None if !s.admin_listen.ip().is_loopback() => {
                return Err(ConfigError::invalid(
                    "server.admin_token_sha256",
                    "required when server.admin_listen is not a loopback address (purges would be open to the network)",
                ));
            }
            _ => {}
        }
        if !(8..=1000).contains(&s.max_headers) {
            return Err(ConfigError::invalid("server.max_headers", "from 8 to 1000"));
        }
        if !(1024..=1024 * 1024).contains(&s.max_header_bytes.as_u64()) {
            return Err(ConfigError::invalid(
                "server.max_header_bytes",
                "from 1KiB to 1MiB",
            ));
        }
        match (&s.tls_cert_file, &s.tls_key_file) {
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
        positive("server.tls_reload_interval", s.tls_reload_interval)?;

        let g = &self.graph;
        positive("graph.timeout", g.timeout)?;
        if g.max_retries > 10 {
            return Err(ConfigError::invalid("graph.max_retries", "at most 10"));
        }
        if let Some(shared) = &self.cache.shared {
            match (&shared.redis_url, &shared.redis_url_file) {
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
            if shared.key_prefix.is_empty()
                || shared.key_prefix.len() > 64
                || !shared.key_prefix.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::invalid(
                    "cache.shared.key_prefix",
                    "1 to 64 printable ASCII characters without spaces",
                ));
            }
            positive("cache.shared.timeout", shared.timeout)?;
            positive("cache.shared.connect_timeout", shared.connect_timeout)?;
            if shared.lock_ttl < Duration::from_millis(100) {
                return Err(ConfigError::invalid(
                    "cache.shared.lock_ttl",
                    "at least 100ms (its holder renews it every third of it)",
                ));
            }
            if shared.max_body_bytes.as_u64() > 512 * 1024 * 1024 {
                return Err(ConfigError::invalid(
                    "cache.shared.max_body_bytes",
                    "at most 512MiB (Redis's limit for one value)",
                ));
            }
        }
        if !(1..=1000).contains(&g.max_list_pages) {
            return Err(ConfigError::invalid(
                "graph.max_list_pages",
                "from 1 to 1000",
            ));
        }
        if let Some(url) = &g.base_url {
            check_http_url("graph.base_url", url)?;
        }

        let a = &self.auth;
        match (&a.certificate_file, &a.private_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "auth.private_key_file",
                    "required with auth.certificate_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "auth.certificate_file",
                    "required with auth.private_key_file",
                ));
            }
            (Some(_), Some(_)) if a.client_secret.is_some() || a.client_secret_file.is_some() => {
                return Err(ConfigError::invalid(
                    "auth.certificate_file",
                    "use either a certificate or a client secret, not both",
                ));
            }
            _ => {}
        }
        if a.client_secret.is_some() && a.client_secret_file.is_some() {
            return Err(ConfigError::invalid(
                "auth.client_secret_file",
                "set either auth.client_secret or auth.client_secret_file, not both",
            ));
        }
        if let Some(url) = &a.token_url {
            check_http_url("auth.token_url", url)?;
        }
        if let Some(scope) = &a.scope {
            if scope.trim().is_empty() || scope.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "auth.scope",
                    "must be one scope such as https://graph.microsoft.com/.default",
                ));
            }
        }
        match &a.tenant_id {
            Some(t) => check_tenant(t)?,
            None if purpose != Purpose::Embedded => {
                return Err(ConfigError::invalid(
                    "auth.tenant_id",
                    "required: the directory (tenant) id of the proxy's app registration",
                ));
            }
            None => {}
        }
        match &a.client_id {
            Some(c) if c.trim().is_empty() => {
                return Err(ConfigError::invalid("auth.client_id", "must not be empty"));
            }
            None if purpose != Purpose::Embedded => {
                return Err(ConfigError::invalid(
                    "auth.client_id",
                    "required: the application (client) id of the proxy's app registration",
                ));
            }
            _ => {}
        }
        if purpose == Purpose::Serve
            && a.client_secret.is_none()
            && a.client_secret_file.is_none()
            && a.certificate_file.is_none()
        {
            return Err(ConfigError::invalid(
                "auth.client_secret",
                "required: set auth.client_secret (or GSP__AUTH__CLIENT_SECRET), auth.client_secret_file, or auth.certificate_file with auth.private_key_file",
            ));
        }
        if let Some(secret) = &a.client_secret {
            if secret.expose_secret().is_empty() {
                return Err(ConfigError::invalid(
                    "auth.client_secret",
                    "must not be empty",
                ));
            }
        }

        let c = &self.cache;
        positive("cache.ttl", c.ttl)?;
        positive("cache.ttl_ended", c.ttl_ended)?;
        if !(0.0..1.0).contains(&c.refresh_ahead) {
            return Err(ConfigError::invalid(
                "cache.refresh_ahead",
                "a fraction of ttl from 0 (off) to below 1, e.g. 0.2",
            ));
        }
        if g.circuit_failures > 0 {
            positive("graph.circuit_cooldown", g.circuit_cooldown)?;
        }
        if c.max_bytes.as_u64() < 64 * 1024 {
            return Err(ConfigError::invalid(
                "cache.max_bytes",
                "must be at least 64KiB",
            ));
        }

        let callers = &self.callers;
        let modes = callers.enabled_modes();
        if modes.contains(&CallerMode::None) && modes.len() > 1 {
            return Err(ConfigError::invalid(
                "callers.modes",
                "\"none\" cannot be combined with other modes",
            ));
        }
        if modes.contains(&CallerMode::ApiKey) && callers.api_keys.is_empty() {
            return Err(ConfigError::invalid(
                "callers.api_keys",
                "mode \"api_key\" needs at least one [[callers.api_keys]] entry",
            ));
        }
        if modes.contains(&CallerMode::Jwt) {
            let Some(jwt) = &callers.jwt else {
                return Err(ConfigError::invalid(
                    "callers.jwt",
                    "mode \"jwt\" needs a [callers.jwt] section with issuer, audience and jwks_url",
                ));
            };
            for (key, value) in [
                ("callers.jwt.issuer", &jwt.issuer),
                ("callers.jwt.audience", &jwt.audience),
                ("callers.jwt.jwks_url", &jwt.jwks_url),
            ] {
                if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    return Err(ConfigError::invalid(key, "required for mode \"jwt\""));
                }
            }
            if let Some(url) = &jwt.jwks_url {
                check_http_url("callers.jwt.jwks_url", url)?;
            }
            if jwt.leeway > Duration::from_secs(600) {
                return Err(ConfigError::invalid("callers.jwt.leeway", "at most 10m"));
            }
            positive("callers.jwt.jwks_cache", jwt.jwks_cache)?;
            for (i, app) in jwt.apps.iter().enumerate() {
                if app.client_id.is_some() == app.role.is_some() {
                    return Err(ConfigError::invalid(
                        &format!("callers.jwt.apps[{i}]"),
                        "set exactly one of client_id or role",
                    ));
                }
                check_events(
                    &format!("callers.jwt.apps[{i}].events"),
                    app.events.as_deref(),
                )?;
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, key) in callers.api_keys.iter().enumerate() {
            if key.name.trim().is_empty() {
                return Err(ConfigError::invalid(
                    &format!("callers.api_keys[{i}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(key.name.as_str()) {
                return Err(ConfigError::invalid(
                    &format!("callers.api_keys[{i}].name"),
                    format!("duplicate caller name {:?}", key.name),
                ));
            }
            if sha256_from_hex(&key.sha256).is_none() {
                return Err(ConfigError::invalid(
                    &format!("callers.api_keys[{i}].sha256"),
                    "must be 64 hex characters: printf %s \"$KEY\" | sha256sum",
                ));
            }
            check_events(
                &format!("callers.api_keys[{i}].events"),
                key.events.as_deref(),
            )?;
        }

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                "not a valid filter such as \"info\" or \"graph_session_proxy=debug\"",
            ));
        }
        if purpose == Purpose::Serve {
            if let Some(placeholder) = self.placeholders().into_iter().next() {
                return Err(placeholder);
            }
        }
        Ok(())
    }

    /// Values left as the shipped examples have them: the all-zero GUIDs and the sample
    /// digests. `serve` refuses them (a proxy that can never get a token, or admits
    /// whoever read the example, must not report ready); `check-config` warns.
    pub fn placeholders(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        let guid = |key: &str, value: Option<&str>, what: &str| {
            value.filter(|v| v.trim() == PLACEHOLDER_GUID).map(|_| {
                ConfigError::invalid(
                    key,
                    format!("{PLACEHOLDER_GUID} is the example's placeholder: set {what}"),
                )
            })
        };
        out.extend(guid(
            "auth.tenant_id",
            self.auth.tenant_id.as_deref(),
            "the Directory (tenant) ID of the proxy's app registration",
        ));
        out.extend(guid(
            "auth.client_id",
            self.auth.client_id.as_deref(),
            "the Application (client) ID of the proxy's app registration",
        ));
        if let Some(jwt) = &self.callers.jwt {
            for (i, app) in jwt.apps.iter().enumerate() {
                out.extend(guid(
                    &format!("callers.jwt.apps[{i}].client_id"),
                    app.client_id.as_deref(),
                    "the calling application's client id",
                ));
            }
        }
        let digest = |key: &str, value: &str, how: &str| {
            SAMPLE_DIGESTS
                .iter()
                .find(|(sample, _)| value.eq_ignore_ascii_case(sample))
                .map(|(_, what)| {
                    ConfigError::invalid(
                        key,
                        format!("{what}, a placeholder from the examples: set the digest of your own {how}"),
                    )
                })
        };
        if let Some(value) = &self.server.admin_token_sha256 {
            out.extend(digest(
                "server.admin_token_sha256",
                value,
                "token: TOKEN=$(openssl rand -base64 32); printf %s \"$TOKEN\" | sha256sum",
            ));
        }
        for (i, key) in self.callers.api_keys.iter().enumerate() {
            out.extend(digest(
                &format!("callers.api_keys[{i}].sha256"),
                &key.sha256,
                "key: KEY=$(openssl rand -base64 32); printf %s \"$KEY\" | sha256sum",
            ));
        }
        out
    }

    /// What `check-config` should warn about: things that only the running proxy can tell.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(key) = &self.auth.private_key_file {
            if let Some(mode) = loose_permissions(key) {
                out.push(format!(
                    "auth.private_key_file {} is readable by group or others (mode {mode:o}): chmod 600 it",
                    key.display()
                ));
            }
        }
        if let (Some(cert), Some(key)) = (&self.server.tls_cert_file, &self.server.tls_key_file) {
            for (name, path) in [("server.tls_cert_file", cert), ("server.tls_key_file", key)] {
                if !path.exists() {
                    out.push(format!(
                        "{name} {} does not exist here: serve reads it at start-up",
                        path.display()
                    ));
                }
            }
            if let Some(mode) = loose_permissions(key) {
                out.push(format!(
                    "server.tls_key_file {} is readable by group or others (mode {mode:o}): chmod 600 it",
                    key.display()
                ));
            }
        }
        match (&self.auth.client_secret, &self.auth.client_secret_file) {
            (None, None) if self.auth.certificate_file.is_some() => {}
            (None, None) => out.push(
                "auth.client_secret is not set: serve needs it (or GSP__AUTH__CLIENT_SECRET, or auth.client_secret_file)".to_string(),
            ),
            (_, Some(path)) if !path.is_file() => out.push(format!(
                "auth.client_secret_file {} does not exist here: serve reads it at start-up",
                path.display()
            )),
            (_, Some(path)) => {
                if let Some(mode) = loose_permissions(path) {
                    out.push(format!(
                        "auth.client_secret_file {} is readable by group or others (mode {mode:o}): chmod 600 it",
                        path.display()
                    ));
                }
            }
            _ => {}
        }
        if self.graph.cloud != Cloud::Global {
            out.push(format!(
                "graph.cloud = \"{}\": Microsoft documents the virtual event session API for the global cloud only; it may not exist here",
                self.graph.cloud.name()
            ));
        }
        if self.callers.enabled_modes().contains(&CallerMode::None) {
            out.push("callers.mode = \"none\": every caller can read every session".to_string());
        }
        for (key, url) in [
            ("graph.base_url", self.graph.base_url.as_deref()),
            ("auth.token_url", self.auth.token_url.as_deref()),
            (
                "callers.jwt.jwks_url",
                self.callers
                    .jwt
                    .as_ref()
                    .and_then(|j| j.jwks_url.as_deref()),
            ),
        ] {
            if let Some(host) = url.and_then(plain_http_host) {
                out.push(format!(
                    "{key} is plain http:// to {host}, which is not loopback: tokens and session data cross the network unencrypted"
                ));
            }
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

/// A secret (or similar) file read once at start-up: its text without the final line
/// ending (only that: a password may begin or end with a space); empty is an error.
fn read_text_file(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.trim_end_matches(['\r', '\n']).to_string();
    if text.is_empty() {
        return Err(ConfigError::invalid(key, "the file is empty"));
    }
    Ok(text)
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

/// The file's permission bits when group or others may read it.
#[cfg(unix)]
fn loose_permissions(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}

#[cfg(not(unix))]
fn loose_permissions(_path: &Path) -> Option<u32> {
    None
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

fn check_events(key: &str, events: Option<&[String]>) -> Result<(), ConfigError> {
    for event in events.unwrap_or_default() {
        if event.is_empty() || event.contains(['/', '?', '#']) {
            return Err(ConfigError::invalid(
                key,
                format!("{event:?} is not an event id or *@<tenant id>"),
            ));
        }
    }
    Ok(())
}

fn check_tenant(tenant: &str) -> Result<(), ConfigError> {
    if matches!(
        tenant.to_ascii_lowercase().as_str(),
        "common" | "organizations" | "consumers"
    ) {
        return Err(ConfigError::invalid(
            "auth.tenant_id",
            "the client-credentials grant needs a real tenant id, not common/organizations/consumers",
        ));
    }
    let ok = !tenant.is_empty()
        && tenant.len() <= 256
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok {
        return Err(ConfigError::invalid(
            "auth.tenant_id",
            "must be a tenant GUID or domain name",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
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
    fn missing_tenant_is_named() {
        let text = MINIMAL.replace("tenant_id = \"11111111-2222-3333-4444-555555555555\"", "");
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.tenant_id"), "{err}");
        // The demo fills the identity in itself.
        assert!(Settings::from_toml(&text, Purpose::Embedded).is_ok());
    }

    #[test]
    fn common_tenant_is_refused() {
        let text = MINIMAL.replace("11111111-2222-3333-4444-555555555555", "common");
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.tenant_id"), "{err}");
    }

    #[test]
    fn api_key_hash_must_be_hex() {
        let text = MINIMAL.replace(
            "mode = \"none\"",
            "mode = \"api_key\"\n[[callers.api_keys]]\nname = \"a\"\nsha256 = \"xyz\"\n",
        );
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("callers.api_keys[0].sha256"), "{err}");
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
    fn secret_file_is_read_once_and_loose_permissions_are_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gsp-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-a-file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = MINIMAL.replace(
            "client_secret = \"s3cret-value\"",
            &format!("client_secret_file = {:?}", file.display().to_string()),
        );
        let s = Settings::from_toml(&text, Purpose::Serve).unwrap();
        assert_eq!(
            s.auth.client_secret.as_ref().unwrap().expose_secret(),
            "from-a-file"
        );
        assert!(
            s.warnings().iter().any(|w| w.contains("chmod 600")),
            "{:?}",
            s.warnings()
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            !s.warnings().iter().any(|w| w.contains("chmod")),
            "{:?}",
            s.warnings()
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
    fn placeholders_are_refused_by_serve_and_warned_about_by_check() {
        let zero = "0000000000000000000000000000000000000000000000000000000000000000";
        let change_me = "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f";
        let with_key = |sha: &str| {
            format!("{MINIMAL}\n[[callers.api_keys]]\nname = \"a\"\nsha256 = \"{sha}\"\n")
        };
        let cases = [
            (
                MINIMAL.replace(
                    "11111111-2222-3333-4444-555555555555",
                    "00000000-0000-0000-0000-000000000000",
                ),
                "auth.tenant_id",
            ),
            (
                MINIMAL.replace("client_id = \"app\"", "client_id = \"00000000-0000-0000-0000-000000000000\""),
                "auth.client_id",
            ),
            (with_key(zero), "callers.api_keys[0].sha256"),
            (with_key(&change_me.to_uppercase()), "callers.api_keys[0].sha256"),
            (
                format!("[server]\nadmin_token_sha256 = \"{change_me}\"\n{MINIMAL}"),
                "server.admin_token_sha256",
            ),
            (
                format!("{MINIMAL}\n[callers.jwt]\n[[callers.jwt.apps]]\nclient_id = \"00000000-0000-0000-0000-000000000000\"\n"),
                "callers.jwt.apps[0].client_id",
            ),
        ];
        for (text, key) in cases {
            let err = Settings::from_toml(&text, Purpose::Serve)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("placeholder"), "{err}");
            let checked = Settings::from_toml(&text, Purpose::Check).unwrap();
            assert!(
                checked
                    .warnings()
                    .iter()
                    .any(|w| w.contains(key) && w.contains("refuse")),
                "{key}: {:?}",
                checked.warnings()
            );
            assert!(
                Settings::from_toml(&text, Purpose::Embedded).is_ok(),
                "{key}"
            );
        }
        // A real digest and the demo's identity are fine.
        let real = with_key("c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c");
        assert!(Settings::from_toml(&real, Purpose::Serve).is_ok());
        let demo =
            Settings::from_toml(include_str!("../../config/demo.toml"), Purpose::Serve).unwrap();
        assert!(demo.placeholders().is_empty());
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

    #[test]
    fn clouds_have_their_hosts_and_scopes() {
        // docs/reference/graph-facts.md, national clouds.
        let table = [
            (
                "global",
                "https://graph.microsoft.com",
                "login.microsoftonline.com",
            ),
            (
                "usgov",
                "https://graph.microsoft.us",
                "login.microsoftonline.us",
            ),
            (
                "dod",
                "https://dod-graph.microsoft.us",
                "login.microsoftonline.us",
            ),
            (
                "china",
                "https://microsoftgraph.chinacloudapi.cn",
                "login.chinacloudapi.cn",
            ),
        ];
        for (cloud, root, login) in table {
            let text = format!("{MINIMAL}\n[graph]\ncloud = \"{cloud}\"\n");
            let s = Settings::from_toml(&text, Purpose::Serve).unwrap();
            assert_eq!(s.graph.root(), root, "{cloud}");
            assert_eq!(s.scope(), format!("{root}/.default"), "{cloud}");
            assert_eq!(
                s.token_url(),
                format!("https://{login}/11111111-2222-3333-4444-555555555555/oauth2/v2.0/token"),
                "{cloud}"
            );
            let shown = s.redacted_toml();
            assert!(shown.contains(root) && shown.contains(login), "{shown}");
            assert_eq!(
                s.warnings().iter().any(|w| w.contains("graph.cloud")),
                cloud != "global",
                "{cloud}"
            );
        }
    }
}
