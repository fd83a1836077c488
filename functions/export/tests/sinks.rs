//! The export binary against a real nats-server, a real HTTP webhook
//! receiver and a real OTLP logs gRPC receiver (tonic service) started in
//! the test, in plain text and over TLS (a CA and server certificate made
//! by rcgen, servers on tokio-rustls).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use tidewatch_proto::v1::{Entity, Insight};
use tidewatch_runtime::event::new_event;
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects, types};
use tidewatch_testkit::{NatsServer, eventually};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// export's spec, from the crate's function.toml as the binary reads it.
fn export() -> topology::FunctionSpec {
    topology::FunctionSpec::from_toml(include_str!("../function.toml")).expect("function.toml")
}

/// What a receiver got: every delivery (duplicates included), by receiver.
#[derive(Default)]
struct Received {
    /// Event ids in arrival order.
    ids: Mutex<Vec<String>>,
    /// Raw bodies (HTTP) for format checks.
    bodies: Mutex<Vec<(String, Bytes)>>,
    /// Requests that reached the receiver, failed ones included.
    calls: AtomicU64,
    /// While now (ms since start) < this, answer slowly / fail.
    down_until_ms: AtomicU64,
    /// TLS handshakes that failed (the client did not trust us...).
    tls_failures: AtomicU64,
}

impl Received {
    fn ids(&self) -> Vec<String> {
        self.ids.lock().expect("lock").clone()
    }
    fn distinct(&self) -> BTreeSet<String> {
        self.ids().into_iter().collect()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// An HTTP/1 receiver. While down it answers 503 after `slow`.
async fn http_receiver(slow: Duration) -> (u16, Arc<Received>) {
    http_receiver_on(slow, None).await
}

/// An HTTP/1 receiver, over TLS when `tls` is given.
async fn http_receiver_on(slow: Duration, tls: Option<TlsAcceptor>) -> (u16, Arc<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let received = Arc::new(Received::default());
    let r = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let r = r.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_http1(stream, slow, r).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => serve_http1(stream, slow, r).await,
                        Err(_) => {
                            r.tls_failures.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                }
            });
        }
    });
    (port, received)
}

async fn serve_http1<I>(io: I, slow: Duration, r: Arc<Received>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let r = r.clone();
        async move {
            let path = req.uri().path().to_string();
            let content_type = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            r.calls.fetch_add(1, Ordering::SeqCst);
            if now_ms() < r.down_until_ms.load(Ordering::SeqCst) {
                tokio::time::sleep(slow).await;
                return Ok::<_, Infallible>(
                    http::Response::builder()
                        .status(503)
                        .body(Full::new(Bytes::new()))
                        .expect("response"),
                );
            }
            let id = if path == "/v1/logs" {
                let request: ExportLogsServiceRequest =
                    prost::Message::decode(body.as_ref()).expect("OTLP protobuf");
                event_id(&request)
            } else if content_type == "application/cloudevents+json" {
                let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                json["id"].as_str().unwrap_or_default().to_string()
            } else {
                let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                json["text"].as_str().unwrap_or_default().to_string()
            };
            r.ids.lock().expect("lock").push(id);
            r.bodies.lock().expect("lock").push((content_type, body));
            Ok(http::Response::builder()
                .status(200)
                .body(Full::new(Bytes::new()))
                .expect("response"))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn event_id(request: &ExportLogsServiceRequest) -> String {
    let record = &request.resource_logs[0].scope_logs[0].log_records[0];
    record
        .attributes
        .iter()
        .find(|kv| kv.key == "cloudevents.event_id")
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|v| match v {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

struct Otlp {
    received: Arc<Received>,
    requests: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
    slow: Duration,
}

#[tonic::async_trait]
impl LogsService for Otlp {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.received.calls.fetch_add(1, Ordering::SeqCst);
        if now_ms() < self.received.down_until_ms.load(Ordering::SeqCst) {
            tokio::time::sleep(self.slow).await;
            return Err(tonic::Status::unavailable("receiver down"));
        }
        let request = request.into_inner();
        self.received
            .ids
            .lock()
            .expect("lock")
            .push(event_id(&request));
        self.requests.lock().expect("lock").push(request);
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// An OTLP logs gRPC receiver (HTTP/2), the tonic service served by hyper.
async fn otlp_receiver(
    slow: Duration,
) -> (
    u16,
    Arc<Received>,
    Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
) {
    otlp_receiver_on(slow, None).await
}

/// [`otlp_receiver`], over TLS (ALPN `h2`) when `tls` is given.
async fn otlp_receiver_on(
    slow: Duration,
    tls: Option<TlsAcceptor>,
) -> (
    u16,
    Arc<Received>,
    Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let received = Arc::new(Received::default());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let service = LogsServiceServer::new(Otlp {
        received: received.clone(),
        requests: requests.clone(),
        slow,
    });
    let received_out = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service.clone();
            let tls = tls.clone();
            let r = received.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_grpc(stream, service).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => serve_grpc(stream, service).await,
                        Err(_) => {
                            r.tls_failures.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                }
            });
        }
    });
    (port, received_out, requests)
}

async fn serve_grpc<I>(io: I, service: LogsServiceServer<Otlp>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let hyper_service =
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let mut service = service.clone();
            async move { tonic::codegen::Service::call(&mut service, req).await }
        });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), hyper_service)
        .await;
}

/// Insight `msg-<i>`: critical for even `i`, warning for odd.
fn insight(i: u32) -> cloudevents::Event {
    insight_with(
        i,
        if i.is_multiple_of(2) {
            "critical"
        } else {
            "warning"
        },
    )
}

fn insight_with(i: u32, severity: &str) -> cloudevents::Event {
    let insight = Insight {
        id: format!("incident-{}", i / 2),
        kind: "crash-loop".into(),
        severity: severity.into(),
        summary: format!("container app of pod/shop/web-{i} restarted 3 times in 10m"),
        root_cause: "segmentation fault (SIGSEGV, exit 139): a crash in native code".into(),
        root_cause_event_id: format!("r-{i}-0"),
        evidence_event_ids: (0..3).map(|j| format!("r-{i}-{j}")).collect(),
        affected: vec![Entity {
            kind: "pod".into(),
            name: format!("web-{i}"),
            namespace: "shop".into(),
        }],
        first_seen_ns: 1,
        last_seen_ns: 2,
        confidence: 0.6,
        revision: 1 + i % 2,
        ..Insight::default()
    };
    new_event(
        format!("msg-{i:03}"),
        &types::insight("crash-loop"),
        &topology::source("correlate", "node-1"),
        Some(&format!("pod/shop/web-{i}")),
        chrono::Utc::now(),
        &insight,
    )
    .expect("event")
}

async fn setup(server: &NatsServer) -> (async_nats::jetstream::Context, Publisher) {
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    provision(
        &js,
        &[export().consumer],
        &ProvisionOptions::default().ack_wait(Duration::from_secs(5)),
    )
    .await
    .expect("provisioned");
    (
        js,
        Publisher::new(client, PublisherConfig::default(), Metrics::new("test")),
    )
}

fn start_export(server: &NatsServer, args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tidewatch-export"))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        // Sink retries as redeliveries (what these tests count), not held
        // in-process: the runtime's holding is tested in runtime/tests.
        .env("TIDEWATCH_DEPENDENCY_BUDGET_SECS", "0")
        .env("RUST_LOG", "warn")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("export starts")
}

async fn consumer_idle(js: &async_nats::jetstream::Context) -> bool {
    let info = js
        .get_stream(topology::INSIGHTS.name)
        .await
        .expect("stream")
        .consumer_info("export")
        .await
        .expect("consumer");
    info.num_pending == 0 && info.num_ack_pending == 0
}

async fn stream_len(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_failing_sink_recovers_and_gets_every_insight_without_holding_up_the_other() {
    const N: u32 = 20;
    let server = NatsServer::start().await;
    let (js, publisher) = setup(&server).await;
    // The webhook is down (slow, then 503) for the first 2.5 s; OTLP is healthy.
    let (web_port, web) = http_receiver(Duration::from_millis(1500)).await;
    let (otlp_port, otlp, requests) = otlp_receiver(Duration::ZERO).await;
    let started = now_ms();
    web.down_until_ms.store(started + 2500, Ordering::SeqCst);
    let _export = start_export(
        &server,
        &[
            "--stdout=false".into(),
            "--webhook".into(),
            format!("http://127.0.0.1:{web_port}/hook"),
            "--otlp-endpoint".into(),
            format!("http://127.0.0.1:{otlp_port}"),
            "--sink-timeout-ms".into(),
            "1000".into(),
            "--breaker-failures".into(),
            "3".into(),
            "--breaker-open-ms".into(),
            "500".into(),
        ],
    );
    let subject = subjects::insight("crash-loop");
    for i in 0..N {
        publisher
            .publish(subject.as_str(), &insight(i))
            .await
            .expect("stored");
    }
    let expected: BTreeSet<String> = (0..N).map(|i| format!("msg-{i:03}")).collect();

    // OTLP gets everything while the webhook is still down.
    eventually(
        "OTLP to receive every insight",
        Duration::from_secs(20),
        || async { (otlp.distinct() == expected).then_some(()) },
    )
    .await;
    assert!(
        now_ms() < started + 2500,
        "the down webhook did not hold OTLP up"
    );
    assert!(web.distinct().is_empty());

    // The webhook recovers: every insight arrives, none lost, none twice after dedupe by id.
    eventually(
        "the webhook to receive every insight",
        Duration::from_secs(60),
        || async { (web.distinct() == expected).then_some(()) },
    )
    .await;
    eventually("export to settle", Duration::from_secs(30), || async {
        consumer_idle(&js).await.then_some(())
    })
    .await;
    assert_eq!(web.distinct(), expected);
    assert_eq!(
        otlp.ids().len(),
        N as usize,
        "OTLP was not called again for redelivered insights"
    );
    assert_eq!(
        stream_len(&js, topology::DEAD_LETTER.name).await,
        0,
        "nothing was given up on"
    );

    // OTLP log records carry the insight.
    let requests = requests.lock().expect("lock");
    let record = &requests[0].resource_logs[0].scope_logs[0].log_records[0];
    let attr = |k: &str| {
        record
            .attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.clone())
    };
    assert!(attr("tidewatch.insight.id").is_some());
    assert!(attr("tidewatch.insight.evidence_event_ids").is_some());
    let i: u32 = event_id(&requests[0])
        .trim_start_matches("msg-")
        .parse()
        .expect("msg-<i>");
    let expected = if i.is_multiple_of(2) {
        (17, "CRITICAL")
    } else {
        (13, "WARNING")
    };
    assert_eq!(
        (record.severity_number, record.severity_text.as_str()),
        expected
    );
    // Webhook bodies are structured CloudEvents with the insight as JSON data.
    let bodies = web.bodies.lock().expect("lock");
    let (content_type, body) = &bodies[0];
    assert_eq!(content_type, "application/cloudevents+json");
    let json: serde_json::Value = serde_json::from_slice(body).expect("json");
    assert_eq!(json["specversion"], "1.0");
    assert_eq!(json["type"], "dev.tidewatch.insight.crash-loop");
    assert_eq!(json["data"]["kind"], "crash-loop");
    assert_eq!(
        json["data"]["evidenceEventIds"].as_array().map(Vec::len),
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_text_and_otlp_over_http() {
    let server = NatsServer::start().await;
    let (js, publisher) = setup(&server).await;
    let (port, received) = http_receiver(Duration::ZERO).await;
    let _export = start_export(
        &server,
        &[
            "--stdout=false".into(),
            "--webhook".into(),
            format!("http://127.0.0.1:{port}/slack"),
            "--webhook-format".into(),
            "slack".into(),
            "--otlp-endpoint".into(),
            format!("http://127.0.0.1:{port}"),
            "--otlp-protocol".into(),
            "http".into(),
        ],
    );
    publisher
        .publish(subjects::insight("crash-loop").as_str(), &insight(4))
        .await
        .expect("stored");
    eventually("both sinks to deliver", Duration::from_secs(20), || async {
        (received.ids().len() == 2).then_some(())
    })
    .await;
    eventually("export to settle", Duration::from_secs(30), || async {
        consumer_idle(&js).await.then_some(())
    })
    .await;
    let bodies: BTreeMap<String, Bytes> = received
        .bodies
        .lock()
        .expect("lock")
        .iter()
        .cloned()
        .collect();
    let slack: serde_json::Value =
        serde_json::from_slice(&bodies["application/json"]).expect("json");
    let text = slack["text"].as_str().expect("text");
    assert!(
        text.starts_with("*[critical] crash-loop*: container app of pod/shop/web-4"),
        "{text}"
    );
    assert!(text.contains("Root cause: segmentation fault"), "{text}");
    assert!(text.contains("pod/shop/web-4"), "{text}");
    let otlp: ExportLogsServiceRequest =
        prost::Message::decode(bodies["application/x-protobuf"].as_ref()).expect("protobuf");
    assert_eq!(event_id(&otlp), "msg-004");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_for_good_dead_letters_the_insight_with_the_reason() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    provision(
        &js,
        &[export().consumer],
        &ProvisionOptions::default()
            .ack_wait(Duration::from_secs(5))
            .max_deliver(3),
    )
    .await
    .expect("provisioned");
    let publisher = Publisher::new(client, PublisherConfig::default(), Metrics::new("test"));
    let (port, received) = http_receiver(Duration::ZERO).await;
    received.down_until_ms.store(u64::MAX, Ordering::SeqCst);
    let _export = start_export(
        &server,
        &[
            "--stdout=false".into(),
            "--webhook".into(),
            format!("http://127.0.0.1:{port}/hook"),
        ],
    );
    publisher
        .publish(subjects::insight("crash-loop").as_str(), &insight(7))
        .await
        .expect("stored");
    eventually(
        "the insight to be dead-lettered",
        Duration::from_secs(30),
        || async { (stream_len(&js, topology::DEAD_LETTER.name).await == 1).then_some(()) },
    )
    .await;
    let dlq = js
        .get_stream(topology::DEAD_LETTER.name)
        .await
        .expect("dlq");
    let message = dlq.get_raw_message(1).await.expect("dead letter");
    let reason = message
        .headers
        .get(tidewatch_runtime::dead_letter::REASON_HEADER)
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(
        reason.contains("webhook") && reason.contains("503"),
        "{reason}"
    );
    let event =
        tidewatch_runtime::binding::nats::from_nats(Some(&message.headers), &message.payload)
            .expect("the original event");
    assert_eq!(
        cloudevents::AttributesReader::id(&event),
        "msg-007",
        "kept whole for replay"
    );
    eventually("export to settle", Duration::from_secs(30), || async {
        consumer_idle(&js).await.then_some(())
    })
    .await;
}

/// Every severity correlate produces (rules accept critical, warning, info),
/// exactly as each sink carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_severity_maps_to_its_otlp_severity_and_webhook_field() {
    // (severity, OTLP severity_number, OTLP severity_text)
    const MAPPING: [(&str, i32, &str); 3] = [
        ("critical", 17, "CRITICAL"),
        ("warning", 13, "WARNING"),
        ("info", 9, "INFO"),
    ];
    let server = NatsServer::start().await;
    let (js, publisher) = setup(&server).await;
    let (web_port, web) = http_receiver(Duration::ZERO).await;
    let (otlp_port, otlp, requests) = otlp_receiver(Duration::ZERO).await;
    let _export = start_export(
        &server,
        &[
            "--stdout=false".into(),
            "--webhook".into(),
            format!("http://127.0.0.1:{web_port}/hook"),
            "--otlp-endpoint".into(),
            format!("http://127.0.0.1:{otlp_port}"),
        ],
    );
    for (i, (severity, _, _)) in MAPPING.iter().enumerate() {
        publisher
            .publish(
                subjects::insight("crash-loop").as_str(),
                &insight_with(i as u32, severity),
            )
            .await
            .expect("stored");
    }
    eventually(
        "both sinks to get all three",
        Duration::from_secs(20),
        || async {
            (web.distinct().len() == MAPPING.len() && otlp.distinct().len() == MAPPING.len())
                .then_some(())
        },
    )
    .await;
    eventually("export to settle", Duration::from_secs(30), || async {
        consumer_idle(&js).await.then_some(())
    })
    .await;

    let otlp_severity: BTreeMap<String, (i32, String)> = requests
        .lock()
        .expect("lock")
        .iter()
        .map(|r| {
            let record = &r.resource_logs[0].scope_logs[0].log_records[0];
            (
                event_id(r),
                (record.severity_number, record.severity_text.clone()),
            )
        })
        .collect();
    let webhook_severity: BTreeMap<String, serde_json::Value> = web
        .bodies
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, body)| {
            let json: serde_json::Value = serde_json::from_slice(body).expect("json");
            (
                json["id"].as_str().unwrap_or_default().to_string(),
                json["data"]["severity"].clone(),
            )
        })
        .collect();
    for (i, (severity, number, text)) in MAPPING.iter().enumerate() {
        let id = format!("msg-{i:03}");
        assert_eq!(
            otlp_severity.get(&id),
            Some(&(*number, text.to_string())),
            "OTLP severity of a {severity} insight"
        );
        assert_eq!(
            webhook_severity.get(&id),
            Some(&serde_json::json!(severity)),
            "webhook data.severity of a {severity} insight"
        );
    }
}

/// Sum of every sample of `name` in a Prometheus text page.
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// After `--breaker-failures` failures in a row the sink is not called
/// again until `--breaker-open-ms` has passed, though export keeps handling
/// (and nakking) insights; then one trial call closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_fails_fast_without_calling_the_sink_until_its_trial() {
    const N: u32 = 10;
    const FAILURES: u64 = 3;
    let server = NatsServer::start().await;
    let (js, publisher) = setup(&server).await;
    let (web_port, web) = http_receiver(Duration::ZERO).await;
    web.down_until_ms.store(u64::MAX, Ordering::SeqCst);
    let metrics_port = tidewatch_testkit::free_port();
    let mut export = Command::new(env!("CARGO_BIN_EXE_tidewatch-export"))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        // Sink retries as redeliveries (what these tests count), not held
        // in-process: the runtime's holding is tested in runtime/tests.
        .env("TIDEWATCH_DEPENDENCY_BUDGET_SECS", "0")
        .env("RUST_LOG", "warn")
        .args([
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--stdout=false".into(),
            "--webhook".into(),
            format!("http://127.0.0.1:{web_port}/hook"),
            // One insight at a time, so failures are counted before the next call.
            "--concurrency".into(),
            "1".into(),
            "--batch".into(),
            "1".into(),
            "--breaker-failures".into(),
            FAILURES.to_string(),
            // Far longer than handling N insights takes, even on a busy machine.
            "--breaker-open-ms".into(),
            "15000".into(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("export starts");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut stderr = tokio::io::BufReader::new(export.stderr.take().expect("stderr")).lines();
    let lines = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            eprintln!("{line}");
            lines.lock().expect("lock").push(line);
        }
    });
    let subject = subjects::insight("crash-loop");
    for i in 0..N {
        publisher
            .publish(subject.as_str(), &insight(i))
            .await
            .expect("stored");
    }
    let naks = eventually(
        "export to handle (and nak) every insight",
        Duration::from_secs(30),
        || async {
            let url = format!("http://127.0.0.1:{metrics_port}/metrics");
            let (_, page) = tidewatch_testkit::http_get(&url).await.ok()?;
            let naks = metric(&page, "tidewatch_naks_total");
            (naks >= u64::from(N)).then_some(naks)
        },
    )
    .await;
    // At least N handlings, each a nak, and only the first FAILURES reached the sink.
    assert_eq!(
        web.calls.load(Ordering::SeqCst),
        FAILURES,
        "the open breaker kept calling the sink ({naks} naks)"
    );
    let opened = |log: &[String]| {
        log.iter()
            .filter(|l| l.contains("sink failing: circuit opened"))
            .count()
    };
    eventually(
        "export to log the breaker opening",
        Duration::from_secs(10),
        || {
            let n = opened(&log.lock().expect("lock"));
            async move { (n > 0).then_some(()) }
        },
    )
    .await;

    // The sink is back: after the open period a trial call closes the breaker.
    web.down_until_ms.store(0, Ordering::SeqCst);
    let expected: BTreeSet<String> = (0..N).map(|i| format!("msg-{i:03}")).collect();
    eventually(
        "every insight once the breaker closes",
        Duration::from_secs(90),
        || async { (web.distinct() == expected).then_some(()) },
    )
    .await;
    eventually("export to settle", Duration::from_secs(30), || async {
        consumer_idle(&js).await.then_some(())
    })
    .await;
    assert_eq!(
        web.calls.load(Ordering::SeqCst),
        FAILURES + u64::from(N),
        "after the failures, one call per insight"
    );
    assert_eq!(opened(&log.lock().expect("lock")), 1, "opened once");
    assert_eq!(stream_len(&js, topology::DEAD_LETTER.name).await, 0);
}

/// A test CA and a server certificate it signed for 127.0.0.1 / localhost.
struct Pki {
    ca_pem: String,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).expect("CA cert").pem();
    (params, key, pem)
}

fn pki() -> Pki {
    let (ca_params, ca_key, ca_pem) = ca("tidewatch test CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tidewatch test receiver");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    Pki {
        ca_pem,
        chain: vec![cert.der().clone()],
        key: rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

impl Pki {
    /// A TLS server offering `alpn` (`h2` for gRPC).
    fn acceptor(&self, alpn: &[u8]) -> TlsAcceptor {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(self.chain.clone(), self.key.clone_key().into())
        .expect("server config");
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }
}

/// Writes `pem` to `dir/name`, returning the path.
fn write_pem(dir: &tempfile::TempDir, name: &str, pem: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).expect("PEM written");
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_and_otlp_grpc_deliver_over_tls_with_the_ca_file() {
    const N: u32 = 6;
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = write_pem(&dir, "ca.pem", &pki.ca_pem);
    let server = NatsServer::start().await;
    let (js, publisher) = setup(&server).await;
    let (web_port, web) = http_receiver_on(Duration::ZERO, Some(pki.acceptor(b"http/1.1"))).await;
    let (otlp_port, otlp, requests) =
        otlp_receiver_on(Duration::ZERO, Some(pki.acceptor(b"h2"))).await;
    let _export = start_export(
        &server,
        &[
            "--stdout=false".into(),
            "--webhook".into(),
            format!("https://127.0.0.1:{web_port}/hook"),
            "--otlp-endpoint".into(),
            format!("https://127.0.0.1:{otlp_port}"),
            "--ca-file".into(),
            ca_file,
        ],
    );
    let subject = subjects::insight("crash-loop");
    for i in 0..N {
        publisher
            .publish(subject.as_str(), &insight(i))
            .await
            .expect("stored");
    }
    let expected: BTreeSet<String> = (0..N).map(|i| format!("msg-{i:03}")).collect();
    eventually(
        "both TLS receivers to get every insight",
        Duration::from_secs(30),
        || async { (web.distinct() == expected && otlp.distinct() == expected).then_some(()) },
    )
    .await;
    eventually("export to settle", Duration::from_secs(30), || async {
        consumer_idle(&js).await.then_some(())
    })
    .await;
    assert_eq!(web.ids().len(), N as usize, "each insight once over HTTPS");
    assert_eq!(
        otlp.ids().len(),
        N as usize,
        "each insight once over gRPC+TLS"
    );
    assert_eq!(web.tls_failures.load(Ordering::SeqCst), 0);
    assert_eq!(otlp.tls_failures.load(Ordering::SeqCst), 0);
    assert_eq!(stream_len(&js, topology::DEAD_LETTER.name).await, 0);
    let bodies = web.bodies.lock().expect("lock");
    let json: serde_json::Value = serde_json::from_slice(&bodies[0].1).expect("json");
    assert_eq!(json["data"]["kind"], "crash-loop");
    let requests = requests.lock().expect("lock");
    assert!(expected.contains(&event_id(&requests[0])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_https_with_the_ca_file_from_the_environment() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = write_pem(&dir, "ca.pem", &pki.ca_pem);
    let server = NatsServer::start().await;
    let (js, publisher) = setup(&server).await;
    let (port, received) = http_receiver_on(Duration::ZERO, Some(pki.acceptor(b"http/1.1"))).await;
    let mut export = Command::new(env!("CARGO_BIN_EXE_tidewatch-export"));
    export
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        // Sink retries as redeliveries (what these tests count), not held
        // in-process: the runtime's holding is tested in runtime/tests.
        .env("TIDEWATCH_DEPENDENCY_BUDGET_SECS", "0")
        .env("RUST_LOG", "warn")
        .env("TIDEWATCH_EXPORT_STDOUT", "false")
        .env(
            "TIDEWATCH_EXPORT_OTLP_ENDPOINT",
            format!("https://localhost:{port}/"),
        )
        .env("TIDEWATCH_EXPORT_OTLP_PROTOCOL", "http")
        .env("TIDEWATCH_EXPORT_CA_FILE", &ca_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let _export = export.spawn().expect("export starts");
    publisher
        .publish(subjects::insight("crash-loop").as_str(), &insight(4))
        .await
        .expect("stored");
    eventually(
        "the OTLP/HTTP record over TLS",
        Duration::from_secs(30),
        || async { (!received.ids().is_empty()).then_some(()) },
    )
    .await;
    eventually("export to settle", Duration::from_secs(30), || async {
        consumer_idle(&js).await.then_some(())
    })
    .await;
    assert_eq!(received.ids(), vec!["msg-004".to_string()]);
    let bodies = received.bodies.lock().expect("lock");
    assert_eq!(bodies[0].0, "application/x-protobuf");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_tls_sinks_fail_clearly_and_the_insight_is_retried_then_dead_lettered() {
    let pki = pki();
    // The "system" trusts some other CA only (SSL_CERT_FILE replaces the OS
    // store), so the test does not depend on the host's certificates.
    let (_, _, other_ca) = ca("some other CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let system_roots = write_pem(&dir, "system.pem", &other_ca);
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = async_nats::jetstream::new(client.clone());
    provision(
        &js,
        &[export().consumer],
        &ProvisionOptions::default()
            .ack_wait(Duration::from_secs(5))
            .max_deliver(3),
    )
    .await
    .expect("provisioned");
    let publisher = Publisher::new(client, PublisherConfig::default(), Metrics::new("test"));
    let (web_port, web) = http_receiver_on(Duration::ZERO, Some(pki.acceptor(b"http/1.1"))).await;
    let (otlp_port, otlp, _) = otlp_receiver_on(Duration::ZERO, Some(pki.acceptor(b"h2"))).await;
    let web_url = format!("https://127.0.0.1:{web_port}/hook");
    let otlp_url = format!("https://127.0.0.1:{otlp_port}/");
    let mut export = Command::new(env!("CARGO_BIN_EXE_tidewatch-export"));
    export
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        // Sink retries as redeliveries (what these tests count), not held
        // in-process: the runtime's holding is tested in runtime/tests.
        .env("TIDEWATCH_DEPENDENCY_BUDGET_SECS", "0")
        .env("RUST_LOG", "warn")
        .env("SSL_CERT_FILE", &system_roots)
        .env_remove("SSL_CERT_DIR")
        .env_remove("TIDEWATCH_EXPORT_CA_FILE")
        .args([
            "--stdout=false",
            "--webhook",
            &web_url,
            "--otlp-endpoint",
            &otlp_url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let _export = export.spawn().expect("export starts");
    publisher
        .publish(subjects::insight("crash-loop").as_str(), &insight(7))
        .await
        .expect("stored");
    eventually(
        "the insight to be dead-lettered after its retries",
        Duration::from_secs(60),
        || async { (stream_len(&js, topology::DEAD_LETTER.name).await == 1).then_some(()) },
    )
    .await;
    let message = js
        .get_stream(topology::DEAD_LETTER.name)
        .await
        .expect("dlq")
        .get_raw_message(1)
        .await
        .expect("dead letter");
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let reason = header(tidewatch_runtime::dead_letter::REASON_HEADER);
    assert_eq!(
        header(tidewatch_runtime::dead_letter::DELIVERIES_HEADER),
        "3",
        "retried max_deliver times: {reason}"
    );
    // Both sinks name their host (never the URL's path: a webhook's secret),
    // that TLS failed, and why.
    assert!(
        !reason.contains("/hook"),
        "the path stays out of headers: {reason}"
    );
    assert!(
        reason.contains(&format!(
            "POST https://127.0.0.1:{web_port}/...: TLS handshake failed: invalid peer certificate: UnknownIssuer"
        )),
        "{reason}"
    );
    let otlp_target = format!(
        "OTLP gRPC https://127.0.0.1:{otlp_port}/...: TLS handshake failed: invalid peer certificate: UnknownIssuer"
    );
    assert!(reason.contains(&otlp_target), "{reason}");
    assert!(reason.contains("--ca-file"), "with a hint: {reason}");
    let event =
        tidewatch_runtime::binding::nats::from_nats(Some(&message.headers), &message.payload)
            .expect("the original event");
    assert_eq!(
        cloudevents::AttributesReader::id(&event),
        "msg-007",
        "kept whole for replay"
    );
    assert!(web.ids().is_empty() && otlp.ids().is_empty());
    assert!(web.tls_failures.load(Ordering::SeqCst) >= 1);
    assert!(otlp.tls_failures.load(Ordering::SeqCst) >= 1);
}

/// Starts export with `args`, expecting it to exit at startup; its stderr.
async fn failed_start(server: &NatsServer, args: &[&str]) -> String {
    let child = Command::new(env!("CARGO_BIN_EXE_tidewatch-export"))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        // Sink retries as redeliveries (what these tests count), not held
        // in-process: the runtime's holding is tested in runtime/tests.
        .env("TIDEWATCH_DEPENDENCY_BUDGET_SECS", "0")
        .env("RUST_LOG", "warn")
        .env_remove("TIDEWATCH_EXPORT_CA_FILE")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("export starts");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("export exits on a config error")
        .expect("output");
    assert!(!output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_file_or_url_stops_export_at_startup_naming_it() {
    let server = NatsServer::start().await;
    let (_js, _publisher) = setup(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_string_lossy();
    let stderr = failed_start(
        &server,
        &[
            "--webhook",
            "https://127.0.0.1:9/hook",
            "--ca-file",
            &missing,
        ],
    )
    .await;
    assert!(stderr.contains(&format!("CA file {missing}: ")), "{stderr}");

    let not_pem = write_pem(&dir, "not.pem", "this is not a certificate\n");
    let stderr = failed_start(
        &server,
        &[
            "--otlp-endpoint",
            "https://127.0.0.1:9",
            "--ca-file",
            &not_pem,
        ],
    )
    .await;
    assert!(
        stderr.contains(&format!("CA file {not_pem}: no PEM certificate")),
        "{stderr}"
    );

    let stderr = failed_start(&server, &["--webhook", "ftp://127.0.0.1/hook"]).await;
    assert!(
        stderr.contains("webhook URL ftp://127.0.0.1/...: unsupported scheme"),
        "{stderr}"
    );
}

/// Two export instances, each with its own durable consumer on the
/// insights stream (as two export Deployments would be): a sink that is
/// down holds up only its own instance, and both get every insight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_export_instance_reads_its_own_durable_and_a_down_sink_holds_up_only_its_own() {
    const N: u32 = 10;
    let server = NatsServer::start().await;
    let (js, publisher) = setup(&server).await;
    // A second durable on the insights stream, as the topology defines export's.
    let export = export().consumer;
    let insights = js
        .get_stream(topology::INSIGHTS.name)
        .await
        .expect("stream");
    insights
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("export-siem".into()),
            filter_subjects: topology::consumer_filter_subjects(&export)
                .into_iter()
                .map(|s| s.replace(".export", ".export-siem"))
                .collect(),
            ack_wait: Duration::from_secs(5),
            max_deliver: 50,
            ..Default::default()
        })
        .await
        .expect("second durable");

    let (chat_port, chat) = http_receiver(Duration::ZERO).await;
    let (siem_port, siem) = http_receiver(Duration::from_millis(200)).await;
    let started = now_ms();
    siem.down_until_ms.store(started + 3000, Ordering::SeqCst);
    let _chat = start_export(
        &server,
        &[
            "--stdout=false".into(),
            "--webhook".into(),
            format!("http://127.0.0.1:{chat_port}/hook"),
        ],
    );
    let _siem = start_export(
        &server,
        &[
            "--stdout=false".into(),
            "--consumer".into(),
            "export-siem".into(),
            "--webhook".into(),
            format!("http://127.0.0.1:{siem_port}/siem"),
            "--breaker-open-ms".into(),
            "300".into(),
        ],
    );
    let subject = subjects::insight("crash-loop");
    for i in 0..N {
        publisher
            .publish(subject.as_str(), &insight(i))
            .await
            .expect("stored");
    }
    let expected: BTreeSet<String> = (0..N).map(|i| format!("msg-{i:03}")).collect();
    eventually(
        "the healthy sink to get everything",
        Duration::from_secs(20),
        || async { (chat.distinct() == expected).then_some(()) },
    )
    .await;
    assert!(
        now_ms() < started + 3000,
        "the down SIEM did not hold up the other export instance"
    );
    eventually(
        "the SIEM to get everything once it is back",
        Duration::from_secs(60),
        || async { (siem.distinct() == expected).then_some(()) },
    )
    .await;
    assert_eq!(
        chat.ids().len(),
        N as usize,
        "the healthy instance never re-sent"
    );
    let siem_info = js
        .get_stream(topology::INSIGHTS.name)
        .await
        .expect("stream")
        .consumer_info("export-siem")
        .await
        .expect("the SIEM durable")
        .clone();
    assert!(siem_info.delivered.stream_sequence >= u64::from(N));
    assert_eq!(stream_len(&js, topology::DEAD_LETTER.name).await, 0);
}
