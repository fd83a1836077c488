//! Messages the NATS client cannot parse, and how they leave the pipeline.
//!
//! nats-server stores any header block a publisher sends. async-nats, on
//! receiving one it cannot parse (not UTF-8, no `NATS/1.0` line, a line
//! without `:`, a bad header name), drops the whole connection: in-flight
//! acks, publishes and the KV watch go with it, and the message is
//! redelivered to do it again. Such a message can never be handled, only
//! removed, and only by a path that does not parse headers on the wire: the
//! stream's JSON message-get API (`$JS.API.STREAM.MSG.GET.<stream>`), which
//! carries the header block base64-encoded.
//!
//! - [`parse_header_block`] is async-nats' own parse, over bytes: what the
//!   client would accept, and the headers it would see.
//! - [`get_message`] reads one stored message through the JSON API, raw.
//! - [`Sweeper`] runs after every reconnect of a consumer's connection (a
//!   poison delivery is what drops it): it reads the consumer's un-acked
//!   range, dead-letters each message the client would refuse (its raw
//!   header block base64 in `Tidewatch-Dlq-Raw-Headers`, payload intact),
//!   then deletes it from the stream so no consumer receives it again.

use std::str::FromStr;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, IntoHeaderValue};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::StreamExt;

use crate::dead_letter::{DeadLetters, Kind, Origin};

/// Most sequences one sweep reads: a consumer's un-acked range is bounded by
/// its `max_ack_pending`; this bounds the sweep if the floor lags far behind.
pub const MAX_SWEEP: u64 = 16 * 1024;
/// Message-get requests a sweep keeps in flight.
const SWEEP_CONCURRENCY: usize = 32;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why async-nats would refuse a header block (and drop its connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderBlockError {
    /// Terminal: the block is not UTF-8.
    #[error("header block is not valid UTF-8 (byte {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    /// Terminal: the first line is not `NATS/1.0[ status [description]]`.
    #[error("header block does not begin with `NATS/1.0`")]
    NoVersionLine,
    /// Terminal: the status after `NATS/1.0` is not a status code.
    #[error("header status {0:?} is not a status code")]
    BadStatus(String),
    /// Terminal: a header line has no `:`.
    #[error("header line {line} has no `:`")]
    NoColon { line: usize },
    /// Terminal: a header name has characters NATS headers do not allow.
    #[error("header line {line}: invalid name {name:?}")]
    BadName { line: usize, name: String },
}

/// Parse a NATS header block (`NATS/1.0\r\nName: value\r\n...`) exactly as
/// async-nats 0.51 does when it reads an `HMSG` (connection.rs), so that
/// `Ok` means the client accepts it. Continuation lines (starting with
/// whitespace) are folded into the previous value, like the client does.
pub fn parse_header_block(block: &[u8]) -> Result<HeaderMap, HeaderBlockError> {
    let text = std::str::from_utf8(block).map_err(|e| HeaderBlockError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let mut lines = text.lines().enumerate().peekable();
    let (_, version) = lines.next().ok_or(HeaderBlockError::NoVersionLine)?;
    let suffix = version
        .strip_prefix("NATS/1.0")
        .map(str::trim)
        .ok_or(HeaderBlockError::NoVersionLine)?;
    let status = suffix.split_once(' ').map_or(suffix, |(s, _)| s.trim());
    if !status.is_empty() && async_nats::StatusCode::from_str(status).is_err() {
        return Err(HeaderBlockError::BadStatus(
            status.chars().take(32).collect(),
        ));
    }
    let mut headers = HeaderMap::new();
    while let Some((index, line)) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HeaderBlockError::NoColon { line: index + 1 })?;
        let name = HeaderName::from_str(name).map_err(|_| HeaderBlockError::BadName {
            line: index + 1,
            name: name.chars().take(64).collect(),
        })?;
        let mut value = value.trim_start().to_owned();
        while let Some((_, more)) = lines.next_if(|(_, s)| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        value.truncate(value.trim_end().len());
        headers.append(name, value.into_header_value());
    }
    Ok(headers)
}

/// What went wrong reading or deleting a stored message.
#[derive(Debug, thiserror::Error)]
pub enum StoredMessageError {
    /// Retryable: the request got no answer (server down, timeout).
    #[error("request to {subject} failed: {reason}")]
    Request { subject: String, reason: String },
    /// Terminal for this call: the server answered with an API error.
    #[error("{subject}: server error {code}: {description}")]
    Api {
        subject: String,
        code: u64,
        description: String,
    },
    /// Terminal: the answer is not the documented JSON.
    #[error("{subject}: unexpected answer: {reason}")]
    Answer { subject: String, reason: String },
}

/// One stored message as the JSON API returns it: nothing parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct RawStoredMessage {
    pub subject: String,
    pub sequence: u64,
    /// The header block as stored (`NATS/1.0\r\n...`), if any.
    pub header_block: Option<Vec<u8>>,
    pub payload: Bytes,
}

#[derive(serde::Deserialize)]
struct GetAnswer {
    message: Option<StoredJson>,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct StoredJson {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// JetStream's "no message found" (deleted, expired or never stored).
const NO_MESSAGE_FOUND: u64 = 10037;

async fn api_request(
    client: &async_nats::Client,
    subject: String,
    body: serde_json::Value,
) -> Result<Bytes, StoredMessageError> {
    let request = client.request(subject.clone(), body.to_string().into());
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(reply)) => Ok(reply.payload),
        Ok(Err(e)) => Err(StoredMessageError::Request {
            subject,
            reason: e.to_string(),
        }),
        Err(_) => Err(StoredMessageError::Request {
            subject,
            reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
        }),
    }
}

/// Read message `sequence` of `stream` without parsing its headers;
/// `Ok(None)` when the stream no longer has it.
pub async fn get_message(
    client: &async_nats::Client,
    stream: &str,
    sequence: u64,
) -> Result<Option<RawStoredMessage>, StoredMessageError> {
    let subject = format!("$JS.API.STREAM.MSG.GET.{stream}");
    let payload = api_request(
        client,
        subject.clone(),
        serde_json::json!({ "seq": sequence }),
    )
    .await?;
    let answer: GetAnswer =
        serde_json::from_slice(&payload).map_err(|e| StoredMessageError::Answer {
            subject: subject.clone(),
            reason: e.to_string(),
        })?;
    if let Some(error) = answer.error {
        if error.err_code == NO_MESSAGE_FOUND || error.code == 404 {
            return Ok(None);
        }
        return Err(StoredMessageError::Api {
            subject,
            code: error.err_code.max(error.code),
            description: error.description,
        });
    }
    let Some(stored) = answer.message else {
        return Err(StoredMessageError::Answer {
            subject,
            reason: "neither message nor error".into(),
        });
    };
    let decode =
        |field: &str, text: Option<String>| -> Result<Option<Vec<u8>>, StoredMessageError> {
            text.filter(|t| !t.is_empty())
                .map(|t| BASE64.decode(t))
                .transpose()
                .map_err(|e| StoredMessageError::Answer {
                    subject: subject.clone(),
                    reason: format!("{field}: {e}"),
                })
        };
    Ok(Some(RawStoredMessage {
        header_block: decode("hdrs", stored.hdrs)?,
        payload: decode("data", stored.data)?.unwrap_or_default().into(),
        subject: stored.subject,
        sequence: stored.seq,
    }))
}

/// Delete message `sequence` from `stream` (without overwriting its bytes:
/// it is already in the dead-letter stream). A message already gone is fine.
pub async fn delete_message(
    client: &async_nats::Client,
    stream: &str,
    sequence: u64,
) -> Result<(), StoredMessageError> {
    let subject = format!("$JS.API.STREAM.MSG.DELETE.{stream}");
    let payload = api_request(
        client,
        subject.clone(),
        serde_json::json!({ "seq": sequence, "no_erase": true }),
    )
    .await?;
    let answer: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|e| StoredMessageError::Answer {
            subject: subject.clone(),
            reason: e.to_string(),
        })?;
    match answer.get("error") {
        None => Ok(()),
        Some(error) => {
            let err_code = error.get("err_code").and_then(|c| c.as_u64()).unwrap_or(0);
            if err_code == NO_MESSAGE_FOUND {
                return Ok(());
            }
            Err(StoredMessageError::Api {
                subject,
                code: err_code,
                description: error
                    .get("description")
                    .and_then(|d| d.as_str())
                    .unwrap_or_default()
                    .to_string(),
            })
        }
    }
}

/// Whether NATS subject `subject` matches filter `filter` (`*` one token,
/// `>` the rest).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in filter.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Header naming the raw header block of a poison dead letter (base64).
pub const RAW_HEADERS_HEADER: &str = "Tidewatch-Dlq-Raw-Headers";

/// Removes poison messages from one consumer's input stream.
#[derive(Clone)]
pub struct Sweeper {
    client: async_nats::Client,
    stream: String,
    consumer: String,
    dead_letters: DeadLetters,
}

/// What one sweep found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub read: u64,
    pub removed: u64,
}

impl Sweeper {
    pub fn new(
        client: async_nats::Client,
        stream: &str,
        consumer: &str,
        dead_letters: DeadLetters,
    ) -> Sweeper {
        Sweeper {
            client,
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            dead_letters,
        }
    }

    /// Read the consumer's un-acked range (after its ack floor, up to the
    /// last delivered message) and remove every message in it the client
    /// cannot parse.
    pub async fn sweep(&self) -> Result<SweepReport, StoredMessageError> {
        let subject = format!("$JS.API.CONSUMER.INFO.{}.{}", self.stream, self.consumer);
        let payload = api_request(&self.client, subject.clone(), serde_json::json!({})).await?;
        let info: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|e| StoredMessageError::Answer {
                subject: subject.clone(),
                reason: e.to_string(),
            })?;
        let seq = |path: &[&str]| {
            path.iter()
                .try_fold(&info, |v, key| v.get(key))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        let floor = seq(&["ack_floor", "stream_seq"]);
        let delivered = seq(&["delivered", "stream_seq"]);
        let config = info.get("config");
        let mut filters: Vec<String> = config
            .and_then(|c| c.get("filter_subjects"))
            .and_then(|f| f.as_array())
            .map(|f| {
                f.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(one) = config
            .and_then(|c| c.get("filter_subject"))
            .and_then(|f| f.as_str())
            .filter(|f| !f.is_empty())
        {
            filters.push(one.to_string());
        }
        let last = delivered.min(floor.saturating_add(MAX_SWEEP));
        let mut report = SweepReport::default();
        let mut reads = futures::stream::iter(floor + 1..=last)
            .map(|sequence| async move {
                (
                    sequence,
                    get_message(&self.client, &self.stream, sequence).await,
                )
            })
            .buffered(SWEEP_CONCURRENCY);
        while let Some((sequence, read)) = reads.next().await {
            report.read += 1;
            let message = match read {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(sequence, error = %e, "poison sweep could not read a message");
                    continue;
                }
            };
            let ours =
                filters.is_empty() || filters.iter().any(|f| subject_matches(f, &message.subject));
            if ours && self.remove_if_poison(&message, 0).await? {
                report.removed += 1;
            }
        }
        Ok(report)
    }

    /// Dead-letter and delete `message` if the client cannot parse its
    /// headers; `Ok(false)` when it can.
    pub async fn remove_if_poison(
        &self,
        message: &RawStoredMessage,
        deliveries: i64,
    ) -> Result<bool, StoredMessageError> {
        let Some(block) = &message.header_block else {
            return Ok(false);
        };
        let Err(why) = parse_header_block(block) else {
            return Ok(false);
        };
        let mut headers = HeaderMap::new();
        headers.insert(RAW_HEADERS_HEADER, BASE64.encode(block).as_str());
        let reason = format!("the NATS client cannot read this message: {why}");
        let origin = Origin {
            subject: &message.subject,
            stream_sequence: message.sequence,
            deliveries,
        };
        self.dead_letters
            .publisher()
            .metrics()
            .refuse("poison_header");
        if let Err(e) = self
            .dead_letters
            .send(
                Some(&headers),
                message.payload.clone(),
                origin,
                Kind::Malformed,
                &reason,
            )
            .await
        {
            // Not deleted: the next sweep (or the max-deliveries advisory)
            // tries again.
            return Err(StoredMessageError::Request {
                subject: crate::topology::subjects::dead_letter(&self.consumer),
                reason: e.to_string(),
            });
        }
        delete_message(&self.client, &self.stream, message.sequence).await?;
        tracing::warn!(stream = %self.stream, sequence = message.sequence, %why, "poison message moved to the dead-letter stream");
        Ok(true)
    }

    /// Sweep once now, then after every reconnect (`connects` counts
    /// connections), until `shutdown`.
    pub async fn follow(
        self,
        mut connects: tokio::sync::watch::Receiver<u64>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            match self.sweep().await {
                Ok(r) if r.removed > 0 => {
                    tracing::info!(read = r.read, removed = r.removed, "poison sweep done")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "poison sweep failed; retrying on the next reconnect")
                }
            }
            tokio::select! {
                _ = &mut shutdown => return,
                changed = connects.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_the_client_accepts() {
        let headers = parse_header_block(b"NATS/1.0\r\nCe-Id: 1\r\nCe-Type: x\r\n  folded\r\n\r\n")
            .expect("valid");
        assert_eq!(headers.get("Ce-Id").map(|v| v.as_str()), Some("1"));
        assert_eq!(
            headers.get("Ce-Type").map(|v| v.as_str()),
            Some("x  folded")
        );
        assert!(parse_header_block(b"NATS/1.0 503\r\n\r\n").is_ok());
        assert!(parse_header_block(b"NATS/1.0\r\n\r\n").is_ok());
    }

    #[test]
    fn refuses_what_drops_the_connection() {
        assert!(matches!(
            parse_header_block(b"NATS/1.0\r\nCe-Id: \xff\r\n\r\n"),
            Err(HeaderBlockError::NotUtf8 { .. })
        ));
        assert_eq!(
            parse_header_block(b"NATS/1.0\r\nno colon here\r\n\r\n"),
            Err(HeaderBlockError::NoColon { line: 2 })
        );
        assert_eq!(
            parse_header_block(b"HTTP/1.1\r\n\r\n"),
            Err(HeaderBlockError::NoVersionLine)
        );
        assert!(matches!(
            parse_header_block(b"NATS/1.0\r\nbad name: x\r\n\r\n"),
            Err(HeaderBlockError::BadName { line: 2, .. })
        ));
        assert!(matches!(
            parse_header_block(b"NATS/1.0 abc\r\n\r\n"),
            Err(HeaderBlockError::BadStatus(_))
        ));
    }

    #[test]
    fn subject_filters() {
        assert!(subject_matches("tidewatch.raw.>", "tidewatch.raw.ebpf.n1"));
        assert!(!subject_matches("tidewatch.raw.>", "tidewatch.raw"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.c.d"));
        assert!(!subject_matches("a.b", "a.c"));
    }

    proptest::proptest! {
        /// The parse never panics, and agrees with async-nats' own header
        /// types: whatever it accepts round-trips through a HeaderMap.
        #[test]
        fn fuzz_header_block(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_header_block(&bytes);
            let mut framed = b"NATS/1.0\r\n".to_vec();
            framed.extend_from_slice(&bytes);
            if let Ok(headers) = parse_header_block(&framed) {
                for (name, values) in headers.iter() {
                    let name: &str = name.as_ref();
                    proptest::prop_assert!(HeaderName::from_str(name).is_ok());
                    for value in values {
                        proptest::prop_assert!(!value.as_str().contains('\n'));
                    }
                }
            }
        }
    }
}
