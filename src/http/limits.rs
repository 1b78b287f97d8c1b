//! Fair share: each caller's request rate and Graph budget (`[limits]`, overridden per
//! caller), and the headers a refusal carries.
//!
//! Every caller has up to two GCRA buckets (governor's, on the proxy's [`Clock`] so tests
//! move time): one charged by every request, one charged only by a request that starts a
//! Graph call (a miss, a `no-cache` revalidation, a list's pages); requests that join a
//! call in progress, and cache hits, are free. Buckets of configured callers (API keys,
//! apps listed by client id) are kept for the process' life; those of app ids only a
//! token names live in a bounded LRU, so a flood of distinct app ids cannot grow memory.
//! With `[cache.shared]`, the decision is one atomic GCRA step in Redis instead, so
//! every replica charges the same bucket; when Redis fails (or is paused after a
//! failure), this replica's own bucket decides, so no request fails because of Redis and
//! N replicas then allow up to N times the limit until Redis is back.

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::HeaderValue;
use tokio::time::Instant;

use crate::auth::callers::Caller;
use crate::cache::tier2::SharedTier;
use crate::config::{LimitSettings, Rate};
use crate::core::clock::Clock;
use crate::telemetry::{names, Metrics};

/// How many app ids that only tokens name get buckets of their own at once; past it, the
/// least recently used are forgotten (a forgotten caller starts with a full bucket).
pub(crate) const UNKNOWN_CALLERS: u64 = 10_000;

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Graph,
}

impl Limit {
    /// The `limit` metric label and the `RateLimit-Policy` name.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Graph => "graph",
        }
    }
}

/// A caller over one of its limits: what to tell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    pub rate: Rate,
    /// Until the bucket admits one more.
    pub wait: Duration,
}

impl Refusal {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0);
        secs.max(1)
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers), e.g.
    /// `"requests";q=200;w=1` and `"requests";r=0;t=1`.
    pub fn headers(&self) -> (HeaderValue, HeaderValue) {
        let name = self.limit.name();
        let policy = format!(
            "\"{name}\";q={};w={}",
            self.rate.quota, self.rate.window_secs
        );
        let now = format!("\"{name}\";r=0;t={}", self.retry_after_secs());
        (
            HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("\"limit\"")),
            HeaderValue::from_str(&now).unwrap_or(HeaderValue::from_static("\"limit\"")),
        )
    }
}

/// governor's view of the proxy's [`Clock`]: time since the limiter was built.
#[derive(Debug, Clone)]
struct LimiterClock {
    clock: Clock,
    origin: Instant,
}

impl governor::clock::Clock for LimiterClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.clock.now().saturating_duration_since(self.origin)
    }
}

type Bucket = RateLimiter<NotKeyed, InMemoryState, LimiterClock, NoOpMiddleware<Duration>>;

/// One caller's buckets (absent: unlimited).
struct Buckets {
    requests: Option<(Rate, Bucket)>,
    graph: Option<(Rate, Bucket)>,
}

/// Every caller's buckets.
pub struct Limits {
    defaults: LimitSettings,
    /// Callers built at start-up, by [`Caller::slot`]: no lookup on the hit path.
    slotted: Box<[OnceLock<Buckets>]>,
    /// Other configured callers (apps listed by client id): bounded by the
    /// configuration, never evicted.
    configured: moka::sync::Cache<Arc<str>, Arc<Buckets>>,
    /// App ids only tokens name: an LRU of at most [`UNKNOWN_CALLERS`].
    unknown: moka::sync::Cache<Arc<str>, Arc<Buckets>>,
    clock: LimiterClock,
    metrics: Arc<Metrics>,
    /// Redis, when `[cache.shared]` is configured: one bucket for all replicas.
    shared: Option<Arc<SharedTier>>,
}

impl Limits {
    /// `slots`: how many [`Caller::slot`] numbers the callers use.
    pub fn new(
        defaults: LimitSettings,
        slots: usize,
        clock: Clock,
        metrics: Arc<Metrics>,
        shared: Option<Arc<SharedTier>>,
    ) -> Limits {
        Limits {
            defaults,
            slotted: (0..slots).map(|_| OnceLock::new()).collect(),
            configured: moka::sync::Cache::builder().build(),
            unknown: moka::sync::Cache::builder()
                .max_capacity(UNKNOWN_CALLERS)
                .build(),
            clock: LimiterClock {
                origin: clock.now(),
                clock,
            },
            metrics,
            shared,
        }
    }

    /// Charges one request to the caller's request rate.
    pub async fn request(&self, caller: &Caller) -> Result<(), Refusal> {
        self.charge(caller, Limit::Requests).await
    }

    /// Charges one Graph call to the caller's Graph budget.
    pub async fn graph_call(&self, caller: &Caller) -> Result<(), Refusal> {
        self.charge(caller, Limit::Graph).await
    }

    /// Whether this caller has a Graph budget at all (else nothing needs checking).
    pub fn has_graph_budget(&self, caller: &Caller) -> bool {
        self.defaults.with(caller.limits).graph().is_some()
    }

    /// Counts a refusal answered with 429; the caller label is the configured name, or
    /// `other` for app ids only tokens name (so `/metrics` stays bounded).
    pub fn count_refusal(&self, caller: &Caller, limit: Limit) {
        let label = caller.metric_label();
        self.metrics
            .counter(
                names::RATE_LIMITED,
                &[("caller", &label), ("limit", limit.name())],
            )
            .increment(1);
    }

    async fn charge(&self, caller: &Caller, limit: Limit) -> Result<(), Refusal> {
        let settings = self.defaults.with(caller.limits);
        let rate = match limit {
            Limit::Requests => settings.requests(),
            Limit::Graph => settings.graph(),
        };
        let Some(rate) = rate else { return Ok(()) };
        if let Some(shared) = &self.shared {
            let interval = Duration::from_secs(u64::from(rate.window_secs)) / rate.quota.max(1);
            // Boxed: a Redis round trip's future would otherwise be part of (and copied
            // with) every request's future, whether limits are configured or not.
            match Box::pin(shared.charge(limit.name(), &caller.bucket, interval, rate.burst)).await
            {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => return Err(Refusal { limit, rate, wait }),
                // Redis is down or slow: this replica's own bucket decides.
                Err(_unavailable) => {}
            }
        }
        self.charge_here(caller, limit)
    }

    /// This replica's own bucket decides.
    fn charge_here(&self, caller: &Caller, limit: Limit) -> Result<(), Refusal> {
        let build = || Arc::new(self.buckets(caller));
        let looked_up;
        let buckets = match caller.slot.and_then(|slot| self.slotted.get(slot)) {
            Some(slot) => slot.get_or_init(|| self.buckets(caller)),
            None => {
                looked_up = if caller.configured {
                    self.configured.get_with_by_ref(&caller.bucket, build)
                } else {
                    self.unknown.get_with_by_ref(&caller.bucket, build)
                };
                &looked_up
            }
        };
        let bucket = match limit {
            Limit::Requests => &buckets.requests,
            Limit::Graph => &buckets.graph,
        };
        let Some((rate, bucket)) = bucket else {
            return Ok(());
        };
        bucket.check().map_err(|not_until| Refusal {
            limit,
            rate: *rate,
            wait: not_until.wait_time_from(self.clock.now()),
        })
    }

    fn buckets(&self, caller: &Caller) -> Buckets {
        let settings = self.defaults.with(caller.limits);
        let bucket = |rate: Rate| {
            let quota = NonZeroU32::new(rate.quota).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
            let period = Duration::from_secs(u64::from(rate.window_secs)) / quota.get();
            let quota = Quota::with_period(period)
                .unwrap_or(Quota::per_second(quota))
                .allow_burst(burst);
            (
                rate,
                RateLimiter::direct_with_clock(quota, self.clock.clone()),
            )
        };
        Buckets {
            requests: settings.requests().map(bucket),
            graph: settings.graph().map(bucket),
        }
    }

    /// Callers with buckets here (for the bounded-memory test and the admin's view).
    pub fn tracked(&self) -> u64 {
        self.configured.run_pending_tasks();
        self.unknown.run_pending_tasks();
        let slotted = self.slotted.iter().filter(|s| s.get().is_some()).count() as u64;
        slotted + self.configured.entry_count() + self.unknown.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(wait: Duration) -> Refusal {
        Refusal {
            limit: Limit::Requests,
            rate: Rate {
                quota: 200,
                window_secs: 1,
                burst: 200,
            },
            wait,
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(refusal(Duration::from_millis(5)).retry_after_secs(), 1);
        assert_eq!(refusal(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(refusal(Duration::from_millis(1500)).retry_after_secs(), 2);
        assert_eq!(refusal(Duration::from_secs(3)).retry_after_secs(), 3);
    }

    fn limits(defaults: LimitSettings) -> Limits {
        Limits::new(defaults, 0, Clock::new(), Arc::new(Metrics::new()), None)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_unknown_app_ids_keeps_memory_bounded() {
        let limits = limits(LimitSettings {
            requests_per_second: 1,
            graph_per_minute: 60,
            ..LimitSettings::default()
        });
        let known = Caller::for_tests("key:reporting", true, Default::default());
        assert!(limits.request(&known).await.is_ok());
        for n in 0..(3 * UNKNOWN_CALLERS) {
            let app = Caller::for_tests(&format!("app:{n}"), false, Default::default());
            assert!(
                limits.request(&app).await.is_ok(),
                "a new app has a full bucket"
            );
        }
        let tracked = limits.tracked();
        assert!(tracked <= UNKNOWN_CALLERS + 1, "{tracked} callers tracked");
        // The configured caller was never evicted: its bucket is still spent.
        assert!(limits.request(&known).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_graph_budget_refills_on_the_clock() {
        let limits = limits(LimitSettings {
            graph_per_minute: 6,
            graph_burst: 2,
            ..LimitSettings::default()
        });
        let app = Caller::for_tests("app:a", false, Default::default());
        assert!(limits.graph_call(&app).await.is_ok());
        assert!(limits.graph_call(&app).await.is_ok());
        let refusal = limits.graph_call(&app).await.unwrap_err();
        assert_eq!(refusal.limit, Limit::Graph);
        assert_eq!(refusal.retry_after_secs(), 10);
        // Requests are unlimited: no bucket, no refusal.
        assert!(limits.request(&app).await.is_ok());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(limits.graph_call(&app).await.is_ok());
        assert!(limits.graph_call(&app).await.is_err());
    }

    #[test]
    fn headers_follow_the_draft_syntax() {
        let (policy, now) = refusal(Duration::from_millis(20)).headers();
        assert_eq!(policy, "\"requests\";q=200;w=1");
        assert_eq!(now, "\"requests\";r=0;t=1");
    }
}
