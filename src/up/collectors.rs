//! The collectors `tidewatch up` runs when this host allows them: each
//! binary checks the host itself (`--check-host`) and says why not.

use std::path::Path;
use std::process::Stdio;

use serde_json::json;
use tidewatch_runtime::topology;
use tokio::process::{Child, Command};

use super::UpArgs;
use super::view::View;

/// Start every collector this host can run; say plainly why not for the others.
pub async fn start(
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
    for collector in topology::COLLECTORS {
        let (name, binary_name) = (collector.name, collector.binary);
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
