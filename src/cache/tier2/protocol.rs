//! The shared tier's protocol: the Lua scripts that make each step atomic, what a lookup
//! returns (holder, gate) and how it is parsed, and the key layout under the prefix.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::Script;

use crate::cache::tier2::SharedTier;
use crate::core::model::SessionKey;

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
pub(super) const PUT: &str = r"
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";

/// Extends the lock only while it still holds our fencing token.
pub(super) const RENEW: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";

/// Deletes the lock only if it still holds our fencing token (another replica may have
/// taken it after ours expired).
pub(super) const UNLOCK: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Closes the gate for `ARGV[2]` ms (kind `ARGV[1]`) unless it is closed longer already.
pub(super) const CLOSE_GATE: &str = r"
if redis.call('PTTL', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";

// `redis::Script::new` hashes the code (SHA-1) each time: each script is built once.
pub(super) static LOOKUP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LOOKUP));
pub(super) static PUT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PUT));
pub(super) static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
pub(super) static UNLOCK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(UNLOCK));
pub(super) static CLOSE_GATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CLOSE_GATE));

/// Longest a gate read from Redis may close Graph here, whatever it says.
pub(super) const MAX_GATE: Duration = Duration::from_secs(24 * 3600);

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
    pub(super) fn as_str(self) -> &'static str {
        match self {
            LookMode::Miss => "miss",
            LookMode::Lock => "lock",
            LookMode::Revalidate => "revalidate",
            LookMode::Peek => "peek",
        }
    }
}

/// The gate's kind and its key's remaining time (`PTTL`; negative: no expiry or no key).
pub(super) fn parse_gate(kind: &str, key_ttl_ms: i64) -> Option<SharedGate> {
    let left = Duration::from_millis(u64::try_from(key_ttl_ms).ok()?).min(MAX_GATE);
    (!left.is_zero()).then_some(SharedGate {
        left,
        throttled: kind == "throttled",
    })
}

/// The key layout (see the module map in `tier2`).
impl SharedTier {
    /// `{kind}:{event}:{version}:s:{session}` or `...:l`.
    pub(super) fn key_suffix(key: &SessionKey) -> String {
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

    pub(super) fn entry_key(&self, key: &SessionKey) -> String {
        format!("{}e:{}", self.prefix, Self::key_suffix(key))
    }

    pub(super) fn lock_key(&self, key: &SessionKey) -> String {
        format!("{}lock:{}", self.prefix, Self::key_suffix(key))
    }

    pub(super) fn gate_key(&self) -> String {
        format!("{}gate", self.prefix)
    }

    pub(super) fn unshared_key(&self, key: &SessionKey) -> String {
        format!("{}unshared:{}", self.prefix, Self::key_suffix(key))
    }

    pub(super) fn generation_key(&self) -> String {
        format!("{}gen", self.prefix)
    }

    pub(super) fn channel(&self) -> String {
        format!("{}purge", self.prefix)
    }
}

/// Escapes Redis glob characters so ids and the prefix match literally.
pub(super) fn glob_escape(text: &str) -> String {
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
    use crate::core::model::Kind;

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
