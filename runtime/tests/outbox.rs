//! The outbox on a real nats-server that goes away and comes back: events
//! sent during the outage are spooled, replayed in order with their ids
//! once the server is back, never duplicated; overflow is counted and
//! reported; a new process replays what an earlier one left spooled.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream::Stream};
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use futures::StreamExt;
use tidewatch_runtime::binding::nats::from_nats;
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::outbox::{Delivered, Mode, Outbox, OutboxConfig};
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::spool::{FsyncPolicy, SpoolConfig};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::{NatsServer, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn event(i: usize, bytes: usize) -> Event {
    EventBuilderV10::new()
        .id(format!("outbox-{i:05}"))
        .source("/tidewatch/outbox-test/node-1")
        .ty("test.outbox")
        .data("application/octet-stream", vec![b'x'; bytes])
        .build()
        .expect("event")
}

async fn start() -> (NatsServer, async_nats::Client) {
    let server = NatsServer::start().await;
    let client = server.connect().await;
    provision(
        &jetstream::new(client.clone()),
        &[],
        &ProvisionOptions::default(),
    )
    .await
    .expect("provision");
    (server, client)
}

fn outbox(client: &async_nats::Client, dir: &std::path::Path, spool: SpoolConfig) -> Outbox {
    let publisher = Publisher::new(
        client.clone(),
        PublisherConfig::default()
            .ack_timeout(Duration::from_millis(500))
            .max_attempts(2),
        Metrics::new("outbox-test"),
    );
    Outbox::open(
        publisher,
        OutboxConfig::default()
            .spool_dir(dir)
            .spool(spool)
            .retry_interval(Duration::from_millis(100))
            .component("outbox-test")
            .node("node-1"),
    )
    .expect("open outbox")
}

/// Every message in RAW, in stream order: (type, id).
async fn stored(client: &async_nats::Client) -> Vec<(String, String)> {
    let js = jetstream::new(client.clone());
    let stream: Stream = js.get_stream(topology::RAW.name).await.expect("raw");
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let count = stream.get_info().await.expect("info").state.messages as usize;
    let mut out = Vec::with_capacity(count);
    let mut messages = consumer
        .fetch()
        .max_messages(count.max(1))
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("fetch");
    while out.len() < count {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message.expect("message");
        let event = from_nats(message.headers.as_ref(), &message.payload).expect("event");
        out.push((event.ty().to_string(), event.id().to_string()));
    }
    out
}

async fn raw_count(client: &async_nats::Client) -> u64 {
    let js = jetstream::new(client.clone());
    match js.get_stream(topology::RAW.name).await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_spooled_then_replayed_in_order_without_duplicates() {
    let (mut server, client) = start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = outbox(&client, dir.path(), SpoolConfig::default());
    let subject = subjects::raw("outbox-test", "node-1");

    for i in 0..50 {
        let receipt = outbox
            .send(subject.clone(), &event(i, 64))
            .await
            .expect("send");
        assert!(matches!(receipt.await, Ok(Delivered::Stored(_))));
    }
    assert_eq!(outbox.mode(), Mode::Direct);

    server.kill().await;
    eventually("the client to notice the outage", WAIT, || async {
        (client.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
    for i in 50..250 {
        let receipt = outbox
            .send(subject.clone(), &event(i, 64))
            .await
            .expect("send");
        match receipt.await {
            Ok(Delivered::Spooled) => {}
            other => panic!("event {i} during the outage: {other:?}"),
        }
    }
    assert_eq!(outbox.mode(), Mode::Spooling);
    assert_eq!(outbox.spool_stats().pending_records, 200);
    assert_eq!(outbox.metrics().spooled.get(), 200);

    server.restart().await;
    // Sent while the replay may still be running: queued behind it.
    for i in 250..260 {
        let receipt = outbox
            .send(subject.clone(), &event(i, 64))
            .await
            .expect("send");
        assert!(receipt.await.is_ok());
    }
    eventually("the spool to drain into the stream", WAIT, || async {
        (raw_count(&client).await >= 260 && outbox.mode() == Mode::Direct).then_some(())
    })
    .await;

    let ids: Vec<String> = stored(&client)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let expected: Vec<String> = (0..260).map(|i| format!("outbox-{i:05}")).collect();
    assert_eq!(ids, expected, "every event once, in the order sent");
    assert_eq!(outbox.spool_stats().pending_records, 0);
    assert_eq!(
        outbox.metrics().spool_replayed.get(),
        outbox.metrics().spooled.get()
    );
    assert_eq!(outbox.metrics().spool_pending.get(), 0);

    // Back to direct publishing.
    let receipt = outbox
        .send(subject.clone(), &event(999, 64))
        .await
        .expect("send");
    assert!(matches!(receipt.await, Ok(Delivered::Stored(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_drops_the_oldest_counts_them_and_reports_them_once_back() {
    let (mut server, client) = start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = SpoolConfig {
        max_bytes: 16 * 1024,
        segment_bytes: 4 * 1024,
        fsync: FsyncPolicy::Never,
    };
    let outbox = outbox(&client, dir.path(), spool);
    let subject = subjects::raw("outbox-test", "node-1");

    server.kill().await;
    eventually("the client to notice the outage", WAIT, || async {
        (client.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
    const SENT: usize = 200;
    for i in 0..SENT {
        let receipt = outbox
            .send(subject.clone(), &event(i, 400))
            .await
            .expect("send");
        assert!(matches!(receipt.await, Ok(Delivered::Spooled)));
    }
    let dropped = outbox.spool_stats().dropped_records;
    assert!(
        dropped > 0,
        "a 16 KiB spool cannot hold {SENT} events of 400 bytes"
    );
    let overflow = tidewatch_runtime::metrics::Reason { reason: "overflow" };
    assert_eq!(
        outbox
            .metrics()
            .spool_dropped
            .get(&overflow)
            .map(|c| c.get()),
        Some(dropped)
    );

    server.restart().await;
    let kept = SENT as u64 - dropped;
    eventually(
        "the kept events and the drop report to arrive",
        WAIT,
        || async { (raw_count(&client).await > kept).then_some(()) },
    )
    .await;
    let stored = stored(&client).await;
    let ids: Vec<&str> = stored
        .iter()
        .filter(|(ty, _)| ty == "test.outbox")
        .map(|(_, id)| id.as_str())
        .collect();
    let expected: Vec<String> = (dropped as usize..SENT)
        .map(|i| format!("outbox-{i:05}"))
        .collect();
    assert_eq!(ids, expected, "the newest events are kept, in order");

    let reports: Vec<&(String, String)> = stored
        .iter()
        .filter(|(ty, _)| ty == topology::types::COLLECTOR_DROPS)
        .collect();
    assert_eq!(reports.len(), 1, "one overflow report: {stored:?}");
    let js = jetstream::new(client.clone());
    let report = js
        .get_stream(topology::RAW.name)
        .await
        .expect("raw")
        .get_last_raw_message_by_subject(&subject)
        .await
        .expect("last message");
    let event = from_nats(Some(&report.headers), &report.payload).expect("report event");
    let drops: tidewatch_proto::v1::CollectorDrops =
        tidewatch_runtime::event::payload(&event).expect("CollectorDrops payload");
    assert_eq!(drops.delta, dropped);
    assert_eq!(drops.counts.len(), 1);
    assert_eq!(drops.counts[0].stage, "spool");
    assert_eq!(drops.counts[0].kind, "overflow");
    assert_eq!(drops.counts[0].total, dropped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_replays_what_an_earlier_one_spooled() {
    let (mut server, client) = start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let subject = subjects::raw("outbox-test", "node-1");

    server.kill().await;
    eventually("the client to notice the outage", WAIT, || async {
        (client.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
    {
        let first = outbox(&client, dir.path(), SpoolConfig::default());
        for i in 0..30 {
            let receipt = first
                .send(subject.clone(), &event(i, 64))
                .await
                .expect("send");
            assert!(matches!(receipt.await, Ok(Delivered::Spooled)));
        }
        first.flush().await.expect("flush");
        // Dropped with everything still spooled, as a crash would leave it.
    }

    server.restart().await;
    let second = outbox(&client, dir.path(), SpoolConfig::default());
    assert_eq!(second.spool_stats().pending_records, 30);
    eventually(
        "the earlier process's events to be replayed",
        WAIT,
        || async {
            (raw_count(&client).await >= 30 && second.mode() == Mode::Direct).then_some(())
        },
    )
    .await;
    let ids: Vec<String> = stored(&client)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let expected: Vec<String> = (0..30).map(|i| format!("outbox-{i:05}")).collect();
    assert_eq!(ids, expected);
}
