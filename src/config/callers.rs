//! `[callers]`: who may call the proxy — API keys, Entra ID app tokens (JWT), or nobody
//! checked — and per-caller limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::http::sha256_from_hex;

use super::{
    check_http_url, plain_http_warning, positive, ConfigError, Kind, LimitOverrides, LimitSettings,
};

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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
    /// Overrides of `[limits]` for this caller (absent = the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_burst: Option<u32>,
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
    /// Overrides of `[limits]` for this app (or role) (absent = the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_burst: Option<u32>,
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

    /// Checks values the types cannot: names the key and the reason.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let modes = self.enabled_modes();
        if modes.contains(&CallerMode::None) && modes.len() > 1 {
            return Err(ConfigError::invalid(
                "callers.modes",
                "\"none\" cannot be combined with other modes",
            ));
        }
        if modes.contains(&CallerMode::ApiKey) && self.api_keys.is_empty() {
            return Err(ConfigError::invalid(
                "callers.api_keys",
                "mode \"api_key\" needs at least one [[callers.api_keys]] entry",
            ));
        }
        if modes.contains(&CallerMode::Jwt) {
            let Some(jwt) = &self.jwt else {
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
        for (i, key) in self.api_keys.iter().enumerate() {
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
        Ok(())
    }

    /// What `check-config` should warn about in `[callers]`.
    pub(super) fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.enabled_modes().contains(&CallerMode::None) {
            out.push("callers.mode = \"none\": every caller can read every session".to_string());
        }
        out.extend(plain_http_warning(
            "callers.jwt.jwks_url",
            self.jwt.as_ref().and_then(|j| j.jwks_url.as_deref()),
        ));
        out
    }
}

/// The four `[limits]` keys as a caller's overrides.
macro_rules! overrides {
    ($s:expr) => {
        LimitOverrides {
            requests_per_second: $s.requests_per_second,
            requests_burst: $s.requests_burst,
            graph_per_minute: $s.graph_per_minute,
            graph_burst: $s.graph_burst,
        }
    };
}

impl ApiKeySettings {
    pub fn limits(&self) -> LimitOverrides {
        overrides!(self)
    }
}

impl JwtAppSettings {
    pub fn limits(&self) -> LimitOverrides {
        overrides!(self)
    }
}

impl CallersSettings {
    /// Each caller's limits, with its overrides applied, make sense.
    pub(super) fn validate_limits(&self, defaults: &LimitSettings) -> Result<(), ConfigError> {
        for (i, key) in self.api_keys.iter().enumerate() {
            defaults
                .with(key.limits())
                .validate(&format!("callers.api_keys[{i}]."))?;
        }
        for (i, app) in self.jwt.iter().flat_map(|j| j.apps.iter()).enumerate() {
            defaults
                .with(app.limits())
                .validate(&format!("callers.jwt.apps[{i}]."))?;
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use crate::config::tests::MINIMAL;
    use crate::config::{Purpose, Settings};

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
}
