#![allow(clippy::unwrap_used)] // test code: a failed step is the test failing
//! Fuzzing what correlate reads from outside: the rules file (any text, the
//! shipped file damaged, generated rules with extreme values), event data
//! (protobuf or JSON, well-formed or not) and the rule state stored in KV
//! (any bytes, or real state with its numbers and order scrambled). No
//! input may panic; a bad rules file is refused naming the file.

use cloudevents::{EventBuilder, EventBuilderV10};
use proptest::prelude::*;
use tidewatch_runtime::topology::types;

use crate::observation::Observation;
use crate::rule::DynRule;
use crate::rules::{DEFAULT_RULES, RulesFile};

/// 256 cases per property unless `PROPTEST_CASES` says otherwise (long runs).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const ORIGIN: &str = "fuzz.toml";

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::from(s).to_string()
}

/// Durations as people (and typos) write them, including ones whose
/// nanoseconds do not fit anything.
fn window() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        (0u64..100).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("99999999999999999999".to_string()),
        Just(String::new()),
    ];
    let unit = prop::sample::select(vec!["ms", "s", "m", "h", "d", "x", "", " m", "µs"]);
    (number, unit).prop_map(|(n, u)| format!("{n}{u}"))
}

fn count() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..5).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("\"3\"".to_string()),
        Just("1.5".to_string()),
    ]
}

fn reference() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "pod",
            "id",
            "type",
            "subject",
            "subject.pod",
            "source.node",
            "ext.node",
            "data.victim.comm",
            "data.",
            "ext.",
            "data..x",
            "labels.app",
            "",
        ])
        .prop_map(str::to_string),
        "[a-z.]{0,12}",
    ]
}

/// Templates built from placeholders, braces and text.
fn template() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "{key}",
            "{window}",
            "{count}",
            "{count.a}",
            "{count.zz}",
            "{root.id}",
            "{last.data.x|key}",
            "{step.a.data.memoryLimitBytes:bytes}",
            "{step.b}",
            "{",
            "}",
            "{{",
            "}}",
            "{}",
            "|",
            ":bytes",
            " ",
        ])
        .prop_map(str::to_string),
        ".{0,6}",
    ];
    proptest::collection::vec(piece, 0..6).prop_map(|p| p.concat())
}

/// A whole rules file with every knob drawn from the strategies above.
fn generated_rules() -> impl Strategy<Value = String> {
    let head = (count(), window(), count(), window());
    let rule = (
        "[a-z0-9-]{0,8}",
        prop::sample::select(vec!["critical", "warning", "info", "meh"]),
        proptest::collection::vec(reference(), 0..3),
        window(),
        prop::sample::select(vec!["strict", "any", "sideways"]),
        prop_oneof![Just(0.7f64), any::<f64>()],
        template(),
        template(),
    );
    let ty = prop_oneof![
        prop::sample::select(types::ALL.iter().map(|t| t.name).collect::<Vec<_>>())
            .prop_map(str::to_string),
        Just("dev.tidewatch.*".to_string()),
        "[a-z.*]{0,12}",
    ];
    let step = (
        prop::sample::select(vec!["a", "b", "a"]),
        proptest::collection::vec(ty, 0..3),
        count(),
        any::<bool>(),
        proptest::option::of((reference(), ".{0,6}")),
        proptest::option::of(proptest::collection::vec(reference(), 0..2)),
        any::<bool>(),
    );
    (head, rule, proptest::collection::vec(step, 0..3)).prop_map(|((t, w, m, w2), rule, steps)| {
        let (name, severity, key, w3, order, confidence, summary, root) = rule;
        let list = |v: &[String]| format!("[{}]", v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "));
        let confidence = if confidence.is_finite() { confidence.to_string() } else { "nan".to_string() };
        let mut out = format!(
            "[crash_loop]\nthreshold = {t}\nwindow = {}\n\n[bad_rollout]\nmin_restarts = {m}\nwindow = {}\n\n\
             [[sequence]]\nname = {}\nseverity = {}\nentity = \"pod\"\nkey = {}\nwindow = {}\norder = {}\n\
             confidence = {confidence}\nsummary = {}\nroot_cause = {}\n",
            q(&w), q(&w2), q(&name), q(severity), list(&key), q(&w3), q(order), q(&summary), q(&root),
        );
        for (name, tys, count, optional, filter, key, root_cause) in steps {
            out.push_str(&format!(
                "\n[[sequence.steps]]\nname = {}\ntypes = {}\ncount = {count}\noptional = {optional}\nroot_cause = {root_cause}\n",
                q(name),
                list(&tys),
            ));
            if let Some((r, v)) = filter {
                out.push_str(&format!("where = {{ {} = [{}] }}\n", q(&r), q(&v)));
            }
            if let Some(key) = key {
                out.push_str(&format!("key = {}\n", list(&key)));
            }
        }
        out
    })
}

/// The shipped file with one stretch replaced by anything.
fn damaged_default() -> impl Strategy<Value = String> {
    (any::<prop::sample::Index>(), 0usize..40, ".{0,12}").prop_map(|(at, len, with)| {
        let chars: Vec<char> = DEFAULT_RULES.chars().collect();
        let start = at.index(chars.len());
        let end = (start + len).min(chars.len());
        chars[..start]
            .iter()
            .chain(with.chars().collect::<Vec<_>>().iter())
            .chain(chars[end..].iter())
            .collect()
    })
}

/// Event data as it arrives: a protobuf payload (well-formed or not) under
/// its type's schema, JSON, or anything.
fn data() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(137),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>()
        ]
        .prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "",
            "app",
            "OOMKilled",
            "ImagePullBackOff",
            "web-5d4b",
            "NaN",
            "1e400"
        ])
        .prop_map(serde_json::Value::from),
        ".{0,8}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z]{1,5}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let key = prop::sample::select(vec![
        "container",
        "exitCode",
        "reason",
        "revision",
        "newReplicaSet",
        "oldReplicaSet",
        "victim",
        "memoryLimitBytes",
        "node",
        "pods",
        "daddr",
        "dport",
    ]);
    proptest::collection::btree_map(key, value, 0..6).prop_map(|m| {
        serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    })
}

fn at_ns() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => (0i64..3_600).prop_map(|s| s * 1_000_000_000),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => any::<i64>(),
    ]
}

/// Observations the shipped and generated rules consume, sharing keys so
/// that state builds up.
fn observation() -> impl Strategy<Value = Observation> {
    let ty = prop::sample::select(types::ALL.iter().map(|t| t.name).collect::<Vec<_>>());
    let subject = prop::sample::select(vec![
        Some("pod/ns/web-5d4b-x"),
        Some("pod/ns/web-6f7c-y"),
        Some("node/n1"),
        Some("service/ns/api"),
        Some("deployment/ns/web"),
        Some("pod/"),
        Some(""),
        None,
    ]);
    let ext = proptest::collection::btree_map(
        prop::sample::select(vec!["namespace", "pod", "node", "workload", "container"])
            .prop_map(str::to_string),
        prop::sample::select(vec![
            "ns",
            "web-5d4b-x",
            "n1",
            "ReplicaSet/web-5d4b",
            "Deployment/web",
            "",
            "/",
        ])
        .prop_map(str::to_string),
        0..4,
    );
    (0u8..12, ty, at_ns(), subject, ext, data()).prop_map(|(id, ty, at_ns, subject, ext, data)| {
        Observation {
            id: format!("e{id}"),
            ty: ty.to_string(),
            at_ns,
            subject: subject.map(str::to_string),
            source: "/tidewatch/k8s/n1".into(),
            ext,
            data,
            received_ns: 0,
            republish_horizon_ns: 0,
        }
    })
}

/// Feed observations to every rule, through decoded state and through the
/// stored bytes, checking the findings.
fn drive(rules: &[Box<dyn DynRule>], observations: &[Observation]) -> Result<(), TestCaseError> {
    for rule in rules {
        let mut states = std::collections::HashMap::new();
        for obs in observations {
            if !rule.wants(&obs.ty) {
                continue;
            }
            for key in rule.keys(obs) {
                let stored: Option<Vec<u8>> = states.remove(&key);
                let (state, readable) = rule.decode(stored.as_deref());
                let (next, changed, finding) = rule.fold(state, readable, &key, obs);
                if let Some(f) = finding {
                    let c = f.insight.confidence;
                    prop_assert!(
                        (0.0..=1.0).contains(&c),
                        "{}: confidence {}",
                        rule.name(),
                        c
                    );
                    prop_assert!(f.insight.revision >= 1, "{}", rule.name());
                    prop_assert!(!f.message_id.is_empty() && !f.insight.id.is_empty());
                }
                let bytes = if changed { Some(next.encode()) } else { stored };
                if let Some(b) = bytes {
                    states.insert(key, b);
                }
            }
        }
    }
    Ok(())
}

fn check_parse(text: &str, observations: &[Observation]) -> Result<(), TestCaseError> {
    match RulesFile::parse(text, ORIGIN) {
        Ok(file) => drive(&file.into_rules(), observations),
        Err(e) => {
            prop_assert!(e.origin == ORIGIN && !e.reason.is_empty(), "{}", e);
            prop_assert!(e.to_string().starts_with(&format!("{ORIGIN}: ")), "{}", e);
            Ok(())
        }
    }
}

/// Events on one pod that make the shipped crash-loop and oom-cascade
/// rules fire, so scrambled state includes open incidents.
fn firing() -> Vec<Observation> {
    [
        ("o1", types::OOM_KILL),
        ("r1", types::CONTAINER_RESTARTED),
        ("r2", types::CONTAINER_RESTARTED),
        ("r3", types::CONTAINER_RESTARTED),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (id, ty))| Observation {
        id: id.into(),
        ty: ty.into(),
        at_ns: i as i64 * 1_000_000_000,
        subject: Some("pod/ns/web-5d4b-x".into()),
        source: "/tidewatch/k8s/n1".into(),
        ext: Default::default(),
        data: serde_json::json!({ "container": "app", "exitCode": 137 }),
        received_ns: 0,
        republish_horizon_ns: 0,
    })
    .collect()
}

/// Scramble a stored state: numbers become extremes, arrays reverse or lose
/// elements, as another version or a damaged bucket might leave them.
fn scramble(value: &mut serde_json::Value, entropy: &mut impl Iterator<Item = u8>) {
    let mut pick = || entropy.next().unwrap_or(0);
    match value {
        serde_json::Value::Number(n) => {
            *n = match pick() % 6 {
                0 => u32::MAX.into(),
                1 => i64::MIN.into(),
                2 => i64::MAX.into(),
                3 => 0.into(),
                _ => n.clone(),
            };
        }
        serde_json::Value::Array(items) => {
            match pick() % 4 {
                0 => items.reverse(),
                1 => {
                    items.pop();
                }
                2 => {
                    if let Some(first) = items.first().cloned() {
                        items.push(first);
                    }
                }
                _ => {}
            }
            for item in items {
                scramble(item, entropy);
            }
        }
        serde_json::Value::Object(fields) => {
            for (_, v) in fields.iter_mut() {
                scramble(v, entropy);
            }
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_rules_file_arbitrary_text(text in ".{0,300}", observations in proptest::collection::vec(observation(), 0..4)) {
        check_parse(&text, &observations)?;
    }

    #[test]
    fn fuzz_rules_file_damaged_default(text in damaged_default(), observations in proptest::collection::vec(observation(), 0..8)) {
        check_parse(&text, &observations)?;
    }

    #[test]
    fn fuzz_rules_file_generated(text in generated_rules(), observations in proptest::collection::vec(observation(), 0..12)) {
        check_parse(&text, &observations)?;
    }

    /// Any event data under any type's schema (or JSON, or none): the
    /// observation is built, stored as rule state and read back unchanged.
    #[test]
    fn fuzz_observation_from_arbitrary_event_data(
        ty in prop::sample::select(types::ALL.to_vec()),
        bytes in proptest::collection::vec(any::<u8>(), 0..96),
        json in data(),
        form in 0u8..4,
        reference in reference(),
    ) {
        let builder = EventBuilderV10::new().id("e").ty(ty.name).source("/tidewatch/k8s/n1");
        let builder = match form {
            0 => builder.data_with_schema("application/protobuf", format!("proto:{}", ty.payload), bytes),
            1 => builder.data("application/json", json),
            2 => builder.data("application/octet-stream", bytes),
            _ => builder.data("text/plain", String::from_utf8_lossy(&bytes).into_owned()),
        };
        let obs = Observation::from_event(&builder.build().unwrap(), 0);
        let _ = obs.values(&reference);
        let stored = serde_json::to_vec(&obs).unwrap();
        let back: Observation = serde_json::from_slice(&stored).unwrap();
        prop_assert_eq!(serde_json::to_vec(&back).unwrap(), stored);
    }

    /// Stored rule state that is anything at all, or real state scrambled:
    /// every rule starts over or carries on, never panics.
    #[test]
    fn fuzz_rule_state_from_the_bucket(
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        before in proptest::collection::vec(observation(), 1..10),
        after in proptest::collection::vec(observation(), 1..4),
        entropy in proptest::collection::vec(any::<u8>(), 64),
    ) {
        let rules = RulesFile::builtin().into_rules();
        for rule in &rules {
            let (state, readable) = rule.decode(Some(&garbage));
            for obs in &after {
                for key in rule.keys(obs) {
                    let _ = rule.fold(state.clone(), readable, &key, obs);
                }
            }
            // Real state (an open incident where the rule fires on the
            // prefix), scrambled, then more events on the same key.
            let before: Vec<Observation> = firing().into_iter().chain(before.iter().cloned()).collect();
            let Some(key) = before.iter().find_map(|o| rule.keys(o).into_iter().next()) else {
                continue;
            };
            let mut state = rule.decode(None).0;
            for obs in &before {
                if rule.keys(obs).contains(&key) {
                    state = rule.fold(state, true, &key, obs).0;
                }
            }
            let mut json: serde_json::Value = serde_json::from_slice(&state.encode()).unwrap();
            scramble(&mut json, &mut entropy.iter().copied());
            let (mut state, mut readable) = rule.decode(Some(&serde_json::to_vec(&json).unwrap()));
            for obs in &after {
                let (next, _, finding) = rule.fold(state, readable, &key, obs);
                if let Some(f) = finding {
                    prop_assert!(!f.message_id.is_empty(), "{}", rule.name());
                }
                state = next;
                readable = true;
            }
        }
    }
}

/// Found by `fuzz_rules_file_generated`: `window = "307445734561825861m"`
/// overflowed `n * 60` (a panic in debug builds, a wrong window in release).
#[test]
fn a_window_too_long_to_count_is_refused_by_name() {
    let too_long = format!("{}m", u64::MAX / 60 + 1);
    let text = DEFAULT_RULES.replace("window = \"10m\"", &format!("window = {}", q(&too_long)));
    let err = RulesFile::parse(&text, ORIGIN).expect_err("refused");
    assert_eq!(err.origin, ORIGIN);
    assert!(
        err.reason.contains(&too_long) && err.reason.contains("too long"),
        "{err}"
    );
}

/// Found by `fuzz_observation_from_arbitrary_event_data`: a float in event
/// data came back from stored rule state one ulp off (serde_json's default
/// float parsing is not exact), so state read from KV was not the state
/// that was written.
#[test]
fn floats_in_stored_state_read_back_exactly() {
    let obs = Observation {
        id: "e".into(),
        ty: "t".into(),
        at_ns: 0,
        subject: None,
        source: String::new(),
        ext: Default::default(),
        data: serde_json::json!({ "a": -1.3025256026594674e268 }),
        received_ns: 0,
        republish_horizon_ns: 0,
    };
    let stored = serde_json::to_vec(&obs).unwrap();
    let back: Observation = serde_json::from_slice(&stored).unwrap();
    assert_eq!(back, obs);
}

/// Found by `fuzz_rule_state_from_the_bucket`: stored state with an open
/// incident at revision u32::MAX overflowed `revision += 1` on the next
/// piece of evidence (a panic in debug builds).
#[test]
fn a_stored_revision_at_the_limit_does_not_overflow() {
    let rules = RulesFile::builtin().into_rules();
    let rule = rules.iter().find(|r| r.name() == "oom-cascade").unwrap();
    let events = firing();
    let key = "ns/web-5d4b-x";
    let mut state = rule.decode(None).0;
    for obs in &events[..3] {
        state = rule.fold(state, true, key, obs).0;
    }
    let mut json: serde_json::Value = serde_json::from_slice(&state.encode()).unwrap();
    json["incident"]["revision"] = u32::MAX.into();
    let (state, readable) = rule.decode(Some(&serde_json::to_vec(&json).unwrap()));
    let (_, _, finding) = rule.fold(state, readable, key, &events[3]);
    assert_eq!(finding.unwrap().insight.revision, u32::MAX);
}
