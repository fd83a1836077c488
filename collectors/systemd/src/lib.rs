//! Tidewatch systemd collector: unit state from systemd over D-Bus and
//! selected journal entries, published as CloudEvents to
//! `tidewatch.raw.systemd.<node>`.
//!
//! - [`units`]: the unit state machine (started, stopped, failed, restarted,
//!   crash loop), pure.
//! - [`dbus`]: the D-Bus edge: `Manager.Subscribe`, unit `PropertiesChanged`,
//!   `JobRemoved`, current state at (re)connect.
//! - [`journal`]: parsing and selecting `journalctl -o json` entries, ids from
//!   the cursor, pure.
//! - [`checkpoint`]: the journal cursor, saved only after the stream's ack.
//! - [`follow`]: the journal edge: `journalctl -f`, the ordered committer.
//! - [`emit`]: the one place events are handed to the outbox.
//! - [`collector`]: [`Systemd`], the collector the runtime's collector host
//!   runs (which owns `/metrics`, health, NATS, the outbox, shutdown);
//!   [`Collector`] and [`run`] for in-process use.
//! - [`config`]: the configuration and the collector's own flags;
//!   [`error`]: what stops it; [`preflight`]: `--check-host`.

pub mod checkpoint;
pub mod collector;
pub mod config;
pub mod dbus;
pub mod emit;
pub mod error;
pub mod follow;
pub mod journal;
pub mod preflight;
pub mod units;

/// Collector name in subjects, sources and metrics (`collector-systemd`).
pub const COLLECTOR: &str = "systemd";

pub use collector::{Collector, Handle, Systemd, run};
pub use config::Config;
pub use error::CollectorError;
