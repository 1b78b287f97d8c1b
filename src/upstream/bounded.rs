//! Bounded reads of what upstreams answer (Graph, the token endpoint, the caller-token key
//! set): a wrong or hostile upstream cannot make the proxy buffer more than a limit, however
//! long its answer is, announced or not.

use bytes::{Bytes, BytesMut};

/// Why an answer's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the answer failed")]
    Http(#[source] reqwest::Error),
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

impl ReadError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ReadError::Http(e) if e.is_timeout())
    }
}

/// The whole body, or [`ReadError::TooLarge`] as soon as it is known to exceed `limit`
/// (from `Content-Length`, before reading anything, or once the bytes read pass it).
pub async fn read(mut response: reqwest::Response, limit: usize) -> Result<Bytes, ReadError> {
    let announced = response.content_length();
    if announced.is_some_and(|len| len > limit as u64) {
        return Err(ReadError::TooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(announced.unwrap_or(2048).min(limit as u64) as usize);
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Http)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
