//! What the accept loop knows about each open connection, and when it closes one.
//!
//! hyper bounds the time a request's headers take once their first byte has arrived, but
//! not a connection that never sends a byte, nor one that goes quiet between requests
//! (HTTP/1 keep-alive, or HTTP/2 after its preface). Each connection therefore carries an
//! [`Activity`]: whether a byte ever arrived ([`Heard`] on its IO), how many requests are
//! in flight ([`Tracked`] around its service) and since when it has had none. One
//! watchdog per connection, [`Activity::closing`], says when to close it: silent past the
//! first-byte deadline, idle past the idle timeout, or chosen by the [`Registry`] to make
//! room for a newcomer when the listener is full. A connection with a request in flight
//! is never idle.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long one connection may stay silent or idle.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept to the first byte (the TLS handshake included).
    pub first_byte: Duration,
    /// With no request in flight, since the last one was answered (or since accept).
    pub idle: Duration,
}

/// Why the watchdog wants a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Not one byte arrived before the first-byte deadline.
    Silent,
    /// No request in flight for the idle timeout.
    Idle,
    /// Chosen to make room for a newcomer (or asked to close after one answer).
    Evicted,
}

// === impl Activity ===

/// One connection's state, shared by its IO, its service, its watchdog and the registry.
#[derive(Debug)]
pub struct Activity {
    /// When the connection was accepted; also the origin of `idle_since`.
    accepted: Instant,
    /// Requests whose handler is running (HTTP/2 may have several).
    in_flight: AtomicUsize,
    /// Microseconds after `accepted` at which the connection last had no request in
    /// flight (accept, or the end of its last request).
    idle_since: AtomicU64,
    /// A byte has arrived.
    heard: AtomicBool,
    /// The connection is to close as soon as it can.
    evicted: AtomicBool,
    /// The watchdog last saw a request in flight and waits, without a deadline, to be told
    /// when the connection has none: only then does the end of a request wake it (under
    /// keep-alive load it sleeps on its idle deadline instead of waking per request).
    parked: AtomicBool,
    /// Wakes the watchdog: a request ended, or the connection was evicted.
    wake: Notify,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            heard: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn micros_since_accept(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn idle_since(&self) -> Instant {
        self.accepted + Duration::from_micros(self.idle_since.load(Ordering::Acquire))
    }

    /// Some bytes arrived.
    fn heard(&self) {
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Release);
        }
    }

    /// A request's handler starts; the returned guard ends it when dropped.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Asks the connection to close as soon as it can; false when it was already asked.
    pub fn evict(&self) -> bool {
        let first = !self.evicted.swap(true, Ordering::AcqRel);
        if first {
            self.wake.notify_one();
        }
        first
    }

    /// Idle now: no request in flight, not already evicted. Since when, if so.
    fn idle(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 || self.evicted.load(Ordering::Acquire) {
            return None;
        }
        Some(self.idle_since())
    }

    /// Completes when the connection should be closed, and says why.
    pub async fn closing(&self, limits: Limits) -> Close {
        let first_byte = self.accepted.checked_add(limits.first_byte);
        loop {
            // Registered before the checks, so that a wake-up between them is not lost
            // (`notify_one` also keeps a permit when nobody waits).
            let woken = self.wake.notified();
            if self.evicted.load(Ordering::Acquire) {
                return Close::Evicted;
            }
            let now = Instant::now();
            let mut deadline = None;
            if !self.heard.load(Ordering::Acquire) {
                match first_byte {
                    Some(at) if at > now => deadline = Some(at),
                    _ => return Close::Silent,
                }
            }
            // Parked before looking, and the last request's end looks after counting
            // down (both SeqCst): one of the two sees the other, no wake-up is lost.
            self.parked.store(true, Ordering::SeqCst);
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                self.parked.store(false, Ordering::SeqCst);
                match self.idle_since().checked_add(limits.idle) {
                    Some(at) if at <= now => return Close::Idle,
                    Some(at) => deadline = Some(deadline.map_or(at, |d: Instant| d.min(at))),
                    None => {}
                }
            }
            match deadline {
                Some(at) => {
                    tokio::select! {
                        () = woken => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => woken.await,
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// A request in flight on a connection; its end restarts the idle clock.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.micros_since_accept(), Ordering::Release);
        if activity.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && activity.parked.swap(false, Ordering::SeqCst)
        {
            activity.wake.notify_one();
        }
    }
}

// === impl Registry ===

/// The open connections of one listener that hold a connection slot, so that the
/// longest-idle one can be closed when the slots run out.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    /// Adds a new connection; it leaves the registry when the returned guard is dropped.
    pub fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        self.lock().insert(id, activity.clone());
        Registered {
            registry: self.clone(),
            id,
            activity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        // The map stays consistent whatever panicked while holding it.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Evicts the connection idle the longest (no request in flight); false when every
    /// connection is busy. A scan of all connections, but only when the listener is full.
    pub fn evict_longest_idle(&self) -> bool {
        let longest = self
            .lock()
            .values()
            .filter_map(|activity| activity.idle().map(|since| (since, activity.clone())))
            .min_by_key(|(since, _)| *since);
        match longest {
            Some((_, activity)) => activity.evict(),
            None => false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A connection's place in the [`Registry`].
pub struct Registered {
    registry: Arc<Registry>,
    id: u64,
    pub activity: Arc<Activity>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

// === impl Heard ===

/// Connection IO that marks its [`Activity`] heard at the first byte read.
#[derive(Debug)]
pub struct Heard<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Heard<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Heard<T> {
        Heard { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.heard();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// === impl Tracked ===

/// A hyper service that counts its requests in flight on the connection's [`Activity`].
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Tracked<S> {
        Tracked { inner, activity }
    }
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, req: R) -> Self::Future {
        let in_flight = self.activity.begin();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let _in_flight = in_flight;
            answer.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        first_byte: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    /// How long `closing` takes on paused time, and why it ended.
    async fn closes(activity: &Activity) -> (Close, Duration) {
        let start = Instant::now();
        let why = activity.closing(LIMITS).await;
        (why, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_closes_at_the_first_byte_deadline() {
        let activity = Activity::new();
        assert_eq!(closes(&activity).await, (Close::Silent, LIMITS.first_byte));
    }

    #[tokio::test(start_paused = true)]
    async fn a_heard_connection_without_requests_closes_when_idle() {
        let activity = Activity::new();
        activity.heard();
        assert_eq!(closes(&activity).await, (Close::Idle, LIMITS.idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle_and_its_end_restarts_the_clock() {
        let activity = Arc::new(Activity::new());
        activity.heard();
        let request = activity.begin();
        let watchdog = {
            let activity = activity.clone();
            tokio::spawn(async move { closes(&activity).await })
        };
        tokio::time::sleep(LIMITS.idle * 3).await;
        assert!(!watchdog.is_finished(), "closed with a request in flight");
        drop(request);
        let (why, after) = watchdog.await.unwrap();
        assert_eq!(why, Close::Idle);
        assert_eq!(after, LIMITS.idle * 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_closes_at_once_even_when_busy() {
        let activity = Arc::new(Activity::new());
        let _request = activity.begin();
        assert!(activity.evict());
        assert!(!activity.evict(), "evicted once");
        assert_eq!(closes(&activity).await, (Close::Evicted, Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_evicts_the_longest_idle_and_never_a_busy_one() {
        let registry = Arc::new(Registry::default());
        let busy = registry.register();
        let _request = busy.activity.begin();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let older = registry.register();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let newer = registry.register();
        // `older` has had no request in flight since t=1, `newer` since t=2 (it answered one).
        drop(newer.activity.begin());
        assert_eq!(registry.len(), 3);
        assert!(registry.evict_longest_idle());
        assert!(older.activity.evicted.load(Ordering::Acquire));
        assert!(!newer.activity.evicted.load(Ordering::Acquire));
        assert!(registry.evict_longest_idle());
        assert!(newer.activity.evicted.load(Ordering::Acquire));
        assert!(!registry.evict_longest_idle(), "only a busy one left");
        assert!(!busy.activity.evicted.load(Ordering::Acquire));
        drop(older);
        assert_eq!(registry.len(), 2);
    }
}
