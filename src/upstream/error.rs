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
    #[error("Graph could not be reached{}", tls_hint(.0))]
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

/// For a connection that failed in the TLS handshake: which host, and what to check
/// (a TLS-inspecting egress proxy re-signs with a private root the bundle lacks).
/// Empty for any other failure.
pub fn tls_hint(e: &reqwest::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = cause {
        // io::Error's `source` skips the error it wraps: look inside it too.
        let inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(error), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                let host = e.url().and_then(|u| u.host_str()).unwrap_or("the upstream");
                let what = match tls {
                    rustls::Error::InvalidCertificate(why) => {
                        format!("its certificate is not trusted ({why:?})")
                    }
                    other => format!("{other}"),
                };
                return format!(
                    ": TLS to {host} failed: {what}; if an egress proxy inspects TLS, add its root CA with graph.ca_file"
                );
            }
        }
        cause = error.source();
    }
    String::new()
}
