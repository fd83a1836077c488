//! The rules file (TOML): tunes the built-in rules and declares threshold /
//! sequence rules, loaded at start (`--rules FILE`; the shipped
//! `rules/default.toml` when not given). Unknown keys, bad references and
//! impossible rules are refused with a message naming the problem.
//!
//! Every rule is a pure state machine over one join key: [`Rule::step`]
//! takes the key's state (bytes from KV, `None` when new), an observation
//! and returns the new state and the finding, without I/O.

use std::fmt;

use serde::{Deserialize, Serialize};
use tidewatch_proto::v1::Insight;

use crate::bad_rollout::BadRollout;
use crate::crash_loop::{self, CrashLoop};
use crate::observation::Observation;
use crate::sequence::{self, SequenceRule};

/// The rules shipped with correlate.
pub const DEFAULT_RULES: &str = include_str!("../rules/default.toml");

/// A duration written as `30s`, `10m`, `2h`, `500ms` or `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn nanos(self) -> i64 {
        i64::try_from(self.0.as_nanos()).unwrap_or(i64::MAX)
    }
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("duration {s:?}: expected a number and a unit (30s, 10m, 2h)"))?;
        let secs = match unit {
            "ms" => return Ok(Duration(std::time::Duration::from_millis(n))),
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86400,
            u => {
                return Err(format!(
                    "duration {s:?}: unknown unit {u:?} (ms, s, m, h, d)"
                ));
            }
        };
        Ok(Duration(std::time::Duration::from_secs(secs)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        if self.0.subsec_nanos() != 0 {
            write!(f, "{}ms", self.0.as_millis())
        } else if s.is_multiple_of(3600) && s > 0 {
            write!(f, "{}h", s / 3600)
        } else if s.is_multiple_of(60) && s > 0 {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One version of an insight: the insight, the message id of this version
/// (stable per revision, so redelivery is deduplicated) and its subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub message_id: String,
    /// The entity the insight is about, `<kind>/<key>` (the event subject).
    pub subject: String,
    pub insight: Insight,
}

/// The whole rules file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default)]
    pub crash_loop: Option<crash_loop::Config>,
    #[serde(default)]
    pub bad_rollout: Option<crate::bad_rollout::Config>,
    #[serde(default)]
    pub sequence: Vec<SequenceRule>,
}

impl RulesFile {
    /// Parse and validate a rules file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<RulesFile, String> {
        let file: RulesFile = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        let mut names = std::collections::BTreeSet::new();
        for rule in &file.sequence {
            rule.validate().map_err(|e| format!("{origin}: {e}"))?;
            if !names.insert(rule.name.as_str())
                || ["crash-loop", "bad-rollout"].contains(&rule.name.as_str())
            {
                return Err(format!("{origin}: two rules are named {:?}", rule.name));
            }
        }
        if let Some(c) = &file.crash_loop {
            c.validate()
                .map_err(|e| format!("{origin}: [crash_loop] {e}"))?;
        }
        if let Some(c) = &file.bad_rollout {
            c.validate()
                .map_err(|e| format!("{origin}: [bad_rollout] {e}"))?;
        }
        Ok(file)
    }

    /// The shipped rules.
    pub fn builtin() -> RulesFile {
        RulesFile::parse(DEFAULT_RULES, "built-in rules").expect("the shipped rules are valid")
    }

    pub fn into_rules(self) -> Vec<Rule> {
        let mut rules = Vec::new();
        if let Some(c) = self.crash_loop.filter(|c| c.enabled) {
            rules.push(Rule::CrashLoop(c.rule()));
        }
        if let Some(c) = self.bad_rollout.filter(|c| c.enabled) {
            rules.push(Rule::BadRollout(c.rule()));
        }
        rules.extend(
            self.sequence
                .into_iter()
                .filter(|r| r.enabled)
                .map(Rule::Sequence),
        );
        rules
    }
}

/// A loaded rule.
#[derive(Debug, Clone)]
pub enum Rule {
    CrashLoop(CrashLoop),
    BadRollout(BadRollout),
    Sequence(SequenceRule),
}

impl Rule {
    pub fn name(&self) -> &str {
        match self {
            Rule::CrashLoop(_) => "crash-loop",
            Rule::BadRollout(_) => "bad-rollout",
            Rule::Sequence(r) => &r.name,
        }
    }

    /// Whether events of this type can matter to the rule (cheap filter before decoding).
    pub fn wants(&self, ty: &str) -> bool {
        match self {
            Rule::CrashLoop(r) => r.wants(ty),
            Rule::BadRollout(r) => r.wants(ty),
            Rule::Sequence(r) => r.wants(ty),
        }
    }

    /// Join keys of an observation (empty: the rule ignores it).
    pub fn keys(&self, obs: &Observation) -> Vec<String> {
        match self {
            Rule::CrashLoop(r) => r.key(obs).into_iter().collect(),
            Rule::BadRollout(r) => r.key(obs).into_iter().collect(),
            Rule::Sequence(r) => r.keys(obs),
        }
    }

    /// The KV key of the state for one join key.
    pub fn state_key(&self, key: &str) -> String {
        format!(
            "{}.{}",
            self.name(),
            tidewatch_runtime::topology::pod_keys::token(key)
        )
    }

    /// Fold `obs` into the serialized state of `key`: the new state (None:
    /// unchanged) and the finding. Unreadable state starts over.
    #[cfg(test)]
    pub fn step(
        &self,
        state: Option<&[u8]>,
        key: &str,
        obs: &Observation,
    ) -> (Option<Vec<u8>>, Option<Finding>) {
        let (current, readable) = self.decode(state);
        let (next, changed, finding) = self.fold(current, readable, key, obs);
        (changed.then(|| next.encode()), finding)
    }

    /// Read stored state (`None`: new key). Unreadable state starts empty,
    /// and the flag is false so that the next fold rewrites it.
    pub fn decode(&self, bytes: Option<&[u8]>) -> (State, bool) {
        fn go<S: for<'de> Deserialize<'de> + Default>(bytes: Option<&[u8]>) -> (S, bool) {
            match bytes.map(serde_json::from_slice::<S>) {
                None => (S::default(), true),
                Some(Ok(s)) => (s, true),
                Some(Err(_)) => (S::default(), false),
            }
        }
        match self {
            Rule::CrashLoop(_) => {
                let (s, ok) = go(bytes);
                (State::CrashLoop(s), ok)
            }
            Rule::BadRollout(_) => {
                let (s, ok) = go(bytes);
                (State::BadRollout(s), ok)
            }
            Rule::Sequence(_) => {
                let (s, ok) = go(bytes);
                (State::Sequence(s), ok)
            }
        }
    }

    /// Fold `obs` into decoded state: the next state, whether it must be
    /// written (changed, or the stored bytes were unreadable; an empty state
    /// is not created) and the finding.
    pub fn fold(
        &self,
        state: State,
        readable: bool,
        key: &str,
        obs: &Observation,
    ) -> (State, bool, Option<Finding>) {
        fn go<S: PartialEq + Clone>(
            current: S,
            readable: bool,
            wrap: fn(S) -> State,
            f: impl FnOnce(S) -> (S, Option<Finding>),
        ) -> (State, bool, Option<Finding>) {
            let (next, finding) = f(current.clone());
            let changed = next != current || !readable;
            (wrap(next), changed, finding)
        }
        match (self, state) {
            (Rule::CrashLoop(r), State::CrashLoop(s)) => go(s, readable, State::CrashLoop, |s| {
                r.step_observation(s, key, obs)
            }),
            (Rule::BadRollout(r), State::BadRollout(s)) => {
                go(s, readable, State::BadRollout, |s| r.step(s, key, obs))
            }
            (Rule::Sequence(r), State::Sequence(s)) => {
                go(s, readable, State::Sequence, |s| r.step(s, key, obs))
            }
            // State of another rule: cannot happen (state keys are per rule); start over.
            (rule, _) => {
                let (empty, _) = rule.decode(None);
                rule.fold(empty, false, key, obs)
            }
        }
    }
}

/// Decoded state of one rule for one join key.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    CrashLoop(crash_loop::State),
    BadRollout(crate::bad_rollout::State),
    Sequence(sequence::State),
}

impl State {
    /// The bytes stored in KV.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            State::CrashLoop(s) => serde_json::to_vec(s),
            State::BadRollout(s) => serde_json::to_vec(s),
            State::Sequence(s) => serde_json::to_vec(s),
        }
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_rules_load() {
        let rules = RulesFile::builtin().into_rules();
        let names: Vec<&str> = rules.iter().map(Rule::name).collect();
        assert_eq!(
            names,
            [
                "crash-loop",
                "bad-rollout",
                "oom-cascade",
                "node-runtime-failure",
                "service-disruption"
            ]
        );
    }

    #[test]
    fn folding_decoded_state_matches_stepping_stored_bytes() {
        // correlate keeps decoded state between events and folds several
        // observations per write; that must equal one stored step at a time.
        use tidewatch_runtime::topology::types;
        let rules = RulesFile::builtin().into_rules();
        let events: Vec<Observation> = (0..6)
            .map(|i| {
                let mut o = crate::observation::tests::obs(
                    &format!("r{i}"),
                    types::CONTAINER_RESTARTED,
                    i,
                    Some("pod/ns/web-5d4b-x"),
                    serde_json::json!({"container": "app", "exitCode": 1, "node": "n1"}),
                );
                o.ext.insert("node".into(), "n1".into());
                o.ext
                    .insert("workload".into(), "ReplicaSet/web-5d4b".into());
                o
            })
            .collect();
        for rule in &rules {
            let mut stored: Option<Vec<u8>> = Some(b"not json".to_vec());
            let (mut state, mut readable) = rule.decode(stored.as_deref());
            for obs in &events {
                for key in rule.keys(obs) {
                    let (bytes, by_step) = rule.step(stored.as_deref(), &key, obs);
                    stored = bytes.or(stored);
                    let (next, changed, by_fold) = rule.fold(state, readable, &key, obs);
                    state = next;
                    readable = true;
                    assert_eq!(by_fold, by_step, "{}", rule.name());
                    if changed {
                        assert_eq!(Some(state.encode()), stored, "{}", rule.name());
                    }
                }
            }
        }
    }

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("10m").expect("ok").0.as_secs(), 600);
        assert_eq!(Duration::parse("500ms").expect("ok").0.as_millis(), 500);
        assert!(Duration::parse("10 minutes").is_err());
        assert_eq!(Duration::parse("2h").expect("ok").to_string(), "2h");
    }

    #[test]
    fn bad_files_are_refused_with_a_clear_message() {
        let err = RulesFile::parse("[[sequence]]\nname = \"x\"\nbogus = 1\n", "r.toml")
            .expect_err("refused");
        assert!(err.contains("r.toml") && err.contains("bogus"), "{err}");
        let rule = |extra: &str, step: &str| {
            format!(
                "[[sequence]]\nname = \"x\"\nentity = \"pod\"\nkey = [\"pod\"]\nwindow = \"5m\"\nsummary = \"s {{key}}\"\nroot_cause = \"r\"\n{extra}\n[[sequence.steps]]\nname = \"a\"\ntypes = [\"dev.tidewatch.k8s.container.restarted\"]\n{step}\n"
            )
        };
        assert!(RulesFile::parse(&rule("", ""), "ok").is_ok());
        let err = RulesFile::parse(&rule("", "key = [\"labels.app\"]"), "f").expect_err("refused");
        assert!(err.contains("labels.app"), "{err}");
        let err = RulesFile::parse(&rule("", "count = 0"), "f").expect_err("refused");
        assert!(err.contains("count"), "{err}");
        let err = RulesFile::parse(&rule("severity = \"meh\"", ""), "f").expect_err("refused");
        assert!(err.contains("severity"), "{err}");
        let err = RulesFile::parse(&rule("", "optional = true"), "f").expect_err("refused");
        assert!(err.contains("required step"), "{err}");
        let err = RulesFile::parse(&rule("", "").replace("5m", "5 min"), "f").expect_err("refused");
        assert!(err.contains("5 min"), "{err}");
        let err = RulesFile::parse(&rule("", "").replace("s {key}", "s {count.zzz}"), "f")
            .expect_err("refused");
        assert!(err.contains("zzz"), "{err}");
    }

    #[test]
    fn a_user_threshold_rule_fires() {
        let text = r#"
[[sequence]]
name = "retransmit-storm"
entity = "pod"
key = ["pod"]
window = "1m"
summary = "{count.retransmits} retransmit reports for {key}"
root_cause = "network trouble towards {root.data.daddr}"
[[sequence.steps]]
name = "retransmits"
types = ["dev.tidewatch.kernel.tcp.retransmit"]
where = { "data.dport" = ["443", "80"] }
count = 3
"#;
        let rules = RulesFile::parse(text, "user").expect("ok").into_rules();
        let rule = &rules[0];
        let mut state: Option<Vec<u8>> = None;
        let mut last = None;
        for i in 0..3 {
            let mut o = crate::observation::tests::obs(
                &format!("t{i}"),
                "dev.tidewatch.kernel.tcp.retransmit",
                i,
                Some("pod/ns/a"),
                serde_json::json!({"daddr": "10.0.0.9", "dport": if i == 1 { 22 } else { 443 }}),
            );
            o.ext.clear();
            let keys = rule.keys(&o);
            if i == 1 {
                assert!(keys.is_empty(), "port 22 does not match the filter");
                continue;
            }
            assert_eq!(keys, ["ns/a"]);
            let (next, f) = rule.step(state.as_deref(), &keys[0], &o);
            state = next.or(state);
            last = f;
        }
        assert!(last.is_none(), "port 22 does not count");
        let o = crate::observation::tests::obs(
            "t9",
            "dev.tidewatch.kernel.tcp.retransmit",
            5,
            Some("pod/ns/a"),
            serde_json::json!({"daddr": "10.0.0.9", "dport": 80}),
        );
        let (_, f) = rule.step(state.as_deref(), "ns/a", &o);
        let i = f.expect("third matching report").insight;
        assert_eq!(i.summary, "3 retransmit reports for ns/a");
        assert_eq!(i.root_cause, "network trouble towards 10.0.0.9");
        assert_eq!(i.evidence_event_ids, ["t0", "t2", "t9"]);
    }
}
