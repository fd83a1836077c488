//! Pipeline benchmarks (they print numbers and assert nothing about time):
//! enrich and correlate events/s per instance with a warm cache, against the
//! raw consume-and-ack rate of the same stream measured in the same run; and
//! end-to-end latency at a steady rate.
//!
//! Throughput runs twice, each on its own nats-server: on the realistic mix
//! (90 % kernel events no rule reads, which correlate acks without
//! decoding) and on a rule-heavy mix where every event is one a rule
//! consumes, so correlate's second ratio is the cost of its rules and KV
//! state. Each run fails unless every event was stored and handled: enrich
//! stored one output per input, correlate's handler saw every event a rule
//! wants (from its /metrics) and nothing was dead-lettered.
//!
//! ```sh
//! cargo build --release --workspace
//! cargo bench --bench pipeline
//! ```
//! Environment: `TIDEWATCH_BENCH_EVENTS` (default 20000),
//! `TIDEWATCH_BENCH_RATE` / `TIDEWATCH_BENCH_SECS` (latency: 10000 events/s
//! for 10 s), `TIDEWATCH_BENCH_ONLY=throughput|latency` (one half, for
//! profiling), `TIDEWATCH_BENCH_MIX=realistic|rules` (one throughput mix).
//! Rates move with the neighbours on a shared machine; the CPU
//! microseconds per event printed beside them (function process and
//! nats-server, from /proc) say where the time went.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use chrono::Utc;
use common::*;
use futures::StreamExt;
use tidewatch_proto::v1::{
    ContainerMetadata, ContainerRestart, OomKill, PodMetadata, ProcessExec, ProcessInfo,
    UnitStateChange,
};
use tidewatch_runtime::topology::{self, types};
use tidewatch_testkit::NatsServer;

/// Pods in the metadata bucket; the traffic spreads over them.
const PODS: usize = 200;
/// Nodes the pods run on, and services in front of them (rule-heavy mix).
const NODES: usize = 10;
const SERVICES: usize = 20;

fn pod(i: usize) -> PodMetadata {
    PodMetadata {
        uid: format!("uid-{i}"),
        namespace: "bench".into(),
        name: format!("app-{i}"),
        node: format!("node-{}", i % NODES),
        labels: [("app".to_string(), "bench".to_string())].into(),
        workload_kind: "ReplicaSet".into(),
        workload_name: "app-5d4b".into(),
        pod_ips: vec![format!("10.9.{}.{}", i / 250, i % 250)],
        containers: vec![ContainerMetadata {
            name: "app".into(),
            container_id: format!("containerd://c{i:06}"),
            memory_limit_bytes: 1 << 28,
            ..Default::default()
        }],
        deleted_at_ns: 0,
    }
}

/// The bench's traffic: a container restart (joined by pod name, from the
/// k8s collector) when `restart`, else a kernel exec (joined by container
/// id, from the eBPF collector); `i` picks the pod. Returns the raw subject too.
fn bench_event(
    id: &str,
    i: usize,
    restart: bool,
    at: chrono::DateTime<Utc>,
) -> (String, cloudevents::Event) {
    if restart {
        let p = i % PODS;
        let payload = ContainerRestart {
            namespace: "bench".into(),
            pod: format!("app-{p}"),
            container: "app".into(),
            exit_code: 1,
            reason: "Error".into(),
            ..Default::default()
        };
        let event = proto_event(
            id,
            types::CONTAINER_RESTARTED,
            "k8s",
            "node-1",
            Some(&format!("pod/bench/app-{p}")),
            at,
            &payload,
        );
        (topology::subjects::raw("k8s", "node-1"), event)
    } else {
        let payload = ProcessExec {
            process: Some(ProcessInfo {
                pid: i as u32,
                comm: "sh".into(),
                container_id: format!("c{:06}", i % PODS),
                ..Default::default()
            }),
            filename: "/bin/sh".into(),
            ..Default::default()
        };
        let event = proto_event(
            id,
            types::PROCESS_EXEC,
            "ebpf",
            "node-1",
            None,
            at,
            &payload,
        );
        (topology::subjects::raw("ebpf", "node-1"), event)
    }
}

/// The two throughput mixes.
#[derive(Clone, Copy, PartialEq)]
enum Mix {
    /// 90 % kernel exec events (no rule reads them), 10 % container restarts.
    Realistic,
    /// Only events a rule consumes, spread over pods, services and nodes:
    /// container restarts (crash loop, bad rollout, OOM cascade, node
    /// runtime failure), kernel OOM kills (OOM cascade), endpoints dropping
    /// to zero (service disruption, OOM cascade) and kubelet unit failures
    /// (node runtime failure).
    RuleHeavy,
}

impl Mix {
    /// Event time between consecutive events. The rule-heavy mix is spaced
    /// so each pod restarts about once a minute (200 pods, 4 types), as
    /// under CrashLoopBackOff; denser, every rule window would hold
    /// hundreds of events per pod, which no cluster produces.
    fn spacing(self) -> chrono::Duration {
        match self {
            Mix::Realistic => chrono::Duration::milliseconds(10),
            Mix::RuleHeavy => chrono::Duration::milliseconds(75),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mix::Realistic => "realistic mix (90 % kernel exec, 10 % restarts)",
            Mix::RuleHeavy => {
                "rule-heavy mix (restarts, OOM kills, endpoints empty, unit failures)"
            }
        }
    }
    /// Event `i` of the mix: its raw subject, the event, and whether a
    /// correlate rule consumes its type.
    fn event(self, i: usize, at: chrono::DateTime<Utc>) -> (String, cloudevents::Event, bool) {
        let id = format!("b-{i}");
        match self {
            Mix::Realistic => {
                let restart = i.is_multiple_of(10);
                let pick = if restart { i / 10 } else { i };
                let (subject, event) = bench_event(&id, pick, restart, at);
                (subject, event, restart)
            }
            Mix::RuleHeavy => {
                let (subject, event) = rule_event(&id, i, at);
                (subject, event, true)
            }
        }
    }
}

/// Event `i` of the rule-heavy mix (see [`Mix::RuleHeavy`]).
fn rule_event(id: &str, i: usize, at: chrono::DateTime<Utc>) -> (String, cloudevents::Event) {
    let p = (i / 4) % PODS;
    match i % 4 {
        0 => bench_event(id, p, true, at),
        1 => {
            let payload = OomKill {
                victim: Some(ProcessInfo {
                    pid: 1000 + i as u32,
                    comm: "app".into(),
                    container_id: format!("c{p:06}"),
                    ..Default::default()
                }),
                rss_pages: 65_536,
                total_pages: 65_536,
                memory_limit_bytes: 1 << 28,
                ..Default::default()
            };
            let event = proto_event(id, types::OOM_KILL, "ebpf", "node-1", None, at, &payload);
            (topology::subjects::raw("ebpf", "node-1"), event)
        }
        2 => {
            let s = (i / 4) % SERVICES;
            let event = json_event(
                id,
                types::ENDPOINTS_EMPTY,
                "k8s",
                "node-1",
                Some(&format!("service/bench/svc-{s}")),
                at,
                serde_json::json!({
                    "namespace": "bench",
                    "service": format!("svc-{s}"),
                    "ready": 0,
                    "notReadyPods": [format!("bench/app-{p}")],
                }),
            );
            (topology::subjects::raw("k8s", "node-1"), event)
        }
        _ => {
            let node = format!("node-{}", (i / 4) % NODES);
            let payload = UnitStateChange {
                unit: "kubelet.service".into(),
                node: node.clone(),
                active_state: "failed".into(),
                sub_state: "failed".into(),
                result: "exit-code".into(),
                ..Default::default()
            };
            let event = proto_event(id, types::UNIT_FAILED, "systemd", &node, None, at, &payload);
            (topology::subjects::raw("systemd", &node), event)
        }
    }
}

/// Counters of a function's `/metrics`, summed over label sets.
struct Counters {
    /// Handler calls: events decoded and handed to the function.
    handled: u64,
    acks: u64,
    naks: u64,
    dead_lettered: u64,
}

async fn function_counters(addr: std::net::SocketAddr) -> Counters {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint");
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    conn.read_to_string(&mut body).await.expect("metrics");
    let sum = |name: &str| -> u64 {
        body.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Counters {
        handled: sum("tidewatch_handler_seconds_count"),
        acks: sum("tidewatch_acks_total"),
        naks: sum("tidewatch_naks_total"),
        dead_lettered: sum("tidewatch_dead_lettered_total"),
    }
}

/// A local address nothing listens on now, for a function's /metrics.
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// CPU seconds (user + system) a process has used so far; 0 if unknown.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The nats-server process serving `server` (found by its store dir).
fn server_pid(server: &NatsServer) -> u32 {
    let dir = server.store_dir().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("nats-server") && c.contains(dir.as_str())
            })
        })
        .unwrap_or(0)
}

/// CPU microseconds per event each of `pids` spent over `f`.
struct Cpu {
    pids: Vec<u32>,
    start: Vec<f64>,
}

impl Cpu {
    fn start(pids: &[u32]) -> Cpu {
        Cpu {
            pids: pids.to_vec(),
            start: pids.iter().map(|&p| cpu_seconds(p)).collect(),
        }
    }
    fn per_event(&self, events: u64) -> Vec<f64> {
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(&p, s)| (cpu_seconds(p) - s) * 1e6 / events.max(1) as f64)
            .collect()
    }
}

/// Consume-and-ack `stream` through a fresh durable until `count` messages; events/s.
async fn raw_rate(js: &jetstream::Context, stream: &str, count: u64) -> f64 {
    let stream = js.get_stream(stream).await.expect("stream");
    let name = format!(
        "bench-raw-{}",
        Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let started = Instant::now();
    let mut seen = 0u64;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .expect("messages");
    while seen < count {
        let m = messages.next().await.expect("more").expect("message");
        // Decode as a function would, then ack.
        let _ = tidewatch_runtime::binding::nats::from_nats(m.headers.as_ref(), &m.payload);
        m.ack().await.expect("ack");
        seen += 1;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// The least any function that republishes every event must do, with
/// plain async-nats: consume `stream` through a fresh durable, publish
/// each message unchanged (same headers, so the same `Nats-Msg-Id`) to a
/// scratch stream configured like the enriched one, and ack the input once
/// its copy is stored; 256 in flight, like a function's handler slots.
/// events/s: the ceiling for enrich on this machine in this run.
async fn raw_republish_rate(js: &jetstream::Context, stream: &str, count: u64) -> f64 {
    let mut scratch = tidewatch_runtime::provision::desired_stream(
        &topology::ENRICHED,
        &tidewatch_runtime::provision::ProvisionOptions::default(),
    );
    scratch.name = "BENCH_REPUBLISH".into();
    scratch.subjects = vec!["bench.republish.>".into()];
    // The test server has room for the provisioned streams only.
    scratch.max_bytes = 1 << 30;
    js.get_or_create_stream(scratch)
        .await
        .expect("scratch stream");
    let stream = js.get_stream(stream).await.expect("stream");
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-republish".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let publisher = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .build(js.client());
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .expect("messages");
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let started = Instant::now();
    let (mut received, mut done) = (0u64, 0u64);
    while done < count {
        tokio::select! {
            biased;
            Some(stored) = in_flight.next(), if !in_flight.is_empty() => {
                let (m, ack): (jetstream::Message, _) = stored;
                let _: jetstream::publish::PublishAck = ack;
                m.ack().await.expect("ack");
                done += 1;
            }
            m = messages.next(), if received < count && in_flight.len() < 256 => {
                let m = m.expect("more").expect("message");
                let ack = publisher
                    .send_publish(
                        "bench.republish.x",
                        jetstream::message::PublishMessage::build()
                            .headers(m.headers.clone().unwrap_or_default())
                            .payload(m.payload.clone()),
                    )
                    .await
                    .expect("sent");
                received += 1;
                in_flight.push(async move { (m, ack.await.expect("stored")) });
            }
        }
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Time from the function's first ack to `count` acks: events/s, and CPU
/// microseconds per event of `pids` (the function, the server) meanwhile.
async fn function_rate(
    js: &jetstream::Context,
    durable: &str,
    count: u64,
    pids: &[u32],
) -> (f64, Vec<f64>) {
    let mut started = None;
    loop {
        let (pending, ack_pending, _, floor) = consumer_state(js, durable).await;
        if floor > 0 && started.is_none() {
            started = Some((Instant::now(), floor, Cpu::start(pids)));
        }
        if pending == 0 && ack_pending == 0 && floor > 0 {
            let (t, first, cpu) = started.expect("started");
            let done = (count - first).max(1);
            let rate = done as f64 / t.elapsed().as_secs_f64().max(1e-3);
            return (rate, cpu.per_event(done));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn enrich_and_correlate_against_the_raw_rate(mix: Mix) {
    let n: u64 = std::env::var("TIDEWATCH_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    for i in 0..PODS {
        put_pod(&js, &pod(i)).await;
    }
    let base = Utc::now() - chrono::Duration::hours(1);
    let mut confirmations = Vec::new();
    let mut ruled = 0u64;
    for i in 0..n as usize {
        let at = base + mix.spacing() * i as i32;
        let (subject, event, wanted) = mix.event(i, at);
        ruled += u64::from(wanted);
        confirmations.push(
            publisher
                .send(subject.as_str(), &event)
                .await
                .expect("sent"),
        );
    }
    for c in confirmations {
        c.await.expect("stored");
    }
    let stored = stream_messages(&js, topology::RAW.name).await;
    assert_eq!(
        stored, n,
        "the raw stream holds {stored} of {n} published events"
    );

    let nats = server_pid(&server);
    let me = std::process::id();
    let cpu = Cpu::start(&[me, nats]);
    let raw = raw_rate(&js, topology::RAW.name, n).await;
    let raw_cpu = cpu.per_event(n);
    // The republish ceiling is a property of the server, not of the mix.
    let republish = if mix == Mix::Realistic {
        let cpu = Cpu::start(&[me, nats]);
        let rate = raw_republish_rate(&js, topology::RAW.name, n).await;
        Some((rate, cpu.per_event(n)))
    } else {
        None
    };
    let enrich_process = start_function(&server, "tidewatch-enrich", &[]);
    let (enrich, enrich_cpu) =
        function_rate(&js, "enrich", n, &[enrich_process.id().unwrap_or(0), nats]).await;
    // enrich emits one event per input (unresolved ones are marked, not
    // dropped): anything else means it did not do the work measured.
    let enriched = stream_messages(&js, topology::ENRICHED.name).await;
    assert_eq!(
        enriched, n,
        "enrich stored {enriched} events for {n} inputs"
    );
    let cpu = Cpu::start(&[me, nats]);
    let raw_enriched = raw_rate(&js, topology::ENRICHED.name, n).await;
    let raw_enriched_cpu = cpu.per_event(n);
    let metrics = free_addr();
    let correlate_process = tokio::process::Command::new(binary("tidewatch-correlate"))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", metrics.to_string())
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("correlate starts");
    let (correlate, correlate_cpu) = function_rate(
        &js,
        "correlate",
        n,
        &[correlate_process.id().unwrap_or(0), nats],
    )
    .await;
    // Acked is not handled: correlate acks types no rule wants without
    // decoding them. Its handler must have seen every event a rule consumes
    // (more only if some were redelivered), and none may be dead-lettered.
    let c = function_counters(metrics).await;
    let dlq = stream_messages(&js, topology::DEAD_LETTER.name).await;
    assert!(
        c.acks == n && c.handled >= ruled && c.dead_lettered == 0 && dlq == 0,
        "correlate: {} acked, {} handled of {ruled} a rule consumes, {} dead-lettered \
         ({dlq} in the DLQ stream) for {n} events: its rate is not the rules' rate",
        c.acks,
        c.handled,
        c.dead_lettered
    );
    let kv_writes = js
        .get_stream(format!("KV_{}", topology::CORRELATION_STATE.bucket))
        .await
        .expect("state stream")
        .info()
        .await
        .expect("info")
        .state
        .last_sequence;
    // CPU per event says where the time went on a shared machine, where
    // wall-clock rates move with the neighbours.
    let cpu = |c: &[f64]| {
        format!(
            "CPU/event: client {:.1} µs, nats-server {:.1} µs",
            c[0], c[1]
        )
    };
    println!("== {}: {n} events", mix.name());
    println!(
        "raw consume+ack (raw stream):      {raw:>10.0} events/s  {}",
        cpu(&raw_cpu)
    );
    if let Some((republish, republish_cpu)) = &republish {
        println!(
            "raw consume+republish+ack:         {republish:>10.0} events/s  ratio {:.2} (the ceiling for enrich)  {}",
            republish / raw,
            cpu(republish_cpu)
        );
    }
    let ceiling = republish
        .map(|(r, _)| format!(", {:.2} of the ceiling", enrich / r))
        .unwrap_or_default();
    println!(
        "enrich, one instance:              {enrich:>10.0} events/s  ratio {:.2} (target >= 0.5){ceiling}  {}",
        enrich / raw,
        cpu(&enrich_cpu)
    );
    println!(
        "raw consume+ack (enriched stream): {raw_enriched:>10.0} events/s  {}",
        cpu(&raw_enriched_cpu)
    );
    println!(
        "correlate, one instance:           {correlate:>10.0} events/s  ratio {:.2} (target >= 0.25)  {}",
        correlate / raw_enriched,
        cpu(&correlate_cpu)
    );
    println!(
        "correlate handled {} of {n} events (the rest acked undecoded), {} naks; KV writes: {kv_writes}; insights: {}",
        c.handled,
        c.naks,
        stream_messages(&js, topology::INSIGHTS.name).await
    );
}

/// End-to-end latency, collector publish → insight written by export, at a
/// steady rate (default 10 000 events/s for 10 s; 1 % are container restarts,
/// the rest kernel events), through enrich, correlate and export.
async fn end_to_end_latency_at_a_steady_rate() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncBufReadExt;

    let rate: u64 = std::env::var("TIDEWATCH_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seconds: u64 = std::env::var("TIDEWATCH_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    for i in 0..PODS {
        put_pod(&js, &pod(i)).await;
    }
    let _enrich = start_function(&server, "tidewatch-enrich", &[]);
    let _correlate = start_function(&server, "tidewatch-correlate", &[]);
    let mut export = tokio::process::Command::new(binary("tidewatch-export"))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("export starts");
    let published: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let reader;
    {
        let published = published.clone();
        let latencies = latencies.clone();
        let mut lines = tokio::io::BufReader::new(export.stdout.take().expect("stdout")).lines();
        reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let arrived = Instant::now();
                let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                // The newest evidence is the event that produced this revision.
                let Some(last) = json["data"]["evidenceEventIds"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|v| v.as_str())
                else {
                    continue;
                };
                if let Some(sent) = published.lock().expect("lock").get(last) {
                    latencies.lock().expect("lock").push(arrived - *sent);
                }
            }
        });
    }
    let total = rate * seconds;
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut interval = tokio::time::interval(tick);
    let (confirm_tx, mut confirm_rx) = tokio::sync::mpsc::unbounded_channel();
    let confirmer = tokio::spawn(async move {
        while let Some(c) = confirm_rx.recv().await {
            let c: tidewatch_runtime::publisher::Confirmation = c;
            c.await.expect("stored");
        }
    });
    let started = Instant::now();
    let mut i = 0u64;
    while i < total {
        interval.tick().await;
        for _ in 0..per_tick {
            let at = Utc::now();
            let restart = i.is_multiple_of(100);
            let id = format!("l-{i}");
            let pick = if restart { i / 100 } else { i } as usize;
            let (subject, event) = bench_event(&id, pick, restart, at);
            if restart {
                published.lock().expect("lock").insert(id, Instant::now());
            }
            let c = publisher
                .send(subject.as_str(), &event)
                .await
                .expect("sent");
            let _ = confirm_tx.send(c);
            i += 1;
        }
    }
    let sent_for = started.elapsed();
    drop(confirm_tx);
    confirmer.await.expect("confirmed");
    // Every insight is written once the pipeline has settled; stopping
    // export then closes its stdout, and the reader ends at EOF.
    settled(&js, &["enrich", "correlate", "export"]).await;
    export.start_kill().expect("export stops");
    reader.await.expect("reader");
    let mut l = latencies.lock().expect("lock").clone();
    l.sort();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "published {total} events in {sent_for:.1?} ({:.0} events/s offered)",
        total as f64 / sent_for.as_secs_f64()
    );
    println!("insights measured: {}", l.len());
    println!(
        "publish → insight at the sink: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        l.last().copied().unwrap_or_default()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `TIDEWATCH_BENCH_ONLY=throughput|latency` runs one half (for profiling).
    let only = std::env::var("TIDEWATCH_BENCH_ONLY").unwrap_or_default();
    if only != "latency" {
        let mix = std::env::var("TIDEWATCH_BENCH_MIX").unwrap_or_default();
        if mix != "rules" {
            enrich_and_correlate_against_the_raw_rate(Mix::Realistic).await;
        }
        if mix != "realistic" {
            enrich_and_correlate_against_the_raw_rate(Mix::RuleHeavy).await;
        }
    }
    if only != "throughput" {
        end_to_end_latency_at_a_steady_rate().await;
    }
}
