//! [`Notifications`]: Graph change notifications for webinar sessions (`[notifications]`).
//!
//! A webinar whose session (or list) is cached gets one subscription to
//! `solutions/virtualEvents/webinars/{id}/sessions` (`created,updated`), created in the
//! background, renewed `renew_before` its expiry, deleted when nobody read the webinar for
//! `idle_unsubscribe`, at most `max_subscriptions` at once (the least recently read fall
//! back to polling). While a subscription is live, what the cache stores for the webinar is
//! fresh for `notifications.ttl` (`Cache-Status: ...; detail=push`); a notification naming a
//! session refreshes it from Graph at once. Anything that stops the subscription (Graph
//! refuses it, it lapses, it is removed) puts the webinar back on `cache.ttl` polling.
//!
//! With `[cache.shared]` the replicas share one subscription per webinar: the one holding
//! the webinar's lease in Redis creates and renews it and records its id there, every
//! replica accepts the notifications for it, and a refresh reaches the others through the
//! purge channel.
//!
//! ```text
//! mod.rs      Notifications: the webinars known, their subscription state, the Push hook
//! upkeep.rs   the background loop: create, renew, claim, unsubscribe idle, cap
//! inbox.rs    what Graph posts: validation, checks, the refreshes and lifecycle events
//! ```

mod inbox;
mod upkeep;

pub use inbox::{Answer, MAX_BODY};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::mpsc;

use crate::cache::tier2::SharedTier;
use crate::cache::{Push, SessionCache};
use crate::config::NotificationSettings;
use crate::core::clock::Clock;
use crate::telemetry::{names, Metrics};
use crate::upstream::subscriptions::SubscriptionsApi;

/// Where a webinar's subscription stands on this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Wanted, not (yet) created: polled meanwhile.
    Pending,
    /// This replica holds a live subscription.
    Active,
    /// Another replica holds it (with `[cache.shared]`): live while `id` is known.
    Shared,
    /// Graph refused it (or was unreachable): polled, retried at `retry_ms`.
    Failed,
    /// No slot left under `max_subscriptions`: polled.
    Capped,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Active => "active",
            Phase::Shared => "shared",
            Phase::Failed => "failed",
            Phase::Capped => "capped",
        }
    }

    const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Active,
        Phase::Shared,
        Phase::Failed,
        Phase::Capped,
    ];
}

#[derive(Debug)]
struct Sub {
    phase: Phase,
    /// The subscription's id (ours, or the holder's with a shared tier).
    id: Option<String>,
    /// Its expiry, ms since the Unix epoch on [`Clock::wall`].
    expires_ms: u64,
    /// Failed attempts in a row (the backoff) and when the next may start.
    failures: u32,
    retry_ms: u64,
    /// The current failure was logged (once per incident).
    logged: bool,
    /// With a shared tier: when the lease is next claimed or checked (real time).
    claim_at: tokio::time::Instant,
}

/// One webinar the cache holds answers of.
struct Webinar {
    id: Box<str>,
    last_read_ms: AtomicU64,
    /// A Graph or Redis step for it is in progress (one at a time).
    busy: AtomicBool,
    sub: Mutex<Sub>,
}

impl Webinar {
    fn sub(&self) -> std::sync::MutexGuard<'_, Sub> {
        self.sub.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_live(&self, now_ms: u64) -> bool {
        let sub = self.sub();
        matches!(sub.phase, Phase::Active | Phase::Shared)
            && sub.id.is_some()
            && sub.expires_ms > now_ms
    }
}

pub struct Notifications {
    settings: NotificationSettings,
    client_state: SecretString,
    api: SubscriptionsApi,
    clock: Clock,
    metrics: Arc<Metrics>,
    shared: Option<Arc<SharedTier>>,
    webinars: RwLock<HashMap<Box<str>, Arc<Webinar>>>,
    /// Wakes the upkeep loop (a webinar was first stored, a subscription was removed).
    wake: tokio::sync::Notify,
    /// Accepted notification items waiting for the worker.
    queue: mpsc::Sender<Vec<inbox::Item>>,
    inbox: Mutex<Option<mpsc::Receiver<Vec<inbox::Item>>>>,
    /// Requests to the notification path, beyond which it answers 429 without work.
    flood: inbox::FloodGate,
}

impl Notifications {
    /// `settings` validated, `client_state_file` read (`Settings::load` does both).
    pub fn new(
        settings: &NotificationSettings,
        api: SubscriptionsApi,
        clock: Clock,
        metrics: Arc<Metrics>,
        shared: Option<Arc<SharedTier>>,
    ) -> Option<Arc<Notifications>> {
        let client_state = settings.client_state.clone()?;
        let (queue, inbox) = mpsc::channel(inbox::QUEUE);
        let notifications = Arc::new(Notifications {
            settings: settings.clone(),
            client_state,
            api,
            clock,
            metrics,
            shared,
            webinars: RwLock::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            queue,
            inbox: Mutex::new(Some(inbox)),
            flood: inbox::FloodGate::new(),
        });
        notifications.publish_states();
        Some(notifications)
    }

    /// The caller-listener path Graph posts to.
    pub fn path(&self) -> &str {
        &self.settings.path
    }

    /// Runs the upkeep loop and the notification worker until dropped.
    pub async fn run(self: Arc<Self>, cache: Arc<SessionCache>) {
        let receiver = self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        let worker = async {
            if let Some(receiver) = receiver {
                self.clone().work(cache.clone(), receiver).await;
            }
            std::future::pending::<()>().await
        };
        tokio::join!(self.clone().upkeep(cache.clone()), worker);
    }

    /// At shutdown without a shared tier: deletes the subscriptions this replica holds
    /// (Graph allows one per webinar, so a restarted proxy could not create its own while
    /// they live), for at most 3 seconds. With a shared tier they are left to the other
    /// replicas, which take them over when this one's lease lapses.
    pub async fn shutdown(&self) {
        if self.shared.is_some() {
            return;
        }
        let ids: Vec<String> = self
            .all()
            .iter()
            .filter_map(|w| {
                let s = w.sub();
                (s.phase == Phase::Active).then(|| s.id.clone()).flatten()
            })
            .collect();
        if ids.is_empty() {
            return;
        }
        let deletes = futures::future::join_all(ids.iter().map(|id| self.api.delete(id)));
        match tokio::time::timeout(Duration::from_secs(3), deletes).await {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.is_err()).count();
                tracing::info!(deleted = ids.len() - failed, failed, "change notification subscriptions deleted at shutdown");
            }
            Err(_) => tracing::warn!("deleting change notification subscriptions at shutdown timed out (they expire on their own)"),
        }
    }

    fn webinar(&self, id: &str) -> Option<Arc<Webinar>> {
        self.webinars
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<Webinar>> {
        self.webinars
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn forget(&self, id: &str) {
        self.webinars
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn client_state_matches(&self, offered: Option<&str>) -> bool {
        use subtle::ConstantTimeEq;
        let ours = self.client_state.expose_secret().as_bytes();
        offered.is_some_and(|o| bool::from(o.as_bytes().ct_eq(ours)))
    }

    fn count(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.metrics
                .counter(names::NOTIFICATIONS, &[("outcome", outcome)])
                .increment(n);
        }
    }

    /// Sets `subscriptions{state}` from the webinars' phases.
    fn publish_states(&self) {
        let mut counts = [0u64; Phase::ALL.len()];
        for webinar in self.all() {
            let phase = webinar.sub().phase;
            if let Some(i) = Phase::ALL.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (phase, n) in Phase::ALL.iter().zip(counts) {
            self.metrics
                .gauge(names::SUBSCRIPTIONS, &[("state", phase.label())])
                .set(n as f64);
        }
    }

    /// Seconds of backoff after `failures` failed attempts: 30 s doubling to an hour, or
    /// Graph's `Retry-After` when longer.
    fn backoff(failures: u32, retry_after: Option<Duration>) -> Duration {
        let base = Duration::from_secs(30).saturating_mul(1 << failures.saturating_sub(1).min(7));
        base.min(Duration::from_secs(3600))
            .max(retry_after.unwrap_or_default())
    }
}

impl Push for Notifications {
    fn read(&self, webinar: &str) {
        if let Some(w) = self
            .webinars
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(webinar)
        {
            w.last_read_ms
                .store(self.clock.wall_ms(), Ordering::Relaxed);
        }
    }

    fn stored(&self, webinar: &str) {
        let now_ms = self.clock.wall_ms();
        if let Some(w) = self.webinar(webinar) {
            w.last_read_ms.store(now_ms, Ordering::Relaxed);
            return;
        }
        let fresh = Arc::new(Webinar {
            id: webinar.into(),
            last_read_ms: AtomicU64::new(now_ms),
            busy: AtomicBool::new(false),
            sub: Mutex::new(Sub {
                phase: Phase::Pending,
                id: None,
                expires_ms: 0,
                failures: 0,
                retry_ms: 0,
                logged: false,
                claim_at: tokio::time::Instant::now(),
            }),
        });
        self.webinars
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(webinar.into())
            .or_insert(fresh);
        self.wake.notify_one();
    }

    fn fresh_for(&self, webinar: &str) -> Option<Duration> {
        let w = self.webinar(webinar)?;
        w.is_live(self.clock.wall_ms()).then_some(self.settings.ttl)
    }

    fn ttl(&self) -> Duration {
        self.settings.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_an_hour_and_honours_retry_after() {
        let b = |n, r| Notifications::backoff(n, r).as_secs();
        assert_eq!(b(1, None), 30);
        assert_eq!(b(2, None), 60);
        assert_eq!(b(3, None), 120);
        assert_eq!(b(20, None), 3600);
        assert_eq!(b(1, Some(Duration::from_secs(600))), 600);
    }
}
