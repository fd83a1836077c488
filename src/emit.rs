//! `tidewatch emit` and `tidewatch burst`: well-formed events on demand.
//!
//! Events go to the raw stream as the `cli` collector of this host, with
//! protobuf payloads built from JSON (`--data`) for known types, exactly as
//! a collector would publish them.

use std::future::IntoFuture as _;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt};
use tidewatch_proto::{PROTOBUF_CONTENT_TYPE, v1};
use tidewatch_runtime::event::{derive_id, new_event};
use tidewatch_runtime::publisher::PublisherConfig;
use tidewatch_runtime::topology::{self, subjects, types};

#[derive(clap::Args)]
pub struct EmitArgs {
    /// CloudEvent type, e.g. dev.tidewatch.k8s.container.restarted (`tidewatch types` lists them).
    #[arg(long = "type", default_value = types::CONTAINER_RESTARTED)]
    ty: String,
    /// Entity the event is about: pod/<namespace>/<name>, node/<name>, unit/<name>.
    #[arg(long)]
    subject: Option<String>,
    /// Payload as JSON; for known types it becomes the type's protobuf message (camelCase field names).
    #[arg(long, default_value = "{}")]
    data: String,
    /// How many events (each with its own id and time).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Node name in the source and subject (default: this host).
    #[arg(long)]
    node: Option<String>,
}

pub async fn emit(client: &async_nats::Client, args: EmitArgs) -> anyhow::Result<()> {
    let node = args.node.clone().unwrap_or_else(crate::hostname);
    let source = topology::source("cli", &node);
    let subject = subjects::raw("cli", &node);
    let json: serde_json::Value =
        serde_json::from_str(&args.data).context("--data is not valid JSON")?;
    let payload = match types::lookup(&args.ty) {
        Some(t) => Some((
            t.payload,
            tidewatch_proto::encode_json(t.payload, json.clone())
                .with_context(|| format!("--data for {}", args.ty))?,
        )),
        None => None,
    };
    let publisher = crate::publisher(client, PublisherConfig::default());
    let run = crate::invocation_id();
    for i in 0..args.count {
        let id = derive_id(&[
            b"cli",
            node.as_bytes(),
            run.as_bytes(),
            &(i as u64).to_be_bytes(),
        ]);
        let mut builder = EventBuilderV10::new()
            .id(&id)
            .ty(args.ty.as_str())
            .source(source.as_str())
            .time(chrono::Utc::now());
        if let Some(s) = &args.subject {
            builder = builder.subject(s.as_str());
        }
        builder = match &payload {
            Some((message, bytes)) => {
                let schema = url::Url::parse(&format!("proto:{message}")).context("dataschema")?;
                builder.data_with_schema(PROTOBUF_CONTENT_TYPE, schema, bytes.clone())
            }
            None => builder.data("application/json", json.clone()),
        };
        let event: Event = builder.build().context("building the event")?;
        let ack = publisher.publish(subject.as_str(), &event).await?;
        println!(
            "published {id} ({}) to {subject}: stream {} seq {}",
            args.ty, ack.stream, ack.sequence
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BurstArgs {
    /// Events to publish.
    #[arg(long, default_value_t = 10_000)]
    events: u64,
    /// Events per second; 0 = as fast as the stream acknowledges.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Node name in the source and subject (default: this host).
    #[arg(long)]
    node: Option<String>,
    /// Un-acked publishes allowed at once.
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,
}

/// A realistic kernel event (~300 bytes on the wire): exec, exit or TCP connect.
pub fn synthetic_event(run: &str, node: &str, i: u64) -> anyhow::Result<Event> {
    let id = derive_id(&[b"burst", run.as_bytes(), &i.to_be_bytes()]);
    let source = topology::source("burst", node);
    let process = v1::ProcessInfo {
        pid: 1000 + (i % 30000) as u32,
        tgid: 1000 + (i % 30000) as u32,
        ppid: 1,
        uid: 1000,
        comm: "worker".into(),
        cgroup_id: 4242 + i % 7,
        monotonic_ns: i * 1000,
        wall_time_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        container_id: "3f1c2a9b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170".into(),
        pod_uid: "6c2d1b4e-7f8a-4b9c-8d0e-1f2a3b4c5d6e".into(),
    };
    let subject = format!("pod/default/worker-{}", i % 50);
    let now = chrono::Utc::now();
    let event = match i % 3 {
        0 => {
            let exec = v1::ProcessExec {
                process: Some(process),
                filename: "/usr/bin/worker".into(),
                argv: vec!["worker".into(), "--job".into(), i.to_string()],
                argv_truncated: false,
            };
            new_event(id, types::PROCESS_EXEC, &source, Some(&subject), now, &exec)?
        }
        1 => {
            let exit = v1::ProcessExit {
                process: Some(process),
                exit_code: 0,
                signal: 0,
                core_dumped: false,
                runtime_ns: 1_500_000,
            };
            new_event(id, types::PROCESS_EXIT, &source, Some(&subject), now, &exit)?
        }
        _ => {
            let tcp = v1::TcpConnection {
                process: Some(process),
                change: "connect".into(),
                family: 4,
                saddr: "10.244.1.17".into(),
                sport: 40000 + (i % 20000) as u32,
                daddr: "10.96.0.10".into(),
                dport: 53,
                ..Default::default()
            };
            new_event(id, types::TCP_CONNECT, &source, Some(&subject), now, &tcp)?
        }
    };
    Ok(event)
}

pub async fn burst(client: &async_nats::Client, args: BurstArgs) -> anyhow::Result<()> {
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    let node = args.node.clone().unwrap_or_else(crate::hostname);
    let subject = subjects::raw("burst", &node);
    let publisher = crate::publisher(
        client,
        PublisherConfig::default().max_in_flight(args.in_flight),
    );
    let run = crate::invocation_id();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut acked = 0u64;
    let mut last_draw = Instant::now();
    for i in 0..args.events {
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let event = synthetic_event(&run, &node, i)?;
        pending.push(
            publisher
                .send(subject.as_str(), &event)
                .await?
                .into_future(),
        );
        while let Some(Some(result)) = pending.next().now_or_never() {
            result?;
            acked += 1;
        }
        if last_draw.elapsed() > Duration::from_millis(200) {
            draw(acked, args.events, started);
            last_draw = Instant::now();
        }
    }
    while let Some(result) = pending.next().await {
        result?;
        acked += 1;
    }
    draw(acked, args.events, started);
    eprintln!();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published {acked} events to {subject} in {secs:.2} s ({:.0} events/s)",
        acked as f64 / secs.max(0.001)
    );
    Ok(())
}

/// A one-line progress bar on stderr.
fn draw(done: u64, total: u64, started: Instant) {
    let width = 30;
    let filled = (done * width / total.max(1)) as usize;
    let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{}{}] {done}/{total} acked  {rate:.0}/s ",
        "#".repeat(filled),
        ".".repeat(width as usize - filled)
    );
    let _ = err.flush();
}
