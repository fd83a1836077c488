//! The three collector binaries run on one collector host: the same common
//! flags, the same exit codes for a bad config and for a host that cannot
//! run them, and the same metric labels (`component="collector-<name>"`).
//!
//! The binaries are other packages' targets: build them first (`cargo
//! build -p tidewatch-collector-ebpf -p tidewatch-collector-k8s -p
//! tidewatch-collector-systemd`); without them the test says it cannot run.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tidewatch_testkit::{NatsServer, eventually, free_port, http_get};

const COLLECTORS: [&str; 3] = ["ebpf", "k8s", "systemd"];

/// The flags every collector takes from the runtime.
const COMMON_FLAGS: [&str; 7] = [
    "--nats-url",
    "--node",
    "--metrics-addr",
    "--spool-dir",
    "--config",
    "--check-config",
    "--check-host",
];

/// `target/<profile>/tidewatch-collector-<name>` for every collector, or
/// why not.
fn binaries(test: &str) -> Option<Vec<(&'static str, PathBuf)>> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/<this test>
    let dir = exe.parent()?.parent()?.to_path_buf();
    let found: Vec<_> = COLLECTORS
        .iter()
        .map(|name| (*name, dir.join(format!("tidewatch-collector-{name}"))))
        .collect();
    if let Some((_, missing)) = found.iter().find(|(_, path)| !path.exists()) {
        tidewatch_testkit::skip::cannot_run(
            test,
            &format!(
                "{} is not built (cargo build -p tidewatch-collector-ebpf -p tidewatch-collector-k8s -p tidewatch-collector-systemd)",
                missing.display()
            ),
        );
        return None;
    }
    Some(found)
}

/// The help entry of each common flag (flag, value, description, default,
/// variable), whitespace collapsed: clap lays help out in one or two
/// columns depending on the other flags' lengths.
fn common_flag_help(help: &str, name: &str) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('-') {
            entries.push(trimmed.to_string());
        } else if let Some(last) = entries.last_mut()
            && !trimmed.is_empty()
        {
            last.push(' ');
            last.push_str(trimmed);
        }
    }
    COMMON_FLAGS
        .iter()
        .map(|flag| {
            let entry = entries
                .iter()
                .find(|e| e.split_whitespace().next() == Some(flag))
                .unwrap_or_else(|| panic!("{name}: no {flag} in --help:\n{help}"));
            // The config file's variable names the collector; nothing else may.
            entry
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace(
                    &format!("TIDEWATCH_{}_CONFIG", name.to_uppercase()),
                    "TIDEWATCH_<NAME>_CONFIG",
                )
        })
        .collect()
}

#[test]
fn common_flags_and_exit_codes_are_the_same_for_every_collector() {
    let test = "common_flags_and_exit_codes_are_the_same_for_every_collector";
    let Some(binaries) = binaries(test) else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "no_such_setting = 1\n").expect("write config");

    let mut helps = Vec::new();
    for (name, binary) in &binaries {
        let out = Command::new(binary).arg("--help").output().expect("--help");
        assert!(out.status.success(), "{name} --help");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        helps.push((name, common_flag_help(&help, name)));

        let out = Command::new(binary)
            .args(["--check-config", "--config"])
            .arg(&bad)
            .output()
            .expect("--check-config");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name} --check-config with a bad config"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("unknown field `no_such_setting`"),
            "{name}: {stderr}"
        );
    }
    for (name, help) in &helps[1..] {
        assert_eq!(
            help, &helps[0].1,
            "{name} and {} differ in the common flags",
            helps[0].0
        );
    }

    // A host that cannot run the collector: exit 3 with one line saying why.
    let k8s = &binaries[1].1;
    let out = Command::new(k8s)
        .arg("--check-host")
        .env_clear()
        .env("HOME", work.path())
        .env("KUBECONFIG", work.path().join("missing-kubeconfig"))
        .output()
        .expect("k8s --check-host");
    assert_eq!(out.status.code(), Some(3), "k8s without credentials");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    let systemd = &binaries[2].1;
    let out = Command::new(systemd)
        .arg("--check-host")
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            format!("unix:path={}", work.path().join("no-bus").display()),
        )
        .output()
        .expect("systemd --check-host");
    assert_eq!(out.status.code(), Some(3), "systemd without a bus");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
    // eBPF: exit 3 exactly when its preflight says no (root loads eBPF here).
    let ebpf = &binaries[0].1;
    let out = Command::new(ebpf)
        .arg("--check-host")
        .output()
        .expect("ebpf --check-host");
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "ebpf --check-host: {:?}",
        out.status
    );
}

/// A process killed on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collector_labels_its_metrics_collector_name() {
    let test = "every_collector_labels_its_metrics_collector_name";
    let Some(binaries) = binaries(test) else {
        return;
    };
    let server = NatsServer::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    // Credentials for an API server that is not there: the collector keeps
    // retrying its watches and serves /metrics meanwhile.
    let kubeconfig = work.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: t\n",
    )
    .expect("write kubeconfig");
    // Units only (retried while the bus is missing); no journal to need.
    let systemd_config = work.path().join("systemd.toml");
    std::fs::write(&systemd_config, "journal = false\n").expect("write config");

    for (name, binary) in &binaries {
        if *name == "ebpf" {
            let check = Command::new(binary)
                .arg("--check-host")
                .output()
                .expect("--check-host");
            if !check.status.success() {
                let why = String::from_utf8_lossy(&check.stderr);
                tidewatch_testkit::skip::cannot_run(&format!("{test} (ebpf)"), why.trim());
                continue;
            }
        }
        let port = free_port();
        let mut command = Command::new(binary);
        command
            .env("NATS_URL", server.client_url())
            .env("TIDEWATCH_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "TIDEWATCH_SPOOL_DIR",
                work.path().join(format!("spool-{name}")),
            )
            .env("NODE_NAME", "label-test")
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                format!("unix:path={}", work.path().join("no-bus").display()),
            )
            .env("TIDEWATCH_CURSOR_FILE", work.path().join("cursor"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if *name == "systemd" {
            command.arg("--config").arg(&systemd_config);
        }
        if *name == "ebpf" {
            // Only what this test runs: no snapshot of every process.
            let config = work.path().join("ebpf.toml");
            std::fs::write(&config, "replay_processes = false\n").expect("write config");
            command.arg("--config").arg(config);
        }
        let _running = Running(command.spawn().expect("spawn the collector"));
        let url = format!("http://127.0.0.1:{port}/metrics");
        let body = eventually(
            &format!("{name}'s /metrics"),
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    http_get(&url)
                        .await
                        .ok()
                        .filter(|(s, _)| *s == 200)
                        .map(|(_, b)| b)
                }
            },
        )
        .await;
        let samples: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("tidewatch_"))
            .collect();
        assert!(!samples.is_empty(), "{name}: {body}");
        let label = format!("component=\"collector-{name}\"");
        for sample in samples {
            assert!(sample.contains(&label), "{name}: {sample}");
        }
    }
}
