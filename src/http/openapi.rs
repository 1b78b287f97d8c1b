//! `GET /openapi.json` on the admin listener: docs/openapi.yaml, the OpenAPI 3.1 document
//! of both listeners, embedded at build time and converted to JSON once, on first use.
//! Open like `/metrics` even when an admin token is configured: it is the contract, not
//! data. `.ci/openapi` lints the document and checks the running proxy against it.

use std::sync::LazyLock;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::http::error::error_response;

/// The document as written.
pub const YAML: &str = include_str!("../../docs/openapi.yaml");

/// The document as JSON bytes, or why the YAML could not be read (a test keeps it
/// readable).
static JSON: LazyLock<Result<Bytes, String>> = LazyLock::new(|| {
    serde_yaml_ng::from_str::<serde_json::Value>(YAML)
        .map(|doc| Bytes::from(doc.to_string()))
        .map_err(|e| e.to_string())
});

/// The answer to `GET /openapi.json` (other methods are the admin router's 405).
pub fn answer(request_id: &str) -> Response<Full<Bytes>> {
    match &*JSON {
        Ok(json) => {
            let mut r = Response::new(Full::new(json.clone()));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(why) => {
            tracing::error!(error = %why, "docs/openapi.yaml as embedded is not valid YAML");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internalError",
                "internal error",
                request_id,
            )
        }
    }
}
