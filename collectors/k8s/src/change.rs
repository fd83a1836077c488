//! A semantic change: what the diff modules produce and what becomes one
//! CloudEvent. Pure: building the event needs only the change, the node
//! (for `source`) and nothing else.

use chrono::{DateTime, Utc};
use cloudevents::Event;
use tidewatch_proto::v1::{
    ContainerRestart, EndpointsChange, KubeEvent, NodeConditionChange, PodChange, RolloutChange,
};
use tidewatch_runtime::event::{EventError, derive_id, new_event};
use tidewatch_runtime::topology;

/// Collector name in subjects and sources.
pub const COLLECTOR: &str = "k8s";

/// The data of a change: the protobuf message its type names.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Container(ContainerRestart),
    Pod(PodChange),
    NodeCondition(NodeConditionChange),
    Rollout(RolloutChange),
    Endpoints(EndpointsChange),
    Warning(KubeEvent),
}

/// One semantic change of a Kubernetes object.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// CloudEvent type (`dev.tidewatch.k8s...`).
    pub ty: &'static str,
    /// Entity: `pod/<ns>/<name>`, `node/<name>`, `deployment/<ns>/<name>`,
    /// `service/<ns>/<name>`.
    pub subject: String,
    /// Deterministic id: a relist or a second collector seeing the same
    /// transition yields the same id, and JetStream drops the duplicate.
    pub id: String,
    /// When it happened, as far as the object says; else when it was seen.
    pub time: DateTime<Utc>,
    pub payload: Payload,
}

impl Change {
    /// A change whose id is derived from `parts` (object uid, transition,
    /// and what makes this transition unique: resourceVersion, container id,
    /// count).
    pub fn new(
        ty: &'static str,
        subject: String,
        parts: &[&str],
        time: Option<DateTime<Utc>>,
        payload: Payload,
    ) -> Change {
        let mut bytes: Vec<&[u8]> = vec![COLLECTOR.as_bytes(), ty.as_bytes()];
        bytes.extend(parts.iter().map(|p| p.as_bytes()));
        Change {
            ty,
            subject,
            id: derive_id(&bytes),
            time: time.unwrap_or_else(Utc::now),
            payload,
        }
    }

    /// The CloudEvent for this change, as seen by the collector on `node`.
    pub fn to_event(&self, node: &str) -> Result<Event, EventError> {
        let source = topology::source(COLLECTOR, node);
        let subject = Some(self.subject.as_str());
        let (id, ty, time) = (self.id.clone(), self.ty, self.time);
        match &self.payload {
            Payload::Container(m) => new_event(id, ty, &source, subject, time, m),
            Payload::Pod(m) => new_event(id, ty, &source, subject, time, m),
            Payload::NodeCondition(m) => new_event(id, ty, &source, subject, time, m),
            Payload::Rollout(m) => new_event(id, ty, &source, subject, time, m),
            Payload::Endpoints(m) => new_event(id, ty, &source, subject, time, m),
            Payload::Warning(m) => new_event(id, ty, &source, subject, time, m),
        }
    }
}

/// A Kubernetes timestamp as chrono time.
pub fn time_of(t: &k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32)
}

/// Nanoseconds since the epoch, 0 when absent.
pub fn nanos_of(t: Option<&k8s_openapi::jiff::Timestamp>) -> i64 {
    t.and_then(|t| i64::try_from(t.as_nanosecond()).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::AttributesReader;

    #[test]
    fn ids_are_deterministic_and_depend_on_every_part() {
        let a = Change::new(
            topology::types::POD_PHASE,
            "pod/ns/a".into(),
            &["uid", "12"],
            None,
            Payload::Pod(PodChange::default()),
        );
        let b = Change::new(
            topology::types::POD_PHASE,
            "pod/ns/a".into(),
            &["uid", "12"],
            None,
            Payload::Pod(PodChange::default()),
        );
        let c = Change::new(
            topology::types::POD_PHASE,
            "pod/ns/a".into(),
            &["uid", "13"],
            None,
            Payload::Pod(PodChange::default()),
        );
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn every_k8s_type_names_a_registered_payload() {
        let k8s: Vec<_> = topology::types::ALL
            .iter()
            .filter(|t| t.name.starts_with("dev.tidewatch.k8s."))
            .collect();
        assert!(k8s.len() >= 16, "{k8s:?}");
        for t in k8s {
            assert!(
                tidewatch_proto::schema::MESSAGES.contains(&t.payload),
                "{} payload {}",
                t.name,
                t.payload
            );
            let schema = format!("proto:{}", t.payload);
            tidewatch_proto::decode_json(&schema, &[]).expect("decodes");
        }
        // The four that used to be JSON-only have messages too.
        for (ty, message) in [
            (
                topology::types::NODE_NOT_READY,
                "tidewatch.v1.NodeConditionChange",
            ),
            (
                topology::types::NODE_READY,
                "tidewatch.v1.NodeConditionChange",
            ),
            (
                topology::types::ENDPOINTS_EMPTY,
                "tidewatch.v1.EndpointsChange",
            ),
            (
                topology::types::ROLLOUT_STARTED,
                "tidewatch.v1.RolloutChange",
            ),
        ] {
            assert_eq!(
                topology::types::lookup(ty).map(|t| t.payload),
                Some(message)
            );
        }
    }

    #[test]
    fn changes_are_protobuf_events_with_their_schema() {
        let proto = Change::new(
            topology::types::POD_PHASE,
            "pod/ns/a".into(),
            &["uid"],
            None,
            Payload::Pod(PodChange {
                phase: "Running".into(),
                ..Default::default()
            }),
        )
        .to_event("n1")
        .expect("event");
        assert_eq!(proto.source().as_str(), "/tidewatch/k8s/n1");
        assert_eq!(
            proto.dataschema().map(|s| s.as_str()),
            Some("proto:tidewatch.v1.PodChange")
        );
        let back: PodChange = tidewatch_runtime::event::payload(&proto).expect("payload");
        assert_eq!(back.phase, "Running");
    }
}
