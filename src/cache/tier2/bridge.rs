//! [`SessionCache`]'s side of the shared tier: the cross-replica miss (look, take the
//! key's lock or wait for its holder, adopt what another replica stored), the bridging of
//! Graph's gate between replicas, and the background tasks that follow other replicas'
//! purges and publish this one's gate closures.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::cache::policy::Mode;
use crate::cache::tier2::{Holder, LookMode, SharedGate, SharedTier, Unavailable};
use crate::cache::{Entry, FetchResult, SessionCache};
use crate::core::model::SessionKey;
use crate::telemetry::names;
use crate::upstream::error::UpstreamError;

/// How often a replica waiting for another's Graph call looks for its answer.
const SHARED_POLL: Duration = Duration::from_millis(20);

// === impl SessionCache: the miss through Redis ===

impl SessionCache {
    /// A shared call with the Redis tier. One round trip looks for a usable entry and,
    /// when none is stored and nobody is fetching, takes the key's lock: then this replica
    /// asks Graph (renewing the lock meanwhile) and stores the answer for the others after
    /// answering its own callers. When another replica holds the lock, this one waits for
    /// its entry; if the lock goes without one (too large to share, Graph failed, the
    /// holder died), it asks Graph itself. Whenever Redis fails, it carries on alone.
    pub(in crate::cache) async fn load_shared(
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

    /// A fresh entry another replica stored, for a request that may not start a Graph
    /// call (its caller's Graph budget is spent), adopted into memory like any tier-2
    /// hit (a stale one is kept for `stale_if_error`). Only looks: takes no lock. `None`
    /// when Redis has nothing fresh or does not answer.
    pub(in crate::cache) async fn peek_shared(
        &self,
        shared: &Arc<SharedTier>,
        key: &SessionKey,
    ) -> Option<Arc<Entry>> {
        let Ok(look) = shared.lookup(key, LookMode::Peek).await else {
            self.count_lookup("unavailable");
            return None;
        };
        self.apply_shared_gate(look.gate);
        let record = look.entry?;
        let started_ms = self.clock.wall_ms();
        let entry = self
            .adopt_record(key, &record, Mode::Miss, started_ms, None)
            .ok()?;
        self.count_lookup("hit");
        Some(entry)
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
        let (entry, writer) =
            Entry::from_shared_with(record, &self.clock, &self.settings, self.push_ttl())
                .ok_or(())?;
        // Stored while a subscription was live, which is no longer: fresh by cache.ttl.
        let entry = if entry.push && self.push_for(key).is_none() {
            let mut polled = entry.unpushed(&self.settings, key.is_list());
            polled.tier2 = true;
            polled
        } else {
            entry
        };
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
            self.memory.insert(key.clone(), entry.clone());
            self.note_stored(key, &entry);
            return Ok(entry);
        }
        if entry.has_body() && now < entry.stale_until && self.memory.get(key).is_none() {
            let mut entry = entry;
            entry.tier2 = false;
            self.memory.insert(key.clone(), Arc::new(entry));
        }
        Err(())
    }

    fn count_lookup(&self, result: &'static str) {
        self.metrics
            .counter(names::SHARED_LOOKUPS, &[("result", result)])
            .increment(1);
    }
}

// === impl SessionCache: gate bridging and background tasks ===

impl SessionCache {
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
}
