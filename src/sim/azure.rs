//! The simulated Azure identity sources: the Instance Metadata Service and App Service's
//! identity endpoint (managed identities, numbers as strings), and the check of federated
//! assertions (workload identity) with the AADSTS codes Entra gives when they fail.

use std::collections::HashMap;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::*;

/// Which identity endpoint was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavour {
    Imds,
    AppService,
}

/// The audience of every federated assertion Entra accepts.
const EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

impl Simulator {
    /// `GET /metadata/identity/oauth2/token` (IMDS) and `GET /msi/token` (App Service).
    pub(super) fn managed_token<B>(
        &self,
        req: &Request<B>,
        flavour: Flavour,
    ) -> Response<Full<Bytes>> {
        lock(&self.state.stats).managed_requests += 1;
        {
            let mut faults = lock(&self.state.faults);
            if let Some(status) = faults.imds_status {
                match faults.imds_status_count {
                    Some(0) => {}
                    Some(n) => {
                        faults.imds_status_count = Some(n - 1);
                        return managed_error(
                            status,
                            "temporarily_unavailable",
                            "injected failure",
                        );
                    }
                    None => {
                        return managed_error(status, "temporarily_unavailable", "injected failure")
                    }
                }
            }
        }
        let query: HashMap<String, String> =
            serde_urlencoded::from_str(req.uri().query().unwrap_or("")).unwrap_or_default();
        let config = &self.state.config;
        let headers = req.headers();
        let (version, header_ok) = match flavour {
            Flavour::Imds => (
                "2018-02-01",
                headers.get("metadata").is_some_and(|v| v == "true"),
            ),
            Flavour::AppService => (
                "2019-08-01",
                headers
                    .get("x-identity-header")
                    .is_some_and(|v| v.as_bytes() == config.identity_header.as_bytes()),
            ),
        };
        if !header_ok {
            return managed_error(
                400,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
        if query.get("api-version").map(String::as_str) != Some(version) {
            return managed_error(
                400,
                "invalid_request",
                "api-version is missing or not supported",
            );
        }
        if query.get("resource").map(String::as_str) != Some("https://graph.microsoft.com/") {
            return managed_error(
                400,
                "invalid_resource",
                "AADSTS500011: The resource principal was not found",
            );
        }
        let client_id = query.get("client_id").cloned();
        if let Some(id) = &client_id {
            if *id != config.user_assigned_client_id {
                return managed_error(400, "invalid_request", "Identity not found");
            }
        }
        let lifetime = lock(&self.state.faults)
            .token_lifetime_secs
            .map(std::time::Duration::from_secs)
            .unwrap_or(config.token_lifetime);
        let token = self.issue_token(lifetime);
        lock(&self.state.stats).last_managed_client_id = client_id.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let secs = lifetime.as_secs();
        let who = client_id.unwrap_or_else(|| "00000000-0000-0000-0000-0000000055a1".to_string());
        let body = match flavour {
            // IMDS: every number a string.
            Flavour::Imds => json!({
                "access_token": token, "client_id": who,
                "expires_in": secs.to_string(), "expires_on": (now + secs).to_string(),
                "ext_expires_in": secs.to_string(), "not_before": now.to_string(),
                "resource": "https://graph.microsoft.com/", "token_type": "Bearer",
            }),
            // App Service 2019-08-01: no expires_in, expires_on in epoch seconds.
            Flavour::AppService => json!({
                "access_token": token, "client_id": who,
                "expires_on": (now + secs).to_string(),
                "resource": "https://graph.microsoft.com/", "token_type": "Bearer",
            }),
        };
        json_response(StatusCode::OK, &body)
    }

    /// Whether `assertion` is meant for the token exchange (its `aud`), unverified.
    pub(super) fn is_federated(assertion: &str) -> bool {
        use base64::Engine;
        let Some(payload) = assertion.split('.').nth(1) else {
            return false;
        };
        let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
            return false;
        };
        serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|claims| {
            claims["aud"] == EXCHANGE_AUDIENCE
                || claims["aud"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v == EXCHANGE_AUDIENCE))
        })
    }

    /// Verifies a federated assertion as Entra does for a federated identity credential:
    /// signed by the issuer's key, `iss` and `sub` matching the credential, `aud` the
    /// exchange audience, within its validity.
    pub(super) fn check_federated(&self, assertion: &str) -> Result<(), (u32, &'static str)> {
        const NO_RECORD: (u32, &str) = (
            70021,
            "No matching federated identity record found for presented assertion.",
        );
        let trust = self.state.config.federated.as_ref().ok_or(NO_RECORD)?;
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(trust.public_key_pem.as_bytes())
            .map_err(|_| NO_RECORD)?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&[EXCHANGE_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = 0;
        validation.validate_nbf = true;
        #[derive(Deserialize)]
        struct Claims {
            iss: String,
            sub: String,
        }
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Claims>(assertion, &key, &validation) {
            Ok(data) if data.claims.iss != trust.issuer => Err((
                70021,
                "No matching federated identity record found for presented assertion issuer.",
            )),
            Ok(data) if data.claims.sub != trust.subject => Err((
                700213,
                "No matching federated identity record found for presented assertion subject.",
            )),
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature
                ) =>
            {
                Err((
                    700024,
                    "Client assertion is not within its valid time range.",
                ))
            }
            Err(_) => Err((700027, "Client assertion failed signature validation.")),
        }
    }
}

/// The managed identity endpoints' error shape.
fn managed_error(status: u16, error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        &json!({"error": error, "error_description": description}),
    )
}
