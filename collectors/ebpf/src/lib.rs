//! Tidewatch eBPF collector: process exec/exit, OOM kills and TCP
//! connections from the kernel (CO-RE programs in `ebpf/`, loaded with aya)
//! published as CloudEvents to `tidewatch.raw.ebpf.<node>`.
//!
//! - [`collector`]: load, attach, drain the ring, publish; [`run`].
//! - [`wire`]: the records the BPF programs write.
//! - [`config`]: the configuration, validated before anything loads.
//! - [`attribution`]: cgroup id → path → container id → pod uid.
//! - [`procfs`]: running processes, replayed as `process.exists`.
//! - [`preflight`]: whether this host can run the collector, and why not.

pub mod attribution;
pub mod collector;
pub mod config;
pub mod preflight;
pub mod procfs;
pub mod wire;

pub use collector::{COLLECTOR_DROPS, Collector, CollectorError, Handle, run};
pub use config::Config;
