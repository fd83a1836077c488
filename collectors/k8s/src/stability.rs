//! Restarts that stopped. A pod whose restarted containers have all run for
//! `stable_after` without restarting again is reported once, as
//! `dev.tidewatch.k8s.container.stable` (naming the container that
//! restarted last): the event correlate closes crash
//! loops and OOM cascades with ("no restarts for the rule's window").
//! Nothing in the API announces it (a pod that stopped crashing simply
//! stops changing), so it needs a clock: [`Stability::due`] runs on a
//! timer. Pure: snapshots and the time in, changes out.

use std::collections::BTreeMap;

use chrono::{TimeZone as _, Utc};
use tidewatch_runtime::topology::types;

use crate::change::{Change, Payload};
use crate::pod::{Current, PodSnapshot};

/// One restarted container being watched for stability.
#[derive(Debug, Clone, PartialEq)]
struct Watch {
    restart_count: i32,
    /// When its last termination finished (ns).
    since_ns: i64,
    reported: bool,
}

/// Restarted containers of this node's pods.
#[derive(Debug, Clone, Default)]
pub struct Stability {
    stable_after_ns: i64,
    watching: BTreeMap<(String, String), Watch>,
    /// The newest snapshot of each pod with a watched container.
    pods: BTreeMap<String, PodSnapshot>,
}

impl Stability {
    pub fn new(stable_after: std::time::Duration) -> Stability {
        Stability {
            stable_after_ns: i64::try_from(stable_after.as_nanos()).unwrap_or(i64::MAX),
            ..Stability::default()
        }
    }

    /// A pod as listed or watched. `baseline`: seen in the first list after
    /// start, where a container stable for long is not news.
    pub fn observe(&mut self, pod: &PodSnapshot, baseline: bool, now_ns: i64) {
        let mut watched = false;
        for c in &pod.containers {
            let key = (pod.uid.clone(), c.name.clone());
            let Some(since_ns) = c
                .last
                .as_ref()
                .map(|t| t.finished_ns)
                .filter(|_| c.restart_count > 0)
            else {
                self.watching.remove(&key);
                continue;
            };
            watched = true;
            let current = self.watching.get(&key);
            if current.is_none_or(|w| w.restart_count != c.restart_count) {
                let long_ago = now_ns.saturating_sub(since_ns) >= self.stable_after_ns;
                self.watching.insert(
                    key,
                    Watch {
                        restart_count: c.restart_count,
                        since_ns,
                        reported: baseline && long_ago,
                    },
                );
            }
        }
        if watched {
            self.pods.insert(pod.uid.clone(), pod.clone());
        } else {
            self.pods.remove(&pod.uid);
        }
    }

    /// The pod is gone.
    pub fn removed(&mut self, uid: &str) {
        self.pods.remove(uid);
        self.watching.retain(|(u, _), _| u != uid);
    }

    /// Pods whose restarted containers have all run without a restart for
    /// `stable_after` since their last one: one change per pod (a sidecar
    /// calming down says nothing while the main container still crashes),
    /// once per set of restart counts. It names the container that
    /// restarted last.
    pub fn due(&mut self, now_ns: i64) -> Vec<Change> {
        let mut out = Vec::new();
        for (uid, pod) in &self.pods {
            let watches: Vec<(&String, &Watch)> = self
                .watching
                .iter()
                .filter(|((u, _), _)| u == uid)
                .map(|((_, name), w)| (name, w))
                .collect();
            let pending: Vec<&(&String, &Watch)> =
                watches.iter().filter(|(_, w)| !w.reported).collect();
            if pending.is_empty() {
                continue;
            }
            let stable = |(name, w): &&(&String, &Watch)| {
                now_ns.saturating_sub(w.since_ns) >= self.stable_after_ns
                    && pod.containers.iter().any(|c| {
                        &c.name == *name
                            && c.state == Current::Running
                            && c.restart_count == w.restart_count
                    })
            };
            if !pending.iter().all(stable) {
                continue;
            }
            let Some((name, _)) = pending.iter().max_by_key(|(_, w)| w.since_ns) else {
                continue;
            };
            let Some(c) = pod.containers.iter().find(|c| &c.name == *name) else {
                continue;
            };
            let counts: Vec<String> = pending
                .iter()
                .map(|(n, w)| format!("{n}={}", w.restart_count))
                .collect();
            let mut parts: Vec<&str> = vec![uid, "stable"];
            parts.extend(counts.iter().map(String::as_str));
            out.push(Change::new(
                types::CONTAINER_STABLE,
                pod.subject(),
                &parts,
                Some(Utc.timestamp_nanos(now_ns)),
                Payload::Container(pod.container_payload(c, None)),
            ));
        }
        for change in &out {
            let Payload::Container(c) = &change.payload else {
                continue;
            };
            for ((u, _), w) in self.watching.iter_mut() {
                if *u == c.pod_uid {
                    w.reported = true;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::{ContainerSnapshot, Termination};

    const MIN: i64 = 60_000_000_000;

    fn pod(restarts: i32, finished_min: i64, state: Current) -> PodSnapshot {
        PodSnapshot {
            uid: "u1".into(),
            namespace: "shop".into(),
            name: "cart-1".into(),
            node: "n1".into(),
            containers: vec![ContainerSnapshot {
                name: "cart".into(),
                restart_count: restarts,
                state,
                last: (restarts > 0).then(|| Termination {
                    reason: "OOMKilled".into(),
                    exit_code: 137,
                    finished_ns: finished_min * MIN,
                    ..Termination::default()
                }),
                ..ContainerSnapshot::default()
            }],
            ..PodSnapshot::default()
        }
    }

    #[test]
    fn a_container_quiet_for_the_window_is_reported_once() {
        let mut s = Stability::new(std::time::Duration::from_secs(600));
        s.observe(&pod(3, 100, Current::Running), false, 100 * MIN);
        assert!(s.due(105 * MIN).is_empty(), "not yet");
        let due = s.due(110 * MIN);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].ty, types::CONTAINER_STABLE);
        assert_eq!(due[0].subject, "pod/shop/cart-1");
        let Payload::Container(c) = &due[0].payload else {
            panic!("container payload")
        };
        assert_eq!((c.container.as_str(), c.restart_count), ("cart", 3));
        assert!(s.due(200 * MIN).is_empty(), "once");
        // A relist of the same state changes nothing; the same id anyway.
        s.observe(&pod(3, 100, Current::Running), false, 201 * MIN);
        assert!(s.due(202 * MIN).is_empty());
    }

    #[test]
    fn another_restart_restarts_the_clock_and_a_waiting_container_is_not_stable() {
        let mut s = Stability::new(std::time::Duration::from_secs(600));
        s.observe(&pod(3, 100, Current::Running), false, 100 * MIN);
        s.observe(&pod(4, 108, Current::Running), false, 108 * MIN);
        assert!(
            s.due(112 * MIN).is_empty(),
            "10 min from the 4th restart, not the 3rd"
        );
        s.observe(
            &pod(
                4,
                108,
                Current::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: String::new(),
                },
            ),
            false,
            113 * MIN,
        );
        assert!(s.due(130 * MIN).is_empty(), "backing off is not running");
        s.observe(&pod(4, 108, Current::Running), false, 131 * MIN);
        assert_eq!(s.due(131 * MIN).len(), 1);
    }

    #[test]
    fn the_first_list_after_start_does_not_replay_old_stability() {
        let mut s = Stability::new(std::time::Duration::from_secs(600));
        s.observe(&pod(7, 10, Current::Running), true, 500 * MIN);
        assert!(
            s.due(501 * MIN).is_empty(),
            "stable long before this collector started"
        );
        // But one still inside its window when the collector starts is reported.
        let mut s = Stability::new(std::time::Duration::from_secs(600));
        s.observe(&pod(2, 495, Current::Running), true, 500 * MIN);
        assert_eq!(s.due(506 * MIN).len(), 1);
        s.removed("u1");
        assert!(s.pods.is_empty() && s.watching.is_empty());
    }

    #[test]
    fn a_calm_sidecar_does_not_make_a_crashing_pod_stable() {
        let mut s = Stability::new(std::time::Duration::from_secs(600));
        let mut p = pod(3, 100, Current::Running);
        let mut sidecar = p.containers[0].clone();
        sidecar.name = "proxy".into();
        sidecar.restart_count = 1;
        sidecar.last = Some(Termination {
            finished_ns: 50 * MIN,
            ..Termination::default()
        });
        p.containers.push(sidecar);
        s.observe(&p, false, 100 * MIN);
        assert!(
            s.due(105 * MIN).is_empty(),
            "the sidecar is calm, the main container is not yet"
        );
        // The main container restarts again: the pod is not stable.
        let mut again = p.clone();
        again.containers[0].restart_count = 4;
        again.containers[0].last = Some(Termination {
            finished_ns: 108 * MIN,
            ..Termination::default()
        });
        s.observe(&again, false, 108 * MIN);
        assert!(s.due(115 * MIN).is_empty());
        let due = s.due(118 * MIN);
        assert_eq!(due.len(), 1, "both calm: one event for the pod");
        let Payload::Container(c) = &due[0].payload else {
            panic!("payload")
        };
        assert_eq!(
            c.container, "cart",
            "naming the container that restarted last"
        );
        assert!(s.due(200 * MIN).is_empty());
    }
}
