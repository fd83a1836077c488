//! Interest-based enrichment (issue #16): enrich stores only events some
//! consumer of the enriched stream reads. A new consumer's interest takes
//! effect without a restart, and the events from before it are re-driven
//! from the raw stream with `tidewatch replay`, so nothing is lost.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use tidewatch_proto::v1::{ProcessExec, ProcessInfo};
use tidewatch_runtime::topology::{self, types};
use tidewatch_testkit::{NatsServer, eventually};

fn exec(id: &str) -> cloudevents::Event {
    let exec = ProcessExec {
        process: Some(ProcessInfo {
            pid: 7,
            comm: "sh".into(),
            container_id: "abc123".into(),
            ..Default::default()
        }),
        filename: "/bin/sh".into(),
        ..Default::default()
    };
    proto_event(
        id,
        types::PROCESS_EXEC,
        "ebpf",
        "node-1",
        None,
        chrono::Utc::now(),
        &exec,
    )
}

/// Messages waiting for a durable on the enriched stream.
async fn pending(js: &jetstream::Context, durable: &str) -> u64 {
    let info = js
        .get_stream(topology::ENRICHED.name)
        .await
        .expect("stream")
        .consumer_info(durable)
        .await
        .expect("consumer info");
    info.num_pending + info.num_ack_pending as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrich_stores_what_someone_reads_and_a_new_reader_gets_the_past_by_replay() {
    let server = NatsServer::start().await;
    let (js, publisher) = provisioned(&server).await;
    cluster_pods(&js).await;
    let _enrich = start_function(&server, "tidewatch-enrich", &[]);

    // Process execs: no consumer of the enriched stream reads them
    // (correlate's types do not include them). Restarts: correlate does.
    let execs: Vec<_> = (0..10).map(|i| exec(&format!("exec-{i}"))).collect();
    let restarts: Vec<_> = (0..5).map(|i| restart_event(i, "cart-1")).collect();
    publish_raw(&publisher, &execs).await;
    publish_raw(&publisher, &restarts).await;
    settled(&js, &["enrich"]).await;
    assert_eq!(
        stream_messages(&js, topology::ENRICHED.name).await,
        5,
        "only the restarts are stored"
    );
    assert_eq!(pending(&js, "correlate").await, 5);

    // A SIEM-style function reading process events is added (what
    // `tidewatch new function --types` and `tidewatch provision` do).
    let mut siem = common::functions()
        .into_iter()
        .find(|f| f.name == "correlate")
        .expect("correlate")
        .consumer;
    siem.durable = "siem";
    siem.description = "siem: process events";
    siem.types = vec!["dev.tidewatch.kernel.process.*"];
    tidewatch_runtime::provision::provision(
        &js,
        &[siem],
        &tidewatch_runtime::provision::ProvisionOptions::default(),
    )
    .await
    .expect("the new consumer");

    // enrich notices within its refresh: new execs are stored from then on.
    let mut n = 100;
    eventually(
        "enrich to store execs for the new reader",
        Duration::from_secs(30),
        || {
            n += 1;
            let event = exec(&format!("exec-{n}"));
            let (js, publisher) = (&js, &publisher);
            async move {
                publish_raw(publisher, &[event]).await;
                settled(js, &["enrich"]).await;
                (pending(js, "siem").await > 0).then_some(())
            }
        },
    )
    .await;
    let fresh = pending(&js, "siem").await;

    // The execs from before its interest: replayed from the raw stream.
    let (ok, _, err) = tidewatch(
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
            "dev.tidewatch.kernel.process.*",
        ],
    )
    .await;
    assert!(ok, "{err}");
    settled(&js, &["enrich"]).await;
    eventually(
        "the earlier execs to reach the new reader",
        Duration::from_secs(30),
        || async { (pending(&js, "siem").await >= fresh + 10).then_some(()) },
    )
    .await;
    // And correlate was delivered none of them.
    assert_eq!(pending(&js, "correlate").await, 5);
    assert_eq!(stream_messages(&js, topology::DEAD_LETTER.name).await, 0);
}
