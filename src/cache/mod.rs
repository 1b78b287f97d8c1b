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
//! Misses are single-flight: the first caller for a key spawns the Graph call as its own
//! task and publishes a shared future in `inflight`; everyone else for that key awaits the
//! same future. Because the call is a spawned task, the caller that started it may
//! disconnect without cancelling it: the answer is still stored for the next request.
//! Background refreshes, revalidations (`no-cache`) and misses all go through the same
//! single flight. A failed call is remembered for `failure_ttl`, so the next burst gets
//! the same error (or a stale entry) without calling a failing Graph again.

pub mod origin;
pub mod tier2;

pub use origin::Origin;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::cache::tier2::{Holder, LookMode, Purge, SharedGate, SharedTier, Unavailable};
use crate::config::{ApiVersion, CacheSettings};
use crate::core::clock::Clock;
use crate::core::model::{Kind, SessionKey};
use crate::core::request_id;
use crate::telemetry::{names, Metrics};
use crate::upstream::error::UpstreamError;
use crate::upstream::gate::Gate;
use crate::upstream::graph::{Fetched, GraphAnswer};

/// Rough per-entry bookkeeping (moka node, Arc, headers) added to the weigher's count.
const ENTRY_OVERHEAD: usize = 256;

/// One cached Graph answer.
#[derive(Debug)]
pub struct Entry {
    /// The session JSON; `None` when Graph said 404.
    pub body: Option<Bytes>,
    /// Strong validator derived from the body.
    pub etag: HeaderValue,
    /// Graph's body exactly as sent (for the Graph-compatible routes) and its validator.
    pub raw: Bytes,
    pub raw_etag: HeaderValue,
    /// When Graph answered (the proxy's clock).
    pub stored_at: Instant,
    /// Fresh until then.
    pub fresh_until: Instant,
    /// Served stale (with a background refresh) without waiting, until then.
    pub revalidate_until: Instant,
    /// May still be served while Graph fails until then.
    pub stale_until: Instant,
    /// From then on a read triggers a background refresh while the entry is still fresh.
    pub refresh_from: Instant,
    pub graph_request_id: Option<HeaderValue>,
    /// Loaded from the shared tier (Redis) rather than from Graph by this replica.
    pub tier2: bool,
}

/// An `endDateTime` further back than this marks a session as over (for `smart_ttl`).
const ENDED_AFTER: Duration = Duration::from_secs(3600);

impl Entry {
    fn new(answer: GraphAnswer, now: Instant, settings: &CacheSettings, list: bool) -> Entry {
        let (body, raw, fresh_for, stale_for) = match answer.fetched {
            Fetched::Found { session, raw } => {
                let fresh_for = if list {
                    settings.list_ttl
                } else if settings.smart_ttl
                    && ended_long_ago(&session, std::time::SystemTime::now())
                {
                    settings.ttl_ended.max(settings.ttl)
                } else {
                    settings.ttl
                };
                (Some(session), raw, fresh_for, settings.stale_if_error)
            }
            Fetched::NotFound => (None, Bytes::new(), settings.negative_ttl, Duration::ZERO),
        };
        let etag = etag_of(body.as_deref().unwrap_or(b""));
        // Unwrapped or not, the session shares `raw`'s memory; only its validator differs.
        let raw_etag = if raw.len() == body.as_ref().map_or(0, Bytes::len) {
            etag.clone()
        } else {
            etag_of(&raw)
        };
        let fresh_until = now + fresh_for;
        Entry {
            body,
            raw,
            raw_etag,
            etag,
            stored_at: now,
            fresh_until,
            revalidate_until: fresh_until + settings.stale_while_revalidate,
            stale_until: fresh_until + stale_for,
            refresh_from: fresh_until - fresh_for.mul_f64(settings.refresh_ahead),
            graph_request_id: answer
                .graph_request_id
                .and_then(|id| HeaderValue::from_str(&id).ok()),
            tier2: false,
        }
    }

    /// The entry as stored in the shared tier: a JSON header line with its freshness as
    /// wall-clock times, then Graph's bytes. `None` when the session is not a slice of
    /// Graph's body (never the case for what [`Entry::new`] builds).
    /// `writer`: the fencing token of the lock this entry was fetched under.
    pub fn to_shared(&self, clock: &Clock, writer: Option<&str>) -> Option<Vec<u8>> {
        let now = clock.now();
        let stored_ms = clock
            .wall_ms()
            .saturating_sub(now.saturating_duration_since(self.stored_at).as_millis() as u64);
        let offset = |t: Instant| t.saturating_duration_since(self.stored_at).as_millis() as u64;
        let session = match &self.body {
            None => None,
            Some(body) => {
                let start = (body.as_ptr() as usize).checked_sub(self.raw.as_ptr() as usize)?;
                if start + body.len() > self.raw.len() {
                    return None;
                }
                Some([start, body.len()])
            }
        };
        let header = SharedHeader {
            v: 1,
            stored_ms,
            fresh_ms: offset(self.fresh_until),
            revalidate_ms: offset(self.revalidate_until),
            stale_ms: offset(self.stale_until),
            refresh_ms: offset(self.refresh_from),
            session,
            graph_request_id: self
                .graph_request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            etags: self
                .etag
                .to_str()
                .ok()
                .zip(self.raw_etag.to_str().ok())
                .map(|(a, b)| [a.to_string(), b.to_string()]),
            writer: writer.map(str::to_string),
        };
        let mut out = serde_json::to_vec(&header).ok()?;
        out.push(b'\n');
        out.extend_from_slice(&self.raw);
        Some(out)
    }

    /// An entry read back from the shared tier, its instants on this replica's clock, and
    /// the token of the lock it was fetched under. `None` for anything malformed or
    /// implausible (windows out of order or longer than this configuration could make,
    /// stored far in the future): the tier is then treated as a miss.
    pub fn from_shared(
        record: &Bytes,
        clock: &Clock,
        settings: &CacheSettings,
    ) -> Option<(Entry, Option<String>)> {
        let split = record.iter().position(|b| *b == b'\n')?;
        let header: SharedHeader = serde_json::from_slice(&record[..split]).ok()?;
        let longest = settings
            .ttl
            .max(settings.ttl_ended)
            .max(settings.list_ttl)
            .max(settings.negative_ttl)
            + settings.stale_while_revalidate.max(settings.stale_if_error);
        let plausible = header.v == 1
            && header.refresh_ms <= header.fresh_ms
            && header.fresh_ms <= header.revalidate_ms
            && header.fresh_ms <= header.stale_ms
            && u128::from(header.revalidate_ms.max(header.stale_ms)) <= longest.as_millis()
            && header.stored_ms <= clock.wall_ms().saturating_add(CLOCK_TOLERANCE_MS);
        if !plausible {
            return None;
        }
        let raw = record.slice(split + 1..);
        let body = match header.session {
            Some([start, len]) if start.checked_add(len)? <= raw.len() => {
                Some(raw.slice(start..start + len))
            }
            Some(_) => return None,
            None => None,
        };
        let now = clock.now();
        let age = Duration::from_millis(clock.wall_ms().saturating_sub(header.stored_ms));
        let stored_at = now.checked_sub(age).unwrap_or(now);
        let at = |ms: u64| stored_at + Duration::from_millis(ms);
        // The validators as the storing replica computed them (no hashing on this path).
        let (etag, raw_etag) = match header.etags.as_ref().and_then(|[a, b]| {
            Some((
                HeaderValue::from_str(a).ok()?,
                HeaderValue::from_str(b).ok()?,
            ))
        }) {
            Some(etags) => etags,
            None => {
                let etag = etag_of(body.as_deref().unwrap_or(b""));
                let raw_etag = if raw.len() == body.as_ref().map_or(0, Bytes::len) {
                    etag.clone()
                } else {
                    etag_of(&raw)
                };
                (etag, raw_etag)
            }
        };
        let writer = header.writer;
        let entry = Entry {
            body,
            etag,
            raw,
            raw_etag,
            stored_at,
            fresh_until: at(header.fresh_ms),
            revalidate_until: at(header.revalidate_ms),
            stale_until: at(header.stale_ms),
            refresh_from: at(header.refresh_ms),
            // Another replica (or whoever can write to Redis) wrote it: held to the same
            // rule as Graph's own header.
            graph_request_id: header
                .graph_request_id
                .filter(|id| request_id::is_usable(id.as_bytes()))
                .and_then(|id| HeaderValue::from_str(&id).ok()),
            tier2: true,
        };
        Some((entry, writer))
    }

    /// How long moka keeps the entry: until neither stale window can use it.
    fn keep_for(&self) -> Duration {
        self.revalidate_until.max(self.stale_until) - self.stored_at
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    /// Whole seconds since Graph answered.
    pub fn age(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.stored_at).as_secs()
    }

    /// Whole seconds of freshness left (RFC 9211 `ttl`), negative once stale.
    /// Computed from whole seconds of freshness and of age, so that `Age + ttl` always adds
    /// up to the entry's freshness lifetime.
    pub fn ttl(&self, now: Instant) -> i64 {
        let lifetime = (self.fresh_until - self.stored_at).as_secs();
        lifetime as i64 - self.age(now) as i64
    }

    fn weight(&self, key: &SessionKey) -> u32 {
        let bytes = key.event.len()
            + key.session.as_ref().map_or(0, |s| s.len())
            + self.raw.len()
            + self.graph_request_id.as_ref().map_or(0, HeaderValue::len)
            + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// The header line of an entry in the shared tier; times in ms (wall clock for
/// `stored_ms`, offsets from it for the rest).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SharedHeader {
    v: u8,
    stored_ms: u64,
    fresh_ms: u64,
    revalidate_ms: u64,
    stale_ms: u64,
    refresh_ms: u64,
    /// Where the session lies in Graph's body (start, length); absent for a 404.
    session: Option<[usize; 2]>,
    graph_request_id: Option<String>,
    /// `ETag` of the session and of Graph's body.
    #[serde(default)]
    etags: Option<[String; 2]>,
    /// Fencing token of the lock the entry was fetched under.
    #[serde(default)]
    writer: Option<String>,
}

/// How far in the future a shared entry's `stored_ms` may lie (clocks of replicas differ a
/// little even with NTP) before the entry is taken for garbage.
const CLOCK_TOLERANCE_MS: u64 = 60_000;

/// `"<32 hex digits of SHA-256>"`.
pub fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let tag = format!("\"{}\"", hex::encode(&digest[..16]));
    // ok: quotes and hex digits are always a valid header value.
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// How a lookup was answered; becomes `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fresh entry, Graph not contacted (perhaps a background refresh started).
    Hit,
    /// Stale entry within `stale_while_revalidate`, served at once; a background refresh runs.
    StaleWhileRevalidate,
    /// Stale entry the caller accepted with `Cache-Control: max-stale`; a background refresh runs.
    MaxStale,
    /// This request started the Graph call.
    Miss,
    /// This request waited on a Graph call another request started.
    Collapsed,
    /// `Cache-Control: no-cache`: a fresh entry was not used; Graph was asked.
    Revalidated,
    /// Graph failed; a stale entry within `stale_if_error` was served instead.
    StaleIfError,
    /// Not in this replica's memory, fresh in the shared tier (Redis): Graph not contacted.
    Tier2,
}

/// Why a shared call is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing servable here.
    Miss,
    /// A background refresh (refresh-ahead or stale-while-revalidate).
    Refresh,
    /// `Cache-Control: no-cache`: Graph must be asked (or an answer newer than the request).
    Revalidate,
}

/// A lookup's answer.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub entry: Arc<Entry>,
    pub outcome: Outcome,
}

/// Request directives that change how the cache is used.
#[derive(Debug, Clone, Copy, Default)]
pub struct Directives {
    /// `Cache-Control: no-cache`: revalidate with Graph even when fresh.
    pub no_cache: bool,
    /// `Cache-Control: only-if-cached`: never contact Graph.
    pub only_if_cached: bool,
    /// `Cache-Control: max-stale[=N]`: a stale entry up to N seconds past its freshness
    /// (any, without N) is acceptable; bounded by `stale_if_error`.
    pub max_stale: Option<Duration>,
}

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

pub struct SessionCache {
    store: moka::sync::Cache<SessionKey, Arc<Entry>>,
    /// Graph calls in progress, one per key; removed by the call's task when it ends.
    inflight: Mutex<HashMap<SessionKey, Shared<BoxFuture<'static, FetchResult>>>>,
    /// Recent failures per key and until when they stand (`failure_ttl`).
    failures: moka::sync::Cache<SessionKey, (Arc<UpstreamError>, Instant)>,
    origin: Arc<dyn Origin>,
    settings: CacheSettings,
    /// Upper bound for one shared Graph call.
    fetch_timeout: Duration,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Redis, when `[cache.shared]` is configured.
    shared: Option<Arc<SharedTier>>,
    /// Bumped by every purge: a Graph answer to a call that began before a purge is
    /// returned to its callers but not stored.
    purges: AtomicU64,
}

/// How often a replica waiting for another's Graph call looks for its answer.
const SHARED_POLL: Duration = Duration::from_millis(20);

/// Keeps each entry in moka for as long as it may be served (fresh or stale).
struct KeepWhileServable;

impl moka::Expiry<SessionKey, Arc<Entry>> for KeepWhileServable {
    fn expire_after_create(
        &self,
        _key: &SessionKey,
        entry: &Arc<Entry>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.keep_for())
    }

    fn expire_after_update(
        &self,
        _key: &SessionKey,
        entry: &Arc<Entry>,
        _now: std::time::Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.keep_for())
    }
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
        let evictions = metrics.clone();
        let store = moka::sync::Cache::builder()
            .max_capacity(settings.max_bytes.as_u64())
            .weigher(|key: &SessionKey, entry: &Arc<Entry>| entry.weight(key))
            .expire_after(KeepWhileServable)
            .eviction_listener(move |_key, _entry, cause| {
                let cause = match cause {
                    moka::notification::RemovalCause::Expired => "expired",
                    moka::notification::RemovalCause::Explicit => "purged",
                    moka::notification::RemovalCause::Replaced => "replaced",
                    moka::notification::RemovalCause::Size => "size",
                };
                evictions
                    .counter(names::CACHE_EVICTIONS, &[("cause", cause)])
                    .increment(1);
            })
            .build();
        // Real-time expiry bounds memory; whether a failure still stands is judged by our clock.
        let failures = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(settings.failure_ttl.max(Duration::from_millis(1)))
            .build();
        Arc::new(SessionCache {
            store,
            inflight: Mutex::new(HashMap::new()),
            failures,
            origin,
            settings: settings.clone(),
            fetch_timeout,
            clock,
            metrics,
            shared,
            purges: AtomicU64::new(0),
        })
    }

    fn purge_count(&self) -> u64 {
        self.purges.load(Ordering::SeqCst)
    }

    fn count_purge(&self) {
        self.purges.fetch_add(1, Ordering::SeqCst);
    }

    /// The shared tier, when configured.
    pub fn shared(&self) -> Option<&Arc<SharedTier>> {
        self.shared.as_ref()
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The session for `key`: from memory when fresh (or acceptably stale), else from
    /// Graph through the key's shared call, else a stale entry, else the error.
    pub async fn get(
        self: &Arc<Self>,
        key: &SessionKey,
        directives: Directives,
    ) -> Result<Lookup, CacheError> {
        let now = self.clock.now();
        let cached = self.store.get(key);
        if let Some(entry) = &cached {
            if let Some(outcome) = self.servable(entry, now, directives) {
                if outcome != Outcome::Hit || now >= entry.refresh_from {
                    self.refresh_in_background(key);
                }
                return Ok(Lookup {
                    entry: entry.clone(),
                    outcome,
                });
            }
        }
        if directives.only_if_cached {
            return Err(CacheError::NotCached);
        }
        let result = match self.recent_failure(key, now) {
            Some(error) => Err(error),
            None => match self.join_or_start(
                key,
                if directives.no_cache {
                    Mode::Revalidate
                } else {
                    Mode::Miss
                },
            ) {
                Joined::Fresh(entry) => Ok(Lookup {
                    entry,
                    outcome: Outcome::Hit,
                }),
                Joined::Call(call, started) => {
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
        self.store
            .get(key)
            .filter(|entry| entry.body.is_some() && now < entry.stale_until)
            .map(|entry| Lookup {
                entry,
                outcome: Outcome::StaleIfError,
            })
    }

    /// How `entry` may answer without waiting for Graph, if at all.
    fn servable(&self, entry: &Entry, now: Instant, directives: Directives) -> Option<Outcome> {
        if entry.is_fresh(now) && (!directives.no_cache || directives.only_if_cached) {
            return Some(Outcome::Hit);
        }
        if directives.no_cache {
            return None;
        }
        if let Some(max_stale) = directives.max_stale {
            let limit = max_stale.min(self.settings.stale_if_error);
            if entry.body.is_some() && now <= entry.fresh_until + limit {
                return Some(Outcome::MaxStale);
            }
        }
        if now < entry.revalidate_until && !directives.only_if_cached {
            return Some(Outcome::StaleWhileRevalidate);
        }
        None
    }

    fn recent_failure(&self, key: &SessionKey, now: Instant) -> Option<Arc<UpstreamError>> {
        self.failures
            .get(key)
            .filter(|(_, until)| now < *until)
            .map(|(error, _)| error)
    }

    /// Starts (or joins) a refresh of `key` that nobody waits for.
    fn refresh_in_background(self: &Arc<Self>, key: &SessionKey) {
        if self.recent_failure(key, self.clock.now()).is_some() {
            return;
        }
        // The shared call runs as its own task: dropping our handle does not cancel it.
        drop(self.join_or_start(key, Mode::Refresh));
    }

    /// Joins the Graph call in progress for `key`, or starts one.
    /// Except for a miss, a fresh entry does not stop a new call (refreshes, `no-cache`).
    fn join_or_start(self: &Arc<Self>, key: &SessionKey, mode: Mode) -> Joined {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(call) = inflight.get(key) {
            return Joined::Call(call.clone(), false);
        }
        // A call may have finished between our cache read and taking this lock.
        if mode == Mode::Miss {
            if let Some(entry) = self.store.get(key).filter(|e| e.is_fresh(self.clock.now())) {
                return Joined::Fresh(entry);
            }
        }
        let this = Arc::clone(self);
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + this.fetch_timeout;
            // Leaves `inflight` however the call ends (a panic included), after the answer
            // is stored (or failed), so a later caller either finds the entry or starts a
            // new call; never neither.
            let _leave = LeaveInflight {
                cache: &this,
                key: &task_key,
            };
            match this.shared.clone() {
                Some(shared) => this.load_shared(&shared, &task_key, mode, deadline).await,
                None => this.fetch_from_graph(&task_key, deadline).await,
            }
        });
        let call = async move {
            task.await.unwrap_or_else(|_| {
                Err(Arc::new(UpstreamError::Internal("Graph call task failed")))
            })
        }
        .boxed()
        .shared();
        inflight.insert(key.clone(), call.clone());
        Joined::Call(call, true)
    }

    /// Asks Graph for `key` and stores the answer in memory (or remembers the failure).
    async fn fetch_from_graph(
        self: &Arc<Self>,
        key: &SessionKey,
        deadline: Instant,
    ) -> FetchResult {
        let purges = self.purge_count();
        match self.origin.fetch(key, deadline).await {
            Ok(answer) => {
                let entry = Arc::new(Entry::new(
                    answer,
                    self.clock.now(),
                    &self.settings,
                    key.is_list(),
                ));
                if self.purge_count() == purges {
                    self.store.insert(key.clone(), entry.clone());
                }
                Ok(entry)
            }
            Err(e) => {
                let e = Arc::new(e);
                if !self.settings.failure_ttl.is_zero() {
                    let until = self.clock.now() + self.settings.failure_ttl;
                    self.failures.insert(key.clone(), (e.clone(), until));
                }
                Err(e)
            }
        }
    }

    /// A shared call with the Redis tier. One round trip looks for a usable entry and,
    /// when none is stored and nobody is fetching, takes the key's lock: then this replica
    /// asks Graph (renewing the lock meanwhile) and stores the answer for the others after
    /// answering its own callers. When another replica holds the lock, this one waits for
    /// its entry; if the lock goes without one (too large to share, Graph failed, the
    /// holder died), it asks Graph itself. Whenever Redis fails, it carries on alone.
    async fn load_shared(
        self: &Arc<Self>,
        shared: &Arc<SharedTier>,
        key: &SessionKey,
        mode: Mode,
        deadline: Instant,
    ) -> FetchResult {
        let started_ms = self.clock.wall_ms();
        let first = if mode == Mode::Revalidate {
            LookMode::Revalidate
        } else {
            LookMode::Miss
        };
        let mut look = match shared.lookup(key, first).await {
            Ok(look) => look,
            Err(Unavailable) => {
                self.count_lookup("unavailable");
                return self.fetch_alone(shared, key, deadline).await;
            }
        };
        self.apply_shared_gate(look.gate);
        match look.entry.take() {
            Some(record) => {
                if let Ok(entry) = self.adopt_record(key, &record, mode, started_ms, None) {
                    self.count_lookup("hit");
                    self.release_if_ours(shared, key, &look.holder);
                    return Ok(entry);
                }
                self.count_lookup("stale");
                // Stored but not usable now (stale, or due for a refresh): the script left
                // the lock alone; take it (or learn who has it), and look at the entry
                // again: another replica may have stored a fresh one meanwhile.
                if look.holder == Holder::Nobody {
                    look = match shared.lookup(key, LookMode::Lock).await {
                        Ok(look) => look,
                        Err(Unavailable) => return self.fetch_alone(shared, key, deadline).await,
                    };
                    self.apply_shared_gate(look.gate);
                    if let Some(record) = look.entry.take() {
                        if let Ok(entry) = self.adopt_record(key, &record, mode, started_ms, None) {
                            self.release_if_ours(shared, key, &look.holder);
                            return Ok(entry);
                        }
                    }
                }
            }
            None => self.count_lookup("miss"),
        }
        match look.holder {
            Holder::Us(token) => {
                self.fetch_as_holder(shared, key, &token, &look.generation, deadline)
                    .await
            }
            Holder::Other(holder) => {
                self.count_lookup("waited");
                self.wait_for_holder(shared, key, mode, started_ms, holder, deadline)
                    .await
            }
            Holder::Nobody => self.fetch_alone(shared, key, deadline).await,
        }
    }

    /// Releases, on the side, a lock the lookup took for us but we do not need.
    fn release_if_ours(&self, shared: &Arc<SharedTier>, key: &SessionKey, holder: &Holder) {
        if let Holder::Us(token) = holder {
            let (shared, key, token) = (Arc::clone(shared), key.clone(), token.clone());
            tokio::spawn(async move { shared.unlock(&key, &token).await });
        }
    }

    /// Asks Graph while holding the key's lock (renewed every third of its life, so a slow
    /// Graph does not let another replica in), stores the answer in Redis (so that a
    /// caller of another replica right after ours finds it), or says that none will come,
    /// and releases the lock on the side.
    async fn fetch_as_holder(
        self: &Arc<Self>,
        shared: &Arc<SharedTier>,
        key: &SessionKey,
        token: &str,
        generation: &str,
        deadline: Instant,
    ) -> FetchResult {
        let renewals = async {
            let mut every =
                tokio::time::interval((shared.lock_ttl() / 3).max(Duration::from_millis(10)));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                if !shared.renew(key, token).await {
                    tracing::debug!(%key, "lost the shared lock while fetching");
                }
            }
        };
        // The answer ends the renewals at once, even one waiting on a slow Redis.
        let result = tokio::select! {
            result = self.fetch_from_graph(key, deadline) => result,
            never = renewals => never,
        };
        let shared_answer = match &result {
            Ok(entry) => match entry.to_shared(&self.clock, Some(token)) {
                Some(record) => shared.put(key, &record, entry.keep_for(), generation).await,
                None => {
                    self.metrics
                        .counter(names::SHARED_SKIPPED, &[("reason", "layout")])
                        .increment(1);
                    false
                }
            },
            Err(_) => {
                self.publish_gate(shared).await;
                false
            }
        };
        let (shared, key, token) = (Arc::clone(shared), key.clone(), token.to_string());
        tokio::spawn(async move {
            if !shared_answer {
                shared.mark_unshared(&key).await;
            }
            shared.unlock(&key, &token).await
        });
        result
    }

    /// Asks Graph without the lock (Redis unavailable, or the holder went without sharing
    /// an answer); a gate closed by the answer is published before callers hear of it.
    async fn fetch_alone(
        self: &Arc<Self>,
        shared: &SharedTier,
        key: &SessionKey,
        deadline: Instant,
    ) -> FetchResult {
        let result = self.fetch_from_graph(key, deadline).await;
        if result.is_err() {
            self.publish_gate(shared).await;
        }
        result
    }

    /// Polls Redis while another replica (`holder`) asks Graph, until its entry appears.
    /// When the lock goes without one: if the holder said none will come (too large,
    /// Graph failed), asks Graph itself; if it died, takes part in electing a new holder.
    async fn wait_for_holder(
        self: &Arc<Self>,
        shared: &Arc<SharedTier>,
        key: &SessionKey,
        mode: Mode,
        started_ms: u64,
        mut holder: String,
        deadline: Instant,
    ) -> FetchResult {
        loop {
            if Instant::now() + SHARED_POLL >= deadline {
                return Err(Arc::new(UpstreamError::Timeout));
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 10);
            tokio::time::sleep(SHARED_POLL + jitter).await;
            let mut look = match shared.lookup(key, LookMode::Peek).await {
                Ok(look) => look,
                Err(Unavailable) => return self.fetch_alone(shared, key, deadline).await,
            };
            self.apply_shared_gate(look.gate);
            if let Some(record) = &look.entry {
                if let Ok(entry) = self.adopt_record(key, record, mode, started_ms, Some(&holder)) {
                    return Ok(entry);
                }
            }
            match look.holder {
                Holder::Other(current) => holder = current,
                Holder::Us(_) | Holder::Nobody if look.unshared => {
                    return self.fetch_alone(shared, key, deadline).await
                }
                Holder::Us(_) | Holder::Nobody => {
                    // The holder died (its lock expired): one of the waiters takes over.
                    look = match shared.lookup(key, LookMode::Lock).await {
                        Ok(look) => look,
                        Err(Unavailable) => return self.fetch_alone(shared, key, deadline).await,
                    };
                    match look.holder {
                        Holder::Us(token) => {
                            return self
                                .fetch_as_holder(shared, key, &token, &look.generation, deadline)
                                .await
                        }
                        Holder::Other(current) => holder = current,
                        Holder::Nobody => return self.fetch_alone(shared, key, deadline).await,
                    }
                }
            }
        }
    }

    /// Takes an entry read from the shared tier into memory when it can answer this call;
    /// a stale one is still kept (when memory has nothing) for the stale windows.
    /// `holder`: the lock holder this call waited for (its entry answers a revalidation).
    fn adopt_record(
        &self,
        key: &SessionKey,
        record: &Bytes,
        mode: Mode,
        started_ms: u64,
        holder: Option<&str>,
    ) -> Result<Arc<Entry>, ()> {
        let (entry, writer) = Entry::from_shared(record, &self.clock, &self.settings).ok_or(())?;
        let now = self.clock.now();
        let usable = entry.is_fresh(now)
            && match mode {
                Mode::Miss => true,
                Mode::Refresh => now < entry.refresh_from,
                // Written by the replica we waited for, or at least after we began.
                Mode::Revalidate => {
                    (holder.is_some() && writer.as_deref() == holder) || {
                        let stored_ms = self.clock.wall_ms().saturating_sub(
                            now.saturating_duration_since(entry.stored_at).as_millis() as u64,
                        );
                        stored_ms >= started_ms
                    }
                }
            };
        if usable {
            let entry = Arc::new(entry);
            self.store.insert(key.clone(), entry.clone());
            return Ok(entry);
        }
        if entry.body.is_some() && now < entry.stale_until && self.store.get(key).is_none() {
            let mut entry = entry;
            entry.tier2 = false;
            self.store.insert(key.clone(), Arc::new(entry));
        }
        Err(())
    }

    /// Closes this replica's Graph gate when another replica published a closed one.
    fn apply_shared_gate(&self, gate: Option<SharedGate>) {
        if let Some(gate) = gate {
            self.origin
                .gate()
                .close_for(self.clock.now(), gate.left, gate.throttled);
        }
    }

    /// Publishes this replica's closed Graph gate (429 or open circuit) to the others.
    async fn publish_gate(&self, shared: &SharedTier) {
        if let Some((left, throttled)) = self.origin.gate().closed_for(self.clock.now()) {
            shared.close_gate(left, throttled).await;
        }
    }

    fn count_lookup(&self, result: &'static str) {
        self.metrics
            .counter(names::SHARED_LOOKUPS, &[("result", result)])
            .increment(1);
    }

    /// A purge through the admin API: here at once, then in Redis and, by broadcast, on
    /// every other replica. Returns whether the shared tier took it (`None`: no tier).
    pub async fn purge_everywhere(&self, purge: Purge) -> (usize, bool, Option<bool>) {
        let (removed, was_cached) = self.purge_here(&purge);
        let shared = match &self.shared {
            Some(shared) => Some(shared.purge(&purge).await),
            None => None,
        };
        (removed, was_cached, shared)
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
        }
    }

    /// With a shared tier: follows purges broadcast by other replicas, and publishes this
    /// replica's Graph gate as soon as it closes (a 429 seen here, even while the call
    /// that saw it still waits out `Retry-After`). Never returns without a shared tier.
    pub async fn run_shared_tasks(self: Arc<Self>) {
        let Some(shared) = self.shared.clone() else {
            return std::future::pending().await;
        };
        shared.warm_up().await;
        let cache = self.clone();
        let purges = shared.clone().follow_purges(move |purge| {
            tracing::debug!(?purge, "applying a shared purge");
            cache.purge_here(&purge);
        });
        let mut closures = self.origin.gate().closures();
        let gates = async {
            while closures.changed().await.is_ok() {
                self.publish_gate(&shared).await;
            }
            std::future::pending::<()>().await
        };
        tokio::join!(purges, gates);
    }

    /// Drops one session (or list), in every API version, with any failure remembered for
    /// it. A session's purge also drops its event's list, whose summary of it may have
    /// changed too. Returns whether the session (or list) was cached.
    pub fn purge(&self, key: &SessionKey) -> bool {
        self.count_purge();
        let mut was_cached = false;
        for version in [ApiVersion::V1, ApiVersion::Beta] {
            let key = key.clone().with_version(version);
            self.failures.invalidate(&key);
            was_cached |= self.store.remove(&key).is_some();
            if !key.is_list() {
                let list = SessionKey {
                    session: None,
                    ..key
                };
                self.failures.invalidate(&list);
                self.store.invalidate(&list);
            }
        }
        was_cached
    }

    /// Drops every cached session of one event, and its session list. Returns how many
    /// sessions.
    pub fn purge_event(&self, kind: Kind, event: &str) -> usize {
        self.count_purge();
        let keys: Vec<SessionKey> = self
            .store
            .iter()
            .map(|(key, _)| key)
            .filter(|key| key.kind == kind && &*key.event == event)
            .map(|key| (*key).clone())
            .collect();
        for key in &keys {
            self.failures.invalidate(key);
            self.store.invalidate(key);
        }
        for version in [ApiVersion::V1, ApiVersion::Beta] {
            if let Ok(list) = SessionKey::list(kind, event) {
                self.failures.invalidate(&list.with_version(version));
            }
        }
        keys.iter().filter(|key| !key.is_list()).count()
    }

    /// Drops everything.
    pub fn purge_all(&self) {
        self.count_purge();
        self.failures.invalidate_all();
        self.store.invalidate_all();
    }

    /// The gate in front of the origin (for the admin's view of it).
    pub fn gate(&self) -> &Gate {
        self.origin.gate()
    }

    /// Entries and weighted bytes (after pending maintenance).
    pub fn usage(&self) -> (u64, u64) {
        self.store.run_pending_tasks();
        (self.store.entry_count(), self.store.weighted_size())
    }
}

/// Whether the session's `endDateTime` (a plain RFC 3339 string, or Graph's
/// `{"dateTime", "timeZone": "UTC"}`) lies more than an hour before `now`. Anything else
/// (other time zones, missing, unparsable) counts as not ended.
fn ended_long_ago(body: &[u8], now: std::time::SystemTime) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum When {
        Plain(String),
        Zoned {
            #[serde(rename = "dateTime")]
            date_time: String,
            #[serde(rename = "timeZone")]
            time_zone: Option<String>,
        },
    }
    #[derive(serde::Deserialize)]
    struct Session {
        #[serde(rename = "endDateTime")]
        end: Option<When>,
    }
    let Ok(Session { end: Some(end) }) = serde_json::from_slice::<Session>(body) else {
        return false;
    };
    let parsed = match end {
        When::Plain(text) => humantime::parse_rfc3339_weak(text.trim_end_matches('Z')),
        When::Zoned {
            date_time,
            time_zone,
        } => {
            if !time_zone
                .as_deref()
                .is_none_or(|tz| tz.eq_ignore_ascii_case("UTC"))
            {
                return false;
            }
            humantime::parse_rfc3339_weak(date_time.trim_end_matches('Z'))
        }
    };
    parsed.is_ok_and(|end| end + ENDED_AFTER < now)
}

/// Removes a key's call from `inflight` when dropped.
struct LeaveInflight<'a> {
    cache: &'a SessionCache,
    key: &'a SessionKey,
}

impl Drop for LeaveInflight<'_> {
    fn drop(&mut self) {
        self.cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.key);
    }
}

enum Joined {
    Fresh(Arc<Entry>),
    Call(Shared<BoxFuture<'static, FetchResult>>, bool),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_strong_and_stable() {
        let a = etag_of(b"{\"id\":1}");
        assert_eq!(a, etag_of(b"{\"id\":1}"));
        assert_ne!(a, etag_of(b"{\"id\":2}"));
        let s = a.to_str().unwrap();
        assert!(s.starts_with('"') && s.ends_with('"') && !s.starts_with("W/"));
    }

    #[test]
    fn ended_sessions_are_recognised() {
        let now = humantime::parse_rfc3339("2026-11-29T12:00:00Z").unwrap();
        assert!(ended_long_ago(
            br#"{"endDateTime":"2023-08-09T22:00:00Z"}"#,
            now
        ));
        assert!(ended_long_ago(
            br#"{"endDateTime":{"dateTime":"2026-11-29T10:00:00.0000000","timeZone":"UTC"}}"#,
            now
        ));
        assert!(
            !ended_long_ago(br#"{"endDateTime":"2026-11-29T11:30:00Z"}"#, now),
            "ended 30 minutes ago"
        );
        assert!(
            !ended_long_ago(br#"{"endDateTime":"2026-12-01T10:00:00Z"}"#, now),
            "in the future"
        );
        assert!(!ended_long_ago(
            br#"{"endDateTime":{"dateTime":"2023-01-01T00:00:00","timeZone":"Pacific Standard Time"}}"#,
            now
        ));
        assert!(!ended_long_ago(br#"{"endDateTime":null}"#, now));
        assert!(!ended_long_ago(br#"{"endDateTime":"yesterday"}"#, now));
        assert!(!ended_long_ago(b"{}", now));
    }

    #[tokio::test(start_paused = true)]
    async fn smart_ttl_and_windows() {
        let settings = CacheSettings::default();
        let now = Instant::now();
        let answer = |body: &'static [u8]| GraphAnswer {
            fetched: Fetched::Found {
                session: Bytes::from_static(body),
                raw: Bytes::from_static(body),
            },
            graph_request_id: None,
        };
        let ended = Entry::new(
            answer(br#"{"endDateTime":"2023-08-09T22:00:00Z"}"#),
            now,
            &settings,
            false,
        );
        assert_eq!(ended.fresh_until - now, settings.ttl_ended);
        // A list is never judged by endDateTime, and keeps its own ttl.
        let list = Entry::new(
            answer(br#"{"endDateTime":"2023-08-09T22:00:00Z","value":[]}"#),
            now,
            &settings,
            true,
        );
        assert_eq!(list.fresh_until - now, settings.list_ttl);
        let live = Entry::new(
            answer(br#"{"endDateTime":"2999-01-01T00:00:00Z"}"#),
            now,
            &settings,
            false,
        );
        assert_eq!(live.fresh_until - now, settings.ttl);
        assert_eq!(
            live.refresh_from - now,
            Duration::from_secs(240),
            "last 20% of 5m"
        );
        assert_eq!(
            live.revalidate_until - live.fresh_until,
            settings.stale_while_revalidate
        );
        assert_eq!(live.keep_for(), settings.ttl + settings.stale_if_error);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_survive_the_shared_tier_with_their_age_and_windows() {
        let settings = CacheSettings::default();
        let clock = Clock::new();
        let raw = Bytes::from_static(br#"{"value": {"id":"s1","n":1.50} }"#);
        let session = crate::upstream::graph::unwrap_envelope(raw.clone()).unwrap();
        let entry = Entry::new(
            GraphAnswer {
                fetched: Fetched::Found {
                    session,
                    raw: raw.clone(),
                },
                graph_request_id: Some("rid".into()),
            },
            clock.now(),
            &settings,
            false,
        );
        let record = Bytes::from(entry.to_shared(&clock, Some("token-1")).unwrap());
        clock.advance(Duration::from_secs(100));
        let (back, writer) = Entry::from_shared(&record, &clock, &settings).unwrap();
        assert_eq!(writer.as_deref(), Some("token-1"));
        assert!(back.tier2);
        assert_eq!(back.body.as_deref(), Some(&br#"{"id":"s1","n":1.50}"#[..]));
        assert_eq!(back.raw, raw);
        assert_eq!(back.etag, entry.etag);
        assert_eq!(back.raw_etag, entry.raw_etag);
        let now = clock.now();
        assert_eq!(back.age(now), 100);
        assert_eq!(back.ttl(now), 200);
        assert_eq!(back.keep_for(), entry.keep_for());
        assert_eq!(back.refresh_from - back.stored_at, Duration::from_secs(240));
        assert_eq!(back.graph_request_id.unwrap(), "rid");
        // A 404 round-trips as a 404; garbage is a miss, never a panic.
        let gone = Entry::new(
            GraphAnswer {
                fetched: Fetched::NotFound,
                graph_request_id: None,
            },
            clock.now(),
            &settings,
            false,
        );
        let back = Entry::from_shared(
            &Bytes::from(gone.to_shared(&clock, None).unwrap()),
            &clock,
            &settings,
        );
        assert!(back.unwrap().0.body.is_none());
        let header = |fields: &str| {
            Bytes::from(format!(
                "{{\"v\":1,{fields},\"session\":null,\"graph_request_id\":null}}\n{{}}"
            ))
        };
        let now_ms = clock.wall_ms();
        for garbage in [
            Bytes::new(),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{\"v\":2}\n{}"),
            Bytes::from_static(b"{\"v\":1,\"stored_ms\":0,\"fresh_ms\":0,\"revalidate_ms\":0,\"stale_ms\":0,\"refresh_ms\":0,\"session\":[5,99],\"graph_request_id\":null}\n{}"),
            // Fresh for ever, windows out of order, stored in the future.
            header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":18446744073709551615,\"revalidate_ms\":18446744073709551615,\"stale_ms\":18446744073709551615,\"refresh_ms\":0")),
            header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":1000,\"revalidate_ms\":500,\"stale_ms\":2000,\"refresh_ms\":0")),
            header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":1000,\"revalidate_ms\":2000,\"stale_ms\":2000,\"refresh_ms\":1500")),
            header(&format!("\"stored_ms\":{},\"fresh_ms\":1000,\"revalidate_ms\":2000,\"stale_ms\":2000,\"refresh_ms\":0", now_ms + 3_600_000)),
        ] {
            assert!(Entry::from_shared(&garbage, &clock, &settings).is_none(), "{garbage:?}");
        }
        let sane = header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":1000,\"revalidate_ms\":2000,\"stale_ms\":2000,\"refresh_ms\":800"));
        assert!(Entry::from_shared(&sane, &clock, &settings).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_and_ttl_follow_the_clock() {
        let settings = CacheSettings::default();
        let now = Instant::now();
        let entry = Entry::new(
            GraphAnswer {
                fetched: Fetched::Found {
                    session: Bytes::from_static(b"{}"),
                    raw: Bytes::from_static(b"{}"),
                },
                graph_request_id: Some("r".into()),
            },
            now,
            &settings,
            false,
        );
        assert!(entry.is_fresh(now));
        assert_eq!(entry.ttl(now), 300);
        tokio::time::advance(Duration::from_secs(301)).await;
        let later = Instant::now();
        assert!(!entry.is_fresh(later));
        assert_eq!(entry.ttl(later), -1);
        assert_eq!(entry.age(later), 301);
        assert!(later < entry.stale_until);
    }
}
