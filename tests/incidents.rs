//! One incident, one insight, from any producer (issue #15): incident
//! sequences as the collectors emit them, where several rules fire for the
//! same trouble (an OOM cascade is also a crash loop; a node runtime
//! failure's pods and a bad rollout's pods crash-loop too), each ended by
//! the event that shows it is over. They run through the real enrich and
//! correlate binaries in every encoding a producer may use: protobuf as our
//! collectors send it, proto3 JSON in binary mode, JSON in structured mode
//! (`application/cloudevents+json`), and a mix of ours and a third party's
//! for the same incident. Every encoding must give the same insights:
//! exactly one live insight per incident, the right root cause, resolved
//! by the right event; a crash loop published before its real cause
//! arrived is superseded by a revision, never left open.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use cloudevents::AttributesReader;
use common::*;
use tidewatch_proto::v1::{
    ContainerRestart, EndpointsChange, Insight, NodeConditionChange, RolloutChange,
};
use tidewatch_runtime::topology::{self, types};
use tidewatch_testkit::NatsServer;

/// How a producer writes an event.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    /// Protobuf data, binary mode: our collectors.
    Protobuf,
    /// proto3 canonical JSON data (camelCase), binary mode.
    JsonBinary,
    /// JSON data in a structured-mode CloudEvent.
    JsonStructured,
    /// Every other event from a third party (JSON), the rest ours.
    Mixed,
}

/// One incident: what it is about, the insight it must give, and the
/// events that prove it (the root cause, the end).
struct Incident {
    name: &'static str,
    kind: &'static str,
    /// An affected entity every insight about the incident names.
    entity: (&'static str, &'static str, &'static str),
    root_cause: &'static str,
    resolved_by: &'static str,
}

const INCIDENTS: [Incident; 6] = [
    Incident {
        name: "OOM cascade that is also a crash loop",
        kind: "oom-cascade",
        entity: ("pod", "shop", "cart-1"),
        root_cause: "oom-k1",
        resolved_by: "oom-ok",
    },
    Incident {
        name: "crash loop alone",
        kind: "crash-loop",
        entity: ("pod", "shop", "api-1"),
        root_cause: "cl-1",
        resolved_by: "cl-ok",
    },
    Incident {
        name: "node runtime failure whose pod then crash-loops",
        kind: "node-runtime-failure",
        entity: ("pod", "batch", "worker-1"),
        root_cause: "nr-unit",
        resolved_by: "nr-ready",
    },
    Incident {
        name: "service disruption",
        kind: "service-disruption",
        entity: ("service", "shop", "pay"),
        root_cause: "sd-ep",
        resolved_by: "sd-back",
    },
    Incident {
        name: "bad rollout whose new pod crash-loops, rolled back",
        kind: "bad-rollout",
        entity: ("pod", "shop", "web-7c9f-aaaaa"),
        root_cause: "br-ro",
        resolved_by: "br-back",
    },
    Incident {
        name: "crash loop published before its OOM kill arrived",
        kind: "oom-cascade",
        entity: ("pod", "shop", "late-1"),
        root_cause: "late-k1",
        resolved_by: "late-ok",
    },
];

fn stable(id: &str, ns: &str, name: &str, node: &str, at: DateTime<Utc>) -> cloudevents::Event {
    let payload = ContainerRestart {
        namespace: ns.into(),
        pod: name.into(),
        pod_uid: format!("uid-{name}"),
        container: name.split('-').next().unwrap_or(name).into(),
        node: node.into(),
        restart_count: 3,
        ..Default::default()
    };
    proto_event(
        id,
        types::CONTAINER_STABLE,
        "k8s",
        node,
        Some(&format!("pod/{ns}/{name}")),
        at,
        &payload,
    )
}

fn rollout(
    id: &str,
    at: DateTime<Utc>,
    new: &str,
    old: &str,
    revision: &str,
) -> cloudevents::Event {
    let payload = RolloutChange {
        namespace: "shop".into(),
        deployment: "web".into(),
        revision: revision.into(),
        new_replica_set: new.into(),
        old_replica_set: old.into(),
        ..Default::default()
    };
    proto_event(
        id,
        types::ROLLOUT_STARTED,
        "k8s",
        "node-1",
        Some("deployment/shop/web"),
        at,
        &payload,
    )
}

fn endpoints(id: &str, ty: &str, ready: u32, at: DateTime<Utc>) -> cloudevents::Event {
    let payload = EndpointsChange {
        namespace: "shop".into(),
        service: "pay".into(),
        ready,
        not_ready_pods: Vec::new(),
    };
    proto_event(
        id,
        ty,
        "k8s",
        "node-1",
        Some("service/shop/pay"),
        at,
        &payload,
    )
}

fn node_ready(id: &str, ty: &str, status: &str, at: DateTime<Utc>) -> cloudevents::Event {
    let payload = NodeConditionChange {
        node: "node-2".into(),
        condition: "Ready".into(),
        status: status.into(),
        reason: if status == "True" {
            "KubeletReady"
        } else {
            "KubeletNotReady"
        }
        .into(),
        message: "container runtime status check may not have completed yet".into(),
        ..Default::default()
    };
    proto_event(id, ty, "k8s", "node-2", Some("node/node-2"), at, &payload)
}

/// The incidents' events as our collectors emit them, in publish order;
/// and the late OOM kill, published once the crash loop it explains is out.
fn events(
    base: DateTime<Utc>,
) -> (
    Vec<cloudevents::Event>,
    cloudevents::Event,
    Vec<cloudevents::Event>,
) {
    let t = |s: i64| secs(base, s);
    let oomkilled = ("OOMKilled", 137);
    let mut main = api_crash_loop(base);
    main.extend([
        // OOM cascade on shop/cart-1 with three restarts: a crash loop too.
        proto_event(
            "oom-k1",
            types::OOM_KILL,
            "ebpf",
            "node-1",
            None,
            t(10),
            &oom_kill("abc123", "uid-cart-1"),
        ),
        restart(
            "oom-r1",
            types::CONTAINER_OOMKILLED,
            "shop",
            "cart-1",
            "node-1",
            t(12),
            1,
            oomkilled,
        ),
        restart(
            "oom-r2",
            types::CONTAINER_RESTARTED,
            "shop",
            "cart-1",
            "node-1",
            t(60),
            2,
            oomkilled,
        ),
        restart(
            "oom-r3",
            types::CONTAINER_RESTARTED,
            "shop",
            "cart-1",
            "node-1",
            t(120),
            3,
            oomkilled,
        ),
        // kubelet fails on node-2, the node goes NotReady, a pod there crash-loops.
        kubelet_failed(base),
        node_ready("nr-node", types::NODE_NOT_READY, "Unknown", t(240)),
        restart(
            "nr-p1",
            types::CONTAINER_RESTARTED,
            "batch",
            "worker-1",
            "node-2",
            t(250),
            1,
            ("Error", 1),
        ),
        restart(
            "nr-p2",
            types::CONTAINER_RESTARTED,
            "batch",
            "worker-1",
            "node-2",
            t(280),
            2,
            ("Error", 1),
        ),
        restart(
            "nr-p3",
            types::CONTAINER_RESTARTED,
            "batch",
            "worker-1",
            "node-2",
            t(330),
            3,
            ("Error", 1),
        ),
        // shop/pay loses its endpoints while clients are refused.
        refused_to_pay("sd-t1", t(300)),
        endpoints("sd-ep", types::ENDPOINTS_EMPTY, 0, t(301)),
        refused_to_pay("sd-t2", t(302)),
        refused_to_pay("sd-t3", t(303)),
        // shop/web rolls out web-7c9f, whose pod crash-loops.
        restart(
            "br-old",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-5d4b-ccccc",
            "node-1",
            t(310),
            1,
            ("Error", 1),
        ),
        rollout("br-ro", t(400), "web-7c9f", "web-5d4b", "8"),
        restart(
            "br-1",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-7c9f-aaaaa",
            "node-1",
            t(420),
            1,
            ("Error", 1),
        ),
        restart(
            "br-2",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-7c9f-aaaaa",
            "node-1",
            t(430),
            2,
            ("Error", 1),
        ),
        restart(
            "br-3",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-7c9f-aaaaa",
            "node-1",
            t(470),
            3,
            ("Error", 1),
        ),
        // shop/late-1 crash-loops on SIGKILLs (exit 137, reason Error: the
        // OOM killer took a process of the container, not its main one, so
        // Kubernetes says nothing of OOM); the kernel's event comes late.
        restart(
            "late-r1",
            types::CONTAINER_RESTARTED,
            "shop",
            "late-1",
            "node-1",
            t(1000),
            1,
            ("Error", 137),
        ),
        restart(
            "late-r2",
            types::CONTAINER_RESTARTED,
            "shop",
            "late-1",
            "node-1",
            t(1030),
            2,
            ("Error", 137),
        ),
        restart(
            "late-r3",
            types::CONTAINER_RESTARTED,
            "shop",
            "late-1",
            "node-1",
            t(1060),
            3,
            ("Error", 137),
        ),
    ]);
    let late = proto_event(
        "late-k1",
        types::OOM_KILL,
        "ebpf",
        "node-1",
        None,
        t(995),
        &oom_kill("aaa999", "uid-late-1"),
    );
    let ends = vec![
        stable("oom-ok", "shop", "cart-1", "node-1", t(730)),
        stable("cl-ok", "shop", "api-1", "node-1", t(800)),
        node_ready("nr-ready", types::NODE_READY, "True", t(600)),
        endpoints("sd-back", types::ENDPOINTS_RECOVERED, 2, t(500)),
        rollout("br-back", t(700), "web-5d4b", "web-7c9f", "9"),
        stable("late-ok", "shop", "late-1", "node-1", t(1700)),
    ];
    (main, late, ends)
}

/// `event` with its data as proto3 JSON (camelCase), as a third party writes it.
fn as_json(event: &cloudevents::Event) -> cloudevents::Event {
    let schema = event
        .dataschema()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let bytes = match event.data() {
        Some(cloudevents::Data::Binary(b)) => b.clone(),
        other => panic!("protobuf data expected, got {other:?}"),
    };
    let data = tidewatch_proto::decode_json(&schema, &bytes).expect("decodes");
    let (collector, node) = topology::parse_source(event.source()).expect("source");
    json_event(
        event.id(),
        event.ty(),
        collector,
        node,
        event.subject(),
        event.time().copied().expect("time"),
        data,
    )
}

async fn publish(
    js: &jetstream::Context,
    publisher: &tidewatch_runtime::publisher::Publisher,
    events: &[cloudevents::Event],
    encoding: Encoding,
) {
    for (i, event) in events.iter().enumerate() {
        let json = match encoding {
            Encoding::Protobuf => false,
            Encoding::JsonBinary | Encoding::JsonStructured => true,
            Encoding::Mixed => i % 2 == 1,
        };
        if !json {
            publish_raw(publisher, std::slice::from_ref(event)).await;
            continue;
        }
        let event = as_json(event);
        if encoding != Encoding::JsonStructured {
            publish_raw(publisher, &[event]).await;
            continue;
        }
        let (collector, node) = topology::parse_source(event.source()).expect("source");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/cloudevents+json");
        headers.insert("Nats-Msg-Id", event.id());
        js.publish_with_headers(
            topology::subjects::raw(collector, node),
            headers,
            tidewatch_runtime::binding::http::to_structured_json(&event)
                .expect("structured JSON")
                .into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
}

/// Run the incidents through the pipeline in `encoding`: every insight message.
async fn run(encoding: Encoding) -> Vec<Insight> {
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    cluster_pods(&js).await;
    put_pod(
        &js,
        &pod(
            "shop",
            "late-1",
            "node-1",
            "aaa999",
            "10.1.0.11",
            ("ReplicaSet", "late-5f5f5"),
        ),
    )
    .await;
    let _enrich = start_function(&server, "tidewatch-enrich", &[]);
    let _correlate = start_function(&server, "tidewatch-correlate", &[]);
    let base = Utc::now() - chrono::Duration::minutes(40);
    let (main, late, ends) = events(base);
    publish(&js, &publisher, &main, encoding).await;
    // The crash loop of late-1 is out before its cause arrives.
    tidewatch_testkit::eventually(
        "late-1's crash loop to be published",
        Duration::from_secs(90),
        || async {
            insights(&js)
                .await
                .iter()
                .any(|i| i.kind == "crash-loop" && i.affected.iter().any(|e| e.name == "late-1"))
                .then_some(())
        },
    )
    .await;
    publish(&js, &publisher, &[late], encoding).await;
    settled(&js, &["enrich", "correlate"]).await;
    publish(&js, &publisher, &ends, encoding).await;
    let total = (main.len() + 1 + ends.len()) as u64;
    tidewatch_testkit::eventually(
        "every event to reach correlate",
        Duration::from_secs(60),
        || async { (stream_messages(&js, topology::ENRICHED.name).await == total).then_some(()) },
    )
    .await;
    settled(&js, &["enrich", "correlate"]).await;
    assert_eq!(
        stream_messages(&js, topology::DEAD_LETTER.name).await,
        0,
        "{encoding:?}: nothing dead-lettered"
    );
    insights(&js).await
}

fn names(insight: &Insight, (kind, ns, name): (&str, &str, &str)) -> bool {
    insight
        .affected
        .iter()
        .any(|e| e.kind == kind && e.namespace == ns && e.name == name)
}

/// What must be equal whatever the encoding.
fn essence(
    insight: &Insight,
) -> (
    String,
    String,
    u32,
    String,
    String,
    Vec<String>,
    String,
    String,
    Vec<String>,
) {
    (
        insight.id.clone(),
        insight.kind.clone(),
        insight.revision,
        insight.status.clone(),
        insight.root_cause_event_id.clone(),
        insight.evidence_event_ids.clone(),
        insight.root_cause.clone(),
        insight.summary.clone(),
        insight.supersedes.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_incident_is_one_insight_that_resolves_in_every_encoding() {
    let mut outcomes: Vec<(Encoding, BTreeMap<String, Insight>)> = Vec::new();
    for encoding in [
        Encoding::Protobuf,
        Encoding::JsonBinary,
        Encoding::JsonStructured,
        Encoding::Mixed,
    ] {
        let all = run(encoding).await;
        let latest = latest(&all);
        let mut report = Vec::new();
        let mut live_total = 0;
        for incident in &INCIDENTS {
            // Insights about the incident's entity from its rule, or from the
            // rule it supersedes (a service disruption naming a client pod
            // that crash-loops is another incident).
            let about: Vec<&Insight> = latest
                .values()
                .filter(|i| names(i, incident.entity))
                .filter(|i| i.kind == incident.kind || i.kind == "crash-loop")
                .collect();
            let live: Vec<&&Insight> = about.iter().filter(|i| i.status != "superseded").collect();
            report.push(format!(
                "{encoding:?} | {} | insights {} | live {} | {}",
                incident.name,
                about.len(),
                live.len(),
                live.first()
                    .map_or("-".to_string(), |i| format!("{} {}", i.kind, i.status))
            ));
            live_total += live.len();
            assert_eq!(
                live.len(),
                1,
                "{encoding:?} {}: one live insight, got {about:#?}",
                incident.name
            );
            let insight = live[0];
            assert_eq!(
                insight.kind, incident.kind,
                "{encoding:?} {}",
                incident.name
            );
            assert_eq!(
                insight.root_cause_event_id, incident.root_cause,
                "{encoding:?} {}",
                incident.name
            );
            assert_eq!(
                insight.status, "resolved",
                "{encoding:?} {}: {insight:#?}",
                incident.name
            );
            assert_eq!(
                insight.resolved_by_event_id, incident.resolved_by,
                "{encoding:?} {}",
                incident.name
            );
            // Any other insight about it is a superseded crash loop that
            // points at the live one, and the live one lists it.
            for other in about.iter().filter(|i| i.id != insight.id) {
                assert_eq!(
                    (other.kind.as_str(), other.status.as_str()),
                    ("crash-loop", "superseded"),
                    "{other:#?}"
                );
                assert_eq!(other.superseded_by, insight.id);
                assert!(
                    all.iter()
                        .any(|i| i.id == insight.id && i.supersedes.contains(&other.id))
                );
            }
        }
        // Where the cause came first, the crash loop never paged at all.
        for pod in ["cart-1", "worker-1", "web-7c9f-aaaaa"] {
            assert!(
                !all.iter()
                    .any(|i| i.kind == "crash-loop" && i.affected.iter().any(|e| e.name == pod)),
                "{encoding:?}: a crash loop of {pod} was published"
            );
        }
        // The late OOM kill superseded the crash loop that was already out.
        let late: Vec<&Insight> = latest
            .values()
            .filter(|i| i.affected.iter().any(|e| e.name == "late-1"))
            .collect();
        assert_eq!(late.len(), 2, "{encoding:?}: {late:#?}");
        let ratio = live_total as f64 / INCIDENTS.len() as f64;
        eprintln!(
            "INCIDENTS | {encoding:?} | live insights per incident {ratio:.1}\n{}",
            report.join("\n")
        );
        outcomes.push((encoding, latest));
    }
    // The same insights whatever the producers' encoding.
    let (_, reference) = &outcomes[0];
    for (encoding, latest) in &outcomes[1..] {
        let a: Vec<_> = reference.values().map(essence).collect();
        let b: Vec<_> = latest.values().map(essence).collect();
        assert_eq!(a, b, "{encoding:?} differs from protobuf");
    }
}
