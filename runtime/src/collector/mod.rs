//! The collector host: what every collector shares, as the function host
//! ([`crate::host`]) is for functions. A collector implements [`Collector`]
//! and its `main` is one line:
//!
//! ```no_run
//! # use tidewatch_runtime::collector::*;
//! # fn main_<C: Collector>() -> std::process::ExitCode {
//! collector_main::<C>()
//! # }
//! ```
//!
//! - [`config`]: [`CommonConfig`] (flattened into each collector's TOML
//!   config) and [`CommonArgs`] (flattened into its flags).
//! - [`host`]: [`CollectorHost`] (metrics, admin endpoint, NATS, outbox,
//!   the spool policy, flush on stop), the [`Context`] a running collector
//!   gets, [`Started`] and [`run`] for in-process use.
//! - [`exit`]: the one exit-code table and [`ErrorKind`].
//! - [`process`]: [`collector_main`], the binary's `main`.
//! - Here: the [`Collector`] trait, [`default_node`] and [`seconds`].

use std::future::Future;

use crate::metrics::Metrics;

pub mod config;
pub mod exit;
pub mod host;
pub mod process;

pub use config::{CollectorConfig, CommonArgs, CommonConfig};
pub use exit::{ErrorKind, Failure};
pub use host::{CollectorHost, Context, SetupError, Started, run, until};
pub use process::collector_main;

/// One collector, run by [`collector_main`] or [`run`].
pub trait Collector: Sized + Send + 'static {
    /// `ebpf`, `k8s`, `systemd`: the subject token, `collector-<name>` in
    /// metrics labels and logs, `tidewatch-collector-<name>` the binary.
    const NAME: &'static str;
    /// What `--help` says the collector does.
    const ABOUT: &'static str;
    /// The environment variable that names the config file (`--config`).
    const CONFIG_ENV: &'static str;
    /// The collector's configuration, [`CommonConfig`] flattened in.
    type Config: CollectorConfig;
    /// The collector's own flags, beside [`CommonArgs`] ([`NoArgs`] if none).
    type Args: clap::Args;
    /// Why it cannot start or stopped; says its exit code.
    type Error: Failure + From<SetupError>;

    /// Let the collector's own flags override the file.
    fn apply(args: Self::Args, config: &mut Self::Config);

    /// Whether this host can run the collector; Err says why not, in one
    /// plain line (`--check-host`, `tidewatch up`).
    fn check_host(config: &Self::Config) -> impl Future<Output = Result<(), String>> + Send;

    /// Validate `config` and take what needs neither NATS nor a port (load
    /// programs, find credentials). `metrics` is the registry the admin
    /// endpoint will serve; register the collector's own metrics on it.
    fn start(
        config: Self::Config,
        metrics: &Metrics,
    ) -> impl Future<Output = Result<Self, Self::Error>> + Send;

    /// Collect until `cx.stop` turns true, hand everything read to
    /// `cx.outbox`, then return (the host flushes the outbox).
    fn run(self, cx: Context) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// For a collector without flags of its own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NoArgs {}

/// `collector-<name>`: the metrics `component` label and the service name.
pub fn component(name: &str) -> String {
    format!("collector-{name}")
}

/// The node's hostname (what `NODE_NAME` defaults to outside Kubernetes),
/// or `localhost`.
pub fn default_node() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `#[serde(with = "tidewatch_runtime::collector::seconds")]`: a duration
/// written as a positive number of seconds (`2.5`), refused otherwise.
pub mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        if !(secs > 0.0 && secs.is_finite()) {
            return Err(serde::de::Error::custom(
                "a duration must be a positive number of seconds",
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct Interval {
        #[serde(with = "super::seconds")]
        every: std::time::Duration,
    }

    #[test]
    fn seconds_are_positive_and_finite() {
        let ok: Interval = serde_json::from_str(r#"{"every": 2.5}"#).expect("2.5 s");
        assert_eq!(ok.every, std::time::Duration::from_millis(2500));
        for bad in ["0", "-1"] {
            let err = serde_json::from_str::<Interval>(&format!(r#"{{"every": {bad}}}"#))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("positive number of seconds"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_node_name_is_never_empty() {
        assert!(!super::default_node().is_empty());
    }
}
