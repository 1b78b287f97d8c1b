//! Session lists across Graph's pages: which `@odata.nextLink` may be followed (only
//! the same endpoint: a next link must never take the proxy, or its token, anywhere
//! else), and the merge of the pages into one answer, each item's bytes as Graph sent them.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::upstream::error::UpstreamError;

/// Longest `@odata.nextLink` followed.
const MAX_NEXT_LINK: usize = 8 * 1024;

/// The URL of the next list page, if `next` names the same endpoint as `first`: same
/// scheme, host and port, no user info or fragment, the same path segments (compared
/// percent-decoded, since Graph may encode ids differently) and a query. Anything else
/// is refused: a next link must never take the proxy, or its token, anywhere else.
pub(crate) fn next_page(first: &reqwest::Url, next: &str) -> Result<reqwest::Url, UpstreamError> {
    if next.len() > MAX_NEXT_LINK {
        return Err(UpstreamError::BadListPage("@odata.nextLink too long"));
    }
    let url = reqwest::Url::parse(next)
        .map_err(|_| UpstreamError::BadListPage("@odata.nextLink is not a URL"))?;
    let same_origin = url.scheme() == first.scheme()
        && url.host_str() == first.host_str()
        && url.port_or_known_default() == first.port_or_known_default();
    if !same_origin {
        return Err(UpstreamError::BadListPage(
            "@odata.nextLink points to another host",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(UpstreamError::BadListPage(
            "@odata.nextLink has user info or a fragment",
        ));
    }
    let decoded = |u: &reqwest::Url| -> Option<Vec<String>> {
        u.path()
            .split('/')
            .map(|segment| {
                percent_encoding::percent_decode_str(segment)
                    .decode_utf8()
                    .ok()
                    .map(|s| s.into_owned())
            })
            .collect()
    };
    match (decoded(&url), decoded(first)) {
        (Some(a), Some(b)) if a == b => {}
        _ => {
            return Err(UpstreamError::BadListPage(
                "@odata.nextLink names another Graph path",
            ))
        }
    }
    if url.query().is_none_or(str::is_empty) {
        return Err(UpstreamError::BadListPage("@odata.nextLink has no query"));
    }
    Ok(url)
}

/// Merges the pages of a Graph collection into one
/// `{"@odata.context": ..., "value": [...]}`, copying each item's bytes as Graph sent them.
#[derive(Default)]
pub(crate) struct ListMerger {
    context: Option<String>,
    items: Vec<u8>,
    count: usize,
    pub(crate) truncated: bool,
}

impl ListMerger {
    /// Adds one page; returns its `@odata.nextLink`, if any.
    pub(crate) fn add(&mut self, body: &[u8]) -> Result<Option<String>, UpstreamError> {
        #[derive(Deserialize)]
        struct Page<'a> {
            #[serde(rename = "@odata.context", borrow, default)]
            context: Option<&'a RawValue>,
            #[serde(borrow)]
            value: Vec<&'a RawValue>,
            #[serde(rename = "@odata.nextLink", default)]
            next_link: Option<String>,
        }
        let page: Page = serde_json::from_slice(body).map_err(|_| UpstreamError::Status {
            status: 200,
            code: "invalidJson".to_string(),
        })?;
        if self.context.is_none() {
            self.context = page.context.map(|c| c.get().to_string());
        }
        for item in page.value {
            if self.count > 0 {
                self.items.push(b',');
            }
            self.items.extend_from_slice(item.get().as_bytes());
            self.count += 1;
        }
        Ok(page.next_link)
    }

    pub(crate) fn finish(self) -> Bytes {
        let mut out = Vec::with_capacity(self.items.len() + 128);
        out.push(b'{');
        if let Some(context) = &self.context {
            out.extend_from_slice(b"\"@odata.context\":");
            out.extend_from_slice(context.as_bytes());
            out.push(b',');
        }
        out.extend_from_slice(b"\"value\":[");
        out.extend_from_slice(&self.items);
        out.push(b']');
        if self.truncated {
            out.extend_from_slice(b",\"@graphSessionProxy.truncated\":true");
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_pages_merge_byte_for_byte() {
        let mut merger = ListMerger::default();
        let next = merger
            .add(br#"{"@odata.context":"ctx","value":[{"id":"a", "n":1.50},{"id":"b"}],"@odata.nextLink":"https://g/x?$skiptoken=1"}"#)
            .unwrap();
        assert_eq!(next.as_deref(), Some("https://g/x?$skiptoken=1"));
        assert_eq!(merger.add(br#"{"value":[{"id":"c"}]}"#).unwrap(), None);
        assert_eq!(
            merger.finish(),
            &br#"{"@odata.context":"ctx","value":[{"id":"a", "n":1.50},{"id":"b"},{"id":"c"}]}"#[..]
        );
        let mut empty = ListMerger {
            truncated: true,
            ..ListMerger::default()
        };
        empty.add(br#"{"value":[]}"#).unwrap();
        let body = empty.finish();
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["@graphSessionProxy.truncated"], true);
        assert!(ListMerger::default().add(b"{\"value\":{}}").is_err());
        assert!(ListMerger::default().add(b"[]").is_err());
    }

    #[test]
    fn next_links_must_name_the_same_endpoint() {
        let first = reqwest::Url::parse(
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions",
        )
        .unwrap();
        for ok in [
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions?$skiptoken=X",
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a@b/sessions?$skiptoken=X",
            "https://GRAPH.microsoft.com:443/v1.0/solutions/virtualEvents/webinars/a%40b/sessions?%24skiptoken=X",
        ] {
            assert!(next_page(&first, ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://evil.example/v1.0/solutions/virtualEvents/webinars/a%40b/sessions?$skiptoken=X",
            "http://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions?$skiptoken=X",
            "https://graph.microsoft.com:8443/v1.0/solutions/virtualEvents/webinars/a%40b/sessions?$skiptoken=X",
            "https://user:pw@graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions?$skiptoken=X",
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions#x",
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions",
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/other/sessions?$skiptoken=X",
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions/../../../../users?$top=1",
            "https://graph.microsoft.com/v1.0/solutions/virtualEvents/webinars/a%40b/sessions/x?$skiptoken=X",
            "https://graph.microsoft.com/beta/solutions/virtualEvents/webinars/a%40b/sessions?$skiptoken=X",
            "https://graph.microsoft.com/v1.0/users?$skiptoken=X",
            "/v1.0/solutions/virtualEvents/webinars/a%40b/sessions?$skiptoken=X",
            "not a url",
        ] {
            assert!(next_page(&first, bad).is_err(), "{bad}");
        }
        let long = format!("{first}?$skiptoken={}", "x".repeat(MAX_NEXT_LINK));
        assert!(next_page(&first, &long).is_err());
    }
}
