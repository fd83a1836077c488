//! `dataschema` ↔ message registry.

use prost::Name;

use crate::v1;

/// `datacontenttype` of events whose data is a protobuf message.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/protobuf";

/// Prefix of the `dataschema` URI naming a payload message.
pub const SCHEMA_PREFIX: &str = "proto:";

/// Errors converting payloads. All are terminal: the same bytes fail again.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Terminal: the `dataschema` names no message this build knows.
    #[error("unknown dataschema {0:?}: expected proto:tidewatch.v1.<Message>")]
    UnknownSchema(String),
    /// Terminal: the bytes are not a valid encoding of the message.
    #[error("data is not a valid {message}: {source}")]
    Decode {
        message: &'static str,
        source: prost::DecodeError,
    },
    /// Terminal: the JSON does not fit the message.
    #[error("JSON does not fit {message}: {source}")]
    Json {
        message: &'static str,
        source: serde_json::Error,
    },
}

/// The `dataschema` URI for message `M`.
pub fn schema_url<M: Name>() -> String {
    format!("{SCHEMA_PREFIX}{}", M::full_name())
}

macro_rules! registry {
    ($($msg:ident),* $(,)?) => {
        /// Full names of every payload message, for help texts and tests.
        pub const MESSAGES: &[&str] = &[$(concat!("tidewatch.v1.", stringify!($msg))),*];

        /// Decode `data` named by `dataschema` and render it as JSON.
        pub fn decode_json(dataschema: &str, data: &[u8]) -> Result<serde_json::Value, SchemaError> {
            let name = dataschema.strip_prefix(SCHEMA_PREFIX).unwrap_or(dataschema);
            $(
                if name == <v1::$msg as Name>::full_name() {
                    let message = <v1::$msg as prost::Message>::decode(data).map_err(|source| {
                        SchemaError::Decode { message: stringify!($msg), source }
                    })?;
                    return serde_json::to_value(&message).map_err(|source| SchemaError::Json {
                        message: stringify!($msg),
                        source,
                    });
                }
            )*
            Err(SchemaError::UnknownSchema(dataschema.to_string()))
        }

        /// Whether `data` is a valid encoding of the message `dataschema`
        /// names (decoded and dropped: for a consumer that must refuse a
        /// malformed payload before passing it on).
        pub fn check(dataschema: &str, data: &[u8]) -> Result<(), SchemaError> {
            let name = dataschema.strip_prefix(SCHEMA_PREFIX).unwrap_or(dataschema);
            $(
                if name == <v1::$msg as Name>::full_name() {
                    return <v1::$msg as prost::Message>::decode(data)
                        .map(drop)
                        .map_err(|source| SchemaError::Decode { message: stringify!($msg), source });
                }
            )*
            Err(SchemaError::UnknownSchema(dataschema.to_string()))
        }

        /// Build the protobuf encoding of the message named by `dataschema` from JSON.
        pub fn encode_json(dataschema: &str, json: serde_json::Value) -> Result<Vec<u8>, SchemaError> {
            let name = dataschema.strip_prefix(SCHEMA_PREFIX).unwrap_or(dataschema);
            $(
                if name == <v1::$msg as Name>::full_name() {
                    let message: v1::$msg = serde_json::from_value(json).map_err(|source| {
                        SchemaError::Json { message: stringify!($msg), source }
                    })?;
                    return Ok(prost::Message::encode_to_vec(&message));
                }
            )*
            Err(SchemaError::UnknownSchema(dataschema.to_string()))
        }
    };
}

registry!(
    ProcessExec,
    ProcessExit,
    OomKill,
    TcpConnection,
    ContainerRestart,
    UnitStateChange,
    JournalEntry,
    PodMetadata,
    Insight,
    CollectorDrops,
    PodChange,
    NodeConditionChange,
    RolloutChange,
    EndpointsChange,
    KubeEvent,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_what_does_not_decode() {
        let schema = schema_url::<v1::OomKill>();
        assert!(
            check(&schema, &[]).is_ok(),
            "empty is a valid (default) message"
        );
        assert!(matches!(
            check(&schema, &[0xff, 0xff, 0xff, 0x0f]),
            Err(SchemaError::Decode { .. })
        ));
        assert!(matches!(
            check("proto:tidewatch.v1.Nope", &[]),
            Err(SchemaError::UnknownSchema(_))
        ));
    }

    #[test]
    fn json_round_trip_through_protobuf() {
        let schema = schema_url::<v1::ContainerRestart>();
        assert_eq!(schema, "proto:tidewatch.v1.ContainerRestart");
        let json = serde_json::json!({"namespace": "default", "pod": "web-1", "exitCode": 137, "reason": "OOMKilled"});
        let bytes = encode_json(&schema, json).expect("encodes");
        let back = decode_json(&schema, &bytes).expect("decodes");
        assert_eq!(back["exitCode"], 137);
        assert_eq!(back["reason"], "OOMKilled");
        assert_eq!(back["pod"], "web-1");
    }

    #[test]
    fn unknown_schema_and_bad_bytes_are_named() {
        let err = decode_json("proto:tidewatch.v1.Nope", b"").expect_err("unknown");
        assert!(err.to_string().contains("tidewatch.v1.Nope"), "{err}");
        let err =
            decode_json("proto:tidewatch.v1.Insight", &[0xff, 0xff, 0xff]).expect_err("garbage");
        assert!(err.to_string().contains("Insight"), "{err}");
        let err = encode_json(
            "proto:tidewatch.v1.Insight",
            serde_json::json!({"confidence": "high"}),
        )
        .expect_err("wrong type");
        assert!(err.to_string().contains("Insight"), "{err}");
    }

    #[test]
    fn every_message_is_registered() {
        for name in MESSAGES {
            let schema = format!("{SCHEMA_PREFIX}{name}");
            decode_json(&schema, &[]).expect("empty bytes decode to the default message");
        }
    }
}
