#![allow(clippy::unwrap_used)] // test code: a failed step is the test failing
//! Fuzzing what enrich decodes: event payloads under every schema it reads,
//! and whatever bytes the pod metadata bucket holds (protobuf pod metadata,
//! JSON service entries). Enrich must never panic or drop an event: it
//! resolves it or says why not.

use std::collections::BTreeMap;

use bytes::Bytes;
use cloudevents::{AttributesWriter, EventBuilder, EventBuilderV10};
use proptest::prelude::*;
use tidewatch_proto::v1::{ContainerMetadata, PodMetadata};

use super::*;

/// 256 cases per property unless `PROPTEST_CASES` says otherwise (long runs).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A bucket holding the same value under every key.
struct Every(Option<Bytes>);
impl Lookup for Every {
    async fn get(&self, _: &str) -> Result<Option<Bytes>, PodError> {
        Ok(self.0.clone())
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "abc123",
            "containerd://abc123",
            "u-1",
            "10.1.0.5",
            "a/b"
        ])
        .prop_map(str::to_string),
        ".{0,12}",
    ]
}

/// What a bucket value may be: pod metadata, service JSON, or anything.
fn stored() -> impl Strategy<Value = Option<Bytes>> {
    let pod = (
        text(),
        text(),
        text(),
        text(),
        proptest::collection::btree_map(text(), text(), 0..3),
        any::<i64>(),
    )
        .prop_map(|(namespace, name, node, container_id, labels, limit)| {
            PodMetadata {
                namespace,
                name,
                node,
                workload_kind: "ReplicaSet".into(),
                labels: labels.into_iter().collect(),
                containers: vec![ContainerMetadata {
                    name: "c".into(),
                    container_id,
                    memory_limit_bytes: limit,
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec()
        });
    prop_oneof![
        Just(None),
        pod.prop_map(|b| Some(Bytes::from(b))),
        prop::sample::select(vec![
            &br#"{"namespace":"shop","name":"cart"}"#[..],
            b"[1,2]",
            b"null",
            b"\"x\"",
            b"{",
        ])
        .prop_map(|b| Some(Bytes::from_static(b))),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Some(Bytes::from(b))),
    ]
}

/// Schemas enrich reads, each with a well-formed payload or any bytes.
fn payload_data() -> impl Strategy<Value = (String, Vec<u8>)> {
    let process = (any::<u32>(), text(), text()).prop_map(|(pid, container_id, pod_uid)| {
        Some(ProcessInfo {
            pid,
            container_id,
            pod_uid,
            ..Default::default()
        })
    });
    let schema = prop::sample::select(vec![
        "ProcessExec",
        "ProcessExit",
        "OomKill",
        "TcpConnection",
        "ContainerRestart",
        "UnitStateChange",
        "JournalEntry",
        "PodMetadata",
    ]);
    (
        schema,
        process,
        text(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(schema, process, text, garbage, bytes)| {
            let data = if garbage {
                bytes
            } else {
                match schema {
                    "ProcessExec" => ProcessExec {
                        process,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    "ProcessExit" => ProcessExit {
                        process,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    "OomKill" => OomKill {
                        victim: process,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    "TcpConnection" => TcpConnection {
                        process,
                        daddr: text,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    "ContainerRestart" => ContainerRestart {
                        node: text,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    "UnitStateChange" => UnitStateChange {
                        node: text,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    "JournalEntry" => JournalEntry {
                        node: text,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    _ => bytes,
                }
            };
            (format!("proto:tidewatch.v1.{schema}"), data)
        })
}

fn event() -> impl Strategy<Value = Event> {
    let subject = prop_oneof![
        Just(None),
        prop::sample::select(vec![
            "pod/shop/cart-1",
            "pod/x",
            "pod//",
            "node/n1",
            "node/",
            "unit/kubelet",
            "/",
            ""
        ])
        .prop_map(|s| Some(s.to_string())),
        ".{0,16}".prop_map(Some),
    ];
    let source = prop_oneof![
        prop::sample::select(vec![
            "/tidewatch/ebpf/node-1",
            "/tidewatch//",
            "/tidewatch/x",
            "/s"
        ])
        .prop_map(str::to_string),
        ".{1,16}",
    ];
    (payload_data(), subject, source, any::<bool>()).prop_map(
        |((schema, data), subject, source, with_schema)| {
            let builder = EventBuilderV10::new().id("e-1").ty("t").source(source);
            let builder = if with_schema {
                builder.data_with_schema("application/protobuf", schema.as_str(), data)
            } else {
                builder.data("application/protobuf", data)
            };
            let mut event = builder.build().unwrap();
            event.set_subject(subject.as_deref());
            event
        },
    )
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(config())]

    /// Any bucket value: a pod, or an error naming the key.
    #[test]
    fn fuzz_enrich_pod_metadata_arbitrary_bytes(bytes in stored(), key in "[a-z.]{1,12}") {
        match Pod::decode(&key, bytes.as_ref()) {
            Ok(pod) => prop_assert!(pod.extensions.iter().all(|(n, _)| !n.is_empty())),
            Err(e @ PodError::Corrupt { .. }) => {
                prop_assert!(bytes.is_some() && e.to_string().contains(&key), "{}", e);
            }
            Err(e @ PodError::Missing { .. }) => prop_assert!(bytes.is_none(), "{}", e),
            Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
        }
    }

    /// Any payload, any bucket: the event is resolved or says why not, and
    /// the extensions apply to it.
    #[test]
    fn fuzz_enrich_resolve_arbitrary_payloads(event in event(), stored in stored()) {
        let enrichment = block_on(resolve(&Every(stored), &event)).unwrap();
        if let Some(reason) = &enrichment.unresolved {
            prop_assert!(!reason.is_empty());
        }
        let names: BTreeMap<_, _> = enrichment.extensions.clone();
        let mut out = event.clone();
        enrichment.apply(&mut out);
        for name in names.keys() {
            prop_assert!(out.extension(name).is_some(), "{} not applied", name);
        }
        prop_assert!(out.extension(extensions::RESOLUTION).is_some());
        prop_assert_eq!(out.data(), event.data());
    }
}
