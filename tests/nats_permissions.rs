//! The NATS users rendered into deploy/nats.yaml, on a real nats-server: each
//! function runs the whole pipeline as its own least-privilege user, and a
//! user cannot publish where it has no business.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde::Deserialize as _;
use tidewatch_auth_callout::nkey::AccountKey;
use tidewatch_testkit::{BoundToken, TokenReviewer, eventually, free_port, nats_server_binary};
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

/// The users with a password in auth.conf.
const USERS: [&str; 6] = [
    "provisioner",
    "admin",
    "enrich",
    "correlate",
    "export",
    "auth-callout",
];
/// Collectors authenticate through the auth callout, on these nodes.
const COLLECTORS: [&str; 3] = ["ebpf", "k8s", "systemd"];
const NODES: [&str; 2] = ["node-1", "node-2"];

/// As the rendered StatefulSet names them (src/render/nats.rs).
fn password_env(user: &str) -> String {
    format!("{}_PASSWORD", user.to_uppercase().replace('-', "_"))
}

fn password(user: &str) -> String {
    format!("secret-{user}")
}

/// The projected ServiceAccount token of `collector`'s pod on `node`.
fn token(collector: &str, node: &str) -> String {
    format!("token-of-{collector}-on-{node}")
}

/// Who connects: a user with a password, or a collector's pod with its token.
#[derive(Clone, Copy, Debug)]
enum Who<'a> {
    User(&'a str),
    Collector(&'a str, &'a str),
}

impl Who<'_> {
    fn options(self) -> async_nats::ConnectOptions {
        match self {
            Who::User(user) => {
                async_nats::ConnectOptions::with_user_and_password(user.to_string(), password(user))
                    .custom_inbox_prefix(tidewatch_runtime::host::inbox_prefix(user))
            }
            Who::Collector(c, node) => async_nats::ConnectOptions::with_token(token(c, node))
                .custom_inbox_prefix(tidewatch_runtime::host::node_inbox_prefix(c, node)),
        }
    }

    async fn connect(self, port: u16) -> async_nats::Client {
        self.options()
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("{self:?} connects: {e}"))
    }

    async fn jetstream(self, port: u16) -> async_nats::jetstream::Context {
        async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(self.connect(port).await)
    }
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

/// nats-server with the rendered auth.conf, every user's password set, and
/// the auth callout (its binary) answering for the collectors, against a
/// scripted TokenReview endpoint that knows each collector's token on each
/// node.
struct Server {
    port: u16,
    admin: async_nats::Client,
    reviewer: TokenReviewer,
    _callout: Child,
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
        let issuer = AccountKey::generate().expect("issuer key");
        let mut server = Command::new(nats_server_binary());
        server
            .arg("-c")
            .arg(dir.path().join("nats.conf"))
            .env("AUTH_CALLOUT_ISSUER", issuer.public_key().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for user in USERS {
            server.env(password_env(user), password(user));
        }
        let process = server.spawn().expect("nats-server starts");

        let reviewer = TokenReviewer::start().await;
        for collector in COLLECTORS {
            for node in NODES {
                reviewer.allow(
                    &token(collector, node),
                    BoundToken::new(
                        "tidewatch-system",
                        &format!("tidewatch-collector-{collector}"),
                        node,
                    ),
                );
            }
        }
        std::fs::write(dir.path().join("kubeconfig"), reviewer.kubeconfig()).expect("kubeconfig");
        std::fs::write(dir.path().join("issuer.seed"), issuer.seed()).expect("seed");
        let callout = Command::new(binary("tidewatch-auth-callout"))
            .env("NATS_URL", format!("nats://127.0.0.1:{port}"))
            .env("NATS_USER", "auth-callout")
            .env("NATS_PASSWORD", password("auth-callout"))
            .env(
                "TIDEWATCH_AUTH_ISSUER_SEED_FILE",
                dir.path().join("issuer.seed"),
            )
            .env("KUBECONFIG", dir.path().join("kubeconfig"))
            .env("TIDEWATCH_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the auth callout starts");

        let admin = eventually(
            "nats-server to accept the admin user",
            Duration::from_secs(20),
            || async {
                Who::User("admin")
                    .options()
                    .connect(format!("nats://127.0.0.1:{port}"))
                    .await
                    .ok()
            },
        )
        .await;
        // The callout is up once a collector gets in.
        eventually(
            "the auth callout to answer",
            Duration::from_secs(20),
            || async {
                Who::Collector("ebpf", "node-1")
                    .options()
                    .connect(format!("nats://127.0.0.1:{port}"))
                    .await
                    .ok()
            },
        )
        .await;
        Server {
            port,
            admin,
            reviewer,
            _callout: callout,
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
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(Who::User("enrich").connect(port).await);
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

    // The k8s collector (its token, through the callout) keeps the pod
    // metadata bucket and publishes its own raw subject, and nothing of
    // another collector's or another node's.
    let js = Who::Collector("k8s", "node-1").jetstream(port).await;
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
    for (collector, node) in [("ebpf", "node-1"), ("k8s", "node-2")] {
        let forged: Result<(), async_nats::Error> = async {
            Ok(js
                .publish(
                    tidewatch_runtime::topology::subjects::raw(collector, node),
                    "x".into(),
                )
                .await?
                .await
                .map(|_| ())?)
        }
        .await;
        assert!(
            forged.is_err(),
            "k8s on node-1 must not publish as {collector} on {node}"
        );
    }

    // Replies are private: a component cannot subscribe to another's inbox
    // (pull deliveries and KV answers travel there), nor to the shared one.
    for foreign in ["_INBOX_enrich.>", "_INBOX.>"] {
        assert!(
            refused(
                port,
                Who::Collector("k8s", "node-1"),
                Try::Subscribe(foreign)
            )
            .await
            .is_ok(),
            "k8s subscribing to {foreign}"
        );
    }

    // enrich reads the pods bucket; only the k8s collector writes it.
    let enrich = Who::User("enrich").jetstream(port).await;
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
async fn refused(port: u16, who: Who<'_>, what: Try<'_>) -> Result<String, String> {
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let client = who
        .options()
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = errors_tx.send(e.to_string());
                }
            }
        })
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| panic!("{who:?} connects: {e}"));
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
    use tidewatch_runtime::host::{inbox_prefix, node_inbox_prefix};
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
    let mut components: Vec<Who> = USERS
        .into_iter()
        .filter(|u| *u != "admin")
        .map(Who::User)
        .collect();
    components.extend(COLLECTORS.map(|c| Who::Collector(c, "node-1")));
    let pods = topology::POD_METADATA.bucket;
    let state = topology::CORRELATION_STATE.bucket;
    let raw = topology::RAW.name;
    let inbox = |who: Who| match who {
        Who::User(u) => inbox_prefix(u),
        Who::Collector(c, node) => node_inbox_prefix(c, node),
    };
    // Everyone's inbox, the collectors' on both nodes.
    let mut inboxes: Vec<String> = USERS.iter().map(|u| inbox_prefix(u)).collect();
    for c in COLLECTORS {
        inboxes.extend(NODES.map(|n| node_inbox_prefix(c, n)));
    }

    let mut checks: Vec<(Who, String, bool)> = Vec::new(); // (who, subject, publish?)
    for &who in &components {
        let own_inbox = inbox(who);
        // Replies are private: no other component's inbox (nor the same
        // collector's on another node), not the shared one.
        for other in inboxes.iter().filter(|i| **i != own_inbox) {
            checks.push((who, format!("{other}.>"), false));
        }
        checks.push((who, "_INBOX.>".to_string(), false));
        checks.push((who, ">".to_string(), false));
        // Streams are admin's: nobody else deletes or purges one.
        checks.push((who, format!("$JS.API.STREAM.DELETE.{raw}"), true));
        checks.push((who, format!("$JS.API.STREAM.PURGE.{raw}"), true));
        // Nobody but the server sends authorization requests.
        checks.push((who, "$SYS.REQ.USER.AUTH".to_string(), true));
        // The correlation state is correlate's alone; the pods bucket the k8s collector's.
        if !matches!(who, Who::User("correlate")) {
            checks.push((who, format!("$KV.{state}.forged"), true));
            checks.push((
                who,
                format!("$JS.API.DIRECT.GET.KV_{state}.$KV.{state}.x"),
                true,
            ));
        }
        if !matches!(who, Who::Collector("k8s", _)) {
            checks.push((who, format!("$KV.{pods}.forged"), true));
        }
        // Raw events come from collectors only, each under its own name
        // and only for its own node.
        for collector in COLLECTORS {
            for node in NODES {
                if !matches!(who, Who::Collector(c, n) if c == collector && n == node) {
                    checks.push((who, subjects::raw(collector, node), true));
                }
            }
        }
    }
    let mut allowed = Vec::new();
    for (who, subject, publish) in &checks {
        let what = if *publish {
            Try::Publish(subject)
        } else {
            Try::Subscribe(subject)
        };
        if let Err(e) = refused(port, *who, what).await {
            allowed.push(format!("{who:?} {what:?}: {e}"));
        }
    }
    assert!(
        allowed.is_empty(),
        "{} of {} checks not refused:\n{}",
        allowed.len(),
        checks.len(),
        allowed.join("\n")
    );

    // The check itself tells refused from allowed: a collector's own inbox is allowed.
    assert!(
        refused(
            port,
            Who::Collector("ebpf", "node-1"),
            Try::Subscribe(&format!("{}.>", node_inbox_prefix("ebpf", "node-1")))
        )
        .await
        .is_err()
    );
    // And what they may do still works: each collector stores its own raw
    // events on each node (the refusals above are not a server refusing everything).
    for collector in COLLECTORS {
        for node in NODES {
            Who::Collector(collector, node)
                .jetstream(port)
                .await
                .publish(subjects::raw(collector, node), "x".into())
                .await
                .expect("send")
                .await
                .unwrap_or_else(|e| {
                    panic!("{collector} on {node} publishes its own raw subject: {e}")
                });
        }
    }
    // Correlate keeps its state.
    let kv = Who::User("correlate")
        .jetstream(port)
        .await
        .get_key_value(state)
        .await
        .expect("correlate opens its state");
    kv.put("k", "v".into())
        .await
        .expect("correlate writes its state");
}

/// The callout lets in only a collector's pod with a live token for NATS:
/// not an unknown token, not a token for another audience, not another
/// ServiceAccount's, not a deleted pod's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callout_admits_only_live_collector_tokens() {
    let server = Server::start().await;
    let port = server.port;
    let try_token = |token: String| async move {
        async_nats::ConnectOptions::with_token(token)
            .connection_timeout(Duration::from_secs(5))
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
    };
    // A token bound for the API server's audience, not NATS'.
    let mut wrong_audience =
        BoundToken::new("tidewatch-system", "tidewatch-collector-ebpf", "node-1");
    wrong_audience.audiences = vec!["https://kubernetes.default.svc.cluster.local".into()];
    server.reviewer.allow("api-audience", wrong_audience);
    // A valid token of some other workload.
    server.reviewer.allow(
        "enrich-pod",
        BoundToken::new("tidewatch", "tidewatch-enrich", "node-1"),
    );
    // A collector ServiceAccount's name in another namespace.
    server.reviewer.allow(
        "lookalike",
        BoundToken::new("default", "tidewatch-collector-ebpf", "node-1"),
    );
    let reviews_before = server.reviewer.reviews();
    for token in ["unknown", "api-audience", "enrich-pod", "lookalike"] {
        let refused = tokio::time::timeout(Duration::from_secs(20), try_token(token.to_string()))
            .await
            .expect("an answer");
        assert!(refused.is_err(), "{token} must not get in");
    }
    assert!(
        server.reviewer.reviews() >= reviews_before + 4,
        "each was reviewed"
    );
    // A deleted pod's token stops working.
    let live = token("systemd", "node-2");
    assert!(
        try_token(live.clone()).await.is_ok(),
        "a live token gets in"
    );
    server.reviewer.revoke(&live);
    assert!(try_token(live).await.is_err(), "a revoked token does not");
}
