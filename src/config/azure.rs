//! `[auth] credential`: which credential the proxy presents, inferred from the keys present
//! when not named, and the defaults Azure's environment supplies for the secretless ones
//! (the Workload ID webhook's `AZURE_*` variables, App Service's `IDENTITY_*`).

use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::{check_http_url, files, AuthSettings, ConfigError, Purpose};

/// How the proxy proves its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ClientSecret,
    Certificate,
    WorkloadIdentity,
    ManagedIdentity,
}

impl CredentialKind {
    pub fn name(self) -> &'static str {
        match self {
            CredentialKind::ClientSecret => "client_secret",
            CredentialKind::Certificate => "certificate",
            CredentialKind::WorkloadIdentity => "workload_identity",
            CredentialKind::ManagedIdentity => "managed_identity",
        }
    }
}

/// Instance Metadata Service: managed identities on VMs, scale sets and AKS nodes.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// What came from the environment rather than the file.
#[derive(Debug, Clone, Default)]
pub struct AzureEnv {
    /// `federated_token_file` is `AZURE_FEDERATED_TOKEN_FILE`'s (errors name the variable).
    pub federated_token_file: bool,
    /// App Service / Functions: `IDENTITY_HEADER`, sent as `X-IDENTITY-HEADER` to
    /// `IDENTITY_ENDPOINT`.
    pub identity_header: Option<SecretString>,
}

/// Where a managed identity's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedFlavour {
    /// `api-version=2018-02-01`, `Metadata: true`.
    Imds,
    /// `api-version=2019-08-01`, `X-IDENTITY-HEADER`.
    AppService,
}

impl AuthSettings {
    /// The credential in effect: `auth.credential`, else the one the keys present name
    /// (a certificate, a secret, a federated token file, a managed identity key), else a
    /// client secret (today's default, whose absence `validate` reports).
    pub fn credential_kind(&self) -> CredentialKind {
        if let Some(kind) = self.credential {
            return kind;
        }
        if self.certificate.is_some()
            || self.certificate_file.is_some()
            || self.private_key_file.is_some()
        {
            CredentialKind::Certificate
        } else if self.client_secret.is_some() || self.client_secret_file.is_some() {
            CredentialKind::ClientSecret
        } else if self.federated_token_file.is_some() {
            CredentialKind::WorkloadIdentity
        } else if self.managed_identity_client_id.is_some()
            || self.managed_identity_endpoint.is_some()
        {
            CredentialKind::ManagedIdentity
        } else {
            CredentialKind::ClientSecret
        }
    }

    /// Fills in what Azure's environment supplies, as `azure-identity` does: for workload
    /// identity `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
    /// `AZURE_AUTHORITY_HOST` (keys in the file win); for a managed identity App Service's
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`. With no credential named or implied and
    /// `AZURE_FEDERATED_TOKEN_FILE` set (a pod the webhook mutated), workload identity.
    pub(super) fn apply_azure_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        let nothing_named = self.credential.is_none()
            && self.client_secret.is_none()
            && self.client_secret_file.is_none()
            && self.certificate_file.is_none()
            && self.private_key_file.is_none()
            && self.managed_identity_client_id.is_none()
            && self.managed_identity_endpoint.is_none();
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if nothing_named && env("AZURE_FEDERATED_TOKEN_FILE").is_some() {
            self.credential = Some(CredentialKind::WorkloadIdentity);
        }
        match self.credential_kind() {
            CredentialKind::WorkloadIdentity => {
                if self.federated_token_file.is_none() {
                    if let Some(file) = env("AZURE_FEDERATED_TOKEN_FILE") {
                        self.federated_token_file = Some(PathBuf::from(file));
                        self.azure_env.federated_token_file = true;
                    }
                }
                if self.client_id.is_none() {
                    self.client_id = env("AZURE_CLIENT_ID");
                }
                if self.tenant_id.is_none() {
                    self.tenant_id = env("AZURE_TENANT_ID");
                }
                if self.token_url.is_none() {
                    if let Some(host) = env("AZURE_AUTHORITY_HOST") {
                        self.token_url = Some(format!(
                            "{}/{{tenant}}/oauth2/v2.0/token",
                            host.trim_end_matches('/')
                        ));
                    }
                }
            }
            CredentialKind::ManagedIdentity => {
                // App Service / Functions (Service Fabric, which also sets
                // IDENTITY_SERVER_THUMBPRINT, speaks another protocol: not taken for it).
                // An overriding endpoint keeps the App Service protocol and its header.
                if env("IDENTITY_SERVER_THUMBPRINT").is_none() {
                    if let (Some(endpoint), Some(header)) =
                        (env("IDENTITY_ENDPOINT"), env("IDENTITY_HEADER"))
                    {
                        self.managed_identity_endpoint.get_or_insert(endpoint);
                        self.azure_env.identity_header = Some(SecretString::from(header));
                    }
                }
            }
            CredentialKind::ClientSecret | CredentialKind::Certificate => {}
        }
    }

    /// The managed identity's endpoint and its protocol.
    pub fn managed_identity(&self) -> (String, ManagedFlavour) {
        let endpoint = self
            .managed_identity_endpoint
            .clone()
            .unwrap_or_else(|| IMDS_ENDPOINT.to_string());
        let flavour = if self.azure_env.identity_header.is_some() {
            ManagedFlavour::AppService
        } else {
            ManagedFlavour::Imds
        };
        (endpoint, flavour)
    }

    /// The key (or variable) that names the federated token file, for messages.
    pub fn federated_token_key(&self) -> &'static str {
        if self.azure_env.federated_token_file {
            "AZURE_FEDERATED_TOKEN_FILE"
        } else {
            "auth.federated_token_file"
        }
    }

    /// The checks of the secretless credentials, and that no other credential's keys are
    /// set beside the one in use.
    pub(super) fn validate_credential(&self, purpose: Purpose) -> Result<(), ConfigError> {
        let kind = self.credential_kind();
        let secretless = matches!(
            kind,
            CredentialKind::WorkloadIdentity | CredentialKind::ManagedIdentity
        );
        if secretless {
            for (key, set) in [
                ("auth.client_secret", self.client_secret.is_some()),
                ("auth.client_secret_file", self.client_secret_file.is_some()),
                ("auth.certificate_file", self.certificate_file.is_some()),
                ("auth.private_key_file", self.private_key_file.is_some()),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "not used with auth.credential = \"{}\": remove it",
                            kind.name()
                        ),
                    ));
                }
            }
        }
        if kind != CredentialKind::WorkloadIdentity && self.federated_token_file.is_some() {
            return Err(ConfigError::invalid(
                "auth.federated_token_file",
                format!(
                    "only used with auth.credential = \"workload_identity\", not \"{}\"",
                    kind.name()
                ),
            ));
        }
        if kind != CredentialKind::ManagedIdentity
            && (self.managed_identity_client_id.is_some()
                || self.managed_identity_endpoint.is_some())
        {
            return Err(ConfigError::invalid(
                "auth.managed_identity_client_id",
                format!(
                    "managed_identity_* keys are only used with auth.credential = \"managed_identity\", not \"{}\"",
                    kind.name()
                ),
            ));
        }
        match kind {
            // check-config may run where the webhook's variables are not: a warning there.
            CredentialKind::WorkloadIdentity
                if purpose != Purpose::Check && self.federated_token_file.is_none() =>
            {
                Err(ConfigError::invalid(
                    "auth.federated_token_file",
                    "required for workload_identity (or AZURE_FEDERATED_TOKEN_FILE, which the Workload ID webhook sets)",
                ))
            }
            CredentialKind::WorkloadIdentity
                if purpose == Purpose::Serve && self.client_id.is_none() =>
            {
                Err(ConfigError::invalid(
                    "auth.client_id",
                    "required: the application (client) id whose federated credential trusts this token (or AZURE_CLIENT_ID)",
                ))
            }
            CredentialKind::Certificate
                if self.certificate.is_none()
                    && (self.certificate_file.is_none() || self.private_key_file.is_none()) =>
            {
                Err(ConfigError::invalid(
                    "auth.certificate_file",
                    "auth.credential = \"certificate\" needs auth.certificate_file and auth.private_key_file",
                ))
            }
            CredentialKind::ManagedIdentity => {
                if let Some(url) = &self.managed_identity_endpoint {
                    check_http_url("auth.managed_identity_endpoint", url)?;
                }
                if let Some(id) = &self.managed_identity_client_id {
                    if id.trim().is_empty() || id.contains(char::is_whitespace) {
                        return Err(ConfigError::invalid(
                            "auth.managed_identity_client_id",
                            "must be the user-assigned identity's client id",
                        ));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// At start-up: the federated token file must be there, readable and not empty.
    pub(super) fn check_federated_token_file(&self) -> Result<(), ConfigError> {
        if self.credential_kind() != CredentialKind::WorkloadIdentity {
            return Ok(());
        }
        match &self.federated_token_file {
            Some(path) => files::read_value(self.federated_token_key(), path).map(drop),
            None => Ok(()),
        }
    }

    /// `check-config`: a federated token file that is not there is named (it may exist
    /// only in the pod).
    pub(super) fn credential_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.credential_kind() == CredentialKind::WorkloadIdentity {
            if self.federated_token_file.is_none() {
                out.push("auth.federated_token_file is not set and AZURE_FEDERATED_TOKEN_FILE is not in this environment: serve needs one (the Workload ID webhook sets it in the pod)".to_string());
            }
            if self.tenant_id.is_none() {
                out.push("auth.tenant_id is not set and AZURE_TENANT_ID is not in this environment: serve needs one (the Workload ID webhook sets it in the pod)".to_string());
            }
            if self.tenant_id.is_none() {
                out.push("auth.tenant_id is not set and AZURE_TENANT_ID is not in this environment: serve needs one (the Workload ID webhook sets it in the pod)".to_string());
            }
            if self.client_id.is_none() {
                out.push("auth.client_id is not set and AZURE_CLIENT_ID is not in this environment: serve needs one (the Workload ID webhook sets it from the service account's annotation)".to_string());
            }
            if let Some(path) = &self.federated_token_file {
                if let Err(e) = files::read_value(self.federated_token_key(), path) {
                    out.push(format!(
                        "{e}: serve needs it at start-up (the Workload ID webhook projects it into the pod)"
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::tests::MINIMAL;
    use crate::config::Settings;

    fn without_secret() -> String {
        MINIMAL.replace("client_secret = \"s3cret-value\"", "")
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn the_credential_is_inferred_from_the_keys_present() {
        let s = Settings::from_toml(MINIMAL, Purpose::Embedded).unwrap();
        assert_eq!(s.auth.credential_kind(), CredentialKind::ClientSecret);
        let text = without_secret().replace(
            "[auth]",
            "[auth]\nmanaged_identity_client_id = \"0f0f0f0f-1111-2222-3333-444444444444\"",
        );
        let s = Settings::from_toml(&text, Purpose::Embedded).unwrap();
        assert_eq!(s.auth.credential_kind(), CredentialKind::ManagedIdentity);
        let text = without_secret().replace(
            "[auth]",
            "[auth]\nfederated_token_file = \"/var/run/secrets/azure/tokens/azure-identity-token\"",
        );
        let s = Settings::from_toml(&text, Purpose::Check).unwrap();
        assert_eq!(s.auth.credential_kind(), CredentialKind::WorkloadIdentity);
    }

    #[test]
    fn the_workload_identity_webhook_variables_fill_in_what_the_file_leaves_out() {
        let mut auth = AuthSettings::default();
        auth.apply_azure_env(env(&[
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("AZURE_CLIENT_ID", "c1"),
            ("AZURE_TENANT_ID", "t1"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
        ]));
        assert_eq!(auth.credential_kind(), CredentialKind::WorkloadIdentity);
        assert_eq!(auth.client_id.as_deref(), Some("c1"));
        assert_eq!(auth.tenant_id.as_deref(), Some("t1"));
        assert_eq!(
            auth.token_url.as_deref(),
            Some("https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token")
        );
        assert_eq!(auth.federated_token_key(), "AZURE_FEDERATED_TOKEN_FILE");
        // A secret in the file wins: the variables are not a credential by themselves.
        let mut auth = AuthSettings {
            client_secret: Some("s".to_string().into()),
            ..AuthSettings::default()
        };
        auth.apply_azure_env(env(&[("AZURE_FEDERATED_TOKEN_FILE", "/x")]));
        assert_eq!(auth.credential_kind(), CredentialKind::ClientSecret);
        assert!(auth.federated_token_file.is_none());
    }

    #[test]
    fn app_service_variables_select_its_endpoint() {
        let mut auth = AuthSettings {
            credential: Some(CredentialKind::ManagedIdentity),
            ..AuthSettings::default()
        };
        auth.apply_azure_env(env(&[
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:41234/msi/token"),
            ("IDENTITY_HEADER", "h"),
        ]));
        assert_eq!(
            auth.managed_identity(),
            (
                "http://127.0.0.1:41234/msi/token".to_string(),
                ManagedFlavour::AppService
            )
        );
        // An overriding endpoint keeps App Service's protocol; Service Fabric is not it.
        let mut overridden = AuthSettings {
            credential: Some(CredentialKind::ManagedIdentity),
            managed_identity_endpoint: Some("http://127.0.0.1:9/msi/token".to_string()),
            ..AuthSettings::default()
        };
        overridden.apply_azure_env(env(&[
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:41234/msi/token"),
            ("IDENTITY_HEADER", "h"),
        ]));
        assert_eq!(
            overridden.managed_identity(),
            (
                "http://127.0.0.1:9/msi/token".to_string(),
                ManagedFlavour::AppService
            )
        );
        let mut fabric = AuthSettings {
            credential: Some(CredentialKind::ManagedIdentity),
            ..AuthSettings::default()
        };
        fabric.apply_azure_env(env(&[
            (
                "IDENTITY_ENDPOINT",
                "https://127.0.0.1:2377/metadata/identity/oauth2/token",
            ),
            ("IDENTITY_HEADER", "h"),
            ("IDENTITY_SERVER_THUMBPRINT", "ab"),
        ]));
        assert_eq!(
            fabric.managed_identity(),
            (IMDS_ENDPOINT.to_string(), ManagedFlavour::Imds)
        );
        let imds = AuthSettings {
            credential: Some(CredentialKind::ManagedIdentity),
            ..AuthSettings::default()
        };
        assert_eq!(
            imds.managed_identity(),
            (IMDS_ENDPOINT.to_string(), ManagedFlavour::Imds)
        );
    }

    #[test]
    fn each_credential_names_what_it_misses_or_does_not_use() {
        let cases = [
            (
                "credential = \"workload_identity\"",
                "auth.federated_token_file",
            ),
            (
                "credential = \"managed_identity\"\nclient_secret = \"x\"",
                "auth.client_secret",
            ),
            (
                "credential = \"client_secret\"\nfederated_token_file = \"/x\"\nclient_secret = \"x\"",
                "auth.federated_token_file",
            ),
            (
                "credential = \"managed_identity\"\nmanaged_identity_endpoint = \"ftp://x\"",
                "auth.managed_identity_endpoint",
            ),
            ("credential = \"certificate\"", "auth.certificate_file"),
            ("credential = \"passkey\"", "auth.credential"),
        ];
        for (keys, named) in cases {
            let text = without_secret().replace("[auth]", &format!("[auth]\n{keys}"));
            let err = Settings::from_toml(&text, Purpose::Serve)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{keys}: {err}");
        }
    }

    #[test]
    fn a_missing_or_empty_federated_token_file_fails_at_start_up_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("gsp-federated-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        let text = without_secret().replace(
            "[auth]",
            &format!(
                "[auth]\nfederated_token_file = {:?}",
                file.display().to_string()
            ),
        );
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth.federated_token_file"), "{err}");
        let check = Settings::from_toml(&text, Purpose::Check).unwrap();
        assert!(
            check
                .warnings()
                .iter()
                .any(|w| w.contains("auth.federated_token_file")),
            "{:?}",
            check.warnings()
        );
        std::fs::write(&file, "\n").unwrap();
        let err = Settings::from_toml(&text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::write(&file, "eyJhbGciOi.x.y\n").unwrap();
        let s = Settings::from_toml(&text, Purpose::Serve).unwrap();
        assert_eq!(s.auth.credential_kind(), CredentialKind::WorkloadIdentity);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_config_of_a_workload_identity_config_left_to_the_webhook_warns() {
        // Tenant, client id and token file all from the pod's variables.
        let text = "[auth]\ncredential = \"workload_identity\"\n[callers]\nmode = \"none\"\n";
        let check = Settings::from_toml(text, Purpose::Check).unwrap();
        let warnings = check.warnings().join("\n");
        for key in [
            "auth.tenant_id",
            "auth.client_id",
            "auth.federated_token_file",
        ] {
            assert!(warnings.contains(key), "{key}: {warnings}");
        }
        let err = Settings::from_toml(text, Purpose::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth."), "{err}");
    }
}
