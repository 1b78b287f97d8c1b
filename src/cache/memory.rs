//! [`Memory`]: this replica's tier: the moka store of entries (bounded by bytes, each kept
//! while it may be served, evictions counted), the failure memory (a failed Graph call is
//! remembered for `failure_ttl`), and the purge count that keeps answers to calls begun
//! before a purge out of the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::entry::Entry;
use crate::config::{ApiVersion, CacheSettings};
use crate::core::model::{Kind, SessionKey};
use crate::core::remembered::Remembered;
use crate::telemetry::{names, Metrics};
use crate::upstream::error::UpstreamError;

pub(super) struct Memory {
    /// The entries, bounded by bytes; each kept while it may be served.
    store: moka::sync::Cache<SessionKey, Arc<Entry>>,
    /// Recent failures per key and until when they stand (`failure_ttl`).
    failures: moka::sync::Cache<SessionKey, Remembered<Arc<UpstreamError>>>,
    failure_ttl: Duration,
    /// Bumped by every purge: a Graph answer to a call that began before a purge is
    /// returned to its callers but not stored.
    purges: AtomicU64,
}

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

impl Memory {
    pub(super) fn new(settings: &CacheSettings, metrics: Arc<Metrics>) -> Memory {
        let evictions = metrics;
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
        Memory {
            store,
            failures,
            failure_ttl: settings.failure_ttl,
            purges: AtomicU64::new(0),
        }
    }

    pub(super) fn get(&self, key: &SessionKey) -> Option<Arc<Entry>> {
        self.store.get(key)
    }

    pub(super) fn insert(&self, key: SessionKey, entry: Arc<Entry>) {
        self.store.insert(key, entry);
    }

    pub(super) fn purge_count(&self) -> u64 {
        self.purges.load(Ordering::SeqCst)
    }

    fn count_purge(&self) {
        self.purges.fetch_add(1, Ordering::SeqCst);
    }

    /// Stores `entry` unless a purge happened since `purges` was read.
    pub(super) fn insert_unless_purged(&self, key: &SessionKey, entry: Arc<Entry>, purges: u64) {
        if self.purge_count() == purges {
            self.store.insert(key.clone(), entry);
        }
    }

    /// Remembers a failed call for `failure_ttl` (not at all when it is zero).
    pub(super) fn remember_failure(
        &self,
        key: &SessionKey,
        error: Arc<UpstreamError>,
        now: Instant,
    ) {
        if !self.failure_ttl.is_zero() {
            let until = now + self.failure_ttl;
            self.failures
                .insert(key.clone(), Remembered::new(error, until));
        }
    }

    pub(super) fn recent_failure(
        &self,
        key: &SessionKey,
        now: Instant,
    ) -> Option<Arc<UpstreamError>> {
        self.failures
            .get(key)
            .and_then(|failure| failure.standing(now).cloned())
    }

    /// Drops one session (or list), in every API version, with any failure remembered for
    /// it. A session's purge also drops its event's list, whose summary of it may have
    /// changed too. Returns whether the session (or list) was cached.
    pub(super) fn purge(&self, key: &SessionKey) -> bool {
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
    pub(super) fn purge_event(&self, kind: Kind, event: &str) -> usize {
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

    /// Replaces the entries of one event for which `rewrite` returns a new one (in place:
    /// not a purge, stores in progress are not refused). Returns how many it replaced.
    pub(super) fn rewrite_event(
        &self,
        kind: Kind,
        event: &str,
        rewrite: impl Fn(&SessionKey, &Entry) -> Option<Entry>,
    ) -> usize {
        let replaced: Vec<(SessionKey, Entry)> = self
            .store
            .iter()
            .filter(|(key, _)| key.kind == kind && &*key.event == event)
            .filter_map(|(key, entry)| Some(((*key).clone(), rewrite(&key, &entry)?)))
            .collect();
        let n = replaced.len();
        for (key, entry) in replaced {
            self.store.insert(key, Arc::new(entry));
        }
        n
    }

    /// Drops everything.
    pub(super) fn purge_all(&self) {
        self.count_purge();
        self.failures.invalidate_all();
        self.store.invalidate_all();
    }

    /// Entries and weighted bytes (after pending maintenance).
    pub(super) fn usage(&self) -> (u64, u64) {
        self.store.run_pending_tasks();
        (self.store.entry_count(), self.store.weighted_size())
    }
}
