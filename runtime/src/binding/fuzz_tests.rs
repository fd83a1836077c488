#![allow(clippy::unwrap_used)] // test code: a failed step is the test failing
//! Fuzzing the HTTP CloudEvents decoder ([`from_http`]) and the header-value
//! codec with arbitrary headers and bodies: nothing panics, every refusal is
//! a [`BindingError`] naming what was wrong, and encode → decode is the
//! identity for binary and structured mode.

use cloudevents::{AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV10};
use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};
use proptest::prelude::*;

use super::http::{STRUCTURED_CONTENT_TYPE, from_http, to_http, to_structured_json};
use super::{BindingError, decode_header_value, percent_encode};

/// 256 cases per property unless `PROPTEST_CASES` says otherwise (long runs).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Header names a sender might use: every attribute, extensions, junk.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "ce-specversion", "ce-id", "ce-source", "ce-type", "ce-subject", "ce-time",
            "ce-dataschema", "ce-datacontenttype", "content-type", "ce-traceparent",
        ])
        .prop_map(str::to_string),
        1 => "ce-[a-z0-9_-]{0,8}",
        1 => "[a-z-]{1,12}",
    ]
}

/// Header values: plausible ones, percent escapes and quoting, and any
/// bytes a header value may hold.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::sample::select(vec![
            "1.0", "0.3", "id-1", "/tidewatch/ebpf/node-1", "dev.tidewatch.x",
            "2024-01-01T00:00:00Z", "proto:tidewatch.v1.OomKill", "application/json",
            "application/protobuf", "application/cloudevents+json", "application/cloudevents-batch+json",
            "text/json; charset=utf-8", "%", "%zz", "%+1", "%C3%28", "\"quoted \\\"x\\\"\"", "\"\\",
            "", " ", "\"\"",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        2 => "[ -~]{0,24}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

/// Arbitrary headers, half of the time on top of a valid binary-mode event
/// so that decoding gets past the required attributes.
fn headers() -> impl Strategy<Value = HeaderMap> {
    let valid = [
        ("ce-specversion", "1.0"),
        ("ce-id", "id-1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
    ];
    let pairs = proptest::collection::vec((header_name(), header_value()), 0..10);
    (any::<bool>(), pairs).prop_map(move |(base, pairs)| {
        let mut map = HeaderMap::new();
        if base {
            for (n, v) in valid {
                map.insert(n, HeaderValue::from_static(v));
            }
        }
        for (name, value) in pairs {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_bytes(&value),
            ) {
                // On a valid base, replace: the decoder reads the first value.
                if base {
                    map.insert(n, v);
                } else {
                    map.append(n, v);
                }
            }
        }
        map
    })
}

/// Bodies: any bytes, and JSON that looks like a structured event.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let json_value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("")),
        Just(serde_json::json!({"a": [1, "b"]})),
    ];
    let key = prop::sample::select(vec![
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "datacontenttype",
        "dataschema",
        "data",
        "data_base64",
        "traceparent",
        "Bad-Ext",
    ]);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        proptest::collection::btree_map(key.clone(), json_value.clone(), 0..10)
            .prop_map(|m| serde_json::to_vec(&m).unwrap()),
        // A valid structured event with a member or two replaced.
        proptest::collection::btree_map(key, json_value, 0..3).prop_map(|m| {
            let mut event = serde_json::json!({
                "specversion": "1.0", "id": "id-1", "source": "/s", "type": "t",
            });
            for (k, v) in m {
                event[k] = v;
            }
            serde_json::to_vec(&event).unwrap()
        }),
    ]
}

/// Every refusal names what was wrong.
fn check_error(err: &BindingError) -> Result<(), TestCaseError> {
    let text = err.to_string();
    match err {
        BindingError::Attribute { name, reason } => {
            prop_assert!(
                text.contains(&format!("{name:?}")) && !reason.is_empty(),
                "{}",
                text
            );
        }
        BindingError::Missing(name) => prop_assert!(text.contains(name), "{}", text),
        BindingError::SpecVersion(v) => prop_assert!(text.contains(&format!("{v:?}")), "{}", text),
        BindingError::Data { content_type, .. } => {
            prop_assert!(text.contains(content_type.as_str()), "{}", text)
        }
        BindingError::Structured(reason) => prop_assert!(!reason.is_empty(), "{}", text),
        BindingError::NotACloudEvent => {}
    }
    Ok(())
}

/// A decoded event satisfies what the decoder promises.
fn check_event(event: &Event) -> Result<(), TestCaseError> {
    prop_assert!(!event.id().is_empty());
    prop_assert!(!event.ty().is_empty());
    prop_assert_eq!(event.specversion(), cloudevents::event::SpecVersion::V10);
    for (name, _) in event.iter_extensions() {
        prop_assert!(
            super::valid_extension_name(name) && name != "data",
            "extension {:?}",
            name
        );
    }
    Ok(())
}

/// Names an extension cannot have: the attributes, and `data` (refused).
const NOT_EXTENSIONS: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
];

/// Events the binding must carry unchanged: any text in attributes,
/// extension names as the spec allows them, binary or JSON data.
fn event() -> impl Strategy<Value = Event> {
    let data = prop_oneof![
        Just(None),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| Some(("application/protobuf".to_string(), Data::Binary(b)))),
        (any::<i64>(), ".{0,12}", any::<bool>()).prop_map(|(n, s, b)| Some((
            "application/json".to_string(),
            Data::Json(serde_json::json!({"n": n, "s": s, "b": b, "a": [n]})),
        ))),
    ];
    (
        ".{1,16}",
        ".{1,16}",
        ".{1,16}",
        proptest::option::of(".{0,16}"),
        proptest::option::of((0i64..4_102_444_800, 0u32..1_000_000_000)),
        proptest::option::of("[a-z][a-z0-9:._-]{0,12}"),
        proptest::collection::btree_map(
            prop_oneof!["[a-z0-9]{1,10}", Just("data".to_string())],
            ".{0,16}",
            0..3,
        ),
        data,
    )
        .prop_map(
            |(id, source, ty, subject, time, schema, extensions, data)| {
                let mut builder = EventBuilderV10::new().id(id).source(source).ty(ty);
                if let Some(subject) = subject {
                    builder = builder.subject(subject);
                }
                if let Some((secs, nanos)) = time {
                    builder = builder.time(chrono::DateTime::from_timestamp(secs, nanos).unwrap());
                }
                let mut event = builder.build().unwrap();
                if let Some(schema) =
                    schema.and_then(|s| url::Url::parse(&format!("proto:{s}")).ok())
                {
                    event.set_dataschema(Some(schema));
                }
                for (name, value) in extensions {
                    if !NOT_EXTENSIONS.contains(&name.as_str()) {
                        event.set_extension(&name, value);
                    }
                }
                if let Some((ct, data)) = data {
                    event.set_datacontenttype(Some(ct));
                    event.set_data_unchecked(data);
                }
                event
            },
        )
}

/// Hex digits, signs, separators and anything else.
fn escape_char() -> impl Strategy<Value = char> {
    prop_oneof![
        prop::sample::select(vec!['0', '9', 'a', 'F', 'g', '+', '-', ' ', '%', '"']),
        any::<char>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Binary mode (and whatever content type): decode or a named refusal.
    #[test]
    fn fuzz_http_decode_arbitrary_headers_and_body(headers in headers(), body in body()) {
        match from_http(&headers, &body) {
            Ok(event) => check_event(&event)?,
            Err(e) => check_error(&e)?,
        }
    }

    /// Structured mode: any body under `application/cloudevents+json`.
    #[test]
    fn fuzz_http_decode_structured_arbitrary_body(
        body in body(),
        suffix in prop::sample::select(vec!["", "; charset=utf-8", "; x"]),
    ) {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(&format!("{STRUCTURED_CONTENT_TYPE}{suffix}")).unwrap(),
        );
        match from_http(&headers, &body) {
            Ok(event) => check_event(&event)?,
            Err(e) => check_error(&e)?,
        }
    }

    /// encode → decode is the identity, binary and structured.
    #[test]
    fn fuzz_http_round_trip(event in event()) {
        let (headers, body) = to_http(&event);
        prop_assert_eq!(&from_http(&headers, &body).unwrap(), &event);
        let json = to_structured_json(&event).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(STRUCTURED_CONTENT_TYPE));
        prop_assert_eq!(&from_http(&headers, &json).unwrap(), &event);
    }

    /// Header values: percent-encoding decodes back to the same text, and
    /// decoding any text is a value or a reason, never a panic.
    #[test]
    fn fuzz_header_value_codec(text in ".{0,32}", raw in "[ -~]{0,32}") {
        let encoded = percent_encode(&text);
        prop_assert!(encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        prop_assert_eq!(decode_header_value(&encoded).unwrap(), text);
        if let Err(reason) = decode_header_value(&raw) {
            prop_assert!(!reason.is_empty());
        }
    }

    /// A percent escape is `%` and exactly two hex digits, nothing else.
    #[test]
    fn fuzz_percent_escape_is_two_hex_digits(a in escape_char(), b in escape_char()) {
        let raw = format!("x%{a}{b}");
        let hex = a.is_ascii_hexdigit() && b.is_ascii_hexdigit();
        match decode_header_value(&raw) {
            Ok(_) => prop_assert!(hex, "accepted {:?}", raw),
            // A byte of 0x80 or more alone is not UTF-8: refused for that.
            Err(reason) if hex => prop_assert!(reason.contains("UTF-8"), "{:?}: {}", raw, reason),
            Err(reason) => prop_assert!(reason.contains("percent escape"), "{:?}: {}", raw, reason),
        }
    }
}

/// Found by `fuzz_percent_escape_is_two_hex_digits`: `u8::from_str_radix`
/// takes a sign, so `%+1` decoded as byte 1 instead of being refused.
#[test]
fn a_signed_percent_escape_is_refused() {
    let err = decode_header_value("a%+1").expect_err("refused");
    assert!(err.contains("%+1"), "{err}");
    let mut headers = HeaderMap::new();
    for (n, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "x"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("ce-subject", "pod%+1"),
    ] {
        headers.insert(n, HeaderValue::from_static(v));
    }
    let err = from_http(&headers, b"").expect_err("refused");
    assert!(err.to_string().contains("subject"), "{err}");
}

/// Found by `fuzz_http_round_trip`: a `ce-data` header became an extension
/// named `data`, and the event could not be written as structured JSON and
/// read back ("both data and data_base64"); it is refused, by name.
#[test]
fn an_extension_named_data_is_refused() {
    let mut headers = HeaderMap::new();
    for (n, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "x"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("ce-data", "oops"),
    ] {
        headers.insert(n, HeaderValue::from_static(v));
    }
    match from_http(&headers, b"payload") {
        Err(e @ BindingError::Attribute { .. }) => assert!(e.to_string().contains("data"), "{e}"),
        other => panic!("expected a refusal naming data, got {other:?}"),
    }
}

/// A bare `ce-` header (`fuzz_http_decode_arbitrary_headers_and_body`
/// sends them) was refused as "attribute : ...", naming nothing.
#[test]
fn an_empty_attribute_name_is_named() {
    let mut headers = HeaderMap::new();
    for (n, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "x"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
        ("ce-", "v"),
    ] {
        headers.insert(n, HeaderValue::from_static(v));
    }
    let err = from_http(&headers, b"").expect_err("refused");
    assert!(err.to_string().starts_with("attribute \"\": "), "{err}");
}

/// Found by `fuzz_http_decode_structured_arbitrary_body`: structured mode
/// took what binary mode refuses (an extension named `Bad-Ext`, an empty
/// id, source or type, spec version 0.3), so the same event was accepted or
/// refused depending on its mode.
#[test]
fn structured_mode_is_checked_like_binary_mode() {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
    );
    let base = serde_json::json!({"specversion": "1.0", "id": "x", "source": "/s", "type": "t"});
    from_http(&headers, &serde_json::to_vec(&base).unwrap()).expect("valid");
    for (member, value, named) in [
        ("Bad-Ext", serde_json::json!(1), "Bad-Ext"),
        ("id", serde_json::json!(""), "id"),
        ("source", serde_json::json!(""), "source"),
        ("type", serde_json::json!(""), "type"),
        ("specversion", serde_json::json!("0.3"), "0.3"),
    ] {
        let mut event = base.clone();
        event[member] = value;
        let err = from_http(&headers, &serde_json::to_vec(&event).unwrap()).expect_err(member);
        assert!(err.to_string().contains(named), "{member}: {err}");
    }
}
