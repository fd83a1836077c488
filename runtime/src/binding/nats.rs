//! CloudEvents ↔ NATS messages, per the NATS protocol binding 1.0.3.
//!
//! Writes binary mode: every attribute and extension as a `ce-<name>`
//! header, percent-encoded; data as the payload; the event id also as
//! `Nats-Msg-Id` so a retried publish is deduplicated by the stream.
//! Reads binary mode (header names case-insensitive, values unquoted then
//! percent-decoded) and structured mode (`Content-Type:
//! application/cloudevents+json`), which other tools publish.

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, IntoHeaderName};
use bytes::Bytes;
use cloudevents::event::AttributeValue;
use cloudevents::{AttributesReader, Data, Event};

use super::{BindingError, PREFIX, binary_event, decode_header_value_cow, percent_encode};

/// Header JetStream deduplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Encode an event in binary mode: `(headers, payload)`.
pub fn to_nats(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    // This runs once per published event: borrow attribute values instead of
    // formatting them, and percent-encode only when a value needs it.
    for (name, value) in event.iter() {
        if !super::valid_extension_name(name) {
            // Not a valid attribute name (the SDK lets one be set): it cannot
            // be a header either, and a panic here would stop the pipeline.
            tracing::warn!(
                event = event.id(),
                attribute = name,
                "attribute name is not lowercase alphanumeric; not sent"
            );
            continue;
        }
        let formatted;
        let text: &str = match &value {
            AttributeValue::String(s) => s,
            AttributeValue::URIRef(s) => s.as_str(),
            AttributeValue::URI(u) => u.as_str(),
            AttributeValue::SpecVersion(v) => v.as_str(),
            AttributeValue::Time(t) => {
                formatted = rfc3339(t);
                &formatted
            }
            other => {
                formatted = other.to_string();
                &formatted
            }
        };
        headers.insert(header_name(name), percent_encode(text).into_owned());
    }
    headers.insert(MSG_ID_HEADER, percent_encode(event.id()).as_ref());
    let payload = match event.data() {
        Some(Data::Binary(b)) => Bytes::copy_from_slice(b),
        Some(Data::String(s)) => Bytes::copy_from_slice(s.as_bytes()),
        Some(Data::Json(j)) => Bytes::from(serde_json::to_vec(j).unwrap_or_default()),
        None => Bytes::new(),
    };
    (headers, payload)
}

/// RFC 3339 in UTC with nanoseconds, written by hand: chrono's general
/// formatter is the slowest step of encoding an event.
pub fn rfc3339(t: &chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let mut out = String::with_capacity(30);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond().min(999_999_999)
    );
    out
}

/// `ce-<name>`; static (allocation-free) for the spec's own attributes and
/// the extensions Tidewatch functions add to every event. A `match`, not a
/// table: a table of `HeaderName`s is built and dropped on every call.
fn header_name(attribute: &str) -> HeaderName {
    match attribute {
        "specversion" => const { HeaderName::from_static("ce-specversion") },
        "id" => const { HeaderName::from_static("ce-id") },
        "source" => const { HeaderName::from_static("ce-source") },
        "type" => const { HeaderName::from_static("ce-type") },
        "subject" => const { HeaderName::from_static("ce-subject") },
        "time" => const { HeaderName::from_static("ce-time") },
        "datacontenttype" => const { HeaderName::from_static("ce-datacontenttype") },
        "dataschema" => const { HeaderName::from_static("ce-dataschema") },
        "traceparent" => const { HeaderName::from_static("ce-traceparent") },
        "tracestate" => const { HeaderName::from_static("ce-tracestate") },
        "resolution" => const { HeaderName::from_static("ce-resolution") },
        "resolutionreason" => const { HeaderName::from_static("ce-resolutionreason") },
        "namespace" => const { HeaderName::from_static("ce-namespace") },
        "pod" => const { HeaderName::from_static("ce-pod") },
        "node" => const { HeaderName::from_static("ce-node") },
        "workload" => const { HeaderName::from_static("ce-workload") },
        "container" => const { HeaderName::from_static("ce-container") },
        "memorylimit" => const { HeaderName::from_static("ce-memorylimit") },
        "labels" => const { HeaderName::from_static("ce-labels") },
        "peerpod" => const { HeaderName::from_static("ce-peerpod") },
        "peerservice" => const { HeaderName::from_static("ce-peerservice") },
        // Extension names were checked to be lowercase alphanumeric: a valid header name.
        other => format!("{PREFIX}{other}").into_header_name(),
    }
}

/// Bytes a message takes on the wire: payload plus headers (`name: value\r\n`
/// each). This is what [`crate::event::MAX_EVENT_BYTES`] limits.
pub fn wire_size(headers: Option<&HeaderMap>, payload: &[u8]) -> usize {
    let headers: usize = headers
        .map(|h| {
            h.iter()
                .map(|(n, vs)| {
                    vs.iter()
                        .map(|v| AsRef::<str>::as_ref(n).len() + v.as_str().len() + 4)
                        .sum::<usize>()
                })
                .sum()
        })
        .unwrap_or(0);
    headers + payload.len()
}

/// Decode a NATS message in either content mode.
pub fn from_nats(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Event, BindingError> {
    use std::borrow::Cow;
    let empty = HeaderMap::new();
    let headers = headers.unwrap_or(&empty);
    let mut content_type = None;
    // Borrowed from the headers: this runs once per consumed message, and
    // most names are already lowercase and most values need no decoding.
    let mut attributes: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::with_capacity(16);
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        let Some(value) = values.last() else { continue };
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.as_str());
        } else if name.len() > PREFIX.len()
            && name.is_char_boundary(PREFIX.len())
            && name[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
        {
            let attr = &name[PREFIX.len()..];
            let attr = if attr.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(attr.to_ascii_lowercase())
            } else {
                Cow::Borrowed(attr)
            };
            let decoded = decode_header_value_cow(value.as_str()).map_err(|reason| {
                BindingError::Attribute {
                    name: attr.to_string(),
                    reason,
                }
            })?;
            attributes.push((attr, decoded));
        }
    }
    if content_type.is_some_and(|ct| {
        ct.len() >= STRUCTURED_PREFIX.len()
            && ct.is_char_boundary(STRUCTURED_PREFIX.len())
            && ct[..STRUCTURED_PREFIX.len()].eq_ignore_ascii_case(STRUCTURED_PREFIX)
    }) {
        // The same checks as binary mode and HTTP: an event is valid
        // whichever way it was written.
        return serde_json::from_slice::<Event>(payload)
            .map_err(|e| BindingError::Structured(e.to_string()))
            .and_then(super::check_structured);
    }
    // The NATS binding carries datacontenttype as `ce-datacontenttype`;
    // producers that reuse their HTTP binding (the CloudEvents SDKs'
    // `to_binary` headers) send it as `Content-Type`. Accept that too.
    if let Some(ct) = content_type
        && !attributes.iter().any(|(name, _)| name == "datacontenttype")
    {
        attributes.push((Cow::Borrowed("datacontenttype"), Cow::Borrowed(ct)));
    }
    binary_event(&attributes, payload)
}

/// Content types of structured mode start with this.
const STRUCTURED_PREFIX: &str = "application/cloudevents";

/// The `type` of a binary-mode message without decoding it (`None` for
/// structured mode or when absent). Lets a consumer skip messages its
/// function ignores.
pub fn peek_type(headers: Option<&HeaderMap>) -> Option<std::borrow::Cow<'_, str>> {
    let headers = headers?;
    let mut ty = None;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case("content-type") {
            // Structured mode (or anything unusual): let the full decoder decide.
            return None;
        }
        if name.eq_ignore_ascii_case("ce-type") {
            ty = values.last();
        }
    }
    decode_header_value_cow(ty?.as_str()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::decode_header_value;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn sample() -> Event {
        let mut event = EventBuilderV10::new()
            .id("id-1")
            .source("/tidewatch/k8s/node-1")
            .ty("dev.tidewatch.k8s.container.restarted")
            .subject("pod/default/web 1 \"quoted\" 100% ünïcode")
            .time(chrono::Utc::now())
            .data_with_schema(
                "application/protobuf",
                url::Url::parse("proto:tidewatch.v1.ContainerRestart").expect("url"),
                vec![1u8, 2, 3, 0, 255],
            )
            .build()
            .expect("event");
        event.set_extension(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        event.set_extension("resolution", "unresolved: no pod for cgroup 42");
        event
    }

    #[test]
    fn binary_round_trip_with_encoded_values_and_extensions() {
        let event = sample();
        let (headers, payload) = to_nats(&event);
        for (name, values) in headers.iter() {
            for v in values {
                assert!(
                    v.as_str().bytes().all(|b| (0x21..=0x7e).contains(&b)),
                    "{name}: {v:?} is not printable ASCII"
                );
            }
        }
        let subject = headers
            .get("ce-subject")
            .expect("subject header")
            .as_str()
            .to_string();
        assert!(
            subject.contains("%20")
                && subject.contains("%22")
                && subject.contains("%25")
                && subject.contains("%C3%BC")
        );
        assert_eq!(headers.get(MSG_ID_HEADER).map(|v| v.as_str()), Some("id-1"));
        let back = from_nats(Some(&headers), &payload).expect("decodes");
        assert_eq!(back, event);
    }

    #[test]
    fn header_names_are_read_case_insensitively_and_quoted_values_unquoted() {
        let mut headers = HeaderMap::new();
        headers.insert("CE-SpecVersion", "1.0");
        headers.insert("Ce-Id", "\"a\\\"b\"");
        headers.insert("ce-SOURCE", "/x");
        headers.insert("ce-type", "t.a%2Eb");
        headers.insert("ce-myext", "v%20w");
        let event = from_nats(Some(&headers), b"").expect("decodes");
        assert_eq!(event.id(), "a\"b");
        assert_eq!(event.ty(), "t.a.b");
        assert_eq!(
            event.extension("myext").map(|v| v.to_string()),
            Some("v w".into())
        );
        assert!(event.data().is_none());
    }

    #[test]
    fn the_type_is_peeked_without_decoding_binary_mode_only() {
        let (headers, _) = to_nats(&sample());
        assert_eq!(
            peek_type(Some(&headers)).as_deref(),
            Some("dev.tidewatch.k8s.container.restarted")
        );
        let mut headers = HeaderMap::new();
        headers.insert("CE-Type", "a%2Eb");
        assert_eq!(peek_type(Some(&headers)).as_deref(), Some("a.b"));
        headers.insert("content-type", "application/cloudevents+json");
        assert_eq!(
            peek_type(Some(&headers)),
            None,
            "structured: decode to know"
        );
        assert_eq!(peek_type(None), None);
    }

    #[test]
    fn binary_mode_takes_content_type_as_datacontenttype_when_ce_header_is_absent() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/python"),
            ("ce-type", "t"),
            ("content-type", "application/json"),
        ] {
            headers.insert(k, v);
        }
        let event = from_nats(Some(&headers), br#"{"a":1}"#).expect("event");
        assert_eq!(event.datacontenttype(), Some("application/json"));
        headers.insert("ce-datacontenttype", "text/plain");
        let event = from_nats(Some(&headers), b"x").expect("event");
        assert_eq!(event.datacontenttype(), Some("text/plain"), "ce- wins");
    }

    #[test]
    fn structured_mode_gets_the_checks_binary_mode_gets() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/cloudevents+json");
        for (json, what) in [
            (
                serde_json::json!({"specversion": "1.0", "id": "", "source": "/s", "type": "t"}),
                "id",
            ),
            (
                serde_json::json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "Bad_Ext": "x"}),
                "Bad_Ext",
            ),
        ] {
            let err = from_nats(Some(&headers), &serde_json::to_vec(&json).expect("json"))
                .expect_err("refused");
            assert!(err.to_string().contains(what), "{err}");
        }
    }

    #[test]
    fn structured_mode_is_read() {
        let json = serde_json::json!({
            "specversion": "1.0", "id": "s-1", "source": "/other-tool", "type": "com.example.thing",
            "datacontenttype": "application/json", "data": {"hello": "world"}, "myext": "x"
        });
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        );
        let event = from_nats(Some(&headers), json.to_string().as_bytes()).expect("decodes");
        assert_eq!(event.id(), "s-1");
        assert_eq!(
            event.data(),
            Some(&Data::Json(serde_json::json!({"hello": "world"})))
        );
        assert_eq!(
            event.extension("myext").map(|v| v.to_string()),
            Some("x".into())
        );
    }

    #[test]
    fn malformed_messages_name_the_problem() {
        let err = from_nats(None, b"hello").expect_err("plain message");
        assert!(matches!(err, BindingError::NotACloudEvent), "{err}");
        let mut headers = HeaderMap::new();
        headers.insert("ce-specversion", "0.3");
        assert!(matches!(
            from_nats(Some(&headers), b""),
            Err(BindingError::SpecVersion(_))
        ));
        headers.insert("ce-specversion", "1.0");
        headers.insert("ce-id", "x");
        headers.insert("ce-source", "/s");
        assert!(matches!(
            from_nats(Some(&headers), b""),
            Err(BindingError::Missing("type"))
        ));
        headers.insert("ce-type", "t");
        headers.insert("ce-time", "yesterday");
        let err = from_nats(Some(&headers), b"").expect_err("bad time");
        assert!(err.to_string().contains("time"), "{err}");
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/cloudevents+json");
        assert!(matches!(
            from_nats(Some(&headers), b"{not json"),
            Err(BindingError::Structured(_))
        ));
        assert!(decode_header_value("%zz").is_err());
        assert!(decode_header_value("%4").is_err());
    }

    #[test]
    fn times_are_rfc3339_and_parse_back() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-26T23:05:07.000012345Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(rfc3339(&t), "2026-11-26T23:05:07.000012345Z");
        let back = chrono::DateTime::parse_from_rfc3339(&rfc3339(&t)).expect("parses");
        assert_eq!(back, t);
    }

    #[test]
    fn percent_encoding_matches_the_spec_examples() {
        assert_eq!(
            percent_encode("Euro € 😀"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80"
        );
        assert_eq!(
            decode_header_value("Euro%20%E2%82%AC%20%F0%9F%98%80").expect("decodes"),
            "Euro € 😀"
        );
    }
}
