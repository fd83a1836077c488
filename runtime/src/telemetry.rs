//! Logs and traces for every process.
//!
//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`),
//! JSON when `TIDEWATCH_LOG_FORMAT=json` (for log collectors), compact text
//! otherwise. Traces: exported over OTLP/gRPC when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The CloudEvents `traceparent`
//! extension links spans across processes: a handler's span is a child of
//! its input's trace, and the events it emits carry the handler's span.

use cloudevents::Event;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

use crate::event::{TRACEPARENT, carry_trace};

/// Keeps the trace exporter alive; flushes pending spans on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("tidewatch: flushing traces failed: {e}");
        }
    }
}

/// Install the global subscriber for `service`. Call once, inside the tokio
/// runtime (the OTLP exporter needs it). A second call is a no-op.
pub fn init(service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TIDEWATCH_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let provider = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|_| match otlp_provider(service) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("tidewatch: OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter failed to start: {e}");
            None
        }
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_string())));
    let fmt_json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let fmt_text = (!json).then(|| {
        // Colour only on a terminal: `tidewatch up` and log shippers write
        // stderr to files, where escape codes are noise.
        let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var_os("NO_COLOR").is_none();
        tracing_subscriber::fmt::layer()
            .compact()
            .with_ansi(colour)
            .with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt_json)
        .with(fmt_text)
        .try_init();
    Telemetry { provider }
}

fn otlp_provider(
    service: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build())
}

/// Parse a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Format a span context as a W3C `traceparent`.
pub fn format_traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// Make `span` a child of the trace `event` carries, if any.
pub fn adopt_parent(span: &tracing::Span, event: &Event) {
    let Some(parent) = event
        .extension(TRACEPARENT)
        .and_then(|v| parse_traceparent(&v.to_string()))
    else {
        return;
    };
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
}

/// Give `output` the trace context of the span that produced it; without an
/// exporter (no real span), carry the input's context unchanged. A
/// `traceparent` the output shares with its input was copied along with the
/// input's extensions (enrich emits the input, enriched), so it is replaced
/// too; one the handler set to something else is kept.
pub fn stamp(span: &tracing::Span, input: &Event, output: &mut Event) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    let own_parent = output
        .extension(TRACEPARENT)
        .is_some_and(|tp| input.extension(TRACEPARENT) != Some(tp));
    if span_context.is_valid() && !own_parent {
        output.set_extension(TRACEPARENT, format_traceparent(&span_context));
    } else {
        carry_trace(input, output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_rejects() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse_traceparent(tp).expect("valid");
        assert_eq!(format_traceparent(&context), tp);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }
}
