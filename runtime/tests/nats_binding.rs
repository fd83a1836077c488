//! CloudEvents over NATS through a real JetStream server: binary mode written
//! by the `Publisher`, structured mode written by other tools, and
//! deduplication on `Nats-Msg-Id`.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use cloudevents::{AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV10};
use tidewatch_runtime::binding::nats::{MSG_ID_HEADER, from_nats};
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::{NatsServer, eventually};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const WAIT: Duration = Duration::from_secs(10);

async fn provisioned(server: &NatsServer) -> (async_nats::Client, jetstream::Context) {
    let client = server.connect().await;
    let js = jetstream::new(client.clone());
    provision(&js, &[], &ProvisionOptions::default())
        .await
        .expect("provision");
    (client, js)
}

async fn raw_stream(js: &jetstream::Context) -> Stream {
    js.get_stream(topology::RAW.name).await.expect("raw stream")
}

async fn message_count(stream: &mut Stream) -> u64 {
    stream.info().await.expect("stream info").state.messages
}

/// An event with every attribute set, values that need percent-encoding,
/// and extensions (trace context and a custom one).
fn awkward_event(id: &str) -> Event {
    let mut event = EventBuilderV10::new()
        .id(id)
        .source(topology::source("ebpf", "node-1"))
        .ty(topology::types::CONTAINER_RESTARTED)
        .subject("pod/default/web 1 \"quoted\" 100% ünïcode ☃ 😀")
        .time(chrono::Utc::now())
        .data_with_schema(
            "application/protobuf",
            url::Url::parse("proto:tidewatch.v1.ContainerRestart").expect("url"),
            vec![0u8, 1, 2, 0xfe, 0xff, b'\r', b'\n'],
        )
        .build()
        .expect("event");
    event.set_extension("traceparent", TRACEPARENT);
    event.set_extension("tracestate", "vendor=a b,other=%x");
    event.set_extension(
        "resolutionreason",
        "no pod for cgroup \"42\" — 100% unknown",
    );
    event
}

#[tokio::test]
async fn binary_events_round_trip_through_a_stream() {
    let server = NatsServer::start().await;
    let (client, js) = provisioned(&server).await;
    let publisher = Publisher::new(client, PublisherConfig::default(), Metrics::new("test"));
    let subject = subjects::raw("ebpf", "node-1");

    let binary = awkward_event("evt-binary-1");
    let mut json = EventBuilderV10::new()
        .id("evt-json-1")
        .source("/tidewatch/k8s/node-1")
        .ty("dev.tidewatch.k8s.pod.updated")
        .data(
            "application/json",
            serde_json::json!({"pod": "wéb 1", "restarts": 3, "nested": {"ok": true}}),
        )
        .build()
        .expect("json event");
    json.set_extension("myext", "custom value: \"x\" 100%");
    let bare = EventBuilderV10::new()
        .id("evt-bare-1")
        .source("/s")
        .ty("t.bare")
        .build()
        .expect("bare event");

    let stream = raw_stream(&js).await;
    for original in [binary, json, bare] {
        let ack = publisher
            .publish(subject.clone(), &original)
            .await
            .expect("publish");
        assert_eq!(ack.stream, topology::RAW.name);
        assert!(
            !ack.duplicate,
            "first publish of {} is not a duplicate",
            original.id()
        );

        let stored = stream
            .get_raw_message(ack.sequence)
            .await
            .expect("stored message");
        assert_eq!(stored.subject.as_str(), subject);
        assert_eq!(
            stored.headers.get(MSG_ID_HEADER).map(|v| v.as_str()),
            Some(original.id()),
            "Nats-Msg-Id is the event id"
        );
        // Every header value on the wire is printable ASCII (percent-encoded).
        for (name, values) in stored.headers.iter() {
            for value in values {
                assert!(
                    value.as_str().bytes().all(|b| (0x20..=0x7e).contains(&b)),
                    "header {name} = {value:?} is not printable ASCII"
                );
            }
        }
        let decoded = from_nats(Some(&stored.headers), &stored.payload).expect("decodes");
        assert_eq!(
            decoded,
            original,
            "event {} changed in transit",
            original.id()
        );
    }

    // The awkward subject really went through percent-encoding, not verbatim.
    let stored = stream.get_raw_message(1).await.expect("first message");
    let subject_header = stored
        .headers
        .get("ce-subject")
        .expect("ce-subject")
        .as_str()
        .to_string();
    assert!(
        subject_header.contains("%20") && subject_header.contains("%22"),
        "{subject_header}"
    );
    assert!(
        subject_header.contains("%25") && subject_header.contains("%C3%BC"),
        "{subject_header}"
    );
    let decoded = from_nats(Some(&stored.headers), &stored.payload).expect("decodes");
    assert_eq!(
        decoded
            .extension("traceparent")
            .map(|v| v.to_string())
            .as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(
        decoded
            .extension("resolutionreason")
            .map(|v| v.to_string())
            .as_deref(),
        Some("no pod for cgroup \"42\" — 100% unknown")
    );
}

#[tokio::test]
async fn republishing_the_same_event_is_deduplicated() {
    let server = NatsServer::start().await;
    let (client, js) = provisioned(&server).await;
    let metrics = Metrics::new("test");
    let publisher = Publisher::new(client, PublisherConfig::default(), metrics.clone());
    let subject = subjects::raw("k8s", "node-2");
    let event = awkward_event("evt-dedup-1");

    let first = publisher
        .publish(subject.clone(), &event)
        .await
        .expect("first publish");
    assert!(!first.duplicate);
    let second = publisher
        .publish(subject.clone(), &event)
        .await
        .expect("second publish");
    assert!(
        second.duplicate,
        "same id within the duplicate window must be dropped: {second:?}"
    );
    assert_eq!(
        second.sequence, first.sequence,
        "a duplicate reports the original's sequence"
    );

    let mut stream = raw_stream(&js).await;
    assert_eq!(
        message_count(&mut stream).await,
        1,
        "the stream stored the event once"
    );

    // A different id is stored, proving dedup keys on the id.
    let mut other = event.clone();
    other.set_id("evt-dedup-2");
    let third = publisher
        .publish(subject, &other)
        .await
        .expect("third publish");
    assert!(!third.duplicate);
    assert_eq!(message_count(&mut stream).await, 2);
    assert_eq!(
        metrics.published.get(),
        3,
        "every acknowledged publish is counted"
    );
}

#[tokio::test]
async fn structured_events_published_by_other_tools_are_read() {
    let server = NatsServer::start().await;
    let (client, js) = provisioned(&server).await;
    let subject = subjects::raw("other-tool", "node-3");

    let json = serde_json::json!({
        "specversion": "1.0",
        "id": "structured-1",
        "source": "/other-tool/ünï",
        "type": "com.example.thing.happened",
        "subject": "thing \"one\" 100%",
        "time": "2024-05-06T07:08:09.123456789Z",
        "datacontenttype": "application/json",
        "data": {"hello": "wörld", "n": [1, 2, 3]},
        "traceparent": TRACEPARENT,
        "myext": "custom"
    });
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    client
        .publish_with_headers(
            subject.clone(),
            headers,
            serde_json::to_vec(&json).expect("json").into(),
        )
        .await
        .expect("core publish");
    client.flush().await.expect("flush");

    let stream = raw_stream(&js).await;
    let stored = eventually("the structured message to be stored", WAIT, || async {
        stream.get_raw_message(1).await.ok()
    })
    .await;
    assert_eq!(stored.subject.as_str(), subject);
    let event =
        from_nats(Some(&stored.headers), &stored.payload).expect("structured event decodes");

    let expected: Event = serde_json::from_value(json).expect("the SDK reads the same JSON");
    assert_eq!(event, expected);
    assert_eq!(event.id(), "structured-1");
    assert_eq!(event.source().as_str(), "/other-tool/ünï");
    assert_eq!(event.subject(), Some("thing \"one\" 100%"));
    assert_eq!(
        event.data(),
        Some(&Data::Json(
            serde_json::json!({"hello": "wörld", "n": [1, 2, 3]})
        ))
    );
    assert_eq!(
        event
            .extension("traceparent")
            .map(|v| v.to_string())
            .as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(
        event.extension("myext").map(|v| v.to_string()).as_deref(),
        Some("custom")
    );
}

#[tokio::test]
async fn binary_events_published_by_other_tools_are_read() {
    let server = NatsServer::start().await;
    let (client, js) = provisioned(&server).await;
    let subject = subjects::raw("other-tool", "node-4");

    // Header names in any case, lower-case escapes, an old-style quoted value.
    let mut headers = HeaderMap::new();
    headers.insert("CE-SpecVersion", "1.0");
    headers.insert("Ce-Id", "other-binary-1");
    headers.insert("ce-SOURCE", "/other-tool");
    headers.insert("ce-type", "com.example.thing");
    headers.insert("ce-subject", "caf%c3%a9%20au%20lait");
    headers.insert("ce-myext", "\"quoted \\\"value\\\"\"");
    headers.insert("ce-datacontenttype", "application/json");
    client
        .publish_with_headers(subject.clone(), headers, Bytes::from_static(br#"{"a":1}"#))
        .await
        .expect("publish");
    // Overlong UTF-8 (%C0%A0 for a space) must be rejected.
    let mut overlong = HeaderMap::new();
    overlong.insert("ce-specversion", "1.0");
    overlong.insert("ce-id", "other-binary-2");
    overlong.insert("ce-source", "/other-tool");
    overlong.insert("ce-type", "com.example.thing");
    overlong.insert("ce-subject", "a%C0%A0b");
    client
        .publish_with_headers(subject.clone(), overlong, Bytes::new())
        .await
        .expect("publish");
    client.flush().await.expect("flush");

    let stream = raw_stream(&js).await;
    let (first, second) = eventually("both messages to be stored", WAIT, || async {
        Some((
            stream.get_raw_message(1).await.ok()?,
            stream.get_raw_message(2).await.ok()?,
        ))
    })
    .await;
    let event = from_nats(Some(&first.headers), &first.payload).expect("decodes");
    assert_eq!(event.id(), "other-binary-1");
    assert_eq!(event.source().as_str(), "/other-tool");
    assert_eq!(event.subject(), Some("café au lait"));
    assert_eq!(
        event.extension("myext").map(|v| v.to_string()).as_deref(),
        Some("quoted \"value\"")
    );
    assert_eq!(event.data(), Some(&Data::Json(serde_json::json!({"a": 1}))));

    let err =
        from_nats(Some(&second.headers), &second.payload).expect_err("overlong UTF-8 is rejected");
    assert!(err.to_string().contains("subject"), "{err}");
}
