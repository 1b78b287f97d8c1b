//! The simulated Graph: session and list endpoints with Graph's answers, errors and
//! headers, and the injected faults.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::json;

use super::*;

impl Simulator {
    pub(super) async fn graph(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, SimReset> {
        let raw = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_default();
        {
            let mut stats = lock(&self.state.stats);
            stats.graph_requests += 1;
            *stats.paths.entry(raw.clone()).or_default() += 1;
        }
        let client_request_id = req.headers().get("client-request-id").cloned();
        let mut response = if subscriptions::is_subscription_path(req.uri().path()) {
            // Subscriptions have their own fault (`subscription_status`): a test of how the
            // proxy reads sessions must not also break its subscriptions, or the reverse.
            self.subscription_call(req).await
        } else {
            let faults = lock(&self.state.faults).clone();
            if faults.graph_latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(faults.graph_latency_ms)).await;
            }
            if faults.graph_reset {
                return Err(SimReset);
            }
            self.graph_answer(&req, &faults)
        };
        let headers = response.headers_mut();
        if let Ok(id) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
            headers.insert("request-id", id);
        }
        if let Some(id) = client_request_id {
            headers.insert("client-request-id", id);
        }
        Ok(response)
    }

    pub(super) fn graph_answer(
        &self,
        req: &Request<Incoming>,
        faults: &Faults,
    ) -> Response<Full<Bytes>> {
        // Authentication first, as Graph does.
        let Some(token) = self.valid_bearer(req.headers()) else {
            return unauthenticated();
        };
        // Counted faults are consumed under the lock, so concurrent requests share them.
        let (reject, injected) = {
            let mut f = lock(&self.state.faults);
            if f.reject_tokens > 0 {
                f.reject_tokens -= 1;
                (true, None)
            } else {
                let injected = match (f.graph_status, f.graph_status_count) {
                    (Some(_), Some(0)) | (None, _) => None,
                    (Some(status), Some(n)) => {
                        f.graph_status_count = Some(n - 1);
                        Some(status)
                    }
                    (Some(status), None) => Some(status),
                };
                (false, injected)
            }
        };
        if reject {
            if let Some(issued) = lock(&self.state.tokens).get_mut(&token) {
                issued.revoked = true;
            }
            return unauthenticated();
        }
        if let Some(status) = injected {
            return injected_status(status, faults.retry_after.as_deref());
        }
        let path = req.uri().path();
        let segments: Vec<&str> = path.split('/').collect();
        if let ["", version, "solutions", "virtualEvents", kind, event, "sessions"] =
            segments.as_slice()
        {
            return self.list_answer(req, version, kind, event, faults);
        }
        if req.uri().query().is_some() {
            return graph_error(
                400,
                "BadRequest",
                "This method doesn't support OData query parameters.",
            );
        }
        let ["", version, "solutions", "virtualEvents", kind, event, "sessions", session] =
            segments.as_slice()
        else {
            return graph_error(
                400,
                "BadRequest",
                &format!(
                    "Resource not found for the segment '{}'.",
                    segments.get(1).unwrap_or(&"")
                ),
            );
        };
        if !matches!(*version, "v1.0" | "beta") || !matches!(*kind, "webinars" | "townhalls") {
            return graph_error(400, "BadRequest", "Resource not found for the segment.");
        }
        let (Ok(event), Ok(session)) = (
            percent_decode_str(event).decode_utf8(),
            percent_decode_str(session).decode_utf8(),
        ) else {
            return graph_error(400, "BadRequest", "Invalid segment.");
        };
        let known = lock(&self.state.sessions)
            .get(&(kind.to_string(), event.to_string(), session.to_string()))
            .cloned();
        let body = match known {
            Some(body) => body,
            None if session.starts_with("gen-") => self.generated_body(kind, &event, &session),
            None => return graph_error(404, "NotFound", "The requested session was not found."),
        };
        let mut r = Response::new(Full::new(body));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"),
        );
        r
    }
}

impl Simulator {
    /// The request's bearer token, if the simulator issued it and it is neither revoked nor
    /// expired (by the shared clock).
    pub(super) fn valid_bearer(&self, headers: &http::HeaderMap) -> Option<String> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))?;
        let now = self.state.clock.now();
        let tokens = lock(&self.state.tokens);
        let issued = tokens.get(token)?;
        (!issued.revoked && now < issued.expires_at).then(|| token.to_string())
    }

    /// One page of an event's session list (summaries), with a next link while more remain.
    pub(super) fn list_answer(
        &self,
        req: &Request<Incoming>,
        version: &str,
        kind: &str,
        raw_event: &str,
        faults: &Faults,
    ) -> Response<Full<Bytes>> {
        if !matches!(version, "v1.0" | "beta") || !matches!(kind, "webinars" | "townhalls") {
            return graph_error(400, "BadRequest", "Resource not found for the segment.");
        }
        let Ok(event) = percent_decode_str(raw_event).decode_utf8() else {
            return graph_error(400, "BadRequest", "Invalid segment.");
        };
        let skip = match req.uri().query() {
            None => 0,
            Some(query) => match query
                .strip_prefix("$skiptoken=")
                .or_else(|| query.strip_prefix("%24skiptoken="))
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => n,
                None => {
                    return graph_error(
                        400,
                        "BadRequest",
                        "Invalid $skiptoken or unsupported query option.",
                    )
                }
            },
        };
        let mut bodies: Vec<(String, Bytes)> = lock(&self.state.sessions)
            .iter()
            .filter(|((k, e, _), _)| k == kind && *e == event)
            .map(|((_, _, id), body)| (id.clone(), body.clone()))
            .collect();
        if let Some(n) = event
            .strip_prefix("gen-list-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            for i in 0..n.min(10_000) {
                let id = format!("gen-{i:04}");
                if !bodies.iter().any(|(known, _)| *known == id) {
                    let body = self.generated_body(kind, &event, &id);
                    bodies.push((id, body));
                }
            }
        }
        if bodies.is_empty() {
            return graph_error(404, "NotFound", "The requested event was not found.");
        }
        bodies.sort_by(|a, b| a.0.cmp(&b.0));
        let page_size = faults.list_page_size.unwrap_or(10).max(1);
        let items: Vec<serde_json::Value> = bodies
            .iter()
            .skip(skip)
            .take(page_size)
            .map(|(_, body)| summary(body))
            .collect();
        let mut page = serde_json::Map::new();
        page.insert(
            "@odata.context".to_string(),
            json!(format!("https://graph.microsoft.com/{version}/$metadata#solutions/virtualEvents/{kind}('{event}')/sessions")),
        );
        page.insert("value".to_string(), json!(items));
        if skip + page_size < bodies.len() {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let next = faults.next_link.clone().unwrap_or_else(|| {
                format!(
                    "http://{host}/{version}/solutions/virtualEvents/{kind}/{raw_event}/sessions?$skiptoken={}",
                    skip + page_size
                )
            });
            page.insert("@odata.nextLink".to_string(), json!(next));
        }
        let mut r = json_response(StatusCode::OK, &serde_json::Value::Object(page));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"),
        );
        r
    }
}

/// A list item as Graph sends it: id, subject, start, end and join URL; the rest null.
pub(super) fn summary(body: &[u8]) -> serde_json::Value {
    let parsed: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let session = parsed.get("value").cloned().unwrap_or(parsed);
    let mut out = serde_json::Map::new();
    if let Some(map) = session.as_object() {
        for (key, value) in map {
            if key == "@odata.context" {
                continue;
            }
            let keep = matches!(
                key.as_str(),
                "@odata.type" | "id" | "subject" | "startDateTime" | "endDateTime" | "joinWebUrl"
            );
            out.insert(key.clone(), if keep { value.clone() } else { json!(null) });
        }
    }
    serde_json::Value::Object(out)
}

/// Graph's answer to a missing, unknown, revoked or expired token.
pub(super) fn unauthenticated() -> Response<Full<Bytes>> {
    graph_error(
        401,
        "InvalidAuthenticationToken",
        "Access token has expired or is not yet valid.",
    )
}

/// Graph's error shape.
pub(super) fn graph_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let now = httpdate::fmt_http_date(std::time::SystemTime::now());
    let request_id = uuid::Uuid::new_v4().to_string();
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"error": {"code": code, "message": message, "innerError": {"date": now, "request-id": request_id, "client-request-id": request_id}}}),
    )
}

pub(super) fn injected_status(status: u16, retry_after: Option<&str>) -> Response<Full<Bytes>> {
    let code = match status {
        429 => "TooManyRequests",
        403 => "Forbidden",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "InternalServerError",
    };
    let message = if status == 403 {
        "No application access policy found for this app"
    } else {
        "Injected failure"
    };
    let mut r = graph_error(status, code, message);
    if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        r.headers_mut().insert(http::header::RETRY_AFTER, ra);
    }
    r
}
