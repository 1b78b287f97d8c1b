//! The simulated change-notification subscriptions (graph-facts.md, "Change notifications
//! for virtual events"): subscriptions to a webinar's sessions, validated against their
//! endpoints before they exist, at most a day long and one per webinar. What a test makes
//! happen to them (a session changes, a lifecycle event) is in notifications.rs.
//!
//! Graph calls the caller's endpoints; so does the simulator, with its own `reqwest`
//! client and none of the proxy's code.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::json;

use super::graph::{injected_status, unauthenticated};
use super::*;

/// Graph keeps a virtual event subscription at most a day.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long Graph waits for a validation answer; the simulator waits as long for a
/// notification's answer too, so a stuck test endpoint cannot hang a control call.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Graph's limit on `clientState`.
const MAX_CLIENT_STATE: usize = 128;
/// The simulated app's service principal, which Graph reports as the creator.
const CREATOR_ID: &str = "00000000-0000-0000-0000-0000000005b5";
const VALIDATION_FAILED: &str = "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.";

/// One subscription, as created (the resource kept as the caller wrote it, less a
/// leading `/`).
pub(super) struct Subscription {
    pub(super) id: String,
    pub(super) resource: String,
    /// The webinar id of `resource`, percent-decoded: what session changes are matched by.
    pub(super) webinar: String,
    pub(super) change_type: String,
    pub(super) client_state: Option<String>,
    pub(super) notification_url: String,
    pub(super) lifecycle_url: Option<String>,
    pub(super) expiration: SystemTime,
    /// A `reauthorizationRequired` was sent and neither a reauthorization nor a renewal
    /// has answered it yet.
    pub(super) reauthorization_pending: bool,
    /// The API version it was created under (for `@odata.context` in `/_sim` listings).
    pub(super) version: String,
}

impl Subscription {
    /// Graph's subscription object.
    pub(super) fn to_json(&self, version: &str, application_id: &str) -> serde_json::Value {
        json!({
            "@odata.context": format!("https://graph.microsoft.com/{version}/$metadata#subscriptions/$entity"),
            "id": self.id,
            "resource": self.resource,
            "applicationId": application_id,
            "changeType": self.change_type,
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "notificationQueryOptions": null,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": rfc3339(self.expiration),
            "creatorId": CREATOR_ID,
            "includeResourceData": null,
            "latestSupportedTlsVersion": "v1_2",
            "encryptionCertificate": null,
            "encryptionCertificateId": null,
            "notificationUrlAppId": null,
        })
    }

    pub(super) fn notifies(&self, change: &str) -> bool {
        self.change_type.split(',').any(|c| c.trim() == change)
    }
}

/// A create request's body; every field optional here so that a missing one gets Graph's
/// 400 rather than a parse error.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateRequest {
    change_type: Option<String>,
    notification_url: Option<String>,
    lifecycle_notification_url: Option<String>,
    resource: Option<String>,
    expiration_date_time: Option<String>,
    client_state: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RenewRequest {
    expiration_date_time: Option<String>,
}

/// `/{version}/subscriptions[/...]`: the subscription API rather than sessions.
pub(super) fn is_subscription_path(path: &str) -> bool {
    let mut segments = path.split('/');
    segments.next() == Some("") && segments.nth(1) == Some("subscriptions")
}

// === impl Simulator: the subscription API ===

impl Simulator {
    /// A Graph call under `/{v}/subscriptions`, counted as a refusal when answered 4xx.
    pub(super) async fn subscription_call(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let response = self.subscription_answer(req).await;
        if response.status().is_client_error() {
            lock(&self.state.stats).subscription_refusals += 1;
        }
        response
    }

    async fn subscription_answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if self.valid_bearer(req.headers()).is_none() {
            return unauthenticated();
        }
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.split('/').collect();
        let ["", version, "subscriptions", rest @ ..] = segments.as_slice() else {
            return graph_error(400, "BadRequest", "Resource not found for the segment.");
        };
        if !matches!(*version, "v1.0" | "beta") {
            return graph_error(400, "BadRequest", "Resource not found for the segment.");
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return graph_error(400, "BadRequest", "The request body was cut short."),
        };
        match (method, rest) {
            (Method::POST, []) => self.create(version, &body).await,
            (Method::GET, []) => self.list(version),
            (Method::GET, [id]) => match self.live(id) {
                Some(subscription) => json_response(StatusCode::OK, &subscription),
                None => not_found(id),
            },
            (Method::PATCH, [id]) => self.renew(version, id, &body),
            (Method::DELETE, [id]) => self.delete(id),
            (Method::POST, [id, "reauthorize"]) => self.reauthorize(id),
            (_, [] | [_] | [_, "reauthorize"]) => graph_error(
                405,
                "BadRequest",
                "The HTTP method is not supported for this resource.",
            ),
            _ => graph_error(400, "BadRequest", "Resource not found for the segment."),
        }
    }

    async fn create(&self, version: &str, body: &[u8]) -> Response<Full<Bytes>> {
        if let Some(status) = self.take_subscription_fault() {
            return subscription_fault(status, lock(&self.state.faults).retry_after.as_deref());
        }
        let request: CreateRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(_) => return bad_json(),
        };
        let subscription = match self.check_create(request, version) {
            Ok(s) => s,
            Err(refusal) => return refusal.answer(),
        };
        if self.webinar_taken(&subscription.webinar) {
            return conflict(&subscription.resource);
        }
        // Graph validates every endpoint before it keeps anything.
        let mut endpoints = vec![subscription.notification_url.clone()];
        endpoints.extend(subscription.lifecycle_url.clone());
        for url in endpoints {
            if !self.validate(&url).await {
                return graph_error(400, "ValidationError", VALIDATION_FAILED);
            }
        }
        let answer = subscription.to_json(version, &self.state.config.client_id);
        {
            let mut subscriptions = lock(&self.state.subscriptions);
            prune(&mut subscriptions, self.state.clock.wall());
            // A concurrent create for the same webinar may have won during validation.
            if subscriptions
                .values()
                .any(|s| s.webinar == subscription.webinar)
            {
                return conflict(&subscription.resource);
            }
            subscriptions.insert(subscription.id.clone(), subscription);
        }
        lock(&self.state.stats).subscriptions_created += 1;
        json_response(StatusCode::CREATED, &answer)
    }

    /// The subscription a create request describes, or Graph's 400 for it.
    fn check_create(&self, request: CreateRequest, version: &str) -> Result<Subscription, Refusal> {
        let required = |value: Option<String>, name: &str| {
            value.filter(|v| !v.is_empty()).ok_or_else(|| {
                Refusal::invalid(&format!(
                    "The property '{name}' is required to create a subscription."
                ))
            })
        };
        let raw_resource = required(request.resource, "resource")?;
        let resource = raw_resource
            .strip_prefix('/')
            .unwrap_or(&raw_resource)
            .to_string();
        let webinar = webinar_of(&resource).ok_or_else(|| {
            Refusal::invalid(&format!(
                "The resource '{raw_resource}' is not supported for change notifications; supported: solutions/virtualEvents/webinars/{{webinarId}}/sessions."
            ))
        })?;
        let change_type = required(request.change_type, "changeType")?;
        if !change_type
            .split(',')
            .all(|c| matches!(c.trim(), "created" | "updated"))
        {
            return Err(Refusal::invalid(&format!(
                "The changeType '{change_type}' is not supported for this resource; supported: created, updated."
            )));
        }
        let notification_url = required(request.notification_url, "notificationUrl")?;
        let expiration = self.check_expiration(request.expiration_date_time.as_deref())?;
        if request
            .client_state
            .as_ref()
            .is_some_and(|s| s.chars().count() > MAX_CLIENT_STATE)
        {
            return Err(Refusal::invalid(
                "The clientState can be at most 128 characters long.",
            ));
        }
        Ok(Subscription {
            id: uuid::Uuid::new_v4().to_string(),
            resource,
            webinar,
            change_type,
            client_state: request.client_state,
            notification_url,
            lifecycle_url: request.lifecycle_notification_url.filter(|u| !u.is_empty()),
            expiration,
            reauthorization_pending: false,
            version: version.to_string(),
        })
    }

    /// An `expirationDateTime` in the future and at most a day after the shared clock's now.
    fn check_expiration(&self, raw: Option<&str>) -> Result<SystemTime, Refusal> {
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            return Err(Refusal::invalid(
                "The property 'expirationDateTime' is required.",
            ));
        };
        let Some(at) = parse_rfc3339(raw) else {
            return Err(Refusal::invalid(&format!(
                "The expirationDateTime '{raw}' is not a valid RFC 3339 date and time."
            )));
        };
        let now = self.state.clock.wall();
        if at <= now {
            return Err(Refusal::invalid(
                "Subscription expiration must be in the future.",
            ));
        }
        if at > now + MAX_LIFETIME {
            return Err(Refusal::invalid(
                "Subscription expiration can only be 1440 minutes in the future.",
            ));
        }
        match lock(&self.state.faults).subscription_granted_secs {
            Some(granted) => Ok(at.min(now + Duration::from_secs(granted))),
            None => Ok(at),
        }
    }

    /// The `subscription_status` fault, consumed under the lock like `graph_status`.
    fn take_subscription_fault(&self) -> Option<u16> {
        let mut f = lock(&self.state.faults);
        match (f.subscription_status, f.subscription_status_count) {
            (Some(_), Some(0)) | (None, _) => None,
            (Some(status), Some(n)) => {
                f.subscription_status_count = Some(n - 1);
                Some(status)
            }
            (Some(status), None) => Some(status),
        }
    }

    fn webinar_taken(&self, webinar: &str) -> bool {
        let mut subscriptions = lock(&self.state.subscriptions);
        prune(&mut subscriptions, self.state.clock.wall());
        subscriptions.values().any(|s| s.webinar == webinar)
    }

    /// Graph's handshake: POST `url?validationToken=...`, expect 200 `text/plain` with the
    /// token (decoded) within 10 s.
    async fn validate(&self, url: &str) -> bool {
        lock(&self.state.stats).validations_sent += 1;
        let token = validation_token();
        let separator = if url.contains('?') { '&' } else { '?' };
        let target = format!(
            "{url}{separator}validationToken={}",
            utf8_percent_encode(&token, NON_ALPHANUMERIC)
        );
        let Some(client) = http_client() else {
            return false;
        };
        let call = async {
            let response = client
                .post(&target)
                .header(CONTENT_TYPE, "text/plain")
                .body("")
                .send()
                .await
                .ok()?;
            let plain = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("text/plain"));
            if response.status() != reqwest::StatusCode::OK || !plain {
                return Some(false);
            }
            let text = response.bytes().await.ok()?;
            Some(text == token.as_bytes())
        };
        matches!(
            tokio::time::timeout(CALL_TIMEOUT, call).await,
            Ok(Some(true))
        )
    }

    fn list(&self, version: &str) -> Response<Full<Bytes>> {
        let value = self.each_live(|s| s.to_json(version, &self.state.config.client_id));
        json_response(
            StatusCode::OK,
            &json!({
                "@odata.context": format!("https://graph.microsoft.com/{version}/$metadata#subscriptions"),
                "value": value,
            }),
        )
    }

    /// A live subscription as Graph's GET shows it.
    fn live(&self, id: &str) -> Option<serde_json::Value> {
        let mut subscriptions = lock(&self.state.subscriptions);
        prune(&mut subscriptions, self.state.clock.wall());
        let s = subscriptions.get(id)?;
        Some(s.to_json(&s.version, &self.state.config.client_id))
    }

    fn renew(&self, version: &str, id: &str, body: &[u8]) -> Response<Full<Bytes>> {
        let request: RenewRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(_) => return bad_json(),
        };
        let wall = self.state.clock.wall();
        let mut subscriptions = lock(&self.state.subscriptions);
        prune(&mut subscriptions, wall);
        let Some(subscription) = subscriptions.get_mut(id) else {
            return not_found(id);
        };
        let expiration = match self.check_expiration(request.expiration_date_time.as_deref()) {
            Ok(at) => at,
            Err(refusal) => return refusal.answer(),
        };
        subscription.expiration = expiration;
        // A renewal answers a reauthorizationRequired as well (graph-facts.md).
        subscription.reauthorization_pending = false;
        let answer = subscription.to_json(version, &self.state.config.client_id);
        drop(subscriptions);
        lock(&self.state.stats).subscriptions_renewed += 1;
        json_response(StatusCode::OK, &answer)
    }

    fn delete(&self, id: &str) -> Response<Full<Bytes>> {
        let mut subscriptions = lock(&self.state.subscriptions);
        prune(&mut subscriptions, self.state.clock.wall());
        if subscriptions.remove(id).is_none() {
            return not_found(id);
        }
        drop(subscriptions);
        lock(&self.state.stats).subscriptions_deleted += 1;
        no_content()
    }

    fn reauthorize(&self, id: &str) -> Response<Full<Bytes>> {
        let mut subscriptions = lock(&self.state.subscriptions);
        prune(&mut subscriptions, self.state.clock.wall());
        let Some(subscription) = subscriptions.get_mut(id) else {
            return not_found(id);
        };
        subscription.reauthorization_pending = false;
        drop(subscriptions);
        lock(&self.state.stats).subscriptions_reauthorized += 1;
        no_content()
    }

    /// `view` of each live subscription, by id.
    pub(super) fn each_live(
        &self,
        view: impl Fn(&Subscription) -> serde_json::Value,
    ) -> Vec<serde_json::Value> {
        let mut subscriptions = lock(&self.state.subscriptions);
        prune(&mut subscriptions, self.state.clock.wall());
        let mut live: Vec<&Subscription> = subscriptions.values().collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live.into_iter().map(view).collect()
    }
}

// === helpers ===

/// Forgets expired subscriptions: to Graph they are gone.
pub(super) fn prune(subscriptions: &mut HashMap<String, Subscription>, now: SystemTime) {
    subscriptions.retain(|_, s| s.expiration > now);
}

/// `solutions/virtualEvents/webinars/{id}/sessions` -> the id, percent-decoded.
fn webinar_of(resource: &str) -> Option<String> {
    let segments: Vec<&str> = resource.split('/').collect();
    let ["solutions", "virtualEvents", "webinars", id, "sessions"] = segments.as_slice() else {
        return None;
    };
    let id = percent_decode_str(id).decode_utf8().ok()?;
    (!id.is_empty()).then(|| id.to_string())
}

/// RFC 3339 with `Z` or a numeric offset (humantime alone takes only UTC).
fn parse_rfc3339(raw: &str) -> Option<SystemTime> {
    if raw.ends_with(['Z', 'z']) {
        let utc = format!("{}Z", raw.get(..raw.len() - 1)?);
        return humantime::parse_rfc3339(&utc).ok();
    }
    let split = raw.len().checked_sub(6)?;
    let (local, offset) = (raw.get(..split)?, raw.get(split..)?);
    let bytes = offset.as_bytes();
    if !matches!(bytes.first(), Some(b'+' | b'-')) || bytes.get(3) != Some(&b':') {
        return None;
    }
    let hours: u64 = offset.get(1..3)?.parse().ok()?;
    let minutes: u64 = offset.get(4..6)?.parse().ok()?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    let at = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    // Local time minus a positive offset is UTC.
    if bytes.first() == Some(&b'+') {
        at.checked_sub(shift)
    } else {
        at.checked_add(shift)
    }
}

/// UTC, `…Z`, fractions only when there are some.
pub(super) fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339(at).to_string()
}

/// Opaque like Graph's, with characters a careless endpoint would not decode (spaces,
/// `+`, `/`, `=`), so a test sees it handled properly.
fn validation_token() -> String {
    use base64::Engine as _;
    let nonce = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 10]>());
    format!(
        "Validation: Testing client application reachability for subscription Request-Id: {} {nonce}+/",
        uuid::Uuid::new_v4()
    )
}

/// A client per call: a pooled connection must not outlive the runtime that made it (each
/// test has its own), and the system's proxy settings must not take loopback calls.
pub(super) fn http_client() -> Option<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .ok()
}

/// Why a request describes no acceptable subscription: Graph's 400 `InvalidRequest`.
struct Refusal {
    message: String,
}

impl Refusal {
    fn invalid(message: &str) -> Refusal {
        Refusal {
            message: message.to_string(),
        }
    }

    fn answer(self) -> Response<Full<Bytes>> {
        invalid(&self.message)
    }
}

pub(super) fn invalid(message: &str) -> Response<Full<Bytes>> {
    graph_error(400, "InvalidRequest", message)
}

pub(super) fn bad_json() -> Response<Full<Bytes>> {
    graph_error(
        400,
        "BadRequest",
        "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.",
    )
}

fn conflict(resource: &str) -> Response<Full<Bytes>> {
    graph_error(
        409,
        "Conflict",
        &format!(
            "A subscription for the resource '{resource}' already exists for this application."
        ),
    )
}

pub(super) fn not_found(id: &str) -> Response<Full<Bytes>> {
    graph_error(
        404,
        "ResourceNotFound",
        &format!("The subscription '{id}' was not found."),
    )
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The `subscription_status` fault's answer: a missing permission as Graph words it for
/// subscriptions, the other statuses as the session faults answer them.
fn subscription_fault(status: u16, retry_after: Option<&str>) -> Response<Full<Bytes>> {
    if status == 403 {
        return graph_error(
            403,
            "ExtensionError",
            "Operation: Create; Exception: [Status Code: Forbidden; Reason: The caller does not have permission VirtualEvent.Read.All]",
        );
    }
    injected_status(status, retry_after)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use http::header::CONTENT_TYPE;
    use tokio::net::TcpListener;

    use super::*;

    /// What the test endpoint answers a validation request.
    #[derive(Clone, Copy, PartialEq)]
    enum Answer {
        /// 200 `text/plain` with the decoded token, as it should.
        Echo,
        /// 200 `text/plain` with something else.
        Wrong,
    }

    /// A request the test endpoint received: path, raw query, content type, body.
    type Received = (String, Option<String>, String, Bytes);

    /// A notification endpoint on `127.0.0.1:0`: validations under `/wrong` get
    /// [`Answer::Wrong`], the rest [`Answer::Echo`]; notifications are answered 202.
    struct Endpoint {
        addr: SocketAddr,
        received: Arc<Mutex<Vec<Received>>>,
    }

    impl Endpoint {
        async fn start() -> Endpoint {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let received: Arc<Mutex<Vec<Received>>> = Arc::default();
            let log = received.clone();
            let service = tower::service_fn(move |req: Request<Incoming>| {
                let log = log.clone();
                async move {
                    let path = req.uri().path().to_string();
                    let query = req.uri().query().map(str::to_string);
                    let content_type = req
                        .headers()
                        .get(CONTENT_TYPE)
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    log.lock()
                        .unwrap()
                        .push((path.clone(), query.clone(), content_type, body));
                    let token = query
                        .as_deref()
                        .and_then(|q| q.strip_prefix("validationToken="))
                        .map(|t| percent_decode_str(t).decode_utf8().unwrap().to_string());
                    let response = match token {
                        Some(token) => {
                            let answer = if path.starts_with("/wrong") {
                                Answer::Wrong
                            } else {
                                Answer::Echo
                            };
                            let text = match answer {
                                Answer::Echo => token,
                                Answer::Wrong => "not the token".to_string(),
                            };
                            Response::builder()
                                .header(CONTENT_TYPE, "text/plain; charset=utf-8")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap()
                        }
                        None => Response::builder()
                            .status(202)
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(crate::server::accept_loop(
                listener,
                service,
                std::future::pending(),
                crate::server::ConnectionOptions::internal(Duration::from_secs(1)),
            ));
            Endpoint { addr, received }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn received(&self) -> Vec<Received> {
            self.received.lock().unwrap().clone()
        }

        /// The JSON notifications (not validations) received at `path`.
        fn notifications(&self, path: &str) -> Vec<serde_json::Value> {
            self.received()
                .into_iter()
                .filter(|(p, q, _, _)| p == path && q.is_none())
                .map(|(_, _, ct, body)| {
                    assert_eq!(ct, "application/json");
                    serde_json::from_slice(&body).unwrap()
                })
                .collect()
        }
    }

    /// A simulator on `127.0.0.1:0`, a token for it and a notification endpoint.
    struct Rig {
        sim: Simulator,
        clock: Clock,
        base: String,
        token: String,
        http: reqwest::Client,
        endpoint: Endpoint,
    }

    const WEBINAR: &str = SEED_EVENT;

    fn resource(webinar: &str) -> String {
        format!("solutions/virtualEvents/webinars/{webinar}/sessions")
    }

    impl Rig {
        async fn start() -> Rig {
            let clock = Clock::new();
            let sim = Simulator::new(SimConfig::default(), clock.clone());
            // Long enough to outlive the clock advances below.
            let token = sim.issue_token(Duration::from_secs(30 * 86400));
            let addr = sim.clone().spawn().await.unwrap();
            Rig {
                sim,
                clock,
                base: format!("http://{addr}"),
                token,
                http: reqwest::Client::builder().no_proxy().build().unwrap(),
                endpoint: Endpoint::start().await,
            }
        }

        async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            body: Option<serde_json::Value>,
        ) -> (u16, serde_json::Value) {
            let mut request = self
                .http
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(&self.token);
            if let Some(body) = body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.to_string());
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            let json = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (status, json)
        }

        /// `expirationDateTime` this far after the simulator's now.
        fn expiry(&self, after: Duration) -> String {
            rfc3339(self.clock.wall() + after)
        }

        fn create_body(&self, webinar: &str) -> serde_json::Value {
            json!({
                "changeType": "created,updated",
                "notificationUrl": self.endpoint.url("/notify"),
                "lifecycleNotificationUrl": self.endpoint.url("/lifecycle"),
                "resource": resource(webinar),
                "expirationDateTime": self.expiry(Duration::from_secs(3600)),
                "clientState": "secret-state",
            })
        }

        async fn create(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
            self.call(reqwest::Method::POST, "/v1.0/subscriptions", Some(body))
                .await
        }

        /// Creates the usual subscription on `webinar`; its id.
        async fn subscribe(&self, webinar: &str) -> String {
            let (status, created) = self.create(self.create_body(webinar)).await;
            assert_eq!(status, 201, "{created}");
            created["id"].as_str().unwrap().to_string()
        }
    }

    fn code(error: &serde_json::Value) -> &str {
        error["error"]["code"].as_str().unwrap()
    }

    #[tokio::test]
    async fn create_validates_both_endpoints_and_stores() {
        let rig = Rig::start().await;
        let before = rig.sim.stats().graph_requests;
        let (status, created) = rig.create(rig.create_body(WEBINAR)).await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        assert_eq!(created["resource"], json!(resource(WEBINAR)));
        assert_eq!(created["changeType"], "created,updated");
        assert_eq!(created["clientState"], "secret-state");
        assert_eq!(
            created["notificationUrl"],
            json!(rig.endpoint.url("/notify"))
        );
        assert_eq!(
            created["lifecycleNotificationUrl"],
            json!(rig.endpoint.url("/lifecycle"))
        );
        assert_eq!(
            created["applicationId"],
            json!(SimConfig::default().client_id)
        );
        assert_eq!(created["latestSupportedTlsVersion"], "v1_2");
        assert!(created["creatorId"].is_string());
        assert_eq!(
            created["@odata.context"],
            "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity"
        );
        let expiry = created["expirationDateTime"].as_str().unwrap();
        assert!(expiry.ends_with('Z'));
        assert!(humantime::parse_rfc3339(expiry).unwrap() > rig.clock.wall());

        // Each endpoint got one validation: empty text/plain POST, the token encoded.
        let validations: Vec<Received> = rig
            .endpoint
            .received()
            .into_iter()
            .filter(|r| r.1.is_some())
            .collect();
        let paths: Vec<&str> = validations.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(paths, ["/notify", "/lifecycle"]);
        for (_, query, content_type, body) in &validations {
            let raw = query
                .as_deref()
                .unwrap()
                .strip_prefix("validationToken=")
                .unwrap();
            assert!(!raw.contains([' ', '+', '/', '=']), "encoded: {raw}");
            let token = percent_decode_str(raw).decode_utf8().unwrap();
            assert!(token.contains(' ') && token.contains('+') && token.contains('='));
            assert_eq!(content_type, "text/plain");
            assert!(body.is_empty());
        }

        let listed = rig.sim.subscriptions();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["id"], id);
        assert_eq!(listed[0]["reauthorizationPending"], false);
        let (status, got) = rig
            .call(
                reqwest::Method::GET,
                &format!("/beta/subscriptions/{id}"),
                None,
            )
            .await;
        assert_eq!((status, &got["id"]), (200, &json!(id)));
        let over_http: serde_json::Value = rig
            .http
            .get(format!("{}/_sim/subscriptions", rig.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(over_http, json!(listed));

        let stats = rig.sim.stats();
        assert_eq!(stats.subscriptions_created, 1);
        assert_eq!(stats.validations_sent, 2);
        assert_eq!(stats.subscription_refusals, 0);
        // The create and the GET are Graph requests; the /_sim listing is not.
        assert_eq!(stats.graph_requests, before + 2);
        assert_eq!(stats.paths.get("/v1.0/subscriptions"), Some(&1));
    }

    #[tokio::test]
    async fn a_failed_validation_stores_nothing() {
        let rig = Rig::start().await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let cases = [
            (rig.endpoint.url("/wrong"), None),
            (
                rig.endpoint.url("/notify"),
                Some(rig.endpoint.url("/wrong")),
            ),
            (format!("http://{closed}/notify"), None),
        ];
        for (notify, lifecycle) in cases {
            let mut body = rig.create_body(WEBINAR);
            body["notificationUrl"] = json!(notify);
            body["lifecycleNotificationUrl"] = json!(lifecycle);
            let (status, error) = rig.create(body).await;
            assert_eq!((status, code(&error)), (400, "ValidationError"), "{notify}");
            assert_eq!(error["error"]["message"], VALIDATION_FAILED);
            assert!(rig.sim.subscriptions().is_empty());
        }
        assert_eq!(rig.sim.stats().subscriptions_created, 0);
        assert_eq!(rig.sim.stats().subscription_refusals, 3);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_any_validation() {
        let rig = Rig::start().await;
        let with = |key: &str, value: serde_json::Value| {
            let mut body = rig.create_body(WEBINAR);
            body[key] = value;
            body
        };
        let cases = [
            with(
                "expirationDateTime",
                json!(rig.expiry(Duration::from_secs(24 * 3600 + 60))),
            ),
            with(
                "expirationDateTime",
                json!(rfc3339(rig.clock.wall() - Duration::from_secs(60))),
            ),
            with("expirationDateTime", json!("tomorrow")),
            with(
                "resource",
                json!(format!(
                    "solutions/virtualEvents/townhalls/{TOWNHALL_EVENT}/sessions"
                )),
            ),
            with("resource", json!(format!("{}/abc", resource(WEBINAR)))),
            with("resource", json!("me/messages")),
            with("changeType", json!("created,deleted")),
            with("clientState", json!("x".repeat(129))),
            with("notificationUrl", json!(null)),
        ];
        for body in cases {
            let (status, error) = rig.create(body.clone()).await;
            assert_eq!((status, code(&error)), (400, "InvalidRequest"), "{body}");
        }
        let (status, error) = rig
            .create(with(
                "resource",
                json!(format!(
                    "solutions/virtualEvents/townhalls/{TOWNHALL_EVENT}/sessions"
                )),
            ))
            .await;
        assert_eq!(status, 400);
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not supported"));
        let (status, error) = rig
            .create(with(
                "expirationDateTime",
                json!(rig.expiry(Duration::from_secs(24 * 3600 + 60))),
            ))
            .await;
        assert_eq!(status, 400);
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1440 minutes"));

        // Bad JSON: Graph's error shape, not a panic.
        let response = rig
            .http
            .post(format!("{}/v1.0/subscriptions", rig.base))
            .bearer_auth(&rig.token)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(code(&error), "BadRequest");

        // No token: 401, as for sessions.
        let response = rig
            .http
            .post(format!("{}/v1.0/subscriptions", rig.base))
            .body(rig.create_body(WEBINAR).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);

        // Exactly a day, with a numeric offset and a leading '/': accepted.
        let mut body = with(
            "expirationDateTime",
            json!(
                rfc3339(reference_time(rig.clock.wall()) + Duration::from_secs(86400 - 60))
                    .replace('Z', "+00:00")
            ),
        );
        body["resource"] = json!(format!("/{}", resource(WEBINAR)));
        let (status, created) = rig.create(body).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["resource"], json!(resource(WEBINAR)));

        let stats = rig.sim.stats();
        assert_eq!(stats.subscription_refusals, 13);
        assert_eq!(stats.validations_sent, 2, "only the last create validated");
    }

    #[tokio::test]
    async fn one_subscription_per_webinar() {
        let rig = Rig::start().await;
        let id = rig.subscribe(WEBINAR).await;
        let (status, error) = rig.create(rig.create_body(WEBINAR)).await;
        assert_eq!((status, code(&error)), (409, "Conflict"));
        let mut slash = rig.create_body(WEBINAR);
        slash["resource"] = json!(format!("/{}", resource(WEBINAR)));
        assert_eq!(rig.create(slash).await.0, 409);
        // Another webinar is another resource.
        rig.subscribe("other@webinar").await;
        // Once the first is gone, the webinar can be subscribed to again.
        let (status, _) = rig
            .call(
                reqwest::Method::DELETE,
                &format!("/v1.0/subscriptions/{id}"),
                None,
            )
            .await;
        assert_eq!(status, 204);
        rig.subscribe(WEBINAR).await;
        assert_eq!(rig.sim.subscriptions().len(), 2);
    }

    #[tokio::test]
    async fn renew_delete_and_expiry() {
        let rig = Rig::start().await;
        let id = rig.subscribe(WEBINAR).await;
        let path = format!("/v1.0/subscriptions/{id}");
        let later = rig.expiry(Duration::from_secs(20 * 3600));
        let (status, renewed) = rig
            .call(
                reqwest::Method::PATCH,
                &path,
                Some(json!({"expirationDateTime": later})),
            )
            .await;
        assert_eq!(status, 200, "{renewed}");
        assert_eq!(renewed["expirationDateTime"], json!(later));
        assert_eq!(
            rig.sim.subscriptions()[0]["expirationDateTime"],
            json!(later)
        );
        let too_far = rig.expiry(Duration::from_secs(25 * 3600));
        let (status, error) = rig
            .call(
                reqwest::Method::PATCH,
                &path,
                Some(json!({"expirationDateTime": too_far})),
            )
            .await;
        assert_eq!((status, code(&error)), (400, "InvalidRequest"));
        assert_eq!(
            rig.sim.subscriptions()[0]["expirationDateTime"],
            json!(later)
        );

        let (status, _) = rig.call(reqwest::Method::DELETE, &path, None).await;
        assert_eq!(status, 204);
        let (status, error) = rig
            .call(
                reqwest::Method::PATCH,
                &path,
                Some(json!({"expirationDateTime": later})),
            )
            .await;
        assert_eq!((status, code(&error)), (404, "ResourceNotFound"));
        assert_eq!(rig.call(reqwest::Method::DELETE, &path, None).await.0, 404);
        assert_eq!(
            rig.call(reqwest::Method::POST, &format!("{path}/reauthorize"), None)
                .await
                .0,
            404
        );

        // Past its expiry by the shared clock, a subscription is gone everywhere.
        let id = rig.subscribe(WEBINAR).await;
        let path = format!("/v1.0/subscriptions/{id}");
        rig.clock.advance(Duration::from_secs(3601));
        let (status, error) = rig
            .call(
                reqwest::Method::PATCH,
                &path,
                Some(json!({"expirationDateTime": rig.expiry(Duration::from_secs(3600))})),
            )
            .await;
        assert_eq!((status, code(&error)), (404, "ResourceNotFound"));
        assert_eq!(rig.call(reqwest::Method::GET, &path, None).await.0, 404);
        assert!(rig.sim.subscriptions().is_empty());
        // ...and no longer blocks a new one.
        rig.subscribe(WEBINAR).await;

        let stats = rig.sim.stats();
        assert_eq!(
            (stats.subscriptions_renewed, stats.subscriptions_deleted),
            (1, 1)
        );
        assert_eq!(stats.subscription_refusals, 6);
    }

    #[tokio::test]
    async fn a_changed_session_is_stored_and_notified() {
        let rig = Rig::start().await;
        let id = rig.subscribe(WEBINAR).await;
        let changed = json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#solutions/virtualEvents/webinars('x')/sessions/$entity",
            "id": SEED_SESSION,
            "subject": "Session one, moved",
        });
        let statuses = rig
            .sim
            .change_session("webinars", WEBINAR, SEED_SESSION, changed.clone())
            .await;
        assert_eq!(statuses, [202]);
        let item = format!("{}/{SEED_SESSION}", resource(WEBINAR));
        let expiry = rig.sim.subscriptions()[0]["expirationDateTime"].clone();
        assert_eq!(
            rig.endpoint.notifications("/notify"),
            [json!({"value": [{
                "subscriptionId": id,
                "clientState": "secret-state",
                "changeType": "updated",
                "tenantId": SimConfig::default().tenant,
                "resource": resource(WEBINAR),
                "subscriptionExpirationDateTime": expiry,
                "resourceData": {
                    "@odata.id": item,
                    "@odata.type": "#microsoft.graph.virtualEventSession",
                    "id": item,
                },
            }]})]
        );
        // GET answers exactly the new object.
        let response = rig
            .http
            .get(format!(
                "{}/v1.0/solutions/virtualEvents/webinars/{WEBINAR}/sessions/{SEED_SESSION}",
                rig.base
            ))
            .bearer_auth(&rig.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.bytes().await.unwrap(), changed.to_string());

        // Over HTTP, a new session: `created`.
        let answer: serde_json::Value = rig
            .http
            .post(format!(
                "{}/_sim/sessions/webinars/{WEBINAR}/brand-new",
                rig.base
            ))
            .body(json!({"id": "brand-new"}).to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            answer,
            json!({"stored": true, "delivered": 1, "statuses": [202]})
        );
        let notifications = rig.endpoint.notifications("/notify");
        assert_eq!(notifications[1]["value"][0]["changeType"], "created");

        // Town halls and webinars nobody subscribed to: stored, nothing sent.
        let none = rig
            .sim
            .change_session(
                "townhalls",
                TOWNHALL_EVENT,
                TOWNHALL_SESSION,
                json!({"id": "t"}),
            )
            .await;
        assert!(none.is_empty());
        assert!(rig
            .sim
            .change_session("webinars", "unwatched", "s", json!({"id": "s"}))
            .await
            .is_empty());
        // Not a JSON object: 400.
        let response = rig
            .http
            .post(format!("{}/_sim/sessions/webinars/{WEBINAR}/x", rig.base))
            .body("[1]")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);

        let stats = rig.sim.stats();
        assert_eq!(stats.notifications_delivered, 2);
        assert_eq!(rig.endpoint.notifications("/notify").len(), 2);
    }

    #[tokio::test]
    async fn only_the_change_types_asked_for_are_notified() {
        let rig = Rig::start().await;
        let mut body = rig.create_body(WEBINAR);
        body["changeType"] = json!("updated");
        assert_eq!(rig.create(body).await.0, 201);
        let created = rig
            .sim
            .change_session("webinars", WEBINAR, "new-one", json!({"id": "new-one"}))
            .await;
        assert!(created.is_empty());
        let updated = rig
            .sim
            .change_session(
                "webinars",
                WEBINAR,
                "new-one",
                json!({"id": "new-one", "subject": "b"}),
            )
            .await;
        assert_eq!(updated, [202]);
    }

    #[tokio::test]
    async fn lifecycle_notifications() {
        let rig = Rig::start().await;
        let id = rig.subscribe(WEBINAR).await;
        assert_eq!(
            rig.sim.lifecycle(&id, "reauthorizationRequired").await,
            Some(202)
        );
        assert_eq!(rig.sim.subscriptions()[0]["reauthorizationPending"], true);
        let expiry = rig.sim.subscriptions()[0]["expirationDateTime"].clone();
        assert_eq!(
            rig.endpoint.notifications("/lifecycle"),
            [json!({"value": [{
                "subscriptionId": id,
                "subscriptionExpirationDateTime": expiry,
                "tenantId": SimConfig::default().tenant,
                "clientState": "secret-state",
                "lifecycleEvent": "reauthorizationRequired",
            }]})]
        );
        let (status, _) = rig
            .call(
                reqwest::Method::POST,
                &format!("/v1.0/subscriptions/{id}/reauthorize"),
                None,
            )
            .await;
        assert_eq!(status, 204);
        assert_eq!(rig.sim.subscriptions()[0]["reauthorizationPending"], false);
        // A renewal clears a pending reauthorization too.
        rig.sim.lifecycle(&id, "reauthorizationRequired").await;
        let (status, _) = rig
            .call(
                reqwest::Method::PATCH,
                &format!("/v1.0/subscriptions/{id}"),
                Some(json!({"expirationDateTime": rig.expiry(Duration::from_secs(7200))})),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(rig.sim.subscriptions()[0]["reauthorizationPending"], false);

        assert_eq!(rig.sim.lifecycle(&id, "missed").await, Some(202));
        assert_eq!(rig.sim.lifecycle(&id, "nonsense").await, None);
        // Over HTTP; subscriptionRemoved deletes it.
        let answer = rig
            .http
            .post(format!("{}/_sim/subscriptions/{id}/lifecycle", rig.base))
            .body(json!({"lifecycleEvent": "subscriptionRemoved"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(
            answer.json::<serde_json::Value>().await.unwrap(),
            json!({"status": 202})
        );
        assert!(rig.sim.subscriptions().is_empty());
        let events: Vec<serde_json::Value> = rig
            .endpoint
            .notifications("/lifecycle")
            .iter()
            .map(|n| n["value"][0]["lifecycleEvent"].clone())
            .collect();
        assert_eq!(
            events,
            [
                "reauthorizationRequired",
                "reauthorizationRequired",
                "missed",
                "subscriptionRemoved"
            ]
        );
        assert_eq!(rig.sim.lifecycle(&id, "missed").await, None);
        let unknown = rig
            .http
            .post(format!("{}/_sim/subscriptions/{id}/lifecycle", rig.base))
            .body(json!({"lifecycleEvent": "missed"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
        assert_eq!(rig.sim.stats().subscriptions_reauthorized, 1);
    }

    #[tokio::test]
    async fn the_subscription_fault_refuses_creation_only() {
        let rig = Rig::start().await;
        rig.sim.set_faults(Faults {
            subscription_status: Some(403),
            subscription_status_count: Some(1),
            // The session faults leave subscriptions alone.
            graph_status: Some(503),
            graph_reset: true,
            ..Faults::default()
        });
        let (status, error) = rig.create(rig.create_body(WEBINAR)).await;
        assert_eq!((status, code(&error)), (403, "ExtensionError"));
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("VirtualEvent.Read.All"));
        assert!(rig.sim.subscriptions().is_empty());
        assert_eq!(rig.sim.stats().validations_sent, 0);
        // Used up: the next create goes through.
        rig.subscribe(WEBINAR).await;
        rig.sim.set_faults(Faults {
            subscription_status: Some(429),
            retry_after: Some("7".to_string()),
            ..Faults::default()
        });
        let response = rig
            .http
            .post(format!("{}/v1.0/subscriptions", rig.base))
            .bearer_auth(&rig.token)
            .body(rig.create_body("another").to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "7");
        // Clearing the faults leaves the subscriptions.
        let cleared = rig
            .http
            .post(format!("{}/_sim/faults", rig.base))
            .body(r#"{"clear":true}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(cleared.status(), 200);
        assert_eq!(rig.sim.subscriptions().len(), 1);
        assert_eq!(rig.sim.stats().subscription_refusals, 2);
    }

    #[test]
    fn rfc3339_with_offsets() {
        let utc = parse_rfc3339("2030-01-01T12:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2030-01-01T13:30:00+01:30"), Some(utc));
        assert_eq!(parse_rfc3339("2030-01-01T07:00:00-05:00"), Some(utc));
        assert_eq!(parse_rfc3339("2030-01-01T12:00:00.0000000Z"), Some(utc));
        for bad in [
            "",
            "Z",
            "2030-01-01",
            "2030-01-01T12:00:00+1:00",
            "ééééééééééééééééééééééé+01:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
