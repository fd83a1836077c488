//! Async JetStream publishing with a bounded number of un-acked publishes.
//!
//! [`Publisher::send`] encodes the event (binary mode, `Nats-Msg-Id` = id),
//! refuses it if it is over [`MAX_EVENT_BYTES`], waits for a free in-flight
//! slot (backpressure instead of unbounded memory), and hands it to the
//! connection. The returned [`Confirmation`] resolves when the stream has
//! stored it, re-sending with the same msg id on timeouts and lost
//! connections, so a retry can never store an event twice.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind as NatsKind, publish::PublishAck};
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};

use crate::binding::nats::{to_nats, wire_size};
use crate::event::MAX_EVENT_BYTES;
use crate::message::Record;
use crate::metrics::{Metrics, Reason};

/// Publisher settings, builder style.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Publishes sent but not yet acknowledged; `send` waits beyond this.
    pub max_in_flight: usize,
    /// How long to wait for one stream ack.
    pub ack_timeout: Duration,
    /// Attempts per event (first send included) before giving up.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, capped at 5 s.
    pub retry_backoff: Duration,
    /// Largest accepted event, headers plus data.
    pub max_event_bytes: usize,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            max_in_flight: 1024,
            ack_timeout: Duration::from_secs(5),
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            max_event_bytes: MAX_EVENT_BYTES,
        }
    }
}

impl PublisherConfig {
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.retry_backoff = backoff;
        self
    }
}

/// What went wrong publishing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Terminal: the event is over the size limit; it was not sent.
    #[error("event {id} is {size} bytes, over the {limit}-byte limit; refused, not truncated")]
    TooLarge {
        id: String,
        size: usize,
        limit: usize,
    },
    /// Retryable: no stream acknowledged the event after every attempt
    /// (NATS unreachable, no stream for the subject, timeouts).
    #[error("event {id} to {subject}: not acknowledged after {attempts} attempts: {source}")]
    Unavailable {
        id: String,
        subject: String,
        attempts: u32,
        #[source]
        source: jetstream::context::PublishError,
        /// The message as it would have been sent, for a caller that keeps
        /// it elsewhere (the [`Outbox`](crate::outbox::Outbox) spools it).
        unsent: Unsent,
    },
    /// Retryable: the task confirming the publish ended early (the runtime is shutting down).
    #[error("event {id}: confirmation aborted: {reason}")]
    Aborted { id: String, reason: String },
    /// Terminal: the server refused the event (e.g. over the server's max payload).
    #[error("event {id} to {subject}: refused by the server: {source}")]
    Rejected {
        id: String,
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
}

/// A message that was not stored, kept so it can be spooled and sent
/// again with the same msg id. Its `Debug` shows sizes, not the payload.
pub struct Unsent(pub Box<Record>);

impl std::fmt::Debug for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Unsent {{ msg_id: {:?}, subject: {:?}, {} headers, {} payload bytes }}",
            self.0.msg_id,
            self.0.subject,
            self.0.headers.len(),
            self.0.payload.len()
        )
    }
}

/// Kind of a [`PublishError`], for matching without the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    TooLarge,
    Unavailable,
    Rejected,
}

impl PublishError {
    pub fn kind(&self) -> PublishErrorKind {
        match self {
            PublishError::TooLarge { .. } => PublishErrorKind::TooLarge,
            PublishError::Unavailable { .. } | PublishError::Aborted { .. } => {
                PublishErrorKind::Unavailable
            }
            PublishError::Rejected { .. } => PublishErrorKind::Rejected,
        }
    }
    /// Whether trying the same event later can succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind() == PublishErrorKind::Unavailable
    }
}

/// Publishes events to JetStream. Cheap to clone; clones share the in-flight bound.
#[derive(Clone)]
pub struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    config: PublisherConfig,
    metrics: Metrics,
    confirmer: tokio::sync::mpsc::UnboundedSender<Pending>,
}

/// A sent publish waiting for its ack, and who wants to know.
struct Pending {
    outgoing: Outgoing,
    first: SendResult,
    reply: tokio::sync::oneshot::Sender<Result<PublishAck, PublishError>>,
}

type SendResult = Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>;

struct Outgoing {
    id: String,
    subject: String,
    /// Headers for the first attempt, moved into it (no clone on the hot path).
    headers: Option<HeaderMap>,
    /// The same headers flattened into one buffer, to rebuild them for a
    /// retry: one allocation instead of cloning every name and value.
    retry_headers: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    header_bytes: String,
    payload: Bytes,
}

impl Outgoing {
    fn new(id: String, subject: String, headers: HeaderMap, payload: Bytes) -> Outgoing {
        let mut header_bytes = String::with_capacity(512);
        let mut retry_headers = Vec::with_capacity(16);
        for (name, values) in headers.iter() {
            for value in values {
                let n = header_bytes.len()..header_bytes.len() + AsRef::<str>::as_ref(name).len();
                header_bytes.push_str(name.as_ref());
                let v = header_bytes.len()..header_bytes.len() + value.as_str().len();
                header_bytes.push_str(value.as_str());
                retry_headers.push((n, v));
            }
        }
        Outgoing {
            id,
            subject,
            headers: Some(headers),
            retry_headers,
            header_bytes,
            payload,
        }
    }

    /// Headers for the next attempt.
    fn take_headers(&mut self) -> HeaderMap {
        self.headers.take().unwrap_or_else(|| {
            let mut headers = HeaderMap::new();
            for (n, v) in &self.retry_headers {
                headers.append(&self.header_bytes[n.clone()], &self.header_bytes[v.clone()]);
            }
            headers
        })
    }
}

impl Publisher {
    pub fn new(client: async_nats::Client, config: PublisherConfig, metrics: Metrics) -> Publisher {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .max_ack_inflight(config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let (confirmer, jobs) = tokio::sync::mpsc::unbounded_channel();
        let publisher = Publisher {
            client,
            js,
            config,
            metrics,
            confirmer,
        };
        tokio::spawn(publisher.clone().confirm_all(jobs));
        publisher
    }

    /// Await every sent publish's ack (retrying as needed) in one task, so
    /// the in-flight slot frees as soon as the stream answers whether or
    /// not the caller polls its confirmation (a caller that sends many
    /// before awaiting any would otherwise deadlock on the in-flight bound),
    /// and without a task per publish. Ends when every `Publisher` clone is
    /// gone and the last ack is in.
    async fn confirm_all(self, mut jobs: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
        // This task holds a clone whose sender would keep the channel open.
        let Publisher {
            client,
            js,
            config,
            metrics,
            ..
        } = self;
        let (unused, _) = tokio::sync::mpsc::unbounded_channel();
        let publisher = Publisher {
            client,
            js,
            config,
            metrics,
            confirmer: unused,
        };
        // The confirmations borrow this one publisher rather than each
        // cloning it (a client and a JetStream context with its prefix
        // string): that was work on every published event.
        let publisher = &publisher;
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                job = jobs.recv(), if open => match job {
                    Some(Pending { outgoing, first, reply }) => {
                        pending.push(async move {
                            let _ = reply.send(publisher.confirm(outgoing, first).await);
                        });
                    }
                    None => open = false,
                },
                Some(()) = futures::StreamExt::next(&mut pending), if !pending.is_empty() => {}
                else => return,
            }
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the connection to NATS is up right now. A publish made
    /// while it is down waits in the client until it reconnects or the ack
    /// times out, so a caller with somewhere else to put events (the
    /// [`Outbox`](crate::outbox::Outbox)) asks first.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The largest event [`send`](Self::send) accepts.
    pub fn max_event_bytes(&self) -> usize {
        self.config.max_event_bytes
    }

    /// Encode and send `event` to `subject`; resolve the returned
    /// [`Confirmation`] to learn that the stream stored it. Waits while
    /// `max_in_flight` publishes are unacknowledged.
    pub async fn send(
        &self,
        subject: impl Into<String>,
        event: &Event,
    ) -> Result<Confirmation, PublishError> {
        let (headers, payload) = to_nats(event);
        let size = wire_size(Some(&headers), &payload);
        let id = event.id().to_string();
        if size > self.config.max_event_bytes {
            self.metrics.refuse("oversized");
            return Err(PublishError::TooLarge {
                id,
                size,
                limit: self.config.max_event_bytes,
            });
        }
        Ok(self
            .send_outgoing(Outgoing::new(id, subject.into(), headers, payload))
            .await)
    }

    /// Send an already-encoded message with `msg_id` as its `Nats-Msg-Id`,
    /// without the event size check: for moving stored messages around
    /// (dead letters, replays), which were checked when first published.
    pub async fn send_raw(
        &self,
        subject: impl Into<String>,
        msg_id: &str,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Confirmation {
        headers.insert(crate::binding::nats::MSG_ID_HEADER, msg_id);
        self.send_outgoing(Outgoing::new(
            msg_id.to_string(),
            subject.into(),
            headers,
            payload,
        ))
        .await
    }

    async fn send_outgoing(&self, mut outgoing: Outgoing) -> Confirmation {
        let first = self.send_once(&mut outgoing).await;
        let id = outgoing.id.clone();
        let (reply, receiver) = tokio::sync::oneshot::channel();
        if let Err(job) = self.confirmer.send(Pending {
            outgoing,
            first,
            reply,
        }) {
            // The confirming task is gone (runtime shutting down): confirm here.
            let Pending {
                outgoing,
                first,
                reply,
            } = job.0;
            let _ = reply.send(self.confirm(outgoing, first).await);
        }
        Confirmation { id, receiver }
    }

    /// Send and wait for the stream's acknowledgement.
    pub async fn publish(
        &self,
        subject: impl Into<String>,
        event: &Event,
    ) -> Result<PublishAck, PublishError> {
        self.send(subject, event).await?.await
    }

    async fn send_once(&self, outgoing: &mut Outgoing) -> SendResult {
        let publish = jetstream::message::PublishMessage::build()
            .headers(outgoing.take_headers())
            .payload(outgoing.payload.clone());
        self.js
            .send_publish(outgoing.subject.clone(), publish)
            .await
    }

    async fn confirm(
        &self,
        mut outgoing: Outgoing,
        first: SendResult,
    ) -> Result<PublishAck, PublishError> {
        let mut attempt = 1;
        let mut sent = Some(first);
        loop {
            let result = match sent.take() {
                Some(Ok(ack)) => ack.await,
                Some(Err(e)) => Err(e),
                // Boxed, like the sleep below: the retry path is rare, and
                // unboxed its futures would make every confirmation's
                // state (moved around per publish) several times larger.
                None => match Box::pin(self.send_once(&mut outgoing)).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                },
            };
            let error = match result {
                Ok(ack) => {
                    self.metrics.published.inc();
                    return Ok(ack);
                }
                Err(e) => e,
            };
            let terminal = matches!(
                error.kind(),
                NatsKind::MaxPayloadExceeded
                    | NatsKind::WrongLastMessageId
                    | NatsKind::WrongLastSequence
            ) || server_refused(&error);
            if terminal {
                self.metrics
                    .publish_failed
                    .get_or_create(&Reason { reason: "rejected" })
                    .inc();
                return Err(PublishError::Rejected {
                    id: outgoing.id,
                    subject: outgoing.subject,
                    source: error,
                });
            }
            if attempt >= self.config.max_attempts {
                self.metrics
                    .publish_failed
                    .get_or_create(&Reason {
                        reason: "unavailable",
                    })
                    .inc();
                let headers = outgoing.take_headers();
                let unsent = Unsent(Box::new(Record::from_nats(
                    outgoing.subject.clone(),
                    outgoing.id.clone(),
                    &headers,
                    outgoing.payload.clone(),
                )));
                return Err(PublishError::Unavailable {
                    id: outgoing.id,
                    subject: outgoing.subject,
                    attempts: attempt,
                    source: error,
                    unsent,
                });
            }
            let backoff = self
                .config
                .retry_backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(Duration::from_secs(5));
            tracing::debug!(id = %outgoing.id, subject = %outgoing.subject, attempt, error = %error, ?backoff, "publish not acknowledged; retrying with the same msg id");
            self.metrics.publish_retries.inc();
            Box::pin(tokio::time::sleep(backoff)).await;
            attempt += 1;
        }
    }
}

/// Whether the stream answered with an API error that a retry cannot fix
/// (e.g. an expected-stream mismatch). Worth retrying: 503 (JetStream
/// temporarily unavailable: a leader election), and 10158, "duplicate
/// message id is in process": an earlier attempt with the same id (whose
/// ack timed out) is still being proposed, e.g. by a leader that lost its
/// quorum in a partition; the next attempt stores it or is deduplicated.
fn server_refused(error: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|api| api.code() != 503 && api.error_code() != DUPLICATE_IN_PROCESS)
}

/// JetStream's "duplicate message id is in process".
const DUPLICATE_IN_PROCESS: jetstream::ErrorCode = jetstream::ErrorCode(10158);

/// Resolves when the stream has stored the event (or publishing failed for
/// good). Dropping it does not cancel the publish: it still completes (or
/// fails and is counted on `tidewatch_publish_failed_total`).
#[must_use = "a publish is only known to be stored once its confirmation resolves"]
pub struct Confirmation {
    id: String,
    receiver: tokio::sync::oneshot::Receiver<Result<PublishAck, PublishError>>,
}

impl Confirmation {
    /// Id of the event being confirmed.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl IntoFuture for Confirmation {
    type Output = Result<PublishAck, PublishError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let Confirmation { id, receiver } = self;
        Box::pin(async move {
            receiver.await.unwrap_or_else(|_| {
                Err(PublishError::Aborted {
                    id,
                    reason: "the publisher's confirming task stopped".into(),
                })
            })
        })
    }
}
