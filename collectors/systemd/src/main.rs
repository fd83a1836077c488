//! `tidewatch-collector-systemd`: unit state and journal entries into JetStream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tidewatch_collector_systemd::{Config, ErrorKind, run};

/// Tidewatch systemd collector: unit state over D-Bus and selected journal
/// entries, published to tidewatch.raw.systemd.<node>. See README.md.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// NATS server(s), comma separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,
    /// Node name (subject token, CloudEvent source, payload `node`). Default: the hostname.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Address of /metrics, /healthz and /readyz [default: 0.0.0.0:9090].
    #[arg(long, env = "TIDEWATCH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// TOML file with units, journal rules and paths (see README.md).
    #[arg(long, env = "TIDEWATCH_SYSTEMD_CONFIG")]
    config: Option<PathBuf>,
    /// The host's root filesystem as mounted here [default: /].
    #[arg(long, env = "TIDEWATCH_HOST_ROOT")]
    host_root: Option<PathBuf>,
    /// System bus address [default: DBUS_SYSTEM_BUS_ADDRESS, else
    /// unix:path=<host root>/run/dbus/system_bus_socket].
    #[arg(long)]
    dbus_address: Option<String>,
    /// Read journal files from this directory instead of the host's journal.
    #[arg(long, env = "TIDEWATCH_JOURNAL_DIRECTORY")]
    journal_directory: Option<PathBuf>,
    /// Where the journal cursor is saved [default: <spool dir>/journal.cursor,
    /// else /var/lib/tidewatch/systemd/journal.cursor].
    #[arg(long, env = "TIDEWATCH_CURSOR_FILE")]
    cursor_file: Option<PathBuf>,
    /// Outage spool directory (see README.md) [default: none].
    #[arg(long, env = "TIDEWATCH_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Units to watch, comma separated (`*` = all) [default: the node-critical units].
    #[arg(long, env = "TIDEWATCH_SYSTEMD_UNITS", value_delimiter = ',')]
    units: Option<Vec<String>>,
    /// Only validate the configuration, then exit (0 valid, 2 not).
    #[arg(long)]
    check_config: bool,
    /// Only check that the system D-Bus and a journal are reachable, print
    /// why not in one line if they are not, then exit (0 yes, 3 no).
    #[arg(long)]
    check_host: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tidewatch-collector-systemd: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    // Flags and environment override the file.
    if let Some(url) = args.nats_url {
        config.nats_url = url;
    }
    if let Some(node) = args.node {
        config.node = node;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = Some(addr);
    }
    if let Some(root) = args.host_root {
        config.host_root = root;
    }
    if let Some(address) = args.dbus_address {
        config.dbus_address = Some(address);
    }
    if let Some(dir) = args.journal_directory {
        config.journal_directory = Some(dir);
    }
    if let Some(file) = args.cursor_file {
        config.cursor_file = Some(file);
    }
    if let Some(dir) = args.spool_dir {
        config.spool_dir = Some(dir);
    }
    if let Some(units) = args.units {
        config.units = units;
    }
    if args.check_host {
        return match tidewatch_collector_systemd::preflight::check(&config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("{why}");
                ExitCode::from(3)
            }
        };
    }
    if args.check_config {
        return match config.validate() {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tidewatch-collector-systemd: {e}");
                ExitCode::from(2)
            }
        };
    }
    let _telemetry = tidewatch_runtime::telemetry::init("collector-systemd");
    match run(config, tidewatch_runtime::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "collector failed");
            eprintln!("tidewatch-collector-systemd: {e}");
            match e.kind() {
                ErrorKind::Terminal => ExitCode::from(2),
                ErrorKind::Retryable => ExitCode::FAILURE,
            }
        }
    }
}
