//! TLS on the caller listener: the certificate and key from `server.tls_cert_file` and
//! `server.tls_key_file`, reloaded when the files change.
//!
//! [`CertificateFiles`] is rustls' certificate resolver: every handshake takes the
//! [`CertifiedKey`] current at that moment, so a renewed certificate is presented to new
//! connections while connections already open keep the one they started with. The files
//! are polled (modification time and size of both) rather than watched with inotify: that
//! works the same for a plain file, a bind mount and Kubernetes' symlink-swapped Secret
//! volumes, and a poll every few seconds costs nothing. A reload that fails (a file half
//! written, a key that does not match the certificate) keeps the current certificate and
//! logs a warning; the next change of either file is tried again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::tls_files::{load, provider};
use crate::config::ConfigError;
use crate::telemetry::{names, Metrics};

/// ALPN protocols offered, in order of preference; hyper-util's auto builder then serves
/// whichever the client chose (or detects the HTTP/2 preface when it chose none).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What tells a changed file from an unchanged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// The caller listener's certificate, reloaded from its files when they change.
#[derive(Debug)]
pub struct CertificateFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// Presented by every new handshake. A read lock held for one `Arc` clone per
    /// handshake; the writer (a reload) holds it for one pointer swap.
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamps when last loaded or tried, so that an unchanged broken file is
    /// not tried (and warned about) on every poll. Only the reload task takes this lock.
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

/// The outcome of one [`CertificateFiles::poll`].
#[derive(Debug)]
pub enum Reload {
    /// Neither file changed since the last poll.
    Unchanged,
    /// New handshakes now present the new certificate.
    Reloaded,
    /// A file changed but could not be used; the previous certificate stays.
    Failed(ConfigError),
}

impl CertificateFiles {
    /// Loads the files once; an error here is a configuration error (exit 2).
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertificateFiles, ConfigError> {
        // Stamps first: a change that lands between them and the read is seen next poll.
        let seen = (stamp(cert_file), stamp(key_file));
        let key = load(cert_file, key_file)?;
        Ok(CertificateFiles {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(seen),
        })
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads the files when either changed since the last poll.
    pub fn poll(&self) -> Reload {
        let now = (stamp(&self.cert_file), stamp(&self.key_file));
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == now {
                return Reload::Unchanged;
            }
            *seen = now;
        }
        match load(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                Reload::Reloaded
            }
            Err(e) => Reload::Failed(e),
        }
    }

    /// Polls the files every `interval`, for as long as the task runs.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Arc<Metrics>) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await; // the first tick is immediate: the files were just loaded
        loop {
            every.tick().await;
            let files = self.clone();
            // File system calls block; a slow network mount must not stall a worker.
            let outcome = match tokio::task::spawn_blocking(move || files.poll()).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload task failed");
                    continue;
                }
            };
            match outcome {
                Reload::Unchanged => {}
                Reload::Reloaded => {
                    metrics
                        .counter(names::TLS_RELOADS, &[("outcome", "ok")])
                        .increment(1);
                    tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
                }
                Reload::Failed(e) => {
                    metrics
                        .counter(names::TLS_RELOADS, &[("outcome", "error")])
                        .increment(1);
                    tracing::warn!(
                        error = %e,
                        cause = %crate::telemetry::Causes(&e),
                        "TLS certificate not reloaded: still serving the previous one"
                    );
                }
            }
        }
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The rustls server configuration of the caller listener: safe default protocol versions
/// (TLS 1.2 and 1.3), no client certificates, ALPN `h2` then `http/1.1`.
pub fn server_config(certificate: Arc<CertificateFiles>) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tls_files::{CERT_KEY, KEY_KEY};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name)
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("gsp-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn self_signed() -> (String, String) {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (generated.cert.pem(), generated.signing_key.serialize_pem())
    }

    fn message(e: &ConfigError) -> String {
        let mut text = e.to_string();
        if let Some(source) = std::error::Error::source(e) {
            text.push_str(&format!(": {source}"));
        }
        text
    }

    #[test]
    fn pkcs8_pkcs1_and_sec1_keys_load() {
        let dir = TempDir::new("formats");
        let (cert, key) = self_signed();
        let key = load(&dir.write("c.pem", &cert), &dir.write("k.pem", &key)).unwrap();
        assert_eq!(key.cert.len(), 1);
        // PKCS#1 ("RSA PRIVATE KEY") and SEC1 ("EC PRIVATE KEY"), made with openssl.
        load(&fixture("client-cert.pem"), &fixture("tls-rsa-pkcs1.pem")).unwrap();
        load(&fixture("tls-ec-cert.pem"), &fixture("tls-ec-sec1.pem")).unwrap();
    }

    #[test]
    fn a_chain_keeps_its_order() {
        let dir = TempDir::new("chain");
        let (leaf, key) = self_signed();
        let (other, _) = self_signed();
        let chain = format!("{leaf}{other}");
        let loaded = load(&dir.write("c.pem", &chain), &dir.write("k.pem", &key)).unwrap();
        assert_eq!(loaded.cert.len(), 2);
        let leaf_der = CertificateDer::from_pem_slice(leaf.as_bytes()).unwrap();
        assert_eq!(loaded.cert[0], leaf_der);
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = TempDir::new("errors");
        let (cert, key) = self_signed();
        let cert_file = dir.write("c.pem", &cert);
        let key_file = dir.write("k.pem", &key);
        let missing = dir.0.join("missing.pem");
        let garbage = dir.write("garbage.pem", "not pem at all\n");
        let truncated = dir.write("truncated.pem", &cert[..cert.len() / 2]);
        let (_, other_key) = self_signed();
        let other_key = dir.write("other-key.pem", &other_key);

        let cases: [(&Path, &Path, &str, &str); 7] = [
            (&missing, &key_file, CERT_KEY, "cannot read"),
            (&cert_file, &missing, KEY_KEY, "cannot read"),
            (&garbage, &key_file, CERT_KEY, "no CERTIFICATE"),
            (&truncated, &key_file, CERT_KEY, "not PEM"),
            (&cert_file, &garbage, KEY_KEY, "no PEM private key"),
            // A certificate where the key should be.
            (&cert_file, &cert_file, KEY_KEY, "no PEM private key"),
            (&cert_file, &other_key, KEY_KEY, "does not fit"),
        ];
        for (cert, key, named, why) in cases {
            let err = load(cert, key).unwrap_err();
            let text = message(&err);
            assert!(text.contains(named), "{text}");
            assert!(text.contains(why), "{text}");
        }
    }

    #[test]
    fn poll_reloads_on_change_and_keeps_the_old_key_on_failure() {
        let dir = TempDir::new("poll");
        let (cert, key) = self_signed();
        let cert_file = dir.write("c.pem", &cert);
        let key_file = dir.write("k.pem", &key);
        let files = CertificateFiles::load(&cert_file, &key_file).unwrap();
        let first = files.current();
        assert!(matches!(files.poll(), Reload::Unchanged));

        std::fs::write(&cert_file, "-----BEGIN CERTIFICATE-----\nbroken").unwrap();
        assert!(matches!(files.poll(), Reload::Failed(_)));
        assert_eq!(
            files.current().cert,
            first.cert,
            "the old certificate stays"
        );
        // An unchanged broken file is not tried again.
        assert!(matches!(files.poll(), Reload::Unchanged));

        let (cert2, key2) = self_signed();
        std::fs::write(&cert_file, &cert2).unwrap();
        std::fs::write(&key_file, &key2).unwrap();
        assert!(matches!(files.poll(), Reload::Reloaded));
        assert_ne!(files.current().cert, first.cert);
    }

    #[test]
    fn alpn_offers_h2_then_http1() {
        let dir = TempDir::new("alpn");
        let (cert, key) = self_signed();
        let files =
            CertificateFiles::load(&dir.write("c.pem", &cert), &dir.write("k.pem", &key)).unwrap();
        let config = server_config(Arc::new(files)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
