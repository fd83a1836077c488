//! Scenario tests: realistic event sequences, published into TIDEWATCH_RAW
//! as the collectors would, run through the real enrich and correlate
//! binaries against a real nats-server. Each rule must produce exactly the
//! expected insight with the right root cause and evidence; normal churn
//! must produce none; replays must not duplicate; concurrent correlate
//! replicas must not lose updates.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use serde_json::json;
use tidewatch_proto::v1::{self, Insight, OomKill, ProcessInfo, TcpConnection, UnitStateChange};
use tidewatch_runtime::topology::{self, types};
use tidewatch_testkit::NatsServer;

/// One incident of every rule, each on its own entity.
fn incidents(base: DateTime<Utc>) -> Vec<cloudevents::Event> {
    let oom = oom_kill("abc123", "uid-cart-1");
    let refused = |id: &str, at: i64| refused_to_pay(id, secs(base, at));
    // Crash loop on shop/api-1: three segfaults.
    let mut events = api_crash_loop(base);
    events.extend([
        // OOM cascade on shop/cart-1: kernel OOM kill, OOMKilled, restart, endpoints drop.
        proto_event(
            "oom-k1",
            types::OOM_KILL,
            "ebpf",
            "node-1",
            None,
            secs(base, 10),
            &oom,
        ),
        restart(
            "oom-r1",
            types::CONTAINER_OOMKILLED,
            "shop",
            "cart-1",
            "node-1",
            secs(base, 12),
            1,
            ("OOMKilled", 137),
        ),
        restart(
            "oom-r2",
            types::CONTAINER_RESTARTED,
            "shop",
            "cart-1",
            "node-1",
            secs(base, 60),
            2,
            ("OOMKilled", 137),
        ),
        json_event(
            "oom-ep",
            types::ENDPOINTS_EMPTY,
            "k8s",
            "node-1",
            Some("service/shop/cart"),
            secs(base, 62),
            json!({"namespace": "shop", "service": "cart", "ready": 0, "notReadyPods": ["shop/cart-1"]}),
        ),
        // Node runtime failure on node-2: kubelet fails, node NotReady, a pod there restarts.
        kubelet_failed(base),
        json_event(
            "nr-node",
            types::NODE_NOT_READY,
            "k8s",
            "node-2",
            Some("node/node-2"),
            secs(base, 240),
            json!({"node": "node-2", "reason": "KubeletNotReady", "status": "Unknown", "message": "Kubelet stopped posting node status."}),
        ),
        restart(
            "nr-pod",
            types::CONTAINER_RESTARTED,
            "batch",
            "worker-1",
            "node-2",
            secs(base, 250),
            1,
            ("Error", 1),
        ),
        // Service disruption on shop/pay: endpoints gone, clients refused (one before the endpoints event).
        refused("sd-t1", 300),
        json_event(
            "sd-ep",
            types::ENDPOINTS_EMPTY,
            "k8s",
            "node-1",
            Some("service/shop/pay"),
            secs(base, 301),
            json!({"namespace": "shop", "service": "pay", "ready": 0, "notReadyPods": []}),
        ),
        refused("sd-t2", 302),
        refused("sd-t3", 303),
        // Bad rollout of shop/web: web-7c9f replaces web-5d4b and its pods keep failing.
        restart(
            "br-old",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-5d4b-ccccc",
            "node-1",
            secs(base, 310),
            1,
            ("Error", 1),
        ),
        json_event(
            "br-ro",
            types::ROLLOUT_STARTED,
            "k8s",
            "node-1",
            Some("deployment/shop/web"),
            secs(base, 400),
            json!({"namespace": "shop", "deployment": "web", "newReplicaSet": "web-7c9f", "oldReplicaSet": "web-5d4b", "revision": "8"}),
        ),
        restart(
            "br-1",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-7c9f-aaaaa",
            "node-1",
            secs(base, 420),
            1,
            ("Error", 1),
        ),
        restart(
            "br-2",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-7c9f-bbbbb",
            "node-1",
            secs(base, 430),
            1,
            ("Error", 1),
        ),
        restart(
            "br-3",
            types::CONTAINER_RESTARTED,
            "shop",
            "web-7c9f-aaaaa",
            "node-1",
            secs(base, 470),
            2,
            ("Error", 1),
        ),
    ]);
    events
}

fn by_kind(latest: &BTreeMap<String, Insight>) -> BTreeMap<String, Vec<Insight>> {
    let mut out: BTreeMap<String, Vec<Insight>> = BTreeMap::new();
    for i in latest.values() {
        out.entry(i.kind.clone()).or_default().push(i.clone());
    }
    out
}

fn one<'a>(kinds: &'a BTreeMap<String, Vec<Insight>>, kind: &str) -> &'a Insight {
    let list = kinds
        .get(kind)
        .unwrap_or_else(|| panic!("no {kind} insight in {kinds:#?}"));
    assert_eq!(list.len(), 1, "exactly one {kind} incident: {list:#?}");
    &list[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_finds_its_root_cause_and_a_replay_duplicates_nothing() {
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    cluster_pods(&js).await;
    let _enrich = start_function(&server, "tidewatch-enrich", &[]);
    let _correlate = start_function(&server, "tidewatch-correlate", &[]);
    let base = Utc::now() - chrono::Duration::minutes(20);
    let events = incidents(base);
    publish_raw(&publisher, &events).await;
    tidewatch_testkit::eventually(
        "every event to reach correlate",
        Duration::from_secs(60),
        || async {
            (stream_messages(&js, topology::ENRICHED.name).await == events.len() as u64)
                .then_some(())
        },
    )
    .await;
    settled(&js, &["enrich", "correlate"]).await;

    // Enrich joined the kernel events by container id and the TCP peers by service IP.
    let enriched = stream_events(&js, topology::ENRICHED.name).await;
    let ext = |id: &str, name: &str| {
        enriched
            .iter()
            .find(|e| cloudevents::AttributesReader::id(*e) == id)
            .and_then(|e| e.extension(name).map(|v| v.to_string()))
    };
    assert_eq!(ext("oom-k1", "pod").as_deref(), Some("cart-1"));
    assert_eq!(ext("oom-k1", "container").as_deref(), Some("cart"));
    assert_eq!(ext("sd-t1", "peerservice").as_deref(), Some("shop/pay"));
    assert_eq!(ext("nr-unit", "node").as_deref(), Some("node-2"));
    assert_eq!(ext("nr-pod", "node").as_deref(), Some("node-2"));
    assert_eq!(
        ext("br-1", "workload").as_deref(),
        Some("ReplicaSet/web-7c9f")
    );
    assert!(enriched.iter().all(|e| e.extension("resolution").is_some()));

    let all = insights(&js).await;
    let latest = latest(&all);
    let kinds = by_kind(&latest);
    assert_eq!(
        kinds.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "bad-rollout",
            "crash-loop",
            "node-runtime-failure",
            "oom-cascade",
            "service-disruption"
        ],
        "{kinds:#?}"
    );

    let oom = one(&kinds, "oom-cascade");
    assert_eq!(oom.root_cause_event_id, "oom-k1");
    assert_eq!(
        oom.evidence_event_ids,
        ["oom-k1", "oom-r1", "oom-r2", "oom-ep"]
    );
    assert!(
        oom.root_cause.contains("container cart"),
        "{}",
        oom.root_cause
    );
    assert!(oom.root_cause.contains("256 MiB"), "{}", oom.root_cause);
    assert!(oom.root_cause.contains("java"), "{}", oom.root_cause);
    assert_eq!(oom.severity, "critical");
    assert!(oom.revision >= 1);
    assert!(
        oom.affected
            .iter()
            .any(|e| e.kind == "service" && e.name == "cart")
    );
    assert_eq!(
        oom.first_seen_ns,
        secs(base, 10).timestamp_nanos_opt().unwrap_or_default()
    );

    let cl = one(&kinds, "crash-loop");
    assert_eq!(cl.evidence_event_ids, ["cl-1", "cl-2", "cl-3"]);
    assert!(cl.root_cause.contains("SIGSEGV"), "{}", cl.root_cause);
    assert_eq!(cl.affected[0].name, "api-1");

    let nr = one(&kinds, "node-runtime-failure");
    assert_eq!(nr.root_cause_event_id, "nr-unit");
    assert_eq!(nr.evidence_event_ids, ["nr-unit", "nr-node", "nr-pod"]);
    assert!(
        nr.root_cause.contains("kubelet.service"),
        "{}",
        nr.root_cause
    );
    assert!(
        nr.affected
            .iter()
            .any(|e| e.kind == "pod" && e.name == "worker-1")
    );

    let sd = one(&kinds, "service-disruption");
    assert_eq!(sd.root_cause_event_id, "sd-ep");
    assert_eq!(sd.evidence_event_ids, ["sd-t1", "sd-ep", "sd-t2", "sd-t3"]);
    assert!(sd.summary.contains("shop/pay"), "{}", sd.summary);

    let br = one(&kinds, "bad-rollout");
    assert_eq!(br.root_cause_event_id, "br-ro");
    assert_eq!(br.evidence_event_ids, ["br-ro", "br-1", "br-2", "br-3"]);
    assert!(br.summary.contains("web-7c9f"), "{}", br.summary);

    // Each (insight, revision) is one message: no duplicates.
    let mut versions: Vec<(String, u32)> = all.iter().map(|i| (i.id.clone(), i.revision)).collect();
    versions.sort();
    let n = versions.len();
    versions.dedup();
    assert_eq!(versions.len(), n, "no duplicate insight messages");

    // Replay every enriched event to correlate (as `tidewatch replay` does): nothing new.
    let before = stream_messages(&js, topology::INSIGHTS.name).await;
    let raw = js
        .get_stream(topology::ENRICHED.name)
        .await
        .expect("stream");
    let last = raw.get_info().await.expect("info").state.last_sequence;
    for seq in 1..=last {
        let m = raw.get_raw_message(seq).await.expect("message");
        let mut headers = async_nats::HeaderMap::new();
        for (name, values) in m.headers.iter() {
            let name: &str = name.as_ref();
            if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                continue;
            }
            for v in values {
                headers.append(name, v.clone());
            }
        }
        js.publish_with_headers(
            topology::subjects::replay("enriched", "correlate"),
            headers,
            m.payload.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
    tidewatch_testkit::eventually(
        "the replay to be consumed",
        Duration::from_secs(60),
        || async {
            let (pending, ack_pending, _, floor) = consumer_state(&js, "correlate").await;
            (pending == 0 && ack_pending == 0 && floor >= 2 * last).then_some(())
        },
    )
    .await;
    let after = insights(&js).await;
    assert_eq!(stream_messages(&js, topology::INSIGHTS.name).await, before);
    assert_eq!(
        common::latest(&after),
        latest,
        "replayed inputs changed no insight"
    );
    assert_eq!(stream_messages(&js, topology::DEAD_LETTER.name).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_churn_good_deploys_and_single_restarts_yield_no_insight() {
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    cluster_pods(&js).await;
    let _enrich = start_function(&server, "tidewatch-enrich", &[]);
    let _correlate = start_function(&server, "tidewatch-correlate", &[]);
    let base = Utc::now() - chrono::Duration::minutes(30);
    let mut events = Vec::new();
    // Pod churn: containers starting, one restart per pod spread over time.
    for (i, name) in ["cart-1", "api-1", "web-5d4b-ccccc"].iter().enumerate() {
        events.push(restart(
            &format!("st-{i}"),
            types::CONTAINER_STARTED,
            "shop",
            name,
            "node-1",
            secs(base, i as i64),
            0,
            ("", 0),
        ));
        events.push(restart(
            &format!("rs-{i}"),
            types::CONTAINER_RESTARTED,
            "shop",
            name,
            "node-1",
            secs(base, 60 + i as i64),
            1,
            ("Error", 1),
        ));
    }
    // Two restarts of one pod far apart (outside the crash-loop window).
    events.push(restart(
        "far-1",
        types::CONTAINER_RESTARTED,
        "shop",
        "api-1",
        "node-1",
        secs(base, 700),
        2,
        ("Error", 1),
    ));
    events.push(restart(
        "far-2",
        types::CONTAINER_RESTARTED,
        "shop",
        "api-1",
        "node-1",
        secs(base, 1400),
        3,
        ("Error", 1),
    ));
    // A good deploy: rollout, new pods restart once at most, the old ones had restarted as often.
    events.push(json_event(
        "ro-good",
        types::ROLLOUT_STARTED,
        "k8s",
        "node-1",
        Some("deployment/shop/web"),
        secs(base, 100),
        json!({"namespace": "shop", "deployment": "web", "newReplicaSet": "web-7c9f", "oldReplicaSet": "web-5d4b", "revision": "9"}),
    ));
    events.push(restart(
        "ro-n1",
        types::CONTAINER_RESTARTED,
        "shop",
        "web-7c9f-aaaaa",
        "node-1",
        secs(base, 130),
        1,
        ("Error", 1),
    ));
    // A child process OOM-killed without the container restarting.
    let oom = OomKill {
        victim: Some(ProcessInfo {
            pid: 77,
            comm: "convert".into(),
            container_id: "def456".into(),
            ..Default::default()
        }),
        memory_limit_bytes: 256 << 20,
        ..Default::default()
    };
    events.push(proto_event(
        "oom-alone",
        types::OOM_KILL,
        "ebpf",
        "node-1",
        None,
        secs(base, 200),
        &oom,
    ));
    // A unit that is not the runtime fails; a node blips NotReady and back without a runtime failure.
    let cron = UnitStateChange {
        unit: "cron.service".into(),
        node: "node-2".into(),
        active_state: "failed".into(),
        ..Default::default()
    };
    events.push(proto_event(
        "cron",
        types::UNIT_FAILED,
        "systemd",
        "node-2",
        Some("unit/cron.service"),
        secs(base, 300),
        &cron,
    ));
    let restarted = UnitStateChange {
        unit: "containerd.service".into(),
        node: "node-1".into(),
        active_state: "active".into(),
        ..Default::default()
    };
    events.push(proto_event(
        "ctrd-restart",
        types::UNIT_RESTARTED,
        "systemd",
        "node-1",
        Some("unit/containerd.service"),
        secs(base, 310),
        &restarted,
    ));
    events.push(json_event(
        "node-blip",
        types::NODE_NOT_READY,
        "k8s",
        "node-2",
        Some("node/node-2"),
        secs(base, 320),
        json!({"node": "node-2", "reason": "NodeStatusUnknown"}),
    ));
    events.push(json_event(
        "node-back",
        types::NODE_READY,
        "k8s",
        "node-2",
        Some("node/node-2"),
        secs(base, 330),
        json!({"node": "node-2"}),
    ));
    // Two refused connections to a service that still has endpoints; scaling a service to zero on purpose.
    for i in 0..2 {
        let tcp = TcpConnection {
            process: Some(ProcessInfo {
                container_id: "abc123".into(),
                ..Default::default()
            }),
            daddr: "10.96.0.21".into(),
            dport: 80,
            ..Default::default()
        };
        events.push(proto_event(
            &format!("tcp-{i}"),
            types::TCP_REFUSED,
            "ebpf",
            "node-1",
            None,
            secs(base, 400 + i),
            &tcp,
        ));
    }
    events.push(json_event(
        "ep-zero",
        types::ENDPOINTS_EMPTY,
        "k8s",
        "node-1",
        Some("service/shop/pay"),
        secs(base, 500),
        json!({"namespace": "shop", "service": "pay", "notReadyPods": []}),
    ));
    // Ends of incidents that never were: a container stable after its one
    // restart, the good deploy completing, a service's endpoints back.
    events.push(proto_event(
        "noise-stable",
        types::CONTAINER_STABLE,
        "k8s",
        "node-1",
        Some("pod/shop/cart-1"),
        secs(base, 900),
        &tidewatch_proto::v1::ContainerRestart {
            namespace: "shop".into(),
            pod: "cart-1".into(),
            container: "cart".into(),
            restart_count: 1,
            ..Default::default()
        },
    ));
    events.push(proto_event(
        "noise-rollout-done",
        types::ROLLOUT_COMPLETED,
        "k8s",
        "node-1",
        Some("deployment/shop/web"),
        secs(base, 905),
        &tidewatch_proto::v1::RolloutChange {
            namespace: "shop".into(),
            deployment: "web".into(),
            new_replica_set: "web-7c9f".into(),
            ..Default::default()
        },
    ));
    events.push(proto_event(
        "noise-endpoints-back",
        types::ENDPOINTS_RECOVERED,
        "k8s",
        "node-1",
        Some("service/shop/search"),
        secs(base, 910),
        &tidewatch_proto::v1::EndpointsChange {
            namespace: "shop".into(),
            service: "search".into(),
            ready: 2,
            not_ready_pods: Vec::new(),
        },
    ));
    // Normal kernel traffic.
    for i in 0..20 {
        let exec = v1::ProcessExec {
            process: Some(ProcessInfo {
                pid: 1000 + i,
                comm: "sh".into(),
                container_id: "abc123".into(),
                ..Default::default()
            }),
            filename: "/bin/sh".into(),
            ..Default::default()
        };
        events.push(proto_event(
            &format!("exec-{i}"),
            types::PROCESS_EXEC,
            "ebpf",
            "node-1",
            None,
            secs(base, 600 + i64::from(i)),
            &exec,
        ));
    }
    publish_raw(&publisher, &events).await;
    // What correlate reads is stored for it; the kernel traffic no rule
    // reads is not (issue #16).
    let correlate = common::functions()
        .into_iter()
        .find(|f| f.name == "correlate")
        .expect("correlate");
    let wanted = events
        .iter()
        .filter(|e| correlate.handles(cloudevents::AttributesReader::ty(*e)))
        .count() as u64;
    tidewatch_testkit::eventually(
        "every event to reach correlate",
        Duration::from_secs(60),
        || async { (stream_messages(&js, topology::ENRICHED.name).await == wanted).then_some(()) },
    )
    .await;
    settled(&js, &["enrich", "correlate"]).await;
    let found = insights(&js).await;
    eprintln!(
        "INCIDENTS | noise | {} events | insights {}",
        events.len(),
        found.len()
    );
    assert!(found.is_empty(), "noise produced insights: {found:#?}");
    assert_eq!(stream_messages(&js, topology::DEAD_LETTER.name).await, 0);
}

/// Sum of every sample of `name` (all label sets) in a Prometheus text page.
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn metrics_page(port: u16) -> String {
    let (status, body) = tidewatch_testkit::http_get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("replica serves /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_correlate_replicas_lose_no_update() {
    const N: usize = 150;
    const CHUNK: usize = 10;
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    // Replicas first, each with its own /metrics, all consuming before the
    // first event: they compete for every chunk published below.
    let ports = tidewatch_testkit::free_ports(3);
    let replicas: Vec<_> = ports
        .iter()
        .map(|port| {
            let addr = format!("127.0.0.1:{port}");
            start_function(
                &server,
                "tidewatch-correlate",
                &[
                    "--metrics-addr",
                    &addr,
                    "--concurrency",
                    "32",
                    "--batch",
                    "8",
                ],
            )
        })
        .collect();
    for port in &ports {
        tidewatch_testkit::eventually(
            "every replica to be consuming",
            Duration::from_secs(60),
            || async {
                let url = format!("http://127.0.0.1:{port}/readyz");
                matches!(tidewatch_testkit::http_get(&url).await, Ok((200, _))).then_some(())
            },
        )
        .await;
    }
    // Correlate reads the enriched stream: publish there directly (no enrich needed).
    let base = Utc::now() - chrono::Duration::minutes(5);
    let events: Vec<cloudevents::Event> = (0..N)
        .map(|i| {
            restart(
                &format!("c-{i:03}"),
                types::CONTAINER_RESTARTED,
                "shop",
                "hot-1",
                "node-1",
                secs(base, i as i64),
                i as u32,
                ("Error", 1),
            )
        })
        .collect();
    let subject = |e: &cloudevents::Event| {
        topology::subjects::enriched("k8s", "node-1", cloudevents::AttributesReader::ty(e))
    };
    // events_in of each replica, sampled after each chunk (and once settled).
    let mut samples: Vec<Vec<u64>> = Vec::new();
    let sample = async || {
        let mut row = Vec::new();
        for port in &ports {
            row.push(metric(
                &metrics_page(*port).await,
                "tidewatch_events_in_total",
            ));
        }
        row
    };
    for chunk in events.chunks(CHUNK) {
        for e in chunk {
            publisher
                .publish(subject(e).as_str(), e)
                .await
                .expect("stored");
        }
        samples.push(sample().await);
    }
    settled(&js, &["correlate"]).await;
    samples.push(sample().await);
    // Updates that lost to another replica (creates racing for a new key don't count).
    let mut conflicts = 0;
    for port in &ports {
        conflicts += metric(
            &metrics_page(*port).await,
            "tidewatch_kv_conflicts_total{component=\"correlate\",op=\"update\"}",
        );
    }
    drop(replicas);

    // Samples are taken one after another, so a replica that had handled
    // something by sample k and handled more between samples k+1 and k+2
    // was at work across the gap between samples k and k+1. Two replicas
    // at work across the same gap ran at the same time.
    let overlapping = (0..samples.len().saturating_sub(2)).any(|k| {
        (0..ports.len())
            .filter(|&r| samples[k][r] > 0 && samples[k + 2][r] > samples[k + 1][r])
            .count()
            >= 2
    });
    assert!(
        overlapping,
        "no two replicas handled events at the same time; events_in per replica after each chunk: {samples:?}"
    );
    // Replicas wrote the same key in turn: compare-and-set must have
    // refused stale writes (a blind put would never conflict, and lose updates).
    assert!(
        conflicts > 0,
        "no compare-and-set conflict between replicas writing one key (events_in: {samples:?})"
    );

    // The state has every restart, in time order: what one replica alone would have.
    let kv = js
        .get_key_value(topology::CORRELATION_STATE.bucket)
        .await
        .expect("bucket");
    let state: serde_json::Value = serde_json::from_slice(
        &kv.get("crash-loop.shop_hot-1")
            .await
            .expect("kv")
            .expect("state"),
    )
    .expect("json");
    let ids: Vec<&str> = state["restarts"]
        .as_array()
        .expect("restarts")
        .iter()
        .filter_map(|r| r["event_id"].as_str())
        .collect();
    // An open crash loop keeps its first 3 restarts (id, root cause) and the
    // newest, 64 in all: the newest of every replica's are there.
    let expected: Vec<String> = (0..N)
        .map(|i| format!("c-{i:03}"))
        .filter(|id| id.as_str() < "c-003" || id.as_str() >= format!("c-{:03}", N - 61).as_str())
        .collect();
    assert_eq!(ids, expected, "no lost update");
    // One incident, one message per revision; the last revision counts
    // every restart after the third: none was lost.
    let all = insights(&js).await;
    let latest = latest(&all);
    assert_eq!(latest.len(), 1, "one incident, not several: {latest:#?}");
    let insight = latest.values().next().expect("insight");
    assert_eq!(insight.evidence_event_ids.len(), 64);
    assert_eq!(insight.revision as usize, N - 3 + 1);
    // One message per revision at most (an input retried after a conflict on
    // another rule's key re-emits the then-current revision instead).
    let mut revisions: Vec<u32> = all.iter().map(|i| i.revision).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), all.len(), "no revision published twice");
    assert!(all.len() <= N - 3 + 1);
    assert_eq!(stream_messages(&js, topology::DEAD_LETTER.name).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_file_tunes_thresholds_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[crash_loop]\nthreshold = 3\nwindow = \"10m\"\nwindo = \"5m\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(binary("tidewatch-correlate"))
        .args(["--rules", bad.to_str().expect("utf-8"), "--check-rules"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid rules file") && stderr.contains("windo"),
        "{stderr}"
    );

    // Crash loop at 2 restarts, everything else off but a user rule.
    let good = dir.path().join("rules.toml");
    std::fs::write(
        &good,
        r#"
[crash_loop]
threshold = 2
window = "1h"

[[sequence]]
name = "image-pull-storm"
severity = "warning"
entity = "node"
key = ["data.node"]
window = "10m"
order = "any"
summary = "{count.pulls} image pull failures on node {key}"
root_cause = "images cannot be pulled on {key}, first for pod {root.subject}"
[[sequence.steps]]
name = "pulls"
types = ["dev.tidewatch.k8s.container.imagepullfailed"]
count = 2
"#,
    )
    .expect("write");
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    let _correlate = start_function(
        &server,
        "tidewatch-correlate",
        &["--rules", good.to_str().expect("utf-8")],
    );
    let base = Utc::now() - chrono::Duration::minutes(5);
    let subject = |e: &cloudevents::Event| {
        topology::subjects::enriched("k8s", "node-1", cloudevents::AttributesReader::ty(e))
    };
    let events = [
        restart(
            "a-1",
            types::CONTAINER_RESTARTED,
            "shop",
            "a-1",
            "node-1",
            secs(base, 0),
            1,
            ("Error", 1),
        ),
        restart(
            "a-2",
            types::CONTAINER_RESTARTED,
            "shop",
            "a-1",
            "node-1",
            secs(base, 10),
            2,
            ("Error", 1),
        ),
        restart(
            "p-1",
            types::CONTAINER_IMAGE_PULL_FAILED,
            "shop",
            "b-1",
            "node-1",
            secs(base, 20),
            0,
            ("ErrImagePull", 0),
        ),
        restart(
            "p-2",
            types::CONTAINER_IMAGE_PULL_FAILED,
            "shop",
            "c-1",
            "node-1",
            secs(base, 30),
            0,
            ("ImagePullBackOff", 0),
        ),
    ];
    for e in &events {
        publisher
            .publish(subject(e).as_str(), e)
            .await
            .expect("stored");
    }
    settled(&js, &["correlate"]).await;
    let kinds = by_kind(&latest(&insights(&js).await));
    assert_eq!(
        kinds.keys().map(String::as_str).collect::<Vec<_>>(),
        ["crash-loop", "image-pull-storm"],
        "{kinds:#?}"
    );
    assert_eq!(one(&kinds, "crash-loop").evidence_event_ids, ["a-1", "a-2"]);
    let storm = one(&kinds, "image-pull-storm");
    assert_eq!(storm.summary, "2 image pull failures on node node-1");
    assert_eq!(
        storm.root_cause,
        "images cannot be pulled on node-1, first for pod pod/shop/b-1"
    );
}
