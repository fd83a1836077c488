//! A circuit breaker per sink: after `failures` consecutive failures the
//! sink is *open* for `open_for` and calls fail fast (the insight is naked
//! and comes back later) instead of tying up handlers on a dead endpoint;
//! then one trial call is let through (*half-open*): success closes the
//! breaker, failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    open_for: Duration,
    inner: Mutex<(State, u32)>,
}

/// Whether a call may go ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Permit {
    Go,
    /// Open: try again after this long.
    Wait(Duration),
}

impl Breaker {
    pub fn new(failures: u32, open_for: Duration) -> Breaker {
        Breaker {
            failures: failures.max(1),
            open_for,
            inner: Mutex::new((State::Closed, 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (State, u32)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub fn state(&self) -> State {
        self.lock().0
    }

    pub fn permit(&self, now: Instant) -> Permit {
        let mut inner = self.lock();
        match inner.0 {
            State::Closed => Permit::Go,
            State::Open { until } if now >= until => {
                inner.0 = State::HalfOpen;
                Permit::Go
            }
            State::Open { until } => Permit::Wait(until - now),
            // One trial at a time: the others wait for its outcome.
            State::HalfOpen => Permit::Wait(Duration::from_millis(200)),
        }
    }

    pub fn success(&self) {
        *self.lock() = (State::Closed, 0);
    }

    /// Record a failure; true when this opened the breaker.
    pub fn failure(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        inner.1 += 1;
        let open = matches!(inner.0, State::HalfOpen) || inner.1 >= self.failures;
        if open && !matches!(inner.0, State::Open { .. }) {
            inner.0 = State::Open {
                until: now + self.open_for,
            };
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_half_opens() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(b.permit(t), Permit::Go);
        assert!(!b.failure(t));
        b.success();
        assert!(!b.failure(t));
        assert!(!b.failure(t));
        assert!(b.failure(t), "third consecutive failure opens it");
        assert_eq!(
            b.permit(t + Duration::from_secs(4)),
            Permit::Wait(Duration::from_secs(6))
        );
        assert_eq!(
            b.permit(t + Duration::from_secs(10)),
            Permit::Go,
            "half-open trial"
        );
        assert_eq!(b.state(), State::HalfOpen);
        assert!(
            matches!(b.permit(t + Duration::from_secs(10)), Permit::Wait(_)),
            "one trial at a time"
        );
        assert!(
            b.failure(t + Duration::from_secs(10)),
            "a failed trial opens it again"
        );
        assert!(matches!(b.state(), State::Open { .. }));
        assert_eq!(b.permit(t + Duration::from_secs(20)), Permit::Go);
        b.success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.permit(t + Duration::from_secs(20)), Permit::Go);
    }
}
