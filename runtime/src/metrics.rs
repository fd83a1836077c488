//! Prometheus metrics every process serves on `/metrics`, and the small
//! admin endpoint (`/metrics`, `/healthz`, `/readyz`) that serves them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Label naming why something was refused, dead-lettered or failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Label naming a KV write: `update` (compare-and-set on a revision) or `create`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KvOp {
    pub op: &'static str,
}

/// All metrics of one process. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

/// The counters themselves; reached through `Metrics`' `Deref`.
pub struct Inner {
    // Behind a lock so a collector can add its own metrics after start
    // ([`Metrics::register_collector`]); locked only to register and scrape.
    registry: Mutex<Registry>,
    /// Events handed to the function.
    pub events_in: Counter,
    /// Events the function emitted and the stream acknowledged.
    pub events_out: Counter,
    pub acks: Counter,
    pub naks: Counter,
    /// Handler retries done in-process while a dependency was down; not deliveries.
    pub held_retries: Counter,
    /// Inputs acked without output because their type is not read: by
    /// the function (`Function::accepts`), or by anyone downstream (enrich:
    /// no consumer of the enriched stream wants it).
    pub uninterested: Counter,
    pub dead_lettered: Family<Reason, Counter>,
    pub handler_seconds: Histogram,
    pub in_flight: Gauge,
    /// Events the publisher got a stream ack for.
    pub published: Counter,
    /// Publish attempts repeated with the same msg id after a failure.
    pub publish_retries: Counter,
    /// Publishes that failed for good (after retries, or terminal).
    pub publish_failed: Family<Reason, Counter>,
    /// Events refused before publishing or handling (oversized, malformed).
    pub refused: Family<Reason, Counter>,
    /// Events written to the outage spool because NATS was unreachable.
    pub spooled: Counter,
    /// Spooled events the stream acknowledged on replay.
    pub spool_replayed: Counter,
    /// Events the spool lost, by `reason`: `overflow` (deleted unsent by
    /// the drop-oldest policy), `disk_full` and `io_error` (an append
    /// failed, the event was not kept).
    pub spool_dropped: Family<Reason, Counter>,
    /// Bytes of torn or corrupt spool records skipped.
    pub spool_corrupt_bytes: Counter,
    /// Spooled events waiting for replay.
    pub spool_pending: Gauge,
    /// Bytes the spool takes on disk.
    pub spool_bytes: Gauge,
    /// KV compare-and-set writes refused because another writer got there
    /// first (correlate's state, written by several replicas), by `op`.
    pub kv_conflicts: Family<KvOp, Counter>,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Metrics {
    /// Metrics for a component (`enrich`, `ebpf`...), labelled `component="<name>"`.
    pub fn new(component: &str) -> Metrics {
        let mut registry = Registry::with_prefix_and_labels(
            "tidewatch",
            [("component".into(), component.to_string().into())].into_iter(),
        );
        let inner = Inner {
            events_in: Counter::default(),
            events_out: Counter::default(),
            acks: Counter::default(),
            naks: Counter::default(),
            held_retries: Counter::default(),
            uninterested: Counter::default(),
            dead_lettered: Family::default(),
            handler_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            in_flight: Gauge::default(),
            published: Counter::default(),
            publish_retries: Counter::default(),
            publish_failed: Family::default(),
            refused: Family::default(),
            spooled: Counter::default(),
            spool_replayed: Counter::default(),
            spool_dropped: Family::default(),
            spool_corrupt_bytes: Counter::default(),
            spool_pending: Gauge::default(),
            spool_bytes: Gauge::default(),
            kv_conflicts: Family::default(),
            registry: Mutex::new(Registry::default()),
        };
        registry.register(
            "events_in",
            "Events handed to the function",
            inner.events_in.clone(),
        );
        registry.register(
            "events_out",
            "Events emitted and acknowledged by the stream",
            inner.events_out.clone(),
        );
        registry.register("acks", "Input messages acknowledged", inner.acks.clone());
        registry.register(
            "naks",
            "Input messages negatively acknowledged for redelivery",
            inner.naks.clone(),
        );
        registry.register(
            "held_retries",
            "Handler retries done in-process while a dependency was down (not deliveries)",
            inner.held_retries.clone(),
        );
        registry.register(
            "events_uninterested",
            "Inputs acknowledged without output because their type is not read (by the function, or by anyone downstream)",
            inner.uninterested.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages sent to the dead-letter stream, by reason",
            inner.dead_lettered.clone(),
        );
        registry.register(
            "handler_seconds",
            "Time spent in the function's handler",
            inner.handler_seconds.clone(),
        );
        registry.register(
            "in_flight",
            "Messages being handled now",
            inner.in_flight.clone(),
        );
        registry.register(
            "published",
            "Events published and acknowledged by the stream",
            inner.published.clone(),
        );
        registry.register(
            "publish_retries",
            "Publishes retried with the same msg id",
            inner.publish_retries.clone(),
        );
        registry.register(
            "publish_failed",
            "Publishes that failed for good, by reason",
            inner.publish_failed.clone(),
        );
        registry.register(
            "refused",
            "Events refused as oversized or malformed, by reason",
            inner.refused.clone(),
        );
        registry.register(
            "spooled",
            "Events written to the outage spool while NATS was unreachable",
            inner.spooled.clone(),
        );
        registry.register(
            "spool_replayed",
            "Spooled events acknowledged by the stream on replay",
            inner.spool_replayed.clone(),
        );
        registry.register(
            "spool_dropped",
            "Events the outage spool lost, by reason (overflow: deleted unsent when full; disk_full, io_error: an append failed)",
            inner.spool_dropped.clone(),
        );
        registry.register(
            "spool_corrupt_bytes",
            "Bytes of torn or corrupt spool records skipped",
            inner.spool_corrupt_bytes.clone(),
        );
        registry.register(
            "spool_pending",
            "Spooled events waiting for replay",
            inner.spool_pending.clone(),
        );
        registry.register(
            "spool_bytes",
            "Bytes the outage spool takes on disk",
            inner.spool_bytes.clone(),
        );
        registry.register(
            "kv_conflicts",
            "KV compare-and-set writes refused because another writer got there first, by op (update: the revision moved on; create: the key exists)",
            inner.kv_conflicts.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                ..inner
            }),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }

    /// Add metrics read at every scrape (a collector's kernel counters,
    /// say). They get the `tidewatch_` prefix and the `component` label
    /// like the rest.
    pub fn register_collector(&self, collector: impl prometheus_client::collector::Collector) {
        self.registry().register_collector(Box::new(collector));
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while encoding leaves the registry intact: keep serving it.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&Reason { reason }).inc();
    }
}

/// Whether the process should receive traffic: false until started and
/// again once shutdown begins.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Answer `/metrics`, `/healthz` and `/readyz`; `None` for any other path.
pub fn admin_response(
    path: &str,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Option<Response<Full<Bytes>>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" | "/livez" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if readiness.get() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        _ => return None,
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Some(response)
}

/// Serve the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin endpoint: accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = admin_response(req.uri().path(), &metrics, &readiness)
                    .unwrap_or_else(|| {
                        let mut r = Response::new(Full::new(Bytes::from_static(
                            b"not found: try /metrics, /healthz, /readyz\n",
                        )));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    });
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Bind the admin endpoint, returning the listener and its real address (port 0 allowed).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
