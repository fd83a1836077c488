//! `tidewatch up`: everything on this machine, in one terminal.
//!
//! Connects to `$NATS_URL`, or starts nats-server (JetStream, data under
//! the state dir) when nothing answers; provisions; runs each function
//! binary as a child process (restarted if it dies); prints one status line
//! per second; echoes what export writes (the insights) to stdout. Ctrl-C
//! or SIGTERM: SIGTERM to every function (they drain and ack), then stop
//! the nats-server it started. Nothing is left running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::topology::{self, FunctionSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use serde_json::{Value, json};

use crate::autoscale::{Autoscaler, ScalePolicy};

use crate::child_process::terminate;
use crate::local_nats::{self, LocalNats};

mod view;
use view::{Row, View};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where Tidewatch keeps its local state (nats data, function logs).
    #[arg(long, env = "TIDEWATCH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Client port for a nats-server that `up` starts (default: the port of
    /// NATS_URL, 4222). With NATS_URL set, the two must agree.
    #[arg(long)]
    nats_port: Option<u16>,
    /// Monitoring port for a nats-server that `up` starts (KEDA's arithmetic reads it).
    #[arg(long, default_value_t = 8222)]
    monitoring_port: u16,
    /// Directory with the function binaries (default: next to this executable).
    #[arg(long, env = "TIDEWATCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Stop after this many seconds (for scripts and tests); default: until Ctrl-C.
    #[arg(long)]
    duration_secs: Option<u64>,
    /// nats-server monitoring URL, when `up` uses a server it did not start.
    #[arg(long, default_value = "http://127.0.0.1:8222")]
    monitoring_url: String,
    /// Directory with the ScaledObjects the local autoscaler follows (default: keda/ if present,
    /// else the manifests this build renders).
    #[arg(long)]
    keda_dir: Option<PathBuf>,
    /// Override every ScaledObject's pollingInterval (for demos and tests).
    #[arg(long)]
    polling_interval_secs: Option<u64>,
    /// Override every ScaledObject's cooldownPeriod (for demos and tests).
    #[arg(long)]
    cooldown_secs: Option<u64>,
    /// Override the HPA scale-down stabilization window (default 300 s).
    #[arg(long)]
    scale_down_window_secs: Option<u64>,
    /// Print JSON lines (status, scaling decisions with reasons) instead of text.
    #[arg(long)]
    json: bool,
    /// Do not start collectors, even where the host allows them.
    #[arg(long)]
    no_collectors: bool,
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
    let result = supervise(&url, &monitoring, &args, &logs, &view).await;
    view.finish();
    if let Some(local) = started_nats {
        view.say("stopping", json!({"nats": true}), "stopping nats-server");
        local.stop().await;
    }
    view.say("stopped", json!({}), "stopped");
    result
}

/// One function under the local autoscaler.
struct Scaled {
    spec: &'static FunctionSpec,
    scaler: Autoscaler,
    replicas: Vec<Child>,
    next_poll: Instant,
    lag: u64,
    /// Last stored sequence of the function's input stream, for events/s.
    last_seq: Option<(Instant, u64)>,
    rate: f64,
    consumer_stream: &'static str,
    /// The autoscaler's last decision.
    desired: u32,
    /// When it last changed the replica count, and why.
    decision: Option<String>,
}

async fn supervise(
    url: &str,
    monitoring: &str,
    args: &UpArgs,
    logs: &Path,
    view: &Arc<View>,
) -> anyhow::Result<()> {
    let client = crate::connect(url).await?;
    let js = jetstream::new(client.clone());
    let report = provision(&js, &ProvisionOptions::default())
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

    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let policies = scale_policies(args)?;
    let started = Instant::now();
    let mut functions = Vec::new();
    for spec in topology::FUNCTIONS {
        let binary = bin_dir.join(spec.binary);
        if !binary.is_file() {
            bail!(
                "{} not found in {}. Build every binary first: cargo build --release --workspace (or pass --bin-dir)",
                spec.binary,
                bin_dir.display()
            );
        }
        let mut policy = policies
            .iter()
            .find(|(consumer, _)| consumer == spec.consumer)
            .map(|(_, p)| p.clone())
            .with_context(|| {
                format!(
                    "no ScaledObject for consumer {} in keda/ (run `tidewatch render`)",
                    spec.consumer
                )
            })?;
        if let Some(s) = args.polling_interval_secs {
            policy.polling_interval = Duration::from_secs(s);
        }
        if let Some(s) = args.cooldown_secs {
            policy.cooldown_period = Duration::from_secs(s);
        }
        if let Some(s) = args.scale_down_window_secs {
            policy.scale_down_window = Duration::from_secs(s);
        }
        let consumer_stream = topology::consumer(spec.consumer)
            .and_then(|c| topology::stream(c.stream))
            .map(|s| s.name)
            .context("function without a stream")?;
        functions.push(Scaled {
            spec,
            scaler: Autoscaler::new(policy),
            replicas: Vec::new(),
            next_poll: Instant::now(),
            lag: 0,
            last_seq: None,
            rate: 0.0,
            consumer_stream,
            desired: 0,
            decision: None,
        });
    }

    let mut collectors = start_collectors(args, view, &bin_dir, url, logs).await;

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let deadline = args
        .duration_secs
        .map(|s| Instant::now() + Duration::from_secs(s));
    let stop = tidewatch_runtime::shutdown::signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let now = Instant::now();
        collectors.retain_mut(|c| match c.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                view.say(
                    "exited",
                    json!({"collector": true, "status": status.to_string(), "logs": logs}),
                    &format!("a collector exited ({status}); see {}", logs.display()),
                );
                false
            }
            Err(_) => false,
        });
        for f in &mut functions {
            // Replicas that died are gone; the autoscaler starts new ones if still needed.
            let before = f.replicas.len();
            f.replicas.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
            if f.replicas.len() < before {
                let log = logs.join(format!("{}.log", f.spec.name));
                view.say(
                    "exited",
                    json!({"function": f.spec.name, "replicas": before - f.replicas.len(), "log": log}),
                    &format!(
                        "{} replica(s) of {} exited; log: {}",
                        before - f.replicas.len(),
                        f.spec.name,
                        log.display()
                    ),
                );
            }
            if now < f.next_poll {
                continue;
            }
            f.next_poll = now + f.scaler.policy.polling_interval;
            f.lag = match consumer_lag(monitoring, f.spec.consumer).await {
                Ok(lag) => lag,
                Err(e) => {
                    view.say(
                        "error",
                        json!({"function": f.spec.name, "error": format!("{e:#}")}),
                        &format!("{}: cannot read lag from {monitoring}: {e:#}", f.spec.name),
                    );
                    continue;
                }
            };
            let current = f.replicas.len() as u32;
            let decision = f.scaler.step(now.duration_since(started), f.lag, current);
            if decision.desired != current {
                view.say(
                    "scale",
                    json!({"function": f.spec.name, "from": current, "to": decision.desired, "lag": f.lag, "reason": decision.reason}),
                    &format!(
                        "scale {} {current} → {}: {}",
                        f.spec.name, decision.desired, decision.reason
                    ),
                );
                f.decision = Some(format!(
                    "{} {current} → {}: {}",
                    chrono::Local::now().format("%H:%M:%S"),
                    decision.desired,
                    decision.reason
                ));
            }
            f.desired = decision.desired;
            while (f.replicas.len() as u32) < decision.desired {
                f.replicas.push(spawn(view, f.spec, &bin_dir, url, logs)?);
            }
            while (f.replicas.len() as u32) > decision.desired {
                if let Some(mut child) = f.replicas.pop() {
                    // SIGTERM: the replica drains and acks, exactly as on a Kubernetes scale-down.
                    tokio::spawn(
                        async move { terminate(&mut child, Duration::from_secs(30)).await },
                    );
                }
            }
        }
        for f in &mut functions {
            if let Ok(info) = js
                .get_stream(f.consumer_stream)
                .await?
                .info()
                .await
                .map(|i| i.state.last_sequence)
            {
                if let Some((t, seq)) = f.last_seq {
                    f.rate = info.saturating_sub(seq) as f64
                        / now.duration_since(t).as_secs_f64().max(0.001);
                }
                f.last_seq = Some((now, info));
            }
        }
        let rows: Vec<Row> = functions
            .iter()
            .map(|f| Row {
                function: f.spec.name.to_string(),
                desired: f.desired,
                running: f.replicas.len(),
                max: f.scaler.policy.max_replicas,
                lag: f.lag,
                rate: f.rate,
                decision: f.decision.clone(),
            })
            .collect();
        view.status(&rows);
    }
    view.say(
        "stopping",
        json!({}),
        "stopping functions (SIGTERM; they finish in-flight work and ack)",
    );
    let mut all: Vec<Child> = functions.into_iter().flat_map(|f| f.replicas).collect();
    all.append(&mut collectors);
    futures::future::join_all(
        all.iter_mut()
            .map(|c| terminate(c, Duration::from_secs(30))),
    )
    .await;
    Ok(())
}

/// Collectors `up` runs when this host allows them, each with the binary
/// that checks the host (`--check-host`) and says why not.
const COLLECTORS: &[(&str, &str)] = &[
    ("ebpf", "tidewatch-collector-ebpf"),
    ("k8s", "tidewatch-collector-k8s"),
    ("systemd", "tidewatch-collector-systemd"),
];

/// Start every collector this host can run; say plainly why not for the others.
async fn start_collectors(
    args: &UpArgs,
    view: &View,
    bin_dir: &Path,
    url: &str,
    logs: &Path,
) -> Vec<Child> {
    let mut running = Vec::new();
    if args.no_collectors {
        return running;
    }
    for (name, binary_name) in COLLECTORS {
        let binary = bin_dir.join(binary_name);
        if !binary.is_file() {
            view.say(
                "collector",
                json!({"collector": name, "running": false, "why": "not built"}),
                &format!(
                    "{name} collector not started: {binary_name} is not built (cargo build --release --workspace)"
                ),
            );
            continue;
        }
        let check = Command::new(&binary)
            .arg("--check-host")
            .stdin(Stdio::null())
            .output()
            .await;
        let why = match check {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = why {
            view.say(
                "collector",
                json!({"collector": name, "running": false, "why": why}),
                &format!("{name} collector not started: {why}"),
            );
            continue;
        }
        let log_path = logs.join(format!("collector-{name}.log"));
        let Ok(log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
        else {
            continue;
        };
        // Each collector spools to disk while NATS is unreachable, and
        // replays after a restart of `up` what the last run had spooled.
        let spool = logs.parent().unwrap_or(logs).join("spool").join(name);
        match Command::new(&binary)
            .env("NATS_URL", url)
            .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
            .env("TIDEWATCH_SPOOL_DIR", &spool)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => {
                view.say(
                    "collector",
                    json!({"collector": name, "running": true, "pid": child.id(), "log": log_path}),
                    &format!(
                        "started the {name} collector (pid {}), log {}",
                        child.id().unwrap_or(0),
                        log_path.display()
                    ),
                );
                running.push(child);
            }
            Err(e) => view.say(
                "collector",
                json!({"collector": name, "running": false, "why": e.to_string()}),
                &format!("{name} collector not started: {e}"),
            ),
        }
    }
    running
}

/// The ScaledObjects' settings: from `--keda-dir` (default `keda/` when it
/// exists), else from the manifests this build renders.
fn scale_policies(args: &UpArgs) -> anyhow::Result<Vec<(String, ScalePolicy)>> {
    let dir = args
        .keda_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("keda"));
    if dir.is_dir() {
        return crate::autoscale::read_scaled_objects(&dir);
    }
    let rendered = tempfile_dir()?;
    for (path, contents) in crate::render::render()? {
        if let Some(name) = path.strip_prefix("keda/") {
            std::fs::write(rendered.join(name), contents)?;
        }
    }
    let policies = crate::autoscale::read_scaled_objects(&rendered);
    let _ = std::fs::remove_dir_all(&rendered);
    policies
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tidewatch-keda-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// KEDA's lag for `consumer`: `num_pending + num_ack_pending` from
/// `/jsz?acc=$G&config=true&consumers=true`, as the nats-jetstream scaler reads it.
pub async fn consumer_lag(monitoring: &str, consumer: &str) -> anyhow::Result<u64> {
    let url = format!(
        "{}/jsz?acc=%24G&config=true&consumers=true",
        monitoring.trim_end_matches('/')
    );
    let body = http_get(&url).await?;
    let jsz: Value = serde_json::from_str(&body).context("/jsz is not JSON")?;
    let accounts = jsz["account_details"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for account in accounts {
        for stream in account["stream_detail"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            for c in stream["consumer_detail"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if c["name"] == consumer {
                    return Ok(c["num_pending"].as_u64().unwrap_or(0)
                        + c["num_ack_pending"].as_u64().unwrap_or(0));
                }
            }
        }
    }
    bail!("consumer {consumer} not in {url}")
}

/// A plain HTTP/1.0 GET (the monitoring endpoint is local and unauthenticated).
async fn http_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .context("monitoring URL must be http://")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host))
            .await
            .context("connect timed out")??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{url}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

fn spawn(
    view: &Arc<View>,
    spec: &FunctionSpec,
    bin_dir: &Path,
    url: &str,
    logs: &Path,
) -> anyhow::Result<Child> {
    let binary = bin_dir.join(spec.binary);
    if !binary.is_file() {
        bail!(
            "{} not found in {}. Build every binary first: cargo build --release --workspace \
             (or pass --bin-dir to where they are)",
            spec.binary,
            bin_dir.display()
        );
    }
    let log_path = logs.join(format!("{}.log", spec.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut child = Command::new(&binary)
        .env("NATS_URL", url)
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
    view.say(
        "started",
        json!({"function": spec.name, "pid": child.id(), "log": log_path}),
        &format!(
            "started {} (pid {}), log {}",
            spec.name,
            child.id().unwrap_or(0),
            log_path.display()
        ),
    );
    if let Some(stdout) = child.stdout.take() {
        // What a function writes to stdout is its output (export: insights); echo it.
        let view = Arc::clone(view);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                view.output(&line);
            }
        });
    }
    Ok(child)
}
