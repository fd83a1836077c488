//! Shared pieces of the cross-crate tests: where the binaries are, and
//! events as collectors publish them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use tidewatch_proto::v1;
use tidewatch_runtime::event::new_event;
use tidewatch_runtime::topology::{self, types};

/// A workspace binary, built next to `tidewatch`. Function binaries belong
/// to other packages, so `cargo test` alone does not build them.
pub fn binary(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_tidewatch"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build every binary first with `cargo build --workspace` (the README's test command does)",
        path.display()
    );
    path
}

/// A container restart as the k8s collector would publish it.
pub fn restart_event(i: u64, pod: &str) -> cloudevents::Event {
    let payload = v1::ContainerRestart {
        namespace: "default".into(),
        pod: pod.into(),
        container: "app".into(),
        restart_count: i as u32,
        reason: "Error".into(),
        exit_code: 1,
        ..Default::default()
    };
    new_event(
        format!("restart-{i}"),
        types::CONTAINER_RESTARTED,
        &topology::source("k8s", "node-1"),
        Some(&format!("pod/default/{pod}")),
        chrono::Utc::now(),
        &payload,
    )
    .expect("event builds")
}

/// Consumer counters: (pending, ack pending, redelivered, ack floor stream seq).
pub async fn consumer_state(js: &jetstream::Context, durable: &str) -> (u64, usize, usize, u64) {
    let spec = topology::consumer(durable).expect("consumer in topology");
    let stream = topology::stream(spec.stream).expect("stream in topology");
    let info = js
        .get_stream(stream.name)
        .await
        .expect("stream")
        .consumer_info(durable)
        .await
        .expect("consumer info");
    (
        info.num_pending,
        info.num_ack_pending,
        info.num_redelivered,
        info.ack_floor.stream_sequence,
    )
}

pub async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

/// Wait for a child to exit, at most `limit`.
pub async fn wait_exit(
    child: &mut tokio::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    tokio::time::timeout(limit, child.wait())
        .await
        .expect("process exits in time")
        .expect("wait")
}

pub fn signal(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    let pid = child.id().expect("running") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal delivered");
}

/// Whether a process is gone (not running, not a zombie).
pub fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}
