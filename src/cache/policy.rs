//! What may be served: the request's [`Directives`], the [`Outcome`] of a lookup and
//! whether an entry is servable without waiting for Graph (fresh, or within a stale
//! window); and how an outcome reads outside: the `Cache-Status` text (RFC 9211) and the
//! `cache` label of the request metrics.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::cache::entry::Entry;

/// How a lookup was answered; becomes `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fresh entry, Graph not contacted (perhaps a background refresh started).
    Hit,
    /// Stale entry within `stale_while_revalidate`, served at once; a background refresh runs.
    StaleWhileRevalidate,
    /// Stale entry the caller accepted with `Cache-Control: max-stale`; a background refresh runs.
    MaxStale,
    /// This request started the Graph call.
    Miss,
    /// This request waited on a Graph call another request started.
    Collapsed,
    /// `Cache-Control: no-cache`: a fresh entry was not used; Graph was asked.
    Revalidated,
    /// Graph failed; a stale entry within `stale_if_error` was served instead.
    StaleIfError,
    /// Not in this replica's memory, fresh in the shared tier (Redis): Graph not contacted.
    Tier2,
    /// The caller's Graph budget is spent: a stale entry within `stale_if_error` was
    /// served instead of asking Graph.
    GraphBudget,
}

impl Outcome {
    /// The `cache` label of the request metrics.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Collapsed => "collapsed",
            Outcome::Revalidated => "revalidated",
            Outcome::StaleWhileRevalidate => "stale_while_revalidate",
            Outcome::StaleIfError => "stale_if_error",
            Outcome::MaxStale => "max_stale",
            Outcome::Tier2 => "tier2_hit",
            Outcome::GraphBudget => "graph_budget",
        }
    }
}

/// The metrics' `cache` label of a request: its outcome's, else `miss` when Graph was
/// asked (and failed: [`MISS_STATUS`] was sent), else `none` (the cache was not reached).
pub fn metric_label(outcome: Option<Outcome>, graph_asked: bool) -> &'static str {
    match (outcome, graph_asked) {
        (Some(outcome), _) => outcome.label(),
        (None, true) => "miss",
        (None, false) => "none",
    }
}

/// `Cache-Status` of an error answer for which Graph was asked.
pub const MISS_STATUS: HeaderValue = HeaderValue::from_static("graph-session-proxy; fwd=miss");

/// Why a shared call is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Nothing servable here.
    Miss,
    /// A background refresh (refresh-ahead or stale-while-revalidate).
    Refresh,
    /// `Cache-Control: no-cache`: Graph must be asked (or an answer newer than the request).
    Revalidate,
}

/// A lookup's answer.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub entry: Arc<Entry>,
    pub outcome: Outcome,
}

/// Request directives that change how the cache is used.
#[derive(Debug, Clone, Copy, Default)]
pub struct Directives {
    /// `Cache-Control: no-cache`: revalidate with Graph even when fresh.
    pub no_cache: bool,
    /// `Cache-Control: only-if-cached`: never contact Graph.
    pub only_if_cached: bool,
    /// `Cache-Control: max-stale[=N]`: a stale entry up to N seconds past its freshness
    /// (any, without N) is acceptable; bounded by `stale_if_error`.
    pub max_stale: Option<Duration>,
}

impl Lookup {
    /// RFC 9211 `Cache-Status` for a served lookup: a fixed text around one number (the
    /// freshness left, or the status Graph answered), built without formatting machinery
    /// since every answer carries one.
    pub fn cache_status(&self, now: Instant) -> HeaderValue {
        let entry = &self.entry;
        let fwd_status = if entry.has_body() { 200 } else { 404 };
        const P: &str = "graph-session-proxy; ";
        let (head, number, tail) = match self.outcome {
            Outcome::Hit if entry.push => ("hit; ttl=", entry.ttl(now), "; detail=push"),
            Outcome::Hit => ("hit; ttl=", entry.ttl(now), ""),
            Outcome::StaleWhileRevalidate => (
                "fwd=stale; ttl=",
                entry.ttl(now),
                "; detail=stale-while-revalidate",
            ),
            Outcome::MaxStale => ("hit; ttl=", entry.ttl(now), "; detail=max-stale"),
            Outcome::Miss => ("fwd=miss; fwd-status=", fwd_status, "; stored"),
            Outcome::Collapsed => ("fwd=miss; fwd-status=", fwd_status, "; stored; collapsed"),
            Outcome::Revalidated => ("fwd=request; fwd-status=", fwd_status, "; stored"),
            Outcome::StaleIfError => ("fwd=stale; ttl=", entry.ttl(now), "; detail=stale-if-error"),
            Outcome::Tier2 => ("hit; ttl=", entry.ttl(now), "; detail=tier2"),
            Outcome::GraphBudget => ("fwd=stale; ttl=", entry.ttl(now), "; detail=graph-budget"),
        };
        let mut digits = itoa::Buffer::new();
        let number = digits.format(number);
        let mut text = [0u8; 128];
        let mut len = 0;
        for part in [P, head, number, tail] {
            text[len..len + part.len()].copy_from_slice(part.as_bytes());
            len += part.len();
        }
        HeaderValue::from_bytes(&text[..len])
            .unwrap_or_else(|_| HeaderValue::from_static("graph-session-proxy"))
    }
}

/// How `entry` may answer without waiting for Graph, if at all. `max-stale` is bounded by
/// `stale_if_error`.
pub(super) fn servable(
    entry: &Entry,
    now: Instant,
    directives: Directives,
    stale_if_error: Duration,
) -> Option<Outcome> {
    if entry.is_fresh(now) && (!directives.no_cache || directives.only_if_cached) {
        return Some(Outcome::Hit);
    }
    if directives.no_cache {
        return None;
    }
    if let Some(max_stale) = directives.max_stale {
        let limit = max_stale.min(stale_if_error);
        if entry.has_body() && now <= entry.fresh_until + limit {
            return Some(Outcome::MaxStale);
        }
    }
    if now < entry.revalidate_until && !directives.only_if_cached {
        return Some(Outcome::StaleWhileRevalidate);
    }
    None
}
