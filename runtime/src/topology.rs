//! The one place that names things: streams, subjects, KV buckets and
//! CloudEvent types, and the types that describe functions and their
//! consumers. Publishers, functions, provisioning, the CLI and the rendered
//! manifests all read from here, so they cannot disagree. Which functions
//! exist is not compiled in here: each carries its own
//! `functions/<name>/function.toml` ([`crate::spec`]), and only the CLI
//! (provisioning, rendering, `tidewatch up`) reads the whole list.
//!
//! Subjects:
//!
//! | subject | stream | written by |
//! |---|---|---|
//! | `tidewatch.raw.<collector>.<node>` | `TIDEWATCH_RAW` | collectors |
//! | `tidewatch.enriched.<collector>.<node>.<type levels>` | `TIDEWATCH_ENRICHED` | enrich |
//! | `tidewatch.insights.<kind>` | `TIDEWATCH_INSIGHTS` | correlate |
//! | `tidewatch.dlq.<consumer>` | `TIDEWATCH_DLQ` | the runtime, for poison messages |
//! | `tidewatch.replay.<stream key>.<consumer>` | the stream the consumer reads | `tidewatch replay` |
//!
//! Replay subjects live in the consumer's own input stream and only that
//! consumer's filter includes its replay subject, so a replay re-delivers to
//! one function without disturbing the others. Enriched subjects carry the
//! event type (its dotted parts as levels), so each consumer there is
//! filtered to its function's `types` on the server
//! ([`consumer_filter_subjects`]), and enrich stores only what some
//! consumer reads.

use std::time::Duration;

/// Top-level subject token of every Tidewatch subject.
pub const SUBJECT_ROOT: &str = "tidewatch";

/// A stream and the limits it is provisioned with.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    /// Short name used in replay subjects and on the command line (`raw`).
    pub key: &'static str,
    /// JetStream stream name (`TIDEWATCH_RAW`).
    pub name: &'static str,
    pub description: &'static str,
    /// Subject prefix the stream captures (`tidewatch.raw`); it stores `<prefix>.>`.
    pub prefix: &'static str,
    /// Oldest message kept (limits retention; the seed's "storage full" answer).
    pub max_age: Duration,
    /// Bytes kept before the oldest messages are discarded.
    pub max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub duplicate_window: Duration,
    /// Largest message the stream stores (headers and payload): the server
    /// refuses anything bigger at publish, so an oversized message never
    /// reaches a consumer's memory.
    pub max_message_bytes: i32,
}

/// The event contract (64 KiB of headers and payload) plus the framing
/// nats-server counts on top (`NATS/1.0` and line ends).
pub const EVENT_STREAM_MESSAGE_BYTES: i32 = 64 * 1024 + 1024;
/// A dead letter is an event plus the `Tidewatch-Dlq-*` headers.
pub const DEAD_LETTER_MESSAGE_BYTES: i32 = EVENT_STREAM_MESSAGE_BYTES + 16 * 1024;

impl StreamSpec {
    /// Subjects the stream stores: its own prefix and its replay subjects.
    pub fn subjects(&self) -> Vec<String> {
        vec![
            format!("{}.>", self.prefix),
            format!("{SUBJECT_ROOT}.replay.{}.>", self.key),
        ]
    }
}

/// A function's durable pull consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSpec {
    /// Durable name; also the function name and the KEDA `consumer` field.
    pub durable: &'static str,
    /// Key of the stream it reads.
    pub stream: &'static str,
    pub description: &'static str,
    /// Deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// How long a delivered message may stay un-acked before redelivery.
    pub ack_wait: Duration,
    /// Messages delivered but not yet acked, across all replicas.
    pub max_ack_pending: i64,
    /// Event type patterns it reads (its function's `types`); on the
    /// enriched stream, whose subjects carry the type, they become its
    /// filter subjects, so it is delivered (and KEDA counts as lag) only
    /// what it reads. Empty: everything.
    pub types: Vec<&'static str>,
}

/// A KV bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketSpec {
    pub bucket: &'static str,
    pub description: &'static str,
    pub history: i64,
    /// Entries older than this expire (0 = never).
    pub max_age: Duration,
    /// When non-zero, an entry that expires leaves a delete marker kept
    /// this long (the stream's `subject_delete_marker_ttl`), so KV watchers
    /// (enrich's cache) see the expiry as a delete.
    pub expiry_markers: Duration,
    /// Bytes the bucket may hold (its storage reservation on every replica).
    pub max_bytes: i64,
}

/// A function: its consumer, and where its outputs go. Each function
/// crate carries its own in `functions/<name>/function.toml` ([`crate::spec`]
/// parses it); the runtime holds no list of them, so adding a function
/// rebuilds only that crate and the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    pub name: &'static str,
    /// Durable consumer it reads through (same name).
    pub consumer: ConsumerSpec,
    /// Key of the stream its outputs go to, if it emits events.
    pub output_stream: Option<&'static str>,
    /// Binary name (`tidewatch-<name>`).
    pub binary: &'static str,
    /// Event type patterns it handles (`*` matches any run of characters);
    /// empty handles everything it reads.
    pub types: Vec<&'static str>,
    /// How it scales (KEDA ScaledObject, Knative annotations, `tidewatch up`).
    pub scale: ScaleSpec,
    /// Handlers a replica runs at once in JetStream mode, and so the
    /// messages it asks for per pull, unless `TIDEWATCH_CONCURRENCY` /
    /// `TIDEWATCH_BATCH` say otherwise.
    pub concurrency: usize,
}

impl FunctionSpec {
    /// Whether `event_type` is one this function handles.
    pub fn handles(&self, event_type: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|p| types::matches(p, event_type))
    }
}

/// Scaling of one function (`[scale]` in its function.toml); rendered into
/// its ScaledObject and Knative Service, and read back from keda/ by the
/// local autoscaler.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleSpec {
    /// Fewest replicas (0: scale to zero when there is no lag).
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// Target lag per replica (KEDA `lagThreshold`).
    pub lag_threshold: u64,
    /// Lag above which a function at zero starts (KEDA `activationLagThreshold`).
    pub activation_lag_threshold: u64,
    /// Concurrent requests per replica in Knative mode (`containerConcurrency`).
    pub container_concurrency: u32,
}

pub const RAW: StreamSpec = StreamSpec {
    key: "raw",
    name: "TIDEWATCH_RAW",
    description: "Events as the collectors saw them, one subject per collector and node",
    prefix: "tidewatch.raw",
    max_age: Duration::from_secs(24 * 3600),
    max_bytes: 10 * 1024 * 1024 * 1024,
    duplicate_window: Duration::from_secs(120),
    max_message_bytes: EVENT_STREAM_MESSAGE_BYTES,
};

pub const ENRICHED: StreamSpec = StreamSpec {
    key: "enriched",
    name: "TIDEWATCH_ENRICHED",
    description: "Events joined with Kubernetes context by the enrich function",
    prefix: "tidewatch.enriched",
    max_age: Duration::from_secs(24 * 3600),
    max_bytes: 10 * 1024 * 1024 * 1024,
    duplicate_window: Duration::from_secs(120),
    max_message_bytes: EVENT_STREAM_MESSAGE_BYTES,
};

pub const INSIGHTS: StreamSpec = StreamSpec {
    key: "insights",
    name: "TIDEWATCH_INSIGHTS",
    description: "Root-cause insights from the correlate function",
    prefix: "tidewatch.insights",
    max_age: Duration::from_secs(30 * 24 * 3600),
    max_bytes: 1024 * 1024 * 1024,
    duplicate_window: Duration::from_secs(120),
    max_message_bytes: EVENT_STREAM_MESSAGE_BYTES,
};

pub const DEAD_LETTER: StreamSpec = StreamSpec {
    key: "dlq",
    name: "TIDEWATCH_DLQ",
    description: "Messages a function rejected or could not process, with the reason in headers",
    prefix: "tidewatch.dlq",
    max_age: Duration::from_secs(14 * 24 * 3600),
    max_bytes: 1024 * 1024 * 1024,
    duplicate_window: Duration::from_secs(120),
    max_message_bytes: DEAD_LETTER_MESSAGE_BYTES,
};

pub const STREAMS: &[StreamSpec] = &[RAW, ENRICHED, INSIGHTS, DEAD_LETTER];

/// A collector: a DaemonSet on a cluster, a process under `tidewatch up`,
/// a NATS user publishing under `tidewatch.raw.<name>.>`.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorSpec {
    pub name: &'static str,
    /// Binary name (`tidewatch-collector-<name>`).
    pub binary: &'static str,
}

pub const COLLECTORS: &[CollectorSpec] = &[
    CollectorSpec {
        name: "ebpf",
        binary: "tidewatch-collector-ebpf",
    },
    CollectorSpec {
        name: "k8s",
        binary: "tidewatch-collector-k8s",
    },
    CollectorSpec {
        name: "systemd",
        binary: "tidewatch-collector-systemd",
    },
];

/// Pod metadata for enrichment, written by the k8s collector.
pub const POD_METADATA: BucketSpec = BucketSpec {
    bucket: "tidewatch-pods",
    description: "Pod metadata by pod uid, container id and pod IP",
    history: 1,
    // The k8s collector re-puts what it owns every `kv_refresh` (10 min by
    // default, at most a third of this): an entry nobody refreshes (a pod
    // deleted while no collector ran on its node) expires, so a reused IP
    // or name never resolves to a dead pod for long.
    max_age: Duration::from_secs(3600),
    expiry_markers: Duration::from_secs(60),
    max_bytes: 1024 * 1024 * 1024,
};

/// Correlation state per entity; expires when an entity goes quiet.
pub const CORRELATION_STATE: BucketSpec = BucketSpec {
    bucket: "tidewatch-correlation",
    description: "Correlation rule state per entity",
    history: 1,
    max_age: Duration::from_secs(6 * 3600),
    expiry_markers: Duration::ZERO,
    max_bytes: 1024 * 1024 * 1024,
};

pub const BUCKETS: &[BucketSpec] = &[POD_METADATA, CORRELATION_STATE];

/// Bytes every JetStream node must be able to store: each stream's and
/// bucket's `max_bytes` (every stream is replicated to every node of a
/// 3-node cluster). The rendered `max_file_store` and volume follow it.
pub fn reserved_bytes() -> i64 {
    STREAMS.iter().map(|s| s.max_bytes).sum::<i64>()
        + BUCKETS.iter().map(|b| b.max_bytes).sum::<i64>()
}

/// Look up a stream by key (`raw`) or name (`TIDEWATCH_RAW`), case-insensitively.
pub fn stream(key_or_name: &str) -> Option<&'static StreamSpec> {
    STREAMS.iter().find(|s| {
        s.key.eq_ignore_ascii_case(key_or_name) || s.name.eq_ignore_ascii_case(key_or_name)
    })
}

/// Filter subjects of a consumer: what its stream carries from the
/// pipeline (on the enriched stream, only the types it reads), plus its own
/// replay subject (not the other consumers').
pub fn consumer_filter_subjects(consumer: &ConsumerSpec) -> Vec<String> {
    let prefix = stream(consumer.stream)
        .map(|s| s.prefix)
        .unwrap_or(consumer.stream);
    let mut filters = if consumer.stream == ENRICHED.key && !consumer.types.is_empty() {
        let filters: Vec<String> = consumer
            .types
            .iter()
            .map(|p| format!("{prefix}.*.*.{}", subjects::type_filter(p)))
            .collect();
        // nats-server refuses overlapping filters: keep the widest.
        let mut kept: Vec<String> = Vec::new();
        for f in &filters {
            if filters.iter().any(|g| g != f && subjects::subsumes(g, f)) || kept.contains(f) {
                continue;
            }
            kept.push(f.clone());
        }
        kept
    } else {
        vec![format!("{prefix}.>")]
    };
    filters.push(subjects::replay(consumer.stream, consumer.durable));
    filters
}

/// Subject builders. Every token from outside (node names, kinds) goes
/// through [`subjects::token`] so a dot or space in a node name cannot add
/// or break subject levels.
pub mod subjects {
    use super::{DEAD_LETTER, ENRICHED, INSIGHTS, RAW, SUBJECT_ROOT};

    /// Make `s` a single valid subject token: `.`, `*`, `>`, whitespace and
    /// control characters become `_`; empty becomes `_`.
    pub fn token(s: &str) -> String {
        let t: String = s
            .chars()
            .map(|c| {
                if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        if t.is_empty() { "_".to_string() } else { t }
    }

    pub fn raw(collector: &str, node: &str) -> String {
        format!("{}.{}.{}", RAW.prefix, token(collector), token(node))
    }

    /// An enriched event's subject: its collector, node and type, the
    /// type's dotted parts as subject levels, so consumers filter by type
    /// on the server (`tidewatch.enriched.k8s.node-1.dev.tidewatch.k8s.container.restarted`).
    pub fn enriched(collector: &str, node: &str, ty: &str) -> String {
        format!(
            "{}.{}.{}.{}",
            ENRICHED.prefix,
            token(collector),
            token(node),
            type_levels(ty)
        )
    }

    /// An event type as subject levels: each dotted part a token.
    pub fn type_levels(ty: &str) -> String {
        ty.split('.').map(token).collect::<Vec<_>>().join(".")
    }

    /// The subject filter (after the collector and node levels) for a type
    /// pattern, whose `*` matches any run of characters: its levels up to
    /// the first with a `*`, then `>` (a `*` may span levels, which a
    /// subject's `*` cannot). The function still checks each event against
    /// its patterns, so the filter may be wider, never narrower.
    pub fn type_filter(pattern: &str) -> String {
        let mut levels = Vec::new();
        for level in pattern.split('.') {
            if level.contains('*') {
                levels.push(">".to_string());
                break;
            }
            levels.push(token(level));
        }
        levels.join(".")
    }

    /// Whether `subject` matches `filter` (`*` one level, `>` one or more).
    pub fn matches(filter: &str, subject: &str) -> bool {
        let s: Vec<&str> = subject.split('.').collect();
        let f: Vec<&str> = filter.split('.').collect();
        for (i, tok) in f.iter().enumerate() {
            match *tok {
                ">" => return s.len() > i,
                "*" if i < s.len() => {}
                t if s.get(i) == Some(&t) => {}
                _ => return false,
            }
        }
        f.len() == s.len()
    }

    /// Whether every subject `inner` matches also matches `outer`.
    pub fn subsumes(outer: &str, inner: &str) -> bool {
        let o: Vec<&str> = outer.split('.').collect();
        let n: Vec<&str> = inner.split('.').collect();
        for (i, tok) in o.iter().enumerate() {
            match (*tok, n.get(i).copied()) {
                (">", Some(_)) => return true,
                (_, None) => return false,
                ("*", Some(t)) if t != ">" => {}
                (t, Some(u)) if t == u => {}
                _ => return false,
            }
        }
        o.len() == n.len()
    }

    pub fn insight(kind: &str) -> String {
        format!("{}.{}", INSIGHTS.prefix, token(kind))
    }

    pub fn dead_letter(consumer: &str) -> String {
        format!("{}.{}", DEAD_LETTER.prefix, token(consumer))
    }

    pub fn replay(stream_key: &str, consumer: &str) -> String {
        format!(
            "{SUBJECT_ROOT}.replay.{}.{}",
            token(stream_key),
            token(consumer)
        )
    }
}

/// Keys of the pod metadata bucket ([`POD_METADATA`]); the k8s collector
/// writes one entry per key kind so enrich can join by whatever an event has.
pub mod pod_keys {
    /// KV keys allow `[-/_=.a-zA-Z0-9]`; anything else becomes `_`.
    pub fn token(s: &str) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_=".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
    pub fn by_uid(uid: &str) -> String {
        format!("uid.{}", token(uid))
    }
    pub fn by_name(namespace: &str, name: &str) -> String {
        format!("name.{}.{}", token(namespace), token(name))
    }
    pub fn by_container(container_id: &str) -> String {
        format!("container.{}", token(container_id))
    }
    pub fn by_ip(ip: &str) -> String {
        format!("ip.{}", token(ip))
    }
    /// A Service by its cluster IP; the value is JSON `{"namespace", "name"}`.
    pub fn by_service_ip(ip: &str) -> String {
        format!("svcip.{}", token(ip))
    }
}

/// CloudEvent extension attributes Tidewatch adds (lowercase alphanumeric,
/// as the spec requires).
pub mod extensions {
    /// `resolved` or `unresolved`, set by enrich.
    pub const RESOLUTION: &str = "resolution";
    /// Why enrich could not resolve the event.
    pub const RESOLUTION_REASON: &str = "resolutionreason";
    pub const NAMESPACE: &str = "namespace";
    pub const POD: &str = "pod";
    pub const NODE: &str = "node";
    /// `<Kind>/<name>` of the owning workload.
    pub const WORKLOAD: &str = "workload";
}

/// CloudEvent `source` attribute: `/tidewatch/<component>/<node>`.
pub fn source(component: &str, node: &str) -> String {
    format!("/{SUBJECT_ROOT}/{component}/{node}")
}

/// Split a Tidewatch `source` into (component, node).
pub fn parse_source(source: &str) -> Option<(&str, &str)> {
    let rest = source.strip_prefix("/tidewatch/")?;
    let (component, node) = rest.split_once('/')?;
    (!component.is_empty() && !node.is_empty()).then_some((component, node))
}

/// CloudEvent types, `dev.tidewatch.<domain>.<thing>.<change>`, with the
/// payload message each carries.
pub mod types {
    /// An event type and the protobuf message in its `data`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EventType {
        pub name: &'static str,
        /// Full protobuf message name (`tidewatch.v1.ProcessExec`).
        pub payload: &'static str,
        pub description: &'static str,
    }

    macro_rules! event_types {
        ($($konst:ident = $name:literal, $payload:literal, $desc:literal;)*) => {
            $(
                #[doc = $desc]
                pub const $konst: &str = $name;
            )*
            /// Every type Tidewatch publishes.
            pub const ALL: &[EventType] = &[$(EventType { name: $name, payload: concat!("tidewatch.v1.", $payload), description: $desc }),*];
        };
    }

    event_types! {
        PROCESS_EXEC = "dev.tidewatch.kernel.process.exec", "ProcessExec", "A process called execve";
        PROCESS_EXISTS = "dev.tidewatch.kernel.process.exists", "ProcessExec", "A process already running when the collector started";
        PROCESS_EXIT = "dev.tidewatch.kernel.process.exit", "ProcessExit", "A process exited or was killed";
        OOM_KILL = "dev.tidewatch.kernel.memory.oomkill", "OomKill", "The kernel OOM killer chose a victim";
        COLLECTOR_DROPS = "dev.tidewatch.kernel.collector.drops", "CollectorDrops", "A collector lost events (counted per stage, kind and CPU)";
        TCP_CONNECT = "dev.tidewatch.kernel.tcp.connect", "TcpConnection", "An outbound TCP connection was established";
        TCP_ACCEPT = "dev.tidewatch.kernel.tcp.accept", "TcpConnection", "An inbound TCP connection was accepted";
        TCP_CLOSE = "dev.tidewatch.kernel.tcp.close", "TcpConnection", "A TCP connection closed";
        TCP_REFUSED = "dev.tidewatch.kernel.tcp.refused", "TcpConnection", "A TCP connect was refused (RST in SYN_SENT)";
        TCP_TIMEOUT = "dev.tidewatch.kernel.tcp.timeout", "TcpConnection", "A TCP connect timed out";
        TCP_RESET = "dev.tidewatch.kernel.tcp.reset", "TcpConnection", "An established TCP connection was reset";
        TCP_RETRANSMIT = "dev.tidewatch.kernel.tcp.retransmit", "TcpConnection", "TCP retransmits on a connection in an interval";
        CONTAINER_STARTED = "dev.tidewatch.k8s.container.started", "ContainerRestart", "A container started for the first time";
        CONTAINER_RESTARTED = "dev.tidewatch.k8s.container.restarted", "ContainerRestart", "A container restarted, with its last termination";
        CONTAINER_OOMKILLED = "dev.tidewatch.k8s.container.oomkilled", "ContainerRestart", "A container was OOMKilled";
        CONTAINER_CRASHLOOP = "dev.tidewatch.k8s.container.crashloop", "ContainerRestart", "A container entered CrashLoopBackOff";
        CONTAINER_IMAGE_PULL_FAILED = "dev.tidewatch.k8s.container.imagepullfailed", "ContainerRestart", "A container image could not be pulled";
        UNIT_STARTED = "dev.tidewatch.systemd.unit.started", "UnitStateChange", "A systemd unit became active";
        UNIT_STOPPED = "dev.tidewatch.systemd.unit.stopped", "UnitStateChange", "A systemd unit stopped";
        UNIT_FAILED = "dev.tidewatch.systemd.unit.failed", "UnitStateChange", "A systemd unit failed";
        UNIT_RESTARTED = "dev.tidewatch.systemd.unit.restarted", "UnitStateChange", "A systemd unit was restarted";
        JOURNAL_ENTRY = "dev.tidewatch.systemd.journal.entry", "JournalEntry", "A journal entry from a watched unit";
        UNIT_CRASH_LOOP = "dev.tidewatch.systemd.unit.crashloop", "UnitStateChange", "A systemd unit restarted more often than the crash-loop threshold within its window";
        JOURNAL_OOM_KILL = "dev.tidewatch.systemd.journal.oomkill", "JournalEntry", "The kernel OOM killer's 'Killed process' line, read from the journal";
        CONTAINER_CRASHLOOP_ENDED = "dev.tidewatch.k8s.container.crashloopended", "ContainerRestart", "A container left CrashLoopBackOff";
        CONTAINER_STABLE = "dev.tidewatch.k8s.container.stable", "ContainerRestart", "A container that had restarted has run without restarting for the collector's stable_after (10 min)";
        POD_PHASE = "dev.tidewatch.k8s.pod.phase", "PodChange", "A pod's phase changed (Pending, Running, Succeeded, Failed)";
        POD_READY = "dev.tidewatch.k8s.pod.ready", "PodChange", "A pod's Ready condition became True";
        POD_NOT_READY = "dev.tidewatch.k8s.pod.notready", "PodChange", "A pod's Ready condition became False";
        POD_EVICTED = "dev.tidewatch.k8s.pod.evicted", "PodChange", "A pod was evicted (status reason Evicted or a DisruptionTarget condition)";
        POD_DELETED = "dev.tidewatch.k8s.pod.deleted", "PodChange", "A pod was deleted (or vanished from a relist)";
        NODE_CONDITION = "dev.tidewatch.k8s.node.condition", "NodeConditionChange", "A node's MemoryPressure, DiskPressure or PIDPressure condition changed";
        NODE_NOT_READY = "dev.tidewatch.k8s.node.notready", "NodeConditionChange", "A node's Ready condition became False or Unknown (subject node/<name>)";
        NODE_READY = "dev.tidewatch.k8s.node.ready", "NodeConditionChange", "A node's Ready condition became True again";
        ROLLOUT_STARTED = "dev.tidewatch.k8s.rollout.started", "RolloutChange", "A Deployment started rolling out a new ReplicaSet (subject deployment/<ns>/<name>)";
        ENDPOINTS_EMPTY = "dev.tidewatch.k8s.endpoints.empty", "EndpointsChange", "A service has no ready endpoints left (subject service/<ns>/<name>)";
        ROLLOUT_PROGRESSED = "dev.tidewatch.k8s.rollout.progressed", "RolloutChange", "A Deployment rollout moved (updated or available replicas changed)";
        ROLLOUT_COMPLETED = "dev.tidewatch.k8s.rollout.completed", "RolloutChange", "A Deployment rollout finished: every replica updated and available";
        ROLLOUT_STALLED = "dev.tidewatch.k8s.rollout.stalled", "RolloutChange", "A Deployment rollout exceeded its progress deadline";
        ENDPOINTS_RECOVERED = "dev.tidewatch.k8s.endpoints.recovered", "EndpointsChange", "A service that had no ready endpoints has some again";
        WARNING_EVENT = "dev.tidewatch.k8s.event.warning", "KubeEvent", "A Kubernetes Warning Event, once per count increment";
        INSIGHT_CRASH_LOOP = "dev.tidewatch.insight.crash-loop", "Insight", "A container keeps restarting";
        INSIGHT_OOM_CASCADE = "dev.tidewatch.insight.oom-cascade", "Insight", "OOM kills followed by restarts (and endpoints dropping)";
        INSIGHT_NODE_RUNTIME_FAILURE = "dev.tidewatch.insight.node-runtime-failure", "Insight", "kubelet/container runtime failed, the node went NotReady";
        INSIGHT_SERVICE_DISRUPTION = "dev.tidewatch.insight.service-disruption", "Insight", "A service lost its endpoints while clients failed to connect";
        INSIGHT_BAD_ROLLOUT = "dev.tidewatch.insight.bad-rollout", "Insight", "A new ReplicaSet's pods restart more than the old ones did";
    }

    /// What every insight type starts with.
    pub const INSIGHT_PREFIX: &str = "dev.tidewatch.insight.";

    /// The insight type for an insight kind.
    pub fn insight(kind: &str) -> String {
        format!("{INSIGHT_PREFIX}{kind}")
    }

    /// Look up a known type.
    pub fn lookup(name: &str) -> Option<&'static EventType> {
        ALL.iter().find(|t| t.name == name)
    }

    /// Match a type against a pattern where `*` matches any run of characters
    /// (`dev.tidewatch.kernel.*`, `*.oomkill`). Linear in the text: the
    /// literal pieces between stars are found left to right, the first
    /// anchored at the start and the last at the end; a greedy earliest
    /// match for each middle piece is always safe, so nothing backtracks
    /// (a rule's pattern over a long field cannot stall correlate).
    pub fn matches(pattern: &str, name: &str) -> bool {
        let mut pieces = pattern.split('*');
        let first = pieces.next().unwrap_or_default();
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let mut middle: Vec<&str> = pieces.collect();
        let Some(last) = middle.pop() else {
            // No star: the whole name must be the pattern.
            return rest.is_empty();
        };
        for piece in middle {
            match rest.find(piece) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NATS subject wildcard match, as the server applies stream and filter subjects.
    fn subject_matches(filter: &str, subject: &str) -> bool {
        subjects::matches(filter, subject)
    }

    fn streams_for(subject: &str) -> Vec<&'static str> {
        STREAMS
            .iter()
            .filter(|s| s.subjects().iter().any(|f| subject_matches(f, subject)))
            .map(|s| s.name)
            .collect()
    }

    #[test]
    fn every_published_subject_lands_in_exactly_one_stream() {
        let published = [
            subjects::raw("ebpf", "node-1"),
            subjects::raw("k8s", "ip-10-0-0-1.ec2.internal"),
            subjects::enriched("systemd", "node-1", types::UNIT_FAILED),
            subjects::insight("crash-loop"),
            subjects::dead_letter("enrich"),
            subjects::replay("raw", "enrich"),
            subjects::replay("insights", "export"),
        ];
        for subject in published {
            assert_eq!(
                streams_for(&subject).len(),
                1,
                "{subject} → {:?}",
                streams_for(&subject)
            );
        }
        assert_eq!(
            streams_for(&subjects::raw("k8s", "a.b.c")),
            vec!["TIDEWATCH_RAW"]
        );
    }

    /// The repository's functions, as the CLI embeds them.
    fn functions() -> Vec<FunctionSpec> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
        crate::spec::read_dir(&dir).expect("functions/*/function.toml are valid")
    }

    fn function(functions: &[FunctionSpec], name: &str) -> FunctionSpec {
        functions
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("functions/{name}/function.toml"))
            .clone()
    }

    #[test]
    fn each_function_reads_what_the_previous_one_writes() {
        let functions = functions();
        for function in &functions {
            assert!(
                stream(function.consumer.stream).is_some(),
                "{} reads a provisioned stream",
                function.name
            );
            assert_eq!(function.consumer.durable, function.name);
        }
        let names: Vec<&str> = functions.iter().map(|f| f.name).collect();
        assert_eq!(names, ["enrich", "correlate", "export"], "pipeline order");
        let enrich = function(&functions, "enrich");
        let filters = consumer_filter_subjects(&enrich.consumer);
        assert!(
            filters
                .iter()
                .any(|f| subject_matches(f, &subjects::raw("ebpf", "n1")))
        );
        assert!(
            filters
                .iter()
                .any(|f| subject_matches(f, &subjects::replay("raw", "enrich")))
        );
        // A replay for another consumer on the same stream does not reach enrich.
        assert!(
            !filters
                .iter()
                .any(|f| subject_matches(f, &subjects::replay("raw", "siem")))
        );
        let correlate = function(&functions, "correlate");
        assert_eq!(
            stream(correlate.consumer.stream),
            stream(enrich.output_stream.expect("enrich emits"))
        );
        let export = function(&functions, "export");
        assert_eq!(
            stream(export.consumer.stream),
            stream(correlate.output_stream.expect("correlate emits"))
        );
        assert!(
            consumer_filter_subjects(&correlate.consumer)
                .iter()
                .any(|f| subject_matches(
                    f,
                    &subjects::enriched("k8s", "n", types::CONTAINER_RESTARTED)
                ))
        );
        assert!(
            consumer_filter_subjects(&export.consumer)
                .iter()
                .any(|f| subject_matches(f, &subjects::insight("oom-cascade")))
        );
    }

    /// What the functions shipped with when their specs were compiled into
    /// this crate: moving them to function.toml must not change them.
    #[test]
    fn the_shipped_functions_keep_their_settings() {
        let functions = functions();
        let scale = |lag_threshold, container_concurrency| ScaleSpec {
            min_replicas: 0,
            max_replicas: 10,
            lag_threshold,
            activation_lag_threshold: 0,
            container_concurrency,
        };
        const CORRELATE_TYPES: [&str; 11] = [
            "dev.tidewatch.k8s.container.*",
            "dev.tidewatch.k8s.pod.deleted",
            "dev.tidewatch.k8s.rollout.started",
            "dev.tidewatch.k8s.rollout.completed",
            "dev.tidewatch.k8s.endpoints.*",
            "dev.tidewatch.k8s.node.notready",
            "dev.tidewatch.k8s.node.ready",
            "dev.tidewatch.kernel.memory.oomkill",
            "dev.tidewatch.kernel.tcp.refused",
            "dev.tidewatch.kernel.tcp.timeout",
            "dev.tidewatch.systemd.unit.*",
        ];
        let consumer = |durable, stream, description| ConsumerSpec {
            durable,
            stream,
            description,
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            types: if durable == "correlate" {
                CORRELATE_TYPES.to_vec()
            } else {
                Vec::new()
            },
        };
        let expected = [
            FunctionSpec {
                name: "enrich",
                consumer: consumer(
                    "enrich",
                    "raw",
                    "enrich: joins raw events with pod metadata",
                ),
                output_stream: Some("enriched"),
                binary: "tidewatch-enrich",
                types: vec![],
                scale: scale(1000, 100),
                concurrency: 256,
            },
            FunctionSpec {
                name: "correlate",
                consumer: consumer(
                    "correlate",
                    "enriched",
                    "correlate: finds root causes across events",
                ),
                output_stream: Some("insights"),
                binary: "tidewatch-correlate",
                types: CORRELATE_TYPES.to_vec(),
                scale: scale(500, 50),
                concurrency: 64,
            },
            FunctionSpec {
                name: "export",
                consumer: consumer("export", "insights", "export: ships insights to sinks"),
                output_stream: None,
                binary: "tidewatch-export",
                types: vec![],
                scale: scale(50, 10),
                concurrency: 64,
            },
        ];
        assert_eq!(functions, expected);
    }

    #[test]
    fn tokens_cannot_add_subject_levels() {
        assert_eq!(subjects::token("ip-10.0.0.1"), "ip-10_0_0_1");
        assert_eq!(subjects::token("a b>*"), "a_b__");
        assert_eq!(subjects::token(""), "_");
    }

    #[test]
    fn sources_round_trip() {
        let s = source("ebpf", "node-1");
        assert_eq!(parse_source(&s), Some(("ebpf", "node-1")));
        assert_eq!(parse_source("/other/x/y"), None);
        assert_eq!(parse_source("/tidewatch/ebpf/"), None);
    }

    #[test]
    fn type_names_follow_the_contract_and_name_known_payloads() {
        for t in types::ALL {
            let parts: Vec<&str> = t.name.split('.').collect();
            assert_eq!(&parts[..2], ["dev", "tidewatch"], "{}", t.name);
            // dev.tidewatch.<domain>.<thing>.<change>, and dev.tidewatch.insight.<kind> as DESIGN.md names insights.
            let expected = if parts[2] == "insight" { 4 } else { 5 };
            assert_eq!(parts.len(), expected, "{}", t.name);
            assert!(
                tidewatch_proto::schema::MESSAGES.contains(&t.payload),
                "{} payload {}",
                t.name,
                t.payload
            );
        }
        assert_eq!(types::insight("crash-loop"), types::INSIGHT_CRASH_LOOP);
    }

    #[test]
    fn type_patterns() {
        assert!(types::matches("dev.tidewatch.kernel.*", types::OOM_KILL));
        assert!(types::matches("*.oomkill", types::OOM_KILL));
        assert!(types::matches("*", types::OOM_KILL));
        assert!(!types::matches("dev.tidewatch.k8s.*", types::OOM_KILL));
        assert!(types::matches(types::OOM_KILL, types::OOM_KILL));
        assert!(!types::matches("a*a", "a"));
        assert!(types::matches("a**b", "ab"));
        assert!(!types::matches("", "x"));
    }

    /// The reference: the obvious backtracking matcher (exponential on
    /// hostile patterns, so only ever run on short inputs here).
    fn backtracking(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| backtracking(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && backtracking(rest, &n[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn the_linear_matcher_agrees_with_backtracking(p in "[ab*.]{0,8}", n in "[ab.]{0,12}") {
            proptest::prop_assert_eq!(types::matches(&p, &n), backtracking(p.as_bytes(), n.as_bytes()));
        }
    }

    #[test]
    fn a_hostile_pattern_over_a_long_field_returns() {
        // Backtracking takes exponential time here; a rule's `where` pattern
        // over a 60 KB journal message must not freeze correlate.
        let field = "a".repeat(60 * 1024);
        assert!(!types::matches("*a*a*a*a*a*a*a*a*a*a*a*a*b", &field));
        assert!(types::matches("*a*a*a*a*a*a*a*a*a*a*a*a*", &field));
    }

    #[test]
    fn enriched_consumers_filter_by_type_on_the_server() {
        let functions = functions();
        let correlate = function(&functions, "correlate");
        let filters = consumer_filter_subjects(&correlate.consumer);
        let gets = |ty: &str| {
            filters.iter().any(|f| {
                subject_matches(
                    f,
                    &subjects::enriched("k8s", "ip-10-0-0-1.ec2.internal", ty),
                )
            })
        };
        for ty in [
            types::CONTAINER_RESTARTED,
            types::CONTAINER_STABLE,
            types::OOM_KILL,
            types::ENDPOINTS_RECOVERED,
            types::UNIT_FAILED,
            types::NODE_READY,
            types::TCP_REFUSED,
        ] {
            assert!(gets(ty), "correlate reads {ty}");
        }
        for ty in [
            types::PROCESS_EXEC,
            types::TCP_CONNECT,
            types::JOURNAL_ENTRY,
        ] {
            assert!(!gets(ty), "correlate is not delivered {ty}");
        }
        // Every filter is distinct and none overlaps another (nats-server refuses that).
        for (i, a) in filters.iter().enumerate() {
            for b in &filters[i + 1..] {
                assert!(
                    !subjects::subsumes(a, b) && !subjects::subsumes(b, a),
                    "{a} / {b}"
                );
            }
        }
        // Patterns become filters at least as wide as the pattern.
        assert_eq!(
            subjects::type_filter("dev.tidewatch.k8s.*"),
            "dev.tidewatch.k8s.>"
        );
        assert_eq!(
            subjects::type_filter("dev.tidewatch.*.oomkill"),
            "dev.tidewatch.>"
        );
        assert_eq!(subjects::type_filter("*"), ">");
        assert_eq!(
            subjects::type_filter("com.example.thing"),
            "com.example.thing"
        );
        // A spec with overlapping patterns keeps the widest.
        let mut wide = correlate.consumer.clone();
        wide.types = vec![
            "dev.tidewatch.k8s.*",
            "dev.tidewatch.k8s.container.restarted",
        ];
        assert_eq!(
            consumer_filter_subjects(&wide),
            [
                "tidewatch.enriched.*.*.dev.tidewatch.k8s.>",
                "tidewatch.replay.enriched.correlate"
            ]
        );
        // Other streams' subjects carry no type: types do not filter there.
        let export = function(&functions, "export");
        assert_eq!(
            consumer_filter_subjects(&export.consumer)[0],
            "tidewatch.insights.>"
        );
        assert!(subjects::subsumes("a.>", "a.b.c") && subjects::subsumes("a.*.c", "a.b.c"));
        assert!(!subjects::subsumes("a.b.c", "a.*.c") && !subjects::subsumes("a.>", "a"));
    }
}
