//! [`UpstreamError`]: why Graph or the identity platform could not give us a session.
//! Kept as it is in the cache's failure memory; turned into an HTTP answer only at the
//! edge (`http::error`).

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::Wait;
use crate::upstream::token::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("Graph answered {status} {code}")]
    Status { status: u16, code: String },
    #[error("Graph refused the application (403 {code})")]
    Forbidden { code: String },
    #[error("Graph could not be reached")]
    Unreachable(#[source] reqwest::Error),
    #[error("Graph's answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("Graph sent a session list page that cannot be followed: {0}")]
    BadListPage(&'static str),
    #[error("Graph is throttling (retry in {})", Wait(*retry_after))]
    Throttled { retry_after: Duration },
    #[error("Graph keeps failing: circuit open (retry in {})", Wait(*retry_after))]
    CircuitOpen { retry_after: Duration },
    #[error("Graph did not answer in time")]
    Timeout,
    #[error("no access token")]
    Token(#[source] Arc<TokenError>),
    #[error("internal error: {0}")]
    Internal(&'static str),
}
