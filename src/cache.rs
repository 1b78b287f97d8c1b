//! [`SessionCache`]: Graph answers in memory, with freshness judged by our own clock.
//!
//! moka holds the entries and bounds them by bytes (a weigher over body + key); each entry
//! lives in moka for as long as it could still be served (`ttl` plus the stale windows,
//! or `negative_ttl` for a 404). Whether an entry is *fresh* is decided here from its
//! `stored_at`, because moka has no notion of stale reads and its clock cannot be moved by
//! tests.
//!
//! Misses are single-flight: the first caller for a key spawns the Graph call as its own
//! task and publishes a shared future in `inflight`; everyone else for that key awaits the
//! same future. Because the call is a spawned task, the caller that started it may
//! disconnect without cancelling it: the answer is still stored for the next request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::CacheSettings;
use crate::error::ProxyError;
use crate::graph::{Fetched, GraphAnswer, GraphClient};
use crate::routes::SessionKey;

/// Rough per-entry bookkeeping (moka node, Arc, headers) added to the weigher's count.
const ENTRY_OVERHEAD: usize = 256;

/// One cached Graph answer.
#[derive(Debug)]
pub struct Entry {
    /// The session JSON; `None` when Graph said 404.
    pub body: Option<Bytes>,
    /// Strong validator derived from the body.
    pub etag: HeaderValue,
    /// When Graph answered (the proxy's clock).
    pub stored_at: Instant,
    /// Fresh until then.
    pub fresh_until: Instant,
    /// May still be served while Graph fails until then.
    pub stale_until: Instant,
    pub graph_request_id: Option<HeaderValue>,
}

impl Entry {
    fn new(answer: GraphAnswer, now: Instant, settings: &CacheSettings) -> Entry {
        let (body, fresh_for, stale_for) = match answer.fetched {
            Fetched::Found(body) => (Some(body), settings.ttl, settings.stale_if_error),
            Fetched::NotFound => (None, settings.negative_ttl, Duration::ZERO),
        };
        let etag = etag_of(body.as_deref().unwrap_or(b""));
        Entry {
            body,
            etag,
            stored_at: now,
            fresh_until: now + fresh_for,
            stale_until: now + fresh_for + stale_for,
            graph_request_id: answer
                .graph_request_id
                .and_then(|id| HeaderValue::from_str(&id).ok()),
        }
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
            + key.session.len()
            + self.body.as_ref().map_or(0, Bytes::len)
            + self.graph_request_id.as_ref().map_or(0, HeaderValue::len)
            + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

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
    /// Fresh entry, Graph not contacted.
    Hit,
    /// This request started the Graph call.
    Miss,
    /// This request waited on a Graph call another request started.
    Collapsed,
    /// `Cache-Control: no-cache`: a fresh entry was not used; Graph was asked.
    Revalidated,
    /// Graph failed; a stale entry within `stale_if_error` was served instead.
    StaleIfError,
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
}

type FetchResult = Result<Arc<Entry>, Arc<ProxyError>>;

pub struct SessionCache {
    store: moka::sync::Cache<SessionKey, Arc<Entry>>,
    /// Graph calls in progress, one per key; removed by the call's task when it ends.
    inflight: Mutex<HashMap<SessionKey, Shared<BoxFuture<'static, FetchResult>>>>,
    graph: Arc<GraphClient>,
    settings: CacheSettings,
    /// Upper bound for one shared Graph call.
    fetch_timeout: Duration,
    clock: Clock,
}

/// Keeps each entry in moka for as long as it may be served (fresh or stale).
struct KeepWhileServable {
    stale_if_error: Duration,
    ttl: Duration,
    negative_ttl: Duration,
}

impl moka::Expiry<SessionKey, Arc<Entry>> for KeepWhileServable {
    fn expire_after_create(
        &self,
        _key: &SessionKey,
        entry: &Arc<Entry>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(match entry.body {
            Some(_) => self.ttl + self.stale_if_error,
            None => self.negative_ttl,
        })
    }

    fn expire_after_update(
        &self,
        key: &SessionKey,
        entry: &Arc<Entry>,
        now: std::time::Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, entry, now)
    }
}

impl SessionCache {
    pub fn new(
        settings: &CacheSettings,
        graph: Arc<GraphClient>,
        fetch_timeout: Duration,
        clock: Clock,
    ) -> Arc<SessionCache> {
        let store = moka::sync::Cache::builder()
            .max_capacity(settings.max_bytes.as_u64())
            .weigher(|key: &SessionKey, entry: &Arc<Entry>| entry.weight(key))
            .expire_after(KeepWhileServable {
                stale_if_error: settings.stale_if_error,
                ttl: settings.ttl,
                negative_ttl: settings.negative_ttl,
            })
            .build();
        Arc::new(SessionCache {
            store,
            inflight: Mutex::new(HashMap::new()),
            graph,
            settings: settings.clone(),
            fetch_timeout,
            clock,
        })
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The session for `key`: from memory when fresh, else from Graph (shared call).
    pub async fn get(
        self: &Arc<Self>,
        key: &SessionKey,
        directives: Directives,
    ) -> Result<Lookup, Arc<ProxyError>> {
        let cached = self.store.get(key);
        let now = self.clock.now();
        if let Some(entry) = &cached {
            if entry.is_fresh(now) && (!directives.no_cache || directives.only_if_cached) {
                return Ok(Lookup {
                    entry: entry.clone(),
                    outcome: Outcome::Hit,
                });
            }
        }
        if directives.only_if_cached {
            return match cached {
                Some(entry) if now < entry.stale_until => Ok(Lookup {
                    entry,
                    outcome: Outcome::StaleIfError,
                }),
                _ => Err(Arc::new(ProxyError::NotCached)),
            };
        }
        let (call, started) = match self.join_or_start(key, directives.no_cache) {
            Joined::Fresh(entry) => {
                return Ok(Lookup {
                    entry,
                    outcome: Outcome::Hit,
                })
            }
            Joined::Call(call, started) => (call, started),
        };
        match call.await {
            Ok(entry) => {
                let outcome = match (started, directives.no_cache) {
                    (true, true) => Outcome::Revalidated,
                    (true, false) => Outcome::Miss,
                    (false, _) => Outcome::Collapsed,
                };
                Ok(Lookup { entry, outcome })
            }
            Err(error) => {
                // Graph or the token endpoint failed: a stale entry beats an error.
                let now = self.clock.now();
                match self.store.get(key) {
                    Some(entry) if entry.body.is_some() && now < entry.stale_until => {
                        tracing::warn!(%key, error = %error, "serving stale entry while Graph fails");
                        Ok(Lookup {
                            entry,
                            outcome: Outcome::StaleIfError,
                        })
                    }
                    _ => Err(error),
                }
            }
        }
    }

    /// Joins the Graph call in progress for `key`, or starts one.
    fn join_or_start(self: &Arc<Self>, key: &SessionKey, no_cache: bool) -> Joined {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(call) = inflight.get(key) {
            return Joined::Call(call.clone(), false);
        }
        // A call may have finished between our cache read and taking this lock.
        if !no_cache {
            if let Some(entry) = self.store.get(key).filter(|e| e.is_fresh(self.clock.now())) {
                return Joined::Fresh(entry);
            }
        }
        let this = Arc::clone(self);
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + this.fetch_timeout;
            let result = match this.graph.fetch(&task_key, deadline).await {
                Ok(answer) => {
                    let entry = Arc::new(Entry::new(answer, this.clock.now(), &this.settings));
                    this.store.insert(task_key.clone(), entry.clone());
                    Ok(entry)
                }
                Err(e) => Err(Arc::new(e)),
            };
            // Stored (or failed) before leaving `inflight`, so a later caller either
            // finds the entry or starts a new call; never neither.
            this.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&task_key);
            result
        });
        let call = async move {
            task.await
                .unwrap_or_else(|_| Err(Arc::new(ProxyError::Internal("Graph call task failed"))))
        }
        .boxed()
        .shared();
        inflight.insert(key.clone(), call.clone());
        Joined::Call(call, true)
    }

    /// Drops one key. Returns whether it was cached.
    pub fn purge(&self, key: &SessionKey) -> bool {
        self.store.remove(key).is_some()
    }

    /// Drops everything.
    pub fn purge_all(&self) {
        self.store.invalidate_all();
    }

    /// Entries and weighted bytes (after pending maintenance).
    pub fn usage(&self) -> (u64, u64) {
        self.store.run_pending_tasks();
        (self.store.entry_count(), self.store.weighted_size())
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

    #[tokio::test(start_paused = true)]
    async fn freshness_and_ttl_follow_the_clock() {
        let settings = CacheSettings::default();
        let now = Instant::now();
        let entry = Entry::new(
            GraphAnswer {
                fetched: Fetched::Found(Bytes::from_static(b"{}")),
                graph_request_id: Some("r".into()),
                status: 200,
            },
            now,
            &settings,
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
