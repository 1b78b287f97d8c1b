//! [`Remembered`]: a value that stands until an instant (a failure answered again without
//! a new request until then, an attempt that keeps the next one away); [`Recent`] holds
//! at most one of them. Instants are the shared [`Clock`](crate::core::clock::Clock)'s.

use std::sync::RwLock;

use tokio::time::Instant;

/// A value and until when it stands.
#[derive(Debug, Clone)]
pub(crate) struct Remembered<T> {
    value: T,
    until: Instant,
}

impl<T> Remembered<T> {
    pub(crate) fn new(value: T, until: Instant) -> Remembered<T> {
        Remembered { value, until }
    }

    /// The value, while it stands at `now` (strictly before `until`).
    pub(crate) fn standing(&self, now: Instant) -> Option<&T> {
        (now < self.until).then_some(&self.value)
    }
}

/// At most one remembered value; a new one replaces the old.
#[derive(Debug)]
pub(crate) struct Recent<T>(RwLock<Option<Remembered<T>>>);

impl<T: Clone> Recent<T> {
    pub(crate) fn new() -> Recent<T> {
        Recent(RwLock::new(None))
    }

    pub(crate) fn remember(&self, value: T, until: Instant) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Remembered::new(value, until));
    }

    pub(crate) fn forget(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The value, while it stands at `now`.
    pub(crate) fn get(&self, now: Instant) -> Option<T> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|remembered| remembered.standing(now).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_value_stands_until_its_instant_and_not_at_it() {
        let now = Instant::now();
        let remembered = Remembered::new("refused", now + Duration::from_secs(1));
        assert_eq!(remembered.standing(now), Some(&"refused"));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(remembered.standing(Instant::now()), Some(&"refused"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(remembered.standing(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn recent_keeps_the_last_value_until_forgotten() {
        let recent = Recent::new();
        let now = Instant::now();
        assert_eq!(recent.get(now), None);
        recent.remember(1, now + Duration::from_secs(1));
        recent.remember(2, now + Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(recent.get(Instant::now()), Some(2));
        recent.forget();
        assert_eq!(recent.get(Instant::now()), None);
        // A value already past its instant stands for nobody.
        recent.remember(3, Instant::now());
        assert_eq!(recent.get(Instant::now()), None);
    }
}
