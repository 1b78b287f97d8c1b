//! An egress path for tests: an HTTP CONNECT proxy that counts its tunnels, and a TLS
//! front (a certificate for `localhost` that only a test CA vouches for) before the
//! simulator, so that Graph and the token endpoint are `https://localhost:PORT`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Harness;
use graph_session_proxy::sim::SimConfig;

/// What the CONNECT proxy saw.
#[derive(Default)]
pub struct ProxyLog {
    /// CONNECT tunnels opened.
    pub tunnels: AtomicU64,
    /// Requests that were not CONNECT (refused).
    pub other: AtomicU64,
    /// The tunnels' targets and `Proxy-Authorization` values, in order.
    pub seen: Mutex<Vec<(String, Option<String>)>>,
}

/// A CONNECT proxy on `127.0.0.1:0`.
pub async fn connect_proxy() -> (SocketAddr, Arc<ProxyLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(ProxyLog::default());
    let shared = log.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = shared.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let mut lines = text.split("\r\n");
                let request_line = lines.next().unwrap_or_default().to_string();
                let auth = lines
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization"))
                    .map(|(_, v)| v.trim().to_string());
                let mut parts = request_line.split(' ');
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if method != "CONNECT" {
                    log.other.fetch_add(1, Ordering::SeqCst);
                    let _ = client
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                log.tunnels.fetch_add(1, Ordering::SeqCst);
                log.seen.lock().unwrap().push((target.to_string(), auth));
                let target = target.replace("localhost:", "127.0.0.1:");
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, log)
}

/// A TLS front for `backend`: its certificate (PEM, self-signed for `localhost`, so it is
/// also the CA to trust), its address, and how many connections reached it.
pub async fn tls_front(backend: SocketAddr) -> (String, SocketAddr, Arc<AtomicU64>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = made.cert.pem();
    let key = PrivateKeyDer::from_pem_slice(made.signing_key.serialize_pem().as_bytes()).unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (cert_pem, addr, connections)
}

/// A simulator (inside `backend`) behind a TLS front, and a CONNECT proxy.
pub struct Egress {
    pub backend: Harness,
    pub front: SocketAddr,
    pub ca_pem: String,
    pub reached: Arc<AtomicU64>,
    pub proxy: SocketAddr,
    pub log: Arc<ProxyLog>,
}

impl Egress {
    pub async fn new() -> Egress {
        let backend = Harness::start().await;
        let (ca_pem, front, reached) = tls_front(backend.sim_addr).await;
        let (proxy, log) = connect_proxy().await;
        Egress {
            backend,
            front,
            ca_pem,
            reached,
            proxy,
            log,
        }
    }

    /// A proxy whose Graph and token endpoint are the TLS front, with `ca` trusted.
    pub async fn proxy_with(&self, proxy_url: Option<String>, ca: Option<&str>) -> Harness {
        let port = self.front.port();
        let ca = ca.map(|c| c.as_bytes().to_vec());
        Harness::with(
            move |s| {
                s.graph.base_url = Some(format!("https://localhost:{port}"));
                s.auth.token_url = Some(format!(
                    "https://localhost:{port}/{{tenant}}/oauth2/v2.0/token"
                ));
                s.graph.proxy_url = proxy_url.map(Into::into);
                s.graph.ca_pem = ca;
            },
            SimConfig::default(),
        )
        .await
    }
}
