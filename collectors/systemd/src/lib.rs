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
//! - [`emit`]: the one place events are handed to the publisher.
//! - [`collector`]: wiring, `/metrics` and health, shutdown; [`run`].
//! - [`config`]: the configuration; [`preflight`]: `--check-host`.

pub mod checkpoint;
pub mod collector;
pub mod config;
pub mod dbus;
pub mod emit;
pub mod follow;
pub mod journal;
pub mod preflight;
pub mod units;

pub use collector::{COLLECTOR, Collector, CollectorError, ErrorKind, Handle, run};
pub use config::Config;
