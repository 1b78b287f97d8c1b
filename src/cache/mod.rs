//! [`SessionCache`]: Graph answers in memory, with freshness judged by our own clock.
//!
//! moka holds the entries and bounds them by bytes (a weigher over body + key); each entry
//! lives in moka (per-entry expiry) for as long as it could still be served: its
//! freshness lifetime plus the longer stale window. Whether an entry is fresh or stale is
//! decided here from the entry's own instants, because moka has no notion of stale reads
//! and its clock cannot be moved by tests. An entry's life:
//!
//! ```text
//! stored ── fresh (hit) ──┬── last `refresh_ahead` of ttl: hit + background refresh
//!                         ├── stale_while_revalidate: stale served at once + background refresh
//!                         └── stale_if_error: Graph asked; on failure the stale entry is served
//! ```
//!
//! The freshness lifetime is `ttl`, `negative_ttl` for a Graph 404, or `ttl_ended` for a
//! session whose `endDateTime` is more than an hour past (`smart_ttl`).
//!
//! Misses are single-flight (`core::flight`): the first caller for a key spawns the Graph
//! call as its own task and publishes a shared future in `flights`; everyone else for that
//! key awaits the same future. Because the call is a spawned task, the caller that started it may
//! disconnect without cancelling it: the answer is still stored for the next request.
//! Background refreshes, revalidations (`no-cache`) and misses all go through the same
//! single flight. A failed call is remembered for `failure_ttl`, so the next burst gets
//! the same error (or a stale entry) without calling a failing Graph again.
//!
//! Where each part lives:
//!
//! ```text
//! mod.rs       SessionCache, the facade: get, stale_if_error, purges, usage, gate, now
//! entry.rs     Entry: validators, freshness windows, weight, smart ttl
//! policy.rs    Directives, Outcome, Lookup: what may be served; Cache-Status, metric label
//! memory.rs    the moka store, the failure memory (`core::remembered`), the purge count
//! origin.rs    Origin: the trait the cache fetches through (app implements it for Graph)
//! push.rs      Push: what change notifications learn from the cache (notify implements it)
//! tier2/       SharedTier (Redis) and SessionCache's side of it: the cross-replica miss
//! ```

mod entry;
mod memory;
pub mod origin;
mod policy;
pub mod push;
pub mod tier2;

pub use entry::Entry;
pub use origin::Origin;
pub use policy::{metric_label, Directives, Lookup, Outcome, MISS_STATUS};
pub use push::Push;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::memory::Memory;
use crate::cache::policy::{servable, Mode};
use crate::cache::tier2::{Purge, SharedTier};
use crate::config::CacheSettings;
use crate::core::clock::Clock;
use crate::core::flight::{Flights, Joined};
use crate::core::model::{Kind, SessionKey};
use crate::telemetry::{names, Metrics};
use crate::upstream::error::UpstreamError;
use crate::upstream::gate::Gate;

type FetchResult = Result<Arc<Entry>, Arc<UpstreamError>>;

/// Why the cache could not answer a lookup.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("only-if-cached and nothing is cached")]
    NotCached,
    /// Graph's (or the token endpoint's) failure, as the failure memory keeps it.
    #[error(transparent)]
    Upstream(Arc<UpstreamError>),
}

/// What [`SessionCache::purge_everywhere`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeReport {
    /// Sessions removed from this replica (an event's purge).
    pub removed: usize,
    /// Whether the key was cached here (a session's or list's purge).
    pub was_cached: bool,
    /// Whether the shared tier took it (`None`: no shared tier).
    pub shared: Option<bool>,
}

pub struct SessionCache {
    /// This replica's entries and remembered failures.
    memory: Memory,
    /// Graph calls in progress, one per key.
    flights: Flights<SessionKey, FetchResult>,
    origin: Arc<dyn Origin>,
    settings: CacheSettings,
    /// Upper bound for one shared Graph call.
    fetch_timeout: Duration,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Redis, when `[cache.shared]` is configured.
    shared: Option<Arc<SharedTier>>,
    /// Change notifications, when `[notifications]` is configured.
    push: OnceLock<Arc<dyn Push>>,
}

impl SessionCache {
    pub fn new(
        settings: &CacheSettings,
        origin: Arc<dyn Origin>,
        fetch_timeout: Duration,
        clock: Clock,
        metrics: Arc<Metrics>,
        shared: Option<Arc<SharedTier>>,
    ) -> Arc<SessionCache> {
        Arc::new(SessionCache {
            memory: Memory::new(settings, metrics.clone()),
            flights: Flights::new(|| {
                Err(Arc::new(UpstreamError::Internal("Graph call task failed")))
            }),
            origin,
            settings: settings.clone(),
            fetch_timeout,
            clock,
            metrics,
            shared,
            push: OnceLock::new(),
        })
    }

    /// Connects change notifications (once; later calls are ignored).
    pub fn set_push(&self, push: Arc<dyn Push>) {
        let _ = self.push.set(push);
    }

    /// Tells change notifications that a webinar's answer was read.
    fn note_read(&self, key: &SessionKey) {
        if key.kind == Kind::Webinars {
            if let Some(push) = self.push.get() {
                push.read(&key.event);
            }
        }
    }

    /// Tells change notifications that a webinar's answer was stored.
    pub(in crate::cache) fn note_stored(&self, key: &SessionKey, entry: &Entry) {
        if key.kind == Kind::Webinars && entry.has_body() {
            if let Some(push) = self.push.get() {
                push.stored(&key.event);
            }
        }
    }

    /// The freshness a live subscription gives an answer for `key` stored now.
    pub(in crate::cache) fn push_for(&self, key: &SessionKey) -> Option<Duration> {
        if key.kind != Kind::Webinars {
            return None;
        }
        self.push.get()?.fresh_for(&key.event)
    }

    /// The longest freshness a pushed entry may have (for the shared tier's sanity check).
    pub(in crate::cache) fn push_ttl(&self) -> Duration {
        self.push.get().map_or(Duration::ZERO, |p| p.ttl())
    }

    /// The shared tier, when configured.
    pub fn shared(&self) -> Option<&Arc<SharedTier>> {
        self.shared.as_ref()
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The clock freshness is judged by (the rate limits run on it too).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Whether [`SessionCache::get`] would start a Graph call for this request: nothing
    /// servable in memory, no failure remembered, and no call in progress to join. (Two
    /// requests at the same instant may both see `true` and one then joins the other.)
    pub fn would_call_graph(&self, key: &SessionKey, directives: Directives) -> bool {
        if directives.only_if_cached {
            return false;
        }
        let now = self.clock.now();
        let servable_here = self.memory.get(key).is_some_and(|entry| {
            servable(&entry, now, directives, self.settings.stale_if_error).is_some()
        });
        !servable_here
            && self.memory.recent_failure(key, now).is_none()
            && !self.flights.in_progress(key)
    }

    /// What may answer without any Graph call, for a caller whose Graph budget is spent:
    /// a fresh entry here or, with `[cache.shared]`, one another replica stored (a
    /// `no-cache` request is answered as if it had not asked to revalidate), else a stale
    /// one within `stale_if_error`. No Graph call is started, no shared lock taken.
    pub async fn get_without_graph(
        self: &Arc<Self>,
        key: &SessionKey,
        directives: Directives,
    ) -> Option<Lookup> {
        let cached_only = Directives {
            no_cache: false,
            only_if_cached: true,
            max_stale: directives.max_stale,
        };
        let here = |cache: &SessionCache| {
            let entry = cache.memory.get(key)?;
            let outcome = servable(
                &entry,
                cache.clock.now(),
                cached_only,
                cache.settings.stale_if_error,
            )?;
            Some(Lookup { entry, outcome })
        };
        self.note_read(key);
        if let Some(lookup) = here(self) {
            return Some(lookup);
        }
        if let Some(shared) = &self.shared {
            if let Some(entry) = self.peek_shared(shared, key).await {
                return Some(Lookup {
                    entry,
                    outcome: Outcome::Tier2,
                });
            }
        }
        let now = self.clock.now();
        let entry = self.memory.get(key)?;
        (entry.has_body() && now < entry.stale_until).then_some(Lookup {
            entry,
            outcome: Outcome::GraphBudget,
        })
    }

    /// What memory can serve for this request without waiting for Graph: a fresh hit (a
    /// background refresh started in its last `refresh_ahead`), or a stale entry the
    /// directives accept (refreshed in the background). `None`: [`SessionCache::get`]
    /// has to ask Graph, join a call, or answer a remembered failure.
    pub fn cached(self: &Arc<Self>, key: &SessionKey, directives: Directives) -> Option<Lookup> {
        self.note_read(key);
        let now = self.clock.now();
        let entry = self.memory.get(key)?;
        let outcome = servable(&entry, now, directives, self.settings.stale_if_error)?;
        if outcome != Outcome::Hit || now >= entry.refresh_from {
            self.refresh_in_background(key);
        }
        Some(Lookup { entry, outcome })
    }

    /// The session for `key`: from memory when fresh (or acceptably stale), else from
    /// Graph through the key's shared call, else a stale entry, else the error.
    pub async fn get(
        self: &Arc<Self>,
        key: &SessionKey,
        directives: Directives,
    ) -> Result<Lookup, CacheError> {
        if let Some(lookup) = self.cached(key, directives) {
            return Ok(lookup);
        }
        let now = self.clock.now();
        if directives.only_if_cached {
            return Err(CacheError::NotCached);
        }
        let result = match self.memory.recent_failure(key, now) {
            Some(error) => Err(error),
            None => match self.join_or_start(
                key,
                if directives.no_cache {
                    Mode::Revalidate
                } else {
                    Mode::Miss
                },
            ) {
                Joined::Ready(entry) => Ok(Lookup {
                    entry,
                    outcome: Outcome::Hit,
                }),
                Joined::Call { call, started } => {
                    if !started {
                        self.metrics.counter(names::COALESCED, &[]).increment(1);
                    }
                    call.await.map(|entry| Lookup {
                        outcome: match (entry.tier2, started, directives.no_cache) {
                            (true, _, _) => Outcome::Tier2,
                            (false, true, true) => Outcome::Revalidated,
                            (false, true, false) => Outcome::Miss,
                            (false, false, _) => Outcome::Collapsed,
                        },
                        entry,
                    })
                }
            },
        };
        result.or_else(|error| {
            tracing::debug!(%key, error = %error, "Graph failed; looking for a stale entry");
            self.stale_if_error(key).ok_or(CacheError::Upstream(error))
        })
    }

    /// A stale entry that may stand in for an error (within `stale_if_error`), if any.
    pub fn stale_if_error(&self, key: &SessionKey) -> Option<Lookup> {
        let now = self.clock.now();
        self.memory
            .get(key)
            .filter(|entry| entry.has_body() && now < entry.stale_until)
            .map(|entry| Lookup {
                entry,
                outcome: Outcome::StaleIfError,
            })
    }

    /// Starts (or joins) a refresh of `key` that nobody waits for.
    fn refresh_in_background(self: &Arc<Self>, key: &SessionKey) {
        if self.memory.recent_failure(key, self.clock.now()).is_some() {
            return;
        }
        // The shared call runs as its own task: dropping our handle does not cancel it.
        drop(self.join_or_start(key, Mode::Refresh));
    }

    /// Joins the Graph call in progress for `key`, or starts one.
    /// Except for a miss, a fresh entry does not stop a new call (refreshes, `no-cache`).
    fn join_or_start(
        self: &Arc<Self>,
        key: &SessionKey,
        mode: Mode,
    ) -> Joined<FetchResult, Arc<Entry>> {
        // A call may have finished between our cache read and this one.
        let ready = || {
            if mode != Mode::Miss {
                return None;
            }
            self.memory
                .get(key)
                .filter(|e| e.is_fresh(self.clock.now()))
        };
        let this = Arc::clone(self);
        let task_key = key.clone();
        self.flights.join_or_start(key, ready, move || async move {
            let deadline = Instant::now() + this.fetch_timeout;
            match this.shared.clone() {
                Some(shared) => this.load_shared(&shared, &task_key, mode, deadline).await,
                None => this.fetch_from_graph(&task_key, deadline).await,
            }
        })
    }

    /// Asks Graph for `key` and stores the answer in memory (or remembers the failure).
    async fn fetch_from_graph(
        self: &Arc<Self>,
        key: &SessionKey,
        deadline: Instant,
    ) -> FetchResult {
        let purges = self.memory.purge_count();
        match self.origin.fetch(key, deadline).await {
            Ok(answer) => {
                let entry = Arc::new(Entry::with_push(
                    answer,
                    self.clock.now(),
                    &self.settings,
                    key.is_list(),
                    self.push_for(key),
                ));
                self.memory.insert_unless_purged(key, entry.clone(), purges);
                self.note_stored(key, &entry);
                Ok(entry)
            }
            Err(e) => {
                let e = Arc::new(e);
                self.memory
                    .remember_failure(key, e.clone(), self.clock.now());
                Err(e)
            }
        }
    }

    /// A purge through the admin API: here at once, then in Redis and, by broadcast, on
    /// every other replica.
    pub async fn purge_everywhere(&self, purge: Purge) -> PurgeReport {
        let (removed, was_cached) = self.purge_here(&purge);
        let shared = match &self.shared {
            Some(shared) => Some(shared.purge(&purge).await),
            None => None,
        };
        PurgeReport {
            removed,
            was_cached,
            shared,
        }
    }

    /// Applies a purge to this replica's memory: (sessions removed for an event, whether a
    /// key was cached).
    pub fn purge_here(&self, purge: &Purge) -> (usize, bool) {
        match purge {
            Purge::Key(key) => (0, self.purge(key)),
            Purge::Event(kind, event) => (self.purge_event(*kind, event), false),
            Purge::All => {
                self.purge_all();
                (0, false)
            }
            Purge::Refreshed { key, by } => {
                let ours = self.shared.as_ref().is_some_and(|s| s.instance() == by);
                (0, !ours && self.purge(key))
            }
        }
    }

    /// Drops one session (or list), in every API version, with any failure remembered for
    /// it. A session's purge also drops its event's list, whose summary of it may have
    /// changed too. Returns whether the session (or list) was cached.
    pub fn purge(&self, key: &SessionKey) -> bool {
        self.memory.purge(key)
    }

    /// Drops every cached session of one event, and its session list. Returns how many
    /// sessions.
    pub fn purge_event(&self, kind: Kind, event: &str) -> usize {
        self.memory.purge_event(kind, event)
    }

    /// Drops everything.
    pub fn purge_all(&self) {
        self.memory.purge_all()
    }

    /// Asks Graph for `key` now, as a `no-cache` request would (joining a call already in
    /// progress for it), and stores the answer: a change notification named it.
    pub async fn refresh_now(self: &Arc<Self>, key: &SessionKey) -> Result<(), Arc<UpstreamError>> {
        match self.join_or_start(key, Mode::Revalidate) {
            Joined::Ready(_) => Ok(()),
            Joined::Call { call, .. } => call.await.map(drop),
        }
    }

    /// Whether `key` (this API version) is in memory.
    pub fn is_cached(&self, key: &SessionKey) -> bool {
        self.memory.get(key).is_some()
    }

    /// The API versions of `key` in this replica's memory.
    pub fn cached_versions(&self, key: &SessionKey) -> Vec<SessionKey> {
        [
            crate::config::ApiVersion::V1,
            crate::config::ApiVersion::Beta,
        ]
        .into_iter()
        .map(|v| key.clone().with_version(v))
        .filter(|k| self.is_cached(k))
        .collect()
    }

    /// Ends the freshness of `key`'s entries (every version) without dropping them: the
    /// next read asks Graph, and the old answer still stands in if Graph fails.
    pub fn expire(&self, key: &SessionKey) -> usize {
        let now = self.clock.now();
        self.memory.rewrite_event(key.kind, &key.event, |k, entry| {
            (k.session == key.session && entry.fresh_until > now).then(|| entry.expired_at(now))
        })
    }

    /// A webinar's subscription lapsed: its entries fresh by it are fresh by `cache.ttl`
    /// (from when they were stored) again. Returns how many.
    pub fn unpush_event(&self, kind: Kind, event: &str) -> usize {
        self.memory.rewrite_event(kind, event, |key, entry| {
            entry
                .push
                .then(|| entry.unpushed(&self.settings, key.is_list()))
        })
    }

    /// The gate in front of the origin (for the admin's view of it).
    pub fn gate(&self) -> &Gate {
        self.origin.gate()
    }

    /// Entries and weighted bytes (after pending maintenance).
    pub fn usage(&self) -> (u64, u64) {
        self.memory.usage()
    }
}

/// The cache against a fake [`Origin`]: no sockets, tokio's paused clock.
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use bytes::Bytes;
    use futures::future::BoxFuture;

    use crate::upstream::graph::{Fetched, GraphAnswer};

    /// Counts calls, answers after `delay`, fails while `fail` is set; call `n` answers
    /// `{"n":n}`.
    struct FakeOrigin {
        calls: AtomicUsize,
        delay: Duration,
        fail: AtomicBool,
        gate: Gate,
    }

    impl Origin for FakeOrigin {
        fn fetch<'a>(
            &'a self,
            _key: &'a SessionKey,
            _deadline: Instant,
        ) -> BoxFuture<'a, Result<GraphAnswer, UpstreamError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(UpstreamError::Status {
                        status: 503,
                        code: "unavailable".into(),
                    });
                }
                let body = Bytes::from(format!("{{\"n\":{n}}}"));
                Ok(GraphAnswer {
                    fetched: Fetched::Found {
                        session: body.clone(),
                        raw: body,
                    },
                    graph_request_id: None,
                })
            })
        }

        fn gate(&self) -> &Gate {
            &self.gate
        }
    }

    const DELAY: Duration = Duration::from_millis(100);

    fn cache_with(fail: bool) -> (Arc<SessionCache>, Arc<FakeOrigin>) {
        let origin = Arc::new(FakeOrigin {
            calls: AtomicUsize::new(0),
            delay: DELAY,
            fail: AtomicBool::new(fail),
            gate: Gate::new(0, Duration::from_secs(30), Duration::from_secs(10)),
        });
        let cache = SessionCache::new(
            &CacheSettings::default(),
            origin.clone(),
            Duration::from_secs(10),
            Clock::new(),
            Arc::new(Metrics::new()),
            None,
        );
        (cache, origin)
    }

    fn key() -> SessionKey {
        SessionKey::new(Kind::Webinars, "e1", "s1").unwrap()
    }

    fn calls(origin: &FakeOrigin) -> usize {
        origin.calls.load(Ordering::SeqCst)
    }

    /// Lets spawned tasks run until they wait on the (paused) clock.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_make_one_origin_call() {
        let (cache, origin) = cache_with(false);
        let gets: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&key(), Directives::default()).await })
            })
            .collect();
        let mut lookups = Vec::new();
        for get in gets {
            lookups.push(get.await.unwrap().unwrap());
        }
        assert_eq!(calls(&origin), 1);
        let first = &lookups[0].entry;
        assert!(lookups.iter().all(|l| Arc::ptr_eq(&l.entry, first)));
        let started = lookups
            .iter()
            .filter(|l| l.outcome == Outcome::Miss)
            .count();
        let joined = lookups
            .iter()
            .filter(|l| l.outcome == Outcome::Collapsed)
            .count();
        assert_eq!((started, joined), (1, 99));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_caller_going_away_does_not_cancel_the_call() {
        let (cache, origin) = cache_with(false);
        let first = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&key(), Directives::default()).await })
        };
        settle().await;
        assert_eq!(calls(&origin), 1, "the first caller started the call");
        first.abort();
        let others: Vec<_> = (0..5)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&key(), Directives::default()).await })
            })
            .collect();
        let mut entries = Vec::new();
        for other in others {
            let lookup = other.await.unwrap().unwrap();
            assert_eq!(lookup.outcome, Outcome::Collapsed);
            entries.push(lookup.entry);
        }
        assert_eq!(calls(&origin), 1);
        assert!(entries.iter().all(|e| Arc::ptr_eq(e, &entries[0])));
        assert_eq!(entries[0].body_bytes(), Some(&b"{\"n\":1}"[..]));
        let later = cache.get(&key(), Directives::default()).await.unwrap();
        assert_eq!(later.outcome, Outcome::Hit);
        assert_eq!(calls(&origin), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_remembered_for_failure_ttl() {
        let (cache, origin) = cache_with(true);
        let failure_ttl = CacheSettings::default().failure_ttl;
        let first = cache.get(&key(), Directives::default()).await;
        assert!(matches!(first, Err(CacheError::Upstream(_))), "{first:?}");
        assert_eq!(calls(&origin), 1);
        // Within failure_ttl (counted from the failure): the same error, Graph not asked.
        tokio::time::advance(failure_ttl - Duration::from_millis(1)).await;
        let again = cache.get(&key(), Directives::default()).await;
        assert!(matches!(again, Err(CacheError::Upstream(_))), "{again:?}");
        assert_eq!(calls(&origin), 1);
        // Past it: a new call (which succeeds now).
        origin.fail.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_millis(2)).await;
        let after = cache.get(&key(), Directives::default()).await.unwrap();
        assert_eq!(after.outcome, Outcome::Miss);
        assert_eq!(calls(&origin), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_entry_is_served_at_once_and_refreshed_once() {
        let (cache, origin) = cache_with(false);
        let settings = CacheSettings::default();
        let first = cache.get(&key(), Directives::default()).await.unwrap();
        // Past freshness, within stale_while_revalidate.
        tokio::time::advance(settings.ttl + settings.stale_while_revalidate / 2).await;
        let asked = Instant::now();
        for _ in 0..3 {
            let stale = cache.get(&key(), Directives::default()).await.unwrap();
            assert_eq!(stale.outcome, Outcome::StaleWhileRevalidate);
            assert!(Arc::ptr_eq(&stale.entry, &first.entry));
        }
        assert_eq!(Instant::now(), asked, "served without waiting for Graph");
        settle().await;
        tokio::time::advance(DELAY).await;
        settle().await;
        assert_eq!(
            calls(&origin),
            2,
            "one background call for three stale reads"
        );
        let fresh = cache.get(&key(), Directives::default()).await.unwrap();
        assert_eq!(fresh.outcome, Outcome::Hit);
        assert_eq!(fresh.entry.body_bytes(), Some(&b"{\"n\":2}"[..]));
        assert_eq!(calls(&origin), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_entry_stands_in_for_an_error_within_stale_if_error() {
        let (cache, origin) = cache_with(false);
        let settings = CacheSettings::default();
        let first = cache.get(&key(), Directives::default()).await.unwrap();
        origin.fail.store(true, Ordering::SeqCst);
        // Past both freshness and stale_while_revalidate: Graph is asked, and fails.
        let past_revalidate = settings.ttl + settings.stale_while_revalidate;
        tokio::time::advance(past_revalidate + Duration::from_secs(1)).await;
        let served = cache.get(&key(), Directives::default()).await.unwrap();
        assert_eq!(served.outcome, Outcome::StaleIfError);
        assert!(Arc::ptr_eq(&served.entry, &first.entry));
        assert_eq!(calls(&origin), 2);
        // Past stale_if_error: the error.
        tokio::time::advance(settings.stale_if_error).await;
        let failed = cache.get(&key(), Directives::default()).await;
        assert!(matches!(failed, Err(CacheError::Upstream(_))), "{failed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn only_if_cached_never_asks_the_origin() {
        let (cache, origin) = cache_with(false);
        let only = Directives {
            only_if_cached: true,
            ..Directives::default()
        };
        let miss = cache.get(&key(), only).await;
        assert!(matches!(miss, Err(CacheError::NotCached)), "{miss:?}");
        assert_eq!(calls(&origin), 0);
        cache.get(&key(), Directives::default()).await.unwrap();
        let hit = cache.get(&key(), only).await.unwrap();
        assert_eq!(hit.outcome, Outcome::Hit);
        assert_eq!(calls(&origin), 1);
    }
}
