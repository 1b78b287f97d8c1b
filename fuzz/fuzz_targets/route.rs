//! Fuzzes `routes::route`: whatever the request target, an accepted route must yield a
//! `SessionKey` whose Graph path is exactly
//! `/solutions/virtualEvents/{kind}/{event}/sessions/{session}`, with each id one
//! segment that decodes back to the validated id.

#![no_main]

use graph_session_proxy::{SessionKey, MAX_ID_LEN};
use graph_session_proxy::route;
use http::Method;
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };

    let result = route(&Method::GET, path, query);

    // Graph's session endpoint takes no query: any query is refused.
    if query.is_some() {
        assert!(result.is_err(), "query accepted: {target:?} -> {result:?}");
    }
    // Only GET and HEAD are served; both route alike.
    let head = route(&Method::HEAD, path, query);
    assert_eq!(
        result.as_ref().ok(),
        head.as_ref().ok(),
        "GET and HEAD differ for {target:?}"
    );
    assert!(
        route(&Method::POST, path, query).is_err(),
        "POST accepted for {target:?}"
    );

    if let Ok(key) = result {
        check_key(path, &key);
    }
});

fn check_key(path: &str, key: &SessionKey) {
    let kind = key.kind.as_str();
    check_id(&key.event, path);
    check_id(&key.session, path);

    // The request path itself, in one of the two accepted shapes, each id decoding once
    // to the key's id: the proxy's `/sessions/{kind}/{event}/{session}`, or (once the
    // Graph-compatible routes exist) Graph's own
    // `/{v1.0|beta}/solutions/virtualEvents/{kind}/{event}/sessions/{session}`.
    let parts: Vec<&str> = path.split('/').collect();
    let (path_kind, path_event, path_session) = match parts.as_slice() {
        ["", "sessions", kind, event, session] => (*kind, *event, *session),
        ["", "v1.0" | "beta", "solutions", "virtualEvents", kind, event, "sessions", session] => {
            (*kind, *event, *session)
        }
        _ => panic!("accepted a path of another shape: {path:?} -> {key:?}"),
    };
    assert_eq!(path_kind, kind, "request path {path:?}");
    assert_eq!(decode(path_event).as_deref(), Some(&*key.event), "{path:?}");
    assert_eq!(decode(path_session).as_deref(), Some(&*key.session), "{path:?}");

    // The Graph path built from the key.
    let graph = key.graph_path();
    let prefix = format!("/solutions/virtualEvents/{kind}/");
    assert!(graph.starts_with(&prefix), "{path:?} -> {graph:?}");
    assert!(!graph.contains('?'), "{path:?} -> {graph:?}");
    assert!(!graph.contains('#'), "{path:?} -> {graph:?}");
    assert!(!graph.contains('\\'), "{path:?} -> {graph:?}");
    let lower = graph.to_ascii_lowercase();
    assert!(!lower.contains("%2f"), "encoded slash: {path:?} -> {graph:?}");
    assert!(!lower.contains("%25"), "double encoding: {path:?} -> {graph:?}");

    let segments: Vec<&str> = graph
        .strip_prefix('/')
        .expect("graph path starts with '/'")
        .split('/')
        .collect();
    assert_eq!(segments.len(), 6, "{path:?} -> {graph:?}");
    for segment in &segments {
        assert!(!segment.is_empty(), "empty segment: {path:?} -> {graph:?}");
        // No dot segment, literal or after decoding. (A ".." *inside* an id such as
        // "a..b" is allowed by the documented allow-list and is harmless.)
        let decoded = decode(segment).unwrap_or_default();
        for s in [*segment, decoded.as_str()] {
            assert!(s != "." && s != "..", "dot segment: {path:?} -> {graph:?}");
        }
    }
    assert_eq!(segments[0], "solutions");
    assert_eq!(segments[1], "virtualEvents");
    assert_eq!(segments[2], kind);
    assert_eq!(segments[4], "sessions");
    // Each id is one segment and decoding it once gives the id back exactly.
    assert_eq!(decode(segments[3]).as_deref(), Some(&*key.event), "{graph:?}");
    assert_eq!(decode(segments[5]).as_deref(), Some(&*key.session), "{graph:?}");
}

fn check_id(id: &str, path: &str) {
    assert!(
        (1..=MAX_ID_LEN).contains(&id.len()),
        "id length {}: {path:?}",
        id.len()
    );
    assert!(id != "." && id != "..", "dot id: {path:?}");
    assert!(
        id.bytes().all(|b| b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'@' | b'=' | b'+')),
        "id {id:?} outside [A-Za-z0-9-_.@=+]: {path:?}"
    );
}

fn decode(segment: &str) -> Option<String> {
    percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}
