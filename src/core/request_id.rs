//! Request ids taken from outside: a caller's `x-request-id`, Graph's `request-id`.
//!
//! Both end up in response headers, cache entries and log lines, so a foreign id is kept
//! only when it is short and of a character set that no header parser, log viewer or
//! terminal can misread; otherwise the proxy uses a fresh id of its own (and never logs
//! the original). 128 bytes holds any GUID, W3C trace id or ULID with room to spare.

/// Longest id kept as it came.
pub const MAX_LEN: usize = 128;

/// True for an id worth keeping: 1 to [`MAX_LEN`] bytes of `A-Z a-z 0-9 - _ . : / + =`.
pub fn is_usable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b))
}

/// A fresh id (a random UUID, as Graph's own request ids are).
pub fn fresh() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A fresh id as a header value, encoded on the stack (every request gets one).
pub fn fresh_header() -> http::HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    // Hex digits and hyphens are always a valid header value; the fallback is never taken.
    http::HeaderValue::from_str(id).unwrap_or_else(|_| http::HeaderValue::from_static("-"))
}

/// The request-id maker of the listeners' stacks: [`fresh_header`] (tower-http's own goes
/// through a `String` and a parse).
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeUuid;

impl tower_http::request_id::MakeRequestId for MakeUuid {
    fn make_request_id<B>(
        &mut self,
        _request: &http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        Some(tower_http::request_id::RequestId::new(fresh_header()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_uuids_and_usable() {
        let id = fresh_header();
        let text = id.to_str().unwrap();
        assert!(uuid::Uuid::parse_str(text).is_ok(), "{text}");
        assert!(is_usable(id.as_bytes()));
        assert_ne!(fresh_header(), id);
    }

    #[test]
    fn short_safe_ids_are_kept() {
        assert!(is_usable(b"8d62dd52-4dff-4c75-96a9-f905cc3ff942"));
        assert!(is_usable(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(is_usable(b"req_1.2:3/4+5="));
        assert!(is_usable("x".repeat(MAX_LEN).as_bytes()));
    }

    #[test]
    fn long_empty_or_unsafe_ids_are_not() {
        assert!(!is_usable(b""));
        assert!(!is_usable("x".repeat(MAX_LEN + 1).as_bytes()));
        assert!(!is_usable(&vec![b'a'; 50 * 1024]));
        for bad in [
            &b"a b"[..],
            b"a\"b",
            b"a\\b",
            b"a\tb",
            b"a\x1b[31mb",
            b"a;b",
            b"a,b",
            "caf\u{e9}".as_bytes(),
            b"<script>",
        ] {
            assert!(!is_usable(bad), "{bad:?}");
        }
        assert_eq!(fresh().len(), 36);
        assert!(is_usable(fresh().as_bytes()));
    }
}
