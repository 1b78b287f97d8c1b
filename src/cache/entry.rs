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

/// What an entry holds beyond its buffer (body, validators, Graph's request id) and key
/// ids, as measured (`benches/load/compare.sh`'s memory round: 100,000 cached sessions
/// grow the RSS by ~860 B each beyond those): moka's node, deques and timer wheel slot,
/// the key, the `Arc<Entry>` with its windows, the allocator's headers. Counted, so that
/// `cache.max_bytes` bounds the memory the cache really takes.
pub const ENTRY_OVERHEAD: usize = 860;

/// One cached Graph answer.
///
/// Its bytes are one allocation (`buf`): Graph's body exactly as sent, then the session's
/// validator, Graph's body's validator (when the two differ) and Graph's request id. The
/// session (Graph's body, or the object Graph wrapped in it), each validator and the id
/// are ranges of it, handed out as reference-counted slices: one copy of each body, no
/// allocation per validator. A clone shares the buffer (a reference count, no copy).
#[derive(Debug, Clone)]
pub struct Entry {
    buf: Bytes,
    /// Graph's body: `buf[..raw_len]`.
    raw_len: u32,
    /// The session JSON; `None` when Graph said 404.
    body: Option<Span>,
    /// Strong validator derived from the session.
    etag: Span,
    /// Strong validator of Graph's body (the Graph-compatible routes serve that).
    raw_etag: Span,
    graph_request_id: Option<Span>,
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
    /// Loaded from the shared tier (Redis) rather than from Graph by this replica.
    pub tier2: bool,
    /// Fresh for `notifications.ttl`: a live change-notification subscription covers it.
    pub push: bool,
}

/// A range of [`Entry`]'s buffer. Bodies are bounded far below 4 GiB (`MAX_BODY`, the list
/// page limit), so 32-bit offsets hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn of(start: usize, len: usize) -> Span {
        Span {
            start: u32::try_from(start).unwrap_or(u32::MAX),
            len: u32::try_from(len).unwrap_or(0),
        }
    }

    fn range(self) -> std::ops::Range<usize> {
        let start = self.start as usize;
        start..start + self.len as usize
    }
}

/// An entry's bytes before they are assembled into one buffer.
pub(super) struct Parts<'a> {
    /// Graph's body exactly as sent.
    pub raw: &'a [u8],
    /// Where the session lies in `raw`; `None` for a 404.
    pub session: Option<std::ops::Range<usize>>,
    /// The session's and Graph's body's validators, when already known (the shared tier
    /// carries them); computed otherwise.
    pub etags: Option<(&'a [u8], &'a [u8])>,
    /// Graph's request id, already checked to be a header value.
    pub graph_request_id: Option<&'a [u8]>,
}

/// Length of `"<32 hex digits>"`.
const ETAG_LEN: usize = 34;

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
        let (parts, fresh_for, stale_for) = match &answer.fetched {
            Fetched::Found { session, raw } => {
                let polled = Entry::polled_for(session, settings, list);
                let fresh_for = match push {
                    Some(push) if push > polled => {
                        pushed = true;
                        push
                    }
                    _ => polled,
                };
                (
                    Parts {
                        raw,
                        session: Some(within(raw, session)),
                        etags: None,
                        graph_request_id: None,
                    },
                    fresh_for,
                    settings.stale_if_error,
                )
            }
            Fetched::NotFound => (
                Parts {
                    raw: b"",
                    session: None,
                    etags: None,
                    graph_request_id: None,
                },
                settings.negative_ttl,
                Duration::ZERO,
            ),
        };
        let graph_request_id = answer
            .graph_request_id
            .as_deref()
            .filter(|id| HeaderValue::from_str(id).is_ok());
        let mut entry = Entry::assemble(
            Parts {
                graph_request_id: graph_request_id.map(str::as_bytes),
                ..parts
            },
            now,
        );
        entry.push = pushed;
        entry.set_windows(fresh_for, stale_for, settings);
        if pushed {
            // Notifications keep it fresh: no refresh ahead of its end.
            entry.refresh_from = entry.fresh_until;
        }
        entry
    }

    /// One buffer of `parts` (validators computed when not given), stored at `now`; its
    /// windows all end at `now` until set.
    pub(super) fn assemble(parts: Parts<'_>, now: Instant) -> Entry {
        let session = parts.session.clone().unwrap_or(0..0);
        let body = &parts.raw[session.clone()];
        let computed;
        let (etag, raw_etag): (&[u8], &[u8]) = match parts.etags {
            Some(etags) => etags,
            None => {
                let etag = etag_text(body);
                // Unwrapped or not, the session shares Graph's bytes; only its validator
                // differs when Graph wrapped it.
                let raw_etag = (body.len() != parts.raw.len()).then(|| etag_text(parts.raw));
                computed = (etag, raw_etag);
                (
                    &computed.0[..],
                    computed.1.as_ref().map_or(&computed.0[..], |t| &t[..]),
                )
            }
        };
        let id = parts.graph_request_id.unwrap_or(b"");
        let shared_etag = etag == raw_etag;
        let mut buf = Vec::with_capacity(
            parts.raw.len() + etag.len() + if shared_etag { 0 } else { raw_etag.len() } + id.len(),
        );
        buf.extend_from_slice(parts.raw);
        let etag_span = Span::of(buf.len(), etag.len());
        buf.extend_from_slice(etag);
        let raw_etag_span = if shared_etag {
            etag_span
        } else {
            let span = Span::of(buf.len(), raw_etag.len());
            buf.extend_from_slice(raw_etag);
            span
        };
        let id_span = parts.graph_request_id.map(|_| {
            let span = Span::of(buf.len(), id.len());
            buf.extend_from_slice(id);
            span
        });
        Entry {
            buf: Bytes::from(buf),
            raw_len: u32::try_from(parts.raw.len()).unwrap_or(0),
            body: parts.session.map(|s| Span::of(s.start, s.len())),
            etag: etag_span,
            raw_etag: raw_etag_span,
            graph_request_id: id_span,
            stored_at: now,
            fresh_until: now,
            revalidate_until: now,
            stale_until: now,
            refresh_from: now,
            tier2: false,
            push: false,
        }
    }

    /// The session JSON (a slice of Graph's body); `None` when Graph said 404.
    pub fn body(&self) -> Option<Bytes> {
        self.body.map(|span| self.slice(span))
    }

    /// The session's bytes, borrowed.
    pub fn body_bytes(&self) -> Option<&[u8]> {
        self.body.map(|span| &self.buf[span.range()])
    }

    pub fn has_body(&self) -> bool {
        self.body.is_some()
    }

    /// Graph's body exactly as sent (for the Graph-compatible routes).
    pub fn raw(&self) -> Bytes {
        self.buf.slice(..self.raw_len as usize)
    }

    pub fn raw_bytes(&self) -> &[u8] {
        &self.buf[..self.raw_len as usize]
    }

    /// Where the session lies in Graph's body: `(start, length)`.
    pub fn session_span(&self) -> Option<(usize, usize)> {
        self.body
            .map(|span| (span.start as usize, span.len as usize))
    }

    /// The session's `ETag`.
    pub fn etag(&self) -> HeaderValue {
        self.header(self.etag)
    }

    /// Graph's body's `ETag`.
    pub fn raw_etag(&self) -> HeaderValue {
        self.header(self.raw_etag)
    }

    /// Graph's `request-id`, as it answered.
    pub fn graph_request_id(&self) -> Option<HeaderValue> {
        self.graph_request_id.map(|span| self.header(span))
    }

    fn slice(&self, span: Span) -> Bytes {
        self.buf.slice(span.range())
    }

    fn header(&self, span: Span) -> HeaderValue {
        // ok: only validators and checked header values are stored at these ranges.
        HeaderValue::from_maybe_shared(self.slice(span))
            .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
    }

    /// The entry as polling would have stored it: for a webinar whose subscription lapsed.
    pub(super) fn unpushed(&self, settings: &CacheSettings, list: bool) -> Entry {
        let fresh_for = self.body_bytes().map_or(settings.negative_ttl, |b| {
            Entry::polled_for(b, settings, list)
        });
        let mut entry = Entry {
            push: false,
            ..self.clone()
        };
        let stale_for = self.stale_until - self.fresh_until;
        entry.set_windows(fresh_for, stale_for, settings);
        entry
    }

    /// The entry stale from `now` on (its stale windows kept as they were).
    pub(super) fn expired_at(&self, now: Instant) -> Entry {
        let fresh_until = now.max(self.stored_at);
        Entry {
            fresh_until,
            refresh_from: fresh_until,
            revalidate_until: self
                .revalidate_until
                .min(fresh_until + (self.revalidate_until - self.fresh_until)),
            stale_until: self
                .stale_until
                .min(fresh_until + (self.stale_until - self.fresh_until)),
            push: false,
            ..self.clone()
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
            + self.buf.len()
            + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// Where `part` (a slice of `whole`'s memory) lies in `whole`; all of it when it is not a
/// slice of it.
fn within(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    if start <= whole.len() && part.len() <= whole.len() - start {
        start..start + part.len()
    } else {
        0..whole.len()
    }
}

/// `"<32 hex digits of SHA-256>"`.
fn etag_text(body: &[u8]) -> [u8; ETAG_LEN] {
    let digest = Sha256::digest(body);
    let mut tag = [b'"'; ETAG_LEN];
    // ok: 16 bytes are 32 hex digits, which fit between the quotes.
    let _ = hex::encode_to_slice(&digest[..16], &mut tag[1..ETAG_LEN - 1]);
    tag
}

/// `"<32 hex digits of SHA-256>"`.
#[cfg(test)]
pub fn etag_of(body: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(&etag_text(body)).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
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
