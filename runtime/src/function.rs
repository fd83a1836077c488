//! The function contract: `handle(event, ctx) -> Outcome`. The runtime owns
//! fetching, concurrency, publishing, acks, dead letters, metrics and
//! shutdown; a function only decides what an event means.

use std::future::Future;
use std::time::Duration;

use cloudevents::{AttributesReader, Event};

use crate::event::output_id;

/// What the function decided about one input event.
#[derive(Debug)]
pub enum Outcome {
    /// Publish these events, then acknowledge the input. The input is only
    /// acked once the stream has stored every one of them.
    Emit(Vec<Emitted>),
    /// Nothing to emit; acknowledge the input.
    Done,
    /// Try again later (a dependency is down). After the consumer's
    /// `max_deliver` attempts the input goes to the dead-letter stream.
    RetryAfter { delay: Duration, reason: String },
    /// The input can never be processed: dead-letter it with the reason.
    Reject { reason: String },
}

impl Outcome {
    pub fn emit(event: Emitted) -> Outcome {
        Outcome::Emit(vec![event])
    }
    pub fn retry(delay: Duration, reason: impl Into<String>) -> Outcome {
        Outcome::RetryAfter {
            delay,
            reason: reason.into(),
        }
    }
    pub fn reject(reason: impl Into<String>) -> Outcome {
        Outcome::Reject {
            reason: reason.into(),
        }
    }
}

/// An event to publish and the subject it goes to. Over HTTP (Knative) the
/// subject is ignored: the event is the reply, or is posted to `K_SINK`.
#[derive(Debug, Clone)]
pub struct Emitted {
    pub subject: String,
    pub event: Event,
}

/// What the runtime knows about the delivery being handled.
#[derive(Debug, Clone)]
pub struct Context {
    /// Name of the function (and of its durable consumer).
    pub function: &'static str,
    /// 1 on first delivery; counts redeliveries.
    pub delivery: u32,
    /// Deliveries after which a retry becomes a dead letter (0 = unlimited).
    pub max_deliver: u32,
    /// Stream sequence of the input, when it came from JetStream.
    pub stream_sequence: Option<u64>,
    /// The subject the input was published on, when it came from JetStream
    /// (what its publisher's NATS permissions allowed: enrich checks a
    /// collector's event speaks for the node it was published from).
    pub subject: Option<String>,
}

impl Context {
    /// Deterministic id for the `index`-th output of `input`: a redelivered
    /// input produces the same ids, which the stream deduplicates.
    pub fn output_id(&self, input: &Event, index: usize) -> String {
        output_id(input.id(), self.function, index)
    }

    /// Whether this is the last delivery before dead-lettering.
    pub fn is_last_delivery(&self) -> bool {
        self.max_deliver > 0 && self.delivery >= self.max_deliver
    }
}

/// A Tidewatch function. One value serves both transports (JetStream pull
/// and HTTP) and is shared by all concurrent handlers, so it is `Sync`.
pub trait Function: Send + Sync + 'static {
    fn handle(&self, event: Event, ctx: &Context) -> impl Future<Output = Outcome> + Send;

    /// Whether events of this type can matter to the function. The JetStream
    /// transport acks events of other types without decoding them (the
    /// handler would have answered [`Outcome::Done`] anyway), which is most
    /// of the stream for a function that only cares about a few types.
    fn accepts(&self, event_type: &str) -> bool {
        let _ = event_type;
        true
    }
}

/// Run the handler the way both transports do: a child of the input's trace,
/// timed into `tidewatch_handler_seconds`, and with a panic caught and
/// returned as its message instead of taking the process down.
pub(crate) async fn invoke<F: Function>(
    function: &F,
    event: &Event,
    ctx: &Context,
    metrics: &crate::metrics::Metrics,
    span: &tracing::Span,
) -> Result<Outcome, String> {
    invoke_owned(function, event.clone(), ctx, metrics, span).await
}

/// [`invoke`] for a caller that no longer needs the event: no copy of it.
pub(crate) async fn invoke_owned<F: Function>(
    function: &F,
    event: Event,
    ctx: &Context,
    metrics: &crate::metrics::Metrics,
    span: &tracing::Span,
) -> Result<Outcome, String> {
    use futures::FutureExt;
    use tracing::Instrument;
    crate::telemetry::adopt_parent(span, &event);
    let started = std::time::Instant::now();
    let outcome = std::panic::AssertUnwindSafe(function.handle(event, ctx))
        .catch_unwind()
        .instrument(span.clone())
        .await;
    metrics
        .handler_seconds
        .observe(started.elapsed().as_secs_f64());
    outcome.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}
