//! Deployments and their ReplicaSets: rollout started / progressed /
//! completed / stalled. A rollout starts when the Deployment's
//! `deployment.kubernetes.io/revision` grows; its new ReplicaSet is the
//! owned one carrying that revision, the old one the newest below it. When
//! the Deployment's update arrives before its new ReplicaSet's, the start
//! waits ([`Rollouts`] keeps it pending) until the ReplicaSet is seen.
//! Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use tidewatch_proto::v1::RolloutChange;
use tidewatch_runtime::topology::types;

use crate::change::{Change, Payload};
use crate::tracker::Transition;

pub const REVISION: &str = "deployment.kubernetes.io/revision";

/// What is kept of a Deployment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeploymentSnapshot {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub resource_version: String,
    pub generation: i64,
    pub observed_generation: i64,
    pub revision: u64,
    /// `spec.replicas` (default 1).
    pub desired: i32,
    pub replicas: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    /// The Progressing condition: status, reason, message.
    pub progressing: Option<(String, String, String)>,
}

impl DeploymentSnapshot {
    pub fn from_deployment(d: &Deployment) -> Option<DeploymentSnapshot> {
        let meta = &d.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let status = d.status.as_ref();
        Some(DeploymentSnapshot {
            uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            generation: meta.generation.unwrap_or(0),
            observed_generation: status.and_then(|s| s.observed_generation).unwrap_or(0),
            revision: revision_of(meta.annotations.as_ref()),
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: status.and_then(|s| s.replicas).unwrap_or(0),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            available: status.and_then(|s| s.available_replicas).unwrap_or(0),
            progressing: status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing"))
                .map(|c| {
                    (
                        c.status.clone(),
                        c.reason.clone().unwrap_or_default(),
                        c.message.clone().unwrap_or_default(),
                    )
                }),
        })
    }

    /// Every replica updated and available, nothing old left, and the
    /// controller has seen the latest spec.
    pub fn complete(&self) -> bool {
        self.observed_generation >= self.generation
            && self.updated == self.desired
            && self.replicas == self.desired
            && self.available == self.desired
    }

    fn stalled(&self) -> bool {
        self.progressing
            .as_ref()
            .is_some_and(|(status, reason, _)| {
                status == "False" && reason == "ProgressDeadlineExceeded"
            })
    }

    fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    fn payload(&self, new_replica_set: &str) -> RolloutChange {
        let (_, reason, message) = self.progressing.clone().unwrap_or_default();
        RolloutChange {
            namespace: self.namespace.clone(),
            deployment: self.name.clone(),
            revision: self.revision.to_string(),
            new_replica_set: new_replica_set.to_string(),
            replicas: self.replicas,
            updated_replicas: self.updated,
            ready_replicas: self.ready,
            available_replicas: self.available,
            reason,
            message,
            old_replica_set: String::new(),
        }
    }
}

fn revision_of(annotations: Option<&BTreeMap<String, String>>) -> u64 {
    annotations
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// What is kept of a ReplicaSet: its owning Deployment and revision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplicaSetSnapshot {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Name of the controlling Deployment; empty when none.
    pub deployment: String,
    pub revision: u64,
}

impl ReplicaSetSnapshot {
    pub fn from_replica_set(rs: &ReplicaSet) -> Option<ReplicaSetSnapshot> {
        let meta = &rs.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        Some(ReplicaSetSnapshot {
            uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            deployment: meta
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Deployment" && o.controller == Some(true))
                .map(|o| o.name.clone())
                .unwrap_or_default(),
            revision: revision_of(meta.annotations.as_ref()),
        })
    }
}

/// Rollout state across Deployments and ReplicaSets.
#[derive(Debug, Default)]
pub struct Rollouts {
    /// (ns, deployment) → ReplicaSet name → revision.
    replica_sets: BTreeMap<(String, String), BTreeMap<String, u64>>,
    /// Starts waiting for their new ReplicaSet.
    pending: BTreeMap<(String, String), DeploymentSnapshot>,
    /// Rollouts in progress: (ns, deployment) → new ReplicaSet name.
    active: BTreeMap<(String, String), String>,
}

impl Rollouts {
    fn new_and_old(&self, d: &DeploymentSnapshot) -> Option<(String, String)> {
        let sets = self.replica_sets.get(&d.key())?;
        let new = sets.iter().find(|(_, r)| **r == d.revision)?.0.clone();
        let old = sets
            .iter()
            .filter(|(_, r)| **r < d.revision)
            .max_by_key(|(_, r)| **r)
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        Some((new, old))
    }

    fn started(&mut self, d: &DeploymentSnapshot, new_rs: String, old_rs: String) -> Change {
        self.active.insert(d.key(), new_rs.clone());
        Change::new(
            types::ROLLOUT_STARTED,
            format!("deployment/{}/{}", d.namespace, d.name),
            &[&d.uid, "started", &d.revision.to_string()],
            None,
            Payload::Rollout(RolloutChange {
                old_replica_set: old_rs,
                ..d.payload(&new_rs)
            }),
        )
    }

    /// Fold in a Deployment transition.
    pub fn deployment(&mut self, t: Transition<DeploymentSnapshot>) -> Vec<Change> {
        let (old, new) = match t {
            Transition::Baseline(d) => {
                if !d.complete()
                    && let Some((new_rs, _)) = self.new_and_old(&d)
                {
                    self.active.insert(d.key(), new_rs);
                }
                return Vec::new();
            }
            Transition::Removed(d) => {
                self.pending.remove(&d.key());
                self.active.remove(&d.key());
                return Vec::new();
            }
            Transition::Applied { old, new } => (old, new),
        };
        let mut out = Vec::new();
        let subject = format!("deployment/{}/{}", new.namespace, new.name);
        let old_revision = old.as_ref().map(|o| o.revision).unwrap_or(0);
        if new.revision > old_revision {
            match self.new_and_old(&new) {
                Some((new_rs, old_rs)) => out.push(self.started(&new, new_rs, old_rs)),
                None => {
                    self.pending.insert(new.key(), new.clone());
                }
            }
        } else if let Some(pending) = self.pending.get_mut(&new.key()) {
            // Keep the newest counts for when the start is emitted.
            *pending = new.clone();
        }
        let rev = new.revision.to_string();
        if new.stalled() && !old.as_ref().is_some_and(DeploymentSnapshot::stalled) {
            let new_rs = self.active.get(&new.key()).cloned().unwrap_or_default();
            out.push(Change::new(
                types::ROLLOUT_STALLED,
                subject.clone(),
                &[&new.uid, "stalled", &rev],
                None,
                Payload::Rollout(new.payload(&new_rs)),
            ));
        }
        if let Some(new_rs) = self.active.get(&new.key()).cloned() {
            let counts = |d: &DeploymentSnapshot| (d.replicas, d.updated, d.ready, d.available);
            if new.complete() {
                self.active.remove(&new.key());
                out.push(Change::new(
                    types::ROLLOUT_COMPLETED,
                    subject.clone(),
                    &[&new.uid, "completed", &rev],
                    None,
                    Payload::Rollout(new.payload(&new_rs)),
                ));
            } else if old.as_ref().map(counts) != Some(counts(&new)) {
                out.push(Change::new(
                    types::ROLLOUT_PROGRESSED,
                    subject,
                    &[&new.uid, "progressed", &rev, &new.resource_version],
                    None,
                    Payload::Rollout(new.payload(&new_rs)),
                ));
            }
        }
        out
    }

    /// Fold in a ReplicaSet transition; emits a start that was waiting for it.
    pub fn replica_set(&mut self, t: Transition<ReplicaSetSnapshot>) -> Vec<Change> {
        let rs = match t {
            Transition::Removed(rs) => {
                let key = (rs.namespace.clone(), rs.deployment.clone());
                if let Some(sets) = self.replica_sets.get_mut(&key) {
                    sets.remove(&rs.name);
                    if sets.is_empty() {
                        self.replica_sets.remove(&key);
                    }
                }
                return Vec::new();
            }
            Transition::Baseline(rs) | Transition::Applied { new: rs, .. } => rs,
        };
        if rs.deployment.is_empty() {
            return Vec::new();
        }
        let key = (rs.namespace.clone(), rs.deployment.clone());
        self.replica_sets
            .entry(key.clone())
            .or_default()
            .insert(rs.name.clone(), rs.revision);
        let Some(pending) = self.pending.get(&key).cloned() else {
            return Vec::new();
        };
        match self.new_and_old(&pending) {
            Some((new_rs, old_rs)) => {
                self.pending.remove(&key);
                vec![self.started(&pending, new_rs, old_rs)]
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::fixture;

    fn deployment(v: &serde_json::Value) -> DeploymentSnapshot {
        let d: Deployment = serde_json::from_value(v.clone()).expect("Deployment");
        DeploymentSnapshot::from_deployment(&d).expect("uid")
    }

    fn rs(name: &str, deployment: &str, revision: u64) -> ReplicaSetSnapshot {
        ReplicaSetSnapshot {
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            name: name.into(),
            deployment: deployment.into(),
            revision,
        }
    }

    fn ty(c: &[Change]) -> Vec<&'static str> {
        c.iter().map(|c| c.ty).collect()
    }

    #[test]
    fn replica_sets_from_a_real_list_name_their_deployment() {
        let list = fixture("08b-replicasetlist-owned-by-deployment.json");
        let items = list["items"].as_array().expect("items");
        let snaps: Vec<ReplicaSetSnapshot> = items
            .iter()
            .map(|i| {
                let rs: ReplicaSet = serde_json::from_value(i.clone()).expect("ReplicaSet");
                ReplicaSetSnapshot::from_replica_set(&rs).expect("uid")
            })
            .collect();
        assert_eq!(snaps[0].deployment, "kotsadm");
        assert_eq!(snaps[0].revision, 1);
    }

    #[test]
    fn a_rollout_starts_progresses_and_completes() {
        let mid = fixture("08-deployment-progressing-midrollout.json");
        let mut before_json = mid.clone();
        before_json["metadata"]["annotations"][REVISION] = "3".into();
        before_json["status"]["replicas"] = 1.into();
        before_json["status"]["updatedReplicas"] = 1.into();
        before_json["status"]["unavailableReplicas"] = serde_json::Value::Null;
        before_json["metadata"]["generation"] = 3.into();
        before_json["status"]["observedGeneration"] = 3.into();
        let before = deployment(&before_json);
        assert!(before.complete());
        let mut r = Rollouts::default();
        r.replica_set(Transition::Baseline(rs(
            "guestbook-ui-old",
            "guestbook-ui",
            3,
        )));
        r.deployment(Transition::Baseline(before.clone()));
        // The Deployment update arrives before its new ReplicaSet.
        let mut during_json = mid.clone();
        during_json["status"]["updatedReplicas"] = 0.into();
        let during = deployment(&during_json);
        let c = r.deployment(Transition::Applied {
            old: Some(before.clone()),
            new: during.clone(),
        });
        assert!(!ty(&c).contains(&types::ROLLOUT_STARTED), "{c:?}");
        let c = r.replica_set(Transition::Applied {
            old: None,
            new: rs("guestbook-ui-75dd4d49d5", "guestbook-ui", 4),
        });
        assert_eq!(ty(&c), vec![types::ROLLOUT_STARTED]);
        assert_eq!(c[0].subject, "deployment/default/guestbook-ui");
        let Payload::Rollout(data) = &c[0].payload else {
            panic!("a rollout change")
        };
        assert_eq!(data.new_replica_set, "guestbook-ui-75dd4d49d5");
        assert_eq!(data.old_replica_set, "guestbook-ui-old");
        assert_eq!(data.revision, "4");
        assert_eq!(data.namespace, "default");
        assert_eq!(data.deployment, "guestbook-ui");
        // Progress: one replica updated.
        let mid_snap = deployment(&mid);
        let c = r.deployment(Transition::Applied {
            old: Some(during.clone()),
            new: mid_snap.clone(),
        });
        assert_eq!(ty(&c), vec![types::ROLLOUT_PROGRESSED]);
        // Done: the old pod is gone.
        let mut done_json = mid.clone();
        done_json["status"]["replicas"] = 1.into();
        let done = deployment(&done_json);
        let c = r.deployment(Transition::Applied {
            old: Some(mid_snap),
            new: done.clone(),
        });
        assert_eq!(ty(&c), vec![types::ROLLOUT_COMPLETED]);
        let Payload::Rollout(p) = &c[0].payload else {
            panic!("rollout")
        };
        assert_eq!(p.new_replica_set, "guestbook-ui-75dd4d49d5");
        // A later status change without a rollout is quiet.
        let mut later = done_json;
        later["metadata"]["resourceVersion"] = "123456".into();
        assert!(
            r.deployment(Transition::Applied {
                old: Some(done),
                new: deployment(&later)
            })
            .is_empty()
        );
    }

    #[test]
    fn a_rollout_past_its_deadline_stalls() {
        let json = fixture("08a-deployment-available-false.json");
        let d = deployment(&json);
        let mut stalled = json.clone();
        for c in stalled["status"]["conditions"]
            .as_array_mut()
            .expect("conditions")
        {
            if c["type"] == "Progressing" {
                c["status"] = "False".into();
                c["reason"] = "ProgressDeadlineExceeded".into();
                c["message"] = "ReplicaSet has timed out progressing.".into();
            }
        }
        let mut r = Rollouts::default();
        r.deployment(Transition::Baseline(d.clone()));
        let stalled = deployment(&stalled);
        let c = r.deployment(Transition::Applied {
            old: Some(d),
            new: stalled.clone(),
        });
        assert_eq!(ty(&c), vec![types::ROLLOUT_STALLED]);
        let Payload::Rollout(p) = &c[0].payload else {
            panic!("rollout")
        };
        assert_eq!(p.reason, "ProgressDeadlineExceeded");
        assert!(
            r.deployment(Transition::Applied {
                old: Some(stalled.clone()),
                new: stalled
            })
            .is_empty()
        );
    }
}
