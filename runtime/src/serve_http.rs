//! Transport (b): HTTP on `$PORT`, the Knative runtime contract.
//!
//! `POST` any path with a CloudEvent (binary or structured JSON). Replies:
//! - 200 with the emitted event in binary mode (one output, no `K_SINK`);
//! - 202 when there is nothing to reply, or outputs went to `K_SINK`;
//! - 400 naming the problem for malformed events, 413 when over 64 KiB;
//! - 422 with the reason when the function rejects (not retried: Knative
//!   sends it to the dead-letter sink);
//! - 503 with `Retry-After` when the function asks to retry, 502 when
//!   `K_SINK` refused an output (both retried by Knative delivery).
//!
//! `/healthz`, `/readyz` and `/metrics` are served on the same port. On
//! shutdown, readiness turns false, open requests finish, then it returns.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use http::{HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::RuntimeError;
use crate::binding::http::{from_http, to_request, to_response};
use crate::event::MAX_EVENT_BYTES;
use crate::function::{Context, Emitted, Function, Outcome, invoke};
use crate::metrics::{Metrics, Readiness, admin_response};
use crate::telemetry;

/// Settings of the HTTP transport.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where to listen (`0.0.0.0:$PORT`).
    pub addr: SocketAddr,
    /// `K_SINK`: where emitted events are posted instead of being the reply.
    pub sink: Option<http::Uri>,
    /// How long open requests may take to finish after shutdown begins.
    pub drain_timeout: Duration,
}

impl HttpConfig {
    pub fn new(addr: SocketAddr) -> HttpConfig {
        HttpConfig {
            addr,
            sink: None,
            drain_timeout: Duration::from_secs(25),
        }
    }
    pub fn sink(mut self, sink: Option<http::Uri>) -> Self {
        self.sink = sink;
        self
    }
}

struct Shared<F> {
    function: F,
    name: &'static str,
    metrics: Metrics,
    readiness: Readiness,
    sink: Option<http::Uri>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Serve `function` over HTTP on `listener` until `shutdown`, then drain.
pub async fn run<F: Function>(
    function: F,
    name: &'static str,
    listener: tokio::net::TcpListener,
    config: HttpConfig,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RuntimeError> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let shared = Arc::new(Shared {
        function,
        name,
        metrics,
        readiness: readiness.clone(),
        sink: config.sink.clone(),
        client,
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    readiness.set(true);
    tracing::info!(function = name, addr = %listener.local_addr().map_err(RuntimeError::Io)?, sink = ?config.sink, "serving CloudEvents over HTTP");
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(&shared, req).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    readiness.set(false);
    drop(listener);
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open requests did not finish within the drain timeout");
    }
    tracing::info!(function = name, "drained");
    Ok(())
}

async fn route<F: Function>(shared: &Shared<F>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::GET {
        return admin_response(req.uri().path(), &shared.metrics, &shared.readiness)
            .unwrap_or_else(|| {
                plain(
                    StatusCode::NOT_FOUND,
                    "not found: POST a CloudEvent, or GET /healthz, /readyz, /metrics",
                )
            });
    }
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST a CloudEvent");
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_EVENT_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                shared.metrics.refuse("oversized");
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "event body is over the {MAX_EVENT_BYTES}-byte limit; refused, not truncated"
                    ),
                );
            }
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("could not read the request body: {e}"),
            );
        }
    };
    let event = match from_http(&parts.headers, &body) {
        Ok(e) => e,
        Err(e) => {
            shared.metrics.refuse("malformed");
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("malformed CloudEvent: {e}"),
            );
        }
    };
    handle(shared, event).await
}

async fn handle<F: Function>(shared: &Shared<F>, event: Event) -> Response<Full<Bytes>> {
    let ctx = Context {
        function: shared.name,
        delivery: 1,
        max_deliver: 0,
        stream_sequence: None,
        subject: None,
    };
    shared.metrics.events_in.inc();
    shared.metrics.in_flight.inc();
    let span =
        tracing::info_span!("handle", function = shared.name, id = %event.id(), ty = %event.ty());
    let outcome = invoke(&shared.function, &event, &ctx, &shared.metrics, &span).await;
    let response = match outcome {
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "handler panicked"),
        Ok(Outcome::Done) => accepted(shared),
        Ok(Outcome::Emit(outputs)) if outputs.is_empty() => accepted(shared),
        Ok(Outcome::Emit(outputs)) => reply(shared, &event, outputs, &span).await,
        Ok(Outcome::RetryAfter { delay, reason }) => {
            shared.metrics.naks.inc();
            let mut r = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("retry later: {reason}"),
            );
            let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            r
        }
        Ok(Outcome::Reject { reason }) => {
            shared
                .metrics
                .dead_lettered
                .get_or_create(&crate::metrics::Reason { reason: "rejected" })
                .inc();
            plain(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("rejected: {reason}"),
            )
        }
    };
    shared.metrics.in_flight.dec();
    response
}

async fn reply<F: Function>(
    shared: &Shared<F>,
    input: &Event,
    outputs: Vec<Emitted>,
    span: &tracing::Span,
) -> Response<Full<Bytes>> {
    let count = outputs.len();
    let mut events: Vec<Event> = outputs
        .into_iter()
        .map(|Emitted { mut event, .. }| {
            telemetry::stamp(span, input, &mut event);
            event
        })
        .collect();
    let Some(sink) = &shared.sink else {
        if count > 1 {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!(
                    "the function emitted {count} events but an HTTP reply carries one; set K_SINK"
                ),
            );
        }
        shared.metrics.acks.inc();
        shared.metrics.events_out.inc();
        return events
            .pop()
            .map(|e| to_response(&e))
            .unwrap_or_else(|| accepted(shared));
    };
    for event in &events {
        match shared.client.request(to_request(event, sink)).await {
            Ok(r) if r.status().is_success() => {
                shared.metrics.events_out.inc();
            }
            Ok(r) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "K_SINK {sink} answered {} for event {}",
                        r.status(),
                        event.id()
                    ),
                );
            }
            Err(e) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    &format!("K_SINK {sink} unreachable: {e}"),
                );
            }
        }
    }
    accepted(shared)
}

fn accepted<F>(shared: &Shared<F>) -> Response<Full<Bytes>> {
    shared.metrics.acks.inc();
    plain(StatusCode::ACCEPTED, "")
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
