//! The CLI's data commands against a real nats-server: provision, emit,
//! burst, tail, replay, status.

mod common;

use async_nats::jetstream;
use common::*;
use tidewatch_runtime::topology;
use tidewatch_testkit::NatsServer;

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

/// `replay --stream dlq --consumer X` re-drives X's own dead letters only,
/// as the events they were (without the `Tidewatch-Dlq-*` headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_dead_letters_goes_to_their_own_consumer_only() {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    let (ok, _, err) = tidewatch(&server, &["provision"]).await;
    assert!(ok, "{err}");
    for (consumer, id) in [
        ("enrich", "raw-1"),
        ("correlate", "enriched-1"),
        ("correlate", "enriched-2"),
    ] {
        let (mut headers, payload) =
            tidewatch_runtime::binding::nats::to_nats(&restart_event(id.len() as u64, "web-1"));
        // Its own id, and so its own Nats-Msg-Id (the DLQ deduplicates too).
        headers.insert("ce-id", id);
        headers.insert("Nats-Msg-Id", id);
        headers.insert(tidewatch_runtime::dead_letter::CONSUMER_HEADER, consumer);
        headers.insert(
            tidewatch_runtime::dead_letter::REASON_HEADER,
            "handler failed",
        );
        js.publish_with_headers(topology::subjects::dead_letter(consumer), headers, payload)
            .await
            .expect("sent")
            .await
            .expect("stored");
    }
    let (ok, out, err) = tidewatch(
        &server,
        &[
            "replay",
            "--stream",
            "dlq",
            "--since",
            "1h",
            "--consumer",
            "correlate",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("replayed 2 events"), "{out}{err}");
    let replayed = stream_events(&js, topology::ENRICHED.name).await;
    let ids: Vec<String> = replayed
        .iter()
        .map(|e| cloudevents::AttributesReader::id(e).to_string())
        .collect();
    assert_eq!(
        ids,
        ["enriched-1", "enriched-2"],
        "correlate's dead letters only"
    );
    assert_eq!(
        stream_messages(&js, topology::RAW.name).await,
        0,
        "none to enrich"
    );
    let stream = js
        .get_stream(topology::ENRICHED.name)
        .await
        .expect("enriched");
    let first = stream
        .get_raw_message(1)
        .await
        .expect("the replayed message");
    assert!(
        !first
            .headers
            .iter()
            .any(|(name, _)| AsRef::<str>::as_ref(name).starts_with("Tidewatch-Dlq-")),
        "dead-letter headers stay behind: {:?}",
        first.headers
    );
}
