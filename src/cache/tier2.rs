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
//! ```
//!
//! Ids cannot contain `:` (routes allow `A-Z a-z 0-9 - _ . @ = +`), so keys parse one way.
//!
//! One round trip decides a miss: [`LOOKUP`] returns the entry, the gate and the purge
//! generation, and takes the key's lock when nothing is stored and nobody holds it
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

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use secrecy::ExposeSecret;

use crate::config::SharedSettings;
use crate::core::model::{Kind, SessionKey};
use crate::telemetry::{names, Metrics};

/// The entry, the lock's holder, the gate and the purge generation in one step; takes the
/// lock (`ARGV[1]` token, `ARGV[2]` ms) when the mode allows it and nobody holds it.
/// Modes (`ARGV[3]`): `miss` (lock only when no entry is stored), `lock` (lock whatever is
/// stored), `revalidate` (as `lock`, without returning the entry), `peek` (never lock).
pub const LOOKUP: &str = r"
local entry = false
local oversized = 0
if ARGV[3] ~= 'revalidate' then
  if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[4]) then oversized = 1
  else entry = redis.call('GET', KEYS[1]) end
end
local function short(v) if v then return string.sub(v, 1, 128) end return v end
local holder = short(redis.call('GET', KEYS[2]))
local state = 'free'
if holder then
  state = 'busy'
elseif ARGV[3] == 'lock' or ARGV[3] == 'revalidate' or (ARGV[3] == 'miss' and not entry) then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  state = 'acquired'
  holder = ARGV[1]
end
local gate = short(redis.call('GET', KEYS[3]))
local gate_ttl = redis.call('PTTL', KEYS[3])
local gen = short(redis.call('GET', KEYS[4])) or '0'
local unshared = redis.call('EXISTS', KEYS[5])
return {entry, state, holder or false, gate, gate_ttl, gen, unshared, oversized}";

/// Stores an entry unless a purge happened since the generation `ARGV[3]` was read.
const PUT: &str = r"
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";

/// Extends the lock only while it still holds our fencing token.
const RENEW: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";

/// Deletes the lock only if it still holds our fencing token (another replica may have
/// taken it after ours expired).
const UNLOCK: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Closes the gate for `ARGV[2]` ms (kind `ARGV[1]`) unless it is closed longer already.
const CLOSE_GATE: &str = r"
if redis.call('PTTL', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";

/// Longest a gate read from Redis may close Graph here, whatever it says.
const MAX_GATE: Duration = Duration::from_secs(24 * 3600);
/// Consecutive timeouts after which the connection is rebuilt (a dead socket times out
/// rather than failing).
const REBUILD_AFTER_TIMEOUTS: u32 = 3;
/// How often the purge subscription is pinged.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(10);

/// Redis could not be used for this step (down, slow, full, or left alone after a failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// Who holds a key's single-flight lock, as [`SharedTier::lookup`] left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// This call took it (with this fencing token): ask Graph.
    Us(String),
    /// Another replica is asking Graph (its token).
    Other(String),
    /// Nobody (not taken: an entry is stored, or the mode was `peek`).
    Nobody,
}

/// Graph closed to everyone for `left` (at most what its key has left in Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedGate {
    pub left: Duration,
    pub throttled: bool,
}

/// What one [`SharedTier::lookup`] found.
#[derive(Debug, Clone)]
pub struct Look {
    pub entry: Option<Bytes>,
    pub holder: Holder,
    pub gate: Option<SharedGate>,
    /// Purge generation, for [`SharedTier::put`].
    pub generation: String,
    /// The last holder said its answer could not be shared (too large, Graph failed).
    pub unshared: bool,
}

/// How [`SharedTier::lookup`] may take the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookMode {
    Miss,
    Lock,
    Revalidate,
    Peek,
}

impl LookMode {
    fn as_str(self) -> &'static str {
        match self {
            LookMode::Miss => "miss",
            LookMode::Lock => "lock",
            LookMode::Revalidate => "revalidate",
            LookMode::Peek => "peek",
        }
    }
}

/// The gate's kind and its key's remaining time (`PTTL`; negative: no expiry or no key).
fn parse_gate(kind: &str, key_ttl_ms: i64) -> Option<SharedGate> {
    let left = Duration::from_millis(u64::try_from(key_ttl_ms).ok()?).min(MAX_GATE);
    (!left.is_zero()).then_some(SharedGate {
        left,
        throttled: kind == "throttled",
    })
}

/// A purge, as broadcast to every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// One session (every version) or list, and the session's event list.
    Key(SessionKey),
    Event(Kind, String),
    All,
}

impl Purge {
    fn encode(&self) -> String {
        match self {
            Purge::Key(key) => match &key.session {
                Some(session) => format!("s {} {} {}", key.kind, key.event, session),
                None => format!("l {} {}", key.kind, key.event),
            },
            Purge::Event(kind, event) => format!("e {kind} {event}"),
            Purge::All => "a".to_string(),
        }
    }

    /// Decodes a broadcast; ids are validated again as if a caller had sent them.
    fn decode(message: &str) -> Option<Purge> {
        let parts: Vec<&str> = message.split(' ').collect();
        let kind = Kind::parse;
        match parts.as_slice() {
            ["s", k, event, session] => SessionKey::new(kind(k)?, event, session)
                .ok()
                .map(Purge::Key),
            ["l", k, event] => SessionKey::list(kind(k)?, event).ok().map(Purge::Key),
            ["e", k, event] => {
                SessionKey::list(kind(k)?, event).ok()?;
                Some(Purge::Event(kind(k)?, event.to_string()))
            }
            ["a"] => Some(Purge::All),
            _ => None,
        }
    }
}

pub struct SharedTier {
    client: redis::Client,
    /// Rebuilt after repeated timeouts.
    conn: Mutex<ConnectionManager>,
    manager_config: ConnectionManagerConfig,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    retry_interval: Duration,
    lock_ttl: Duration,
    max_body: usize,
    metrics: Arc<Metrics>,
    /// Whether the last command worked (for logging once per incident).
    healthy: AtomicBool,
    /// Redis is left alone until then after a failure (real time).
    pause_until: Mutex<Option<std::time::Instant>>,
    consecutive_timeouts: AtomicU32,
    /// Tells this replica's messages apart in the purge channel's heartbeats.
    instance: String,
}

impl SharedTier {
    /// Prepares the connection; nothing is sent until first use, so a proxy starts (and
    /// serves from memory and Graph) while Redis is down.
    pub fn new(settings: &SharedSettings, metrics: Arc<Metrics>) -> redis::RedisResult<SharedTier> {
        let url = settings
            .redis_url
            .as_ref()
            .map(|u| u.expose_secret().to_string())
            .unwrap_or_default();
        let mut info = url.as_str().into_connection_info()?;
        if let Some(password) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose_secret());
            info = info.set_redis_settings(redis);
        }
        info = info.set_tcp_settings(tcp_settings(settings.timeout));
        let client = match &settings.ca_pem {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(settings.retry_interval);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        Ok(SharedTier {
            client,
            conn: Mutex::new(conn),
            manager_config,
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            connect_timeout: settings.connect_timeout,
            retry_interval: settings.retry_interval,
            lock_ttl: settings.lock_ttl,
            max_body: settings.max_body_bytes.as_u64() as usize,
            metrics,
            healthy: AtomicBool::new(true),
            pause_until: Mutex::new(None),
            consecutive_timeouts: AtomicU32::new(0),
            instance: uuid::Uuid::new_v4().to_string(),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `{kind}:{event}:{version}:s:{session}` or `...:l`.
    fn key_suffix(key: &SessionKey) -> String {
        match &key.session {
            Some(session) => format!(
                "{}:{}:{}:s:{}",
                key.kind,
                key.event,
                key.version.as_str(),
                session
            ),
            None => format!("{}:{}:{}:l", key.kind, key.event, key.version.as_str()),
        }
    }

    fn entry_key(&self, key: &SessionKey) -> String {
        format!("{}e:{}", self.prefix, Self::key_suffix(key))
    }

    fn lock_key(&self, key: &SessionKey) -> String {
        format!("{}lock:{}", self.prefix, Self::key_suffix(key))
    }

    fn gate_key(&self) -> String {
        format!("{}gate", self.prefix)
    }

    fn unshared_key(&self, key: &SessionKey) -> String {
        format!("{}unshared:{}", self.prefix, Self::key_suffix(key))
    }

    fn generation_key(&self) -> String {
        format!("{}gen", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}purge", self.prefix)
    }

    /// How long the single-flight lock lasts without renewal.
    pub fn lock_ttl(&self) -> Duration {
        self.lock_ttl
    }

    fn paused(&self) -> bool {
        let mut pause = self.pause_until.lock().unwrap_or_else(|e| e.into_inner());
        match *pause {
            Some(until) if std::time::Instant::now() < until => true,
            Some(_) => {
                *pause = None;
                false
            }
            None => false,
        }
    }

    fn failed(&self, op: &'static str, why: &str, timed_out: bool) {
        *self.pause_until.lock().unwrap_or_else(|e| e.into_inner()) =
            std::time::Instant::now().checked_add(self.retry_interval);
        self.metrics
            .counter(names::SHARED_ERRORS, &[("op", op)])
            .increment(1);
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                op,
                error = why,
                retry_in_ms = self.retry_interval.as_millis() as u64,
                "shared cache (Redis) unavailable: carrying on with memory and Graph"
            );
        }
        if timed_out {
            let timeouts = self.consecutive_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
            if timeouts >= REBUILD_AFTER_TIMEOUTS {
                self.rebuild();
            }
        }
    }

    /// A connection that keeps timing out may be dead without the socket knowing: start
    /// a new one.
    fn rebuild(&self) {
        self.consecutive_timeouts.store(0, Ordering::Relaxed);
        match ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(fresh) => {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                tracing::debug!("shared cache connection rebuilt after repeated timeouts");
            }
            Err(e) => tracing::debug!(error = %e, "cannot rebuild the shared cache connection"),
        }
    }

    fn succeeded(&self) {
        self.consecutive_timeouts.store(0, Ordering::Relaxed);
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("shared cache (Redis) reachable again");
        }
    }

    /// Whether the last Redis command worked.
    pub fn is_up(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Runs one Redis step within `timeout`, recording failure or recovery.
    async fn run<T>(
        &self,
        op: &'static str,
        step: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        if self.paused() {
            return Err(Unavailable);
        }
        match tokio::time::timeout(self.timeout, step).await {
            Ok(Ok(value)) => {
                self.succeeded();
                Ok(value)
            }
            Ok(Err(e)) => {
                self.failed(op, &e.to_string(), e.is_timeout());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed(op, "timed out", true);
                Err(Unavailable)
            }
        }
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
        let mut conn = self.conn();
        let script = redis::Script::new(LOOKUP);
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
        let mut conn = self.conn();
        let _ = self
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
        let mut conn = self.conn();
        let px = keep.as_millis().clamp(1, u64::MAX as u128) as u64;
        let script = redis::Script::new(PUT);
        let mut invocation = script.key(self.entry_key(key));
        invocation
            .key(self.generation_key())
            .arg(record)
            .arg(px)
            .arg(generation);
        match self
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
        let mut conn = self.conn();
        let script = redis::Script::new(RENEW);
        let mut invocation = script.key(self.lock_key(key));
        invocation
            .arg(token)
            .arg(self.lock_ttl.as_millis().max(1) as u64);
        matches!(
            self.run("renew", invocation.invoke_async::<i64>(&mut conn))
                .await,
            Ok(1)
        )
    }

    /// Releases the lock if it is still ours. Bypasses the failure pause: a lock left
    /// behind would make other replicas wait for its expiry.
    pub async fn unlock(&self, key: &SessionKey, token: &str) {
        let mut conn = self.conn();
        let script = redis::Script::new(UNLOCK);
        let mut invocation = script.key(self.lock_key(key));
        invocation.arg(token);
        if let Ok(Err(e)) =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<i64>(&mut conn)).await
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
        let mut conn = self.conn();
        let script = redis::Script::new(CLOSE_GATE);
        let mut invocation = script.key(self.gate_key());
        // The key lasts exactly as long as the gate: its life is the gate.
        invocation
            .arg(if throttled { "throttled" } else { "circuit" })
            .arg(left_ms);
        let _ = self
            .run("gate", invocation.invoke_async::<i64>(&mut conn))
            .await;
    }

    /// Removes what `purge` names from Redis and broadcasts it to every replica.
    /// Returns whether Redis took it.
    pub async fn purge(&self, purge: &Purge) -> bool {
        let mut conn = self.conn();
        // First: stores from Graph calls that began before the purge are refused.
        let generation = self
            .run(
                "purge",
                redis::cmd("INCR")
                    .arg(self.generation_key())
                    .query_async::<i64>(&mut conn),
            )
            .await
            .is_ok();
        let removed = match purge {
            Purge::Key(key) => {
                let mut keys = Vec::new();
                for version in [
                    crate::config::ApiVersion::V1,
                    crate::config::ApiVersion::Beta,
                ] {
                    let key = key.clone().with_version(version);
                    keys.push(self.entry_key(&key));
                    keys.push(self.entry_key(&SessionKey {
                        session: None,
                        ..key
                    }));
                }
                self.run(
                    "purge",
                    redis::cmd("UNLINK").arg(keys).query_async::<i64>(&mut conn),
                )
                .await
                .is_ok()
            }
            Purge::Event(kind, event) => {
                let pattern = format!(
                    "{}e:{}:{}:*",
                    glob_escape(&self.prefix),
                    kind,
                    glob_escape(event)
                );
                self.unlink_matching(&pattern).await
            }
            Purge::All => {
                let pattern = format!("{}e:*", glob_escape(&self.prefix));
                self.unlink_matching(&pattern).await
            }
        };
        let published = self
            .run(
                "publish",
                redis::cmd("PUBLISH")
                    .arg(self.channel())
                    .arg(purge.encode())
                    .query_async::<i64>(&mut conn),
            )
            .await
            .is_ok();
        generation && removed && published
    }

    async fn unlink_matching(&self, pattern: &str) -> bool {
        let mut cursor: u64 = 0;
        loop {
            let mut conn = self.conn();
            let Ok((next, keys)) = self
                .run(
                    "purge",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async::<(u64, Vec<String>)>(&mut conn),
                )
                .await
            else {
                return false;
            };
            if !keys.is_empty()
                && self
                    .run(
                        "purge",
                        redis::cmd("UNLINK").arg(keys).query_async::<i64>(&mut conn),
                    )
                    .await
                    .is_err()
            {
                return false;
            }
            if next == 0 {
                return true;
            }
            cursor = next;
        }
    }

    /// Connects ahead of the first caller, so a miss does not pay for the connection (and
    /// a TLS handshake) within `timeout`.
    pub async fn warm_up(&self) {
        let mut conn = self.conn();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(
            self.timeout + self.connect_timeout,
            ping.query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!("shared cache (Redis) connected"),
            Ok(Err(e)) => self.failed("connect", &e.to_string(), false),
            Err(_) => self.failed("connect", "timed out", false),
        }
    }

    /// Applies purges broadcast by any replica (this one included) until the task is
    /// dropped, resubscribing after a lost connection (noticed by a ping every 10 s).
    /// Purges broadcast while this replica was disconnected are missed; their entries
    /// still expire by `ttl`.
    pub async fn follow_purges(self: Arc<Self>, apply: impl Fn(Purge)) {
        loop {
            let subscribed = tokio::time::timeout(self.timeout + self.connect_timeout, async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => {
                    tracing::debug!(instance = %self.instance, "following shared purges");
                    let (mut sink, mut messages) = pubsub.split();
                    let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
                    ping.tick().await;
                    loop {
                        tokio::select! {
                            message = messages.next() => {
                                let Some(message) = message else { break };
                                let Ok(text) = message.get_payload::<String>() else {
                                    continue;
                                };
                                match Purge::decode(&text) {
                                    Some(purge) => apply(purge),
                                    None => tracing::warn!("ignored a malformed shared purge message"),
                                }
                            }
                            _ = ping.tick() => {
                                let alive = tokio::time::timeout(
                                    self.timeout + self.connect_timeout,
                                    sink.ping::<String>(),
                                )
                                .await;
                                if !matches!(alive, Ok(Ok(_))) {
                                    tracing::debug!("shared purge subscription did not answer a ping");
                                    break;
                                }
                            }
                        }
                    }
                    tracing::debug!("shared purge subscription ended");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to shared purges"),
                Err(_) => tracing::debug!("subscribing to shared purges timed out"),
            }
            tokio::time::sleep(self.retry_interval.max(Duration::from_millis(200))).await;
        }
    }
}

/// TCP keepalive and a user timeout, so a connection whose peer vanished (failover, NAT
/// timeout) fails instead of waiting forever.
fn tcp_settings(timeout: Duration) -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let settings = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(
            TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(5)),
        );
    #[cfg(target_os = "linux")]
    let settings = settings.set_user_timeout(timeout.max(Duration::from_secs(10)));
    #[cfg(not(target_os = "linux"))]
    let _ = timeout;
    settings
}

/// Escapes Redis glob characters so ids and the prefix match literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_round_trip_and_refuse_bad_ids() {
        for purge in [
            Purge::Key(SessionKey::new(Kind::Webinars, "a@b", "s=+").unwrap()),
            Purge::Key(SessionKey::list(Kind::Townhalls, "e").unwrap()),
            Purge::Event(Kind::Townhalls, "e@t".to_string()),
            Purge::All,
        ] {
            assert_eq!(Purge::decode(&purge.encode()), Some(purge));
        }
        for bad in [
            "",
            "x",
            "s webinars a",
            "s webinars a/b c",
            "e meetings a",
            "e webinars *",
            "s webinars a b c",
        ] {
            assert_eq!(Purge::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys_parse_one_way() {
        let session = SessionKey::new(Kind::Webinars, "a@b", "s").unwrap();
        let list = SessionKey::list(Kind::Webinars, "a@b").unwrap();
        assert_eq!(SharedTier::key_suffix(&session), "webinars:a@b:v1.0:s:s");
        assert_eq!(SharedTier::key_suffix(&list), "webinars:a@b:v1.0:l");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(
            parse_gate("throttled", 20_000),
            Some(SharedGate {
                left: Duration::from_secs(20),
                throttled: true
            })
        );
        assert_eq!(
            parse_gate("circuit", 31_000),
            Some(SharedGate {
                left: Duration::from_secs(31),
                throttled: false
            })
        );
        // No expiry (-1) or no key (-2): nothing to honour; never beyond a day.
        assert_eq!(parse_gate("throttled", -1), None);
        assert_eq!(parse_gate("throttled", -2), None);
        assert_eq!(parse_gate("throttled", i64::MAX).unwrap().left, MAX_GATE);
    }
}
