//! Collector configuration: a TOML file (every key optional, unknown keys
//! refused) with the runtime's [`CommonConfig`] keys (NATS, node, metrics,
//! spool) flattened in, plus flags/environment ([`Args`] and the runtime's
//! common flags) over it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tidewatch_runtime::collector::{CollectorConfig, CommonConfig};

/// Where the outage spool is when `spool_dir` is not set.
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/tidewatch/spool/k8s";

/// Everything the collector needs to run.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS, node (`spec.nodeName` of the pods watched; subject token and
    /// CloudEvent source), metrics address, spool directory (default
    /// [`DEFAULT_SPOOL_DIR`]).
    #[serde(flatten)]
    pub common: CommonConfig,
    /// Watch cluster-scoped objects only while holding the Lease. Off: this
    /// instance always watches them (a single-replica Deployment).
    pub leader_election: bool,
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// Holder identity; default: the node name.
    pub identity: Option<String>,
    /// Seconds a lease stays valid without renewal.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub lease_duration: Duration,
    /// Seconds a leader keeps trying to renew before it steps down
    /// (less than `lease_duration`).
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub renew_deadline: Duration,
    /// Seconds between election attempts.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub retry_period: Duration,
    /// Seconds a deleted pod's metadata stays in KV, so late events resolve.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub pod_grace: Duration,
    /// Seconds between re-puts of every pod metadata entry this collector
    /// owns (its node's pods; Services on the leader). The bucket expires
    /// entries after its `max_age` (one hour), so entries of pods deleted
    /// while no collector ran on their node go by themselves; at most a
    /// third of `max_age`, so two failed rounds still lose nothing.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub kv_refresh: Duration,
    /// Seconds a restarted container must run without restarting again
    /// before it is reported stable (`dev.tidewatch.k8s.container.stable`,
    /// which closes crash-loop and OOM-cascade insights): the crash-loop
    /// rule's window.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub stable_after: Duration,
    /// Server-side timeout of one watch request, seconds (the watcher
    /// re-watches from its last resourceVersion after it).
    pub watch_timeout_secs: u32,
    /// Unacknowledged publishes at once.
    pub max_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: CommonConfig::default(),
            leader_election: true,
            lease_namespace: std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "tidewatch".into()),
            lease_name: "tidewatch-collector-k8s".into(),
            identity: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            pod_grace: Duration::from_secs(300),
            kv_refresh: Duration::from_secs(600),
            stable_after: Duration::from_secs(600),
            watch_timeout_secs: 290,
            max_in_flight: 1024,
        }
    }
}

pub use tidewatch_runtime::collector::default_node;

impl Config {
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.common.nats_url = url.into();
        self
    }
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.common.node = node.into();
        self
    }
    pub fn metrics_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.common.metrics_addr = addr;
        self
    }
    pub fn leader_election(mut self, on: bool) -> Self {
        self.leader_election = on;
        self
    }
    pub fn lease(mut self, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        self.lease_namespace = namespace.into();
        self.lease_name = name.into();
        self
    }
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }
    /// Lease duration, renew deadline and retry period.
    pub fn election_timing(
        mut self,
        lease: Duration,
        renew_deadline: Duration,
        retry: Duration,
    ) -> Self {
        self.lease_duration = lease;
        self.renew_deadline = renew_deadline;
        self.retry_period = retry;
        self
    }
    pub fn pod_grace(mut self, grace: Duration) -> Self {
        self.pod_grace = grace;
        self
    }
    pub fn kv_refresh(mut self, every: Duration) -> Self {
        self.kv_refresh = every;
        self
    }
    pub fn stable_after(mut self, after: Duration) -> Self {
        self.stable_after = after;
        self
    }
    pub fn spool_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.common.spool_dir = Some(dir.into());
        self
    }

    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        <Config as CollectorConfig>::from_file(path)
    }

    /// Refuse settings that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        let node = &self.common.node;
        if node.trim().is_empty() || node == "unknown" {
            return Err(
                "node name unknown: set NODE_NAME (the downward API's spec.nodeName)".into(),
            );
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "renew_deadline ({:?}) must be shorter than lease_duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(format!(
                "retry_period ({:?}) must be shorter than renew_deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        let max_age = tidewatch_runtime::topology::POD_METADATA.max_age;
        if self.kv_refresh.is_zero() || (!max_age.is_zero() && self.kv_refresh * 3 > max_age) {
            return Err(format!(
                "kv_refresh ({:?}) must be above zero and at most a third of the pod bucket's max_age ({max_age:?})",
                self.kv_refresh
            ));
        }
        if self.stable_after.is_zero() {
            return Err("stable_after must be above zero".into());
        }
        if self.lease_name.is_empty() || self.lease_namespace.is_empty() {
            return Err("lease_name and lease_namespace must not be empty".into());
        }
        Ok(())
    }

    /// Holder identity in the Lease.
    pub fn holder(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| self.common.node.clone())
    }
}

impl CollectorConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
    fn common_mut(&mut self) -> &mut CommonConfig {
        &mut self.common
    }
    fn check(&self) -> Result<(), String> {
        self.validate()
    }
    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
    /// Always a spool: [`DEFAULT_SPOOL_DIR`] unless set.
    fn spool_dir(&self) -> Option<PathBuf> {
        Some(
            self.common
                .spool_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR)),
        )
    }
}

/// The collector's own flags, beside the runtime's common ones.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Namespace of the leader-election Lease [default: $POD_NAMESPACE or tidewatch].
    #[arg(long, env = "TIDEWATCH_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Holder identity in the Lease [default: the node name].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Watch cluster-scoped objects without leader election (one replica only).
    #[arg(long)]
    pub no_leader_election: bool,
}

impl Args {
    /// Let the flags override `config`.
    pub fn apply(self, config: &mut Config) {
        if let Some(ns) = self.lease_namespace {
            config.lease_namespace = ns;
        }
        if let Some(identity) = self.identity {
            config.identity = Some(identity);
        }
        if self.no_leader_election {
            config.leader_election = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_strict_and_validated() {
        let c: Config =
            toml::from_str("node = \"n1\"\nlease_duration = 20\npod_grace = 60").expect("valid");
        assert_eq!(c.lease_duration, Duration::from_secs(20));
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<Config>("nod = \"n1\"").is_err());
        assert!(toml::from_str::<Config>("lease_duration = -1").is_err());
        let bad = Config::default().node("n1").election_timing(
            Duration::from_secs(5),
            Duration::from_secs(10),
            Duration::from_secs(1),
        );
        assert!(bad.validate().is_err());
        assert!(Config::default().node("").validate().is_err());
        let c: Config = toml::from_str("node = \"n1\"\nkv_refresh = 60").expect("valid");
        assert_eq!(c.kv_refresh, Duration::from_secs(60));
        assert!(c.validate().is_ok());
        let c: Config = toml::from_str("node = \"n1\"\nkv_refresh = 1800").expect("parses");
        assert!(c.validate().is_err(), "refresh slower than max_age / 3");
        assert!(
            Config::default()
                .node("n1")
                .kv_refresh(Duration::ZERO)
                .validate()
                .is_err()
        );
    }
}
