//! NATS as its operators run it: a 3-node JetStream StatefulSet compared
//! point by point with the official Helm chart (deploy/README.md), its
//! config rendered from the topology (one user per component with exactly
//! its subjects, JetStream limits that fit what the streams reserve, TLS for
//! clients and mutually authenticated TLS for routes), probes, lame-duck
//! shutdown, a PodDisruptionBudget, spread across nodes, and a network policy.

use serde_json::{Value, json};
use tidewatch_runtime::topology;

use super::functions::PROVISIONER;
use super::{
    FUNCTIONS_NAMESPACE, Functions, SECRETS_DIR, SYSTEM_NAMESPACE, USERS_SECRET, labels, resources,
    selector, short_hash,
};

/// JetStream fsync interval. Why: every stream is R3, so a node crash loses
/// nothing that another replica holds; fsync every 10 s (instead of the 2 min
/// default) bounds what a simultaneous power loss of all three could lose,
/// without an fsync per message ("always"), which would cap publish rates.
pub const SYNC_INTERVAL: &str = "10s";
/// NATS nodes, and so replicas per stream.
pub const REPLICAS: usize = 3;
/// The nats-server release every test runs; the image is pinned to it.
pub const VERSION: &str = "2.15.1";
/// The client service (TLS).
pub const SERVICE: &str = "nats";
/// The headless service: stable per-pod names for routes and for KEDA.
pub const HEADLESS: &str = "nats-headless";
/// The monitoring endpoint KEDA polls (`/jsz`). The headless service: with
/// `no_advertise` (the chart's default, and ours) KEDA asks the consumer's
/// leader at `<server_name>.<endpoint>`, which resolves only through it.
pub const MONITORING_ENDPOINT: &str = "nats-headless.tidewatch-system.svc.cluster.local:8222";
/// JetStream account the streams live in (`$G` unless accounts are configured).
pub const NATS_ACCOUNT: &str = "$G";
/// Where pods mount the CA certificate.
pub const CA_MOUNT: &str = "/etc/tidewatch/nats-ca";
/// The Secret with NATS' own certificate and key (`tidewatch secrets`).
pub const TLS_SECRET: &str = "tidewatch-nats-tls";
/// Where the server reads its certificate, key and CA.
const TLS_MOUNT: &str = "/etc/nats-tls";
const PID_FILE: &str = "/var/run/nats/nats.pid";

/// The URL clients use: TLS to the client service.
pub fn client_url() -> String {
    format!("tls://{SERVICE}.{SYSTEM_NAMESPACE}.svc.cluster.local:4222")
}

/// The DNS names NATS' certificate covers: the client service, every pod
/// behind the headless service (routes), and localhost for
/// `kubectl port-forward`.
pub fn certificate_names() -> Vec<String> {
    let mut names = vec![
        SERVICE.to_string(),
        format!("{SERVICE}.{SYSTEM_NAMESPACE}"),
        format!("{SERVICE}.{SYSTEM_NAMESPACE}.svc"),
        format!("{SERVICE}.{SYSTEM_NAMESPACE}.svc.cluster.local"),
        format!("*.{HEADLESS}.{SYSTEM_NAMESPACE}.svc.cluster.local"),
        format!("{HEADLESS}.{SYSTEM_NAMESPACE}.svc.cluster.local"),
        "localhost".to_string(),
    ];
    names.dedup();
    names
}

/// JetStream file storage per node: what the streams and buckets reserve
/// (every node holds a replica of each) plus 10 % for raft logs and
/// metadata, in whole GiB.
pub fn max_file_store_gib() -> i64 {
    let gib = 1024 * 1024 * 1024;
    let reserved = topology::reserved_bytes();
    (reserved + reserved / 10 + gib - 1) / gib
}

/// The volume per node: the file store plus 2 GiB, so JetStream's own
/// limit, not a full disk, is what stops a write.
pub fn volume_gib() -> i64 {
    max_file_store_gib() + 2
}

/// The auth callout's NATS user (`auth-callout/`).
pub const AUTH_CALLOUT_USER: &str = "auth-callout";
/// The environment variable nats-server reads the callout's issuer
/// (account public key) from; `tidewatch secrets` generates the key pair.
pub const ISSUER_ENV: &str = "AUTH_CALLOUT_ISSUER";
/// The key of the issuer's public key in the users' Secret.
pub const ISSUER_KEY: &str = "auth-callout-issuer";

/// One NATS user per component, with exactly the subjects it needs. An
/// empty `publish` means it may publish nothing but replies to requests
/// it received (`allow_responses`).
pub struct NatsUser {
    pub name: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The environment variable a user's password reaches nats-server in.
pub fn password_env(user: &str) -> String {
    format!("{}_PASSWORD", user.to_uppercase().replace('-', "_"))
}

/// What each function may publish and subscribe: its consumer's pull, ack
/// and info subjects, its advisories, its outputs, its dead letters, and the
/// KV buckets it uses.
pub fn users(fns: &Functions) -> Vec<NatsUser> {
    let mut users = Vec::new();
    for function in &fns.functions {
        let consumer = &function.consumer;
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
            // Poison messages (headers the client cannot parse) are moved
            // to the dead-letter stream and deleted from the input stream:
            // runtime/src/poison.rs.
            format!("$JS.API.STREAM.MSG.DELETE.{s}"),
            format!("$JS.ACK.{s}.{c}.>"),
            topology::subjects::dead_letter(c),
        ];
        if let Some(output) = function.output_stream.and_then(topology::stream) {
            publish.push(format!("{}.>", output.prefix));
            if output.key == topology::ENRICHED.key {
                // What the output's consumers read (functions/enrich/src/interest.rs).
                publish.push(format!("$JS.API.CONSUMER.LIST.{}", output.name));
            }
        }
        // (bucket, writes): enrich only reads the pods bucket the k8s
        // collector keeps; correlate reads and writes its state.
        let buckets: &[(&topology::BucketSpec, bool)] = match function.name {
            "enrich" => &[(&topology::POD_METADATA, false)],
            "correlate" => &[(&topology::CORRELATION_STATE, true)],
            _ => &[],
        };
        for (bucket, writes) in buckets {
            let b = bucket.bucket;
            publish.extend([
                format!("$JS.API.STREAM.INFO.KV_{b}"),
                format!("$JS.API.DIRECT.GET.KV_{b}.>"),
                format!("$JS.API.STREAM.MSG.GET.KV_{b}"),
                // Watches (enrich's cache invalidation) create ordered consumers.
                format!("$JS.API.CONSUMER.CREATE.KV_{b}"),
                format!("$JS.API.CONSUMER.CREATE.KV_{b}.>"),
            ]);
            if *writes {
                publish.push(format!("$KV.{b}.>"));
            }
        }
        users.push(NatsUser {
            name: function.name.to_string(),
            publish,
            subscribe: vec![
                inbox(function.name),
                format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s}.{c}"),
            ],
        });
    }
    // Collectors have no user here: they present their pod's projected
    // ServiceAccount token and the auth callout grants them their own
    // node's subjects (auth-callout/). The callout itself may only receive
    // the server's requests and answer them.
    users.push(NatsUser {
        name: AUTH_CALLOUT_USER.to_string(),
        publish: Vec::new(),
        subscribe: vec![
            tidewatch_auth_callout::callout::REQUEST_SUBJECT.to_string(),
            inbox(AUTH_CALLOUT_USER),
        ],
    });
    // The consumer-provisioning Job in the functions' namespace: creates and
    // updates consumers on existing streams; cannot touch streams or data.
    users.push(NatsUser {
        name: PROVISIONER.to_string(),
        publish: vec![
            "$JS.API.INFO".to_string(),
            "$JS.API.STREAM.INFO.*".to_string(),
            "$JS.API.CONSUMER.INFO.*.*".to_string(),
            "$JS.API.CONSUMER.CREATE.*.*".to_string(),
            "$JS.API.CONSUMER.CREATE.*.*.>".to_string(),
            "$JS.API.CONSUMER.DURABLE.CREATE.*.*".to_string(),
        ],
        subscribe: vec![inbox(PROVISIONER)],
    });
    users
}

/// The replies `user` may receive: only its own inbox prefix (the runtime
/// connects with it), never the shared `_INBOX.>`.
fn inbox(user: &str) -> String {
    format!("{}.>", tidewatch_runtime::host::inbox_prefix(user))
}

/// The users whose passwords a namespace's pods use: NATS itself needs
/// every password, the functions' namespace only the functions' and the
/// provisioner's.
pub fn users_in(namespace: &str, fns: &Functions) -> Vec<String> {
    let all = std::iter::once("admin".to_string()).chain(users(fns).into_iter().map(|u| u.name));
    if namespace == FUNCTIONS_NAMESPACE {
        all.filter(|u| u == PROVISIONER || fns.functions.iter().any(|f| f.name == u))
            .collect()
    } else {
        all.collect()
    }
}

/// The `authorization` block of nats.conf; passwords come from the
/// environment (`$<USER>_PASSWORD`), filled from the Secret.
pub fn authorization(fns: &Functions) -> String {
    let quote = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let users = users(fns);
    // The callout answers within this (the TokenReview included); a client
    // also has this long to authenticate.
    let mut out = String::from("authorization {\n  timeout: 5\n  users: [\n");
    out.push_str("    # Provisioning (the Job) and operators: full access.\n");
    out.push_str("    { user: admin, password: $ADMIN_PASSWORD }\n");
    for user in &users {
        let publish = if user.publish.is_empty() {
            "{ deny: [\">\"] }\n        allow_responses: true".to_string()
        } else {
            format!("[{}]", quote(&user.publish))
        };
        out.push_str(&format!(
            "    {{ user: \"{}\", password: ${}, permissions: {{\n        publish: {publish}\n        subscribe: [{}]\n    }} }}\n",
            user.name,
            password_env(&user.name),
            quote(&user.subscribe)
        ));
    }
    out.push_str("  ]\n");
    // Every user above authenticates with its password; anyone else (the
    // collectors, with a ServiceAccount token) is handed to the callout.
    let auth_users: Vec<String> = std::iter::once("admin".to_string())
        .chain(users.iter().map(|u| u.name.clone()))
        .collect();
    out.push_str(&format!(
        "  auth_callout {{\n    issuer: ${ISSUER_ENV}\n    auth_users: [{}]\n  }}\n",
        quote(&auth_users)
    ));
    out.push_str("}\n");
    out
}

/// nats.conf. Paths are absolute; `tests/nats_cluster.rs` boots three nodes
/// from this file with only paths, hosts and ports changed.
pub fn config() -> String {
    let routes: Vec<String> = (0..REPLICAS)
        .map(|i| format!("    tls://nats-{i}.{HEADLESS}.{SYSTEM_NAMESPACE}.svc.cluster.local:6222"))
        .collect();
    format!(
        "server_name: $POD_NAME
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
pid_file: {PID_FILE}
# Lame duck on shutdown (preStop): stop accepting, then move clients off over
# 30 s, as the official chart does, so a rolling restart drops no client at once.
lame_duck_grace_period: 10s
lame_duck_duration: 30s

# Clients must use TLS; they verify the server against the generated CA.
tls {{
  cert_file: {TLS_MOUNT}/tls.crt
  key_file: {TLS_MOUNT}/tls.key
  ca_file: {TLS_MOUNT}/ca.crt
  timeout: 5
}}

jetstream {{
  store_dir: /data/jetstream
  # What the streams and buckets reserve ({} GiB), plus 10 % for raft logs.
  max_file_store: {}G
  # R3 streams survive a node crash; fsync every {SYNC_INTERVAL} bounds a power loss of all three.
  sync_interval: {SYNC_INTERVAL}
}}

cluster {{
  name: tidewatch
  listen: 0.0.0.0:6222
  no_advertise: true
  # Routes are mutually authenticated: each side presents a certificate
  # signed by the CA, and an unknown peer is refused.
  tls {{
    cert_file: {TLS_MOUNT}/tls.crt
    key_file: {TLS_MOUNT}/tls.key
    ca_file: {TLS_MOUNT}/ca.crt
    verify: true
    timeout: 5
  }}
  routes: [
{}
  ]
}}

include ./auth.conf
",
        topology::reserved_bytes() / (1024 * 1024 * 1024),
        max_file_store_gib(),
        routes.join("\n")
    )
}

/// The Secret cert-manager keeps NATS' certificate in (`cert-manager/`).
pub const CERT_MANAGER_TLS_SECRET: &str = "tidewatch-nats-tls-cert-manager";
/// The CA key pair the cert-manager Issuer signs with: the CA `tidewatch
/// secrets` made, so every client keeps verifying against the same `ca.crt`.
pub const CERT_MANAGER_CA_SECRET: &str = "tidewatch-nats-ca-keypair";

/// The optional overlay where cert-manager issues and renews NATS'
/// certificate: a CA Issuer over the generated CA, a Certificate for every
/// name clients and routes use, and the StatefulSet pointed at its Secret.
pub fn cert_manager_objects() -> Vec<Value> {
    let labels = labels("nats", "nats");
    vec![
        json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Issuer",
            "metadata": {"name": "tidewatch-nats-ca", "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "spec": {"ca": {"secretName": CERT_MANAGER_CA_SECRET}},
        }),
        json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "nats", "namespace": SYSTEM_NAMESPACE, "labels": labels},
            "spec": {
                "secretName": CERT_MANAGER_TLS_SECRET,
                "issuerRef": {"name": "tidewatch-nats-ca", "kind": "Issuer"},
                "commonName": format!("{SERVICE}.{SYSTEM_NAMESPACE}"),
                "dnsNames": certificate_names(),
                "ipAddresses": ["127.0.0.1"],
                // Routes present the same certificate to each other.
                "usages": ["server auth", "client auth", "digital signature", "key encipherment"],
                "duration": "2160h",
                "renewBefore": "720h",
                "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            },
        }),
    ]
}

/// The overlay's kustomization: the base, the objects above, the CA key
/// pair from `secrets/`, and the base's generated certificate swapped for
/// cert-manager's.
pub fn cert_manager_kustomization() -> Value {
    json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../deploy", "certificates.yaml"],
        "secretGenerator": [{
            "name": CERT_MANAGER_CA_SECRET, "namespace": SYSTEM_NAMESPACE, "type": "kubernetes.io/tls",
            "files": [format!("tls.crt={SECRETS_DIR}/ca.crt"), format!("tls.key={SECRETS_DIR}/ca.key")],
            // The Issuer names it; kustomize does not rewrite cert-manager's references.
            "options": {"disableNameSuffixHash": true},
        }],
        "patches": [
            {
                "target": {"kind": "StatefulSet", "name": "nats"},
                "patch": format!("- op: replace\n  path: /spec/template/spec/volumes/1/secret/secretName\n  value: {CERT_MANAGER_TLS_SECRET}\n"),
            },
            {
                "patch": format!("$patch: delete\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {TLS_SECRET}\n  namespace: {SYSTEM_NAMESPACE}\n"),
            },
        ],
    })
}

/// The generated Secret with NATS' certificate, key and CA.
pub fn tls_generator() -> Value {
    json!({
        "name": TLS_SECRET, "namespace": SYSTEM_NAMESPACE, "type": "kubernetes.io/tls",
        "files": [
            format!("tls.crt={SECRETS_DIR}/tls.crt"),
            format!("tls.key={SECRETS_DIR}/tls.key"),
            format!("ca.crt={SECRETS_DIR}/ca.crt"),
        ],
    })
}

fn nats_labels() -> Value {
    labels("nats", "nats")
}

fn nats_selector() -> Value {
    selector("nats")
}

/// NATS as a StatefulSet: three JetStream nodes with persistent volumes.
/// A plain StatefulSet rather than the Helm chart so `kubectl apply -k`
/// needs no Helm, and the config (users, permissions) is rendered from the
/// topology like everything else.
pub fn objects(fns: &Functions) -> Vec<Value> {
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        // The Go runtime collects before the container's memory limit is hit.
        json!({"name": "GOMEMLIMIT", "value": "1800MiB"}),
    ];
    env.extend(users_in(SYSTEM_NAMESPACE, fns).into_iter().map(|user| {
        json!({"name": password_env(&user), "valueFrom": {"secretKeyRef": {"name": USERS_SECRET, "key": user}}})
    }));
    env.push(json!({"name": ISSUER_ENV, "valueFrom": {"secretKeyRef": {"name": USERS_SECRET, "key": ISSUER_KEY}}}));
    let auth = authorization(fns);
    let conf = config();
    let probe = |path: &str, period: u64, failures: u64| json!({"httpGet": {"path": path, "port": "monitor"}, "initialDelaySeconds": 10, "timeoutSeconds": 5, "periodSeconds": period, "successThreshold": 1, "failureThreshold": failures});
    vec![
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "nats-config", "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "data": {"nats.conf": conf, "auth.conf": auth},
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": HEADLESS, "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "selector": nats_selector(),
                     "ports": [{"name": "client", "port": 4222}, {"name": "cluster", "port": 6222}, {"name": "monitor", "port": 8222}]},
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "spec": {"selector": nats_selector(), "ports": [{"name": "client", "port": 4222}, {"name": "monitor", "port": 8222}]},
        }),
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "nats", "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            // One node at a time: R3 streams keep a quorum of two.
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": nats_selector()}},
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "nats", "namespace": SYSTEM_NAMESPACE, "labels": nats_labels()},
            "spec": {
                "serviceName": HEADLESS,
                "replicas": REPLICAS,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": nats_selector()},
                "template": {
                    "metadata": {
                        "labels": nats_labels(),
                        // A changed config (a user added by `tidewatch new function`) rolls the pods, one at a time, in lame-duck mode.
                        "annotations": {"checksum/config": short_hash(&format!("{conf}{auth}"))},
                    },
                    "spec": {
                        // Longer than lame duck (10 s grace + 30 s), as the chart.
                        "terminationGracePeriodSeconds": 60,
                        "automountServiceAccountToken": false,
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                        // Three replicas of every stream on three different nodes (and zones where there are several).
                        "topologySpreadConstraints": [
                            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": nats_selector()}},
                            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": nats_selector()}},
                        ],
                        "containers": [{
                            "name": "nats",
                            "image": format!("nats:{VERSION}-alpine"),
                            "args": ["--config", "/etc/nats/nats.conf"],
                            "env": env,
                            "ports": [{"name": "client", "containerPort": 4222}, {"name": "cluster", "containerPort": 6222}, {"name": "monitor", "containerPort": 8222}],
                            "lifecycle": {"preStop": {"exec": {"command": ["nats-server", format!("-sl=ldm={PID_FILE}")]}}},
                            // As the official chart: up to 15 min to catch up on start, then
                            // ready when this server's JetStream is, alive while JetStream is enabled.
                            "startupProbe": probe("/healthz", 10, 90),
                            "readinessProbe": probe("/healthz?js-server-only=true", 10, 3),
                            "livenessProbe": probe("/healthz?js-enabled-only=true", 30, 3),
                            "resources": resources("500m", "1Gi", "2Gi"),
                            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/etc/nats"},
                                {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": true},
                                {"name": "pid", "mountPath": "/var/run/nats"},
                                {"name": "data", "mountPath": "/data"},
                            ],
                        }],
                        "volumes": [
                            {"name": "config", "configMap": {"name": "nats-config"}},
                            {"name": "tls", "secret": {"secretName": TLS_SECRET}},
                            {"name": "pid", "emptyDir": {}},
                        ],
                    },
                },
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data", "labels": nats_labels()},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": format!("{}Gi", volume_gib())}}},
                }],
            },
        }),
    ]
}

/// NATS' monitoring port (lag, used by KEDA) only for KEDA and Prometheus;
/// clients only from Tidewatch's namespaces; routes only between NATS pods.
pub fn network_policies() -> Vec<Value> {
    let nats_labels = nats_selector;
    let from_ns = |ns: &str| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}});
    vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "nats", "namespace": SYSTEM_NAMESPACE, "labels": labels("nats", "nats")},
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
