//! The access log: what one request's line and metrics report, gathered by the handler's
//! phases as they run and written once at the end.

use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;
use http::StatusCode;

use crate::cache::{metric_label, Outcome};
use crate::core::model::Style;
use crate::telemetry::Metrics;

/// The `caller` label of requests refused before authentication.
static ANONYMOUS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));

/// What the access log line reports about one request.
#[derive(Default)]
pub(super) struct AccessLog {
    pub(super) caller: Option<Arc<str>>,
    /// The caller's metric label ([`crate::auth::Caller::metric_label`]).
    pub(super) metric_caller: Option<Arc<str>>,
    pub(super) kind: Option<&'static str>,
    /// The request named an event's session list.
    pub(super) list: bool,
    pub(super) cache: Option<HeaderValue>,
    pub(super) graph_request_id: Option<HeaderValue>,
    /// Close the connection after answering (a body we did not read).
    pub(super) close: bool,
    /// How the cache answered, for metrics.
    pub(super) outcome: Option<Outcome>,
    /// The error code, when the answer is an error.
    pub(super) code: Option<&'static str>,
    /// Which contract the request came in by (decides the error shape).
    pub(super) style: Style,
}

impl AccessLog {
    /// The access log line and the request metrics, once the answer is known.
    pub(super) fn write(
        &self,
        metrics: &Metrics,
        request_id: &str,
        method: &http::Method,
        status: StatusCode,
        started: Instant,
    ) {
        // One clock read for the line and the metrics.
        let elapsed = started.elapsed();
        tracing::info!(
            target: "graph_session_proxy::access",
            request_id,
            method = %method,
            caller = self.caller.as_deref().unwrap_or("-"),
            kind = self.kind.unwrap_or("-"),
            status = status.as_u16(),
            cache = self.cache.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
            latency_ms = %Millis(elapsed),
            graph_request_id = self.graph_request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
            "request"
        );
        let class = match status.as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let cache = metric_label(self.outcome, self.cache.is_some());
        let caller = self
            .metric_caller
            .clone()
            .unwrap_or_else(|| ANONYMOUS.clone());
        metrics.record_request(
            [
                (
                    "route",
                    match (self.kind, self.list) {
                        (Some(_), false) => "session",
                        (Some(_), true) => "list",
                        (None, _) => "other",
                    },
                ),
                ("status", class),
                ("code", self.code.unwrap_or("none")),
                ("cache", cache),
            ],
            &caller,
            elapsed.as_secs_f64(),
        );
    }
}

/// A duration as milliseconds with three decimals (`1.235`), rounded to the microsecond:
/// integer arithmetic, not float formatting, on every access line.
struct Millis(std::time::Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let micros = (self.0.as_nanos() + 500) / 1000;
        write!(f, "{}.{:03}", micros / 1000, micros % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_reads_as_milliseconds_with_three_decimals() {
        for (nanos, text) in [
            (0, "0.000"),
            (499, "0.000"),
            (500, "0.001"),
            (1_234_567, "1.235"),
            (12_000_000, "12.000"),
            (3_600_000_000_000, "3600000.000"),
        ] {
            assert_eq!(Millis(Duration::from_nanos(nanos)).to_string(), text);
            let float = format!("{:.3}", Duration::from_nanos(nanos).as_secs_f64() * 1000.0);
            assert_eq!(float, text, "as the float formatting read");
        }
    }
}
