//! The one place that knows every layer: [`Proxy::build`] wires configuration into the
//! parts (token provider, Graph client, cache, callers, the handler's state);
//! [`Proxy::serve`] takes already-bound listeners and a shutdown future, so tests run it
//! on `127.0.0.1:0` and stop it at will.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::callers::Callers;
use crate::cache::tier2::SharedTier;
use crate::cache::{Origin, SessionCache};
use secrecy::ExposeSecret;

use crate::config::{CredentialKind, Settings};
use crate::core::clock::Clock;
use crate::core::model::SessionKey;
use crate::http::handler::caller_service;
use crate::http::{admin, AppState};
use crate::notify::Notifications;
use crate::server::tls::{self, CertificateFiles};
use crate::server::{accept_loop, ConnectionOptions};
use crate::telemetry::Metrics;
use crate::upstream::error::UpstreamError;
use crate::upstream::gate::Gate;
use crate::upstream::graph::GraphAnswer;
use crate::upstream::graph::{http_client, Egress, GraphClient, GraphOptions};
use crate::upstream::subscriptions::SubscriptionsApi;
use crate::upstream::token::{Credential, ManagedIdentity, TokenOptions, TokenProvider};
use futures::future::{BoxFuture, FutureExt};
use tokio::time::Instant;

/// The cache's origin is the Graph client (the cache itself never names it).
impl Origin for GraphClient {
    fn fetch<'a>(
        &'a self,
        key: &'a SessionKey,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<GraphAnswer, UpstreamError>> {
        GraphClient::fetch(self, key, deadline).boxed()
    }

    fn gate(&self) -> &Gate {
        &self.gate
    }
}

/// Why the proxy could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("auth.token_url is not a valid URL")]
    TokenUrl(#[source] oauth2::url::ParseError),
    #[error("configuration key `{0}` is required")]
    Missing(&'static str),
    #[error("cannot use the caller listener's TLS certificate")]
    Tls(#[source] crate::config::ConfigError),
    #[error("cannot set up TLS")]
    TlsConfig(#[source] rustls::Error),
    #[error("cannot read the credential")]
    Credential(#[source] crate::config::ConfigError),
    #[error("cache.shared.redis_url cannot be used")]
    Redis(#[source] redis::RedisError),
}

pub struct Proxy {
    pub state: Arc<AppState>,
    connections: ConnectionOptions,
    /// The caller listener's certificate files and how often to check them for changes.
    tls_files: Option<(Arc<CertificateFiles>, Duration)>,
}

impl Proxy {
    pub fn build(settings: &Settings, clock: Clock) -> Result<Proxy, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let egress = Egress {
            proxy_url: settings.graph.proxy_url.as_ref().map(|u| u.expose_secret()),
            ca_pem: settings.graph.ca_pem.as_deref(),
        };
        let http = http_client(settings.graph.timeout, &egress).map_err(BuildError::Http)?;
        let callers = Callers::new(&settings.callers, http.clone(), clock.clone());
        let tokens = Arc::new(token_provider(settings, http.clone(), &clock, &metrics)?);
        let graph = Arc::new(GraphClient::new(
            http.clone(),
            GraphOptions {
                root: settings.graph.root(),
                timeout: settings.graph.timeout,
                max_retries: settings.graph.max_retries,
                circuit_failures: settings.graph.circuit_failures,
                circuit_cooldown: settings.graph.circuit_cooldown,
                max_list_pages: settings.graph.max_list_pages,
            },
            tokens.clone(),
            clock.clone(),
            metrics.clone(),
        ));
        let shared = match &settings.cache.shared {
            Some(shared) => Some(Arc::new(
                SharedTier::new(shared, metrics.clone()).map_err(BuildError::Redis)?,
            )),
            None => None,
        };
        let notifications = settings.notifications.as_ref().and_then(|n| {
            let api = SubscriptionsApi::new(
                http.clone(),
                &settings.graph.root(),
                tokens.clone(),
                settings.graph.timeout,
            );
            Notifications::new(n, api, clock.clone(), metrics.clone(), shared.clone())
        });
        if settings.notifications.is_some() && notifications.is_none() {
            return Err(BuildError::Missing("notifications.client_state"));
        }
        let cache = SessionCache::new(
            &settings.cache,
            graph,
            settings.server.request_timeout,
            clock,
            metrics.clone(),
            shared,
        );
        if let Some(n) = &notifications {
            cache.set_push(n.clone());
        }
        let (tls_files, tls_config) = caller_tls(settings)?;
        if callers.is_open() {
            tracing::warn!(
                "callers.mode = \"none\": every caller can read every session this proxy can reach"
            );
        }
        let mut state = AppState::new(settings, callers, cache, metrics, tokens);
        state.notifications = notifications;
        Ok(Proxy {
            state: Arc::new(state),
            tls_files: tls_files.map(|files| (files, settings.server.tls_reload_interval)),
            connections: caller_connections(settings, tls_config),
        })
    }

    /// Serves callers on `listener` and operators on `admin_listener` until `shutdown`
    /// completes, then drains for at most `server.shutdown_grace`.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin_listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let state = self.state.clone();
        let (stop_callers, callers_stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let callers = async {
            accept_loop(
                listener,
                caller_service(state.clone()),
                async {
                    let _ = callers_stopped.await;
                },
                self.connections.clone(),
            )
            .await;
            // The admin listener outlives the drain, so probes see /readyz answer 503.
            let _ = stop_admin.send(());
        };
        let admin = accept_loop(
            admin_listener,
            admin::service(state.clone()),
            async {
                let _ = admin_stopped.await;
            },
            ConnectionOptions::internal(self.connections.grace),
        );
        let readiness = async {
            if state.ready_requires_token {
                // Keep out of rotation until the identity platform has issued a token.
                while !state.draining.load(Ordering::SeqCst) {
                    match state.tokens.token().await {
                        Ok(_) => {
                            state.set_token_problem(None);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "not ready: no Graph token yet");
                            state.set_token_problem(Some(e.caller_message()));
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                }
            }
            if !state.draining.load(Ordering::SeqCst) {
                state.ready.store(true, Ordering::SeqCst);
                tracing::info!("ready");
            }
        };
        // What the exporter's own installer does: fold histogram samples regularly, so
        // memory stays flat whether or not Prometheus scrapes.
        let upkeep = async {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            while !state.draining.load(Ordering::SeqCst) {
                every.tick().await;
                state.metrics.upkeep();
            }
        };
        // New certificates are picked up until the process ends.
        let reload = async {
            match &self.tls_files {
                Some((files, every)) => files.clone().watch(*every, state.metrics.clone()).await,
                None => std::future::pending().await,
            }
        };
        let signal = async {
            shutdown.await;
            tracing::info!("shutting down: draining requests in flight");
            state.ready.store(false, Ordering::SeqCst);
            state.draining.store(true, Ordering::SeqCst);
            let _ = stop_callers.send(());
            if let Some(n) = &state.notifications {
                n.shutdown().await;
            }
        };
        // With a shared tier: purges broadcast by other replicas, gate closures published
        // to them (otherwise idle).
        let shared = state.cache.clone().run_shared_tasks();
        // Change notifications: subscriptions kept up, notifications acted on.
        let notifications = async {
            match state.notifications.clone() {
                Some(n) => n.run(state.cache.clone()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = notifications => {}
            () = async { tokio::join!(callers, admin, readiness, signal); } => {}
            () = async { upkeep.await; std::future::pending::<()>().await } => {}
            () = reload => {}
            () = shared => {}
        }
    }
}

/// The token provider for `[auth]`: the credential `auth.credential` names (or the keys
/// imply).
fn token_provider(
    settings: &Settings,
    http: reqwest::Client,
    clock: &Clock,
    metrics: &Arc<Metrics>,
) -> Result<TokenProvider, BuildError> {
    let auth = &settings.auth;
    let kind = auth.credential_kind();
    let client_id = match (kind, auth.client_id.as_deref()) {
        (_, Some(id)) => id,
        // A managed identity is the machine's; no app registration is named.
        (CredentialKind::ManagedIdentity, None) => "",
        (_, None) => return Err(BuildError::Missing("auth.client_id")),
    };
    let credential = match kind {
        CredentialKind::Certificate => Credential::Certificate {
            certificate: auth
                .certificate
                .clone()
                .ok_or(BuildError::Missing("auth.certificate_file"))?,
            algorithm: auth.assertion_algorithm,
            files: auth
                .certificate_file
                .clone()
                .zip(auth.private_key_file.clone()),
        },
        CredentialKind::ClientSecret => Credential::Secret {
            secret: match (&auth.client_secret, &auth.client_secret_file) {
                (Some(secret), _) => secret.clone(),
                (None, Some(file)) => {
                    crate::config::read_secret_value("auth.client_secret_file", file)
                        .map_err(BuildError::Credential)?
                }
                (None, None) => return Err(BuildError::Missing("auth.client_secret")),
            },
            file: auth.client_secret_file.clone(),
        },
        CredentialKind::WorkloadIdentity => Credential::Federated {
            file: auth
                .federated_token_file
                .clone()
                .ok_or(BuildError::Missing("auth.federated_token_file"))?,
            key: auth.federated_token_key(),
        },
        CredentialKind::ManagedIdentity => {
            let (endpoint, flavour) = auth.managed_identity();
            Credential::Managed(ManagedIdentity {
                endpoint,
                flavour,
                header: auth.azure_env.identity_header.clone(),
                client_id: auth.managed_identity_client_id.clone(),
                resource: format!("{}/", settings.graph.cloud.graph_root()),
            })
        }
    };
    TokenProvider::new(
        http,
        TokenOptions {
            client_id: client_id.to_string(),
            credential,
            token_url: settings.token_url(),
            scope: settings.scope(),
            refresh_before: auth.refresh_before_expiry,
            timeout: settings.graph.timeout,
        },
        clock.clone(),
        metrics.clone(),
    )
    .map_err(BuildError::TokenUrl)
}

/// The caller listener's certificate files and rustls configuration, when HTTPS is on.
type CallerTls = (
    Option<Arc<CertificateFiles>>,
    Option<Arc<rustls::ServerConfig>>,
);

fn caller_tls(settings: &Settings) -> Result<CallerTls, BuildError> {
    let (Some(cert), Some(key)) = (
        &settings.server.tls_cert_file,
        &settings.server.tls_key_file,
    ) else {
        return Ok((None, None));
    };
    let files = Arc::new(CertificateFiles::load(cert, key).map_err(BuildError::Tls)?);
    let config = Arc::new(tls::server_config(files.clone()).map_err(BuildError::TlsConfig)?);
    Ok((Some(files), Some(config)))
}

/// How the caller listener serves connections.
fn caller_connections(
    settings: &Settings,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> ConnectionOptions {
    ConnectionOptions {
        guard: true,
        tls,
        max_connections: settings.server.max_connections,
        header_read_timeout: settings.server.header_read_timeout,
        idle_timeout: settings.server.idle_timeout,
        // Twice the handler's limits: between the two, callers get a JSON 431.
        hard_max_headers: settings.server.max_headers.saturating_mul(2),
        hard_max_buf: (settings.server.max_header_bytes.as_u64() as usize)
            .saturating_mul(4)
            .max(8192),
        h2_max_streams: 256,
        h2_max_header_list: (settings.server.max_header_bytes.as_u64() as u32).saturating_mul(2),
        grace: settings.server.shutdown_grace,
    }
}
