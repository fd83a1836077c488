//! OTLP traces from real function processes: enrich and correlate run as
//! binaries against a real nats-server and export spans over OTLP/gRPC to a
//! trace receiver (the opentelemetry-proto tonic service on hyper HTTP/2)
//! started in this test. One event flows through both; their spans must
//! form one trace, linked through the CloudEvents `traceparent` extension.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudevents::AttributesReader;
use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use tidewatch_proto::v1::{ContainerMetadata, PodMetadata};
use tidewatch_runtime::topology;
use tidewatch_testkit::{NatsServer, eventually};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// Every export request the receiver got.
#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests
            .lock()
            .expect("lock")
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Start an OTLP/gRPC trace receiver on a free port; returns its endpoint.
async fn otlp_trace_receiver(receiver: Receiver) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let service = TraceServiceServer::new(receiver);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let hyper_service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let mut service = service.clone();
                        async move { tonic::codegen::Service::call(&mut service, req).await }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), hyper_service)
                    .await;
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// One exported span, flattened with the service that exported it.
#[derive(Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<KeyValue>,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} (event {:?}) trace {} span {} parent {:?}",
            self.service,
            self.name,
            self.attribute("id"),
            self.trace_id,
            self.span_id,
            self.parent_span_id
        )
    }
}

impl Span {
    fn attribute(&self, key: &str) -> Option<String> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                any_value::Value::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn spans(receiver: &Receiver) -> Vec<Span> {
    let mut out = Vec::new();
    for request in receiver.requests.lock().expect("lock").iter() {
        for resource_spans in &request.resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    any_value::Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span.attributes.clone(),
                    });
                }
            }
        }
    }
    out
}

/// The `handle` span `service` exported for the event with id `event_id`.
async fn handle_span(receiver: &Receiver, service: &str, event_id: &str) -> Span {
    eventually(
        &format!("{service} to export the span handling {event_id}"),
        Duration::from_secs(30),
        || async {
            spans(receiver).into_iter().find(|s| {
                s.service == service
                    && s.name == "handle"
                    && s.attribute("id").as_deref() == Some(event_id)
            })
        },
    )
    .await
}

/// A function binary exporting traces to `endpoint`.
fn start_traced(server: &NatsServer, binary_name: &str, endpoint: &str) -> Child {
    Command::new(binary(binary_name))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        // Export each batch promptly instead of after the default 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        // The `handle` spans are at info: the log filter gates them too.
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("function starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_two_functions_form_one_trace_through_the_traceparent_extension() {
    let receiver = Receiver::default();
    let endpoint = otlp_trace_receiver(receiver.clone()).await;
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    put_pod(
        &js,
        &PodMetadata {
            uid: "uid-web-1".into(),
            namespace: "default".into(),
            name: "web-1".into(),
            node: "node-1".into(),
            containers: vec![ContainerMetadata {
                name: "app".into(),
                container_id: "containerd://feed01".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await;
    let _enrich = start_traced(&server, "tidewatch-enrich", &endpoint);
    let _correlate = start_traced(&server, "tidewatch-correlate", &endpoint);

    // The collector's side of the trace: a span the raw event says it came from.
    let upstream_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let upstream_span = "00f067aa0ba902b7";
    let mut event = restart_event(1, "web-1");
    event.set_extension(
        "traceparent",
        format!("00-{upstream_trace}-{upstream_span}-01"),
    );
    publish_raw(&publisher, &[event.clone()]).await;

    let enriched = eventually("the enriched event", Duration::from_secs(30), || async {
        stream_events(&js, topology::ENRICHED.name).await.pop()
    })
    .await;
    let enrich = handle_span(&receiver, "enrich", event.id()).await;
    let correlate = handle_span(&receiver, "correlate", enriched.id()).await;

    assert_eq!(
        (enrich.trace_id.as_str(), enrich.parent_span_id.as_str()),
        (upstream_trace, upstream_span),
        "enrich's span continues the raw event's trace: {enrich:?}"
    );
    assert_eq!(
        enriched
            .extension("traceparent")
            .map(|v| v.to_string())
            .as_deref(),
        Some(format!("00-{upstream_trace}-{}-01", enrich.span_id).as_str()),
        "the enriched event carries enrich's span as its trace parent"
    );
    assert_eq!(
        (
            correlate.trace_id.as_str(),
            correlate.parent_span_id.as_str()
        ),
        (upstream_trace, enrich.span_id.as_str()),
        "correlate's span is a child of enrich's, in the same trace: {correlate:?}"
    );
}
