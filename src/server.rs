//! Listeners, the tower stack, the request handler and graceful shutdown.
//!
//! [`Proxy::build`] wires config into the parts (token provider, Graph client, cache,
//! callers); [`Proxy::serve`] takes already-bound listeners and a shutdown future, so
//! tests run it on `127.0.0.1:0` and stop it at will.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, PRAGMA, TRANSFER_ENCODING,
};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::admin;
use crate::cache::{Directives, Lookup, Outcome, SessionCache};
use crate::callers::Callers;
use crate::clock::Clock;
use crate::config::{ApiVersion, Settings};
use crate::connections::{Activity, Close, Heard, Limits, Registry, Tracked};
use crate::error::{error_response, ProxyError, CLIENT_REQUEST_ID, REQUEST_ID};
use crate::graph::{http_client, GraphClient, GraphOptions};
use crate::request_id;
use crate::routes::{self, Style};
use crate::shared::SharedTier;
use crate::telemetry::{Causes, Metrics};
use crate::tls::{self, CertificateFiles};
use crate::token::{Credential, TokenOptions, TokenProvider};
use crate::wire::GuardedIo;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_GRAPH_REQUEST_ID: HeaderName = HeaderName::from_static("x-graph-request-id");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// The `caller` label of requests refused before authentication.
static ANONYMOUS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));
/// Longest path worth routing: two 256-character ids, each up to 3 bytes per character
/// when percent-encoded, and the fixed segments.
const MAX_PATH_BYTES: usize = 2 * 256 * 3 + 64;

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
    #[error("cache.shared.redis_url cannot be used")]
    Redis(#[source] redis::RedisError),
}

/// Shared by every request.
pub struct AppState {
    pub callers: Callers,
    pub cache: Arc<SessionCache>,
    pub metrics: Arc<Metrics>,
    pub tokens: Arc<TokenProvider>,
    /// Permits for requests in progress; none left -> 503 overloaded at once.
    limit: Arc<Semaphore>,
    request_timeout: Duration,
    /// More request headers than this, or more bytes of them, is a JSON 431.
    max_headers: usize,
    max_header_bytes: usize,
    /// The Graph API version of `/sessions/...` requests.
    api_version: ApiVersion,
    /// False until the listener is up; false again once shutdown begins.
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// Why the last token attempt of the readiness loop failed (the caller-safe text,
    /// never the secret), for `/readyz` to say; a plain mutex because it is written every
    /// few seconds at most and read by probes only.
    pub token_problem: std::sync::Mutex<Option<String>>,
    /// `server.ready_requires_token`: readiness waits for a first Graph token.
    ready_requires_token: bool,
    /// SHA-256 of the admin token purges need, when configured.
    pub admin_token_sha256: Option<[u8; 32]>,
}

impl AppState {
    fn set_token_problem(&self, problem: Option<String>) {
        *self
            .token_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    /// Why the proxy is not ready yet, for `/readyz`.
    pub fn not_ready_reason(&self) -> String {
        let problem = self
            .token_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match problem {
            Some(problem) => format!("no Graph token yet: {problem}"),
            None if self.ready_requires_token => "waiting for a first Graph token".to_string(),
            None => "listener not up yet".to_string(),
        }
    }
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
        let http = http_client(settings.graph.timeout).map_err(BuildError::Http)?;
        let callers = Callers::new(&settings.callers, http.clone(), clock.clone());
        let client_id = settings
            .auth
            .client_id
            .as_deref()
            .ok_or(BuildError::Missing("auth.client_id"))?;
        let credential = match (&settings.auth.certificate, &settings.auth.client_secret) {
            (Some(certificate), _) => Credential::Certificate {
                certificate: certificate.clone(),
                algorithm: settings.auth.assertion_algorithm,
            },
            (None, Some(secret)) => Credential::Secret(secret.clone()),
            (None, None) => return Err(BuildError::Missing("auth.client_secret")),
        };
        let tokens = Arc::new(
            TokenProvider::new(
                http.clone(),
                TokenOptions {
                    client_id: client_id.to_string(),
                    credential,
                    token_url: settings.token_url(),
                    scope: settings.scope(),
                    refresh_before: settings.auth.refresh_before_expiry,
                    timeout: settings.graph.timeout,
                },
                clock.clone(),
                metrics.clone(),
            )
            .map_err(BuildError::TokenUrl)?,
        );
        let graph = Arc::new(GraphClient::new(
            http,
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
        let cache = SessionCache::new(
            &settings.cache,
            graph,
            settings.server.request_timeout,
            clock,
            metrics.clone(),
            shared,
        );
        let tls_files = match (
            &settings.server.tls_cert_file,
            &settings.server.tls_key_file,
        ) {
            (Some(cert), Some(key)) => Some(Arc::new(
                CertificateFiles::load(cert, key).map_err(BuildError::Tls)?,
            )),
            _ => None,
        };
        let tls_config = match &tls_files {
            Some(files) => Some(Arc::new(
                tls::server_config(files.clone()).map_err(BuildError::TlsConfig)?,
            )),
            None => None,
        };
        if callers.is_open() {
            tracing::warn!(
                "callers.mode = \"none\": every caller can read every session this proxy can reach"
            );
        }
        Ok(Proxy {
            state: Arc::new(AppState {
                callers,
                cache,
                metrics,
                tokens,
                limit: Arc::new(Semaphore::new(settings.server.max_concurrent_requests)),
                request_timeout: settings.server.request_timeout,
                max_headers: settings.server.max_headers,
                api_version: settings.graph.api_version,
                max_header_bytes: settings.server.max_header_bytes.as_u64() as usize,
                ready: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                token_problem: std::sync::Mutex::new(None),
                ready_requires_token: settings.server.ready_requires_token,
                admin_token_sha256: settings.server.admin_token_sha256.as_deref().and_then(
                    |hex_digest| {
                        let mut digest = [0u8; 32];
                        hex::decode_to_slice(hex_digest.to_ascii_lowercase(), &mut digest).ok()?;
                        Some(digest)
                    },
                ),
            }),
            tls_files: tls_files.map(|files| (files, settings.server.tls_reload_interval)),
            connections: ConnectionOptions {
                guard: true,
                tls: tls_config,
                max_connections: settings.server.max_connections,
                header_read_timeout: settings.server.header_read_timeout,
                idle_timeout: settings.server.idle_timeout,
                // Twice the handler's limits: between the two, callers get a JSON 431.
                hard_max_headers: settings.server.max_headers.saturating_mul(2),
                hard_max_buf: (settings.server.max_header_bytes.as_u64() as usize)
                    .saturating_mul(4)
                    .max(8192),
                h2_max_streams: 256,
                h2_max_header_list: (settings.server.max_header_bytes.as_u64() as u32)
                    .saturating_mul(2),
                grace: settings.server.shutdown_grace,
            },
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
        };
        // With a shared tier: purges broadcast by other replicas, gate closures published
        // to them (otherwise idle).
        let shared = state.cache.clone().run_shared_tasks();
        tokio::select! {
            () = async { tokio::join!(callers, admin, readiness, signal); } => {}
            () = async { upkeep.await; std::future::pending::<()>().await } => {}
            () = reload => {}
            () = shared => {}
        }
    }
}

/// The caller-facing stack. Order, outside in: credentials are marked sensitive before
/// anything can log them; a request id is set (or the caller's kept) and copied to the
/// response; a panic becomes a JSON 500 instead of a dropped connection.
pub fn caller_service(
    state: Arc<AppState>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<
        impl hyper::body::Body<
                Data = Bytes,
                Error = impl Into<Box<dyn std::error::Error + Send + Sync>>,
            > + Send
            + 'static,
    >,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]))
        // A caller's id is kept only when short and plain (it is echoed and logged);
        // otherwise it is dropped here and the next layer sets a fresh one.
        .map_request(|mut req: Request<Incoming>| {
            drop_unusable_request_id(req.headers_mut());
            req
        })
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(CatchPanicLayer::custom(
            |_panic: Box<dyn std::any::Any + Send>| {
                tracing::error!("request handler panicked");
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internalError",
                    "internal error",
                    "",
                )
            },
        ))
        .service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, req).await) }
        })
}

/// Removes `x-request-id` unless there is exactly one and [`request_id::is_usable`] keeps it.
fn drop_unusable_request_id(headers: &mut http::HeaderMap) {
    let mut ids = headers.get_all(X_REQUEST_ID).iter();
    let keep = matches!((ids.next(), ids.next()), (Some(id), None) if request_id::is_usable(id.as_bytes()));
    if !keep {
        headers.remove(X_REQUEST_ID);
    }
}

/// What the access log line reports about one request.
#[derive(Default)]
struct AccessLog {
    caller: Option<Arc<str>>,
    kind: Option<&'static str>,
    /// The request named an event's session list.
    list: bool,
    cache: Option<HeaderValue>,
    graph_request_id: Option<HeaderValue>,
    /// Close the connection after answering (a body we did not read).
    close: bool,
    /// How the cache answered, for metrics.
    outcome: Option<Outcome>,
    /// The error code, when the answer is an error.
    code: Option<&'static str>,
    /// Which contract the request came in by (decides the error shape).
    style: Style,
}

impl AccessLog {
    fn cache_label(&self) -> &'static str {
        match (self.outcome, &self.cache) {
            (Some(Outcome::Hit), _) => "hit",
            (Some(Outcome::Miss), _) => "miss",
            (Some(Outcome::Collapsed), _) => "collapsed",
            (Some(Outcome::Revalidated), _) => "revalidated",
            (Some(Outcome::StaleWhileRevalidate), _) => "stale_while_revalidate",
            (Some(Outcome::StaleIfError), _) => "stale_if_error",
            (Some(Outcome::MaxStale), _) => "max_stale",
            (Some(Outcome::Tier2), _) => "tier2_hit",
            (None, Some(_)) => "miss",
            (None, None) => "none",
        }
    }
}

/// One request, start to finish: never fails, every refusal is docs/DESIGN.md's JSON error.
pub async fn handle<B: hyper::body::Body>(
    state: &AppState,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let mut log = AccessLog {
        style: Style::of(req.uri().path()),
        ..AccessLog::default()
    };
    // Graph echoes the client's `client-request-id`; so do the Graph-compatible routes.
    let client_request_id = match req.headers().get(CLIENT_REQUEST_ID) {
        Some(id) if request_id::is_usable(id.as_bytes()) => id.to_str().unwrap_or("-").to_string(),
        _ => request_id.clone(),
    };
    let mut response = match answer(state, &req, &mut log, &client_request_id).await {
        Ok(response) => response,
        Err(error) => {
            let status = error.status();
            log.code = Some(error.code());
            if status.is_server_error() {
                tracing::warn!(request_id, error = %error, cause = %Causes(&*error), "request failed");
            } else {
                tracing::debug!(request_id, error = %error, "request refused");
            }
            let mut response = error.to_response_in(log.style, &request_id, &client_request_id);
            if log.close {
                // The unread body would otherwise be taken for the next request.
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            if let Some(cache) = &log.cache {
                response.headers_mut().insert(CACHE_STATUS, cache.clone());
            }
            response
        }
    };
    if log.style == Style::Graph {
        for (name, value) in [
            (REQUEST_ID, &request_id),
            (CLIENT_REQUEST_ID, &client_request_id),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    tracing::info!(
        target: "graph_session_proxy::access",
        request_id,
        method = %req.method(),
        caller = log.caller.as_deref().unwrap_or("-"),
        kind = log.kind.unwrap_or("-"),
        status = response.status().as_u16(),
        cache = log.cache.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
        latency_ms = format_args!("{:.3}", started.elapsed().as_secs_f64() * 1000.0),
        graph_request_id = log.graph_request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
        "request"
    );
    let class = match response.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let cache = log.cache_label();
    let caller = log.caller.clone().unwrap_or_else(|| ANONYMOUS.clone());
    state.metrics.record_request(
        [
            (
                "route",
                match (log.kind, log.list) {
                    (Some(_), false) => "session",
                    (Some(_), true) => "list",
                    (None, _) => "other",
                },
            ),
            ("status", class),
            ("code", log.code.unwrap_or("none")),
            ("cache", cache),
        ],
        &caller,
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn answer<B: hyper::body::Body>(
    state: &AppState,
    req: &Request<B>,
    log: &mut AccessLog,
    client_request_id: &str,
) -> Result<Response<Full<Bytes>>, Arc<ProxyError>> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ProxyError::Draining.into());
    }
    let _permit = state
        .limit
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let headers = req.headers();
    // Whatever the answer, a body we do not read means the connection cannot be reused.
    // (HTTP/2 may send DATA without announcing a length: the stream is not at its end.)
    log.close = has_body(headers) || !req.body().is_end_stream();
    if let Some(why) = bad_framing(req) {
        return Err(ProxyError::InvalidRequest(why).into());
    }
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > state.max_headers || header_bytes > state.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge.into());
    }
    if req.uri().path().len() > MAX_PATH_BYTES {
        return Err(ProxyError::UriTooLong.into());
    }
    let mut key = routes::route(req.method(), req.uri().path(), req.uri().query())?;
    if log.style == Style::Proxy {
        key = key.with_version(state.api_version);
    }
    log.kind = Some(key.kind.as_str());
    log.list = key.is_list();
    if log.close {
        return Err(
            ProxyError::InvalidRequest("GET and HEAD requests must not have a body").into(),
        );
    }
    let caller = state.callers.authenticate(headers).await?;
    log.caller = Some(caller.name.clone());
    caller.authorize(&key)?;
    let directives = directives(headers);
    let lookup = match tokio::time::timeout(
        state.request_timeout,
        state.cache.get(&key, directives),
    )
    .await
    {
        Ok(Ok(lookup)) => lookup,
        Ok(Err(error)) => {
            if !matches!(*error, ProxyError::NotCached) {
                log.cache = Some(HeaderValue::from_static("graph-session-proxy; fwd=miss"));
            }
            return Err(error);
        }
        Err(_elapsed) => match state.cache.stale_if_error(&key) {
            // Graph hangs: a stale copy still beats a timeout.
            Some(lookup) => lookup,
            None => {
                log.cache = Some(HeaderValue::from_static("graph-session-proxy; fwd=miss"));
                return Err(ProxyError::UpstreamTimeout.into());
            }
        },
    };
    let now = state.cache.now();
    let cache_status = cache_status(&lookup, now);
    log.cache = Some(cache_status.clone());
    log.outcome = Some(lookup.outcome);
    log.graph_request_id = lookup.entry.graph_request_id.clone();
    let entry = &lookup.entry;

    let request_id = headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    // Graph-style callers get Graph's bytes exactly as sent (envelope and all).
    let (body, etag) = match log.style {
        Style::Proxy => (entry.body.clone(), &entry.etag),
        Style::Graph => (
            entry.body.as_ref().map(|_| entry.raw.clone()),
            &entry.raw_etag,
        ),
    };
    let mut response = match body {
        None if key.is_list() => {
            ProxyError::EventNotFound.to_response_in(log.style, request_id, client_request_id)
        }
        None => {
            ProxyError::SessionNotFound.to_response_in(log.style, request_id, client_request_id)
        }
        Some(body) if !if_none_match(headers, etag) => {
            let mut response = Response::new(Full::new(body));
            response.headers_mut().insert(CONTENT_TYPE, JSON);
            response
        }
        Some(_) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        }
    };
    let out = response.headers_mut();
    out.insert(CACHE_STATUS, cache_status);
    out.insert(AGE, HeaderValue::from(entry.age(now)));
    if entry.body.is_some() {
        out.insert(ETAG, etag.clone());
    }
    if let Some(id) = &entry.graph_request_id {
        out.insert(X_GRAPH_REQUEST_ID, id.clone());
    }
    Ok(response)
}

/// RFC 9211 `Cache-Status` for a served lookup.
fn cache_status(lookup: &Lookup, now: tokio::time::Instant) -> HeaderValue {
    let entry = &lookup.entry;
    let fwd_status = if entry.body.is_some() { 200 } else { 404 };
    let text = match lookup.outcome {
        Outcome::Hit => format!("graph-session-proxy; hit; ttl={}", entry.ttl(now)),
        Outcome::StaleWhileRevalidate => format!(
            "graph-session-proxy; fwd=stale; ttl={}; detail=stale-while-revalidate",
            entry.ttl(now)
        ),
        Outcome::MaxStale => format!(
            "graph-session-proxy; hit; ttl={}; detail=max-stale",
            entry.ttl(now)
        ),
        Outcome::Miss => format!("graph-session-proxy; fwd=miss; fwd-status={fwd_status}; stored"),
        Outcome::Collapsed => {
            format!("graph-session-proxy; fwd=miss; fwd-status={fwd_status}; stored; collapsed")
        }
        Outcome::Revalidated => {
            format!("graph-session-proxy; fwd=request; fwd-status={fwd_status}; stored")
        }
        Outcome::StaleIfError => format!(
            "graph-session-proxy; fwd=stale; ttl={}; detail=stale-if-error",
            entry.ttl(now)
        ),
        Outcome::Tier2 => format!(
            "graph-session-proxy; hit; ttl={}; detail=tier2",
            entry.ttl(now)
        ),
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("graph-session-proxy"))
}

/// Request-target and `Host` forms this origin server refuses: an absolute-form target
/// with another scheme than http(s) or with userinfo, repeated `Host` headers, and an
/// HTTP/1.1 request without one (RFC 9112 3.2; HTTP/1.0 may omit it, and HTTP/2 carries
/// `:authority` instead).
fn bad_framing<B>(req: &Request<B>) -> Option<&'static str> {
    let uri = req.uri();
    if uri
        .scheme_str()
        .is_some_and(|s| !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https"))
    {
        return Some("only http and https request targets are accepted");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some("request targets must not carry userinfo");
    }
    if req
        .headers()
        .get_all(http::header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return Some("more than one Host header");
    }
    if req.version() == http::Version::HTTP_11 && !req.headers().contains_key(http::header::HOST) {
        return Some("HTTP/1.1 requests must carry a Host header");
    }
    None
}

/// A GET or HEAD that announces a body is refused rather than half-read.
fn has_body(headers: &http::HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().map(|s| s.trim() != "0").unwrap_or(true))
}

/// `Cache-Control` request directives (and the old `Pragma: no-cache`).
fn directives(headers: &http::HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim().to_ascii_lowercase();
            match directive.as_str() {
                "no-cache" | "max-age=0" => d.no_cache = true,
                "only-if-cached" => d.only_if_cached = true,
                "max-stale" => d.max_stale = Some(Duration::MAX),
                other => {
                    if let Some(secs) = other.strip_prefix("max-stale=") {
                        if let Ok(secs) = secs.trim_matches('"').parse::<u64>() {
                            d.max_stale = Some(Duration::from_secs(secs));
                        }
                    }
                }
            }
        }
    }
    if headers
        .get(PRAGMA)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("no-cache"))
        && !headers.contains_key(CACHE_CONTROL)
    {
        d.no_cache = true;
    }
    d
}

/// `If-None-Match` with weak comparison (RFC 9110 13.1.2): `*` or any listed tag.
fn if_none_match(headers: &http::HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers.get_all(IF_NONE_MATCH).iter().any(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',').any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours
            })
        })
    })
}

/// How connections on one listener are served.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Pass HTTP/1 request targets through [`GuardedIo`] (the caller listener).
    pub guard: bool,
    /// Serve HTTPS with this configuration (the caller listener, when configured). The
    /// handshake runs in the connection's own task, bounded by `header_read_timeout`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Close a connection whose request headers have not all arrived in this time, and
    /// one that has not sent its first byte this long after it was accepted.
    pub header_read_timeout: Duration,
    /// Close (HTTP/2: GOAWAY) a connection with no request in flight for this long.
    pub idle_timeout: Duration,
    /// Hyper's hard limits, above the handler's own JSON-answered ones: beyond them hyper
    /// itself refuses (431/414 without a body) before any handler runs.
    pub hard_max_headers: usize,
    pub hard_max_buf: usize,
    /// HTTP/2: streams per connection and header list size.
    pub h2_max_streams: u32,
    pub h2_max_header_list: u32,
    /// Open connections at most; a newcomer beyond takes the place of the longest-idle
    /// one, or (all busy) gets a 503 `overloaded`.
    pub max_connections: usize,
    /// For in-flight connections after shutdown.
    pub grace: Duration,
}

impl ConnectionOptions {
    /// Internal listeners (admin, simulator): no guard, generous limits.
    pub fn internal(grace: Duration) -> ConnectionOptions {
        ConnectionOptions {
            guard: false,
            tls: None,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            hard_max_headers: 100,
            hard_max_buf: 400 * 1024,
            h2_max_streams: 200,
            h2_max_header_list: 64 * 1024,
            max_connections: 1024,
            grace,
        }
    }
}

/// Binds a listener on `addr` with room for `backlog` connections not yet accepted
/// (tokio's `TcpListener::bind` leaves the standard library's 128: a burst of connects
/// overflows it and costs callers one-second SYN retransmits; the kernel caps `backlog`
/// at `net.core.somaxconn`). `SO_REUSEADDR` as tokio sets it (not on Windows, where it
/// would allow taking over a port in use), so a restart can bind while old connections
/// sit in TIME_WAIT. Needs a tokio runtime.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Once a connection is to close for being idle or to make room: how long it gets to
/// finish (an HTTP/2 GOAWAY exchange, an answer being written) before it is dropped.
const CLOSE_BOUND: Duration = Duration::from_millis(500);
/// A newcomer beyond `max_connections` for whom an idle connection was closed waits this
/// long for the freed place; then it is refused like one that found no idle connection.
const ROOM_WAIT: Duration = Duration::from_millis(800);
/// The whole life of a refused newcomer: its handshake, its request, the 503.
const REFUSAL_BOUND: Duration = Duration::from_secs(1);
/// Newcomers beyond `max_connections` waiting for a place or being refused at once;
/// beyond these, a new connection is closed as soon as it is accepted.
const MAX_OVER_CAP: usize = 64;

/// Accepts connections on `listener`, serving each with a clone of `service` (HTTP/1.1 or
/// HTTP/2) under `options`, until `shutdown` completes; then stops accepting and gives
/// connections in flight up to `options.grace` to finish.
///
/// Accepting never waits for a free place: at `max_connections`, the connection idle the
/// longest is closed to make room for the newcomer, or when every connection has a
/// request in flight, the newcomer is answered a 503 `overloaded` and closed. Either way
/// a caller is never left hanging in the backlog behind connections that do nothing.
pub async fn accept_loop<S, B>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    options: ConnectionOptions,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_headers(options.hard_max_headers)
        .max_buf_size(options.hard_max_buf);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.h2_max_streams)
        .max_header_list_size(options.h2_max_header_list);
    let grace = options.grace;
    // Shutdown is `true` sent on this channel; once every connection has dropped its
    // receiver, all have ended.
    let (stop, stopping) = watch::channel(false);
    let connection = Arc::new(Connection {
        builder,
        guard: options.guard,
        tls: options.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        // A client gets as long for its TLS handshake as for its request headers.
        handshake_timeout: options.header_read_timeout,
        limits: Limits {
            first_byte: options.header_read_timeout,
            idle: options.idle_timeout,
        },
        grace,
    });
    let registry = Arc::new(Registry::default());
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let over_cap = Arc::new(Semaphore::new(MAX_OVER_CAP));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let connection = connection.clone();
        // Taken before the handshake, so that shutdown also waits (within the grace) for
        // connections still shaking hands.
        let stopping = stopping.clone();
        // Everything slow happens in the connection's task: one client that never
        // finishes its handshake must not hold up accepting the next.
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            let registered = registry.register();
            tokio::spawn(async move {
                let _slot = slot; // released when the connection ends
                connection
                    .serve(stream, service, &registered.activity, stopping)
                    .await;
            });
            continue;
        }
        let Ok(over) = over_cap.clone().try_acquire_owned() else {
            tracing::debug!("connection limit reached, too many newcomers refused already: closed");
            continue;
        };
        let made_room = registry.evict_longest_idle();
        let slots = slots.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let slot = match made_room {
                true => tokio::time::timeout(ROOM_WAIT, slots.acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok),
                false => None,
            };
            match slot {
                Some(slot) => {
                    drop(over);
                    let registered = registry.register();
                    connection
                        .serve(stream, service, &registered.activity, stopping)
                        .await;
                    drop(slot);
                }
                None => {
                    tracing::debug!("connection limit reached, every connection busy: 503");
                    let activity = Arc::new(Activity::new());
                    let refusal = connection.serve(
                        stream,
                        overloaded_service(activity.clone()),
                        &activity,
                        stopping,
                    );
                    let _ = tokio::time::timeout(REFUSAL_BOUND, refusal).await;
                    drop(over);
                }
            }
        });
    }
    drop(listener);
    drop(stopping);
    let _ = stop.send(true);
    tokio::select! {
        () = stop.closed() => {}
        () = tokio::time::sleep(grace) => tracing::warn!("shutdown grace elapsed with connections still open"),
    }
}

/// What a newcomer beyond `max_connections` is answered when no connection is idle: a
/// JSON 503 `overloaded` with `Connection: close`, then the connection closes.
fn overloaded_service(
    activity: Arc<Activity>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .map_request(|mut req: Request<Incoming>| {
            drop_unusable_request_id(req.headers_mut());
            req
        })
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .service_fn(move |req: Request<Incoming>| {
            // One answer, then close (HTTP/2 has no `Connection: close`: GOAWAY instead).
            activity.evict();
            let request_id = req
                .headers()
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let mut response = ProxyError::Overloaded.to_response_in(
                Style::of(req.uri().path()),
                request_id,
                request_id,
            );
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            std::future::ready(Ok::<_, Infallible>(response))
        })
}

/// How every connection of one listener is served.
struct Connection {
    builder: Builder<TokioExecutor>,
    /// Pass HTTP/1 request targets through [`GuardedIo`].
    guard: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
    limits: Limits,
    grace: Duration,
}

impl Connection {
    /// Serves one accepted connection (after its TLS handshake, when configured) to its
    /// end: until the client closes it, its watchdog closes it (silent, idle, evicted) or
    /// the listener shuts down.
    async fn serve<S, B>(
        &self,
        stream: TcpStream,
        service: S,
        activity: &Arc<Activity>,
        stopping: watch::Receiver<bool>,
    ) where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::Future: Send + 'static,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(acceptor) = &self.tls else {
            return self.serve_http(stream, service, activity, stopping).await;
        };
        let handshake = tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream));
        tokio::select! {
            handshake = handshake => match handshake {
                Ok(Ok(stream)) => self.serve_http(stream, service, activity, stopping).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_elapsed) => tracing::debug!("TLS handshake timed out"),
            },
            // Evicted, or not one byte before the deadline.
            reason = activity.closing(self.limits) => {
                tracing::debug!(?reason, "connection closed during its TLS handshake");
            }
        }
    }

    /// Serves HTTP on a plain or decrypted TLS stream; with `guard`, HTTP/1 request
    /// targets pass through [`GuardedIo`] first.
    async fn serve_http<I, S, B>(
        &self,
        io: I,
        service: S,
        activity: &Arc<Activity>,
        stopping: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::Future: Send + 'static,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let service = Tracked::new(TowerToHyperService::new(service), activity.clone());
        let io = Heard::new(io, activity.clone());
        let result = if self.guard {
            let io = TokioIo::new(GuardedIo::new(io));
            let conn = self.builder.serve_connection(io, service);
            self.drive(conn, |conn| conn.graceful_shutdown(), activity, stopping)
                .await
        } else {
            let io = TokioIo::new(io);
            let conn = self.builder.serve_connection(io, service);
            self.drive(conn, |conn| conn.graceful_shutdown(), activity, stopping)
                .await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    /// Polls `conn` to its end. When the watchdog or shutdown asks, starts its graceful
    /// shutdown (`shut`: HTTP/1 closes once no answer is being written, HTTP/2 sends
    /// GOAWAY and finishes its streams) and drops it if that takes longer than
    /// [`CLOSE_BOUND`] (shutdown: the grace). A silent connection is simply dropped.
    async fn drive<C, E>(
        &self,
        conn: C,
        shut: impl FnOnce(Pin<&mut C>),
        activity: &Activity,
        mut stopping: watch::Receiver<bool>,
    ) -> Result<(), E>
    where
        C: Future<Output = Result<(), E>>,
    {
        tokio::pin!(conn);
        let bound = tokio::select! {
            result = conn.as_mut() => return result,
            reason = activity.closing(self.limits) => {
                tracing::debug!(?reason, "closing a connection");
                if reason == Close::Silent {
                    return Ok(());
                }
                CLOSE_BOUND
            }
            // An error means the accept loop is gone: stop as well.
            () = async { let _ = stopping.wait_for(|stop| *stop).await; } => self.grace,
        };
        shut(conn.as_mut());
        match tokio::time::timeout(bound, conn).await {
            Ok(result) => result,
            Err(_elapsed) => {
                tracing::debug!("connection did not close in time: dropped");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cache_control_directives() {
        assert!(directives(&headers(&[("cache-control", "No-Cache")])).no_cache);
        assert!(directives(&headers(&[("cache-control", "max-age=0")])).no_cache);
        assert!(
            directives(&headers(&[("cache-control", "public, only-if-cached")])).only_if_cached
        );
        assert!(directives(&headers(&[("pragma", "no-cache")])).no_cache);
        assert!(!directives(&headers(&[("cache-control", "max-age=60")])).no_cache);
        assert_eq!(
            directives(&headers(&[("cache-control", "max-stale=120")])).max_stale,
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            directives(&headers(&[("cache-control", "max-stale")])).max_stale,
            Some(Duration::MAX)
        );
        assert_eq!(
            directives(&headers(&[("cache-control", "max-stale=soon")])).max_stale,
            None
        );
    }

    #[test]
    fn if_none_match_lists() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(if_none_match(
            &headers(&[("if-none-match", "\"x\", \"abc\"")]),
            &etag
        ));
        assert!(if_none_match(
            &headers(&[("if-none-match", "W/\"abc\"")]),
            &etag
        ));
        assert!(if_none_match(&headers(&[("if-none-match", "*")]), &etag));
        assert!(!if_none_match(
            &headers(&[("if-none-match", "\"abcd\"")]),
            &etag
        ));
        assert!(!if_none_match(&headers(&[]), &etag));
    }

    #[test]
    fn bodies_on_get_are_detected() {
        assert!(has_body(&headers(&[("content-length", "5")])));
        assert!(has_body(&headers(&[("transfer-encoding", "chunked")])));
        assert!(!has_body(&headers(&[("content-length", "0")])));
        assert!(!has_body(&headers(&[])));
    }
}
