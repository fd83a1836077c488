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
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::topology::{self, FunctionSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::local_nats::LocalNats;

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where Tidewatch keeps its local state (nats data, function logs).
    #[arg(long, env = "TIDEWATCH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Client port for a nats-server that `up` starts.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// Monitoring port for a nats-server that `up` starts (KEDA's arithmetic reads it).
    #[arg(long, default_value_t = 8222)]
    monitoring_port: u16,
    /// Directory with the function binaries (default: next to this executable).
    #[arg(long, env = "TIDEWATCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Stop after this many seconds (for scripts and tests); default: until Ctrl-C.
    #[arg(long)]
    duration_secs: Option<u64>,
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

struct Running {
    spec: &'static FunctionSpec,
    child: Child,
    started: Instant,
    restarts: u32,
}

pub async fn run(nats_url: &str, args: UpArgs) -> anyhow::Result<()> {
    let state = state_dir(&args);
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;

    let mut started_nats = None;
    let url = match crate::try_connect(nats_url).await {
        Ok(_) => {
            println!("tidewatch: using NATS at {nats_url}");
            nats_url.to_string()
        }
        Err(_) => {
            println!(
                "tidewatch: nothing answers at {nats_url}; starting nats-server (data in {})",
                state.join("nats").display()
            );
            let local =
                LocalNats::start(&state.join("nats"), args.nats_port, args.monitoring_port).await?;
            println!(
                "tidewatch: nats-server running at {} (monitoring {}, pid {}, log {})",
                local.url,
                local.monitoring_url,
                local.pid().unwrap_or(0),
                local.log.display()
            );
            let url = local.url.clone();
            started_nats = Some(local);
            url
        }
    };
    let result = supervise(&url, &args, &logs).await;
    if let Some(local) = started_nats {
        println!("tidewatch: stopping nats-server");
        local.stop().await;
    }
    println!("tidewatch: stopped");
    result
}

async fn supervise(url: &str, args: &UpArgs, logs: &Path) -> anyhow::Result<()> {
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
    println!(
        "tidewatch: provisioned {} objects ({changed} created or updated)",
        report.items.len()
    );

    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let mut running = Vec::new();
    for spec in topology::FUNCTIONS {
        running.push(Running {
            spec,
            child: spawn(spec, &bin_dir, url, logs)?,
            started: Instant::now(),
            restarts: 0,
        });
    }

    let mut view = LiveView::default();
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
        for r in &mut running {
            if let Ok(Some(status)) = r.child.try_wait() {
                // A function that keeps dying must not spin: back off by uptime.
                if r.started.elapsed() < Duration::from_secs(2) && r.restarts > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                r.restarts += 1;
                eprintln!(
                    "tidewatch: {} exited ({status}); restarting (restart #{}); log: {}",
                    r.spec.name,
                    r.restarts,
                    logs.join(format!("{}.log", r.spec.name)).display()
                );
                r.child = spawn(r.spec, &bin_dir, url, logs)?;
                r.started = Instant::now();
            }
        }
        let alive = running
            .iter_mut()
            .map(|r| r.child.try_wait())
            .filter(|s| matches!(s, Ok(None)))
            .count();
        match view.line(&js, alive, running.len()).await {
            Ok(line) => println!("{line}"),
            Err(e) => println!("tidewatch: status unavailable: {e:#}"),
        }
    }
    println!("tidewatch: stopping functions (SIGTERM; they finish in-flight work and ack)");
    for r in &mut running {
        terminate(&mut r.child, Duration::from_secs(30)).await;
    }
    Ok(())
}

fn spawn(spec: &FunctionSpec, bin_dir: &Path, url: &str, logs: &Path) -> anyhow::Result<Child> {
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
    println!(
        "tidewatch: started {} (pid {}), log {}",
        spec.name,
        child.id().unwrap_or(0),
        log_path.display()
    );
    if let Some(stdout) = child.stdout.take() {
        // What a function writes to stdout is its output (export: insights); echo it.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("{line}");
            }
        });
    }
    Ok(child)
}

/// SIGTERM `child`, wait up to `grace`, then SIGKILL. Always reaps it.
pub async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        eprintln!("tidewatch: pid {pid} did not stop within {grace:?}; killing it");
    }
    let _ = child.kill().await;
}

/// Rates between two samples of stream sequences.
#[derive(Default)]
struct LiveView {
    last: Option<(Instant, Vec<u64>)>,
}

impl LiveView {
    async fn line(
        &mut self,
        js: &jetstream::Context,
        alive: usize,
        total: usize,
    ) -> anyhow::Result<String> {
        let mut seqs = Vec::new();
        let mut dlq_total = 0;
        for spec in topology::STREAMS {
            let info = js.get_stream(spec.name).await?.info().await?.clone();
            seqs.push(info.state.last_sequence);
            if spec.name == topology::DEAD_LETTER.name {
                dlq_total = info.state.messages;
            }
        }
        let now = Instant::now();
        let rates: Vec<f64> = match &self.last {
            Some((t, prev)) => {
                let secs = now.duration_since(*t).as_secs_f64().max(0.001);
                seqs.iter()
                    .zip(prev)
                    .map(|(a, b)| a.saturating_sub(*b) as f64 / secs)
                    .collect()
            }
            None => vec![0.0; seqs.len()],
        };
        self.last = Some((now, seqs));
        let mut line = chrono::Local::now().format("%H:%M:%S ").to_string();
        for (spec, rate) in topology::STREAMS.iter().zip(&rates) {
            if spec.name != topology::DEAD_LETTER.name {
                line.push_str(&format!(" {} {:.0}/s", spec.key, rate));
            }
        }
        line.push_str(&format!("  dlq {dlq_total} |  lag"));
        for consumer in topology::CONSUMERS {
            let stream = topology::stream(consumer.stream)
                .map(|s| s.name)
                .unwrap_or_default();
            let info = js
                .get_stream(stream)
                .await?
                .consumer_info(consumer.durable)
                .await?;
            line.push_str(&format!(
                " {} {}",
                consumer.durable,
                info.num_pending + info.num_ack_pending as u64
            ));
        }
        line.push_str(&format!(" |  functions {alive}/{total} up"));
        Ok(line)
    }
}
