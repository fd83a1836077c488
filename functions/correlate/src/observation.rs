//! What a rule sees of an event: a flat, serializable record (id, type,
//! time, subject, extensions, data as JSON) plus *field references*, the
//! small language the rules file uses to name parts of an event.
//!
//! Field references:
//!
//! | reference | value |
//! |---|---|
//! | `id`, `type`, `subject` | the CloudEvent attribute |
//! | `subject.<kind>` | the subject without its `<kind>/` prefix (`subject.pod` of `pod/ns/web` is `ns/web`) |
//! | `source.node` | the node in a Tidewatch `source` (`/tidewatch/<collector>/<node>`) |
//! | `ext.<name>` | a CloudEvent extension (enrich adds `namespace`, `pod`, `node`, `workload`, `container`, `peerservice`, `peerpod`) |
//! | `data.<a>.<b>` | a field of the payload, as JSON (protobuf payloads use camelCase names); an array yields each element |
//! | `pod` | `<ns>/<name>`: from a `pod/` subject, else from the `namespace` + `pod` extensions |
//!
//! A reference that resolves to nothing, an empty string, `0` or `false`
//! is *missing* (proto3 cannot tell unset from zero).

use std::collections::BTreeMap;

use cloudevents::{AttributesReader, Data, Event};
use serde::{Deserialize, Serialize};
use tidewatch_runtime::topology;

/// An event as rules see it and as rule state stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub id: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub at_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ext: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    /// When this process received it (ns), 0 when unknown; not stored.
    #[serde(skip)]
    pub received_ns: i64,
    /// How long after a first delivery a repeat of the same event may
    /// still be published again (within the output stream's dedupe
    /// window, so the stream drops the repeat); 0: always. Not stored.
    #[serde(skip)]
    pub republish_horizon_ns: i64,
}

/// JSON data as the message the event names would render it; as it came
/// when it does not fit that message (or names none).
fn canonical(event: &Event, json: serde_json::Value) -> serde_json::Value {
    let Some(message) = tidewatch_runtime::event::payload_message(event) else {
        return json;
    };
    let schema = format!("{}{message}", tidewatch_proto::schema::SCHEMA_PREFIX);
    tidewatch_proto::encode_json(&schema, json.clone())
        .and_then(|bytes| tidewatch_proto::decode_json(&schema, &bytes))
        .unwrap_or(json)
}

impl Observation {
    /// Whether this is a repeat of an event first folded in at `first_ns`
    /// (receive time; 0 unknown) that came back past the republish horizon:
    /// its finding went out long ago, past the insights stream's dedupe
    /// window, so publishing it again would page twice. Every rule kind
    /// asks this before folding.
    pub fn is_stale_repeat(&self, first_ns: Option<i64>) -> bool {
        first_ns.is_some_and(|first| {
            self.republish_horizon_ns > 0
                && first > 0
                && self.received_ns.saturating_sub(first) > self.republish_horizon_ns
        })
    }

    /// Read `event`; its time (or `now_ns` when it has none) orders it.
    /// JSON data is read into the message its type names and back, so a
    /// third party's JSON (defaults left out, fields this build does not
    /// know, numbers as strings where the mapping allows) is the very
    /// observation the protobuf encoding gives.
    pub fn from_event(event: &Event, now_ns: i64) -> Observation {
        let mut ext = BTreeMap::new();
        for (name, value) in event.iter_extensions() {
            if name == "traceparent" || name == "tracestate" {
                continue;
            }
            ext.insert(name.to_string(), value.to_string());
        }
        let data = match event.data() {
            None => serde_json::Value::Null,
            Some(Data::Json(j)) => canonical(event, j.clone()),
            Some(Data::String(s)) => canonical(
                event,
                serde_json::from_str(s).unwrap_or(serde_json::Value::Null),
            ),
            Some(Data::Binary(bytes)) => match event.dataschema() {
                Some(schema) if schema.scheme() == "proto" => {
                    tidewatch_proto::decode_json(schema.as_str(), bytes)
                        .unwrap_or(serde_json::Value::Null)
                }
                _ => canonical(
                    event,
                    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null),
                ),
            },
        };
        Observation {
            id: event.id().to_string(),
            ty: event.ty().to_string(),
            at_ns: event
                .time()
                .and_then(|t| t.timestamp_nanos_opt())
                .unwrap_or(now_ns),
            subject: event.subject().map(str::to_string),
            source: event.source().to_string(),
            ext,
            data,
            received_ns: now_ns,
            republish_horizon_ns: 0,
        }
    }

    /// Every value of a field reference (several when it names an array).
    pub fn values(&self, reference: &str) -> Vec<String> {
        let one = |v: Option<String>| v.filter(|s| !s.is_empty()).into_iter().collect();
        match reference {
            "id" => one(Some(self.id.clone())),
            "type" => one(Some(self.ty.clone())),
            "subject" => one(self.subject.clone()),
            "source.node" => one(topology::parse_source(&self.source).map(|(_, n)| n.to_string())),
            "pod" => {
                if let Some(rest) = self.subject.as_deref().and_then(|s| s.strip_prefix("pod/")) {
                    return one(Some(rest.to_string()));
                }
                match (self.ext.get("namespace"), self.ext.get("pod")) {
                    (Some(ns), Some(pod)) => one(Some(format!("{ns}/{pod}"))),
                    _ => Vec::new(),
                }
            }
            r => {
                if let Some(kind) = r.strip_prefix("subject.") {
                    let prefix = format!("{kind}/");
                    one(self
                        .subject
                        .as_deref()
                        .and_then(|s| s.strip_prefix(prefix.as_str()))
                        .map(str::to_string))
                } else if let Some(name) = r.strip_prefix("ext.") {
                    one(self.ext.get(name).cloned())
                } else if let Some(path) = r.strip_prefix("data.") {
                    let mut value = &self.data;
                    for part in path.split('.') {
                        match value.get(part) {
                            Some(v) => value = v,
                            None => return Vec::new(),
                        }
                    }
                    match value {
                        serde_json::Value::Array(items) => {
                            items.iter().filter_map(scalar).collect()
                        }
                        v => scalar(v).into_iter().collect(),
                    }
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// The first value of a field reference.
    pub fn value(&self, reference: &str) -> Option<String> {
        self.values(reference).into_iter().next()
    }

    /// The first of several references that resolves.
    pub fn first_of<S: AsRef<str>>(&self, references: &[S]) -> Option<String> {
        references.iter().find_map(|r| self.value(r.as_ref()))
    }
}

fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) if n.as_f64() != Some(0.0) => Some(n.to_string()),
        serde_json::Value::Bool(true) => Some("true".into()),
        _ => None,
    }
}

/// Check that a field reference is one the language knows.
pub fn check_reference(reference: &str) -> Result<(), String> {
    let ok = matches!(reference, "id" | "type" | "subject" | "source.node" | "pod")
        || ["subject.", "ext.", "data."].iter().any(|p| {
            reference
                .strip_prefix(p)
                .is_some_and(|rest| !rest.is_empty() && !rest.split('.').any(str::is_empty))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unknown field reference {reference:?}: expected id, type, subject, subject.<kind>, source.node, pod, ext.<name> or data.<path>"
        ))
    }
}

/// `pod/<ns>/<name>`, `node/<name>`... as an insight entity.
pub fn entity(kind: &str, key: &str) -> tidewatch_proto::v1::Entity {
    let (namespace, name) = match kind {
        "node" | "unit" => ("", key),
        _ => key.split_once('/').unwrap_or(("", key)),
    };
    tidewatch_proto::v1::Entity {
        kind: kind.into(),
        name: name.into(),
        namespace: namespace.into(),
    }
}

/// The entity an observation is about, from its subject (`pod/ns/x`,
/// `node/x`, `unit/x`, `service/ns/x`, `deployment/ns/x`).
pub fn subject_entity(obs: &Observation) -> Option<tidewatch_proto::v1::Entity> {
    let subject = obs.subject.as_deref()?;
    let (kind, key) = subject.split_once('/')?;
    (!key.is_empty()).then(|| entity(kind, key))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn obs(
        id: &str,
        ty: &str,
        at_s: i64,
        subject: Option<&str>,
        data: serde_json::Value,
    ) -> Observation {
        Observation {
            id: id.into(),
            ty: ty.into(),
            at_ns: at_s * 1_000_000_000,
            subject: subject.map(str::to_string),
            source: "/tidewatch/k8s/node-1".into(),
            ext: BTreeMap::new(),
            data,
            received_ns: 0,
            republish_horizon_ns: 0,
        }
    }

    #[test]
    fn references_resolve() {
        let mut o = obs(
            "e1",
            "t",
            1,
            Some("service/default/api"),
            serde_json::json!({"node": "n1", "victim": {"pid": 7, "comm": "java"}, "pods": ["default/a", "default/b"], "zero": 0}),
        );
        o.ext.insert("peerservice".into(), "default/api".into());
        assert_eq!(o.value("subject.service").as_deref(), Some("default/api"));
        assert_eq!(o.value("subject.pod"), None);
        assert_eq!(o.value("data.victim.comm").as_deref(), Some("java"));
        assert_eq!(o.value("data.victim.pid").as_deref(), Some("7"));
        assert_eq!(o.values("data.pods"), vec!["default/a", "default/b"]);
        assert_eq!(o.value("data.zero"), None, "zero is unset in proto3");
        assert_eq!(o.value("source.node").as_deref(), Some("node-1"));
        assert_eq!(o.value("ext.peerservice").as_deref(), Some("default/api"));
        assert_eq!(
            o.first_of(&["ext.node", "data.node"]).as_deref(),
            Some("n1")
        );
        assert!(check_reference("data.victim.comm").is_ok());
        assert!(check_reference("data.").is_err());
        assert!(check_reference("labels.app").is_err());
    }

    #[test]
    fn pod_from_subject_or_extensions() {
        let o = obs("e", "t", 0, Some("pod/ns/web"), serde_json::Value::Null);
        assert_eq!(o.value("pod").as_deref(), Some("ns/web"));
        let mut o = obs("e", "t", 0, None, serde_json::Value::Null);
        assert_eq!(o.value("pod"), None);
        o.ext.insert("namespace".into(), "ns".into());
        o.ext.insert("pod".into(), "web".into());
        assert_eq!(o.value("pod").as_deref(), Some("ns/web"));
    }

    /// Every event type, in every encoding a producer may use (protobuf,
    /// JSON binary, JSON structured): one observation, so every rule sees
    /// the same thing and the rules' outcome is the same.
    #[test]
    fn every_type_reads_the_same_in_every_encoding() {
        let rules = crate::rules::RulesFile::builtin().into_rules();
        for t in tidewatch_runtime::topology::types::ALL {
            let encodings = tidewatch_runtime::event::example_encodings(t.name)
                .unwrap_or_else(|| panic!("{}: no example", t.name));
            let observed: Vec<Observation> = encodings
                .iter()
                .map(|e| Observation::from_event(e, 0))
                .collect();
            assert!(
                observed[0].data.as_object().is_some_and(|o| o.len() >= 3),
                "{}: the protobuf data was read: {}",
                t.name,
                observed[0].data
            );
            for (o, encoding) in observed[1..].iter().zip(["JSON binary", "JSON structured"]) {
                assert_eq!(o, &observed[0], "{} as {encoding}", t.name);
            }
            for rule in &rules {
                assert_eq!(rule.wants(t.name), rule.wants(&observed[1].ty));
                let keys: Vec<Vec<String>> = observed.iter().map(|o| rule.keys(o)).collect();
                assert!(
                    keys.iter().all(|k| *k == keys[0]),
                    "{} {}: {keys:?}",
                    rule.name(),
                    t.name
                );
            }
        }
    }

    /// A third party's JSON need not be canonical: a field left out reads
    /// as its default, and fields this build does not know change nothing.
    #[test]
    fn non_canonical_json_reads_like_protobuf() {
        use cloudevents::{EventBuilder, EventBuilderV10};
        let [protobuf, json, _] = tidewatch_runtime::event::example_encodings(
            tidewatch_runtime::topology::types::CONTAINER_RESTARTED,
        )
        .expect("example");
        let mut data = tidewatch_runtime::event::to_json(&json)["data"].clone();
        data["addedByANewerProducer"] = serde_json::json!({"x": 1});
        // A default left out: the message fills it in.
        data.as_object_mut().expect("object").remove("message");
        let mut want = tidewatch_runtime::event::to_json(&protobuf)["data"].clone();
        want["message"] = serde_json::json!("");
        let loose = EventBuilderV10::new()
            .id(cloudevents::AttributesReader::id(&json))
            .ty(cloudevents::AttributesReader::ty(&json))
            .source(cloudevents::AttributesReader::source(&json).clone())
            .time(*cloudevents::AttributesReader::time(&json).expect("time"))
            .subject(cloudevents::AttributesReader::subject(&json).expect("subject"))
            .data("application/json", data)
            .build()
            .expect("event");
        let o = Observation::from_event(&loose, 0);
        assert_eq!(o.data, want);
        assert!(o.data.get("addedByANewerProducer").is_none());
    }
}
