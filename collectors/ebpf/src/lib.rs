//! Tidewatch eBPF collector: process exec/exit, OOM kills and TCP
//! connections from the kernel (CO-RE programs in `ebpf/`, loaded with aya)
//! published as CloudEvents to `tidewatch.raw.ebpf.<node>`.
//!
//! By job, in the order a record travels:
//!
//! - [`load`]: load the BPF object, set its filters, attach the tracepoints.
//! - [`ring`]: drain the ring buffer and the retransmits map into the queue.
//! - [`wire`]: the records the BPF programs write.
//! - [`mapping`]: a record → its CloudEvent, and the deterministic ids;
//!   [`attribution`]: cgroup id → path → container id → pod uid.
//! - [`publish`]: the queue → the runtime's outbox, acks counted per kind.
//! - [`snapshot`]: running processes ([`procfs`]) as `process.exists` at start.
//! - [`drops`]: periodic `collector.drops` reports of what was lost.
//! - [`kernel_drops`]: the kernel's per-CPU, per-kind drop counters.
//! - [`stats`]: the collector's counters, on the runtime's `/metrics`.
//! - [`collector`]: [`Ebpf`], the wiring the runtime's collector host runs;
//!   [`Collector`] and [`run`] for in-process use.
//! - [`config`]: the configuration, validated before anything loads;
//!   [`error`]: what stops the collector; [`preflight`]: `--check-host`.

pub mod attribution;
pub mod collector;
pub mod config;
pub mod drops;
pub mod error;
pub mod kernel_drops;
pub mod load;
pub mod mapping;
pub mod preflight;
pub mod procfs;
pub mod publish;
pub mod ring;
pub mod snapshot;
pub mod stats;
pub mod wire;

pub use collector::{Collector, Ebpf, Handle, run};
/// CloudEvent type of the periodic drop report.
pub use tidewatch_runtime::topology::types::COLLECTOR_DROPS;

/// Collector name in subjects, sources and metrics (`collector-ebpf`).
pub const COLLECTOR: &str = "ebpf";
pub use config::Config;
pub use error::CollectorError;
