//! [`AuthError`]: why a caller is not let in. Turned into an HTTP answer at the edge
//! (`http::error`): 400, 401 (with `WWW-Authenticate`), 403 or 503.

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Credentials that contradict each other or repeat: a bad request, not a guess.
    #[error("ambiguous credentials: {0}")]
    Ambiguous(&'static str),
    #[error("caller not authenticated: {0}")]
    Unauthenticated(&'static str),
    #[error("caller {caller} may not read {what}")]
    Forbidden { caller: String, what: &'static str },
    /// Caller tokens cannot be checked: the signing key set could never be fetched.
    #[error("caller tokens cannot be verified: no key set")]
    Unavailable,
}
