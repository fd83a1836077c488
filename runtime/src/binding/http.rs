//! CloudEvents ↔ HTTP (Knative): binary and structured JSON in, binary out.
//!
//! Structured mode is the SDK's JSON event format. Binary mode uses the
//! shared percent-encoding codec: the SDK's own HTTP serializer writes header
//! values verbatim, which breaks on non-ASCII subjects and is not what the
//! HTTP binding asks for. `datacontenttype` travels as `Content-Type`.

use bytes::Bytes;
use cloudevents::{AttributesReader, Data, Event};
use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
use http_body_util::Full;

use super::{
    BindingError, PREFIX, binary_event, check_structured, decode_header_value, percent_encode,
};

/// Content type of a structured-mode JSON CloudEvent.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Decode an HTTP request or response (headers and whole body) into an event.
pub fn from_http(headers: &HeaderMap, body: &[u8]) -> Result<Event, BindingError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(ct) = &content_type {
        let lower = ct.to_ascii_lowercase();
        if lower.starts_with("application/cloudevents-batch") {
            return Err(BindingError::Structured(
                "batch mode is not supported; send one event per request".into(),
            ));
        }
        if lower.starts_with(STRUCTURED_CONTENT_TYPE) {
            return serde_json::from_slice::<Event>(body)
                .map_err(|e| BindingError::Structured(e.to_string()))
                .and_then(check_structured);
        }
    }
    let mut attributes = Vec::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix(PREFIX) else {
            continue;
        };
        let raw = value.to_str().map_err(|_| BindingError::Attribute {
            name: attr.to_string(),
            reason: "header value is not visible ASCII; percent-encode it".into(),
        })?;
        let decoded = decode_header_value(raw).map_err(|reason| BindingError::Attribute {
            name: attr.to_string(),
            reason,
        })?;
        attributes.push((attr.to_string(), decoded));
    }
    if let Some(ct) = content_type {
        attributes.retain(|(k, _)| k != "datacontenttype");
        attributes.push(("datacontenttype".to_string(), ct));
    }
    binary_event(&attributes, body)
}

/// Binary-mode headers and body for `event`.
pub fn to_http(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.iter() {
        if name == "datacontenttype" {
            continue;
        }
        let Ok(header_name) = http::HeaderName::try_from(format!("{PREFIX}{name}")) else {
            continue;
        };
        // Percent-encoded values are printable ASCII, always valid header values.
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&value.to_string())) {
            headers.insert(header_name, v);
        }
    }
    if let Some(ct) = event
        .datacontenttype()
        .and_then(|ct| HeaderValue::from_str(ct).ok())
    {
        headers.insert(CONTENT_TYPE, ct);
    }
    let body = match event.data() {
        Some(Data::Binary(b)) => Bytes::copy_from_slice(b),
        Some(Data::String(s)) => Bytes::copy_from_slice(s.as_bytes()),
        Some(Data::Json(j)) => Bytes::from(serde_json::to_vec(j).unwrap_or_default()),
        None => Bytes::new(),
    };
    (headers, body)
}

/// A binary-mode HTTP response carrying `event`.
pub fn to_response(event: &Event) -> http::Response<Full<Bytes>> {
    let (headers, body) = to_http(event);
    let mut response = http::Response::new(Full::new(body));
    *response.headers_mut() = headers;
    response
}

/// A binary-mode POST of `event` to `uri` (for `K_SINK`).
pub fn to_request(event: &Event, uri: &http::Uri) -> http::Request<Full<Bytes>> {
    let (headers, body) = to_http(event);
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers;
    request
}

/// The event as structured-mode JSON (webhooks, humans).
pub fn to_structured_json(event: &Event) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn sample() -> Event {
        let mut event = EventBuilderV10::new()
            .id("h-1")
            .source("/tidewatch/ebpf/node-1")
            .ty("dev.tidewatch.kernel.process.exec")
            .subject("pod/ns/ünï code")
            .data("application/protobuf", vec![0u8, 1, 2, 250])
            .build()
            .expect("event");
        event.set_extension(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        event
    }

    #[test]
    fn binary_round_trip() {
        let event = sample();
        let (headers, body) = to_http(&event);
        assert_eq!(
            headers.get(CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(&b"application/protobuf"[..])
        );
        assert!(headers.get("ce-datacontenttype").is_none());
        assert_eq!(from_http(&headers, &body).expect("decodes"), event);
    }

    #[test]
    fn structured_round_trip() {
        let event = sample();
        let json = to_structured_json(&event).expect("json");
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
        );
        assert_eq!(from_http(&headers, &json).expect("decodes"), event);
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let err = from_http(&HeaderMap::new(), b"{}").expect_err("no attributes");
        assert!(err.to_string().contains("ce-specversion"), "{err}");
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents-batch+json"),
        );
        assert!(
            from_http(&headers, b"[]")
                .expect_err("batch")
                .to_string()
                .contains("batch")
        );
        let mut headers = HeaderMap::new();
        headers.insert("ce-specversion", HeaderValue::from_static("1.0"));
        headers.insert("ce-id", HeaderValue::from_static("x"));
        headers.insert("ce-type", HeaderValue::from_static("t"));
        let err = from_http(&headers, b"").expect_err("no source");
        assert!(err.to_string().contains("source"), "{err}");
    }
}
