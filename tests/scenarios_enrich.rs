//! enrich against a real nats-server: its cache follows KV changes (watch
//! invalidation), remembers misses only briefly, and never drops an event.

mod common;

use std::time::Duration;

use chrono::Utc;
use cloudevents::AttributesReader;
use common::*;
use tidewatch_proto::v1::{ContainerMetadata, OomKill, PodMetadata, ProcessInfo};
use tidewatch_runtime::topology::{self, types};
use tidewatch_testkit::{NatsServer, eventually};

fn meta(node: &str, tier: &str) -> PodMetadata {
    PodMetadata {
        uid: "uid-web-1".into(),
        namespace: "shop".into(),
        name: "web-1".into(),
        node: node.into(),
        labels: [("tier".to_string(), tier.to_string())].into(),
        workload_kind: "ReplicaSet".into(),
        workload_name: "web-7c9f".into(),
        pod_ips: vec!["10.1.0.5".into()],
        containers: vec![ContainerMetadata {
            name: "web".into(),
            container_id: "containerd://feed01".into(),
            memory_limit_bytes: 128 << 20,
            ..Default::default()
        }],
        deleted_at_ns: 0,
    }
}

/// A kernel event in `container_id`: an OOM kill, a type correlate reads,
/// so enrich stores it (it stores nothing nobody reads).
fn exec(id: &str, container_id: &str) -> cloudevents::Event {
    let payload = OomKill {
        victim: Some(ProcessInfo {
            pid: 10,
            comm: "nginx".into(),
            container_id: container_id.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    proto_event(
        id,
        types::OOM_KILL,
        "ebpf",
        "node-1",
        None,
        Utc::now(),
        &payload,
    )
}

async fn enriched(js: &async_nats::jetstream::Context, id: &str) -> cloudevents::Event {
    eventually(
        &format!("{id} to be enriched"),
        Duration::from_secs(30),
        || async {
            stream_events(js, topology::ENRICHED.name)
                .await
                .into_iter()
                .find(|e| e.id() == id)
        },
    )
    .await
}

fn ext(e: &cloudevents::Event, name: &str) -> Option<String> {
    e.extension(name).map(|v| v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_follows_kv_changes_and_misses_expire() {
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    put_pod(&js, &meta("node-1", "frontend")).await;
    let _enrich = start_function(&server, "tidewatch-enrich", &["--negative-ttl-ms", "300"]);

    publish_raw(&publisher, &[exec("e1", "feed01")]).await;
    let e = enriched(&js, "e1").await;
    assert_eq!(ext(&e, "resolution").as_deref(), Some("resolved"));
    assert_eq!(ext(&e, "pod").as_deref(), Some("web-1"));
    assert_eq!(ext(&e, "node").as_deref(), Some("node-1"));
    assert_eq!(ext(&e, "container").as_deref(), Some("web"));
    assert_eq!(ext(&e, "labels").as_deref(), Some("tier=frontend"));

    // The pod's metadata changes: cached entries never expire on their own,
    // so only the KV watch can make the next event see the change.
    put_pod(&js, &meta("node-3", "backend")).await;
    eventually(
        "the change to reach enrich's cache",
        Duration::from_secs(30),
        || async {
            let id = format!(
                "e2-{}",
                Utc::now().timestamp_nanos_opt().unwrap_or_default()
            );
            publish_raw(&publisher, &[exec(&id, "feed01")]).await;
            let e = enriched(&js, &id).await;
            (ext(&e, "node").as_deref() == Some("node-3")).then_some(())
        },
    )
    .await;
    let e = enriched(&js, "e1").await;
    assert_eq!(
        ext(&e, "node").as_deref(),
        Some("node-1"),
        "earlier outputs are untouched"
    );

    // An unknown container: passed on, marked unresolved with the reason.
    publish_raw(&publisher, &[exec("u1", "beef02")]).await;
    let e = enriched(&js, "u1").await;
    assert_eq!(ext(&e, "resolution").as_deref(), Some("unresolved"));
    assert!(
        ext(&e, "resolutionreason").is_some_and(|r| r.contains("beef02")),
        "{e}"
    );
    assert_eq!(
        ext(&e, "node").as_deref(),
        Some("node-1"),
        "the collector's node still says where"
    );

    // It appears in KV: after the short negative TTL the next event resolves.
    let mut other = meta("node-1", "frontend");
    other.name = "web-2".into();
    other.uid = "uid-web-2".into();
    other.pod_ips = vec!["10.1.0.6".into()];
    other.containers[0].container_id = "containerd://beef02".into();
    put_pod(&js, &other).await;
    let e = eventually(
        "the cached miss to expire so the new pod resolves",
        Duration::from_secs(30),
        || async {
            let id = format!(
                "u2-{}",
                Utc::now().timestamp_nanos_opt().unwrap_or_default()
            );
            publish_raw(&publisher, &[exec(&id, "beef02")]).await;
            let e = enriched(&js, &id).await;
            (ext(&e, "resolution").as_deref() == Some("resolved")).then_some(e)
        },
    )
    .await;
    assert_eq!(ext(&e, "pod").as_deref(), Some("web-2"));

    // Nothing was dropped or dead-lettered.
    settled(&js, &["enrich"]).await;
    assert_eq!(
        stream_messages(&js, topology::ENRICHED.name).await,
        stream_messages(&js, topology::RAW.name).await
    );
    assert_eq!(stream_messages(&js, topology::DEAD_LETTER.name).await, 0);
}
