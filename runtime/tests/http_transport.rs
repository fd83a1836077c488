//! The HTTP (Knative) transport on a real socket: binary and structured
//! CloudEvents in, binary reply out, error statuses that name the problem,
//! `K_SINK`, health probes, metrics, and shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tidewatch_runtime::binding::http::{STRUCTURED_CONTENT_TYPE, from_http, to_structured_json};
use tidewatch_runtime::function::{Context, Emitted, Function, Outcome};
use tidewatch_runtime::metrics::{Metrics, Readiness};
use tidewatch_runtime::serve_http::{self, HttpConfig};
use tidewatch_testkit::{eventually, http_get};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const WAIT: Duration = Duration::from_secs(10);

const ECHO: &str = "test.echo";
const REJECT: &str = "test.reject";
const RETRY: &str = "test.retry";
const TWO: &str = "test.two";
const PANIC: &str = "test.panic";
/// Waits for the test to open the gate, then echoes.
const GATED: &str = "test.gated";

/// Holds GATED handlers until the test opens it.
#[derive(Default)]
struct Gate {
    entered: AtomicBool,
    open: Notify,
}

/// Decides by event type: echo one derived event, reject, ask for a retry,
/// emit two events, panic, or wait at the gate.
#[derive(Default)]
struct TestFunction {
    gate: Arc<Gate>,
}

fn derived(input: &Event, ctx: &Context, index: usize, ty: &str) -> Emitted {
    let mut builder = EventBuilderV10::new()
        .id(ctx.output_id(input, index))
        .source("/tidewatch/test/http")
        .ty(ty);
    if let Some(subject) = input.subject() {
        builder = builder.subject(subject);
    }
    let mut event = builder.build().expect("derived event");
    if let Some(data) = input.data() {
        event.set_data(
            input
                .datacontenttype()
                .unwrap_or("application/octet-stream"),
            data.clone(),
        );
    }
    if let Some(value) = input.extension("myext") {
        event.set_extension("myext", value.clone());
    }
    Emitted {
        subject: "ignored.over.http".into(),
        event,
    }
}

impl Function for TestFunction {
    async fn handle(&self, event: Event, ctx: &Context) -> Outcome {
        match event.ty() {
            ECHO => Outcome::emit(derived(&event, ctx, 0, "test.echoed")),
            REJECT => Outcome::reject(format!("event {} is not for me", event.id())),
            RETRY => Outcome::retry(Duration::from_millis(2500), "the database is down"),
            TWO => Outcome::Emit(vec![
                derived(&event, ctx, 0, "test.first"),
                derived(&event, ctx, 1, "test.second"),
            ]),
            PANIC => panic!("boom over http"),
            GATED => {
                self.gate.entered.store(true, Ordering::SeqCst);
                self.gate.open.notified().await;
                Outcome::emit(derived(&event, ctx, 0, "test.echoed"))
            }
            _ => Outcome::Done,
        }
    }
}

struct Served {
    addr: SocketAddr,
    gate: Arc<Gate>,
    metrics: Metrics,
    readiness: Readiness,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tidewatch_runtime::RuntimeError>>,
}

impl Served {
    async fn start(sink: Option<http::Uri>) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = Metrics::new("test");
        let readiness = Readiness::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let function = TestFunction::default();
        let gate = function.gate.clone();
        let task = tokio::spawn(serve_http::run(
            function,
            "test",
            listener,
            HttpConfig::new(addr).sink(sink),
            metrics.clone(),
            readiness.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        let served = Served {
            addr,
            gate,
            metrics,
            readiness,
            stop: Some(stop),
            task,
        };
        let url = served.url("/readyz");
        eventually("the HTTP transport to be ready", WAIT, || async {
            matches!(http_get(&url).await, Ok((200, _))).then_some(())
        })
        .await;
        served
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Trigger shutdown and wait for `run` to return.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("serve_http::run returns after shutdown")
            .expect("serve_http::run did not panic");
        result.expect("serve_http::run ends cleanly");
        assert!(!self.readiness.get(), "not ready once shut down");
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn event(&self) -> Event {
        from_http(&self.headers, &self.body)
            .unwrap_or_else(|e| panic!("reply is not a binary CloudEvent: {e}"))
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(served: &Served, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut request = Request::builder().method(Method::POST).uri(served.url("/"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).expect("request");
    let response = tokio::time::timeout(WAIT, client().request(request))
        .await
        .expect("answered in time")
        .expect("request succeeds");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Binary-mode headers for a minimal valid event of type `ty`.
fn binary_headers<'a>(id: &'a str, ty: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-source", "/tidewatch/test/node-1"),
        ("ce-type", ty),
    ]
}

/// Value of a counter line (`<name>{...} <value>`) whose labels include `label`.
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn binary_request_gets_a_binary_reply_with_the_derived_event() {
    let served = Served::start(None).await;
    let mut headers = binary_headers("in-1", ECHO);
    // Percent-encoded values: space, quote, percent, non-ASCII.
    headers.push((
        "ce-subject",
        "pod/default/web%201%20%22q%22%20100%25%20%C3%BCn%C3%AFcode",
    ));
    headers.push(("ce-time", "2024-05-06T07:08:09.5Z"));
    headers.push(("ce-traceparent", TRACEPARENT));
    headers.push(("ce-myext", "custom%20value"));
    headers.push(("content-type", "application/protobuf"));
    let reply = send(&served, &headers, vec![0u8, 1, 2, 0xff]).await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let input = EventBuilderV10::new()
        .id("in-1")
        .source("/tidewatch/test/node-1")
        .ty(ECHO)
        .build()
        .expect("event");
    let ctx = Context {
        function: "test",
        delivery: 1,
        max_deliver: 0,
        stream_sequence: None,
        subject: None,
    };
    let expected_id = ctx.output_id(&input, 0);
    assert_eq!(
        reply.headers.get("ce-id").map(|v| v.as_bytes()),
        Some(expected_id.as_bytes())
    );
    assert_eq!(
        reply.headers.get("ce-specversion").map(|v| v.as_bytes()),
        Some(&b"1.0"[..])
    );
    assert_eq!(
        reply
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(&b"application/protobuf"[..]),
        "datacontenttype travels as Content-Type"
    );
    assert!(reply.headers.get("ce-datacontenttype").is_none());
    // The reply's own header values are percent-encoded ASCII.
    let subject = reply
        .headers
        .get("ce-subject")
        .expect("ce-subject")
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        subject.contains("%20") && subject.contains("%C3%BC"),
        "{subject}"
    );

    let event = reply.event();
    assert_eq!(event.id(), expected_id);
    assert_eq!(event.ty(), "test.echoed");
    assert_eq!(
        event.subject(),
        Some("pod/default/web 1 \"q\" 100% ünïcode")
    );
    assert_eq!(event.data(), Some(&Data::Binary(vec![0, 1, 2, 0xff])));
    assert_eq!(
        event.extension("myext").map(|v| v.to_string()).as_deref(),
        Some("custom value")
    );
    assert_eq!(
        event
            .extension("traceparent")
            .map(|v| v.to_string())
            .as_deref(),
        Some(TRACEPARENT),
        "the trace context is carried to the output"
    );
    served.shutdown().await;
}

#[tokio::test]
async fn structured_request_gets_a_binary_reply() {
    let served = Served::start(None).await;
    let mut input = EventBuilderV10::new()
        .id("structured-1")
        .source("/other/tool")
        .ty(ECHO)
        .subject("thing ☃")
        .data("application/json", serde_json::json!({"hello": "wörld"}))
        .build()
        .expect("event");
    input.set_extension("traceparent", TRACEPARENT);
    let body = to_structured_json(&input).expect("json");
    let reply = send(
        &served,
        &[(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )],
        body,
    )
    .await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let ct = reply
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        !ct.starts_with(STRUCTURED_CONTENT_TYPE),
        "the reply is binary mode, not structured: {ct}"
    );
    assert!(
        reply.headers.contains_key("ce-id"),
        "binary mode carries ce- headers"
    );
    let event = reply.event();
    let ctx = Context {
        function: "test",
        delivery: 1,
        max_deliver: 0,
        stream_sequence: None,
        subject: None,
    };
    assert_eq!(event.id(), ctx.output_id(&input, 0));
    assert_eq!(event.subject(), Some("thing ☃"));
    assert_eq!(
        event.data(),
        Some(&Data::Json(serde_json::json!({"hello": "wörld"})))
    );
    assert_eq!(
        event
            .extension("traceparent")
            .map(|v| v.to_string())
            .as_deref(),
        Some(TRACEPARENT)
    );
    served.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_reason() {
    let served = Served::start(None).await;

    // Missing ce-source.
    let reply = send(
        &served,
        &[("ce-specversion", "1.0"), ("ce-id", "x"), ("ce-type", ECHO)],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(
        reply.text().contains("source"),
        "400 names the missing attribute: {}",
        reply.text()
    );

    // Garbage structured JSON.
    let reply = send(
        &served,
        &[("content-type", STRUCTURED_CONTENT_TYPE)],
        "{this is not json",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(
        reply.text().contains("structured"),
        "400 says the structured event is invalid: {}",
        reply.text()
    );

    // A bad percent escape.
    let mut headers = binary_headers("bad-escape", ECHO);
    headers.push(("ce-subject", "100%zz"));
    let reply = send(&served, &headers, "").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(
        reply.text().contains("subject"),
        "400 names the attribute: {}",
        reply.text()
    );

    // Not a CloudEvent at all.
    let reply = send(&served, &[("content-type", "text/plain")], "hello").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(reply.text().contains("ce-specversion"), "{}", reply.text());

    // Over the 64 KiB limit.
    let reply = send(
        &served,
        &binary_headers("big-1", ECHO),
        vec![b'x'; 65 * 1024],
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("65536"),
        "413 names the limit: {}",
        reply.text()
    );

    let metrics = served.metrics.encode();
    assert_eq!(
        counter(&metrics, "tidewatch_refused_total", "reason=\"malformed\""),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "tidewatch_refused_total", "reason=\"oversized\""),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        served.metrics.events_in.get(),
        0,
        "refused requests never reach the function"
    );
    served.shutdown().await;
}

#[tokio::test]
async fn reject_and_retry_map_to_422_and_503() {
    let served = Served::start(None).await;

    let reply = send(&served, &binary_headers("rej-1", REJECT), "").await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("event rej-1 is not for me"),
        "422 carries the reason: {}",
        reply.text()
    );

    let reply = send(&served, &binary_headers("retry-1", RETRY), "").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("the database is down"),
        "{}",
        reply.text()
    );
    assert_eq!(
        reply.headers.get(header::RETRY_AFTER).map(|v| v.as_bytes()),
        Some(&b"3"[..]),
        "Retry-After is the delay rounded up to whole seconds"
    );

    // Done: nothing to reply.
    let reply = send(&served, &binary_headers("done-1", "test.nothing"), "").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());

    let metrics = served.metrics.encode();
    assert_eq!(
        counter(&metrics, "tidewatch_events_in_total", ""),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            "tidewatch_dead_lettered_total",
            "reason=\"rejected\""
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(served.metrics.naks.get(), 1);
    served.shutdown().await;
}

#[tokio::test]
async fn two_outputs_need_k_sink() {
    let served = Served::start(None).await;
    let reply = send(&served, &binary_headers("two-1", TWO), "").await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("set K_SINK"),
        "500 says what to do: {}",
        reply.text()
    );
    served.shutdown().await;
}

/// A tiny HTTP server that records every request and answers 202.
struct Sink {
    uri: http::Uri,
    received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    task: JoinHandle<()>,
}

impl Sink {
    async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let uri: http::Uri = format!("http://{}/events", listener.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        let received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let store = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let store = store.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            store.lock().expect("sink lock").push((parts.headers, body));
                            let mut response = http::Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::ACCEPTED;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Sink {
            uri,
            received,
            task,
        }
    }
}

#[tokio::test]
async fn outputs_go_to_k_sink_in_binary_mode() {
    let sink = Sink::start().await;
    let served = Served::start(Some(sink.uri.clone())).await;

    let mut headers = binary_headers("two-2", TWO);
    headers.push(("ce-subject", "caf%C3%A9%20%22x%22"));
    headers.push(("ce-traceparent", TRACEPARENT));
    headers.push(("content-type", "text/plain"));
    let reply = send(&served, &headers, "payload").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());

    // The 202 comes after the sink answered, so both are recorded already.
    let received = sink.received.lock().expect("sink lock").clone();
    assert_eq!(received.len(), 2, "the sink got both events");
    let input = EventBuilderV10::new()
        .id("two-2")
        .source("/tidewatch/test/node-1")
        .ty(TWO)
        .build()
        .expect("event");
    let ctx = Context {
        function: "test",
        delivery: 1,
        max_deliver: 0,
        stream_sequence: None,
        subject: None,
    };
    let mut ids = Vec::new();
    for (headers, body) in &received {
        assert_eq!(
            headers.get("ce-specversion"),
            Some(&HeaderValue::from_static("1.0")),
            "binary mode: {headers:?}"
        );
        assert_eq!(
            headers.get(header::CONTENT_TYPE),
            Some(&HeaderValue::from_static("text/plain"))
        );
        let event = from_http(headers, body).expect("the sink got binary CloudEvents");
        assert_eq!(event.subject(), Some("café \"x\""));
        assert_eq!(event.data(), Some(&Data::Binary(b"payload".to_vec())));
        assert_eq!(
            event
                .extension("traceparent")
                .map(|v| v.to_string())
                .as_deref(),
            Some(TRACEPARENT)
        );
        ids.push((event.id().to_string(), event.ty().to_string()));
    }
    ids.sort();
    let mut expected = vec![
        (ctx.output_id(&input, 0), "test.first".to_string()),
        (ctx.output_id(&input, 1), "test.second".to_string()),
    ];
    expected.sort();
    assert_eq!(ids, expected);

    // A single output also goes to the sink rather than being the reply.
    let reply = send(&served, &binary_headers("echo-sink", ECHO), "").await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert_eq!(sink.received.lock().expect("sink lock").len(), 3);
    assert_eq!(served.metrics.events_out.get(), 3);

    served.shutdown().await;
    sink.task.abort();
}

#[tokio::test]
async fn k_sink_failures_are_bad_gateway() {
    // Bind and drop: nothing listens on this port any more.
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    };
    let served = Served::start(Some(format!("http://{dead}/").parse().expect("uri"))).await;
    let reply = send(&served, &binary_headers("echo-dead-sink", ECHO), "").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(reply.text().contains("K_SINK"), "{}", reply.text());
    served.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let served = Served::start(None).await;
    assert!(served.readiness.get());

    let (status, body) = http_get(&served.url("/healthz")).await.expect("healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&served.url("/readyz")).await.expect("readyz");
    assert_eq!(status, 200, "{body}");

    let reply = send(&served, &binary_headers("m-1", ECHO), "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let (status, body) = http_get(&served.url("/metrics")).await.expect("metrics");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tidewatch_events_in_total"), "{body}");
    assert_eq!(
        counter(&body, "tidewatch_events_in_total", "component=\"test\""),
        1.0,
        "{body}"
    );
    assert_eq!(
        counter(&body, "tidewatch_events_out_total", "component=\"test\""),
        1.0,
        "{body}"
    );

    let (status, _) = http_get(&served.url("/nope")).await.expect("unknown path");
    assert_eq!(status, 404);

    let addr = served.addr;
    served.shutdown().await;
    // The listener is closed once run() has returned.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test]
async fn shutdown_returns_with_idle_keep_alive_connections() {
    let served = Served::start(None).await;
    // A pooled client keeps its connection open after the exchange.
    let client = client();
    let request = Request::builder()
        .method(Method::POST)
        .uri(served.url("/"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "keepalive-1")
        .header("ce-source", "/s")
        .header("ce-type", ECHO)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client.request(request).await.expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.into_body().collect().await.expect("body");
    served.shutdown().await;
    drop(client);
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_the_server_keeps_serving() {
    let served = Served::start(None).await;
    let reply = send(&served, &binary_headers("panic-1", PANIC), "").await;
    assert_eq!(
        reply.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        reply.text()
    );
    assert!(reply.text().contains("panicked"), "{}", reply.text());
    assert_eq!(
        served.metrics.in_flight.get(),
        0,
        "the in-flight gauge is released"
    );

    let reply = send(&served, &binary_headers("after-panic", ECHO), "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    served.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_open_requests_finish() {
    let mut served = Served::start(None).await;
    let request = {
        let url = served.url("/");
        tokio::spawn(async move {
            let request = Request::builder()
                .method(Method::POST)
                .uri(url)
                .header("ce-specversion", "1.0")
                .header("ce-id", "gated-1")
                .header("ce-source", "/s")
                .header("ce-type", GATED)
                .body(Full::new(Bytes::new()))
                .expect("request");
            let response = client().request(request).await.expect("request answered");
            let status = response.status();
            let headers = response.headers().clone();
            let _ = response.into_body().collect().await.expect("body");
            (status, headers)
        })
    };
    let gate = served.gate.clone();
    eventually("the request to reach the handler", WAIT, || {
        let entered = gate.entered.load(Ordering::SeqCst);
        async move { entered.then_some(()) }
    })
    .await;

    let _ = served.stop.take().expect("running").send(());
    let readiness = served.readiness.clone();
    eventually("readiness to turn false once shutdown begins", WAIT, || {
        let ready = readiness.get();
        async move { (!ready).then_some(()) }
    })
    .await;
    assert!(
        !served.task.is_finished(),
        "run() waits for the open request"
    );
    assert!(!request.is_finished());

    served.gate.open.notify_one();
    let (status, headers) = tokio::time::timeout(WAIT, request)
        .await
        .expect("the open request finishes")
        .expect("request task");
    assert_eq!(status, StatusCode::OK, "the open request got its reply");
    assert!(headers.contains_key("ce-id"));
    served.shutdown().await;
}

/// With a real tracer installed, the handler's span joins the input's trace
/// and the output carries the handler's span, not a copy of the input's.
#[tokio::test]
async fn outputs_carry_the_handler_span_when_tracing_is_on() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // This test runs on one thread (current-thread runtime), so a
    // thread-local default covers the server's tasks too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let served = Served::start(None).await;
    let mut headers = binary_headers("traced-1", ECHO);
    headers.push(("ce-traceparent", TRACEPARENT));
    let reply = send(&served, &headers, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let traceparent = reply
        .event()
        .extension("traceparent")
        .map(|v| v.to_string())
        .expect("the output has a traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    let input: Vec<&str> = TRACEPARENT.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], input[1], "same trace: {traceparent}");
    assert_ne!(parts[2], input[2], "the handler's own span: {traceparent}");
    assert_eq!(parts[3], "01", "sampled like its parent: {traceparent}");
    served.shutdown().await;
}
