//! The CLI's data commands against a real nats-server: provision, emit,
//! burst, tail, replay, status.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use tidewatch_runtime::topology;
use tidewatch_testkit::NatsServer;
use tokio::process::Command;

async fn tidewatch(server: &NatsServer, args: &[&str]) -> (bool, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(binary("tidewatch"))
            .args(args)
            .env("NATS_URL", server.client_url())
            .output(),
    )
    .await
    .expect("command finishes")
    .expect("command runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_emit_tail_replay_and_status() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.connect().await);

    let (ok, out, err) = tidewatch(&server, &["provision"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("created   stream TIDEWATCH_RAW"), "{out}");
    let (ok, out, _) = tidewatch(&server, &["provision"]).await;
    assert!(
        ok && out.contains("everything was already provisioned"),
        "{out}"
    );

    let data = r#"{"container":"app","exitCode":139,"reason":"Error"}"#;
    let (ok, out, err) = tidewatch(
        &server,
        &[
            "emit",
            "--subject",
            "pod/shop/cart-1",
            "--count",
            "3",
            "--data",
            data,
            "--node",
            "n1",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("published")).count(),
        3,
        "{out}"
    );
    let (ok, _, err) = tidewatch(
        &server,
        &[
            "emit",
            "--type",
            "dev.tidewatch.k8s.container.restarted",
            "--data",
            r#"{"exitCode":"x"}"#,
        ],
    )
    .await;
    assert!(
        !ok && err.contains("--data"),
        "bad --data is refused with a reason: {err}"
    );

    let (ok, out, err) = tidewatch(
        &server,
        &["tail", "--stream", "raw", "--from-start", "--limit", "3"],
    )
    .await;
    assert!(ok, "{err}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["subject"], "pod/shop/cart-1");
    assert_eq!(
        events[0]["data"]["exitCode"], 139,
        "protobuf payload decoded for humans"
    );
    assert_eq!(events[0]["source"], "/tidewatch/cli/n1");

    let (ok, out, err) = tidewatch(&server, &["burst", "--events", "500", "--node", "n1"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("published 500 events"), "{out}");
    assert_eq!(stream_messages(&js, topology::RAW.name).await, 503);

    // Replay to one consumer: it lands on enrich's replay subject only.
    let (ok, out, err) = tidewatch(
        &server,
        &[
            "replay",
            "--stream",
            "raw",
            "--since",
            "1h",
            "--consumer",
            "enrich",
            "--type",
            "*.container.*",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("replayed 3 events"), "{out}");
    assert_eq!(stream_messages(&js, topology::RAW.name).await, 506);
    let (pending, _, _, _) = consumer_state(&js, "enrich").await;
    assert_eq!(pending, 506, "enrich sees the originals and its replays");
    let mut raw = js.get_stream(topology::RAW.name).await.expect("raw");
    let replayed = raw
        .get_last_raw_message_by_subject("tidewatch.replay.raw.enrich")
        .await
        .expect("a replayed message");
    assert_eq!(
        replayed
            .headers
            .get("ce-subject")
            .map(|v| v.as_str().to_string()),
        Some("pod/shop/cart-1".into())
    );
    let _ = raw.info().await;

    let (ok, _, err) = tidewatch(
        &server,
        &[
            "replay",
            "--stream",
            "raw",
            "--since",
            "1h",
            "--consumer",
            "nobody",
        ],
    )
    .await;
    assert!(!ok && err.contains("unknown consumer"), "{err}");

    let (ok, out, err) = tidewatch(&server, &["status"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("TIDEWATCH_RAW") && out.contains("506"),
        "{out}"
    );
    assert!(
        out.contains("enrich") && out.contains("tidewatch-correlation"),
        "{out}"
    );
}
