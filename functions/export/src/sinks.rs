//! Where insights go: JSON lines on stdout, an HTTP webhook (structured
//! CloudEvents JSON, or Slack-compatible `{"text": ...}`), and OTLP logs
//! over gRPC or HTTP/protobuf.

use std::time::Duration;

use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tidewatch_proto::v1::Insight;
use tidewatch_runtime::event::{payload, to_json};

/// Webhook body format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookFormat {
    /// Structured-mode CloudEvent (`application/cloudevents+json`) with readable JSON data.
    Cloudevents,
    /// `{"text": "..."}`, what Slack (and Mattermost, Rocket.Chat...) incoming webhooks take.
    Slack,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    Grpc,
    /// HTTP/protobuf, POST `<endpoint>/v1/logs`.
    Http,
}

pub enum Sink {
    Stdout,
    Webhook {
        url: http::Uri,
        format: WebhookFormat,
        client: Client<HttpConnector, Full<Bytes>>,
    },
    OtlpGrpc {
        client: LogsServiceClient<tonic::transport::Channel>,
    },
    OtlpHttp {
        url: http::Uri,
        client: Client<HttpConnector, Full<Bytes>>,
    },
}

fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new()).build(connector)
}

impl Sink {
    pub fn webhook(url: &str, format: WebhookFormat) -> Result<Sink, String> {
        let url: http::Uri = url
            .parse()
            .map_err(|e| format!("webhook URL {url:?}: {e}"))?;
        if url.scheme_str() != Some("http") {
            return Err(format!(
                "webhook URL {url}: only http:// is supported (terminate TLS in a sidecar or egress proxy)"
            ));
        }
        Ok(Sink::Webhook {
            url,
            format,
            client: http_client(),
        })
    }

    pub fn otlp(endpoint: &str, protocol: OtlpProtocol) -> Result<Sink, String> {
        match protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Channel::from_shared(endpoint.to_string())
                    .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?
                    .connect_timeout(Duration::from_secs(5))
                    .connect_lazy();
                Ok(Sink::OtlpGrpc {
                    client: LogsServiceClient::new(channel),
                })
            }
            OtlpProtocol::Http => {
                let base = endpoint.trim_end_matches('/');
                let full = if base.ends_with("/v1/logs") {
                    base.to_string()
                } else {
                    format!("{base}/v1/logs")
                };
                let url: http::Uri = full
                    .parse()
                    .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?;
                if url.scheme_str() != Some("http") {
                    return Err(format!("OTLP endpoint {url}: only http:// is supported"));
                }
                Ok(Sink::OtlpHttp {
                    url,
                    client: http_client(),
                })
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Sink::Stdout => "stdout".into(),
            Sink::Webhook { url, .. } => format!("webhook {url}"),
            Sink::OtlpGrpc { .. } => "otlp-grpc".into(),
            Sink::OtlpHttp { url, .. } => format!("otlp-http {url}"),
        }
    }

    /// Deliver one event; Err says why it did not arrive.
    pub async fn send(&self, event: &Event) -> Result<(), String> {
        match self {
            Sink::Stdout => {
                use std::io::Write;
                let line = to_json(event).to_string();
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")
                    .and_then(|_| out.flush())
                    .map_err(|e| format!("stdout: {e}"))
            }
            Sink::Webhook {
                url,
                format,
                client,
            } => {
                let (content_type, body) = match format {
                    WebhookFormat::Cloudevents => {
                        ("application/cloudevents+json", cloudevent_json(event))
                    }
                    WebhookFormat::Slack => (
                        "application/json",
                        serde_json::json!({"text": slack_text(event)}),
                    ),
                };
                post(client, url, content_type, Bytes::from(body.to_string())).await
            }
            Sink::OtlpGrpc { client } => {
                let mut client = client.clone();
                client
                    .export(otlp_request(event))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("OTLP gRPC: {s}"))
            }
            Sink::OtlpHttp { url, client } => {
                let body = prost::Message::encode_to_vec(&otlp_request(event));
                post(client, url, "application/x-protobuf", Bytes::from(body)).await
            }
        }
    }
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &http::Uri,
    content_type: &str,
    body: Bytes,
) -> Result<(), String> {
    let request = http::Request::post(url.clone())
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::USER_AGENT, "tidewatch-export")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = response.status();
    // Drain the body so the connection can be reused.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("POST {url}: HTTP {status}"))
    }
}

/// Structured-mode CloudEvent: the attributes, and the insight as JSON `data`.
pub fn cloudevent_json(event: &Event) -> serde_json::Value {
    let mut json = to_json(event);
    if let Some(obj) = json.as_object_mut() {
        obj.insert("specversion".into(), "1.0".into());
        obj.insert("datacontenttype".into(), "application/json".into());
    }
    json
}

/// One readable message for chat tools.
pub fn slack_text(event: &Event) -> String {
    match payload::<Insight>(event) {
        Ok(i) => {
            let mut text = format!(
                "*[{}] {}*: {}\nRoot cause: {}",
                i.severity, i.kind, i.summary, i.root_cause
            );
            if !i.affected.is_empty() {
                let affected: Vec<String> = i
                    .affected
                    .iter()
                    .map(|e| {
                        if e.namespace.is_empty() {
                            format!("{}/{}", e.kind, e.name)
                        } else {
                            format!("{}/{}/{}", e.kind, e.namespace, e.name)
                        }
                    })
                    .collect();
                text.push_str(&format!("\nAffected: {}", affected.join(", ")));
            }
            text.push_str(&format!(
                "\nEvidence: {} event(s), root cause event {} (insight {}, revision {}, confidence {:.0}%)",
                i.evidence_event_ids.len(),
                i.root_cause_event_id,
                i.id,
                i.revision,
                i.confidence * 100.0
            ));
            text
        }
        Err(_) => format!(
            "{} {} ({})",
            event.ty(),
            event.id(),
            event.subject().unwrap_or("-")
        ),
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(v: impl Into<String>) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

/// One OTLP log record per insight version.
pub fn otlp_request(event: &Event) -> ExportLogsServiceRequest {
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
    let time = event
        .time()
        .and_then(|t| t.timestamp_nanos_opt())
        .unwrap_or_default() as u64;
    let mut attributes = vec![
        kv("cloudevents.event_id", s(event.id())),
        kv("cloudevents.event_type", s(event.ty())),
        kv("cloudevents.event_source", s(event.source().to_string())),
    ];
    if let Some(subject) = event.subject() {
        attributes.push(kv("cloudevents.event_subject", s(subject)));
    }
    let (severity_number, severity_text, body, time) = match payload::<Insight>(event) {
        Ok(i) => {
            attributes.extend([
                kv("tidewatch.insight.id", s(&i.id)),
                kv("tidewatch.insight.kind", s(&i.kind)),
                kv(
                    "tidewatch.insight.revision",
                    any_value::Value::IntValue(i64::from(i.revision)),
                ),
                kv("tidewatch.insight.root_cause", s(&i.root_cause)),
                kv(
                    "tidewatch.insight.root_cause_event_id",
                    s(&i.root_cause_event_id),
                ),
                kv(
                    "tidewatch.insight.confidence",
                    any_value::Value::DoubleValue(i.confidence),
                ),
                kv(
                    "tidewatch.insight.first_seen_ns",
                    any_value::Value::IntValue(i.first_seen_ns),
                ),
                kv(
                    "tidewatch.insight.evidence_event_ids",
                    any_value::Value::ArrayValue(ArrayValue {
                        values: i
                            .evidence_event_ids
                            .iter()
                            .map(|e| AnyValue { value: Some(s(e)) })
                            .collect(),
                    }),
                ),
                kv(
                    "tidewatch.insight.affected",
                    any_value::Value::ArrayValue(ArrayValue {
                        values: i
                            .affected
                            .iter()
                            .map(|e| AnyValue {
                                value: Some(s(if e.namespace.is_empty() {
                                    format!("{}/{}", e.kind, e.name)
                                } else {
                                    format!("{}/{}/{}", e.kind, e.namespace, e.name)
                                })),
                            })
                            .collect(),
                    }),
                ),
            ]);
            // OTLP severity numbers: INFO 9, WARN 13, ERROR 17, FATAL 21.
            let number = match i.severity.as_str() {
                "critical" => 17,
                "warning" => 13,
                _ => 9,
            };
            (
                number,
                i.severity.to_uppercase(),
                i.summary.clone(),
                u64::try_from(i.last_seen_ns).unwrap_or(time),
            )
        }
        Err(_) => (9, "INFO".to_string(), to_json(event).to_string(), time),
    };
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![kv("service.name", s("tidewatch-export"))],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "tidewatch".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: vec![LogRecord {
                    time_unix_nano: time,
                    observed_time_unix_nano: now,
                    severity_number,
                    severity_text,
                    body: Some(AnyValue {
                        value: Some(s(body)),
                    }),
                    attributes,
                    ..Default::default()
                }],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}
