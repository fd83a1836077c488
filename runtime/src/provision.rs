//! Idempotent provisioning of streams, consumers and KV buckets from the
//! [topology](crate::topology) and the functions' consumers.
//!
//! Each object is created when missing, updated in place when a field this
//! module manages differs (subjects, limits, filters, retries: all changes
//! the server applies without touching stored messages), and left alone
//! when it matches. Fields that cannot change in place (storage type,
//! retention policy, ack policy) are reported as a [`ProvisionError::Conflict`]
//! naming the object, the field and both values, instead of being forced.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    context::{ConsumerInfoErrorKind, GetStreamErrorKind},
    stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::topology::{self, BucketSpec, ConsumerSpec, StreamSpec};

/// Deployment-specific knobs; the names come from the topology.
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    /// Replicas per stream and bucket: 1 locally, 3 in a cluster.
    pub replicas: usize,
    /// Override every consumer's ack wait (tests use short ones).
    pub ack_wait: Option<Duration>,
    /// Override every consumer's max deliveries.
    pub max_deliver: Option<i64>,
    /// Only consumers, on streams that exist: what the functions' own
    /// provisioning Job does with a user that may not touch streams.
    pub consumers_only: bool,
    /// Cap on every stream's and bucket's `max_bytes`. The topology's sizes
    /// (24 GiB in all) are for a cluster's volumes; JetStream refuses to
    /// create streams whose reservations exceed its store, which on a
    /// laptop is 75 % of the free disk. `tidewatch up` caps them.
    pub max_bytes_cap: Option<i64>,
}

impl Default for ProvisionOptions {
    fn default() -> Self {
        ProvisionOptions {
            replicas: 1,
            ack_wait: None,
            max_deliver: None,
            consumers_only: false,
            max_bytes_cap: None,
        }
    }
}

impl ProvisionOptions {
    /// Cap every stream and bucket at `bytes` (see [`Self::max_bytes_cap`]).
    pub fn cap_bytes(mut self, bytes: i64) -> Self {
        self.max_bytes_cap = Some(bytes);
        self
    }
    fn max_bytes(&self, spec: i64) -> i64 {
        match self.max_bytes_cap {
            Some(cap) if spec < 0 || spec > cap => cap,
            _ => spec,
        }
    }

    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = Some(ack_wait);
        self
    }
    pub fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.max_deliver = Some(max_deliver);
        self
    }
}

/// What provisioning did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created,
    /// Updated in place; the fields that changed.
    Updated(Vec<String>),
    Unchanged,
}

/// What provisioning did, object by object.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub items: Vec<(String, Change)>,
}

impl Report {
    /// True when nothing was created or updated.
    pub fn is_noop(&self) -> bool {
        self.items.iter().all(|(_, c)| *c == Change::Unchanged)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (object, change) in &self.items {
            match change {
                Change::Created => writeln!(f, "created   {object}")?,
                Change::Updated(fields) => {
                    writeln!(f, "updated   {object} ({})", fields.join(", "))?
                }
                Change::Unchanged => writeln!(f, "unchanged {object}")?,
            }
        }
        Ok(())
    }
}

/// Why provisioning stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Terminal: an existing object differs in a field that cannot change in place.
    #[error(
        "{object} exists with {field} = {existing}, but Tidewatch needs {wanted}. This cannot change in place \
         without losing data: move its messages to a new stream, or delete it if they are disposable, then provision again"
    )]
    Conflict {
        object: String,
        field: &'static str,
        existing: String,
        wanted: String,
    },
    /// Retryable: a JetStream API call failed (server unreachable, no JetStream, timeouts).
    #[error("{action} {object}: {source}")]
    Api {
        action: &'static str,
        object: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ProvisionError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProvisionError::Api { .. })
    }
}

fn api<E: std::error::Error + Send + Sync + 'static>(
    action: &'static str,
    object: &str,
) -> impl FnOnce(E) -> ProvisionError {
    let object = object.to_string();
    move |e| ProvisionError::Api {
        action,
        object,
        source: Box::new(e),
    }
}

/// Provision the topology's streams and buckets and `consumers` (the
/// functions' durables: the CLI passes every function's, a test the ones it
/// needs; the runtime keeps no list of functions).
pub async fn provision(
    js: &jetstream::Context,
    consumers: &[ConsumerSpec],
    options: &ProvisionOptions,
) -> Result<Report, ProvisionError> {
    let mut report = Report::default();
    for spec in topology::STREAMS.iter().filter(|_| !options.consumers_only) {
        let change = ensure_stream(js, desired_stream(spec, options)).await?;
        report.items.push((format!("stream {}", spec.name), change));
    }
    for spec in consumers {
        let change = ensure_consumer(js, spec, options).await?;
        report
            .items
            .push((format!("consumer {}", spec.durable), change));
    }
    for spec in topology::BUCKETS.iter().filter(|_| !options.consumers_only) {
        let change = ensure_stream(js, desired_bucket(spec, options)).await?;
        report.items.push((format!("kv {}", spec.bucket), change));
    }
    Ok(report)
}

/// The stream config a spec asks for.
pub fn desired_stream(spec: &StreamSpec, options: &ProvisionOptions) -> StreamConfig {
    StreamConfig {
        name: spec.name.to_string(),
        description: Some(spec.description.to_string()),
        subjects: spec.subjects(),
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age: spec.max_age,
        max_bytes: options.max_bytes(spec.max_bytes),
        duplicate_window: spec.duplicate_window,
        max_messages: -1,
        max_messages_per_subject: -1,
        max_message_size: spec.max_message_bytes,
        num_replicas: options.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// The backing stream a KV bucket asks for (`KV_<bucket>`), as the KV API lays it out.
pub fn desired_bucket(spec: &BucketSpec, options: &ProvisionOptions) -> StreamConfig {
    StreamConfig {
        name: format!("KV_{}", spec.bucket),
        description: Some(spec.description.to_string()),
        subjects: vec![format!("$KV.{}.>", spec.bucket)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        max_messages_per_subject: spec.history,
        max_age: spec.max_age,
        max_bytes: options.max_bytes(spec.max_bytes),
        max_messages: -1,
        max_message_size: -1,
        num_replicas: options.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        // Expiry markers need per-message TTLs allowed (as the KV API sets it).
        allow_message_ttl: !spec.expiry_markers.is_zero(),
        subject_delete_marker_ttl: (!spec.expiry_markers.is_zero()).then_some(spec.expiry_markers),
        duplicate_window: if spec.max_age.is_zero() || spec.max_age > Duration::from_secs(120) {
            Duration::from_secs(120)
        } else {
            spec.max_age
        },
        ..Default::default()
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    desired: StreamConfig,
) -> Result<Change, ProvisionError> {
    let object = format!("stream {}", desired.name);
    let mut stream = match js.get_stream(&desired.name).await {
        Ok(s) => s,
        Err(e) if is_not_found(e.kind()) => {
            js.create_stream(desired.clone())
                .await
                .map_err(api("create", &object))?;
            return Ok(Change::Created);
        }
        Err(e) => return Err(api("look up", &object)(e)),
    };
    let existing = stream
        .info()
        .await
        .map_err(api("read", &object))?
        .config
        .clone();
    if existing.storage != desired.storage {
        return Err(conflict(
            &object,
            "storage",
            &existing.storage,
            &desired.storage,
        ));
    }
    if existing.retention != desired.retention {
        return Err(conflict(
            &object,
            "retention",
            &existing.retention,
            &desired.retention,
        ));
    }
    let mut updated = existing.clone();
    let mut changed = Vec::new();
    let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    if set(&existing.subjects) != set(&desired.subjects) {
        updated.subjects = desired.subjects.clone();
        changed.push("subjects");
    }
    macro_rules! converge {
        ($($field:ident),*) => {$(
            if existing.$field != desired.$field {
                updated.$field = desired.$field.clone();
                changed.push(stringify!($field));
            }
        )*};
    }
    converge!(
        description,
        max_age,
        max_bytes,
        max_message_size,
        discard,
        duplicate_window,
        num_replicas,
        allow_direct,
        max_messages_per_subject,
        allow_rollup,
        deny_delete,
        subject_delete_marker_ttl
    );
    if desired.allow_message_ttl && !existing.allow_message_ttl {
        // Can be turned on, never off again: only ever converge towards on.
        updated.allow_message_ttl = true;
        changed.push("allow_message_ttl");
    }
    if changed.is_empty() {
        return Ok(Change::Unchanged);
    }
    js.update_stream(updated)
        .await
        .map_err(api("update", &object))?;
    Ok(Change::Updated(
        changed.into_iter().map(String::from).collect(),
    ))
}

/// The consumer config a spec asks for.
pub fn desired_consumer(spec: &ConsumerSpec, options: &ProvisionOptions) -> pull::Config {
    pull::Config {
        durable_name: Some(spec.durable.to_string()),
        description: Some(spec.description.to_string()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: options.ack_wait.unwrap_or(spec.ack_wait),
        max_deliver: options.max_deliver.unwrap_or(spec.max_deliver),
        filter_subjects: topology::consumer_filter_subjects(spec),
        max_ack_pending: spec.max_ack_pending,
        ..Default::default()
    }
}

async fn ensure_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    options: &ProvisionOptions,
) -> Result<Change, ProvisionError> {
    let object = format!("consumer {}", spec.durable);
    let stream_name = topology::stream(spec.stream)
        .map(|s| s.name)
        .unwrap_or(spec.stream);
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(api("look up", stream_name))?;
    let desired = desired_consumer(spec, options);
    let existing = match stream.consumer_info(spec.durable).await {
        Ok(info) => info.config,
        Err(e)
            if matches!(e.kind(), ConsumerInfoErrorKind::NotFound)
                || matches!(e.kind(), ConsumerInfoErrorKind::JetStream(j) if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
        {
            stream
                .create_consumer(desired)
                .await
                .map_err(api("create", &object))?;
            return Ok(Change::Created);
        }
        Err(e) => return Err(api("look up", &object)(e)),
    };
    if existing.ack_policy != desired.ack_policy {
        return Err(conflict(
            &object,
            "ack_policy",
            &existing.ack_policy,
            &desired.ack_policy,
        ));
    }
    let mut filters: Vec<String> = existing.filter_subjects.clone();
    if !existing.filter_subject.is_empty() {
        filters.push(existing.filter_subject.clone());
    }
    let mut changed = Vec::new();
    let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    if set(&filters) != set(&desired.filter_subjects) {
        changed.push("filter_subjects");
    }
    for (field, differs) in [
        ("description", existing.description != desired.description),
        ("ack_wait", existing.ack_wait != desired.ack_wait),
        ("max_deliver", existing.max_deliver != desired.max_deliver),
        (
            "max_ack_pending",
            existing.max_ack_pending != desired.max_ack_pending,
        ),
    ] {
        if differs {
            changed.push(field);
        }
    }
    if changed.is_empty() {
        return Ok(Change::Unchanged);
    }
    // Deliver policy only applies at creation and cannot change: keep the existing one.
    let updated = pull::Config {
        deliver_policy: existing.deliver_policy,
        ..desired
    };
    js.update_consumer_on_stream(updated, stream_name)
        .await
        .map_err(api("update", &object))?;
    Ok(Change::Updated(
        changed.into_iter().map(String::from).collect(),
    ))
}

fn is_not_found(kind: GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(e) if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn conflict(
    object: &str,
    field: &'static str,
    existing: &impl fmt::Debug,
    wanted: &impl fmt::Debug,
) -> ProvisionError {
    ProvisionError::Conflict {
        object: object.to_string(),
        field,
        existing: format!("{existing:?}"),
        wanted: format!("{wanted:?}"),
    }
}
