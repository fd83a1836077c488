//! Who may say what. The auth callout lets a collector publish only on
//! `tidewatch.raw.<collector>.<its node>`; everything else about an event
//! (its `source`, the node in its payload) is the publisher's word. enrich
//! holds the event to the subject it was published on, so a compromised
//! node cannot speak for another through the content:
//!
//! - a Tidewatch `source` (`/tidewatch/<collector>/<node>`) must name the
//!   subject's collector and node (a third party's own source, such as
//!   `/producers/python`, claims neither);
//! - a payload naming a node (systemd units and journal entries, and the
//!   k8s collector's pod events: each node's collector watches only its own
//!   node's pods) must name that node.
//!
//! Cluster-wide facts (node conditions, rollouts, endpoints, Warning
//! Events) come from the k8s collector's leader on its own subject and are
//! about any node: they are trusted from any k8s collector pod (any of them
//! may lead), as deploy/README.md says. Replays (`tidewatch.replay.*`,
//! which only `admin` may publish) and events over HTTP carry no
//! collector subject and are not checked.

use cloudevents::{AttributesReader, Event};
use tidewatch_proto::v1::{ContainerRestart, JournalEntry, PodChange, UnitStateChange};
use tidewatch_runtime::event::payload;
use tidewatch_runtime::topology::{self, subjects};

/// `Err(why)` when `event`, published on `subject`, speaks for a collector
/// or node other than the one the subject names.
pub fn check(event: &Event, subject: Option<&str>) -> Result<(), String> {
    let Some(rest) = subject.and_then(|s| s.strip_prefix(topology::RAW.prefix)?.strip_prefix('.'))
    else {
        return Ok(());
    };
    let mut levels = rest.split('.');
    let (Some(collector), Some(node), None) = (levels.next(), levels.next(), levels.next()) else {
        return Err(format!(
            "subject {rest:?} is not tidewatch.raw.<collector>.<node>"
        ));
    };
    let source = event.source().to_string();
    // A third party's own source (`/producers/python`) claims no Tidewatch
    // collector or node; a Tidewatch source must be the subject's.
    if let Some((claimed_collector, claimed_node)) = topology::parse_source(&source)
        && (subjects::token(claimed_collector) != collector
            || subjects::token(claimed_node) != node)
    {
        return Err(format!(
            "source {source:?} does not match the subject it was published on (collector {collector}, node {node}): a collector speaks only for its own node"
        ));
    }
    if let Some(named) = payload_node(event)
        && !named.is_empty()
        && subjects::token(&named) != node
    {
        return Err(format!(
            "the payload names node {named:?}, but the event was published from node {node}: a collector speaks only for its own node"
        ));
    }
    Ok(())
}

/// The node a node-scoped payload names (None: the type names none, or
/// the payload does not decode, which the schema check handles).
fn payload_node(event: &Event) -> Option<String> {
    let ty = event.ty();
    if ty.starts_with("dev.tidewatch.systemd.journal.") {
        return payload::<JournalEntry>(event).ok().map(|m| m.node);
    }
    if ty.starts_with("dev.tidewatch.systemd.unit.") {
        return payload::<UnitStateChange>(event).ok().map(|m| m.node);
    }
    if ty.starts_with("dev.tidewatch.k8s.container.") {
        return payload::<ContainerRestart>(event).ok().map(|m| m.node);
    }
    if ty.starts_with("dev.tidewatch.k8s.pod.") {
        return payload::<PodChange>(event).ok().map(|m| m.node);
    }
    // Cluster-wide facts, and kernel events (whose node is their source's).
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewatch_runtime::event::new_event;
    use tidewatch_runtime::topology::types;

    fn unit(source_node: &str, payload_node: &str) -> Event {
        new_event(
            "u1",
            types::UNIT_FAILED,
            &topology::source("systemd", source_node),
            Some("unit/kubelet.service"),
            chrono::Utc::now(),
            &UnitStateChange {
                unit: "kubelet.service".into(),
                node: payload_node.into(),
                ..Default::default()
            },
        )
        .expect("event")
    }

    #[test]
    fn a_collector_speaks_only_for_the_node_it_publishes_from() {
        let own = subjects::raw("systemd", "node-1");
        assert_eq!(check(&unit("node-1", "node-1"), Some(&own)), Ok(()));
        let forged_source = check(&unit("node-2", "node-2"), Some(&own)).expect_err("refused");
        assert!(
            forged_source.contains("does not match the subject"),
            "{forged_source}"
        );
        let forged_payload = check(&unit("node-1", "node-2"), Some(&own)).expect_err("refused");
        assert!(
            forged_payload.contains("payload names node"),
            "{forged_payload}"
        );
        // Another collector's name on this node's subject.
        let other = subjects::raw("ebpf", "node-1");
        assert!(check(&unit("node-1", "node-1"), Some(&other)).is_err());
        // A node with a dot in its name publishes on its sanitised subject.
        let dotted = subjects::raw("systemd", "ip-10-0-0-1.ec2.internal");
        assert_eq!(
            check(
                &unit("ip-10-0-0-1.ec2.internal", "ip-10-0-0-1.ec2.internal"),
                Some(&dotted)
            ),
            Ok(())
        );
        // A third party's own source claims no node; its payload still may not.
        let mut third = unit("node-1", "node-1");
        cloudevents::event::AttributesWriter::set_source(&mut third, "/producers/python");
        assert_eq!(check(&third, Some(&own)), Ok(()));
        // Replays and HTTP are not collector subjects.
        assert_eq!(
            check(
                &unit("node-2", "node-2"),
                Some("tidewatch.replay.raw.enrich")
            ),
            Ok(())
        );
        assert_eq!(check(&unit("node-2", "node-2"), None), Ok(()));
        // The k8s collector's cluster-wide facts may name any node.
        let notready = new_event(
            "n1",
            types::NODE_NOT_READY,
            &topology::source("k8s", "node-1"),
            Some("node/node-7"),
            chrono::Utc::now(),
            &tidewatch_proto::v1::NodeConditionChange {
                node: "node-7".into(),
                ..Default::default()
            },
        )
        .expect("event");
        assert_eq!(
            check(&notready, Some(&subjects::raw("k8s", "node-1"))),
            Ok(())
        );
    }
}
