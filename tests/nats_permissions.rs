//! The NATS users rendered into deploy/nats.yaml, on a real nats-server: each
//! function runs the whole pipeline as its own least-privilege user, and a
//! user cannot publish where it has no business.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde::Deserialize as _;
use tidewatch_testkit::{eventually, free_port, nats_server_binary};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `auth.conf` from the rendered ConfigMap.
fn rendered_auth_conf() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/nats.yaml is rendered");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).expect("YAML"))
        .find(|v| v["kind"] == "ConfigMap")
        .and_then(|cm| cm["data"]["auth.conf"].as_str().map(str::to_string))
        .expect("nats-config has auth.conf")
}

const USERS: [&str; 8] = [
    "provisioner",
    "admin",
    "enrich",
    "correlate",
    "export",
    "ebpf",
    "k8s",
    "systemd",
];

fn password(user: &str) -> String {
    format!("secret-{user}")
}

fn start_function(binary_name: &str, user: &str, port: u16) -> Child {
    Command::new(binary(binary_name))
        .env(
            "NATS_URL",
            format!("nats://{user}:{}@127.0.0.1:{port}", password(user)),
        )
        .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
        .env("TIDEWATCH_TRANSPORT", "jetstream")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("function starts")
}

/// nats-server with the rendered auth.conf, every user's password set.
struct Server {
    port: u16,
    admin: async_nats::Client,
    _process: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        std::fs::write(dir.path().join("auth.conf"), rendered_auth_conf())
            .expect("write auth.conf");
        let store = dir.path().join("js");
        std::fs::write(
            dir.path().join("nats.conf"),
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\ninclude ./auth.conf\n",
                store.display()
            ),
        )
        .expect("write nats.conf");
        let mut server = Command::new(nats_server_binary());
        server
            .arg("-c")
            .arg(dir.path().join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for user in USERS {
            server.env(format!("{}_PASSWORD", user.to_uppercase()), password(user));
        }
        let process = server.spawn().expect("nats-server starts");
        let admin_url = url("admin", port);
        let admin = eventually(
            "nats-server to accept the admin user",
            Duration::from_secs(20),
            || async {
                let (options, servers) = tidewatch_runtime::host::connect_options(&admin_url);
                options.connect(&servers).await.ok()
            },
        )
        .await;
        Server {
            port,
            admin,
            _process: process,
            _dir: dir,
        }
    }
}

fn url(user: &str, port: u16) -> String {
    format!("nats://{user}:{}@127.0.0.1:{port}", password(user))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_function_runs_as_its_own_least_privilege_user() {
    let server = Server::start().await;
    let (port, admin) = (server.port, server.admin.clone());
    let admin_url = url("admin", port);

    let provision = Command::new(binary("tidewatch"))
        .arg("provision")
        .env("NATS_URL", &admin_url)
        .output()
        .await
        .expect("provision runs");
    assert!(
        provision.status.success(),
        "{}",
        String::from_utf8_lossy(&provision.stderr)
    );

    let mut functions = vec![
        start_function("tidewatch-enrich", "enrich", port),
        start_function("tidewatch-correlate", "correlate", port),
        start_function("tidewatch-export", "export", port),
    ];
    let emit = Command::new(binary("tidewatch"))
        .args(["emit", "--subject", "pod/default/web-1", "--count", "3"])
        .args([
            "--data",
            r#"{"container":"app","exitCode":1,"reason":"Error"}"#,
        ])
        .env("NATS_URL", &admin_url)
        .output()
        .await
        .expect("emit runs");
    assert!(
        emit.status.success(),
        "{}",
        String::from_utf8_lossy(&emit.stderr)
    );

    // The insight comes out of export: every hop worked with only its own permissions.
    let stdout = functions[2].stdout.take().expect("export stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("an insight within a minute")
        .expect("read")
        .expect("a line");
    assert!(line.contains("dev.tidewatch.insight.crash-loop"), "{line}");

    // And a function cannot write where it has no business: enrich may not publish insights.
    let (options, servers) = tidewatch_runtime::host::connect_options(&format!(
        "nats://enrich:{}@127.0.0.1:{port}",
        password("enrich")
    ));
    let enrich = options.connect(&servers).await.expect("enrich connects");
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(enrich);
    let forbidden: Result<(), async_nats::Error> = async {
        Ok(js
            .publish("tidewatch.insights.forged", "x".into())
            .await?
            .await
            .map(|_| ())?)
    }
    .await;
    assert!(
        forbidden.is_err(),
        "enrich must not be able to publish insights"
    );
    assert_eq!(
        stream_messages(
            &async_nats::jetstream::new(admin),
            tidewatch_runtime::topology::INSIGHTS.name
        )
        .await,
        1
    );

    // The k8s collector keeps the pod metadata bucket and publishes its own
    // raw subjects, and nothing of another collector's.
    let (options, servers) = tidewatch_runtime::host::connect_options(&format!(
        "nats://k8s:{}@127.0.0.1:{port}",
        password("k8s")
    ));
    let k8s = options.connect(&servers).await.expect("k8s connects");
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(k8s);
    let pods = js
        .get_key_value(tidewatch_runtime::topology::POD_METADATA.bucket)
        .await
        .expect("k8s opens the pod metadata bucket");
    let key = tidewatch_runtime::topology::pod_keys::by_uid("uid-1");
    pods.put(&key, "meta".into())
        .await
        .expect("k8s writes pod metadata");
    assert_eq!(
        pods.get(&key).await.expect("k8s reads it back").as_deref(),
        Some(&b"meta"[..])
    );
    pods.delete(&key).await.expect("k8s deletes pod metadata");
    js.publish(
        tidewatch_runtime::topology::subjects::raw("k8s", "node-1"),
        "x".into(),
    )
    .await
    .expect("send")
    .await
    .expect("k8s publishes its raw subject");
    let forged: Result<(), async_nats::Error> = async {
        Ok(js
            .publish(
                tidewatch_runtime::topology::subjects::raw("ebpf", "node-1"),
                "x".into(),
            )
            .await?
            .await
            .map(|_| ())?)
    }
    .await;
    assert!(
        forged.is_err(),
        "k8s must not publish as the eBPF collector"
    );

    // Replies are private: a component cannot subscribe to another's inbox
    // (pull deliveries and KV answers travel there), nor to the shared one.
    for foreign in ["_INBOX_enrich.>", "_INBOX.>"] {
        let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
        let (options, servers) = tidewatch_runtime::host::connect_options(&format!(
            "nats://k8s:{}@127.0.0.1:{port}",
            password("k8s")
        ));
        let snoop = options
            .event_callback(move |event| {
                let errors_tx = errors_tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = errors_tx.send(e.to_string());
                    }
                }
            })
            .connect(&servers)
            .await
            .expect("k8s connects");
        let _sub = snoop.subscribe(foreign).await.expect("subscribe is sent");
        snoop.flush().await.expect("flush");
        let error = tokio::time::timeout(Duration::from_secs(10), errors.recv())
            .await
            .expect("the server answers the subscription")
            .expect("an error");
        assert!(
            error.to_lowercase().contains("permissions violation"),
            "k8s subscribing to {foreign}: {error}"
        );
    }

    // enrich reads the pods bucket; only the k8s collector writes it.
    let (options, servers) = tidewatch_runtime::host::connect_options(&format!(
        "nats://enrich:{}@127.0.0.1:{port}",
        password("enrich")
    ));
    let enrich = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(options.connect(&servers).await.expect("enrich connects"));
    let pods = enrich
        .get_key_value(tidewatch_runtime::topology::POD_METADATA.bucket)
        .await
        .expect("enrich opens the pod metadata bucket");
    assert!(pods.get("anything").await.is_ok(), "enrich reads pods");
    assert!(
        pods.put("forged", "x".into()).await.is_err(),
        "enrich must not write the pods bucket"
    );

    for f in &mut functions {
        signal(f, nix::sys::signal::Signal::SIGTERM);
        assert!(wait_exit(f, Duration::from_secs(30)).await.success());
    }
}

/// Something a user tries.
#[derive(Clone, Copy, Debug)]
enum Try<'a> {
    Publish(&'a str),
    Subscribe(&'a str),
}

/// The server's permissions-violation error for `user` doing `what`; `Err`
/// with what happened instead (another error, or none within 5 s).
async fn refused(port: u16, user: &str, what: Try<'_>) -> Result<String, String> {
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let (options, servers) = tidewatch_runtime::host::connect_options(&url(user, port));
    let client = options
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = errors_tx.send(e.to_string());
                }
            }
        })
        .connect(&servers)
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"));
    let _sub = match what {
        Try::Publish(subject) => {
            client
                .publish(subject.to_string(), "forged".into())
                .await
                .expect("publish is sent");
            None
        }
        Try::Subscribe(subject) => Some(
            client
                .subscribe(subject.to_string())
                .await
                .expect("subscribe is sent"),
        ),
    };
    client.flush().await.expect("flush");
    match tokio::time::timeout(Duration::from_secs(5), errors.recv()).await {
        Ok(Some(e)) if e.to_lowercase().contains("permissions violation") => Ok(e),
        Ok(Some(e)) => Err(format!("another error: {e}")),
        _ => Err("no error within 5 s: allowed".to_string()),
    }
}

/// Every component's credentials against what belongs to the others, on a
/// real nats-server with the rendered users: replies, raw subjects, KV
/// buckets and stream administration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_component_reaches_what_belongs_to_another() {
    use tidewatch_runtime::host::inbox_prefix;
    use tidewatch_runtime::topology::{self, subjects};
    let server = Server::start().await;
    let port = server.port;
    let provision = Command::new(binary("tidewatch"))
        .arg("provision")
        .env("NATS_URL", url("admin", port))
        .output()
        .await
        .expect("provision runs");
    assert!(
        provision.status.success(),
        "{}",
        String::from_utf8_lossy(&provision.stderr)
    );
    let components: Vec<&str> = USERS.into_iter().filter(|u| *u != "admin").collect();
    let collectors = ["ebpf", "k8s", "systemd"];
    let pods = topology::POD_METADATA.bucket;
    let state = topology::CORRELATION_STATE.bucket;
    let raw = topology::RAW.name;

    let mut checks: Vec<(&str, String, bool)> = Vec::new(); // (user, subject, publish?)
    for user in &components {
        // Replies are private: no other component's inbox, not the shared one.
        for other in USERS.iter().filter(|o| *o != user) {
            checks.push((user, format!("{}.>", inbox_prefix(other)), false));
        }
        checks.push((user, "_INBOX.>".to_string(), false));
        checks.push((user, ">".to_string(), false));
        // Streams are admin's: nobody else deletes or purges one.
        checks.push((user, format!("$JS.API.STREAM.DELETE.{raw}"), true));
        checks.push((user, format!("$JS.API.STREAM.PURGE.{raw}"), true));
        // The correlation state is correlate's alone; the pods bucket the k8s collector's.
        if *user != "correlate" {
            checks.push((user, format!("$KV.{state}.forged"), true));
            checks.push((
                user,
                format!("$JS.API.DIRECT.GET.KV_{state}.$KV.{state}.x"),
                true,
            ));
        }
        if *user != "k8s" {
            checks.push((user, format!("$KV.{pods}.forged"), true));
        }
        // Raw events come from collectors only, each under its own name.
        for collector in collectors.iter().filter(|c| *c != user) {
            checks.push((user, subjects::raw(collector, "node-1"), true));
        }
    }
    let mut allowed = Vec::new();
    for (user, subject, publish) in &checks {
        let what = if *publish {
            Try::Publish(subject)
        } else {
            Try::Subscribe(subject)
        };
        if let Err(e) = refused(port, user, what).await {
            allowed.push(format!("{user} {what:?}: {e}"));
        }
    }
    assert!(
        allowed.is_empty(),
        "{} of {} checks not refused:\n{}",
        allowed.len(),
        checks.len(),
        allowed.join("\n")
    );

    // The check itself tells refused from allowed: a user's own inbox is allowed.
    assert!(
        refused(
            port,
            "ebpf",
            Try::Subscribe(&format!("{}.>", inbox_prefix("ebpf")))
        )
        .await
        .is_err()
    );
    // And what they may do still works: each collector stores its own raw
    // events (the refusals above are not a server refusing everything).
    for collector in collectors {
        let (options, servers) = tidewatch_runtime::host::connect_options(&url(collector, port));
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(options.connect(&servers).await.expect("connects"));
        js.publish(subjects::raw(collector, "node-1"), "x".into())
            .await
            .expect("send")
            .await
            .unwrap_or_else(|e| panic!("{collector} publishes its own raw subject: {e}"));
    }
    // Correlate keeps its state.
    let (options, servers) = tidewatch_runtime::host::connect_options(&url("correlate", port));
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(options.connect(&servers).await.expect("connects"));
    let kv = js
        .get_key_value(state)
        .await
        .expect("correlate opens its state");
    kv.put("k", "v".into())
        .await
        .expect("correlate writes its state");
}
