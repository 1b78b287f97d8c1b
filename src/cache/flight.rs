//! [`Flights`]: single flight, one call in progress per key. The first caller for a key
//! spawns the call as its own task and publishes a shared future; everyone else for that
//! key awaits the same future. Because the call is a spawned task, the caller that
//! started it may go away (a client disconnects) without cancelling it.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};

/// A call in progress, as its callers await it.
pub(super) type Call<T> = Shared<BoxFuture<'static, T>>;

/// The calls in progress, one per key; a call's task removes it when it ends.
pub(super) struct Flights<K, T: Clone> {
    calls: Arc<Mutex<HashMap<K, Call<T>>>>,
    /// What a call whose task failed (panicked, or was cancelled at shutdown) answers.
    lost: fn() -> T,
}

/// What [`Flights::join_or_start`] found.
pub(super) enum Joined<T: Clone, R> {
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
    pub(super) fn new(lost: fn() -> T) -> Flights<K, T> {
        Flights {
            calls: Arc::new(Mutex::new(HashMap::new())),
            lost,
        }
    }

    /// Joins the call in progress for `key`, or, when there is none, answers with `ready`
    /// (if it has an answer) or starts `call` as its own task. `ready` runs while no call
    /// can end: a call leaves the map only after its answer is stored, so a caller either
    /// finds the answer or starts a new call, never neither.
    pub(super) fn join_or_start<R, F>(
        &self,
        key: &K,
        ready: impl FnOnce() -> Option<R>,
        call: impl FnOnce() -> F,
    ) -> Joined<T, R>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(call) = calls.get(key) {
            return Joined::Call {
                call: call.clone(),
                started: false,
            };
        }
        if let Some(answer) = ready() {
            return Joined::Ready(answer);
        }
        let future = call();
        let leave = Leave {
            calls: self.calls.clone(),
            key: key.clone(),
        };
        let task = tokio::spawn(async move {
            // Leaves the map however the call ends (a panic included), after the answer
            // is stored (or failed).
            let _leave = leave;
            future.await
        });
        let lost = self.lost;
        let shared = async move { task.await.unwrap_or_else(|_| lost()) }
            .boxed()
            .shared();
        calls.insert(key.clone(), shared.clone());
        Joined::Call {
            call: shared,
            started: true,
        }
    }

    /// Whether a call for `key` is in progress (a new request would join it).
    pub(super) fn in_progress(&self, key: &K) -> bool {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }
}

/// Removes a key's call from the map when dropped.
struct Leave<K: Hash + Eq, T: Clone> {
    calls: Arc<Mutex<HashMap<K, Call<T>>>>,
    key: K,
}

impl<K: Hash + Eq, T: Clone> Drop for Leave<K, T> {
    fn drop(&mut self) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
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
}
