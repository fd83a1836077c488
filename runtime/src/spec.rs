//! Functions as data: each function crate's `function.toml`, parsed and
//! checked here. A function binary embeds its own file
//! ([`FunctionSpec::from_toml`]); the CLI embeds every
//! `functions/*/function.toml` at build time and reads them with
//! [`function_list`]; tests read the repository's files with [`read_dir`].
//! The runtime itself holds no list, so adding a function recompiles
//! neither it nor the other functions.
//!
//! Parsed strings are leaked to `'static`: a spec lives as long as the
//! process, and the runtime already hands `&'static str` names to metrics,
//! the transports and each handler's [`Context`](crate::Context). A process
//! parses each file once, so the leak is a few hundred bytes, and the specs
//! keep the shape the renderer, provisioning and `tidewatch up` use.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topology::{self, ConsumerSpec, FunctionSpec, ScaleSpec};

/// The file every function crate carries at its root.
pub const FILE_NAME: &str = "function.toml";

/// Longest function name: `tidewatch-<name>` must stay a valid Kubernetes
/// object name (63 characters) with room for generated suffixes.
const MAX_NAME_LEN: usize = 40;

/// Why a function spec was refused. All terminal: the file on disk (or the
/// text compiled into a binary) has to change.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Terminal: not TOML, or a field is missing, unknown or of the wrong type.
    #[error("{file}: {reason}")]
    Parse { file: String, reason: String },
    /// Terminal: a field's value is out of range or names something unknown.
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: String,
        field: &'static str,
        reason: String,
    },
    /// Terminal: two files name the same function (and so the same durable consumer).
    #[error("function {name:?} is in both {first} and {second}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    /// Terminal: a spec file or the functions directory could not be read.
    #[error("read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Terminal: a spec could not be written as TOML.
    #[error("write {file}: {reason}")]
    Write { file: String, reason: String },
}

/// `functions/<name>/function.toml`: one function's place in the pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionFile {
    /// Function name; also its durable consumer, NATS user and Kubernetes
    /// objects (`tidewatch-<name>`): lowercase letters, digits and dashes,
    /// starting with a letter.
    pub name: String,
    /// Binary its pods and `tidewatch up` run (`tidewatch-<name>`; an export
    /// sink group reuses `tidewatch-export`).
    pub binary: String,
    /// Key of the stream its durable consumer reads: `raw`, `enriched`,
    /// `insights` or `dlq`.
    pub reads: String,
    /// Key of the stream its outputs go to; absent when it emits nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes: Option<String>,
    /// Event type patterns it handles (`*` matches any run of characters);
    /// absent or empty: everything it reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// Handlers a replica runs at once in JetStream mode, and so the messages
    /// it asks for per pull (`TIDEWATCH_CONCURRENCY` overrides).
    pub concurrency: usize,
    /// How it scales: KEDA ScaledObject, Knative annotations, `tidewatch up`.
    pub scale: ScaleSpec,
    /// Its durable pull consumer (named after the function).
    pub consumer: ConsumerFile,
}

/// `[consumer]` of a function.toml.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerFile {
    /// What the consumer is for, as `nats consumer info` shows it.
    pub description: String,
    /// Deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// Seconds a delivered message may stay un-acked before redelivery.
    pub ack_wait_secs: u64,
    /// Messages delivered but not yet acked, across all replicas.
    pub max_ack_pending: i64,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A stream key the topology knows, as its `'static` key.
fn stream_key(key: &str) -> Option<&'static str> {
    topology::STREAMS
        .iter()
        .find(|s| s.key == key)
        .map(|s| s.key)
}

/// Why `name` cannot name a function, if it cannot.
pub fn name_problem(name: &str) -> Option<String> {
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !ok {
        return Some(format!(
            "{name:?}: use lowercase letters, digits and dashes, starting with a letter"
        ));
    }
    (name.len() > MAX_NAME_LEN).then(|| format!("{name:?}: at most {MAX_NAME_LEN} characters"))
}

/// Why `pattern` cannot be an event type pattern, if it cannot. Only the
/// characters CloudEvent type names use (reverse DNS) and `*`: the pattern
/// ends up in TOML, YAML and generated code, where a quote or a line break
/// would change what they say.
pub fn type_pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("an empty pattern matches nothing; use \"*\" for everything".to_string());
    }
    pattern
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ".-_*:/".contains(*c)))
        .map(|c| {
            format!(
                "{pattern:?} contains {c:?}; use letters, digits, '.', '-', '_', ':', '/' and '*'"
            )
        })
}

impl FunctionFile {
    /// Parse one file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<FunctionFile, SpecError> {
        toml::from_str(text).map_err(|e| SpecError::Parse {
            file: file.to_string(),
            reason: e.to_string(),
        })
    }

    /// The file's text.
    pub fn to_toml(&self, file: &str) -> Result<String, SpecError> {
        toml::to_string(self).map_err(|e| SpecError::Write {
            file: file.to_string(),
            reason: e.to_string(),
        })
    }

    /// Every field in range and every name known.
    pub fn check(&self, file: &str) -> Result<(), SpecError> {
        let invalid = |field: &'static str, reason: String| SpecError::Invalid {
            file: file.to_string(),
            field,
            reason,
        };
        if let Some(problem) = name_problem(&self.name) {
            return Err(invalid("name", problem));
        }
        if self.binary.is_empty()
            || !self
                .binary
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return Err(invalid(
                "binary",
                format!(
                    "{:?}: a binary name is lowercase letters, digits, '-' and '_'",
                    self.binary
                ),
            ));
        }
        let streams = || {
            topology::STREAMS
                .iter()
                .map(|s| s.key)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if stream_key(&self.reads).is_none() {
            return Err(invalid(
                "reads",
                format!("no stream {:?}; use one of {}", self.reads, streams()),
            ));
        }
        if let Some(writes) = &self.writes {
            if stream_key(writes).is_none() {
                return Err(invalid(
                    "writes",
                    format!("no stream {writes:?}; use one of {}", streams()),
                ));
            }
            // Its outputs would come back to it: an endless loop.
            if *writes == self.reads {
                return Err(invalid(
                    "writes",
                    format!("{writes:?} is the stream it reads"),
                ));
            }
        }
        if let Some(problem) = self.types.iter().find_map(|t| type_pattern_problem(t)) {
            return Err(invalid("types", problem));
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency", "at least 1".to_string()));
        }
        let scale = &self.scale;
        if scale.max_replicas == 0 || scale.min_replicas > scale.max_replicas {
            return Err(invalid(
                "scale",
                format!(
                    "min_replicas {} and max_replicas {}: need 0 <= min <= max and max >= 1",
                    scale.min_replicas, scale.max_replicas
                ),
            ));
        }
        // KEDA divides the lag by it; Knative's target is this concurrency.
        if scale.lag_threshold == 0 || scale.container_concurrency == 0 {
            return Err(invalid(
                "scale",
                "lag_threshold and container_concurrency must be at least 1".to_string(),
            ));
        }
        let consumer = &self.consumer;
        if consumer.description.trim().is_empty() || consumer.description.contains('\n') {
            return Err(invalid(
                "consumer.description",
                "one non-empty line".to_string(),
            ));
        }
        if consumer.max_deliver < 1 || consumer.ack_wait_secs == 0 || consumer.max_ack_pending < 1 {
            return Err(invalid(
                "consumer",
                "max_deliver, ack_wait_secs and max_ack_pending must be at least 1".to_string(),
            ));
        }
        Ok(())
    }

    /// The checked spec, its strings leaked to `'static` (see the module docs).
    pub fn into_spec(self, file: &str) -> Result<FunctionSpec, SpecError> {
        self.check(file)?;
        let name = leak(self.name);
        // Checked above: both keys name streams.
        let stream = stream_key(&self.reads).unwrap_or_default();
        let output_stream = self.writes.as_deref().and_then(stream_key);
        let types: Vec<&'static str> = self.types.into_iter().map(leak).collect();
        Ok(FunctionSpec {
            name,
            consumer: ConsumerSpec {
                durable: name,
                stream,
                description: leak(self.consumer.description),
                max_deliver: self.consumer.max_deliver,
                ack_wait: Duration::from_secs(self.consumer.ack_wait_secs),
                max_ack_pending: self.consumer.max_ack_pending,
                types: types.clone(),
            },
            output_stream,
            binary: leak(self.binary),
            types,
            scale: self.scale,
            concurrency: self.concurrency,
        })
    }
}

impl FunctionSpec {
    /// A function's own spec: the text of its `function.toml`, which its
    /// binary embeds (`include_str!("../function.toml")`).
    pub fn from_toml(text: &str) -> Result<FunctionSpec, SpecError> {
        FunctionFile::parse(text, FILE_NAME)?.into_spec(FILE_NAME)
    }
}

/// Every function, from (file name, text) pairs: each checked, no name
/// twice, in pipeline order (by the position of the stream each reads in
/// [`topology::STREAMS`], then by name), which is the order they are
/// rendered, provisioned and started in.
pub fn function_list(files: &[(&str, &str)]) -> Result<Vec<FunctionSpec>, SpecError> {
    let mut specs: Vec<(FunctionSpec, &str)> = Vec::new();
    for (file, text) in files {
        let spec = FunctionFile::parse(text, file)?.into_spec(file)?;
        if let Some((_, first)) = specs.iter().find(|(s, _)| s.name == spec.name) {
            return Err(SpecError::Duplicate {
                name: spec.name.to_string(),
                first: first.to_string(),
                second: file.to_string(),
            });
        }
        specs.push((spec, file));
    }
    let position = |spec: &FunctionSpec| {
        topology::STREAMS
            .iter()
            .position(|s| s.key == spec.consumer.stream)
    };
    specs.sort_by(|(a, _), (b, _)| (position(a), a.name).cmp(&(position(b), b.name)));
    Ok(specs.into_iter().map(|(spec, _)| spec).collect())
}

/// Every `<dir>/*/function.toml`, as [`function_list`] reads them (tests
/// and `tidewatch new function` read a repository's functions this way).
pub fn read_dir(dir: &Path) -> Result<Vec<FunctionSpec>, SpecError> {
    let read_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| SpecError::Read { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error(dir))? {
        let path = entry.map_err(read_error(dir))?.path().join(FILE_NAME);
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(read_error(&path))?;
            files.push((path.display().to_string(), text));
        }
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(path, text)| (path.as_str(), text.as_str()))
        .collect();
    function_list(&files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIEM: &str = r#"
name = "siem"
binary = "tidewatch-siem"
reads = "insights"
types = ["dev.tidewatch.insight.*"]
concurrency = 8

[scale]
min_replicas = 0
max_replicas = 3
lag_threshold = 100
activation_lag_threshold = 0
container_concurrency = 10

[consumer]
description = "siem: ships insights"
max_deliver = 5
ack_wait_secs = 30
max_ack_pending = 1000
"#;

    fn file() -> FunctionFile {
        FunctionFile::parse(SIEM, "siem").expect("parses")
    }

    #[test]
    fn a_file_becomes_a_spec_with_its_consumer() {
        let spec = FunctionSpec::from_toml(SIEM).expect("valid");
        assert_eq!(spec.name, "siem");
        assert_eq!(spec.consumer.durable, "siem");
        assert_eq!(spec.consumer.stream, "insights");
        assert_eq!(spec.consumer.ack_wait, Duration::from_secs(30));
        assert_eq!(spec.output_stream, None);
        assert!(spec.handles("dev.tidewatch.insight.crash-loop"));
        assert!(!spec.handles("dev.tidewatch.kernel.tcp.reset"));
    }

    #[test]
    fn it_round_trips_through_toml() {
        let text = file().to_toml("siem").expect("writes");
        assert_eq!(FunctionFile::parse(&text, "siem").expect("parses"), file());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let unknown = format!("{SIEM}\nmax_replicas = 3\n");
        assert!(matches!(
            FunctionFile::parse(&unknown, "f"),
            Err(SpecError::Parse { .. })
        ));
        type BreakIt = fn(&mut FunctionFile);
        let cases: [(&str, BreakIt); 9] = [
            ("name", |f| f.name = "Siem".into()),
            ("binary", |f| f.binary = "a b".into()),
            ("reads", |f| f.reads = "nowhere".into()),
            ("writes", |f| f.writes = Some("insights".into())),
            ("types", |f| f.types = vec!["a\"b".into()]),
            ("types", |f| f.types = vec!["a\nb".into()]),
            ("concurrency", |f| f.concurrency = 0),
            ("scale", |f| f.scale.min_replicas = 4),
            ("consumer", |f| f.consumer.max_deliver = 0),
        ];
        for (field, break_it) in cases {
            let mut f = file();
            break_it(&mut f);
            match f.check("f") {
                Err(SpecError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_list_refuses_a_name_twice_and_follows_the_pipeline() {
        assert!(matches!(
            function_list(&[("a", SIEM), ("b", SIEM)]),
            Err(SpecError::Duplicate { .. })
        ));
        let first = SIEM
            .replace("\"siem\"", "\"zeta\"")
            .replace("reads = \"insights\"", "reads = \"raw\"");
        let list = function_list(&[("siem", SIEM), ("zeta", &first)]).expect("valid");
        let names: Vec<&str> = list.iter().map(|f| f.name).collect();
        assert_eq!(names, ["zeta", "siem"], "raw readers first");
    }
}
