//! `tidewatch bench pipeline`: the pipeline as a black box, against raw
//! JetStream measured in the same run on the same private nats-server.
//!
//! 1. **Baseline**: raw async-nats publishes `--events` pre-encoded events
//!    to the raw stream (the fastest anything can put them there), then a
//!    plain pull consumer reads and acks them.
//! 2. **Throughput**, per mix: the functions run as `tidewatch up` runs
//!    them (their release binaries, one replica each: what one instance
//!    does; more replicas scale it on more cores), events are published as
//!    the collectors publish them, and the clock stops when enrich and
//!    correlate have drained. The *realistic* mix is 90 % kernel events no
//!    rule reads and 10 % container restarts; the *rule-heavy* mix is only
//!    types correlate reads (restarts, OOM kills, endpoints dropping, unit
//!    failures). Every run checks what it claims: enrich handled every
//!    event and stored exactly the ones a consumer reads.
//! 3. **Latency** at a steady `--rate`: publish → stored in the enriched
//!    stream (a core subscription sees each as it is stored), p50 and p99.
//! 4. **Memory**: each replica's RSS idle (started, nothing to do) and the
//!    most it reached under load.
//! 5. **Activation**: a stopped function with a backlog is started (what
//!    KEDA's 0 → 1 does); the time until its first ack.
//!
//! Every round uses ids never used before (a purge does not clear the
//! duplicate window).

use std::collections::HashMap;
use std::future::IntoFuture as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tidewatch_proto::v1;
use tidewatch_runtime::binding::nats::to_nats;
use tidewatch_runtime::event::new_event;
use tidewatch_runtime::topology::{self, subjects, types};
use tokio::process::{Child, Command};

use crate::local_nats::LocalNats;

#[derive(clap::Args)]
pub struct PipelineBench {
    /// Events per mix (and for the baseline).
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Steady publish rate for the latency measurement, events/s.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long the latency measurement publishes, seconds.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Directory with the function binaries (default: next to this executable).
    #[arg(long, env = "TIDEWATCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

/// One published event, pre-encoded: subject, headers, payload.
type Encoded = (String, async_nats::HeaderMap, Bytes);

fn encode(event: &cloudevents::Event) -> anyhow::Result<Encoded> {
    let (collector, node) = topology::parse_source(cloudevents::AttributesReader::source(event))
        .context("a Tidewatch source")?;
    let (headers, payload) = to_nats(event);
    Ok((subjects::raw(collector, node), headers, payload))
}

fn restart(run: &str, i: u64) -> anyhow::Result<cloudevents::Event> {
    let node = format!("node-{}", i % 10);
    let pod = format!("web-{}", i % 200);
    let payload = v1::ContainerRestart {
        namespace: "shop".into(),
        pod: pod.clone(),
        container: "web".into(),
        node: node.clone(),
        restart_count: (i / 200) as u32 + 1,
        reason: "Error".into(),
        exit_code: 1,
        ..Default::default()
    };
    Ok(new_event(
        format!("{run}-r{i}"),
        types::CONTAINER_RESTARTED,
        &topology::source("k8s", &node),
        Some(&format!("pod/shop/{pod}")),
        chrono::Utc::now(),
        &payload,
    )?)
}

/// An event correlate reads, from a rotation of the rule-heavy types.
fn rule_event(run: &str, i: u64) -> anyhow::Result<cloudevents::Event> {
    let node = format!("node-{}", i % 10);
    let now = chrono::Utc::now();
    Ok(match i % 20 {
        0 | 1 => new_event(
            format!("{run}-o{i}"),
            types::OOM_KILL,
            &topology::source("ebpf", &node),
            None,
            now,
            &v1::OomKill {
                victim: Some(v1::ProcessInfo {
                    pid: 4242,
                    comm: "java".into(),
                    container_id: format!("c{}", i % 200),
                    ..Default::default()
                }),
                memory_limit_bytes: 256 << 20,
                ..Default::default()
            },
        )?,
        2 => new_event(
            format!("{run}-e{i}"),
            types::ENDPOINTS_EMPTY,
            &topology::source("k8s", &node),
            Some(&format!("service/shop/svc-{}", i % 20)),
            now,
            &v1::EndpointsChange {
                namespace: "shop".into(),
                service: format!("svc-{}", i % 20),
                ready: 0,
                not_ready_pods: vec![format!("shop/web-{}", i % 200)],
            },
        )?,
        3 => new_event(
            format!("{run}-u{i}"),
            types::UNIT_FAILED,
            &topology::source("systemd", &node),
            Some("unit/kubelet.service"),
            now,
            &v1::UnitStateChange {
                unit: "kubelet.service".into(),
                node: node.clone(),
                active_state: "failed".into(),
                ..Default::default()
            },
        )?,
        _ => restart(run, i)?,
    })
}

/// The realistic mix: 1 in 10 a restart, the rest kernel traffic.
fn realistic(run: &str, i: u64) -> anyhow::Result<cloudevents::Event> {
    if i.is_multiple_of(10) {
        restart(run, i)
    } else {
        crate::emit::synthetic_event(run, &format!("node-{}", i % 10), i)
    }
}

/// Whether correlate reads events of this type (and so enrich stores them).
fn wanted(ty: &str) -> bool {
    crate::functions::all()
        .map(|fns| {
            fns.iter()
                .find(|f| f.name == "correlate")
                .is_some_and(|f| f.handles(ty))
        })
        .unwrap_or(true)
}

pub async fn run(args: PipelineBench) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tidewatch-bench-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let local = LocalNats::start(&dir, 0, 0).await?;
    let result = bench(&local.url, &dir, &args).await;
    local.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(url: &str, dir: &Path, args: &PipelineBench) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable directory")?
            .to_path_buf(),
    };
    let (client, js) = crate::bench::provisioned(url).await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "tidewatch bench pipeline: private nats-server {}, {cores} cores, {} events per mix, release binaries from {}",
        crate::local_nats::redact(url),
        args.events,
        bin_dir.display()
    );

    // 1. Baseline: raw publish, raw consume+ack.
    let baseline: Vec<Encoded> = (0..args.events)
        .map(|i| realistic("base", i).and_then(|e| encode(&e)))
        .collect::<anyhow::Result<_>>()?;
    let raw_publish = publish_all(&client, &baseline).await?;
    expect_len(&js, topology::RAW.name, args.events).await?;
    let raw_consume = consume_all(&js, args.events).await?;
    purge(&js).await?;
    println!(
        "baseline: raw publish {raw_publish:.0} events/s; raw consume+ack {raw_consume:.0} events/s"
    );

    // 2 + 4. Throughput per mix, with each replica's memory.
    let mut rows = Vec::new();
    for (mix, make) in [
        (
            "realistic",
            realistic as fn(&str, u64) -> anyhow::Result<cloudevents::Event>,
        ),
        ("rule-heavy", rule_event),
    ] {
        let events: Vec<cloudevents::Event> = (0..args.events)
            .map(|i| make(mix, i))
            .collect::<anyhow::Result<_>>()?;
        let stored = events
            .iter()
            .filter(|e| wanted(cloudevents::AttributesReader::ty(*e)))
            .count() as u64;
        let encoded: Vec<Encoded> = events.iter().map(encode).collect::<anyhow::Result<_>>()?;
        drop(events);
        let mut functions = Functions::start(&bin_dir, url, dir, &["enrich", "correlate"]).await?;
        let idle = functions.rss_kib();
        let started = Instant::now();
        let sampler = functions.sample_rss();
        publish_all(&client, &encoded).await?;
        drained(&js, &["enrich", "correlate"], Duration::from_secs(600)).await?;
        let elapsed = started.elapsed();
        let peak = sampler.stop().await;
        let rate = args.events as f64 / elapsed.as_secs_f64();
        expect_len(&js, topology::ENRICHED.name, stored)
            .await
            .with_context(|| {
                format!("{mix}: enrich must store exactly the {stored} events correlate reads")
            })?;
        rows.push((mix, rate, stored, idle, peak));
        functions.stop().await;
        purge(&js).await?;
    }

    // 3. Latency at a steady rate, realistic mix.
    let mut functions = Functions::start(&bin_dir, url, dir, &["enrich", "correlate"]).await?;
    let (p50, p99, measured) = latency(&client, &js, args.rate, args.latency_secs).await?;
    functions.stop().await;
    purge(&js).await?;

    // 5. Activation: a backlog, then enrich started.
    let backlog: Vec<Encoded> = (0..1000)
        .map(|i| restart("activation", i).and_then(|e| encode(&e)))
        .collect::<anyhow::Result<_>>()?;
    publish_all(&client, &backlog).await?;
    let activation = activation(&js, &bin_dir, url, dir).await?;
    purge(&js).await?;

    println!();
    println!("| figure | measured | against | target |");
    println!("|---|---|---|---|");
    for (mix, rate, stored, idle, peak) in &rows {
        println!(
            "| end-to-end, {mix} mix ({stored} of {} events stored for a reader) | {rate:.0} events/s | **{:.2}×** raw publish | ≥ 0.5× {} |",
            args.events,
            rate / raw_publish,
            met(rate / raw_publish >= 0.5)
        );
        for (name, kib) in idle {
            println!(
                "| RSS idle, {name} ({mix} run) | {:.1} MiB | | < 20 MB {} |",
                *kib as f64 / 1024.0,
                met((*kib as f64) * 1024.0 < 20e6)
            );
        }
        for (name, kib) in peak {
            println!(
                "| RSS under load, {name} ({mix} mix) | {:.1} MiB | | < 64 MB {} |",
                *kib as f64 / 1024.0,
                met((*kib as f64) * 1024.0 < 64e6)
            );
        }
    }
    println!(
        "| latency publish → enriched at {} events/s ({measured} events a reader wants) | p50 {:.2} ms, p99 {:.2} ms | | p99 < 10 ms {} |",
        args.rate,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        met(p99 < Duration::from_millis(10))
    );
    println!(
        "| activation: enrich started with a backlog → first event acked | {:.0} ms | | < 1 s {} |",
        activation.as_secs_f64() * 1e3,
        met(activation < Duration::from_secs(1))
    );
    println!(
        "| baseline | raw publish {raw_publish:.0}/s, raw consume+ack {raw_consume:.0}/s | | |"
    );
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "(met)" } else { "(**not met**)" }
}

/// Publish everything with raw async-nats, 1024 acks in flight; events/s.
async fn publish_all(client: &async_nats::Client, events: &[Encoded]) -> anyhow::Result<f64> {
    let js = jetstream::new(client.clone());
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for (subject, headers, payload) in events {
        pending.push(
            js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await?
                .into_future(),
        );
        while pending.len() >= 1024 {
            if let Some(ack) = pending.next().await {
                ack?;
            }
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(events.len() as f64 / started.elapsed().as_secs_f64())
}

/// Read and ack `n` messages of the raw stream with a plain pull consumer.
async fn consume_all(js: &jetstream::Context, n: u64) -> anyhow::Result<f64> {
    let stream = js.get_stream(topology::RAW.name).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1024)
        .messages()
        .await?;
    let mut acks = FuturesUnordered::new();
    let mut seen = 0;
    while seen < n {
        let message = messages.next().await.context("the raw stream ended")??;
        acks.push(async move { message.ack().await });
        seen += 1;
        while acks.len() >= 1024 {
            acks.next().await;
        }
    }
    while acks.next().await.is_some() {}
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stream.delete_consumer("bench-raw").await?;
    Ok(rate)
}

async fn expect_len(js: &jetstream::Context, stream: &str, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = js.get_stream(stream).await?.info().await?.state.messages;
        if have == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{stream} holds {have} messages, expected {n}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn purge(js: &jetstream::Context) -> anyhow::Result<()> {
    for s in [topology::RAW, topology::ENRICHED, topology::INSIGHTS] {
        js.get_stream(s.name).await?.purge().await?;
    }
    Ok(())
}

async fn drained(
    js: &jetstream::Context,
    durables: &[&str],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut busy = false;
        for d in durables {
            let spec = crate::functions::consumers()?
                .into_iter()
                .find(|c| c.durable == *d)
                .context("a function's consumer")?;
            let stream = topology::stream(spec.stream).context("its stream")?;
            let info = js.get_stream(stream.name).await?.consumer_info(*d).await?;
            busy |= info.num_pending > 0 || info.num_ack_pending > 0;
        }
        if !busy {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pipeline did not drain within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish the realistic mix at `rate` for `secs`; latency of each event a
/// reader wants from its publish to its arrival in the enriched stream.
async fn latency(
    client: &async_nats::Client,
    js: &jetstream::Context,
    rate: u64,
    secs: u64,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let mut arrivals = client
        .subscribe(format!("{}.>", topology::ENRICHED.prefix))
        .await?;
    client.flush().await?;
    let total = rate * secs;
    let events: Vec<(String, Encoded)> = (0..total)
        .map(|i| {
            let e = realistic("latency", i)?;
            let id = cloudevents::AttributesReader::id(&e).to_string();
            Ok((id, encode(&e)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let wanted_ids: std::collections::HashSet<String> = events
        .iter()
        .filter(|(_, (subject, _, _))| subject.starts_with("tidewatch.raw.k8s."))
        .map(|(id, _)| id.clone())
        .collect();
    let receiver = tokio::spawn(async move {
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(secs + 30);
        while seen.len() < wanted_ids.len() && Instant::now() < deadline {
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), arrivals.next()).await
            else {
                break;
            };
            if let Some(id) = m.headers.as_ref().and_then(|h| h.get("ce-id")) {
                seen.insert(id.to_string(), Instant::now());
            }
        }
        seen
    });
    let started = Instant::now();
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(events.len());
    let mut acks = FuturesUnordered::new();
    for (i, (id, (subject, headers, payload))) in events.into_iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        sent.insert(id, Instant::now());
        acks.push(
            js.publish_with_headers(subject, headers, payload)
                .await?
                .into_future(),
        );
        while let Some(Some(ack)) = futures::FutureExt::now_or_never(acks.next()) {
            ack?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    let seen = receiver.await?;
    let mut latencies: Vec<Duration> = seen
        .iter()
        .filter_map(|(id, at)| Some(at.duration_since(*sent.get(id)?)))
        .collect();
    if latencies.is_empty() {
        bail!("no enriched event arrived");
    }
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok((pick(0.50), pick(0.99), latencies.len()))
}

/// Start enrich with a backlog waiting: the time until its first ack.
async fn activation(
    js: &jetstream::Context,
    bin_dir: &Path,
    url: &str,
    dir: &Path,
) -> anyhow::Result<Duration> {
    let stream = js.get_stream(topology::RAW.name).await?;
    let before = stream
        .consumer_info("enrich")
        .await?
        .ack_floor
        .stream_sequence;
    let started = Instant::now();
    let mut functions = Functions::spawn(bin_dir, url, dir, &["enrich"])?;
    let deadline = started + Duration::from_secs(30);
    let took = loop {
        let floor = stream
            .consumer_info("enrich")
            .await?
            .ack_floor
            .stream_sequence;
        if floor > before {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!("enrich acked nothing within 30 s of starting");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    drained(js, &["enrich"], Duration::from_secs(60)).await?;
    functions.stop().await;
    Ok(took)
}

/// Function processes, one replica each, as `tidewatch up` starts them.
struct Functions {
    children: Vec<(String, Child)>,
}

impl Functions {
    /// Start them and let them settle (connected, consumer bound) before
    /// returning.
    async fn start(
        bin_dir: &Path,
        url: &str,
        dir: &Path,
        names: &[&str],
    ) -> anyhow::Result<Functions> {
        let functions = Functions::spawn(bin_dir, url, dir, names)?;
        // Started once each has a pull request waiting on its consumer.
        let client = crate::connect(url).await?;
        let js = jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in names {
            let spec = crate::functions::consumers()?
                .into_iter()
                .find(|c| c.durable == *name)
                .context("a function's consumer")?;
            let stream = topology::stream(spec.stream).context("its stream")?;
            while js
                .get_stream(stream.name)
                .await?
                .consumer_info(*name)
                .await?
                .num_waiting
                == 0
            {
                if Instant::now() > deadline {
                    bail!("{name} is not pulling 30 s after it started");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(functions)
    }

    /// Start them and return at once (the activation measurement's clock
    /// runs from here).
    fn spawn(bin_dir: &Path, url: &str, dir: &Path, names: &[&str]) -> anyhow::Result<Functions> {
        let mut children = Vec::new();
        for name in names {
            let binary = bin_dir.join(format!("tidewatch-{name}"));
            if !binary.is_file() {
                bail!(
                    "{} not found: build the release binaries first (cargo build --release --workspace) or pass --bin-dir",
                    binary.display()
                );
            }
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let child = Command::new(&binary)
                .env("NATS_URL", url)
                .env("TIDEWATCH_TRANSPORT", "jetstream")
                .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("start {}", binary.display()))?;
            children.push((name.to_string(), child));
        }
        Ok(Functions { children })
    }

    /// (function, RSS in KiB) of each replica now.
    fn rss_kib(&self) -> Vec<(String, u64)> {
        self.children
            .iter()
            .filter_map(|(name, child)| Some((name.clone(), rss_kib(child.id()?)?)))
            .collect()
    }

    /// Sample every replica's RSS every 50 ms until stopped: the peaks.
    fn sample_rss(&self) -> Sampler {
        let pids: Vec<(String, u32)> = self
            .children
            .iter()
            .filter_map(|(n, c)| Some((n.clone(), c.id()?)))
            .collect();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut peak: Vec<(String, u64)> = pids.iter().map(|(n, _)| (n.clone(), 0)).collect();
            loop {
                for ((_, pid), (_, max)) in pids.iter().zip(peak.iter_mut()) {
                    if let Some(kib) = rss_kib(*pid) {
                        *max = (*max).max(kib);
                    }
                }
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            peak
        });
        Sampler { stop, task }
    }

    async fn stop(&mut self) {
        for (_, child) in &mut self.children {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
    }
}

struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(String, u64)>>,
}

impl Sampler {
    async fn stop(self) -> Vec<(String, u64)> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// Resident memory of `pid`, KiB (`VmRSS` in /proc).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
