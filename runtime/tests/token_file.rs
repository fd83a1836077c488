//! Collectors authenticate with a token file (a projected ServiceAccount
//! token the kubelet rotates): the file is read at every connect attempt,
//! not once, and the connection's inbox is the collector's on its node.

use std::process::Stdio;
use std::time::Duration;

use tidewatch_runtime::host::{node_inbox_prefix, token_file_options};
use tidewatch_testkit::{free_port, nats_server_binary};

#[tokio::test]
async fn the_token_file_is_read_again_at_each_connect_attempt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _server = tokio::process::Command::new(nats_server_binary())
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--auth",
            "the-rotated-token",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server starts");
    let file = dir.path().join("token");
    std::fs::write(&file, "the-expired-token\n").expect("write token");
    let (refused_tx, mut refused) = tokio::sync::mpsc::unbounded_channel();
    let options = token_file_options(file.clone(), Some(("ebpf", "ip-10-0-0-1.ec2.internal")))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let refused_tx = refused_tx.clone();
            async move {
                if let async_nats::Event::ClientError(e) = event {
                    let _ = refused_tx.send(e.to_string());
                }
            }
        });
    let client = options
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .expect("connect (retrying in the background)");
    // (Connection refused until the server listens; then the token is.)
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = refused.recv().await {
            if e.to_lowercase().contains("authorization") {
                return;
            }
        }
    })
    .await
    .expect("the old token is refused");
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Pending
    );
    // The kubelet rotates the token; the next attempt reads the new one.
    std::fs::write(&file, "the-rotated-token\n").expect("rotate");
    tidewatch_testkit::eventually(
        "a connection with the rotated token",
        Duration::from_secs(30),
        || async {
            (client.connection_state() == async_nats::connection::State::Connected).then_some(())
        },
    )
    .await;
    assert!(
        client.new_inbox().starts_with(&format!(
            "{}.",
            node_inbox_prefix("ebpf", "ip-10-0-0-1.ec2.internal")
        )),
        "{}",
        client.new_inbox()
    );
    assert_eq!(
        node_inbox_prefix("ebpf", "ip-10-0-0-1.ec2.internal"),
        "_INBOX_ebpf_ip-10-0-0-1_ec2_internal"
    );
}
