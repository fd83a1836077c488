//! `tidewatch replay`: re-deliver stored events (the seed's "event replay for
//! correlation testing"), or re-drive dead letters after a fix.
//!
//! With `--consumer NAME`, events are republished to NAME's replay subject
//! (`tidewatch.replay.<stream>.<NAME>`), which lives in the stream NAME
//! reads and is in NAME's filter only: that function sees them again, no
//! other consumer does. With `--to-subject`, they go where you say. Replay
//! stops at the last message stored when it started, so replaying into the
//! same stream cannot loop.

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;
use tidewatch_runtime::binding::nats::from_nats;
use tidewatch_runtime::event::derive_id;
use tidewatch_runtime::publisher::PublisherConfig;
use tidewatch_runtime::topology::{self, subjects, types};

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Stream to read from: raw, enriched, insights or dlq.
    #[arg(long)]
    stream: String,
    /// Oldest event to replay: RFC 3339 time (2026-11-26T10:00:00Z) or an age (90s, 10m, 2h, 1d).
    #[arg(long)]
    since: String,
    /// Re-deliver to this function's consumer only.
    #[arg(
        long,
        conflicts_with = "to_subject",
        required_unless_present = "to_subject"
    )]
    consumer: Option<String>,
    /// Publish to this subject instead (it must belong to a stream).
    #[arg(long)]
    to_subject: Option<String>,
    /// Only events whose type matches ('*' wildcards).
    #[arg(long = "type")]
    ty: Option<String>,
    /// Replay at most this many events.
    #[arg(long)]
    limit: Option<u64>,
}

/// Parse `--since`: an RFC 3339 time, or an age before now.
pub fn parse_since(
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = number
        .parse()
        .with_context(|| format!("--since {s:?}: expected an RFC 3339 time or an age like 10m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("--since {s:?}: unit must be s, m, h or d"),
    };
    Ok(now - chrono::Duration::seconds(secs))
}

pub async fn run(client: &async_nats::Client, args: ReplayArgs) -> anyhow::Result<()> {
    let source = topology::stream(&args.stream)
        .with_context(|| format!("unknown stream {:?}", args.stream))?;
    // From the DLQ, a consumer gets back only its own dead letters: another
    // function's would be events of a stream it does not read.
    let mut filter_subject = String::new();
    let target = match (&args.consumer, &args.to_subject) {
        (Some(name), _) => {
            let consumers = crate::functions::consumers()?;
            let consumer = consumers
                .iter()
                .find(|c| c.durable == name)
                .with_context(|| {
                    let known: Vec<&str> = consumers.iter().map(|c| c.durable).collect();
                    format!("unknown consumer {name:?}; known: {}", known.join(", "))
                })?;
            if source.key == topology::DEAD_LETTER.key {
                filter_subject = subjects::dead_letter(consumer.durable);
            }
            subjects::replay(consumer.stream, consumer.durable)
        }
        (None, Some(subject)) => subject.clone(),
        (None, None) => bail!("say where to replay: --consumer NAME or --to-subject SUBJECT"),
    };
    let since = parse_since(&args.since, chrono::Utc::now())?;
    let js = jetstream::new(client.clone());
    let mut stream = js
        .get_stream(source.name)
        .await
        .with_context(|| format!("stream {}", source.name))?;
    // Where to stop: the newest message now (of the filtered subject, when
    // there is one), so events arriving during the replay are not chased.
    let last = if filter_subject.is_empty() {
        stream.info().await?.state.last_sequence
    } else {
        match stream
            .get_last_raw_message_by_subject(&filter_subject)
            .await
        {
            Ok(message) => message.sequence,
            Err(_) => {
                println!(
                    "nothing to replay: {} holds nothing on {filter_subject}",
                    source.name
                );
                return Ok(());
            }
        }
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartTime {
                start_time: time_to_offset(since)?,
            },
            filter_subject: filter_subject.clone(),
            ..Default::default()
        })
        .await?;
    let mut remaining = consumer.cached_info().num_pending;
    let publisher = crate::publisher(client, PublisherConfig::default());
    let run = crate::invocation_id();
    let mut messages = consumer.messages().await?;
    let (mut replayed, mut skipped) = (0u64, 0u64);
    while remaining > 0 {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message?;
        remaining -= 1;
        let seq = message
            .info()
            .map(|i| i.stream_sequence)
            .unwrap_or(u64::MAX);
        if seq > last {
            break;
        }
        if let Some(pattern) = &args.ty {
            let matches = from_nats(message.headers.as_ref(), &message.payload)
                .map(|e| types::matches(pattern, cloudevents::AttributesReader::ty(&e)))
                .unwrap_or(false);
            if !matches {
                skipped += 1;
                continue;
            }
        }
        // A fresh msg id per replay run: the original id would be dropped as a
        // duplicate within the window. The CloudEvent id is unchanged, so
        // outputs keep their derived ids.
        let msg_id = derive_id(&[b"replay", run.as_bytes(), &seq.to_be_bytes()]);
        // The event as it was: a dead letter's `Tidewatch-Dlq-*` headers
        // describe its last failure, not the event.
        let mut headers = async_nats::HeaderMap::new();
        for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
            let name: &str = name.as_ref();
            if name.starts_with("Tidewatch-Dlq-") {
                continue;
            }
            for value in values {
                headers.append(name, value.as_str());
            }
        }
        publisher
            .send_raw(target.clone(), &msg_id, headers, message.payload.clone())
            .await
            .await
            .with_context(|| format!("replaying seq {seq} to {target}"))?;
        replayed += 1;
        if args.limit.is_some_and(|l| replayed >= l) {
            break;
        }
        if seq == last {
            break;
        }
    }
    println!(
        "replayed {replayed} events from {} since {since} to {target} ({skipped} skipped by --type)",
        source.name
    );
    Ok(())
}

fn time_to_offset(t: chrono::DateTime<chrono::Utc>) -> anyhow::Result<time::OffsetDateTime> {
    let nanos = t.timestamp_nanos_opt().context("time out of range")?;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos)).context("time out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_and_ages() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_since("10m", now).expect("age"),
            now - chrono::Duration::minutes(10)
        );
        assert_eq!(
            parse_since("2h", now).expect("age"),
            now - chrono::Duration::hours(2)
        );
        assert_eq!(
            parse_since("2026-11-26T11:00:00Z", now).expect("time"),
            now - chrono::Duration::hours(1)
        );
        assert!(parse_since("ten minutes", now).is_err());
        assert!(parse_since("10w", now).is_err());
    }
}
