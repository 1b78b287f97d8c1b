//! The proxy's notion of "now" for freshness and token expiry.
//!
//! Production reads tokio's clock (which `tokio::time::pause()` controls in unit tests).
//! End-to-end tests talk to real sockets, where a paused clock would make every pending
//! timeout fire at once; they instead share one `Clock` between the proxy and the
//! simulator and move it forward with [`Clock::advance`], so an hour of cache or token
//! life passes in no wall-clock time while I/O timeouts keep their real meaning.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Nanoseconds added to tokio's clock; only tests ever raise it.
    skew_nanos: Arc<AtomicU64>,
}

impl Clock {
    pub fn new() -> Clock {
        Clock::default()
    }

    pub fn now(&self) -> Instant {
        Instant::now() + Duration::from_nanos(self.skew_nanos.load(Ordering::Relaxed))
    }

    /// Wall-clock time on the same timeline: what other replicas compare instants by
    /// (through the shared cache tier). Tests' advances move it too.
    pub fn wall(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() + Duration::from_nanos(self.skew_nanos.load(Ordering::Relaxed))
    }

    /// Milliseconds since the Unix epoch by [`Clock::wall`].
    pub fn wall_ms(&self) -> u64 {
        self.wall()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.skew_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn advance_is_shared_by_clones() {
        let a = Clock::new();
        let b = a.clone();
        let t0 = a.now();
        b.advance(Duration::from_secs(90));
        assert_eq!(a.now() - t0, Duration::from_secs(90));
    }
}
