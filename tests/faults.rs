//! The fault suite: real nats-servers (a 3-node R3 cluster where the fault
//! needs one), the real function binaries, and a fault injected while events
//! flow. Every scenario counts what happened to the events: published and
//! acked, stored, delivered downstream, dead-lettered, **lost** (acked but
//! never out the other end: must be 0) and **duplicated** (the same
//! CloudEvent id stored twice downstream), and prints one `FAULT` line with
//! those numbers and the recovery time; README.md#faults has the table.
//!
//! CI runs the short variants. `TIDEWATCH_FAULT_EVENTS` (default 20000)
//! sets the leader-kill burst and `TIDEWATCH_FAULT_PAUSE_SECS` (default 60)
//! the KV pause: `TIDEWATCH_FAULT_EVENTS=100000 cargo test --test faults --
//! --nocapture` is the long run.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cloudevents::AttributesReader;
use futures::StreamExt;
use tidewatch_runtime::dead_letter::{KIND_HEADER, REASON_HEADER};
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects, types};
use tidewatch_testkit::{NatsCluster, NatsServer, eventually};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn function(name: &str, urls: &str) -> tokio::process::Child {
    common::start_function_at(urls, name, &[])
}

/// How many messages `stream` holds.
async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state
        .messages
}

/// An ordered consumer on `stream`; right after a fault the meta layer may
/// still be electing, so creating it is retried.
async fn ordered(
    stream: &jetstream::stream::Stream,
) -> jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig> {
    eventually("an ordered consumer", Duration::from_secs(60), || async {
        stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .ok()
    })
    .await
}

/// Every message of `stream`, read with an ordered consumer (fast, and
/// nothing left behind): CloudEvent id → how many times stored.
async fn ids_in(js: &jetstream::Context, stream: &str) -> HashMap<String, u64> {
    let stream = js.get_stream(stream).await.expect("stream");
    let total = stream.get_info().await.expect("info").state.messages;
    let mut ids = HashMap::new();
    if total == 0 {
        return ids;
    }
    let consumer = ordered(&stream).await;
    let mut messages = consumer.messages().await.expect("messages");
    let mut read = 0;
    while read < total {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("stream read stalled")
            .expect("stream ended")
            .expect("message");
        read += 1;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("ce-id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_else(|| format!("<no id at {read}>"));
        *ids.entry(id).or_default() += 1;
    }
    ids
}

/// What a scenario did to `published` events, downstream in `stream`.
struct Count {
    published: u64,
    stored_downstream: u64,
    lost: u64,
    duplicated: u64,
    dead_lettered: u64,
}

async fn count(js: &jetstream::Context, published: &[String], downstream: &str) -> Count {
    let ids = ids_in(js, downstream).await;
    let dead = stream_len(js, topology::DEAD_LETTER.name).await;
    if dead > 0 {
        eprintln!("dead letters by consumer, kind and reason:");
        for (why, n) in dead_letter_reasons(js).await {
            eprintln!("  {n:>6} × {why}");
        }
    }
    Count {
        published: published.len() as u64,
        stored_downstream: ids.len() as u64,
        lost: published.iter().filter(|id| !ids.contains_key(*id)).count() as u64,
        duplicated: ids.values().map(|n| n - 1).sum(),
        dead_lettered: dead,
    }
}

/// Dead letters grouped by consumer, kind and the start of the reason.
async fn dead_letter_reasons(js: &jetstream::Context) -> Vec<(String, u64)> {
    let stream = js
        .get_stream(topology::DEAD_LETTER.name)
        .await
        .expect("dlq");
    let consumer = ordered(&stream).await;
    let total = stream.get_info().await.expect("info").state.messages;
    let mut messages = consumer.messages().await.expect("messages");
    let mut groups: std::collections::BTreeMap<String, u64> = Default::default();
    for _ in 0..total {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await
        else {
            break;
        };
        let get = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        let reason: String = get(REASON_HEADER).chars().take(90).collect();
        *groups
            .entry(format!(
                "{} {}: {reason}",
                get(tidewatch_runtime::dead_letter::CONSUMER_HEADER),
                get(KIND_HEADER)
            ))
            .or_default() += 1;
    }
    groups.into_iter().collect()
}

fn report(fault: &str, c: &Count, recovery: Duration) {
    eprintln!(
        "FAULT | {fault} | published+acked {} | stored downstream {} | dead-lettered {} | lost {} | duplicated {} | recovered in {:.1} s",
        c.published,
        c.stored_downstream,
        c.dead_lettered,
        c.lost,
        c.duplicated,
        recovery.as_secs_f64()
    );
}

/// Publish `event` until the stream acknowledges it, as a collector's outbox
/// does (same id every time, so a retry whose first try was stored is
/// deduplicated).
async fn publish_until_acked(publisher: &Publisher, event: &cloudevents::Event) {
    let (collector, node) = topology::parse_source(event.source()).expect("tidewatch source");
    let subject = subjects::raw(collector, node);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match publisher.publish(subject.as_str(), event).await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                log_rarely(&format!("publish {} failed, retrying: {e}", event.id()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{} never acked: {e}", event.id()),
        }
    }
}

/// Rare retry lines, kept short.
fn log_rarely(line: &str) {
    static SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
        eprintln!("{line}");
    }
}

/// Wait until `durables` have nothing pending or un-acked (long: a cluster
/// that lost a node takes a while).
async fn drained(js: &jetstream::Context, durables: &[&str], within: Duration) -> Duration {
    let started = Instant::now();
    eventually("the pipeline to drain", within, || async {
        for d in durables {
            let stream = js
                .get_stream(topology::stream(stream_of(d)).expect("stream").name)
                .await
                .ok()?;
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer(d).await.ok()?;
            let info = consumer.info().await.ok()?;
            if info.num_pending != 0 || info.num_ack_pending != 0 {
                return None;
            }
        }
        Some(())
    })
    .await;
    started.elapsed()
}

fn stream_of(durable: &str) -> &'static str {
    common::consumers()
        .into_iter()
        .find(|c| c.durable == durable)
        .map(|c| c.stream)
        .expect("a known consumer")
}

/// One provisioned nats-server, a client and its JetStream context.
async fn provisioned_server() -> (NatsServer, async_nats::Client, jetstream::Context) {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    provision(
        &js,
        &common::consumers(),
        &ProvisionOptions::default().cap_bytes(1 << 30),
    )
    .await
    .expect("provision");
    (server, client, js)
}

fn cluster_urls(cluster: &NatsCluster, nodes: &[usize]) -> String {
    nodes
        .iter()
        .map(|&n| cluster.client_url(n))
        .collect::<Vec<_>>()
        .join(",")
}

async fn client_of(urls: &str) -> async_nats::Client {
    let servers: Vec<String> = urls.split(',').map(String::from).collect();
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .expect("connect")
}

fn publisher_on(client: &async_nats::Client) -> Publisher {
    Publisher::new(
        client.clone(),
        PublisherConfig::default()
            .max_in_flight(512)
            .ack_timeout(Duration::from_secs(5)),
        Metrics::new("fault-producer"),
    )
}

/// SIGKILL the raw stream's leader a third of the way into a burst through
/// the whole pipeline (enrich, correlate): every acked event comes out of
/// enrich exactly once; correlate keeps up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_during_a_burst_loses_nothing() {
    let events = env_number("TIDEWATCH_FAULT_EVENTS", 20_000);
    let mut cluster = NatsCluster::start().await;
    let urls = cluster_urls(&cluster, &[0, 1, 2]);
    let client = client_of(&urls).await;
    let js = jetstream::new(client.clone());
    provision(
        &js,
        &common::consumers(),
        &ProvisionOptions::default().replicas(3).cap_bytes(1 << 30),
    )
    .await
    .expect("provision R3");
    let _enrich = function("tidewatch-enrich", &urls);
    let _correlate = function("tidewatch-correlate", &urls);
    let publisher = publisher_on(&client);

    let ids: Vec<String> = (0..events).map(|i| format!("burst-{i}")).collect();
    let mut killed = None;
    let started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for (i, id) in ids.iter().enumerate() {
        if i as u64 == events / 3 {
            let leader = cluster
                .stream_leader(&client, topology::RAW.name)
                .await
                .expect("raw has a leader");
            cluster.kill(leader).await;
            killed = Some((leader, Instant::now()));
        }
        let mut event = common::restart_event(i as u64, &format!("p{}", i % 200));
        cloudevents::event::AttributesWriter::set_id(&mut event, id.clone());
        let publisher = publisher.clone();
        in_flight.push(async move { publish_until_acked(&publisher, &event).await });
        while in_flight.len() >= 256 {
            in_flight.next().await;
        }
    }
    while in_flight.next().await.is_some() {}
    let published_in = started.elapsed();
    let (leader, killed_at) = killed.expect("killed during the burst");
    // Debug binaries on 2 shared cores drain ~200 events/s: 100k took 570 s.
    let drain = drained(
        &js,
        &["enrich", "correlate"],
        Duration::from_secs(600.max(events / 50)),
    )
    .await;
    let recovery = killed_at.elapsed();
    let c = count(&js, &ids, topology::ENRICHED.name).await;
    report(
        &format!(
            "raw stream leader n{leader} SIGKILLed after {} of {events} events",
            events / 3
        ),
        &c,
        recovery,
    );
    eprintln!("published in {published_in:?}; drained {drain:?} after the last publish");
    assert_eq!(c.lost, 0, "acked events that never came out of enrich");
    assert_eq!(c.duplicated, 0, "events enriched twice");
    assert_eq!(c.dead_lettered, 0);
    cluster.restart(leader).await;
}

/// The pods bucket (R1, so its node is the only copy) paused with SIGSTOP
/// for a minute while events arrive that need it: enrich holds them (progress
/// acks, no deliveries burned), nothing is dead-lettered, and everything
/// comes out once the node resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_outage_dead_letters_nothing_and_everything_flows_after() {
    let pause = Duration::from_secs(env_number("TIDEWATCH_FAULT_PAUSE_SECS", 60));
    let cluster = NatsCluster::start().await;
    let all = cluster_urls(&cluster, &[0, 1, 2]);
    let admin = client_of(&all).await;
    let js = jetstream::new(admin.clone());
    // Few deliveries: what used to dead-letter a KV outage within
    // seconds (each retry was a nak after 1 s).
    provision(
        &js,
        &common::consumers(),
        &ProvisionOptions::default()
            .replicas(3)
            .cap_bytes(1 << 30)
            .max_deliver(3),
    )
    .await
    .expect("provision");
    let bucket = format!("KV_{}", topology::POD_METADATA.bucket);
    let mut config = js
        .get_stream(&bucket)
        .await
        .expect("bucket")
        .cached_info()
        .config
        .clone();
    config.num_replicas = 1;
    js.update_stream(config).await.expect("pods bucket to R1");
    // Wait for the scale-down to finish: until then the info names the old
    // R3 leader, which may not be the node that keeps the one copy.
    let kv_node = eventually(
        "the R1 bucket's only node",
        Duration::from_secs(30),
        || async {
            let mut stream = js.get_stream(&bucket).await.ok()?;
            let info = stream.info().await.ok()?.clone();
            let placement = info.cluster?;
            if !placement.replicas.is_empty() {
                return None;
            }
            cluster.node_index(placement.leader.as_deref()?)
        },
    )
    .await;
    let others: Vec<usize> = (0..3).filter(|&n| n != kv_node).collect();
    let urls = cluster_urls(&cluster, &others);
    let client = client_of(&urls).await;
    let js = jetstream::new(client.clone());
    let _enrich = function("tidewatch-enrich", &urls);
    let publisher = publisher_on(&client);
    // Warm up: the pipeline runs before the fault.
    publish_until_acked(&publisher, &common::restart_event(0, "warm")).await;
    drained(&js, &["enrich"], Duration::from_secs(60)).await;

    let pid = cluster.pid(kv_node).expect("running");
    let paused_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    // Every event names a pod enrich has never seen: each is a KV read.
    let mut ids = vec!["restart-0".to_string()];
    for i in 1..=200u64 {
        let event = common::restart_event(i, &format!("outage-{i}"));
        ids.push(event.id().to_string());
        publish_until_acked(&publisher, &event).await;
    }
    // The rest of the pause is the fault itself; watch the DLQ throughout.
    let mut dead_during = 0;
    while paused_at.elapsed() < pause {
        // The DLQ's leader may be the paused node until its group elects
        // another: a read that times out then is no reading, not a failure.
        let read = async {
            let mut stream = js.get_stream(topology::DEAD_LETTER.name).await.ok()?;
            stream.info().await.ok().map(|i| i.state.messages)
        };
        if let Ok(Some(messages)) = tokio::time::timeout(Duration::from_secs(3), read).await {
            dead_during = dead_during.max(messages);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    let resumed = Instant::now();
    drained(&js, &["enrich"], Duration::from_secs(180)).await;
    let recovery = resumed.elapsed();
    let c = count(&js, &ids, topology::ENRICHED.name).await;
    report(
        &format!("pods bucket node n{kv_node} SIGSTOPped for {pause:?}"),
        &c,
        recovery,
    );
    assert_eq!(dead_during, 0, "a dependency outage dead-lettered events");
    assert_eq!(c.dead_lettered, 0);
    assert_eq!(c.lost, 0);
    assert_eq!(c.duplicated, 0);
}

/// Hostile input at the real enrich binary: two header blocks the NATS
/// client cannot parse, an oversized message, malformed protobuf, malformed
/// JSON (structured mode) and an unknown type, then a good event. Each is
/// refused at publish or dead-lettered with a reason (or passed through, for
/// the unknown type: enrich enriches any type); the good event flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_or_dead_lettered_and_the_next_event_flows() {
    let (server, client, js) = provisioned_server().await;
    let mut enrich = common::start_function(&server, "tidewatch-enrich", &[]);
    let enrich_pid = enrich.id();
    let publisher = publisher_on(&client);
    publish_until_acked(&publisher, &common::restart_event(0, "warm")).await;
    drained(&js, &["enrich"], Duration::from_secs(60)).await;
    let subject = subjects::raw("ebpf", "node-1");

    // Refused by the server at publish: over the stream's max_msg_size.
    let mut big = async_nats::HeaderMap::new();
    big.insert("Nats-Msg-Id", "oversized-1");
    let refused = jetstream::new(client.clone())
        .publish_with_headers(subject.clone(), big, vec![0u8; 128 * 1024].into())
        .await;
    let refused = match refused {
        Ok(ack) => ack.await.err(),
        Err(e) => Some(e),
    };
    let refused = refused.expect("an oversized message is refused at publish");
    assert!(
        refused.to_string().to_lowercase().contains("size"),
        "{refused}"
    );

    let port = server.client_port();
    let poison: [&[u8]; 2] = [
        b"NATS/1.0\r\nCe-Id: poison-\xfe\r\nCe-Type: tidewatch.kernel.oom_kill\r\n\r\n",
        b"NATS/1.0\r\nCe-Id: poison-2\r\nno colon\r\n\r\n",
    ];
    for block in poison {
        tidewatch_testkit::publish_raw_headers(port, &subject, block, b"x")
            .await
            .expect("raw publish");
    }
    let source = topology::source("ebpf", "node-1");
    let mut bad_proto = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "bad-proto"),
        ("ce-type", types::OOM_KILL),
        ("ce-source", source.as_str()),
        ("ce-dataschema", "proto:tidewatch.v1.OomKill"),
        ("ce-datacontenttype", "application/protobuf"),
        ("Nats-Msg-Id", "bad-proto"),
    ] {
        bad_proto.insert(k, v);
    }
    client
        .publish_with_headers(
            subject.clone(),
            bad_proto,
            vec![0xff, 0xff, 0xff, 0x0f].into(),
        )
        .await
        .expect("publish");
    let mut structured = async_nats::HeaderMap::new();
    structured.insert("content-type", "application/cloudevents+json");
    client
        .publish_with_headers(
            subject.clone(),
            structured,
            "{\"specversion\":\"1.0\",\"id\":".into(),
        )
        .await
        .expect("publish");
    let unknown = common::json_event(
        "unknown-type",
        "com.example.unknown",
        "ebpf",
        "node-1",
        None,
        chrono::Utc::now(),
        serde_json::json!({"x": 1}),
    );
    publish_until_acked(&publisher, &unknown).await;
    client.flush().await.expect("flush");

    let dlq = js
        .get_stream(topology::DEAD_LETTER.name)
        .await
        .expect("dlq");
    let dead = eventually(
        "the hostile messages in the DLQ",
        Duration::from_secs(60),
        || async {
            let n = dlq.get_info().await.ok()?.state.messages;
            (n >= 4).then_some(n)
        },
    )
    .await;
    let mut reasons = Vec::new();
    for seq in 1..=dead {
        let m = dlq.get_raw_message(seq).await.expect("dead letter");
        let kind = m
            .headers
            .get(KIND_HEADER)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let reason = m
            .headers
            .get(REASON_HEADER)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        assert!(!reason.is_empty(), "dead letter {seq} names why");
        reasons.push(format!("{kind}: {reason}"));
    }
    eprintln!("dead letters:\n  {}", reasons.join("\n  "));
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("cannot read this message"))
            .count(),
        2
    );

    let started = Instant::now();
    let good = common::restart_event(1, "after");
    publish_until_acked(&publisher, &good).await;
    let enriched = js
        .get_stream(topology::ENRICHED.name)
        .await
        .expect("enriched");
    eventually(
        "the good event enriched",
        Duration::from_secs(30),
        || async {
            enriched
                .get_last_raw_message_by_subject(&subjects::enriched(
                    "k8s",
                    "node-1",
                    cloudevents::AttributesReader::ty(&good),
                ))
                .await
                .ok()
                .filter(|m| m.headers.get("ce-id").map(|v| v.as_str()) == Some(good.id()))
        },
    )
    .await;
    let next = started.elapsed();
    drained(&js, &["enrich"], Duration::from_secs(30)).await;
    let c = count(
        &js,
        // An unknown type is handled and acked, and stored for nobody: no
        // consumer of the enriched stream reads it (issue #16).
        &[good.id().to_string()],
        topology::ENRICHED.name,
    )
    .await;
    report(
        "2 poison headers, oversized, bad protobuf, bad JSON, unknown type",
        &c,
        next,
    );
    assert_eq!(c.lost, 0);
    assert_eq!(c.duplicated, 0);
    assert_eq!(dead, 4, "two poison, bad protobuf, bad JSON");
    assert!(
        enrich.try_wait().expect("wait").is_none() && enrich.id() == enrich_pid,
        "enrich kept running"
    );
}

/// One correlation key flooded with evidence carrying 60 KiB payloads: the
/// state stays bounded (pruned, payloads trimmed), every write fits in KV,
/// nothing is dead-lettered, and the incident is one insight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_correlation_key_stays_bounded_and_never_jams() {
    let (server, client, js) = provisioned_server().await;
    let _correlate = common::start_function(&server, "tidewatch-correlate", &[]);
    let publisher = publisher_on(&client);
    let base = chrono::Utc::now();
    let mut ids = Vec::new();
    let empty = common::json_event(
        "ep-empty",
        types::ENDPOINTS_EMPTY,
        "k8s",
        "node-1",
        Some("service/shop/api"),
        base,
        serde_json::json!({"namespace": "shop", "service": "api"}),
    );
    let mut events = vec![empty];
    for i in 0..150 {
        let mut refused = common::json_event(
            &format!("refused-{i}"),
            types::TCP_REFUSED,
            "ebpf",
            "node-1",
            None,
            base + chrono::Duration::milliseconds(10 * (i + 1)),
            serde_json::json!({"daddr": "10.96.0.10", "dport": 80, "padding": "x".repeat(60 * 1024)}),
        );
        cloudevents::event::EventBuilder::build(cloudevents::event::EventBuilderV10::from(
            refused.clone(),
        ))
        .expect("rebuild");
        refused.set_extension("peerservice", "shop/api");
        events.push(refused);
    }
    let started = Instant::now();
    for event in &events {
        ids.push(event.id().to_string());
        let subject = subjects::enriched(
            topology::parse_source(event.source()).expect("source").0,
            "node-1",
            event.ty(),
        );
        let mut attempt = 0;
        while let Err(e) = publisher.publish(subject.as_str(), event).await {
            attempt += 1;
            assert!(attempt < 50, "{} never acked: {e}", event.id());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let drain = drained(&js, &["correlate"], Duration::from_secs(180)).await;
    let kv = js
        .get_key_value(topology::CORRELATION_STATE.bucket)
        .await
        .expect("state bucket");
    let mut keys = kv.keys().await.expect("keys");
    let mut largest = 0;
    while let Some(key) = keys.next().await {
        let key = key.expect("key");
        if let Some(value) = kv.get(&key).await.expect("get") {
            largest = largest.max(value.len());
        }
    }
    let insights = common::insights(&js).await;
    let incidents: std::collections::BTreeSet<_> = insights.iter().map(|i| i.id.clone()).collect();
    let dead = stream_len(&js, topology::DEAD_LETTER.name).await;
    eprintln!(
        "FAULT | one correlation key flooded with {} events of 60 KiB | dead-lettered {dead} | largest state {largest} bytes | {} insight revisions, {} incident(s) | drained in {:.1} s",
        events.len(),
        insights.len(),
        incidents.len(),
        (started.elapsed()).as_secs_f64()
    );
    let _ = drain;
    assert_eq!(dead, 0, "nothing dead-lettered");
    assert!(largest <= 256 * 1024, "state of {largest} bytes");
    assert_eq!(incidents.len(), 1, "one incident: {incidents:?}");
}

/// One node cut off from its peers (nftables) for longer than the streams'
/// dedupe window while a collector, connected to that node only, publishes
/// through its outbox: publishes time out, the outbox spools, and replays
/// once the partition heals. A publish whose ack was lost but which was
/// stored is stored again (the window is over): those duplicates are
/// counted, and none may reach insights (correlate recognises the CloudEvent
/// id). Windows are shortened to 5 s here so the test takes seconds, not
/// minutes; correlate's republish horizon is set under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_longer_than_the_dedupe_window_duplicates_no_insight() {
    use tidewatch_runtime::outbox::{Outbox, OutboxConfig};
    const WINDOW: Duration = Duration::from_secs(5);
    const NOBODY: u32 = 65534;
    if let Err(why) = tidewatch_testkit::skip::require_root("nftables and another uid") {
        tidewatch_testkit::skip::cannot_run("a_partition_longer_than_the_dedupe_window", &why);
        return;
    }
    let mut cluster = NatsCluster::start().await;
    let cut = 2;
    cluster.restart_as(cut, NOBODY).await;
    let majority = cluster_urls(&cluster, &[0, 1]);
    let admin = client_of(&majority).await;
    let js = jetstream::new(admin.clone());
    provision(
        &js,
        &common::consumers(),
        &ProvisionOptions::default().replicas(3).cap_bytes(1 << 30),
    )
    .await
    .expect("provision");
    for stream in [
        topology::RAW.name,
        topology::ENRICHED.name,
        topology::INSIGHTS.name,
    ] {
        let mut config = js
            .get_stream(stream)
            .await
            .expect("stream")
            .cached_info()
            .config
            .clone();
        config.duplicate_window = WINDOW;
        js.update_stream(config).await.expect("short dedupe window");
    }
    let _enrich = function("tidewatch-enrich", &majority);
    let _correlate = common::start_function_at(
        &majority,
        "tidewatch-correlate",
        &["--republish-horizon-secs", "3"],
    );

    // The collector: an outbox with a spool, on the node that will be cut off.
    let spool = tempfile::tempdir().expect("spool dir");
    let collector = client_of(&cluster.client_url(cut)).await;
    let outbox = Outbox::open(
        Publisher::new(
            collector.clone(),
            PublisherConfig::default()
                .ack_timeout(Duration::from_secs(1))
                .max_attempts(2),
            Metrics::new("partition-collector"),
        ),
        OutboxConfig::default()
            .spool_dir(spool.path())
            .retry_interval(Duration::from_millis(200))
            .component("k8s")
            .node("node-1"),
    )
    .expect("outbox");

    // Restarts of a few pods, every 50 ms, before, during and after the cut:
    // enough per pod for crash-loop insights.
    let mut ids = Vec::new();
    let mut receipts = Vec::new();
    let mut partition = None;
    let started = Instant::now();
    let cut_for = WINDOW * 3;
    let mut i = 0u64;
    while started.elapsed() < cut_for + Duration::from_secs(8) {
        let t = started.elapsed();
        if partition.is_none() && t > Duration::from_secs(3) && t < Duration::from_secs(4) {
            partition =
                Some(tidewatch_testkit::Partition::cut(&cluster, cut, NOBODY).expect("nft"));
        }
        if t > Duration::from_secs(3) + cut_for
            && let Some(p) = partition.take()
        {
            p.heal();
        }
        let event = common::restart_event(i, &format!("web-{}", i % 4));
        ids.push(event.id().to_string());
        let subject = subjects::raw("k8s", "node-1");
        receipts.push(
            outbox
                .send(subject.as_str(), &event)
                .await
                .expect("accepted"),
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(partition);
    let mut refused = std::collections::BTreeMap::<String, u64>::new();
    for receipt in receipts {
        if let Err(e) = receipt.await {
            *refused
                .entry(format!(
                    "{:?}: {}",
                    e.kind(),
                    e.to_string().chars().take(160).collect::<String>()
                ))
                .or_default() += 1;
        }
    }
    // Everything spooled during the cut is replayed.
    eventually("the spool to drain", Duration::from_secs(120), || async {
        let stats = outbox.spool_stats();
        (stats.pending_records == 0).then_some(())
    })
    .await;
    drained(&js, &["enrich", "correlate"], Duration::from_secs(180)).await;
    let healed = started
        .elapsed()
        .saturating_sub(Duration::from_secs(3) + cut_for);

    let raw = ids_in(&js, topology::RAW.name).await;
    let raw_duplicates: u64 = raw.values().map(|n| n - 1).sum();
    let c = count(&js, &ids, topology::ENRICHED.name).await;
    let insights = common::insights(&js).await;
    let mut revisions = std::collections::BTreeMap::<(String, u32), u64>::new();
    for insight in &insights {
        *revisions
            .entry((insight.id.clone(), insight.revision))
            .or_default() += 1;
    }
    let insight_duplicates: u64 = revisions.values().map(|n| n - 1).sum();
    report(
        &format!(
            "node n{cut} partitioned for {cut_for:?} (dedupe window {WINDOW:?}) under a publishing collector"
        ),
        &c,
        healed,
    );
    eprintln!(
        "raw: {} ids; receipts refused: {refused:?}; spool {:?}",
        raw.len(),
        outbox.spool_stats()
    );
    eprintln!(
        "raw duplicates {raw_duplicates}, enriched duplicates {}, insights {} ({} incidents), duplicated insights {insight_duplicates}",
        c.duplicated,
        insights.len(),
        revisions
            .keys()
            .map(|(id, _)| id)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    assert_eq!(c.lost, 0, "spooled events reached enrich");
    assert_eq!(c.dead_lettered, 0);
    assert!(!insights.is_empty(), "crash loops were found");
    assert_eq!(insight_duplicates, 0, "a duplicate event reached insights");
}
