//! The functions under the local autoscaler: replica processes started and
//! stopped on KEDA's arithmetic (`crate::autoscale`), restarted when they
//! die, with their stdout (export: the insights) echoed to the view.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use serde_json::json;
use tidewatch_runtime::topology::{self, FunctionSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::view::{Row, View};
use super::{UpArgs, collectors, lag};
use crate::autoscale::Autoscaler;
use crate::child_process::terminate;

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

/// Run every function under the local autoscaler, and the collectors,
/// until Ctrl-C, SIGTERM or `--duration-secs`; then stop them all.
pub async fn run(
    client: &async_nats::Client,
    url: &str,
    monitoring: &str,
    args: &UpArgs,
    logs: &Path,
    view: &Arc<View>,
) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let policies = lag::scale_policies(args)?;
    let started = Instant::now();
    let mut functions = Vec::new();
    for spec in crate::functions::all()? {
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
            .find(|(consumer, _)| consumer == spec.consumer.durable)
            .map(|(_, p)| p.clone())
            .with_context(|| {
                format!(
                    "no ScaledObject for consumer {} in keda/ (run `tidewatch render`)",
                    spec.consumer.durable
                )
            })?;
        if let Some(s) = args.polling_interval_secs {
            policy.polling_interval = Duration::from_secs(s);
        }
        policy.host_cap = Some(super::host_cap(args));
        if let Some(s) = args.cooldown_secs {
            policy.cooldown_period = Duration::from_secs(s);
        }
        if let Some(s) = args.scale_down_window_secs {
            policy.scale_down_window = Duration::from_secs(s);
        }
        let consumer_stream = topology::stream(spec.consumer.stream)
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

    let mut collectors = collectors::start(args, view, &bin_dir, url, logs).await;

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
            f.lag = match lag::consumer_lag(monitoring, f.spec.consumer.durable).await {
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
                host_cap: f.scaler.policy.host_cap,
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
    let mut command = Command::new(&binary);
    // An export sink group (its own function.toml, export's binary) reads its own durable.
    if spec.binary == "tidewatch-export" {
        command.env("TIDEWATCH_EXPORT_CONSUMER", spec.consumer.durable);
    }
    let mut child = command
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
