//! `POST {notifications.path}`: where Graph posts change notifications, on the caller
//! listener but without caller credentials (Graph has none of ours). Answers at once:
//! the validation handshake with its token, a notification batch with 202 (acted on in
//! the background). Everything else is refused: another method, a body over 1 MiB, a
//! flood, anything that is not a notification batch.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use crate::http::error::error_response;
use crate::http::AppState;
use crate::notify::{Answer, Notifications, MAX_BODY};

/// Answers one request to the notification path.
pub async fn receive<B>(
    state: &AppState,
    n: &Notifications,
    req: Request<B>,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    if req.method() != Method::POST {
        let mut r = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "methodNotAllowed",
            "the notification path takes POST only (from Microsoft Graph)",
            &id,
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        // Graph retries elsewhere (another replica behind the same URL) or later.
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "shutting down",
            &id,
        );
    }
    if !n.admit() {
        let mut r = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rateLimited",
            "too many requests to the notification path",
            &id,
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    if let Some(token) = Notifications::validation_token(req.uri().query()) {
        if !Notifications::echoable(&token) {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalidRequest",
                "validationToken must be 1 to 4096 characters on one line",
                &id,
            );
        }
        n.validated();
        let mut r = Response::new(Full::new(Bytes::from(token)));
        let headers = r.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        return r;
    }
    let announced = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > MAX_BODY as u64) {
        return too_large(n, &id);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(n, &id),
        Err(_) => {
            n.refused("malformed");
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalidRequest",
                "the body could not be read",
                &id,
            );
        }
    };
    match n.accept(&body) {
        Answer::Accepted | Answer::Validation(_) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::ACCEPTED;
            r
        }
        Answer::Malformed(why) => {
            error_response(StatusCode::BAD_REQUEST, "invalidRequest", why, &id)
        }
        Answer::Flooded { .. } => {
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many notifications waiting",
                &id,
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

fn too_large(n: &Notifications, id: &str) -> Response<Full<Bytes>> {
    n.refused("too_large");
    let mut r = error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payloadTooLarge",
        "notification bodies are at most 1 MiB",
        id,
    );
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}
