//! CloudEvents protocol bindings: NATS ([`nats`]) and HTTP ([`http`]).
//!
//! Both bindings' binary modes carry attributes as `ce-` headers whose values
//! are percent-encoded (NATS binding 1.0.3 §3.1.3.2, HTTP binding §3.1.3.2).
//! The codec for those values and the checks on decoded attributes live here,
//! once, for both.

pub mod http;
pub mod nats;

#[cfg(test)]
mod fuzz_tests;

use cloudevents::event::{ExtensionValue, SpecVersion};
use cloudevents::{AttributesWriter, Data, Event, EventBuilder, EventBuilderV10};

pub(crate) const PREFIX: &str = "ce-";

/// Why a message is not a CloudEvent. All terminal: the same bytes fail again,
/// so over NATS they go to the dead-letter stream and over HTTP get a 400.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// Terminal: no `ce-specversion` header and no structured content type.
    #[error(
        "not a CloudEvent: no ce-specversion header and Content-Type is not application/cloudevents"
    )]
    NotACloudEvent,
    /// Terminal: a spec version other than 1.0.
    #[error("unsupported ce-specversion {0:?} (only 1.0 is supported)")]
    SpecVersion(String),
    /// Terminal: a required attribute is absent.
    #[error("missing required attribute {0}")]
    Missing(&'static str),
    /// Terminal: an attribute value could not be decoded or parsed.
    /// Quoted, so an empty name (a bare `ce-` header) still reads as one.
    #[error("attribute {name:?}: {reason}")]
    Attribute { name: String, reason: String },
    /// Terminal: a structured-mode payload is not a valid JSON CloudEvent.
    #[error("structured CloudEvent is not valid JSON event format: {0}")]
    Structured(String),
    /// Terminal: JSON data declared by datacontenttype is not valid JSON.
    #[error("data is declared {content_type} but is not valid JSON: {reason}")]
    Data {
        content_type: String,
        reason: String,
    },
}

/// Build an event from decoded binary-mode attributes and a body, checking
/// what the SDK's builder does not (spec version, required attributes,
/// extension names, JSON data).
pub(crate) fn binary_event<N: AsRef<str>, V: AsRef<str>>(
    attributes: &[(N, V)],
    payload: &[u8],
) -> Result<Event, BindingError> {
    let get = |n: &str| {
        attributes
            .iter()
            .find(|(k, _)| k.as_ref() == n)
            .map(|(_, v)| v.as_ref())
    };
    let spec = get("specversion").ok_or(BindingError::NotACloudEvent)?;
    if SpecVersion::try_from(spec).ok() != Some(SpecVersion::V10) {
        return Err(BindingError::SpecVersion(spec.to_string()));
    }
    let id = get("id")
        .filter(|v| !v.is_empty())
        .ok_or(BindingError::Missing("id"))?;
    let source = get("source")
        .filter(|v| !v.is_empty())
        .ok_or(BindingError::Missing("source"))?;
    let ty = get("type")
        .filter(|v| !v.is_empty())
        .ok_or(BindingError::Missing("type"))?;
    let mut event = EventBuilderV10::new()
        .id(id)
        .source(source)
        .ty(ty)
        .build()
        .map_err(|e| BindingError::Attribute {
            name: "source".into(),
            reason: e.to_string(),
        })?;
    let mut content_type = None;
    for (name, value) in attributes {
        let value = value.as_ref();
        match name.as_ref() {
            "specversion" | "id" | "source" | "type" => {}
            "subject" => {
                event.set_subject(Some(value));
            }
            "time" => {
                let time = chrono::DateTime::parse_from_rfc3339(value).map_err(|e| {
                    BindingError::Attribute {
                        name: "time".into(),
                        reason: e.to_string(),
                    }
                })?;
                event.set_time(Some(time.with_timezone(&chrono::Utc)));
            }
            "datacontenttype" => content_type = Some(value.to_string()),
            "dataschema" => {
                event.set_dataschema(Some(schema_url(value)?));
            }
            extension => {
                if !valid_extension_name(extension) {
                    return Err(BindingError::Attribute {
                        name: extension.to_string(),
                        reason: "extension names are lowercase letters and digits".into(),
                    });
                }
                // The JSON format reserves it: such an event could not be
                // written structured (webhooks, `tail`) or read back.
                if extension == "data" {
                    return Err(BindingError::Attribute {
                        name: extension.to_string(),
                        reason:
                            "\"data\" is reserved for the event data; it cannot be an extension"
                                .into(),
                    });
                }
                event.set_extension(extension, ExtensionValue::String(value.to_string()));
            }
        }
    }
    if !payload.is_empty() || content_type.is_some() {
        let is_json = content_type.as_deref().is_some_and(is_json_content_type);
        let data = if is_json {
            Data::Json(
                serde_json::from_slice(payload).map_err(|e| BindingError::Data {
                    content_type: content_type.clone().unwrap_or_default(),
                    reason: e.to_string(),
                })?,
            )
        } else {
            Data::Binary(payload.to_vec())
        };
        event.set_datacontenttype(content_type);
        event.set_data_unchecked(data);
    }
    Ok(event)
}

/// The checks [`binary_event`] makes, for an event the SDK decoded from
/// structured JSON (which takes any spec version, empty required
/// attributes and any extension name).
pub(crate) fn check_structured(event: Event) -> Result<Event, BindingError> {
    use cloudevents::AttributesReader;
    if event.specversion() != SpecVersion::V10 {
        return Err(BindingError::SpecVersion(event.specversion().to_string()));
    }
    for (name, value) in [
        ("id", event.id()),
        ("source", event.source().as_str()),
        ("type", event.ty()),
    ] {
        if value.is_empty() {
            return Err(BindingError::Missing(name));
        }
    }
    if let Some((name, _)) = event
        .iter_extensions()
        .find(|(name, _)| !valid_extension_name(name))
    {
        return Err(BindingError::Attribute {
            name: name.to_string(),
            reason: "extension names are lowercase letters and digits".into(),
        });
    }
    Ok(event)
}

/// `dataschema` as a URL. Every event of a type carries the same few
/// schemas, so parsed ones are remembered per thread (bounded) instead of
/// being parsed again for each event.
fn schema_url(value: &str) -> Result<url::Url, BindingError> {
    use std::cell::RefCell;
    const REMEMBERED: usize = 64;
    thread_local! {
        static PARSED: RefCell<Vec<(String, url::Url)>> = const { RefCell::new(Vec::new()) };
    }
    if let Some(url) = PARSED.with_borrow(|p| {
        p.iter()
            .find(|(raw, _)| raw == value)
            .map(|(_, url)| url.clone())
    }) {
        return Ok(url);
    }
    let url = url::Url::parse(value).map_err(|e| BindingError::Attribute {
        name: "dataschema".into(),
        reason: e.to_string(),
    })?;
    PARSED.with_borrow_mut(|p| {
        if p.len() >= REMEMBERED {
            p.remove(0);
        }
        p.push((value.to_string(), url.clone()));
    });
    Ok(url)
}

/// Whether a media type carries JSON (`application/json`, `text/json`, `+json` suffixes).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

pub(crate) fn valid_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Percent-encode space, `"`, `%` and everything outside printable ASCII
/// (binding §3.1.3.2), byte by byte over the UTF-8 encoding. Borrows when
/// nothing needs encoding, which is the common case.
pub fn percent_encode(value: &str) -> std::borrow::Cow<'_, str> {
    let safe = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    if value.bytes().all(safe) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for &b in value.as_bytes() {
        if safe(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0x0f)]));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Unquote an RFC 7230 quoted-string (older senders), then percent-decode once.
pub fn decode_header_value(raw: &str) -> Result<String, String> {
    decode_header_value_cow(raw).map(std::borrow::Cow::into_owned)
}

/// [`decode_header_value`], borrowing when there is nothing to decode (the
/// common case: most values need no escapes).
pub(crate) fn decode_header_value_cow(raw: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    let trimmed = raw.trim();
    if !trimmed.starts_with('"') && !trimmed.contains('%') {
        return Ok(std::borrow::Cow::Borrowed(trimmed));
    }
    let unquoted = if trimmed.len() >= 2 && trimmed.starts_with('"') && trimmed.ends_with('"') {
        let mut out = String::with_capacity(trimmed.len());
        let mut chars = trimmed[1..trimmed.len() - 1].chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                out.push(chars.next().ok_or("quoted value ends with a backslash")?);
            } else {
                out.push(c);
            }
        }
        out
    } else {
        trimmed.to_string()
    };
    let bytes = unquoted.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("truncated percent escape")?;
            // Two hex digits exactly: `from_str_radix` alone also takes "+1".
            let hex = std::str::from_utf8(hex)
                .ok()
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| {
                    format!(
                        "invalid percent escape %{}",
                        String::from_utf8_lossy(&bytes[i + 1..(i + 3).min(bytes.len())])
                    )
                })?;
            decoded.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| format!("invalid percent escape %{hex}"))?,
            );
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded)
        .map(std::borrow::Cow::Owned)
        .map_err(|_| "percent-decoded value is not UTF-8".to_string())
}
