//! Declarative threshold/sequence rules: "these events, on the same key,
//! within a window, (in this order), this many times". A pure state machine:
//! [`SequenceRule::step`] folds one observation into the state of one key
//! and says which insight (if any) the state now supports.
//!
//! Matching is recomputed from the set of observations each time, in event
//! time order, so the outcome does not depend on the order events arrive
//! in (replicas, redelivery). Each observation counts for one step: in
//! `strict` order, the earliest required step not yet satisfied that it
//! matches and whose predecessors were satisfied before it happened; else
//! an optional step; else a step already satisfied (extra evidence).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidewatch_proto::v1::{Entity, Insight};
use tidewatch_runtime::event::derive_id;
use tidewatch_runtime::topology::types;

use crate::observation::{Observation, check_reference, entity, subject_entity};
use crate::rule::Rule;
use crate::vocabulary::{Finding, Window};

/// Evidence kept per key at most; the oldest extra evidence goes first.
pub const MAX_EVIDENCE: usize = 64;

/// Optional-only evidence kept per key while no required step has any.
pub const MAX_UNANCHORED: usize = 8;

/// How the steps of a sequence must be ordered in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Each required step only counts events after the previous one was satisfied.
    #[default]
    Strict,
    /// Steps may be satisfied in any order within the window.
    Any,
}

/// One string or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A `[[sequence]]` rule of the rules file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceRule {
    /// Insight kind (`oom-cascade`); also names the rule's state keys.
    pub name: String,
    /// Set false to switch a shipped rule off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `critical`, `warning` or `info`.
    #[serde(default = "warning")]
    pub severity: String,
    /// Kind of entity the join key names: `pod`, `node`, `service`, `deployment`...
    pub entity: String,
    /// Field references tried in order to find an event's join key; a step may override.
    #[serde(default)]
    pub key: Vec<String>,
    /// All evidence of one incident lies within this window (and an open
    /// incident closes after this long without new evidence).
    pub window: Window,
    #[serde(default)]
    pub order: Order,
    /// One-line summary, a template (see the rules file header).
    pub summary: String,
    /// Root cause sentence, a template.
    pub root_cause: String,
    /// Confidence when the required steps match, 0..1; each satisfied optional step adds 0.05.
    #[serde(default = "confidence")]
    pub confidence: f64,
    pub steps: Vec<Step>,
    /// What closes an open incident (endpoints back, node Ready): published
    /// as the incident's last revision, status `resolved`, with the event.
    #[serde(default)]
    pub resolve: Option<Resolve>,
    /// Rules whose findings this one explains better: a finding of theirs
    /// about an entity this incident covers attaches to it instead of
    /// paging on its own (see `incident.rs`).
    #[serde(default)]
    pub supersedes: Vec<crate::incident::Supersedes>,
}

/// The `[sequence.resolve]` table: events that end an incident.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// Event types (patterns with `*`).
    pub types: Vec<String>,
    /// Field reference → accepted value(s); all must match.
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, OneOrMany>,
    /// Join key references, instead of the rule's.
    #[serde(default)]
    pub key: Option<Vec<String>>,
}

/// One step of a sequence rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Name used in templates (`{count.restarts}`, `{step.oom.data.victim.comm}`).
    pub name: String,
    /// Event types (patterns with `*`).
    pub types: Vec<String>,
    /// Field reference → accepted value(s) (patterns with `*`); all must match.
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, OneOrMany>,
    /// Events needed to satisfy the step.
    #[serde(default = "one")]
    pub count: usize,
    /// Adds evidence (and confidence) but is not needed to fire.
    #[serde(default)]
    pub optional: bool,
    /// Join key references for this step's events, instead of the rule's.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// The first event of this step is the root cause (default: the first step).
    #[serde(default)]
    pub root_cause: bool,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn warning() -> String {
    "warning".into()
}
fn confidence() -> f64 {
    0.7
}

/// State of one rule for one key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Observations that matched a step, in event time order.
    pub events: Vec<Observation>,
    /// The open incident, once the required steps matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<Incident>,
    /// Hashes of the newest [`MAX_SEEN`] event ids folded in, evidence or
    /// not: a redelivery of an event the evidence cap dropped is still
    /// recognised, so it cannot bump the incident's revision (a new
    /// insight id) past the stream's dedupe window.
    /// With each, when it was first folded in (ns, receive time; 0 if
    /// unknown): a repeat past the observation's republish horizon (the
    /// stream's dedupe window exceeded, e.g. a collector's spool replayed
    /// after a long partition) changes nothing and emits nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<(u64, i64)>,
}

/// Event ids a state remembers beyond its evidence.
pub const MAX_SEEN: usize = 256;
/// Largest encoded state: well under the KV bucket's largest value (and
/// the server's max payload), so one key can never refuse every write.
pub const MAX_STATE_BYTES: usize = 256 * 1024;
/// Largest `data` kept per stored observation: what templates read is a
/// few scalar fields; a producer's 60 KiB payload is not kept 64 times.
pub const MAX_KEPT_DATA_BYTES: usize = 2 * 1024;

/// Remember an event id as folded in, the oldest forgotten past [`MAX_SEEN`].
fn remember_seen(state: &mut State, hash: u64, received_ns: i64) {
    if state.seen.len() >= MAX_SEEN {
        state.seen.remove(0);
    }
    state.seen.push((hash, received_ns));
}

fn id_hash(id: &str) -> u64 {
    // FNV-1a: stable across processes and versions (the state is shared).
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `obs` as kept in state: its data trimmed to [`MAX_KEPT_DATA_BYTES`]
/// (top-level scalars first, each bounded) when it is bigger.
fn kept(obs: &Observation) -> Observation {
    let mut kept = obs.clone();
    let size = serde_json::to_vec(&kept.data).map_or(usize::MAX, |v| v.len());
    if size <= MAX_KEPT_DATA_BYTES {
        return kept;
    }
    let mut trimmed = serde_json::Map::new();
    let mut budget = MAX_KEPT_DATA_BYTES;
    if let serde_json::Value::Object(fields) = &obs.data {
        for (name, value) in fields {
            let value = match value {
                serde_json::Value::String(s) if s.len() > 256 => {
                    let mut cut = 256;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    serde_json::Value::String(s[..cut].to_string())
                }
                serde_json::Value::Object(_) | serde_json::Value::Array(_) => continue,
                v => v.clone(),
            };
            let cost = name.len() + value.to_string().len() + 4;
            if cost > budget {
                break;
            }
            budget -= cost;
            trimmed.insert(name.clone(), value);
        }
    }
    kept.data = serde_json::Value::Object(trimmed);
    kept
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    /// Bumped by every new piece of evidence while open, and once more
    /// when it is resolved.
    pub revision: u32,
    /// The event that resolved it; evidence after it starts a new incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<Observation>,
}

/// Which step each observation counts for.
struct Assignment {
    /// Step index per event (None: not counted).
    step: Vec<Option<usize>>,
    /// Events per step, in time order.
    per_step: Vec<Vec<usize>>,
    fired: bool,
}

impl SequenceRule {
    fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }

    /// Refuse rules that can never work, naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        let at = |what: String| format!("sequence rule {:?}: {what}", self.name);
        if self.name.is_empty()
            || self
                .name
                .contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(at("name must be non-empty [a-z0-9-]".into()));
        }
        if !["critical", "warning", "info"].contains(&self.severity.as_str()) {
            return Err(at(format!(
                "severity {:?} is not critical, warning or info",
                self.severity
            )));
        }
        if self.steps.is_empty() || self.steps.iter().all(|s| s.optional) {
            return Err(at("needs at least one required step".into()));
        }
        if self.window.0.is_zero() {
            return Err(at("window must be positive".into()));
        }
        if !(0.0..=1.0).contains(&self.confidence) {
            return Err(at("confidence must be within 0..1".into()));
        }
        let mut names = std::collections::BTreeSet::new();
        for step in &self.steps {
            if !names.insert(step.name.as_str()) {
                return Err(at(format!("two steps are named {:?}", step.name)));
            }
            if step.types.is_empty() {
                return Err(at(format!("step {:?} matches no event types", step.name)));
            }
            if step.count == 0 {
                return Err(at(format!(
                    "step {:?}: count must be at least 1",
                    step.name
                )));
            }
            let keys = step.key.as_ref().unwrap_or(&self.key);
            if keys.is_empty() {
                return Err(at(format!(
                    "step {:?} has no join key (set `key` on the rule or the step)",
                    step.name
                )));
            }
            for r in keys.iter().chain(step.filter.keys()) {
                check_reference(r).map_err(|e| at(format!("step {:?}: {e}", step.name)))?;
            }
        }
        if let Some(resolve) = &self.resolve {
            if resolve.types.is_empty() {
                return Err(at("resolve matches no event types".into()));
            }
            for r in resolve.key.iter().flatten().chain(resolve.filter.keys()) {
                check_reference(r).map_err(|e| at(format!("resolve: {e}")))?;
            }
        }
        for s in &self.supersedes {
            s.validate().map_err(at)?;
        }
        for template in [&self.summary, &self.root_cause] {
            crate::template::check(template, &self.step_names()).map_err(at)?;
        }
        Ok(())
    }

    pub fn wants(&self, ty: &str) -> bool {
        self.enabled
            && (self
                .steps
                .iter()
                .any(|s| s.types.iter().any(|p| types::matches(p, ty)))
                || self
                    .resolve
                    .as_ref()
                    .is_some_and(|r| r.types.iter().any(|p| types::matches(p, ty))))
    }

    /// Whether `obs` is an event that resolves this rule's incidents.
    fn resolves(&self, obs: &Observation) -> bool {
        self.resolve.as_ref().is_some_and(|r| {
            r.types.iter().any(|p| types::matches(p, &obs.ty))
                && r.filter.iter().all(|(reference, accepted)| {
                    obs.values(reference)
                        .iter()
                        .any(|v| accepted.as_slice().iter().any(|p| types::matches(p, v)))
                })
        })
    }

    fn step_matches(step: &Step, obs: &Observation) -> bool {
        step.types.iter().any(|p| types::matches(p, &obs.ty))
            && step.filter.iter().all(|(reference, accepted)| {
                let values = obs.values(reference);
                values
                    .iter()
                    .any(|v| accepted.as_slice().iter().any(|p| types::matches(p, v)))
            })
    }

    /// The join keys of `obs` for this rule (several when a key reference
    /// names an array), each with nothing else implied.
    pub fn keys(&self, obs: &Observation) -> Vec<String> {
        let mut keys = Vec::new();
        let resolve_keys = self
            .resolve
            .as_ref()
            .filter(|_| self.resolves(obs))
            .map(|r| r.key.as_ref().unwrap_or(&self.key));
        let step_keys = self
            .steps
            .iter()
            .filter(|step| Self::step_matches(step, obs))
            .map(|step| step.key.as_ref().unwrap_or(&self.key));
        for refs in resolve_keys.into_iter().chain(step_keys) {
            if let Some(values) = refs.iter().map(|r| obs.values(r)).find(|v| !v.is_empty()) {
                for v in values {
                    if !keys.contains(&v) {
                        keys.push(v);
                    }
                }
            }
        }
        keys
    }

    fn assign(&self, events: &[Observation]) -> Assignment {
        let n = self.steps.len();
        let mut step = vec![None; events.len()];
        let mut per_step: Vec<Vec<usize>> = vec![Vec::new(); n];
        let required: Vec<usize> = (0..n).filter(|&i| !self.steps[i].optional).collect();
        // Index into `required` of the step a strict sequence waits for.
        let mut next = 0usize;
        for (e, obs) in events.iter().enumerate() {
            let matching: Vec<usize> = (0..n)
                .filter(|&i| Self::step_matches(&self.steps[i], obs))
                .collect();
            if matching.is_empty() {
                continue;
            }
            let satisfied =
                |i: usize, per_step: &Vec<Vec<usize>>| per_step[i].len() >= self.steps[i].count;
            let chosen = match self.order {
                Order::Strict => {
                    let current = required.get(next).copied();
                    if let Some(c) = current.filter(|c| matching.contains(c)) {
                        Some(c)
                    } else if let Some(&o) = matching.iter().find(|&&i| {
                        // An optional step counts once the required steps before it are satisfied.
                        self.steps[i].optional
                            && required
                                .iter()
                                .take_while(|&&r| r < i)
                                .all(|&r| satisfied(r, &per_step))
                    }) {
                        Some(o)
                    } else {
                        matching
                            .iter()
                            .copied()
                            .find(|&i| !self.steps[i].optional && satisfied(i, &per_step))
                    }
                }
                Order::Any => matching
                    .iter()
                    .copied()
                    .find(|&i| !satisfied(i, &per_step))
                    .or_else(|| matching.first().copied()),
            };
            if let Some(c) = chosen {
                step[e] = Some(c);
                per_step[c].push(e);
                while required.get(next).is_some_and(|&r| satisfied(r, &per_step)) {
                    next += 1;
                }
            }
        }
        let fired = required
            .iter()
            .all(|&r| per_step[r].len() >= self.steps[r].count);
        Assignment {
            step,
            per_step,
            fired,
        }
    }

    /// Fold `obs` (for join key `key`) into `state`.
    pub fn step(&self, mut state: State, key: &str, obs: &Observation) -> (State, Option<Finding>) {
        let hash = id_hash(&obs.id);
        let first_seen = state.seen.iter().find(|(h, _)| *h == hash).map(|(_, t)| *t);
        if obs.is_stale_repeat(first_seen) {
            return (state, None);
        }
        let duplicate = first_seen.is_some() || state.events.iter().any(|e| e.id == obs.id);
        if self.resolves(obs) {
            return self.resolve_step(state, key, obs, hash, duplicate);
        }
        if !duplicate
            && state
                .incident
                .as_ref()
                .is_some_and(|i| i.resolved_by.as_ref().is_some_and(|r| obs.at_ns > r.at_ns))
        {
            // Evidence after the resolution: a new incident.
            state = State {
                seen: std::mem::take(&mut state.seen),
                ..State::default()
            };
        } else if !duplicate
            && state
                .incident
                .as_ref()
                .is_some_and(|i| i.resolved_by.is_some())
        {
            // Late evidence of an incident already resolved: remembered as
            // seen, changes nothing.
            remember_seen(&mut state, hash, obs.received_ns);
            return (state, None);
        }
        if !duplicate {
            if state.seen.len() >= MAX_SEEN {
                state.seen.remove(0);
            }
            state.seen.push((hash, obs.received_ns));
            let window = self.window.nanos();
            let last = state.events.iter().map(|e| e.at_ns).max();
            if state.incident.is_some()
                && last.is_some_and(|l| obs.at_ns > l.saturating_add(window))
            {
                // The incident went quiet for a whole window: it is over
                // (the ids seen stay: a late redelivery is still one).
                state = State {
                    seen: std::mem::take(&mut state.seen),
                    ..State::default()
                };
            }
            let at = state
                .events
                .iter()
                .position(|e| (e.at_ns, e.id.as_str()) > (obs.at_ns, obs.id.as_str()))
                .unwrap_or(state.events.len());
            state.events.insert(at, kept(obs));
            if state.incident.is_none() {
                let newest = state
                    .events
                    .iter()
                    .map(|e| e.at_ns)
                    .max()
                    .unwrap_or(obs.at_ns);
                state
                    .events
                    .retain(|e| e.at_ns >= newest.saturating_sub(window));
            }
        }
        let anchored = state.events.iter().any(|e| {
            self.steps
                .iter()
                .any(|s| !s.optional && Self::step_matches(s, e))
        });
        if !anchored && state.events.len() > MAX_UNANCHORED {
            // Only optional evidence (pod restarts on a healthy node): keep
            // the newest few, in case the cause arrives late, not a hot key's worth.
            let excess = state.events.len() - MAX_UNANCHORED;
            state.events.drain(..excess);
        }
        let mut assignment = self.assign(&state.events);
        if !duplicate {
            // Events that count for nothing yet are kept (an earlier event may
            // still arrive), but bounded like the evidence.
            while state.events.len() > MAX_EVIDENCE
                || (state.events.len() > 1
                    && serde_json::to_vec(&state).map_or(0, |v| v.len()) > MAX_STATE_BYTES)
            {
                let core = self.core(&assignment);
                let Some(drop) = (0..state.events.len()).find(|i| !core.contains(i)) else {
                    break;
                };
                state.events.remove(drop);
                assignment = self.assign(&state.events);
            }
        }
        if !assignment.fired {
            return (state, None);
        }
        let counted = assignment.step[state
            .events
            .iter()
            .position(|e| e.id == obs.id)
            .unwrap_or(0)]
        .is_some();
        match &mut state.incident {
            None => {
                let core = self.core(&assignment);
                let ids: Vec<&[u8]> = core
                    .iter()
                    .map(|&i| state.events[i].id.as_bytes())
                    .collect();
                state.incident = Some(Incident {
                    id: derive_id(&[self.name.as_bytes(), key.as_bytes(), &ids.concat()]),
                    revision: 1,
                    resolved_by: None,
                });
            }
            // Saturating: the count comes from stored state, which may be anything.
            Some(incident) if !duplicate && counted => {
                incident.revision = incident.revision.saturating_add(1)
            }
            Some(_) => {}
        }
        let finding = self.finding(&state, &assignment, key);
        (state, Some(finding))
    }

    /// An event that resolves: the open incident's last revision, status
    /// resolved (its redelivery repeats that revision); nothing when no
    /// incident is open, or it started after this event.
    fn resolve_step(
        &self,
        mut state: State,
        key: &str,
        obs: &Observation,
        hash: u64,
        duplicate: bool,
    ) -> (State, Option<Finding>) {
        let resolved_by_this = state
            .incident
            .as_ref()
            .and_then(|i| i.resolved_by.as_ref())
            .is_some_and(|r| r.id == obs.id);
        if !duplicate {
            remember_seen(&mut state, hash, obs.received_ns);
            // Newer than the newest evidence of the required steps: an
            // out-of-order Ready older than the NotReady it would close
            // does not close it.
            let assignment = self.assign(&state.events);
            let required_newest = (0..self.steps.len())
                .filter(|&i| !self.steps[i].optional)
                .flat_map(|i| {
                    assignment.per_step[i]
                        .iter()
                        .map(|&e| state.events[e].at_ns)
                })
                .max();
            if let Some(incident) = state.incident.as_mut()
                && incident.resolved_by.is_none()
                && required_newest.is_some_and(|s| obs.at_ns >= s)
            {
                incident.revision = incident.revision.saturating_add(1);
                incident.resolved_by = Some(kept(obs));
            } else {
                return (state, None);
            }
        } else if !resolved_by_this {
            return (state, None);
        }
        let assignment = self.assign(&state.events);
        if !assignment.fired {
            return (state, None);
        }
        let finding = self.finding(&state, &assignment, key);
        (state, Some(finding))
    }

    /// The events that satisfy the required steps first.
    fn core(&self, a: &Assignment) -> Vec<usize> {
        let mut core: Vec<usize> = (0..self.steps.len())
            .filter(|&i| !self.steps[i].optional)
            .flat_map(|i| a.per_step[i].iter().take(self.steps[i].count).copied())
            .collect();
        core.sort_unstable();
        core
    }

    fn finding(&self, state: &State, a: &Assignment, key: &str) -> Finding {
        let incident = state.incident.clone().expect("fired");
        let evidence: Vec<&Observation> = (0..state.events.len())
            .filter(|&i| a.step[i].is_some())
            .map(|i| &state.events[i])
            .collect();
        let root_step = self.steps.iter().position(|s| s.root_cause).unwrap_or(0);
        let root = a.per_step[root_step]
            .first()
            .or_else(|| a.per_step.iter().find_map(|s| s.first()))
            .map(|&i| &state.events[i])
            .expect("a fired rule has evidence");
        let last = evidence.last().copied().unwrap_or(root);
        let ctx = crate::template::Ctx {
            key,
            window: self.window,
            steps: self.step_names(),
            per_step: a
                .per_step
                .iter()
                .map(|v| v.iter().map(|&i| &state.events[i]).collect())
                .collect(),
            root,
            last,
        };
        let mut affected: Vec<Entity> = vec![entity(&self.entity, key)];
        for obs in &evidence {
            let mut candidates: Vec<Entity> = subject_entity(obs).into_iter().collect();
            if let Some(pod) = obs.value("pod") {
                candidates.push(entity("pod", &pod));
            }
            if let Some(node) = obs.first_of(&["ext.node"]) {
                candidates.push(entity("node", &node));
            }
            for e in candidates {
                if !affected.contains(&e) {
                    affected.push(e);
                }
            }
        }
        let resolved_by = incident.resolved_by.as_ref();
        let optional_hit = (0..self.steps.len())
            .filter(|&i| self.steps[i].optional && !a.per_step[i].is_empty())
            .count();
        let insight = Insight {
            id: incident.id.clone(),
            kind: self.name.clone(),
            severity: self.severity.clone(),
            summary: crate::template::render(&self.summary, &ctx),
            root_cause: crate::template::render(&self.root_cause, &ctx),
            root_cause_event_id: root.id.clone(),
            evidence_event_ids: evidence
                .iter()
                .map(|e| e.id.clone())
                .chain(resolved_by.map(|r| r.id.clone()))
                .collect(),
            affected,
            first_seen_ns: evidence.first().map(|e| e.at_ns).unwrap_or(root.at_ns),
            last_seen_ns: resolved_by.map_or(last.at_ns, |r| r.at_ns),
            confidence: (self.confidence + 0.05 * optional_hit as f64).min(0.99),
            revision: incident.revision,
            status: if resolved_by.is_some() {
                "resolved"
            } else {
                "open"
            }
            .to_string(),
            resolved_by_event_id: resolved_by.map(|r| r.id.clone()).unwrap_or_default(),
            ..Insight::default()
        };
        Finding {
            message_id: derive_id(&[
                incident.id.as_bytes(),
                &u64::from(incident.revision).to_be_bytes(),
            ]),
            subject: format!("{}/{key}", self.entity),
            insight,
        }
    }
}

impl Rule for SequenceRule {
    type State = State;
    fn name(&self) -> &str {
        &self.name
    }
    fn wants(&self, ty: &str) -> bool {
        SequenceRule::wants(self, ty)
    }
    fn keys(&self, obs: &Observation) -> Vec<String> {
        SequenceRule::keys(self, obs)
    }
    fn step(&self, state: State, key: &str, obs: &Observation) -> (State, Option<Finding>) {
        SequenceRule::step(self, state, key, obs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::tests::obs;
    use crate::rules::RulesFile;
    use serde_json::json;

    fn rule(name: &str) -> SequenceRule {
        RulesFile::builtin()
            .sequence
            .into_iter()
            .find(|r| r.name == name)
            .expect("shipped rule")
    }

    fn run(rule: &SequenceRule, events: &[Observation]) -> (State, Vec<Finding>) {
        let mut state = State::default();
        let mut findings = Vec::new();
        for e in events {
            for key in rule.keys(e) {
                let (next, f) = rule.step(state, &key, e);
                state = next;
                findings.extend(f);
            }
        }
        (state, findings)
    }

    fn oom_events() -> Vec<Observation> {
        let mut kernel = obs(
            "k1",
            types::OOM_KILL,
            10,
            None,
            json!({"victim": {"comm": "java", "pid": 4242, "containerId": "c0ffee"}, "memoryLimitBytes": 268435456}),
        );
        kernel.ext.insert("namespace".into(), "shop".into());
        kernel.ext.insert("pod".into(), "cart-1".into());
        kernel.ext.insert("container".into(), "cart".into());
        let r1 = obs(
            "r1",
            types::CONTAINER_OOMKILLED,
            12,
            Some("pod/shop/cart-1"),
            json!({"container": "cart", "reason": "OOMKilled", "exitCode": 137, "restartCount": 1, "memoryLimitBytes": 268435456}),
        );
        let r2 = obs(
            "r2",
            types::CONTAINER_RESTARTED,
            40,
            Some("pod/shop/cart-1"),
            json!({"container": "cart", "reason": "OOMKilled", "exitCode": 137, "restartCount": 2}),
        );
        vec![kernel, r1, r2]
    }

    #[test]
    fn oom_cascade_names_container_limit_and_killing_event() {
        let rule = rule("oom-cascade");
        let events = oom_events();
        let (_, findings) = run(&rule, &events[..2]);
        assert!(findings.is_empty(), "one restart is not a cascade yet");
        let (state, findings) = run(&rule, &events);
        assert_eq!(findings.len(), 1);
        let i = &findings[0].insight;
        assert_eq!(i.kind, "oom-cascade");
        assert_eq!(i.root_cause_event_id, "k1");
        assert_eq!(i.evidence_event_ids, vec!["k1", "r1", "r2"]);
        assert!(i.root_cause.contains("cart"), "{}", i.root_cause);
        assert!(i.root_cause.contains("256 MiB"), "{}", i.root_cause);
        assert!(i.root_cause.contains("java"), "{}", i.root_cause);
        assert_eq!(findings[0].subject, "pod/shop/cart-1");
        assert_eq!(i.revision, 1);
        assert!(state.incident.is_some());
    }

    #[test]
    fn arrival_order_does_not_change_the_outcome() {
        let rule = rule("oom-cascade");
        let events = oom_events();
        let (a, fa) = run(&rule, &events);
        let reversed: Vec<Observation> = events.iter().rev().cloned().collect();
        let (b, fb) = run(&rule, &reversed);
        assert_eq!(a.events, b.events);
        assert_eq!(
            fa.last().map(|f| &f.insight.evidence_event_ids),
            fb.last().map(|f| &f.insight.evidence_event_ids)
        );
        assert_eq!(
            fa.last().map(|f| &f.insight.id),
            fb.last().map(|f| &f.insight.id)
        );
    }

    #[test]
    fn restarts_before_the_oom_kill_do_not_count_in_strict_order() {
        let rule = rule("oom-cascade");
        let mut events = oom_events();
        events[1].at_ns = 5_000_000_000;
        events[2].at_ns = 6_000_000_000;
        let (_, findings) = run(&rule, &events);
        assert!(findings.is_empty());
    }

    #[test]
    fn redelivery_repeats_the_same_message_and_updates_bump_the_revision() {
        let rule = rule("oom-cascade");
        let events = oom_events();
        let (state, findings) = run(&rule, &events);
        let (again, f) = rule.step(state.clone(), "shop/cart-1", &events[2]);
        assert_eq!(again, state);
        assert_eq!(
            f.as_ref().map(|f| &f.message_id),
            Some(&findings[0].message_id)
        );
        let more = obs(
            "r3",
            types::CONTAINER_RESTARTED,
            90,
            Some("pod/shop/cart-1"),
            json!({"container": "cart"}),
        );
        let (_, f) = rule.step(state, "shop/cart-1", &more);
        let f = f.expect("update");
        assert_eq!(f.insight.id, findings[0].insight.id);
        assert_eq!(f.insight.revision, 2);
        assert_ne!(f.message_id, findings[0].message_id);
        assert_eq!(
            f.insight.evidence_event_ids.last().map(String::as_str),
            Some("r3")
        );
    }

    #[test]
    fn a_quiet_window_closes_the_incident() {
        let rule = rule("oom-cascade");
        let (state, findings) = run(&rule, &oom_events());
        let late = obs(
            "r9",
            types::CONTAINER_RESTARTED,
            40 + 3600,
            Some("pod/shop/cart-1"),
            json!({}),
        );
        let (state, f) = rule.step(state, "shop/cart-1", &late);
        assert!(f.is_none());
        assert!(state.incident.is_none());
        assert_eq!(state.events.len(), 1);
        assert_eq!(findings.len(), 1);
    }

    #[test]
    fn endpoints_dropping_joins_the_cascade_by_pod_list() {
        let rule = rule("oom-cascade");
        let (state, _) = run(&rule, &oom_events());
        let ep = obs(
            "ep1",
            types::ENDPOINTS_EMPTY,
            45,
            Some("service/shop/cart"),
            json!({"namespace": "shop", "service": "cart", "notReadyPods": ["shop/cart-1", "shop/cart-2"]}),
        );
        assert_eq!(rule.keys(&ep), vec!["shop/cart-1", "shop/cart-2"]);
        let (_, f) = rule.step(state, "shop/cart-1", &ep);
        let i = f.expect("update").insight;
        assert_eq!(i.evidence_event_ids, vec!["k1", "r1", "r2", "ep1"]);
        assert!(
            i.affected
                .iter()
                .any(|e| e.kind == "service" && e.name == "cart")
        );
        assert!(i.confidence > 0.8);
    }

    #[test]
    fn node_runtime_failure_needs_the_runtime_then_notready() {
        let rule = rule("node-runtime-failure");
        let unit = obs(
            "u1",
            types::UNIT_FAILED,
            10,
            Some("unit/kubelet.service"),
            json!({"unit": "kubelet.service", "node": "n1", "activeState": "failed", "result": "exit-code"}),
        );
        let other = obs(
            "u0",
            types::UNIT_FAILED,
            9,
            Some("unit/cron.service"),
            json!({"unit": "cron.service", "node": "n1"}),
        );
        let notready = obs(
            "nr",
            types::NODE_NOT_READY,
            50,
            Some("node/n1"),
            json!({"node": "n1", "reason": "KubeletNotReady"}),
        );
        let mut pod = obs(
            "p1",
            types::CONTAINER_RESTARTED,
            70,
            Some("pod/default/web-1"),
            json!({"node": "n1", "container": "web"}),
        );
        pod.ext.insert("node".into(), "n1".into());
        let (_, f) = run(&rule, &[other.clone(), notready.clone()]);
        assert!(f.is_empty(), "cron failing is not a runtime failure");
        let (_, f) = run(&rule, &[other, unit, notready, pod]);
        assert_eq!(
            f.len(),
            2,
            "fires on NotReady, updates when a pod is affected"
        );
        let i = &f[1].insight;
        assert_eq!(i.root_cause_event_id, "u1");
        assert_eq!(i.evidence_event_ids, vec!["u1", "nr", "p1"]);
        assert!(
            i.affected
                .iter()
                .any(|e| e.kind == "pod" && e.name == "web-1")
        );
        assert!(i.summary.contains("kubelet.service"), "{}", i.summary);
        assert_eq!(f[0].insight.id, f[1].insight.id);
    }

    #[test]
    fn a_crash_looping_container_runtime_is_a_root_cause_too() {
        let rule = rule("node-runtime-failure");
        let looping = obs(
            "cl",
            types::UNIT_CRASH_LOOP,
            10,
            Some("unit/containerd.service"),
            json!({"unit": "containerd.service", "node": "n2", "activeState": "activating", "nRestarts": 5}),
        );
        let notready = obs(
            "nr2",
            types::NODE_NOT_READY,
            40,
            Some("node/n2"),
            json!({"node": "n2", "reason": "ContainerRuntimeNotReady"}),
        );
        let (_, f) = run(&rule, &[looping, notready]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].insight.root_cause_event_id, "cl");
        assert!(
            f[0].insight.root_cause.contains("containerd.service"),
            "{}",
            f[0].insight.root_cause
        );
    }

    #[test]
    fn optional_evidence_alone_is_bounded() {
        let rule = rule("node-runtime-failure");
        let mut state = State::default();
        for i in 0..50 {
            let mut pod = obs(
                &format!("p{i}"),
                types::CONTAINER_RESTARTED,
                i,
                Some("pod/default/web-1"),
                json!({"node": "n1"}),
            );
            pod.ext.insert("node".into(), "n1".into());
            let (next, f) = rule.step(state, "n1", &pod);
            assert!(f.is_none());
            state = next;
        }
        assert_eq!(state.events.len(), MAX_UNANCHORED);
        assert_eq!(state.events[0].id, "p42");
    }

    fn refusal(id: &str, at: i64, pad: usize) -> Observation {
        let mut o = obs(
            id,
            types::TCP_REFUSED,
            at,
            None,
            json!({"daddr": "10.96.0.10", "dport": 80, "padding": "x".repeat(pad)}),
        );
        o.ext.insert("peerservice".into(), "shop/api".into());
        o
    }

    /// Empty endpoints, then `refusals` refused connections to the service.
    fn disruption(refusals: i64, pad: usize) -> Vec<Observation> {
        let ep = obs(
            "ep",
            types::ENDPOINTS_EMPTY,
            1,
            Some("service/shop/api"),
            json!({"service": "api"}),
        );
        let mut events = vec![ep];
        events.extend((0..refusals).map(|i| refusal(&format!("t{i}"), 2 + i, pad)));
        events
    }

    #[test]
    fn oom_root_cause_says_which_fallback_it_printed() {
        let rule = rule("oom-cascade");
        let events = oom_events();
        let (_, with_kernel) = run(&rule, &events);
        let cause = &with_kernel.last().expect("fires").insight.root_cause;
        assert!(cause.contains("process java (pid 4242)"), "{cause}");
        let mut k8s_only = events[1..].to_vec();
        for (i, at) in [(3, 70), (4, 100)] {
            let mut more = events[2].clone();
            more.id = format!("r{i}");
            more.at_ns = at * 1_000_000_000;
            k8s_only.push(more);
        }
        let (_, without) = run(&rule, &k8s_only);
        let cause = &without
            .last()
            .expect("fires without the kernel event")
            .insight
            .root_cause;
        assert!(cause.contains("container cart (exit code 137)"), "{cause}");
        assert!(!cause.contains("pid 137"), "{cause}");
    }

    #[test]
    fn redelivery_of_capped_evidence_keeps_the_revision() {
        let rule = rule("service-disruption");
        let events = disruption(100, 0);
        let (state, _) = run(&rule, &events);
        assert!(
            state.events.iter().all(|e| e.id != "t10"),
            "t10 was dropped by the evidence cap"
        );
        let revision = state.incident.as_ref().expect("open").revision;
        let key = rule.keys(&events[11]).remove(0);
        let (again, _) = rule.step(state, &key, &events[11]);
        assert_eq!(
            again.incident.expect("open").revision,
            revision,
            "a redelivery is not new evidence"
        );
    }

    #[test]
    fn a_repeat_past_the_republish_horizon_emits_nothing() {
        let rule = rule("service-disruption");
        let mut events = disruption(3, 0);
        for (i, e) in events.iter_mut().enumerate() {
            e.received_ns = 1_000 + i as i64;
            e.republish_horizon_ns = 60;
        }
        let (state, findings) = run(&rule, &events);
        assert_eq!(findings.len(), 1);
        let key = rule.keys(&events[3]).remove(0);
        let mut soon = events[3].clone();
        soon.received_ns += 30;
        let (state, f) = rule.step(state, &key, &soon);
        assert!(
            f.is_some(),
            "within the horizon: republished (the stream dedupes it)"
        );
        let mut late = events[3].clone();
        late.received_ns += 120;
        let (_, f) = rule.step(state, &key, &late);
        assert!(f.is_none(), "past the horizon: nothing to republish");
    }

    #[test]
    fn state_stays_under_the_kv_value_limit() {
        let rule = rule("service-disruption");
        let events = disruption(80, 60 * 1024);
        let (state, findings) = run(&rule, &events);
        let size = serde_json::to_vec(&state).expect("encodes").len();
        assert!(size <= MAX_STATE_BYTES, "state is {size} bytes");
        assert!(!findings.is_empty());
        let refusal = state
            .events
            .iter()
            .find(|e| e.id.starts_with('t'))
            .expect("kept");
        assert_eq!(refusal.data["dport"], 80, "small fields are kept");
    }

    #[test]
    fn service_disruption_in_any_order() {
        let rule = rule("service-disruption");
        let tcp = |id: &str, at: i64| {
            let mut o = obs(
                id,
                types::TCP_REFUSED,
                at,
                None,
                json!({"daddr": "10.96.0.10", "dport": 80}),
            );
            o.ext.insert("peerservice".into(), "shop/api".into());
            o
        };
        let ep = obs(
            "ep",
            types::ENDPOINTS_EMPTY,
            12,
            Some("service/shop/api"),
            json!({"service": "api"}),
        );
        let (_, f) = run(&rule, &[tcp("t1", 10), tcp("t2", 11), ep.clone()]);
        assert!(f.is_empty(), "two refusals are below the threshold");
        let (_, f) = run(&rule, &[tcp("t1", 10), tcp("t2", 11), ep, tcp("t3", 13)]);
        let i = &f.last().expect("fires").insight;
        assert_eq!(i.root_cause_event_id, "ep");
        assert_eq!(i.evidence_event_ids, vec!["t1", "t2", "ep", "t3"]);
        assert!(i.summary.contains("shop/api"), "{}", i.summary);
    }

    #[test]
    fn endpoints_recovering_resolves_the_disruption_once() {
        let rule = rule("service-disruption");
        let mut events = disruption(3, 0);
        let recovered = obs(
            "back",
            types::ENDPOINTS_RECOVERED,
            60,
            Some("service/shop/api"),
            json!({"service": "api"}),
        );
        events.push(recovered.clone());
        let (state, findings) = run(&rule, &events);
        let last = findings.last().expect("findings");
        assert_eq!(last.insight.status, "resolved");
        assert_eq!(last.insight.resolved_by_event_id, "back");
        assert_eq!(
            last.insight.evidence_event_ids.last().map(String::as_str),
            Some("back")
        );
        assert!(
            findings[..findings.len() - 1]
                .iter()
                .all(|f| f.insight.status == "open")
        );
        assert!(
            findings.iter().all(|f| f.insight.id == last.insight.id),
            "one incident id"
        );
        assert_eq!(
            last.insight.revision,
            findings[findings.len() - 2].insight.revision + 1
        );
        // Redelivery of the resolving event: the same revision, the same message.
        let (state, again) = rule.step(state, "shop/api", &recovered);
        assert_eq!(
            again.as_ref().map(|f| &f.message_id),
            Some(&last.message_id)
        );
        // Trouble after the resolution is a new incident.
        let mut later = disruption(3, 0);
        for (i, e) in later.iter_mut().enumerate() {
            e.id = format!("later-{i}");
            e.at_ns += 120_000_000_000;
        }
        let mut state = state;
        let mut newer = Vec::new();
        for e in &later {
            for key in rule.keys(e) {
                let (next, f) = rule.step(state, &key, e);
                state = next;
                newer.extend(f);
            }
        }
        let fresh = newer.last().expect("a new incident");
        assert_ne!(fresh.insight.id, last.insight.id);
        assert_eq!(fresh.insight.status, "open");
    }

    #[test]
    fn a_recovery_with_nothing_open_says_nothing() {
        let rule = rule("service-disruption");
        let recovered = obs(
            "back",
            types::ENDPOINTS_RECOVERED,
            60,
            Some("service/shop/api"),
            json!({}),
        );
        assert_eq!(rule.keys(&recovered), ["shop/api"]);
        let (_, findings) = run(&rule, &[recovered]);
        assert!(findings.is_empty());
        // Nor does one older than the incident it would close.
        let mut events = vec![obs(
            "early",
            types::ENDPOINTS_RECOVERED,
            0,
            Some("service/shop/api"),
            json!({}),
        )];
        events.extend(disruption(3, 0));
        let (_, findings) = run(&rule, &events);
        assert!(findings.iter().all(|f| f.insight.status == "open"));
    }

    /// containerd failed at 1 s, node n1 NotReady at `notready_at` s.
    fn runtime_then_notready(notready_at: i64) -> [Observation; 2] {
        [
            obs(
                "u1",
                types::UNIT_FAILED,
                1,
                Some("unit/containerd.service"),
                json!({"unit": "containerd.service", "node": "n1", "activeState": "failed"}),
            ),
            obs(
                "nr",
                types::NODE_NOT_READY,
                notready_at,
                Some("node/n1"),
                json!({"node": "n1"}),
            ),
        ]
    }

    fn node_ready(id: &str, at: i64) -> Observation {
        obs(
            id,
            types::NODE_READY,
            at,
            Some("node/n1"),
            json!({"node": "n1"}),
        )
    }

    #[test]
    fn the_node_ready_again_resolves_the_runtime_failure() {
        let rule = rule("node-runtime-failure");
        let [runtime, notready] = runtime_then_notready(5);
        let (_, findings) = run(&rule, &[runtime, notready, node_ready("ok", 90)]);
        let statuses: Vec<&str> = findings.iter().map(|f| f.insight.status.as_str()).collect();
        assert_eq!(statuses, ["open", "resolved"]);
    }

    #[test]
    fn a_ready_older_than_the_notready_does_not_resolve() {
        let rule = rule("node-runtime-failure");
        let [runtime, notready] = runtime_then_notready(50);
        // A Ready from before the NotReady (a flap), delivered late.
        let stale_ready = node_ready("old", 30);
        let (_, findings) = run(&rule, &[runtime, notready, stale_ready]);
        assert!(
            findings.iter().all(|f| f.insight.status == "open"),
            "{findings:?}"
        );
    }
}
