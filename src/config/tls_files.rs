//! The caller listener's certificate and key files (`server.tls_cert_file`,
//! `server.tls_key_file`): read, parsed and checked to belong together. Configuration
//! validation and the listener's reloads both use this one reader, so a file that loads
//! at start-up loads the same way at a reload.

use std::path::Path;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::files;
use crate::config::ConfigError;

pub const CERT_KEY: &str = "server.tls_cert_file";
pub const KEY_KEY: &str = "server.tls_key_file";

/// Reads a PEM certificate chain (end-entity certificate first) and its PEM private key
/// (PKCS#8, PKCS#1 or SEC1), and checks that the key belongs to the certificate.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, ConfigError> {
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        key: key.to_string(),
        reason,
    };
    let cert_pem = files::read(CERT_KEY, cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(CERT_KEY, format!("{} is not PEM: {e}", cert_file.display())))?;
    if chain.is_empty() {
        return Err(invalid(
            CERT_KEY,
            format!("{} holds no CERTIFICATE block", cert_file.display()),
        ));
    }
    let key_pem = files::read(KEY_KEY, key_file)?;
    // The error text of a failed key parse never includes key material.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(
            KEY_KEY,
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                key_file.display()
            ),
        )
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        invalid(
            KEY_KEY,
            format!(
                "{} does not fit {}: {e}",
                key_file.display(),
                cert_file.display()
            ),
        )
    })
}

/// The crypto provider: ring, chosen explicitly so that no process-wide default (and no
/// second provider pulled in by another crate) decides it.
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
