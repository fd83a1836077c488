//! `tidewatch new function` in a copy of this repository: it writes the new
//! crate's function.toml (data the CLI embeds, so `up` runs it) and touches
//! no other crate's sources, so building after it recompiles the new crate
//! and the CLI only — not the runtime, not the other functions; the
//! scaffolded crate compiles and passes its own test, its manifests and
//! README section are there, and the built binary handles a matching event
//! from its durable consumer on a real nats-server (delivered once, input
//! acked) and acks the others unread. Inputs that would inject into the
//! generated files are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use common::{binary, json_event, signal, wait_exit};
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::{NatsServer, eventually};
use tokio::io::AsyncBufReadExt;

/// Copy the repository's files (tracked, and new ones not ignored) into `to`.
fn copy_repo(from: &Path, to: &Path) {
    let listing = Command::new("git")
        .args(["ls-files", "-co", "--exclude-standard", "-z"])
        .current_dir(from)
        .output()
        .expect("git runs");
    assert!(
        listing.status.success(),
        "git ls-files: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    for file in listing.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let relative = Path::new(std::str::from_utf8(file).expect("utf-8 path"));
        let source = from.join(relative);
        if !source.is_file() {
            continue;
        }
        let target = to.join(relative);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&source, &target)
            .unwrap_or_else(|e| panic!("copy {}: {e}", relative.display()));
    }
}

/// A target dir for the copy that reuses this build's compiled registry
/// crates (hard links: nothing is copied or rebuilt) but none of the
/// workspace's own, which the copy builds afresh from its own sources.
/// Sharing the target dir itself would not do: the copy's crates have the
/// same names and hashes as ours and would overwrite them.
fn seeded_target_dir(ours: &Path, into: &Path) {
    fn link_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read dir").flatten() {
            let (source, target) = (entry.path(), to.join(entry.file_name()));
            if source.is_dir() {
                link_tree(&source, &target);
            } else if std::fs::hard_link(&source, &target).is_err() {
                std::fs::copy(&source, &target).expect("copy");
            }
        }
    }
    for sub in ["deps", "build", ".fingerprint"] {
        let Ok(entries) = std::fs::read_dir(ours.join(sub)) else {
            continue;
        };
        let to = into.join(sub);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains("tidewatch") {
                continue;
            }
            let source = entry.path();
            if source.is_dir() {
                link_tree(&source, &to.join(&name));
            } else if std::fs::hard_link(&source, to.join(&name)).is_err() {
                std::fs::copy(&source, to.join(&name)).expect("copy");
            }
        }
    }
}

/// `cargo <args>` in the copy, building into `target_dir`; panics with its
/// output on failure, else returns its stdout.
fn cargo(copy: &Path, target_dir: &Path, args: &[&str]) -> String {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(copy)
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {args:?} in the scaffolded copy failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The packages whose targets `cargo build --message-format json` compiled
/// (rather than found fresh).
fn compiled_packages(messages: &str) -> Vec<String> {
    let mut packages: Vec<String> = messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["fresh"] == false)
        .filter_map(|m| {
            // `path+file:///…/functions/siem#tidewatch-siem@0.1.0` or `…#0.1.0` (name = dir).
            let id = m["package_id"].as_str()?;
            let (path, rest) = id.split_once('#')?;
            Some(match rest.split_once('@') {
                Some((name, _)) => name.to_string(),
                None => path.rsplit('/').next()?.to_string(),
            })
        })
        .collect();
    packages.sort();
    packages.dedup();
    packages
}

/// `tidewatch new function <args> --repo <copy>`.
fn scaffold(copy: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary("tidewatch"))
        .args(["new", "function"])
        .args(args)
        .arg("--repo")
        .arg(copy)
        .output()
        .expect("tidewatch new function runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaffolded_function_builds_passes_its_test_is_wired_in_and_runs() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let temp = tempfile::tempdir().expect("temp dir");
    let copy = temp.path().join("main");
    copy_repo(&repo, &copy);

    // Inputs that would inject into function.toml, the manifests or the
    // generated code are refused before anything is written.
    for (args, complaint) in [
        (&["bad\"name"][..], "function name"),
        (&["ok", "--types", "a\"b"][..], "--types"),
        (&["ok", "--types", "dev.x\n]\nname = \"x\""][..], "--types"),
        (&["ok", "--types", "dev.x,"][..], "--types"),
        (&["enrich"][..], "already exists"),
    ] {
        let refused = scaffold(&copy, args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(complaint),
            "{args:?}: {stderr}"
        );
    }
    assert!(!copy.join("functions/ok").exists(), "nothing written");

    // The copy built before the scaffold: the runtime, a function, the CLI.
    let profile_dir = binary("tidewatch")
        .parent()
        .expect("profile dir")
        .to_path_buf();
    let target_dir = temp.path().join("target");
    seeded_target_dir(&profile_dir, &target_dir.join("debug"));
    let packages = [
        "-p",
        "tidewatch-runtime",
        "-p",
        "tidewatch-export",
        "-p",
        "tidewatch",
    ];
    cargo(
        &copy,
        &target_dir,
        &[&["build", "--quiet"][..], &packages].concat(),
    );

    let output = scaffold(
        &copy,
        &[
            "siem",
            "--from",
            "insights",
            "--types",
            "dev.tidewatch.insight.*",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Its spec is data in its own crate, and nothing else's sources changed.
    let spec = tidewatch_runtime::topology::FunctionSpec::from_toml(
        &std::fs::read_to_string(copy.join("functions/siem/function.toml")).expect("function.toml"),
    )
    .expect("a valid spec");
    assert_eq!(
        (spec.name, spec.consumer.stream, spec.types.as_slice()),
        ("siem", "insights", &["dev.tidewatch.insight.*"][..])
    );
    for unchanged in ["runtime/src/topology.rs", "functions/export/src/main.rs"] {
        assert_eq!(
            std::fs::read(copy.join(unchanged)).expect("read"),
            std::fs::read(repo.join(unchanged)).expect("read"),
            "{unchanged}"
        );
    }
    // Adding it recompiles the new crate and the CLI (which embeds every
    // function.toml), not the runtime or the other functions.
    let messages = cargo(
        &copy,
        &target_dir,
        &[
            &["build", "--message-format", "json", "-p", "tidewatch-siem"][..],
            &packages,
        ]
        .concat(),
    );
    assert_eq!(
        compiled_packages(&messages),
        ["tidewatch", "tidewatch-siem"],
        "only the new function and the CLI are compiled"
    );

    assert!(
        std::fs::read_to_string(copy.join("Cargo.toml"))
            .expect("manifest")
            .contains("\"functions/siem\"")
    );
    let keda =
        std::fs::read_to_string(copy.join("keda/siem.yaml")).expect("keda manifest rendered");
    assert!(
        keda.contains("consumer: siem") && keda.contains("stream: TIDEWATCH_INSIGHTS"),
        "{keda}"
    );
    assert!(copy.join("knative/siem.yaml").is_file());
    assert!(
        std::fs::read_to_string(copy.join("keda/kustomization.yaml"))
            .expect("kustomization")
            .contains("siem.yaml")
    );
    assert!(
        std::fs::read_to_string(copy.join("deploy/nats.yaml"))
            .expect("nats")
            .contains("user: \"siem\""),
        "a NATS user for it"
    );
    assert!(
        std::fs::read_to_string(copy.join("README.md"))
            .expect("README")
            .contains("### siem")
    );
    // On a cluster, `kubectl apply -k keda/` now runs a new provisioning Job
    // (its name carries a hash of the consumers) that creates siem's
    // consumer, and NATS' pods roll to learn the user.
    let job_name = |path: &Path| {
        let text = std::fs::read_to_string(path).expect("provision.yaml");
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("name: tidewatch-provision-consumers-")
            })
            .map(str::to_string)
            .expect("a consumer provisioning Job")
    };
    let before = job_name(&repo.join("keda/provision.yaml"));
    let after = job_name(&copy.join("keda/provision.yaml"));
    assert_ne!(before, after, "a new topology, a new Job");
    let checksum = |path: &Path| {
        std::fs::read_to_string(path)
            .expect("nats.yaml")
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("checksum/config: ")
                    .map(str::to_string)
            })
            .expect("a config checksum on the NATS pods")
    };
    assert_ne!(
        checksum(&repo.join("deploy/nats.yaml")),
        checksum(&copy.join("deploy/nats.yaml")),
        "NATS' pods roll to load the new user"
    );

    // A second scaffold with the same name is refused, naming the problem.
    let again = scaffold(&copy, &["siem"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // The scaffolded crate's own tests pass (its spec parses, it delivers).
    cargo(
        &copy,
        &target_dir,
        &["test", "--quiet", "-p", "tidewatch-siem"],
    );

    // End to end: the copy's rebuilt CLI provisions siem's durable consumer
    // from the function.toml it embedded, then a matching and a
    // non-matching event, and the binary reading them.
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let provisioned = Command::new(target_dir.join("debug/tidewatch"))
        .arg("provision")
        .env("NATS_URL", server.client_url())
        .output()
        .expect("the copy's CLI runs");
    let report = String::from_utf8_lossy(&provisioned.stdout);
    assert!(
        provisioned.status.success() && report.contains("created   consumer siem"),
        "{report}{}",
        String::from_utf8_lossy(&provisioned.stderr)
    );
    let insights = js
        .get_stream(topology::INSIGHTS.name)
        .await
        .expect("insights stream");
    let publisher = Publisher::new(client, PublisherConfig::default(), Metrics::new("test"));
    let matching = json_event(
        "insight-1",
        "dev.tidewatch.insight.crash-loop",
        "correlate",
        "node-1",
        Some("pod/shop/web-1"),
        Utc::now(),
        serde_json::json!({"summary": "web-1 is crash-looping"}),
    );
    let other = json_event(
        "other-1",
        "com.example.other",
        "correlate",
        "node-1",
        None,
        Utc::now(),
        serde_json::json!({}),
    );
    for (subject, event) in [
        (subjects::insight("crash-loop"), &matching),
        (subjects::insight("other"), &other),
    ] {
        publisher
            .publish(subject.as_str(), event)
            .await
            .expect("stored");
    }

    let mut child = tokio::process::Command::new(target_dir.join("debug/tidewatch-siem"))
        .env("NATS_URL", server.client_url())
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the scaffolded function starts");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                lines.lock().expect("lock").push(line);
            }
        })
    };
    // Both inputs acked: nothing pending, nothing awaiting an ack.
    eventually(
        "siem to ack both events",
        Duration::from_secs(30),
        || async {
            let info = insights.consumer_info("siem").await.ok()?;
            (info.num_pending == 0
                && info.num_ack_pending == 0
                && info.ack_floor.stream_sequence == 2)
                .then_some(())
        },
    )
    .await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_exit(&mut child, Duration::from_secs(30))
            .await
            .success(),
        "siem exits cleanly on SIGTERM"
    );
    tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("stdout closes")
        .expect("reader");
    let lines = lines.lock().expect("lock").clone();
    assert_eq!(
        lines.len(),
        1,
        "one line for the one matching event: {lines:?}"
    );
    let delivered: serde_json::Value = serde_json::from_str(&lines[0]).expect("a JSON CloudEvent");
    assert_eq!(
        (delivered["id"].as_str(), delivered["type"].as_str()),
        (Some("insight-1"), Some("dev.tidewatch.insight.crash-loop")),
        "{delivered}"
    );
}
