//! `tidewatch tail`: follow streams and print each event as one JSON line
//! (attributes, extensions, payload decoded from protobuf). Reads through
//! ordered ephemeral consumers: no durable state, no effect on functions.

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;
use tidewatch_runtime::binding::nats::from_nats;
use tidewatch_runtime::dead_letter;
use tidewatch_runtime::event::to_json;
use tidewatch_runtime::topology::{self, types};

#[derive(clap::Args)]
pub struct TailArgs {
    /// Streams to follow (raw, enriched, insights, dlq); default all.
    #[arg(long, value_delimiter = ',')]
    stream: Vec<String>,
    /// Only events whose type matches; `*` matches anything (e.g. 'dev.tidewatch.kernel.*').
    #[arg(long = "type")]
    ty: Option<String>,
    /// Start from the oldest stored event instead of new ones.
    #[arg(long)]
    from_start: bool,
    /// Exit after printing this many events.
    #[arg(long)]
    limit: Option<usize>,
}

pub async fn run(client: &async_nats::Client, args: TailArgs) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let specs: Vec<&topology::StreamSpec> = if args.stream.is_empty() {
        topology::STREAMS.iter().collect()
    } else {
        args.stream
            .iter()
            .map(|s| {
                topology::stream(s).with_context(|| {
                    format!("unknown stream {s:?}: use raw, enriched, insights or dlq")
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let mut feeds = Vec::new();
    for spec in specs {
        let stream = js
            .get_stream(spec.name)
            .await
            .with_context(|| format!("stream {} (run `tidewatch provision`)", spec.name))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: if args.from_start {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::New
                },
                ..Default::default()
            })
            .await
            .with_context(|| format!("following {}", spec.name))?;
        let messages = consumer.messages().await?;
        feeds.push(messages.map(move |m| (spec.key, m)).boxed());
    }
    let mut merged = futures::stream::select_all(feeds);
    let mut printed = 0;
    while let Some((stream, message)) = merged.next().await {
        let message = message.with_context(|| format!("reading {stream}"))?;
        let mut line = match from_nats(message.headers.as_ref(), &message.payload) {
            Ok(event) => {
                if args
                    .ty
                    .as_deref()
                    .is_some_and(|p| !types::matches(p, event.ty()))
                {
                    continue;
                }
                to_json(&event)
            }
            Err(e) => {
                serde_json::json!({ "malformed": e.to_string(), "bytes": message.payload.len() })
            }
        };
        if let (Some(obj), Some(headers)) = (line.as_object_mut(), message.headers.as_ref()) {
            obj.insert("stream".into(), stream.into());
            obj.insert("natssubject".into(), message.subject.to_string().into());
            for (name, key) in [
                (dead_letter::REASON_HEADER, "dlqreason"),
                (dead_letter::KIND_HEADER, "dlqkind"),
            ] {
                if let Some(v) = headers.get(name) {
                    obj.insert(key.into(), v.as_str().into());
                }
            }
        }
        println!("{line}");
        printed += 1;
        if args.limit.is_some_and(|l| printed >= l) {
            break;
        }
    }
    Ok(())
}

use cloudevents::AttributesReader as _;
