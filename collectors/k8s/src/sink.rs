//! Where changes go: the one place that publishes, through the runtime's
//! [`Outbox`] (JetStream while NATS is reachable, the on-disk spool while
//! it is not), and the one place that writes the KV bucket.

use async_nats::jetstream;
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::outbox::Outbox;
use tidewatch_runtime::topology::{self, POD_METADATA, subjects};

use crate::change::{COLLECTOR, Change};
use crate::kv::Mirror;

/// Publishes changes as CloudEvents to `tidewatch.raw.k8s.<node>`.
#[derive(Clone)]
pub struct Sink {
    outbox: Outbox,
    subject: String,
    node: String,
    metrics: Metrics,
}

impl Sink {
    pub fn new(outbox: Outbox, node: &str, metrics: Metrics) -> Sink {
        Sink {
            outbox,
            subject: subjects::raw(COLLECTOR, node),
            node: node.to_string(),
            metrics,
        }
    }

    /// Publish each change, in order, waiting until it is stored or
    /// spooled. A change that cannot be sent is logged and counted, never
    /// retried forever (its id makes a later resend harmless anyway).
    pub async fn emit(&self, changes: Vec<Change>) {
        for change in changes {
            let event = match change.to_event(&self.node) {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, ty = change.ty, "could not build event");
                    self.metrics.refuse("invalid");
                    continue;
                }
            };
            tracing::debug!(ty = change.ty, subject = %change.subject, id = %change.id, "change");
            match self.outbox.send(self.subject.clone(), &event).await {
                Ok(receipt) => match receipt.await {
                    Ok(_) => {
                        self.metrics.events_out.inc();
                    }
                    Err(e) => tracing::warn!(error = %e, id = %change.id, "event not delivered"),
                },
                Err(e) => tracing::warn!(error = %e, id = %change.id, "event not sent"),
            }
        }
    }
}

/// The pod metadata bucket, opened (or created) on first use.
pub struct Bucket {
    js: jetstream::Context,
    store: Option<jetstream::kv::Store>,
    /// After a failed write, writes wait until then (the sweep retries),
    /// so an unreachable NATS does not stall the watch loop on every event.
    retry_at: Option<tokio::time::Instant>,
}

/// Pause after a failed KV write.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

impl Bucket {
    pub fn new(js: jetstream::Context) -> Bucket {
        Bucket {
            js,
            store: None,
            retry_at: None,
        }
    }

    async fn open(&mut self) -> Result<&jetstream::kv::Store, String> {
        if self.store.is_none() {
            let store = match self.js.get_key_value(POD_METADATA.bucket).await {
                Ok(store) => store,
                Err(_) => self
                    .js
                    .create_key_value(jetstream::kv::Config {
                        bucket: POD_METADATA.bucket.to_string(),
                        description: POD_METADATA.description.to_string(),
                        history: POD_METADATA.history,
                        max_age: POD_METADATA.max_age,
                        limit_markers: (!POD_METADATA.expiry_markers.is_zero())
                            .then_some(POD_METADATA.expiry_markers),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("KV bucket {}: {e}", POD_METADATA.bucket))?,
            };
            self.store = Some(store);
        }
        self.store
            .as_ref()
            .ok_or_else(|| format!("KV bucket {} unavailable", topology::POD_METADATA.bucket))
    }

    /// Write what `mirror` has pending; failures stay pending.
    pub async fn flush(&mut self, mirror: &mut Mirror) {
        if mirror.pending() == (0, 0)
            || self
                .retry_at
                .is_some_and(|at| tokio::time::Instant::now() < at)
        {
            return;
        }
        let result = match self.open().await {
            Ok(store) => {
                let store = store.clone();
                mirror.flush(&store).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => self.retry_at = None,
            Err(e) => {
                tracing::warn!(error = %e, "pod metadata KV write failed; will retry");
                self.retry_at = Some(tokio::time::Instant::now() + RETRY_AFTER);
            }
        }
    }
}
