//! Warning Events (core/v1 Event, `type=Warning`): one
//! [`types::WARNING_EVENT`] per count increment, so an Event the kubelet
//! bumps from 25 to 26 is one update, and a relist or a MODIFIED that does
//! not change the count is nothing. Counts come from `series.count`
//! (events written through events.k8s.io/v1) or `count`. Pure.

use k8s_openapi::api::core::v1::Event;
use tidewatch_proto::v1::KubeEvent;
use tidewatch_runtime::topology::types;

use crate::change::{Change, Payload, nanos_of};

/// What is kept of an Event: the payload itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventSnapshot(pub KubeEvent);

impl EventSnapshot {
    pub fn from_event(e: &Event) -> Option<EventSnapshot> {
        let meta = &e.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let series = e.series.as_ref();
        let count = series.and_then(|s| s.count).or(e.count).unwrap_or(1).max(1);
        let involved = &e.involved_object;
        let source = e.source.as_ref();
        let first = e
            .first_timestamp
            .as_ref()
            .map(|t| &t.0)
            .or(e.event_time.as_ref().map(|t| &t.0));
        let last = series
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| &t.0)
            .or(e.last_timestamp.as_ref().map(|t| &t.0))
            .or(first);
        Some(EventSnapshot(KubeEvent {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid,
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            count: u32::try_from(count).unwrap_or(1),
            r#type: e.type_.clone().unwrap_or_default(),
            involved_kind: involved.kind.clone().unwrap_or_default(),
            involved_namespace: involved.namespace.clone().unwrap_or_default(),
            involved_name: involved.name.clone().unwrap_or_default(),
            involved_uid: involved.uid.clone().unwrap_or_default(),
            field_path: involved.field_path.clone().unwrap_or_default(),
            source_component: source
                .and_then(|s| s.component.clone())
                .or_else(|| e.reporting_component.clone())
                .unwrap_or_default(),
            source_host: source.and_then(|s| s.host.clone()).unwrap_or_default(),
            first_seen_ns: nanos_of(first),
            last_seen_ns: nanos_of(last),
        }))
    }

    /// The entity the Event is about: `pod/<ns>/<name>`, `node/<name>`,
    /// `deployment/<ns>/<name>`...
    pub fn subject(&self) -> String {
        let e = &self.0;
        let kind = e.involved_kind.to_ascii_lowercase();
        if e.involved_namespace.is_empty() {
            format!("{kind}/{}", e.involved_name)
        } else {
            format!("{kind}/{}/{}", e.involved_namespace, e.involved_name)
        }
    }
}

/// A change when `new` is a Warning seen for the first time or with a higher count.
pub fn changes(old: Option<&EventSnapshot>, new: &EventSnapshot) -> Vec<Change> {
    if new.0.r#type != "Warning" || old.is_some_and(|o| o.0.count >= new.0.count) {
        return Vec::new();
    }
    let time = (new.0.last_seen_ns > 0)
        .then(|| chrono::DateTime::from_timestamp_nanos(new.0.last_seen_ns));
    vec![Change::new(
        types::WARNING_EVENT,
        new.subject(),
        &[&new.0.uid, &new.0.count.to_string()],
        time,
        Payload::Warning(new.0.clone()),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::fixture;

    fn snap(v: &serde_json::Value) -> EventSnapshot {
        let e: Event = serde_json::from_value(v.clone()).expect("Event");
        EventSnapshot::from_event(&e).expect("uid")
    }

    #[test]
    fn a_count_increment_is_one_update() {
        let json = fixture("07-event-core-v1-warning-backoff.json");
        let e = snap(&json);
        assert_eq!(e.0.count, 25);
        assert_eq!(e.0.reason, "BackOff");
        assert_eq!(e.0.source_component, "kubelet");
        assert_eq!(e.subject(), "pod/default/backend-api-75fb46b7bd-xtkrh");
        let c = changes(None, &e);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ty, types::WARNING_EVENT);
        // Same count (a relist, a metadata-only update): nothing.
        assert!(changes(Some(&e), &e).is_empty());
        let mut bumped = json;
        bumped["count"] = 26.into();
        let bumped = snap(&bumped);
        let c2 = changes(Some(&e), &bumped);
        assert_eq!(c2.len(), 1);
        assert_ne!(c2[0].id, c[0].id);
        let Payload::Warning(p) = &c2[0].payload else {
            panic!("warning")
        };
        assert_eq!(p.count, 26);
    }

    #[test]
    fn series_counts_and_normal_events() {
        let json = fixture("07b-event-core-v1-view-with-series-failedscheduling.json");
        let e = snap(&json);
        assert_eq!(e.0.count, 3);
        assert_eq!(e.0.source_component, "default-scheduler");
        assert!(e.0.first_seen_ns > 0 && e.0.last_seen_ns > e.0.first_seen_ns);
        let mut normal = json;
        normal["type"] = "Normal".into();
        assert!(changes(None, &snap(&normal)).is_empty());
    }
}
