//! Leader election on a `coordination.k8s.io/v1` Lease, so cluster-scoped
//! objects are watched by one replica of the DaemonSet.
//!
//! [`step`] is the pure state machine; [`Elector`] does the API calls. Like
//! client-go, expiry is judged by when *this* replica last saw the lease
//! record change (not by the holder's clock): a lease whose holder and
//! renew time have not moved for `leaseDurationSeconds` is up for grabs.
//! Writes use the lease's resourceVersion, so two replicas racing for it
//! cannot both win (the loser gets 409 Conflict). A leader that cannot
//! renew within the renew deadline steps down before its lease expires;
//! on shutdown it releases the lease so the next replica takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

/// The parts of a Lease the election reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LeaseView {
    pub holder: String,
    pub duration: Duration,
    /// Renew time as sent (compared, never interpreted as a clock).
    pub renew_time: String,
    pub transitions: i32,
    pub resource_version: String,
    /// Kept as is when renewing.
    pub acquire_time: Option<MicroTime>,
}

impl LeaseView {
    pub fn from_lease(lease: &Lease) -> LeaseView {
        let spec = lease.spec.as_ref();
        LeaseView {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default(),
            duration: Duration::from_secs(
                spec.and_then(|s| s.lease_duration_seconds)
                    .and_then(|d| u64::try_from(d).ok())
                    .unwrap_or(0),
            ),
            renew_time: spec
                .and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
            resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
            acquire_time: spec.and_then(|s| s.acquire_time.clone()),
        }
    }
}

/// A lease record as last seen, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub holder: String,
    pub renew_time: String,
    pub duration: Duration,
    pub at: Instant,
}

/// Where this replica stands.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Follower { observed: Option<Observed> },
    Leader { renewed_at: Instant },
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The lease as read now (None: it does not exist).
    Read {
        lease: Option<LeaseView>,
        now: Instant,
    },
    /// The create/take/renew write succeeded.
    Written { now: Instant },
    /// A read or write failed (conflict, API unreachable).
    Failed { now: Instant },
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Create,
    /// Take the lease over from an expired (or absent) holder.
    Take {
        transitions: i32,
        resource_version: String,
    },
    Renew {
        transitions: i32,
        resource_version: String,
        acquire_time: Option<MicroTime>,
    },
    Wait,
}

/// Election settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// Pause between attempts.
    pub retry_period: Duration,
}

/// The election state machine.
pub fn step(state: State, identity: &str, timing: &Timing, input: Input) -> (State, Action) {
    match input {
        Input::Read { lease: None, .. } => (state, Action::Create),
        Input::Read {
            lease: Some(lease),
            now,
        } => {
            if lease.holder == identity {
                return (
                    state,
                    Action::Renew {
                        transitions: lease.transitions,
                        resource_version: lease.resource_version,
                        acquire_time: lease.acquire_time,
                    },
                );
            }
            if lease.holder.is_empty() {
                return (
                    state,
                    Action::Take {
                        transitions: lease.transitions,
                        resource_version: lease.resource_version,
                    },
                );
            }
            let previous = match &state {
                State::Follower { observed } => observed.clone(),
                State::Leader { .. } => None,
            };
            let observed = match previous {
                Some(o) if o.holder == lease.holder && o.renew_time == lease.renew_time => o,
                _ => Observed {
                    holder: lease.holder.clone(),
                    renew_time: lease.renew_time.clone(),
                    duration: lease.duration,
                    at: now,
                },
            };
            let expired = now.duration_since(observed.at) > observed.duration;
            let action = if expired {
                Action::Take {
                    transitions: lease.transitions,
                    resource_version: lease.resource_version,
                }
            } else {
                Action::Wait
            };
            (
                State::Follower {
                    observed: Some(observed),
                },
                action,
            )
        }
        Input::Written { now } => (State::Leader { renewed_at: now }, Action::Wait),
        Input::Failed { now } => match state {
            State::Leader { renewed_at }
                if now.duration_since(renewed_at) > timing.renew_deadline =>
            {
                (State::Follower { observed: None }, Action::Wait)
            }
            other => (other, Action::Wait),
        },
    }
}

/// Runs the election against the API server.
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
}

impl Elector {
    fn lease(&self, transitions: i32, resource_version: Option<String>, acquire: bool) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version,
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.timing.lease_duration.as_secs().max(1)).unwrap_or(15),
                ),
                acquire_time: acquire.then(|| now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// One round: read, decide, write. Returns the new state.
    pub async fn round(&self, state: State) -> State {
        let read = match self.api.get_opt(&self.name).await {
            Ok(lease) => Input::Read {
                lease: lease.as_ref().map(LeaseView::from_lease),
                now: Instant::now(),
            },
            Err(e) => {
                tracing::warn!(error = %e, lease = %self.name, "reading the leader lease failed");
                Input::Failed {
                    now: Instant::now(),
                }
            }
        };
        let (state, action) = step(state, &self.identity, &self.timing, read);
        let pp = PostParams::default();
        let result = match action {
            Action::Wait => return state,
            Action::Create => self
                .api
                .create(&pp, &self.lease(0, None, true))
                .await
                .map(|_| ()),
            Action::Take {
                transitions,
                resource_version,
            } => self
                .api
                .replace(
                    &self.name,
                    &pp,
                    &self.lease(transitions + 1, Some(resource_version), true),
                )
                .await
                .map(|_| ()),
            Action::Renew {
                transitions,
                resource_version,
                acquire_time,
            } => {
                let mut lease = self.lease(transitions, Some(resource_version), false);
                if let Some(spec) = lease.spec.as_mut() {
                    spec.acquire_time = acquire_time;
                }
                self.api.replace(&self.name, &pp, &lease).await.map(|_| ())
            }
        };
        let input = match result {
            Ok(()) => Input::Written {
                now: Instant::now(),
            },
            Err(e) => {
                tracing::debug!(error = %e, lease = %self.name, "lease write failed");
                Input::Failed {
                    now: Instant::now(),
                }
            }
        };
        step(state, &self.identity, &self.timing, input).0
    }

    /// Give the lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(current)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let view = LeaseView::from_lease(&current);
        if view.holder != self.identity {
            return;
        }
        let mut lease = self.lease(view.transitions, Some(view.resource_version), false);
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing the leader lease failed");
        }
    }

    /// Run until `stop` turns true, publishing leadership on `leader`.
    pub async fn run(self, leader: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut state = State::Follower { observed: None };
        loop {
            state = self.round(state).await;
            let leading = matches!(state, State::Leader { .. });
            leader.send_if_modified(|l| std::mem::replace(l, leading) != leading);
            let pause = if leading {
                self.timing.retry_period.min(self.timing.renew_deadline / 2)
            } else {
                self.timing.retry_period
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = tidewatch_runtime::collector::until(&mut stop, true) => break,
            }
        }
        let was_leading = *leader.borrow();
        leader.send_replace(false);
        if was_leading {
            self.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn held_by(holder: &str, renew: &str) -> Option<LeaseView> {
        Some(LeaseView {
            holder: holder.into(),
            duration: Duration::from_secs(15),
            renew_time: renew.into(),
            transitions: 3,
            resource_version: "7".into(),
            acquire_time: None,
        })
    }

    #[test]
    fn no_lease_is_created_and_a_write_makes_a_leader() {
        let t0 = Instant::now();
        let (s, a) = step(
            State::Follower { observed: None },
            "me",
            &timing(),
            Input::Read {
                lease: None,
                now: t0,
            },
        );
        assert_eq!(a, Action::Create);
        let (s, _) = step(s, "me", &timing(), Input::Written { now: t0 });
        assert_eq!(s, State::Leader { renewed_at: t0 });
        let (_, a) = step(
            s,
            "me",
            &timing(),
            Input::Read {
                lease: held_by("me", "a"),
                now: t0,
            },
        );
        assert!(matches!(a, Action::Renew { transitions: 3, .. }));
    }

    #[test]
    fn a_live_holder_is_respected_and_a_silent_one_replaced() {
        let t0 = Instant::now();
        let read = |lease, now| Input::Read { lease, now };
        let (s, a) = step(
            State::Follower { observed: None },
            "me",
            &timing(),
            read(held_by("other", "r1"), t0),
        );
        assert_eq!(a, Action::Wait);
        // The holder renews: the clock restarts.
        let (s, a) = step(
            s,
            "me",
            &timing(),
            read(held_by("other", "r2"), t0 + Duration::from_secs(14)),
        );
        assert_eq!(a, Action::Wait);
        let (s, a) = step(
            s,
            "me",
            &timing(),
            read(held_by("other", "r2"), t0 + Duration::from_secs(28)),
        );
        assert_eq!(a, Action::Wait, "14s since the last renew is within 15s");
        let (_, a) = step(
            s,
            "me",
            &timing(),
            read(held_by("other", "r2"), t0 + Duration::from_secs(30)),
        );
        assert_eq!(
            a,
            Action::Take {
                transitions: 3,
                resource_version: "7".into()
            }
        );
        // A released lease (no holder) is taken at once.
        let (_, a) = step(
            State::Follower { observed: None },
            "me",
            &timing(),
            read(held_by("", "r"), t0),
        );
        assert!(matches!(a, Action::Take { .. }));
    }

    #[test]
    fn a_leader_steps_down_when_it_cannot_renew_or_someone_else_holds_it() {
        let t0 = Instant::now();
        let leader = State::Leader { renewed_at: t0 };
        let (s, _) = step(
            leader.clone(),
            "me",
            &timing(),
            Input::Failed {
                now: t0 + Duration::from_secs(5),
            },
        );
        assert_eq!(s, leader, "still within the renew deadline");
        let (s, _) = step(
            s,
            "me",
            &timing(),
            Input::Failed {
                now: t0 + Duration::from_secs(11),
            },
        );
        assert!(matches!(s, State::Follower { .. }));
        let (s, a) = step(
            leader,
            "me",
            &timing(),
            Input::Read {
                lease: held_by("other", "x"),
                now: t0,
            },
        );
        assert!(matches!(s, State::Follower { .. }));
        assert_eq!(a, Action::Wait);
    }
}
