#![allow(clippy::unwrap_used)] // test code: a failed step is the test failing
//! Fuzzing every protobuf message with arbitrary bytes: decoding never
//! panics, refusals name the message, and what decodes survives
//! encode → decode, as protobuf and through its JSON rendering.

use proptest::prelude::*;
use prost::{Message, Name};

use crate::schema::{MESSAGES, SCHEMA_PREFIX, SchemaError, decode_json, encode_json};
use crate::{cloudevents, v1};

/// 256 cases per property unless `PROPTEST_CASES` says otherwise (long runs).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Arbitrary bytes, and bytes built from protobuf pieces (valid tags with
/// any wire type, varints up to 10 bytes, length prefixes far past the end)
/// so decoders get past the first byte.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..8),
        // field 1..=16, any wire type, then a varint
        (1u8..=16, 0u8..8, any::<u64>()).prop_map(|(field, wire_type, n)| {
            let mut out = vec![(field << 3) | wire_type];
            varint(&mut out, n);
            out
        }),
        // a length-delimited field claiming up to u64::MAX bytes
        (
            1u8..=16,
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(field, len, body)| {
                let mut out = vec![(field << 3) | 2];
                varint(&mut out, len);
                out.extend(body);
                out
            }),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        proptest::collection::vec(piece, 0..12).prop_map(|p| p.concat()),
    ]
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Decode `bytes` as `M`: a refusal, or a message whose encoding decodes to
/// the same encoding (compared as bytes: a NaN double is not equal to itself).
fn check<M: Message + Default + Name>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(message) = M::decode(bytes) {
        let encoded = message.encode_to_vec();
        let again = M::decode(encoded.as_slice())
            .map_err(|e| TestCaseError::fail(format!("{}: re-decoding failed: {e}", M::NAME)))?;
        prop_assert_eq!(again.encode_to_vec(), encoded, "{}", M::NAME);
    }
    Ok(())
}

/// Whether every double in the JSON is representable: JSON has no NaN or
/// infinity, so `decode_json` renders them as null, which does not read back.
fn has_null(json: &serde_json::Value) -> bool {
    match json {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.iter().any(has_null),
        serde_json::Value::Object(o) => o.values().any(has_null),
        _ => false,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Every message type, protobuf: no panic, round trip where it decodes.
    #[test]
    fn fuzz_proto_decode_every_message(bytes in wire()) {
        check::<v1::ProcessInfo>(&bytes)?;
        check::<v1::ProcessExec>(&bytes)?;
        check::<v1::ProcessExit>(&bytes)?;
        check::<v1::OomKill>(&bytes)?;
        check::<v1::TcpConnection>(&bytes)?;
        check::<v1::ContainerRestart>(&bytes)?;
        check::<v1::UnitStateChange>(&bytes)?;
        check::<v1::JournalEntry>(&bytes)?;
        check::<v1::PodMetadata>(&bytes)?;
        check::<v1::ContainerMetadata>(&bytes)?;
        check::<v1::Entity>(&bytes)?;
        check::<v1::Insight>(&bytes)?;
        check::<v1::CollectorDrops>(&bytes)?;
        check::<v1::DropCount>(&bytes)?;
        check::<v1::PodChange>(&bytes)?;
        check::<v1::NodeConditionChange>(&bytes)?;
        check::<v1::RolloutChange>(&bytes)?;
        check::<v1::EndpointsChange>(&bytes)?;
        check::<v1::KubeEvent>(&bytes)?;
        check::<cloudevents::CloudEvent>(&bytes)?;
        check::<cloudevents::CloudEventBatch>(&bytes)?;
    }

    /// Every registered payload through `decode_json` (what `tail`, webhooks
    /// and correlate read): a refusal naming the message, or JSON that
    /// `encode_json` turns back into the same message.
    #[test]
    fn fuzz_proto_json_every_payload(bytes in wire()) {
        for name in MESSAGES {
            let schema = format!("{SCHEMA_PREFIX}{name}");
            let short = name.trim_start_matches("tidewatch.v1.");
            match decode_json(&schema, &bytes) {
                Ok(json) => {
                    if has_null(&json) {
                        continue;
                    }
                    let back = encode_json(&schema, json.clone())
                        .map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
                    prop_assert_eq!(decode_json(&schema, &back).unwrap(), json, "{}", name);
                }
                Err(e @ SchemaError::Decode { .. }) => {
                    prop_assert!(e.to_string().contains(short), "{}", e);
                }
                Err(e) => return Err(TestCaseError::fail(format!("{name}: {e}"))),
            }
        }
    }

    /// Arbitrary JSON into every payload: a message or a refusal naming it.
    #[test]
    fn fuzz_proto_encode_json_arbitrary(json in json()) {
        for name in MESSAGES {
            let schema = format!("{SCHEMA_PREFIX}{name}");
            if let Err(e) = encode_json(&schema, json.clone()) {
                prop_assert!(
                    e.to_string().contains(name.trim_start_matches("tidewatch.v1.")),
                    "{}",
                    e
                );
            }
        }
    }
}

/// JSON objects using the payloads' field names, with values of any type.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,8}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let key = prop::sample::select(vec![
        "pid",
        "process",
        "victim",
        "exitCode",
        "labels",
        "containers",
        "confidence",
        "affected",
        "counts",
        "fields",
        "memoryLimitBytes",
        "namespace",
    ]);
    proptest::collection::btree_map(key, value, 0..5).prop_map(|m| {
        serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    })
}
