//! Provisioning against a real server: creation from the topology,
//! idempotence, convergence of objects left by an older version, conflicts
//! that must not be forced, and KV buckets usable through the KV API.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{
    consumer::{AckPolicy, PullConsumer, pull},
    kv::UpdateErrorKind,
    stream::{Config as StreamConfig, StorageType},
};
use bytes::Bytes;
use futures::StreamExt;
use tidewatch_runtime::provision::{Change, ProvisionError, ProvisionOptions, Report, provision};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::NatsServer;

/// The repository's functions' consumers (functions/*/function.toml), as the CLI provisions them.
fn consumers() -> Vec<topology::ConsumerSpec> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    tidewatch_runtime::spec::read_dir(&dir)
        .expect("functions/*/function.toml")
        .into_iter()
        .map(|f| f.consumer)
        .collect()
}

fn set(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

fn change<'a>(report: &'a Report, object: &str) -> &'a Change {
    report
        .items
        .iter()
        .find(|(o, _)| o == object)
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("report has no {object}:\n{report}"))
}

fn updated_fields(report: &Report, object: &str) -> BTreeSet<String> {
    match change(report, object) {
        Change::Updated(fields) => fields.iter().cloned().collect(),
        other => panic!("{object} should be updated, was {other:?}:\n{report}"),
    }
}

#[tokio::test]
async fn provisioning_creates_the_topology_and_is_idempotent() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;

    let first = provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect("first provision");
    let expected_objects = topology::STREAMS.len() + consumers().len() + topology::BUCKETS.len();
    assert_eq!(first.items.len(), expected_objects, "{first}");
    assert!(
        first.items.iter().all(|(_, c)| *c == Change::Created),
        "everything is created:\n{first}"
    );
    assert!(!first.is_noop());

    let second = provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect("second provision");
    assert!(
        second.is_noop(),
        "provisioning again changes nothing:\n{second}"
    );
    assert_eq!(second.items.len(), expected_objects);

    for spec in topology::STREAMS {
        let mut stream = js
            .get_stream(spec.name)
            .await
            .unwrap_or_else(|e| panic!("stream {}: {e}", spec.name));
        let config = stream.info().await.expect("stream info").config.clone();
        assert_eq!(
            set(&config.subjects),
            set(&spec.subjects()),
            "subjects of {}",
            spec.name
        );
        assert_eq!(config.storage, StorageType::File, "{}", spec.name);
        assert_eq!(config.max_age, spec.max_age, "{}", spec.name);
        assert_eq!(config.max_bytes, spec.max_bytes, "{}", spec.name);
        assert_eq!(
            config.duplicate_window, spec.duplicate_window,
            "{}",
            spec.name
        );
        assert_eq!(config.num_replicas, 1, "{}", spec.name);
    }
    for spec in &consumers() {
        let stream_name = topology::stream(spec.stream)
            .expect("consumer stream in topology")
            .name;
        let stream = js.get_stream(stream_name).await.expect("stream");
        let info = stream
            .consumer_info(spec.durable)
            .await
            .unwrap_or_else(|e| panic!("consumer {}: {e}", spec.durable));
        let config = &info.config;
        assert_eq!(config.durable_name.as_deref(), Some(spec.durable));
        assert_eq!(config.ack_policy, AckPolicy::Explicit, "{}", spec.durable);
        assert_eq!(
            set(&config.filter_subjects),
            set(&topology::consumer_filter_subjects(spec)),
            "filters of {}",
            spec.durable
        );
        assert!(config.filter_subject.is_empty(), "{}", spec.durable);
        assert_eq!(config.max_deliver, spec.max_deliver, "{}", spec.durable);
        assert_eq!(config.ack_wait, spec.ack_wait, "{}", spec.durable);
        assert_eq!(
            config.max_ack_pending, spec.max_ack_pending,
            "{}",
            spec.durable
        );
    }
    for spec in topology::BUCKETS {
        let mut stream = js
            .get_stream(format!("KV_{}", spec.bucket))
            .await
            .unwrap_or_else(|e| panic!("bucket {}: {e}", spec.bucket));
        let config = stream.info().await.expect("bucket info").config.clone();
        assert_eq!(config.subjects, vec![format!("$KV.{}.>", spec.bucket)]);
        assert_eq!(
            config.max_messages_per_subject, spec.history,
            "{}",
            spec.bucket
        );
        assert_eq!(config.max_age, spec.max_age, "{}", spec.bucket);
    }

    // The replay subject of a consumer is stored by its input stream.
    let ack = js
        .publish(
            subjects::replay("raw", "enrich"),
            Bytes::from_static(b"replayed"),
        )
        .await
        .expect("publish")
        .await
        .expect("a replay subject is captured by a stream");
    assert_eq!(ack.stream, topology::RAW.name);
}

#[tokio::test]
async fn consumer_overrides_converge_back_and_forth() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let test_options = ProvisionOptions::default()
        .ack_wait(Duration::from_secs(2))
        .max_deliver(3);
    provision(&js, &consumers(), &test_options)
        .await
        .expect("provision with overrides");
    let stream = js.get_stream(topology::RAW.name).await.expect("raw");
    let info = stream.consumer_info("enrich").await.expect("enrich");
    assert_eq!(info.config.ack_wait, Duration::from_secs(2));
    assert_eq!(info.config.max_deliver, 3);
    assert!(
        provision(&js, &consumers(), &test_options)
            .await
            .expect("again")
            .is_noop()
    );

    let report = provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect("provision defaults");
    for spec in &consumers() {
        let fields = updated_fields(&report, &format!("consumer {}", spec.durable));
        assert_eq!(
            fields,
            BTreeSet::from(["ack_wait".to_string(), "max_deliver".to_string()]),
            "{report}"
        );
    }
    for spec in topology::STREAMS {
        assert_eq!(
            *change(&report, &format!("stream {}", spec.name)),
            Change::Unchanged,
            "{report}"
        );
    }
    let info = stream.consumer_info("enrich").await.expect("enrich");
    assert_eq!(info.config.ack_wait, consumers()[0].ack_wait);
}

#[tokio::test]
async fn objects_from_an_older_version_converge_in_place() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;

    // An older Tidewatch: RAW with only its prefix and a 1 h max age, and
    // enrich reading one filter subject.
    js.create_stream(StreamConfig {
        name: topology::RAW.name.to_string(),
        subjects: vec!["tidewatch.raw.>".to_string()],
        max_age: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .expect("create old RAW");
    let old_stream = js.get_stream(topology::RAW.name).await.expect("raw");
    old_stream
        .create_consumer(pull::Config {
            durable_name: Some("enrich".to_string()),
            filter_subject: "tidewatch.raw.>".to_string(),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("create old enrich consumer");
    for i in 0..5 {
        js.publish(
            subjects::raw("ebpf", "node-1"),
            Bytes::from(format!("old message {i}")),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
    // The old consumer has made progress: two messages acked.
    let consumer: PullConsumer = old_stream.get_consumer("enrich").await.expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(2)
        .messages()
        .await
        .expect("fetch");
    let mut acked = 0;
    while let Some(message) = batch.next().await {
        message.expect("message").double_ack().await.expect("ack");
        acked += 1;
    }
    assert_eq!(acked, 2);

    let report = provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect("provision converges");
    let raw_fields = updated_fields(&report, "stream TIDEWATCH_RAW");
    for field in ["subjects", "max_age", "max_bytes", "description"] {
        assert!(
            raw_fields.contains(field),
            "RAW update lists {field}: {raw_fields:?}"
        );
    }
    let enrich_fields = updated_fields(&report, "consumer enrich");
    assert!(
        enrich_fields.contains("filter_subjects"),
        "{enrich_fields:?}"
    );
    assert_eq!(
        *change(&report, "stream TIDEWATCH_ENRICHED"),
        Change::Created,
        "{report}"
    );

    let mut stream = js.get_stream(topology::RAW.name).await.expect("raw");
    let info = stream.info().await.expect("info").clone();
    assert_eq!(
        info.state.messages, 5,
        "converging in place keeps the stored messages"
    );
    assert_eq!(set(&info.config.subjects), set(&topology::RAW.subjects()));
    assert_eq!(info.config.max_age, topology::RAW.max_age);
    let consumer = stream.consumer_info("enrich").await.expect("enrich");
    assert_eq!(
        set(&consumer.config.filter_subjects),
        set(&topology::consumer_filter_subjects(&consumers()[0]))
    );
    assert_eq!(
        consumer.ack_floor.stream_sequence, 2,
        "the consumer was updated, not recreated"
    );
    assert_eq!(consumer.num_pending, 3);

    assert!(
        provision(&js, &consumers(), &ProvisionOptions::default())
            .await
            .expect("again")
            .is_noop(),
        "converged for good"
    );
}

#[tokio::test]
async fn a_storage_conflict_is_reported_not_forced() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    js.create_stream(StreamConfig {
        name: topology::INSIGHTS.name.to_string(),
        subjects: topology::INSIGHTS.subjects(),
        storage: StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create memory INSIGHTS");
    js.publish(
        subjects::insight("crash-loop"),
        Bytes::from_static(b"keep me"),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let err = provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect_err("memory storage conflicts");
    assert!(
        matches!(
            &err,
            ProvisionError::Conflict {
                field: "storage",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains("TIDEWATCH_INSIGHTS"),
        "names the stream: {message}"
    );
    assert!(message.contains("storage"), "names the field: {message}");
    assert!(
        message.contains("Memory") && message.contains("File"),
        "names both values: {message}"
    );

    // Nothing was forced: the stream and its message are untouched.
    let mut stream = js
        .get_stream(topology::INSIGHTS.name)
        .await
        .expect("insights");
    let info = stream.info().await.expect("info").clone();
    assert_eq!(info.config.storage, StorageType::Memory);
    assert_eq!(info.state.messages, 1);
}

#[tokio::test]
async fn provisioned_buckets_work_through_the_kv_api() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect("provision");

    for spec in topology::BUCKETS {
        let kv = js
            .get_key_value(spec.bucket)
            .await
            .unwrap_or_else(|e| panic!("bucket {}: {e}", spec.bucket));
        let key = topology::pod_keys::by_uid("8f2c-uid/with odd:chars");

        let first = kv.put(&key, Bytes::from_static(b"v1")).await.expect("put");
        assert_eq!(
            kv.get(&key).await.expect("get"),
            Some(Bytes::from_static(b"v1"))
        );
        let entry = kv.entry(&key).await.expect("entry").expect("entry exists");
        assert_eq!(entry.revision, first);

        let second = kv
            .update(&key, Bytes::from_static(b"v2"), first)
            .await
            .expect("update at the current revision");
        assert!(second > first);
        assert_eq!(
            kv.get(&key).await.expect("get"),
            Some(Bytes::from_static(b"v2"))
        );

        let stale = kv
            .update(&key, Bytes::from_static(b"v3"), first)
            .await
            .expect_err("stale revision must fail");
        assert_eq!(stale.kind(), UpdateErrorKind::WrongLastRevision, "{stale}");
        assert_eq!(
            kv.get(&key).await.expect("get"),
            Some(Bytes::from_static(b"v2")),
            "the stale write changed nothing"
        );

        // create() refuses an existing key (compare-and-set for new entries).
        assert!(kv.create(&key, Bytes::from_static(b"again")).await.is_err());
        kv.delete(&key).await.expect("delete");
        assert_eq!(kv.get(&key).await.expect("get"), None);
        kv.create(&key, Bytes::from_static(b"fresh"))
            .await
            .expect("create after delete");
    }

    // Using the buckets did not make provisioning see drift.
    assert!(
        provision(&js, &consumers(), &ProvisionOptions::default())
            .await
            .expect("again")
            .is_noop()
    );
}

/// An oversized message never reaches a consumer: the streams refuse it at
/// publish (the 64 KiB contract, plus framing), and dead letters have room
/// for their reason headers.
#[tokio::test]
async fn streams_refuse_messages_over_the_event_contract() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    provision(&js, &consumers(), &ProvisionOptions::default())
        .await
        .expect("provision");
    let subject = subjects::raw("ebpf", "n1");
    let ok = js
        .publish(subject.clone(), Bytes::from(vec![b'x'; 60 * 1024]))
        .await
        .expect("sent")
        .await;
    assert!(ok.is_ok(), "60 KiB fits: {ok:?}");
    let big = js
        .publish(subject, Bytes::from(vec![b'x'; 100 * 1024]))
        .await
        .expect("sent")
        .await;
    let err = big.expect_err("100 KiB is refused by the stream");
    assert!(
        err.to_string().to_lowercase().contains("maximum"),
        "the server says why: {err}"
    );
    for spec in topology::STREAMS {
        let info = js
            .get_stream(spec.name)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .clone();
        assert_eq!(info.config.max_message_size, spec.max_message_bytes);
    }
    const { assert!(topology::DEAD_LETTER.max_message_bytes > topology::RAW.max_message_bytes) };
}
