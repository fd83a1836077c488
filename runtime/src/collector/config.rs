//! What every collector's configuration and command line share: the
//! settings in [`CommonConfig`] (flattened into each collector's TOML
//! config) and the flags in [`CommonArgs`] (flattened into each collector's
//! command line), which override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::spool::SpoolConfig;

/// Settings every collector has. Flattened into each collector's config
/// (`#[serde(flatten)] common: CommonConfig`), so its keys sit at the top
/// level of the TOML file. The collector's own struct refuses unknown keys
/// (serde does not allow `deny_unknown_fields` on a flattened struct).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct CommonConfig {
    /// NATS server(s), comma separated.
    pub nats_url: String,
    /// Node name: the subject token and the CloudEvent source.
    pub node: String,
    /// `/metrics`, `/healthz`, `/readyz` (port 0 picks one; none to disable).
    pub metrics_addr: Option<SocketAddr>,
    /// Outage spool: while NATS is unreachable events are written here and
    /// replayed in order, with their ids, once it is back. Unset: the
    /// collector's default ([`CollectorConfig::spool_dir`]).
    pub spool_dir: Option<PathBuf>,
}

impl Default for CommonConfig {
    fn default() -> Self {
        CommonConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            node: super::default_node(),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            spool_dir: None,
        }
    }
}

impl CommonConfig {
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
    pub fn spool_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spool_dir = Some(dir.into());
        self
    }

    /// Let flags and environment override the file.
    pub fn apply(&mut self, args: &CommonArgs) {
        if let Some(url) = &args.nats_url {
            self.nats_url.clone_from(url);
        }
        if let Some(node) = &args.node {
            self.node.clone_from(node);
        }
        if let Some(addr) = args.metrics_addr {
            self.metrics_addr = Some(addr);
        }
        if let Some(dir) = &args.spool_dir {
            self.spool_dir = Some(dir.clone());
        }
    }
}

/// Flags every collector binary takes, flattened into its own clap struct.
/// Every value also comes from the environment (what the manifests and
/// `tidewatch up` set), and overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// NATS server(s), comma separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Node name: subject token and CloudEvent source [default: the hostname].
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// Address of /metrics, /healthz and /readyz [default: 0.0.0.0:9090].
    #[arg(long, env = "TIDEWATCH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Outage spool directory [default: the collector's; see its README].
    #[arg(long, env = "TIDEWATCH_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// TOML file with the collector's settings (see its README).
    // Its variable is the collector's own (`Collector::CONFIG_ENV`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Only validate the configuration, then exit (0 valid, 2 not).
    #[arg(long)]
    pub check_config: bool,
    /// Only check that this host can run the collector, print why not in
    /// one line if it cannot, then exit (0 yes, 3 no).
    #[arg(long)]
    pub check_host: bool,
}

/// A collector's whole configuration: its own settings with
/// [`CommonConfig`] flattened in.
pub trait CollectorConfig:
    DeserializeOwned + Default + Clone + std::fmt::Debug + Send + Sync + 'static
{
    fn common(&self) -> &CommonConfig;
    fn common_mut(&mut self) -> &mut CommonConfig;

    /// Refuse settings that cannot work, saying why (for `--check-config`;
    /// starting the collector refuses the same settings).
    fn check(&self) -> Result<(), String>;

    /// Unacknowledged publishes at once.
    fn max_in_flight(&self) -> usize;

    /// The spool directory, if any. Override to give a default.
    fn spool_dir(&self) -> Option<PathBuf> {
        self.common().spool_dir.clone()
    }

    /// Size bounds and fsync policy of the spool.
    fn spool(&self) -> SpoolConfig {
        SpoolConfig::default()
    }

    /// Parse TOML: every key optional, unknown keys refused.
    fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Read a TOML file.
    fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector config as the collectors write theirs.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Own {
        #[serde(flatten)]
        common: CommonConfig,
        depth: u32,
        #[serde(with = "crate::collector::seconds")]
        every: std::time::Duration,
    }

    impl CollectorConfig for Own {
        fn common(&self) -> &CommonConfig {
            &self.common
        }
        fn common_mut(&mut self) -> &mut CommonConfig {
            &mut self.common
        }
        fn check(&self) -> Result<(), String> {
            Ok(())
        }
        fn max_in_flight(&self) -> usize {
            1
        }
    }

    #[test]
    fn common_keys_sit_at_the_top_and_unknown_keys_are_refused() {
        let own = Own::from_toml(
            "nats_url = \"nats://n:4222\"\nnode = \"n1\"\nmetrics_addr = \"127.0.0.1:0\"\nspool_dir = \"/s\"\ndepth = 3\nevery = 2",
        )
        .expect("valid");
        assert_eq!(own.common.nats_url, "nats://n:4222");
        assert_eq!(own.common.node, "n1");
        assert_eq!(own.common.spool_dir, Some(PathBuf::from("/s")));
        assert_eq!(own.depth, 3);
        assert_eq!(own.every, std::time::Duration::from_secs(2));
        let err = Own::from_toml("dpeth = 3").expect_err("a typo");
        assert!(err.contains("unknown field `dpeth`"), "{err}");
        let err = Own::from_toml("every = 0").expect_err("zero seconds");
        assert!(err.contains("positive"), "{err}");
        // Missing keys keep their defaults.
        let own = Own::from_toml("depth = 1").expect("valid");
        assert_eq!(own.common, CommonConfig::default());
    }

    #[test]
    fn flags_override_the_file() {
        let mut common = CommonConfig::default().node("from-file");
        common.apply(&CommonArgs {
            node: Some("from-flag".into()),
            spool_dir: Some("/spool".into()),
            ..CommonArgs::default()
        });
        assert_eq!(common.node, "from-flag");
        assert_eq!(common.spool_dir, Some(PathBuf::from("/spool")));
        assert_eq!(common.nats_url, CommonConfig::default().nats_url);
    }
}
