//! `[auth]`: the proxy's own identity at Microsoft Entra ID and its credential (a client
//! secret, or a certificate that signs a client assertion).

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::azure::AzureEnv;
pub use super::azure::CredentialKind;
use super::{at_most_ten_years, check_http_url, files, plain_http_warning, ConfigError, Purpose};

/// Signature of the client assertion: PS256 (Microsoft's recommendation) or RS256.
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
        let cert_text = files::read_utf8("auth.certificate_file", certificate_file)?;
        let cert = pem::parse(&cert_text)
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE")
            .ok_or_else(|| {
                ConfigError::invalid("auth.certificate_file", "not a PEM certificate")
            })?;
        let key_pem = files::read_utf8("auth.private_key_file", private_key_file)?;
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    #[serde(
        serialize_with = "super::redact",
        skip_serializing_if = "Option::is_none"
    )]
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
    /// Which credential; absent: inferred from the keys present ([`AuthSettings::credential_kind`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialKind>,
    /// `workload_identity`: the projected service-account token, read for every token
    /// request (default: `AZURE_FEDERATED_TOKEN_FILE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federated_token_file: Option<PathBuf>,
    /// `managed_identity`: a user-assigned identity's client id (absent: system-assigned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_identity_client_id: Option<String>,
    /// `managed_identity`: the token endpoint (default: IMDS, or App Service's
    /// `IDENTITY_ENDPOINT`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_identity_endpoint: Option<String>,
    /// What the Azure environment variables supplied.
    #[serde(skip)]
    pub azure_env: AzureEnv,
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
            credential: None,
            federated_token_file: None,
            managed_identity_client_id: None,
            managed_identity_endpoint: None,
            azure_env: AzureEnv::default(),
        }
    }
}

impl AuthSettings {
    /// Checks values the types cannot: names the key and the reason.
    pub(super) fn validate(&self, purpose: Purpose) -> Result<(), ConfigError> {
        at_most_ten_years("auth.refresh_before_expiry", self.refresh_before_expiry)?;
        match (&self.certificate_file, &self.private_key_file) {
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
            (Some(_), Some(_))
                if self.client_secret.is_some() || self.client_secret_file.is_some() =>
            {
                return Err(ConfigError::invalid(
                    "auth.certificate_file",
                    "use either a certificate or a client secret, not both",
                ));
            }
            _ => {}
        }
        if self.client_secret.is_some() && self.client_secret_file.is_some() {
            return Err(ConfigError::invalid(
                "auth.client_secret_file",
                "set either auth.client_secret or auth.client_secret_file, not both",
            ));
        }
        if let Some(url) = &self.token_url {
            check_http_url("auth.token_url", url)?;
        }
        if let Some(scope) = &self.scope {
            if scope.trim().is_empty() || scope.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "auth.scope",
                    "must be one scope such as https://graph.microsoft.com/.default",
                ));
            }
        }
        self.validate_credential(purpose)?;
        // Whether tenant and client id may be missing here: a managed identity is the
        // identity (no app registration to name); for Workload ID the webhook sets
        // AZURE_TENANT_ID / AZURE_CLIENT_ID in the pod, so check-config elsewhere warns
        // (credential_warnings) instead of refusing.
        let ids_optional = match self.credential_kind() {
            CredentialKind::ManagedIdentity => true,
            CredentialKind::WorkloadIdentity => purpose == Purpose::Check,
            CredentialKind::ClientSecret | CredentialKind::Certificate => false,
        };
        match &self.tenant_id {
            Some(t) => check_tenant(t)?,
            None if purpose != Purpose::Embedded && !ids_optional => {
                return Err(ConfigError::invalid(
                    "auth.tenant_id",
                    "required: the directory (tenant) id of the proxy's app registration",
                ));
            }
            None => {}
        }
        match &self.client_id {
            Some(c) if c.trim().is_empty() => {
                return Err(ConfigError::invalid("auth.client_id", "must not be empty"));
            }
            None if purpose != Purpose::Embedded && !ids_optional => {
                return Err(ConfigError::invalid(
                    "auth.client_id",
                    "required: the application (client) id of the proxy's app registration",
                ));
            }
            _ => {}
        }
        if purpose == Purpose::Serve
            && self.credential_kind() == CredentialKind::ClientSecret
            && self.client_secret.is_none()
            && self.client_secret_file.is_none()
            && self.certificate_file.is_none()
        {
            return Err(ConfigError::invalid(
                "auth.client_secret",
                "required: set auth.client_secret (or GSP__AUTH__CLIENT_SECRET), auth.client_secret_file, auth.certificate_file with auth.private_key_file, or auth.credential = \"workload_identity\" / \"managed_identity\"",
            ));
        }
        if let Some(secret) = &self.client_secret {
            if secret.expose_secret().is_empty() {
                return Err(ConfigError::invalid(
                    "auth.client_secret",
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }

    /// Reads `auth.client_secret_file`, or the certificate and its key, once, at start-up.
    pub(super) fn read_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.client_secret_file {
            let secret = files::read_value("auth.client_secret_file", path)?;
            self.client_secret = Some(SecretString::from(secret));
        }
        if let (Some(cert), Some(key)) = (&self.certificate_file, &self.private_key_file) {
            self.certificate = Some(ClientCertificate::load(cert, key)?);
        }
        self.check_federated_token_file()
    }

    /// What `check-config` should warn about in `[auth]`.
    pub(super) fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(key) = &self.private_key_file {
            if let Some(mode) = files::loose_permissions(key) {
                out.push(format!(
                    "auth.private_key_file {} is readable by group or others (mode {mode:o}): chmod 600 it",
                    key.display()
                ));
            }
        }
        out.extend(self.credential_warnings());
        match (&self.client_secret, &self.client_secret_file) {
            (None, None) if self.credential_kind() != CredentialKind::ClientSecret => {}
            (None, None) => out.push(
                "auth.client_secret is not set: serve needs it (or GSP__AUTH__CLIENT_SECRET, or auth.client_secret_file)".to_string(),
            ),
            (_, Some(path)) if !path.is_file() => out.push(format!(
                "auth.client_secret_file {} does not exist here: serve reads it at start-up",
                path.display()
            )),
            (_, Some(path)) => {
                if let Some(mode) = files::loose_permissions(path) {
                    out.push(format!(
                        "auth.client_secret_file {} is readable by group or others (mode {mode:o}): chmod 600 it",
                        path.display()
                    ));
                }
            }
            _ => {}
        }
        out.extend(plain_http_warning(
            "auth.token_url",
            self.token_url.as_deref(),
        ));
        out
    }
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
    use secrecy::ExposeSecret;

    use crate::config::tests::MINIMAL;
    use crate::config::{Purpose, Settings};

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
}
