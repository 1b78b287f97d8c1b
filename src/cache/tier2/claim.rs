//! One change-notification subscription per webinar for all replicas: its record in Redis
//! (`gsp:sub:{webinar}`, a hash: `holder`, `lease_until`, `id`, `expires_ms`), claimed by
//! one replica at a time under a lease it extends while it runs. The holder creates and
//! renews the subscription and writes its id; every replica reads the id from here to
//! accept the notifications that reach it. A replica that finds the lease lapsed (its
//! holder died) takes over the subscription as it stands. A record without an `id` field
//! has none recorded yet, or was lost with Redis's data (claimed as `new`: a replica that
//! knows a live subscription records it again); one recorded as none is `id = ''`
//! (Graph removed it, or it was released after an unsubscribe).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use crate::cache::tier2::{SharedTier, Unavailable};

/// Takes or extends the lease (when nobody else holds a live one) and returns the record:
/// `other`, `ours`, or `new` (ours, and no subscription was ever recorded: none made yet,
/// or the record lost with Redis's data; a forgotten or released one is recorded as `''`).
/// KEYS[1] record; ARGV: me, now_ms, lease_until_ms, lease_ms.
const CLAIM: &str = r#"
local holder = redis.call('HGET', KEYS[1], 'holder')
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0') or 0
local function record(state)
  return {state, redis.call('HGET', KEYS[1], 'id') or '', redis.call('HGET', KEYS[1], 'expires_ms') or '0'}
end
if holder and holder ~= ARGV[1] and lease > tonumber(ARGV[2]) then
  return record('other')
end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'lease_until', ARGV[3])
local keep = (tonumber(redis.call('HGET', KEYS[1], 'expires_ms') or '0') or 0) - tonumber(ARGV[2])
if keep < tonumber(ARGV[4]) then keep = tonumber(ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], math.floor(keep))
if redis.call('HEXISTS', KEYS[1], 'id') == 1 then return record('ours') end
return record('new')
"#;

/// The holder writes the subscription it created or renewed; when the record is gone
/// (lost with Redis's data meanwhile) it writes it anew, with its lease. KEYS[1] record;
/// ARGV: me, id, expires_ms, keep_ms, lease_until_ms.
const RECORD: &str = r#"
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= ARGV[1] then return 0 end
if not holder then redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'lease_until', ARGV[5]) end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'expires_ms', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// Forgets the subscription if it is still `id` (any replica: Graph removed it). KEYS[1]
/// record; ARGV: id.
const FORGET: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'id', '', 'expires_ms', '0')
return 1
"#;

/// Gives up the lease if we hold it. A subscription recorded (the webinar was
/// unsubscribed) is recorded as none (`''`) for a lease, so that a replica that knew its
/// id does not take the record for one Redis lost; after a failed create, when none was
/// ever recorded, none is written, and a replica that knows a live one may still record it.
/// KEYS[1]; ARGV: me, lease_ms.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'holder', '', 'lease_until', '0')
if redis.call('HEXISTS', KEYS[1], 'id') == 1 then
  redis.call('HSET', KEYS[1], 'id', '', 'expires_ms', '0')
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// The record as it stands, taking nothing. KEYS[1]; ARGV: me, now_ms.
const READ: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'holder', 'lease_until', 'id', 'expires_ms')
local ours = r[1] == ARGV[1] and (tonumber(r[2] or '0') or 0) > tonumber(ARGV[2])
return {ours and 'ours' or 'other', r[3] or '', r[4] or '0'}
"#;

// Built once (`Script::new` hashes the code).
static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM));
static RECORD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RECORD));
static FORGET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FORGET));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));
static READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(READ));

/// What the record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// This replica holds the lease (and must create or renew the subscription).
    pub ours: bool,
    /// Ours, and no subscription was ever recorded (no `id` field): a subscription this
    /// replica knows of may still be live at Graph, its record lost (Redis restarted or
    /// evicted it).
    pub fresh: bool,
    /// The subscription's id, if one was recorded.
    pub id: Option<String>,
    /// When it expires (ms since the Unix epoch; 0 when none).
    pub expires_ms: u64,
}

impl Claim {
    /// From a script's answer: `other`, `ours` or `new`; the id (`''`: none); its expiry.
    fn of((state, id, expires): (String, String, String)) -> Claim {
        Claim {
            ours: state == "ours" || state == "new",
            fresh: state == "new",
            id: (!id.is_empty()).then_some(id),
            expires_ms: expires.parse().unwrap_or(0),
        }
    }
}

impl SharedTier {
    fn claim_key(&self, webinar: &str) -> String {
        format!("{}sub:{webinar}", self.prefix)
    }

    /// Takes (or extends) the webinar's lease for `lease` unless another replica holds a
    /// live one; either way returns the recorded subscription.
    pub async fn claim_subscription(
        &self,
        webinar: &str,
        now_ms: u64,
        lease: Duration,
    ) -> Result<Claim, Unavailable> {
        let lease_ms = lease.as_millis().max(1) as u64;
        let mut conn = self.link.conn();
        let script = &*CLAIM_SCRIPT;
        let mut invocation = script.key(self.claim_key(webinar));
        invocation
            .arg(&self.instance)
            .arg(now_ms)
            .arg(now_ms.saturating_add(lease_ms))
            .arg(lease_ms);
        let answer = self
            .link
            .run("claim", invocation.invoke_async(&mut conn))
            .await?;
        Ok(Claim::of(answer))
    }

    /// The webinar's record, without taking its lease (a notification's lookup).
    pub async fn read_subscription(
        &self,
        webinar: &str,
        now_ms: u64,
    ) -> Result<Claim, Unavailable> {
        let mut conn = self.link.conn();
        let script = &*READ_SCRIPT;
        let mut invocation = script.key(self.claim_key(webinar));
        invocation.arg(&self.instance).arg(now_ms);
        let answer = self
            .link
            .run("claim", invocation.invoke_async(&mut conn))
            .await?;
        Ok(Claim::of(answer))
    }

    /// Records the subscription this replica (the lease holder) created or renewed, and
    /// takes the lease for `lease` if the record was lost meanwhile.
    pub async fn record_subscription(
        &self,
        webinar: &str,
        id: &str,
        expires_ms: u64,
        now_ms: u64,
        lease: Duration,
    ) -> bool {
        let keep = expires_ms.saturating_sub(now_ms).max(1);
        let mut conn = self.link.conn();
        let script = &*RECORD_SCRIPT;
        let mut invocation = script.key(self.claim_key(webinar));
        invocation
            .arg(&self.instance)
            .arg(id)
            .arg(expires_ms)
            .arg(keep)
            .arg(now_ms.saturating_add(lease.as_millis().max(1) as u64));
        matches!(
            self.link
                .run("claim", invocation.invoke_async::<i64>(&mut conn))
                .await,
            Ok(1)
        )
    }

    /// Forgets subscription `id` of the webinar (Graph removed it): its holder creates a
    /// new one.
    pub async fn forget_subscription(&self, webinar: &str, id: &str) -> bool {
        let mut conn = self.link.conn();
        let script = &*FORGET_SCRIPT;
        let mut invocation = script.key(self.claim_key(webinar));
        invocation.arg(id);
        matches!(
            self.link
                .run("claim", invocation.invoke_async::<i64>(&mut conn))
                .await,
            Ok(1)
        )
    }

    /// Gives up the webinar's lease and subscription if this replica holds them (the
    /// record says so for `lease`, then goes).
    pub async fn release_subscription(&self, webinar: &str, lease: Duration) {
        let mut conn = self.link.conn();
        let script = &*RELEASE_SCRIPT;
        let mut invocation = script.key(self.claim_key(webinar));
        invocation
            .arg(&self.instance)
            .arg(lease.as_millis().max(1) as u64);
        let _ = self
            .link
            .run("claim", invocation.invoke_async::<i64>(&mut conn))
            .await;
    }
}
