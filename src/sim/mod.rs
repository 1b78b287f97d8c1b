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
//! - `POST|GET /{v1.0|beta}/subscriptions`, `GET|PATCH|DELETE /{v}/subscriptions/{id}`,
//!   `POST /{v}/subscriptions/{id}/reauthorize`: change-notification subscriptions to a
//!   webinar's sessions, validated against their endpoints as Graph does, at most a day
//!   long, one per webinar (subscriptions.rs).
//! - `GET /_sim/stats`, `POST /_sim/faults` (JSON, merged; `{"clear": true}` resets the
//!   faults, not the subscriptions).
//! - `POST /_sim/sessions/{kind}/{event}/{session}` (a session object: stored, then the
//!   change notified), `POST /_sim/subscriptions/{id}/lifecycle`
//!   (`{"lifecycleEvent": ...}`: a lifecycle notification sent), `GET /_sim/subscriptions`
//!   (notifications.rs).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::core::clock::Clock;

mod azure;
mod graph;
mod identity;
mod notifications;
mod sessions;
mod subscriptions;

use graph::graph_error;
use sessions::{generated_body_at, reference_time, seed_session, set_dates};

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
    /// The app's federated identity credential (workload identity), if any.
    pub federated: Option<FederatedTrust>,
    /// The user-assigned managed identity the simulated machine has (besides its
    /// system-assigned one).
    pub user_assigned_client_id: String,
    /// App Service's `IDENTITY_HEADER`.
    pub identity_header: String,
}

/// A federated identity credential: assertions from `issuer` about `subject`, signed by
/// the key `public_key_pem` (RSA), audience `api://AzureADTokenExchange`.
#[derive(Debug, Clone)]
pub struct FederatedTrust {
    pub issuer: String,
    pub subject: String,
    pub public_key_pem: String,
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
            federated: None,
            user_assigned_client_id: "00000000-0000-0000-0000-0000000a551d".to_string(),
            identity_header: "sim-identity-header".to_string(),
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
    /// The client secrets the app accepts now (absent: the configured one); a rotation
    /// revokes the old one by leaving it out.
    pub client_secrets: Option<Vec<String>>,
    /// The managed identity endpoints answer this status...
    pub imds_status: Option<u16>,
    /// ...this many times (absent: until cleared).
    pub imds_status_count: Option<u32>,
    /// Creating a subscription answers this status (403: Graph's `ExtensionError` for a
    /// missing permission) instead; renewals and the rest are not affected...
    pub subscription_status: Option<u16>,
    /// ...this many times (absent: until cleared).
    pub subscription_status_count: Option<u32>,
    /// Subscriptions are created and renewed until at most this many seconds from now,
    /// whatever was asked (the answer's `expirationDateTime` says until when).
    pub subscription_granted_secs: Option<u64>,
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
    /// Token requests refused (any error answer).
    pub token_failures: u64,
    /// The client assertion of the last token request that carried one.
    pub last_assertion: Option<String>,
    /// Requests to the IMDS and App Service identity endpoints.
    pub managed_requests: u64,
    /// The `client_id` of the last managed identity token issued (`None`: system-assigned).
    pub last_managed_client_id: Option<String>,
    /// Subscriptions created (201).
    #[serde(default)]
    pub subscriptions_created: u64,
    /// Subscriptions renewed (PATCH answered 200).
    #[serde(default)]
    pub subscriptions_renewed: u64,
    /// Subscriptions deleted by a caller (DELETE answered 204).
    #[serde(default)]
    pub subscriptions_deleted: u64,
    /// Reauthorizations answered 204.
    #[serde(default)]
    pub subscriptions_reauthorized: u64,
    /// Subscription calls answered 4xx (the injected `subscription_status` included).
    #[serde(default)]
    pub subscription_refusals: u64,
    /// Validation requests sent to notification and lifecycle endpoints.
    #[serde(default)]
    pub validations_sent: u64,
    /// Change and lifecycle notifications posted, whatever their answer.
    #[serde(default)]
    pub notifications_delivered: u64,
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
    /// Subscription id -> subscription. Expired ones linger until the next look (every
    /// reader prunes first), so they are gone to every caller all the same.
    subscriptions: Mutex<HashMap<String, subscriptions::Subscription>>,
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
                subscriptions: Mutex::new(HashMap::new()),
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
            (&Method::POST, ["", "_sim", "sessions", ..])
            | (_, ["", "_sim", "subscriptions", ..]) => Ok(self.subscription_control(req).await),
            (&Method::GET, ["", _tenant, "discovery", "v2.0", "keys"]) => Ok(self.jwks()),
            (&Method::GET, ["", "metadata", "identity", "oauth2", "token"]) => {
                Ok(self.managed_token(&req, azure::Flavour::Imds))
            }
            (&Method::GET, ["", "msi", "token"]) => {
                Ok(self.managed_token(&req, azure::Flavour::AppService))
            }
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
}

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
