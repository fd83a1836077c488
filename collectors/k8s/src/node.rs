//! Nodes: condition changes. Ready uses the JSON contract correlate relies
//! on ([`types::NODE_NOT_READY`] / [`types::NODE_READY`]); MemoryPressure,
//! DiskPressure and PIDPressure become [`types::NODE_CONDITION`]. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use tidewatch_proto::v1::NodeConditionChange;
use tidewatch_runtime::topology::types;

use crate::change::{Change, Payload, nanos_of};

/// Conditions reported besides Ready.
pub const PRESSURE_CONDITIONS: &[&str] = &["MemoryPressure", "DiskPressure", "PIDPressure"];

/// One node condition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Condition {
    pub status: String,
    pub reason: String,
    pub message: String,
    pub transition_ns: i64,
}

/// What is kept of a node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeSnapshot {
    pub uid: String,
    pub name: String,
    /// By condition type.
    pub conditions: BTreeMap<String, Condition>,
}

impl NodeSnapshot {
    pub fn from_node(node: &Node) -> Option<NodeSnapshot> {
        let uid = node.metadata.uid.clone().filter(|u| !u.is_empty())?;
        let conditions = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter(|c| c.type_ == "Ready" || PRESSURE_CONDITIONS.contains(&c.type_.as_str()))
            .map(|c| {
                (
                    c.type_.clone(),
                    Condition {
                        status: c.status.clone(),
                        reason: c.reason.clone().unwrap_or_default(),
                        message: c.message.clone().unwrap_or_default(),
                        transition_ns: nanos_of(c.last_transition_time.as_ref().map(|t| &t.0)),
                    },
                )
            })
            .collect();
        Some(NodeSnapshot {
            uid,
            name: node.metadata.name.clone().unwrap_or_default(),
            conditions,
        })
    }
}

/// Status a condition is assumed to have on a node not seen before.
fn healthy(condition: &str) -> &'static str {
    if condition == "Ready" {
        "True"
    } else {
        "False"
    }
}

/// Changes from `old` (None: a node not seen before) to `new`.
pub fn changes(old: Option<&NodeSnapshot>, new: &NodeSnapshot) -> Vec<Change> {
    let mut out = Vec::new();
    let subject = format!("node/{}", new.name);
    for (ty, c) in &new.conditions {
        let previous = old
            .and_then(|o| o.conditions.get(ty))
            .map(|c| c.status.as_str())
            .unwrap_or_else(|| healthy(ty));
        if previous == c.status {
            continue;
        }
        let transition = c.transition_ns.to_string();
        let parts = [
            new.uid.as_str(),
            ty.as_str(),
            c.status.as_str(),
            &transition,
        ];
        let time =
            (c.transition_ns > 0).then(|| chrono::DateTime::from_timestamp_nanos(c.transition_ns));
        // Ready has its own types (NotReady is what rules join on); the
        // pressure conditions share one. The payload is the same message.
        let change_type = if ty == "Ready" {
            let was_ready = previous == "True";
            let ready = c.status == "True";
            if was_ready == ready {
                // False ⇄ Unknown: still not ready.
                continue;
            }
            if ready {
                types::NODE_READY
            } else {
                types::NODE_NOT_READY
            }
        } else {
            types::NODE_CONDITION
        };
        out.push(Change::new(
            change_type,
            subject.clone(),
            &parts,
            time,
            Payload::NodeCondition(NodeConditionChange {
                node: new.name.clone(),
                condition: ty.clone(),
                status: c.status.clone(),
                previous_status: previous.to_string(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                transition_ns: c.transition_ns,
            }),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::fixture;

    fn with_condition(
        node: &serde_json::Value,
        ty: &str,
        status: &str,
        reason: &str,
        at: &str,
    ) -> NodeSnapshot {
        let mut node = node.clone();
        for c in node["status"]["conditions"]
            .as_array_mut()
            .expect("conditions")
        {
            if c["type"] == ty {
                c["status"] = status.into();
                c["reason"] = reason.into();
                c["message"] = format!("{ty} is {status}").into();
                c["lastTransitionTime"] = at.into();
            }
        }
        let node: Node = serde_json::from_value(node).expect("Node");
        NodeSnapshot::from_node(&node).expect("uid")
    }

    #[test]
    fn ready_transitions_use_the_json_contract() {
        let json = fixture("06-node-ready.json");
        let ready: Node = serde_json::from_value(json.clone()).expect("Node");
        let ready = NodeSnapshot::from_node(&ready).expect("uid");
        assert_eq!(ready.conditions.len(), 4);
        assert!(
            changes(None, &ready).is_empty(),
            "a healthy new node is quiet"
        );
        let not_ready = with_condition(
            &json,
            "Ready",
            "Unknown",
            "NodeStatusUnknown",
            "2025-09-11T21:00:00Z",
        );
        let c = changes(Some(&ready), &not_ready);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ty, types::NODE_NOT_READY);
        assert_eq!(c[0].subject, format!("node/{}", ready.name));
        let Payload::NodeCondition(data) = &c[0].payload else {
            panic!("a node condition")
        };
        assert_eq!(data.node, ready.name);
        assert_eq!(data.status, "Unknown");
        assert_eq!(data.previous_status, "True");
        assert_eq!(data.reason, "NodeStatusUnknown");
        // Unknown → False is still not ready.
        let down = with_condition(
            &json,
            "Ready",
            "False",
            "KubeletNotReady",
            "2025-09-11T21:01:00Z",
        );
        assert!(changes(Some(&not_ready), &down).is_empty());
        let back = changes(Some(&down), &ready);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].ty, types::NODE_READY);
    }

    #[test]
    fn pressure_conditions() {
        let json = fixture("06-node-ready.json");
        let ready: Node = serde_json::from_value(json.clone()).expect("Node");
        let ready = NodeSnapshot::from_node(&ready).expect("uid");
        for ty in PRESSURE_CONDITIONS {
            let pressed = with_condition(&json, ty, "True", "Pressure", "2025-09-11T21:00:00Z");
            let c = changes(Some(&ready), &pressed);
            assert_eq!(c.len(), 1, "{ty}");
            assert_eq!(c[0].ty, types::NODE_CONDITION);
            let Payload::NodeCondition(p) = &c[0].payload else {
                panic!("payload")
            };
            assert_eq!(p.condition, *ty);
            assert_eq!(
                (p.previous_status.as_str(), p.status.as_str()),
                ("False", "True")
            );
            // The same transition seen twice has the same id.
            assert_eq!(changes(Some(&ready), &pressed)[0].id, c[0].id);
        }
    }
}
