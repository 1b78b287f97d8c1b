//! Listeners: accepting, serving connections (HTTP/1.1 or HTTP/2, TLS), their deadlines
//! and graceful shutdown.

pub mod connections;
pub mod tls;
pub mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::{Service, ServiceBuilder};
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::core::request_id;

use crate::core::model::Style;
use crate::http::error::ProxyError;
use crate::http::handler::drop_unusable_request_id;
use crate::server::connections::{Activity, Close, Heard, Limits, Registry, Tracked};
use crate::server::wire::GuardedIo;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How connections on one listener are served.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Pass HTTP/1 request targets through [`GuardedIo`] (the caller listener).
    pub guard: bool,
    /// Serve HTTPS with this configuration (the caller listener, when configured). The
    /// handshake runs in the connection's own task, bounded by `header_read_timeout`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Close a connection whose request headers have not all arrived in this time, and
    /// one that has not sent its first byte this long after it was accepted.
    pub header_read_timeout: Duration,
    /// Close (HTTP/2: GOAWAY) a connection with no request in flight for this long.
    pub idle_timeout: Duration,
    /// Hyper's hard limits, above the handler's own JSON-answered ones: beyond them hyper
    /// itself refuses (431/414 without a body) before any handler runs.
    pub hard_max_headers: usize,
    pub hard_max_buf: usize,
    /// HTTP/2: streams per connection and header list size.
    pub h2_max_streams: u32,
    pub h2_max_header_list: u32,
    /// Open connections at most; a newcomer beyond takes the place of the longest-idle
    /// one, or (all busy) gets a 503 `overloaded`.
    pub max_connections: usize,
    /// For in-flight connections after shutdown.
    pub grace: Duration,
}

impl ConnectionOptions {
    /// Internal listeners (admin, simulator): no guard, generous limits.
    pub fn internal(grace: Duration) -> ConnectionOptions {
        ConnectionOptions {
            guard: false,
            tls: None,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            hard_max_headers: 100,
            hard_max_buf: 400 * 1024,
            h2_max_streams: 200,
            h2_max_header_list: 64 * 1024,
            max_connections: 1024,
            grace,
        }
    }
}

/// Binds a listener on `addr` with room for `backlog` connections not yet accepted
/// (tokio's `TcpListener::bind` leaves the standard library's 128: a burst of connects
/// overflows it and costs callers one-second SYN retransmits; the kernel caps `backlog`
/// at `net.core.somaxconn`). `SO_REUSEADDR` as tokio sets it (not on Windows, where it
/// would allow taking over a port in use), so a restart can bind while old connections
/// sit in TIME_WAIT. Needs a tokio runtime.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Once a connection is to close for being idle or to make room: how long it gets to
/// finish (an HTTP/2 GOAWAY exchange, an answer being written) before it is dropped.
const CLOSE_BOUND: Duration = Duration::from_millis(500);
/// A newcomer beyond `max_connections` for whom an idle connection was closed waits this
/// long for the freed place; then it is refused like one that found no idle connection.
const ROOM_WAIT: Duration = Duration::from_millis(800);
/// The whole life of a refused newcomer: its handshake, its request, the 503.
const REFUSAL_BOUND: Duration = Duration::from_secs(1);
/// Newcomers beyond `max_connections` waiting for a place or being refused at once;
/// beyond these, a new connection is closed as soon as it is accepted.
const MAX_OVER_CAP: usize = 64;

/// Accepts connections on `listener`, serving each with a clone of `service` (HTTP/1.1 or
/// HTTP/2) under `options`, until `shutdown` completes; then stops accepting and gives
/// connections in flight up to `options.grace` to finish.
///
/// Accepting never waits for a free place: at `max_connections`, the connection idle the
/// longest is closed to make room for the newcomer, or when every connection has a
/// request in flight, the newcomer is answered a 503 `overloaded` and closed. Either way
/// a caller is never left hanging in the backlog behind connections that do nothing.
pub async fn accept_loop<S, B>(
    listener: TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    options: ConnectionOptions,
) where
    S: HttpService<B>,
    B: HttpBody,
{
    let builder = http_builder(&options);
    let grace = options.grace;
    // Shutdown is `true` sent on this channel; once every connection has dropped its
    // receiver, all have ended.
    let (stop, stopping) = watch::channel(false);
    let connection = Arc::new(Connection {
        builder,
        guard: options.guard,
        tls: options.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        // A client gets as long for its TLS handshake as for its request headers.
        handshake_timeout: options.header_read_timeout,
        limits: Limits {
            first_byte: options.header_read_timeout,
            idle: options.idle_timeout,
        },
        grace,
    });
    let registry = Arc::new(Registry::default());
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let over_cap = Arc::new(Semaphore::new(MAX_OVER_CAP));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let connection = connection.clone();
        // Taken before the handshake, so that shutdown also waits (within the grace) for
        // connections still shaking hands.
        let stopping = stopping.clone();
        // Everything slow happens in the connection's task: one client that never
        // finishes its handshake must not hold up accepting the next.
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            let registered = registry.register();
            tokio::spawn(async move {
                let _slot = slot; // released when the connection ends
                connection
                    .serve(stream, service, &registered.activity, stopping)
                    .await;
            });
            continue;
        }
        let Ok(over) = over_cap.clone().try_acquire_owned() else {
            tracing::debug!("connection limit reached, too many newcomers refused already: closed");
            continue;
        };
        let made_room = registry.evict_longest_idle();
        let (slots, registry) = (slots.clone(), registry.clone());
        tokio::spawn(async move {
            let newcomer = Newcomer {
                connection,
                registry,
                stopping,
                _over: over,
            };
            newcomer.serve(stream, service, made_room, slots).await;
        });
    }
    drop(listener);
    drop(stopping);
    let _ = stop.send(true);
    tokio::select! {
        () = stop.closed() => {}
        () = tokio::time::sleep(grace) => tracing::warn!("shutdown grace elapsed with connections still open"),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a listener can serve: a cloneable tower service of HTTP requests, whose answers'
/// bodies are [`HttpBody`]. (Named once instead of spelled out at every function.)
pub trait HttpService<B>:
    Service<
        Request<Incoming>,
        Response = Response<B>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A response body hyper can send from any task.
pub trait HttpBody: hyper::body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> HttpBody for B where B: hyper::body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static
{}

/// Hyper's HTTP/1.1 and HTTP/2 settings for one listener.
fn http_builder(options: &ConnectionOptions) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_headers(options.hard_max_headers)
        .max_buf_size(options.hard_max_buf);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.h2_max_streams)
        .max_header_list_size(options.h2_max_header_list);
    builder
}

/// A connection accepted beyond `max_connections`, holding one of the few over-cap
/// places until it is served or refused.
struct Newcomer {
    connection: Arc<Connection>,
    registry: Arc<Registry>,
    stopping: watch::Receiver<bool>,
    _over: tokio::sync::OwnedSemaphorePermit,
}

impl Newcomer {
    /// Takes the place an evicted connection frees (when one was evicted) within
    /// `ROOM_WAIT`, or answers a JSON 503 within `REFUSAL_BOUND`.
    async fn serve<S, B>(
        self,
        stream: TcpStream,
        service: S,
        made_room: bool,
        slots: Arc<Semaphore>,
    ) where
        S: HttpService<B>,
        B: HttpBody,
    {
        let slot = match made_room {
            true => tokio::time::timeout(ROOM_WAIT, slots.acquire_owned())
                .await
                .ok()
                .and_then(Result::ok),
            false => None,
        };
        let Newcomer {
            connection,
            registry,
            stopping,
            _over: over,
        } = self;
        match slot {
            Some(slot) => {
                drop(over);
                let registered = registry.register();
                connection
                    .serve(stream, service, &registered.activity, stopping)
                    .await;
                drop(slot);
            }
            None => {
                tracing::debug!("connection limit reached, every connection busy: 503");
                let activity = Arc::new(Activity::new());
                let refusal = connection.serve(
                    stream,
                    overloaded_service(activity.clone()),
                    &activity,
                    stopping,
                );
                let _ = tokio::time::timeout(REFUSAL_BOUND, refusal).await;
                drop(over);
            }
        }
    }
}

/// What a newcomer beyond `max_connections` is answered when no connection is idle: a
/// JSON 503 `overloaded` with `Connection: close`, then the connection closes.
fn overloaded_service(
    activity: Arc<Activity>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .map_request(|mut req: Request<Incoming>| {
            drop_unusable_request_id(req.headers_mut());
            req
        })
        .layer(SetRequestIdLayer::x_request_id(request_id::MakeUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .service_fn(move |req: Request<Incoming>| {
            // One answer, then close (HTTP/2 has no `Connection: close`: GOAWAY instead).
            activity.evict();
            let request_id = req
                .headers()
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let mut response = ProxyError::Overloaded.to_response_in(
                Style::of(req.uri().path()),
                request_id,
                request_id,
            );
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            std::future::ready(Ok::<_, Infallible>(response))
        })
}

/// How every connection of one listener is served.
struct Connection {
    builder: Builder<TokioExecutor>,
    /// Pass HTTP/1 request targets through [`GuardedIo`].
    guard: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
    limits: Limits,
    grace: Duration,
}

impl Connection {
    /// Serves one accepted connection (after its TLS handshake, when configured) to its
    /// end: until the client closes it, its watchdog closes it (silent, idle, evicted) or
    /// the listener shuts down.
    async fn serve<S, B>(
        &self,
        stream: TcpStream,
        service: S,
        activity: &Arc<Activity>,
        stopping: watch::Receiver<bool>,
    ) where
        S: HttpService<B>,
        B: HttpBody,
    {
        let Some(acceptor) = &self.tls else {
            return self.serve_http(stream, service, activity, stopping).await;
        };
        let handshake = tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream));
        tokio::select! {
            handshake = handshake => match handshake {
                Ok(Ok(stream)) => self.serve_http(stream, service, activity, stopping).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_elapsed) => tracing::debug!("TLS handshake timed out"),
            },
            // Evicted, or not one byte before the deadline.
            reason = activity.closing(self.limits) => {
                tracing::debug!(?reason, "connection closed during its TLS handshake");
            }
        }
    }

    /// Serves HTTP on a plain or decrypted TLS stream; with `guard`, HTTP/1 request
    /// targets pass through [`GuardedIo`] first.
    async fn serve_http<I, S, B>(
        &self,
        io: I,
        service: S,
        activity: &Arc<Activity>,
        stopping: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HttpService<B>,
        B: HttpBody,
    {
        let service = Tracked::new(TowerToHyperService::new(service), activity.clone());
        let io = Heard::new(io, activity.clone());
        let result = if self.guard {
            let io = TokioIo::new(GuardedIo::new(io));
            let conn = self.builder.serve_connection(io, service);
            self.drive(conn, |conn| conn.graceful_shutdown(), activity, stopping)
                .await
        } else {
            let io = TokioIo::new(io);
            let conn = self.builder.serve_connection(io, service);
            self.drive(conn, |conn| conn.graceful_shutdown(), activity, stopping)
                .await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    /// Polls `conn` to its end. When the watchdog or shutdown asks, starts its graceful
    /// shutdown (`shut`: HTTP/1 closes once no answer is being written, HTTP/2 sends
    /// GOAWAY and finishes its streams) and drops it if that takes longer than
    /// [`CLOSE_BOUND`] (shutdown: the grace). A silent connection is simply dropped.
    async fn drive<C, E>(
        &self,
        conn: C,
        shut: impl FnOnce(Pin<&mut C>),
        activity: &Activity,
        mut stopping: watch::Receiver<bool>,
    ) -> Result<(), E>
    where
        C: Future<Output = Result<(), E>>,
    {
        tokio::pin!(conn);
        let bound = tokio::select! {
            result = conn.as_mut() => return result,
            reason = activity.closing(self.limits) => {
                tracing::debug!(?reason, "closing a connection");
                if reason == Close::Silent {
                    return Ok(());
                }
                CLOSE_BOUND
            }
            // An error means the accept loop is gone: stop as well.
            () = async { let _ = stopping.wait_for(|stop| *stop).await; } => self.grace,
        };
        shut(conn.as_mut());
        match tokio::time::timeout(bound, conn).await {
            Ok(result) => result,
            Err(_elapsed) => {
                tracing::debug!("connection did not close in time: dropped");
                Ok(())
            }
        }
    }
}
