//! graph-session-proxy: a caching, authenticating reverse proxy for Microsoft Graph
//! `virtualEventSession` objects. ARCHITECTURE.md is the map; in short, the layers
//! (each imports only those above it in this list; `tests/tidy.rs` checks it):
//!
//! ```text
//! core        model (Kind, ApiVersion, SessionKey, Style), clock, request ids, http helpers
//! config      the TOML file and GSP__* overrides, one file per section
//! telemetry   logging set-up, metrics, readable log fields
//! upstream    token provider, Graph client, list paging, gate, bounded reads, UpstreamError
//! auth        callers (API keys, JWT), AuthError
//! cache       SessionCache, the Origin trait it fetches through, the Redis tier (tier2)
//! http        handler (named phases), routes, ProxyError -> the one JSON answer, admin
//! server      bind, accept loop, connection deadlines, GuardedIo, TLS
//! app         Proxy::build / serve: the one place that knows every layer
//! sim         the simulated identity platform and Graph (feature "sim")
//! ```
//!
//! The path of one request:
//!
//! ```text
//! server::accept_loop               accept (room at the cap), HTTP/1.1 or HTTP/2, graceful shutdown
//!   -> server::connections          per connection: first-byte and idle deadlines
//!   -> server::tls (when configured) rustls handshake in the connection's task, ALPN h2/http1.1
//!   -> server::wire::GuardedIo      raw '#', control and non-UTF-8 target bytes -> '%'
//!   -> http::handler (tower stack)  sensitive headers, request ids, panic -> JSON 500
//!   -> http::handler phases         admit -> route -> authenticate -> authorize -> lookup -> respond -> log
//!   -> cache::SessionCache          fresh entry? -> answer (Graph untouched)
//!        miss: one shared task per key
//!   -> cache::tier2                 (optional) Redis tier 2: entry? else one replica's lock
//!   -> cache::Origin = upstream::graph::GraphClient   {root}/{version}/solutions/virtualEvents/...
//!        upstream::gate::Gate       no Graph calls while throttled (429) or failing (circuit)
//!   -> upstream::token::TokenProvider   client-credentials token, cached, one refresh at a time
//! ```
//!
//! Each layer has its own error type; [`http::error::ProxyError`] wraps them and turns any
//! of them into the JSON error body in exactly one place.

#![forbid(unsafe_code)]

mod app;
mod auth;
mod cache;
pub mod config;
mod core;
mod http;
mod notify;
mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod telemetry;
mod upstream;

// The deliberate API: what the binary, the tests, the benchmarks and the fuzz targets use.
// Everything else is the crate's own.
pub use crate::app::{BuildError, Proxy};
pub use crate::auth::jwt::{JwtOptions, JwtVerifier};
pub use crate::core::clock::Clock;
pub use crate::core::model::{Kind, SessionKey, MAX_ID_LEN};
pub use crate::http::handler::handle;
pub use crate::http::routes::route;
pub use crate::server::bind;
