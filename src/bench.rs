//! `tidewatch bench publish`: our publish path against raw async-nats
//! JetStream publishing to the same server, in the same run.
//!
//! Both sides publish the same realistic events (~300 B payload plus
//! CloudEvents headers) with the same in-flight bound and msg-id dedup.
//! Raw gets pre-encoded headers and payload; ours gets the `Event` and does
//! everything a collector's publish does (binary-mode encoding, size check,
//! confirmation with retry). Rounds alternate, the stream is purged between
//! them, and the best of each side is compared.

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
    let BenchCommand::Publish(args) = command;
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

async fn publish_bench(url: &str, args: &PublishBench) -> anyhow::Result<()> {
    let client = crate::connect(url).await?;
    let js = jetstream::new(client.clone());
    provision(&js, &ProvisionOptions::default()).await?;
    let subject = subjects::raw("bench", "local");
    println!("preparing {} events per round...", args.events);
    let events: Vec<_> = (0..args.events)
        .map(|i| crate::emit::synthetic_event("bench", "local", i))
        .collect::<anyhow::Result<_>>()?;
    let encode_started = Instant::now();
    let encoded: Vec<_> = events.iter().map(to_nats).collect();
    let encode_rate = events.len() as f64 / encode_started.elapsed().as_secs_f64();
    let avg_payload = encoded.iter().map(|(_, p)| p.len()).sum::<usize>() / encoded.len().max(1);
    println!(
        "server {url}; {} events/round, payload ~{avg_payload} B + CloudEvents headers, in-flight {}, {} rounds",
        args.events, args.in_flight, args.rounds
    );
    println!("CloudEvents binary-mode encoding alone: {encode_rate:.0} events/s on this core");
    let (mut raw_best, mut ours_best) = (0f64, 0f64);
    for round in 1..=args.rounds {
        purge(&js).await?;
        let raw = raw_round(&client, &subject, &encoded, args.in_flight, round).await?;
        purge(&js).await?;
        let ours = ours_round(&client, &subject, &events, args.in_flight).await?;
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
    round: u32,
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
    for (i, (headers, payload)) in encoded.iter().enumerate() {
        let mut headers = headers.clone();
        // Raw rounds use their own ids so they are not deduplicated against ours.
        headers.insert("Nats-Msg-Id", format!("raw-{round}-{i}").as_str());
        let publish = PublishMessage::build()
            .headers(headers)
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
