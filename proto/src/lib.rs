//! Protobuf types shared by every Tidewatch part.
//!
//! - [`cloudevents`]: the CloudEvents protobuf format (`io.cloudevents.v1`),
//!   for carrying a whole event as one blob.
//! - [`v1`]: Tidewatch payload messages (`tidewatch.v1`), carried as event
//!   `data` with `datacontenttype: application/protobuf` and
//!   `dataschema: proto:<message name>`.
//! - [`schema`]: the registry that maps a `dataschema` to its message, so
//!   tools can render any payload as JSON and build one from JSON.

pub mod cloudevents {
    include!(concat!(env!("OUT_DIR"), "/io.cloudevents.v1.rs"));
}

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tidewatch.v1.rs"));
}

pub mod schema;

#[cfg(test)]
mod fuzz_tests;

pub use schema::{PROTOBUF_CONTENT_TYPE, SchemaError, check, decode_json, encode_json, schema_url};
