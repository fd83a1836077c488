//! The JetStream pull transport against a real server: outputs stored
//! before the input is acked, retries and their backoff, dead letters with
//! their reasons (from the handler and from the server's max-deliveries advisory),
//! poison messages, panics, a dead-letter stream outage, the publisher's
//! size limit, draining on shutdown, and the metrics all of that leaves.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::Info as ConsumerInfo, message::StreamMessage};
use bytes::Bytes;
use cloudevents::{AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV10};
use tidewatch_runtime::binding::nats::{MSG_ID_HEADER, from_nats, to_nats};
use tidewatch_runtime::consume::{self, PullConfig};
use tidewatch_runtime::dead_letter::{
    CONSUMER_HEADER, DELIVERIES_HEADER, KIND_HEADER, REASON_HEADER, SEQUENCE_HEADER, STREAM_HEADER,
    SUBJECT_HEADER,
};
use tidewatch_runtime::event::{MAX_EVENT_BYTES, output_id};
use tidewatch_runtime::function::{Context, Emitted, Function, Outcome};
use tidewatch_runtime::metrics::{Metrics, Readiness};
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{PublishError, PublishErrorKind, Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_runtime::{RuntimeError, cloudevents};
use tidewatch_testkit::{NatsServer, eventually};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The repository's functions' consumers (functions/*/function.toml), as the CLI provisions them.
fn consumers() -> Vec<topology::ConsumerSpec> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    tidewatch_runtime::spec::read_dir(&dir)
        .expect("functions/*/function.toml")
        .into_iter()
        .map(|f| f.consumer)
        .collect()
}

const FUNCTION: &str = "enrich";
const WAIT: Duration = Duration::from_secs(20);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Emit one derived event.
const OK: &str = "test.ok";
/// Retry on the first delivery, emit on the second.
const RETRY_ONCE: &str = "test.retry-once";
/// Retry after [`RETRY_DELAY`] on the first two deliveries, emit on the third.
const RETRY_LATER: &str = "test.retry-later";
const RETRY_DELAY: Duration = Duration::from_secs(2);
const REJECT: &str = "test.reject";
const ALWAYS_RETRY: &str = "test.always-retry";
/// "Dependency down" for [`OUTAGE`] after the first attempt, then emit.
const FLAKY: &str = "test.flaky";
const OUTAGE: Duration = Duration::from_secs(3);
const PANIC: &str = "test.panic";
/// Sleep 200 ms, then emit; the `stop_after`-th one triggers shutdown.
const SLOW: &str = "test.slow";
/// Never settle (like a hung or crashed process).
const HANG: &str = "test.hang";
/// Emit two events; the second goes to a subject no stream stores.
const PARTIAL: &str = "test.partial";
/// Emit an event over the size limit.
const EMIT_TOO_BIG: &str = "test.emit-too-big";
/// A subject outside every stream.
const NOWHERE: &str = "nowhere.test";

fn raw_subject() -> String {
    subjects::raw("test", "node-1")
}

fn output_subject() -> String {
    subjects::enriched("test", "node-1", "dev.tidewatch.test.event")
}

/// Deliveries seen per input id, in order, with when the handler got each.
type Seen = Arc<Mutex<HashMap<String, Vec<(u32, Instant)>>>>;

struct TestFunction {
    seen: Seen,
    stop: Arc<Notify>,
    /// Trigger shutdown when this many SLOW events have been handled.
    stop_after: Option<usize>,
}

fn derived(input: &Event, ctx: &Context) -> Emitted {
    let mut builder = EventBuilderV10::new()
        .id(ctx.output_id(input, 0))
        .source(topology::source(FUNCTION, "node-1"))
        .ty("test.enriched");
    if let Some(subject) = input.subject() {
        builder = builder.subject(subject);
    }
    if let Some(Data::Binary(data)) = input.data() {
        builder = builder.data("application/octet-stream", data.clone());
    }
    Emitted {
        subject: output_subject(),
        event: builder.build().expect("derived event"),
    }
}

impl Function for TestFunction {
    async fn handle(&self, event: Event, ctx: &Context) -> Outcome {
        let (handled, first_seen) = {
            let mut seen = self.seen.lock().expect("seen lock");
            let attempts = seen.entry(event.id().to_string()).or_default();
            attempts.push((ctx.delivery, Instant::now()));
            let first = attempts[0].1;
            (seen.len(), first)
        };
        match event.ty() {
            OK => Outcome::emit(derived(&event, ctx)),
            RETRY_ONCE if ctx.delivery == 1 => Outcome::retry(Duration::from_millis(50), "not yet"),
            RETRY_ONCE => Outcome::emit(derived(&event, ctx)),
            RETRY_LATER if ctx.delivery < 3 => Outcome::retry(RETRY_DELAY, "not yet"),
            RETRY_LATER => Outcome::emit(derived(&event, ctx)),
            REJECT => Outcome::reject(format!("no pod for {}: \"bad\" input", event.id())),
            ALWAYS_RETRY => Outcome::retry(Duration::ZERO, "dependency down"),
            FLAKY if first_seen.elapsed() < OUTAGE => {
                Outcome::retry(Duration::from_millis(200), "dependency down")
            }
            FLAKY => Outcome::emit(derived(&event, ctx)),
            PANIC => panic!("boom in handler for {}", event.id()),
            SLOW => {
                if self.stop_after == Some(handled) {
                    self.stop.notify_one();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                Outcome::emit(derived(&event, ctx))
            }
            PARTIAL => {
                let mut second = derived(&event, ctx);
                second.subject = NOWHERE.to_string();
                second.event.set_id(ctx.output_id(&event, 1));
                Outcome::Emit(vec![derived(&event, ctx), second])
            }
            EMIT_TOO_BIG => {
                let mut big = derived(&event, ctx);
                big.event
                    .set_data("application/octet-stream", vec![0u8; MAX_EVENT_BYTES + 1]);
                Outcome::emit(big)
            }
            HANG => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Outcome::Done
            }
            _ => Outcome::Done,
        }
    }
}

/// A provisioned server with the consumer loop running in a task.
struct Pipeline {
    _server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Test-side publisher, with its own metrics.
    producer: Publisher,
    /// The runtime's metrics.
    metrics: Metrics,
    readiness: Readiness,
    seen: Seen,
    stop: Arc<Notify>,
    task: Option<JoinHandle<Result<(), RuntimeError>>>,
}

/// How a test pipeline is set up.
struct Setup {
    configure: fn(PullConfig) -> PullConfig,
    provision: ProvisionOptions,
    publisher: PublisherConfig,
    stop_after: Option<usize>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            // No in-process holding: most tests here are about what a nak,
            // a redelivery and max_deliver do. The holding tests set a budget.
            configure: |c| c.dependency_budget(Duration::ZERO),
            provision: ProvisionOptions::default()
                .ack_wait(Duration::from_secs(2))
                .max_deliver(3),
            publisher: PublisherConfig::default(),
            stop_after: None,
        }
    }
}

impl Pipeline {
    async fn start() -> Pipeline {
        Self::start_with(Setup::default()).await
    }

    async fn start_with(setup: Setup) -> Pipeline {
        let server = NatsServer::start().await;
        // Connected as a function host is: its reconnects trigger the poison sweep.
        let (client, connects) =
            tidewatch_runtime::host::connect_with_events(&server.client_url(), FUNCTION)
                .await
                .expect("connect");
        // The test's own connection: what a poison message does to the
        // function's must not blind the test.
        let test_client = server.connect().await;
        let js = jetstream::new(test_client.clone());
        provision(&js, &consumers(), &setup.provision)
            .await
            .expect("provision");
        let metrics = Metrics::new(FUNCTION);
        let readiness = Readiness::default();
        let seen = Seen::default();
        let stop = Arc::new(Notify::new());
        let function = TestFunction {
            seen: seen.clone(),
            stop: stop.clone(),
            stop_after: setup.stop_after,
        };
        let publisher = Publisher::new(client.clone(), setup.publisher, metrics.clone());
        let config = (setup.configure)(
            PullConfig::new(topology::RAW.name, FUNCTION)
                .retry_backoff(Duration::from_millis(100), Duration::from_millis(500))
                .connects(connects),
        );
        let stopped = stop.clone();
        let task = tokio::spawn(consume::run(
            function,
            FUNCTION,
            client.clone(),
            publisher,
            config,
            readiness.clone(),
            async move {
                stopped.notified().await;
            },
        ));
        let ready = readiness.clone();
        eventually("the consumer loop to be ready", WAIT, || {
            let ready = ready.get();
            async move { ready.then_some(()) }
        })
        .await;
        let producer = Publisher::new(
            test_client.clone(),
            PublisherConfig::default(),
            Metrics::new("producer"),
        );
        Pipeline {
            _server: server,
            client: test_client,
            js,
            producer,
            metrics,
            readiness,
            seen,
            stop,
            task: Some(task),
        }
    }

    /// Publish a test event of type `ty` with id `id`; returns the event and its stream sequence.
    async fn publish(&self, id: &str, ty: &str) -> (Event, u64) {
        let event = test_event(id, ty);
        let ack = self
            .producer
            .publish(raw_subject(), &event)
            .await
            .expect("publish input");
        (event, ack.sequence)
    }

    async fn consumer(&self) -> ConsumerInfo {
        let stream = self
            .js
            .get_stream(topology::RAW.name)
            .await
            .expect("raw stream");
        stream.consumer_info(FUNCTION).await.expect("consumer info")
    }

    /// Wait until the consumer has nothing pending and nothing un-acked.
    async fn settled(&self) -> ConsumerInfo {
        eventually(
            "the consumer to have nothing pending or un-acked",
            WAIT,
            || async {
                // The consumer's pending count catches up with the stream
                // asynchronously: also wait for every stored message to be
                // settled (acked or terminated) up to the last one.
                let last = self
                    .js
                    .get_stream(topology::RAW.name)
                    .await
                    .ok()?
                    .get_info()
                    .await
                    .ok()?
                    .state
                    .last_sequence;
                let info = self.consumer().await;
                (info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.ack_floor.stream_sequence >= last)
                    .then_some(info)
            },
        )
        .await
    }

    fn deliveries(&self, id: &str) -> Vec<u32> {
        self.seen
            .lock()
            .expect("seen lock")
            .get(id)
            .map(|d| d.iter().map(|(n, _)| *n).collect())
            .unwrap_or_default()
    }

    /// Time between consecutive deliveries of `id` to the handler.
    fn redelivery_gaps(&self, id: &str) -> Vec<Duration> {
        let seen = self.seen.lock().expect("seen lock");
        let times: Vec<Instant> = seen
            .get(id)
            .map(|d| d.iter().map(|(_, t)| *t).collect())
            .unwrap_or_default();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Every message in `stream`, in order.
    async fn messages(&self, stream: &str) -> Vec<StreamMessage> {
        let mut stream = self.js.get_stream(stream).await.expect("stream");
        let state = stream.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push(m);
            }
        }
        out
    }

    /// Wait until `stream` holds a message whose `Nats-Msg-Id` is `id`.
    async fn stored(&self, stream: &str, what: &str, id: &str) -> StreamMessage {
        eventually(what, WAIT, || async {
            self.messages(stream)
                .await
                .into_iter()
                .find(|m| header(&m.headers, MSG_ID_HEADER).as_deref() == Some(id))
        })
        .await
    }

    /// Wait for the dead letter of input `seq`.
    async fn dead_letter(&self, seq: u64) -> StreamMessage {
        let what = format!("input {seq} to be dead-lettered");
        self.stored(
            topology::DEAD_LETTER.name,
            &what,
            &format!("dlq:{}:{FUNCTION}:{seq}", topology::RAW.name),
        )
        .await
    }

    /// Trigger shutdown and wait for `run` to return.
    async fn shutdown(&mut self) {
        self.stop.notify_one();
        self.join().await;
    }

    async fn join(&mut self) {
        let task = self.task.take().expect("running");
        let result = tokio::time::timeout(WAIT, task)
            .await
            .expect("consume::run returns after shutdown");
        result
            .expect("consume::run did not panic")
            .expect("consume::run ends cleanly");
        assert!(!self.readiness.get(), "not ready once shut down");
    }
}

fn test_event(id: &str, ty: &str) -> Event {
    let mut event = EventBuilderV10::new()
        .id(id)
        .source(topology::source("test", "node-1"))
        .ty(ty)
        .subject(format!("pod/default/{id} \"x\" ü"))
        .data("application/octet-stream", id.as_bytes().to_vec())
        .build()
        .expect("test event");
    event.set_extension("traceparent", TRACEPARENT);
    event
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_string())
}

/// Check the `Tidewatch-Dlq-*` headers of a dead letter.
fn assert_dead_letter(dlq: &StreamMessage, kind: &str, seq: u64, reason_contains: &str) {
    assert_eq!(dlq.subject.as_str(), subjects::dead_letter(FUNCTION));
    let h = &dlq.headers;
    assert_eq!(header(h, KIND_HEADER).as_deref(), Some(kind), "{h:?}");
    let reason = header(h, REASON_HEADER).unwrap_or_default();
    assert!(
        reason.contains(reason_contains),
        "reason {reason:?} should contain {reason_contains:?}"
    );
    assert_eq!(
        header(h, STREAM_HEADER).as_deref(),
        Some(topology::RAW.name)
    );
    assert_eq!(header(h, SEQUENCE_HEADER), Some(seq.to_string()));
    assert_eq!(header(h, SUBJECT_HEADER), Some(raw_subject()));
    assert_eq!(header(h, CONSUMER_HEADER).as_deref(), Some(FUNCTION));
}

/// Value of the counter `name` (all label sets whose labels include `label`).
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn success_stores_the_output_then_acks_the_input() {
    let mut pipeline = Pipeline::start().await;
    let (input, _) = pipeline.publish("ok-1", OK).await;

    let info = pipeline.settled().await;
    assert_eq!(info.ack_floor.stream_sequence, 1, "the input was acked");
    let expected_id = output_id(input.id(), FUNCTION, 0);
    let stored = pipeline
        .stored(
            topology::ENRICHED.name,
            "the output to be stored",
            &expected_id,
        )
        .await;
    assert_eq!(stored.subject.as_str(), output_subject());
    let output = from_nats(Some(&stored.headers), &stored.payload).expect("output is a CloudEvent");
    assert_eq!(output.id(), expected_id);
    assert_eq!(output.ty(), "test.enriched");
    assert_eq!(output.subject(), input.subject());
    assert_eq!(output.data(), input.data());
    assert_eq!(
        output
            .extension("traceparent")
            .map(|v| v.to_string())
            .as_deref(),
        Some(TRACEPARENT),
        "the output carries the input's trace context"
    );
    assert_eq!(pipeline.deliveries("ok-1"), vec![1]);
    assert_eq!(pipeline.messages(topology::DEAD_LETTER.name).await.len(), 0);
    pipeline.shutdown().await;
}

#[tokio::test]
async fn a_retry_is_redelivered_then_acked() {
    let mut pipeline = Pipeline::start().await;
    let (input, _) = pipeline.publish("retry-1", RETRY_ONCE).await;

    pipeline
        .stored(
            topology::ENRICHED.name,
            "the retried input's output",
            &output_id(input.id(), FUNCTION, 0),
        )
        .await;
    let info = pipeline.settled().await;
    assert_eq!(
        pipeline.deliveries("retry-1"),
        vec![1, 2],
        "the handler saw it twice"
    );
    assert_eq!(info.ack_floor.stream_sequence, 1);
    assert_eq!(
        pipeline.messages(topology::DEAD_LETTER.name).await.len(),
        0,
        "a retry that succeeds is not dead-lettered"
    );
    assert_eq!(pipeline.metrics.naks.get(), 1);
    pipeline.shutdown().await;
}

/// A retry is a nak with a delay: the handler's own, else the runtime's
/// doubling backoff. Only lower bounds are tight (the server never redelivers
/// early; a busy machine only makes gaps longer): a plain nak redelivers
/// within milliseconds, and a lost nak only after the 60 s ack wait.
#[tokio::test]
async fn retries_are_redelivered_after_their_backoff() {
    const FIRST: Duration = Duration::from_millis(400);
    const SLACK: Duration = Duration::from_secs(15);
    let mut pipeline = Pipeline::start_with(Setup {
        configure: |c| {
            c.retry_backoff(FIRST, Duration::from_secs(10))
                .dependency_budget(Duration::ZERO)
        },
        provision: ProvisionOptions::default()
            .ack_wait(Duration::from_secs(60))
            .max_deliver(4),
        ..Setup::default()
    })
    .await;
    let (later, _) = pipeline.publish("later-1", RETRY_LATER).await;
    let (_, seq) = pipeline.publish("backoff-1", ALWAYS_RETRY).await;
    pipeline
        .stored(
            topology::ENRICHED.name,
            "the output after two delayed retries",
            &output_id(later.id(), FUNCTION, 0),
        )
        .await;
    pipeline.dead_letter(seq).await;
    pipeline.settled().await;

    assert_eq!(pipeline.deliveries("later-1"), vec![1, 2, 3]);
    let gaps = pipeline.redelivery_gaps("later-1");
    assert_eq!(gaps.len(), 2);
    for gap in &gaps {
        assert!(
            *gap >= RETRY_DELAY && *gap < RETRY_DELAY + SLACK,
            "redelivered after the handler's {RETRY_DELAY:?}: {gaps:?}"
        );
    }
    // Duration::ZERO: 400 ms, 800 ms, 1.6 s (doubling per delivery).
    assert_eq!(pipeline.deliveries("backoff-1"), vec![1, 2, 3, 4]);
    let gaps = pipeline.redelivery_gaps("backoff-1");
    let expected = [FIRST, FIRST * 2, FIRST * 4];
    assert_eq!(gaps.len(), expected.len());
    for (gap, backoff) in gaps.iter().zip(expected) {
        assert!(
            *gap >= backoff && *gap < backoff + SLACK,
            "redelivered after the runtime's backoff {expected:?}: {gaps:?}"
        );
    }
    pipeline.shutdown().await;
}

#[tokio::test]
async fn a_rejected_event_is_dead_lettered_with_the_reason() {
    let mut pipeline = Pipeline::start().await;
    let (input, seq) = pipeline.publish("reject-1", REJECT).await;

    let dlq = pipeline.dead_letter(seq).await;
    assert_dead_letter(&dlq, "rejected", seq, "no pod for reject-1");
    assert_eq!(
        header(&dlq.headers, DELIVERIES_HEADER).as_deref(),
        Some("1")
    );
    // The original ce- headers and payload travel unchanged, so it can be replayed.
    let (original_headers, original_payload) = to_nats(&input);
    for (name, values) in original_headers.iter() {
        let name: &str = name.as_ref();
        if name.starts_with("ce-") {
            assert_eq!(
                dlq.headers.get(name),
                values.last(),
                "header {name} is kept"
            );
        }
    }
    assert_eq!(dlq.payload, original_payload);
    assert_eq!(
        from_nats(Some(&dlq.headers), &dlq.payload).expect("still a CloudEvent"),
        input
    );

    pipeline.settled().await;
    assert_eq!(
        pipeline.deliveries("reject-1"),
        vec![1],
        "a reject is not retried"
    );
    assert_eq!(pipeline.messages(topology::ENRICHED.name).await.len(), 0);
    assert_eq!(pipeline.messages(topology::DEAD_LETTER.name).await.len(), 1);
    pipeline.shutdown().await;
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered_and_the_pipeline_keeps_flowing() {
    let mut pipeline = Pipeline::start().await;
    let (_, seq) = pipeline.publish("always-retry-1", ALWAYS_RETRY).await;
    // Published while the first one is being retried.
    let (during, _) = pipeline.publish("ok-during", OK).await;

    let dlq = pipeline.dead_letter(seq).await;
    assert_dead_letter(&dlq, "exhausted", seq, "dependency down");
    assert_eq!(
        header(&dlq.headers, DELIVERIES_HEADER).as_deref(),
        Some("3")
    );
    assert_eq!(
        pipeline.deliveries("always-retry-1"),
        vec![1, 2, 3],
        "max_deliver deliveries, then dead letter"
    );

    // Published after it was dead-lettered.
    let (after, _) = pipeline.publish("ok-after", OK).await;
    for input in [&during, &after] {
        pipeline
            .stored(
                topology::ENRICHED.name,
                "outputs of later events",
                &output_id(input.id(), FUNCTION, 0),
            )
            .await;
    }
    pipeline.settled().await;
    assert_eq!(
        pipeline.deliveries("always-retry-1"),
        vec![1, 2, 3],
        "not delivered again after dead-lettering"
    );
    assert_eq!(
        pipeline.messages(topology::DEAD_LETTER.name).await.len(),
        1,
        "dead-lettered once"
    );
    pipeline.shutdown().await;
}

#[tokio::test]
async fn a_panicking_handler_is_retried_then_dead_lettered() {
    let mut pipeline = Pipeline::start().await;
    let (_, seq) = pipeline.publish("panic-1", PANIC).await;

    let dlq = pipeline.dead_letter(seq).await;
    assert_dead_letter(
        &dlq,
        "exhausted",
        seq,
        "handler panicked: boom in handler for panic-1",
    );
    assert_eq!(pipeline.deliveries("panic-1"), vec![1, 2, 3]);

    // The consumer loop survived the panics.
    let (next, _) = pipeline.publish("ok-after-panic", OK).await;
    pipeline
        .stored(
            topology::ENRICHED.name,
            "output after the panics",
            &output_id(next.id(), FUNCTION, 0),
        )
        .await;
    pipeline.settled().await;
    assert!(pipeline.readiness.get());
    pipeline.shutdown().await;
}

#[tokio::test]
async fn malformed_and_oversized_messages_are_dead_lettered() {
    let mut pipeline = Pipeline::start().await;
    let raw = pipeline
        .js
        .get_stream(topology::RAW.name)
        .await
        .expect("raw");

    // A plain message, no ce- headers.
    pipeline
        .client
        .publish(raw_subject(), Bytes::from_static(b"just some bytes"))
        .await
        .expect("publish plain");
    // A binary-mode message missing ce-type.
    let mut no_type = HeaderMap::new();
    no_type.insert("ce-specversion", "1.0");
    no_type.insert("ce-id", "no-type-1");
    no_type.insert("ce-source", "/s");
    pipeline
        .client
        .publish_with_headers(raw_subject(), no_type, Bytes::new())
        .await
        .expect("publish no type");
    // A valid event over the size limit, published around the Publisher's
    // check into a stream without the server-side limit (one provisioned by
    // an older Tidewatch): the consumer's own check still dead-letters it.
    let mut unlimited = raw.cached_info().config.clone();
    unlimited.max_message_size = -1;
    pipeline
        .js
        .update_stream(unlimited)
        .await
        .expect("widen the raw stream");
    let big = EventBuilderV10::new()
        .id("big-1")
        .source("/s")
        .ty(OK)
        .data("application/octet-stream", vec![7u8; 70 * 1024])
        .build()
        .expect("big event");
    let (big_headers, big_payload) = to_nats(&big);
    pipeline
        .client
        .publish_with_headers(raw_subject(), big_headers, big_payload.clone())
        .await
        .expect("publish big");
    pipeline.client.flush().await.expect("flush");

    eventually("three raw messages", WAIT, || {
        let mut raw = raw.clone();
        async move { (raw.info().await.ok()?.state.messages == 3).then_some(()) }
    })
    .await;

    let plain = pipeline.dead_letter(1).await;
    assert_dead_letter(&plain, "malformed", 1, "not a CloudEvent");
    assert_eq!(plain.payload, Bytes::from_static(b"just some bytes"));
    let no_type = pipeline.dead_letter(2).await;
    assert_dead_letter(&no_type, "malformed", 2, "missing required attribute type");
    let oversized = pipeline.dead_letter(3).await;
    assert_dead_letter(
        &oversized,
        "oversized",
        3,
        &format!("over the {MAX_EVENT_BYTES}-byte event limit"),
    );
    assert_eq!(
        oversized.payload, big_payload,
        "the dead letter keeps the whole original"
    );

    pipeline.settled().await;
    assert!(
        pipeline.seen.lock().expect("seen").is_empty(),
        "none of them reached the handler"
    );
    assert_eq!(
        pipeline
            .metrics
            .refused
            .get_or_create(&tidewatch_runtime::metrics::Reason {
                reason: "malformed"
            })
            .get(),
        2
    );
    assert_eq!(
        pipeline
            .metrics
            .refused
            .get_or_create(&tidewatch_runtime::metrics::Reason {
                reason: "oversized"
            })
            .get(),
        1
    );
    pipeline.shutdown().await;
}

#[tokio::test]
async fn the_publisher_refuses_oversized_events() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect("provision");
    let metrics = Metrics::new("producer");
    let publisher = Publisher::new(client, PublisherConfig::default(), metrics.clone());

    let big = EventBuilderV10::new()
        .id("too-big-1")
        .source("/s")
        .ty(OK)
        .data("application/octet-stream", vec![1u8; 65 * 1024])
        .build()
        .expect("event");
    let err = match publisher.send(raw_subject(), &big).await {
        Err(e) => e,
        Ok(_) => panic!("a 65 KiB event must be refused"),
    };
    assert_eq!(err.kind(), PublishErrorKind::TooLarge);
    assert!(!err.is_retryable());
    let PublishError::TooLarge { id, size, limit } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(id, "too-big-1");
    assert_eq!(*limit, MAX_EVENT_BYTES);
    assert!(*size > 65 * 1024, "size counts data and headers: {size}");
    let message = err.to_string();
    assert!(
        message.contains(&size.to_string()) && message.contains("65536"),
        "names both sizes: {message}"
    );
    assert!(message.contains("too-big-1"), "{message}");

    let mut raw = js.get_stream(topology::RAW.name).await.expect("raw");
    assert_eq!(
        raw.info().await.expect("info").state.messages,
        0,
        "nothing was published"
    );
    assert_eq!(
        metrics
            .refused
            .get_or_create(&tidewatch_runtime::metrics::Reason {
                reason: "oversized"
            })
            .get(),
        1
    );

    // Just under the limit is fine.
    let (headers, _) = to_nats(&big);
    let header_bytes = tidewatch_runtime::binding::nats::wire_size(Some(&headers), &[]);
    let fits = EventBuilderV10::new()
        .id("too-big-1")
        .source("/s")
        .ty(OK)
        .data(
            "application/octet-stream",
            vec![1u8; MAX_EVENT_BYTES - header_bytes],
        )
        .build()
        .expect("event");
    publisher
        .publish(raw_subject(), &fits)
        .await
        .expect("an event of exactly the limit is accepted");
    assert_eq!(raw.info().await.expect("info").state.messages, 1);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_and_leaves_nothing_unacked() {
    const TOTAL: usize = 50;
    const STOP_AFTER: usize = 10;
    let mut pipeline = Pipeline::start_with(Setup {
        configure: |c| c.concurrency(4).batch(4),
        stop_after: Some(STOP_AFTER),
        ..Setup::default()
    })
    .await;
    let mut confirmations = Vec::new();
    for i in 0..TOTAL {
        let event = test_event(&format!("slow-{i:02}"), SLOW);
        confirmations.push(
            pipeline
                .producer
                .send(raw_subject(), &event)
                .await
                .expect("send"),
        );
    }
    for confirmation in confirmations {
        confirmation.await.expect("stored");
    }

    // The 10th handler triggers shutdown; run() must drain and return.
    pipeline.join().await;

    let info = pipeline.consumer().await;
    assert_eq!(info.num_ack_pending, 0, "nothing left un-acked: {info:?}");
    let handled = pipeline.seen.lock().expect("seen").clone();
    assert!(handled.len() >= STOP_AFTER, "{} handled", handled.len());
    assert!(info.num_pending > 0, "it stopped fetching: {info:?}");
    assert_eq!(
        handled.len() as u64 + info.num_pending,
        TOTAL as u64,
        "every delivered message was handled: {info:?}"
    );
    assert!(
        handled.values().all(|d| d.iter().map(|(n, _)| *n).eq([1])),
        "nothing was redelivered: {handled:?}"
    );
    assert_eq!(
        info.ack_floor.stream_sequence, info.delivered.stream_sequence,
        "{info:?}"
    );

    // Every acked input has its output stored.
    let acked: Vec<StreamMessage> = pipeline
        .messages(topology::RAW.name)
        .await
        .into_iter()
        .filter(|m| m.sequence <= info.ack_floor.stream_sequence)
        .collect();
    assert_eq!(acked.len(), handled.len());
    let outputs: BTreeSet<String> = pipeline
        .messages(topology::ENRICHED.name)
        .await
        .iter()
        .filter_map(|m| header(&m.headers, MSG_ID_HEADER))
        .collect();
    assert_eq!(outputs.len(), handled.len(), "one output per handled input");
    for message in &acked {
        let input = from_nats(Some(&message.headers), &message.payload).expect("input");
        assert!(handled.contains_key(input.id()));
        assert!(
            outputs.contains(&output_id(input.id(), FUNCTION, 0)),
            "acked input {} has no output",
            input.id()
        );
    }
    assert_eq!(pipeline.metrics.acks.get(), handled.len() as u64);
    assert_eq!(pipeline.metrics.in_flight.get(), 0);
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let mut pipeline = Pipeline::start().await;
    for i in 0..3 {
        pipeline.publish(&format!("m-ok-{i}"), OK).await;
    }
    pipeline.publish("m-retry", RETRY_ONCE).await;
    let (_, reject_seq) = pipeline.publish("m-reject", REJECT).await;
    let (_, exhausted_seq) = pipeline.publish("m-exhausted", ALWAYS_RETRY).await;
    pipeline
        .client
        .publish(raw_subject(), Bytes::from_static(b"not an event"))
        .await
        .expect("publish");
    pipeline.client.flush().await.expect("flush");

    pipeline.dead_letter(reject_seq).await;
    pipeline.dead_letter(exhausted_seq).await;
    pipeline.dead_letter(exhausted_seq + 1).await;
    pipeline.settled().await;

    // events_in: 3 ok + 2 retry-once + 1 reject + 3 exhausted (malformed never reaches the function).
    // acks: 3 ok + retry-once + reject (term) + exhausted (term) + malformed (term).
    // naks: 1 retry-once + 2 exhausted.
    let expected: &[(&str, &str, f64)] = &[
        ("tidewatch_events_in_total", "component=\"enrich\"", 9.0),
        ("tidewatch_events_out_total", "component=\"enrich\"", 4.0),
        ("tidewatch_acks_total", "component=\"enrich\"", 7.0),
        ("tidewatch_naks_total", "component=\"enrich\"", 3.0),
        ("tidewatch_dead_lettered_total", "reason=\"rejected\"", 1.0),
        ("tidewatch_dead_lettered_total", "reason=\"exhausted\"", 1.0),
        ("tidewatch_dead_lettered_total", "reason=\"malformed\"", 1.0),
        ("tidewatch_refused_total", "reason=\"malformed\"", 1.0),
        // 4 outputs + 3 dead letters.
        ("tidewatch_published_total", "component=\"enrich\"", 7.0),
    ];
    let metrics = pipeline.metrics.clone();
    // Counters move right after the ack leaves, so allow them a moment to catch up.
    eventually("the counters to reach their expected values", WAIT, || {
        let text = metrics.encode();
        async move {
            expected
                .iter()
                .all(|(name, label, value)| counter(&text, name, label) == *value)
                .then_some(())
        }
    })
    .await;
    let text = metrics.encode();
    for (name, label, value) in expected {
        assert_eq!(
            counter(&text, name, label),
            *value,
            "{name}{{{label}}}\n{text}"
        );
    }
    assert!(text.contains("tidewatch_handler_seconds"), "{text}");
    pipeline.shutdown().await;
}

/// On its last delivery a nak would lose the message (the server will not
/// deliver it again): while the dead-letter stream is down the input is
/// held with progress acks, past ack_wait, and stored once it is back.
#[tokio::test]
async fn a_dead_letter_stream_outage_on_the_last_delivery_loses_nothing() {
    let mut pipeline = Pipeline::start_with(Setup {
        provision: ProvisionOptions::default()
            .ack_wait(Duration::from_secs(1))
            .max_deliver(1),
        publisher: PublisherConfig::default()
            .max_attempts(2)
            .retry_backoff(Duration::from_millis(20)),
        ..Setup::default()
    })
    .await;
    pipeline
        .js
        .delete_stream(topology::DEAD_LETTER.name)
        .await
        .expect("delete the DLQ stream");
    let (input, seq) = pipeline.publish("reject-outage", REJECT).await;

    // Three ack waits with nowhere to put the dead letter: held all along
    // (checked every 100 ms), never redelivered.
    eventually("the input to be handled", WAIT, || async {
        (!pipeline.deliveries("reject-outage").is_empty()).then_some(())
    })
    .await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let info = pipeline.consumer().await;
        assert_eq!(
            info.ack_floor.stream_sequence, 0,
            "the input was neither acked nor terminated: {info:?}"
        );
        assert_eq!(info.num_ack_pending, 1, "still held: {info:?}");
        assert_eq!(
            pipeline.deliveries("reject-outage"),
            vec![1],
            "held, not redelivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let report = provision(
        &pipeline.js,
        &consumers(),
        &ProvisionOptions::default()
            .ack_wait(Duration::from_secs(1))
            .max_deliver(1),
    )
    .await
    .expect("provision again");
    assert!(!report.is_noop(), "{report}");
    let dlq = pipeline.dead_letter(seq).await;
    assert_dead_letter(&dlq, "rejected", seq, "no pod for reject-outage");
    assert_eq!(
        from_nats(Some(&dlq.headers), &dlq.payload).expect("event"),
        input
    );
    pipeline.settled().await;
    assert_eq!(pipeline.messages(topology::DEAD_LETTER.name).await.len(), 1);
    pipeline.shutdown().await;
}

/// A dependency outage is retried in-process, with progress acks: no
/// delivery is burned, however many ack waits it lasts (within the budget).
#[tokio::test]
async fn a_dependency_outage_is_held_without_burning_deliveries() {
    let mut pipeline = Pipeline::start_with(Setup {
        configure: |c| {
            c.dependency_budget(Duration::from_secs(60))
                .retry_backoff(Duration::from_millis(100), Duration::from_millis(500))
        },
        provision: ProvisionOptions::default()
            .ack_wait(Duration::from_secs(1))
            .max_deliver(2),
        ..Setup::default()
    })
    .await;
    let (input, _) = pipeline.publish("outage-1", FLAKY).await;
    pipeline
        .stored(
            topology::ENRICHED.name,
            "the output once the dependency is back",
            &output_id(input.id(), FUNCTION, 0),
        )
        .await;
    pipeline.settled().await;
    let attempts = pipeline.deliveries("outage-1");
    assert!(attempts.len() > 3, "retried in-process: {attempts:?}");
    assert!(
        attempts.iter().all(|&d| d == 1),
        "never redelivered: {attempts:?}"
    );
    assert_eq!(pipeline.metrics.naks.get(), 0);
    assert_eq!(
        pipeline.metrics.held_retries.get(),
        attempts.len() as u64 - 1
    );
    assert_eq!(pipeline.messages(topology::DEAD_LETTER.name).await.len(), 0);
    pipeline.shutdown().await;
}

/// The server's max-deliveries advisory path, for a consumer that crashed
/// on the last delivery: here the test is that consumer (it fetches and
/// never acks), and the runtime's advisory follower dead-letters the message.
#[tokio::test]
async fn messages_that_are_never_settled_are_dead_lettered_from_the_advisory() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    provision(
        &js,
        &consumers(),
        &ProvisionOptions::default()
            .ack_wait(Duration::from_secs(1))
            .max_deliver(2),
    )
    .await
    .expect("provision");
    let publisher = Publisher::new(
        client.clone(),
        PublisherConfig::default(),
        Metrics::new(FUNCTION),
    );
    let dead_letters = tidewatch_runtime::dead_letter::DeadLetters::new(
        publisher.clone(),
        topology::RAW.name,
        FUNCTION,
    );
    let sweeper = tidewatch_runtime::poison::Sweeper::new(
        client.clone(),
        topology::RAW.name,
        FUNCTION,
        dead_letters.clone(),
    );
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    let follower = tokio::spawn(dead_letters.follow_max_deliveries(
        client.clone(),
        sweeper,
        async move { stopped.notified().await },
    ));
    // The follower's subscription must exist before the advisory is sent.
    let subsz = format!("{}/subsz?subs=1", server.monitoring_url());
    eventually("the advisory follower's subscription", WAIT, || async {
        let (_, body) = tidewatch_testkit::http_get(&subsz).await.ok()?;
        body.contains("MAX_DELIVERIES").then_some(())
    })
    .await;

    let input = test_event("hang-1", HANG);
    let ack = publisher
        .publish(raw_subject(), &input)
        .await
        .expect("stored");
    let seq = ack.sequence;
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(topology::RAW.name)
        .await
        .expect("stream")
        .get_consumer(FUNCTION)
        .await
        .expect("consumer");
    for delivery in 1..=2 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .expect("fetch");
        let message = futures::StreamExt::next(&mut batch)
            .await
            .unwrap_or_else(|| panic!("delivery {delivery}"))
            .expect("message");
        assert_eq!(message.info().expect("info").delivered, delivery);
        // Crashed: never acked.
    }
    // The server notices the exhaustion when it would deliver again: that
    // takes a waiting pull (any replica's), which gets nothing.
    let mut none = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(3))
        .messages()
        .await
        .expect("fetch");
    assert!(
        futures::StreamExt::next(&mut none).await.is_none(),
        "not delivered a third time"
    );
    let stream = js
        .get_stream(topology::DEAD_LETTER.name)
        .await
        .expect("dlq");
    let dlq = eventually("the exhausted message in the DLQ", WAIT, || async {
        stream
            .get_last_raw_message_by_subject(&subjects::dead_letter(FUNCTION))
            .await
            .ok()
    })
    .await;
    assert_dead_letter(&dlq, "exhausted", seq, "without being settled");
    assert_eq!(
        header(&dlq.headers, DELIVERIES_HEADER).as_deref(),
        Some("2")
    );
    assert_eq!(
        from_nats(Some(&dlq.headers), &dlq.payload).expect("event"),
        input
    );
    stop.notify_one();
    follower.await.expect("follower ends");
}

/// A handler that never finishes is abandoned at its deadline (under
/// ack_wait, so no other replica gets the message while it runs), and the
/// delivery counts as failed: the pipeline keeps flowing past it.
#[tokio::test]
async fn a_handler_past_its_deadline_is_abandoned_then_dead_lettered() {
    let pipeline = Pipeline::start_with(Setup {
        provision: ProvisionOptions::default()
            .ack_wait(Duration::from_secs(1))
            .max_deliver(2),
        ..Setup::default()
    })
    .await;
    let (input, seq) = pipeline.publish("hang-1", HANG).await;
    let dlq = pipeline.dead_letter(seq).await;
    assert_dead_letter(&dlq, "exhausted", seq, "did not finish within");
    assert_eq!(
        header(&dlq.headers, DELIVERIES_HEADER).as_deref(),
        Some("2")
    );
    assert_eq!(pipeline.deliveries("hang-1"), vec![1, 2]);
    assert_eq!(
        from_nats(Some(&dlq.headers), &dlq.payload).expect("event"),
        input
    );

    // The hung handlers do not stop other messages.
    let (next, _) = pipeline.publish("ok-after-hang", OK).await;
    pipeline
        .stored(
            topology::ENRICHED.name,
            "output next to hung handlers",
            &output_id(next.id(), FUNCTION, 0),
        )
        .await;
    // The hung handlers never finish, so stop the loop instead of draining it.
    if let Some(task) = &pipeline.task {
        task.abort();
    }
}

#[tokio::test]
async fn outputs_of_a_retried_input_are_stored_once() {
    let pipeline = Pipeline::start_with(Setup {
        publisher: PublisherConfig::default()
            .max_attempts(2)
            .retry_backoff(Duration::from_millis(20)),
        ..Setup::default()
    })
    .await;
    let (input, seq) = pipeline.publish("partial-1", PARTIAL).await;

    // The second output never finds a stream: the input is retried, then exhausted.
    let dlq = pipeline.dead_letter(seq).await;
    assert_dead_letter(&dlq, "exhausted", seq, NOWHERE);
    assert_eq!(pipeline.deliveries("partial-1"), vec![1, 2, 3]);
    pipeline.settled().await;

    // The first output was published on every delivery, with the same id: stored once.
    let outputs = pipeline.messages(topology::ENRICHED.name).await;
    assert_eq!(outputs.len(), 1, "redeliveries must not duplicate outputs");
    assert_eq!(
        header(&outputs[0].headers, MSG_ID_HEADER),
        Some(output_id(input.id(), FUNCTION, 0))
    );
}

#[tokio::test]
async fn an_output_over_the_limit_dead_letters_the_input() {
    let mut pipeline = Pipeline::start().await;
    let (_, seq) = pipeline.publish("emit-big-1", EMIT_TOO_BIG).await;

    let dlq = pipeline.dead_letter(seq).await;
    assert_dead_letter(&dlq, "output_refused", seq, "over the 65536-byte limit");
    pipeline.settled().await;
    assert_eq!(
        pipeline.deliveries("emit-big-1"),
        vec![1],
        "a terminal output error is not retried"
    );
    assert_eq!(pipeline.messages(topology::ENRICHED.name).await.len(), 0);
    pipeline.shutdown().await;
}

#[tokio::test]
async fn messages_published_with_expectation_headers_can_still_be_dead_lettered() {
    let mut pipeline = Pipeline::start().await;
    // A producer that pins its publishes to the stream (a common safety
    // measure); the header is stored with the message.
    let (mut headers, payload) = to_nats(&test_event("expect-1", REJECT));
    headers.insert("Nats-Expected-Stream", topology::RAW.name);
    let ack = pipeline
        .js
        .publish_with_headers(raw_subject(), headers, payload)
        .await
        .expect("publish")
        .await
        .expect("stored in RAW");

    let dlq = pipeline.dead_letter(ack.sequence).await;
    assert_dead_letter(&dlq, "rejected", ack.sequence, "no pod for expect-1");
    assert!(
        dlq.headers.get("Nats-Expected-Stream").is_none(),
        "publish expectations are not copied: {:?}",
        dlq.headers
    );
    assert_eq!(
        header(&dlq.headers, "ce-id").as_deref(),
        Some("expect-1"),
        "the ce- headers are"
    );
    pipeline.settled().await;
    assert_eq!(
        pipeline.deliveries("expect-1"),
        vec![1],
        "dead-lettered on the first delivery"
    );
    pipeline.shutdown().await;
}

/// A header block async-nats cannot parse drops the connection it is
/// delivered on. After the reconnect the runtime sweeps the consumer's
/// un-acked range through the JSON message-get API: the message goes to the
/// dead-letter stream (raw header block in base64, payload intact) and is
/// deleted from the work stream, and the next good event flows.
#[tokio::test]
async fn poison_headers_are_dead_lettered_and_the_pipeline_keeps_flowing() {
    use base64::Engine;
    // Many deliveries allowed: the max-deliveries advisory (which handles
    // poison too) would come only after 20 ack waits, so what moves the
    // message in time here is the sweep after the reconnect.
    let pipeline = Pipeline::start_with(Setup {
        provision: ProvisionOptions::default()
            .ack_wait(Duration::from_secs(2))
            .max_deliver(20),
        ..Setup::default()
    })
    .await;
    let (before, _) = pipeline.publish("ok-before", OK).await;
    pipeline
        .stored(
            topology::ENRICHED.name,
            "the first output",
            &output_id(before.id(), FUNCTION, 0),
        )
        .await;
    let raw = pipeline
        .js
        .get_stream(topology::RAW.name)
        .await
        .expect("raw stream");
    let blocks: [&[u8]; 2] = [
        b"NATS/1.0\r\nCe-Id: poison-\xff\r\nCe-Type: test.ok\r\n\r\n",
        b"NATS/1.0\r\nCe-Id: poison-2\r\nthis line has no colon\r\n\r\n",
    ];
    for (n, block) in blocks.iter().enumerate() {
        tidewatch_testkit::publish_raw_headers(
            pipeline._server.client_port(),
            &raw_subject(),
            block,
            b"poison payload",
        )
        .await
        .expect("raw publish");
        let seq = raw.get_info().await.expect("info").state.last_sequence;
        let dlq = pipeline.dead_letter(seq).await;
        assert_dead_letter(&dlq, "malformed", seq, "cannot read this message");
        let raw_headers = header(&dlq.headers, tidewatch_runtime::poison::RAW_HEADERS_HEADER)
            .expect("raw header block kept");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(raw_headers)
                .expect("base64"),
            block.to_vec(),
            "poison {n}"
        );
        assert_eq!(&dlq.payload[..], b"poison payload");
        assert!(
            raw.get_raw_message(seq).await.is_err(),
            "poison {n} is gone from the work stream"
        );

        let started = Instant::now();
        let (after, _) = pipeline.publish(&format!("ok-after-{n}"), OK).await;
        pipeline
            .stored(
                topology::ENRICHED.name,
                "the next output",
                &output_id(after.id(), FUNCTION, 0),
            )
            .await;
        eprintln!(
            "poison {n}: next good event out after {:?}",
            started.elapsed()
        );
    }
    pipeline.settled().await;
    let refused = pipeline
        .metrics
        .refused
        .get_or_create(&tidewatch_runtime::metrics::Reason {
            reason: "poison_header",
        })
        .get();
    assert_eq!(refused, 2);
    assert_eq!(pipeline.messages(topology::DEAD_LETTER.name).await.len(), 2);
}
