//! `[graph]`: which Microsoft cloud, which API version, and how Graph is called.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use super::{
    at_most_ten_years, check_http_url, files, plain_http_warning, positive, ApiVersion, ConfigError,
};

/// Microsoft cloud instance: decides the Graph root, the token host and the default scope.
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
    /// HTTP CONNECT proxy for Graph, the token endpoint and JWKS (absent: `HTTPS_PROXY` /
    /// `NO_PROXY`); credentials in its userinfo are never printed.
    #[serde(
        serialize_with = "redact_userinfo",
        skip_serializing_if = "Option::is_none"
    )]
    pub proxy_url: Option<SecretString>,
    /// Extra trusted roots (PEM) for those connections, beside the bundled ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// From `ca_file`, at start-up.
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
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
            proxy_url: None,
            ca_file: None,
            ca_pem: None,
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

    /// Checks values the types cannot: names the key and the reason.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        at_most_ten_years("graph.timeout", self.timeout)?;
        at_most_ten_years("graph.circuit_cooldown", self.circuit_cooldown)?;
        positive("graph.timeout", self.timeout)?;
        if self.max_retries > 10 {
            return Err(ConfigError::invalid("graph.max_retries", "at most 10"));
        }
        if !(1..=1000).contains(&self.max_list_pages) {
            return Err(ConfigError::invalid(
                "graph.max_list_pages",
                "from 1 to 1000",
            ));
        }
        if let Some(url) = &self.base_url {
            check_http_url("graph.base_url", url)?;
        }
        if self.circuit_failures > 0 {
            positive("graph.circuit_cooldown", self.circuit_cooldown)?;
        }
        if let Some(url) = &self.proxy_url {
            let parsed = reqwest::Url::parse(url.expose_secret()).map_err(|_| {
                ConfigError::invalid("graph.proxy_url", "not a URL (http://host:port)")
            })?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(ConfigError::invalid(
                    "graph.proxy_url",
                    "must be an http:// (or https://) proxy URL with a host",
                ));
            }
            if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
                return Err(ConfigError::invalid(
                    "graph.proxy_url",
                    "must be scheme://[user:password@]host[:port] only",
                ));
            }
        }
        Ok(())
    }

    /// Reads `ca_file` once, at start-up.
    pub(super) fn read_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.ca_file {
            let pem = files::read_value("graph.ca_file", path)?;
            let parsed = reqwest::Certificate::from_pem_bundle(pem.as_bytes());
            if !pem.contains("-----BEGIN CERTIFICATE-----") || parsed.map_or(true, |c| c.is_empty())
            {
                return Err(ConfigError::invalid(
                    "graph.ca_file",
                    "not a PEM certificate (bundle)",
                ));
            }
            self.ca_pem = Some(pem.into_bytes());
        }
        Ok(())
    }

    /// What `check-config` should warn about in `[graph]`.
    pub(super) fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.cloud != Cloud::Global {
            out.push(format!(
                "graph.cloud = \"{}\": Microsoft documents the virtual event session API for the global cloud only; it may not exist here",
                self.cloud.name()
            ));
        }
        out.extend(plain_http_warning(
            "graph.base_url",
            self.base_url.as_deref(),
        ));
        out
    }
}

/// `http://user:[redacted]@host:3128`: the proxy's address stays readable, its password
/// does not.
fn redact_userinfo<S: Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        None => s.serialize_none(),
        Some(url) => match reqwest::Url::parse(url.expose_secret()) {
            Ok(parsed) if parsed.password().is_some() || !parsed.username().is_empty() => {
                let host = parsed.host_str().unwrap_or_default();
                let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
                s.serialize_str(&format!("{}://[redacted]@{host}{port}", parsed.scheme()))
            }
            Ok(parsed) => s.serialize_str(parsed.as_str().trim_end_matches('/')),
            Err(_) => s.serialize_str("[redacted]"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::MINIMAL;

    #[test]
    fn proxy_credentials_are_redacted_and_bad_proxy_urls_named() {
        let text = MINIMAL.replace(
            "[auth]",
            "[graph]\nproxy_url = \"http://svc-gsp:hunter2@egress.corp.example:3128\"\n[auth]",
        );
        let s = crate::config::Settings::from_toml(&text, crate::config::Purpose::Check).unwrap();
        let shown = s.redacted_toml();
        assert!(
            shown.contains("proxy_url = \"http://[redacted]@egress.corp.example:3128\""),
            "{shown}"
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("svc-gsp"),
            "{shown}"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        for bad in [
            "egress:3128",
            "socks5://egress:1080",
            "http://egress:3128/path",
        ] {
            let text = MINIMAL.replace("[auth]", &format!("[graph]\nproxy_url = {bad:?}\n[auth]"));
            let err = crate::config::Settings::from_toml(&text, crate::config::Purpose::Check)
                .unwrap_err()
                .to_string();
            assert!(err.contains("graph.proxy_url"), "{bad}: {err}");
        }
    }
    use super::super::{Purpose, Settings};

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
