//! What Graph posts to `notifications.path`: the validation handshake, answered at once;
//! change and lifecycle notifications, accepted (202) after a parse and queued, then
//! checked item by item in the background (our subscription, our `clientState` compared in
//! constant time, a session of that subscription's webinar) and acted on. Nothing an item
//! says is trusted beyond that: it can only make the proxy refresh, from the allow-listed
//! Graph URL, a session of a webinar it subscribed to.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::cache::tier2::Purge;
use crate::cache::SessionCache;
use crate::core::model::{Kind, SessionKey};
use crate::notify::{Notifications, Phase, Webinar};

/// Larger notification bodies are refused unread (Graph's batches are far smaller).
pub const MAX_BODY: usize = 1 << 20;
/// Accepted batches waiting for the worker; beyond, requests are refused (503).
pub(super) const QUEUE: usize = 256;
/// Requests per second to the notification path, and the burst, beyond which it answers
/// 429 without reading them.
const FLOOD_RATE: u32 = 100;
const FLOOD_BURST: u32 = 400;
/// The longest validation token echoed.
const MAX_TOKEN: usize = 4096;

pub(super) struct FloodGate(
    RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>,
);

impl FloodGate {
    pub(super) fn new() -> FloodGate {
        let rate = NonZeroU32::new(FLOOD_RATE).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(FLOOD_BURST).unwrap_or(NonZeroU32::MIN);
        FloodGate(RateLimiter::direct_with_clock(
            Quota::per_second(rate).allow_burst(burst),
            MonotonicClock,
        ))
    }
}

/// How the notification path answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `200 text/plain` with the token (the validation handshake).
    Validation(String),
    /// `202`: queued.
    Accepted,
    /// `400 invalidRequest`: not a notification batch.
    Malformed(&'static str),
    /// `429` (too many requests) or `503` (the queue is full): nothing read or done.
    Flooded { queue_full: bool },
}

#[derive(Debug, Deserialize)]
struct Batch {
    value: Vec<Item>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Item {
    #[serde(default)]
    subscription_id: String,
    #[serde(default)]
    client_state: Option<String>,
    #[serde(default)]
    change_type: Option<String>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    resource_data: Option<ResourceData>,
    #[serde(default)]
    lifecycle_event: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResourceData {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "@odata.id", default)]
    odata_id: Option<String>,
}

/// `solutions/virtualEvents/webinars/{webinar}[/sessions[/{session}]]` → (webinar, session).
fn parse_resource(resource: &str) -> Option<(&str, Option<&str>)> {
    let parts: Vec<&str> = resource.trim_start_matches('/').split('/').collect();
    let fixed = |part: &str, want: &str| part.eq_ignore_ascii_case(want);
    match parts.as_slice() {
        [s, v, w, webinar, rest @ ..]
            if fixed(s, "solutions") && fixed(v, "virtualEvents") && fixed(w, "webinars") =>
        {
            match rest {
                [] => Some((webinar, None)),
                [sessions] if fixed(sessions, "sessions") => Some((webinar, None)),
                [sessions, session] if fixed(sessions, "sessions") => {
                    Some((webinar, Some(session)))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

impl Notifications {
    /// The `validationToken` of a validation request, decoded, if the query has one.
    pub fn validation_token(query: Option<&str>) -> Option<String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
        pairs
            .into_iter()
            .find(|(k, _)| k == "validationToken")
            .map(|(_, v)| v)
    }

    /// Whether the validation token can be echoed (not empty, not huge, no line breaks).
    pub fn echoable(token: &str) -> bool {
        !token.is_empty() && token.len() <= MAX_TOKEN && !token.contains(['\r', '\n'])
    }

    /// One more request to the notification path: `false` when it is flooded.
    pub fn admit(&self) -> bool {
        let ok = self.flood.0.check().is_ok();
        if !ok {
            self.count("flooded", 1);
        }
        ok
    }

    /// Counts a refused body (too large, unreadable).
    pub fn refused(&self, outcome: &'static str) {
        self.count(outcome, 1);
    }

    /// A validation request answered.
    pub fn validated(&self) {
        self.count("validation", 1);
    }

    /// A notification body: parsed now (so garbage is refused) and its items' `clientState`
    /// checked now (so that a sender without the secret can neither fill the queue nor
    /// make this replica look its subscription up in the shared tier), acted on later.
    pub fn accept(&self, body: &[u8]) -> Answer {
        let batch: Batch = match serde_json::from_slice(body) {
            Ok(batch) => batch,
            Err(_) => {
                self.count("malformed", 1);
                return Answer::Malformed(
                    "the body is not a JSON object with a \"value\" array of notifications",
                );
            }
        };
        let mut items = batch.value;
        let offered = items.len();
        items.retain(|item| self.client_state_matches(item.client_state.as_deref()));
        let forged = offered - items.len();
        if forged > 0 {
            self.count("bad_client_state", forged as u64);
            // Anyone who can reach the path can send these: counted, logged at debug only.
            tracing::debug!(
                items = forged,
                "notification items with a wrong clientState; ignored"
            );
        }
        if items.is_empty() {
            return Answer::Accepted;
        }
        match self.queue.try_send(items) {
            Ok(()) => Answer::Accepted,
            Err(_) => {
                self.count("flooded", 1);
                Answer::Flooded { queue_full: true }
            }
        }
    }

    pub(super) async fn work(
        self: Arc<Self>,
        cache: Arc<SessionCache>,
        mut receiver: mpsc::Receiver<Vec<Item>>,
    ) {
        while let Some(items) = receiver.recv().await {
            self.process(&cache, items).await;
        }
    }

    /// The webinar whose subscription `id` is, if it is one we know (or, with a shared
    /// tier, one the webinar's holder recorded since we last looked).
    async fn owner(
        &self,
        id: &str,
        resource: Option<&str>,
        cache: &SessionCache,
    ) -> Option<Arc<Webinar>> {
        let known = |w: &Webinar| w.sub().id.as_deref() == Some(id);
        if let Some(w) = self.all().into_iter().find(|w| known(w)) {
            return Some(w);
        }
        let shared = self.shared.as_ref()?;
        let (webinar, _) = parse_resource(resource?)?;
        let w = self.webinar(webinar)?;
        let claim = shared
            .read_subscription(&w.id, self.clock.wall_ms())
            .await
            .ok()?;
        let _ = cache;
        if claim.id.as_deref() != Some(id) {
            return None;
        }
        {
            let mut s = w.sub();
            s.phase = if claim.ours {
                Phase::Active
            } else {
                Phase::Shared
            };
            s.id = claim.id;
            s.expires_ms = claim.expires_ms;
        }
        Some(w)
    }

    async fn process(&self, cache: &Arc<SessionCache>, items: Vec<Item>) {
        let mut sessions: BTreeSet<(Box<str>, Box<str>)> = BTreeSet::new();
        for item in items {
            let resource = item
                .resource
                .as_deref()
                .or(item.resource_data.as_ref().and_then(|d| d.id.as_deref()));
            // Checked in `accept` already; kept here so that no other way in skips it.
            if !self.client_state_matches(item.client_state.as_deref()) {
                self.count("bad_client_state", 1);
                continue;
            }
            let Some(w) = self.owner(&item.subscription_id, resource, cache).await else {
                self.count("unknown_subscription", 1);
                continue;
            };
            if let Some(event) = item.lifecycle_event.as_deref() {
                self.count("lifecycle", 1);
                self.lifecycle(&w, &item.subscription_id, event, cache)
                    .await;
                continue;
            }
            let named = item
                .resource_data
                .as_ref()
                .and_then(|d| d.id.as_deref().or(d.odata_id.as_deref()))
                .and_then(parse_resource);
            match named {
                Some((webinar, Some(session))) if webinar == &*w.id => {
                    if item.change_type.as_deref() == Some("created") {
                        self.count("created", 1);
                    }
                    sessions.insert((webinar.into(), session.into()));
                }
                Some(_) => self.count("mismatch", 1),
                None => self.count("malformed", 1),
            }
        }
        for (webinar, session) in sessions {
            let Ok(key) = SessionKey::new(Kind::Webinars, &webinar, &session) else {
                self.count("malformed", 1);
                continue;
            };
            self.refresh(cache, key).await;
        }
    }

    /// A session changed: dropped everywhere (every version, and the webinar's list),
    /// then the versions this replica held fetched again at once.
    async fn refresh(&self, cache: &Arc<SessionCache>, key: SessionKey) {
        let versions = cache.cached_versions(&key);
        cache.purge_everywhere(Purge::Key(key.clone())).await;
        if versions.is_empty() {
            self.count("refreshed", 1);
            return;
        }
        let mut ok = true;
        for version in versions {
            if let Err(e) = cache.refresh_now(&version).await {
                tracing::warn!(key = %version, error = %e, "could not refresh a session a notification named; the next read asks Graph");
                ok = false;
            }
        }
        self.count(if ok { "refreshed" } else { "refresh_failed" }, 1);
    }

    async fn lifecycle(&self, w: &Arc<Webinar>, id: &str, event: &str, cache: &Arc<SessionCache>) {
        match event {
            "reauthorizationRequired" => {
                let result = self.api.reauthorize(id).await;
                self.called("reauthorize", result.as_ref().map(drop));
                if result.is_err() {
                    self.renew(w, cache).await;
                }
            }
            "subscriptionRemoved" => {
                tracing::warn!(webinar = %w.id, subscription = %id, "Graph removed the change notification subscription; creating a new one");
                if let Some(shared) = &self.shared {
                    shared.forget_subscription(&w.id, id).await;
                }
                self.not_live(w, cache, Phase::Pending);
                w.sub().claim_at = tokio::time::Instant::now();
                self.wake.notify_one();
            }
            "missed" => {
                tracing::warn!(webinar = %w.id, "Graph missed change notifications; the webinar's cached sessions are dropped");
                cache
                    .purge_everywhere(Purge::Event(Kind::Webinars, w.id.to_string()))
                    .await;
            }
            other => {
                tracing::debug!(webinar = %w.id, event = other, "ignored an unknown lifecycle event")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_parse_one_way() {
        assert_eq!(
            parse_resource("solutions/virtualEvents/webinars/w1@t/sessions/s1"),
            Some(("w1@t", Some("s1")))
        );
        assert_eq!(
            parse_resource("/solutions/virtualEvents/webinars/w1/sessions"),
            Some(("w1", None))
        );
        for bad in [
            "",
            "solutions/virtualEvents/townhalls/w/sessions/s",
            "solutions/virtualEvents/webinars/w/sessions/s/extra",
            "users/x",
            "solutions/virtualEvents/webinars/w/registrations/r",
        ] {
            assert_eq!(parse_resource(bad), None, "{bad}");
        }
    }

    #[test]
    fn validation_tokens_are_decoded() {
        assert_eq!(
            Notifications::validation_token(Some("validationToken=a%20b%2Bc%3D")).as_deref(),
            Some("a b+c=")
        );
        assert_eq!(Notifications::validation_token(Some("x=1")), None);
        assert_eq!(Notifications::validation_token(None), None);
        assert!(!Notifications::echoable(""));
        assert!(!Notifications::echoable("a\r\nSet-Cookie: x"));
        assert!(Notifications::echoable(
            "Validation: Testing client application reachability"
        ));
    }
}
