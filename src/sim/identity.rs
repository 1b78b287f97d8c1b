//! The simulated identity platform: the token endpoint (client secret or certificate
//! assertion, Entra-style errors) and the caller-token key set.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::*;

impl Simulator {
    pub(super) fn jwks(&self) -> Response<Full<Bytes>> {
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

    pub(super) async fn token(
        &self,
        tenant: &str,
        basic: Option<HeaderValue>,
        token_url: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, SimReset> {
        lock(&self.state.stats).token_requests += 1;
        let mut faults = lock(&self.state.faults).clone();
        if faults.token_latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.token_latency_ms)).await;
            // Entra judges the credential when it answers: a secret revoked meanwhile fails.
            faults = lock(&self.state.faults).clone();
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
            lock(&self.state.stats).last_assertion = Some(assertion.clone());
            if Self::is_federated(assertion) {
                if form.get("client_assertion_type").map(String::as_str)
                    != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                {
                    return Ok(self.refused(entra_error(
                        400,
                        "invalid_request",
                        70002,
                        "AADSTS70002: wrong client_assertion_type.",
                    )));
                }
                if let Err((code, text)) = self.check_federated(assertion) {
                    return Ok(self.refused(entra_error(
                        401,
                        "invalid_client",
                        code,
                        &format!("AADSTS{code}: {text}"),
                    )));
                }
            } else if let Err(why) = self.check_assertion(&form, assertion, token_url) {
                return Ok(entra_error(
                    401,
                    "invalid_client",
                    700027,
                    &format!("AADSTS700027: Client assertion failed signature validation: {why}."),
                ));
            }
        } else if !faults
            .client_secrets
            .clone()
            .unwrap_or_else(|| vec![config.client_secret.clone()])
            .iter()
            .any(|accepted| secret.as_deref() == Some(accepted.as_str()))
        {
            return Ok(self.refused(entra_error(
                401,
                "invalid_client",
                7000215,
                "AADSTS7000215: Invalid client secret provided.",
            )));
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
        let token = self.issue_token(lifetime);
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

    /// A token Graph accepts until `lifetime` has passed.
    pub(super) fn issue_token(&self, lifetime: Duration) -> String {
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
        token
    }

    /// Counts a refused token request.
    fn refused(&self, response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
        lock(&self.state.stats).token_failures += 1;
        response
    }

    /// Verifies a client assertion as Entra does: signed (PS256 or RS256) by the registered
    /// certificate's key, `x5t#S256` naming that certificate, `aud` = this token URL,
    /// `iss` = `sub` = the client id, at most 10 minutes of validity.
    pub(super) fn check_assertion(
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
}

/// Entra's token error shape.
pub(super) fn entra_error(
    status: u16,
    error: &str,
    code: u32,
    description: &str,
) -> Response<Full<Bytes>> {
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
