//! The rendered NATS config, booted for real: three nats-servers started
//! from the `nats.conf` and `auth.conf` that `tidewatch render` writes into
//! deploy/nats.yaml, with certificates and passwords from `tidewatch
//! secrets` (only paths, hosts and ports changed), provisioned exactly as
//! the cluster is (`tidewatch provision --replicas 3` as admin, the consumer
//! Job's `--consumers-only` as the provisioner), and enrich, correlate and
//! export running as their own users over TLS until an insight comes out.
//! Short of a cluster, this is the proof that deploy/ works.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde::Deserialize as _;
use tidewatch_testkit::{eventually, free_ports, nats_server_binary};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `nats.conf` and `auth.conf` from a fresh rendering.
fn rendered(dir: &Path) -> (String, String) {
    let output = std::process::Command::new(binary("tidewatch"))
        .args(["render", "--out"])
        .arg(dir)
        .output()
        .expect("render runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = std::process::Command::new(binary("tidewatch"))
        .args(["secrets", "--out"])
        .arg(dir)
        .output()
        .expect("secrets runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(dir.join("deploy/nats.yaml")).expect("nats.yaml");
    let config = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).expect("YAML"))
        .find(|v| v["kind"] == "ConfigMap")
        .expect("nats-config");
    let get = |key: &str| config["data"][key].as_str().expect(key).to_string();
    (get("nats.conf"), get("auth.conf"))
}

fn passwords(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(dir.join("deploy/secrets/nats-users.env"))
        .expect("generated passwords")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The rendered config for node `i`: the pod's paths, names and ports
/// replaced by this machine's; everything else as rendered.
fn node_config(
    conf: &str,
    i: usize,
    dir: &Path,
    tls: &Path,
    own: [u16; 3],
    routes: &[u16],
) -> String {
    let [client, cluster, monitor] = own;
    let route_lines: Vec<String> = (0..routes.len())
        .map(|n| format!("tls://nats-{n}.nats-headless.tidewatch-system.svc.cluster.local:6222"))
        .collect();
    let mut out = conf
        .replace("server_name: $POD_NAME", &format!("server_name: nats-{i}"))
        .replace(
            "listen: 0.0.0.0:4222",
            &format!("listen: 127.0.0.1:{client}"),
        )
        .replace("http: 0.0.0.0:8222", &format!("http: 127.0.0.1:{monitor}"))
        .replace(
            "listen: 0.0.0.0:6222",
            &format!("listen: 127.0.0.1:{cluster}"),
        )
        .replace(
            "/var/run/nats/nats.pid",
            &dir.join("nats.pid").display().to_string(),
        )
        .replace("/etc/nats-tls", &tls.display().to_string())
        .replace(
            "/data/jetstream",
            &dir.join("jetstream").display().to_string(),
        );
    // max_file_store stays as rendered: it is a limit, not an allocation,
    // and JetStream refuses streams whose reservations exceed it.
    for (n, line) in route_lines.iter().enumerate() {
        assert!(out.contains(line), "route {n} rendered: {conf}");
        out = out.replace(line, &format!("tls://127.0.0.1:{}", routes[n]));
    }
    out
}

struct Node {
    _process: Child,
}

fn start_node(
    i: usize,
    dir: &Path,
    conf: &str,
    auth: &str,
    passwords: &BTreeMap<String, String>,
) -> Node {
    let node_dir = dir.join(format!("nats-{i}"));
    std::fs::create_dir_all(&node_dir).expect("node dir");
    std::fs::write(node_dir.join("nats.conf"), conf).expect("nats.conf");
    std::fs::write(node_dir.join("auth.conf"), auth).expect("auth.conf");
    let log = std::fs::File::create(node_dir.join("nats.log")).expect("log");
    let mut command = Command::new(nats_server_binary());
    command
        .arg("--config")
        .arg(node_dir.join("nats.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    for (user, password) in passwords {
        // The secrets' one non-password: the auth callout's issuer (public key).
        if user == "auth-callout-issuer" {
            command.env("AUTH_CALLOUT_ISSUER", password);
            continue;
        }
        command.env(
            format!("{}_PASSWORD", user.to_uppercase().replace('-', "_")),
            password,
        );
    }
    Node {
        _process: command.spawn().expect("nats-server starts"),
    }
}

/// A Tidewatch binary as a component connects on a cluster: TLS URLs, its
/// own user, the password and CA as separate settings.
fn as_user(
    command: &mut Command,
    user: &str,
    urls: &str,
    ca: &Path,
    passwords: &BTreeMap<String, String>,
) {
    command
        .env("NATS_URL", urls)
        .env("NATS_USER", user)
        .env("NATS_PASSWORD", &passwords[user])
        .env("NATS_CA_FILE", ca)
        .env("RUST_LOG", "warn");
}

async fn run_cli(
    args: &[&str],
    user: &str,
    urls: &str,
    ca: &Path,
    passwords: &BTreeMap<String, String>,
) -> String {
    let mut command = Command::new(binary("tidewatch"));
    command.args(args);
    as_user(&mut command, user, urls, ca, passwords);
    let output = command.output().await.expect("tidewatch runs");
    assert!(
        output.status.success(),
        "tidewatch {args:?} as {user}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_config_runs_a_tls_cluster_where_each_component_is_its_own_user() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (conf, auth) = rendered(dir.path());
    let passwords = passwords(dir.path());
    let tls: PathBuf = dir.path().join("deploy/secrets");
    let ca = tls.join("ca.crt");
    let ports: Vec<[u16; 3]> = free_ports(9)
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    let route_ports: Vec<u16> = ports.iter().map(|p| p[1]).collect();
    let _nodes: Vec<Node> = (0..3)
        .map(|i| {
            let node_dir = dir.path().join(format!("nats-{i}"));
            let config = node_config(&conf, i, &node_dir, &tls, ports[i], &route_ports);
            start_node(i, dir.path(), &config, &auth, &passwords)
        })
        .collect();
    let urls = ports
        .iter()
        .map(|p| format!("tls://127.0.0.1:{}", p[0]))
        .collect::<Vec<_>>()
        .join(",");

    // A JetStream cluster with a meta leader: each node's /healthz says so.
    for (i, p) in ports.iter().enumerate() {
        eventually(
            &format!("nats-{i} healthy with JetStream"),
            Duration::from_secs(60),
            || async move {
                let url = format!("http://127.0.0.1:{}/healthz?js-enabled-only=true", p[2]);
                matches!(tidewatch_testkit::http_get(&url).await, Ok((200, _))).then_some(())
            },
        )
        .await;
    }

    // Routes are authenticated: a server that trusts the cluster's CA but
    // presents a certificate another CA signed (same config, same passwords)
    // is refused by the cluster.
    let rogue_dir = dir.path().join("rogue");
    let (_, _) = rendered(&rogue_dir);
    let rogue_tls = rogue_dir.join("deploy/secrets");
    let rogue_ports: [u16; 3] = free_ports(3).try_into().expect("three ports");
    let rogue_conf = node_config(
        &conf,
        3,
        &rogue_dir.join("nats-3"),
        &rogue_tls,
        rogue_ports,
        &route_ports,
    )
    .replace(
        &format!("ca_file: {}/ca.crt", rogue_tls.display()),
        &format!("ca_file: {}/ca.crt", tls.display()),
    );
    let _rogue = start_node(3, &rogue_dir, &rogue_conf, &auth, &passwords);
    let node_log = dir.path().join("nats-0/nats.log");
    eventually(
        "the cluster to refuse the rogue's route",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&node_log).unwrap_or_default();
            // Twice: the rogue retries its route every second, so a route
            // that could be established would have been by the second refusal.
            async move { (log.matches("TLS route handshake error").count() >= 2).then_some(()) }
        },
    )
    .await;
    let routez = tidewatch_testkit::http_get(&format!("http://127.0.0.1:{}/routez", ports[0][2]))
        .await
        .expect("routez");
    let routez: serde_json::Value = serde_json::from_str(&routez.1).expect("routez JSON");
    let rogue_routez =
        tidewatch_testkit::http_get(&format!("http://127.0.0.1:{}/routez", rogue_ports[2]))
            .await
            .expect("rogue routez");
    assert!(
        rogue_routez.1.contains("\"num_routes\": 0"),
        "the rogue has no route: {}",
        rogue_routez.1
    );
    let peers: std::collections::BTreeSet<&str> = routez["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter_map(|r| r["remote_name"].as_str())
        .collect();
    assert_eq!(
        peers,
        ["nats-1", "nats-2"].into(),
        "only the cluster's own nodes are routed: {routez}"
    );

    // The test's own admin connection verifies the server like every component.
    let admin = eventually("admin connects over TLS", Duration::from_secs(60), || {
        let (urls, ca, password) = (urls.clone(), ca.clone(), passwords["admin"].clone());
        async move {
            async_nats::ConnectOptions::new()
                .custom_inbox_prefix(tidewatch_runtime::host::inbox_prefix("admin"))
                .user_and_password("admin".into(), password)
                .add_root_certificates(ca)
                .require_tls(true)
                .connect(urls.split(',').collect::<Vec<_>>())
                .await
                .ok()
        }
    })
    .await;
    // Without the CA, the server's certificate is not trusted.
    let untrusted = async_nats::ConnectOptions::new()
        .user_and_password("admin".into(), passwords["admin"].clone())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(2))
        .connect(urls.split(',').collect::<Vec<_>>());
    assert!(
        tokio::time::timeout(Duration::from_secs(5), untrusted)
            .await
            .map_or(true, |r| r.is_err()),
        "a client that does not trust the CA must not connect"
    );

    // Provisioned exactly as the cluster's Jobs do, each with its own user.
    let report = eventually(
        "provisioning as admin (R3 needs all three nodes)",
        Duration::from_secs(60),
        || {
            let (urls, ca, passwords) = (urls.clone(), ca.clone(), passwords.clone());
            async move {
                let mut command = Command::new(binary("tidewatch"));
                command.args(["provision", "--replicas", "3"]);
                as_user(&mut command, "admin", &urls, &ca, &passwords);
                let output = command.output().await.ok()?;
                output
                    .status
                    .success()
                    .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
            }
        },
    )
    .await;
    assert!(report.contains("TIDEWATCH_RAW"), "{report}");
    let consumers = run_cli(
        &["provision", "--consumers-only", "--replicas", "3"],
        "provisioner",
        &urls,
        &ca,
        &passwords,
    )
    .await;
    assert!(
        consumers.contains("enrich") && !consumers.contains("stream "),
        "{consumers}"
    );
    let js = async_nats::jetstream::new(admin.clone());
    let info = js
        .get_stream(tidewatch_runtime::topology::RAW.name)
        .await
        .expect("raw stream")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.config.num_replicas, 3, "R3 on the rendered cluster");

    // The provisioner may create consumers but not touch streams.
    let provisioner = async_nats::ConnectOptions::new()
        .custom_inbox_prefix(tidewatch_runtime::host::inbox_prefix("provisioner"))
        .user_and_password("provisioner".into(), passwords["provisioner"].clone())
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .connect(urls.split(',').collect::<Vec<_>>())
        .await
        .expect("the provisioner connects");
    let js_provisioner = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(provisioner);
    assert!(
        js_provisioner
            .delete_stream(tidewatch_runtime::topology::RAW.name)
            .await
            .is_err(),
        "the provisioner must not delete streams"
    );
    assert!(
        js.get_stream(tidewatch_runtime::topology::RAW.name)
            .await
            .is_ok()
    );

    let mut functions: Vec<Child> = ["enrich", "correlate", "export"]
        .into_iter()
        .map(|name| {
            let mut command = Command::new(binary(&format!("tidewatch-{name}")));
            as_user(&mut command, name, &urls, &ca, &passwords);
            command
                .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
                .env("TIDEWATCH_TRANSPORT", "jetstream")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("function starts")
        })
        .collect();

    run_cli(
        &[
            "emit",
            "--subject",
            "pod/default/web-1",
            "--count",
            "3",
            "--data",
            r#"{"container":"app","exitCode":1,"reason":"Error"}"#,
        ],
        "admin",
        &urls,
        &ca,
        &passwords,
    )
    .await;

    let stdout = functions[2].stdout.take().expect("export stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(90), lines.next_line())
        .await
        .expect("an insight within 90 s")
        .expect("read")
        .expect("a line");
    assert!(line.contains("dev.tidewatch.insight.crash-loop"), "{line}");
    assert_eq!(
        stream_messages(&js, tidewatch_runtime::topology::INSIGHTS.name).await,
        1
    );
}
