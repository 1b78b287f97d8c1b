//! [`Pulse`]: the last 15 minutes of requests and Graph calls, second by second, for the
//! status page (`/status`). Prometheus keeps totals since start; the person looking at the
//! page wants "now": requests per second, the hit ratio and latency percentiles of the
//! last minute, and a sparkline. A hit pays a few relaxed atomic additions here.

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use rustc_hash::FxHashMap;

/// Seconds kept: the sparkline's 15 minutes.
pub const WINDOW: u64 = 900;
/// Seconds the rates, ratios and percentiles cover.
pub const RECENT: u64 = 60;

/// Upper bounds of the latency buckets, in microseconds (1-2-5 steps from 10 µs to 50 s);
/// a last bucket holds everything slower.
const BOUNDS_US: [u64; 22] = [
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    u64::MAX,
];
const BUCKETS: usize = BOUNDS_US.len();

/// Graph attempts by outcome, as the `outcome` label of `graph_requests_total` names them.
pub const GRAPH_OUTCOMES: [&str; 7] = [
    "ok",
    "not_found",
    "throttled",
    "error",
    "timeout",
    "unreachable",
    "too_large",
];

/// The `cache` labels of requests answered without a Graph call of their own (as the
/// monitoring pack's hit ratio counts them: `collapsed` waited on another request's call).
const SERVED_FROM_CACHE: [&str; 7] = [
    "hit",
    "collapsed",
    "stale_while_revalidate",
    "stale_if_error",
    "max_stale",
    "tier2_hit",
    "graph_budget",
];
/// The `cache` labels of requests Graph was asked for.
const ASKED_GRAPH: [&str; 2] = ["miss", "revalidated"];

/// Most callers counted by name; later names are counted under [`OTHER_CALLERS`].
const MAX_CALLERS: usize = 1_000;
pub const OTHER_CALLERS: &str = "(other callers)";

#[derive(Default)]
struct Second {
    /// The second (since start) plus one whose counts this slot holds; 0: none yet.
    epoch: AtomicU64,
    requests: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    server_errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    graph: [AtomicU64; GRAPH_OUTCOMES.len()],
}

impl Second {
    fn clear(&self) {
        for c in [
            &self.requests,
            &self.hits,
            &self.misses,
            &self.server_errors,
        ] {
            c.store(0, Relaxed);
        }
        for c in self.latency.iter().chain(&self.graph) {
            c.store(0, Relaxed);
        }
    }
}

/// One caller's requests per second over the last [`RECENT`] seconds.
pub struct CallerPulse {
    slots: [(AtomicU64, AtomicU64); RECENT as usize],
}

impl Default for CallerPulse {
    fn default() -> Self {
        CallerPulse {
            slots: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))),
        }
    }
}

impl CallerPulse {
    fn add(&self, second: u64, rotation: &Mutex<()>) {
        let (epoch, count) = &self.slots[(second % RECENT) as usize];
        if epoch.load(Acquire) != second + 1 {
            let _turn = rotation.lock().unwrap_or_else(|e| e.into_inner());
            if epoch.load(Acquire) != second + 1 {
                count.store(0, Relaxed);
                epoch.store(second + 1, Release);
            }
        }
        count.fetch_add(1, Relaxed);
    }

    fn recent(&self, now: u64) -> u64 {
        self.slots
            .iter()
            .filter(|(epoch, _)| {
                let e = epoch.load(Acquire);
                e != 0 && e - 1 + RECENT > now && e - 1 <= now
            })
            .map(|(_, count)| count.load(Relaxed))
            .sum()
    }
}

pub struct Pulse {
    started: Instant,
    seconds: Box<[Second]>,
    /// Taken only to start a slot's new second.
    rotation: Mutex<()>,
    callers: RwLock<FxHashMap<Arc<str>, Arc<CallerPulse>>>,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse::new()
    }
}

/// What the last minute looked like.
#[derive(Debug, Clone, PartialEq)]
pub struct Recent {
    /// Seconds covered (less than [`RECENT`] just after start).
    pub seconds: u64,
    /// The time those seconds span to this instant (the current second is partial), at
    /// least one second: what rates divide by.
    pub span: f64,
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub server_errors: u64,
    /// Latency percentiles in seconds; `None` without requests.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Graph attempts by [`GRAPH_OUTCOMES`].
    pub graph: [u64; GRAPH_OUTCOMES.len()],
}

impl Pulse {
    pub fn new() -> Pulse {
        Pulse {
            started: Instant::now(),
            seconds: (0..WINDOW).map(|_| Second::default()).collect(),
            rotation: Mutex::new(()),
            callers: RwLock::default(),
        }
    }

    /// Time since start.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    fn second(&self) -> (u64, &Second) {
        let now = self.started.elapsed().as_secs();
        let slot = &self.seconds[(now % WINDOW) as usize];
        // The epoch is published with Release after the clear, and read with Acquire, so
        // an addition that sees the new second is never undone by its clear.
        if slot.epoch.load(Acquire) != now + 1 {
            let _turn = self.rotation.lock().unwrap_or_else(|e| e.into_inner());
            if slot.epoch.load(Acquire) != now + 1 {
                slot.clear();
                slot.epoch.store(now + 1, Release);
            }
        }
        (now, slot)
    }

    /// The counter of one caller by its metric name (held by the caller of this, so that
    /// a hit does not look it up).
    pub fn caller(&self, name: &Arc<str>) -> Arc<CallerPulse> {
        if let Some(found) = self
            .callers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return found.clone();
        }
        let mut callers = self.callers.write().unwrap_or_else(|e| e.into_inner());
        let name = if callers.len() >= MAX_CALLERS && !callers.contains_key(name) {
            Arc::from(OTHER_CALLERS)
        } else {
            name.clone()
        };
        callers.entry(name).or_default().clone()
    }

    /// One caller request: its `cache` label, status and duration.
    pub fn request(&self, cache: &str, server_error: bool, seconds: f64, caller: &CallerPulse) {
        let (now, slot) = self.second();
        slot.requests.fetch_add(1, Relaxed);
        if SERVED_FROM_CACHE.contains(&cache) {
            slot.hits.fetch_add(1, Relaxed);
        } else if ASKED_GRAPH.contains(&cache) {
            slot.misses.fetch_add(1, Relaxed);
        }
        if server_error {
            slot.server_errors.fetch_add(1, Relaxed);
        }
        let micros = (seconds * 1e6) as u64;
        let bucket = BOUNDS_US.partition_point(|bound| *bound < micros);
        slot.latency[bucket.min(BUCKETS - 1)].fetch_add(1, Relaxed);
        caller.add(now, &self.rotation);
    }

    /// One Graph attempt, by its `outcome` label.
    pub fn graph(&self, outcome: &str) {
        let (_, slot) = self.second();
        let i = GRAPH_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(3);
        slot.graph[i].fetch_add(1, Relaxed);
    }

    /// The slots of the seconds `from..=to` still held.
    fn held(&self, from: u64, to: u64) -> impl Iterator<Item = &Second> {
        (from..=to).filter_map(move |s| {
            let slot = &self.seconds[(s % WINDOW) as usize];
            (slot.epoch.load(Acquire) == s + 1).then_some(slot)
        })
    }

    /// The last [`RECENT`] seconds.
    pub fn recent(&self) -> Recent {
        let elapsed = self.started.elapsed();
        let now = elapsed.as_secs();
        let from = now.saturating_sub(RECENT - 1);
        let mut r = Recent {
            seconds: now - from + 1,
            span: span_since(elapsed, from),
            requests: 0,
            hits: 0,
            misses: 0,
            server_errors: 0,
            p50: None,
            p99: None,
            graph: [0; GRAPH_OUTCOMES.len()],
        };
        let mut latency = [0u64; BUCKETS];
        for slot in self.held(from, now) {
            r.requests += slot.requests.load(Relaxed);
            r.hits += slot.hits.load(Relaxed);
            r.misses += slot.misses.load(Relaxed);
            r.server_errors += slot.server_errors.load(Relaxed);
            for (sum, c) in latency.iter_mut().zip(&slot.latency) {
                *sum += c.load(Relaxed);
            }
            for (sum, c) in r.graph.iter_mut().zip(&slot.graph) {
                *sum += c.load(Relaxed);
            }
        }
        r.p50 = percentile(&latency, 0.50);
        r.p99 = percentile(&latency, 0.99);
        r
    }

    /// Requests per second in each of the last 15 minutes' `points` equal steps, oldest
    /// first (steps before the start count nothing).
    pub fn sparkline(&self, points: u64) -> Vec<f64> {
        let elapsed = self.started.elapsed();
        let now = elapsed.as_secs();
        let step = (WINDOW / points.max(1)).max(1);
        (0..points)
            .rev()
            .map(|back| {
                let to = now.checked_sub(back * step);
                to.map_or(0.0, |to| {
                    let from = to.saturating_sub(step - 1);
                    let n: u64 = self.held(from, to).map(|s| s.requests.load(Relaxed)).sum();
                    // The newest step ends now, within its last second.
                    let span = if back == 0 {
                        span_since(elapsed, from)
                    } else {
                        (to - from + 1) as f64
                    };
                    n as f64 / span
                })
            })
            .collect()
    }

    /// The callers with the most requests in the last [`RECENT`] seconds, busiest first.
    pub fn busiest(&self, most: usize) -> Vec<(Arc<str>, u64)> {
        let now = self.started.elapsed().as_secs();
        let mut all: Vec<(Arc<str>, u64)> = self
            .callers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, pulse)| (name.clone(), pulse.recent(now)))
            .filter(|(_, n)| *n > 0)
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(most);
        all
    }
}

/// The time from the start of second `from` to `elapsed` (which falls within a partial
/// second), at least one second: what a rate over seconds `from..=now` divides by.
fn span_since(elapsed: std::time::Duration, from: u64) -> f64 {
    (elapsed.as_secs_f64() - from as f64).max(1.0)
}

/// The `q` quantile of bucket counts, interpolated linearly within its bucket.
fn percentile(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).max(1.0);
    let mut below = 0u64;
    for (i, n) in counts.iter().enumerate() {
        if *n > 0 && (below + n) as f64 >= rank {
            let low = if i == 0 { 0 } else { BOUNDS_US[i - 1] } as f64;
            let high = if i == BUCKETS - 1 {
                low * 2.0
            } else {
                BOUNDS_US[i] as f64
            };
            let within = (rank - below as f64) / *n as f64;
            return Some((low + (high - low) * within) / 1e6);
        }
        below += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_minute_counts_hits_misses_and_graph_outcomes() {
        let pulse = Pulse::new();
        let alice = pulse.caller(&Arc::from("alice"));
        let bob = pulse.caller(&Arc::from("bob"));
        for _ in 0..8 {
            pulse.request("hit", false, 0.000_150, &alice);
        }
        pulse.request("miss", false, 0.030, &bob);
        pulse.request("none", true, 0.001, &bob);
        pulse.request("collapsed", false, 0.030, &bob);
        pulse.graph("ok");
        pulse.graph("throttled");
        pulse.graph("something new");
        let r = pulse.recent();
        assert_eq!(
            (r.requests, r.hits, r.misses, r.server_errors),
            (11, 9, 1, 1)
        );
        assert_eq!(r.graph, [1, 0, 1, 1, 0, 0, 0]);
        let p50 = r.p50.unwrap();
        assert!((0.0001..=0.0002).contains(&p50), "{p50}");
        let p99 = r.p99.unwrap();
        assert!((0.02..=0.05).contains(&p99), "{p99}");
        assert_eq!(
            pulse.busiest(5),
            vec![(Arc::from("alice"), 8), (Arc::from("bob"), 3)]
        );
        assert_eq!(pulse.busiest(1).len(), 1);
        let line = pulse.sparkline(90);
        assert_eq!(line.len(), 90);
        assert!(line[89] > 0.0 && line[..89].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn rates_divide_by_the_time_spanned_not_by_whole_seconds() {
        let mut pulse = Pulse::new();
        // 90.5 s after start: the last minute is seconds 31..=90, of which 90 is half gone.
        let Some(started) = Instant::now().checked_sub(std::time::Duration::from_millis(90_500))
        else {
            return; // a machine up for less than 90 s
        };
        pulse.started = started;
        let r = pulse.recent();
        assert_eq!(r.seconds, 60);
        assert!((59.45..59.9).contains(&r.span), "{}", r.span);
        // Just after start: at least a second.
        assert_eq!(Pulse::new().recent().span, 1.0);
    }

    #[test]
    fn nothing_recorded_reads_as_no_percentiles() {
        let r = Pulse::new().recent();
        assert_eq!((r.requests, r.p50, r.p99), (0, None, None));
    }

    #[test]
    fn percentiles_interpolate_within_a_bucket() {
        let mut counts = [0u64; BUCKETS];
        counts[6] = 100; // 500 µs ..= 1 ms
        let p50 = percentile(&counts, 0.5).unwrap();
        assert!((p50 - 0.00075).abs() < 1e-9, "{p50}");
        assert!(percentile(&counts, 0.99).unwrap() <= 0.001);
    }

    #[test]
    fn callers_beyond_the_bound_share_one_name() {
        let pulse = Pulse::new();
        for i in 0..MAX_CALLERS + 5 {
            let c = pulse.caller(&Arc::from(format!("app-{i}")));
            pulse.request("hit", false, 0.0001, &c);
        }
        let busiest = pulse.busiest(1);
        assert_eq!(&*busiest[0].0, OTHER_CALLERS);
        assert_eq!(busiest[0].1, 5);
    }
}
