//! The client-credentials exchange with Entra's token endpoint (oauth2): the credential
//! in the form body, or a signed client assertion; Entra's answer and errors classified.

use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, AuthType, Client, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    RefreshToken, RequestTokenError, Scope, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

use super::error::{aadsts_code, TokenError};
use super::TokenOptions;
use crate::config::{AssertionAlgorithm, ClientCertificate};
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
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
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
    /// `client_secret` in the form body, as Microsoft documents it.
    Secret(SecretString),
    /// A client assertion (RFC 7523) signed with the certificate's key, fresh per request.
    Certificate {
        certificate: ClientCertificate,
        algorithm: AssertionAlgorithm,
    },
}

/// Lifetime of a client assertion (Entra accepts at most 10 minutes).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(9 * 60);

/// Client credentials at one token endpoint.
pub(super) struct ClientCredentials {
    oauth: EntraClient,
    /// Set for certificate credentials.
    assertion: Option<AssertionSigner>,
    /// Shared with the Graph client: one pool, redirects off.
    http: reqwest::Client,
    scope: Scope,
    timeout: Duration,
}

impl ClientCredentials {
    pub(super) fn new(
        http: reqwest::Client,
        options: &TokenOptions,
    ) -> Result<ClientCredentials, oauth2::url::ParseError> {
        let mut oauth = Client::new(ClientId::new(options.client_id.clone()))
            // Microsoft documents the credential in the form body.
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(TokenUrl::new(options.token_url.clone())?);
        let mut assertion = None;
        match &options.credential {
            Credential::Secret(secret) => {
                oauth =
                    oauth.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
            }
            Credential::Certificate {
                certificate,
                algorithm,
            } => {
                assertion = Some(AssertionSigner {
                    certificate: certificate.clone(),
                    algorithm: *algorithm,
                    client_id: options.client_id.clone(),
                    audience: options.token_url.clone(),
                });
            }
        }
        Ok(ClientCredentials {
            oauth,
            assertion,
            http,
            scope: Scope::new(options.scope.clone()),
            timeout: options.timeout,
        })
    }

    /// One token request.
    pub(super) async fn exchange(&self) -> Result<EntraTokenResponse, TokenError> {
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
        if let Some(signer) = &self.assertion {
            request = request
                .add_extra_param(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                )
                .add_extra_param("client_assertion", signer.sign()?);
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
