//! Pods: the snapshot kept per pod, the semantic changes between two
//! snapshots (container started/restarted/OOMKilled, CrashLoopBackOff
//! entered/left, image pull failures, phase, Ready, eviction), and the
//! pod metadata written to KV for enrichment. Pure.
//!
//! A container termination is reported once, keyed by the id of the
//! container that terminated: the OOMKilled seen in `state.terminated`
//! and the same termination seen later in `lastState.terminated` yield
//! one event with one id.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod};
use tidewatch_proto::v1::{ContainerMetadata, ContainerRestart, PodChange, PodMetadata};
use tidewatch_runtime::topology::{pod_keys, types};

use crate::change::{Change, Payload, nanos_of};
use crate::quantity;

/// Waiting reasons that mean the image could not be pulled.
pub const IMAGE_PULL_FAILURES: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
];

/// A container termination.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Termination {
    pub reason: String,
    pub exit_code: i32,
    pub signal: i32,
    pub message: String,
    pub finished_ns: i64,
    pub container_id: String,
}

impl Termination {
    /// What identifies this termination across observations.
    fn key(&self, restart_count: i32) -> String {
        if self.container_id.is_empty() {
            format!("{restart_count}/{}", self.finished_ns)
        } else {
            self.container_id.clone()
        }
    }
}

/// A container's current state.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Current {
    #[default]
    Unknown,
    Waiting {
        reason: String,
        message: String,
    },
    Running,
    Terminated(Termination),
}

/// What is kept of one container status.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerSnapshot {
    pub name: String,
    pub image: String,
    /// `containerd://<id>` as the API reports it.
    pub container_id: String,
    pub restart_count: i32,
    pub state: Current,
    pub last: Option<Termination>,
    pub memory_limit_bytes: i64,
    pub cpu_limit_millis: i64,
}

impl ContainerSnapshot {
    fn waiting_reason(&self) -> Option<&str> {
        match &self.state {
            Current::Waiting { reason, .. } => Some(reason),
            _ => None,
        }
    }
    fn crashlooping(&self) -> bool {
        self.waiting_reason() == Some("CrashLoopBackOff")
    }
    fn pull_failing(&self) -> bool {
        self.waiting_reason()
            .is_some_and(|r| IMAGE_PULL_FAILURES.contains(&r))
    }
    fn termination_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        if let Some(t) = &self.last {
            keys.push(t.key(self.restart_count));
        }
        if let Current::Terminated(t) = &self.state {
            keys.push(t.key(self.restart_count));
        }
        keys
    }
}

/// What is kept of a pod between two watch events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodSnapshot {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub resource_version: String,
    pub phase: String,
    /// The Ready condition; None when the pod has none yet.
    pub ready: Option<bool>,
    pub ready_reason: String,
    /// `status.reason` / `status.message` (Evicted...).
    pub reason: String,
    pub message: String,
    /// Reason of a True `DisruptionTarget` condition.
    pub disruption: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub workload_kind: String,
    pub workload_name: String,
    pub pod_ips: Vec<String>,
    pub containers: Vec<ContainerSnapshot>,
}

fn termination(state: Option<&ContainerState>) -> Option<Termination> {
    let t = state?.terminated.as_ref()?;
    Some(Termination {
        reason: t.reason.clone().unwrap_or_default(),
        exit_code: t.exit_code,
        signal: t.signal.unwrap_or(0),
        message: t.message.clone().unwrap_or_default(),
        finished_ns: nanos_of(t.finished_at.as_ref().map(|t| &t.0)),
        container_id: t.container_id.clone().unwrap_or_default(),
    })
}

fn current(state: Option<&ContainerState>) -> Current {
    let Some(s) = state else {
        return Current::Unknown;
    };
    if let Some(w) = &s.waiting {
        return Current::Waiting {
            reason: w.reason.clone().unwrap_or_default(),
            message: w.message.clone().unwrap_or_default(),
        };
    }
    if s.running.is_some() {
        return Current::Running;
    }
    match termination(Some(s)) {
        Some(t) => Current::Terminated(t),
        None => Current::Unknown,
    }
}

/// Workload owning a pod: its controller, a ReplicaSet resolved to its
/// Deployment by the controller's naming rule (`<deployment>-<pod-template-hash>`).
pub fn workload(pod: &Pod) -> (String, String) {
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return (String::new(), String::new());
    };
    if owner.kind == "ReplicaSet"
        && let Some(hash) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
        && let Some(deployment) = owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|d| d.strip_suffix('-'))
        && !deployment.is_empty()
    {
        return ("Deployment".into(), deployment.to_string());
    }
    (owner.kind.clone(), owner.name.clone())
}

impl PodSnapshot {
    /// None for an object without a uid (not something the API server sends).
    pub fn from_pod(pod: &Pod) -> Option<PodSnapshot> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let limits: BTreeMap<&str, (i64, i64)> = spec
            .into_iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .map(|c| {
                let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
                let memory = limits
                    .and_then(|l| l.get("memory"))
                    .and_then(|q| quantity::bytes(&q.0))
                    .unwrap_or(0);
                let cpu = limits
                    .and_then(|l| l.get("cpu"))
                    .and_then(|q| quantity::millis(&q.0))
                    .unwrap_or(0);
                (c.name.as_str(), (memory, cpu))
            })
            .collect();
        let statuses: Vec<&ContainerStatus> = status
            .into_iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .collect();
        let mut containers: Vec<ContainerSnapshot> = statuses
            .iter()
            .map(|c| {
                let (memory, cpu) = limits.get(c.name.as_str()).copied().unwrap_or((0, 0));
                ContainerSnapshot {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    container_id: c.container_id.clone().unwrap_or_default(),
                    restart_count: c.restart_count,
                    state: current(c.state.as_ref()),
                    last: termination(c.last_state.as_ref()),
                    memory_limit_bytes: memory,
                    cpu_limit_millis: cpu,
                }
            })
            .collect();
        // Containers without a status yet still have limits worth knowing.
        for c in spec.into_iter().flat_map(|s| s.containers.iter()) {
            if !containers.iter().any(|s| s.name == c.name) {
                let (memory, cpu) = limits.get(c.name.as_str()).copied().unwrap_or((0, 0));
                containers.push(ContainerSnapshot {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    memory_limit_bytes: memory,
                    cpu_limit_millis: cpu,
                    ..Default::default()
                });
            }
        }
        let conditions = status.and_then(|s| s.conditions.as_ref());
        let ready_condition = conditions.and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let disruption = conditions
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
            })
            .map(|c| c.reason.clone().unwrap_or_default());
        let mut pod_ips: Vec<String> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.ip.clone())
            .filter(|ip| !ip.is_empty())
            .collect();
        if let Some(ip) = status.and_then(|s| s.pod_ip.clone())
            && !ip.is_empty()
            && !pod_ips.contains(&ip)
        {
            pod_ips.insert(0, ip);
        }
        let (workload_kind, workload_name) = workload(pod);
        Some(PodSnapshot {
            uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
            ready: ready_condition.map(|c| c.status == "True"),
            ready_reason: ready_condition
                .and_then(|c| c.reason.clone())
                .unwrap_or_default(),
            reason: status.and_then(|s| s.reason.clone()).unwrap_or_default(),
            message: status.and_then(|s| s.message.clone()).unwrap_or_default(),
            disruption,
            labels: meta.labels.clone().unwrap_or_default(),
            workload_kind,
            workload_name,
            pod_ips,
            containers,
        })
    }

    /// `pod/<ns>/<name>`.
    pub fn subject(&self) -> String {
        format!("pod/{}/{}", self.namespace, self.name)
    }

    /// The value enrich reads from the pod metadata bucket.
    pub fn metadata(&self, deleted_at_ns: i64) -> PodMetadata {
        PodMetadata {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            node: self.node.clone(),
            labels: self.labels.clone().into_iter().collect(),
            workload_kind: self.workload_kind.clone(),
            workload_name: self.workload_name.clone(),
            pod_ips: self.pod_ips.clone(),
            containers: self
                .containers
                .iter()
                .map(|c| ContainerMetadata {
                    name: c.name.clone(),
                    container_id: bare_container_id(&c.container_id).to_string(),
                    image: c.image.clone(),
                    memory_limit_bytes: c.memory_limit_bytes,
                    cpu_limit_millis: c.cpu_limit_millis,
                })
                .collect(),
            deleted_at_ns,
        }
    }

    /// Every KV key this pod is found under: uid, name, container ids
    /// (current and last), pod IPs.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = vec![
            pod_keys::by_uid(&self.uid),
            pod_keys::by_name(&self.namespace, &self.name),
        ];
        for c in &self.containers {
            let ids = [
                Some(c.container_id.as_str()),
                c.last.as_ref().map(|t| t.container_id.as_str()),
            ];
            for id in ids.into_iter().flatten() {
                let id = bare_container_id(id);
                if !id.is_empty() {
                    keys.push(pod_keys::by_container(id));
                }
            }
        }
        for ip in &self.pod_ips {
            keys.push(pod_keys::by_ip(ip));
        }
        keys.sort();
        keys.dedup();
        keys
    }

    pub(crate) fn container_payload(
        &self,
        c: &ContainerSnapshot,
        t: Option<&Termination>,
    ) -> ContainerRestart {
        let t = t.or(c.last.as_ref());
        ContainerRestart {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            pod_uid: self.uid.clone(),
            container: c.name.clone(),
            container_id: bare_container_id(&c.container_id).to_string(),
            node: self.node.clone(),
            restart_count: u32::try_from(c.restart_count).unwrap_or(0),
            reason: t.map(|t| t.reason.clone()).unwrap_or_default(),
            exit_code: t.map(|t| t.exit_code).unwrap_or(0),
            signal: t.map(|t| u32::try_from(t.signal).unwrap_or(0)).unwrap_or(0),
            message: t.map(|t| t.message.clone()).unwrap_or_default(),
            memory_limit_bytes: c.memory_limit_bytes,
            finished_at_ns: t.map(|t| t.finished_ns).unwrap_or(0),
        }
    }

    pub(crate) fn pod_payload(
        &self,
        previous_phase: &str,
        reason: &str,
        message: &str,
    ) -> PodChange {
        PodChange {
            namespace: self.namespace.clone(),
            pod: self.name.clone(),
            pod_uid: self.uid.clone(),
            node: self.node.clone(),
            phase: self.phase.clone(),
            previous_phase: previous_phase.to_string(),
            ready: self.ready == Some(true),
            reason: reason.to_string(),
            message: message.to_string(),
            workload_kind: self.workload_kind.clone(),
            workload_name: self.workload_name.clone(),
        }
    }
}

/// The keys a stored [`PodMetadata`] is found under (for entries left by an
/// earlier run).
pub fn metadata_keys(meta: &PodMetadata) -> Vec<String> {
    let mut keys = vec![
        pod_keys::by_uid(&meta.uid),
        pod_keys::by_name(&meta.namespace, &meta.name),
    ];
    keys.extend(
        meta.containers
            .iter()
            .filter(|c| !c.container_id.is_empty())
            .map(|c| pod_keys::by_container(&c.container_id)),
    );
    keys.extend(meta.pod_ips.iter().map(|ip| pod_keys::by_ip(ip)));
    keys.sort();
    keys.dedup();
    keys
}

/// `containerd://abc` → `abc` (what the eBPF collector finds in cgroups).
pub fn bare_container_id(id: &str) -> &str {
    id.split_once("://").map(|(_, id)| id).unwrap_or(id)
}

fn termination_time(t: &Termination) -> Option<chrono::DateTime<chrono::Utc>> {
    (t.finished_ns > 0).then(|| chrono::DateTime::from_timestamp_nanos(t.finished_ns))
}

/// The semantic changes from `old` (None: a pod not seen before) to `new`.
pub fn changes(old: Option<&PodSnapshot>, new: &PodSnapshot) -> Vec<Change> {
    let mut out = Vec::new();
    let subject = new.subject();
    let uid = new.uid.as_str();
    let rv = new.resource_version.as_str();
    for c in &new.containers {
        let before = old.and_then(|o| o.containers.iter().find(|b| b.name == c.name));
        let known = before
            .map(ContainerSnapshot::termination_keys)
            .unwrap_or_default();
        let name = c.name.as_str();

        // Terminations, once each.
        let mut reported = Vec::new();
        let candidates = [
            (c.last.as_ref(), true),
            (
                match &c.state {
                    Current::Terminated(t) => Some(t),
                    _ => None,
                },
                false,
            ),
        ];
        for (t, is_last) in candidates {
            let Some(t) = t else { continue };
            let key = t.key(c.restart_count);
            if known.contains(&key) || reported.contains(&key) {
                continue;
            }
            let ty = if t.reason == "OOMKilled" {
                types::CONTAINER_OOMKILLED
            } else if is_last && c.restart_count > 0 {
                types::CONTAINER_RESTARTED
            } else {
                continue;
            };
            reported.push(key.clone());
            out.push(Change::new(
                ty,
                subject.clone(),
                &[uid, name, "terminated", &key],
                termination_time(t),
                Payload::Container(new.container_payload(c, Some(t))),
            ));
        }

        // First start.
        let was_running_same =
            before.is_some_and(|b| b.state == Current::Running && b.container_id == c.container_id);
        if c.state == Current::Running
            && c.restart_count == 0
            && !c.container_id.is_empty()
            && !was_running_same
        {
            out.push(Change::new(
                types::CONTAINER_STARTED,
                subject.clone(),
                &[uid, name, "started", &c.container_id],
                None,
                Payload::Container(new.container_payload(c, None)),
            ));
        }

        // CrashLoopBackOff entered / left.
        let was_looping = before.is_some_and(ContainerSnapshot::crashlooping);
        let restarts = c.restart_count.to_string();
        if c.crashlooping() && !was_looping {
            let mut payload = new.container_payload(c, None);
            if let Current::Waiting { message, .. } = &c.state {
                payload.message = message.clone();
            }
            out.push(Change::new(
                types::CONTAINER_CRASHLOOP,
                subject.clone(),
                &[uid, name, "crashloop", &restarts],
                None,
                Payload::Container(payload),
            ));
        } else if was_looping && !c.crashlooping() {
            out.push(Change::new(
                types::CONTAINER_CRASHLOOP_ENDED,
                subject.clone(),
                &[uid, name, "crashloopended", &restarts, rv],
                None,
                Payload::Container(new.container_payload(c, None)),
            ));
        }

        // Image pull failures, once per failing spell.
        let was_failing = before.is_some_and(ContainerSnapshot::pull_failing);
        if c.pull_failing() && !was_failing {
            let mut payload = new.container_payload(c, None);
            if let Current::Waiting { reason, message } = &c.state {
                payload.reason = reason.clone();
                payload.message = message.clone();
                payload.exit_code = 0;
                payload.signal = 0;
                payload.finished_at_ns = 0;
            }
            out.push(Change::new(
                types::CONTAINER_IMAGE_PULL_FAILED,
                subject.clone(),
                &[uid, name, "imagepull", &c.image, rv],
                None,
                Payload::Container(payload),
            ));
        }
    }

    // Pod phase.
    let previous_phase = old.map(|o| o.phase.as_str()).unwrap_or("");
    if !new.phase.is_empty() && new.phase != previous_phase {
        out.push(Change::new(
            types::POD_PHASE,
            subject.clone(),
            &[uid, "phase", &new.phase, rv],
            None,
            Payload::Pod(new.pod_payload(previous_phase, &new.reason, &new.message)),
        ));
    }

    // Ready.
    let was_ready = old.and_then(|o| o.ready).unwrap_or(false);
    if let Some(ready) = new.ready
        && ready != was_ready
    {
        let ty = if ready {
            types::POD_READY
        } else {
            types::POD_NOT_READY
        };
        out.push(Change::new(
            ty,
            subject.clone(),
            &[uid, "ready", if ready { "true" } else { "false" }, rv],
            None,
            Payload::Pod(new.pod_payload(previous_phase, &new.ready_reason, "")),
        ));
    }

    // Eviction.
    let evicted = |p: &PodSnapshot| p.reason == "Evicted" || p.disruption.is_some();
    if evicted(new) && !old.is_some_and(evicted) {
        let reason = if new.reason == "Evicted" {
            new.reason.clone()
        } else {
            new.disruption.clone().unwrap_or_default()
        };
        out.push(Change::new(
            types::POD_EVICTED,
            subject.clone(),
            &[uid, "evicted"],
            None,
            Payload::Pod(new.pod_payload(previous_phase, &reason, &new.message)),
        ));
    }
    out
}

/// The change for a pod that is gone (deleted, or missing from a relist):
/// it ends whatever was open about it (a crash loop of a deleted pod never
/// becomes stable).
pub fn deleted(pod: &PodSnapshot) -> Change {
    Change::new(
        types::POD_DELETED,
        pod.subject(),
        &[&pod.uid, "deleted"],
        None,
        Payload::Pod(pod.pod_payload(&pod.phase, "Deleted", "")),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixture(name: &str) -> serde_json::Value {
        let path = format!("{}/../../testdata/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn snap(v: &serde_json::Value) -> PodSnapshot {
        let pod: Pod = serde_json::from_value(v.clone()).expect("a Pod");
        PodSnapshot::from_pod(&pod).expect("uid")
    }

    fn types_of(changes: &[Change]) -> Vec<&'static str> {
        changes.iter().map(|c| c.ty).collect()
    }

    fn payload(c: &Change) -> &ContainerRestart {
        match &c.payload {
            Payload::Container(p) => p,
            other => panic!("not a container payload: {other:?}"),
        }
    }

    #[test]
    fn snapshot_of_a_running_pod() {
        let s = snap(&fixture("01-pod-running-ready.json"));
        assert_eq!(s.phase, "Running");
        assert_eq!(s.ready, Some(true));
        assert_eq!(s.workload_kind, "Deployment");
        assert_eq!(s.workload_name, "memory-hungry-app");
        assert_eq!(s.pod_ips, vec!["10.42.0.14"]);
        assert_eq!(s.containers[0].memory_limit_bytes, 128 << 20);
        assert_eq!(s.containers[0].cpu_limit_millis, 200);
        let keys = s.keys();
        assert!(keys.contains(&pod_keys::by_container(
            "75a01eaebedf1091a2e868c4eb5e02e536d4059f32d1ca10b6ef86239b4a46d6"
        )));
        assert!(keys.contains(&pod_keys::by_ip("10.42.0.14")));
        assert!(keys.contains(&pod_keys::by_name(
            "default",
            "memory-hungry-app-59c695fbfb-4vnq4"
        )));
        let meta = s.metadata(0);
        assert_eq!(meta.containers[0].container_id.len(), 64);
        assert_eq!(metadata_keys(&meta), keys);
    }

    #[test]
    fn a_new_running_pod_started_its_container_and_is_ready() {
        let s = snap(&fixture("01-pod-running-ready.json"));
        let c = changes(None, &s);
        assert_eq!(
            types_of(&c),
            vec![types::CONTAINER_STARTED, types::POD_PHASE, types::POD_READY]
        );
        assert_eq!(
            c[0].subject,
            "pod/default/memory-hungry-app-59c695fbfb-4vnq4"
        );
        assert_eq!(payload(&c[0]).memory_limit_bytes, 128 << 20);
        assert!(changes(Some(&s), &s).is_empty());
    }

    #[test]
    fn a_restart_after_oomkill_is_one_oomkilled_event_with_the_termination() {
        let mut running = fixture("02-pod-oomkilled-laststate-restarted.json");
        let restarted = snap(&running);
        // Before: the first container running, no restarts.
        let status = &mut running["status"]["containerStatuses"][0];
        status["restartCount"] = 0.into();
        status["lastState"] = serde_json::json!({});
        let before = snap(&running);
        let c = changes(Some(&before), &restarted);
        assert_eq!(types_of(&c), vec![types::CONTAINER_OOMKILLED], "{c:?}");
        let p = payload(&c[0]);
        assert_eq!(p.reason, "OOMKilled");
        assert_eq!(p.exit_code, 137);
        assert_eq!(p.restart_count, 1);
        assert!(c[0].subject.starts_with("pod/"));
        // Seen again (a relist, a MODIFIED with other changes): nothing new.
        assert!(changes(Some(&restarted), &restarted).is_empty());
    }

    #[test]
    fn an_oomkill_seen_as_terminated_then_as_last_state_is_reported_once() {
        let job = fixture("02b-pod-oomkilled-terminated-job.json");
        let terminated = snap(&job);
        let mut running = job.clone();
        running["status"]["phase"] = "Running".into();
        let status = &mut running["status"]["containerStatuses"][0];
        let term = status["state"]["terminated"].clone();
        status["state"] = serde_json::json!({"running": {"startedAt": "2023-01-01T00:00:00Z"}});
        let mut before = running.clone();
        before["status"]["containerStatuses"][0]["containerID"] = term["containerID"].clone();
        let before = snap(&before);
        let first = changes(Some(&before), &terminated);
        assert!(
            types_of(&first).contains(&types::CONTAINER_OOMKILLED),
            "{first:?}"
        );
        // Restarted: the termination moves to lastState.
        let mut after = running;
        let status = &mut after["status"]["containerStatuses"][0];
        status["lastState"] = serde_json::json!({"terminated": term});
        status["restartCount"] = 1.into();
        status["containerID"] = "containerd://new".into();
        let after = snap(&after);
        let second = changes(Some(&terminated), &after);
        assert!(
            !types_of(&second).contains(&types::CONTAINER_OOMKILLED),
            "{second:?}"
        );
        assert!(!types_of(&second).contains(&types::CONTAINER_RESTARTED));
    }

    #[test]
    fn crashloop_entered_and_left_and_restart_reason() {
        let looping_json = fixture("03-pod-crashloopbackoff.json");
        let looping = snap(&looping_json);
        // Before: running at restart 4 with the previous termination.
        let mut running = looping_json.clone();
        let status = &mut running["status"]["containerStatuses"][0];
        status["state"] = serde_json::json!({"running": {"startedAt": "2025-09-11T20:55:00Z"}});
        status["restartCount"] = 4.into();
        status["lastState"] = serde_json::json!({});
        let running_snap = snap(&running);
        let c = changes(Some(&running_snap), &looping);
        let t = types_of(&c);
        assert!(t.contains(&types::CONTAINER_CRASHLOOP), "{t:?}");
        assert!(t.contains(&types::CONTAINER_RESTARTED), "{t:?}");
        let restart = c
            .iter()
            .find(|c| c.ty == types::CONTAINER_RESTARTED)
            .map(payload)
            .expect("restart");
        assert_eq!(restart.reason, "Error");
        assert_eq!(restart.exit_code, 1);
        assert_eq!(restart.restart_count, 5);
        // Leaves the loop: running again with the same restart count.
        let mut recovered = looping_json;
        recovered["status"]["containerStatuses"][0]["state"] =
            serde_json::json!({"running": {"startedAt": "2025-09-11T21:00:00Z"}});
        recovered["metadata"]["resourceVersion"] = "99999".into();
        let c = changes(Some(&looping), &snap(&recovered));
        assert_eq!(
            types_of(&c),
            vec![types::CONTAINER_CRASHLOOP_ENDED],
            "{c:?}"
        );
    }

    #[test]
    fn image_pull_failures_are_reported_once_per_spell() {
        let pull = fixture("04-pod-errimagepull.json");
        let failing = snap(&pull);
        let mut pending = pull.clone();
        pending["status"]["containerStatuses"][0]["state"] =
            serde_json::json!({"waiting": {"reason": "ContainerCreating"}});
        let c = changes(Some(&snap(&pending)), &failing);
        assert_eq!(types_of(&c), vec![types::CONTAINER_IMAGE_PULL_FAILED]);
        assert_eq!(payload(&c[0]).reason, "ErrImagePull");
        assert!(
            payload(&c[0]).message.contains("noimage.com"),
            "{:?}",
            payload(&c[0]).message
        );
        // ErrImagePull ⇄ ImagePullBackOff is the same spell.
        let mut backoff = pull;
        backoff["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] =
            "ImagePullBackOff".into();
        assert!(changes(Some(&failing), &snap(&backoff)).is_empty());
        let b = snap(&fixture("04b-pod-imagepullbackoff.json"));
        assert!(types_of(&changes(None, &b)).contains(&types::CONTAINER_IMAGE_PULL_FAILED));
    }

    #[test]
    fn eviction_phase_and_ready_changes() {
        let running_json = fixture("01-pod-running-ready.json");
        let running = snap(&running_json);
        let fragment = fixture("05-pod-evicted-STATUS-FRAGMENT-ONLY.json");
        let mut evicted = running_json.clone();
        for key in ["phase", "reason", "message"] {
            evicted["status"][key] = fragment["status"][key].clone();
        }
        evicted["status"]["conditions"][2]["status"] = "False".into();
        evicted["metadata"]["resourceVersion"] = "2000".into();
        let c = changes(Some(&running), &snap(&evicted));
        assert_eq!(
            types_of(&c),
            vec![types::POD_PHASE, types::POD_NOT_READY, types::POD_EVICTED]
        );
        let Payload::Pod(p) = &c[2].payload else {
            panic!("pod payload")
        };
        assert_eq!(p.reason, "Evicted");
        assert!(p.message.contains("ephemeral-storage"));
        let Payload::Pod(p) = &c[0].payload else {
            panic!("pod payload")
        };
        assert_eq!(
            (p.previous_phase.as_str(), p.phase.as_str()),
            ("Running", "Failed")
        );
    }

    #[test]
    fn workload_of_a_bare_replicaset_or_job() {
        let job = snap(&fixture("02b-pod-oomkilled-terminated-job.json"));
        assert_eq!(
            (job.workload_kind.as_str(), job.workload_name.as_str()),
            ("Job", "oom-kill-job3")
        );
        // A ReplicaSet whose name does not end in the pod-template-hash is
        // not a Deployment's.
        let mut bare = fixture("01-pod-running-ready.json");
        bare["metadata"]["ownerReferences"][0]["name"] = "standalone".into();
        let bare = snap(&bare);
        assert_eq!(
            (bare.workload_kind.as_str(), bare.workload_name.as_str()),
            ("ReplicaSet", "standalone")
        );
    }
}
