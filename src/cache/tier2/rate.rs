//! One rate-limit decision in Redis, shared by every replica: GCRA (the generic cell rate
//! algorithm, as `redis-cell` and Envoy's global rate limit service use), one atomic Lua
//! step per decision, on Redis's own clock so replicas' clocks do not matter.
//!
//! ```text
//! gsp:rl:{limit}:{bucket}    theoretical arrival time (µs since the epoch), PX = until the bucket is full again
//! ```

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{SharedTier, Unavailable};

/// KEYS[1] the bucket; ARGV[1] emission interval (µs), ARGV[2] burst.
/// Returns `{1, 0}` when admitted (and charged), `{0, wait µs}` when refused.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {0, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
";

// Built once (`Script::new` hashes the code).
static GCRA_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA));

impl SharedTier {
    /// Charges one unit to `bucket`'s `limit`, which admits one per `interval` with a
    /// bucket of `burst`: `Ok(None)` admitted, `Ok(Some(wait))` refused for `wait`.
    pub async fn charge(
        &self,
        limit: &str,
        bucket: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Option<Duration>, Unavailable> {
        let mut conn = self.link.conn();
        let script = &*GCRA_SCRIPT;
        let mut invocation = script.key(format!("{}rl:{limit}:{bucket}", self.prefix));
        invocation
            .arg(
                u64::try_from(interval.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .arg(burst.max(1));
        let (admitted, wait_us): (i64, i64) = self
            .link
            .run("rate", invocation.invoke_async(&mut conn))
            .await?;
        Ok((admitted == 0).then(|| Duration::from_micros(wait_us.max(0) as u64)))
    }
}
