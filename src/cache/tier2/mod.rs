//! [`SharedTier`]: Redis as the second cache tier, shared by every replica.
//!
//! What lives in Redis, under `cache.shared.key_prefix` (`gsp:` below):
//!
//! ```text
//! gsp:e:{kind}:{event}:{version}:s:{session}    an entry (session)     PX = how long it may be served
//! gsp:e:{kind}:{event}:{version}:l              an entry (event list)  PX = the same
//! gsp:lock:{kind}:{event}:{version}:s:{session} single-flight lock     value = fencing token, PX = lock_ttl (renewed)
//! gsp:gate                                      Graph closed: "throttled" or "circuit", PX = what is left
//! gsp:unshared:{kind}:{event}:{version}:s:{session}  the holder's answer could not be shared (PX = lock_ttl)
//! gsp:gen                                       purge generation (INCR on every purge)
//! gsp:purge                                     pub/sub channel of purges (and heartbeats)
//! gsp:rl:{limit}:{bucket}                       a caller's rate-limit bucket (GCRA, rate.rs)
//! gsp:sub:{webinar}                             its change-notification subscription (hash, claim.rs)
//! ```
//!
//! Ids cannot contain `:` (routes allow `A-Z a-z 0-9 - _ . @ = +`), so keys parse one way.
//!
//! One round trip decides a miss: [`protocol::LOOKUP`] returns the entry, the gate and the
//! purge generation, and takes the key's lock when nothing is stored and nobody holds it
//! (atomically, so no replica can store between another's look and its lock). The holder
//! renews its lock while Graph answers, stores the answer only if no purge happened
//! meanwhile, then releases it; the others poll until the entry appears, or, when the lock
//! goes without one, they ask Graph themselves when the holder said it could not share its
//! answer (too large, Graph failed), or elect a new holder when it died.
//!
//! Entries carry their freshness as wall-clock times ([`crate::core::clock::Clock::wall`]), so
//! `Age`, `Cache-Status` and the stale windows read the same on every replica whose clock
//! is synchronised (NTP). The gate uses no clock but Redis's: it lasts as long as its key
//! (`PX`), so a replica with a wrong clock cannot shorten or lengthen it.
//!
//! Redis is never in a caller's way: every command is bounded by `cache.shared.timeout`,
//! and after a failure Redis is left alone for `retry_interval`. Sockets have TCP
//! keepalive and a user timeout, the connection is rebuilt after repeated timeouts, and
//! the purge subscription is pinged, so a dead connection is noticed. Failures are logged
//! once per incident and counted.
//!
//! ```text
//! mod.rs         SharedTier: the steps of the protocol (lookup, put, renew, unlock, gate)
//! protocol.rs    the Lua scripts, the lookup's reply (holder, gate), the key layout
//! record.rs      an entry as stored in Redis
//! rate.rs        a caller's rate limit, one GCRA step shared by every replica
//! purge.rs       Purge: its broadcast, its removal from Redis, following other replicas'
//! claim.rs       one notification subscription per webinar for all replicas (a lease)
//! connection.rs  bounded commands, the failure pause, reconnection
//! bridge.rs      SessionCache's side: the cross-replica miss, gate bridging
//! ```

mod bridge;
mod claim;
mod connection;
mod protocol;
mod purge;
mod rate;
mod record;

pub use protocol::{Holder, Look, LookMode, SharedGate};
pub use purge::Purge;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::cache::tier2::connection::Connection;
use crate::cache::tier2::protocol::{
    parse_gate, CLOSE_GATE_SCRIPT, LOOKUP_SCRIPT, MAX_GATE, PUT_SCRIPT, RENEW_SCRIPT, UNLOCK_SCRIPT,
};
use crate::config::SharedSettings;
use crate::core::model::SessionKey;
use crate::telemetry::{names, Metrics};

/// Redis could not be used for this step (down, slow, full, or left alone after a failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

pub struct SharedTier {
    /// The connection, its timeouts and its failure pause.
    link: Connection,
    prefix: String,
    lock_ttl: Duration,
    max_body: usize,
    metrics: Arc<Metrics>,
    /// Tells this replica's messages apart in the purge channel's heartbeats.
    instance: String,
}

impl SharedTier {
    /// Prepares the connection; nothing is sent until first use, so a proxy starts (and
    /// serves from memory and Graph) while Redis is down.
    pub fn new(settings: &SharedSettings, metrics: Arc<Metrics>) -> redis::RedisResult<SharedTier> {
        Ok(SharedTier {
            link: Connection::new(settings, metrics.clone())?,
            prefix: settings.key_prefix.clone(),
            lock_ttl: settings.lock_ttl,
            max_body: settings.max_body_bytes.as_u64() as usize,
            metrics,
            instance: uuid::Uuid::new_v4().to_string(),
        })
    }

    /// How long the single-flight lock lasts without renewal.
    pub fn lock_ttl(&self) -> Duration {
        self.lock_ttl
    }
    /// The last failed Redis step: when, which operation, why.
    pub fn last_error(&self) -> Option<(std::time::SystemTime, &'static str, String)> {
        self.link.last_error()
    }

    /// Whether the last Redis command worked.
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    /// One round trip: the entry for `key`, its lock (taken for us when `mode` allows and
    /// nobody holds it), the shared gate, the purge generation and whether the last holder
    /// could not share its answer.
    pub async fn lookup(&self, key: &SessionKey, mode: LookMode) -> Result<Look, Unavailable> {
        type Reply = (
            Option<Vec<u8>>,
            String,
            Option<String>,
            Option<String>,
            i64,
            String,
            i64,
            i64,
        );
        // A fencing token only when this step may take the lock (not for every poll).
        let token = match mode {
            LookMode::Peek => String::new(),
            _ => uuid::Uuid::new_v4().to_string(),
        };
        let mut conn = self.link.conn();
        let script = &*LOOKUP_SCRIPT;
        let mut invocation = script.key(self.entry_key(key));
        invocation
            .key(self.lock_key(key))
            .key(self.gate_key())
            .key(self.generation_key())
            .key(self.unshared_key(key))
            .arg(&token)
            .arg(self.lock_ttl.as_millis().max(1) as u64)
            .arg(mode.as_str())
            // Nothing larger than we would store is read back (Redis is shared: whatever
            // wrote it, a bound on what one lookup can make us buffer).
            .arg(self.max_body);
        let (entry, state, holder, gate, gate_ttl, generation, unshared, oversized): Reply = self
            .link
            .run("lookup", invocation.invoke_async(&mut conn))
            .await?;
        if oversized == 1 {
            self.metrics
                .counter(names::SHARED_SKIPPED, &[("reason", "too_large_read")])
                .increment(1);
        }
        let holder = match (state.as_str(), holder) {
            ("acquired", _) => Holder::Us(token),
            ("busy", Some(other)) => Holder::Other(other),
            _ => Holder::Nobody,
        };
        Ok(Look {
            entry: entry.map(Bytes::from),
            holder,
            gate: gate.as_deref().and_then(|g| parse_gate(g, gate_ttl)),
            generation,
            unshared: unshared == 1,
        })
    }

    /// Tells the replicas waiting on our lock that no answer will come from us (it was too
    /// large, or Graph failed): they ask Graph themselves instead of electing a new holder.
    pub async fn mark_unshared(&self, key: &SessionKey) {
        let mut conn = self.link.conn();
        let _ = self
            .link
            .run(
                "set",
                redis::cmd("SET")
                    .arg(self.unshared_key(key))
                    .arg(1)
                    .arg("PX")
                    .arg(self.lock_ttl.as_millis().max(1) as u64)
                    .query_async::<()>(&mut conn),
            )
            .await;
    }

    /// Stores an entry for `keep` (Redis expires it by itself), unless it is too large or a
    /// purge happened since `generation` was read. False when not stored.
    pub async fn put(
        &self,
        key: &SessionKey,
        record: &[u8],
        keep: Duration,
        generation: &str,
    ) -> bool {
        if record.len() > self.max_body {
            self.metrics
                .counter(names::SHARED_SKIPPED, &[("reason", "too_large")])
                .increment(1);
            return false;
        }
        let mut conn = self.link.conn();
        let px = keep.as_millis().clamp(1, u64::MAX as u128) as u64;
        let script = &*PUT_SCRIPT;
        let mut invocation = script.key(self.entry_key(key));
        invocation
            .key(self.generation_key())
            .arg(record)
            .arg(px)
            .arg(generation);
        match self
            .link
            .run("set", invocation.invoke_async::<i64>(&mut conn))
            .await
        {
            Ok(1) => true,
            Ok(_) => {
                self.metrics
                    .counter(names::SHARED_SKIPPED, &[("reason", "purged")])
                    .increment(1);
                false
            }
            Err(Unavailable) => false,
        }
    }

    /// Keeps our lock while Graph is still answering. False when it is no longer ours.
    pub async fn renew(&self, key: &SessionKey, token: &str) -> bool {
        let mut conn = self.link.conn();
        let script = &*RENEW_SCRIPT;
        let mut invocation = script.key(self.lock_key(key));
        invocation
            .arg(token)
            .arg(self.lock_ttl.as_millis().max(1) as u64);
        matches!(
            self.link
                .run("renew", invocation.invoke_async::<i64>(&mut conn))
                .await,
            Ok(1)
        )
    }

    /// Releases the lock if it is still ours. Bypasses the failure pause: a lock left
    /// behind would make other replicas wait for its expiry.
    pub async fn unlock(&self, key: &SessionKey, token: &str) {
        let mut conn = self.link.conn();
        let script = &*UNLOCK_SCRIPT;
        let mut invocation = script.key(self.lock_key(key));
        invocation.arg(token);
        if let Ok(Err(e)) =
            tokio::time::timeout(self.link.timeout, invocation.invoke_async::<i64>(&mut conn)).await
        {
            tracing::debug!(error = %e, "could not release a shared lock; it expires by itself");
        }
    }

    /// Tells every replica that Graph is closed for `left` (throttled, or circuit open).
    pub async fn close_gate(&self, left: Duration, throttled: bool) {
        let left_ms = left.min(MAX_GATE).as_millis() as u64;
        if left_ms == 0 {
            return;
        }
        let mut conn = self.link.conn();
        let script = &*CLOSE_GATE_SCRIPT;
        let mut invocation = script.key(self.gate_key());
        // The key lasts exactly as long as the gate: its life is the gate.
        invocation
            .arg(if throttled { "throttled" } else { "circuit" })
            .arg(left_ms);
        let _ = self
            .link
            .run("gate", invocation.invoke_async::<i64>(&mut conn))
            .await;
    }

    /// Connects ahead of the first caller, so a miss does not pay for the connection (and
    /// a TLS handshake) within `timeout`.
    pub async fn warm_up(&self) {
        self.link.warm_up().await
    }
}
