//! How an event is joined with Kubernetes context. Pure apart from the
//! [`Lookup`] it is given (the KV-backed cache in production, a map in
//! tests).
//!
//! | event | joined by | adds |
//! |---|---|---|
//! | subject `pod/<ns>/<name>` (k8s) | `name.<ns>.<name>` | pod context |
//! | kernel (`process`/`victim` ProcessInfo) | `container.<id>`, else `uid.<pod uid>` | pod context, `container`, `memorylimit` |
//! | TCP | the local process as above; `daddr` by `ip.<ip>` and `svcip.<ip>` | `peerpod`, `peerservice` |
//! | systemd (`UnitStateChange`, `JournalEntry`) | its `node` field, else the source's node | `node` |
//! | subject `node/<name>` | the subject | `node` |
//!
//! Pod context: `namespace`, `pod`, `node`, `workload` (`<Kind>/<name>`),
//! `labels` (`k=v,k=v`, sorted). `resolution` is `resolved`, or
//! `unresolved` with `resolutionreason`; the event is never dropped.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use prost::Message;
use tidewatch_proto::v1::{
    ContainerRestart, JournalEntry, OomKill, PodMetadata, ProcessExec, ProcessExit, ProcessInfo,
    TcpConnection, UnitStateChange,
};
use tidewatch_runtime::event::{payload, payload_message};
use tidewatch_runtime::topology::{self, extensions, pod_keys};

/// Extensions enrich adds beyond [`extensions`].
pub mod ext {
    /// Container name, when the event was joined by container id.
    pub const CONTAINER: &str = "container";
    /// Memory limit of that container, bytes.
    pub const MEMORY_LIMIT: &str = "memorylimit";
    /// `<ns>/<name>` of the pod a TCP peer address belongs to.
    pub const PEER_POD: &str = "peerpod";
    /// `<ns>/<name>` of the Service a TCP peer address belongs to.
    pub const PEER_SERVICE: &str = "peerservice";
    /// Pod labels, `k=v` sorted and comma separated.
    pub const LABELS: &str = "labels";
}

/// Why a key gives no pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    /// Retryable: the pod metadata bucket could not be read; the event is
    /// redelivered after a backoff.
    #[error("pod metadata bucket unavailable: {0}")]
    Unreachable(String),
    /// Terminal for this key: nothing is stored there (yet); the event is
    /// marked unresolved with this reason.
    #[error("no pod metadata at {key}")]
    Missing { key: String },
    /// Terminal for this key: what is stored does not decode.
    #[error("pod metadata at {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

impl PodError {
    /// Whether asking again later can give another answer.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PodError::Unreachable(_))
    }
}

/// Where pod metadata comes from.
pub trait Lookup: Sync {
    /// The value at `key`; the only error is [`PodError::Unreachable`].
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>, PodError>> + Send;

    /// The pod metadata at `key`. A cache overrides this to decode each
    /// value once.
    fn pod(&self, key: &str) -> impl Future<Output = Result<Arc<Pod>, PodError>> + Send {
        async move { Pod::decode(key, self.get(key).await?.as_ref()) }
    }
}

/// A pod's metadata and the extensions it gives every event joined to it,
/// formatted once per stored value rather than once per event.
#[derive(Debug)]
pub struct Pod {
    pub meta: PodMetadata,
    extensions: Vec<(&'static str, String)>,
}

impl Pod {
    pub fn new(meta: PodMetadata) -> Pod {
        let mut extensions = vec![
            (extensions::NAMESPACE, meta.namespace.clone()),
            (extensions::POD, meta.name.clone()),
        ];
        if !meta.node.is_empty() {
            extensions.push((extensions::NODE, meta.node.clone()));
        }
        if !meta.workload_kind.is_empty() {
            extensions.push((
                extensions::WORKLOAD,
                format!("{}/{}", meta.workload_kind, meta.workload_name),
            ));
        }
        if !meta.labels.is_empty() {
            let mut labels: Vec<String> = meta
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            extensions.push((ext::LABELS, labels.join(",")));
        }
        Pod { meta, extensions }
    }

    /// The pod stored at `key` (`value` as read from the bucket), or why
    /// there is none.
    pub fn decode(key: &str, value: Option<&Bytes>) -> Result<Arc<Pod>, PodError> {
        match value {
            Some(bytes) => PodMetadata::decode(bytes.as_ref())
                .map(|meta| Arc::new(Pod::new(meta)))
                .map_err(|e| PodError::Corrupt {
                    key: key.to_string(),
                    reason: e.to_string(),
                }),
            None => Err(PodError::Missing {
                key: key.to_string(),
            }),
        }
    }
}

/// What enrich learned about an event.
#[derive(Debug, Default, PartialEq)]
pub struct Enrichment {
    pub extensions: BTreeMap<&'static str, String>,
    /// None when resolved.
    pub unresolved: Option<String>,
}

impl Enrichment {
    fn pod(&mut self, pod: &Pod) {
        for (name, value) in &pod.extensions {
            self.extensions.insert(name, value.clone());
        }
    }

    /// Apply to an event.
    pub fn apply(self, event: &mut Event) {
        for (name, value) in self.extensions {
            event.set_extension(name, value);
        }
        match self.unresolved {
            None => event.set_extension(extensions::RESOLUTION, "resolved"),
            Some(reason) => {
                event.set_extension(extensions::RESOLUTION, "unresolved");
                event.set_extension(extensions::RESOLUTION_REASON, reason);
            }
        }
    }
}

/// The pod at `key`: `Ok(Ok(pod))`, `Ok(Err(why not))` for a key that
/// names none (the event stays unresolved), `Err` when the store is down.
async fn pod_at<L: Lookup>(lookup: &L, key: &str) -> Result<Result<Arc<Pod>, String>, PodError> {
    match lookup.pod(key).await {
        Ok(pod) => Ok(Ok(pod)),
        Err(e) if e.is_retryable() => Err(e),
        Err(e) => Ok(Err(e.to_string())),
    }
}

/// The process an event is about, if it carries one.
fn process_of(event: &Event) -> Option<ProcessInfo> {
    // The message the data holds: by its schema, or by its type for a
    // JSON producer that set none; `payload` reads protobuf or JSON.
    let name = payload_message(event)?;
    match name.as_str() {
        "tidewatch.v1.ProcessExec" => payload::<ProcessExec>(event).ok()?.process,
        "tidewatch.v1.ProcessExit" => payload::<ProcessExit>(event).ok()?.process,
        "tidewatch.v1.OomKill" => payload::<OomKill>(event).ok()?.victim,
        "tidewatch.v1.TcpConnection" => payload::<TcpConnection>(event).ok()?.process,
        _ => None,
    }
}

/// Join `event` with what `lookup` knows. Err only when the store is down.
pub async fn resolve<L: Lookup>(lookup: &L, event: &Event) -> Result<Enrichment, PodError> {
    let mut out = Enrichment::default();
    let schema = payload_message(event)
        .map(|name| format!("proto:{name}"))
        .unwrap_or_default();
    let subject = event.subject().unwrap_or_default();

    // systemd: the node is in the payload (or the source).
    if schema == "proto:tidewatch.v1.UnitStateChange" || schema == "proto:tidewatch.v1.JournalEntry"
    {
        let node = if schema.ends_with("UnitStateChange") {
            payload::<UnitStateChange>(event).ok().map(|u| u.node)
        } else {
            payload::<JournalEntry>(event).ok().map(|j| j.node)
        }
        .filter(|n| !n.is_empty())
        .or_else(|| topology::parse_source(event.source()).map(|(_, n)| n.to_string()));
        match node {
            Some(node) => {
                out.extensions.insert(extensions::NODE, node);
            }
            None => out.unresolved = Some("systemd event names no node".into()),
        }
        return Ok(out);
    }
    if let Some(node) = subject.strip_prefix("node/") {
        out.extensions.insert(extensions::NODE, node.to_string());
        return Ok(out);
    }

    // The pod the event is about.
    let mut reasons = Vec::new();
    if let Some((namespace, name)) = subject.strip_prefix("pod/").and_then(|s| s.split_once('/')) {
        match pod_at(lookup, &pod_keys::by_name(namespace, name)).await? {
            Ok(pod) => out.pod(&pod),
            Err(reason) => {
                // Still say which pod it is: the subject names it.
                out.extensions
                    .insert(extensions::NAMESPACE, namespace.to_string());
                out.extensions.insert(extensions::POD, name.to_string());
                if schema == "proto:tidewatch.v1.ContainerRestart"
                    && let Ok(c) = payload::<ContainerRestart>(event)
                    && !c.node.is_empty()
                {
                    out.extensions.insert(extensions::NODE, c.node);
                }
                reasons.push(reason);
            }
        }
    } else if let Some(process) = process_of(event) {
        let mut found = false;
        let mut misses = Vec::new();
        if !process.container_id.is_empty() {
            match pod_at(lookup, &pod_keys::by_container(&process.container_id)).await? {
                Ok(pod) => {
                    out.pod(&pod);
                    if let Some(c) = pod.meta.containers.iter().find(|c| {
                        !c.container_id.is_empty()
                            && (c.container_id.ends_with(&process.container_id)
                                || process.container_id.ends_with(&c.container_id))
                    }) {
                        out.extensions.insert(ext::CONTAINER, c.name.clone());
                        if c.memory_limit_bytes > 0 {
                            out.extensions
                                .insert(ext::MEMORY_LIMIT, c.memory_limit_bytes.to_string());
                        }
                    }
                    found = true;
                }
                Err(reason) => misses.push(reason),
            }
        }
        if !found && !process.pod_uid.is_empty() {
            match pod_at(lookup, &pod_keys::by_uid(&process.pod_uid)).await? {
                Ok(pod) => {
                    out.pod(&pod);
                    found = true;
                }
                Err(reason) => misses.push(reason),
            }
        }
        if !found {
            reasons.extend(misses);
        }
        if !found && process.container_id.is_empty() && process.pod_uid.is_empty() {
            reasons.push(format!(
                "process {} (cgroup {}) is not in a container",
                process.pid, process.cgroup_id
            ));
        }
        if !found && let Some((_, node)) = topology::parse_source(event.source()) {
            out.extensions.insert(extensions::NODE, node.to_string());
        }
    } else if !subject.contains('/') || subject.is_empty() {
        reasons.push("event names no pod, container or node".into());
    }

    // TCP peers.
    if schema == "proto:tidewatch.v1.TcpConnection"
        && let Ok(tcp) = payload::<TcpConnection>(event)
        && !tcp.daddr.is_empty()
    {
        if let Some(bytes) = lookup.get(&pod_keys::by_service_ip(&tcp.daddr)).await? {
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v) => {
                    let ns = v["namespace"].as_str().unwrap_or_default();
                    let name = v["name"].as_str().unwrap_or_default();
                    out.extensions
                        .insert(ext::PEER_SERVICE, format!("{ns}/{name}"));
                }
                Err(e) => reasons.push(format!(
                    "service metadata for {} is corrupt: {e}",
                    tcp.daddr
                )),
            }
        }
        if let Ok(peer) = pod_at(lookup, &pod_keys::by_ip(&tcp.daddr)).await? {
            out.extensions.insert(
                ext::PEER_POD,
                format!("{}/{}", peer.meta.namespace, peer.meta.name),
            );
        }
    }
    if !reasons.is_empty() {
        out.unresolved = Some(reasons.join("; "));
    }
    Ok(out)
}

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tidewatch_proto::v1::ContainerMetadata;
    use tidewatch_runtime::event::new_event;
    use tidewatch_runtime::topology::types;

    struct Map(HashMap<String, Bytes>);
    impl Lookup for Map {
        async fn get(&self, key: &str) -> Result<Option<Bytes>, PodError> {
            Ok(self.0.get(key).cloned())
        }
    }
    struct Down;
    impl Lookup for Down {
        async fn get(&self, _: &str) -> Result<Option<Bytes>, PodError> {
            Err(PodError::Unreachable("down".into()))
        }
    }

    fn meta() -> PodMetadata {
        PodMetadata {
            uid: "u-1".into(),
            namespace: "shop".into(),
            name: "cart-1".into(),
            node: "node-1".into(),
            labels: [
                ("app".to_string(), "cart".to_string()),
                ("tier".to_string(), "web".to_string()),
            ]
            .into(),
            workload_kind: "ReplicaSet".into(),
            workload_name: "cart-7c9f".into(),
            pod_ips: vec!["10.1.0.5".into()],
            containers: vec![ContainerMetadata {
                name: "cart".into(),
                container_id: "containerd://abc123".into(),
                memory_limit_bytes: 256 << 20,
                ..Default::default()
            }],
            deleted_at_ns: 0,
        }
    }

    fn store() -> Map {
        let bytes = Bytes::from(meta().encode_to_vec());
        let mut m = HashMap::new();
        for key in [
            pod_keys::by_uid("u-1"),
            pod_keys::by_name("shop", "cart-1"),
            pod_keys::by_container("abc123"),
            pod_keys::by_ip("10.1.0.5"),
        ] {
            m.insert(key, bytes.clone());
        }
        m.insert(
            pod_keys::by_service_ip("10.96.0.10"),
            Bytes::from_static(br#"{"namespace":"shop","name":"cart"}"#),
        );
        Map(m)
    }

    fn kernel<M: prost::Message + prost::Name>(ty: &str, m: &M) -> Event {
        new_event(
            "e1",
            ty,
            "/tidewatch/ebpf/node-1",
            None,
            chrono::Utc::now(),
            m,
        )
        .expect("event")
    }

    /// `event` as a third-party producer writes it: the same data as JSON
    /// (the proto3 mapping `tidewatch tail` prints), no `dataschema`.
    fn as_json(event: &Event) -> Event {
        use cloudevents::{EventBuilder, EventBuilderV10};
        let json = tidewatch_runtime::event::to_json(event)["data"].clone();
        let mut b = EventBuilderV10::new()
            .id(event.id())
            .ty(event.ty())
            .source(event.source().clone())
            .data("application/json", json);
        if let Some(subject) = event.subject() {
            b = b.subject(subject);
        }
        b.build().expect("json twin")
    }

    /// The same event through NATS in structured mode.
    fn structured(event: &Event) -> Event {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("content-type", "application/cloudevents+json");
        tidewatch_runtime::binding::nats::from_nats(
            Some(&headers),
            &serde_json::to_vec(event).expect("json"),
        )
        .expect("structured")
    }

    #[tokio::test]
    async fn json_data_from_any_producer_resolves_like_protobuf() {
        let process = ProcessInfo {
            pid: 7,
            comm: "java".into(),
            container_id: "abc123".into(),
            ..Default::default()
        };
        let events = [
            kernel(
                types::OOM_KILL,
                &OomKill {
                    victim: Some(process.clone()),
                    ..Default::default()
                },
            ),
            kernel(
                types::PROCESS_EXEC,
                &ProcessExec {
                    process: Some(process.clone()),
                    ..Default::default()
                },
            ),
            kernel(
                types::TCP_REFUSED,
                &TcpConnection {
                    process: Some(process.clone()),
                    daddr: "10.96.0.10".into(),
                    dport: 80,
                    ..Default::default()
                },
            ),
            kernel(
                types::UNIT_FAILED,
                &UnitStateChange {
                    unit: "kubelet.service".into(),
                    node: "node-9".into(),
                    ..Default::default()
                },
            ),
        ];
        for event in &events {
            let want = resolve(&store(), event).await.expect("up");
            assert_eq!(want.unresolved, None, "{}", event.ty());
            for twin in [as_json(event), structured(&as_json(event))] {
                assert!(twin.dataschema().is_none());
                let got = resolve(&store(), &twin).await.expect("up");
                assert_eq!(got.extensions, want.extensions, "{} as JSON", event.ty());
                assert_eq!(got.unresolved, None, "{} as JSON", event.ty());
            }
        }
    }

    /// Every event type in every encoding a producer may use: the same
    /// join, the same extensions, the same reason when unresolved.
    #[tokio::test]
    async fn every_type_resolves_the_same_in_every_encoding() {
        let mut resolved = 0;
        for t in types::ALL {
            let [protobuf, json, structured] = tidewatch_runtime::event::example_encodings(t.name)
                .unwrap_or_else(|| panic!("{}: no example", t.name));
            let want = resolve(&store(), &protobuf).await.expect("up");
            resolved += usize::from(want.unresolved.is_none());
            for (twin, encoding) in [(json, "JSON binary"), (structured, "JSON structured")] {
                let got = resolve(&store(), &twin).await.expect("up");
                assert_eq!(got.extensions, want.extensions, "{} as {encoding}", t.name);
                assert_eq!(got.unresolved, want.unresolved, "{} as {encoding}", t.name);
            }
        }
        // The example pod (shop/cart-1, container abc123) is in the store:
        // most types join it, whichever encoding.
        assert!(
            resolved * 2 > types::ALL.len(),
            "{resolved} of {} resolved",
            types::ALL.len()
        );
    }

    #[tokio::test]
    async fn kernel_events_join_by_container_id_then_pod_uid() {
        let oom = OomKill {
            victim: Some(ProcessInfo {
                pid: 7,
                comm: "java".into(),
                container_id: "abc123".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = resolve(&store(), &kernel(types::OOM_KILL, &oom))
            .await
            .expect("store up");
        assert_eq!(e.unresolved, None);
        assert_eq!(e.extensions[extensions::POD], "cart-1");
        assert_eq!(e.extensions[extensions::WORKLOAD], "ReplicaSet/cart-7c9f");
        assert_eq!(e.extensions[ext::CONTAINER], "cart");
        assert_eq!(e.extensions[ext::MEMORY_LIMIT], (256u64 << 20).to_string());
        assert_eq!(e.extensions[ext::LABELS], "app=cart,tier=web");
        let exec = ProcessExec {
            process: Some(ProcessInfo {
                pod_uid: "u-1".into(),
                container_id: "unknown".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = resolve(&store(), &kernel(types::PROCESS_EXEC, &exec))
            .await
            .expect("up");
        assert_eq!(e.unresolved, None, "the pod uid resolves it");
        assert_eq!(e.extensions[extensions::NODE], "node-1");
    }

    #[tokio::test]
    async fn tcp_peers_resolve_to_pod_and_service() {
        let tcp = TcpConnection {
            process: Some(ProcessInfo {
                container_id: "abc123".into(),
                ..Default::default()
            }),
            daddr: "10.96.0.10".into(),
            dport: 80,
            ..Default::default()
        };
        let e = resolve(&store(), &kernel(types::TCP_REFUSED, &tcp))
            .await
            .expect("up");
        assert_eq!(e.extensions[ext::PEER_SERVICE], "shop/cart");
        let tcp = TcpConnection {
            daddr: "10.1.0.5".into(),
            ..tcp
        };
        let e = resolve(&store(), &kernel(types::TCP_CONNECT, &tcp))
            .await
            .expect("up");
        assert_eq!(e.extensions[ext::PEER_POD], "shop/cart-1");
    }

    #[tokio::test]
    async fn systemd_events_get_their_node_and_unknowns_are_marked() {
        let unit = UnitStateChange {
            unit: "kubelet.service".into(),
            node: "node-9".into(),
            ..Default::default()
        };
        let e = resolve(&Down, &kernel(types::UNIT_FAILED, &unit))
            .await
            .expect("no KV needed");
        assert_eq!(e.extensions[extensions::NODE], "node-9");
        assert_eq!(e.unresolved, None);
        let exit = ProcessExit {
            process: Some(ProcessInfo {
                container_id: "nope".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = resolve(&store(), &kernel(types::PROCESS_EXIT, &exit))
            .await
            .expect("up");
        assert!(
            e.unresolved
                .as_deref()
                .is_some_and(|r| r.contains("container.nope")),
            "{e:?}"
        );
        assert_eq!(
            e.extensions[extensions::NODE],
            "node-1",
            "the collector's node still says where"
        );
        let host = ProcessExit {
            process: Some(ProcessInfo {
                pid: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = resolve(&store(), &kernel(types::PROCESS_EXIT, &host))
            .await
            .expect("up");
        assert!(
            e.unresolved
                .as_deref()
                .is_some_and(|r| r.contains("not in a container"))
        );
        assert!(
            resolve(&Down, &kernel(types::PROCESS_EXIT, &exit))
                .await
                .is_err(),
            "store down: retry"
        );
    }
}
