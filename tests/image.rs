//! The image `scripts/image` builds: made from the binaries `cargo build
//! --workspace` left in the target directory (no rebuild), run with podman.
//! Its user is 65532 (the image's config and the running process), every
//! binary in it and journalctl run, and `tidewatch-enrich` from it enriches
//! an event published on the host's nats-server.

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use chrono::Utc;
use cloudevents::AttributesReader;
use common::*;
use tidewatch_proto::v1::{ContainerMetadata, OomKill, PodMetadata, ProcessInfo};
use tidewatch_runtime::topology::{self, types};
use tidewatch_testkit::{NatsServer, eventually, skip};

const TEST: &str = "image::the_image_runs_every_binary_as_65532_and_enrich_works_from_it";

/// Every binary of the workspace: the image must hold exactly these.
const BINARIES: [&str; 8] = [
    "tidewatch",
    "tidewatch-auth-callout",
    "tidewatch-collector-ebpf",
    "tidewatch-collector-k8s",
    "tidewatch-collector-systemd",
    "tidewatch-correlate",
    "tidewatch-enrich",
    "tidewatch-export",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The podman configuration the project's scripts use (runc, cgroupfs, no
/// default ulimits), unless the caller set one.
fn containers_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("scripts/containers.conf"))
}

fn podman_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("podman");
    command
        .env("CONTAINERS_CONF", containers_conf())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs podman to completion (at most `limit`).
async fn podman_within(limit: Duration, args: &[&str]) -> Output {
    let output = podman_command(args).output();
    tokio::time::timeout(limit, output)
        .await
        .unwrap_or_else(|_| panic!("podman {} took over {limit:?}", args.join(" ")))
        .unwrap_or_else(|e| panic!("podman {}: {e}", args.join(" ")))
}

async fn podman(args: &[&str]) -> Output {
    podman_within(Duration::from_secs(120), args).await
}

/// Runs podman and returns its trimmed stdout; panics with its stderr on failure.
async fn podman_ok(args: &[&str]) -> String {
    let output = podman(args).await;
    assert!(
        output.status.success(),
        "podman {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .any(|dir| dir.join(name).is_file())
}

/// Why podman cannot run containers here, if it cannot.
fn missing() -> Option<String> {
    if let Err(why) = skip::require_root("rootful podman with runc and host networking") {
        return Some(why);
    }
    let podman = std::process::Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !podman.is_ok_and(|s| s.success()) {
        return Some("podman is not installed (scripts/test installs it)".into());
    }
    if !on_path("runc") {
        return Some("runc is not installed (scripts/test installs it)".into());
    }
    None
}

/// Removes the test's containers and image, however the test ends.
struct Cleanup {
    tag: String,
    containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let conf = containers_conf();
        let run = |args: &[&str]| {
            let _ = std::process::Command::new("podman")
                .env("CONTAINERS_CONF", &conf)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for name in &self.containers {
            run(&["rm", "--force", "--time", "0", name]);
        }
        run(&["image", "unmount", &self.tag]);
        run(&["rmi", "--force", &self.tag]);
    }
}

fn meta() -> PodMetadata {
    PodMetadata {
        uid: "uid-web-1".into(),
        namespace: "shop".into(),
        name: "web-1".into(),
        node: "node-1".into(),
        workload_kind: "ReplicaSet".into(),
        workload_name: "web-7c9f".into(),
        pod_ips: vec!["10.1.0.5".into()],
        containers: vec![ContainerMetadata {
            name: "web".into(),
            container_id: "containerd://feed01".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A kernel OOM kill in nginx's container: a type correlate reads, so
/// enrich stores it (process execs nobody reads it would not).
fn oom_kill(id: &str) -> cloudevents::Event {
    let payload = OomKill {
        victim: Some(ProcessInfo {
            pid: 10,
            comm: "nginx".into(),
            container_id: "feed01".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    proto_event(
        id,
        types::OOM_KILL,
        "ebpf",
        "node-1",
        None,
        Utc::now(),
        &payload,
    )
}

/// `Uid:` and `Gid:` of a process: real, effective, saved and filesystem ids.
fn ids(pid: &str) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("Uid:"), field("Gid:"))
}

async fn build_image(tag: &str) {
    let binaries = binary("tidewatch")
        .parent()
        .expect("target dir")
        .to_path_buf();
    let output = tokio::process::Command::new(repo().join("scripts/image"))
        .env("CONTAINERS_CONF", containers_conf())
        .arg("--profile")
        .arg("debug")
        .arg("--binaries")
        .arg(&binaries)
        .args(["--tag", tag, "--no-compressed-size"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), output)
        .await
        .expect("scripts/image finishes in 10 minutes")
        .expect("scripts/image runs");
    assert!(
        output.status.success(),
        "scripts/image failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
}

/// What the image holds, read from its mounted root filesystem.
async fn check_contents(tag: &str) -> Vec<String> {
    let root = PathBuf::from(podman_ok(&["image", "mount", tag]).await);
    let read = |path: &str| {
        std::fs::read_to_string(root.join(path))
            .unwrap_or_else(|e| panic!("{path} in the image: {e}"))
    };
    let mut binaries: Vec<String> = std::fs::read_dir(root.join("usr/local/bin"))
        .expect("/usr/local/bin in the image")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    binaries.sort();
    let passwd = read("etc/passwd");
    let group = read("etc/group");
    let certs = read("etc/ssl/certs/ca-certificates.crt");
    let journalctl = root.join("usr/bin/journalctl").is_file();
    let loader = !cfg!(target_arch = "x86_64") || root.join("lib64/ld-linux-x86-64.so.2").is_file();
    podman_ok(&["image", "unmount", tag]).await;

    assert_eq!(binaries, BINARIES, "/usr/local/bin holds every binary");
    assert!(
        passwd
            .lines()
            .any(|l| l.split(':').nth(2) == Some("65532") && l.split(':').nth(3) == Some("65532")),
        "/etc/passwd names uid 65532:\n{passwd}"
    );
    assert!(
        group.lines().any(|l| l.split(':').nth(2) == Some("65532")),
        "/etc/group names gid 65532:\n{group}"
    );
    assert!(certs.contains("BEGIN CERTIFICATE"), "CA certificates");
    assert!(journalctl, "journalctl in /usr/bin");
    assert!(loader, "the dynamic loader");
    binaries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_every_binary_as_65532_and_enrich_works_from_it() {
    if let Some(why) = missing() {
        skip::cannot_run(TEST, &why);
        return;
    }
    let unique = format!(
        "{}-{}",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let tag = format!("localhost/tidewatch-test:{unique}");
    let enrich = format!("tidewatch-test-enrich-{unique}");
    let _cleanup = Cleanup {
        tag: tag.clone(),
        containers: vec![enrich.clone()],
    };

    build_image(&tag).await;
    let user = podman_ok(&["image", "inspect", "--format", "{{.Config.User}}", &tag]).await;
    assert_eq!(user, "65532:65532", "the image runs as 65532");
    let version = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{index .Config.Labels \"org.opencontainers.image.version\"}}",
        &tag,
    ])
    .await;
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    // Every binary in the image, and journalctl, starts: its libraries are all there.
    let binaries = check_contents(&tag).await;
    for name in binaries.iter().map(String::as_str).chain(["journalctl"]) {
        let output = podman(&[
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--network",
            "none",
            &tag,
            name,
            "--version",
        ])
        .await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{name} --version in the image failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let expected = if name == "journalctl" {
            "systemd ".to_string()
        } else {
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        };
        assert!(stdout.starts_with(&expected), "{name} --version: {stdout}");
    }

    // enrich from the image against a nats-server on the host.
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    put_pod(&js, &meta()).await;
    let nats_url = format!("NATS_URL={}", server.client_url());
    podman_ok(&[
        "run",
        "--detach",
        "--name",
        &enrich,
        "--runtime",
        "runc",
        "--network",
        "host",
        "--env",
        &nats_url,
        "--env",
        "TIDEWATCH_METRICS_ADDR=127.0.0.1:0",
        "--env",
        "TIDEWATCH_TRANSPORT=jetstream",
        "--env",
        "RUST_LOG=warn",
        &tag,
        "tidewatch-enrich",
    ])
    .await;
    let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &enrich]).await;
    let container_user = podman_ok(&["inspect", "--format", "{{.Config.User}}", &enrich]).await;
    assert_eq!(container_user, "65532:65532");
    let (uid, gid) = ids(&pid);
    assert_eq!(uid, "65532 65532 65532 65532", "enrich's uids (pid {pid})");
    assert_eq!(gid, "65532 65532 65532 65532", "enrich's gids (pid {pid})");

    let id = format!("image-{unique}");
    publish_raw(&publisher, &[oom_kill(&id)]).await;
    let event = eventually(
        "the event to come out of enrich in the container",
        Duration::from_secs(60),
        || async {
            stream_events(&js, topology::ENRICHED.name)
                .await
                .into_iter()
                .find(|e| e.id() == id)
        },
    )
    .await;
    let ext = |name: &str| event.extension(name).map(|v| v.to_string());
    assert_eq!(ext("resolution").as_deref(), Some("resolved"), "{event}");
    assert_eq!(ext("pod").as_deref(), Some("web-1"), "{event}");

    // SIGTERM from `podman stop` reaches enrich as PID 1: it drains and exits 0.
    podman_ok(&["stop", "--time", "30", &enrich]).await;
    let exit = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &enrich]).await;
    let logs = podman(&["logs", &enrich]).await;
    assert_eq!(
        exit,
        "0",
        "enrich's exit code after SIGTERM; its logs:\n{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
}

/// The Containerfile labels its image with the workspace's version and runs it as 65532.
#[test]
fn the_containerfile_matches_the_workspace() {
    let text = std::fs::read_to_string(repo().join("Containerfile")).expect("Containerfile");
    let version = format!("ARG TIDEWATCH_VERSION={}", env!("CARGO_PKG_VERSION"));
    assert!(
        text.lines().any(|l| l.trim() == version),
        "the Containerfile's `{version}` follows Cargo.toml's [workspace.package] version"
    );
    assert!(
        text.lines().any(|l| l.trim() == "USER 65532:65532"),
        "the Containerfile runs as 65532"
    );
    assert!(
        text.contains("scripts/image --profile release --rootfs-only"),
        "the Containerfile assembles the root filesystem with scripts/image"
    );
}
