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
use std::time::{Duration, Instant};

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
use crate::poison::Sweeper;
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
    /// Handlers running at once.
    pub concurrency: usize,
    /// How long one pull request waits for messages; bounds shutdown latency when idle.
    pub fetch_expires: Duration,
    /// Nak delay for the first retry when the handler names none; doubles per delivery.
    pub retry_backoff: Duration,
    /// Cap on the retry delay.
    pub max_retry_backoff: Duration,
    /// How long one input may be held and retried in-process while the
    /// handler answers [`Outcome::RetryAfter`] (a dependency is down) or
    /// its outputs cannot be stored. Held inputs are kept with progress
    /// acks and do not count as deliveries; past the budget the input is
    /// nak'ed, which does. So a dependency outage dead-letters nothing
    /// until it has lasted `max_deliver` budgets.
    pub dependency_budget: Duration,
    /// Longest one handler call may take; past it the call is abandoned
    /// and the delivery counts as failed. Kept under the consumer's
    /// `ack_wait` (half of it when that is shorter), so a slow handler is
    /// never redelivered to another replica while it still runs.
    pub handler_deadline: Duration,
    /// Counts the client's connections (see
    /// [`host::connect_with_events`](crate::host::connect_with_events)):
    /// after each reconnect the consumer's un-acked range is swept for
    /// messages the client cannot parse ([`crate::poison`]).
    pub connects: Option<tokio::sync::watch::Receiver<u64>>,
}

impl PullConfig {
    pub fn new(stream: impl Into<String>, consumer: impl Into<String>) -> PullConfig {
        PullConfig {
            stream: stream.into(),
            consumer: consumer.into(),
            batch: 128,
            concurrency: 64,
            fetch_expires: Duration::from_secs(1),
            retry_backoff: Duration::from_millis(500),
            max_retry_backoff: Duration::from_secs(60),
            dependency_budget: Duration::from_secs(15 * 60),
            handler_deadline: Duration::from_secs(60),
            connects: None,
        }
    }
    pub fn dependency_budget(mut self, budget: Duration) -> Self {
        self.dependency_budget = budget;
        self
    }
    pub fn handler_deadline(mut self, deadline: Duration) -> Self {
        self.handler_deadline = deadline;
        self
    }
    pub fn connects(mut self, connects: tokio::sync::watch::Receiver<u64>) -> Self {
        self.connects = Some(connects);
        self
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
    /// The consumer's ack_wait: held inputs get a progress ack well within it.
    ack_wait: Duration,
    /// The effective handler deadline (the config's, kept under ack_wait).
    deadline: Duration,
    /// Turns true at shutdown: held inputs are handed back at once.
    stopping: tokio::sync::watch::Receiver<bool>,
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
    let ack_wait = if info.config.ack_wait.is_zero() {
        Duration::from_secs(30)
    } else {
        info.config.ack_wait
    };
    let deadline = config
        .handler_deadline
        .min(ack_wait / 2)
        .max(Duration::from_millis(100));
    let metrics = publisher.metrics().clone();
    let dead_letters = DeadLetters::new(publisher.clone(), &config.stream, &config.consumer);
    let (stop_handlers, stopping) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        function,
        name,
        publisher,
        dead_letters,
        metrics,
        max_deliver,
        ack_wait,
        deadline,
        stopping,
        config: config.clone(),
    });
    drop(stream);

    let sweeper = Sweeper::new(
        client.clone(),
        &config.stream,
        &config.consumer,
        shared.dead_letters.clone(),
    );
    let (stop_advisories, advisories_stopped) = tokio::sync::watch::channel(false);
    let when_advisories_stop = || {
        let mut stopped = advisories_stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let advisories = tokio::spawn(shared.dead_letters.clone().follow_max_deliveries(
        client.clone(),
        sweeper.clone(),
        when_advisories_stop(),
    ));
    let sweeps = config
        .connects
        .clone()
        .map(|connects| tokio::spawn(sweeper.follow(connects, when_advisories_stop())));

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
                // No `max_bytes`: what a replica holds is already bounded by
                // the batch times the streams' max_msg_size (the server
                // refuses bigger messages at publish). And with max_bytes
                // an R3 consumer answers `409 Batch Completed` as soon as the
                // count is reached, which can overtake the last messages
                // (they wait for quorum); async-nats ends the batch on the
                // 409, so those deliveries were lost, and the same thing
                // happened on every redelivery until max_deliver (the
                // leader-kill fault test found it, with no fault at all).
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
    let _ = stop_handlers.send(true);
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
    let _ = stop_advisories.send(true);
    let _ = advisories.await;
    if let Some(sweeps) = sweeps {
        let _ = sweeps.await;
    }
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
        shared.metrics.uninterested.inc();
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
        subject: Some(message.subject.to_string()),
    };
    shared.metrics.events_in.inc();
    shared.metrics.in_flight.inc();
    let span = tracing::info_span!("handle", function = shared.name, id = %event.id(), ty = %event.ty(), seq = stream_sequence, delivery);
    // The handler takes the event; outputs only need its trace context.
    let carrier = trace_carrier(&event);
    let carrier = carrier.as_ref().unwrap_or(&NO_TRACE);
    let held_since = Instant::now();
    let mut event = Some(event);
    let mut attempt: u32 = 0;
    loop {
        // Retries re-decode the message: keeping a copy of every event for
        // the rare retry would cost the hot path a clone.
        let input = match event.take() {
            Some(e) => e,
            None => match from_nats(message.headers.as_ref(), &message.payload) {
                Ok(e) => e,
                Err(_) => break,
            },
        };
        let outcome = match tokio::time::timeout(
            shared.deadline,
            invoke_owned(&shared.function, input, &ctx, &shared.metrics, &span),
        )
        .await
        {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(panic)) => {
                retry(
                    shared,
                    &message,
                    origin,
                    &ctx,
                    Duration::ZERO,
                    &format!("handler panicked: {panic}"),
                )
                .await;
                break;
            }
            Err(_) => {
                shared.metrics.refuse("handler_deadline");
                let reason = format!("handler did not finish within {:?}", shared.deadline);
                retry(shared, &message, origin, &ctx, Duration::ZERO, &reason).await;
                break;
            }
        };
        let (delay, reason) = match outcome {
            Outcome::RetryAfter { delay, reason } => (delay, reason),
            Outcome::Emit(outputs) => {
                match publish_outputs(shared, carrier, outputs, &span).await {
                    Ok(count) => {
                        shared.metrics.events_out.inc_by(count);
                        ack(shared, &message, AckKind::Ack).await;
                        break;
                    }
                    Err((PublishErrorKind::Unavailable, reason)) => (Duration::ZERO, reason),
                    Err((_, reason)) => {
                        dead_letter(shared, &message, origin, Kind::OutputRefused, &reason).await;
                        break;
                    }
                }
            }
            Outcome::Done => {
                ack(shared, &message, AckKind::Ack).await;
                break;
            }
            Outcome::Reject { reason } => {
                dead_letter(shared, &message, origin, Kind::Rejected, &reason).await;
                break;
            }
        };
        // A dependency is down (or NATS cannot store the outputs): hold the
        // input and try again here, within the budget, rather than burning
        // one of its `max_deliver` deliveries per retry.
        let pause = delay
            .max(shared.config.backoff(attempt + 1))
            .min(shared.config.max_retry_backoff);
        if held_since.elapsed() + pause > shared.config.dependency_budget
            || !hold(shared, &message, pause).instrument(span.clone()).await
        {
            retry(shared, &message, origin, &ctx, delay, &reason).await;
            break;
        }
        attempt += 1;
        shared.metrics.held_retries.inc();
        tracing::debug!(seq = stream_sequence, attempt, %reason, "dependency unavailable; retrying in-process");
    }
    // The slot is held until the message is settled: releasing it when the
    // handler returns (settling in the background) was tried, and let the
    // pipeline take in more than it could finish at a steady rate.
    drop(slot);
    shared.metrics.in_flight.dec();
}

/// Keep `message` ours for `pause` (progress acks well within ack_wait);
/// `false` if the consumer is stopping, so the caller hands it back.
async fn hold<F: Function>(
    shared: &Shared<F>,
    message: &jetstream::Message,
    pause: Duration,
) -> bool {
    let mut stopping = shared.stopping.clone();
    if *stopping.borrow() {
        return false;
    }
    let until = tokio::time::Instant::now() + pause;
    let tick = shared.ack_wait / 3;
    loop {
        if let Err(e) = message.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "progress ack failed");
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until.min(now + tick)) => {}
            _ = stopping.wait_for(|s| *s) => return false,
        }
    }
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

/// Dead-letter, then terminate the message. While the dead-letter stream
/// cannot store it, hold the message (progress acks) and keep trying: on
/// its last delivery a nak would lose it, since the server will not
/// deliver it again. Only a shutdown hands it back (nak) before it is stored.
async fn dead_letter<F: Function>(
    shared: &Shared<F>,
    message: &jetstream::Message,
    origin: Origin<'_>,
    kind: Kind,
    reason: &str,
) {
    let delivery = u32::try_from(origin.deliveries).unwrap_or(u32::MAX);
    let mut attempt = 0;
    loop {
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
            Ok(()) => {
                ack(shared, message, AckKind::Term).await;
                return;
            }
            Err(e) => {
                attempt += 1;
                let pause = shared.config.backoff(attempt);
                tracing::error!(error = %e, seq = origin.stream_sequence, ?pause, "dead-letter stream unavailable; holding the message");
                if !hold(shared, message, pause).await {
                    shared.metrics.naks.inc();
                    let _ = message
                        .ack_with(AckKind::Nak(Some(shared.config.backoff(delivery))))
                        .await;
                    return;
                }
            }
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
