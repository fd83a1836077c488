//! Bad rollout: a Deployment starts a new ReplicaSet and, within `window`,
//! the new ReplicaSet's pods restart at least `min_restarts` times and more
//! often than the old ReplicaSet's pods did in the `window` before.
//!
//! State per Deployment (`<ns>/<name>`): the latest rollout and the recent
//! restarts of its pods, each tagged with its ReplicaSet. A pod's
//! ReplicaSet comes from enrich's `workload` extension (`ReplicaSet/<rs>`)
//! or, failing that, from the pod name (`<rs>-<suffix>`); the Deployment is
//! the ReplicaSet name without its pod-template-hash (`<deploy>-<hash>`).

use serde::{Deserialize, Serialize};
use tidewatch_proto::v1::Insight;
use tidewatch_runtime::event::derive_id;
use tidewatch_runtime::topology::types;

use crate::observation::{Observation, entity};
use crate::rule::Rule;
use crate::vocabulary::{Finding, Window, exit_meaning};

/// `[bad_rollout]` in the rules file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Restarts of the new ReplicaSet's pods needed.
    pub min_restarts: usize,
    /// How long after the rollout restarts count (and how far before it the old ones are counted).
    pub window: Window,
    /// Rules whose findings a bad rollout explains better (see `incident.rs`).
    #[serde(default)]
    pub supersedes: Vec<crate::incident::Supersedes>,
}

fn yes() -> bool {
    true
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.min_restarts == 0 {
            return Err("min_restarts must be at least 1".into());
        }
        if self.window.0.is_zero() {
            return Err("window must be positive".into());
        }
        for s in &self.supersedes {
            s.validate()?;
        }
        Ok(())
    }
    pub fn rule(&self) -> BadRollout {
        BadRollout {
            min_restarts: self.min_restarts,
            window: self.window,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BadRollout {
    pub min_restarts: usize,
    pub window: Window,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub event_id: String,
    pub at_ns: i64,
    pub new_rs: String,
    pub old_rs: String,
    #[serde(default)]
    pub revision: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRestart {
    pub event_id: String,
    pub at_ns: i64,
    pub rs: String,
    pub pod: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub exit_code: i32,
    /// When this process first folded it in (receive time, ns; 0 unknown).
    #[serde(default)]
    pub received_ns: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Restarts, in time order.
    #[serde(default)]
    pub restarts: Vec<PodRestart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    /// The last resolution published (the rollout completed, or a newer
    /// rollout replaced it): the resolving event's id and receive time and
    /// the insight, so a redelivery of that event publishes it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<(String, i64, Finding)>,
}

/// Restarts kept per Deployment at most.
const MAX_RESTARTS: usize = 256;

/// `<deploy>-<hash>` → `<deploy>`.
fn deployment_of(rs: &str) -> Option<&str> {
    rs.rsplit_once('-')
        .map(|(d, _)| d)
        .filter(|d| !d.is_empty())
}

impl BadRollout {
    pub fn wants(&self, ty: &str) -> bool {
        matches!(
            ty,
            types::ROLLOUT_STARTED
                | types::ROLLOUT_COMPLETED
                | types::CONTAINER_RESTARTED
                | types::CONTAINER_OOMKILLED
                | types::CONTAINER_IMAGE_PULL_FAILED
        )
    }

    /// The ReplicaSet of the pod a container event is about.
    fn replica_set(obs: &Observation) -> Option<String> {
        if let Some(rs) = obs
            .value("ext.workload")
            .and_then(|w| w.strip_prefix("ReplicaSet/").map(str::to_string))
        {
            return Some(rs);
        }
        let pod = obs.value("subject.pod")?;
        let name = pod.split_once('/').map(|(_, n)| n)?;
        deployment_of(name).map(str::to_string)
    }

    /// `<ns>/<deployment>`.
    pub fn key(&self, obs: &Observation) -> Option<String> {
        if obs.ty == types::ROLLOUT_STARTED || obs.ty == types::ROLLOUT_COMPLETED {
            return obs.value("subject.deployment").or_else(|| {
                Some(format!(
                    "{}/{}",
                    obs.value("data.namespace")?,
                    obs.value("data.deployment")?
                ))
            });
        }
        let rs = Self::replica_set(obs)?;
        let ns = obs.value("subject.pod")?.split_once('/')?.0.to_string();
        Some(format!("{ns}/{}", deployment_of(&rs)?))
    }

    /// Fold one event in: a rollout start or completion, or a restart.
    pub fn step(&self, mut state: State, key: &str, obs: &Observation) -> (State, Option<Finding>) {
        if let Some((id, received, stored)) = &state.resolution
            && *id == obs.id
        {
            // The resolving event again: the same resolution, within the
            // republish horizon.
            let finding = (!obs.is_stale_repeat(Some(*received))).then(|| stored.clone());
            return (state, finding);
        }
        let resolution = self.resolution(&state, key, obs);
        if let Some(finding) = &resolution {
            state.resolution = Some((obs.id.clone(), obs.received_ns, finding.clone()));
            state.incident = None;
            if obs.ty == types::ROLLOUT_COMPLETED {
                // The resolved rollout's restarts count for nothing more.
                let rs = state.rollout.as_ref().map(|r| r.new_rs.clone());
                state.restarts.retain(|r| Some(&r.rs) != rs.as_ref());
                return (state, resolution);
            }
        }
        if obs.ty == types::ROLLOUT_COMPLETED {
            return (state, None);
        }
        let (state, finding) = self.fold(state, key, obs);
        // A newer rollout that ends the old incident opens nothing yet
        // (its pods have not restarted): the resolution is what to say.
        (state, resolution.or(finding))
    }

    /// The open incident's last revision, resolved, if `obs` ends it: the
    /// rollout completed (its new ReplicaSet available), or a newer rollout
    /// started (a rollback to the old ReplicaSet, or a fix).
    fn resolution(&self, state: &State, key: &str, obs: &Observation) -> Option<Finding> {
        let rollout = state.rollout.as_ref()?;
        state.incident.as_ref()?;
        if obs.at_ns < rollout.at_ns || obs.id == rollout.event_id {
            return None;
        }
        let new_rs = obs.value("data.newReplicaSet");
        let how = match obs.ty.as_str() {
            types::ROLLOUT_COMPLETED if new_rs.as_ref().is_none_or(|rs| *rs == rollout.new_rs) => {
                format!("the rollout to {} completed", rollout.new_rs)
            }
            types::ROLLOUT_STARTED if new_rs.as_deref() == Some(rollout.old_rs.as_str()) => {
                format!("rolled back to {}", rollout.old_rs)
            }
            types::ROLLOUT_STARTED => format!(
                "replaced by a newer rollout to {}",
                new_rs.unwrap_or_default()
            ),
            _ => return None,
        };
        let mut current = self.current(&mut state.clone(), key)?;
        let insight = &mut current.insight;
        insight.revision = insight.revision.saturating_add(1);
        insight.status = "resolved".into();
        insight.resolved_by_event_id = obs.id.clone();
        insight.evidence_event_ids.push(obs.id.clone());
        insight.last_seen_ns = obs.at_ns;
        insight.summary = format!("{} (resolved: {how})", insight.summary);
        current.message_id = derive_id(&[
            insight.id.as_bytes(),
            &u64::from(insight.revision).to_be_bytes(),
            b"resolved",
        ]);
        Some(current)
    }

    fn fold(&self, mut state: State, key: &str, obs: &Observation) -> (State, Option<Finding>) {
        let window = self.window.nanos();
        let first = state
            .restarts
            .iter()
            .find(|r| r.event_id == obs.id)
            .map(|r| r.received_ns);
        if obs.is_stale_repeat(first) {
            return (state, None);
        }
        if obs.ty == types::ROLLOUT_STARTED {
            let (Some(new_rs), Some(old_rs)) = (
                obs.value("data.newReplicaSet"),
                obs.value("data.oldReplicaSet"),
            ) else {
                return (state, None);
            };
            let newer = state
                .rollout
                .as_ref()
                .is_none_or(|r| (obs.at_ns, &obs.id) > (r.at_ns, &r.event_id));
            if newer {
                if state.rollout.as_ref().is_some_and(|r| r.event_id != obs.id) {
                    state.incident = None;
                }

                state.rollout = Some(Rollout {
                    event_id: obs.id.clone(),
                    at_ns: obs.at_ns,
                    new_rs,
                    old_rs,
                    revision: obs.value("data.revision").unwrap_or_default(),
                });
            }
        } else if state
            .resolution
            .as_ref()
            .is_some_and(|(_, _, resolved)| obs.at_ns <= resolved.insight.last_seen_ns)
        {
            // A restart from before the last resolution, late: it counted
            // (or could have) for the incident that is over.
            return (state, None);
        } else if !state.restarts.iter().any(|r| r.event_id == obs.id) {
            let Some(rs) = Self::replica_set(obs) else {
                return (state, None);
            };
            let at = state
                .restarts
                .iter()
                .position(|r| (r.at_ns, r.event_id.as_str()) > (obs.at_ns, obs.id.as_str()))
                .unwrap_or(state.restarts.len());
            state.restarts.insert(
                at,
                PodRestart {
                    event_id: obs.id.clone(),
                    at_ns: obs.at_ns,
                    rs,
                    pod: obs.value("subject.pod").unwrap_or_default(),
                    reason: obs.value("data.reason").unwrap_or_default(),
                    exit_code: obs
                        .value("data.exitCode")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0),
                    received_ns: obs.received_ns,
                },
            );
        }
        // Forget restarts too old to matter for the current (or any next) rollout.
        let newest = state
            .restarts
            .iter()
            .map(|r| r.at_ns)
            .chain(state.rollout.as_ref().map(|r| r.at_ns))
            .max()
            .unwrap_or(0);
        let horizon = state
            .rollout
            .as_ref()
            .map_or(newest.saturating_sub(window), |r| {
                r.at_ns.saturating_sub(window)
            })
            .min(newest.saturating_sub(window));
        state.restarts.retain(|r| r.at_ns >= horizon);
        if state.restarts.len() > MAX_RESTARTS {
            let excess = state.restarts.len() - MAX_RESTARTS;
            state.restarts.drain(..excess);
        }
        let finding = self.current(&mut state, key);
        (state, finding)
    }

    /// The current rollout's finding, if its new ReplicaSet is failing
    /// (opening the incident in `state` if it was not).
    fn current(&self, state: &mut State, key: &str) -> Option<Finding> {
        let window = self.window.nanos();
        let rollout = state.rollout.clone()?;
        let new: Vec<&PodRestart> = state
            .restarts
            .iter()
            .filter(|r| {
                r.rs == rollout.new_rs
                    && r.at_ns >= rollout.at_ns
                    && r.at_ns <= rollout.at_ns.saturating_add(window)
            })
            .collect();
        let old = state
            .restarts
            .iter()
            .filter(|r| {
                r.rs == rollout.old_rs
                    && r.at_ns < rollout.at_ns
                    && r.at_ns >= rollout.at_ns.saturating_sub(window)
            })
            .count();
        if new.len() < self.min_restarts || new.len() <= old {
            return None;
        }
        let incident = state.incident.clone().unwrap_or_else(|| {
            let ids: Vec<&[u8]> = new[..self.min_restarts]
                .iter()
                .map(|r| r.event_id.as_bytes())
                .collect();
            derive_id(&[
                b"bad-rollout",
                key.as_bytes(),
                rollout.event_id.as_bytes(),
                &ids.concat(),
            ])
        });
        state.incident = Some(incident.clone());
        let revision = (new.len() - self.min_restarts + 1) as u32;
        let mut affected = vec![
            entity("deployment", key),
            entity(
                "replicaset",
                &format!(
                    "{}/{}",
                    key.split_once('/').map_or("", |(ns, _)| ns),
                    rollout.new_rs
                ),
            ),
        ];
        for r in &new {
            let e = entity("pod", &r.pod);
            if !affected.contains(&e) {
                affected.push(e);
            }
        }
        let last = new[new.len() - 1];
        let pods = affected.iter().filter(|e| e.kind == "pod").count();
        let meaning = exit_meaning(last.exit_code, &last.reason);
        let insight = Insight {
            id: incident.clone(),
            kind: "bad-rollout".into(),
            severity: "critical".into(),
            summary: format!(
                "rollout of deployment {key} to ReplicaSet {}: its {pods} pod(s) restarted {} times in {} (old ReplicaSet {}: {old})",
                rollout.new_rs,
                new.len(),
                self.window,
                rollout.old_rs
            ),
            root_cause: format!(
                "the new ReplicaSet {} (rollout event {}) is failing where {} was not: latest restart {meaning}",
                rollout.new_rs, rollout.event_id, rollout.old_rs
            ),
            root_cause_event_id: rollout.event_id.clone(),
            evidence_event_ids: std::iter::once(rollout.event_id.clone())
                .chain(new.iter().map(|r| r.event_id.clone()))
                .collect(),
            affected,
            first_seen_ns: rollout.at_ns,
            last_seen_ns: last.at_ns,
            confidence: (0.7 + 0.05 * (new.len() - old) as f64).min(0.95),
            revision,
            status: "open".into(),
            ..Insight::default()
        };
        let finding = Finding {
            message_id: derive_id(&[incident.as_bytes(), &u64::from(revision).to_be_bytes()]),
            subject: format!("deployment/{key}"),
            insight,
        };
        Some(finding)
    }
}

impl Rule for BadRollout {
    type State = State;
    fn name(&self) -> &str {
        "bad-rollout"
    }
    fn wants(&self, ty: &str) -> bool {
        BadRollout::wants(self, ty)
    }
    fn keys(&self, obs: &Observation) -> Vec<String> {
        self.key(obs).into_iter().collect()
    }
    fn step(&self, state: State, key: &str, obs: &Observation) -> (State, Option<Finding>) {
        BadRollout::step(self, state, key, obs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::tests::obs;
    use serde_json::json;

    fn rule() -> BadRollout {
        BadRollout {
            min_restarts: 3,
            window: Window::parse("15m").expect("duration"),
        }
    }

    fn rollout(at: i64) -> Observation {
        obs(
            "ro",
            types::ROLLOUT_STARTED,
            at,
            Some("deployment/shop/web"),
            json!({"namespace": "shop", "deployment": "web", "newReplicaSet": "web-7c9f", "oldReplicaSet": "web-5d4b", "revision": "7"}),
        )
    }

    fn restart(id: &str, at: i64, pod: &str) -> Observation {
        obs(
            id,
            types::CONTAINER_RESTARTED,
            at,
            Some(&format!("pod/shop/{pod}")),
            json!({"container": "web", "exitCode": 1, "reason": "Error"}),
        )
    }

    fn run(events: &[Observation]) -> (State, Vec<Finding>) {
        let r = rule();
        let mut state = State::default();
        let mut out = Vec::new();
        for e in events {
            let key = r.key(e).expect("key");
            assert_eq!(key, "shop/web");
            let (s, f) = r.step(state, &key, e);
            state = s;
            out.extend(f);
        }
        (state, out)
    }

    #[test]
    fn new_pods_failing_more_than_old_ones_is_a_bad_rollout() {
        let (_, f) = run(&[
            restart("o1", 10, "web-5d4b-aaaaa"),
            rollout(100),
            restart("n1", 110, "web-7c9f-bbbbb"),
            restart("n2", 150, "web-7c9f-ccccc"),
            restart("n3", 200, "web-7c9f-bbbbb"),
        ]);
        assert_eq!(f.len(), 1);
        let i = &f[0].insight;
        assert_eq!(i.root_cause_event_id, "ro");
        assert_eq!(i.evidence_event_ids, ["ro", "n1", "n2", "n3"]);
        assert!(i.summary.contains("web-7c9f"), "{}", i.summary);
        assert!(
            i.affected
                .iter()
                .any(|e| e.kind == "pod" && e.name == "web-7c9f-ccccc")
        );
        assert_eq!(f[0].subject, "deployment/shop/web");
    }

    #[test]
    fn a_good_rollout_or_an_equally_flaky_old_replicaset_is_not() {
        let (_, f) = run(&[rollout(100), restart("n1", 110, "web-7c9f-bbbbb")]);
        assert!(f.is_empty());
        let (_, f) = run(&[
            restart("o1", 10, "web-5d4b-aaaaa"),
            restart("o2", 20, "web-5d4b-aaaaa"),
            restart("o3", 30, "web-5d4b-aaaaa"),
            rollout(100),
            restart("n1", 110, "web-7c9f-bbbbb"),
            restart("n2", 150, "web-7c9f-ccccc"),
            restart("n3", 200, "web-7c9f-bbbbb"),
        ]);
        assert!(f.is_empty(), "no worse than before");
    }

    #[test]
    fn order_of_arrival_and_redelivery_do_not_matter() {
        let events = [
            rollout(100),
            restart("n1", 110, "web-7c9f-b"),
            restart("n2", 150, "web-7c9f-c"),
            restart("n3", 200, "web-7c9f-b"),
        ];
        let (a, fa) = run(&events);
        let mut reversed = events.to_vec();
        reversed.reverse();
        let (b, fb) = run(&reversed);
        assert_eq!(a.restarts, b.restarts);
        assert_eq!(
            fa.last().map(|f| &f.insight.evidence_event_ids),
            fb.last().map(|f| &f.insight.evidence_event_ids)
        );
        let (again, f) = rule().step(a.clone(), "shop/web", &events[3]);
        assert_eq!(again, a);
        assert_eq!(
            f.map(|f| f.message_id),
            fa.last().map(|f| f.message_id.clone())
        );
    }

    #[test]
    fn completing_or_rolling_back_resolves_the_bad_rollout() {
        let failing = [
            rollout(100),
            restart("n1", 110, "web-7c9f-bbbbb"),
            restart("n2", 120, "web-7c9f-bbbbb"),
            restart("n3", 130, "web-7c9f-ccccc"),
        ];
        let completed = obs(
            "done",
            types::ROLLOUT_COMPLETED,
            400,
            Some("deployment/shop/web"),
            json!({"namespace": "shop", "deployment": "web", "newReplicaSet": "web-7c9f"}),
        );
        let rollback = obs(
            "back",
            types::ROLLOUT_STARTED,
            300,
            Some("deployment/shop/web"),
            json!({"namespace": "shop", "deployment": "web", "newReplicaSet": "web-5d4b", "oldReplicaSet": "web-7c9f", "revision": "8"}),
        );
        for (end, how) in [
            (completed, "completed"),
            (rollback, "rolled back to web-5d4b"),
        ] {
            let mut events = failing.to_vec();
            events.push(end.clone());
            let (state, findings) = run(&events);
            let open = &findings[findings.len() - 2];
            let resolved = findings.last().expect("findings");
            assert_eq!(open.insight.status, "open");
            assert_eq!(resolved.insight.status, "resolved", "{how}");
            assert_eq!(resolved.insight.id, open.insight.id, "{how}");
            assert_eq!(resolved.insight.revision, open.insight.revision + 1);
            assert_eq!(resolved.insight.resolved_by_event_id, end.id);
            assert!(
                resolved.insight.summary.contains(how),
                "{}",
                resolved.insight.summary
            );
            // Redelivered: the same message.
            let (state, again) = rule().step(state, "shop/web", &end);
            assert_eq!(
                again.map(|f| f.message_id),
                Some(resolved.message_id.clone())
            );
            // A restart from before the end, arriving late, counts for nothing.
            let (state, late) =
                rule().step(state, "shop/web", &restart("late", 200, "web-7c9f-ddddd"));
            assert!(late.is_none(), "{how}");
            // A restart after that says nothing of the closed incident.
            let (_, after) = rule().step(state, "shop/web", &restart("n9", 450, "web-5d4b-ddddd"));
            assert!(after.is_none(), "{how}");
        }
        // A completion with nothing failing is no news.
        let (_, quiet) = run(&[
            rollout(100),
            obs(
                "done",
                types::ROLLOUT_COMPLETED,
                200,
                Some("deployment/shop/web"),
                json!({"newReplicaSet": "web-7c9f"}),
            ),
        ]);
        assert!(quiet.is_empty());
    }
}
