//! `tidewatch render`: every Kubernetes manifest, rendered from the topology
//! so names, subjects, consumers and trigger fields cannot drift.
//!
//! - [`deploy`]: the base in `deploy/`: namespaces, the provisioning Job, the
//!   collector DaemonSets with their RBAC, and NATS from [`nats`] (StatefulSet,
//!   config with one user per component, TLS, PodDisruptionBudget, network
//!   policy); `deploy/monitoring/` is an optional overlay of PodMonitors.
//! - [`functions`]: `keda/` (per function a Deployment that KEDA scales and a
//!   ScaledObject, plus a Job that provisions the consumers) and `knative/`
//!   (per function a Service and a Trigger on a Broker).
//!
//! Secrets and certificates are never rendered: `tidewatch secrets` writes
//! them, untracked, where each kustomization's `secretGenerator` reads them.
//! The image is named once per kustomization (`images:`), tagged with the
//! crate version. `tests/manifests.rs` fails when the checked-in files
//! differ from what this renders.

use anyhow::Context as _;
use serde_json::{Value, json};
use sha2::Digest as _;
use tidewatch_runtime::topology::{self, FunctionSpec};

pub mod deploy;
pub mod functions;
pub mod nats;

/// Namespace of the functions (Pod Security "restricted").
pub const FUNCTIONS_NAMESPACE: &str = "tidewatch";
/// Namespace of NATS and the collectors.
pub const SYSTEM_NAMESPACE: &str = "tidewatch-system";
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

const HEADER: &str = "# Rendered by `tidewatch render` from runtime/src/topology.rs and functions/*/function.toml.\n# Do not edit: change those and render again (a test fails when these drift).\n";

/// The image's name in every manifest; each kustomization's `images:` sets
/// the registry and tag in one place (`kustomize edit set image
/// tidewatch=REGISTRY/tidewatch:TAG`).
pub const IMAGE_NAME: &str = "tidewatch";
/// The image's tag: the crate version (`scripts/image` tags it so).
pub const IMAGE_TAG: &str = env!("CARGO_PKG_VERSION");

/// The image holding every Tidewatch binary.
pub fn image() -> String {
    format!("{IMAGE_NAME}:{IMAGE_TAG}")
}

/// Where the generated secrets of a kustomization live (untracked;
/// `tidewatch secrets` writes them).
pub const SECRETS_DIR: &str = "secrets";
/// The Secret with NATS passwords, one key per NATS user.
pub const USERS_SECRET: &str = "tidewatch-nats-users";
/// The auth callout's password and issuer seed. Why a Secret of its own:
/// a kubelet may read every Secret its pods reference, and the seed signs
/// every collector's rights, so only the callout's pods reference it.
pub const AUTH_CALLOUT_SECRET: &str = "tidewatch-auth-callout";
/// The Secret with the CA that signed NATS' certificate (`ca.crt`).
pub const CA_SECRET: &str = "tidewatch-nats-ca";

/// The labels operators expect on every object (`app.kubernetes.io/*`).
pub fn labels(name: &str, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": "tidewatch",
        "app.kubernetes.io/version": IMAGE_TAG,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "tidewatch",
        "app.kubernetes.io/managed-by": "kustomize",
    })
}

/// The immutable part of the labels, for selectors (a version in a
/// selector would make every upgrade a delete-and-recreate).
pub fn selector(name: &str) -> Value {
    json!({"app.kubernetes.io/name": name, "app.kubernetes.io/instance": "tidewatch"})
}

/// A short, stable hash of `text`, for names that must change when what
/// they stand for changes (provisioning Jobs, config checksums).
pub fn short_hash(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// Requests and limits every container gets: CPU and memory requested,
/// memory limited. No CPU limit: throttling a function that is behind only
/// makes it further behind; the request reserves its share.
pub fn resources(cpu: &str, memory: &str, memory_limit: &str) -> Value {
    json!({"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory_limit}})
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
        )
}

/// A function's manifest says why its grace period is what it is (only
/// functions drain this way; NATS' grace covers its lame-duck mode).
fn with_drain_comment(text: String) -> String {
    text.replace(
        &format!("terminationGracePeriodSeconds: {TERMINATION_GRACE_SECS}\n"),
        &format!("terminationGracePeriodSeconds: {TERMINATION_GRACE_SECS} # drain: one fetch (1 s) + in-flight handlers + acks\n"),
    )
}

/// A kustomization: `resources`, the image named once, and generators for
/// the secrets `tidewatch secrets` writes into `secrets/`.
fn kustomization(resources: &[String], generators: Vec<Value>) -> anyhow::Result<String> {
    let mut kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
        "images": [{"name": IMAGE_NAME, "newName": IMAGE_NAME, "newTag": IMAGE_TAG}],
    });
    if !generators.is_empty() {
        kustomization["secretGenerator"] = json!(generators);
    }
    Ok(yaml(&[kustomization])?.replace("---\n", ""))
}

/// A generated Secret of NATS passwords (`secrets/nats-users.env`).
fn users_generator(namespace: &str) -> Value {
    json!({"name": USERS_SECRET, "namespace": namespace, "envs": [format!("{SECRETS_DIR}/nats-users.env")]})
}

/// The auth callout's Secret (`secrets/auth-callout.env`).
fn auth_callout_generator() -> Value {
    json!({"name": AUTH_CALLOUT_SECRET, "namespace": SYSTEM_NAMESPACE, "envs": [format!("{SECRETS_DIR}/auth-callout.env")]})
}

/// A generated Secret holding only the CA certificate clients verify NATS with.
fn ca_generator(namespace: &str) -> Value {
    json!({"name": CA_SECRET, "namespace": namespace, "files": [format!("ca.crt={SECRETS_DIR}/ca.crt")]})
}

/// The functions to render: the ones this CLI was built with, or a
/// repository's (`tidewatch new function` renders the functions/ it just
/// added to, which this binary was not built with).
pub struct Functions {
    pub functions: Vec<FunctionSpec>,
}

impl Functions {
    pub fn embedded() -> anyhow::Result<Functions> {
        Ok(Functions {
            functions: crate::functions::all()?.to_vec(),
        })
    }

    /// Every function's durable consumer, in the functions' order.
    pub fn consumers(&self) -> Vec<topology::ConsumerSpec> {
        self.functions.iter().map(|f| f.consumer.clone()).collect()
    }
}

/// What differs between clusters and cannot be read from the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The nodes' `systemd-journal` gid (`getent group systemd-journal`).
    pub systemd_journal_gid: u32,
    /// Collect every kernel event kind, whatever the functions read (for a
    /// SIEM-style consumer outside this repository).
    pub collect_everything: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            systemd_journal_gid: deploy::SYSTEMD_JOURNAL_GID,
            collect_everything: false,
        }
    }
}

impl Functions {
    /// The event types someone downstream reads: every function's `types`
    /// beyond enrich (which reads everything to pass it on). `None`: some
    /// function reads everything.
    pub fn interest(&self) -> Option<Vec<&'static str>> {
        let mut patterns = Vec::new();
        for f in self
            .functions
            .iter()
            .filter(|f| f.output_stream != Some(topology::ENRICHED.key))
        {
            if f.consumer.stream == topology::INSIGHTS.key
                || f.consumer.stream == topology::DEAD_LETTER.key
            {
                continue;
            }
            if f.types.is_empty() {
                return None;
            }
            patterns.extend(f.types.iter().copied());
        }
        Some(patterns)
    }
}

/// Every rendered file for the functions this CLI was built with.
pub fn render() -> anyhow::Result<Vec<(String, String)>> {
    render_with(&Functions::embedded()?)
}

/// Every rendered file for `fns`, with the default settings.
pub fn render_with(fns: &Functions) -> anyhow::Result<Vec<(String, String)>> {
    render_with_settings(fns, &Settings::default())
}

/// Every rendered file for `fns`, as (path relative to the repository root, contents).
pub fn render_with_settings(
    fns: &Functions,
    settings: &Settings,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();

    let mut resources = Vec::new();
    for function in &fns.functions {
        let file = format!("{}.yaml", function.name);
        files.push((
            format!("keda/{file}"),
            with_drain_comment(yaml(&[
                functions::keda_deployment(function),
                functions::scaled_object(function)?,
            ])?),
        ));
        resources.push(file);
    }
    files.push((
        "keda/provision.yaml".to_string(),
        yaml(&[functions::provision_consumers_job(fns)])?,
    ));
    resources.push("provision.yaml".to_string());
    let function_secrets = vec![
        users_generator(FUNCTIONS_NAMESPACE),
        ca_generator(FUNCTIONS_NAMESPACE),
    ];
    files.push((
        "keda/kustomization.yaml".to_string(),
        kustomization(&resources, function_secrets.clone())?,
    ));

    let deploy = [
        ("namespaces.yaml", deploy::namespaces()),
        ("nats.yaml", nats::objects(fns)),
        ("network-policies.yaml", nats::network_policies()),
        ("provision.yaml", vec![deploy::provision_job(fns)]),
        ("auth-callout.yaml", deploy::auth_callout_objects()),
        ("collector-ebpf.yaml", {
            let events = if settings.collect_everything {
                None
            } else {
                fns.interest()
            };
            let (config, daemonset) = deploy::ebpf_objects(events.as_deref());
            vec![deploy::collector_service_account("ebpf"), config, daemonset]
        }),
        ("collector-k8s.yaml", {
            let mut objects = deploy::k8s_rbac();
            objects.push(deploy::k8s_daemonset());
            objects
        }),
        (
            "collector-systemd.yaml",
            vec![
                deploy::collector_service_account("systemd"),
                deploy::systemd_daemonset(settings.systemd_journal_gid),
            ],
        ),
    ];
    let mut resources = Vec::new();
    for (file, objects) in deploy {
        files.push((format!("deploy/{file}"), yaml(&objects)?));
        resources.push(file.to_string());
    }
    files.push((
        "deploy/kustomization.yaml".to_string(),
        kustomization(
            &resources,
            vec![
                users_generator(SYSTEM_NAMESPACE),
                auth_callout_generator(),
                ca_generator(SYSTEM_NAMESPACE),
                nats::tls_generator(),
            ],
        )?,
    ));
    files.push((
        "deploy/monitoring/podmonitors.yaml".to_string(),
        yaml(&deploy::pod_monitors())?,
    ));
    files.push((
        "deploy/monitoring/kustomization.yaml".to_string(),
        yaml(&[json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["podmonitors.yaml"],
        })])?
        .replace("---\n", ""),
    ));

    files.push((
        "cert-manager/certificates.yaml".to_string(),
        yaml(&nats::cert_manager_objects())?,
    ));
    files.push((
        "cert-manager/kustomization.yaml".to_string(),
        yaml(&[nats::cert_manager_kustomization()])?.replace("---\n", ""),
    ));

    let mut resources = vec!["broker.yaml".to_string()];
    files.push((
        "knative/broker.yaml".to_string(),
        yaml(&[
            functions::knative_broker(fns),
            functions::knative_dead_letter_service(fns)?,
        ])?,
    ));
    for function in &fns.functions {
        let file = format!("{}.yaml", function.name);
        files.push((
            format!("knative/{file}"),
            yaml(&[
                functions::knative_service(function),
                functions::knative_trigger(function),
            ])?,
        ));
        resources.push(file);
    }
    files.push((
        "knative/kustomization.yaml".to_string(),
        kustomization(&resources, function_secrets)?,
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
    /// The gid of the nodes' `systemd-journal` group (`getent group
    /// systemd-journal` on a node): the systemd collector reads the journal
    /// through it, as a non-root user. 190 on Fedora, RHEL and derivatives;
    /// allocated at install elsewhere (Debian 12: 999). A wrong one: the
    /// collector exits at start saying which gid the journal files have.
    #[arg(long, default_value_t = deploy::SYSTEMD_JOURNAL_GID)]
    systemd_journal_gid: u32,
    /// The eBPF collector collects every kernel event kind, not only those
    /// some function reads (for consumers outside this repository).
    #[arg(long)]
    collect_everything: bool,
}

pub fn run(args: RenderArgs) -> anyhow::Result<()> {
    let settings = Settings {
        systemd_journal_gid: args.systemd_journal_gid,
        collect_everything: args.collect_everything,
    };
    write(
        &args.out,
        args.check,
        render_with_settings(&Functions::embedded()?, &settings)?,
    )
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
