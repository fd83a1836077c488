//! Where insights go: JSON lines on stdout, an HTTP webhook (structured
//! CloudEvents JSON, or Slack-compatible `{"text": ...}`), and OTLP logs
//! over gRPC or HTTP/protobuf.

use std::time::Duration;

use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
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

use crate::tls::{self, Trust, TrustError};

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

/// A sink cannot be set up. Terminal: a configuration mistake, reported at
/// startup (the process exits non-zero); retrying cannot fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The URL does not parse, or its scheme is neither `http` nor `https`.
    #[error("{sink} URL {url}: {reason}")]
    Url {
        sink: &'static str,
        url: String,
        reason: String,
    },
    /// An `https://` URL, but no usable trust (bad `--ca-file`, no roots).
    #[error("{sink} URL {url}: {error}")]
    Trust {
        sink: &'static str,
        url: String,
        error: TrustError,
    },
}

/// One delivery did not arrive. Always retryable: the insight is naked with
/// backoff, the sink's circuit breaker counts the failure, sinks that took
/// it are not called again, and after `max_deliver` attempts it is
/// dead-lettered whole with this reason (nothing is lost).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The TLS handshake failed: untrusted or expired certificate, wrong
    /// host name, not a TLS server...
    #[error("{target}: TLS handshake failed: {reason}")]
    Tls { target: String, reason: String },
    /// No connection, or it broke (refused, reset, DNS...).
    #[error("{target}: {reason}")]
    Transport { target: String, reason: String },
    /// The receiver answered with a non-2xx HTTP status.
    #[error("{target}: HTTP {status}")]
    Status {
        target: String,
        status: http::StatusCode,
    },
    /// The OTLP gRPC receiver answered with a non-OK status.
    #[error("{target}: gRPC {code:?}: {message}")]
    Grpc {
        target: String,
        code: tonic::Code,
        message: String,
    },
    /// The sink took longer than `--sink-timeout-ms`.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Writing to stdout failed.
    #[error("stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub enum Sink {
    Stdout,
    Webhook {
        url: http::Uri,
        format: WebhookFormat,
        client: HttpClient,
    },
    OtlpGrpc {
        endpoint: String,
        client: LogsServiceClient<tonic::transport::Channel>,
    },
    OtlpHttp {
        url: http::Uri,
        client: HttpClient,
    },
}

/// A URL as logs, errors and dead-letter headers may show it: scheme and
/// host only. A webhook's path is often its secret (Slack's is), and a URL
/// can carry credentials; dead letters are kept for days.
pub fn redacted(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) => {
            let host = uri.host().unwrap_or_default();
            let port = uri.port().map(|p| format!(":{p}")).unwrap_or_default();
            match uri.scheme_str() {
                Some(scheme) => format!("{scheme}://{host}{port}/..."),
                None if !host.is_empty() => format!("{host}{port}/..."),
                None => "a URL without a host".into(),
            }
        }
        Err(_) => format!(
            "a URL that does not parse ({} characters)",
            url.chars().count()
        ),
    }
}

/// An `http://` or `https://` URL.
fn parse_url(sink: &'static str, url: &str) -> Result<(http::Uri, bool), ConfigError> {
    let bad = |reason: String| ConfigError::Url {
        sink,
        url: redacted(url),
        reason,
    };
    let parsed: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    let https = match parsed.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(bad(format!(
                "unsupported scheme {other:?} (use http:// or https://)"
            )));
        }
        None => return Err(bad("no scheme (use http:// or https://)".into())),
    };
    if parsed.host().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    Ok((parsed, https))
}

/// An HTTP/1.1 client for `http://` and `https://` (verified against `trust`).
fn http_client(
    sink: &'static str,
    url: &http::Uri,
    https: bool,
    trust: &Trust,
) -> Result<HttpClient, ConfigError> {
    let config = if https {
        trust.client_config()
    } else {
        trust.client_config_unchecked()
    }
    .map_err(|error| ConfigError::Trust {
        sink,
        url: redacted(&url.to_string()),
        error,
    })?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

impl Sink {
    pub fn webhook(url: &str, format: WebhookFormat, trust: &Trust) -> Result<Sink, ConfigError> {
        let (url, https) = parse_url("webhook", url)?;
        let client = http_client("webhook", &url, https, trust)?;
        Ok(Sink::Webhook {
            url,
            format,
            client,
        })
    }

    pub fn otlp(
        endpoint: &str,
        protocol: OtlpProtocol,
        trust: &Trust,
    ) -> Result<Sink, ConfigError> {
        match protocol {
            OtlpProtocol::Grpc => {
                let (url, https) = parse_url("OTLP endpoint", endpoint)?;
                let bad = |reason: String| ConfigError::Url {
                    sink: "OTLP endpoint",
                    url: endpoint.to_string(),
                    reason,
                };
                let mut channel = tonic::transport::Channel::from_shared(url.to_string())
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(Duration::from_secs(5));
                if https {
                    let verifier = trust.verifier().map_err(|error| ConfigError::Trust {
                        sink: "OTLP endpoint",
                        url: redacted(&url.to_string()),
                        error,
                    })?;
                    channel = channel
                        .tls_config_with_verifier(
                            tonic::transport::ClientTlsConfig::new()
                                .timeout(Duration::from_secs(5)),
                            verifier,
                        )
                        .map_err(|e| bad(format!("TLS setup: {}", tls::chain(&e))))?;
                }
                Ok(Sink::OtlpGrpc {
                    endpoint: url.to_string(),
                    client: LogsServiceClient::new(channel.connect_lazy()),
                })
            }
            OtlpProtocol::Http => {
                let base = endpoint.trim_end_matches('/');
                let full = if base.ends_with("/v1/logs") {
                    base.to_string()
                } else {
                    format!("{base}/v1/logs")
                };
                let (url, https) = parse_url("OTLP endpoint", &full)?;
                let client = http_client("OTLP endpoint", &url, https, trust)?;
                Ok(Sink::OtlpHttp { url, client })
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Sink::Stdout => "stdout".into(),
            Sink::Webhook { url, .. } => format!("webhook {}", redacted(&url.to_string())),
            Sink::OtlpGrpc { endpoint, .. } => {
                format!("otlp-grpc {}", redacted(&endpoint.to_string()))
            }
            Sink::OtlpHttp { url, .. } => format!("otlp-http {}", redacted(&url.to_string())),
        }
    }

    /// Deliver one event; Err says why it did not arrive (always retryable).
    pub async fn send(&self, event: &Event) -> Result<(), SendError> {
        match self {
            Sink::Stdout => {
                use std::io::Write;
                let line = to_json(event).to_string();
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").and_then(|_| out.flush())?;
                Ok(())
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
            Sink::OtlpGrpc { endpoint, client } => {
                let mut client = client.clone();
                client
                    .export(otlp_request(event))
                    .await
                    .map(|_| ())
                    .map_err(|status| grpc_error(endpoint, &status))
            }
            Sink::OtlpHttp { url, client } => {
                let body = prost::Message::encode_to_vec(&otlp_request(event));
                post(client, url, "application/x-protobuf", Bytes::from(body)).await
            }
        }
    }
}

fn grpc_error(endpoint: &str, status: &tonic::Status) -> SendError {
    let target = format!("OTLP gRPC {}", redacted(endpoint));
    if let Some(tls) = tls::tls_failure(status) {
        return SendError::Tls {
            target,
            reason: tls::describe_tls(tls),
        };
    }
    // The message, and the transport error behind it (which often repeats it).
    let message = match std::error::Error::source(status).map(tls::chain) {
        Some(source) if source.contains(status.message()) => source,
        Some(source) => format!("{}: {source}", status.message()),
        None => status.message().to_string(),
    };
    SendError::Grpc {
        target,
        code: status.code(),
        message,
    }
}

async fn post(
    client: &HttpClient,
    url: &http::Uri,
    content_type: &str,
    body: Bytes,
) -> Result<(), SendError> {
    let target = format!("POST {}", redacted(&url.to_string()));
    let request = http::Request::post(url.clone())
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::USER_AGENT, "tidewatch-export")
        .body(Full::new(body))
        .map_err(|e| SendError::Transport {
            target: target.clone(),
            reason: e.to_string(),
        })?;
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(e) => {
            return Err(match tls::tls_failure(&e) {
                Some(tls) => SendError::Tls {
                    target,
                    reason: tls::describe_tls(tls),
                },
                None => SendError::Transport {
                    target,
                    reason: tls::chain(&e),
                },
            });
        }
    };
    let status = response.status();
    // Drain the body so the connection can be reused.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(SendError::Status { target, status })
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

/// An insight's lifecycle status; producers older than the field send
/// none, which means open.
pub fn status(insight: &Insight) -> &str {
    if insight.status.is_empty() {
        "open"
    } else {
        &insight.status
    }
}

/// One readable message for chat tools.
pub fn slack_text(event: &Event) -> String {
    match payload::<Insight>(event) {
        Ok(i) => {
            // The lifecycle leads: an on-call reader sees first whether
            // this pages, closes or folds into another insight.
            let mut text = match status(&i) {
                "resolved" => format!(
                    "*RESOLVED [{}] {}*: {}\nResolved by event {}",
                    i.severity, i.kind, i.summary, i.resolved_by_event_id
                ),
                "superseded" => format!(
                    "*SUPERSEDED [{}] {}*: {}\nNow part of insight {}",
                    i.severity, i.kind, i.summary, i.superseded_by
                ),
                _ => format!(
                    "*[{}] {}*: {}\nRoot cause: {}",
                    i.severity, i.kind, i.summary, i.root_cause
                ),
            };
            if !i.supersedes.is_empty() {
                text.push_str(&format!("\nAlso explains: {}", i.supersedes.join(", ")));
            }
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
                kv("tidewatch.insight.status", s(status(&i))),
                kv(
                    "tidewatch.insight.resolved_by_event_id",
                    s(&i.resolved_by_event_id),
                ),
                kv("tidewatch.insight.superseded_by", s(&i.superseded_by)),
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
            // A resolution or supersession is news, not an alarm: INFO.
            let number = match (status(&i), i.severity.as_str()) {
                ("resolved" | "superseded", _) => 9,
                (_, "critical") => 17,
                (_, "warning") => 13,
                _ => 9,
            };
            (
                number,
                if number == 9 {
                    "INFO".to_string()
                } else {
                    i.severity.to_uppercase()
                },
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

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn insight_event(insight: &Insight) -> Event {
        tidewatch_runtime::event::new_event(
            "m1".to_string(),
            &tidewatch_runtime::topology::types::insight(&insight.kind),
            "/tidewatch/correlate/n1",
            Some("service/shop/api"),
            chrono::Utc::now(),
            insight,
        )
        .expect("event")
    }

    fn attribute(request: &ExportLogsServiceRequest, key: &str) -> Option<String> {
        request.resource_logs[0].scope_logs[0].log_records[0]
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
    }

    #[test]
    fn every_sink_says_an_insight_is_resolved_or_superseded() {
        let open = Insight {
            id: "i1".into(),
            kind: "service-disruption".into(),
            severity: "critical".into(),
            summary: "service shop/api has no ready endpoints".into(),
            root_cause: "all endpoints went away".into(),
            revision: 2,
            status: "open".into(),
            supersedes: vec!["c1".into()],
            ..Insight::default()
        };
        let resolved = Insight {
            status: "resolved".into(),
            resolved_by_event_id: "back".into(),
            revision: 3,
            ..open.clone()
        };
        let superseded = Insight {
            kind: "crash-loop".into(),
            status: "superseded".into(),
            superseded_by: "o1".into(),
            ..open.clone()
        };
        let text = slack_text(&insight_event(&open));
        assert!(
            text.starts_with("*[critical] service-disruption*"),
            "{text}"
        );
        assert!(text.contains("Also explains: c1"), "{text}");
        let text = slack_text(&insight_event(&resolved));
        assert!(
            text.starts_with("*RESOLVED [critical]") && text.contains("Resolved by event back"),
            "{text}"
        );
        let text = slack_text(&insight_event(&superseded));
        assert!(
            text.starts_with("*SUPERSEDED") && text.contains("Now part of insight o1"),
            "{text}"
        );

        let request = otlp_request(&insight_event(&open));
        assert_eq!(
            attribute(&request, "tidewatch.insight.status").as_deref(),
            Some("open")
        );
        assert_eq!(
            request.resource_logs[0].scope_logs[0].log_records[0].severity_number,
            17
        );
        let request = otlp_request(&insight_event(&resolved));
        assert_eq!(
            attribute(&request, "tidewatch.insight.status").as_deref(),
            Some("resolved")
        );
        assert_eq!(
            attribute(&request, "tidewatch.insight.resolved_by_event_id").as_deref(),
            Some("back")
        );
        let record = &request.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(
            (record.severity_number, record.severity_text.as_str()),
            (9, "INFO")
        );
        // An insight from before the status field reads as open.
        let legacy = Insight {
            status: String::new(),
            ..open.clone()
        };
        assert_eq!(
            attribute(
                &otlp_request(&insight_event(&legacy)),
                "tidewatch.insight.status"
            )
            .as_deref(),
            Some("open")
        );
        // The webhook carries the whole insight, status included.
        let json = cloudevent_json(&insight_event(&resolved));
        assert_eq!(json["data"]["status"], "resolved", "{json}");
    }

    fn config_error(r: Result<Sink, ConfigError>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn secrets_in_webhook_urls_never_reach_messages() {
        let slack = "https://hooks.slack.example/services/T000/B000/XXXXsecretXXXX";
        assert_eq!(redacted(slack), "https://hooks.slack.example/...");
        let with_user = "https://user:pw@receiver.example:8443/in?token=abc";
        assert_eq!(redacted(with_user), "https://receiver.example:8443/...");
        // Without trust roots an https URL is a configuration error: it
        // names the host, not the secret path.
        let trust = Trust::empty();
        let e = config_error(Sink::webhook(slack, WebhookFormat::Slack, &trust));
        assert!(
            e.contains("hooks.slack.example") && !e.contains("secret"),
            "{e}"
        );
        let sink = Sink::webhook(
            "http://hooks.example/services/XXXXsecretXXXX",
            WebhookFormat::Slack,
            &trust,
        )
        .expect("valid");
        assert!(!sink.name().contains("secret"), "{}", sink.name());
    }

    #[tokio::test]
    async fn malformed_urls_are_config_errors_naming_the_url() {
        let trust = Trust::empty();
        let e = config_error(Sink::webhook(
            "ftp://hooks.example/x",
            WebhookFormat::Slack,
            &trust,
        ));
        assert!(
            e.contains("ftp://hooks.example/...") && e.contains("unsupported scheme"),
            "{e}"
        );
        let e = config_error(Sink::webhook("hooks example", WebhookFormat::Slack, &trust));
        assert!(
            e.starts_with("webhook URL a URL that does not parse (13 characters): "),
            "{e}"
        );
        let e = config_error(Sink::otlp("collector:4317", OtlpProtocol::Grpc, &trust));
        assert!(e.starts_with("OTLP endpoint URL "), "{e}");
        let e = config_error(Sink::otlp("/v1/logs", OtlpProtocol::Http, &trust));
        assert!(e.contains("no scheme"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_receiver_is_a_transport_error_naming_the_url() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let event = tidewatch_runtime::event::new_event(
            "id-1".to_string(),
            "dev.tidewatch.insight.test",
            "/test",
            None,
            chrono::Utc::now(),
            &Insight::default(),
        )
        .expect("event");
        let trust = Trust::empty();
        let webhook = Sink::webhook(
            &format!("http://127.0.0.1:{port}/hook"),
            WebhookFormat::Cloudevents,
            &trust,
        )
        .expect("webhook");
        let e = webhook.send(&event).await.expect_err("nobody listens");
        assert!(matches!(e, SendError::Transport { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with(&format!("POST http://127.0.0.1:{port}/...: ")) && !e.contains("TLS"),
            "{e}"
        );
        let grpc = Sink::otlp(
            &format!("http://127.0.0.1:{port}"),
            OtlpProtocol::Grpc,
            &trust,
        )
        .expect("grpc");
        let e = grpc.send(&event).await.expect_err("nobody listens");
        assert!(matches!(e, SendError::Grpc { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with(&format!(
                "OTLP gRPC http://127.0.0.1:{port}/...: gRPC Unavailable"
            )),
            "{e}"
        );
    }

    #[tokio::test]
    async fn https_without_any_trusted_ca_is_a_config_error() {
        let trust = Trust::empty();
        for sink in [
            Sink::webhook(
                "https://hooks.example/x",
                WebhookFormat::Cloudevents,
                &trust,
            ),
            Sink::otlp("https://collector:4317", OtlpProtocol::Grpc, &trust),
            Sink::otlp("https://collector:4318", OtlpProtocol::Http, &trust),
        ] {
            let e = config_error(sink);
            assert!(
                e.contains("https://") && e.contains("no trusted CA certificates"),
                "{e}"
            );
        }
        // Plain http needs no trust.
        assert!(Sink::webhook("http://hooks.example/x", WebhookFormat::Slack, &trust).is_ok());
        assert!(Sink::otlp("http://collector:4317", OtlpProtocol::Grpc, &trust).is_ok());
        assert!(Sink::otlp("http://collector:4318", OtlpProtocol::Http, &trust).is_ok());
    }
}
