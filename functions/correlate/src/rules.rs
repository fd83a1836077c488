//! The rules file (TOML): tunes the built-in rules and declares threshold /
//! sequence rules, loaded at start (`--rules FILE`; the shipped
//! `rules/default.toml` when not given). Unknown keys, bad references and
//! impossible rules are refused with a message naming the problem.
//!
//! Each rule it enables is a [`crate::rule::Rule`].

use serde::Deserialize;

use crate::crash_loop;
use crate::rule::DynRule;
use crate::sequence::SequenceRule;

/// The rules shipped with correlate.
pub const DEFAULT_RULES: &str = include_str!("../rules/default.toml");

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

/// Why a rules file is refused: which file, and what in it.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct RulesError {
    /// The file (or "built-in rules").
    pub origin: String,
    /// What is wrong, naming the rule, key or value.
    pub reason: String,
}

impl RulesFile {
    /// Parse and validate a rules file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<RulesFile, RulesError> {
        let refuse = |reason: String| RulesError {
            origin: origin.to_string(),
            reason,
        };
        let file: RulesFile = toml::from_str(text).map_err(|e| refuse(e.to_string()))?;
        let mut names = std::collections::BTreeSet::new();
        for rule in &file.sequence {
            rule.validate().map_err(refuse)?;
            if !names.insert(rule.name.as_str())
                || ["crash-loop", "bad-rollout"].contains(&rule.name.as_str())
            {
                return Err(refuse(format!("two rules are named {:?}", rule.name)));
            }
        }
        if let Some(c) = &file.crash_loop {
            c.validate()
                .map_err(|e| refuse(format!("[crash_loop] {e}")))?;
        }
        if let Some(c) = &file.bad_rollout {
            c.validate()
                .map_err(|e| refuse(format!("[bad_rollout] {e}")))?;
        }
        Ok(file)
    }

    /// The shipped rules.
    pub fn builtin() -> RulesFile {
        RulesFile::parse(DEFAULT_RULES, "built-in rules").expect("the shipped rules are valid")
    }

    /// The event types the enabled rules read that `delivered` (whether the
    /// function's consumer is delivered a type) misses, each with a rule
    /// that reads it: every Tidewatch type a rule wants, and every literal
    /// type a sequence rule names (a third party's).
    pub fn undelivered(&self, delivered: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let rules = self.clone().into_rules();
        let mut missing = Vec::new();
        for t in tidewatch_runtime::topology::types::ALL {
            if let Some(rule) = rules.iter().find(|r| r.wants(t.name))
                && !delivered(t.name)
            {
                missing.push((t.name.to_string(), rule.name().to_string()));
            }
        }
        for rule in self.sequence.iter().filter(|r| r.enabled) {
            let named = rule
                .steps
                .iter()
                .flat_map(|s| s.types.iter())
                .chain(rule.resolve.iter().flat_map(|r| r.types.iter()));
            for ty in named.filter(|t| !t.contains('*')) {
                if !delivered(ty) && !missing.iter().any(|(m, _)| m == ty) {
                    missing.push((ty.clone(), rule.name.clone()));
                }
            }
        }
        missing
    }

    /// Who supersedes whom among the enabled rules (`incident.rs`).
    pub fn roles(&self) -> crate::incident::Roles {
        let mut roles = crate::incident::Roles::default();
        if let Some(c) = self.bad_rollout.as_ref().filter(|c| c.enabled) {
            roles.add("bad-rollout", &c.supersedes, c.window.nanos());
        }
        for rule in self.sequence.iter().filter(|r| r.enabled) {
            roles.add(&rule.name, &rule.supersedes, rule.window.nanos());
        }
        roles
    }

    /// The enabled rules, as the engine drives them.
    pub fn into_rules(self) -> Vec<Box<dyn DynRule>> {
        let mut rules: Vec<Box<dyn DynRule>> = Vec::new();
        if let Some(c) = self.crash_loop.filter(|c| c.enabled) {
            rules.push(Box::new(c.rule()));
        }
        if let Some(c) = self.bad_rollout.filter(|c| c.enabled) {
            rules.push(Box::new(c.rule()));
        }
        for rule in self.sequence.into_iter().filter(|r| r.enabled) {
            rules.push(Box::new(rule));
        }
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::Observation;
    use crate::vocabulary::Window;

    #[test]
    fn the_shipped_rules_load() {
        let rules = RulesFile::builtin().into_rules();
        let names: Vec<&str> = rules.iter().map(|r| r.name()).collect();
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
                    let (bytes, by_step) = rule.step_bytes(stored.as_deref(), &key, obs);
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
        assert_eq!(Window::parse("10m").expect("ok").0.as_secs(), 600);
        assert_eq!(Window::parse("500ms").expect("ok").0.as_millis(), 500);
        assert!(Window::parse("10 minutes").is_err());
        assert_eq!(Window::parse("2h").expect("ok").to_string(), "2h");
    }

    #[test]
    fn bad_files_are_refused_with_a_clear_message() {
        let err = RulesFile::parse("[[sequence]]\nname = \"x\"\nbogus = 1\n", "r.toml")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("r.toml") && err.contains("bogus"), "{err}");
        let rule = |extra: &str, step: &str| {
            format!(
                "[[sequence]]\nname = \"x\"\nentity = \"pod\"\nkey = [\"pod\"]\nwindow = \"5m\"\nsummary = \"s {{key}}\"\nroot_cause = \"r\"\n{extra}\n[[sequence.steps]]\nname = \"a\"\ntypes = [\"dev.tidewatch.k8s.container.restarted\"]\n{step}\n"
            )
        };
        assert!(RulesFile::parse(&rule("", ""), "ok").is_ok());
        let err = RulesFile::parse(&rule("", "key = [\"labels.app\"]"), "f")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("labels.app"), "{err}");
        let err = RulesFile::parse(&rule("", "count = 0"), "f")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("count"), "{err}");
        let err = RulesFile::parse(&rule("severity = \"meh\"", ""), "f")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("severity"), "{err}");
        let err = RulesFile::parse(&rule("", "optional = true"), "f")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("required step"), "{err}");
        let err = RulesFile::parse(&rule("", "").replace("5m", "5 min"), "f")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("5 min"), "{err}");
        let err = RulesFile::parse(&rule("", "").replace("s {key}", "s {count.zzz}"), "f")
            .expect_err("refused")
            .to_string();
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
            let (next, f) = rule.step_bytes(state.as_deref(), &keys[0], &o);
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
        let (_, f) = rule.step_bytes(state.as_deref(), "ns/a", &o);
        let i = f.expect("third matching report").insight;
        assert_eq!(i.summary, "3 retransmit reports for ns/a");
        assert_eq!(i.root_cause, "network trouble towards 10.0.0.9");
        assert_eq!(i.evidence_event_ids, ["t0", "t2", "t9"]);
    }

    #[test]
    fn the_shipped_rules_read_only_what_correlate_is_delivered() {
        let spec =
            tidewatch_runtime::topology::FunctionSpec::from_toml(include_str!("../function.toml"))
                .expect("function.toml");
        let filters = tidewatch_runtime::topology::consumer_filter_subjects(&spec.consumer);
        let delivered = |ty: &str| {
            let subject = tidewatch_runtime::topology::subjects::enriched("k8s", "n1", ty);
            filters
                .iter()
                .any(|f| tidewatch_runtime::topology::subjects::matches(f, &subject))
        };
        assert_eq!(
            RulesFile::builtin().undelivered(delivered),
            Vec::<(String, String)>::new()
        );
        // A rule reading something else is named, with what it reads.
        let extra = format!(
            "{}\n[[sequence]]\nname = \"exec-storm\"\nentity = \"pod\"\nkey = [\"pod\"]\nwindow = \"1m\"\nsummary = \"s\"\nroot_cause = \"r\"\n[[sequence.steps]]\nname = \"execs\"\ntypes = [\"dev.tidewatch.kernel.process.exec\", \"com.example.audit\"]\ncount = 100\n",
            DEFAULT_RULES
        );
        let file = RulesFile::parse(&extra, "test").expect("valid");
        assert_eq!(
            file.undelivered(delivered),
            [
                (
                    "dev.tidewatch.kernel.process.exec".to_string(),
                    "exec-storm".to_string()
                ),
                ("com.example.audit".to_string(), "exec-storm".to_string())
            ]
        );
    }
}
