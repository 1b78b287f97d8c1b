//! Logging set-up (text or JSON lines, filtered by `log.level` unless `RUST_LOG` is set)
//! and the metrics recorder.

use std::sync::Arc;

use metrics::{Key, Label, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

mod batch;
mod pulse;

pub use batch::{BatchGuard, BatchWriter};
pub use pulse::{Pulse, Recent, GRAPH_OUTCOMES, WINDOW as PULSE_WINDOW};

/// A log field for an error's `#[source]` chain, read by people: the causes' own texts
/// joined by `: ` (`invalid_client (AADSTS7000215)`), `-` when there is none. Never Rust's
/// `Debug` form, which spells out structs and `Some(..)`.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut next = self.0.source();
        if next.is_none() {
            return f.write_str("-");
        }
        let mut first = true;
        while let Some(cause) = next {
            if !first {
                f.write_str(": ")?;
            }
            write!(f, "{cause}")?;
            first = false;
            next = cause.source();
        }
        Ok(())
    }
}

/// A duration as people write it in a log line or message: whole seconds, rounded up
/// (`30s`), or milliseconds below one second (`250ms`).
pub struct Wait(pub std::time::Duration);

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        if d < std::time::Duration::from_secs(1) {
            let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 > 0);
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", d.as_secs() + u64::from(d.subsec_nanos() > 0))
        }
    }
}

/// Installs the global subscriber. Lines are written in batches by a background thread
/// ([`BatchWriter`]), so a request never waits on stdout nor wakes a thread per line. Keep
/// the guard until exit: dropping it writes what is pending. A
/// second call (tests) leaves the first subscriber in place.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(settings: &LogSettings) -> BatchGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = BatchWriter::new(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

/// The proxy's metrics, rendered in Prometheus text format on the admin listener.
///
/// One recorder per proxy (`Proxy` in `app`) (not the process-global `metrics` recorder),
/// so that several proxies in one process — the tests — keep separate counts. Handles are
/// looked up by name and labels when used; the recorder's registry makes that a hash
/// lookup, the same work the `metrics` macros do.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Tells this instance's handles apart in [`REQUEST_HANDLES`].
    id: u64,
    /// The last 15 minutes, for the status page.
    pulse: Pulse,
}

/// One series of the per-request metrics: the label values (static strings, told apart by
/// address: two copies of one text are two slots for the same handles) and the caller's
/// name (held, so that its address cannot be reused by another name while cached).
struct RequestSeries {
    metrics: u64,
    /// Address and length of each value.
    labels: [*const str; 4],
    caller: Arc<str>,
}

impl PartialEq for RequestSeries {
    fn eq(&self, other: &Self) -> bool {
        self.metrics == other.metrics
            && self.labels == other.labels
            && Arc::ptr_eq(&self.caller, &other.caller)
    }
}

impl Eq for RequestSeries {}

impl std::hash::Hash for RequestSeries {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.metrics.hash(state);
        self.labels.hash(state);
        (Arc::as_ptr(&self.caller) as *const u8 as usize).hash(state);
    }
}

/// Most handles one thread keeps before it starts over (the series are bounded by the
/// configured callers already; this bounds what dropped instances leave behind).
const MAX_CACHED_SERIES: usize = 4096;

thread_local! {
    /// The request counter and latency histogram of each series this thread recorded:
    /// a hit costs one hash of pointers instead of building two registry keys.
    static REQUEST_HANDLES: std::cell::RefCell<
        std::collections::HashMap<RequestSeries, SeriesHandles, rustc_hash::FxBuildHasher>,
    > = std::cell::RefCell::default();
}

/// What one request series records into.
type SeriesHandles = (
    metrics::Counter,
    metrics::Histogram,
    Arc<pulse::CallerPulse>,
);

static NEXT_METRICS_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Every family, with its help text; names follow Prometheus conventions.
pub mod names {
    pub const REQUESTS: &str = "graph_session_proxy_requests_total";
    pub const REQUEST_DURATION: &str = "graph_session_proxy_request_duration_seconds";
    pub const GRAPH_REQUESTS: &str = "graph_session_proxy_graph_requests_total";
    pub const GRAPH_DURATION: &str = "graph_session_proxy_graph_request_duration_seconds";
    pub const GRAPH_RETRIES: &str = "graph_session_proxy_graph_retries_total";
    pub const TOKEN_REQUESTS: &str = "graph_session_proxy_token_requests_total";
    pub const TOKEN_EXPIRY: &str = "graph_session_proxy_token_expiry_seconds";
    pub const CACHE_ENTRIES: &str = "graph_session_proxy_cache_entries";
    pub const CACHE_BYTES: &str = "graph_session_proxy_cache_bytes";
    pub const CACHE_EVICTIONS: &str = "graph_session_proxy_cache_evictions_total";
    pub const COALESCED: &str = "graph_session_proxy_coalesced_waiters_total";
    pub const GATE_STATE: &str = "graph_session_proxy_graph_gate_state";
    pub const PURGES: &str = "graph_session_proxy_purges_total";
    pub const READY: &str = "graph_session_proxy_ready";
    pub const LIST_TRUNCATED: &str = "graph_session_proxy_list_truncated_total";
    pub const TLS_RELOADS: &str = "graph_session_proxy_tls_reloads_total";
    pub const SHARED_ERRORS: &str = "graph_session_proxy_shared_errors_total";
    pub const SHARED_SKIPPED: &str = "graph_session_proxy_shared_skipped_total";
    pub const SHARED_UP: &str = "graph_session_proxy_shared_up";
    pub const SHARED_LOOKUPS: &str = "graph_session_proxy_shared_lookups_total";
    pub const RATE_LIMITED: &str = "graph_session_proxy_rate_limited_total";
    pub const LIMITED_CALLERS: &str = "graph_session_proxy_limited_callers";
    pub const CREDENTIAL_RELOADS: &str = "graph_session_proxy_credential_reloads_total";
    pub const SUBSCRIPTIONS: &str = "graph_session_proxy_subscriptions";
    pub const NOTIFICATIONS: &str = "graph_session_proxy_notifications_total";
    pub const SUBSCRIPTION_CALLS: &str = "graph_session_proxy_subscription_calls_total";
}

const HELP: &[(&str, &str)] = &[
    (
        names::SUBSCRIPTIONS,
        "Webinars known to change notifications, by state (active: this replica holds a live subscription; shared: another replica does; pending: being created; failed: polled by cache.ttl after a refusal, retried with backoff; capped: polled because max_subscriptions are in use).",
    ),
    (
        names::NOTIFICATIONS,
        "Change and lifecycle notification items (and requests) received, by outcome (refreshed, created, lifecycle, validation, unknown_subscription, bad_client_state, mismatch, malformed, too_large, flooded, refresh_failed).",
    ),
    (
        names::SUBSCRIPTION_CALLS,
        "Calls to Graph's /subscriptions, by operation (create, renew, reauthorize, delete) and outcome (ok or Graph's status).",
    ),
    (
        names::CREDENTIAL_RELOADS,
        "Client secret or certificate files re-read after they changed, by outcome (ok, error).",
    ),
    (
        names::LIMITED_CALLERS,
        "Callers whose limit buckets this replica holds (app ids only tokens name: at most 10,000, least recently seen dropped first).",
    ),
    (
        names::RATE_LIMITED,
        "Requests refused with 429 by a caller's limit (requests or graph); callers not configured by name are `other`.",
    ),
    (
        names::REQUESTS,
        "Caller requests by route, status class, error code, cache status and caller.",
    ),
    (
        names::REQUEST_DURATION,
        "Caller request duration, by cache status.",
    ),
    (
        names::GRAPH_REQUESTS,
        "Graph attempts by outcome and HTTP status.",
    ),
    (names::GRAPH_DURATION, "Graph attempt duration."),
    (names::GRAPH_RETRIES, "Graph attempts that were retries."),
    (names::TOKEN_REQUESTS, "Token endpoint requests by outcome."),
    (
        names::TOKEN_EXPIRY,
        "Seconds until the current Graph token expires (0: none).",
    ),
    (
        names::CACHE_ENTRIES,
        "Sessions (and remembered 404s) in the cache.",
    ),
    (
        names::CACHE_BYTES,
        "Weighted bytes in the cache (bodies, keys, bookkeeping).",
    ),
    (names::CACHE_EVICTIONS, "Cache entries removed, by cause."),
    (
        names::COALESCED,
        "Requests that waited on a Graph call another request started.",
    ),
    (
        names::GATE_STATE,
        "1 for the Graph gate's current state (open, probing, throttled, circuit_open).",
    ),
    (names::PURGES, "Purges through the admin API, by scope."),
    (names::READY, "1 while ready to serve."),
    (
        names::LIST_TRUNCATED,
        "Session lists cut at graph.max_list_pages.",
    ),
    (
        names::TLS_RELOADS,
        "Caller-listener certificate reloads after a file change, by outcome (ok, error).",
    ),
    (
        names::SHARED_ERRORS,
        "Failed or timed-out Redis steps of the shared cache tier, by operation.",
    ),
    (
        names::SHARED_SKIPPED,
        "Entries kept out of the shared tier, by reason.",
    ),
    (
        names::SHARED_UP,
        "1 while the last Redis step of the shared tier worked (absent without a shared tier).",
    ),
    (
        names::SHARED_LOOKUPS,
        "Shared-tier lookups by result (hit, stale, miss, waited, unavailable).",
    ),
];

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new("graph_session_proxy", metrics::Level::INFO, None);

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".to_string()),
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        for (name, help) in HELP {
            recorder.describe_counter((*name).into(), None, (*help).into());
            recorder.describe_gauge((*name).into(), None, (*help).into());
            recorder.describe_histogram((*name).into(), None, (*help).into());
        }
        let handle = recorder.handle();
        let id = NEXT_METRICS_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Metrics {
            recorder,
            handle,
            id,
            pulse: Pulse::new(),
        }
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> metrics::Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> metrics::Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub fn histogram(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
    ) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// One caller request: the request counter and the latency histogram. Label values
    /// are static strings or the caller's shared name, so nothing is copied; the handles
    /// are looked up in the registry once per series and thread.
    pub fn record_request(
        &self,
        labels: [(&'static str, &'static str); 4],
        caller: &Arc<str>,
        seconds: f64,
    ) {
        let series = RequestSeries {
            metrics: self.id,
            labels: labels.map(|(_, v)| v as *const str),
            caller: caller.clone(),
        };
        debug_assert!(labels[1].0 == "status" && labels[3].0 == "cache");
        let cache_label = labels[3].1;
        let server_error = labels[1].1 == "5xx";
        REQUEST_HANDLES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some((counter, histogram, pulse)) = cache.get(&series) {
                counter.increment(1);
                histogram.record(seconds);
                self.pulse
                    .request(cache_label, server_error, seconds, pulse);
                return;
            }
            let (counter, histogram) = self.request_handles(labels, caller);
            let pulse = self.pulse.caller(caller);
            counter.increment(1);
            histogram.record(seconds);
            self.pulse
                .request(cache_label, server_error, seconds, &pulse);
            if cache.len() >= MAX_CACHED_SERIES {
                cache.clear();
            }
            cache.insert(series, (counter, histogram, pulse));
        });
    }

    /// The registry's handles of one request series.
    fn request_handles(
        &self,
        labels: [(&'static str, &'static str); 4],
        caller: &Arc<str>,
    ) -> (metrics::Counter, metrics::Histogram) {
        let mut all: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::from_static_parts(k, v))
            .collect();
        all.push(Label::new(
            "caller",
            metrics::SharedString::from_shared(caller.clone()),
        ));
        let counter = self
            .recorder
            .register_counter(&Key::from_parts(names::REQUESTS, all), &METADATA);
        let cache = labels
            .iter()
            .find(|(k, _)| *k == "cache")
            .map_or("none", |(_, v)| v);
        let histogram = self.recorder.register_histogram(
            &Key::from_parts(
                names::REQUEST_DURATION,
                vec![Label::from_static_parts("cache", cache)],
            ),
            &METADATA,
        );
        (counter, histogram)
    }

    /// The last 15 minutes of requests and Graph calls.
    pub fn pulse(&self) -> &Pulse {
        &self.pulse
    }

    /// Folds recorded histogram samples into their buckets. Without it samples pile up
    /// until the next scrape, so memory grows per request when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

#[cfg(test)]
mod readable_tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("invalid_client (AADSTS7000215)")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn causes_are_their_texts_joined() {
        let e = Outer(Middle(std::io::Error::other("connection reset")));
        assert_eq!(
            Causes(&e).to_string(),
            "invalid_client (AADSTS7000215): connection reset"
        );
        assert_eq!(Causes(&std::io::Error::other("x")).to_string(), "-");
    }

    #[test]
    fn waits_read_like_people_write_them() {
        assert_eq!(
            Wait(Duration::from_secs_f64(29.786486933)).to_string(),
            "30s"
        );
        assert_eq!(Wait(Duration::from_secs(30)).to_string(), "30s");
        assert_eq!(Wait(Duration::from_millis(250)).to_string(), "250ms");
        assert_eq!(Wait(Duration::from_micros(1500)).to_string(), "2ms");
        assert_eq!(Wait(Duration::ZERO).to_string(), "0ms");
    }
}
