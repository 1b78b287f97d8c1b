//! [`Gate`]: whether the proxy may call Graph at all right now.
//!
//! One gate for the whole proxy, shared by every key, because Graph throttles per app and
//! tenant, not per session. It closes in two cases:
//!
//! - **throttle**: Graph answered 429 (or 503 with `Retry-After`): closed until the moment
//!   Graph named;
//! - **circuit**: `graph.circuit_failures` consecutive failures (5xx, timeouts, connection
//!   errors): closed for `graph.circuit_cooldown`.
//!
//! When the closed period ends, exactly one call is let through as a probe; the others are
//! refused until the probe reports. A success opens the gate; a failure closes it again.
//! While it is closed, the cache serves stale entries and uncached keys get a 503 with
//! `Retry-After` set to the time left.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Why the gate refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Graph told us to wait.
    Throttled { retry_after: Duration },
    /// Graph kept failing.
    CircuitOpen { retry_after: Duration },
}

/// What a finished Graph call tells the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Graph answered (2xx, 404, 403, ...): it is up.
    Answered,
    /// Graph said to wait this long (429, or 503 with `Retry-After`).
    Throttled(Duration),
    /// 5xx without `Retry-After`, timeout, connection error.
    Failed,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Open {
        consecutive_failures: u32,
    },
    Closed {
        until: Instant,
        throttled: bool,
    },
    /// One probe call is out since `since`.
    Probing {
        since: Instant,
        throttled: bool,
    },
}

#[derive(Debug)]
pub struct Gate {
    state: Mutex<State>,
    /// Consecutive failures that open the circuit; 0 = never.
    failure_threshold: u32,
    cooldown: Duration,
    /// A probe that has not reported after this long is presumed lost.
    probe_timeout: Duration,
    /// Bumped whenever a report closes (or extends) the gate, so the closure can be
    /// published to other replicas at once.
    closures: tokio::sync::watch::Sender<u64>,
    /// When and why the gate last closed, for the status page (written under `state`).
    last_closure: Mutex<Option<(Instant, String)>>,
}

/// The gate as the status page shows it, read under one lock.
#[derive(Debug, Clone, PartialEq)]
pub struct GateView {
    /// As [`Gate::describe`].
    pub state: &'static str,
    /// Time left while closed.
    pub closed_for: Option<Duration>,
    /// Whether a throttle (not the circuit) closed it.
    pub throttled: bool,
    /// How long ago and why it last closed.
    pub last_closure: Option<(Duration, String)>,
}

impl Gate {
    pub fn new(failure_threshold: u32, cooldown: Duration, probe_timeout: Duration) -> Gate {
        Gate {
            state: Mutex::new(State::Open {
                consecutive_failures: 0,
            }),
            failure_threshold,
            cooldown,
            probe_timeout,
            closures: tokio::sync::watch::Sender::new(0),
            last_closure: Mutex::new(None),
        }
    }

    /// Changes whenever a Graph answer closes the gate here (not when another replica's
    /// closure is applied with [`Gate::close_for`]).
    pub fn closures(&self) -> tokio::sync::watch::Receiver<u64> {
        self.closures.subscribe()
    }

    fn refusal(throttled: bool, retry_after: Duration) -> Closed {
        if throttled {
            Closed::Throttled { retry_after }
        } else {
            Closed::CircuitOpen { retry_after }
        }
    }

    /// May a call go to Graph now?
    pub fn admit(&self, now: Instant) -> Result<(), Closed> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            State::Open { .. } => Ok(()),
            State::Closed { until, throttled } if now < until => {
                Err(Self::refusal(throttled, until - now))
            }
            State::Closed { throttled, .. } => {
                *state = State::Probing {
                    since: now,
                    throttled,
                };
                Ok(())
            }
            State::Probing { since, throttled } if now < since + self.probe_timeout => {
                // Until the probe reports, others wait about a second.
                Err(Self::refusal(throttled, Duration::from_secs(1)))
            }
            State::Probing { throttled, .. } => {
                *state = State::Probing {
                    since: now,
                    throttled,
                };
                Ok(())
            }
        }
    }

    /// Records how a call that [`Gate::admit`] let through ended.
    pub fn report(&self, now: Instant, report: Report) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = match (report, *state) {
            (Report::Throttled(wait), State::Closed { until, .. }) => State::Closed {
                until: until.max(now + wait),
                throttled: true,
            },
            (Report::Throttled(wait), _) => State::Closed {
                until: now + wait,
                throttled: true,
            },
            (Report::Answered, State::Closed { .. }) => return, // a straggler from before closing
            (Report::Answered, _) => State::Open {
                consecutive_failures: 0,
            },
            (
                Report::Failed,
                State::Open {
                    consecutive_failures,
                },
            ) => {
                let failures = consecutive_failures + 1;
                if self.failure_threshold > 0 && failures >= self.failure_threshold {
                    tracing::warn!(
                        failures,
                        cooldown = %crate::telemetry::Wait(self.cooldown),
                        "Graph keeps failing: circuit open"
                    );
                    State::Closed {
                        until: now + self.cooldown,
                        throttled: false,
                    }
                } else {
                    State::Open {
                        consecutive_failures: failures,
                    }
                }
            }
            (Report::Failed, State::Probing { .. }) => State::Closed {
                until: now + self.cooldown,
                throttled: false,
            },
            (Report::Failed, State::Closed { .. }) => return,
        };
        let closed = matches!(next, State::Closed { .. });
        if closed {
            let why = match report {
                Report::Throttled(wait) => format!(
                    "Graph throttled (429, or 503 with Retry-After) and asked to wait {}",
                    crate::telemetry::Wait(wait)
                ),
                _ => format!(
                    "Graph kept failing (5xx, timeouts, connection errors): circuit open for {}",
                    crate::telemetry::Wait(self.cooldown)
                ),
            };
            self.note_closure(now, why);
        }
        *state = next;
        drop(state);
        if closed {
            self.closures.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Closes the gate for `wait` because another replica saw Graph throttle or fail
    /// (through the shared tier). A probe in flight here is left to report.
    pub fn close_for(&self, now: Instant, wait: Duration, throttled: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, State::Probing { .. }) {
            self.note_closure(
                now,
                format!(
                    "another replica saw Graph {} (shared tier): closed for {}",
                    if throttled {
                        "throttle"
                    } else {
                        "keep failing"
                    },
                    crate::telemetry::Wait(wait)
                ),
            );
        }
        *state = match *state {
            State::Open { .. } => State::Closed {
                until: now + wait,
                throttled,
            },
            State::Closed {
                until,
                throttled: was,
            } => State::Closed {
                until: until.max(now + wait),
                throttled: was || throttled,
            },
            probing @ State::Probing { .. } => probing,
        };
    }

    fn note_closure(&self, now: Instant, why: String) {
        *self.last_closure.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, why));
    }

    /// State, time left and the last closure, consistent with each other.
    pub fn view(&self, now: Instant) -> GateView {
        let state = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        let last_closure = self
            .last_closure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(at, why)| (now.saturating_duration_since(*at), why.clone()));
        let (name, closed_for, throttled) = match state {
            State::Open { .. } => ("open", None, false),
            State::Probing { throttled, .. } => ("probing", None, throttled),
            State::Closed { until, throttled } if now >= until => ("probing", None, throttled),
            State::Closed { until, throttled } => (
                if throttled {
                    "throttled"
                } else {
                    "circuit_open"
                },
                Some(until - now),
                throttled,
            ),
        };
        GateView {
            state: name,
            closed_for,
            throttled,
            last_closure,
        }
    }

    /// Time left and whether throttled, while the gate is closed.
    pub fn closed_for(&self, now: Instant) -> Option<(Duration, bool)> {
        match *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Closed { until, throttled } if now < until => Some((until - now, throttled)),
            _ => None,
        }
    }

    /// `open`, `probing`, `throttled` or `circuit_open`.
    pub fn describe(&self, now: Instant) -> &'static str {
        match *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Open { .. } => "open",
            State::Probing { .. } => "probing",
            State::Closed { until, .. } if now >= until => "probing",
            State::Closed {
                throttled: true, ..
            } => "throttled",
            State::Closed {
                throttled: false, ..
            } => "circuit_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(3, Duration::from_secs(30), Duration::from_secs(10))
    }

    #[tokio::test(start_paused = true)]
    async fn the_view_says_when_and_why_the_gate_closed() {
        let g = gate();
        let t0 = Instant::now();
        assert_eq!(g.view(t0).state, "open");
        assert_eq!(g.view(t0).last_closure, None);
        g.report(t0, Report::Throttled(Duration::from_secs(60)));
        let v = g.view(t0 + Duration::from_secs(10));
        assert_eq!(v.state, "throttled");
        assert_eq!(v.closed_for, Some(Duration::from_secs(50)));
        let (ago, why) = v.last_closure.unwrap();
        assert_eq!(ago, Duration::from_secs(10));
        assert!(why.contains("asked to wait 60s"), "{why}");
        let later = g.view(t0 + Duration::from_secs(61));
        assert_eq!((later.state, later.closed_for), ("probing", None));
        let g = gate();
        for _ in 0..3 {
            g.report(t0, Report::Failed);
        }
        let v = g.view(t0);
        assert_eq!(v.state, "circuit_open");
        assert!(v.last_closure.unwrap().1.contains("circuit open for 30s"));
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_closes_until_retry_after_then_one_probe() {
        let g = gate();
        let t0 = Instant::now();
        assert!(g.admit(t0).is_ok());
        g.report(t0, Report::Throttled(Duration::from_secs(30)));
        assert_eq!(
            g.admit(t0 + Duration::from_secs(10)),
            Err(Closed::Throttled {
                retry_after: Duration::from_secs(20)
            })
        );
        let later = t0 + Duration::from_secs(30);
        assert!(g.admit(later).is_ok(), "the probe");
        assert!(g.admit(later).is_err(), "only one probe");
        g.report(later, Report::Answered);
        assert!(g.admit(later).is_ok());
        assert!(g.admit(later).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_opens_after_consecutive_failures() {
        let g = gate();
        let t0 = Instant::now();
        g.report(t0, Report::Failed);
        g.report(t0, Report::Failed);
        g.report(t0, Report::Answered);
        g.report(t0, Report::Failed);
        g.report(t0, Report::Failed);
        assert!(g.admit(t0).is_ok(), "two failures in a row are not enough");
        g.report(t0, Report::Failed);
        assert!(matches!(g.admit(t0), Err(Closed::CircuitOpen { .. })));
        assert_eq!(g.describe(t0), "circuit_open");
        let after = t0 + Duration::from_secs(30);
        assert!(g.admit(after).is_ok());
        g.report(after, Report::Failed);
        assert!(
            g.admit(after + Duration::from_secs(29)).is_err(),
            "a failed probe closes it again"
        );
        let later = after + Duration::from_secs(30);
        assert!(g.admit(later).is_ok());
        g.report(later, Report::Answered);
        assert_eq!(g.describe(later), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_is_replaced() {
        let g = gate();
        let t0 = Instant::now();
        g.report(t0, Report::Throttled(Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert!(g.admit(t1).is_ok());
        assert!(g.admit(t1 + Duration::from_secs(9)).is_err());
        assert!(g.admit(t1 + Duration::from_secs(10)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_threshold_never_opens_the_circuit() {
        let g = Gate::new(0, Duration::from_secs(30), Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..100 {
            g.report(t0, Report::Failed);
        }
        assert!(g.admit(t0).is_ok());
    }
}
