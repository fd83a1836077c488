//! The dead-letter path: poison messages leave the pipeline with the reason
//! attached, and the pipeline keeps flowing.
//!
//! A dead letter is the original message (payload and headers untouched, so
//! `tidewatch replay` can send it back; only JetStream's own `Nats-*`
//! publish headers are dropped) published to
//! `tidewatch.dlq.<consumer>` with `Tidewatch-Dlq-*` headers saying why,
//! from where, and after how many deliveries. Its msg id is derived from
//! stream and sequence, so the same message dead-lettered twice (by the
//! handler and by the max-deliveries advisory) is stored once.

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

use crate::metrics::Reason;
use crate::publisher::{PublishError, Publisher};
use crate::topology;

pub const REASON_HEADER: &str = "Tidewatch-Dlq-Reason";
pub const KIND_HEADER: &str = "Tidewatch-Dlq-Kind";
pub const STREAM_HEADER: &str = "Tidewatch-Dlq-Stream";
pub const SEQUENCE_HEADER: &str = "Tidewatch-Dlq-Sequence";
pub const SUBJECT_HEADER: &str = "Tidewatch-Dlq-Subject";
pub const CONSUMER_HEADER: &str = "Tidewatch-Dlq-Consumer";
pub const DELIVERIES_HEADER: &str = "Tidewatch-Dlq-Deliveries";

/// Why a message was dead-lettered; also the `reason` label on
/// `tidewatch_dead_lettered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not a CloudEvent, or an invalid one.
    Malformed,
    /// Over the 64 KiB event limit.
    Oversized,
    /// The function rejected it.
    Rejected,
    /// Retried `max_deliver` times without success.
    Exhausted,
    /// An output could not be published for a terminal reason.
    OutputRefused,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Malformed => "malformed",
            Kind::Oversized => "oversized",
            Kind::Rejected => "rejected",
            Kind::Exhausted => "exhausted",
            Kind::OutputRefused => "output_refused",
        }
    }
}

/// Where a dead letter came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub subject: &'a str,
    pub stream_sequence: u64,
    pub deliveries: i64,
}

/// Sends dead letters for one consumer.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: Publisher,
    stream: String,
    consumer: String,
    subject: String,
}

impl DeadLetters {
    pub fn new(publisher: Publisher, stream: &str, consumer: &str) -> DeadLetters {
        DeadLetters {
            publisher,
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            subject: topology::subjects::dead_letter(consumer),
        }
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Store the message in the dead-letter stream; returns once stored.
    pub async fn send(
        &self,
        headers: Option<&HeaderMap>,
        payload: Bytes,
        origin: Origin<'_>,
        kind: Kind,
        reason: &str,
    ) -> Result<(), PublishError> {
        let mut headers = without_jetstream_headers(headers);
        headers.insert(REASON_HEADER, header_safe(reason).as_str());
        headers.insert(KIND_HEADER, kind.as_str());
        headers.insert(STREAM_HEADER, self.stream.as_str());
        headers.insert(SEQUENCE_HEADER, origin.stream_sequence.to_string().as_str());
        headers.insert(SUBJECT_HEADER, origin.subject);
        headers.insert(CONSUMER_HEADER, self.consumer.as_str());
        headers.insert(DELIVERIES_HEADER, origin.deliveries.to_string().as_str());
        let msg_id = format!(
            "dlq:{}:{}:{}",
            self.stream, self.consumer, origin.stream_sequence
        );
        self.publisher
            .send_raw(self.subject.clone(), &msg_id, headers, payload)
            .await
            .await?;
        self.publisher
            .metrics()
            .dead_lettered
            .get_or_create(&Reason {
                reason: kind.as_str(),
            })
            .inc();
        tracing::warn!(consumer = %self.consumer, seq = origin.stream_sequence, kind = kind.as_str(), %reason, "dead-lettered");
        Ok(())
    }

    /// Dead-letter messages the server gave up on without the runtime
    /// settling them (the process crashed or hung on the last delivery, or
    /// the client could not even parse the message): follow the consumer's
    /// MAX_DELIVERIES advisories until `shutdown`. Replicas share a queue
    /// group, so one of them handles each advisory. The message is read
    /// through the JSON message-get API, which does not parse headers, so
    /// a poison message is dead-lettered too.
    pub async fn follow_max_deliveries(
        self,
        client: async_nats::Client,
        sweeper: crate::poison::Sweeper,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let subject = format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            self.stream, self.consumer
        );
        let mut advisories = match client
            .queue_subscribe(subject.clone(), format!("{}-dlq", self.consumer))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, %subject, "cannot follow max-deliveries advisories; crashed deliveries will not be dead-lettered");
                return;
            }
        };
        tokio::pin!(shutdown);
        loop {
            let advisory = tokio::select! {
                _ = &mut shutdown => return,
                next = advisories.next() => match next { Some(m) => m, None => return },
            };
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&advisory.payload) else {
                continue;
            };
            let Some(seq) = body.get("stream_seq").and_then(|v| v.as_u64()) else {
                continue;
            };
            let deliveries = body.get("deliveries").and_then(|v| v.as_i64()).unwrap_or(0);
            // The server will not deliver this message again: keep trying
            // (the dead-letter stream may be down too) until it is stored
            // or this replica stops.
            let mut pause = Duration::from_millis(200);
            loop {
                match self.exhausted(&client, &sweeper, seq, deliveries).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(seq, error = %e, ?pause, "could not dead-letter an exhausted message; retrying");
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
    }

    async fn exhausted(
        &self,
        client: &async_nats::Client,
        sweeper: &crate::poison::Sweeper,
        seq: u64,
        deliveries: i64,
    ) -> Result<(), String> {
        let message = match crate::poison::get_message(client, &self.stream, seq).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                // Settled meanwhile (a late ack, or a sweep removed it).
                tracing::debug!(
                    seq,
                    "max deliveries reached but the message is no longer stored"
                );
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        if sweeper
            .remove_if_poison(&message, deliveries)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        let headers = match &message.header_block {
            Some(block) => {
                Some(crate::poison::parse_header_block(block).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let origin = Origin {
            subject: message.subject.as_str(),
            stream_sequence: seq,
            deliveries,
        };
        let reason = format!(
            "delivered {deliveries} times without being settled (handler crashed or exceeded ack_wait)"
        );
        self.send(
            headers.as_ref(),
            message.payload.clone(),
            origin,
            Kind::Exhausted,
            &reason,
        )
        .await
        .map_err(|e| e.to_string())
    }
}

/// The original headers minus JetStream's own (`Nats-*`). Those describe the
/// original publish: `Nats-Expected-Stream`, `Nats-Expected-Last-Sequence`,
/// `Nats-Rollup`, `Nats-TTL`... would make the dead-letter stream refuse or
/// reinterpret the dead letter, leaving the message stuck in the pipeline.
fn without_jetstream_headers(headers: Option<&HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        if name
            .get(..5)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
        {
            continue;
        }
        for value in values {
            out.append(name, value.clone());
        }
    }
    out
}

/// Header values are one line of printable text; keep reasons that way and bounded.
fn header_safe(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 1024 {
        let mut cut = 1024;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    crate::binding::percent_encode(&out).replace("%20", " ")
}
