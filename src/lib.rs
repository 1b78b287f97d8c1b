//! graph-session-proxy: a caching, authenticating reverse proxy for Microsoft Graph
//! `virtualEventSession` objects.
//!
//! The path of one request:
//!
//! ```text
//! listener (server)                 accept, HTTP/1.1 or HTTP/2, graceful shutdown
//!   -> connections                  per connection: first-byte and idle deadlines, room at the cap
//!   -> tls (when configured)        rustls handshake in the connection's task, ALPN h2/http1.1
//!   -> wire::GuardedIo              raw '#', control and non-UTF-8 target bytes -> '%'
//!   -> tower-http layers (server)   sensitive headers, request id, panic -> JSON 500
//!   -> handler (server)             draining? concurrency permit, request timeout
//!   -> routes::route                /sessions/{kind}/{event}[/{session}] -> SessionKey, or 4xx
//!   -> callers (+ jwt)              API key or Entra ID token -> Caller, then its kind/event limits
//!   -> cache::SessionCache          fresh entry? -> answer (Graph untouched)
//!        miss: one shared task per key
//!   -> shared::SharedTier           (optional) Redis tier 2: entry? else one replica's lock
//!   -> graph::GraphClient           {root}/{version}/solutions/virtualEvents/..., retries
//!        gate::Gate                 no Graph calls while throttled (429) or failing (circuit)
//!   -> token::TokenProvider         client-credentials token, cached, one refresh at a time
//! ```
//!
//! Every refusal or failure is an [`error::ProxyError`], turned into the JSON error body in
//! exactly one place. `sim` is an independent stand-in for the identity platform and
//! Graph, used by the demo, the tests and the benchmarks.

#![forbid(unsafe_code)]

mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod core;
pub mod http;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod telemetry;
pub mod upstream;

pub use app::{BuildError, Proxy};
