//! A simulated identity platform and Microsoft Graph on one loopback port.
//!
//! Written without the proxy's routing or URL code, so a test cannot confirm a proxy bug
//! against itself: it splits the raw request path on its own and records every request
//! exactly as it arrived (`GET /_sim/stats`). It speaks Graph's error shapes and headers
//! (docs/reference/graph-facts.md) and can be told to misbehave (`POST /_sim/faults`).
//!
//! - `POST /{tenant}/oauth2/v2.0/token`: client credentials (secret in the form body); issues tokens with a configurable lifetime, Entra-style errors otherwise.
//! - `GET /{v1.0|beta}/solutions/virtualEvents/{webinars|townhalls}/{event}/sessions/{session}`:
//!   the seed page's example session, a small catalogue, and any session id starting with
//!   `gen-` (generated on the fly); 404 `NotFound` for the rest; 401 without a valid token.
//! - `GET /{v1.0|beta}/solutions/virtualEvents/{webinars|townhalls}/{event}/sessions`: the
//!   event's sessions as summaries, `list_page_size` per page with an `@odata.nextLink`
//!   (`?$skiptoken=N`) to the next page; an event `gen-list-N` has N generated sessions.
//! - `GET /{tenant}/discovery/v2.0/keys`: the caller-token key set, when configured.
//! - `GET /_sim/stats`, `POST /_sim/faults` (JSON, merged; `{"clear": true}` resets).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::core::clock::Clock;

/// The seed page's example ids (reference/seed-get-virtualEventSession.txt).
pub const SEED_EVENT: &str =
    "f8ce2a5f-0e6a-4186-aa90-1f64bc023566@5466a424-aadf-425c-9b24-034ca28d4bdd";
pub const SEED_SESSION: &str = "8d62dd52-4dff-4c75-96a9-f905cc3ff942";
/// A town hall in the catalogue (bare guid id, as town halls may have).
pub const TOWNHALL_EVENT: &str = "2c4f7d0e-3b1a-4e55-9a67-0d9e1f2a3b4c";
pub const TOWNHALL_SESSION: &str = "6a0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d";

/// Who the simulated tenant knows.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub tenant: String,
    pub client_id: String,
    pub client_secret: String,
    pub token_lifetime: Duration,
    /// Served at `/{tenant}/discovery/v2.0/keys` (caller token keys), if set.
    pub jwks: Option<String>,
    /// PEM certificate registered on the app: client assertions must be signed by its key.
    pub client_certificate: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            tenant: "5466a424-aadf-425c-9b24-034ca28d4bdd".to_string(),
            client_id: "00000000-0000-0000-0000-00000000c11e".to_string(),
            client_secret: "sim-client-secret".to_string(),
            token_lifetime: Duration::from_secs(3599),
            jwks: None,
            client_certificate: None,
        }
    }
}

/// Injected misbehaviour. Every field is optional in the JSON; a POST merges what it names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added before every Graph answer.
    pub graph_latency_ms: u64,
    /// Added before every token answer.
    pub token_latency_ms: u64,
    /// Graph answers this status (Graph error shape) instead of the session...
    pub graph_status: Option<u16>,
    /// ...this many times (absent: until cleared).
    pub graph_status_count: Option<u32>,
    /// `Retry-After` value sent with `graph_status` and `token_status`.
    pub retry_after: Option<String>,
    /// Graph requests get their connection dropped without an answer.
    pub graph_reset: bool,
    /// Token requests get their connection dropped without an answer.
    pub token_down: bool,
    /// The token endpoint answers this status (Entra error shape).
    pub token_status: Option<u16>,
    /// The next N Graph requests with a valid token get 401 InvalidAuthenticationToken, and
    /// their token is revoked.
    pub reject_tokens: u32,
    /// Lifetime of tokens issued from now on.
    pub token_lifetime_secs: Option<u64>,
    /// Send `expires_in` as a string, as Entra sometimes does.
    pub expires_in_as_string: bool,
    /// The key set endpoint answers 503.
    pub jwks_down: bool,
    /// Sessions per list page (absent: 10).
    pub list_page_size: Option<usize>,
    /// Sent as every list page's `@odata.nextLink` instead of the real next page.
    pub next_link: Option<String>,
}

/// Counts of what the simulator was asked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub token_requests: u64,
    pub tokens_issued: u64,
    pub jwks_requests: u64,
    /// Every request that was not for the token endpoint or `/_sim/...`.
    pub graph_requests: u64,
    /// Graph requests per raw path (and query), as received.
    pub paths: BTreeMap<String, u64>,
}

struct Issued {
    expires_at: Instant,
    revoked: bool,
}

struct SimState {
    /// "Now" for the sessions' dates: when the simulator started, to the minute, so that
    /// every answer (and a test's expected body) carries the same dates.
    epoch: std::time::SystemTime,
    config: SimConfig,
    clock: Clock,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    tokens: Mutex<HashMap<String, Issued>>,
    /// (kind, event, session) -> body, for the catalogue and test-provided sessions.
    sessions: Mutex<HashMap<(String, String, String), Bytes>>,
}

/// The simulator; cheap to clone, all clones share state.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<SimState>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Simulator {
    pub fn new(config: SimConfig, clock: Clock) -> Simulator {
        let mut sessions = HashMap::new();
        let epoch = reference_time(std::time::SystemTime::now());
        let mut seed = seed_session(SEED_SESSION, "Session one");
        set_dates(&mut seed, SEED_SESSION, epoch);
        let seed = json!({ "value": seed });
        sessions.insert(
            (
                "webinars".to_string(),
                SEED_EVENT.to_string(),
                SEED_SESSION.to_string(),
            ),
            Bytes::from(serde_json::to_vec_pretty(&seed).unwrap_or_default()),
        );
        sessions.insert(
            (
                "townhalls".to_string(),
                TOWNHALL_EVENT.to_string(),
                TOWNHALL_SESSION.to_string(),
            ),
            generated_body_at("townhalls", TOWNHALL_EVENT, TOWNHALL_SESSION, epoch),
        );
        Simulator {
            state: Arc::new(SimState {
                epoch,
                config,
                clock,
                faults: Mutex::new(Faults::default()),
                stats: Mutex::new(Stats::default()),
                tokens: Mutex::new(HashMap::new()),
                sessions: Mutex::new(sessions),
            }),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.state.config
    }

    pub fn stats(&self) -> Stats {
        lock(&self.state.stats).clone()
    }

    /// Every access token issued so far (tests check that none of them leaks).
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.state.tokens).keys().cloned().collect()
    }

    /// Replaces the faults in force.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.state.faults) = faults;
    }

    /// Adds or replaces a session body.
    pub fn put_session(&self, kind: &str, event: &str, session: &str, body: impl Into<Bytes>) {
        lock(&self.state.sessions).insert(
            (kind.to_string(), event.to_string(), session.to_string()),
            body.into(),
        );
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let service = tower::service_fn(move |req: Request<Incoming>| {
            let sim = self.clone();
            async move { sim.handle(req).await }
        });
        crate::server::accept_loop(
            listener,
            service,
            shutdown,
            crate::server::ConnectionOptions::internal(Duration::from_secs(1)),
        )
        .await;
    }

    /// Binds `127.0.0.1:0`, serves in a task, returns the address.
    pub async fn spawn(self) -> std::io::Result<std::net::SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(self.serve(listener, std::future::pending()));
        Ok(addr)
    }

    /// `Err` drops the connection (the reset faults).
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, SimReset> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.split('/').collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["", "_sim", "stats"]) => {
                Ok(json_response(StatusCode::OK, &json!(self.stats())))
            }
            (&Method::POST, ["", "_sim", "faults"]) => {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Ok(self.merge_faults(&body))
            }
            (&Method::GET, ["", _tenant, "discovery", "v2.0", "keys"]) => Ok(self.jwks()),
            (&Method::POST, ["", _tenant, "oauth2", "v2.0", "token"]) => {
                let tenant = segments[1].to_string();
                let basic = req.headers().get(http::header::AUTHORIZATION).cloned();
                let token_url = format!(
                    "http://{}{}",
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or(""),
                    req.uri().path()
                );
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                self.token(&tenant, basic, &token_url, &body).await
            }
            _ => self.graph(req).await,
        }
    }

    fn jwks(&self) -> Response<Full<Bytes>> {
        lock(&self.state.stats).jwks_requests += 1;
        if lock(&self.state.faults).jwks_down {
            return graph_error(503, "ServiceUnavailable", "Injected failure");
        }
        match &self.state.config.jwks {
            Some(jwks) => {
                let mut r = Response::new(Full::new(Bytes::from(jwks.clone())));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
            None => graph_error(404, "NotFound", "no key set configured"),
        }
    }

    fn merge_faults(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let patch: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return json_response(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()}))
            }
        };
        let mut faults = lock(&self.state.faults);
        if patch.get("clear").and_then(|v| v.as_bool()) == Some(true) {
            *faults = Faults::default();
            return json_response(StatusCode::OK, &json!(*faults));
        }
        let mut current = serde_json::to_value(&*faults).unwrap_or_default();
        if let (Some(current), Some(patch)) = (current.as_object_mut(), patch.as_object()) {
            for (k, v) in patch {
                current.insert(k.clone(), v.clone());
            }
        }
        match serde_json::from_value::<Faults>(current) {
            Ok(merged) => {
                *faults = merged;
                json_response(StatusCode::OK, &json!(*faults))
            }
            Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
        }
    }

    async fn token(
        &self,
        tenant: &str,
        basic: Option<HeaderValue>,
        token_url: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, SimReset> {
        lock(&self.state.stats).token_requests += 1;
        let faults = lock(&self.state.faults).clone();
        if faults.token_latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.token_latency_ms)).await;
        }
        if faults.token_down {
            return Err(SimReset);
        }
        if let Some(status) = faults.token_status {
            let mut r = entra_error(
                status,
                "temporarily_unavailable",
                0,
                "AADSTS90000: injected failure",
            );
            if let Some(ra) = &faults.retry_after {
                if let Ok(v) = HeaderValue::from_str(ra) {
                    r.headers_mut().insert(http::header::RETRY_AFTER, v);
                }
            }
            return Ok(r);
        }
        let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
        let config = &self.state.config;
        if tenant != config.tenant {
            return Ok(entra_error(
                400,
                "invalid_request",
                90002,
                "AADSTS90002: Tenant not found.",
            ));
        }
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return Ok(entra_error(
                400,
                "unsupported_grant_type",
                70003,
                "AADSTS70003: The app requested an unsupported grant type.",
            ));
        }
        // Microsoft documents the secret in the form body; that is what the proxy sends.
        if basic.is_some() {
            return Ok(entra_error(401, "invalid_client", 7000218, "AADSTS7000218: The request body must contain client_secret or client_assertion (the simulator does not take Basic credentials)."));
        }
        let (client_id, secret) = (
            form.get("client_id").cloned(),
            form.get("client_secret").cloned(),
        );
        if client_id.as_deref() != Some(config.client_id.as_str()) {
            return Ok(entra_error(
                400,
                "unauthorized_client",
                700016,
                "AADSTS700016: Application was not found in the directory.",
            ));
        }
        if let Some(assertion) = form.get("client_assertion") {
            if let Err(why) = self.check_assertion(&form, assertion, token_url) {
                return Ok(entra_error(
                    401,
                    "invalid_client",
                    700027,
                    &format!("AADSTS700027: Client assertion failed signature validation: {why}."),
                ));
            }
        } else if secret.as_deref() != Some(config.client_secret.as_str()) {
            return Ok(entra_error(
                401,
                "invalid_client",
                7000215,
                "AADSTS7000215: Invalid client secret provided.",
            ));
        }
        if !form
            .get("scope")
            .is_some_and(|s| s.ends_with("/.default") && !s.contains(' '))
        {
            return Ok(entra_error(
                400,
                "invalid_scope",
                70011,
                "AADSTS70011: The provided value for the input parameter 'scope' is not valid.",
            ));
        }
        let lifetime = faults
            .token_lifetime_secs
            .map(Duration::from_secs)
            .unwrap_or(config.token_lifetime);
        let token = format!("sim.{}", uuid::Uuid::new_v4().simple());
        lock(&self.state.tokens).insert(
            token.clone(),
            Issued {
                // Absurd lifetimes (a test of the proxy's caps) must not overflow here.
                expires_at: self
                    .state
                    .clock
                    .now()
                    .checked_add(lifetime)
                    .unwrap_or_else(|| {
                        self.state.clock.now() + Duration::from_secs(100 * 365 * 86400)
                    }),
                revoked: false,
            },
        );
        lock(&self.state.stats).tokens_issued += 1;
        let secs = lifetime.as_secs();
        let expires_in = if faults.expires_in_as_string {
            json!(secs.to_string())
        } else {
            json!(secs)
        };
        Ok(json_response(
            StatusCode::OK,
            &json!({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in, "access_token": token}),
        ))
    }

    /// Verifies a client assertion as Entra does: signed (PS256 or RS256) by the registered
    /// certificate's key, `x5t#S256` naming that certificate, `aud` = this token URL,
    /// `iss` = `sub` = the client id, at most 10 minutes of validity.
    fn check_assertion(
        &self,
        form: &HashMap<String, String>,
        assertion: &str,
        token_url: &str,
    ) -> Result<(), &'static str> {
        use base64::Engine;
        use sha2::Digest;
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err("wrong client_assertion_type");
        }
        let cert_pem = self
            .state
            .config
            .client_certificate
            .as_deref()
            .ok_or("no certificate registered")?;
        let cert = pem::parse(cert_pem).map_err(|_| "bad registered certificate")?;
        let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(cert.contents()));
        let header = jsonwebtoken::decode_header(assertion).map_err(|_| "malformed assertion")?;
        if header.x5t_s256.as_deref() != Some(thumbprint.as_str()) {
            return Err("x5t#S256 does not name the registered certificate");
        }
        if !matches!(
            header.alg,
            jsonwebtoken::Algorithm::PS256 | jsonwebtoken::Algorithm::RS256
        ) {
            return Err("algorithm not accepted");
        }
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(cert_pem.as_bytes())
            .map_err(|_| "bad registered certificate")?;
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_audience(&[token_url]);
        validation.set_issuer(&[self.state.config.client_id.as_str()]);
        validation.sub = Some(self.state.config.client_id.clone());
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.validate_nbf = true;
        #[derive(Deserialize)]
        struct Claims {
            exp: u64,
            jti: Option<String>,
        }
        let data = jsonwebtoken::decode::<Claims>(assertion, &key, &validation)
            .map_err(|_| "signature or claims invalid")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if data.claims.exp > now + 600 + 60 {
            return Err("valid for more than 10 minutes");
        }
        if data.claims.jti.is_none() {
            return Err("no jti");
        }
        Ok(())
    }

    async fn graph(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, SimReset> {
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
        let faults = lock(&self.state.faults).clone();
        if faults.graph_latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.graph_latency_ms)).await;
        }
        if faults.graph_reset {
            return Err(SimReset);
        }
        let mut response = self.graph_answer(&req, &faults);
        let headers = response.headers_mut();
        if let Ok(id) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
            headers.insert("request-id", id);
        }
        if let Some(id) = client_request_id {
            headers.insert("client-request-id", id);
        }
        Ok(response)
    }

    fn graph_answer(&self, req: &Request<Incoming>, faults: &Faults) -> Response<Full<Bytes>> {
        // Authentication first, as Graph does.
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let now = self.state.clock.now();
        let valid = {
            let tokens = lock(&self.state.tokens);
            token
                .as_ref()
                .and_then(|t| tokens.get(t))
                .is_some_and(|issued| !issued.revoked && now < issued.expires_at)
        };
        if !valid {
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            );
        }
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
            if let Some(t) = &token {
                if let Some(issued) = lock(&self.state.tokens).get_mut(t) {
                    issued.revoked = true;
                }
            }
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            );
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
    /// One page of an event's session list (summaries), with a next link while more remain.
    fn list_answer(
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
fn summary(body: &[u8]) -> serde_json::Value {
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

/// Dropping the connection without an answer.
#[derive(Debug)]
struct SimReset;

impl std::fmt::Display for SimReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulated connection reset")
    }
}

impl std::error::Error for SimReset {}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Graph's error shape.
fn graph_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let now = httpdate::fmt_http_date(std::time::SystemTime::now());
    let request_id = uuid::Uuid::new_v4().to_string();
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"error": {"code": code, "message": message, "innerError": {"date": now, "request-id": request_id, "client-request-id": request_id}}}),
    )
}

fn injected_status(status: u16, retry_after: Option<&str>) -> Response<Full<Bytes>> {
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

/// Entra's token error shape.
fn entra_error(status: u16, error: &str, code: u32, description: &str) -> Response<Full<Bytes>> {
    let trace = uuid::Uuid::new_v4().to_string();
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        &json!({
            "error": error,
            "error_description": format!("{description} Trace ID: {trace}"),
            "error_codes": [code],
            "timestamp": httpdate::fmt_http_date(std::time::SystemTime::now()),
            "trace_id": trace,
            "correlation_id": uuid::Uuid::new_v4().to_string(),
        }),
    )
}

fn seed_session(id: &str, subject: &str) -> serde_json::Value {
    json!({
        "@odata.type": "#microsoft.graph.virtualEventSession",
        "id": id,
        "joinWebUrl": "https://teams.microsoft.com/l/meetup-join/19%3ameeting_ZDVjNzk3OWEtYjc2NS00NTA1LTkyMzQtYTYzMGI5YmFmMjM5%40thread.v2/0?context=%7b%22Tid%22%3a%2272f988bf-86f1-41af-91ab-2d7cd011db47%22%2c%22Oid%22%3a%221cd068e4-5b08-4e75-a7f9-7b4e067a0820%22%7d",
        "subject": subject,
        "participants": {"@odata.type": "microsoft.graph.meetingParticipants"},
        "isBroadcast": null,
        "broadcastSettings": null,
        "capabilities": [],
        "audioConferencing": null,
        "chatInfo": {
            "threadId": "19:meeting_ZDVjNzk3OWEtYjc2NS00NTA1LTkyMzQtYTYzMGI5YmFmMjM5@thread.v2",
            "messageId": "0",
            "replyChainMessageId": null
        },
        "videoTeleconferenceId": null,
        "externalId": null,
        "joinMeetingIdSettings": null,
        "lobbyBypassSettings": null,
        "isEntryExitAnnounced": null,
        "allowedPresenters": null,
        "allowAttendeeToEnableMic": null,
        "allowAttendeeToEnableCamera": null,
        "allowMeetingChat": null,
        "shareMeetingChatHistoryDefault": null,
        "allowTeamworkReactions": null,
        "recordAutomatically": null,
        "watermarkProtection": null,
        "allowParticipantsToChangeName": null
    })
}

/// The simulator's "now" for dates: `now` to the whole minute.
fn reference_time(now: std::time::SystemTime) -> std::time::SystemTime {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::time::UNIX_EPOCH + Duration::from_secs(secs - secs % 60)
}

/// Start and end relative to `epoch`, by the session id, so that every kind of session a
/// caller meets exists whenever the simulator runs: `gen-ended-*` ended two days ago
/// (`smart_ttl` keeps it for `ttl_ended`), `gen-live-*` and the town hall seed are under
/// way (started 30 minutes ago, end in an hour), everything else (the webinar seed
/// included) is upcoming: in a week, for 90 minutes.
fn set_dates(object: &mut serde_json::Value, session: &str, epoch: std::time::SystemTime) {
    const MINUTE: u64 = 60;
    const DAY: u64 = 24 * 60 * MINUTE;
    let (start, end) = if session.starts_with("gen-ended") {
        (
            epoch - Duration::from_secs(2 * DAY),
            epoch - Duration::from_secs(2 * DAY - 60 * MINUTE),
        )
    } else if session.starts_with("gen-live") || session == TOWNHALL_SESSION {
        (
            epoch - Duration::from_secs(30 * MINUTE),
            epoch + Duration::from_secs(60 * MINUTE),
        )
    } else {
        (
            epoch + Duration::from_secs(7 * DAY),
            epoch + Duration::from_secs(7 * DAY + 90 * MINUTE),
        )
    };
    if let Some(map) = object.as_object_mut() {
        for (field, at) in [("startDateTime", start), ("endDateTime", end)] {
            map.insert(
                field.to_string(),
                json!(humantime::format_rfc3339_seconds(at).to_string()),
            );
        }
    }
}

impl Simulator {
    /// What the simulator answers for a `gen-` session it has not been given.
    pub fn generated_body(&self, kind: &str, event: &str, session: &str) -> Bytes {
        generated_body_at(kind, event, session, self.state.epoch)
    }
}

/// A bare session object with `@odata.context`, as Graph most likely really answers,
/// dated relative to `epoch` (see [`set_dates`]).
fn generated_body_at(
    kind: &str,
    event: &str,
    session: &str,
    epoch: std::time::SystemTime,
) -> Bytes {
    let mut object = seed_session(session, &format!("Generated session {session} of {event}"));
    set_dates(&mut object, session, epoch);
    if let Some(map) = object.as_object_mut() {
        map.insert(
            "@odata.context".to_string(),
            json!(format!("https://graph.microsoft.com/v1.0/$metadata#solutions/virtualEvents/{kind}('{event}')/sessions/$entity")),
        );
    }
    Bytes::from(object.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn dates(body: &[u8]) -> (SystemTime, SystemTime) {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let v = v.get("value").unwrap_or(&v);
        let at = |field: &str| humantime::parse_rfc3339(v[field].as_str().unwrap()).unwrap();
        (at("startDateTime"), at("endDateTime"))
    }

    #[test]
    fn sessions_are_upcoming_live_or_ended_relative_to_now() {
        let sim = Simulator::new(SimConfig::default(), Clock::new());
        let now = SystemTime::now();
        let seed = lock(&sim.state.sessions)
            .get(&(
                "webinars".to_string(),
                SEED_EVENT.to_string(),
                SEED_SESSION.to_string(),
            ))
            .cloned()
            .unwrap();
        for (body, what) in [
            (seed, "seed"),
            (sim.generated_body("webinars", "e", "gen-x"), "generated"),
        ] {
            let (start, end) = dates(&body);
            assert!(start > now + Duration::from_secs(6 * 24 * 3600), "{what}");
            assert!(end > start, "{what}");
        }
        for session in ["gen-live-1", TOWNHALL_SESSION] {
            let (start, end) = dates(&sim.generated_body("townhalls", "e", session));
            assert!(start < now && now < end, "{session} is under way");
        }
        let (_, end) = dates(&sim.generated_body("webinars", "e", "gen-ended-1"));
        assert!(
            end + Duration::from_secs(24 * 3600) < now,
            "ended a day ago or more"
        );
        // The same session gets the same bytes every time (tests compare bodies).
        assert_eq!(
            sim.generated_body("webinars", "e", "gen-x"),
            sim.generated_body("webinars", "e", "gen-x")
        );
    }
}
