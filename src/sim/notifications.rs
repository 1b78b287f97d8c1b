//! What a test makes happen to subscriptions: a session changes (stored, then its
//! webinar's subscription notified) or a lifecycle event; with the `/_sim` controls that
//! do the same over HTTP (no token, not counted as Graph requests).

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::json;

use super::subscriptions::{
    bad_json, http_client, invalid, not_found, prune, rfc3339, CALL_TIMEOUT,
};
use super::*;

impl Simulator {
    /// Live subscriptions (by id), each Graph's object plus `reauthorizationPending`.
    pub fn subscriptions(&self) -> Vec<serde_json::Value> {
        self.each_live(|s| {
            let mut json = s.to_json(&s.version, &self.state.config.client_id);
            if let Some(map) = json.as_object_mut() {
                map.insert(
                    "reauthorizationPending".to_string(),
                    json!(s.reauthorization_pending),
                );
            }
            json
        })
    }

    /// Stores `body` as the session (GET then answers exactly it) and notifies the live
    /// subscription to its webinar, if any: `updated` when the session existed (a `gen-`
    /// session always does: GET answered it), `created` otherwise, each only when the
    /// subscription asked for it. Town hall sessions are stored and notify nothing (Graph
    /// has no such subscriptions). Returns each delivery's HTTP status (0: no answer).
    pub async fn change_session(
        &self,
        kind: &str,
        event: &str,
        session: &str,
        body: serde_json::Value,
    ) -> Vec<u16> {
        let existed = {
            let mut sessions = lock(&self.state.sessions);
            let key = (kind.to_string(), event.to_string(), session.to_string());
            let existed = sessions.contains_key(&key) || session.starts_with("gen-");
            sessions.insert(key, Bytes::from(body.to_string()));
            existed
        };
        if kind != "webinars" {
            return Vec::new();
        }
        let change = if existed { "updated" } else { "created" };
        let tenant = &self.state.config.tenant;
        let deliveries: Vec<(String, serde_json::Value)> = {
            let mut subscriptions = lock(&self.state.subscriptions);
            prune(&mut subscriptions, self.state.clock.wall());
            subscriptions
                .values()
                .filter(|s| s.webinar == event && s.notifies(change))
                .map(|s| {
                    let item = format!("{}/{session}", s.resource);
                    let notification = json!({"value": [{
                        "subscriptionId": s.id,
                        "clientState": s.client_state,
                        "changeType": change,
                        "tenantId": tenant,
                        "resource": s.resource,
                        "subscriptionExpirationDateTime": rfc3339(s.expiration),
                        "resourceData": {
                            "@odata.id": item,
                            "@odata.type": "#microsoft.graph.virtualEventSession",
                            "id": item,
                        },
                    }]});
                    (s.notification_url.clone(), notification)
                })
                .collect()
        };
        let mut statuses = Vec::with_capacity(deliveries.len());
        for (url, notification) in deliveries {
            statuses.push(self.deliver(&url, &notification).await);
        }
        statuses
    }

    /// Sends the lifecycle notification `event` (`reauthorizationRequired`,
    /// `subscriptionRemoved` or `missed`) to the subscription's lifecycle URL (its
    /// notification URL if it has none) and returns the answer's status (0: no answer).
    /// `subscriptionRemoved` deletes the subscription first; `reauthorizationRequired`
    /// marks it pending until reauthorized or renewed. `None`: no such live subscription,
    /// or no such event.
    pub async fn lifecycle(&self, id: &str, event: &str) -> Option<u16> {
        if !matches!(
            event,
            "reauthorizationRequired" | "subscriptionRemoved" | "missed"
        ) {
            return None;
        }
        let (url, notification) = {
            let mut subscriptions = lock(&self.state.subscriptions);
            prune(&mut subscriptions, self.state.clock.wall());
            let s = subscriptions.get_mut(id)?;
            if event == "reauthorizationRequired" {
                s.reauthorization_pending = true;
            }
            let notification = json!({"value": [{
                "subscriptionId": s.id,
                "subscriptionExpirationDateTime": rfc3339(s.expiration),
                "tenantId": self.state.config.tenant,
                "clientState": s.client_state,
                "lifecycleEvent": event,
            }]});
            let url = s
                .lifecycle_url
                .clone()
                .unwrap_or_else(|| s.notification_url.clone());
            if event == "subscriptionRemoved" {
                subscriptions.remove(id);
            }
            (url, notification)
        };
        Some(self.deliver(&url, &notification).await)
    }

    /// POSTs one notification; its answer's status, 0 without one within 10 s.
    async fn deliver(&self, url: &str, notification: &serde_json::Value) -> u16 {
        lock(&self.state.stats).notifications_delivered += 1;
        let Some(client) = http_client() else {
            return 0;
        };
        let call = client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(notification.to_string())
            .send();
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => response.status().as_u16(),
            Ok(Err(_)) | Err(_) => 0,
        }
    }

    /// `/_sim/sessions/...` and `/_sim/subscriptions...`: no token, not Graph requests.
    pub(super) async fn subscription_control(
        &self,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.split('/').collect();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return graph_error(400, "BadRequest", "The request body was cut short."),
        };
        match (method, segments.as_slice()) {
            (Method::POST, ["", "_sim", "sessions", kind, event, session]) => {
                self.control_change(kind, event, session, &body).await
            }
            (Method::POST, ["", "_sim", "subscriptions", id, "lifecycle"]) => {
                let parsed: serde_json::Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(_) => return bad_json(),
                };
                let event = parsed
                    .get("lifecycleEvent")
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                if !matches!(
                    event,
                    "reauthorizationRequired" | "subscriptionRemoved" | "missed"
                ) {
                    return invalid("lifecycleEvent must be reauthorizationRequired, subscriptionRemoved or missed.");
                }
                match self.lifecycle(id, event).await {
                    Some(status) => json_response(StatusCode::OK, &json!({"status": status})),
                    None => not_found(id),
                }
            }
            (Method::GET, ["", "_sim", "subscriptions"]) => {
                json_response(StatusCode::OK, &json!(self.subscriptions()))
            }
            _ => graph_error(404, "NotFound", "No such simulator control."),
        }
    }

    async fn control_change(
        &self,
        kind: &str,
        event: &str,
        session: &str,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        if !matches!(kind, "webinars" | "townhalls") {
            return graph_error(400, "BadRequest", "kind must be webinars or townhalls.");
        }
        let (Ok(event), Ok(session)) = (
            percent_decode_str(event).decode_utf8(),
            percent_decode_str(session).decode_utf8(),
        ) else {
            return graph_error(400, "BadRequest", "Invalid segment.");
        };
        let object = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) if v.is_object() => v,
            Ok(_) | Err(_) => return bad_json(),
        };
        let statuses = self.change_session(kind, &event, &session, object).await;
        json_response(
            StatusCode::OK,
            &json!({"stored": true, "delivered": statuses.len(), "statuses": statuses}),
        )
    }
}
