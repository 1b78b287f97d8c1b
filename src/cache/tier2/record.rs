//! The shared tier's entry format: [`Entry::to_shared`] and [`Entry::from_shared`], a JSON
//! header line with the entry's freshness as wall-clock times, then Graph's bytes.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use tokio::time::Instant;

use crate::cache::entry::{Entry, Parts};
use crate::config::CacheSettings;
use crate::core::clock::Clock;
use crate::core::request_id;

impl Entry {
    /// The entry as stored in the shared tier: a JSON header line with its freshness as
    /// wall-clock times, then Graph's bytes. `None` only if the header cannot be written.
    /// `writer`: the fencing token of the lock this entry was fetched under.
    pub fn to_shared(&self, clock: &Clock, writer: Option<&str>) -> Option<Vec<u8>> {
        let now = clock.now();
        let stored_ms = clock
            .wall_ms()
            .saturating_sub(now.saturating_duration_since(self.stored_at).as_millis() as u64);
        let offset = |t: Instant| t.saturating_duration_since(self.stored_at).as_millis() as u64;
        let session = self.session_span().map(|(start, len)| [start, len]);
        let header = SharedHeader {
            v: 1,
            stored_ms,
            fresh_ms: offset(self.fresh_until),
            revalidate_ms: offset(self.revalidate_until),
            stale_ms: offset(self.stale_until),
            refresh_ms: offset(self.refresh_from),
            session,
            graph_request_id: self
                .graph_request_id()
                .and_then(|v| v.to_str().ok().map(str::to_string)),
            etags: self
                .etag()
                .to_str()
                .ok()
                .zip(self.raw_etag().to_str().ok())
                .map(|(a, b)| [a.to_string(), b.to_string()]),
            writer: writer.map(str::to_string),
            push: self.push,
        };
        let mut out = serde_json::to_vec(&header).ok()?;
        out.push(b'\n');
        out.extend_from_slice(self.raw_bytes());
        Some(out)
    }

    /// An entry read back from the shared tier, its instants on this replica's clock, and
    /// the token of the lock it was fetched under. `None` for anything malformed or
    /// implausible (windows out of order or longer than this configuration could make,
    /// stored far in the future): the tier is then treated as a miss.
    pub fn from_shared(
        record: &Bytes,
        clock: &Clock,
        settings: &CacheSettings,
    ) -> Option<(Entry, Option<String>)> {
        Entry::from_shared_with(record, clock, settings, Duration::ZERO)
    }

    /// [`Entry::from_shared`] where a change notification subscription may have made an
    /// entry fresh for `push_ttl`.
    pub fn from_shared_with(
        record: &Bytes,
        clock: &Clock,
        settings: &CacheSettings,
        push_ttl: Duration,
    ) -> Option<(Entry, Option<String>)> {
        let split = record.iter().position(|b| *b == b'\n')?;
        let header: SharedHeader = serde_json::from_slice(&record[..split]).ok()?;
        let longest = settings
            .ttl
            .max(settings.ttl_ended)
            .max(settings.list_ttl)
            .max(settings.negative_ttl)
            .max(push_ttl)
            + settings.stale_while_revalidate.max(settings.stale_if_error);
        let plausible = header.v == 1
            && header.refresh_ms <= header.fresh_ms
            && header.fresh_ms <= header.revalidate_ms
            && header.fresh_ms <= header.stale_ms
            && u128::from(header.revalidate_ms.max(header.stale_ms)) <= longest.as_millis()
            && header.stored_ms <= clock.wall_ms().saturating_add(CLOCK_TOLERANCE_MS);
        if !plausible {
            return None;
        }
        let raw = &record[split + 1..];
        let session = match header.session {
            Some([start, len]) if start.checked_add(len)? <= raw.len() => Some(start..start + len),
            Some(_) => return None,
            None => None,
        };
        let now = clock.now();
        let age = Duration::from_millis(clock.wall_ms().saturating_sub(header.stored_ms));
        let stored_at = now.checked_sub(age).unwrap_or(now);
        let at = |ms: u64| stored_at + Duration::from_millis(ms);
        // The validators as the storing replica computed them (no hashing on this path),
        // when they are header values; computed again otherwise.
        let etags = header.etags.as_ref().and_then(|[a, b]| {
            (HeaderValue::from_str(a).is_ok() && HeaderValue::from_str(b).is_ok())
                .then_some((a.as_bytes(), b.as_bytes()))
        });
        // Another replica (or whoever can write to Redis) wrote it: held to the same
        // rule as Graph's own header.
        let graph_request_id = header
            .graph_request_id
            .as_deref()
            .filter(|id| request_id::is_usable(id.as_bytes()) && HeaderValue::from_str(id).is_ok());
        // Copied out of the record: the entry keeps Graph's bytes, not the header line.
        let mut entry = Entry::assemble(
            Parts {
                raw,
                session,
                etags,
                graph_request_id: graph_request_id.map(str::as_bytes),
            },
            stored_at,
        );
        entry.fresh_until = at(header.fresh_ms);
        entry.revalidate_until = at(header.revalidate_ms);
        entry.stale_until = at(header.stale_ms);
        entry.refresh_from = at(header.refresh_ms);
        entry.tier2 = true;
        entry.push = header.push;
        let writer = header.writer;
        Some((entry, writer))
    }
}

/// The header line of an entry in the shared tier; times in ms (wall clock for
/// `stored_ms`, offsets from it for the rest).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SharedHeader {
    v: u8,
    stored_ms: u64,
    fresh_ms: u64,
    revalidate_ms: u64,
    stale_ms: u64,
    refresh_ms: u64,
    /// Where the session lies in Graph's body (start, length); absent for a 404.
    session: Option<[usize; 2]>,
    graph_request_id: Option<String>,
    /// `ETag` of the session and of Graph's body.
    #[serde(default)]
    etags: Option<[String; 2]>,
    /// Fencing token of the lock the entry was fetched under.
    #[serde(default)]
    writer: Option<String>,
    /// Fresh by a change notification subscription (`notifications.ttl`).
    #[serde(default)]
    push: bool,
}

/// How far in the future a shared entry's `stored_ms` may lie (clocks of replicas differ a
/// little even with NTP) before the entry is taken for garbage.
const CLOCK_TOLERANCE_MS: u64 = 60_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::graph::{Fetched, GraphAnswer};

    #[tokio::test(start_paused = true)]
    async fn entries_survive_the_shared_tier_with_their_age_and_windows() {
        let settings = CacheSettings::default();
        let clock = Clock::new();
        let raw = Bytes::from_static(br#"{"value": {"id":"s1","n":1.50} }"#);
        let session = crate::upstream::graph::unwrap_envelope(raw.clone()).unwrap();
        let entry = Entry::new(
            GraphAnswer {
                fetched: Fetched::Found {
                    session,
                    raw: raw.clone(),
                },
                graph_request_id: Some("rid".into()),
            },
            clock.now(),
            &settings,
            false,
        );
        let record = Bytes::from(entry.to_shared(&clock, Some("token-1")).unwrap());
        clock.advance(Duration::from_secs(100));
        let (back, writer) = Entry::from_shared(&record, &clock, &settings).unwrap();
        assert_eq!(writer.as_deref(), Some("token-1"));
        assert!(back.tier2);
        assert_eq!(back.body_bytes(), Some(&br#"{"id":"s1","n":1.50}"#[..]));
        assert_eq!(back.raw(), raw);
        assert_eq!(back.etag(), entry.etag());
        assert_eq!(back.raw_etag(), entry.raw_etag());
        let now = clock.now();
        assert_eq!(back.age(now), 100);
        assert_eq!(back.ttl(now), 200);
        assert_eq!(back.keep_for(), entry.keep_for());
        assert_eq!(back.refresh_from - back.stored_at, Duration::from_secs(240));
        assert_eq!(back.graph_request_id().unwrap(), "rid");
        // A 404 round-trips as a 404; garbage is a miss, never a panic.
        let gone = Entry::new(
            GraphAnswer {
                fetched: Fetched::NotFound,
                graph_request_id: None,
            },
            clock.now(),
            &settings,
            false,
        );
        let back = Entry::from_shared(
            &Bytes::from(gone.to_shared(&clock, None).unwrap()),
            &clock,
            &settings,
        );
        assert!(!back.unwrap().0.has_body());
        let header = |fields: &str| {
            Bytes::from(format!(
                "{{\"v\":1,{fields},\"session\":null,\"graph_request_id\":null}}\n{{}}"
            ))
        };
        let now_ms = clock.wall_ms();
        for garbage in [
            Bytes::new(),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{\"v\":2}\n{}"),
            Bytes::from_static(b"{\"v\":1,\"stored_ms\":0,\"fresh_ms\":0,\"revalidate_ms\":0,\"stale_ms\":0,\"refresh_ms\":0,\"session\":[5,99],\"graph_request_id\":null}\n{}"),
            // Fresh for ever, windows out of order, stored in the future.
            header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":18446744073709551615,\"revalidate_ms\":18446744073709551615,\"stale_ms\":18446744073709551615,\"refresh_ms\":0")),
            header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":1000,\"revalidate_ms\":500,\"stale_ms\":2000,\"refresh_ms\":0")),
            header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":1000,\"revalidate_ms\":2000,\"stale_ms\":2000,\"refresh_ms\":1500")),
            header(&format!("\"stored_ms\":{},\"fresh_ms\":1000,\"revalidate_ms\":2000,\"stale_ms\":2000,\"refresh_ms\":0", now_ms + 3_600_000)),
        ] {
            assert!(Entry::from_shared(&garbage, &clock, &settings).is_none(), "{garbage:?}");
        }
        let sane = header(&format!("\"stored_ms\":{now_ms},\"fresh_ms\":1000,\"revalidate_ms\":2000,\"stale_ms\":2000,\"refresh_ms\":800"));
        assert!(Entry::from_shared(&sane, &clock, &settings).is_some());
    }
}
