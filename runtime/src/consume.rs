//! Transport (a): a JetStream durable pull consumer.
//!
//! Fetches batches sized to the free handler slots, runs up to
//! `concurrency` handlers at once, and settles each message only after its
//! outputs are stored: ack on success, nak with backoff on retry, dead
//! letter + term on reject, malformed, oversized or exhausted input. On
//! shutdown it stops fetching, drains the batch it already asked for,
//! finishes in-flight handlers, flushes acks and returns: nothing is left
//! un-acked for a rolling update or a scale-down.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::RuntimeError;
use crate::binding::nats::{from_nats, peek_type, wire_size};
use crate::dead_letter::{DeadLetters, Kind, Origin};
use crate::event::{MAX_EVENT_BYTES, TRACEPARENT};
use crate::function::{Context, Emitted, Function, Outcome, invoke_owned};
use crate::metrics::{Metrics, Readiness};
use crate::publisher::{PublishErrorKind, Publisher};
use crate::telemetry;

/// Settings of the JetStream transport, builder style.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// JetStream stream name (`TIDEWATCH_RAW`).
    pub stream: String,
    /// Durable consumer name, shared by all replicas of the function.
    pub consumer: String,
    /// Most messages asked for in one pull request.
    pub batch: usize,
    /// Most bytes asked for in one pull request: bounds what a replica holds
    /// before handlers look at it, whatever the batch size.
    pub batch_bytes: usize,
    /// Handlers running at once.
    pub concurrency: usize,
    /// How long one pull request waits for messages; bounds shutdown latency when idle.
    pub fetch_expires: Duration,
    /// Nak delay for the first retry when the handler names none; doubles per delivery.
    pub retry_backoff: Duration,
    /// Cap on the retry delay.
    pub max_retry_backoff: Duration,
}

impl PullConfig {
    pub fn new(stream: impl Into<String>, consumer: impl Into<String>) -> PullConfig {
        PullConfig {
            stream: stream.into(),
            consumer: consumer.into(),
            batch: 128,
            batch_bytes: 16 * 1024 * 1024,
            concurrency: 64,
            fetch_expires: Duration::from_secs(1),
            retry_backoff: Duration::from_millis(500),
            max_retry_backoff: Duration::from_secs(60),
        }
    }
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }
    pub fn fetch_expires(mut self, expires: Duration) -> Self {
        self.fetch_expires = expires;
        self
    }
    pub fn retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.retry_backoff = first;
        self.max_retry_backoff = max;
        self
    }

    /// Delay before redelivery number `delivery + 1`.
    pub fn backoff(&self, delivery: u32) -> Duration {
        self.retry_backoff
            .saturating_mul(1u32 << delivery.saturating_sub(1).min(20))
            .min(self.max_retry_backoff)
    }
}

struct Shared<F> {
    function: F,
    name: &'static str,
    publisher: Publisher,
    dead_letters: DeadLetters,
    metrics: Metrics,
    max_deliver: u32,
    config: PullConfig,
}

/// Run `function` on the durable consumer until `shutdown` resolves, then drain.
pub async fn run<F: Function>(
    function: F,
    name: &'static str,
    client: async_nats::Client,
    publisher: Publisher,
    config: PullConfig,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RuntimeError> {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(&config.stream).await.map_err(|e| {
        RuntimeError::Setup(format!(
            "stream {} not found (run `tidewatch provision`): {e}",
            config.stream
        ))
    })?;
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&config.consumer).await.map_err(|e| {
            RuntimeError::Setup(format!(
                "consumer {} on stream {} not found (run `tidewatch provision`): {e}",
                config.consumer, config.stream
            ))
        })?;
    let info = consumer
        .info()
        .await
        .map_err(|e| RuntimeError::Setup(format!("consumer info: {e}")))?;
    let max_deliver = u32::try_from(info.config.max_deliver).unwrap_or(0);
    let metrics = publisher.metrics().clone();
    let dead_letters = DeadLetters::new(publisher.clone(), &config.stream, &config.consumer);
    let shared = Arc::new(Shared {
        function,
        name,
        publisher,
        dead_letters,
        metrics,
        max_deliver,
        config: config.clone(),
    });

    let (stop_advisories, advisories_stopped) = tokio::sync::oneshot::channel::<()>();
    let advisories = tokio::spawn(shared.dead_letters.clone().follow_max_deliveries(
        client.clone(),
        stream,
        async {
            let _ = advisories_stopped.await;
        },
    ));

    let semaphore = Arc::new(Semaphore::new(config.concurrency));
    // Pull in chunks of at least half the batch: every pull request is an
    // inbox subscription, a request and an unsubscribe, which costs the
    // server more than the messages it returns. Asking for whatever single
    // slot just freed up made that the dominant cost.
    let target = config.batch.min(config.concurrency).max(1);
    let refill = target.div_ceil(2);
    readiness.set(true);
    tracing::info!(function = name, stream = %config.stream, consumer = %config.consumer, max_deliver, "consuming");
    tokio::pin!(shutdown);
    'fetching: loop {
        let mut permits = tokio::select! {
            biased;
            _ = &mut shutdown => break 'fetching,
            permits = semaphore.clone().acquire_many_owned(refill as u32) => match permits {
                Ok(p) => p,
                Err(_) => break 'fetching,
            },
        };
        let extra = semaphore.available_permits().min(target - refill);
        if extra > 0
            && let Ok(more) = semaphore.clone().try_acquire_many_owned(extra as u32)
        {
            permits.merge(more);
        }
        let room = permits.num_permits();
        let batch = tokio::select! {
            biased;
            _ = &mut shutdown => break 'fetching,
            batch = consumer
                .batch()
                .max_messages(room)
                .max_bytes(config.batch_bytes)
                .expires(config.fetch_expires)
                .messages() => batch,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "pull request failed; retrying");
                drop(permits);
                tokio::select! {
                    _ = &mut shutdown => break 'fetching,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'fetching,
                }
            }
        };
        // Drain the whole batch even when shutdown arrives meanwhile: these
        // messages are already ours, and dropping them would leave them
        // un-acked until ack_wait. (Overlapping the next pull with this
        // drain was tried: more, smaller pulls cost the server more than the
        // round trip it saves.)
        drain(&shared, &semaphore, batch, permits).await;
    }
    readiness.set(false);
    tracing::info!(
        function = name,
        in_flight = config.concurrency - semaphore.available_permits(),
        "shutting down: finishing in-flight messages"
    );
    // Every handler holds a permit until its message is settled (a panic
    // drops it too).
    let _handlers = semaphore.acquire_many(config.concurrency as u32).await;
    // Acks are fire-and-forget publishes; make sure they left the process.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flushing acks on shutdown failed; unflushed messages will be redelivered");
    }
    let _ = stop_advisories.send(());
    let _ = advisories.await;
    tracing::info!(function = name, "drained");
    Ok(())
}

/// Hand every message of `batch` to a handler task, each with one of the
/// slots in `permits` (what the batch does not fill goes back).
async fn drain<F: Function>(
    shared: &Arc<Shared<F>>,
    semaphore: &Arc<Semaphore>,
    mut batch: jetstream::consumer::pull::Batch,
    mut permits: tokio::sync::OwnedSemaphorePermit,
) {
    while let Some(next) = batch.next().await {
        let message = match next {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "pull batch ended with an error");
                break;
            }
        };
        let permit = match permits.split(1) {
            Some(p) => p,
            // The server never sends more than asked; if it did, wait for a slot.
            None => match semaphore.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let shared = shared.clone();
        // Boxed: the handler's state machine is large, and an unboxed one
        // is copied into and around the task on every spawn. The permit is
        // the task's handle: shutdown waits for all of them.
        tokio::spawn(Box::pin(async move {
            handle_message(&shared, message, permit).await;
        }));
    }
}

async fn handle_message<F: Function>(
    shared: &Shared<F>,
    message: jetstream::Message,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let (stream_sequence, delivery) = match message.info() {
        Ok(info) => (info.stream_sequence, info.delivered),
        Err(e) => {
            tracing::warn!(error = %e, subject = %message.subject, "message without JetStream metadata; ignored");
            return;
        }
    };
    let origin = Origin {
        subject: message.subject.as_str(),
        stream_sequence,
        deliveries: delivery,
    };
    let size = wire_size(message.headers.as_ref(), &message.payload);
    if size > MAX_EVENT_BYTES {
        shared.metrics.refuse("oversized");
        let reason =
            format!("message is {size} bytes, over the {MAX_EVENT_BYTES}-byte event limit");
        dead_letter(shared, &message, origin, Kind::Oversized, &reason).await;
        return;
    }
    if let Some(ty) = peek_type(message.headers.as_ref())
        && !shared.function.accepts(&ty)
    {
        // Nothing to decode or hand over: the function ignores this type.
        shared.metrics.events_in.inc();
        ack(shared, &message, AckKind::Ack).await;
        return;
    }
    let event = match from_nats(message.headers.as_ref(), &message.payload) {
        Ok(e) => e,
        Err(e) => {
            shared.metrics.refuse("malformed");
            dead_letter(shared, &message, origin, Kind::Malformed, &e.to_string()).await;
            return;
        }
    };
    let ctx = Context {
        function: shared.name,
        delivery: u32::try_from(delivery).unwrap_or(u32::MAX),
        max_deliver: shared.max_deliver,
        stream_sequence: Some(stream_sequence),
    };
    shared.metrics.events_in.inc();
    shared.metrics.in_flight.inc();
    let span = tracing::info_span!("handle", function = shared.name, id = %event.id(), ty = %event.ty(), seq = stream_sequence, delivery);
    // The handler takes the event; outputs only need its trace context.
    let carrier = trace_carrier(&event);
    let carrier = carrier.as_ref().unwrap_or(&NO_TRACE);
    let outcome = invoke_owned(&shared.function, event, &ctx, &shared.metrics, &span)
        .await
        .unwrap_or_else(|panic| Outcome::RetryAfter {
            delay: Duration::ZERO,
            reason: format!("handler panicked: {panic}"),
        });
    settle(shared, &message, origin, &ctx, carrier, outcome, &span)
        .instrument(span.clone())
        .await;
    // The slot is held until the message is settled: releasing it when the
    // handler returns (settling in the background) was tried, and let the
    // pipeline take in more than it could finish at a steady rate.
    drop(slot);
    shared.metrics.in_flight.dec();
}

/// An event without trace context, for inputs that carry none. Built once:
/// `Event::default()` draws a random id and reads the clock.
static NO_TRACE: std::sync::LazyLock<Event> = std::sync::LazyLock::new(Event::default);

/// An event holding only the trace context of `event`, which is all
/// [`telemetry::stamp`] reads from an input; `None` if it has none.
fn trace_carrier(event: &Event) -> Option<Event> {
    let mut carrier = None;
    for name in [TRACEPARENT, "tracestate"] {
        if let Some(value) = event.extension(name) {
            carrier
                .get_or_insert_with(|| NO_TRACE.clone())
                .set_extension(name, value.clone());
        }
    }
    carrier
}

async fn settle<F: Function>(
    shared: &Shared<F>,
    message: &jetstream::Message,
    origin: Origin<'_>,
    ctx: &Context,
    input: &Event,
    outcome: Outcome,
    span: &tracing::Span,
) {
    match outcome {
        Outcome::Done => ack(shared, message, AckKind::Ack).await,
        Outcome::Emit(outputs) => match publish_outputs(shared, input, outputs, span).await {
            Ok(count) => {
                shared.metrics.events_out.inc_by(count);
                ack(shared, message, AckKind::Ack).await;
            }
            Err((PublishErrorKind::Unavailable, reason)) => {
                retry(shared, message, origin, ctx, Duration::ZERO, &reason).await
            }
            Err((_, reason)) => {
                dead_letter(shared, message, origin, Kind::OutputRefused, &reason).await
            }
        },
        Outcome::RetryAfter { delay, reason } => {
            retry(shared, message, origin, ctx, delay, &reason).await
        }
        Outcome::Reject { reason } => {
            dead_letter(shared, message, origin, Kind::Rejected, &reason).await
        }
    }
}

/// Publish every output, then wait for all their acks. Outputs keep their
/// ids on a retry, so those already stored are deduplicated.
async fn publish_outputs<F: Function>(
    shared: &Shared<F>,
    input: &Event,
    outputs: Vec<Emitted>,
    span: &tracing::Span,
) -> Result<u64, (PublishErrorKind, String)> {
    let mut confirmations = Vec::with_capacity(outputs.len());
    for Emitted { subject, mut event } in outputs {
        telemetry::stamp(span, input, &mut event);
        let confirmation = shared
            .publisher
            .send(subject, &event)
            .await
            .map_err(|e| (e.kind(), e.to_string()))?;
        confirmations.push(confirmation);
    }
    let count = confirmations.len() as u64;
    for result in futures::future::join_all(
        confirmations
            .into_iter()
            .map(std::future::IntoFuture::into_future),
    )
    .await
    {
        result.map_err(|e| (e.kind(), e.to_string()))?;
    }
    Ok(count)
}

async fn retry<F: Function>(
    shared: &Shared<F>,
    message: &jetstream::Message,
    origin: Origin<'_>,
    ctx: &Context,
    delay: Duration,
    reason: &str,
) {
    if ctx.is_last_delivery() {
        let reason = format!("gave up after {} deliveries: {reason}", ctx.delivery);
        dead_letter(shared, message, origin, Kind::Exhausted, &reason).await;
        return;
    }
    let delay = if delay.is_zero() {
        shared.config.backoff(ctx.delivery)
    } else {
        delay
    };
    tracing::debug!(seq = origin.stream_sequence, delivery = ctx.delivery, ?delay, %reason, "retrying later");
    shared.metrics.naks.inc();
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
    }
}

/// Dead-letter, then terminate the message. If the dead-letter stream
/// cannot store it, nak instead: it comes back rather than being lost.
async fn dead_letter<F: Function>(
    shared: &Shared<F>,
    message: &jetstream::Message,
    origin: Origin<'_>,
    kind: Kind,
    reason: &str,
) {
    let delivery = u32::try_from(origin.deliveries).unwrap_or(u32::MAX);
    match shared
        .dead_letters
        .send(
            message.headers.as_ref(),
            message.payload.clone(),
            origin,
            kind,
            reason,
        )
        .await
    {
        Ok(()) => ack(shared, message, AckKind::Term).await,
        Err(e) => {
            tracing::error!(error = %e, "dead-letter stream unavailable; will retry the message");
            shared.metrics.naks.inc();
            let _ = message
                .ack_with(AckKind::Nak(Some(shared.config.backoff(delivery))))
                .await;
        }
    }
}

async fn ack<F: Function>(shared: &Shared<F>, message: &jetstream::Message, kind: AckKind) {
    match message.ack_with(kind).await {
        Ok(()) => {
            shared.metrics.acks.inc();
        }
        Err(e) => {
            tracing::warn!(error = %e, "ack failed; the message will be redelivered and deduplicated")
        }
    };
}
