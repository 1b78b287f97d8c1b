//! The client-credentials exchange with Entra's token endpoint (oauth2): the credential
//! in the form body, or a signed client assertion; Entra's answer and errors classified.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, AuthType, Client, ClientId, EndpointNotSet, EndpointSet, RefreshToken,
    RequestTokenError, Scope, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

use super::error::{aadsts_code, TokenError};
use super::TokenOptions;
use crate::config::{AssertionAlgorithm, ClientCertificate};
use crate::telemetry::{names, Metrics};
use crate::upstream::bounded::{self, ReadError};

/// A token answer is well under 10 KiB; anything past this is not one.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Entra's token response: the standard fields, with `expires_in` as a number or a string,
/// and the Microsoft extras kept rather than dropped.
#[derive(Debug, Deserialize, Serialize)]
pub struct EntraTokenResponse {
    pub(super) access_token: AccessToken,
    #[serde(deserialize_with = "oauth2::helpers::deserialize_untagged_enum_case_insensitive")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "seconds")]
    pub(super) expires_in: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    ext_expires_in: Option<u64>,
    /// When MSAL would refresh in the background; the token stays valid until `expires_in`.
    #[serde(default, deserialize_with = "seconds")]
    pub(super) refresh_in: Option<u64>,
}

impl TokenResponse for EntraTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        None
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        None
    }
}

/// `3599` or `"3599"`.
pub(super) fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Number(n)) => Ok(Some(n)),
        Some(Raw::Text(s)) => s.trim().parse().map(Some).map_err(serde::de::Error::custom),
    }
}

type EntraClient = Client<
    BasicErrorResponse,
    EntraTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// What the HTTP exchange saw besides the body, for classification.
#[derive(Debug, Default, Clone)]
struct Exchange {
    status: u16,
    retry_after: Option<Duration>,
}

/// Signs client assertions: `aud` = the token URL, `iss` = `sub` = the client id, a fresh
/// `jti`, `nbf`/`exp` around now; header `x5t#S256` (and `x5t` for RS256).
struct AssertionSigner {
    certificate: ClientCertificate,
    algorithm: AssertionAlgorithm,
    client_id: String,
    audience: String,
}

impl AssertionSigner {
    fn sign(&self) -> Result<String, TokenError> {
        let (alg, x5t) = match self.algorithm {
            AssertionAlgorithm::Ps256 => (jsonwebtoken::Algorithm::PS256, None),
            AssertionAlgorithm::Rs256 => (
                jsonwebtoken::Algorithm::RS256,
                Some(self.certificate.x5t.clone()),
            ),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.x5t_s256 = Some(self.certificate.x5t_s256.clone());
        header.x5t = x5t;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = serde_json::json!({
            "aud": self.audience,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(
            self.certificate.key_pem.expose_secret().as_bytes(),
        )
        .map_err(|e| TokenError::Malformed(format!("private key: {e}")))?;
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| TokenError::Malformed(format!("client assertion: {e}")))
    }
}

/// How the proxy proves its identity to the token endpoint.
#[derive(Clone)]
pub enum Credential {
    /// `client_secret` in the form body, as Microsoft documents it; re-read from `file`
    /// (when it came from one) for every token request, so a rotated secret needs no restart.
    Secret {
        secret: SecretString,
        file: Option<PathBuf>,
    },
    /// A client assertion (RFC 7523) signed with the certificate's key, fresh per request;
    /// the certificate and key files re-read likewise.
    Certificate {
        certificate: ClientCertificate,
        algorithm: AssertionAlgorithm,
        files: Option<(PathBuf, PathBuf)>,
    },
    /// Workload identity: the file's content (a projected service-account token kubelet
    /// rotates) is the client assertion, read for every token request. `key` names the
    /// file in messages (`auth.federated_token_file` or `AZURE_FEDERATED_TOKEN_FILE`).
    Federated { file: PathBuf, key: &'static str },
    /// A managed identity: tokens from IMDS or App Service, no credential of our own.
    Managed(super::managed::ManagedIdentity),
}

/// The proof sent with each client-credentials request, as last read.
enum Proof {
    Secret {
        secret: SecretString,
        file: Option<PathBuf>,
    },
    Certificate {
        signer: AssertionSigner,
        files: Option<(PathBuf, PathBuf)>,
    },
    Federated {
        file: PathBuf,
        key: &'static str,
    },
}

/// Lifetime of a client assertion (Entra accepts at most 10 minutes).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(9 * 60);

/// Client credentials at one token endpoint.
pub(super) struct ClientCredentials {
    oauth: EntraClient,
    proof: Mutex<Proof>,
    /// Shared with the Graph client: one pool, redirects off.
    http: reqwest::Client,
    scope: Scope,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl ClientCredentials {
    /// `None` for a managed identity (not a client-credentials exchange).
    pub(super) fn new(
        http: reqwest::Client,
        options: &TokenOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Option<ClientCredentials>, oauth2::url::ParseError> {
        let oauth = Client::new(ClientId::new(options.client_id.clone()))
            // Microsoft documents the credential in the form body.
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(TokenUrl::new(options.token_url.clone())?);
        let proof = match &options.credential {
            Credential::Secret { secret, file } => Proof::Secret {
                secret: secret.clone(),
                file: file.clone(),
            },
            Credential::Certificate {
                certificate,
                algorithm,
                files,
            } => Proof::Certificate {
                signer: AssertionSigner {
                    certificate: certificate.clone(),
                    algorithm: *algorithm,
                    client_id: options.client_id.clone(),
                    audience: options.token_url.clone(),
                },
                files: files.clone(),
            },
            Credential::Federated { file, key } => Proof::Federated {
                file: file.clone(),
                key,
            },
            Credential::Managed(_) => return Ok(None),
        };
        Ok(Some(ClientCredentials {
            oauth,
            proof: Mutex::new(proof),
            http,
            scope: Scope::new(options.scope.clone()),
            timeout: options.timeout,
            metrics,
        }))
    }

    /// One token request with the credential files as they are now; when the endpoint
    /// says `invalid_client` (a revoked secret, an expired certificate), the files are read
    /// once more and, if they changed meanwhile, the request is made again.
    pub(super) async fn request(&self) -> Result<EntraTokenResponse, TokenError> {
        self.reload();
        let result = self.exchange().await;
        match &result {
            Err(TokenError::Refused { error, .. })
                if error == "invalid_client" && self.reload() =>
            {
                tracing::info!("the credential files changed after invalid_client: asking again");
                self.exchange().await
            }
            _ => result,
        }
    }

    /// Re-reads the secret, or the certificate and key, from their files; whether they
    /// changed. A file that cannot be read keeps what was read before (and is counted).
    fn reload(&self) -> bool {
        let mut proof = self.proof.lock().unwrap_or_else(|e| e.into_inner());
        let changed = match &mut *proof {
            Proof::Secret {
                secret,
                file: Some(path),
            } => match crate::config::read_secret_value("auth.client_secret_file", path) {
                Ok(now) if now.expose_secret() != secret.expose_secret() => {
                    *secret = now;
                    Ok(true)
                }
                Ok(_) => Ok(false),
                Err(e) => Err(e),
            },
            Proof::Certificate {
                signer,
                files: Some((cert, key)),
            } => match ClientCertificate::load(cert, key) {
                Ok(now)
                    if now.x5t_s256 != signer.certificate.x5t_s256
                        || now.key_pem.expose_secret()
                            != signer.certificate.key_pem.expose_secret() =>
                {
                    signer.certificate = now;
                    Ok(true)
                }
                Ok(_) => Ok(false),
                Err(e) => Err(e),
            },
            _ => Ok(false),
        };
        match changed {
            Ok(false) => false,
            Ok(true) => {
                tracing::info!("credential file changed: the next token requests use it");
                self.count_reload("ok");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read the credential file; keeping the credential read before");
                self.count_reload("error");
                false
            }
        }
    }

    fn count_reload(&self, outcome: &'static str) {
        self.metrics
            .counter(names::CREDENTIAL_RELOADS, &[("outcome", outcome)])
            .increment(1);
    }

    /// The form parameters that prove who we are, as of now.
    fn proof_params(&self) -> Result<Vec<(&'static str, String)>, TokenError> {
        let proof = self.proof.lock().unwrap_or_else(|e| e.into_inner());
        let assertion = |value: String| {
            vec![
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
                ),
                ("client_assertion", value),
            ]
        };
        match &*proof {
            Proof::Secret { secret, .. } => {
                Ok(vec![("client_secret", secret.expose_secret().to_string())])
            }
            Proof::Certificate { signer, .. } => Ok(assertion(signer.sign()?)),
            Proof::Federated { file, key } => match crate::config::read_secret_value(key, file) {
                Ok(token) => Ok(assertion(token.expose_secret().to_string())),
                Err(e) => Err(TokenError::Credential(e.to_string())),
            },
        }
    }

    /// One client-credentials request.
    async fn exchange(&self) -> Result<EntraTokenResponse, TokenError> {
        let exchange = Arc::new(std::sync::Mutex::new(Exchange::default()));
        let seen = exchange.clone();
        let http = self.http.clone();
        let timeout = self.timeout;
        // oauth2 only hands back the body on failure; this closure also records the
        // status and Retry-After so a 429 can be told from a refusal.
        let send = move |request: oauth2::HttpRequest| {
            let http = http.clone();
            let seen = seen.clone();
            async move {
                let mut request = reqwest::Request::try_from(request).map_err(ReadError::Http)?;
                *request.timeout_mut() = Some(timeout);
                let response = http.execute(request).await.map_err(ReadError::Http)?;
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        crate::core::http::parse_retry_after(v, std::time::SystemTime::now())
                    });
                if let Ok(mut seen) = seen.lock() {
                    *seen = Exchange {
                        status: status.as_u16(),
                        retry_after,
                    };
                }
                let mut out = http::Response::builder().status(status);
                for (name, value) in response.headers() {
                    out = out.header(name, value);
                }
                let body = bounded::read(response, MAX_ANSWER_BYTES).await?;
                Ok::<_, ReadError>(out.body(body.to_vec()).unwrap_or_default())
            }
        };
        let mut request = self
            .oauth
            .exchange_client_credentials()
            .add_scope(self.scope.clone());
        for (name, value) in self.proof_params()? {
            request = request.add_extra_param(name, value);
        }
        let result = request.request_async(&send).await;
        let seen = exchange.lock().map(|e| e.clone()).unwrap_or_default();
        result.map_err(|e| classify(e, &seen))
    }
}

fn classify(e: RequestTokenError<ReadError, BasicErrorResponse>, seen: &Exchange) -> TokenError {
    if seen.status == 429 {
        return TokenError::Throttled(seen.retry_after.unwrap_or(Duration::from_secs(60)));
    }
    match e {
        RequestTokenError::ServerResponse(body) => {
            let description = body.error_description().cloned().unwrap_or_default();
            TokenError::Refused {
                error: body.error().to_string(),
                aadsts: aadsts_code(&description),
                description,
            }
        }
        RequestTokenError::Request(ReadError::Http(e)) => TokenError::Unreachable(e),
        RequestTokenError::Request(ReadError::TooLarge { limit }) => TokenError::TooLarge(limit),
        RequestTokenError::Parse(e, _) if seen.status == 200 => {
            TokenError::Malformed(e.to_string())
        }
        RequestTokenError::Parse(..) | RequestTokenError::Other(_) if seen.status != 200 => {
            TokenError::Status(seen.status)
        }
        RequestTokenError::Parse(e, _) => TokenError::Malformed(e.to_string()),
        RequestTokenError::Other(e) => TokenError::Malformed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_as_number_or_string() {
        let a: EntraTokenResponse = serde_json::from_str(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"x"}"#,
        )
        .unwrap();
        assert_eq!(a.expires_in(), Some(Duration::from_secs(3599)));
        let b: EntraTokenResponse = serde_json::from_str(
            r#"{"token_type":"bearer","expires_in":"3599","refresh_in":"1799","access_token":"x"}"#,
        )
        .unwrap();
        assert_eq!(b.expires_in(), Some(Duration::from_secs(3599)));
        assert_eq!(b.refresh_in, Some(1799));
    }
}
