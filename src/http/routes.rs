//! Request path -> typed [`SessionKey`], or a refusal. The allow-list lives here.
//!
//! Only `/sessions/{webinars|townhalls}/{event}/{session}` (one session) and
//! `/sessions/{webinars|townhalls}/{event}` (the event's session list) exist, plus Graph's
//! own paths for the same two resources. Each id is
//! percent-decoded exactly once and must then consist of 1 to 256 characters from
//! `A-Z a-z 0-9 - _ . @ = +`, and be neither `.` nor `..`. Because `%` itself is not
//! allowed after decoding, a double-encoded slash (`%252F`) is refused as surely as an
//! encoded one (`%2F`): nothing a caller sends can add a segment to the Graph URL, which
//! [`SessionKey::graph_path`] builds by percent-encoding each id as one segment again.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::core::model::{ApiVersion, Kind, SessionKey, Style};
use crate::http::error::ProxyError;

/// Maps a request to the session it names. `path` is the raw (still encoded) path and
/// `query` the raw query, if the request line had a `?`. `/sessions/...` keys come back in
/// v1.0; the caller sets the configured version.
pub fn route(
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> Result<SessionKey, ProxyError> {
    if query.is_some() {
        return Err(ProxyError::InvalidRequest(
            "query strings are not accepted: Graph's session endpoint takes none",
        ));
    }
    if Style::of(path) == Style::Graph {
        return graph_route(method, path);
    }
    let Some(rest) = path.strip_prefix("/sessions/") else {
        return Err(ProxyError::RouteNotFound);
    };
    // Split without collecting: this runs for every request.
    let mut segments = rest.split('/');
    match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some(kind), Some(event), None, _) => session_key(method, kind, event, None),
        (Some(kind), Some(event), Some(session), None) => {
            session_key(method, kind, event, Some(session))
        }
        _ => Err(ProxyError::RouteNotFound),
    }
}

/// `/{v1.0|beta}/solutions/virtualEvents/{kind}/{event}/sessions[/{session}]`: Graph's own
/// paths for the same resources; every other Graph path is `notSupported`.
fn graph_route(method: &http::Method, path: &str) -> Result<SessionKey, ProxyError> {
    let segments: Vec<&str> = path.split('/').collect();
    let (version, kind, event, session) = match segments.as_slice() {
        ["", version, "solutions", "virtualEvents", kind, event, "sessions", session] => {
            (*version, *kind, *event, Some(*session))
        }
        ["", version, "solutions", "virtualEvents", kind, event, "sessions"] => {
            (*version, *kind, *event, None)
        }
        _ => return Err(ProxyError::NotSupported),
    };
    let version = match version {
        "v1.0" => ApiVersion::V1,
        "beta" => ApiVersion::Beta,
        _ => return Err(ProxyError::NotSupported),
    };
    if Kind::parse(kind).is_none() {
        return Err(ProxyError::NotSupported);
    }
    Ok(session_key(method, kind, event, session)?.with_version(version))
}

/// What an admin purge names after `/cache/sessions/`: `{kind}/{event}` (the event's
/// session list) or `{kind}/{event}/{session}`, validated as the caller routes are.
pub fn purge_target(rest: &str) -> Result<SessionKey, ProxyError> {
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        [kind, event] => ids_key(kind, event, None),
        [kind, event, session] => ids_key(kind, event, Some(session)),
        _ => Err(ProxyError::RouteNotFound),
    }
}

/// What an admin purge names after `/cache/events/`: `{kind}/{event}`, as the event's
/// session-list key (its kind and event are what is purged).
pub fn event_purge_target(rest: &str) -> Result<SessionKey, ProxyError> {
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        [kind, event] => ids_key(kind, event, None),
        // A bare kind names no event (it once purged an event called "x").
        _ => Err(ProxyError::RouteNotFound),
    }
}

fn session_key(
    method: &http::Method,
    kind: &str,
    event: &str,
    session: Option<&str>,
) -> Result<SessionKey, ProxyError> {
    let kind = Kind::parse(kind).ok_or(ProxyError::RouteNotFound)?;
    if method != http::Method::GET && method != http::Method::HEAD {
        return Err(ProxyError::MethodNotAllowed);
    }
    decoded_key(kind, event, session)
}

/// A key from raw (still encoded) ids, whatever the method.
fn ids_key(kind: &str, event: &str, session: Option<&str>) -> Result<SessionKey, ProxyError> {
    let kind = Kind::parse(kind).ok_or(ProxyError::RouteNotFound)?;
    decoded_key(kind, event, session)
}

fn decoded_key(kind: Kind, event: &str, session: Option<&str>) -> Result<SessionKey, ProxyError> {
    let event = decode_id(event, "event id")?;
    match session {
        Some(session) => {
            let session = decode_id(session, "session id")?;
            Ok(SessionKey::new(kind, &event, &session)?)
        }
        None => Ok(SessionKey::list(kind, &event)?),
    }
}

/// One percent-decoding (borrowed when there is nothing to decode); anything that is not
/// UTF-8 afterwards is refused.
fn decode_id<'a>(raw: &'a str, what: &'static str) -> Result<Cow<'a, str>, ProxyError> {
    // Most ids are sent as they are: nothing to decode, and already UTF-8 (a `&str`). The
    // check is a memchr; the decoder's byte-by-byte pass and the UTF-8 check are not.
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ProxyError::InvalidId(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::MAX_ID_LEN;
    use http::Method;

    const EVENT: &str = "f8ce2a5f-0e6a-4186-aa90-1f64bc023566@5466a424-aadf-425c-9b24-034ca28d4bdd";
    const SESSION: &str = "8d62dd52-4dff-4c75-96a9-f905cc3ff942";

    fn get(path: &str) -> Result<SessionKey, ProxyError> {
        route(&Method::GET, path, None)
    }

    #[test]
    fn seed_ids_route_and_encode() {
        let key = get(&format!("/sessions/webinars/{EVENT}/{SESSION}")).unwrap();
        assert_eq!(key.kind, Kind::Webinars);
        assert_eq!(
            key.graph_path(),
            "/solutions/virtualEvents/webinars/f8ce2a5f-0e6a-4186-aa90-1f64bc023566%405466a424-aadf-425c-9b24-034ca28d4bdd/sessions/8d62dd52-4dff-4c75-96a9-f905cc3ff942"
        );
    }

    #[test]
    fn encoded_at_sign_decodes_once() {
        let key = get("/sessions/townhalls/a%40b/MSpk%3D%2B").unwrap();
        assert_eq!(&*key.event, "a@b");
        assert_eq!(key.session.as_deref(), Some("MSpk=+"));
        assert_eq!(
            key.graph_path(),
            "/solutions/virtualEvents/townhalls/a%40b/sessions/MSpk%3D%2B"
        );
    }

    #[test]
    fn hostile_ids_are_bad_requests() {
        for path in [
            "/sessions/webinars/a%2Fb/c",
            "/sessions/webinars/a%252Fb/c",
            "/sessions/webinars/%2E%2E/c",
            "/sessions/webinars/./c",
            "/sessions/webinars/../c",
            "/sessions/webinars/a%00/c",
            "/sessions/webinars/a%0A/c",
            "/sessions/webinars/%C3%A9/c",
            "/sessions/webinars/%FF/c",
            "/sessions/webinars/a%3Fb/c",
            "/sessions/webinars/a%23b/c",
            "/sessions/webinars/a%zz/c",
            "/sessions/webinars/a%20b/c",
            "/sessions/webinars/a/%5C",
        ] {
            assert!(matches!(get(path), Err(ProxyError::InvalidId(_))), "{path}");
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(get(&format!("/sessions/webinars/{long}/c")).is_err());
        let longest = "a".repeat(MAX_ID_LEN);
        assert!(get(&format!("/sessions/webinars/{longest}/c")).is_ok());
    }

    #[test]
    fn other_shapes_are_not_found() {
        for path in [
            "/",
            "/sessions",
            "/sessions/",
            "/sessions/webinars/a/b/",
            "/sessions/webinars/a/",
            "/sessions/webinars/a/b/c",
            "/sessions/meetings/a/b",
            "/sessions/Webinars/a/b",
            "/sessions/webinars//b",
            "/solutions/virtualEvents/webinars/a/sessions/b",
        ] {
            let r = get(path);
            assert!(
                matches!(
                    r,
                    Err(ProxyError::RouteNotFound) | Err(ProxyError::InvalidId(_))
                ),
                "{path}: {r:?}"
            );
        }
    }

    #[test]
    fn session_lists_route_on_both_styles() {
        let key = get("/sessions/webinars/a%40b").unwrap();
        assert!(key.is_list());
        assert_eq!(&*key.event, "a@b");
        assert_eq!(
            key.graph_path(),
            "/solutions/virtualEvents/webinars/a%40b/sessions"
        );
        let key = get("/beta/solutions/virtualEvents/townhalls/a/sessions").unwrap();
        assert!(key.is_list());
        assert_eq!(key.version, ApiVersion::Beta);
        assert_eq!(
            key.graph_path(),
            "/solutions/virtualEvents/townhalls/a/sessions"
        );
        for hostile in [
            "/sessions/webinars/%2E%2E",
            "/sessions/webinars/a%2Fb",
            "/v1.0/solutions/virtualEvents/webinars/a%2F..%2F/sessions",
        ] {
            assert!(
                matches!(get(hostile), Err(ProxyError::InvalidId(_))),
                "{hostile}"
            );
        }
        assert!(matches!(
            route(&Method::GET, "/sessions/webinars/a", Some("$skiptoken=x")),
            Err(ProxyError::InvalidRequest(_))
        ));
        assert!(matches!(
            route(&Method::DELETE, "/sessions/webinars/a", None),
            Err(ProxyError::MethodNotAllowed)
        ));
    }

    #[test]
    fn methods_and_queries() {
        let p = "/sessions/webinars/a/b";
        assert!(route(&Method::HEAD, p, None).is_ok());
        assert!(matches!(
            route(&Method::POST, p, None),
            Err(ProxyError::MethodNotAllowed)
        ));
        assert!(matches!(
            route(&Method::GET, p, Some("")),
            Err(ProxyError::InvalidRequest(_))
        ));
        assert!(matches!(
            route(&Method::GET, p, Some("$select=id")),
            Err(ProxyError::InvalidRequest(_))
        ));
    }

    /// The admin's purge targets are validated exactly as the caller routes are.
    #[test]
    fn purge_targets_match_the_caller_routes() {
        for rest in [
            "webinars/a%40b",
            "townhalls/a/b",
            "webinars/a%2Fb",
            "webinars/a/b%2F",
            "webinars/./b",
            "webinars/",
            "meetings/a",
            "webinars/a/b/c",
            "webinars/a/",
            "webinars",
        ] {
            let ours = purge_target(rest).map(|k| k.to_string());
            let routed = get(&format!("/sessions/{rest}")).map(|k| k.to_string());
            assert_eq!(format!("{ours:?}"), format!("{routed:?}"), "{rest}");
        }
        for rest in [
            "webinars/a%40b",
            "townhalls/a",
            "webinars/a%2Fb",
            "webinars/",
            "meetings/a",
            "webinars/a/b",
            "webinars/a/",
        ] {
            let ours = event_purge_target(rest).map(|k| k.to_string());
            let routed = get(&format!("/sessions/{rest}/x")).map(|k| {
                SessionKey::list(k.kind, &k.event)
                    .map(|k| k.to_string())
                    .unwrap_or_default()
            });
            assert_eq!(format!("{ours:?}"), format!("{routed:?}"), "{rest}");
        }
        // A kind without an event purges nothing: not found.
        for rest in ["webinars", "townhalls"] {
            assert!(
                matches!(event_purge_target(rest), Err(ProxyError::RouteNotFound)),
                "{rest}"
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn id() -> impl Strategy<Value = String> {
            "[A-Za-z0-9._@=+-]{1,256}".prop_filter("not a dot segment", |s| s != "." && s != "..")
        }

        /// Percent-encodes the characters of `id` picked by `mask` (upper or lower hex).
        fn encode_some(id: &str, mask: &[u8]) -> String {
            id.bytes()
                .enumerate()
                .map(
                    |(i, b)| match mask.get(i % mask.len().max(1)).copied().unwrap_or(0) % 3 {
                        0 => (b as char).to_string(),
                        1 => format!("%{b:02X}"),
                        _ => format!("%{b:02x}"),
                    },
                )
                .collect()
        }

        fn decode(segment: &str) -> String {
            percent_decode_str(segment)
                .decode_utf8()
                .unwrap()
                .into_owned()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Every accepted path names exactly one Graph URL: the one for its decoded ids.
            #[test]
            fn accepted_paths_map_to_their_graph_url(
                townhall in any::<bool>(),
                event in id(),
                session in id(),
                mask in proptest::collection::vec(any::<u8>(), 1..8),
            ) {
                let kind = if townhall { "townhalls" } else { "webinars" };
                let path = format!("/sessions/{kind}/{}/{}", encode_some(&event, &mask), encode_some(&session, &mask));
                let key = route(&http::Method::GET, &path, None).unwrap();
                prop_assert_eq!(&*key.event, event.as_str());
                prop_assert_eq!(key.session.as_deref(), Some(session.as_str()));
                let graph = key.graph_path();
                let segments: Vec<&str> = graph.split('/').collect();
                prop_assert_eq!(segments.len(), 7);
                prop_assert_eq!(&segments[..4], &["", "solutions", "virtualEvents", kind]);
                prop_assert_eq!(segments[5], "sessions");
                prop_assert_eq!(decode(segments[4]), event);
                prop_assert_eq!(decode(segments[6]), session);
            }

            /// Whatever follows `/sessions/`, an accepted request never yields a Graph path of
            /// another shape, and its ids never decode to anything outside the allowed set.
            #[test]
            fn arbitrary_input_never_escapes_the_allow_list(rest in "\\PC{0,80}", raw in proptest::collection::vec(any::<u8>(), 0..80)) {
                for candidate in [format!("/sessions/{rest}"), format!("/sessions/webinars/{}", String::from_utf8_lossy(&raw))] {
                    if let Ok(key) = route(&http::Method::GET, &candidate, None) {
                        let graph = key.graph_path();
                        let segments: Vec<&str> = graph.split('/').collect();
                        let ids: Vec<&str> = match segments.as_slice() {
                            ["", "solutions", "virtualEvents", kind, event, "sessions", session] if key.session.is_some() => {
                                prop_assert!(matches!(*kind, "webinars" | "townhalls"));
                                vec![event, session]
                            }
                            ["", "solutions", "virtualEvents", kind, event, "sessions"] if key.is_list() => {
                                prop_assert!(matches!(*kind, "webinars" | "townhalls"));
                                vec![event]
                            }
                            _ => return Err(TestCaseError::fail(format!("unexpected Graph path {graph}"))),
                        };
                        for segment in ids {
                            let decoded = decode(segment);
                            prop_assert!(!decoded.is_empty() && decoded != "." && decoded != "..");
                            prop_assert!(decoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@=+".contains(&b)), "{}", decoded);
                        }
                    }
                }
            }
        }
    }
}
