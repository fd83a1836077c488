//! The collector against a scripted API server ([`apiserver`]) and a real
//! nats-server: semantic changes from object transitions, KV contents,
//! relists without duplicates, and leader hand-over between two instances.
//!
//! Negative checks ("nothing else was published") use a sentinel: after
//! the transitions under test, one more change is made and waited for;
//! the collector publishes in order, so anything wrongly emitted before it
//! has arrived by then. Publishes are counted on a core NATS subscription,
//! which sees every publish, including those JetStream would deduplicate.

mod apiserver;

use std::collections::BTreeMap;
use std::time::Duration;

use apiserver::{
    ApiServer, DEPLOYMENTS, EVENTS, Endpoint, LEASES, NODES, PODS, REPLICASETS, SERVICES, SLICES,
};
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use prost::Message;
use serde_json::{Value, json};
use tidewatch_collector_k8s::{CollectorError, Config};
use tidewatch_proto::v1::{ContainerRestart, KubeEvent, PodMetadata};
use tidewatch_runtime::event::payload;
use tidewatch_runtime::topology::{POD_METADATA, pod_keys, types};
use tidewatch_testkit::{NatsServer, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> Value {
    let path = format!("{}/../../testdata/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn on_node(mut pod: Value, node: &str) -> Value {
    pod["spec"]["nodeName"] = node.into();
    pod
}

/// A running collector.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), CollectorError>>,
    _spool: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = (&mut self.task).await.expect("collector task");
        assert!(result.is_ok(), "collector ended with {result:?}");
    }
}

fn config(
    nats: &NatsServer,
    node: &str,
    leader_election: bool,
    metrics_port: Option<u16>,
) -> Config {
    Config::default()
        .nats_url(nats.client_url())
        .node(node)
        .metrics_addr(metrics_port.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p))))
        .leader_election(leader_election)
        .lease("tidewatch", "tidewatch-collector-k8s")
        .election_timing(
            Duration::from_secs(2),
            Duration::from_millis(1500),
            Duration::from_millis(200),
        )
        .pod_grace(Duration::from_secs(1))
}

fn start(endpoint: &Endpoint, config: Config) -> Running {
    let spool = tempfile::tempdir().expect("tempdir");
    let config = config.spool_dir(spool.path());
    let client = endpoint.client();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tidewatch_collector_k8s::run_with_client(
        config,
        client,
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        stop: Some(stop),
        task,
        _spool: spool,
    }
}

/// Every event published on `tidewatch.raw.k8s.>`, as sent.
struct Published {
    sub: async_nats::Subscriber,
    events: Vec<Event>,
}

impl Published {
    async fn new(nats: &NatsServer) -> Published {
        let client = nats.connect().await;
        let sub = client
            .subscribe("tidewatch.raw.k8s.>")
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        Published {
            sub,
            events: Vec::new(),
        }
    }

    /// Wait for an event matching `pred`; return it.
    async fn wait(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        if let Some(e) = self.events.iter().find(|e| pred(e)) {
            return e.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.sub.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("timed out waiting for {what}; got {:?}", self.summary())
                })
                .expect("subscription open");
            let event =
                tidewatch_runtime::binding::nats::from_nats(msg.headers.as_ref(), &msg.payload)
                    .expect("a CloudEvent");
            self.events.push(event.clone());
            if pred(&event) {
                return event;
            }
        }
    }

    async fn wait_type(&mut self, ty: &str, subject: &str) -> Event {
        let (t, s) = (ty.to_string(), subject.to_string());
        self.wait(&format!("{ty} {subject}"), move |e| {
            e.ty() == t && e.subject() == Some(s.as_str())
        })
        .await
    }

    fn count(&self, ty: &str) -> usize {
        self.events.iter().filter(|e| e.ty() == ty).count()
    }

    fn summary(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| format!("{} {}", e.ty(), e.subject().unwrap_or("")))
            .collect()
    }

    fn assert_no_duplicate_ids(&self) {
        let mut ids = BTreeMap::new();
        for e in &self.events {
            *ids.entry(e.id().to_string()).or_insert(0) += 1;
        }
        let dups: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            dups.is_empty(),
            "published twice: {dups:?} in {:?}",
            self.summary()
        );
    }
}

/// The event's data as JSON (protobuf decoded by its schema, camelCase).
fn json_data(e: &Event) -> Value {
    tidewatch_runtime::event::to_json(e)["data"].clone()
}

async fn kv(nats: &NatsServer) -> async_nats::jetstream::kv::Store {
    let js = nats.jetstream().await;
    eventually("the pod metadata bucket", WAIT, || {
        let js = js.clone();
        async move { js.get_key_value(POD_METADATA.bucket).await.ok() }
    })
    .await
}

async fn pod_meta(store: &async_nats::jetstream::kv::Store, key: String) -> Option<PodMetadata> {
    let bytes = store.get(&key).await.ok()??;
    PodMetadata::decode(bytes.as_ref()).ok()
}

async fn nats_with_streams() -> NatsServer {
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    tidewatch_runtime::provision::provision(
        &js,
        &[],
        &tidewatch_runtime::provision::ProvisionOptions::default(),
    )
    .await
    .expect("provision");
    nats
}

#[tokio::test]
async fn pod_changes_are_published_and_pod_metadata_kept_in_kv() {
    let nats = nats_with_streams().await;
    let api = ApiServer::new();
    let endpoint = api.endpoint().await;
    let running_pod = on_node(fixture("01-pod-running-ready.json"), "node-1");
    let other_node_pod = on_node(fixture("03-pod-crashloopbackoff.json"), "node-2");
    api.apply(PODS, running_pod.clone());
    api.apply(PODS, other_node_pod.clone());
    let uid = running_pod["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let name = running_pod["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let subject = format!("pod/default/{name}");

    let mut published = Published::new(&nats).await;
    let metrics_port = tidewatch_testkit::free_port();
    let collector = start(
        &endpoint,
        config(&nats, "node-1", false, Some(metrics_port)),
    );
    let store = kv(&nats).await;

    // KV: the pod under its uid, name, container id and IP.
    let meta = eventually("pod metadata by uid", WAIT, || {
        pod_meta(&store, pod_keys::by_uid(&uid))
    })
    .await;
    assert_eq!(meta.name, name);
    assert_eq!(meta.namespace, "default");
    assert_eq!(meta.node, "node-1");
    assert_eq!(
        (meta.workload_kind.as_str(), meta.workload_name.as_str()),
        ("Deployment", "memory-hungry-app")
    );
    assert_eq!(
        meta.labels.get("app").map(String::as_str),
        Some("memory-test")
    );
    assert_eq!(meta.containers.len(), 1);
    assert_eq!(meta.containers[0].memory_limit_bytes, 128 << 20);
    assert_eq!(meta.containers[0].cpu_limit_millis, 200);
    let container_id = "75a01eaebedf1091a2e868c4eb5e02e536d4059f32d1ca10b6ef86239b4a46d6";
    assert_eq!(meta.containers[0].container_id, container_id);
    for key in [
        pod_keys::by_name("default", &name),
        pod_keys::by_container(container_id),
        pod_keys::by_ip("10.42.0.14"),
    ] {
        assert_eq!(
            pod_meta(&store, key.clone()).await.map(|m| m.uid),
            Some(uid.clone()),
            "{key}"
        );
    }
    // The other node's pod is not this collector's.
    let other_uid = other_node_pod["metadata"]["uid"].as_str().expect("uid");
    assert!(
        pod_meta(&store, pod_keys::by_uid(other_uid))
            .await
            .is_none()
    );

    // Admin endpoint.
    let (code, body) =
        tidewatch_testkit::http_get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .expect("metrics");
    assert_eq!(code, 200);
    assert!(body.contains("tidewatch_"), "{body}");
    let (code, _) =
        tidewatch_testkit::http_get(&format!("http://127.0.0.1:{metrics_port}/healthz"))
            .await
            .expect("healthz");
    assert_eq!(code, 200);
    eventually("ready after the first pod list", WAIT, || async {
        let (code, _) =
            tidewatch_testkit::http_get(&format!("http://127.0.0.1:{metrics_port}/readyz"))
                .await
                .ok()?;
        (code == 200).then_some(())
    })
    .await;

    // The container is OOMKilled and restarted.
    let mut restarted = running_pod.clone();
    let status = &mut restarted["status"]["containerStatuses"][0];
    status["restartCount"] = 1.into();
    status["containerID"] =
        "containerd://1111111111111111111111111111111111111111111111111111111111111111".into();
    status["lastState"] = json!({"terminated": {
        "exitCode": 137, "reason": "OOMKilled", "startedAt": "2025-09-11T20:50:20Z",
        "finishedAt": "2025-09-11T21:00:00Z", "containerID": format!("containerd://{container_id}")
    }});
    api.apply(PODS, restarted.clone());
    let oom = published
        .wait_type(types::CONTAINER_OOMKILLED, &subject)
        .await;
    assert_eq!(oom.source().as_str(), "/tidewatch/k8s/node-1");
    let data: ContainerRestart = payload(&oom).expect("ContainerRestart");
    assert_eq!(
        (data.reason.as_str(), data.exit_code, data.restart_count),
        ("OOMKilled", 137, 1)
    );
    assert_eq!(data.container, "memory-hog");
    assert_eq!(data.node, "node-1");
    assert_eq!(data.memory_limit_bytes, 128 << 20);
    // The new container id resolves too; the dead one still does.
    eventually("the new container id in KV", WAIT, || {
        pod_meta(
            &store,
            pod_keys::by_container(
                "1111111111111111111111111111111111111111111111111111111111111111",
            ),
        )
    })
    .await;
    assert!(
        pod_meta(&store, pod_keys::by_container(container_id))
            .await
            .is_some()
    );

    // The other node's pod changes: not ours. Then a sentinel on ours.
    let mut other = other_node_pod.clone();
    other["status"]["containerStatuses"][0]["restartCount"] = 6.into();
    api.apply(PODS, other);
    let mut not_ready = restarted.clone();
    for c in not_ready["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
    {
        if c["type"] == "Ready" {
            c["status"] = "False".into();
        }
    }
    api.apply(PODS, not_ready);
    published.wait_type(types::POD_NOT_READY, &subject).await;
    assert!(
        published
            .events
            .iter()
            .all(|e| e.subject() == Some(subject.as_str())),
        "{:?}",
        published.summary()
    );
    assert_eq!(published.count(types::CONTAINER_OOMKILLED), 1);
    assert_eq!(
        published.count(types::CONTAINER_RESTARTED),
        0,
        "an OOM restart is one event"
    );
    published.assert_no_duplicate_ids();

    // Deleted: marked, kept for the grace period, then removed.
    api.delete(PODS, "default", &name);
    let tomb = eventually("the deleted pod marked", WAIT, || async {
        pod_meta(&store, pod_keys::by_uid(&uid))
            .await
            .filter(|m| m.deleted_at_ns > 0)
    })
    .await;
    assert_eq!(tomb.name, name);
    eventually(
        "the deleted pod removed after its grace period",
        WAIT,
        || async {
            pod_meta(&store, pod_keys::by_uid(&uid))
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        pod_meta(&store, pod_keys::by_ip("10.42.0.14"))
            .await
            .is_none()
    );
    collector.stop().await;
}

#[tokio::test]
async fn a_relist_after_410_and_an_api_server_restart_yields_no_duplicates() {
    let nats = nats_with_streams().await;
    let api = ApiServer::new();
    let endpoint = api.endpoint().await;
    let looping = on_node(fixture("03-pod-crashloopbackoff.json"), "node-1");
    let name = looping["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let uid = looping["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let subject = format!("pod/default/{name}");
    let mut running = looping.clone();
    let status = &mut running["status"]["containerStatuses"][0];
    status["state"] = json!({"running": {"startedAt": "2025-09-11T20:55:00Z"}});
    status["restartCount"] = 4.into();
    status["lastState"] = json!({});
    // Another pod that never changes.
    let quiet = on_node(fixture("01-pod-running-ready.json"), "node-1");
    api.apply(PODS, running.clone());
    api.apply(PODS, quiet);

    let mut published = Published::new(&nats).await;
    let collector = start(&endpoint, config(&nats, "node-1", false, None));
    let store = kv(&nats).await;
    eventually("the pod in KV", WAIT, || {
        pod_meta(&store, pod_keys::by_uid(&uid))
    })
    .await;

    // It crashes into CrashLoopBackOff.
    api.apply(PODS, looping.clone());
    published
        .wait_type(types::CONTAINER_CRASHLOOP, &subject)
        .await;
    let restart = published
        .wait_type(types::CONTAINER_RESTARTED, &subject)
        .await;
    let data: ContainerRestart = payload(&restart).expect("payload");
    assert_eq!(
        (data.reason.as_str(), data.exit_code, data.restart_count),
        ("Error", 1, 5)
    );
    api.bookmark();

    // The API server goes away; meanwhile the pod recovers and history is
    // compacted, so the watcher's resourceVersion is too old (410).
    let lists_before = endpoint.count("list /api/v1/pods");
    api.set_down(true);
    let mut recovered = looping.clone();
    recovered["status"]["containerStatuses"][0]["state"] =
        json!({"running": {"startedAt": "2025-09-11T21:10:00Z"}});
    api.apply(PODS, recovered.clone());
    api.compact();
    api.set_down(false);
    published
        .wait_type(types::CONTAINER_CRASHLOOP_ENDED, &subject)
        .await;
    eventually("the collector relists after 410", WAIT, || async {
        (endpoint.count("list /api/v1/pods") > lists_before).then_some(())
    })
    .await;

    // A plain dropped connection: re-watch, nothing repeated.
    api.drop_watches();
    let mut sentinel = recovered;
    sentinel["status"]["containerStatuses"][0]["state"] =
        json!({"waiting": {"reason": "ErrImagePull", "message": "pull failed"}});
    api.apply(PODS, sentinel);
    published
        .wait_type(types::CONTAINER_IMAGE_PULL_FAILED, &subject)
        .await;

    assert!(
        endpoint.count("bookmarks /api/v1/pods") > 0,
        "watches ask for bookmarks"
    );
    assert_eq!(
        published.count(types::CONTAINER_CRASHLOOP),
        1,
        "{:?}",
        published.summary()
    );
    assert_eq!(
        published.count(types::CONTAINER_RESTARTED),
        1,
        "{:?}",
        published.summary()
    );
    assert_eq!(
        published.count(types::CONTAINER_CRASHLOOP_ENDED),
        1,
        "{:?}",
        published.summary()
    );
    assert!(
        published
            .events
            .iter()
            .all(|e| e.subject() == Some(subject.as_str())),
        "the unchanged pod stays quiet across relists: {:?}",
        published.summary()
    );
    published.assert_no_duplicate_ids();
    collector.stop().await;
}

fn with_node_condition(node: &Value, ty: &str, status: &str, reason: &str, at: &str) -> Value {
    let mut node = node.clone();
    for c in node["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
    {
        if c["type"] == ty {
            c["status"] = status.into();
            c["reason"] = reason.into();
            c["message"] = format!("{ty} {status}").into();
            c["lastTransitionTime"] = at.into();
        }
    }
    node
}

fn lease_holder(api: &ApiServer) -> Option<String> {
    api.get(LEASES, "tidewatch", "tidewatch-collector-k8s")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn the_leader_reports_nodes_rollouts_endpoints_warnings_and_service_ips() {
    let nats = nats_with_streams().await;
    let api = ApiServer::new();
    let endpoint = api.endpoint().await;
    let node = fixture("06-node-ready.json");
    let node_name = node["metadata"]["name"].as_str().expect("name").to_string();
    api.apply(NODES, node.clone());
    // A Deployment at revision 3, complete, with its ReplicaSet.
    let mid = fixture("08-deployment-progressing-midrollout.json");
    let mut deployment = mid.clone();
    deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3".into();
    deployment["metadata"]["generation"] = 3.into();
    deployment["status"]["observedGeneration"] = 3.into();
    deployment["status"]["replicas"] = 1.into();
    deployment["status"]["updatedReplicas"] = 1.into();
    api.apply(DEPLOYMENTS, deployment.clone());
    let rs_list = fixture("08b-replicasetlist-owned-by-deployment.json");
    let mut old_rs = rs_list["items"][0].clone();
    old_rs["metadata"]["name"] = "guestbook-ui-5f7b9c8d6".into();
    old_rs["metadata"]["namespace"] = "default".into();
    old_rs["metadata"]["uid"] = Value::Null;
    old_rs["metadata"]["ownerReferences"][0]["name"] = "guestbook-ui".into();
    old_rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3".into();
    api.apply(REPLICASETS, old_rs.clone());
    let not_ready_slice = fixture("09-endpointslice-not-ready.json");
    let mut ready_slice = not_ready_slice.clone();
    ready_slice["endpoints"][0]["conditions"]["ready"] = true.into();
    api.apply(SLICES, ready_slice.clone());
    let warning = fixture("07-event-core-v1-warning-backoff.json");
    api.apply(EVENTS, warning.clone());
    api.apply(
        SERVICES,
        json!({"metadata": {"name": "backend-api-service", "namespace": "default"},
               "spec": {"clusterIP": "10.43.12.7", "clusterIPs": ["10.43.12.7"], "ports": [{"port": 80}]}}),
    );

    let mut published = Published::new(&nats).await;
    let collector = start(&endpoint, config(&nats, "node-1", true, None));
    eventually("node-1 leads", WAIT, || async {
        (lease_holder(&api).as_deref() == Some("node-1")).then_some(())
    })
    .await;
    let store = kv(&nats).await;
    let svc = eventually("the service IP in KV", WAIT, || {
        let store = store.clone();
        async move {
            store
                .get(pod_keys::by_service_ip("10.43.12.7"))
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    let svc: Value = serde_json::from_slice(&svc).expect("json");
    assert_eq!(
        svc,
        json!({"namespace": "default", "name": "backend-api-service"})
    );
    // Every cluster watch is up (their lists are the silent baseline).
    for path in [
        "/api/v1/nodes",
        "/api/v1/events",
        "/apis/apps/v1/deployments",
        "/apis/apps/v1/replicasets",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ] {
        eventually(&format!("a watch on {path}"), WAIT, || async {
            (endpoint.count(&format!("watch {path}")) > 0).then_some(())
        })
        .await;
    }

    // Node NotReady.
    api.apply(
        NODES,
        with_node_condition(
            &node,
            "Ready",
            "Unknown",
            "NodeStatusUnknown",
            "2025-09-11T21:00:00Z",
        ),
    );
    let e = published
        .wait_type(types::NODE_NOT_READY, &format!("node/{node_name}"))
        .await;
    let data = json_data(&e);
    assert_eq!(data["node"], node_name.as_str());
    assert_eq!(data["status"], "Unknown");
    assert_eq!(data["reason"], "NodeStatusUnknown");

    // Memory pressure.
    let pressed = with_node_condition(
        &with_node_condition(
            &node,
            "Ready",
            "Unknown",
            "NodeStatusUnknown",
            "2025-09-11T21:00:00Z",
        ),
        "MemoryPressure",
        "True",
        "KubeletHasInsufficientMemory",
        "2025-09-11T21:01:00Z",
    );
    api.apply(NODES, pressed);
    published
        .wait_type(types::NODE_CONDITION, &format!("node/{node_name}"))
        .await;

    // Rollout: the new ReplicaSet, then the Deployment's new revision.
    let mut new_rs = old_rs.clone();
    new_rs["metadata"]["name"] = "guestbook-ui-75dd4d49d5".into();
    new_rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "4".into();
    api.apply(REPLICASETS, new_rs);
    let mut rolling = mid.clone();
    rolling["status"]["updatedReplicas"] = 0.into();
    api.apply(DEPLOYMENTS, rolling);
    let e = published
        .wait_type(types::ROLLOUT_STARTED, "deployment/default/guestbook-ui")
        .await;
    let data = json_data(&e);
    assert_eq!(data["newReplicaSet"], "guestbook-ui-75dd4d49d5");
    assert_eq!(data["oldReplicaSet"], "guestbook-ui-5f7b9c8d6");
    assert_eq!(data["revision"], "4");
    api.apply(DEPLOYMENTS, mid.clone());
    published
        .wait_type(types::ROLLOUT_PROGRESSED, "deployment/default/guestbook-ui")
        .await;
    let mut done = mid;
    done["status"]["replicas"] = 1.into();
    api.apply(DEPLOYMENTS, done.clone());
    published
        .wait_type(types::ROLLOUT_COMPLETED, "deployment/default/guestbook-ui")
        .await;

    // A later rollout runs past its deadline.
    let mut stalled = done;
    for c in stalled["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
    {
        if c["type"] == "Progressing" {
            c["status"] = "False".into();
            c["reason"] = "ProgressDeadlineExceeded".into();
            c["message"] =
                "ReplicaSet \"guestbook-ui-75dd4d49d5\" has timed out progressing.".into();
        }
    }
    api.apply(DEPLOYMENTS, stalled);
    let e = published
        .wait_type(types::ROLLOUT_STALLED, "deployment/default/guestbook-ui")
        .await;
    let data: tidewatch_proto::v1::RolloutChange = payload(&e).expect("RolloutChange");
    assert_eq!(data.reason, "ProgressDeadlineExceeded");

    // Endpoints drop to zero.
    api.apply(SLICES, not_ready_slice);
    let e = published
        .wait_type(
            types::ENDPOINTS_EMPTY,
            "service/default/backend-api-service",
        )
        .await;
    let data = json_data(&e);
    assert_eq!(data["ready"], 0);
    assert_eq!(
        data["notReadyPods"],
        json!(["default/backend-api-75fb46b7bd-xtkrh"])
    );
    // ...and recover.
    api.apply(SLICES, ready_slice);
    published
        .wait_type(
            types::ENDPOINTS_RECOVERED,
            "service/default/backend-api-service",
        )
        .await;

    // The Warning Event repeats: one update per count; a same-count update is nothing.
    let mut bumped = warning.clone();
    bumped["count"] = 26.into();
    api.apply(EVENTS, bumped.clone());
    let e = published
        .wait_type(
            types::WARNING_EVENT,
            "pod/default/backend-api-75fb46b7bd-xtkrh",
        )
        .await;
    let data: KubeEvent = payload(&e).expect("KubeEvent");
    assert_eq!((data.reason.as_str(), data.count), ("BackOff", 26));
    assert_eq!(data.involved_kind, "Pod");
    bumped["lastTimestamp"] = "2025-09-11T21:30:00Z".into();
    api.apply(EVENTS, bumped);
    // A Normal event is not reported.
    let mut normal = warning.clone();
    normal["metadata"]["name"] = "normal.1".into();
    normal["metadata"]["uid"] = Value::Null;
    normal["type"] = "Normal".into();
    api.apply(EVENTS, normal);

    // Sentinel: the node is Ready again.
    api.apply(NODES, node);
    published
        .wait_type(types::NODE_READY, &format!("node/{node_name}"))
        .await;
    for (ty, n) in [
        (types::NODE_NOT_READY, 1),
        // MemoryPressure on, then off with the sentinel.
        (types::NODE_CONDITION, 2),
        (types::ROLLOUT_STARTED, 1),
        (types::ROLLOUT_COMPLETED, 1),
        (types::ENDPOINTS_EMPTY, 1),
        (types::ENDPOINTS_RECOVERED, 1),
        (types::ROLLOUT_STALLED, 1),
        (types::WARNING_EVENT, 1),
    ] {
        assert_eq!(published.count(ty), n, "{ty}: {:?}", published.summary());
    }
    published.assert_no_duplicate_ids();
    collector.stop().await;
}

#[tokio::test]
async fn leadership_hands_over_between_two_collectors() {
    let nats = nats_with_streams().await;
    let api = ApiServer::new();
    let a_endpoint = api.endpoint().await;
    let b_endpoint = api.endpoint().await;
    let node = fixture("06-node-ready.json");
    let node_name = node["metadata"]["name"].as_str().expect("name").to_string();
    api.apply(NODES, node.clone());
    let mut published = Published::new(&nats).await;
    let a = start(&a_endpoint, config(&nats, "node-a", true, None));
    let b = start(&b_endpoint, config(&nats, "node-b", true, None));
    let leader = eventually("a leader", WAIT, || async { lease_holder(&api) }).await;
    let (leader_run, follower_run, leader_ep, follower_ep, follower) = if leader == "node-a" {
        (a, b, &a_endpoint, &b_endpoint, "node-b")
    } else {
        (b, a, &b_endpoint, &a_endpoint, "node-a")
    };
    eventually("the leader watches nodes", WAIT, || async {
        (leader_ep.count("watch /api/v1/nodes") > 0).then_some(())
    })
    .await;

    api.apply(
        NODES,
        with_node_condition(
            &node,
            "Ready",
            "False",
            "KubeletNotReady",
            "2025-09-11T21:00:00Z",
        ),
    );
    let e = published
        .wait_type(types::NODE_NOT_READY, &format!("node/{node_name}"))
        .await;
    assert_eq!(e.source().as_str(), format!("/tidewatch/k8s/{leader}"));
    assert_eq!(
        follower_ep.count("list /api/v1/nodes"),
        0,
        "the follower does not watch cluster objects"
    );
    assert!(lease_holder(&api).as_deref() == Some(leader.as_str()));

    // The leader shuts down and releases the lease; the follower takes over.
    leader_run.stop().await;
    eventually("the follower leads", WAIT, || async {
        (lease_holder(&api).as_deref() == Some(follower)).then_some(())
    })
    .await;
    eventually("the new leader watches nodes", WAIT, || async {
        (follower_ep.count("watch /api/v1/nodes") > 0).then_some(())
    })
    .await;
    api.apply(NODES, node);
    let e = published
        .wait_type(types::NODE_READY, &format!("node/{node_name}"))
        .await;
    assert_eq!(e.source().as_str(), format!("/tidewatch/k8s/{follower}"));
    assert_eq!(
        published.count(types::NODE_NOT_READY),
        1,
        "the new leader's baseline is silent"
    );
    let lease = api
        .get(LEASES, "tidewatch", "tidewatch-collector-k8s")
        .expect("lease");
    assert!(
        lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0) >= 1,
        "{lease}"
    );
    follower_run.stop().await;
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_once_its_lease_expires() {
    let nats = nats_with_streams().await;
    let api = ApiServer::new();
    let a_endpoint = api.endpoint().await;
    let b_endpoint = api.endpoint().await;
    let node = fixture("06-node-ready.json");
    let node_name = node["metadata"]["name"].as_str().expect("name").to_string();
    api.apply(NODES, node.clone());
    let mut published = Published::new(&nats).await;
    let a = start(&a_endpoint, config(&nats, "node-a", true, None));
    eventually("node-a leads", WAIT, || async {
        (lease_holder(&api).as_deref() == Some("node-a")).then_some(())
    })
    .await;
    let b = start(&b_endpoint, config(&nats, "node-b", true, None));
    eventually("node-b reads the lease", WAIT, || async {
        (b_endpoint.count("get leases") > 0).then_some(())
    })
    .await;
    // Crash: no release, the lease still names node-a.
    a.task.abort();
    let _ = a.task.await;
    eventually("node-b takes the expired lease", WAIT, || async {
        (lease_holder(&api).as_deref() == Some("node-b")).then_some(())
    })
    .await;
    let lease = api
        .get(LEASES, "tidewatch", "tidewatch-collector-k8s")
        .expect("lease");
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    eventually("node-b watches nodes", WAIT, || async {
        (b_endpoint.count("watch /api/v1/nodes") > 0).then_some(())
    })
    .await;
    api.apply(
        NODES,
        with_node_condition(
            &node,
            "Ready",
            "False",
            "KubeletNotReady",
            "2025-09-11T21:00:00Z",
        ),
    );
    let e = published
        .wait_type(types::NODE_NOT_READY, &format!("node/{node_name}"))
        .await;
    assert_eq!(e.source().as_str(), "/tidewatch/k8s/node-b");
    b.stop().await;
}

#[test]
fn check_host_says_plainly_when_there_are_no_credentials() {
    let home = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_tidewatch-collector-k8s");
    let out = std::process::Command::new(bin)
        .arg("--check-host")
        .env_clear()
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("missing-kubeconfig"))
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("kubeconfig") && stderr.contains("in-cluster"),
        "{stderr}"
    );

    let kubeconfig = home.path().join("config");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: t\n",
    )
    .expect("write kubeconfig");
    let out = std::process::Command::new(bin)
        .arg("--check-host")
        .env_clear()
        .env("HOME", home.path())
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("run the binary");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pods bucket as provisioned, but with entries expiring after `max_age`.
async fn kv_expiring(nats: &NatsServer, max_age: Duration) -> async_nats::jetstream::kv::Store {
    let js = nats.jetstream().await;
    js.delete_key_value(POD_METADATA.bucket)
        .await
        .expect("delete the provisioned bucket");
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: POD_METADATA.bucket.to_string(),
        history: POD_METADATA.history,
        max_age,
        limit_markers: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .await
    .expect("bucket with a short max_age")
}

#[tokio::test]
async fn unrefreshed_metadata_expires_and_live_pods_stay_resolvable() {
    const MAX_AGE: Duration = Duration::from_secs(3);
    let nats = nats_with_streams().await;
    let store = kv_expiring(&nats, MAX_AGE).await;
    // Left by an earlier run for a pod deleted while no collector ran.
    let gone = PodMetadata {
        uid: "gone".into(),
        namespace: "default".into(),
        name: "pod-gone".into(),
        node: "node-1".into(),
        pod_ips: vec!["10.42.0.99".into()],
        ..Default::default()
    };
    let bytes = bytes::Bytes::from(gone.encode_to_vec());
    for key in [
        pod_keys::by_uid("gone"),
        pod_keys::by_name("default", "pod-gone"),
        pod_keys::by_ip("10.42.0.99"),
    ] {
        store.put(key, bytes.clone()).await.expect("put");
    }
    let api = ApiServer::new();
    let endpoint = api.endpoint().await;
    let live = on_node(fixture("01-pod-running-ready.json"), "node-1");
    let live_uid = live["metadata"]["uid"].as_str().expect("uid").to_string();
    api.apply(PODS, live);
    let collector = start(
        &endpoint,
        config(&nats, "node-1", false, None).kv_refresh(Duration::from_secs(1)),
    );
    let meta = eventually("the live pod in KV", WAIT, || {
        pod_meta(&store, pod_keys::by_uid(&live_uid))
    })
    .await;
    let live_ip = meta.pod_ips.first().cloned().expect("the live pod's IP");
    eventually("the leftover to expire", WAIT, || async {
        let uid = pod_meta(&store, pod_keys::by_uid("gone")).await;
        let ip = pod_meta(&store, pod_keys::by_ip("10.42.0.99")).await;
        (uid.is_none() && ip.is_none()).then_some(())
    })
    .await;
    // Refreshed, so resolvable all along, until well past max_age: checked
    // every 100 ms, not once after a sleep.
    let until = std::time::Instant::now() + MAX_AGE * 2;
    while std::time::Instant::now() < until {
        assert!(
            pod_meta(&store, pod_keys::by_uid(&live_uid))
                .await
                .is_some(),
            "the live pod expired although its collector refreshes it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pod_meta(&store, pod_keys::by_uid(&live_uid))
            .await
            .map(|m| m.uid),
        Some(live_uid.clone()),
        "a live pod stays resolvable by uid"
    );
    assert_eq!(
        pod_meta(&store, pod_keys::by_ip(&live_ip))
            .await
            .map(|m| m.uid),
        Some(live_uid),
        "and by IP"
    );
    collector.stop().await;
}

#[tokio::test]
async fn the_first_list_is_a_silent_baseline_that_fills_kv() {
    let nats = nats_with_streams().await;
    let api = ApiServer::new();
    let endpoint = api.endpoint().await;
    let list = fixture("11-podlist-default-ns.json");
    let items = list["items"].as_array().expect("items").clone();
    for pod in &items {
        api.apply(PODS, pod.clone());
    }
    let node = "c9b7eea91";
    let mut published = Published::new(&nats).await;
    let collector = start(&endpoint, config(&nats, node, false, None));
    let store = kv(&nats).await;
    let mut ours = 0;
    for pod in &items {
        let uid = pod["metadata"]["uid"].as_str().expect("uid").to_string();
        if pod["spec"]["nodeName"].as_str() == Some(node) {
            ours += 1;
            let meta = eventually("a pod of this node in KV", WAIT, || {
                pod_meta(&store, pod_keys::by_uid(&uid))
            })
            .await;
            assert_eq!(meta.node, node);
            let ip = pod["status"]["podIP"].as_str().expect("ip");
            assert_eq!(
                pod_meta(&store, pod_keys::by_ip(ip)).await.map(|m| m.uid),
                Some(uid)
            );
        } else {
            assert!(pod_meta(&store, pod_keys::by_uid(&uid)).await.is_none());
        }
    }
    assert_eq!(ours, 4);
    // Sentinel: one change after the baseline is the only event.
    let mut changed = items
        .iter()
        .find(|p| p["metadata"]["name"] == "memory-hungry-app-59c695fbfb-xsvn8")
        .expect("pod")
        .clone();
    for c in changed["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
    {
        if c["type"] == "Ready" {
            c["status"] = "False".into();
        }
    }
    api.apply(PODS, changed);
    published
        .wait_type(
            types::POD_NOT_READY,
            "pod/default/memory-hungry-app-59c695fbfb-xsvn8",
        )
        .await;
    assert_eq!(published.events.len(), 1, "{:?}", published.summary());
    collector.stop().await;
}

#[test]
fn watch_lines_from_real_api_servers_read_as_kube_reads_them() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::core::WatchEvent;
    let read = |name: &str| -> Vec<WatchEvent<Pod>> {
        let path = format!("{}/../../testdata/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
            .collect()
    };
    let stream = read("12a-watch-added-modified-stream.jsonl");
    assert!(matches!(stream[0], WatchEvent::Added(_)));
    assert!(
        stream[1..]
            .iter()
            .all(|e| matches!(e, WatchEvent::Modified(_)))
    );
    assert!(
        matches!(&read("12b-watch-bookmark.jsonl")[0], WatchEvent::Bookmark(b) if b.metadata.resource_version == "3845")
    );
    for gone in [
        "12c-watch-error-410-gone-2018.jsonl",
        "12d-watch-error-410-expired.jsonl",
    ] {
        assert!(
            matches!(&read(gone)[0], WatchEvent::Error(s) if s.code == 410),
            "{gone}"
        );
    }
}

/// `tidewatch_events_out_total` on the admin endpoint.
async fn events_out(metrics_port: u16) -> Option<u64> {
    let (_, body) =
        tidewatch_testkit::http_get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .ok()?;
    body.lines()
        .find(|l| l.starts_with("tidewatch_events_out_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn changes_during_a_nats_outage_are_spooled_and_delivered_after() {
    let mut nats = nats_with_streams().await;
    let api = ApiServer::new();
    let endpoint = api.endpoint().await;
    let pod = on_node(fixture("01-pod-running-ready.json"), "node-1");
    let uid = pod["metadata"]["uid"].as_str().expect("uid").to_string();
    let name = pod["metadata"]["name"].as_str().expect("name").to_string();
    api.apply(PODS, pod.clone());
    let metrics_port = tidewatch_testkit::free_port();
    let collector = start(
        &endpoint,
        config(&nats, "node-1", false, Some(metrics_port)),
    );
    let store = kv(&nats).await;
    eventually("the pod in KV", WAIT, || {
        pod_meta(&store, pod_keys::by_uid(&uid))
    })
    .await;
    let before = events_out(metrics_port).await.unwrap_or(0);

    nats.kill().await;
    let mut restarted = pod;
    let status = &mut restarted["status"]["containerStatuses"][0];
    status["restartCount"] = 1.into();
    status["containerID"] =
        "containerd://2222222222222222222222222222222222222222222222222222222222222222".into();
    status["lastState"] = json!({"terminated": {
        "exitCode": 137, "reason": "OOMKilled", "finishedAt": "2025-09-11T21:00:00Z",
        "containerID": "containerd://75a01eaebedf1091a2e868c4eb5e02e536d4059f32d1ca10b6ef86239b4a46d6"
    }});
    api.apply(PODS, restarted);
    eventually("the change spooled while NATS is down", WAIT, || async {
        (events_out(metrics_port).await? > before).then_some(())
    })
    .await;

    nats.restart().await;
    let js = nats.jetstream().await;
    let subject = "tidewatch.raw.k8s.node-1";
    let stored = eventually("the spooled event in the stream", WAIT, || {
        let js = js.clone();
        async move {
            let stream = js.get_stream("TIDEWATCH_RAW").await.ok()?;
            stream.get_last_raw_message_by_subject(subject).await.ok()
        }
    })
    .await;
    let event = tidewatch_runtime::binding::nats::from_nats(Some(&stored.headers), &stored.payload)
        .expect("a CloudEvent");
    assert_eq!(event.ty(), types::CONTAINER_OOMKILLED);
    assert_eq!(
        event.subject(),
        Some(format!("pod/default/{name}").as_str())
    );
    // The KV write that failed meanwhile is retried.
    let store = kv(&nats).await;
    eventually("the new container id in KV", WAIT, || {
        pod_meta(
            &store,
            pod_keys::by_container(
                "2222222222222222222222222222222222222222222222222222222222222222",
            ),
        )
    })
    .await;
    collector.stop().await;
}
