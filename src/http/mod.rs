//! The caller- and operator-facing HTTP layer: the request handler, routing, the one
//! mapping of errors to answers, and the admin listener's routes.

mod access_log;
pub mod admin;
pub mod error;
pub mod handler;
pub mod limits;
mod notifications;
pub mod openapi;
pub mod routes;
pub mod status;
#[cfg(test)]
mod tests;

use crate::auth::callers::Callers;
use crate::cache::SessionCache;
use crate::config::{ApiVersion, Settings};
use crate::core::http::sha256_from_hex;
use crate::http::limits::Limits;
use crate::notify::Notifications;
use crate::telemetry::Metrics;
use crate::upstream::token::TokenProvider;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// Shared by every request.
pub struct AppState {
    pub callers: Callers,
    pub cache: Arc<SessionCache>,
    pub metrics: Arc<Metrics>,
    pub tokens: Arc<TokenProvider>,
    /// Each caller's request rate and Graph budget (`[limits]`).
    pub limits: Limits,
    /// Permits for requests in progress; none left -> 503 overloaded at once.
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) request_timeout: Duration,
    /// More request headers than this, or more bytes of them, is a JSON 431.
    pub(crate) max_headers: usize,
    pub(crate) max_header_bytes: usize,
    /// The Graph API version of `/sessions/...` requests.
    pub(crate) api_version: ApiVersion,
    /// False until the listener is up; false again once shutdown begins.
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// Why the last token attempt of the readiness loop failed (the caller-safe text,
    /// never the secret), for `/readyz` to say; a plain mutex because it is written every
    /// few seconds at most and read by probes only.
    pub token_problem: std::sync::Mutex<Option<String>>,
    /// `server.ready_requires_token`: readiness waits for a first Graph token.
    pub(crate) ready_requires_token: bool,
    /// SHA-256 of the admin token purges need, when configured.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Graph change notifications (`[notifications]`), received on their path.
    pub notifications: Option<Arc<Notifications>>,
    /// `cache.max_bytes`, for the status page.
    pub(crate) max_bytes: u64,
}

impl AppState {
    /// The handler's state from the configuration and the parts built for it (by
    /// `app`, or by the service tests with a fake origin): not ready, not draining.
    pub fn new(
        settings: &Settings,
        callers: Callers,
        cache: Arc<SessionCache>,
        metrics: Arc<Metrics>,
        tokens: Arc<TokenProvider>,
    ) -> AppState {
        let limits = Limits::new(
            settings.limits,
            callers.slots(),
            cache.clock().clone(),
            metrics.clone(),
            cache.shared().cloned(),
        );
        AppState {
            callers,
            cache,
            metrics,
            tokens,
            limits,
            limit: Arc::new(Semaphore::new(settings.server.max_concurrent_requests)),
            request_timeout: settings.server.request_timeout,
            max_headers: settings.server.max_headers,
            api_version: settings.graph.api_version,
            max_header_bytes: settings.server.max_header_bytes.as_u64() as usize,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            token_problem: std::sync::Mutex::new(None),
            ready_requires_token: settings.server.ready_requires_token,
            admin_token_sha256: settings
                .server
                .admin_token_sha256
                .as_deref()
                .and_then(sha256_from_hex),
            notifications: None,
            max_bytes: settings.cache.max_bytes.as_u64(),
        }
    }

    pub(crate) fn set_token_problem(&self, problem: Option<String>) {
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
