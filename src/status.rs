//! `tidewatch provision` and `tidewatch status`.

use anyhow::Context as _;
use async_nats::jetstream;
use tidewatch_runtime::provision::{ProvisionOptions, provision as provision_all};
use tidewatch_runtime::topology;

#[derive(clap::Args)]
pub struct ProvisionArgs {
    /// Replicas per stream and bucket: 1 for a single server, 3 for a cluster.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Only create or update consumers, on streams that already exist (the
    /// functions' provisioning Job, whose NATS user may not touch streams).
    #[arg(long)]
    consumers_only: bool,
}

pub async fn provision(client: &async_nats::Client, args: ProvisionArgs) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let options = ProvisionOptions {
        consumers_only: args.consumers_only,
        ..ProvisionOptions::default().replicas(args.replicas)
    };
    let report = provision_all(&js, &crate::functions::consumers()?, &options).await?;
    print!("{report}");
    if report.is_noop() {
        println!("everything was already provisioned");
    }
    Ok(())
}

pub async fn status(client: &async_nats::Client) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    println!(
        "{:<22} {:>10} {:>12} {:>10} {:>10}  subjects",
        "STREAM", "MESSAGES", "BYTES", "FIRST", "LAST"
    );
    for spec in topology::STREAMS {
        match js.get_stream(spec.name).await {
            Ok(mut stream) => {
                let info = stream.info().await?;
                println!(
                    "{:<22} {:>10} {:>12} {:>10} {:>10}  {}",
                    spec.name,
                    info.state.messages,
                    info.state.bytes,
                    info.state.first_sequence,
                    info.state.last_sequence,
                    info.config.subjects.join(" ")
                );
            }
            Err(e) => println!("{:<22} missing ({e}); run `tidewatch provision`", spec.name),
        }
    }
    println!();
    println!(
        "{:<12} {:<20} {:>10} {:>12} {:>12} {:>8}",
        "CONSUMER", "STREAM", "PENDING", "ACK PENDING", "REDELIVERED", "WAITING"
    );
    for consumer in crate::functions::consumers()? {
        let stream = topology::stream(consumer.stream)
            .map(|s| s.name)
            .unwrap_or_default();
        let info = match js.get_stream(stream).await {
            Ok(s) => s
                .consumer_info(consumer.durable)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match info {
            Ok(info) => println!(
                "{:<12} {:<20} {:>10} {:>12} {:>12} {:>8}",
                consumer.durable,
                stream,
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
                info.num_waiting
            ),
            Err(e) => println!("{:<12} {:<20} missing ({e})", consumer.durable, stream),
        }
    }
    println!();
    println!("{:<24} {:>10} {:>10}", "KV BUCKET", "ENTRIES", "BYTES");
    for bucket in topology::BUCKETS {
        let kv = js.get_key_value(bucket.bucket).await;
        match kv {
            Ok(kv) => {
                let status = kv
                    .status()
                    .await
                    .with_context(|| format!("bucket {}", bucket.bucket))?;
                println!(
                    "{:<24} {:>10} {:>10}",
                    bucket.bucket,
                    status.values(),
                    status.info.state.bytes
                );
            }
            Err(e) => println!("{:<24} missing ({e})", bucket.bucket),
        }
    }
    Ok(())
}
