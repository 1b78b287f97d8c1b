//! [`TokenError`]: why no token could be had, and what a caller is told of it.

use std::time::Duration;

use crate::telemetry::Wait;

/// Why no token could be had. Never carries the secret or a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The identity platform answered with an OAuth error (bad secret, unknown app, ...).
    #[error("token endpoint refused: {}", refusal(error, aadsts.as_deref()))]
    Refused {
        /// OAuth error code, e.g. `invalid_client`.
        error: String,
        /// `AADSTS7000215` and the like, parsed from the description.
        aadsts: Option<String>,
        /// Entra's description; logged, not shown to callers.
        description: String,
    },
    #[error("token endpoint is throttling (retry in {})", Wait(*.0))]
    Throttled(Duration),
    #[error("token endpoint answered HTTP {0}")]
    Status(u16),
    #[error("token endpoint unreachable{}", crate::upstream::error::tls_hint(.0))]
    Unreachable(#[source] reqwest::Error),
    #[error("token endpoint's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("token endpoint answer not understood: {0}")]
    Malformed(String),
    #[error("no token within the request's deadline")]
    TimedOut,
    /// The credential could not be read (the federated token file, say).
    #[error("credential unavailable: {0}")]
    Credential(String),
}

impl TokenError {
    /// The text a caller sees: which AADSTS code, never the secret or Entra's full text.
    pub fn caller_message(&self) -> String {
        match self {
            TokenError::Refused { error, aadsts, .. } => match aadsts {
                Some(code) => format!(
                    "the identity platform refused the proxy's credentials: {code} ({error})"
                ),
                None => format!("the identity platform refused the proxy's credentials ({error})"),
            },
            TokenError::Throttled(_) => "the identity platform is throttling the proxy".to_string(),
            TokenError::Status(status) => format!("the token endpoint answered HTTP {status}"),
            TokenError::Unreachable(e) => format!(
                "the token endpoint could not be reached{}",
                crate::upstream::error::tls_hint(e)
            ),
            TokenError::TooLarge(_) => "the token endpoint's answer was too large".to_string(),
            TokenError::Malformed(_) => {
                "the token endpoint's answer was not understood".to_string()
            }
            TokenError::TimedOut => "the token endpoint did not answer in time".to_string(),
            TokenError::Credential(_) => {
                "the proxy's credential could not be read (its log says which file)".to_string()
            }
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Throttled(wait) => Some(*wait),
            TokenError::Refused { .. }
            | TokenError::Status(_)
            | TokenError::Unreachable(_)
            | TokenError::TooLarge(_)
            | TokenError::Malformed(_)
            | TokenError::TimedOut
            | TokenError::Credential(_) => None,
        }
    }
}

/// `invalid_client (AADSTS7000215)`: what a refusal is called in logs (Entra's full
/// description is logged once, where the refusal is first seen).
fn refusal(error: &str, aadsts: Option<&str>) -> String {
    match aadsts {
        Some(code) => format!("{error} ({code})"),
        None => error.to_string(),
    }
}

/// `AADSTS7000215: Invalid client secret provided...` -> `AADSTS7000215`.
pub(super) fn aadsts_code(description: &str) -> Option<String> {
    let start = description.find("AADSTS")?;
    let digits: String = description[start + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_codes_are_found() {
        assert_eq!(
            aadsts_code("AADSTS7000215: Invalid client secret provided.").as_deref(),
            Some("AADSTS7000215")
        );
        assert_eq!(aadsts_code("no code here"), None);
        assert_eq!(aadsts_code("AADSTS: none"), None);
    }

    #[test]
    fn refusal_message_names_code_not_description() {
        let e = TokenError::Refused {
            error: "invalid_client".into(),
            aadsts: Some("AADSTS7000215".into()),
            description: "AADSTS7000215: Invalid client secret provided. Secret hint: abc".into(),
        };
        let m = e.caller_message();
        assert!(m.contains("AADSTS7000215") && !m.contains("hint"), "{m}");
    }
}
