//! The functions' manifests: `keda/` (a Deployment KEDA scales from zero
//! and a ScaledObject per function, and the Job that provisions their
//! consumers) and `knative/` (a Service and a Trigger per function).

use anyhow::Context as _;
use serde_json::{Value, json};
use tidewatch_runtime::topology::{self, FunctionSpec};

use super::nats::{self, NATS_ACCOUNT};
use super::{
    CA_SECRET, COOLDOWN_PERIOD_SECS, FUNCTIONS_NAMESPACE, Functions, POLLING_INTERVAL_SECS,
    TERMINATION_GRACE_SECS, USERS_SECRET, image, resources, selector, short_hash,
};

/// The NATS user the consumer-provisioning Job connects as: it may create
/// and update consumers, nothing else.
pub const PROVISIONER: &str = "provisioner";

/// export's binary: every function running it (one per sink group) is told
/// which durable to read, and the dead-letter Service runs it too.
const EXPORT_BINARY: &str = "tidewatch-export";

fn labels(function: &FunctionSpec) -> Value {
    super::labels(&format!("tidewatch-{}", function.name), "function")
}

/// What a pod needs to reach NATS as `user`: TLS to the in-cluster service,
/// verified against the generated CA, and its credentials as their own
/// settings (never pasted into a URL).
pub fn nats_client_env(user: &str) -> Vec<Value> {
    nats_client_env_from(user, USERS_SECRET)
}

/// The same, with the password from `secret`.
pub fn nats_client_env_from(user: &str, secret: &str) -> Vec<Value> {
    vec![
        json!({"name": "NATS_URL", "value": nats::client_url()}),
        json!({"name": "NATS_USER", "value": user}),
        json!({"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": user}}}),
        json!({"name": "NATS_CA_FILE", "value": format!("{}/ca.crt", nats::CA_MOUNT)}),
    ]
}

/// The volume and mount that bring the CA to a pod.
pub fn ca_volume() -> (Value, Value) {
    (
        json!({"name": "nats-ca", "secret": {"secretName": CA_SECRET}}),
        json!({"name": "nats-ca", "mountPath": nats::CA_MOUNT, "readOnly": true}),
    )
}

/// The container every function runs in, hardened for Pod Security "restricted".
fn container(function: &FunctionSpec, transport: &str) -> Value {
    let mut container = json!({
        "name": function.name,
        "image": image(),
        "command": [format!("/usr/local/bin/{}", function.binary)],
        "env": [
            {"name": "TIDEWATCH_TRANSPORT", "value": transport},
            {"name": "TIDEWATCH_METRICS_ADDR", "value": "0.0.0.0:9090"},
            {"name": "TIDEWATCH_LOG_FORMAT", "value": "json"},
            {"name": "RUST_LOG", "value": "info"},
        ],
        "resources": resources("100m", "64Mi", "256Mi"),
        "volumeMounts": [ca_volume().1],
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    if let Some(env) = container["env"].as_array_mut() {
        let mut nats = nats_client_env(function.name);
        nats.append(env);
        *env = nats;
        // Every export deployment reads its own durable (one per sink group).
        if function.binary == EXPORT_BINARY {
            env.push(
                json!({"name": "TIDEWATCH_EXPORT_CONSUMER", "value": function.consumer.durable}),
            );
        }
    }
    container
}

/// A function's Deployment for KEDA. No `replicas`: KEDA (through its HPA)
/// owns the count, and a re-apply during a burst must not reset it (a new
/// Deployment starts at 1 and KEDA takes it to zero when there is no lag).
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
            "selector": {"matchLabels": selector(&format!("tidewatch-{}", function.name))},
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
                    "volumes": [ca_volume().0],
                },
            },
        },
    })
}

/// A function's ScaledObject: the `nats-jetstream` trigger on its durable consumer.
pub fn scaled_object(function: &FunctionSpec) -> anyhow::Result<Value> {
    let consumer = &function.consumer;
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
                    "natsServerMonitoringEndpoint": nats::MONITORING_ENDPOINT,
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
                "volumes": [ca_volume().0],
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
            "delivery": delivery(function.consumer.max_deliver),
        },
    })
}

/// Retry with backoff, then the dead-letter sink (the same policy as
/// `max_deliver` in JetStream mode).
fn delivery(max_deliver: i64) -> Value {
    json!({
        "retry": max_deliver - 1,
        "backoffPolicy": "exponential",
        "backoffDelay": "PT0.5S",
        "deadLetterSink": {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": DEAD_LETTER_SERVICE}},
    })
}

/// The broker: channel-based, on NATS JetStream channels (eventing-natss's
/// `config-natjsm-channel` in knative-eventing).
pub fn knative_broker(fns: &Functions) -> Value {
    // The broker's default, for triggers that set none: the first function's.
    let max_deliver = fns
        .functions
        .first()
        .map(|f| f.consumer.max_deliver)
        .unwrap_or(5);
    json!({
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Broker",
        "metadata": {
            "name": BROKER,
            "namespace": FUNCTIONS_NAMESPACE,
            "labels": super::labels(BROKER, "broker"),
            "annotations": {"eventing.knative.dev/broker.class": "MTChannelBasedBroker"},
        },
        "spec": {
            "config": {"apiVersion": "v1", "kind": "ConfigMap", "name": "config-natjsm-channel", "namespace": "knative-eventing"},
            "delivery": delivery(max_deliver),
        },
    })
}

/// Where undeliverable events end: export's binary in HTTP mode, writing
/// each as a JSON line to its log.
pub fn knative_dead_letter_service(fns: &Functions) -> anyhow::Result<Value> {
    let export = fns
        .functions
        .iter()
        .find(|f| f.binary == EXPORT_BINARY && f.name == "export")
        .context(
            "no export function (functions/export/function.toml): the dead-letter Service runs it",
        )?;
    let mut service = knative_service(export);
    service["metadata"]["name"] = json!(DEAD_LETTER_SERVICE);
    service["metadata"]["labels"]["app.kubernetes.io/name"] = json!(DEAD_LETTER_SERVICE);
    Ok(service)
}

/// The Job that creates and updates the functions' durable consumers, in
/// the functions' namespace with the `provisioner` user (consumers only).
/// Its name carries a hash of the consumers, so `tidewatch new function`
/// followed by `kubectl apply -k keda/` runs a new Job that creates the new
/// consumer; an unchanged topology re-applies the same, finished Job.
pub fn provision_consumers_job(fns: &Functions) -> Value {
    let name = format!(
        "tidewatch-provision-consumers-{}",
        short_hash(&format!("{:?}", fns.consumers()))
    );
    super::deploy::provisioning_job(
        "tidewatch-provision-consumers",
        name,
        FUNCTIONS_NAMESPACE,
        PROVISIONER,
        &["--consumers-only"],
    )
}
