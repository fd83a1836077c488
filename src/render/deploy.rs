//! The base, `deploy/`: namespaces, the provisioning Job, the collector
//! DaemonSets with their RBAC, and (optional overlay) PodMonitors. NATS
//! itself is in [`super::nats`].

use serde_json::{Value, json};
use tidewatch_runtime::topology;

use super::functions::{ca_volume, nats_client_env};
use super::nats;
use super::{
    FUNCTIONS_NAMESPACE, Functions, SYSTEM_NAMESPACE, image, labels, resources, selector,
    short_hash,
};

/// Where a collector's outage spool lives on the node (a hostPath, so a
/// restarted pod replays what the previous one spooled).
pub fn spool_host_path(collector: &str) -> String {
    format!("/var/lib/tidewatch/spool/{collector}")
}

/// Where collectors find their NATS token (a projected ServiceAccount
/// token for audience [`NATS_TOKEN_AUDIENCE`], rotated by the kubelet).
pub const NATS_TOKEN_MOUNT: &str = "/var/run/secrets/tidewatch/nats";
/// The audience of that token: the auth callout refuses tokens for any other.
pub const NATS_TOKEN_AUDIENCE: &str = "nats";
/// Its lifetime. The kubelet rotates it at 80 %; the callout's grant ends
/// with it, and the collector reconnects with the new one.
pub const NATS_TOKEN_SECONDS: u64 = 3600;

fn nats_token_volume() -> Value {
    json!({"name": "nats-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": NATS_TOKEN_AUDIENCE, "expirationSeconds": NATS_TOKEN_SECONDS, "path": "token",
    }}]}})
}

/// A collector's ServiceAccount (the k8s collector's comes with its RBAC):
/// no API rights, only an identity for the auth callout.
pub fn collector_service_account(collector: &str) -> Value {
    let name = tidewatch_auth_callout::grant::service_account(collector);
    json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels(&name, "collector")},
        "automountServiceAccountToken": false,
    })
}

/// What differs between the collector DaemonSets.
struct CollectorPod {
    name: &'static str,
    /// Capabilities added after dropping ALL.
    capabilities: &'static [&'static str],
    host_pid: bool,
    /// The k8s collector talks to the API server: its ServiceAccount token is mounted.
    service_account: bool,
    /// (volume name, host path, mount path, read-only).
    host_mounts: &'static [(&'static str, &'static str, &'static str, bool)],
    extra_env: Vec<Value>,
    user: RunAs,
    memory_limit: &'static str,
    /// A config file from a ConfigMap named after the DaemonSet: (the
    /// variable the collector reads its path from, the file). The pods roll
    /// when it changes.
    config: Option<(&'static str, String)>,
}

/// Who a collector runs as.
enum RunAs {
    Root,
    /// A uid (and its own primary gid: never the root group an unknown uid
    /// would get), plus supplementary groups.
    User {
        uid: u32,
        groups: Vec<u32>,
    },
}

/// The image's user, for collectors that need nothing of the host's.
pub const IMAGE_UID: u32 = 65532;
/// The systemd collector's uid: `nobody`. Why not the image's 65532:
/// dbus-daemon refuses connections from a uid its user database does not
/// know, and 65534 is in every distribution's /etc/passwd.
pub const SYSTEMD_UID: u32 = 65534;
/// The default gid of the host's `systemd-journal` group: fixed at 190 on
/// Fedora, RHEL and their derivatives (CoreOS, Amazon Linux); allocated at
/// install elsewhere (Debian 12: 999). `tidewatch render --systemd-journal-gid`.
pub const SYSTEMD_JOURNAL_GID: u32 = 190;

fn collector_daemonset(pod: CollectorPod) -> Value {
    let name = pod.name;
    let app = format!("tidewatch-collector-{name}");
    let labels = labels(&app, "collector");
    let spool_mount = format!("/var/lib/tidewatch/spool/{name}");
    let mut env = vec![
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
    ];
    // No password: the pod's projected ServiceAccount token, which the
    // auth callout turns into this collector's rights on this node only.
    env.extend([
        json!({"name": "NATS_URL", "value": nats::client_url()}),
        json!({"name": "NATS_USER", "value": name}),
        json!({"name": tidewatch_runtime::host::NATS_TOKEN_FILE_ENV, "value": format!("{NATS_TOKEN_MOUNT}/token")}),
        json!({"name": "NATS_CA_FILE", "value": format!("{}/ca.crt", nats::CA_MOUNT)}),
    ]);
    env.extend([
        json!({"name": "TIDEWATCH_METRICS_ADDR", "value": "0.0.0.0:9090"}),
        json!({"name": "TIDEWATCH_SPOOL_DIR", "value": spool_mount}),
        json!({"name": "TIDEWATCH_LOG_FORMAT", "value": "json"}),
    ]);
    env.extend(pod.extra_env);
    if let Some((variable, _)) = &pod.config {
        env.push(json!({"name": variable, "value": format!("{}/config.toml", config_dir(name))}));
    }
    let mut mounts: Vec<Value> = pod
        .host_mounts
        .iter()
        .map(|(volume, _, mount, read_only)| json!({"name": volume, "mountPath": mount, "readOnly": read_only}))
        .collect();
    mounts.push(json!({"name": "spool", "mountPath": spool_mount}));
    if pod.config.is_some() {
        mounts.push(json!({"name": "config", "mountPath": config_dir(name), "readOnly": true}));
    }
    let (ca, ca_mount) = ca_volume();
    mounts.push(ca_mount);
    mounts.push(json!({"name": "nats-token", "mountPath": NATS_TOKEN_MOUNT, "readOnly": true}));
    let mut volumes: Vec<Value> = pod
        .host_mounts
        .iter()
        .map(|(volume, host, _, _)| json!({"name": volume, "hostPath": {"path": host}}))
        .collect();
    // Every spool is on a hostPath: it outlives the pod, so a replacement
    // pod (rolling update, drain) replays the events of an outage; an
    // emptyDir would go with the deleted pod.
    volumes.push(
        json!({"name": "spool", "hostPath": {"path": spool_host_path(name), "type": "DirectoryOrCreate"}}),
    );
    volumes.push(ca);
    volumes.push(nats_token_volume());
    if pod.config.is_some() {
        volumes.push(json!({"name": "config", "configMap": {"name": app}}));
    }
    let mut security = json!({
        "privileged": false,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    });
    if !pod.capabilities.is_empty() {
        security["capabilities"]["add"] = json!(pod.capabilities);
    }
    let pod_security = match &pod.user {
        RunAs::Root => json!({"runAsUser": 0, "seccompProfile": {"type": "RuntimeDefault"}}),
        RunAs::User { uid, groups } => {
            let mut sc = json!({"runAsNonRoot": true, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}});
            if !groups.is_empty() {
                sc["supplementalGroups"] = json!(groups);
            }
            sc
        }
    };
    // kubelet creates a missing hostPath directory as root 0755: a non-root
    // collector gets it handed over first, by an init container that may
    // only chown (`tidewatch own-dir` never follows links).
    let init = match &pod.user {
        RunAs::User { uid, .. } => Some(json!({
            "name": "spool-owner",
            "image": image(),
            "command": ["/usr/local/bin/tidewatch", "own-dir", "--uid", uid.to_string(), "--gid", uid.to_string(), &spool_mount],
            "resources": resources("10m", "16Mi", "64Mi"),
            "securityContext": {
                "runAsUser": 0, "runAsNonRoot": false, "privileged": false,
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
            },
            "volumeMounts": [{"name": "spool", "mountPath": spool_mount}],
        })),
        _ => None,
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
            "resources": resources("50m", "64Mi", pod.memory_limit),
            "securityContext": security,
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if let Some(init) = init {
        spec["initContainers"] = json!([init]);
    }
    let mut annotations = json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9090"});
    if let Some((_, file)) = &pod.config {
        annotations["checksum/config"] = json!(short_hash(file));
    }
    if pod.host_pid {
        spec["hostPID"] = json!(true);
    }
    // Every collector has its own ServiceAccount: its token is its NATS
    // identity. Only the k8s collector's is also mounted for the API.
    spec["serviceAccountName"] = json!(tidewatch_auth_callout::grant::service_account(name));
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": app, "namespace": SYSTEM_NAMESPACE, "labels": labels},
        "spec": {
            "selector": {"matchLabels": selector(&app)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": spec,
            },
        },
    })
}

/// The eBPF collector: the capabilities it needs, not privileged
/// (collectors/ebpf/README.md explains each; no SYS_PTRACE: the replay's
/// executable paths are off by default). `hostPID`: pids in events are the
/// kernel's init-namespace pids, and attribution and the start-up replay
/// read `/proc/<pid>` for exactly those. Root: Kubernetes gives added
/// capabilities to uid 0 only (no ambient capabilities).
/// Where a collector reads its config file (a ConfigMap).
fn config_dir(collector: &str) -> String {
    format!("/etc/tidewatch/{collector}")
}

/// The kernel event kinds someone reads, of those the eBPF collector
/// emits: what `interest` patterns match (None: every kind).
pub fn ebpf_events(interest: Option<&[&str]>) -> Option<Vec<&'static str>> {
    let interest = interest?;
    Some(
        topology::types::ALL
            .iter()
            .map(|t| t.name)
            // Kinds it emits from the kernel (drops are always reported;
            // process.exists comes from the start-up replay).
            .filter(|t| {
                t.starts_with("dev.tidewatch.kernel.")
                    && ![
                        topology::types::COLLECTOR_DROPS,
                        topology::types::PROCESS_EXISTS,
                    ]
                    .contains(t)
            })
            .filter(|t| interest.iter().any(|p| topology::types::matches(p, t)))
            .collect(),
    )
}

/// The eBPF collector's ConfigMap and DaemonSet. It collects, in the
/// kernel, only the kinds some function reads (`interest`: the functions'
/// `types`; `None`: every kind, `tidewatch render --collect-everything`):
/// what nobody reads is never copied out of the kernel, let alone sent.
pub fn ebpf_objects(interest: Option<&[&str]>) -> (Value, Value) {
    let name = "tidewatch-collector-ebpf";
    let events = ebpf_events(interest);
    let toml = match &events {
        None => "# Every kernel event kind (tidewatch render --collect-everything).\nevents = []\n"
            .to_string(),
        Some(list) => format!(
            "# The kernel event kinds some function reads (their function.toml `types`);\n# `tidewatch render --collect-everything` collects all.\nevents = [{}]\n",
            list.iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let config = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels(name, "collector")},
        "data": {"config.toml": toml},
    });
    (config, ebpf_daemonset(toml))
}

fn ebpf_daemonset(config: String) -> Value {
    collector_daemonset(CollectorPod {
        name: "ebpf",
        capabilities: &["BPF", "PERFMON", "SYS_RESOURCE"],
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
        user: RunAs::Root,
        memory_limit: "512Mi",
        config: Some(("TIDEWATCH_EBPF_CONFIG", config)),
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
        user: RunAs::User {
            uid: IMAGE_UID,
            groups: Vec::new(),
        },
        memory_limit: "512Mi",
        config: None,
    })
}

/// The systemd collector: the host's journal and the system D-Bus socket,
/// read-only; not root, no capabilities. The journal (root:systemd-journal
/// 0640) through the host's `systemd-journal` gid as a supplementary group;
/// unit state over D-Bus, where systemd refuses every state-changing call
/// from non-root (collectors/systemd/dbus/ has a policy that refuses them
/// on the bus too).
pub fn systemd_daemonset(journal_gid: u32) -> Value {
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
        user: RunAs::User {
            uid: SYSTEMD_UID,
            groups: vec![journal_gid],
        },
        memory_limit: "256Mi",
        config: None,
    })
}

/// Read-only access to exactly what the k8s collector watches, and the
/// Lease its replicas elect a leader with (in its own namespace only).
pub fn k8s_rbac() -> Vec<Value> {
    let name = &tidewatch_auth_callout::grant::service_account("k8s");
    let read = ["get", "list", "watch"];
    let labels = labels(name, "collector");
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": labels}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "rules": K8S_READS.iter().map(|(group, resources)| json!({"apiGroups": [group], "resources": resources, "verbs": read})).collect::<Vec<_>>(),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM_NAMESPACE}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": format!("{name}-election"), "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "rules": [
                // `create` cannot be limited by name (the object does not exist yet).
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [K8S_LEASE], "verbs": ["get", "update"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{name}-election"), "namespace": SYSTEM_NAMESPACE, "labels": labels},
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

/// Namespaces, labelled for Pod Security: functions "restricted"; the
/// system namespace "privileged" because the eBPF collector runs there.
pub fn namespaces() -> Vec<Value> {
    let ns = |name: &str, level: &str| {
        let mut labels = labels(name, "namespace");
        labels["pod-security.kubernetes.io/enforce"] = json!(level);
        labels["pod-security.kubernetes.io/warn"] = json!(level);
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    };
    vec![
        ns(SYSTEM_NAMESPACE, "privileged"),
        ns(FUNCTIONS_NAMESPACE, "restricted"),
    ]
}

/// The Job that provisions streams, buckets and consumers as `admin`
/// (idempotent; converges older configs). Its name carries a hash of the
/// topology, so an apply after the topology changed runs a new Job (a
/// finished Job's pod template is immutable and would never run again).
pub fn provision_job(fns: &Functions) -> Value {
    let name = format!(
        "tidewatch-provision-{}",
        short_hash(&format!(
            "{:?}{:?}{:?}",
            topology::STREAMS,
            topology::BUCKETS,
            fns.consumers()
        ))
    );
    provisioning_job("tidewatch-provision", name, SYSTEM_NAMESPACE, "admin", &[])
}

/// A provisioning Job: `tidewatch provision` (plus `args`) as NATS `user`,
/// named `name` so a changed topology runs a new Job.
pub fn provisioning_job(
    app: &str,
    name: String,
    namespace: &str,
    user: &str,
    args: &[&str],
) -> Value {
    let (volume, mount) = ca_volume();
    let mut env = nats_client_env(user);
    env.push(json!({"name": "TIDEWATCH_LOG_FORMAT", "value": "json"}));
    let labels = labels(app, "provisioning");
    let mut command = vec![
        "/usr/local/bin/tidewatch".to_string(),
        "provision".to_string(),
    ];
    command.extend(args.iter().map(|a| a.to_string()));
    command.extend(["--replicas".to_string(), nats::REPLICAS.to_string()]);
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 10,
            // Kept a day for `kubectl logs`; a later apply re-creates and re-runs it, harmlessly.
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "provision",
                        "image": image(),
                        "command": command,
                        "env": env,
                        "resources": resources("50m", "32Mi", "128Mi"),
                        "volumeMounts": [mount],
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                    }],
                    "volumes": [volume],
                },
            },
        },
    })
}

/// Prometheus Operator PodMonitors for every `/metrics` endpoint: the
/// functions and the collectors (optional overlay `deploy/monitoring/`).
pub fn pod_monitors() -> Vec<Value> {
    [
        ("tidewatch-functions", FUNCTIONS_NAMESPACE, "function"),
        ("tidewatch-collectors", SYSTEM_NAMESPACE, "collector"),
    ]
    .into_iter()
    .map(|(name, namespace, component)| {
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "monitoring")},
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/part-of": "tidewatch", "app.kubernetes.io/component": component}},
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
            },
        })
    })
    .collect()
}

/// The NATS auth callout (`auth-callout/`): two replicas answering the
/// server's authorization requests in a queue group, allowed to create
/// TokenReviews (`system:auth-delegator`) and nothing else of the API.
pub fn auth_callout_objects() -> Vec<Value> {
    let app = "tidewatch-auth-callout";
    let labels = labels(app, "auth");
    let (ca, ca_mount) = ca_volume();
    let seed_dir = "/etc/tidewatch/auth-callout";
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": app, "namespace": SYSTEM_NAMESPACE, "labels": labels}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": app, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
            "subjects": [{"kind": "ServiceAccount", "name": app, "namespace": SYSTEM_NAMESPACE}],
        }),
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": app, "namespace": SYSTEM_NAMESPACE, "labels": labels},
            // Without an answering callout no collector can (re)connect.
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector(app)}},
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": app, "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": selector(app)},
                "template": {
                    "metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"}},
                    "spec": {
                        "serviceAccountName": app,
                        "securityContext": {"runAsNonRoot": true, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}},
                        "topologySpreadConstraints": [
                            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": selector(app)}},
                        ],
                        "containers": [{
                            "name": "auth-callout",
                            "image": image(),
                            "command": [format!("/usr/local/bin/{app}")],
                            "env": [
                                {"name": "NATS_URL", "value": nats::client_url()},
                                {"name": "NATS_USER", "value": nats::AUTH_CALLOUT_USER},
                                {"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": super::AUTH_CALLOUT_SECRET, "key": nats::AUTH_CALLOUT_USER}}},
                                {"name": "NATS_CA_FILE", "value": format!("{}/ca.crt", nats::CA_MOUNT)},
                                {"name": "TIDEWATCH_AUTH_ISSUER_SEED_FILE", "value": format!("{seed_dir}/issuer.seed")},
                                {"name": "TIDEWATCH_AUTH_NAMESPACE", "value": SYSTEM_NAMESPACE},
                                {"name": "TIDEWATCH_AUTH_AUDIENCE", "value": NATS_TOKEN_AUDIENCE},
                                {"name": "TIDEWATCH_METRICS_ADDR", "value": "0.0.0.0:9090"},
                                {"name": "TIDEWATCH_LOG_FORMAT", "value": "json"},
                            ],
                            "ports": [{"name": "metrics", "containerPort": 9090}],
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 30},
                            "resources": resources("20m", "32Mi", "128Mi"),
                            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [
                                {"name": "issuer", "mountPath": seed_dir, "readOnly": true},
                                ca_mount,
                            ],
                        }],
                        "volumes": [
                            {"name": "issuer", "secret": {"secretName": super::AUTH_CALLOUT_SECRET, "defaultMode": 0o400, "items": [{"key": ISSUER_SEED_KEY, "path": "issuer.seed"}]}},
                            ca,
                        ],
                    },
                },
            },
        }),
    ]
}

/// The key of the issuer seed in the callout's Secret.
pub const ISSUER_SEED_KEY: &str = "issuer-seed";
