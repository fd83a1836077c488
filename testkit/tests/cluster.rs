//! A 3-node JetStream cluster: R3 stream survives killing its leader, and the
//! killed node rejoins after restart.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use tidewatch_testkit::{NatsCluster, eventually, http_get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_survives_leader_kill_and_node_rejoins() {
    let mut cluster = NatsCluster::start().await;
    assert_eq!(cluster.node_count(), 3);
    assert_eq!(cluster.client_urls().len(), 3);
    assert!((0..3).all(|i| cluster.is_running(i)));

    let client = cluster.connect().await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "EVENTS".to_string(),
        subjects: vec!["events.>".to_string()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("create R3 stream EVENTS");
    let ack = js
        .publish("events.one", "one".into())
        .await
        .expect("publish events.one")
        .await
        .expect("ack for events.one");
    assert_eq!(ack.sequence, 1);

    let leader = eventually("EVENTS to have a leader", Duration::from_secs(10), || {
        cluster.stream_leader(&client, "EVENTS")
    })
    .await;
    cluster.kill(leader).await;
    assert!(!cluster.is_running(leader));
    assert_eq!(cluster.pid(leader), None);

    // The client may have been on the killed node and the stream needs a new
    // leader; retry with a message id so a retried publish is deduplicated.
    let ack = eventually(
        "publish to succeed after killing the stream leader",
        Duration::from_secs(30),
        || async {
            let publish = PublishMessage::build()
                .payload("two".into())
                .message_id("two");
            js.send_publish("events.two", publish)
                .await
                .ok()?
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(ack.sequence, 2, "{ack:?}");
    let new_leader = eventually(
        "EVENTS to elect a new leader",
        Duration::from_secs(10),
        || cluster.stream_leader(&client, "EVENTS"),
    )
    .await;
    assert_ne!(new_leader, leader);

    let old_port = cluster.client_port(leader);
    cluster.restart(leader).await;
    assert!(cluster.is_running(leader));
    assert_eq!(
        cluster.client_port(leader),
        old_port,
        "same ports on restart"
    );
    let (status, body) = http_get(&format!("{}/healthz", cluster.monitoring_url(leader)))
        .await
        .expect("GET /healthz on restarted node");
    assert_eq!(status, 200, "{body}");

    // The restarted node caught up on the message published while it was down.
    eventually(
        "restarted node to hold both messages",
        Duration::from_secs(10),
        || async {
            let (_, body) = http_get(&format!("{}/jsz", cluster.monitoring_url(leader)))
                .await
                .ok()?;
            let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
            (jsz["messages"] == 2).then_some(())
        },
    )
    .await;
}
