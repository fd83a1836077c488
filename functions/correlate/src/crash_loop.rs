//! Crash-loop rule: a container that restarts `threshold` times within
//! `window` is crash-looping. A pure state machine: `step(state, restart,
//! now) -> (state, insight)`, no I/O, so it is unit-tested directly and the
//! caller decides where state lives (KV, with compare-and-set).
//!
//! Redelivery-safe: a restart already in the state changes nothing but
//! re-emits the current insight with the same id, which the insights
//! stream deduplicates.

use serde::{Deserialize, Serialize};
use tidewatch_proto::v1::{Entity, Insight};
use tidewatch_runtime::event::derive_id;
use tidewatch_runtime::topology::types;

use crate::observation::Observation;
use crate::rule::Rule;
use crate::vocabulary::{Finding, Window, exit_meaning};

/// `[crash_loop]` in the rules file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Restarts within the window that make a crash loop.
    pub threshold: usize,
    pub window: Window,
}

fn yes() -> bool {
    true
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        if self.threshold == 0 {
            return Err("threshold must be at least 1".into());
        }
        if self.window.0.is_zero() {
            return Err("window must be positive".into());
        }
        Ok(())
    }
    pub fn rule(&self) -> CrashLoop {
        CrashLoop {
            threshold: self.threshold,
            window_ns: self.window.nanos(),
        }
    }
}

/// Rule settings.
#[derive(Debug, Clone, Copy)]
pub struct CrashLoop {
    /// Restarts within the window that make a crash loop.
    pub threshold: usize,
    /// How far back restarts count, in nanoseconds.
    pub window_ns: i64,
}

impl Default for CrashLoop {
    fn default() -> Self {
        CrashLoop {
            threshold: 3,
            window_ns: 10 * 60 * 1_000_000_000,
        }
    }
}

/// One observed restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    pub event_id: String,
    pub at_ns: i64,
    /// When this process first folded it in (receive time, ns; 0 unknown):
    /// a repeat past the republish horizon emits nothing (see sequence.rs).
    #[serde(default)]
    pub received_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub container: String,
}

/// State per pod.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Restarts inside the window, oldest first.
    pub restarts: Vec<Restart>,
    /// Id of the open incident, once the threshold was crossed.
    pub incident: Option<String>,
    /// The `container.stable` event that closed the incident (id, event
    /// time, receive time); restarts after it start a new incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<(String, i64, i64)>,
    /// The open incident's revision: bumped by each restart and by the
    /// resolution, never lowered (message ids derive from it).
    #[serde(default)]
    pub revision: u32,
    /// Restarts at or before this time (ns) belong to an incident that is
    /// over: a late or redelivered one changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_ns: Option<i64>,
}

/// Restarts an open incident keeps (its first `threshold` and the newest).
const MAX_KEPT: usize = 64;

/// `pod/<ns>/<name>` as an entity.
fn pod_entity(pod: &str) -> Entity {
    let rest = pod.trim_start_matches("pod/");
    let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
    Entity {
        kind: "pod".into(),
        name: name.into(),
        namespace: namespace.into(),
    }
}

impl CrashLoop {
    pub fn wants(&self, ty: &str) -> bool {
        matches!(
            ty,
            types::CONTAINER_RESTARTED
                | types::CONTAINER_OOMKILLED
                | types::CONTAINER_IMAGE_PULL_FAILED
                | types::CONTAINER_STABLE
                | types::POD_DELETED
        )
    }

    /// The pod's containers ran without restarting for the collector's
    /// `stable_after`, or the pod is gone: the open incident's last
    /// revision, resolved. Its
    /// redelivery repeats that revision; with nothing open, nothing.
    fn resolve(&self, mut state: State, key: &str, obs: &Observation) -> (State, Option<Finding>) {
        let pod = format!("pod/{key}");
        let Some(incident) = state.incident.clone() else {
            return (state, None);
        };
        match &state.resolved_by {
            Some((id, _, received)) if *id == obs.id => {
                if obs.is_stale_repeat(Some(*received)) {
                    return (state, None);
                }
            }
            Some(_) => return (state, None),
            None => {
                let last = state.restarts.iter().map(|r| r.at_ns).max().unwrap_or(0);
                if obs.at_ns <= last || state.restarts.len() < self.threshold {
                    return (state, None);
                }
                state.resolved_by = Some((obs.id.clone(), obs.at_ns, obs.received_ns));
            }
        }
        let finding = self.finding(&state, &pod, &incident);
        (state, Some(finding))
    }

    /// The pod (`<ns>/<name>`) a container event is about.
    pub fn key(&self, obs: &Observation) -> Option<String> {
        obs.value("subject.pod")
    }

    /// [`CrashLoop::step`] for an observation of a container event.
    pub fn step_observation(
        &self,
        state: State,
        key: &str,
        obs: &Observation,
    ) -> (State, Option<Finding>) {
        if obs.ty == types::CONTAINER_STABLE || obs.ty == types::POD_DELETED {
            return self.resolve(state, key, obs);
        }
        let restart = Restart {
            event_id: obs.id.clone(),
            at_ns: obs.at_ns,
            received_ns: obs.received_ns,
            exit_code: obs
                .value("data.exitCode")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
            reason: obs.value("data.reason").unwrap_or_else(|| {
                if obs.ty == types::CONTAINER_IMAGE_PULL_FAILED {
                    "ImagePullBackOff".into()
                } else {
                    String::new()
                }
            }),
            container: obs.value("data.container").unwrap_or_default(),
        };
        let first = state
            .restarts
            .iter()
            .find(|r| r.event_id == restart.event_id)
            .map(|r| r.received_ns);
        if obs.is_stale_repeat(first) {
            return (state, None);
        }
        self.step(state, &format!("pod/{key}"), restart)
    }

    /// Fold one restart of `pod` (`pod/<ns>/<name>`) into the state.
    ///
    /// An incident opens when `threshold` restarts fall within `window`,
    /// and stays open while the container keeps restarting with gaps of at
    /// most `window` (CrashLoopBackOff's 5-minute gaps soon leave fewer
    /// than `threshold` in any window: that is still the same crash loop),
    /// until `container.stable` resolves it. Its revision only grows.
    pub fn step(&self, mut state: State, pod: &str, restart: Restart) -> (State, Option<Finding>) {
        let already_seen = state
            .restarts
            .iter()
            .any(|r| r.event_id == restart.event_id);
        if !already_seen {
            if state.floor_ns.is_some_and(|floor| restart.at_ns <= floor) {
                // From before an incident that is over.
                return (state, None);
            }
            if let Some((_, resolved_at, _)) = state.resolved_by.clone() {
                if restart.at_ns <= resolved_at {
                    // Late news of a resolved incident.
                    return (state, None);
                }
                // Restarting again after it was resolved: a new incident.
                state = State {
                    floor_ns: Some(resolved_at),
                    ..State::default()
                };
            }
            let newest = state.restarts.iter().map(|r| r.at_ns).max();
            if state.incident.is_some()
                && newest.is_some_and(|n| restart.at_ns > n.saturating_add(self.window_ns))
            {
                // Quiet for a whole window: that crash loop ended unseen.
                state = State {
                    floor_ns: newest,
                    ..State::default()
                };
            }
            let at = state
                .restarts
                .iter()
                .position(|r| r.at_ns > restart.at_ns)
                .unwrap_or(state.restarts.len());
            state.restarts.insert(at, restart);
            let newest = state.restarts.iter().map(|r| r.at_ns).max().unwrap_or(0);
            let horizon = newest.saturating_sub(self.window_ns);
            if state.incident.is_none() {
                // Only the window counts toward opening an incident.
                state.restarts.retain(|r| r.at_ns >= horizon);
            } else if state.restarts.len() > MAX_KEPT {
                // An open incident keeps its first restarts (its id and
                // root cause) and the newest.
                let excess = state.restarts.len() - MAX_KEPT;
                state
                    .restarts
                    .drain(self.threshold..self.threshold + excess);
            }
            if state.incident.is_some() {
                state.revision = state.revision.saturating_add(1);
            }
        }
        let Some(incident) = state.incident.clone().or_else(|| {
            (state.restarts.len() >= self.threshold).then(|| {
                let ids: Vec<&[u8]> = state.restarts[..self.threshold]
                    .iter()
                    .map(|r| r.event_id.as_bytes())
                    .collect();
                derive_id(&[b"crash-loop", pod.as_bytes(), &ids.concat()])
            })
        }) else {
            return (state, None);
        };
        if state.incident.is_none() {
            state.incident = Some(incident.clone());
            state.revision = 1;
        }
        let finding = self.finding(&state, pod, &incident);
        (state, Some(finding))
    }

    fn finding(&self, state: &State, pod: &str, incident: &str) -> Finding {
        let first = &state.restarts[0];
        let last = &state.restarts[state.restarts.len() - 1];
        let count = state.restarts.len();
        let meaning = exit_meaning(last.exit_code, &last.reason);
        // Over the incident so far (at least a minute), not the window: an
        // open crash loop keeps all its restarts.
        let minutes = last
            .at_ns
            .saturating_sub(first.at_ns)
            .max(0)
            .saturating_add(59_999_999_999)
            / 60_000_000_000;
        let minutes = minutes.max(1);
        let oom = last.reason == "OOMKilled" || last.exit_code == 137;
        let startup = last.reason.contains("ImagePull");
        let resolved = state.resolved_by.as_ref();
        let mut insight = Insight {
            id: incident.to_string(),
            kind: "crash-loop".into(),
            severity: if oom { "critical" } else { "warning" }.into(),
            summary: if startup {
                format!(
                    "container {} of {pod} failed to start {count} times in {minutes}m: {meaning}",
                    last.container
                )
            } else {
                format!(
                    "container {} of {pod} restarted {count} times in {minutes}m: {meaning}",
                    last.container
                )
            },
            root_cause: meaning,
            root_cause_event_id: first.event_id.clone(),
            evidence_event_ids: state.restarts.iter().map(|r| r.event_id.clone()).collect(),
            affected: vec![pod_entity(pod)],
            first_seen_ns: first.at_ns,
            last_seen_ns: last.at_ns,
            confidence: (0.6 + 0.1 * count.saturating_sub(self.threshold) as f64).min(0.95),
            revision: state.revision.saturating_add(u32::from(resolved.is_some())),
            status: if resolved.is_some() {
                "resolved"
            } else {
                "open"
            }
            .into(),
            resolved_by_event_id: resolved.map(|(id, _, _)| id.clone()).unwrap_or_default(),
            ..Insight::default()
        };
        if let Some((id, at_ns, _)) = resolved {
            insight.evidence_event_ids.push(id.clone());
            insight.last_seen_ns = *at_ns;
        }
        Finding {
            message_id: derive_id(&[
                incident.as_bytes(),
                &u64::from(insight.revision).to_be_bytes(),
            ]),
            subject: pod.to_string(),
            insight,
        }
    }
}

impl Rule for CrashLoop {
    type State = State;
    fn name(&self) -> &str {
        "crash-loop"
    }
    fn wants(&self, ty: &str) -> bool {
        CrashLoop::wants(self, ty)
    }
    fn keys(&self, obs: &Observation) -> Vec<String> {
        self.key(obs).into_iter().collect()
    }
    fn step(&self, state: State, key: &str, obs: &Observation) -> (State, Option<Finding>) {
        self.step_observation(state, key, obs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000_000;

    fn restart(id: &str, at_min: i64, exit_code: i32, reason: &str) -> Restart {
        Restart {
            event_id: id.into(),
            at_ns: at_min * MIN,
            received_ns: 0,
            exit_code,
            reason: reason.into(),
            container: "app".into(),
        }
    }

    #[test]
    fn a_repeat_past_the_republish_horizon_emits_nothing() {
        let rule = CrashLoop::default();
        let obs = |id: &str, received_ns: i64| {
            let mut o = crate::observation::tests::obs(
                id,
                types::CONTAINER_RESTARTED,
                1,
                Some("pod/shop/web-1"),
                serde_json::json!({"exitCode": 1, "container": "app"}),
            );
            o.received_ns = received_ns;
            o.republish_horizon_ns = 60;
            o
        };
        let mut state = State::default();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            state = rule
                .step_observation(state, "shop/web-1", &obs(id, 1_000 + i as i64))
                .0;
        }
        let (state, soon) = rule.step_observation(state, "shop/web-1", &obs("c", 1_030));
        assert!(
            soon.is_some(),
            "within the horizon: republished (the stream dedupes it)"
        );
        let (_, late) = rule.step_observation(state, "shop/web-1", &obs("c", 1_200));
        assert!(late.is_none(), "past the horizon: nothing");
    }

    #[test]
    fn below_threshold_nothing_at_threshold_an_insight() {
        let rule = CrashLoop::default();
        let (s, f) = rule.step(
            State::default(),
            "pod/default/web",
            restart("a", 0, 1, "Error"),
        );
        assert!(f.is_none());
        let (s, f) = rule.step(s, "pod/default/web", restart("b", 1, 1, "Error"));
        assert!(f.is_none());
        let (s, f) = rule.step(s, "pod/default/web", restart("c", 2, 1, "Error"));
        let f = f.expect("third restart in the window is a crash loop");
        assert_eq!(f.insight.kind, "crash-loop");
        assert_eq!(f.insight.evidence_event_ids, vec!["a", "b", "c"]);
        assert_eq!(f.insight.root_cause_event_id, "a");
        assert_eq!(f.insight.severity, "warning");
        assert!(
            f.insight.root_cause.contains("application error"),
            "{}",
            f.insight.root_cause
        );
        assert_eq!(s.incident.as_deref(), Some(f.insight.id.as_str()));
        assert_eq!(
            f.insight.affected,
            vec![Entity {
                kind: "pod".into(),
                name: "web".into(),
                namespace: "default".into()
            }]
        );
    }

    #[test]
    fn redelivery_reemits_the_same_message_and_changes_nothing() {
        let rule = CrashLoop::default();
        let mut s = State::default();
        let mut last = None;
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let (next, f) = rule.step(s, "pod/ns/p", restart(id, i as i64, 137, "OOMKilled"));
            s = next;
            last = f;
        }
        let first = last.expect("insight");
        let (again, f) = rule.step(s.clone(), "pod/ns/p", restart("c", 2, 137, "OOMKilled"));
        assert_eq!(again, s);
        assert_eq!(f.expect("re-emitted"), first);
        assert_eq!(first.insight.severity, "critical");
    }

    #[test]
    fn ongoing_incident_updates_the_same_insight() {
        let rule = CrashLoop::default();
        let mut s = State::default();
        let mut findings = Vec::new();
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            let (next, f) = rule.step(s, "pod/ns/p", restart(id, i as i64, 139, "Error"));
            s = next;
            findings.extend(f);
        }
        assert_eq!(findings.len(), 2);
        assert_eq!(
            findings[0].insight.id, findings[1].insight.id,
            "same incident"
        );
        assert_ne!(
            findings[0].message_id, findings[1].message_id,
            "a new version of it"
        );
        assert_eq!(findings[1].insight.revision, 2);
        assert!(findings[1].insight.root_cause.contains("SIGSEGV"));
    }

    #[test]
    fn restarts_outside_the_window_do_not_count() {
        let rule = CrashLoop::default();
        let (s, _) = rule.step(State::default(), "pod/ns/p", restart("a", 0, 1, "Error"));
        let (s, _) = rule.step(s, "pod/ns/p", restart("b", 7, 1, "Error"));
        let (s, f) = rule.step(s, "pod/ns/p", restart("c", 16, 1, "Error"));
        assert!(f.is_none(), "a is 16 minutes old");
        assert_eq!(s.restarts.len(), 2);
    }

    #[test]
    fn late_arrivals_outside_the_window_do_not_count() {
        let rule = CrashLoop::default();
        let (s, _) = rule.step(State::default(), "pod/ns/p", restart("c", 23, 1, "Error"));
        let (s, _) = rule.step(s, "pod/ns/p", restart("b", 12, 1, "Error"));
        let (s, f) = rule.step(s, "pod/ns/p", restart("a", 1, 1, "Error"));
        assert!(f.is_none(), "{s:?}");
        assert_eq!(s.restarts.len(), 1, "only c is within 10m of the newest");
    }

    #[test]
    fn exit_codes_mean_what_they_mean() {
        assert!(exit_meaning(137, "Error").contains("SIGKILL"));
        assert!(exit_meaning(137, "OOMKilled").contains("OOM"));
        assert!(exit_meaning(130, "Error").contains("signal 2"));
        assert!(exit_meaning(2, "Error").contains("code 2"));
        assert!(exit_meaning(0, "ErrImagePull").contains("startup failure"));
        assert!(exit_meaning(139, "Error").contains("SIGSEGV"));
    }

    #[test]
    fn a_stable_container_resolves_the_crash_loop_and_new_restarts_open_another() {
        let rule = CrashLoop::default();
        let obs = |id: &str, ty: &str, at_min: i64| {
            crate::observation::tests::obs(
                id,
                ty,
                at_min * 60,
                Some("pod/shop/web-1"),
                serde_json::json!({"exitCode": 139, "container": "app"}),
            )
        };
        let mut state = State::default();
        let mut findings = Vec::new();
        for (id, at) in [("a", 1), ("b", 2), ("c", 3)] {
            let (next, f) = rule.step_observation(
                state,
                "shop/web-1",
                &obs(id, types::CONTAINER_RESTARTED, at),
            );
            state = next;
            findings.extend(f);
        }
        let open = findings.last().expect("a crash loop").clone();
        assert_eq!(open.insight.status, "open");
        // A stable event older than the last restart does not resolve.
        let (state, none) = rule.step_observation(
            state,
            "shop/web-1",
            &obs("early", types::CONTAINER_STABLE, 2),
        );
        assert!(none.is_none());
        let (state, resolved) =
            rule.step_observation(state, "shop/web-1", &obs("s1", types::CONTAINER_STABLE, 14));
        let resolved = resolved.expect("resolved");
        assert_eq!(resolved.insight.id, open.insight.id);
        assert_eq!(resolved.insight.status, "resolved");
        assert_eq!(resolved.insight.resolved_by_event_id, "s1");
        assert_eq!(resolved.insight.revision, open.insight.revision + 1);
        assert_ne!(resolved.message_id, open.message_id);
        let (state, again) =
            rule.step_observation(state, "shop/web-1", &obs("s1", types::CONTAINER_STABLE, 14));
        assert_eq!(
            again.map(|f| f.message_id),
            Some(resolved.message_id.clone()),
            "redelivery repeats it"
        );
        // A late restart from before the resolution changes nothing.
        let (state, late) = rule.step_observation(
            state,
            "shop/web-1",
            &obs("z", types::CONTAINER_RESTARTED, 4),
        );
        assert!(late.is_none());
        // Crashing again: a new incident.
        let mut state = state;
        let mut later = Vec::new();
        for (id, at) in [("d", 20), ("e", 21), ("f", 22)] {
            let (next, f) = rule.step_observation(
                state,
                "shop/web-1",
                &obs(id, types::CONTAINER_RESTARTED, at),
            );
            state = next;
            later.extend(f);
        }
        let fresh = later.last().expect("a new crash loop");
        assert_ne!(fresh.insight.id, open.insight.id);
        assert_eq!(fresh.insight.status, "open");
        // Nothing open: a stable event says nothing.
        let (_, nothing) = rule.step_observation(
            State::default(),
            "shop/web-1",
            &obs("s2", types::CONTAINER_STABLE, 30),
        );
        assert!(nothing.is_none());
    }

    /// CrashLoopBackOff caps the gap at 5 minutes, so after the first burst
    /// fewer than `threshold` restarts fall in any 10-minute window: still
    /// one incident, whose revision only grows, up to its resolution.
    #[test]
    fn a_backing_off_crash_loop_stays_one_incident_with_growing_revisions() {
        let rule = CrashLoop::default();
        let mut state = State::default();
        let mut findings = Vec::new();
        for (i, at) in [0, 1, 2, 7, 12, 17, 22, 27].into_iter().enumerate() {
            let (next, f) = rule.step(state, "pod/ns/p", restart(&format!("r{i}"), at, 1, "Error"));
            state = next;
            findings.extend(f);
        }
        assert_eq!(findings.len(), 6, "one revision per restart from the third");
        assert!(
            findings
                .iter()
                .all(|f| f.insight.id == findings[0].insight.id)
        );
        let revisions: Vec<u32> = findings.iter().map(|f| f.insight.revision).collect();
        assert_eq!(revisions, [1, 2, 3, 4, 5, 6]);
        let stable = crate::observation::tests::obs(
            "ok",
            types::CONTAINER_STABLE,
            40 * 60,
            Some("pod/ns/p"),
            serde_json::json!({}),
        );
        let (state, resolved) = rule.step_observation(state, "ns/p", &stable);
        let resolved = resolved.expect("resolved");
        assert_eq!(
            (resolved.insight.revision, resolved.insight.status.as_str()),
            (7, "resolved")
        );
        // A redelivered restart repeats the current revision (same message).
        let (state, again) = rule.step(state, "pod/ns/p", restart("r3", 7, 1, "Error"));
        assert_eq!(
            again.map(|f| f.message_id),
            Some(resolved.message_id.clone())
        );
        // One older than the resolution that arrives late: nothing.
        let (state, none) = rule.step(state, "pod/ns/p", restart("late", 30, 1, "Error"));
        assert!(none.is_none());
        // A long quiet spell, then restarts again: a new incident.
        let mut state = state;
        let mut later = Vec::new();
        for (i, at) in [100, 101, 102].into_iter().enumerate() {
            let (next, f) = rule.step(state, "pod/ns/p", restart(&format!("n{i}"), at, 1, "Error"));
            state = next;
            later.extend(f);
        }
        assert_eq!(later.len(), 1);
        assert_ne!(later[0].insight.id, findings[0].insight.id);
        assert_eq!(later[0].insight.revision, 1);
    }

    #[test]
    fn a_deleted_pod_ends_its_crash_loop() {
        let rule = CrashLoop::default();
        let mut state = State::default();
        for (i, at) in [1, 2, 3].into_iter().enumerate() {
            state = rule
                .step(state, "pod/ns/p", restart(&format!("r{i}"), at, 1, "Error"))
                .0;
        }
        let deleted = crate::observation::tests::obs(
            "gone",
            types::POD_DELETED,
            10 * 60,
            Some("pod/ns/p"),
            serde_json::json!({"namespace": "ns", "pod": "p"}),
        );
        assert_eq!(rule.keys(&deleted), ["ns/p"]);
        let (_, resolved) = rule.step_observation(state, "ns/p", &deleted);
        let resolved = resolved.expect("resolved");
        assert_eq!(resolved.insight.status, "resolved");
        assert_eq!(resolved.insight.resolved_by_event_id, "gone");
    }
}
