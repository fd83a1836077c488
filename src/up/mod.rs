//! `tidewatch up`: everything on this machine, in one terminal.
//!
//! This module finds NATS where `NATS_URL` points, or starts nats-server
//! there (JetStream, data under the state dir), and provisions the topology.
//! Then:
//!
//! - [`supervise`]: each function under the local autoscaler, as replica
//!   processes started and stopped (SIGTERM: they drain and ack) on KEDA's
//!   arithmetic, restarted if they die;
//! - [`collectors`]: the collectors this host can run, and why not the others;
//! - [`lag`]: what the autoscaler reads (ScaledObjects, consumer lag from `/jsz`);
//! - [`view`]: what the person (a table or lines) or the script (`--json`) sees.
//!
//! Ctrl-C or SIGTERM stops every process it started. Nothing is left running.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream;
use serde_json::json;
use tidewatch_runtime::provision::{ProvisionOptions, provision};

use crate::local_nats::{self, LocalNats};

mod collectors;
mod lag;
mod supervise;
mod view;
use view::View;

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where Tidewatch keeps its local state (nats data, function logs).
    #[arg(long, env = "TIDEWATCH_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Client port for a nats-server that `up` starts (default: the port of
    /// NATS_URL, 4222). With NATS_URL set, the two must agree.
    #[arg(long)]
    pub(crate) nats_port: Option<u16>,
    /// Monitoring port for a nats-server that `up` starts (KEDA's arithmetic reads it).
    #[arg(long, default_value_t = 8222)]
    pub(crate) monitoring_port: u16,
    /// Directory with the function binaries (default: next to this executable).
    #[arg(long, env = "TIDEWATCH_BIN_DIR")]
    pub(crate) bin_dir: Option<PathBuf>,
    /// Stop after this many seconds (for scripts and tests); default: until Ctrl-C.
    #[arg(long)]
    pub(crate) duration_secs: Option<u64>,
    /// nats-server monitoring URL, when `up` uses a server it did not start.
    #[arg(long, default_value = "http://127.0.0.1:8222")]
    pub(crate) monitoring_url: String,
    /// Directory with the ScaledObjects the local autoscaler follows (default: keda/ if present,
    /// else the manifests this build renders).
    #[arg(long)]
    pub(crate) keda_dir: Option<PathBuf>,
    /// Override every ScaledObject's pollingInterval (for demos and tests).
    #[arg(long)]
    pub(crate) polling_interval_secs: Option<u64>,
    /// Override every ScaledObject's cooldownPeriod (for demos and tests).
    #[arg(long)]
    pub(crate) cooldown_secs: Option<u64>,
    /// Override the HPA scale-down stabilization window (default 300 s).
    #[arg(long)]
    pub(crate) scale_down_window_secs: Option<u64>,
    /// Print JSON lines (status, scaling decisions with reasons) instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Do not start collectors, even where the host allows them.
    #[arg(long)]
    pub(crate) no_collectors: bool,
    /// Most replicas of one function on this host (default: its cores; more
    /// only contend for them). The manifests keep KEDA's maxReplicaCount.
    #[arg(long, env = "TIDEWATCH_MAX_LOCAL_REPLICAS")]
    pub(crate) max_local_replicas: Option<u32>,
}

/// The replicas one function may have on this host.
pub(crate) fn host_cap(args: &UpArgs) -> u32 {
    args.max_local_replicas
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1)
        })
        .max(1)
}

/// The state directory: `--state-dir`, `$XDG_STATE_HOME/tidewatch`, `~/.local/state/tidewatch`.
fn state_dir(args: &UpArgs) -> PathBuf {
    if let Some(dir) = &args.state_dir {
        return dir.clone();
    }
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(xdg).join("tidewatch");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".local/state/tidewatch")
}

pub async fn run(nats_url: &str, url_set: bool, args: UpArgs) -> anyhow::Result<()> {
    let view = Arc::new(View::new(args.json));
    let state = state_dir(&args);
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;

    let mut started_nats = None;
    let shown = local_nats::redact(nats_url);
    let url = match crate::try_connect(nats_url).await {
        Ok(_) => {
            view.say(
                "nats",
                json!({"url": shown, "started": false}),
                &format!("using NATS at {shown}"),
            );
            nats_url.to_string()
        }
        Err(_) => {
            // Where NATS_URL points, so `status`, `burst` and `tail` in
            // another terminal, reading the same NATS_URL, find this server.
            let port = local_nats::port_for(nats_url, url_set, args.nats_port)?;
            let data = state.join("nats");
            view.say(
                "nats",
                json!({"url": shown, "starting": true, "data": data}),
                &format!(
                    "nothing answers at {shown}; starting nats-server on port {port} (data in {})",
                    data.display()
                ),
            );
            let local = LocalNats::start(&data, port, args.monitoring_port).await?;
            view.say(
                "nats",
                json!({"url": local.url, "monitoring": local.monitoring_url, "pid": local.pid(), "log": local.log, "started": true}),
                &format!(
                    "nats-server running at {} (monitoring {}, pid {}, log {})",
                    local.url,
                    local.monitoring_url,
                    local.pid().unwrap_or(0),
                    local.log.display()
                ),
            );
            if !url_set && port != local_nats::DEFAULT_PORT {
                view.say(
                    "hint",
                    json!({"export": format!("NATS_URL={}", local.url)}),
                    &format!(
                        "in other terminals: export NATS_URL={} (so tidewatch status, burst and tail find it)",
                        local.url
                    ),
                );
            }
            let url = local.url.clone();
            started_nats = Some(local);
            url
        }
    };
    let monitoring = match &started_nats {
        Some(local) => local.monitoring_url.clone(),
        None => args.monitoring_url.clone(),
    };
    let result = async {
        let client = crate::connect(&url).await?;
        provision_topology(&jetstream::new(client.clone()), &view).await?;
        supervise::run(&client, &url, &monitoring, &args, &logs, &view).await
    }
    .await;
    view.finish();
    if let Some(local) = started_nats {
        view.say("stopping", json!({"nats": true}), "stopping nats-server");
        local.stop().await;
    }
    view.say("stopped", json!({}), "stopped");
    result
}

/// Streams and buckets are capped at this size locally: the topology's
/// sizes are for a cluster's volumes, and JetStream refuses reservations
/// past 75 % of a laptop's free disk.
pub const LOCAL_STREAM_BYTES: i64 = 1024 * 1024 * 1024;

/// Streams, consumers and buckets, as the cluster's Job provisions them (R1,
/// and capped at [`LOCAL_STREAM_BYTES`], here).
async fn provision_topology(js: &jetstream::Context, view: &View) -> anyhow::Result<()> {
    let report = provision(
        js,
        &crate::functions::consumers()?,
        &ProvisionOptions::default().cap_bytes(LOCAL_STREAM_BYTES),
    )
    .await
    .context("provisioning")?;
    let changed = report
        .items
        .iter()
        .filter(|(_, c)| *c != tidewatch_runtime::provision::Change::Unchanged)
        .count();
    view.say(
        "provisioned",
        json!({"objects": report.items.len(), "changed": changed}),
        &format!(
            "provisioned {} objects ({changed} created or updated)",
            report.items.len()
        ),
    );
    Ok(())
}
