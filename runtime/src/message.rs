//! The message the publisher sends and the outage spool stores: subject,
//! `Nats-Msg-Id`, NATS headers and payload, and its byte encoding (the body
//! of a spool frame).

use async_nats::HeaderMap;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};

/// Version byte of the encoding; a record of another version is refused.
const RECORD_VERSION: u8 = 1;

/// One spooled message: what [`Publisher::send_raw`](crate::publisher::Publisher::send_raw) takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub subject: String,
    /// The event id, sent as `Nats-Msg-Id` so a replay deduplicates.
    pub msg_id: String,
    /// NATS headers in order, a name once per value.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Record {
    /// The record for publishing `event` to `subject` (binary mode, as
    /// [`Publisher::send`](crate::publisher::Publisher::send) encodes it).
    pub fn from_event(subject: impl Into<String>, event: &Event) -> Record {
        let (headers, payload) = crate::binding::nats::to_nats(event);
        Record::from_nats(subject, event.id(), &headers, payload)
    }

    /// A record from an already-encoded message.
    pub fn from_nats(
        subject: impl Into<String>,
        msg_id: impl Into<String>,
        headers: &HeaderMap,
        payload: Bytes,
    ) -> Record {
        let mut flat = Vec::new();
        for (name, values) in headers.iter() {
            for value in values {
                flat.push((
                    AsRef::<str>::as_ref(name).to_string(),
                    value.as_str().to_string(),
                ));
            }
        }
        Record {
            subject: subject.into(),
            msg_id: msg_id.into(),
            headers: flat,
            payload,
        }
    }

    /// The headers as a NATS header map (for `send_raw`).
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            map.append(name.as_str(), value.as_str());
        }
        map
    }

    /// The record's body bytes (without the frame header).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body_len());
        self.encode_into(&mut out);
        out
    }

    pub(crate) fn body_len(&self) -> usize {
        1 + 16
            + self.subject.len()
            + self.msg_id.len()
            + self.payload.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
    }

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(RECORD_VERSION);
        put_bytes(out, self.subject.as_bytes());
        put_bytes(out, self.msg_id.as_bytes());
        put_u32(out, self.headers.len());
        for (name, value) in &self.headers {
            put_bytes(out, name.as_bytes());
            put_bytes(out, value.as_bytes());
        }
        put_bytes(out, &self.payload);
    }

    /// Decode a body; `None` if it is not one this version wrote.
    pub fn decode(body: &[u8]) -> Option<Record> {
        let (&version, mut rest) = body.split_first()?;
        if version != RECORD_VERSION {
            return None;
        }
        let subject = take_string(&mut rest)?;
        let msg_id = take_string(&mut rest)?;
        let count = take_u32(&mut rest)? as usize;
        // Each header needs at least 8 bytes: refuse absurd counts early.
        if count > rest.len() / 8 {
            return None;
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            headers.push((take_string(&mut rest)?, take_string(&mut rest)?));
        }
        let payload = Bytes::copy_from_slice(take_bytes(&mut rest)?);
        rest.is_empty().then_some(Record {
            subject,
            msg_id,
            headers,
            payload,
        })
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len());
    out.extend_from_slice(bytes);
}
fn take_u32(rest: &mut &[u8]) -> Option<u32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(u32::from_le_bytes(*head))
}
fn take_bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = take_u32(rest)? as usize;
    if rest.len() < len {
        return None;
    }
    let (bytes, tail) = rest.split_at(len);
    *rest = tail;
    Some(bytes)
}
fn take_string(rest: &mut &[u8]) -> Option<String> {
    String::from_utf8(take_bytes(rest)?.to_vec()).ok()
}
