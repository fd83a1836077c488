//! Building and reading Tidewatch CloudEvents: deterministic ids, protobuf
//! payloads, the 64 KiB limit, and the `traceparent` extension.

use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};
use prost::Name;
use sha2::{Digest, Sha256};
use tidewatch_proto::{PROTOBUF_CONTENT_TYPE, schema_url};

/// Largest event Tidewatch accepts or sends: headers plus data, as encoded
/// on the wire ([`crate::binding::nats::wire_size`]).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Extension carrying the W3C trace context (CloudEvents distributed tracing extension).
pub const TRACEPARENT: &str = "traceparent";

/// Errors building or reading events. All terminal: the same input fails again.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Terminal: a required attribute is missing or malformed.
    #[error("invalid CloudEvent: {0}")]
    Invalid(String),
    /// Terminal: the event has no data where a payload was expected.
    #[error("event {id} has no data")]
    NoData { id: String },
    /// Terminal: the data is not the protobuf message its type promises.
    #[error("event {id}: {source}")]
    Payload {
        id: String,
        #[source]
        source: PayloadError,
    },
}

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("dataschema is {found:?}, expected {expected:?}")]
    WrongSchema { found: String, expected: String },
    #[error("data is not a valid {message}: {source}")]
    Decode {
        message: String,
        source: prost::DecodeError,
    },
    /// JSON data (the proto3 JSON mapping, camelCase) that does not fit the message.
    #[error("JSON data does not fit {message}: {source}")]
    Json {
        message: String,
        source: serde_json::Error,
    },
}

/// A deterministic event id: the first 128 bits of SHA-256 over the parts,
/// hex encoded. Collectors hash (boot id, collector, sequence); functions
/// hash (input id, function, output index), so a redelivered input yields
/// the same output ids and the stream drops the duplicates.
pub fn derive_id(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        // Length-prefix each part so ("ab","c") and ("a","bc") differ.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = String::with_capacity(32);
    for byte in &digest[..16] {
        out.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(byte & 0x0f)]));
    }
    out
}

/// Id of the `index`-th event `function` emits for `input_id`.
pub fn output_id(input_id: &str, function: &str, index: usize) -> String {
    derive_id(&[
        input_id.as_bytes(),
        function.as_bytes(),
        &(index as u64).to_be_bytes(),
    ])
}

/// Build a Tidewatch event carrying a protobuf payload.
pub fn new_event<M: prost::Message + Name>(
    id: impl Into<String>,
    ty: &str,
    source: &str,
    subject: Option<&str>,
    time: chrono::DateTime<chrono::Utc>,
    payload: &M,
) -> Result<Event, EventError> {
    let schema = schema_url::<M>();
    let mut builder = EventBuilderV10::new()
        .id(id)
        .ty(ty)
        .source(source)
        .time(time);
    if let Some(subject) = subject {
        builder = builder.subject(subject);
    }
    let url = url::Url::parse(&schema)
        .map_err(|e| EventError::Invalid(format!("dataschema {schema}: {e}")))?;
    builder
        .data_with_schema(PROTOBUF_CONTENT_TYPE, url, payload.encode_to_vec())
        .build()
        .map_err(|e| EventError::Invalid(e.to_string()))
}

/// Full name of the message `event`'s data holds (`tidewatch.v1.OomKill`):
/// its `dataschema` (`proto:<name>`), or, for a producer that set none (a
/// third party writing JSON), the one its type names in [`topology::types`].
pub fn payload_message(event: &Event) -> Option<String> {
    match event.dataschema() {
        Some(schema) => schema
            .as_str()
            .strip_prefix(tidewatch_proto::schema::SCHEMA_PREFIX)
            .map(str::to_string),
        None => crate::topology::types::lookup(event.ty()).map(|t| t.payload.to_string()),
    }
}

/// Every payload field, by its JSON name (camelCase), with an example value
/// (64-bit integers as numbers: the payloads' serde mapping).
const EXAMPLE_FIELDS: &str = r#"{
    "process": {"pid": 7, "tgid": 7, "ppid": 1, "uid": 1000, "comm": "java",
                "cgroupId": 4242, "containerId": "abc123", "podUid": "uid-cart-1"},
    "filename": "/usr/bin/java", "argv": ["java", "-jar", "app.jar"],
    "exitCode": 137, "signal": 9, "runtimeNs": 5000000000,
    "totalPages": 70000, "rssPages": 65536, "memoryLimitBytes": 268435456,
    "cgroupPath": "/kubepods/burstable/poduid-cart-1/abc123",
    "change": "refused", "family": 4, "saddr": "10.1.0.5", "sport": 40000,
    "daddr": "10.96.0.10", "dport": 8080,
    "namespace": "shop", "pod": "cart-1", "podUid": "uid-cart-1", "container": "cart",
    "containerId": "abc123", "node": "node-1", "restartCount": 3, "reason": "OOMKilled",
    "message": "the container was killed", "finishedAtNs": 1700000000000000000,
    "unit": "kubelet.service", "activeState": "failed", "subState": "failed",
    "result": "exit-code", "nRestarts": 2, "execMainStatus": 1, "previousActiveState": "active",
    "priority": 3, "cursor": "s=1", "realtimeUs": 1700000000000000,
    "fields": {"SYSLOG_IDENTIFIER": "kubelet"},
    "uid": "uid-cart-1", "name": "cart-1", "labels": {"app": "cart"},
    "workloadKind": "ReplicaSet", "workloadName": "cart-6f7d8", "podIps": ["10.1.0.5"],
    "containers": [{"name": "cart", "containerId": "containerd://abc123", "memoryLimitBytes": 268435456}],
    "phase": "Running", "previousPhase": "Pending",
    "condition": "Ready", "status": "False", "previousStatus": "True",
    "transitionNs": 1700000000000000000,
    "deployment": "web", "revision": "8", "newReplicaSet": "web-7c9f", "oldReplicaSet": "web-5d4b",
    "replicas": 3, "updatedReplicas": 1, "readyReplicas": 2, "availableReplicas": 2,
    "service": "pay", "notReadyPods": ["shop/cart-1"],
    "involvedKind": "Pod", "involvedNamespace": "shop", "involvedName": "cart-1", "count": 3,
    "counts": [{"stage": "kernel", "kind": "process.exec", "cpu": 1, "total": 10, "delta": 2}],
    "delta": 2, "type": "Warning",
    "id": "3f2a9c1e", "kind": "crash-loop", "severity": "warning",
    "summary": "container cart of pod/shop/cart-1 restarted 3 times in 10m",
    "rootCause": "killed by the OOM killer", "rootCauseEventId": "r1",
    "evidenceEventIds": ["r1", "r2", "r3"],
    "affected": [{"kind": "pod", "namespace": "shop", "name": "cart-1"}],
    "firstSeenNs": 1700000000000000000, "lastSeenNs": 1700000060000000000,
    "confidence": 0.6, "resolvedByEventId": "", "supersededBy": "", "supersedes": []
}"#;

/// Example data for event type `ty`, as proto3 JSON with every field its
/// message has set to a plausible value (a pod `shop/cart-1` on `node-1`,
/// container `abc123`, service IP `10.96.0.10`...): what a producer's JSON
/// looks like, for docs and for tests that run every type in every
/// encoding. `None` for a type this build does not know.
pub fn example_data(ty: &str) -> Option<serde_json::Value> {
    let message = crate::topology::types::lookup(ty)?.payload;
    let mut sample: serde_json::Value = serde_json::from_str(EXAMPLE_FIELDS).ok()?;
    let process = sample["process"].clone();
    sample["victim"] = process;
    // The fields whose type differs between messages.
    sample["ready"] = match message {
        "tidewatch.v1.PodChange" => serde_json::json!(false),
        _ => serde_json::json!(0),
    };
    if message == "tidewatch.v1.Insight" {
        sample["revision"] = serde_json::json!(1);
        sample["status"] = serde_json::json!("open");
    }
    let schema = format!("{}{message}", tidewatch_proto::schema::SCHEMA_PREFIX);
    // Through the message and back: only its fields, in canonical form.
    let bytes = tidewatch_proto::encode_json(&schema, sample).ok()?;
    tidewatch_proto::decode_json(&schema, &bytes).ok()
}

/// Event type `ty` with its [`example_data`] in each encoding a producer
/// may use: protobuf in binary mode (Tidewatch's collectors), proto3 JSON in
/// binary mode, and JSON in structured mode as read off NATS. Same id,
/// source, subject and time; for tests that every encoding reads the same.
pub fn example_encodings(ty: &str) -> Option<[Event; 3]> {
    let t = crate::topology::types::lookup(ty)?;
    let data = example_data(ty)?;
    let schema = format!("{}{}", tidewatch_proto::schema::SCHEMA_PREFIX, t.payload);
    let bytes = tidewatch_proto::encode_json(&schema, data.clone()).ok()?;
    let domain = ty.strip_prefix("dev.tidewatch.")?.split('.').next()?;
    let (collector, subject) = match domain {
        "kernel" => ("ebpf", None),
        "systemd" => ("systemd", Some("unit/kubelet.service")),
        "insight" => ("correlate", Some("pod/shop/cart-1")),
        _ if ty.contains(".node.") => ("k8s", Some("node/node-1")),
        _ if ty.contains(".rollout.") => ("k8s", Some("deployment/shop/web")),
        _ if ty.contains(".endpoints.") => ("k8s", Some("service/shop/pay")),
        _ => ("k8s", Some("pod/shop/cart-1")),
    };
    let time = chrono::DateTime::from_timestamp(1_700_000_000, 0)?;
    let base = || {
        let b = EventBuilderV10::new()
            .id(format!("example-{ty}"))
            .ty(ty)
            .source(crate::topology::source(collector, "node-1"))
            .time(time);
        match subject {
            Some(s) => b.subject(s),
            None => b,
        }
    };
    let protobuf = base()
        .data_with_schema(PROTOBUF_CONTENT_TYPE, url::Url::parse(&schema).ok()?, bytes)
        .build()
        .ok()?;
    let json = base().data("application/json", data).build().ok()?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    let structured = crate::binding::nats::from_nats(
        Some(&headers),
        &crate::binding::http::to_structured_json(&json).ok()?,
    )
    .ok()?;
    Some([protobuf, json, structured])
}

/// Whether `event`'s data is JSON rather than protobuf bytes.
fn is_json(event: &Event) -> bool {
    match event.data() {
        Some(Data::Json(_)) => true,
        Some(_) => event
            .datacontenttype()
            .is_some_and(|ct| ct.starts_with("application/json") || ct.ends_with("+json")),
        None => false,
    }
}

/// Decode the payload of `event` as `M`: protobuf bytes (the schema must
/// name `M`), or JSON in the proto3 mapping (camelCase, as `tidewatch
/// tail` prints it) whose schema, or type when it has no schema, names `M`.
/// Either way the caller gets the same message.
pub fn payload<M>(event: &Event) -> Result<M, EventError>
where
    M: prost::Message + Name + Default + serde::de::DeserializeOwned,
{
    let expected = M::full_name();
    let found = payload_message(event).unwrap_or_default();
    if found != expected {
        return Err(EventError::Payload {
            id: event.id().to_string(),
            source: PayloadError::WrongSchema {
                found: event
                    .dataschema()
                    .map(|u| u.as_str().to_string())
                    .unwrap_or(found),
                expected: schema_url::<M>(),
            },
        });
    }
    if is_json(event) {
        let parsed = match event.data() {
            Some(Data::Json(j)) => serde_json::from_value::<M>(j.clone()),
            Some(Data::String(s)) => serde_json::from_str::<M>(s),
            Some(Data::Binary(b)) => serde_json::from_slice::<M>(b),
            None => Ok(M::default()),
        };
        return parsed.map_err(|source| EventError::Payload {
            id: event.id().to_string(),
            source: PayloadError::Json {
                message: expected,
                source,
            },
        });
    }
    let bytes = data_bytes(event).ok_or_else(|| EventError::NoData {
        id: event.id().to_string(),
    })?;
    M::decode(bytes.as_slice()).map_err(|source| EventError::Payload {
        id: event.id().to_string(),
        source: PayloadError::Decode {
            message: M::full_name(),
            source,
        },
    })
}

/// The event's data as bytes, whatever form it is held in.
pub fn data_bytes(event: &Event) -> Option<Vec<u8>> {
    match event.data()? {
        Data::Binary(b) => Some(b.clone()),
        Data::String(s) => Some(s.clone().into_bytes()),
        Data::Json(j) => serde_json::to_vec(j).ok(),
    }
}

/// Copy the trace context of `input` onto `output` unless it has its own.
pub fn carry_trace(input: &Event, output: &mut Event) {
    if output.extension(TRACEPARENT).is_some() {
        return;
    }
    for name in [TRACEPARENT, "tracestate"] {
        if let Some(value) = input.extension(name) {
            output.set_extension(name, value.clone());
        }
    }
}

/// Readable JSON for humans and webhooks: the attributes, the extensions,
/// and the data decoded by its `dataschema` (protobuf payloads become JSON).
pub fn to_json(event: &Event) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, value) in event.iter() {
        out.insert(
            name.to_string(),
            serde_json::Value::String(value.to_string()),
        );
    }
    let data = match event.data() {
        None => None,
        Some(Data::Json(j)) => Some(j.clone()),
        Some(Data::String(s)) => Some(serde_json::Value::String(s.clone())),
        Some(Data::Binary(bytes)) => Some(match event.dataschema() {
            Some(schema) => tidewatch_proto::decode_json(schema.as_str(), bytes).unwrap_or_else(
                |e| serde_json::json!({ "undecodable": e.to_string(), "bytes": bytes.len() }),
            ),
            None => serde_json::json!({ "bytes": bytes.len() }),
        }),
    };
    if let Some(data) = data {
        out.insert("data".to_string(), data);
    }
    serde_json::Value::Object(out)
}

/// Short human description for logs: `type id (subject)`.
pub fn describe(event: &Event) -> String {
    match event.subject() {
        Some(subject) => format!("{} {} ({subject})", event.ty(), event.id()),
        None => format!("{} {}", event.ty(), event.id()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_example_data_that_fills_its_message() {
        for t in crate::topology::types::ALL {
            let data = example_data(t.name).unwrap_or_else(|| panic!("{}: no example", t.name));
            let fields = data.as_object().map_or(0, |o| o.len());
            assert!(fields >= 3, "{}: only {fields} fields in {data}", t.name);
        }
        assert_eq!(example_data("dev.example.unknown"), None);
        for t in crate::topology::types::ALL {
            let [protobuf, json, structured] =
                example_encodings(t.name).unwrap_or_else(|| panic!("{}", t.name));
            assert!(protobuf.dataschema().is_some() && json.dataschema().is_none());
            assert_eq!(
                to_json(&protobuf)["data"],
                to_json(&json)["data"],
                "{}",
                t.name
            );
            assert_eq!(
                to_json(&structured)["data"],
                to_json(&json)["data"],
                "{}",
                t.name
            );
        }
    }
    use tidewatch_proto::v1;

    #[test]
    fn ids_are_deterministic_and_separate_parts() {
        assert_eq!(derive_id(&[b"a", b"b"]), derive_id(&[b"a", b"b"]));
        assert_ne!(derive_id(&[b"ab", b"c"]), derive_id(&[b"a", b"bc"]));
        assert_eq!(derive_id(&[b"x"]).len(), 32);
        assert_eq!(output_id("in", "enrich", 0), output_id("in", "enrich", 0));
        assert_ne!(output_id("in", "enrich", 0), output_id("in", "enrich", 1));
        assert_ne!(
            output_id("in", "enrich", 0),
            output_id("in", "correlate", 0)
        );
    }

    #[test]
    fn payload_round_trip_and_schema_check() {
        let restart = v1::ContainerRestart {
            pod: "web-1".into(),
            exit_code: 137,
            ..Default::default()
        };
        let event = new_event(
            "id-1",
            crate::topology::types::CONTAINER_RESTARTED,
            "/tidewatch/k8s/node-1",
            Some("pod/default/web-1"),
            chrono::Utc::now(),
            &restart,
        )
        .expect("builds");
        assert_eq!(event.datacontenttype(), Some(PROTOBUF_CONTENT_TYPE));
        let back: v1::ContainerRestart = payload(&event).expect("decodes");
        assert_eq!(back, restart);
        let err = payload::<v1::Insight>(&event).expect_err("wrong message");
        assert!(err.to_string().contains("tidewatch.v1.Insight"), "{err}");
    }

    #[test]
    fn trace_context_is_carried_unless_set() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut input = EventBuilderV10::new()
            .id("a")
            .ty("t")
            .source("/s")
            .build()
            .expect("event");
        input.set_extension(TRACEPARENT, tp);
        let mut output = EventBuilderV10::new()
            .id("b")
            .ty("t")
            .source("/s")
            .build()
            .expect("event");
        carry_trace(&input, &mut output);
        assert_eq!(
            output.extension(TRACEPARENT).map(|v| v.to_string()),
            Some(tp.to_string())
        );
    }
}

/// Fuzzing how functions read payloads: [`payload`] and [`to_json`] over
/// events carrying arbitrary data under every `dataschema`.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code: a failed step is the test failing
mod fuzz_tests {
    use super::*;
    use proptest::prelude::*;
    use tidewatch_proto::schema::MESSAGES;
    use tidewatch_proto::v1;

    fn data() -> impl Strategy<Value = Data> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..128).prop_map(Data::Binary),
            ".{0,32}".prop_map(Data::String),
            any::<i64>().prop_map(|n| Data::Json(serde_json::json!({ "pid": n }))),
        ]
    }

    fn schema() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            prop::sample::select(MESSAGES).prop_map(|m| Some(format!("proto:{m}"))),
            Just(None),
            "[a-z]{1,6}:[ -~]{0,16}".prop_map(Some),
        ]
    }

    /// `payload::<M>`: the message, or an error naming what was expected.
    fn check<M: prost::Message + Name + Default + serde::de::DeserializeOwned>(
        event: &Event,
    ) -> Result<(), TestCaseError> {
        if let Err(e) = payload::<M>(event) {
            let text = e.to_string();
            prop_assert!(text.contains(event.id()), "{}", text);
            if !matches!(e, EventError::NoData { .. }) {
                prop_assert!(text.contains(&M::full_name()), "{}", text);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            // 256 cases unless `PROPTEST_CASES` says otherwise (long runs).
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn fuzz_payload_and_to_json_arbitrary_data(
            data in proptest::option::of(data()),
            schema in schema(),
        ) {
            let mut event = EventBuilderV10::new().id("e-1").ty("t").source("/s").build().unwrap();
            if let Some(schema) = schema.and_then(|s| url::Url::parse(&s).ok()) {
                cloudevents::AttributesWriter::set_dataschema(&mut event, Some(schema));
            }
            if let Some(data) = data {
                event.set_data_unchecked(data);
            }
            let json = to_json(&event);
            prop_assert_eq!(&json["id"], "e-1");
            check::<v1::ProcessExec>(&event)?;
            check::<v1::ProcessExit>(&event)?;
            check::<v1::OomKill>(&event)?;
            check::<v1::TcpConnection>(&event)?;
            check::<v1::ContainerRestart>(&event)?;
            check::<v1::UnitStateChange>(&event)?;
            check::<v1::JournalEntry>(&event)?;
            check::<v1::PodMetadata>(&event)?;
            check::<v1::Insight>(&event)?;
            check::<v1::CollectorDrops>(&event)?;
            check::<v1::PodChange>(&event)?;
            check::<v1::NodeConditionChange>(&event)?;
            check::<v1::RolloutChange>(&event)?;
            check::<v1::EndpointsChange>(&event)?;
            check::<v1::KubeEvent>(&event)?;
        }
    }
}
