//! The runtime every Tidewatch collector and function shares.
//!
//! - [`topology`]: the one source of names: streams, subjects, consumers,
//!   KV buckets, event types. [`spec`]: functions as data (each crate's
//!   `function.toml`). [`provision`] creates them idempotently.
//! - [`event`]: building and reading events (deterministic ids, protobuf
//!   payloads, the 64 KiB limit, trace context).
//! - [`binding`]: CloudEvents over NATS (binary + structured) and HTTP.
//! - [`publisher`]: async JetStream publishing with bounded in-flight acks
//!   and same-id retries.
//! - [`spool`]: the bounded on-disk outage spool, replayed in order once NATS is back.
//! - [`outbox`]: what collectors publish through: the publisher while NATS
//!   is reachable, the spool while it is not, then a replay with the same ids.
//! - [`function`]: the `Function` trait and its `Outcome`.
//! - [`consume`] (JetStream pull, KEDA) and [`serve_http`] (HTTP, Knative):
//!   the two transports one function value runs on.
//! - [`dead_letter`]: where poison messages go, with the reason;
//!   [`poison`]: removing messages the NATS client cannot even parse.
//! - [`drops`]: reports of lost events (collector.drops), for the outbox's
//!   spool overflow and a collector's own stages.
//! - [`metrics`], [`telemetry`]: `/metrics`, health, logs, OTLP traces.
//! - [`host`]: the `main` of a function binary; [`shutdown`]: signals.
//! - [`collector`]: the collector host: the `Collector` trait,
//!   `collector_main`, shared flags and config, exit codes, the spool policy.

pub mod binding;
pub mod collector;
pub mod consume;
pub mod dead_letter;
pub mod drops;
pub mod event;
pub mod function;
pub mod host;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod poison;
pub mod provision;
pub mod publisher;
pub mod serve_http;
pub mod shutdown;
pub mod spec;
pub mod spool;
pub mod telemetry;
pub mod topology;

pub use cloudevents;
pub use function::{Context, Emitted, Function, Outcome};

/// Errors running a function or collector process.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Retryable: NATS could not be reached.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// Terminal: the environment is not set up (missing stream or consumer, bad config).
    #[error("{0}")]
    Setup(String),
    /// Retryable: a socket could not be bound or served.
    #[error("I/O: {0}")]
    Io(#[source] std::io::Error),
}

impl RuntimeError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, RuntimeError::Setup(_))
    }
}
