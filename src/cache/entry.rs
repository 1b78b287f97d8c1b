//! [`Entry`]: one cached Graph answer, its validators and its freshness windows (how long
//! it is fresh, may be served stale, and is kept), judged by our own clock.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::CacheSettings;
use crate::core::model::SessionKey;
use crate::upstream::graph::{Fetched, GraphAnswer};

/// What an entry holds beyond its body, key ids and Graph's request id, as measured
/// (`benches/load/compare.sh`'s memory round: 100,000 cached sessions grow the RSS by
/// ~1,140 B each beyond those): moka's node, deques and timer wheel slot, the `Arc<Entry>`
/// with its validators and windows, the allocator's headers. Counted, so that
/// `cache.max_bytes` bounds the memory the cache really takes.
pub const ENTRY_OVERHEAD: usize = 1_100;

/// One cached Graph answer.
#[derive(Debug)]
pub struct Entry {
    /// The session JSON; `None` when Graph said 404.
    pub body: Option<Bytes>,
    /// Strong validator derived from the body.
    pub etag: HeaderValue,
    /// Graph's body exactly as sent (for the Graph-compatible routes) and its validator.
    pub raw: Bytes,
    pub raw_etag: HeaderValue,
    /// When Graph answered (the proxy's clock).
    pub stored_at: Instant,
    /// Fresh until then.
    pub fresh_until: Instant,
    /// Served stale (with a background refresh) without waiting, until then.
    pub revalidate_until: Instant,
    /// May still be served while Graph fails until then.
    pub stale_until: Instant,
    /// From then on a read triggers a background refresh while the entry is still fresh.
    pub refresh_from: Instant,
    pub graph_request_id: Option<HeaderValue>,
    /// Loaded from the shared tier (Redis) rather than from Graph by this replica.
    pub tier2: bool,
    /// Fresh for `notifications.ttl`: a live change-notification subscription covers it.
    pub push: bool,
}

/// An `endDateTime` further back than this marks a session as over (for `smart_ttl`).
const ENDED_AFTER: Duration = Duration::from_secs(3600);

impl Entry {
    #[cfg(test)]
    pub(super) fn new(
        answer: GraphAnswer,
        now: Instant,
        settings: &CacheSettings,
        list: bool,
    ) -> Entry {
        Entry::with_push(answer, now, settings, list, None)
    }

    /// As [`Entry::new`]; `push`: the freshness of an answer whose webinar a live
    /// subscription covers (a longer `ttl` of its own, such as an ended session's, wins).
    pub(super) fn with_push(
        answer: GraphAnswer,
        now: Instant,
        settings: &CacheSettings,
        list: bool,
        push: Option<Duration>,
    ) -> Entry {
        let mut pushed = false;
        let (body, raw, fresh_for, stale_for) = match answer.fetched {
            Fetched::Found { session, raw } => {
                let polled = Entry::polled_for(&session, settings, list);
                let fresh_for = match push {
                    Some(push) if push > polled => {
                        pushed = true;
                        push
                    }
                    _ => polled,
                };
                (Some(session), raw, fresh_for, settings.stale_if_error)
            }
            Fetched::NotFound => (None, Bytes::new(), settings.negative_ttl, Duration::ZERO),
        };
        let etag = etag_of(body.as_deref().unwrap_or(b""));
        // Unwrapped or not, the session shares `raw`'s memory; only its validator differs.
        let raw_etag = if raw.len() == body.as_ref().map_or(0, Bytes::len) {
            etag.clone()
        } else {
            etag_of(&raw)
        };
        let mut entry = Entry {
            body,
            raw,
            raw_etag,
            etag,
            stored_at: now,
            fresh_until: now,
            revalidate_until: now,
            stale_until: now,
            refresh_from: now,
            graph_request_id: answer
                .graph_request_id
                .and_then(|id| HeaderValue::from_str(&id).ok()),
            tier2: false,
            push: pushed,
        };
        entry.set_windows(fresh_for, stale_for, settings);
        if pushed {
            // Notifications keep it fresh: no refresh ahead of its end.
            entry.refresh_from = entry.fresh_until;
        }
        entry
    }

    /// The entry as polling would have stored it: for a webinar whose subscription lapsed.
    pub(super) fn unpushed(&self, settings: &CacheSettings, list: bool) -> Entry {
        let fresh_for = self.body.as_ref().map_or(settings.negative_ttl, |b| {
            Entry::polled_for(b, settings, list)
        });
        let mut entry = Entry {
            body: self.body.clone(),
            raw: self.raw.clone(),
            raw_etag: self.raw_etag.clone(),
            etag: self.etag.clone(),
            graph_request_id: self.graph_request_id.clone(),
            push: false,
            ..*self
        };
        let stale_for = self.stale_until - self.fresh_until;
        entry.set_windows(fresh_for, stale_for, settings);
        entry
    }

    /// The entry stale from `now` on (its stale windows kept as they were).
    pub(super) fn expired_at(&self, now: Instant) -> Entry {
        let fresh_until = now.max(self.stored_at);
        Entry {
            body: self.body.clone(),
            raw: self.raw.clone(),
            raw_etag: self.raw_etag.clone(),
            etag: self.etag.clone(),
            graph_request_id: self.graph_request_id.clone(),
            fresh_until,
            refresh_from: fresh_until,
            revalidate_until: self
                .revalidate_until
                .min(fresh_until + (self.revalidate_until - self.fresh_until)),
            stale_until: self
                .stale_until
                .min(fresh_until + (self.stale_until - self.fresh_until)),
            push: false,
            ..*self
        }
    }

    /// Freshness by `ttl`, `list_ttl` or (`smart_ttl`) `ttl_ended`.
    fn polled_for(session: &[u8], settings: &CacheSettings, list: bool) -> Duration {
        if list {
            settings.list_ttl
        } else if settings.smart_ttl && ended_long_ago(session, std::time::SystemTime::now()) {
            settings.ttl_ended.max(settings.ttl)
        } else {
            settings.ttl
        }
    }

    fn set_windows(&mut self, fresh_for: Duration, stale_for: Duration, settings: &CacheSettings) {
        let fresh_until = self.stored_at + fresh_for;
        self.fresh_until = fresh_until;
        self.revalidate_until = fresh_until + settings.stale_while_revalidate;
        self.stale_until = fresh_until + stale_for;
        self.refresh_from = fresh_until - fresh_for.mul_f64(settings.refresh_ahead);
    }

    /// How long moka keeps the entry: until neither stale window can use it.
    pub(super) fn keep_for(&self) -> Duration {
        self.revalidate_until.max(self.stale_until) - self.stored_at
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    /// Whole seconds since Graph answered.
    pub fn age(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.stored_at).as_secs()
    }

    /// Whole seconds of freshness left (RFC 9211 `ttl`), negative once stale.
    /// Computed from whole seconds of freshness and of age, so that `Age + ttl` always adds
    /// up to the entry's freshness lifetime.
    pub fn ttl(&self, now: Instant) -> i64 {
        let lifetime = (self.fresh_until - self.stored_at).as_secs();
        lifetime as i64 - self.age(now) as i64
    }

    pub(super) fn weight(&self, key: &SessionKey) -> u32 {
        let bytes = key.event.len()
            + key.session.as_ref().map_or(0, |s| s.len())
            + self.raw.len()
            + self.graph_request_id.as_ref().map_or(0, HeaderValue::len)
            + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// `"<32 hex digits of SHA-256>"`.
pub fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let tag = format!("\"{}\"", hex::encode(&digest[..16]));
    // ok: quotes and hex digits are always a valid header value.
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// Whether the session's `endDateTime` (a plain RFC 3339 string, or Graph's
/// `{"dateTime", "timeZone": "UTC"}`) lies more than an hour before `now`. Anything else
/// (other time zones, missing, unparsable) counts as not ended.
fn ended_long_ago(body: &[u8], now: std::time::SystemTime) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum When {
        Plain(String),
        Zoned {
            #[serde(rename = "dateTime")]
            date_time: String,
            #[serde(rename = "timeZone")]
            time_zone: Option<String>,
        },
    }
    #[derive(serde::Deserialize)]
    struct Session {
        #[serde(rename = "endDateTime")]
        end: Option<When>,
    }
    let Ok(Session { end: Some(end) }) = serde_json::from_slice::<Session>(body) else {
        return false;
    };
    let parsed = match end {
        When::Plain(text) => humantime::parse_rfc3339_weak(text.trim_end_matches('Z')),
        When::Zoned {
            date_time,
            time_zone,
        } => {
            if !time_zone
                .as_deref()
                .is_none_or(|tz| tz.eq_ignore_ascii_case("UTC"))
            {
                return false;
            }
            humantime::parse_rfc3339_weak(date_time.trim_end_matches('Z'))
        }
    };
    parsed.is_ok_and(|end| end + ENDED_AFTER < now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_strong_and_stable() {
        let a = etag_of(b"{\"id\":1}");
        assert_eq!(a, etag_of(b"{\"id\":1}"));
        assert_ne!(a, etag_of(b"{\"id\":2}"));
        let s = a.to_str().unwrap();
        assert!(s.starts_with('"') && s.ends_with('"') && !s.starts_with("W/"));
    }

    #[test]
    fn ended_sessions_are_recognised() {
        let now = humantime::parse_rfc3339("2026-11-29T12:00:00Z").unwrap();
        assert!(ended_long_ago(
            br#"{"endDateTime":"2023-08-09T22:00:00Z"}"#,
            now
        ));
        assert!(ended_long_ago(
            br#"{"endDateTime":{"dateTime":"2026-11-29T10:00:00.0000000","timeZone":"UTC"}}"#,
            now
        ));
        assert!(
            !ended_long_ago(br#"{"endDateTime":"2026-11-29T11:30:00Z"}"#, now),
            "ended 30 minutes ago"
        );
        assert!(
            !ended_long_ago(br#"{"endDateTime":"2026-12-01T10:00:00Z"}"#, now),
            "in the future"
        );
        assert!(!ended_long_ago(
            br#"{"endDateTime":{"dateTime":"2023-01-01T00:00:00","timeZone":"Pacific Standard Time"}}"#,
            now
        ));
        assert!(!ended_long_ago(br#"{"endDateTime":null}"#, now));
        assert!(!ended_long_ago(br#"{"endDateTime":"yesterday"}"#, now));
        assert!(!ended_long_ago(b"{}", now));
    }

    #[tokio::test(start_paused = true)]
    async fn smart_ttl_and_windows() {
        let settings = CacheSettings::default();
        let now = Instant::now();
        let answer = |body: &'static [u8]| GraphAnswer {
            fetched: Fetched::Found {
                session: Bytes::from_static(body),
                raw: Bytes::from_static(body),
            },
            graph_request_id: None,
        };
        let ended = Entry::new(
            answer(br#"{"endDateTime":"2023-08-09T22:00:00Z"}"#),
            now,
            &settings,
            false,
        );
        assert_eq!(ended.fresh_until - now, settings.ttl_ended);
        // A list is never judged by endDateTime, and keeps its own ttl.
        let list = Entry::new(
            answer(br#"{"endDateTime":"2023-08-09T22:00:00Z","value":[]}"#),
            now,
            &settings,
            true,
        );
        assert_eq!(list.fresh_until - now, settings.list_ttl);
        let live = Entry::new(
            answer(br#"{"endDateTime":"2999-01-01T00:00:00Z"}"#),
            now,
            &settings,
            false,
        );
        assert_eq!(live.fresh_until - now, settings.ttl);
        assert_eq!(
            live.refresh_from - now,
            Duration::from_secs(240),
            "last 20% of 5m"
        );
        assert_eq!(
            live.revalidate_until - live.fresh_until,
            settings.stale_while_revalidate
        );
        assert_eq!(live.keep_for(), settings.ttl + settings.stale_if_error);
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_and_ttl_follow_the_clock() {
        let settings = CacheSettings::default();
        let now = Instant::now();
        let entry = Entry::new(
            GraphAnswer {
                fetched: Fetched::Found {
                    session: Bytes::from_static(b"{}"),
                    raw: Bytes::from_static(b"{}"),
                },
                graph_request_id: Some("r".into()),
            },
            now,
            &settings,
            false,
        );
        assert!(entry.is_fresh(now));
        assert_eq!(entry.ttl(now), 300);
        tokio::time::advance(Duration::from_secs(301)).await;
        let later = Instant::now();
        assert!(!entry.is_fresh(later));
        assert_eq!(entry.ttl(later), -1);
        assert_eq!(entry.age(later), 301);
        assert!(later < entry.stale_until);
    }
}
