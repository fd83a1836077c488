//! `tidewatch-collector-ebpf`: kernel events into JetStream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tidewatch_collector_ebpf::{CollectorError, Config, run};

/// Tidewatch eBPF collector: process exec/exit, OOM kills and TCP
/// connections from the kernel, published to tidewatch.raw.ebpf.<node>.
/// Needs root or CAP_BPF and CAP_PERFMON (and CAP_SYS_RESOURCE before
/// kernel 5.11); see README.md.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// NATS server(s), comma separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,
    /// Node name (subject token and CloudEvent source). Default: the hostname.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Address of /metrics, /healthz and /readyz [default: 0.0.0.0:9090].
    #[arg(long, env = "TIDEWATCH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// TOML file with filters, sampling and sizes (see README.md).
    #[arg(long, env = "TIDEWATCH_EBPF_CONFIG")]
    config: Option<PathBuf>,
    /// Outage spool directory (see README.md) [default: none].
    #[arg(long, env = "TIDEWATCH_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Only validate the configuration, then exit.
    #[arg(long)]
    check_config: bool,
    /// Only check that this host can run the collector (privileges, BTF,
    /// kernel), print why not if it cannot, then exit (0 yes, 3 no).
    #[arg(long)]
    check_host: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.check_host {
        return match tidewatch_collector_ebpf::preflight::check() {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("{why}");
                ExitCode::from(3)
            }
        };
    }
    let _telemetry = tidewatch_runtime::telemetry::init("collector-ebpf");
    let mut config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tidewatch-collector-ebpf: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    // Flags and environment override the file.
    if let Some(url) = args.nats_url {
        config.nats_url = url;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = Some(addr);
    }
    if let Some(node) = args.node {
        config.node = node;
    }
    if let Some(dir) = args.spool_dir {
        config.spool_dir = Some(dir);
    }
    if args.check_config {
        return match config.validate() {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tidewatch-collector-ebpf: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(config, tidewatch_runtime::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ CollectorError::Config(_)) => {
            eprintln!("tidewatch-collector-ebpf: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = %e, "collector failed");
            eprintln!("tidewatch-collector-ebpf: {e}");
            ExitCode::FAILURE
        }
    }
}
