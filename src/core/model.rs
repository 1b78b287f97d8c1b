//! What the proxy caches and serves, as types: the two kinds of virtual event, the Graph
//! API version, the key of one session (or one event's session list) built only from
//! validated ids, and which contract a request came in by.
//!
//! Ids are percent-decoded once by the router and must then consist of 1 to 256
//! characters from `A-Z a-z 0-9 - _ . @ = +`, and be neither `.` nor `..`; a key can only
//! be built from such ids, and [`SessionKey::graph_path`] encodes each as one segment.

use std::fmt;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

/// An id that is not one: which id (`"event id"`, `"session id"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}")]
pub struct IdError {
    pub what: &'static str,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum ApiVersion {
    #[default]
    #[serde(rename = "v1.0")]
    V1,
    #[serde(rename = "beta")]
    Beta,
}

impl ApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1.0",
            ApiVersion::Beta => "beta",
        }
    }
}

/// Longest id accepted, after decoding.
pub const MAX_ID_LEN: usize = 256;

/// Characters encoded when an id becomes a Graph path segment: everything except
/// unreserved characters. `@`, `=` and `+` are encoded as the Graph SDKs do (RFC 6570
/// simple expansion); `.` stays literal so `%2E` tricks cannot form a dot segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The two kinds of virtual event Graph serves sessions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Webinars,
    Townhalls,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Webinars => "webinars",
            Kind::Townhalls => "townhalls",
        }
    }

    /// The kind a path segment (or a stored name) names.
    pub fn parse(segment: &str) -> Option<Kind> {
        match segment {
            "webinars" => Some(Kind::Webinars),
            "townhalls" => Some(Kind::Townhalls),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Graph session, or with `session: None` one event's session list, identified by
/// validated, decoded ids, in one API version (v1.0 and beta bodies differ, so they are
/// cached apart).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub kind: Kind,
    pub version: ApiVersion,
    pub event: Box<str>,
    /// `None`: the list of the event's sessions (summaries).
    pub session: Option<Box<str>>,
}

/// Which contract a request came in by: the proxy's own `/sessions/...` paths, or Graph's
/// own paths (`/{v1.0|beta}/solutions/...`, for Graph SDKs pointed at the proxy), whose
/// errors must be in Graph's shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Style {
    #[default]
    Proxy,
    Graph,
}

impl Style {
    /// Graph-style for every path under a Graph API version, whether or not it routes.
    pub fn of(path: &str) -> Style {
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        if matches!(first, "v1.0" | "beta") {
            Style::Graph
        } else {
            Style::Proxy
        }
    }
}

impl SessionKey {
    /// Builds a v1.0 key from decoded ids, validating them.
    pub fn new(kind: Kind, event: &str, session: &str) -> Result<SessionKey, IdError> {
        validate_id(event, "event id")?;
        validate_id(session, "session id")?;
        Ok(SessionKey {
            kind,
            version: ApiVersion::V1,
            event: event.into(),
            session: Some(session.into()),
        })
    }

    /// Builds a v1.0 key for the session list of one event, validating the id.
    pub fn list(kind: Kind, event: &str) -> Result<SessionKey, IdError> {
        validate_id(event, "event id")?;
        Ok(SessionKey {
            kind,
            version: ApiVersion::V1,
            event: event.into(),
            session: None,
        })
    }

    /// Whether this names an event's session list rather than one session.
    pub fn is_list(&self) -> bool {
        self.session.is_none()
    }

    /// The same session in another API version.
    pub fn with_version(mut self, version: ApiVersion) -> SessionKey {
        self.version = version;
        self
    }

    /// `/solutions/virtualEvents/{kind}/{event}/sessions/{session}` (or without the
    /// `/{session}` for a list), each id encoded as a single segment. Append it to
    /// `{graph root}/{api version}`.
    pub fn graph_path(&self) -> String {
        let mut path = format!(
            "/solutions/virtualEvents/{}/{}/sessions",
            self.kind,
            utf8_percent_encode(&self.event, SEGMENT),
        );
        if let Some(session) = &self.session {
            path.push('/');
            path.extend(utf8_percent_encode(session, SEGMENT));
        }
        path
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.session {
            Some(session) => write!(f, "{}/{}/{}", self.kind, self.event, session),
            None => write!(f, "{}/{}/sessions", self.kind, self.event),
        }
    }
}

fn validate_id(id: &str, what: &'static str) -> Result<(), IdError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'=' | b'+')
        });
    if ok {
        Ok(())
    } else {
        Err(IdError { what })
    }
}
