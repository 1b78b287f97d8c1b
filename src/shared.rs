//! [`SharedTier`]: Redis as the second cache tier, shared by every replica.
//!
//! What lives in Redis, under `cache.shared.key_prefix` (`gsp:` below):
//!
//! ```text
//! gsp:e:{kind}:{event}:{version}:s:{session}   an entry (session)     PX = how long it may be served
//! gsp:e:{kind}:{event}:{version}:l             an entry (event list)  PX = the same
//! gsp:lock:{kind}:{event}:{version}:s:{session} single-flight lock    value = fencing token, PX = lock_ttl
//! gsp:gate                                      Graph throttled / circuit open, until a wall-clock time
//! gsp:purge                                     pub/sub channel of purges
//! ```
//!
//! Ids cannot contain `:` (routes allow `A-Z a-z 0-9 - _ . @ = +`), so keys parse one way.
//! Entries carry their own freshness as wall-clock times ([`crate::clock::Clock::wall`]),
//! so `Age`, `Cache-Status` and the stale windows read the same on every replica.
//!
//! Redis is never in a caller's way: every command is bounded by `cache.shared.timeout`,
//! and after a failure Redis is left alone for `retry_interval` (the connection manager
//! reconnects in the background). Failures are logged once per incident and counted.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use secrecy::ExposeSecret;

use crate::config::SharedSettings;
use crate::routes::{Kind, SessionKey};
use crate::telemetry::{names, Metrics};

/// Deletes the lock only if it still holds our fencing token (another replica may have
/// taken it after ours expired).
const UNLOCK: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Sets the gate to the later of its current and the new closing time.
const CLOSE_GATE: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local closed_until = tonumber(string.match(current, '^(%d+)'))
  if closed_until and closed_until >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[3])
return 1";

/// Redis could not be used for this step (down, slow, full, or left alone after a failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// The outcome of trying to take a key's single-flight lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// Ours, with this fencing token.
    Acquired(String),
    /// Another replica is fetching.
    Busy,
    Unavailable,
}

/// Graph closed to everyone until `until_ms` (wall clock, ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedGate {
    pub until_ms: u64,
    pub throttled: bool,
}

impl SharedGate {
    fn parse(value: &str) -> Option<SharedGate> {
        let (until, kind) = value.split_once(' ')?;
        Some(SharedGate {
            until_ms: until.parse().ok()?,
            throttled: kind == "throttled",
        })
    }
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
        let kind = |s: &str| match s {
            "webinars" => Some(Kind::Webinars),
            "townhalls" => Some(Kind::Townhalls),
            _ => None,
        };
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
    conn: ConnectionManager,
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
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(settings.retry_interval);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(SharedTier {
            client,
            conn,
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            connect_timeout: settings.connect_timeout,
            retry_interval: settings.retry_interval,
            lock_ttl: settings.lock_ttl,
            max_body: settings.max_body_bytes.as_u64() as usize,
            metrics,
            healthy: AtomicBool::new(true),
            pause_until: Mutex::new(None),
        })
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

    fn channel(&self) -> String {
        format!("{}purge", self.prefix)
    }

    /// Whether a body of this size may be stored in Redis.
    pub fn fits(&self, len: usize) -> bool {
        len <= self.max_body
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

    fn failed(&self, op: &'static str, why: &str) {
        *self.pause_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now() + self.retry_interval);
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
    }

    fn succeeded(&self) {
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
                self.failed(op, &e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.failed(op, "timed out");
                Err(Unavailable)
            }
        }
    }

    /// In one round trip: the entry for `key` (if Redis has one), whether another
    /// replica holds its lock (is asking Graph), and the shared gate (if closed).
    pub async fn lookup(
        &self,
        key: &SessionKey,
    ) -> Result<(Option<Bytes>, bool, Option<SharedGate>), Unavailable> {
        let mut conn = self.conn.clone();
        let (entry, locked, gate): (Option<Vec<u8>>, bool, Option<String>) = self
            .run(
                "poll",
                redis::pipe()
                    .cmd("GET")
                    .arg(self.entry_key(key))
                    .cmd("EXISTS")
                    .arg(self.lock_key(key))
                    .cmd("GET")
                    .arg(self.gate_key())
                    .query_async(&mut conn),
            )
            .await?;
        Ok((
            entry.map(Bytes::from),
            locked,
            gate.as_deref().and_then(SharedGate::parse),
        ))
    }

    /// Stores an entry for `keep` (Redis expires it by itself).
    pub async fn put(&self, key: &SessionKey, record: &[u8], keep: Duration) {
        if !self.fits(record.len()) {
            self.metrics
                .counter(names::SHARED_SKIPPED, &[("reason", "too_large")])
                .increment(1);
            return;
        }
        let mut conn = self.conn.clone();
        let px = keep.as_millis().clamp(1, u64::MAX as u128) as u64;
        let _ = self
            .run(
                "set",
                redis::cmd("SET")
                    .arg(self.entry_key(key))
                    .arg(record)
                    .arg("PX")
                    .arg(px)
                    .query_async::<()>(&mut conn),
            )
            .await;
    }

    /// Tries to become the one replica that fetches `key` from Graph.
    pub async fn try_lock(&self, key: &SessionKey) -> Lock {
        let token = uuid::Uuid::new_v4().to_string();
        let mut conn = self.conn.clone();
        let px = self.lock_ttl.as_millis().max(1) as u64;
        match self
            .run(
                "lock",
                redis::cmd("SET")
                    .arg(self.lock_key(key))
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(px)
                    .query_async::<Option<String>>(&mut conn),
            )
            .await
        {
            Ok(Some(_)) => Lock::Acquired(token),
            Ok(None) => Lock::Busy,
            Err(Unavailable) => Lock::Unavailable,
        }
    }

    /// Releases the lock if it is still ours. Bypasses the failure pause: a lock left
    /// behind would make other replicas wait for its expiry.
    pub async fn unlock(&self, key: &SessionKey, token: &str) {
        let mut conn = self.conn.clone();
        let script = redis::Script::new(UNLOCK);
        let mut invocation = script.key(self.lock_key(key));
        invocation.arg(token);
        if let Ok(Err(e)) =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<i64>(&mut conn)).await
        {
            tracing::debug!(error = %e, "could not release a shared lock; it expires by itself");
        }
    }

    /// Tells every replica that Graph is closed until `gate.until_ms`.
    pub async fn close_gate(&self, gate: SharedGate, now_ms: u64) {
        let left = gate.until_ms.saturating_sub(now_ms);
        if left == 0 {
            return;
        }
        let mut conn = self.conn.clone();
        // Redis keeps the key a little longer than the gate lasts; readers compare times.
        let _ = self
            .run(
                "gate",
                redis::Script::new(CLOSE_GATE)
                    .key(self.gate_key())
                    .arg(gate.until_ms)
                    .arg(if gate.throttled {
                        "throttled"
                    } else {
                        "circuit"
                    })
                    .arg(left + 1000)
                    .invoke_async::<i64>(&mut conn),
            )
            .await;
    }

    /// Removes what `purge` names from Redis and broadcasts it to every replica.
    /// Returns whether Redis took it.
    pub async fn purge(&self, purge: &Purge) -> bool {
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
                let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
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
        removed && published
    }

    async fn unlink_matching(&self, pattern: &str) -> bool {
        let mut cursor: u64 = 0;
        loop {
            let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(
            self.timeout + self.connect_timeout,
            ping.query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!("shared cache (Redis) connected"),
            Ok(Err(e)) => self.failed("connect", &e.to_string()),
            Err(_) => self.failed("connect", "timed out"),
        }
    }

    /// Applies purges broadcast by any replica (this one included) until the task is
    /// dropped, resubscribing after a lost connection. Purges broadcast while this
    /// replica was disconnected are missed; their entries still expire by `ttl`.
    pub async fn follow_purges(self: Arc<Self>, apply: impl Fn(Purge)) {
        loop {
            let subscribed =
                tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), async {
                    let mut pubsub = self.client.get_async_pubsub().await?;
                    pubsub.subscribe(self.channel()).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await;
            match subscribed {
                Ok(Ok(mut pubsub)) => {
                    tracing::debug!("following shared purges");
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Ok(text) = message.get_payload::<String>() else {
                            continue;
                        };
                        match Purge::decode(&text) {
                            Some(purge) => apply(purge),
                            None => tracing::warn!("ignored a malformed shared purge message"),
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
            SharedGate::parse("1700000000000 throttled"),
            Some(SharedGate {
                until_ms: 1_700_000_000_000,
                throttled: true
            })
        );
        assert_eq!(SharedGate::parse("soon"), None);
    }
}
