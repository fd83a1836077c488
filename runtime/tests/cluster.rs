//! Publishing through a stream-leader failover on a real 3-node cluster:
//! every publish is confirmed, by retrying with the same msg id, and the
//! stream stores each event exactly once.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, publish::PublishAck};
use cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};
use tidewatch_runtime::binding::nats::{MSG_ID_HEADER, from_nats};
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{PublishError, Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::{NatsCluster, eventually};
use tokio::task::JoinSet;

const EVENTS: usize = 200;
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_survive_a_stream_leader_failover_without_duplicates() {
    let mut cluster = NatsCluster::start().await;
    let client = cluster.connect().await;
    // Creating an R3 stream is a round of raft on three nodes: give a busy
    // machine longer than the default 5 s per API call.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .build(client.clone());
    let report = provision(&js, &[], &ProvisionOptions::default().replicas(3))
        .await
        .expect("provision R3");
    assert!(!report.is_noop());
    let again = provision(&js, &[], &ProvisionOptions::default().replicas(3))
        .await
        .expect("provision again");
    assert!(
        again.is_noop(),
        "provisioning a cluster is idempotent too:\n{again}"
    );
    let mut raw = js.get_stream(topology::RAW.name).await.expect("raw");
    assert_eq!(raw.info().await.expect("info").config.num_replicas, 3);

    let leader = eventually("RAW to have a leader", WAIT, || {
        cluster.stream_leader(&client, topology::RAW.name)
    })
    .await;

    let metrics = Metrics::new("cluster-test");
    let publisher = Publisher::new(
        client.clone(),
        PublisherConfig::default()
            .max_attempts(20)
            .ack_timeout(Duration::from_secs(2)),
        metrics.clone(),
    );
    let subject = subjects::raw("cluster", "node-1");
    let mut pending: JoinSet<Result<PublishAck, PublishError>> = JoinSet::new();
    for i in 0..EVENTS {
        if i == EVENTS / 2 {
            // Mid-stream: earlier publishes may still await their acks.
            cluster.kill(leader).await;
        }
        let event = EventBuilderV10::new()
            .id(format!("cluster-{i:03}"))
            .source("/tidewatch/cluster-test/node-1")
            .ty("test.cluster")
            .data(
                "application/octet-stream",
                vec![u8::try_from(i % 256).expect("byte"); 64],
            )
            .build()
            .expect("event");
        let confirmation = publisher.send(subject.clone(), &event).await.expect("send");
        pending.spawn(confirmation.into_future());
    }
    let confirmed = tokio::time::timeout(Duration::from_secs(50), async {
        let mut confirmed = 0;
        while let Some(result) = pending.join_next().await {
            result
                .expect("confirmation task")
                .expect("every publish is confirmed despite the failover");
            confirmed += 1;
        }
        confirmed
    })
    .await
    .expect("all publishes confirmed in time");
    assert_eq!(confirmed, EVENTS);
    assert!(
        metrics.publish_retries.get() > 0,
        "the failover was exercised: some publishes had to be retried"
    );

    let new_leader = eventually("RAW to elect a new leader", WAIT, || {
        cluster.stream_leader(&client, topology::RAW.name)
    })
    .await;
    assert_ne!(new_leader, leader, "the killed node cannot lead");

    let state = eventually("the stream to report every event", WAIT, || {
        let mut raw = raw.clone();
        async move {
            let state = raw.info().await.ok()?.state.clone();
            (state.messages >= EVENTS as u64).then_some(state)
        }
    })
    .await;
    assert_eq!(
        state.messages, EVENTS as u64,
        "exactly one copy of each event: {state:?}"
    );

    let mut ids = BTreeSet::new();
    for seq in state.first_sequence..=state.last_sequence {
        let message = raw.get_raw_message(seq).await.expect("stored message");
        let event = from_nats(Some(&message.headers), &message.payload).expect("stored event");
        let id = event.id().to_string();
        assert_eq!(
            message.headers.get(MSG_ID_HEADER).map(|v| v.as_str()),
            Some(id.as_str()),
            "Nats-Msg-Id is the id"
        );
        assert!(ids.insert(id.clone()), "{id} stored twice");
    }
    let expected: BTreeSet<String> = (0..EVENTS).map(|i| format!("cluster-{i:03}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(metrics.published.get(), EVENTS as u64);
}
