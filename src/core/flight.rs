//! [`Flights`]: single flight, one call in progress per key; [`Flight`] is the same for a
//! single key. The first caller for a key starts the call and publishes a shared future;
//! everyone else for that key awaits the same future.
//!
//! A call runs in one of two ways, chosen when the flights are made:
//! - spawned ([`Flights::new`]): the call is its own task, so the caller that started it
//!   may go away (a client disconnects) without cancelling it (the cache's Graph calls);
//! - attached ([`Flights::attached`]): the call runs in whichever of its callers' tasks
//!   polls it, and ends (cancelled) when the last of them goes away, so a caller's
//!   deadline bounds the call it started (the token request, the key-set fetch).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};

/// A call in progress, as its callers await it.
pub(crate) type Call<T> = Shared<BoxFuture<'static, T>>;

/// The calls in progress, one per key; a call removes itself when it ends.
pub(crate) struct Flights<K, T: Clone> {
    calls: Arc<Mutex<Calls<K, T>>>,
    /// `Some` for spawned calls: what a call whose task failed (panicked, or was cancelled
    /// at shutdown) answers. `None` for attached calls.
    lost: Option<fn() -> T>,
}

struct Calls<K, T: Clone> {
    by_key: HashMap<K, Held<T>>,
    /// Numbers each call, so a call ending removes itself and never its successor.
    started: u64,
}

/// A call as the map holds it: spawned calls strongly (the task runs on regardless),
/// attached ones weakly (the callers own the call; when they are gone, so is it).
enum Held<T: Clone> {
    Spawned(u64, Call<T>),
    Attached(u64, WeakShared<BoxFuture<'static, T>>),
}

impl<T: Clone> Held<T> {
    fn number(&self) -> u64 {
        match self {
            Held::Spawned(number, _) | Held::Attached(number, _) => *number,
        }
    }

    /// The call, while it still runs.
    fn call(&self) -> Option<Call<T>> {
        match self {
            Held::Spawned(_, call) => Some(call.clone()),
            Held::Attached(_, weak) => weak.upgrade(),
        }
    }
}

/// What [`Flights::join_or_start`] found.
pub(crate) enum Joined<T: Clone, R> {
    /// No call was in progress and `ready` had an answer: none was started.
    Ready(R),
    /// The key's call; `started` when this caller started it.
    Call { call: Call<T>, started: bool },
}

impl<K, T> Flights<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Whether a call for `key` is in progress (a new request would join it).
    pub fn in_progress(&self, key: &K) -> bool {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .get(key)
            .and_then(Held::call)
            .is_some()
    }

    /// Spawned calls; `lost` answers for a call whose task failed.
    pub(crate) fn new(lost: fn() -> T) -> Flights<K, T> {
        Flights::with(Some(lost))
    }

    /// Attached calls: run by their callers, cancelled when the last one goes away.
    pub(crate) fn attached() -> Flights<K, T> {
        Flights::with(None)
    }

    fn with(lost: Option<fn() -> T>) -> Flights<K, T> {
        Flights {
            calls: Arc::new(Mutex::new(Calls {
                by_key: HashMap::new(),
                started: 0,
            })),
            lost,
        }
    }

    /// Joins the call in progress for `key`, or, when there is none, answers with `ready`
    /// (if it has an answer) or starts `call`. `ready` runs while no call can end: a call
    /// leaves the map only after its answer is stored, so a caller either finds the
    /// answer or starts a new call, never neither.
    pub(crate) fn join_or_start<R, F>(
        &self,
        key: &K,
        ready: impl FnOnce() -> Option<R>,
        call: impl FnOnce() -> F,
    ) -> Joined<T, R>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(call) = calls.by_key.get(key).and_then(Held::call) {
            return Joined::Call {
                call,
                started: false,
            };
        }
        if let Some(answer) = ready() {
            return Joined::Ready(answer);
        }
        calls.started += 1;
        let number = calls.started;
        let future = call();
        let leave = Leave {
            calls: self.calls.clone(),
            key: key.clone(),
            number,
        };
        // Whichever way the call runs, `leave` goes with it: it leaves the map however the
        // call ends (a panic or a cancellation included), after the answer is stored.
        let (shared, held) = match self.lost {
            Some(lost) => {
                let task = tokio::spawn(async move {
                    let _leave = leave;
                    future.await
                });
                let shared = async move { task.await.unwrap_or_else(|_| lost()) }
                    .boxed()
                    .shared();
                (shared.clone(), Held::Spawned(number, shared))
            }
            None => {
                let shared = async move {
                    let _leave = leave;
                    future.await
                }
                .boxed()
                .shared();
                let Some(weak) = shared.downgrade() else {
                    // Not yet polled, so it cannot have finished: never here.
                    return Joined::Call {
                        call: shared,
                        started: true,
                    };
                };
                (shared, Held::Attached(number, weak))
            }
        };
        calls.by_key.insert(key.clone(), held);
        Joined::Call {
            call: shared,
            started: true,
        }
    }
}

/// Removes a key's call from the map when dropped (unless a newer call took its place).
struct Leave<K: Hash + Eq, T: Clone> {
    calls: Arc<Mutex<Calls<K, T>>>,
    key: K,
    number: u64,
}

impl<K: Hash + Eq, T: Clone> Drop for Leave<K, T> {
    fn drop(&mut self) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if calls
            .by_key
            .get(&self.key)
            .is_some_and(|held| held.number() == self.number)
        {
            calls.by_key.remove(&self.key);
        }
    }
}

/// One call in progress at a time: [`Flights`] with a single key.
pub(crate) struct Flight<T: Clone>(Flights<(), T>);

impl<T: Clone + Send + Sync + 'static> Flight<T> {
    /// A spawned call; `lost` answers for a call whose task failed.
    pub(crate) fn new(lost: fn() -> T) -> Flight<T> {
        Flight(Flights::new(lost))
    }

    /// An attached call: run by its callers, cancelled when the last one goes away.
    pub(crate) fn attached() -> Flight<T> {
        Flight(Flights::attached())
    }

    /// [`Flights::join_or_start`] for the one key.
    pub(crate) fn join_or_start<R, F>(
        &self,
        ready: impl FnOnce() -> Option<R>,
        call: impl FnOnce() -> F,
    ) -> Joined<T, R>
    where
        F: Future<Output = T> + Send + 'static,
    {
        self.0.join_or_start(&(), ready, call)
    }

    /// Starts `call` unless one is in progress; nobody waits for it (so it should be a
    /// spawned flight's: an attached call nobody awaits never runs).
    pub(crate) fn start<F>(&self, call: impl FnOnce() -> F)
    where
        F: Future<Output = T> + Send + 'static,
    {
        drop(self.join_or_start(|| None::<()>, call));
    }

    /// The call's answer: `ready`'s, or that of the call joined or started.
    pub(crate) async fn run<F>(
        &self,
        ready: impl FnOnce() -> Option<T>,
        call: impl FnOnce() -> F,
    ) -> T
    where
        F: Future<Output = T> + Send + 'static,
    {
        match self.join_or_start(ready, call) {
            Joined::Ready(answer) => answer,
            Joined::Call { call, .. } => call.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn flights() -> Arc<Flights<&'static str, Result<u32, &'static str>>> {
        Arc::new(Flights::new(|| Err("lost")))
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_call() {
        let flights = flights();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut waiting = Vec::new();
        for _ in 0..100 {
            let calls = calls.clone();
            let joined = flights.join_or_start(
                &"k",
                || None::<()>,
                move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(7)
                },
            );
            let Joined::Call { call, started } = joined else {
                panic!("nothing was ready");
            };
            waiting.push((call, started));
        }
        assert_eq!(waiting.iter().filter(|(_, started)| *started).count(), 1);
        for (call, _) in waiting {
            assert_eq!(call.await, Ok(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The call left the map when it ended: the next caller starts a new one.
        let again = flights.join_or_start(&"k", || None::<()>, || async { Ok(8) });
        assert!(matches!(again, Joined::Call { started: true, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn the_starter_going_away_does_not_cancel_the_call() {
        let flights = flights();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = flights.join_or_start(
            &"k",
            || None::<()>,
            || async move {
                let _ = released.await;
                Ok(1)
            },
        );
        let second = flights.join_or_start(&"k", || None::<()>, || async { Ok(2) });
        drop(first);
        let _ = release.send(());
        let Joined::Call { call, started } = second else {
            panic!("nothing was ready");
        };
        assert!(!started);
        assert_eq!(call.await, Ok(1));
    }

    #[tokio::test(start_paused = true)]
    async fn ready_answers_only_when_no_call_is_in_progress() {
        let flights = flights();
        let ready = flights.join_or_start(&"k", || Some("stored"), || async { Ok(1) });
        assert!(matches!(ready, Joined::Ready("stored")));
        let _running = flights.join_or_start(
            &"k",
            || None::<()>,
            std::future::pending::<Result<u32, &str>>,
        );
        let joined = flights.join_or_start(&"k", || Some("stored"), || async { Ok(1) });
        assert!(matches!(joined, Joined::Call { started: false, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_call_answers_lost_and_leaves() {
        let flights = flights();
        let joined = flights.join_or_start(&"k", || None::<()>, || async { panic!("boom") });
        let Joined::Call { call, .. } = joined else {
            panic!("nothing was ready");
        };
        assert_eq!(call.await, Err("lost"));
        let again = flights.join_or_start(&"k", || None::<()>, || async { Ok(3) });
        assert!(matches!(again, Joined::Call { started: true, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attached_call_is_shared_and_runs_in_its_callers() {
        let flights = Arc::new(Flights::<&str, u32>::attached());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut waiting = Vec::new();
        for _ in 0..10 {
            let calls = calls.clone();
            let Joined::Call { call, started } = flights.join_or_start(
                &"k",
                || None::<()>,
                move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                },
            ) else {
                panic!("nothing was ready");
            };
            waiting.push((call, started));
        }
        assert_eq!(waiting.iter().filter(|(_, started)| *started).count(), 1);
        // Not spawned: nothing runs until a caller polls it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        for (call, _) in waiting {
            assert_eq!(call.await, 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let again = flights.join_or_start(&"k", || None::<()>, || async { 8 });
        assert!(matches!(again, Joined::Call { started: true, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attached_call_ends_with_its_last_caller() {
        let flights = Arc::new(Flights::<&str, u32>::attached());
        let (_release, released) = tokio::sync::oneshot::channel::<()>();
        let (dropped, was_dropped) = tokio::sync::oneshot::channel::<()>();
        struct OnDrop(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let Joined::Call { call, .. } = flights.join_or_start(
            &"k",
            || None::<()>,
            move || async move {
                let _on_drop = OnDrop(Some(dropped));
                let _ = released.await;
                1
            },
        ) else {
            panic!("nothing was ready");
        };
        // The caller gives up (its deadline): the call is cancelled, not left running...
        assert!(
            tokio::time::timeout(Duration::from_millis(10), call.clone())
                .await
                .is_err()
        );
        let second = flights.join_or_start(&"k", || None::<()>, || async { 2 });
        assert!(matches!(second, Joined::Call { started: false, .. }));
        drop(second);
        drop(call);
        assert!(was_dropped.await.is_ok());
        // ...and the next caller starts a new one.
        let Joined::Call { call, started } =
            flights.join_or_start(&"k", || None::<()>, || async { 3 })
        else {
            panic!("nothing was ready");
        };
        assert!(started);
        assert_eq!(call.await, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attached_call_goes_on_for_the_callers_left() {
        let flights = Arc::new(Flights::<&str, u32>::attached());
        let first = flights.join_or_start(
            &"k",
            || None::<()>,
            || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                1
            },
        );
        let Joined::Call { call, started } =
            flights.join_or_start(&"k", || None::<()>, || async { 2 })
        else {
            panic!("nothing was ready");
        };
        assert!(!started);
        drop(first);
        assert_eq!(call.await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flight_runs_one_call_or_answers_ready() {
        let flight = Arc::new(Flight::<u32>::attached());
        assert_eq!(flight.run(|| Some(5), || async { 6 }).await, 5);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut runs = Vec::new();
        for _ in 0..3 {
            let flight = flight.clone();
            let calls = calls.clone();
            runs.push(tokio::spawn(async move {
                flight
                    .run(
                        || None,
                        move || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            6
                        },
                    )
                    .await
            }));
        }
        for run in runs {
            assert_eq!(run.await.ok(), Some(6));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let spawned = Flight::<u32>::new(|| 0);
        assert_eq!(spawned.run(|| None, || async { 9 }).await, 9);
    }

    #[tokio::test(start_paused = true)]
    async fn start_runs_one_background_call_at_a_time() {
        let flight = Flight::<()>::new(|| ());
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let calls = calls.clone();
            flight.start(move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // It ended and left: the next start runs again.
        let again = calls.clone();
        flight.start(move || async move {
            again.fetch_add(1, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
