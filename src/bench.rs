//! `tidewatch bench publish`: our publish path against raw async-nats
//! JetStream publishing to the same server, in the same run.
//!
//! Both sides publish the same realistic events (~300 B payload plus
//! CloudEvents headers) with the same in-flight bound and msg-id dedup.
//! Raw gets pre-encoded headers and payload; ours gets the `Event` and does
//! everything a collector's publish does (binary-mode encoding, size check,
//! confirmation with retry). Rounds alternate, the stream is purged between
//! them, and the best of each side is compared.
//!
//! Every round and side publishes ids never used before: purging a stream
//! does not clear its duplicate window, so a repeated id would be acked as
//! a duplicate and stored nowhere. After each round the stream must hold
//! exactly the events just published, or the bench fails.

use std::future::IntoFuture as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tidewatch_runtime::binding::nats::to_nats;
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects};

use crate::local_nats::LocalNats;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Publish N events through the runtime publisher and through raw async-nats; print both rates and the ratio.
    Publish(PublishBench),
    /// The pipeline as a black box (throughput per mix, latency, memory, activation) against raw JetStream in the same run.
    Pipeline(crate::bench_pipeline::PipelineBench),
}

#[derive(clap::Args)]
pub struct PublishBench {
    /// Events per round and side.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Rounds per side (alternating); the best of each is compared.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Un-acked publishes allowed at once (both sides).
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,
    /// Use the server at --nats-url instead of starting a private one.
    #[arg(long)]
    external: bool,
}

pub async fn run(nats_url: &str, command: BenchCommand) -> anyhow::Result<()> {
    let args = match command {
        BenchCommand::Publish(args) => args,
        BenchCommand::Pipeline(args) => return crate::bench_pipeline::run(args).await,
    };
    let dir = std::env::temp_dir().join(format!("tidewatch-bench-{}", std::process::id()));
    let local = if args.external {
        None
    } else {
        Some(LocalNats::start(&dir, 0, 0).await?)
    };
    let url = local
        .as_ref()
        .map(|l| l.url.clone())
        .unwrap_or_else(|| nats_url.to_string());
    let result = publish_bench(&url, &args).await;
    if let Some(local) = local {
        local.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Connect to `url` and provision every stream and consumer, capped to
/// what a laptop holds.
pub async fn provisioned(url: &str) -> anyhow::Result<(async_nats::Client, jetstream::Context)> {
    let client = crate::connect(url).await?;
    let js = jetstream::new(client.clone());
    provision(
        &js,
        &crate::functions::consumers()?,
        &ProvisionOptions::default().cap_bytes(crate::up::LOCAL_STREAM_BYTES),
    )
    .await?;
    Ok((client, js))
}

async fn publish_bench(url: &str, args: &PublishBench) -> anyhow::Result<()> {
    let (client, js) = provisioned(url).await?;
    let subject = subjects::raw("bench", "local");
    let sample = crate::emit::synthetic_event("bench", "local", 0)?;
    let avg_payload = to_nats(&sample).1.len();
    println!(
        "server {url}; {} events/round, payload ~{avg_payload} B + CloudEvents headers, in-flight {}, {} rounds",
        args.events, args.in_flight, args.rounds
    );
    let (mut raw_best, mut ours_best) = (0f64, 0f64);
    for round in 1..=args.rounds {
        // Fresh ids for each side and round (see the module comment); the
        // events are built before the clock starts.
        let raw_events = round_events(&format!("bench-raw-{round}"), args.events)?;
        let encode_started = Instant::now();
        let encoded: Vec<_> = raw_events.iter().map(to_nats).collect();
        let encode_rate = encoded.len() as f64 / encode_started.elapsed().as_secs_f64();
        drop(raw_events);
        if round == 1 {
            println!(
                "CloudEvents binary-mode encoding alone: {encode_rate:.0} events/s on this core"
            );
        }
        purge(&js).await?;
        let raw = raw_round(&client, &subject, &encoded, args.in_flight).await?;
        expect_stored(&js, args.events, "raw async-nats", round).await?;
        drop(encoded);
        let events = round_events(&format!("bench-tidewatch-{round}"), args.events)?;
        purge(&js).await?;
        let ours = ours_round(&client, &subject, &events, args.in_flight).await?;
        expect_stored(&js, args.events, "tidewatch publisher", round).await?;
        println!(
            "round {round}: raw async-nats {raw:>9.0} events/s   tidewatch publisher {ours:>9.0} events/s   ratio {:.2}",
            ours / raw
        );
        raw_best = raw_best.max(raw);
        ours_best = ours_best.max(ours);
    }
    purge(&js).await?;
    println!(
        "best: raw {raw_best:.0} events/s, tidewatch {ours_best:.0} events/s, ratio {:.2} (target >= 0.80)",
        ours_best / raw_best
    );
    Ok(())
}

/// `n` synthetic events whose ids are unique to `run`.
fn round_events(run: &str, n: u64) -> anyhow::Result<Vec<cloudevents::Event>> {
    (0..n)
        .map(|i| crate::emit::synthetic_event(run, "local", i))
        .collect()
}

/// Fail unless the (just purged) raw stream holds exactly `n` messages: a
/// round whose publishes were acked as duplicates stored nothing and its
/// rate means nothing.
async fn expect_stored(
    js: &jetstream::Context,
    n: u64,
    side: &str,
    round: u32,
) -> anyhow::Result<()> {
    let stored = js
        .get_stream(topology::RAW.name)
        .await?
        .info()
        .await
        .context("reading the raw stream's state after a round")?
        .state
        .messages;
    anyhow::ensure!(
        stored == n,
        "round {round}, {side}: the stream holds {stored} new messages after {n} acknowledged publishes \
         (duplicates of earlier ids are acked but not stored); this round's rate is void"
    );
    Ok(())
}

async fn purge(js: &jetstream::Context) -> anyhow::Result<()> {
    js.get_stream(topology::RAW.name)
        .await?
        .purge()
        .await
        .context("purging the raw stream between rounds")?;
    Ok(())
}

async fn raw_round(
    client: &async_nats::Client,
    subject: &str,
    encoded: &[(async_nats::HeaderMap, bytes::Bytes)],
    in_flight: usize,
) -> anyhow::Result<f64> {
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(in_flight)
        .backpressure_on_inflight(true)
        .timeout(Duration::from_secs(5))
        .build(client.clone());
    // The idiomatic raw pipeline: one task sends, another awaits the acks
    // (a sender that blocks on the in-flight bound must not be the one
    // polling the acks).
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<jetstream::context::PublishAckFuture>(in_flight.max(1));
    let acks = tokio::spawn(async move {
        let mut pending = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                next = rx.recv(), if open => match next {
                    Some(ack) => pending.push(ack.into_future()),
                    None => open = false,
                },
                Some(ack) = pending.next(), if !pending.is_empty() => { ack?; }
                else => return Ok::<_, anyhow::Error>(()),
            }
        }
    });
    let started = Instant::now();
    for (headers, payload) in encoded {
        let publish = PublishMessage::build()
            .headers(headers.clone())
            .payload(payload.clone());
        let ack = js.send_publish(subject.to_string(), publish).await?;
        tx.send(ack)
            .await
            .map_err(|_| anyhow::anyhow!("ack collector stopped"))?;
    }
    drop(tx);
    acks.await??;
    Ok(encoded.len() as f64 / started.elapsed().as_secs_f64())
}

async fn ours_round(
    client: &async_nats::Client,
    subject: &str,
    events: &[cloudevents::Event],
    in_flight: usize,
) -> anyhow::Result<f64> {
    let publisher = Publisher::new(
        client.clone(),
        PublisherConfig::default().max_in_flight(in_flight),
        Metrics::new("bench"),
    );
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for event in events {
        pending.push(publisher.send(subject, event).await?.into_future());
        while let Some(Some(ack)) = futures::FutureExt::now_or_never(pending.next()) {
            ack?;
        }
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(events.len() as f64 / started.elapsed().as_secs_f64())
}
