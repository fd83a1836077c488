//! Collector configuration: a TOML file (every key optional, unknown keys
//! refused) with the runtime's [`CommonConfig`] keys (NATS, node, metrics,
//! spool) flattened in, plus the runtime's common flags over it.
//! [`Config::validate`] refuses bad filters at start, before anything loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tidewatch_runtime::collector::{CollectorConfig, CommonConfig};
use tidewatch_runtime::spool::SpoolConfig;

use crate::attribution;
use crate::wire::Kind;

/// Everything the collector needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS, node (the subject token and the CloudEvent source), metrics
    /// address, and the outage spool: while NATS is unreachable events are
    /// written there and replayed in order, with their ids, once it is back
    /// (one directory per collector instance, a hostPath in the DaemonSet).
    /// No spool: events beyond `queue_capacity` are counted as lost during
    /// an outage.
    #[serde(flatten)]
    pub common: CommonConfig,
    /// Event kinds to collect (`process.exec`, `exec`, or the full CloudEvent
    /// type); empty = all.
    pub events: Vec<String>,
    /// Keep one in N events of a kind (`{ "tcp.close" = 10 }`); N >= 1.
    pub sampling: BTreeMap<String, u64>,
    /// Only these cgroups (and their descendants): paths relative to the
    /// cgroup2 mount (`/kubepods.slice`), absolute paths under it, or `id:<n>`.
    pub include_cgroups: Vec<String>,
    /// Never these cgroups (and their descendants); same syntax.
    pub exclude_cgroups: Vec<String>,
    /// Drop the collector's own events in the kernel.
    pub ignore_self: bool,
    /// Ring buffer size in bytes: a power of two, at least one page.
    pub ring_bytes: u32,
    /// Records read from the ring but not yet published, before new ones are
    /// counted as lost (never blocking the kernel side).
    pub queue_capacity: usize,
    /// Unacknowledged publishes at once.
    pub max_in_flight: usize,
    /// How often drop counters are read and a drops event is sent when they grew.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub drops_interval: Duration,
    /// How often aggregated retransmits are drained into events.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub retransmit_interval: Duration,
    /// Emit `process.exists` for every running process at start.
    pub replay_processes: bool,
    /// Give those events their executable's path (`/proc/<pid>/exe`). Off by
    /// default: the kernel lets only a ptrace-capable reader (`CAP_SYS_PTRACE`
    /// for other users' and more privileged processes) resolve it, and the
    /// DaemonSet does not grant that; `process.exec` events carry the path
    /// from the kernel either way.
    pub replay_executables: bool,
    /// Upper bound of the spool on disk; when full, the oldest events are
    /// deleted, counted and reported.
    pub spool_max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: CommonConfig::default(),
            events: Vec::new(),
            sampling: BTreeMap::new(),
            include_cgroups: Vec::new(),
            exclude_cgroups: Vec::new(),
            ignore_self: true,
            ring_bytes: 4 << 20,
            queue_capacity: 65_536,
            max_in_flight: 1024,
            drops_interval: Duration::from_secs(10),
            retransmit_interval: Duration::from_secs(5),
            replay_processes: true,
            replay_executables: false,
            spool_max_bytes: 256 << 20,
        }
    }
}

pub use tidewatch_runtime::collector::default_node;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "unknown event type {0:?} in the config: known types are {known}",
        known = Kind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    )]
    UnknownEventType(String),
    #[error("sampling for {kind}: {every} is not a valid rate (keep one in N events, N >= 1)")]
    BadSampling { kind: String, every: u64 },
    #[error(
        "malformed cgroup filter {filter:?}: {reason} (use a path under the cgroup2 mount, e.g. \"/kubepods.slice\", or \"id:<cgroup id>\")"
    )]
    BadCgroup { filter: String, reason: String },
    #[error("ring_bytes {0} must be a power of two and at least 4096")]
    BadRing(u32),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// A validated configuration, with filters resolved for the kernel.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    /// Per kind: 0 = off, 1 = every event, N = one in N.
    pub sample_every: [u64; Kind::COUNT],
    pub include: Vec<u64>,
    pub exclude: Vec<u64>,
}

impl Config {
    /// Read a TOML config file; flags override its values afterwards.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Check everything that can be checked before loading: event types,
    /// sampling rates, cgroup filters (which must exist), sizes.
    pub fn validate(self) -> Result<Resolved, ConfigError> {
        let mut sample_every = [0u64; Kind::COUNT];
        if self.events.is_empty() {
            sample_every = [1; Kind::COUNT];
        }
        for name in &self.events {
            let kind =
                Kind::parse(name).ok_or_else(|| ConfigError::UnknownEventType(name.clone()))?;
            sample_every[kind as usize] = 1;
        }
        for (name, &every) in &self.sampling {
            let kind =
                Kind::parse(name).ok_or_else(|| ConfigError::UnknownEventType(name.clone()))?;
            if every == 0 {
                return Err(ConfigError::BadSampling {
                    kind: name.clone(),
                    every,
                });
            }
            if sample_every[kind as usize] != 0 {
                sample_every[kind as usize] = every;
            }
        }
        if !self.ring_bytes.is_power_of_two() || self.ring_bytes < 4096 {
            return Err(ConfigError::BadRing(self.ring_bytes));
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::Zero("queue_capacity"));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::Zero("max_in_flight"));
        }
        let root = attribution::cgroup2_root();
        let include = self
            .include_cgroups
            .iter()
            .map(|f| resolve_cgroup(f, root.as_deref()))
            .collect::<Result<_, _>>()?;
        let exclude = self
            .exclude_cgroups
            .iter()
            .map(|f| resolve_cgroup(f, root.as_deref()))
            .collect::<Result<_, _>>()?;
        Ok(Resolved {
            config: self,
            sample_every,
            include,
            exclude,
        })
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
        self.clone().validate().map(drop).map_err(|e| e.to_string())
    }
    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
    fn spool(&self) -> SpoolConfig {
        SpoolConfig {
            max_bytes: self.spool_max_bytes,
            ..SpoolConfig::default()
        }
    }
}

/// A cgroup filter → cgroup v2 id.
pub fn resolve_cgroup(filter: &str, root: Option<&Path>) -> Result<u64, ConfigError> {
    let bad = |reason: &str| ConfigError::BadCgroup {
        filter: filter.to_string(),
        reason: reason.to_string(),
    };
    if let Some(id) = filter.strip_prefix("id:") {
        return match id.parse::<u64>() {
            Ok(id) if id > 0 => Ok(id),
            _ => Err(bad("the id is not a positive integer")),
        };
    }
    if !filter.starts_with('/') {
        return Err(bad("not an absolute path or id:<n>"));
    }
    if filter.split('/').any(|c| c == ".." || c == ".") {
        return Err(bad("'.' and '..' are not allowed"));
    }
    let root = root.ok_or_else(|| bad("this host has no cgroup2 mount"))?;
    let dir = if Path::new(filter).starts_with(root) {
        PathBuf::from(filter)
    } else {
        root.join(filter.trim_start_matches('/'))
    };
    attribution::cgroup_id(&dir).map_err(|e| bad(&format!("{}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_collect_everything() {
        let r = Config::default().validate().expect("valid");
        assert_eq!(r.sample_every, [1; Kind::COUNT]);
    }

    #[test]
    fn unknown_keys_and_types_are_refused() {
        let err = Config::from_toml("evnets = [\"exec\"]").expect_err("unknown key");
        assert!(err.contains("unknown field"), "{err}");
        let config = Config::from_toml("events = [\"exec\", \"process.fork\"]").expect("parses");
        let err = config.validate().expect_err("unknown type").to_string();
        assert!(err.contains("unknown event type \"process.fork\""), "{err}");
        let config = Config::from_toml("[sampling]\n\"tcp.bogus\" = 2").expect("parses");
        assert!(config.validate().is_err());
        let config = Config::from_toml("[sampling]\nexec = 0").expect("parses");
        assert!(config.validate().is_err());
    }

    #[test]
    fn events_and_sampling_set_the_kernel_rates() {
        let config =
            Config::from_toml("events = [\"exec\", \"tcp.close\"]\n[sampling]\n\"tcp.close\" = 10")
                .expect("parses");
        let r = config.validate().expect("valid");
        assert_eq!(r.sample_every[Kind::Exec as usize], 1);
        assert_eq!(r.sample_every[Kind::TcpClose as usize], 10);
        assert_eq!(r.sample_every[Kind::Exit as usize], 0);
    }

    #[test]
    fn malformed_cgroup_filters_are_refused() {
        for filter in [
            "kubepods.slice",
            "/a/../b",
            "id:x",
            "id:0",
            "/no/such/cgroup-tidewatch",
        ] {
            let config = Config {
                include_cgroups: vec![filter.into()],
                ..Config::default()
            };
            let err = config.validate().expect_err(filter).to_string();
            assert!(err.contains("malformed cgroup filter"), "{err}");
        }
        assert_eq!(resolve_cgroup("id:42", None).expect("id"), 42);
    }
}
