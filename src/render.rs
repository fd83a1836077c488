//! `tidewatch render`: the Kubernetes manifests, rendered from the topology
//! so names, subjects, consumers and trigger fields cannot drift.
//!
//! Writes `keda/` (a Deployment at `replicas: 0` and a ScaledObject with the
//! `nats-jetstream` trigger per function) and `knative/` (a Service and a
//! Trigger per function on a JetStream-channel Broker, with retries and a
//! dead-letter sink). `tests/manifests.rs` fails when
//! the checked-in files differ from what this renders, and `tidewatch up`
//! reads the ScaledObjects back to drive its local autoscaler.

use std::path::Path;

use anyhow::Context as _;
use serde_json::{Value, json};
use tidewatch_runtime::topology::{self, FunctionSpec};

/// Namespace of the functions (Pod Security "restricted").
pub const FUNCTIONS_NAMESPACE: &str = "tidewatch";
/// NATS monitoring endpoint KEDA polls (`/jsz`), reachable only from KEDA and Prometheus.
pub const NATS_MONITORING: &str = "nats.tidewatch-system.svc.cluster.local:8222";
/// NATS client URL host.
pub const NATS_HOST: &str = "nats.tidewatch-system.svc.cluster.local:4222";
/// JetStream account the streams live in (`$G` unless accounts are configured).
pub const NATS_ACCOUNT: &str = "$G";
/// KEDA polls lag this often, in seconds. Why not KEDA's 30 s default: a
/// burst should start a function within seconds, and one `/jsz` request
/// every 5 s per function is negligible load on NATS.
pub const POLLING_INTERVAL_SECS: u64 = 5;
/// Seconds without lag before a function scales back to zero. Why not
/// KEDA's 300 s: functions start in well under a second and drain on
/// SIGTERM, so a minute of quiet is enough to stop paying for idle pods
/// without flapping between bursts a few seconds apart.
pub const COOLDOWN_PERIOD_SECS: u64 = 60;
/// Grace period on SIGTERM: the runtime stops fetching, drains at most one
/// batch (fetch expiry 1 s) and its in-flight handlers, and acks.
pub const TERMINATION_GRACE_SECS: u64 = 60;

const HEADER: &str = "# Rendered by `tidewatch render` from runtime/src/topology.rs. Do not edit:\n# change the topology and render again (a test fails when these drift).\n";

/// The image holding every Tidewatch binary.
pub fn image() -> String {
    format!("ghcr.io/tidewatch/tidewatch:{}", env!("CARGO_PKG_VERSION"))
}

fn labels(function: &FunctionSpec) -> Value {
    json!({
        "app.kubernetes.io/name": format!("tidewatch-{}", function.name),
        "app.kubernetes.io/part-of": "tidewatch",
        "app.kubernetes.io/component": "function",
    })
}

/// The container every function runs in, hardened for Pod Security "restricted".
fn container(function: &FunctionSpec, transport: &str) -> Value {
    let mut container = json!({
        "name": function.name,
        "image": image(),
        "command": [format!("/usr/local/bin/{}", function.binary)],
        "env": [
            {"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "tidewatch-nats-users", "key": function.name}}},
            {"name": "NATS_URL", "value": format!("nats://{}:$(NATS_PASSWORD)@{NATS_HOST}", function.name)},
            {"name": "TIDEWATCH_TRANSPORT", "value": transport},
            {"name": "TIDEWATCH_METRICS_ADDR", "value": "0.0.0.0:9090"},
            {"name": "TIDEWATCH_LOG_FORMAT", "value": "json"},
            {"name": "RUST_LOG", "value": "info"},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    // Every export deployment reads its own durable (one per sink group).
    if function.binary == topology::EXPORT.binary
        && let Some(env) = container["env"].as_array_mut()
    {
        env.push(json!({"name": "TIDEWATCH_EXPORT_CONSUMER", "value": function.consumer}));
    }
    container
}

/// A function's Deployment for KEDA: starts at zero replicas, KEDA scales it.
pub fn keda_deployment(function: &FunctionSpec) -> Value {
    let mut container = container(function, "jetstream");
    container["ports"] = json!([{"name": "metrics", "containerPort": 9090}]);
    container["readinessProbe"] =
        json!({"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5});
    container["livenessProbe"] =
        json!({"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10});
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": format!("tidewatch-{}", function.name), "namespace": FUNCTIONS_NAMESPACE, "labels": labels(function)},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app.kubernetes.io/name": format!("tidewatch-{}", function.name)}},
            "template": {
                "metadata": {
                    "labels": labels(function),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
                },
                "spec": {
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECS,
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                },
            },
        },
    })
}

/// A function's ScaledObject: the `nats-jetstream` trigger on its durable consumer.
pub fn scaled_object(function: &FunctionSpec, fns: &Functions) -> anyhow::Result<Value> {
    let consumer = fns
        .consumer(function.consumer)
        .with_context(|| format!("no consumer {}", function.consumer))?;
    let stream = topology::stream(consumer.stream)
        .with_context(|| format!("no stream {}", consumer.stream))?;
    Ok(json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": format!("tidewatch-{}", function.name), "namespace": FUNCTIONS_NAMESPACE, "labels": labels(function)},
        "spec": {
            "scaleTargetRef": {"name": format!("tidewatch-{}", function.name)},
            "minReplicaCount": function.scale.min_replicas,
            "maxReplicaCount": function.scale.max_replicas,
            "pollingInterval": POLLING_INTERVAL_SECS,
            "cooldownPeriod": COOLDOWN_PERIOD_SECS,
            "triggers": [{
                "type": "nats-jetstream",
                "metadata": {
                    "natsServerMonitoringEndpoint": NATS_MONITORING,
                    "account": NATS_ACCOUNT,
                    "stream": stream.name,
                    "consumer": consumer.durable,
                    "lagThreshold": function.scale.lag_threshold.to_string(),
                    "activationLagThreshold": function.scale.activation_lag_threshold.to_string(),
                },
            }],
        },
    }))
}

/// Broker every Knative-mode function hangs off.
pub const BROKER: &str = "tidewatch";
/// Knative Service receiving what the broker could not deliver.
pub const DEAD_LETTER_SERVICE: &str = "tidewatch-dead-letters";

/// A function as a Knative Service: HTTP on `$PORT`, scale to zero.
pub fn knative_service(function: &FunctionSpec) -> Value {
    let mut container = container(function, "http");
    container["ports"] = json!([{"containerPort": 8080}]);
    container["readinessProbe"] = json!({"httpGet": {"path": "/readyz"}, "periodSeconds": 5});
    container["livenessProbe"] = json!({"httpGet": {"path": "/healthz"}, "periodSeconds": 10});
    json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": format!("tidewatch-{}", function.name), "namespace": FUNCTIONS_NAMESPACE, "labels": labels(function)},
        "spec": {"template": {
            "metadata": {"annotations": {
                "autoscaling.knative.dev/min-scale": function.scale.min_replicas.to_string(),
                "autoscaling.knative.dev/max-scale": function.scale.max_replicas.to_string(),
                "autoscaling.knative.dev/target": function.scale.container_concurrency.to_string(),
            }},
            "spec": {
                "containerConcurrency": function.scale.container_concurrency,
                "timeoutSeconds": 60,
                "containers": [container],
            },
        }},
    })
}

/// Which events a function's Trigger passes. Replies are told apart from
/// their inputs so they never loop: enrich's outputs carry `resolution`,
/// correlate's are insights, export replies nothing.
fn trigger_filters(function: &FunctionSpec) -> Value {
    let not_insight = json!({"not": {"prefix": {"type": "dev.tidewatch.insight."}}});
    let any_tidewatch = json!({"prefix": {"type": "dev.tidewatch."}});
    let resolved = json!({"exact": {"resolution": "resolved"}});
    let unresolved = json!({"exact": {"resolution": "unresolved"}});
    match function
        .output_stream
        .and_then(topology::stream)
        .map(|s| s.key)
    {
        // Reads raw events: everything Tidewatch but insights and what enrich already handled.
        Some("enriched") => {
            json!([{"all": [any_tidewatch, not_insight, {"not": resolved}, {"not": unresolved}]}])
        }
        // Reads enriched events.
        Some("insights") => {
            json!([{"all": [any_tidewatch, not_insight, {"any": [resolved, unresolved]}]}])
        }
        // Reads insights.
        _ => json!([{"prefix": {"type": "dev.tidewatch.insight."}}]),
    }
}

/// A function's Trigger on the broker, with retries and a dead-letter sink.
pub fn knative_trigger(function: &FunctionSpec) -> Value {
    json!({
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": format!("tidewatch-{}", function.name), "namespace": FUNCTIONS_NAMESPACE, "labels": labels(function)},
        "spec": {
            "broker": BROKER,
            "filters": trigger_filters(function),
            "subscriber": {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": format!("tidewatch-{}", function.name)}},
            "delivery": delivery(),
        },
    })
}

/// Retry with backoff, then the dead-letter sink (the same policy as
/// `max_deliver` in JetStream mode).
fn delivery() -> Value {
    let max_deliver = topology::CONSUMERS
        .first()
        .map(|c| c.max_deliver)
        .unwrap_or(5);
    json!({
        "retry": max_deliver - 1,
        "backoffPolicy": "exponential",
        "backoffDelay": "PT0.5S",
        "deadLetterSink": {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": DEAD_LETTER_SERVICE}},
    })
}

/// The broker: channel-based, on NATS JetStream channels (eventing-natss's
/// `config-natjsm-channel` in knative-eventing).
pub fn knative_broker() -> Value {
    json!({
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Broker",
        "metadata": {
            "name": BROKER,
            "namespace": FUNCTIONS_NAMESPACE,
            "annotations": {"eventing.knative.dev/broker.class": "MTChannelBasedBroker"},
        },
        "spec": {
            "config": {"apiVersion": "v1", "kind": "ConfigMap", "name": "config-natjsm-channel", "namespace": "knative-eventing"},
            "delivery": delivery(),
        },
    })
}

/// Where undeliverable events end: export's binary in HTTP mode, writing
/// each as a JSON line to its log.
pub fn knative_dead_letter_service() -> Value {
    let mut service = knative_service(&topology::EXPORT);
    service["metadata"]["name"] = json!(DEAD_LETTER_SERVICE);
    service["metadata"]["labels"]["app.kubernetes.io/name"] = json!(DEAD_LETTER_SERVICE);
    service
}

/// Namespace of NATS (and, later, the collectors).
pub const SYSTEM_NAMESPACE: &str = "tidewatch-system";
/// JetStream fsync interval. Why: every stream is R3, so a node crash loses
/// nothing that another replica holds; fsync every 10 s (instead of the 2 min
/// default) bounds what a simultaneous power loss of all three could lose,
/// without an fsync per message ("always"), which would cap publish rates.
pub const SYNC_INTERVAL: &str = "10s";
const NATS_REPLICAS: usize = 3;

/// One NATS user per component, with exactly the subjects it needs.
pub struct NatsUser {
    pub name: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What each function may publish and subscribe: its consumer's pull, ack
/// and info subjects, its advisories, its outputs, its dead letters, and the
/// KV buckets it uses.
pub fn nats_users(fns: &Functions) -> Vec<NatsUser> {
    let mut users = Vec::new();
    for function in &fns.functions {
        let Some(consumer) = fns.consumer(function.consumer) else {
            continue;
        };
        let Some(stream) = topology::stream(consumer.stream) else {
            continue;
        };
        let (s, c) = (stream.name, consumer.durable);
        let mut publish = vec![
            "$JS.API.INFO".to_string(),
            format!("$JS.API.STREAM.INFO.{s}"),
            format!("$JS.API.CONSUMER.INFO.{s}.{c}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{c}"),
            format!("$JS.API.STREAM.MSG.GET.{s}"),
            format!("$JS.ACK.{s}.{c}.>"),
            topology::subjects::dead_letter(c),
        ];
        if let Some(output) = function.output_stream.and_then(topology::stream) {
            publish.push(format!("{}.>", output.prefix));
        }
        let buckets: &[&topology::BucketSpec] = match function.name {
            "enrich" => &[&topology::POD_METADATA],
            "correlate" => &[&topology::CORRELATION_STATE],
            _ => &[],
        };
        for bucket in buckets {
            let b = bucket.bucket;
            publish.extend([
                format!("$JS.API.STREAM.INFO.KV_{b}"),
                format!("$JS.API.DIRECT.GET.KV_{b}.>"),
                format!("$JS.API.STREAM.MSG.GET.KV_{b}"),
                // Watches (enrich's cache invalidation) create ordered consumers.
                format!("$JS.API.CONSUMER.CREATE.KV_{b}"),
                format!("$JS.API.CONSUMER.CREATE.KV_{b}.>"),
                format!("$KV.{b}.>"),
            ]);
        }
        users.push(NatsUser {
            name: function.name.to_string(),
            publish,
            subscribe: vec![
                "_INBOX.>".to_string(),
                format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s}.{c}"),
            ],
        });
    }
    // Collectors publish their own raw subjects; the k8s collector also
    // keeps the pod metadata bucket (read, write, delete).
    for collector in COLLECTORS {
        let mut publish = vec![format!("{}.{collector}.>", topology::RAW.prefix)];
        if *collector == "k8s" {
            let b = topology::POD_METADATA.bucket;
            publish.extend([
                "$JS.API.INFO".to_string(),
                format!("$JS.API.STREAM.INFO.KV_{b}"),
                format!("$JS.API.DIRECT.GET.KV_{b}.>"),
                format!("$JS.API.STREAM.MSG.GET.KV_{b}"),
                format!("$KV.{b}.>"),
            ]);
        }
        users.push(NatsUser {
            name: collector.to_string(),
            publish,
            subscribe: vec!["_INBOX.>".to_string()],
        });
    }
    users
}

/// Collectors deployed as DaemonSets, one per node each.
pub const COLLECTORS: &[&str] = &["ebpf", "k8s", "systemd"];

/// Where a collector's outage spool lives on the node (a hostPath, so a
/// restarted pod replays what the previous one spooled).
pub fn spool_host_path(collector: &str) -> String {
    format!("/var/lib/tidewatch/spool/{collector}")
}

/// What differs between the collector DaemonSets.
struct CollectorPod {
    name: &'static str,
    /// Capabilities added after dropping ALL.
    capabilities: &'static [&'static str],
    host_pid: bool,
    /// The k8s collector talks to the API server with its own ServiceAccount.
    service_account: bool,
    /// (volume name, host path, mount path, read-only).
    host_mounts: &'static [(&'static str, &'static str, &'static str, bool)],
    extra_env: Vec<Value>,
    /// Spool on a hostPath (root collectors) or an emptyDir (the k8s
    /// collector runs as non-root; an emptyDir survives container restarts).
    spool_on_host: bool,
    run_as_root: bool,
    memory_limit: &'static str,
}

fn collector_daemonset(pod: CollectorPod) -> Value {
    let name = pod.name;
    let app = format!("tidewatch-collector-{name}");
    let labels = json!({"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "tidewatch", "app.kubernetes.io/component": "collector"});
    let spool_mount = format!("/var/lib/tidewatch/spool/{name}");
    let mut env = vec![
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
        json!({"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "tidewatch-nats-users", "key": name}}}),
        json!({"name": "NATS_URL", "value": format!("nats://{name}:$(NATS_PASSWORD)@{NATS_HOST}")}),
        json!({"name": "TIDEWATCH_METRICS_ADDR", "value": "0.0.0.0:9090"}),
        json!({"name": "TIDEWATCH_SPOOL_DIR", "value": spool_mount}),
        json!({"name": "TIDEWATCH_LOG_FORMAT", "value": "json"}),
    ];
    env.extend(pod.extra_env);
    let mut mounts: Vec<Value> = pod
        .host_mounts
        .iter()
        .map(|(volume, _, mount, read_only)| json!({"name": volume, "mountPath": mount, "readOnly": read_only}))
        .collect();
    mounts.push(json!({"name": "spool", "mountPath": spool_mount}));
    let mut volumes: Vec<Value> = pod
        .host_mounts
        .iter()
        .map(|(volume, host, _, _)| json!({"name": volume, "hostPath": {"path": host}}))
        .collect();
    volumes.push(if pod.spool_on_host {
        json!({"name": "spool", "hostPath": {"path": spool_host_path(name), "type": "DirectoryOrCreate"}})
    } else {
        json!({"name": "spool", "emptyDir": {"sizeLimit": "512Mi"}})
    });
    let mut security = json!({
        "privileged": false,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    });
    if !pod.capabilities.is_empty() {
        security["capabilities"]["add"] = json!(pod.capabilities);
    }
    let pod_security = if pod.run_as_root {
        json!({"runAsUser": 0, "seccompProfile": {"type": "RuntimeDefault"}})
    } else {
        json!({"runAsNonRoot": true, "runAsUser": 65532, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}})
    };
    let mut spec = json!({
        "automountServiceAccountToken": pod.service_account,
        "terminationGracePeriodSeconds": 30,
        "tolerations": [{"operator": "Exists"}],
        "securityContext": pod_security,
        "containers": [{
            "name": "collector",
            "image": image(),
            "command": [format!("/usr/local/bin/{app}")],
            "env": env,
            "ports": [{"name": "metrics", "containerPort": 9090}],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 30},
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": pod.memory_limit}},
            "securityContext": security,
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if pod.host_pid {
        spec["hostPID"] = json!(true);
    }
    if pod.service_account {
        spec["serviceAccountName"] = json!(app);
    }
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": app, "namespace": SYSTEM_NAMESPACE, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": app}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
            "template": {
                "metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"}},
                "spec": spec,
            },
        },
    })
}

/// The eBPF collector: the capabilities it needs, not privileged
/// (collectors/ebpf/README.md explains each). Pids in events are host
/// pids, and the start-up replay reads the host's /proc: `hostPID`.
pub fn ebpf_daemonset() -> Value {
    collector_daemonset(CollectorPod {
        name: "ebpf",
        capabilities: &["BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE"],
        host_pid: true,
        service_account: false,
        host_mounts: &[
            ("cgroup", "/sys/fs/cgroup", "/sys/fs/cgroup", true),
            ("btf", "/sys/kernel/btf", "/sys/kernel/btf", true),
            (
                "tracefs",
                "/sys/kernel/tracing",
                "/sys/kernel/tracing",
                false,
            ),
            ("bpffs", "/sys/fs/bpf", "/sys/fs/bpf", false),
        ],
        extra_env: Vec::new(),
        spool_on_host: true,
        run_as_root: true,
        memory_limit: "512Mi",
    })
}

/// The Kubernetes collector: no capabilities, non-root, its own
/// ServiceAccount (read-only RBAC, plus the election Lease).
pub fn k8s_daemonset() -> Value {
    collector_daemonset(CollectorPod {
        name: "k8s",
        capabilities: &[],
        host_pid: false,
        service_account: true,
        host_mounts: &[],
        extra_env: vec![
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        ],
        spool_on_host: false,
        run_as_root: false,
        memory_limit: "512Mi",
    })
}

/// The systemd collector: the host's journal and the system D-Bus socket,
/// read-only; root (journal files are root:systemd-journal 0640) with
/// every capability dropped.
pub fn systemd_daemonset() -> Value {
    collector_daemonset(CollectorPod {
        name: "systemd",
        capabilities: &[],
        host_pid: false,
        service_account: false,
        host_mounts: &[
            ("journal", "/var/log/journal", "/host/var/log/journal", true),
            (
                "runtime-journal",
                "/run/log/journal",
                "/host/run/log/journal",
                true,
            ),
            (
                "machine-id",
                "/etc/machine-id",
                "/host/etc/machine-id",
                true,
            ),
            ("dbus", "/run/dbus", "/run/dbus", true),
        ],
        extra_env: vec![json!({"name": "TIDEWATCH_HOST_ROOT", "value": "/host"})],
        spool_on_host: true,
        run_as_root: true,
        memory_limit: "256Mi",
    })
}

/// Read-only access to exactly what the k8s collector watches, and the
/// Lease its replicas elect a leader with (in its own namespace only).
pub fn k8s_rbac() -> Vec<Value> {
    let name = "tidewatch-collector-k8s";
    let read = ["get", "list", "watch"];
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": K8S_READS.iter().map(|(group, resources)| json!({"apiGroups": [group], "resources": resources, "verbs": read})).collect::<Vec<_>>(),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NAMESPACE}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": format!("{name}-election"), "namespace": SYSTEM_NAMESPACE},
            "rules": [
                // `create` cannot be limited by name (the object does not exist yet).
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [K8S_LEASE], "verbs": ["get", "update"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{name}-election"), "namespace": SYSTEM_NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": format!("{name}-election")},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NAMESPACE}],
        }),
    ]
}

/// (API group, resources) the k8s collector lists and watches.
pub const K8S_READS: &[(&str, &[&str])] = &[
    ("", &["pods", "nodes", "events", "services"]),
    ("apps", &["deployments", "replicasets"]),
    ("discovery.k8s.io", &["endpointslices"]),
];
/// The Lease the k8s collector's replicas elect a leader with.
pub const K8S_LEASE: &str = "tidewatch-collector-k8s";

/// The `authorization` block of nats.conf; passwords come from the
/// environment (`$<USER>_PASSWORD`), filled from the Secret.
pub fn nats_authorization(fns: &Functions) -> String {
    let quote = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("authorization {\n  users: [\n");
    out.push_str("    # Provisioning (the Job) and operators: full access.\n");
    out.push_str("    { user: admin, password: $ADMIN_PASSWORD }\n");
    for user in nats_users(fns) {
        out.push_str(&format!(
            "    {{ user: {}, password: ${}_PASSWORD, permissions: {{\n        publish: [{}]\n        subscribe: [{}]\n    }} }}\n",
            user.name,
            user.name.to_uppercase(),
            quote(&user.publish),
            quote(&user.subscribe)
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

fn nats_conf() -> String {
    let routes: Vec<String> = (0..NATS_REPLICAS)
        .map(|i| {
            format!("    nats://nats-{i}.nats-headless.{SYSTEM_NAMESPACE}.svc.cluster.local:6222")
        })
        .collect();
    format!(
        "server_name: $POD_NAME\nlisten: 0.0.0.0:4222\nhttp: 0.0.0.0:8222\n\njetstream {{\n  store_dir: /data/jetstream\n  max_file_store: 10GB\n  # R3 streams survive a node crash; fsync every {SYNC_INTERVAL} bounds a power loss of all three.\n  sync_interval: {SYNC_INTERVAL}\n}}\n\ncluster {{\n  name: tidewatch\n  listen: 0.0.0.0:6222\n  routes: [\n{}\n  ]\n}}\n\ninclude ./auth.conf\n",
        routes.join("\n")
    )
}

fn nats_labels() -> Value {
    json!({"app.kubernetes.io/name": "nats", "app.kubernetes.io/part-of": "tidewatch"})
}

/// NATS as a StatefulSet: three JetStream nodes with persistent volumes.
/// A plain StatefulSet rather than the Helm chart so `kubectl apply -k`
/// needs no Helm, and the config (users, permissions) is rendered from the
/// topology like everything else.
pub fn nats_objects(fns: &Functions) -> Vec<Value> {
    let password_env: Vec<Value> = std::iter::once("admin".to_string())
        .chain(nats_users(fns).into_iter().map(|u| u.name))
        .map(|name| json!({"name": format!("{}_PASSWORD", name.to_uppercase()), "valueFrom": {"secretKeyRef": {"name": "tidewatch-nats-users", "key": name}}}))
        .collect();
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    env.extend(password_env);
    vec![
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "nats-config", "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "data": {"nats.conf": nats_conf(), "auth.conf": nats_authorization(fns)},
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "nats-headless", "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "selector": nats_labels(),
                     "ports": [{"name": "client", "port": 4222}, {"name": "cluster", "port": 6222}, {"name": "monitor", "port": 8222}]},
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "nats", "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "spec": {"selector": nats_labels(), "ports": [{"name": "client", "port": 4222}, {"name": "monitor", "port": 8222}]},
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "nats", "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "spec": {
                "serviceName": "nats-headless",
                "replicas": NATS_REPLICAS,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": nats_labels()},
                "template": {
                    "metadata": {"labels": nats_labels()},
                    "spec": {
                        "terminationGracePeriodSeconds": 60,
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "nats",
                            "image": "nats:2.11-alpine",
                            "args": ["--config", "/etc/nats/nats.conf"],
                            "env": env,
                            "ports": [{"name": "client", "containerPort": 4222}, {"name": "cluster", "containerPort": 6222}, {"name": "monitor", "containerPort": 8222}],
                            "readinessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"}, "periodSeconds": 10},
                            "livenessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"}, "periodSeconds": 30, "failureThreshold": 5},
                            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/nats"}, {"name": "data", "mountPath": "/data"}],
                        }],
                        "volumes": [{"name": "config", "configMap": {"name": "nats-config"}}],
                    },
                },
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
                }],
            },
        }),
    ]
}

/// Namespaces, labelled for Pod Security: functions "restricted"; the
/// system namespace "privileged" because the eBPF collector runs there.
pub fn namespaces() -> Vec<Value> {
    let ns = |name: &str, level: &str| {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {
            "pod-security.kubernetes.io/enforce": level,
            "pod-security.kubernetes.io/warn": level,
            "app.kubernetes.io/part-of": "tidewatch",
        }}})
    };
    vec![
        ns(SYSTEM_NAMESPACE, "privileged"),
        ns(FUNCTIONS_NAMESPACE, "restricted"),
    ]
}

/// NATS users' passwords. Placeholders: replace them before production
/// (`kubectl create secret generic tidewatch-nats-users --from-literal=...`).
pub fn secrets(fns: &Functions) -> Vec<Value> {
    let mut data = serde_json::Map::new();
    data.insert("admin".into(), json!("change-me-admin"));
    for user in nats_users(fns) {
        data.insert(user.name.clone(), json!(format!("change-me-{}", user.name)));
    }
    [SYSTEM_NAMESPACE, FUNCTIONS_NAMESPACE]
        .iter()
        .map(|ns| {
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "tidewatch-nats-users", "namespace": ns}, "stringData": data})
        })
        .collect()
}

/// The Job that provisions streams, consumers and buckets (idempotent, so
/// re-applying it is safe).
pub fn provision_job() -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "tidewatch-provision", "namespace": SYSTEM_NAMESPACE, "labels": {"app.kubernetes.io/part-of": "tidewatch"}},
        "spec": {
            "backoffLimit": 10,
            "template": {"spec": {
                "restartPolicy": "OnFailure",
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "provision",
                    "image": image(),
                    "command": ["/usr/local/bin/tidewatch", "provision", "--replicas", NATS_REPLICAS.to_string()],
                    "env": [
                        {"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "tidewatch-nats-users", "key": "admin"}}},
                        {"name": "NATS_URL", "value": format!("nats://admin:$(NATS_PASSWORD)@{NATS_HOST}")},
                    ],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                }],
            }},
        },
    })
}

/// NATS' monitoring port (lag, used by KEDA) only for KEDA and Prometheus;
/// clients only from Tidewatch's namespaces; routes only between NATS pods.
pub fn network_policies() -> Vec<Value> {
    let from_ns = |ns: &str| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}});
    vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "nats", "namespace": SYSTEM_NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": nats_labels()},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [from_ns(SYSTEM_NAMESPACE), from_ns(FUNCTIONS_NAMESPACE)], "ports": [{"port": 4222}]},
                {"from": [{"podSelector": {"matchLabels": nats_labels()}}], "ports": [{"port": 6222}]},
                {"from": [from_ns("keda"), from_ns("monitoring")], "ports": [{"port": 8222}]},
            ],
        },
    })]
}

/// YAML for several objects, with the header and the justifying comments
/// that serde cannot write.
fn yaml(objects: &[Value]) -> anyhow::Result<String> {
    let mut out = String::from(HEADER);
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object)?);
    }
    Ok(out
        .replace(
            &format!("  pollingInterval: {POLLING_INTERVAL_SECS}\n"),
            &format!(
                "  # {POLLING_INTERVAL_SECS} s, not KEDA's 30 s default: a burst starts a function within seconds, and\n  # one /jsz request per function every {POLLING_INTERVAL_SECS} s is negligible load on NATS.\n  pollingInterval: {POLLING_INTERVAL_SECS}\n"
            ),
        )
        .replace(
            &format!("  cooldownPeriod: {COOLDOWN_PERIOD_SECS}\n"),
            &format!(
                "  # {COOLDOWN_PERIOD_SECS} s of no lag before scaling to zero, not KEDA's 300 s: functions start in well\n  # under a second and drain on SIGTERM, so a minute of quiet is enough without flapping between bursts.\n  cooldownPeriod: {COOLDOWN_PERIOD_SECS}\n"
            ),
        )
        .replace(
            &format!("terminationGracePeriodSeconds: {TERMINATION_GRACE_SECS}\n"),
            &format!("terminationGracePeriodSeconds: {TERMINATION_GRACE_SECS} # drain: one fetch (1 s) + in-flight handlers + acks\n"),
        ))
}

fn kustomization(resources: &[String]) -> anyhow::Result<String> {
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
    });
    Ok(yaml(&[kustomization])?.replace("---\n", ""))
}

/// The functions and consumers to render: the compiled topology, plus a
/// function `tidewatch new function` is adding (not compiled in yet).
pub struct Functions {
    pub functions: Vec<FunctionSpec>,
    pub consumers: Vec<topology::ConsumerSpec>,
}

impl Functions {
    pub fn compiled() -> Functions {
        Functions {
            functions: topology::FUNCTIONS.to_vec(),
            consumers: topology::CONSUMERS.to_vec(),
        }
    }

    fn consumer(&self, durable: &str) -> Option<&topology::ConsumerSpec> {
        self.consumers.iter().find(|c| c.durable == durable)
    }
}

/// Every rendered file for the compiled topology.
pub fn render() -> anyhow::Result<Vec<(String, String)>> {
    render_with(&Functions::compiled())
}

/// Every rendered file for `fns`, as (path relative to the repository root, contents).
pub fn render_with(fns: &Functions) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut resources = Vec::new();
    for function in &fns.functions {
        let file = format!("{}.yaml", function.name);
        files.push((
            format!("keda/{file}"),
            yaml(&[keda_deployment(function), scaled_object(function, fns)?])?,
        ));
        resources.push(file);
    }
    files.push((
        "keda/kustomization.yaml".to_string(),
        kustomization(&resources)?,
    ));

    let deploy = [
        ("namespaces.yaml", namespaces()),
        ("secrets.yaml", secrets(fns)),
        ("nats.yaml", nats_objects(fns)),
        ("network-policies.yaml", network_policies()),
        ("provision.yaml", vec![provision_job()]),
        ("collector-ebpf.yaml", vec![ebpf_daemonset()]),
        ("collector-k8s.yaml", {
            let mut objects = k8s_rbac();
            objects.push(k8s_daemonset());
            objects
        }),
        ("collector-systemd.yaml", vec![systemd_daemonset()]),
    ];
    let mut resources = Vec::new();
    for (file, objects) in deploy {
        files.push((format!("deploy/{file}"), yaml(&objects)?));
        resources.push(file.to_string());
    }
    files.push((
        "deploy/kustomization.yaml".to_string(),
        kustomization(&resources)?,
    ));

    let mut resources = vec!["broker.yaml".to_string()];
    files.push((
        "knative/broker.yaml".to_string(),
        yaml(&[knative_broker(), knative_dead_letter_service()])?,
    ));
    for function in &fns.functions {
        let file = format!("{}.yaml", function.name);
        files.push((
            format!("knative/{file}"),
            yaml(&[knative_service(function), knative_trigger(function)])?,
        ));
        resources.push(file);
    }
    files.push((
        "knative/kustomization.yaml".to_string(),
        kustomization(&resources)?,
    ));
    Ok(files)
}

#[derive(clap::Args)]
pub struct RenderArgs {
    /// Repository root to write into.
    #[arg(long, default_value = ".")]
    out: std::path::PathBuf,
    /// Only check that the files on disk match; exit non-zero if they drifted.
    #[arg(long)]
    check: bool,
}

pub fn run(args: RenderArgs) -> anyhow::Result<()> {
    write(&args.out, args.check, render()?)
}

/// Write rendered files under `out` (or, with `check`, only compare).
pub fn write(
    out: &std::path::Path,
    check: bool,
    files: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let mut drifted = Vec::new();
    for (path, contents) in files {
        let target = out.join(&path);
        let current = std::fs::read_to_string(&target).unwrap_or_default();
        if current == contents {
            continue;
        }
        if check {
            drifted.push(path);
            continue;
        }
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        std::fs::write(&target, contents).with_context(|| format!("write {}", target.display()))?;
        println!("wrote {path}");
    }
    if !drifted.is_empty() {
        anyhow::bail!(
            "these files differ from the topology: {} — run `tidewatch render`",
            drifted.join(", ")
        );
    }
    Ok(())
}

/// Read the scaling settings of every ScaledObject in `dir` (keda/).
pub fn read_scaled_objects(
    dir: &Path,
) -> anyhow::Result<Vec<(String, crate::autoscale::ScalePolicy)>> {
    let mut found = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .with_context(|| format!("parse {}", path.display()))?;
            if value["kind"] != "ScaledObject" {
                continue;
            }
            let spec = &value["spec"];
            let trigger = spec["triggers"]
                .as_array()
                .and_then(|t| t.iter().find(|t| t["type"] == "nats-jetstream"))
                .with_context(|| {
                    format!(
                        "{}: ScaledObject without a nats-jetstream trigger",
                        path.display()
                    )
                })?;
            let number = |v: &Value, default: u64| -> anyhow::Result<u64> {
                match v {
                    Value::Null => Ok(default),
                    Value::Number(n) => n.as_u64().context("not a whole number"),
                    Value::String(s) => s
                        .parse()
                        .with_context(|| format!("{s:?} is not a whole number")),
                    other => anyhow::bail!("{other} is not a number"),
                }
            };
            let defaults = crate::autoscale::ScalePolicy::default();
            let metadata = &trigger["metadata"];
            let policy = crate::autoscale::ScalePolicy {
                min_replicas: number(&spec["minReplicaCount"], u64::from(defaults.min_replicas))?
                    as u32,
                max_replicas: number(&spec["maxReplicaCount"], u64::from(defaults.max_replicas))?
                    as u32,
                lag_threshold: number(&metadata["lagThreshold"], defaults.lag_threshold)?,
                activation_lag_threshold: number(
                    &metadata["activationLagThreshold"],
                    defaults.activation_lag_threshold,
                )?,
                polling_interval: std::time::Duration::from_secs(number(
                    &spec["pollingInterval"],
                    30,
                )?),
                cooldown_period: std::time::Duration::from_secs(number(
                    &spec["cooldownPeriod"],
                    300,
                )?),
                scale_down_window: defaults.scale_down_window,
            };
            let consumer = metadata["consumer"]
                .as_str()
                .with_context(|| format!("{}: trigger without a consumer", path.display()))?
                .to_string();
            found.push((consumer, policy));
        }
    }
    Ok(found)
}

use serde::Deserialize as _;
