//! Small HTTP helpers more than one layer needs: the `Authorization: Bearer` parse,
//! `Retry-After` values, configured SHA-256 digests, and the one JSON response builder.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;

/// Why an `Authorization` value is not `Bearer <token>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotBearer {
    /// Not visible ASCII text.
    Malformed,
    /// No `scheme token` pair, or a scheme other than `Bearer` (any case).
    OtherScheme,
}

/// The token of an `Authorization: Bearer <token>` value, surrounding blanks trimmed
/// (it may come out empty; the caller decides what an empty token means).
pub fn bearer_token(value: &HeaderValue) -> Result<&str, NotBearer> {
    let value = value.to_str().map_err(|_| NotBearer::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(NotBearer::OtherScheme)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(NotBearer::OtherScheme);
    }
    Ok(token.trim())
}

/// `Retry-After` as seconds (`30`), fractional seconds (`2.128`) or an HTTP date. Garbage,
/// negative and absurd values give `None` (the caller then backs off exponentially).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && (0.0..=86_400.0).contains(&secs) {
            return Some(Duration::from_secs_f64(secs));
        }
        return None;
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
        .filter(|d| *d <= Duration::from_secs(86_400))
}

/// A configured SHA-256 digest (64 hex characters, either case) as bytes; `None` for
/// anything else.
pub fn sha256_from_hex(hex_digest: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest.to_ascii_lowercase(), &mut digest).ok()?;
    Some(digest)
}

/// A JSON answer: `body` serialized, `Content-Type: application/json`.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after(" 2.128 ", now),
            Some(Duration::from_millis(2128))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        for garbage in ["", "soon", "-5", "NaN", "inf", "1e9", "Mon, 99 Foo"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage}");
        }
    }

    #[test]
    fn bearer_values() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer_token(&v("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(&v("bEaReR  abc ")), Ok("abc"));
        assert_eq!(bearer_token(&v("Bearer ")), Ok(""));
        assert_eq!(bearer_token(&v("Bearer")), Err(NotBearer::OtherScheme));
        assert_eq!(bearer_token(&v("Basic abc")), Err(NotBearer::OtherScheme));
        let latin1 = HeaderValue::from_bytes(b"Bearer \xe9").unwrap();
        assert_eq!(bearer_token(&latin1), Err(NotBearer::Malformed));
    }

    #[test]
    fn sha256_digests() {
        let hex = "AB".repeat(32);
        assert_eq!(sha256_from_hex(&hex), Some([0xab; 32]));
        assert_eq!(sha256_from_hex(&hex.to_lowercase()), Some([0xab; 32]));
        assert_eq!(sha256_from_hex(&hex[..62]), None);
        assert_eq!(sha256_from_hex(&"zz".repeat(32)), None);
        assert_eq!(sha256_from_hex(&"ab".repeat(33)), None);
    }
}
