//! Collector configuration: a TOML file (every key optional, unknown keys
//! refused) with the runtime's [`CommonConfig`] keys (NATS, node, metrics,
//! spool) flattened in, plus flags/environment ([`Args`] and the runtime's
//! common flags) over it. [`Config::validate`] refuses a bad configuration
//! at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tidewatch_runtime::collector::{CollectorConfig, CommonConfig};
use tidewatch_runtime::spool::{FsyncPolicy, SpoolConfig};

use crate::journal::Rules;
use crate::units::{CrashLoopRule, Selection};

/// Units watched by default: what a Kubernetes node cannot do without.
pub const NODE_CRITICAL_UNITS: &[&str] = &[
    "kubelet.service",
    "containerd.service",
    "crio.service",
    "docker.service",
    "cri-docker.service",
    "kube-proxy.service",
    "etcd.service",
    "systemd-networkd.service",
    "systemd-resolved.service",
    "systemd-journald.service",
    "systemd-timesyncd.service",
    "chronyd.service",
    "NetworkManager.service",
    "dbus.service",
];

/// Units and identifiers whose error lines are selected at any priority
/// (they log to stderr, journaled at priority 6).
pub const RUNTIME_UNITS: &[&str] = &[
    "kubelet",
    "containerd",
    "crio",
    "dockerd",
    "docker",
    "cri-dockerd",
    "kube-proxy",
];

/// Where the journal is read from on the first start (no saved cursor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalStart {
    /// Only entries written from now on (`-n 0`).
    Now,
    /// Everything since the current boot (`-b`).
    Boot,
    /// Everything the journal holds.
    All,
}

/// Everything the collector needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS, node (the subject token, the CloudEvent source and the
    /// payloads' `node`), metrics address, and the outage spool: while NATS
    /// is unreachable events are written there and replayed in order once
    /// it is back (also after a restart). No spool: the journal then stops
    /// advancing its cursor until NATS is back.
    #[serde(flatten)]
    pub common: CommonConfig,
    /// The host's root as mounted in the container (`/host`); `/` when run on the host.
    pub host_root: PathBuf,
    /// D-Bus address of the system bus. Default: `DBUS_SYSTEM_BUS_ADDRESS`,
    /// else `unix:path=<host_root>/run/dbus/system_bus_socket`.
    pub dbus_address: Option<String>,
    /// Follow unit state over D-Bus.
    pub unit_states: bool,
    /// Units to watch (`kubelet` means `kubelet.service`); `["*"]` = every unit.
    pub units: Vec<String>,
    /// A crash loop: this many restarts...
    pub crash_loop_restarts: u32,
    /// ...within this many seconds.
    #[serde(with = "tidewatch_runtime::collector::seconds")]
    pub crash_loop_window: Duration,
    /// Follow the journal.
    pub journal: bool,
    /// Read journal files from this directory (`journalctl --directory`)
    /// instead of the host's journal under `host_root`.
    pub journal_directory: Option<PathBuf>,
    /// The `journalctl` binary.
    pub journalctl: PathBuf,
    /// Where the cursor of the last entry the stream acknowledged is kept
    /// (on a hostPath, so a restarted pod resumes where it stopped).
    /// Default: `<spool_dir>/journal.cursor`, else
    /// `/var/lib/tidewatch/systemd/journal.cursor`.
    pub cursor_file: Option<PathBuf>,
    /// Upper bound of the spool on disk; when full the oldest events are
    /// dropped and counted.
    pub spool_max_bytes: u64,
    /// Where to start when there is no saved cursor: `now`, `boot` or `all`.
    pub journal_start: JournalStart,
    /// Entries at this syslog priority or more severe become events (4 = warning).
    pub journal_max_priority: u32,
    /// Units/identifiers whose error lines (klog `E…`, `level=error`) become
    /// events at any priority.
    pub journal_error_units: Vec<String>,
    /// Unacknowledged publishes at once.
    pub max_in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: CommonConfig::default(),
            host_root: PathBuf::from("/"),
            dbus_address: None,
            unit_states: true,
            units: NODE_CRITICAL_UNITS.iter().map(|s| s.to_string()).collect(),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(600),
            journal: true,
            journal_directory: None,
            journalctl: PathBuf::from("journalctl"),
            cursor_file: None,
            spool_max_bytes: 256 << 20,
            journal_start: JournalStart::Now,
            journal_max_priority: 4,
            journal_error_units: RUNTIME_UNITS.iter().map(|s| s.to_string()).collect(),
            max_in_flight: 256,
        }
    }
}

pub use tidewatch_runtime::collector::default_node;

/// Why a configuration was refused. All terminal: the same config fails again.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("journal_max_priority {0} is not a syslog priority (0 emerg .. 7 debug)")]
    BadPriority(u32),
    #[error("units is empty: name units to watch, or [\"*\"] for all")]
    NoUnits,
    #[error("neither unit_states nor journal is on: nothing to collect")]
    NothingToDo,
    #[error("node name is empty (set NODE_NAME or --node)")]
    NoNode,
}

/// A validated configuration with its derived rules.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    pub selection: Selection,
    pub crash_loop: CrashLoopRule,
    pub rules: Rules,
    pub dbus_address: String,
    pub cursor_file: PathBuf,
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

    /// The system bus address this config connects to: `dbus_address`,
    /// else `DBUS_SYSTEM_BUS_ADDRESS`, else the socket under `host_root`,
    /// else (when only that exists) `/run/dbus/system_bus_socket`, where a
    /// pod may mount the host's `/run/dbus`.
    pub fn dbus_address(&self) -> String {
        if let Some(a) = &self.dbus_address {
            return a.clone();
        }
        if let Some(a) = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .ok()
            .filter(|a| !a.is_empty())
        {
            return a;
        }
        let under_root = self.host_root.join("run/dbus/system_bus_socket");
        let plain = Path::new("/run/dbus/system_bus_socket");
        let socket = if !under_root.exists() && plain.exists() {
            plain
        } else {
            under_root.as_path()
        };
        format!("unix:path={}", socket.display())
    }

    /// Where the journal cursor is kept.
    pub fn cursor_file(&self) -> PathBuf {
        match (&self.cursor_file, &self.common.spool_dir) {
            (Some(file), _) => file.clone(),
            (None, Some(spool)) => spool.join("journal.cursor"),
            (None, None) => PathBuf::from("/var/lib/tidewatch/systemd/journal.cursor"),
        }
    }

    /// Refuse a configuration that cannot work; derive its rules.
    pub fn validate(self) -> Result<Resolved, ConfigError> {
        if self.crash_loop_restarts == 0 {
            return Err(ConfigError::Zero("crash_loop_restarts"));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::Zero("max_in_flight"));
        }
        if self.journal_max_priority > 7 {
            return Err(ConfigError::BadPriority(self.journal_max_priority));
        }
        if self.unit_states && self.units.is_empty() {
            return Err(ConfigError::NoUnits);
        }
        if !self.unit_states && !self.journal {
            return Err(ConfigError::NothingToDo);
        }
        if self.common.node.trim().is_empty() {
            return Err(ConfigError::NoNode);
        }
        Ok(Resolved {
            selection: Selection::from_names(&self.units),
            crash_loop: CrashLoopRule {
                restarts: self.crash_loop_restarts,
                window: self.crash_loop_window,
            },
            rules: Rules::new(self.journal_max_priority, &self.journal_error_units),
            dbus_address: self.dbus_address(),
            cursor_file: self.cursor_file(),
            config: self,
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
    /// fsync every record: the journal cursor moves on once an entry is
    /// spooled, so a spooled entry must survive a machine crash too (the
    /// journal rate makes this cheap).
    fn spool(&self) -> SpoolConfig {
        SpoolConfig {
            max_bytes: self.spool_max_bytes,
            fsync: FsyncPolicy::EveryRecord,
            ..SpoolConfig::default()
        }
    }
}

/// The collector's own flags, beside the runtime's common ones.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// The host's root filesystem as mounted here [default: /].
    #[arg(long, env = "TIDEWATCH_HOST_ROOT")]
    pub host_root: Option<PathBuf>,
    /// System bus address [default: DBUS_SYSTEM_BUS_ADDRESS, else
    /// unix:path=<host root>/run/dbus/system_bus_socket].
    #[arg(long)]
    pub dbus_address: Option<String>,
    /// Read journal files from this directory instead of the host's journal.
    #[arg(long, env = "TIDEWATCH_JOURNAL_DIRECTORY")]
    pub journal_directory: Option<PathBuf>,
    /// Where the journal cursor is saved [default: <spool dir>/journal.cursor,
    /// else /var/lib/tidewatch/systemd/journal.cursor].
    #[arg(long, env = "TIDEWATCH_CURSOR_FILE")]
    pub cursor_file: Option<PathBuf>,
    /// Units to watch, comma separated (`*` = all) [default: the node-critical units].
    #[arg(long, env = "TIDEWATCH_SYSTEMD_UNITS", value_delimiter = ',')]
    pub units: Option<Vec<String>>,
}

impl Args {
    /// Let the flags override `config`.
    pub fn apply(self, config: &mut Config) {
        if let Some(root) = self.host_root {
            config.host_root = root;
        }
        if let Some(address) = self.dbus_address {
            config.dbus_address = Some(address);
        }
        if let Some(dir) = self.journal_directory {
            config.journal_directory = Some(dir);
        }
        if let Some(file) = self.cursor_file {
            config.cursor_file = Some(file);
        }
        if let Some(units) = self.units {
            config.units = units;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_watch_the_node_critical_units() {
        let r = Config::default().validate().expect("valid");
        assert!(r.selection.watches("kubelet.service"));
        assert!(r.selection.watches("containerd.service"));
        assert!(!r.selection.watches("cron.service"));
        assert_eq!(r.rules.max_priority, 4);
        assert!(
            r.dbus_address.starts_with("unix:path="),
            "{}",
            r.dbus_address
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = Config::from_toml("unit = [\"x\"]").expect_err("unknown key");
        assert!(err.contains("unknown field"), "{err}");
        let err = Config::from_toml("crash_loop_window = 0").expect_err("zero window");
        assert!(err.contains("positive"), "{err}");
        let err = Config::from_toml("journal_start = \"yesterday\"").expect_err("bad start");
        assert!(err.contains("unknown variant"), "{err}");
        let c = Config::from_toml("journal_max_priority = 9").expect("parses");
        assert!(matches!(c.validate(), Err(ConfigError::BadPriority(9))));
        let c = Config::from_toml("units = []").expect("parses");
        assert!(matches!(c.validate(), Err(ConfigError::NoUnits)));
        let c = Config::from_toml("unit_states = false\njournal = false").expect("parses");
        assert!(matches!(c.validate(), Err(ConfigError::NothingToDo)));
    }

    #[test]
    fn a_file_sets_units_and_the_bus() {
        let c = Config::from_toml(
            "units = [\"*\"]\nhost_root = \"/host\"\ncrash_loop_restarts = 3\ncrash_loop_window = 60\njournal_start = \"boot\"",
        )
        .expect("parses");
        assert_eq!(c.journal_start, JournalStart::Boot);
        let r = c.validate().expect("valid");
        assert_eq!(r.selection, Selection::All);
        assert_eq!(r.crash_loop.restarts, 3);
        if std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_none()
            && !Path::new("/run/dbus/system_bus_socket").exists()
        {
            assert_eq!(r.dbus_address, "unix:path=/host/run/dbus/system_bus_socket");
        }
    }

    #[test]
    fn the_cursor_lives_in_the_spool_unless_placed() {
        let mut c = Config::default();
        assert_eq!(
            c.cursor_file(),
            PathBuf::from("/var/lib/tidewatch/systemd/journal.cursor")
        );
        c.common.spool_dir = Some("/var/lib/tidewatch/spool/systemd".into());
        assert_eq!(
            c.cursor_file(),
            PathBuf::from("/var/lib/tidewatch/spool/systemd/journal.cursor")
        );
        c.cursor_file = Some("/x/c".into());
        assert_eq!(c.cursor_file(), PathBuf::from("/x/c"));
    }
}
