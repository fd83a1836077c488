//! export: ships insights to where people look ([`sinks`]): JSON lines on
//! stdout, an HTTP webhook (CloudEvents JSON or Slack text), OTLP logs over
//! gRPC or HTTP.
//!
//! Every sink gets every insight at least once, and receivers deduplicate
//! by the CloudEvent id (one id per insight revision):
//!
//! - Sinks are called concurrently, each with a timeout, so a slow sink
//!   does not hold up the others.
//! - A sink that fails makes the input retry (nak with backoff); sinks that
//!   already took it are remembered and not called again for it. After the
//!   consumer's `max_deliver` attempts the insight goes to the dead-letter
//!   stream, from where `tidewatch replay` re-drives it: nothing is lost.
//! - A circuit breaker per sink ([`breaker`]) fails fast while a sink is
//!   down, so retries do not pile up on a dead endpoint.
//!
//! Webhook and OTLP endpoints may be `http://` or `https://` ([`tls`]):
//! server certificates are verified against the system CA certificates plus
//! an optional PEM bundle, `--ca-file` / `TIDEWATCH_EXPORT_CA_FILE` (e.g. an
//! internal CA). A malformed URL or a bad CA file is a configuration error:
//! export exits at startup naming it. A failed TLS handshake (untrusted
//! certificate, wrong host...) is a sink failure like any other: retried,
//! counted by the breaker, dead-lettered after `max_deliver`, and its reason
//! names the URL and what TLS rejected.

mod breaker;
mod sinks;
mod tls;

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use cloudevents::{AttributesReader, Event};
use tidewatch_runtime::host::{FunctionArgs, Host};
use tidewatch_runtime::topology;
use tidewatch_runtime::{Context, Function, Outcome};

use breaker::{Breaker, Permit};
use sinks::{OtlpProtocol, SendError, Sink, WebhookFormat};
use tls::Trust;

/// Tidewatch export function: insights → stdout, webhook, OTLP logs.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    function: FunctionArgs,
    /// Write each insight as a JSON line to stdout.
    #[arg(long, env = "TIDEWATCH_EXPORT_STDOUT", default_value_t = true, action = clap::ArgAction::Set)]
    stdout: bool,
    /// POST each insight to this URL (http:// or https://).
    #[arg(long, env = "TIDEWATCH_EXPORT_WEBHOOK")]
    webhook: Option<String>,
    /// Webhook body: a structured CloudEvent, or Slack-compatible text.
    #[arg(
        long,
        env = "TIDEWATCH_EXPORT_WEBHOOK_FORMAT",
        value_enum,
        default_value = "cloudevents"
    )]
    webhook_format: WebhookFormat,
    /// Send each insight as an OTLP log record to this endpoint (http(s)://host:4317 for gRPC, :4318 for HTTP).
    #[arg(long, env = "TIDEWATCH_EXPORT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[arg(
        long,
        env = "TIDEWATCH_EXPORT_OTLP_PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    otlp_protocol: OtlpProtocol,
    /// Extra CA certificates (PEM bundle) trusted for https:// sinks, on top of the system's.
    #[arg(long, env = "TIDEWATCH_EXPORT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Durable consumer on TIDEWATCH_INSIGHTS this instance reads. Each
    /// export deployment has its own (a `functions/<group>/function.toml`
    /// with `binary = "tidewatch-export"`, which `tidewatch render` and
    /// `provision` turn into a Deployment and a durable), so its pace and
    /// failures never touch another's.
    #[arg(long, env = "TIDEWATCH_EXPORT_CONSUMER", default_value = "export")]
    consumer: String,
    /// Longest one sink may take for one insight (ms).
    #[arg(long, env = "TIDEWATCH_EXPORT_SINK_TIMEOUT_MS", default_value_t = 5000)]
    sink_timeout_ms: u64,
    /// Consecutive failures that open a sink's circuit breaker.
    #[arg(long, env = "TIDEWATCH_EXPORT_BREAKER_FAILURES", default_value_t = 5)]
    breaker_failures: u32,
    /// How long an open breaker fails fast before a trial call (ms).
    #[arg(
        long,
        env = "TIDEWATCH_EXPORT_BREAKER_OPEN_MS",
        default_value_t = 30_000
    )]
    breaker_open_ms: u64,
}

/// Ids a sink has taken, bounded (oldest forgotten first).
struct Delivered {
    ids: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Delivered {
    fn new(cap: usize) -> Delivered {
        Delivered {
            ids: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
    fn insert(&mut self, id: &str) {
        if self.ids.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

struct Slot {
    sink: Sink,
    name: String,
    breaker: Breaker,
    delivered: Mutex<Delivered>,
}

struct Export {
    slots: Vec<Slot>,
    timeout: Duration,
}

enum Result1 {
    Ok,
    Failed(String, Option<Duration>),
}

impl Export {
    async fn deliver(&self, slot: &Slot, event: &Event) -> Result1 {
        let id = event.id();
        if slot
            .delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
        {
            return Result1::Ok;
        }
        if let Permit::Wait(wait) = slot.breaker.permit(Instant::now()) {
            return Result1::Failed(format!("{}: circuit open", slot.name), Some(wait));
        }
        let outcome = match tokio::time::timeout(self.timeout, slot.sink.send(event)).await {
            Ok(r) => r,
            Err(_) => Err(SendError::Timeout(self.timeout)),
        };
        match outcome {
            Ok(()) => {
                slot.breaker.success();
                slot.delivered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                Result1::Ok
            }
            Err(reason) => {
                if slot.breaker.failure(Instant::now()) {
                    tracing::warn!(sink = %slot.name, %reason, "sink failing: circuit opened");
                }
                Result1::Failed(format!("{}: {reason}", slot.name), None)
            }
        }
    }
}

impl Function for Export {
    /// Only insights leave: anything else re-driven to export's consumer (a
    /// replay of the wrong stream) is acked without reaching a sink.
    fn accepts(&self, event_type: &str) -> bool {
        event_type.starts_with(tidewatch_runtime::topology::types::INSIGHT_PREFIX)
    }

    async fn handle(&self, event: Event, ctx: &Context) -> Outcome {
        let results =
            futures::future::join_all(self.slots.iter().map(|slot| self.deliver(slot, &event)))
                .await;
        let mut reasons = Vec::new();
        let mut wait: Option<Duration> = None;
        for r in results {
            if let Result1::Failed(reason, w) = r {
                reasons.push(reason);
                if let Some(w) = w {
                    wait = Some(wait.map_or(w, |x| x.min(w)));
                }
            }
        }
        if reasons.is_empty() {
            Outcome::Done
        } else {
            // Exponential backoff per delivery, at least until an open breaker lets a trial through.
            let backoff = Duration::from_millis(500)
                .saturating_mul(1 << ctx.delivery.saturating_sub(1).min(7))
                .min(Duration::from_secs(60));
            Outcome::retry(wait.map_or(backoff, |w| w.max(backoff)), reasons.join("; "))
        }
    }
}

fn slots(args: &Args) -> anyhow::Result<Vec<Slot>> {
    let mut sinks = Vec::new();
    if args.stdout {
        sinks.push(Sink::Stdout);
    }
    // The system roots are only read when TLS may be used.
    let https = [&args.webhook, &args.otlp_endpoint]
        .into_iter()
        .flatten()
        .any(|url| url.trim_start().to_ascii_lowercase().starts_with("https:"));
    let trust = if https || args.ca_file.is_some() {
        Trust::load(args.ca_file.as_deref())?
    } else {
        Trust::empty()
    };
    if let Some(url) = &args.webhook {
        sinks.push(Sink::webhook(url, args.webhook_format, &trust)?);
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        sinks.push(Sink::otlp(endpoint, args.otlp_protocol, &trust)?);
    }
    if sinks.is_empty() {
        anyhow::bail!("no sink configured: enable --stdout or set --webhook / --otlp-endpoint");
    }
    Ok(sinks
        .into_iter()
        .map(|sink| Slot {
            name: sink.name(),
            sink,
            breaker: Breaker::new(
                args.breaker_failures,
                Duration::from_millis(args.breaker_open_ms),
            ),
            delivered: Mutex::new(Delivered::new(100_000)),
        })
        .collect())
}

/// export's own place in the pipeline; the CLI reads the same file.
const SPEC: &str = include_str!("../function.toml");

/// The function spec for an export reading `consumer`: export's own, on
/// that durable (another sink group's, made by provisioning from its own
/// function.toml, or by hand). Its name is the durable's, so metrics,
/// traces and dead letters say which group they belong to.
fn spec_for(consumer: &str) -> anyhow::Result<topology::FunctionSpec> {
    let export = topology::FunctionSpec::from_toml(SPEC)?;
    if consumer == export.consumer.durable {
        return Ok(export);
    }
    if consumer.is_empty()
        || !consumer
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!("--consumer {consumer:?}: a durable name is letters, digits, '-' and '_'");
    }
    // Leaked once at startup: the runtime keeps names for the process' life.
    let name: &'static str = Box::leak(consumer.to_string().into_boxed_str());
    Ok(topology::FunctionSpec {
        name,
        consumer: topology::ConsumerSpec {
            durable: name,
            ..export.consumer.clone()
        },
        ..export
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = Host::start(spec_for(&args.consumer)?, args.function.clone()).await?;
    let slots = slots(&args)?;
    tracing::info!(sinks = ?slots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), "exporting");
    host.run(Export {
        slots,
        timeout: Duration::from_millis(args.sink_timeout_ms),
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn its_function_toml_is_valid_and_names_each_sink_groups_durable() {
        let export = spec_for("export").expect("function.toml");
        assert_eq!(
            (export.name, export.consumer.stream, export.output_stream),
            ("export", "insights", None)
        );
        let siem = spec_for("export-siem").expect("another durable");
        assert_eq!(
            (siem.name, siem.consumer.durable),
            ("export-siem", "export-siem")
        );
        assert_eq!(siem.consumer.stream, "insights");
        assert!(spec_for("a b").is_err());
    }

    #[test]
    fn delivered_ids_are_bounded() {
        let mut d = Delivered::new(2);
        d.insert("a");
        d.insert("b");
        d.insert("a");
        assert!(d.contains("a") && d.contains("b"));
        d.insert("c");
        assert!(!d.contains("a"));
        assert!(d.contains("b") && d.contains("c"));
    }
}
