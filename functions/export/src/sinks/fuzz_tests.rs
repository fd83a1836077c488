#![allow(clippy::unwrap_used)] // test code: a failed step is the test failing
//! Fuzzing what export decodes: the insight payload of every event it
//! renders (Slack text, structured CloudEvent JSON, an OTLP log record),
//! as any bytes or as insights with extreme values. Export must render
//! every event, never panic.

use cloudevents::{EventBuilder, EventBuilderV10};
use proptest::prelude::*;
use prost::Message;
use tidewatch_proto::v1::{Entity, Insight};

use super::*;

/// 256 cases per property unless `PROPTEST_CASES` says otherwise (long runs).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn insight() -> impl Strategy<Value = Insight> {
    (
        (
            ".{0,12}",
            ".{0,12}",
            prop::sample::select(vec!["critical", "warning", "info", ""]),
            ".{0,24}",
        ),
        proptest::collection::vec(".{0,8}", 0..4),
        proptest::collection::vec((".{0,6}", ".{0,6}", ".{0,6}"), 0..3),
        (any::<i64>(), any::<i64>(), any::<f64>(), any::<u32>()),
    )
        .prop_map(
            |(
                (id, kind, severity, summary),
                evidence,
                affected,
                (first, last, confidence, revision),
            )| Insight {
                id,
                kind,
                severity: severity.into(),
                summary,
                root_cause: "r".into(),
                root_cause_event_id: evidence.first().cloned().unwrap_or_default(),
                evidence_event_ids: evidence,
                affected: affected
                    .into_iter()
                    .map(|(kind, namespace, name)| Entity {
                        kind,
                        namespace,
                        name,
                    })
                    .collect(),
                first_seen_ns: first,
                last_seen_ns: last,
                confidence,
                revision,
                ..Insight::default()
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    let data = prop_oneof![
        insight().prop_map(|i| i.encode_to_vec()),
        proptest::collection::vec(any::<u8>(), 0..96),
    ];
    let schema = prop::sample::select(vec![
        "proto:tidewatch.v1.Insight",
        "proto:tidewatch.v1.OomKill",
        "urn:x",
    ]);
    let time = proptest::option::of(any::<i64>().prop_map(|s| s % 100_000_000_000));
    (data, schema, time, proptest::option::of(".{0,12}")).prop_map(
        |(data, schema, time, subject)| {
            let mut builder = EventBuilderV10::new()
                .id("i-1")
                .ty("dev.tidewatch.insight.crash-loop")
                .source("/tidewatch/correlate/n1")
                .data_with_schema("application/protobuf", schema, data);
            if let Some(t) = time.and_then(|s| chrono::DateTime::from_timestamp(s, 0)) {
                builder = builder.time(t);
            }
            if let Some(s) = subject {
                builder = builder.subject(s);
            }
            builder.build().unwrap()
        },
    )
}

proptest! {
    #![proptest_config(config())]

    /// Every sink's rendering of any insight event: something that names it.
    #[test]
    fn fuzz_export_render_arbitrary_insights(event in event()) {
        let decoded = payload::<Insight>(&event).ok();
        let text = slack_text(&event);
        match &decoded {
            Some(i) => prop_assert!(text.contains(&i.id) && text.contains(&i.kind), "{}", text),
            None => prop_assert!(text.contains(event.id()), "{}", text),
        }
        let json = cloudevent_json(&event);
        prop_assert_eq!(&json["specversion"], "1.0");
        prop_assert_eq!(&json["id"], event.id());
        serde_json::to_vec(&json).unwrap();
        let request = otlp_request(&event);
        let records: Vec<_> = request
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| &s.log_records)
            .collect();
        prop_assert_eq!(records.len(), 1);
        let encoded = request.encode_to_vec();
        // Compared as bytes: a NaN confidence is not equal to itself.
        let again = ExportLogsServiceRequest::decode(encoded.as_slice()).unwrap();
        prop_assert_eq!(again.encode_to_vec(), encoded);
    }
}
