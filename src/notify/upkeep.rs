//! The background loop: every webinar's subscription created, renewed `renew_before` its
//! expiry, re-claimed (with a shared tier), deleted when idle, and kept under
//! `max_subscriptions`. One Graph or Redis step per webinar at a time, each on its own
//! task, so a slow Graph (a create waits for Graph's validation call) holds nothing else up.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cache::tier2::Unavailable;
use crate::cache::SessionCache;
use crate::core::model::Kind;
use crate::notify::{Notifications, Phase, Webinar};
use crate::telemetry::names;
use crate::upstream::subscriptions::{Request, SubscriptionError};

/// How often the loop looks at every webinar (it also wakes when one is first stored).
const TICK: Duration = Duration::from_millis(250);
/// A replica's lease on a webinar's subscription (shared tier), and how often the lease is
/// extended (holder) or the record read (the others).
pub(super) const LEASE: Duration = Duration::from_secs(60);
const CLAIM_EVERY: Duration = Duration::from_secs(5);
/// A webinar without a slot takes the least recently read one's only when it was read
/// this much more recently (no churn between webinars read about as often).
const EVICT_MARGIN_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
enum Step {
    Create,
    Renew,
    Claim,
    /// Idle: deleted and forgotten.
    Unsubscribe,
    /// Its slot went to a webinar read more recently: deleted, polled from now on.
    Evict,
}

pub(super) fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Notifications {
    pub(super) async fn upkeep(self: Arc<Self>, cache: Arc<SessionCache>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = self.wake.notified() => {}
            }
            self.tick(&cache);
            self.publish_states();
        }
    }

    fn tick(self: &Arc<Self>, cache: &Arc<SessionCache>) {
        let now = self.clock.wall_ms();
        let idle_ms = self.settings.idle_unsubscribe.as_millis() as u64;
        let renew_ms = self.settings.renew_before.as_millis() as u64;
        let mut all = self.all();
        all.retain(|w| {
            let idle = now.saturating_sub(w.last_read_ms.load(Ordering::Relaxed)) >= idle_ms;
            if idle {
                self.start(w, cache, Step::Unsubscribe);
            }
            !idle
        });
        all.sort_by_key(|w| Reverse(w.last_read_ms.load(Ordering::Relaxed)));
        let mut held = all
            .iter()
            .filter(|w| {
                let phase = w.sub().phase;
                // A create in flight holds a slot whatever phase it started from.
                phase == Phase::Active
                    || (matches!(phase, Phase::Pending | Phase::Failed | Phase::Capped)
                        && w.busy.load(Ordering::Acquire))
            })
            .count();
        let real_now = tokio::time::Instant::now();
        for w in &all {
            if w.busy.load(Ordering::Acquire) {
                continue;
            }
            let (phase, has_id, expires, retry, claim_due) = {
                let s = w.sub();
                (
                    s.phase,
                    s.id.is_some(),
                    s.expires_ms,
                    s.retry_ms,
                    s.claim_at <= real_now,
                )
            };
            let claim_due = claim_due && self.shared.is_some();
            let step = match phase {
                Phase::Active if expires <= now => {
                    // Renewal failed until the end: polled until a new one is made.
                    self.not_live(w, cache, Phase::Pending);
                    tracing::warn!(webinar = %w.id, "change notification subscription lapsed; polling by cache.ttl until it is recreated");
                    None
                }
                Phase::Active if claim_due => Some(Step::Claim),
                Phase::Active if expires.saturating_sub(renew_ms) <= now && retry <= now => {
                    Some(Step::Renew)
                }
                Phase::Active => None,
                Phase::Shared if claim_due || (has_id && expires <= now) => Some(Step::Claim),
                Phase::Shared => None,
                Phase::Failed if retry > now => None,
                Phase::Pending | Phase::Failed | Phase::Capped => {
                    if held < self.settings.max_subscriptions {
                        held += 1;
                        Some(Step::Create)
                    } else if let Some(victim) = self.victim(&all, w) {
                        self.start(&victim, cache, Step::Evict);
                        Some(Step::Create)
                    } else {
                        w.sub().phase = Phase::Capped;
                        None
                    }
                }
            };
            if let Some(step) = step {
                self.start(w, cache, step);
            }
        }
    }

    /// The least recently read webinar holding a subscription, if `for_` was read enough
    /// more recently to take its slot.
    fn victim(&self, all: &[Arc<Webinar>], for_: &Webinar) -> Option<Arc<Webinar>> {
        let wanted = for_.last_read_ms.load(Ordering::Relaxed);
        all.iter()
            .filter(|w| !w.busy.load(Ordering::Acquire) && w.sub().phase == Phase::Active)
            .min_by_key(|w| w.last_read_ms.load(Ordering::Relaxed))
            .filter(|w| w.last_read_ms.load(Ordering::Relaxed) + EVICT_MARGIN_MS <= wanted)
            .cloned()
    }

    fn start(self: &Arc<Self>, w: &Arc<Webinar>, cache: &Arc<SessionCache>, step: Step) {
        if w.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, w, cache) = (self.clone(), w.clone(), cache.clone());
        tokio::spawn(async move {
            match step {
                Step::Create => this.create(&w, &cache).await,
                Step::Renew => this.renew(&w, &cache).await,
                Step::Claim => this.claim(&w, &cache).await,
                Step::Unsubscribe => {
                    this.delete(&w, &cache, Phase::Pending).await;
                    this.forget(&w.id);
                }
                Step::Evict => this.delete(&w, &cache, Phase::Capped).await,
            }
            w.busy.store(false, Ordering::Release);
            this.publish_states();
        });
    }

    /// The webinar is polled from now on: what a live subscription made fresh for
    /// `notifications.ttl` is fresh for `cache.ttl` again.
    pub(super) fn not_live(&self, w: &Webinar, cache: &SessionCache, phase: Phase) {
        // Not `is_live`: a subscription that just lapsed made entries fresh by push too.
        let was_live = {
            let s = w.sub();
            matches!(s.phase, Phase::Active | Phase::Shared) && s.id.is_some()
        };
        {
            let mut s = w.sub();
            s.phase = phase;
            s.id = None;
            s.expires_ms = 0;
        }
        if was_live {
            let n = cache.unpush_event(Kind::Webinars, &w.id);
            tracing::debug!(webinar = %w.id, entries = n, "webinar back on cache.ttl polling");
        }
    }

    pub(super) fn called(&self, op: &'static str, result: Result<(), &SubscriptionError>) {
        let outcome = match result {
            Ok(()) => "ok".to_string(),
            Err(e) if e.status == 0 => e.code.clone(),
            Err(e) => e.status.to_string(),
        };
        self.metrics
            .counter(
                names::SUBSCRIPTION_CALLS,
                &[("operation", op), ("outcome", &outcome)],
            )
            .increment(1);
    }

    /// After Graph granted a subscription until `expires_ms`: when it may next be renewed.
    /// Normally `renew_before` its end (no wait: 0); when Graph granted less than
    /// `renew_before`, halfway through what it granted, not on every tick.
    fn next_renewal(&self, w: &Webinar, expires_ms: u64) -> u64 {
        let now = self.clock.wall_ms();
        let left = expires_ms.saturating_sub(now);
        if left > self.settings.renew_before.as_millis() as u64 {
            return 0;
        }
        tracing::debug!(
            webinar = %w.id,
            granted = %humantime::format_duration(Duration::from_millis(left)),
            "Graph granted the subscription less than notifications.renew_before; renewing it halfway through"
        );
        now.saturating_add(left / 2)
    }

    /// A failed step: backoff, and a log line once per incident.
    fn failed(&self, w: &Webinar, op: &'static str, e: &SubscriptionError, phase: Option<Phase>) {
        let now = self.clock.wall_ms();
        let mut s = w.sub();
        s.failures = s.failures.saturating_add(1);
        let wait = Notifications::backoff(s.failures, e.retry_after);
        s.retry_ms = now.saturating_add(wait.as_millis() as u64);
        if let Some(phase) = phase {
            s.phase = phase;
        }
        if !s.logged {
            s.logged = true;
            let why = match e.status {
                403 => "Graph refused it: the app needs the VirtualEvent.Read.All application permission",
                409 => "Graph has a subscription for this webinar already (another replica without [cache.shared]?)",
                400 => "Graph refused it (did the validation request reach notifications.path?)",
                _ => "Graph did not take it",
            };
            tracing::warn!(
                webinar = %w.id, operation = op, status = e.status, code = %e.code,
                retry_in = %humantime::format_duration(wait),
                "change notification subscription failed ({why}); its sessions are polled by cache.ttl meanwhile"
            );
        }
    }

    async fn create(&self, w: &Webinar, cache: &SessionCache) {
        let now = self.clock.wall_ms();
        if let Some(shared) = &self.shared {
            match shared.claim_subscription(&w.id, now, LEASE).await {
                Ok(claim) if !claim.ours => {
                    let mut s = w.sub();
                    s.phase = Phase::Shared;
                    s.id = claim.id;
                    s.expires_ms = claim.expires_ms;
                    s.claim_at = tokio::time::Instant::now() + CLAIM_EVERY;
                    return;
                }
                Ok(claim) => {
                    if let (Some(id), true) = (claim.id, claim.expires_ms > now) {
                        // Its holder went away: ours now, as it stands.
                        let mut s = w.sub();
                        s.phase = Phase::Active;
                        s.id = Some(id);
                        s.expires_ms = claim.expires_ms;
                        s.claim_at = tokio::time::Instant::now() + CLAIM_EVERY;
                        return;
                    }
                }
                Err(Unavailable) => {}
            }
        }
        let notification_url = self.settings.notification_url.as_str();
        let request = Request {
            webinar: &w.id,
            notification_url,
            client_state: secrecy::ExposeSecret::expose_secret(&self.client_state),
            expires: self.clock.wall() + self.settings.lifetime,
        };
        match self.api.create(&request).await {
            Ok(sub) => {
                self.called("create", Ok(()));
                let expires_ms = ms(sub.expires);
                // Not recorded: another replica took the lease of a record Redis lost
                // meanwhile; claimed again at once, to record it when that lease is given up.
                let mut recorded = true;
                if let Some(shared) = &self.shared {
                    recorded = shared
                        .record_subscription(
                            &w.id,
                            &sub.id,
                            expires_ms,
                            self.clock.wall_ms(),
                            LEASE,
                        )
                        .await;
                }
                tracing::info!(webinar = %w.id, subscription = %sub.id, expires = %humantime::format_rfc3339_seconds(sub.expires), "subscribed to the webinar's session changes");
                let retry_ms = self.next_renewal(w, expires_ms);
                let mut s = w.sub();
                s.phase = Phase::Active;
                s.id = Some(sub.id);
                s.expires_ms = expires_ms;
                s.failures = 0;
                s.logged = false;
                s.retry_ms = retry_ms;
                s.claim_at = tokio::time::Instant::now()
                    + if recorded {
                        CLAIM_EVERY
                    } else {
                        Duration::ZERO
                    };
            }
            Err(e) => {
                self.called("create", Err(&e));
                self.failed(w, "create", &e, Some(Phase::Failed));
                if let Some(shared) = &self.shared {
                    // Let another replica try (its own validation may work).
                    shared.release_subscription(&w.id, LEASE).await;
                }
                let _ = cache;
            }
        }
    }

    pub(super) async fn renew(&self, w: &Webinar, cache: &SessionCache) {
        let Some(id) = w.sub().id.clone() else {
            return;
        };
        let expires = self.clock.wall() + self.settings.lifetime;
        match self.api.renew(&id, expires).await {
            Ok(sub) => {
                self.called("renew", Ok(()));
                let expires_ms = ms(sub.expires);
                if let Some(shared) = &self.shared {
                    shared
                        .record_subscription(&w.id, &id, expires_ms, self.clock.wall_ms(), LEASE)
                        .await;
                }
                tracing::debug!(webinar = %w.id, subscription = %id, "renewed the change notification subscription");
                let retry_ms = self.next_renewal(w, expires_ms);
                let mut s = w.sub();
                s.expires_ms = expires_ms;
                s.failures = 0;
                s.logged = false;
                s.retry_ms = retry_ms;
            }
            Err(e) if e.is_gone() => {
                self.called("renew", Err(&e));
                tracing::warn!(webinar = %w.id, subscription = %id, "the change notification subscription is gone; creating a new one");
                self.not_live(w, cache, Phase::Pending);
                self.wake.notify_one();
            }
            Err(e) => {
                self.called("renew", Err(&e));
                self.failed(w, "renew", &e, None);
            }
        }
    }

    /// With a shared tier: extends our lease (and learns of a removal another replica
    /// saw), or reads the holder's record, or takes over a holder's that lapsed.
    async fn claim(&self, w: &Webinar, cache: &SessionCache) {
        let Some(shared) = &self.shared else {
            return;
        };
        let now = self.clock.wall_ms();
        let claim = shared.claim_subscription(&w.id, now, LEASE).await;
        let next = tokio::time::Instant::now() + CLAIM_EVERY;
        let Ok(claim) = claim else {
            w.sub().claim_at = next;
            return;
        };
        let (phase, local_id, local_expires) = {
            let s = w.sub();
            (s.phase, s.id.clone(), s.expires_ms)
        };
        let live = claim.id.is_some() && claim.expires_ms > now;
        if let (true, Some(id), true) = (claim.fresh, &local_id, local_expires > now) {
            // The record is gone (Redis restarted or evicted it) while the subscription this
            // replica knows lives on at Graph, which refuses a second one (409) until it
            // lapses: recorded again, ours to renew.
            shared
                .record_subscription(&w.id, id, local_expires, now, LEASE)
                .await;
            tracing::info!(webinar = %w.id, subscription = %id, "the shared tier had lost the webinar's subscription record; recorded it again");
            w.sub().phase = Phase::Active;
            w.sub().claim_at = tokio::time::Instant::now() + CLAIM_EVERY;
            // Renewed at once: what this replica knew may be out of date (Graph removed or
            // another replica deleted it meanwhile); a 404 makes a new one.
            self.renew(w, cache).await;
            return;
        } else if claim.ours && !live {
            // Removed (another replica was told), or the old holder's lapsed: make a new one.
            self.not_live(w, cache, Phase::Pending);
            self.wake.notify_one();
        } else if !claim.ours && !live && phase == Phase::Shared && local_id.is_some() {
            self.not_live(w, cache, Phase::Shared);
        } else {
            let mut s = w.sub();
            s.phase = if claim.ours {
                Phase::Active
            } else {
                Phase::Shared
            };
            if claim.id.is_some() {
                s.id = claim.id;
                s.expires_ms = claim.expires_ms;
            }
        }
        w.sub().claim_at = next;
    }

    /// Deletes the subscription if this replica holds it; the webinar is polled.
    async fn delete(&self, w: &Webinar, cache: &SessionCache, phase: Phase) {
        let (ours, id) = {
            let s = w.sub();
            (s.phase == Phase::Active, s.id.clone())
        };
        self.not_live(w, cache, phase);
        if let (true, Some(id)) = (ours, id) {
            let result = self.api.delete(&id).await;
            self.called("delete", result.as_ref().map(drop));
            match result {
                Ok(()) => {
                    tracing::info!(webinar = %w.id, subscription = %id, "unsubscribed from the webinar's session changes")
                }
                Err(e) => {
                    tracing::warn!(webinar = %w.id, subscription = %id, status = e.status, code = %e.code, "could not delete the change notification subscription (it expires on its own)")
                }
            }
            if let Some(shared) = &self.shared {
                shared.release_subscription(&w.id, LEASE).await;
            }
        }
    }
}
