//! enrich: joins raw events with Kubernetes context from the pod metadata
//! KV bucket and republishes them to the enriched stream.
//!
//! The output keeps the input's id (an identity derivation: redelivery
//! yields the same id, so the enriched stream deduplicates it) and adds
//! extensions ([`resolve`] lists the joins). Lookups go through a local
//! cache ([`cache`]) kept correct by a KV watch, so the steady state costs no
//! KV round trip per event. An event that cannot be resolved is passed on
//! marked `resolution=unresolved` with the reason, never dropped.

mod cache;
mod interest;
mod origin;
mod resolve;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use cloudevents::{AttributesReader, Event};
use tidewatch_runtime::host::{FunctionArgs, Host};
use tidewatch_runtime::topology::{self, FunctionSpec, subjects};
use tidewatch_runtime::{Context, Emitted, Function, Outcome};

use cache::PodCache;

/// Tidewatch enrich function: raw events + pod metadata → enriched events.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    function: FunctionArgs,
    /// How long a key found absent in KV is remembered as absent (ms).
    #[arg(long, env = "TIDEWATCH_ENRICH_NEGATIVE_TTL_MS", default_value_t = 5000)]
    negative_ttl_ms: u64,
    /// Cache entries kept at most (the cache is emptied when full).
    #[arg(
        long,
        env = "TIDEWATCH_ENRICH_CACHE_ENTRIES",
        default_value_t = 200_000
    )]
    cache_entries: usize,
}

struct Enrich {
    pods: Arc<PodCache>,
    /// What the enriched stream's consumers read.
    interest: Arc<interest::Interest>,
    metrics: tidewatch_runtime::metrics::Metrics,
}

impl resolve::Lookup for Arc<PodCache> {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, resolve::PodError> {
        PodCache::get(self, key).await
    }
    async fn pod(&self, key: &str) -> Result<Arc<resolve::Pod>, resolve::PodError> {
        PodCache::pod(self, key).await
    }
}

impl Function for Enrich {
    /// Types nobody downstream reads are acked by the runtime without even
    /// being decoded (`tidewatch_events_uninterested_total`).
    fn accepts(&self, event_type: &str) -> bool {
        self.interest.wants_type(event_type)
    }

    async fn handle(&self, event: Event, ctx: &Context) -> Outcome {
        if let Err(e) = check_payload(&event) {
            return Outcome::reject(e.to_string());
        }
        if let Err(why) = origin::check(&event, ctx.subject.as_deref()) {
            return Outcome::reject(why);
        }
        let (collector, node) =
            topology::parse_source(event.source()).unwrap_or(("external", "unknown"));
        let subject = subjects::enriched(collector, node, event.ty());
        if !self.interest.wants(&subject) {
            // Nobody reads it downstream: acked, not stored (nor joined).
            self.metrics.uninterested.inc();
            return Outcome::Done;
        }
        let enrichment = match resolve::resolve(&self.pods, &event).await {
            Ok(e) => e,
            Err(e) => return Outcome::retry(Duration::from_secs(1), e.to_string()),
        };
        let mut out = event;
        enrichment.apply(&mut out);
        Outcome::emit(Emitted {
            subject,
            event: out,
        })
    }
}

/// Refuse protobuf data that does not decode as the message its
/// `dataschema` names: passed on, it would reach correlate as an event that
/// says nothing, and nobody would learn the producer is broken. Unknown
/// schemas and other content types (JSON) pass.
fn check_payload(event: &Event) -> Result<(), tidewatch_proto::SchemaError> {
    let (Some(schema), Some(cloudevents::Data::Binary(bytes))) = (event.dataschema(), event.data())
    else {
        return Ok(());
    };
    // Binary data under a proto schema, said to be protobuf or not said.
    if event
        .datacontenttype()
        .is_some_and(|ct| ct != tidewatch_proto::PROTOBUF_CONTENT_TYPE)
    {
        return Ok(());
    }
    match tidewatch_proto::check(schema.as_str(), bytes) {
        Err(e @ tidewatch_proto::SchemaError::Decode { .. }) => Err(e),
        _ => Ok(()),
    }
}

/// This function's place in the pipeline; the CLI reads the same file.
const SPEC: &str = include_str!("../function.toml");

/// See Cargo.toml: the per-event allocation pattern is cheap with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One thread: the handlers are short and mostly wait on NATS. Two workers
/// gave the same events/s for ~40% more CPU per event (cross-thread
/// wakeups); more throughput comes from more replicas (KEDA).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = Host::start(FunctionSpec::from_toml(SPEC)?, args.function).await?;
    let js = async_nats::jetstream::new(host.client()?.clone());
    let store = js
        .get_key_value(topology::POD_METADATA.bucket)
        .await
        .with_context(|| {
            format!(
                "KV bucket {} (run `tidewatch provision`)",
                topology::POD_METADATA.bucket
            )
        })?;
    let pods = Arc::new(PodCache::new(
        store,
        Duration::from_millis(args.negative_ttl_ms),
        args.cache_entries,
    ));
    pods.watch().await.map_err(anyhow::Error::msg)?;
    let interest = Arc::new(interest::Interest::default());
    match interest::Interest::list(&js).await {
        Ok(consumers) => interest.set(&consumers),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the enriched stream's consumers; enriching everything until they can be")
        }
    }
    tokio::spawn(interest.clone().follow(js.clone()));
    let metrics = host.metrics().clone();
    host.run(Enrich {
        pods,
        interest,
        metrics,
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod spec_tests {
    use tidewatch_runtime::topology::FunctionSpec;

    #[test]
    fn its_function_toml_is_valid() {
        let spec = FunctionSpec::from_toml(super::SPEC).expect("function.toml");
        assert_eq!(
            (spec.name, spec.consumer.stream, spec.output_stream),
            ("enrich", "raw", Some("enriched"))
        );
    }
}

#[cfg(test)]
mod payload_tests {
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn event(content_type: Option<&str>, data: Vec<u8>) -> cloudevents::Event {
        EventBuilderV10::new()
            .id("1")
            .source("/s")
            .ty("tidewatch.kernel.oom_kill")
            .data_with_schema(
                content_type.unwrap_or("application/protobuf"),
                "proto:tidewatch.v1.OomKill",
                data,
            )
            .build()
            .expect("event")
    }

    #[test]
    fn protobuf_that_does_not_decode_is_refused() {
        let bad = vec![0xff, 0xff, 0xff, 0x0f];
        let err = super::check_payload(&event(Some("application/protobuf"), bad.clone()))
            .expect_err("refused");
        assert!(err.to_string().contains("OomKill"), "{err}");
        assert!(super::check_payload(&event(Some("application/protobuf"), Vec::new())).is_ok());
        assert!(
            super::check_payload(&event(Some("application/json"), bad)).is_ok(),
            "JSON is not protobuf's to refuse"
        );
    }
}
