//! `tidewatch-collector-k8s`: Kubernetes changes into JetStream, pod
//! metadata into KV.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tidewatch_collector_k8s::{Config, ErrorKind, run};

/// Tidewatch Kubernetes collector: semantic pod, node, rollout, endpoint
/// and Warning Event changes, published to tidewatch.raw.k8s.<node>; pod
/// metadata kept in the tidewatch-pods KV bucket. Uses a kubeconfig
/// (KUBECONFIG, ~/.kube/config) or in-cluster credentials.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// NATS server(s), comma separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,
    /// This node: pods with this spec.nodeName are watched. Default: the hostname.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Address of /metrics, /healthz and /readyz [default: 0.0.0.0:9090].
    #[arg(long, env = "TIDEWATCH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Namespace of the leader-election Lease [default: $POD_NAMESPACE or tidewatch].
    #[arg(long, env = "TIDEWATCH_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Holder identity in the Lease [default: the node name].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Watch cluster-scoped objects without leader election (one replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// Outage spool directory [default: /var/lib/tidewatch/spool/k8s].
    #[arg(long, env = "TIDEWATCH_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// TOML file with the remaining settings (see README.md).
    #[arg(long, env = "TIDEWATCH_K8S_CONFIG")]
    config: Option<PathBuf>,
    /// Only validate the configuration, then exit.
    #[arg(long)]
    check_config: bool,
    /// Only check that Kubernetes credentials (kubeconfig or in-cluster)
    /// exist; print why not if they do not, then exit (0 yes, 3 no).
    #[arg(long)]
    check_host: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.check_host {
        return match tidewatch_collector_k8s::credentials().await {
            Ok(_) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("{why}");
                ExitCode::from(3)
            }
        };
    }
    let _telemetry =
        tidewatch_runtime::telemetry::init(tidewatch_collector_k8s::collector::COMPONENT);
    let mut config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tidewatch-collector-k8s: {e}");
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
    if let Some(ns) = args.lease_namespace {
        config.lease_namespace = ns;
    }
    if let Some(identity) = args.identity {
        config.identity = Some(identity);
    }
    if args.no_leader_election {
        config.leader_election = false;
    }
    if let Some(dir) = args.spool_dir {
        config.spool_dir = dir;
    }
    if args.check_config {
        return match config.validate() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tidewatch-collector-k8s: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(config, tidewatch_runtime::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "collector failed");
            eprintln!("tidewatch-collector-k8s: {e}");
            match e.kind() {
                ErrorKind::Config => ExitCode::from(2),
                ErrorKind::Credentials => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
