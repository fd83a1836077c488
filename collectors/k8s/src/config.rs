//! Collector configuration: a TOML file (every key optional, unknown keys
//! refused) plus flags/environment for NATS, node name and metrics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Everything the collector needs to run.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server(s), comma separated.
    pub nats_url: String,
    /// This node (`spec.nodeName` of the pods watched; subject token and
    /// CloudEvent source).
    pub node: String,
    /// `/metrics`, `/healthz`, `/readyz` (port 0 picks one; none to disable).
    pub metrics_addr: Option<SocketAddr>,
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
    /// Server-side timeout of one watch request, seconds (the watcher
    /// re-watches from its last resourceVersion after it).
    pub watch_timeout_secs: u32,
    /// Directory of the outage spool.
    pub spool_dir: PathBuf,
    /// Unacknowledged publishes at once.
    pub max_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            node: default_node(),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
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
            watch_timeout_secs: 290,
            spool_dir: PathBuf::from("/var/lib/tidewatch/spool/k8s"),
            max_in_flight: 1024,
        }
    }
}

pub use tidewatch_runtime::collector::default_node;

impl Config {
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.nats_url = url.into();
        self
    }
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = node.into();
        self
    }
    pub fn metrics_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.metrics_addr = addr;
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
    pub fn spool_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spool_dir = dir.into();
        self
    }

    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Refuse settings that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.node.trim().is_empty() || self.node == "unknown" {
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
        if self.lease_name.is_empty() || self.lease_namespace.is_empty() {
            return Err("lease_name and lease_namespace must not be empty".into());
        }
        Ok(())
    }

    /// Holder identity in the Lease.
    pub fn holder(&self) -> String {
        self.identity.clone().unwrap_or_else(|| self.node.clone())
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
    }
}
