//! Shared pieces of the cross-crate tests: where the binaries are, and
//! events as collectors publish them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use tidewatch_proto::v1;
use tidewatch_runtime::event::new_event;
use tidewatch_runtime::topology::{self, types};

/// A workspace binary, built next to `tidewatch`. Function binaries belong
/// to other packages, so `cargo test` alone does not build them.
pub fn binary(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_tidewatch"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build every binary first with `cargo build --workspace` (the README's test command does)",
        path.display()
    );
    path
}

/// The repository's functions (functions/*/function.toml), as the CLI embeds them.
pub fn functions() -> Vec<topology::FunctionSpec> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("functions");
    tidewatch_runtime::spec::read_dir(&dir).expect("functions/*/function.toml")
}

/// Every function's durable consumer, as `tidewatch provision` makes them.
pub fn consumers() -> Vec<topology::ConsumerSpec> {
    functions().into_iter().map(|f| f.consumer).collect()
}

/// A container restart as the k8s collector would publish it.
pub fn restart_event(i: u64, pod: &str) -> cloudevents::Event {
    let payload = v1::ContainerRestart {
        namespace: "default".into(),
        pod: pod.into(),
        container: "app".into(),
        restart_count: i as u32,
        reason: "Error".into(),
        exit_code: 1,
        ..Default::default()
    };
    new_event(
        format!("restart-{i}"),
        types::CONTAINER_RESTARTED,
        &topology::source("k8s", "node-1"),
        Some(&format!("pod/default/{pod}")),
        chrono::Utc::now(),
        &payload,
    )
    .expect("event builds")
}

/// Consumer counters: (pending, ack pending, redelivered, ack floor stream seq).
pub async fn consumer_state(js: &jetstream::Context, durable: &str) -> (u64, usize, usize, u64) {
    let spec = consumers()
        .into_iter()
        .find(|c| c.durable == durable)
        .expect("a function's consumer");
    let stream = topology::stream(spec.stream).expect("stream in topology");
    let info = js
        .get_stream(stream.name)
        .await
        .expect("stream")
        .consumer_info(durable)
        .await
        .expect("consumer info");
    (
        info.num_pending,
        info.num_ack_pending,
        info.num_redelivered,
        info.ack_floor.stream_sequence,
    )
}

pub async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

/// Wait for a child to exit, at most `limit`.
pub async fn wait_exit(
    child: &mut tokio::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    tokio::time::timeout(limit, child.wait())
        .await
        .expect("process exits in time")
        .expect("wait")
}

pub fn signal(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    let pid = child.id().expect("running") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal delivered");
}

/// Whether a process is gone (not running, not a zombie).
pub fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

// ---- Scenario helpers (pipeline of real function binaries) ----

/// Start a function binary against `server` in JetStream mode.
pub fn start_function(
    server: &tidewatch_testkit::NatsServer,
    name: &str,
    args: &[&str],
) -> tokio::process::Child {
    start_function_at(&server.client_url(), name, args)
}

/// Start a function binary against `urls` (comma-separated, e.g. a cluster's).
pub fn start_function_at(urls: &str, name: &str, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(binary(name))
        .env("NATS_URL", urls)
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        // A function's own logs, for debugging a test: TIDEWATCH_TEST_FUNCTION_LOG=debug.
        .env(
            "RUST_LOG",
            std::env::var("TIDEWATCH_TEST_FUNCTION_LOG").unwrap_or("warn".into()),
        )
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("function starts")
}

/// Provision everything with a short ack wait; returns JetStream and a publisher.
pub async fn provisioned(
    server: &tidewatch_testkit::NatsServer,
) -> (jetstream::Context, tidewatch_runtime::publisher::Publisher) {
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let options =
        tidewatch_runtime::provision::ProvisionOptions::default().ack_wait(Duration::from_secs(2));
    tidewatch_runtime::provision::provision(&js, &consumers(), &options)
        .await
        .expect("provisioned");
    let publisher = tidewatch_runtime::publisher::Publisher::new(
        client,
        tidewatch_runtime::publisher::PublisherConfig::default(),
        tidewatch_runtime::metrics::Metrics::new("test"),
    );
    (js, publisher)
}

/// Write pod metadata under every key enrich joins by (uid, name, container ids, IPs).
pub async fn put_pod(js: &jetstream::Context, meta: &v1::PodMetadata) {
    use tidewatch_runtime::topology::pod_keys;
    let kv = js
        .get_key_value(topology::POD_METADATA.bucket)
        .await
        .expect("pod bucket");
    let bytes = bytes::Bytes::from(prost::Message::encode_to_vec(meta));
    let mut keys = vec![
        pod_keys::by_uid(&meta.uid),
        pod_keys::by_name(&meta.namespace, &meta.name),
    ];
    for c in &meta.containers {
        let id = c
            .container_id
            .rsplit("://")
            .next()
            .unwrap_or(&c.container_id);
        keys.push(pod_keys::by_container(id));
    }
    for ip in &meta.pod_ips {
        keys.push(pod_keys::by_ip(ip));
    }
    for key in keys {
        kv.put(key.as_str(), bytes.clone()).await.expect("put pod");
    }
}

/// A Service's cluster IP, as the k8s collector writes it.
pub async fn put_service_ip(js: &jetstream::Context, ip: &str, namespace: &str, name: &str) {
    let kv = js
        .get_key_value(topology::POD_METADATA.bucket)
        .await
        .expect("pod bucket");
    let value = serde_json::json!({"namespace": namespace, "name": name}).to_string();
    kv.put(
        tidewatch_runtime::topology::pod_keys::by_service_ip(ip).as_str(),
        value.into(),
    )
    .await
    .expect("put service");
}

/// An event with a protobuf payload, from `/tidewatch/<collector>/<node>`.
pub fn proto_event<M: prost::Message + prost::Name>(
    id: &str,
    ty: &str,
    collector: &str,
    node: &str,
    subject: Option<&str>,
    time: chrono::DateTime<chrono::Utc>,
    payload: &M,
) -> cloudevents::Event {
    new_event(
        id,
        ty,
        &topology::source(collector, node),
        subject,
        time,
        payload,
    )
    .expect("event builds")
}

/// An event with JSON data, as a third-party producer writes it (no dataschema).
pub fn json_event(
    id: &str,
    ty: &str,
    collector: &str,
    node: &str,
    subject: Option<&str>,
    time: chrono::DateTime<chrono::Utc>,
    data: serde_json::Value,
) -> cloudevents::Event {
    use cloudevents::{EventBuilder, EventBuilderV10};
    let mut b = EventBuilderV10::new()
        .id(id)
        .ty(ty)
        .source(topology::source(collector, node))
        .time(time)
        .data("application/json", data);
    if let Some(s) = subject {
        b = b.subject(s);
    }
    b.build().expect("event builds")
}

/// Publish events to the raw stream as their collectors would, waiting for every ack.
pub async fn publish_raw(
    publisher: &tidewatch_runtime::publisher::Publisher,
    events: &[cloudevents::Event],
) {
    use cloudevents::AttributesReader;
    for event in events {
        let (collector, node) = topology::parse_source(event.source()).expect("tidewatch source");
        publisher
            .publish(
                tidewatch_runtime::topology::subjects::raw(collector, node).as_str(),
                event,
            )
            .await
            .expect("stored");
    }
}

/// Every message of a stream, decoded as CloudEvents, in stream order.
pub async fn stream_events(js: &jetstream::Context, name: &str) -> Vec<cloudevents::Event> {
    let stream = js.get_stream(name).await.expect("stream");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        out.push(
            tidewatch_runtime::binding::nats::from_nats(Some(&m.headers), &m.payload)
                .expect("a CloudEvent"),
        );
    }
    out
}

/// Every insight message in the insights stream.
pub async fn insights(js: &jetstream::Context) -> Vec<v1::Insight> {
    stream_events(js, topology::INSIGHTS.name)
        .await
        .iter()
        .map(|e| tidewatch_runtime::event::payload::<v1::Insight>(e).expect("an Insight"))
        .collect()
}

/// Wait until `durables` have nothing pending or un-acked.
pub async fn settled(js: &jetstream::Context, durables: &[&str]) {
    tidewatch_testkit::eventually(
        "the pipeline to settle",
        Duration::from_secs(60),
        || async {
            for d in durables {
                let (pending, ack_pending, _, _) = consumer_state(js, d).await;
                if pending != 0 || ack_pending != 0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// The latest revision of each insight, by insight id.
pub fn latest(insights: &[v1::Insight]) -> std::collections::BTreeMap<String, v1::Insight> {
    let mut out: std::collections::BTreeMap<String, v1::Insight> = Default::default();
    for i in insights {
        if out.get(&i.id).is_none_or(|o| o.revision < i.revision) {
            out.insert(i.id.clone(), i.clone());
        }
    }
    out
}

/// Pod metadata as the k8s collector writes it to KV.
pub fn pod(
    ns: &str,
    name: &str,
    node: &str,
    container_id: &str,
    ip: &str,
    workload: (&str, &str),
) -> v1::PodMetadata {
    v1::PodMetadata {
        uid: format!("uid-{name}"),
        namespace: ns.into(),
        name: name.into(),
        node: node.into(),
        labels: [(
            "app".to_string(),
            name.split('-').next().unwrap_or(name).to_string(),
        )]
        .into(),
        workload_kind: workload.0.into(),
        workload_name: workload.1.into(),
        pod_ips: vec![ip.into()],
        containers: vec![v1::ContainerMetadata {
            name: name.split('-').next().unwrap_or(name).into(),
            container_id: format!("containerd://{container_id}"),
            image: "registry.local/app:1".into(),
            memory_limit_bytes: 256 << 20,
            cpu_limit_millis: 500,
        }],
        deleted_at_ns: 0,
    }
}

/// A container restart as the k8s collector emits it (protobuf).
#[allow(clippy::too_many_arguments)] // one argument per field of a realistic restart event
pub fn restart(
    id: &str,
    ty: &str,
    ns: &str,
    name: &str,
    node: &str,
    at: chrono::DateTime<chrono::Utc>,
    count: u32,
    (reason, exit_code): (&str, i32),
) -> cloudevents::Event {
    let container = name.split('-').next().unwrap_or(name);
    let payload = v1::ContainerRestart {
        namespace: ns.into(),
        pod: name.into(),
        pod_uid: format!("uid-{name}"),
        container: container.into(),
        node: node.into(),
        restart_count: count,
        reason: reason.into(),
        exit_code,
        signal: if exit_code > 128 {
            (exit_code - 128) as u32
        } else {
            0
        },
        memory_limit_bytes: 256 << 20,
        ..Default::default()
    };
    proto_event(
        id,
        ty,
        "k8s",
        node,
        Some(&format!("pod/{ns}/{name}")),
        at,
        &payload,
    )
}

/// `base` plus `s` seconds.
pub fn secs(base: chrono::DateTime<chrono::Utc>, s: i64) -> chrono::DateTime<chrono::Utc> {
    base + chrono::Duration::seconds(s)
}

/// The pods and service IPs the scenarios' events are about, in KV.
pub async fn cluster_pods(js: &jetstream::Context) {
    // (namespace, name, node, container id, pod IP, workload)
    let pods = [
        (
            "shop",
            "cart-1",
            "node-1",
            "abc123",
            "10.1.0.5",
            ("ReplicaSet", "cart-6f7d8"),
        ),
        (
            "shop",
            "api-1",
            "node-1",
            "def456",
            "10.1.0.6",
            ("StatefulSet", "api"),
        ),
        (
            "batch",
            "worker-1",
            "node-2",
            "0a0b0c",
            "10.2.0.7",
            ("Job", "worker"),
        ),
        (
            "shop",
            "web-7c9f-aaaaa",
            "node-1",
            "e1e1e1",
            "10.1.0.8",
            ("ReplicaSet", "web-7c9f"),
        ),
        (
            "shop",
            "web-7c9f-bbbbb",
            "node-1",
            "e2e2e2",
            "10.1.0.9",
            ("ReplicaSet", "web-7c9f"),
        ),
        (
            "shop",
            "web-5d4b-ccccc",
            "node-1",
            "e3e3e3",
            "10.1.0.10",
            ("ReplicaSet", "web-5d4b"),
        ),
    ];
    for (ns, name, node, container, ip, workload) in pods {
        put_pod(js, &pod(ns, name, node, container, ip, workload)).await;
    }
    put_service_ip(js, "10.96.0.20", "shop", "pay").await;
    put_service_ip(js, "10.96.0.21", "shop", "search").await;
}

/// The kernel's OOM kill of `java` (pid 4242) in container `container_id`
/// of pod `pod_uid`, with a 256 MiB limit.
pub fn oom_kill(container_id: &str, pod_uid: &str) -> v1::OomKill {
    v1::OomKill {
        victim: Some(v1::ProcessInfo {
            pid: 4242,
            tgid: 4242,
            comm: "java".into(),
            container_id: container_id.into(),
            pod_uid: pod_uid.into(),
            ..Default::default()
        }),
        total_pages: 70_000,
        rss_pages: 65_536,
        memory_limit_bytes: 256 << 20,
        cgroup_path: format!("/kubepods/burstable/pod{pod_uid}/{container_id}"),
    }
}

/// `curl` in shop/api-1 refused by 10.96.0.20:8080 (service shop/pay), as
/// the eBPF collector reports it.
pub fn refused_to_pay(id: &str, at: chrono::DateTime<chrono::Utc>) -> cloudevents::Event {
    let tcp = v1::TcpConnection {
        process: Some(v1::ProcessInfo {
            pid: 900,
            comm: "curl".into(),
            container_id: "def456".into(),
            ..Default::default()
        }),
        change: "refused".into(),
        family: 4,
        saddr: "10.1.0.6".into(),
        sport: 40_000,
        daddr: "10.96.0.20".into(),
        dport: 8080,
        ..Default::default()
    };
    proto_event(id, types::TCP_REFUSED, "ebpf", "node-1", None, at, &tcp)
}

/// shop/api-1 crash-looping: three segfaults (exit 139), `cl-1`..`cl-3`,
/// 100, 130 and 190 s after `base`.
pub fn api_crash_loop(base: chrono::DateTime<chrono::Utc>) -> Vec<cloudevents::Event> {
    [("cl-1", 100, 1), ("cl-2", 130, 2), ("cl-3", 190, 3)]
        .into_iter()
        .map(|(id, at, count)| {
            restart(
                id,
                types::CONTAINER_RESTARTED,
                "shop",
                "api-1",
                "node-1",
                secs(base, at),
                count,
                ("Error", 139),
            )
        })
        .collect()
}

/// kubelet.service failed on node-2 (`nr-unit`), 200 s after `base`.
pub fn kubelet_failed(base: chrono::DateTime<chrono::Utc>) -> cloudevents::Event {
    let kubelet = v1::UnitStateChange {
        unit: "kubelet.service".into(),
        node: "node-2".into(),
        active_state: "failed".into(),
        sub_state: "failed".into(),
        result: "exit-code".into(),
        exec_main_status: 1,
        previous_active_state: "active".into(),
        ..Default::default()
    };
    proto_event(
        "nr-unit",
        types::UNIT_FAILED,
        "systemd",
        "node-2",
        Some("unit/kubelet.service"),
        secs(base, 200),
        &kubelet,
    )
}

/// Run the `tidewatch` CLI against `server`: (succeeded, stdout, stderr).
pub async fn tidewatch(
    server: &tidewatch_testkit::NatsServer,
    args: &[&str],
) -> (bool, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(binary("tidewatch"))
            .args(args)
            .env("NATS_URL", server.client_url())
            .output(),
    )
    .await
    .expect("command finishes")
    .expect("command runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}
