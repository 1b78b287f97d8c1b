//! [`Push`]: what the cache tells change notifications (`notify`, a layer above) and asks
//! them. The cache reports which webinars are read and stored; it asks whether a live
//! subscription makes a new answer fresh for `notifications.ttl` instead of `cache.ttl`.

use std::time::Duration;

/// Implemented by `notify::Notifications`; only webinars are ever reported (town halls
/// cannot be subscribed to).
pub trait Push: Send + Sync {
    /// A cached answer of this webinar was read (the hit path: must be cheap).
    fn read(&self, webinar: &str);
    /// An answer of this webinar (a session or its list, not a 404) was stored.
    fn stored(&self, webinar: &str);
    /// The freshness an answer of this webinar stored now gets, when a live subscription
    /// covers it.
    fn fresh_for(&self, webinar: &str) -> Option<Duration>;
    /// `notifications.ttl`: the longest freshness a pushed entry can have.
    fn ttl(&self) -> Duration;
}
