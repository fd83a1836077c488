//! enrich: joins raw events with Kubernetes context from the pod metadata
//! KV bucket and republishes them to the enriched stream.
//!
//! The output keeps the input's id (an identity derivation: redelivery
//! yields the same id, so the enriched stream deduplicates it) and adds
//! `namespace`, `pod`, `node`, `workload` extensions. An event that cannot
//! be resolved is passed on marked `resolution=unresolved` with the reason,
//! never dropped.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use clap::Parser;
use cloudevents::{AttributesReader, Event};
use tidewatch_proto::v1::PodMetadata;
use tidewatch_runtime::host::{FunctionArgs, Host};
use tidewatch_runtime::topology::{self, extensions, pod_keys, subjects};
use tidewatch_runtime::{Context, Emitted, Function, Outcome};

/// Tidewatch enrich function: raw events + pod metadata → enriched events.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    function: FunctionArgs,
}

struct Enrich {
    pods: kv::Store,
}

/// What the pod metadata lookup found.
enum Resolution {
    Resolved(Box<PodMetadata>),
    Unresolved(String),
}

impl Enrich {
    async fn resolve(&self, event: &Event) -> Result<Resolution, String> {
        let Some((namespace, name)) = event
            .subject()
            .and_then(|s| s.strip_prefix("pod/"))
            .and_then(|s| s.split_once('/'))
        else {
            return Ok(Resolution::Unresolved(
                "event names no pod (subject is not pod/<namespace>/<name>)".into(),
            ));
        };
        let key = pod_keys::by_name(namespace, name);
        match self.pods.get(key.as_str()).await {
            Ok(Some(bytes)) => match <PodMetadata as prost::Message>::decode(bytes.as_ref()) {
                Ok(meta) => Ok(Resolution::Resolved(Box::new(meta))),
                Err(e) => Ok(Resolution::Unresolved(format!(
                    "pod metadata at {key} is corrupt: {e}"
                ))),
            },
            Ok(None) => Ok(Resolution::Unresolved(format!(
                "no pod metadata for {namespace}/{name}"
            ))),
            Err(e) => Err(format!("pod metadata bucket unavailable: {e}")),
        }
    }
}

impl Function for Enrich {
    async fn handle(&self, event: Event, _ctx: &Context) -> Outcome {
        let (collector, node) =
            topology::parse_source(event.source()).unwrap_or(("external", "unknown"));
        let subject = subjects::enriched(collector, node);
        let mut out = event.clone();
        match self.resolve(&event).await {
            Err(reason) => return Outcome::retry(Duration::from_secs(1), reason),
            Ok(Resolution::Resolved(meta)) => {
                out.set_extension(extensions::RESOLUTION, "resolved");
                out.set_extension(extensions::NAMESPACE, meta.namespace.clone());
                out.set_extension(extensions::POD, meta.name.clone());
                if !meta.node.is_empty() {
                    out.set_extension(extensions::NODE, meta.node.clone());
                }
                if !meta.workload_kind.is_empty() {
                    out.set_extension(
                        extensions::WORKLOAD,
                        format!("{}/{}", meta.workload_kind, meta.workload_name),
                    );
                }
            }
            Ok(Resolution::Unresolved(reason)) => {
                out.set_extension(extensions::RESOLUTION, "unresolved");
                out.set_extension(extensions::RESOLUTION_REASON, reason);
            }
        }
        Outcome::emit(Emitted {
            subject,
            event: out,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = Host::start(&topology::ENRICH, args.function).await?;
    let js = async_nats::jetstream::new(host.client()?.clone());
    let pods = js
        .get_key_value(topology::POD_METADATA.bucket)
        .await
        .with_context(|| {
            format!(
                "KV bucket {} (run `tidewatch provision`)",
                topology::POD_METADATA.bucket
            )
        })?;
    host.run(Enrich { pods }).await?;
    Ok(())
}
