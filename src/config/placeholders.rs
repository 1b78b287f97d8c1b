//! Values left as the shipped examples (config/, deploy/) have them. One rule across
//! `[auth]`, `[server]` and `[callers]`, kept in one place so the examples' values and the
//! order in which they are reported are listed once.

use super::{ConfigError, Settings};

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

impl Settings {
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
}

#[cfg(test)]
mod tests {
    use crate::config::tests::MINIMAL;
    use crate::config::{Purpose, Settings};

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
}
