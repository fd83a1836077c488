//! The eBPF collector against the real kernel and a real nats-server.
//!
//! These tests load the BPF programs, so they need root (or CAP_BPF +
//! CAP_PERFMON + CAP_SYS_RESOURCE). Without them they are skipped with a
//! message, except when `CI` is set: then they fail, so CI cannot pass
//! without running them.
//!
//! The machine runs other things, so every assertion is about processes and
//! sockets the test made itself (matched by pid, argv, port or cgroup).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use futures::StreamExt;
use tidewatch_collector_ebpf::collector::{COLLECTOR, CollectorDrops};
use tidewatch_collector_ebpf::wire::Kind;
use tidewatch_collector_ebpf::{COLLECTOR_DROPS, Collector, CollectorError, Config, Handle};
use tidewatch_proto::v1;
use tidewatch_runtime::binding::nats::from_nats;
use tidewatch_runtime::cloudevents::{AttributesReader, Event};
use tidewatch_runtime::collector::CommonConfig;
use tidewatch_runtime::event::payload;
use tidewatch_runtime::topology::{self, subjects, types};
use tidewatch_testkit::{NatsServer, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// Everything published to the test's subject, read as it arrives.
#[derive(Clone)]
struct Raw(Arc<tokio::sync::Mutex<RawInner>>);

struct RawInner {
    consumer: PullConsumer,
    events: Vec<Event>,
}

impl Raw {
    async fn new(js: &async_nats::jetstream::Context, node: &str) -> Raw {
        let stream = js.get_stream(topology::RAW.name).await.expect("raw stream");
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: subjects::raw(COLLECTOR, node),
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                // Not the 5 s default: a test may not poll while its load runs.
                inactive_threshold: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .expect("consumer");
        Raw(Arc::new(tokio::sync::Mutex::new(RawInner {
            consumer,
            events: Vec::new(),
        })))
    }

    /// Poll until `f` finds what it wants in everything seen so far.
    async fn wait<T>(&self, what: &str, f: impl Fn(&[Event]) -> Option<T>) -> T {
        let f = &f;
        eventually(what, WAIT, || {
            let inner = self.0.clone();
            async move {
                let mut inner = inner.lock().await;
                inner.poll().await;
                f(&inner.events)
            }
        })
        .await
    }
}

impl RawInner {
    async fn poll(&mut self) {
        loop {
            let Ok(mut batch) = self.consumer.fetch().max_messages(1000).messages().await else {
                return;
            };
            let mut n = 0;
            while let Some(Ok(message)) = batch.next().await {
                n += 1;
                let event = from_nats(message.headers.as_ref(), &message.payload)
                    .expect("every published message is a CloudEvent");
                self.events.push(event);
            }
            if n == 0 {
                return;
            }
        }
    }
}

fn typed<'a, M: prost::Message + prost::Name + Default + serde::de::DeserializeOwned>(
    events: &'a [Event],
    ty: &'a str,
) -> impl Iterator<Item = (&'a Event, M)> + 'a {
    events
        .iter()
        .filter(move |e| e.ty() == ty)
        .map(|e| (e, payload::<M>(e).expect("payload matches its type")))
}

struct Harness {
    handle: Handle,
    raw: Raw,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), CollectorError>>>,
    // Last: the server outlives the collector.
    server: NatsServer,
}

impl Harness {
    /// Start a nats-server, provision it, and start a collector configured
    /// by `tweak`. `None` (skip) when eBPF cannot load and `CI` is not set.
    async fn start(name: &str, tweak: impl FnOnce(&mut Config)) -> Option<Harness> {
        let server = NatsServer::start().await;
        let js = server.jetstream().await;
        tidewatch_runtime::provision::provision(&js, &[], &Default::default())
            .await
            .expect("provision");
        let node = format!("test-{name}-{}", std::process::id());
        let mut config = Config {
            common: CommonConfig::default()
                .nats_url(server.client_url())
                .node(node.clone())
                .metrics_addr(Some("127.0.0.1:0".parse().expect("addr"))),
            replay_processes: false,
            ring_bytes: 1 << 20,
            ..Config::default()
        };
        tweak(&mut config);
        let collector = match Collector::start(config).await {
            Ok(c) => c,
            Err(e @ (CollectorError::Load(_) | CollectorError::Attach { .. })) => {
                tidewatch_testkit::skip::cannot_run(
                    name,
                    &format!("eBPF cannot load here (run as root): {e}"),
                );
                return None;
            }
            Err(e) => panic!("collector start: {e}"),
        };
        let handle = collector.handle();
        let raw = Raw::new(&js, &node).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(collector.run(async {
            let _ = stopped.await;
        }));
        Some(Harness {
            handle,
            raw,
            stop: Some(stop),
            task: Some(task),
            server,
        })
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("collector task").expect("collector ran");
        }
    }
}

/// Whether the kernel tests can run here: `false` (skip, with a message)
/// when the host cannot load eBPF, unless `CI` is set, which fails the test.
fn can_run(name: &str) -> bool {
    match tidewatch_collector_ebpf::preflight::check() {
        Ok(()) => true,
        Err(why) => {
            tidewatch_testkit::skip::cannot_run(name, &why);
            false
        }
    }
}

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("tidewatch-{tag}-{}-{nanos}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_exit_of_a_process_reach_the_stream() {
    let Some(h) = Harness::start("exec", |_| {}).await else {
        return;
    };
    let arg = unique("true");
    let mut child = std::process::Command::new("/bin/true")
        .arg(&arg)
        .spawn()
        .expect("spawn /bin/true");
    let pid = child.id();
    assert!(child.wait().expect("wait").success());

    let exec = h
        .raw
        .wait("the exec event of /bin/true", |events| {
            typed::<v1::ProcessExec>(events, types::PROCESS_EXEC)
                .find(|(_, p)| p.argv.contains(&arg))
                .map(|(e, p)| (e.clone(), p))
        })
        .await;
    let (event, exec) = exec;
    let info = exec.process.clone().expect("process info");
    assert_eq!(info.pid, pid);
    assert_eq!(info.tgid, pid);
    assert_eq!(info.ppid, std::process::id());
    assert_eq!(info.comm, "true");
    assert!(info.cgroup_id > 0);
    assert!(info.monotonic_ns > 0 && info.wall_time_ns > 0);
    assert_eq!(exec.filename, "/bin/true");
    assert_eq!(exec.argv, vec!["/bin/true".to_string(), arg.clone()]);
    assert!(!exec.argv_truncated);
    assert_eq!(
        event.source().to_string(),
        topology::source(COLLECTOR, &format!("test-exec-{}", std::process::id()))
    );
    // The event time is the kernel's, within a minute of now.
    let age = chrono::Utc::now() - *event.time().expect("time");
    assert!(age.num_seconds().abs() < 60, "{age}");

    let exit = h
        .raw
        .wait("the exit event of /bin/true", |events| {
            typed::<v1::ProcessExit>(events, types::PROCESS_EXIT)
                .find(|(_, p)| p.process.as_ref().is_some_and(|i| i.pid == pid))
                .map(|(_, p)| p)
        })
        .await;
    assert_eq!(exit.exit_code, 0);
    assert_eq!(exit.signal, 0);
    let info = exit.process.expect("process");
    assert_eq!(info.ppid, std::process::id());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_signals_are_right() {
    let Some(h) = Harness::start("exit", |_| {}).await else {
        return;
    };
    let mut three = std::process::Command::new("/bin/sh")
        .args(["-c", "exit 3"])
        .spawn()
        .expect("spawn sh");
    let three_pid = three.id();
    assert_eq!(three.wait().expect("wait").code(), Some(3));

    let mut killed = std::process::Command::new("/bin/sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep");
    let killed_pid = killed.id();
    killed.kill().expect("SIGKILL");
    let _ = killed.wait();

    let exit_of = |pid: u32| {
        move |events: &[Event]| {
            typed::<v1::ProcessExit>(events, types::PROCESS_EXIT)
                .find(|(_, p)| p.process.as_ref().is_some_and(|i| i.pid == pid))
                .map(|(_, p)| p)
        }
    };
    let three = h.raw.wait("exit 3", exit_of(three_pid)).await;
    assert_eq!(
        (three.exit_code, three.signal, three.core_dumped),
        (3, 0, false)
    );
    let killed = h.raw.wait("SIGKILL", exit_of(killed_pid)).await;
    assert_eq!((killed.exit_code, killed.signal), (128 + 9, 9));
    assert!(killed.runtime_ns > 0);
    h.shutdown().await;
}

fn tcp_events(events: &[Event], ty: &str) -> Vec<v1::TcpConnection> {
    typed::<v1::TcpConnection>(events, ty)
        .map(|(_, p)| p)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_closed_port_is_refused() {
    // The test process itself connects, so it must not be ignored.
    let Some(h) = Harness::start("refused", |c| c.ignore_self = false).await else {
        return;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let err = std::net::TcpStream::connect(("127.0.0.1", port)).expect_err("nothing listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let refused = h
        .raw
        .wait("a refused event", |events| {
            tcp_events(events, types::TCP_REFUSED)
                .into_iter()
                .find(|t| t.dport == u32::from(port))
        })
        .await;
    assert_eq!(refused.change, "refused");
    assert_eq!(refused.family, 4);
    assert_eq!(refused.daddr, "127.0.0.1");
    assert_eq!(refused.saddr, "127.0.0.1");
    let info = refused.process.expect("process");
    assert_eq!(info.tgid, std::process::id());

    // The same over IPv6.
    let port6 = {
        let l = std::net::TcpListener::bind("[::1]:0").expect("bind ::1");
        l.local_addr().expect("addr").port()
    };
    let err = std::net::TcpStream::connect(("::1", port6)).expect_err("nothing listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let refused6 = h
        .raw
        .wait("a refused event over IPv6", |events| {
            tcp_events(events, types::TCP_REFUSED)
                .into_iter()
                .find(|t| t.dport == u32::from(port6) && t.family == 6)
        })
        .await;
    assert_eq!(
        (refused6.saddr.as_str(), refused6.daddr.as_str()),
        ("::1", "::1")
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_accept_close_show_both_sides() {
    let Some(h) = Harness::start("tcp", |c| c.ignore_self = false).await else {
        return;
    };
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let server_port = listener.local_addr().expect("addr").port();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", server_port)).expect("connect");
    let client_port = client.local_addr().expect("addr").port();
    let (mut served, _) = listener.accept().expect("accept");
    client.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    served.read_exact(&mut buf).expect("read");
    drop(client);
    let mut rest = Vec::new();
    let _ = served.read_to_end(&mut rest);
    drop(served);
    drop(listener);

    let (sp, cp) = (u32::from(server_port), u32::from(client_port));
    let connect = h
        .raw
        .wait("the client's connect", |events| {
            tcp_events(events, types::TCP_CONNECT)
                .into_iter()
                .find(|t| t.sport == cp && t.dport == sp)
        })
        .await;
    assert_eq!(
        (connect.saddr.as_str(), connect.daddr.as_str()),
        ("127.0.0.1", "127.0.0.1")
    );
    assert_eq!(
        connect.process.as_ref().expect("process").tgid,
        std::process::id()
    );

    let accept = h
        .raw
        .wait("the server's accept", |events| {
            tcp_events(events, types::TCP_ACCEPT)
                .into_iter()
                .find(|t| t.sport == sp && t.dport == cp)
        })
        .await;
    assert_eq!(
        (accept.saddr.as_str(), accept.daddr.as_str()),
        ("127.0.0.1", "127.0.0.1")
    );
    assert_eq!(
        accept.process.as_ref().expect("process").tgid,
        std::process::id()
    );

    let closes = h
        .raw
        .wait("both sides' close", |events| {
            let closes = tcp_events(events, types::TCP_CLOSE);
            let client = closes
                .iter()
                .find(|t| t.sport == cp && t.dport == sp)?
                .clone();
            let server = closes
                .iter()
                .find(|t| t.sport == sp && t.dport == cp)?
                .clone();
            Some((client, server))
        })
        .await;
    for close in [&closes.0, &closes.1] {
        assert_eq!(close.change, "close");
        assert!(close.duration_ns > 0, "{close:?}");
    }
    assert_eq!(
        closes.0.bytes_sent, 4,
        "the client sent 4 bytes: {:?}",
        closes.0
    );
    assert_eq!(
        closes.1.bytes_received, 4,
        "the server received 4 bytes: {:?}",
        closes.1
    );
    h.shutdown().await;
}

/// A child cgroup with a memory limit, on whichever hierarchy has the
/// memory controller (v2, or v1 on hybrid hosts). Removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn create(name: &str, limit: u64) -> MemoryCgroup {
        let v2 = tidewatch_collector_ebpf::attribution::cgroup2_root().filter(|root| {
            std::fs::read_to_string(root.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        });
        let dir = match v2 {
            Some(root) => {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
                let dir = root.join(name);
                std::fs::create_dir(&dir).expect("create v2 cgroup");
                std::fs::write(dir.join("memory.max"), limit.to_string()).expect("memory.max");
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                dir
            }
            None => {
                let dir = Path::new("/sys/fs/cgroup/memory").join(name);
                std::fs::create_dir(&dir).expect("create v1 memory cgroup");
                std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())
                    .expect("memory.limit_in_bytes");
                let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
                dir
            }
        };
        MemoryCgroup { dir }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_in_a_memory_limited_cgroup_is_reported() {
    if !can_run("an_oom_kill_in_a_memory_limited_cgroup_is_reported") {
        return;
    }
    let Some(h) = Harness::start("oom", |_| {}).await else {
        return;
    };
    let limit = 32 << 20;
    let cgroup = MemoryCgroup::create(&unique("oom"), limit);
    // Move the shell into the cgroup, then become `tail`, which buffers
    // /dev/zero (no newline, ever) until the OOM killer ends it.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec tail /dev/zero",
        cgroup.dir.display()
    );
    let mut child = std::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let status = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "the OOM killer sends SIGKILL: {status:?}"
    );

    let oom = h
        .raw
        .wait("the OOM kill event", |events| {
            typed::<v1::OomKill>(events, types::OOM_KILL)
                .find(|(_, p)| p.victim.as_ref().is_some_and(|v| v.pid == pid))
                .map(|(_, p)| p)
        })
        .await;
    let victim = oom.victim.clone().expect("victim");
    assert_eq!(victim.tgid, pid);
    assert_eq!(victim.comm, "tail");
    assert!(victim.cgroup_id > 0);
    assert_eq!(oom.memory_limit_bytes, limit as i64);
    assert!(oom.rss_pages > 0, "{oom:?}");
    let exit = h
        .raw
        .wait("the victim's exit", |events| {
            typed::<v1::ProcessExit>(events, types::PROCESS_EXIT)
                .find(|(_, p)| p.process.as_ref().is_some_and(|i| i.pid == pid))
                .map(|(_, p)| p)
        })
        .await;
    assert_eq!(exit.signal, 9);
    h.shutdown().await;
}

/// A cgroup v2 directory (no controllers needed), removed on drop.
struct Cgroup2 {
    dir: PathBuf,
    id: u64,
}

impl Cgroup2 {
    fn create(name: &str) -> Cgroup2 {
        let root = tidewatch_collector_ebpf::attribution::cgroup2_root().expect("a cgroup2 mount");
        let dir = root.join(name);
        std::fs::create_dir(&dir).expect("create cgroup");
        let id = std::fs::metadata(&dir).expect("stat").ino();
        Cgroup2 { dir, id }
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_counters_are_exact_when_the_ring_overflows() {
    if !can_run("drop_counters_are_exact_when_the_ring_overflows") {
        return;
    }
    let cgroup = Cgroup2::create(&unique("drops"));
    let filter = cgroup.dir.display().to_string();
    let Some(h) = Harness::start("drops", |c| {
        // The smallest ring (one page: two exec records), only our cgroup.
        c.ring_bytes = 4096;
        c.include_cgroups = vec![filter];
        c.drops_interval = Duration::from_millis(500);
    })
    .await
    else {
        return;
    };
    h.handle.pause_draining();
    const N: usize = 200;
    // The shell moves itself into the cgroup, then forks and execs
    // /bin/true N times; `[` and `$(( ))` are shell builtins.
    let script = format!(
        "echo $$ > {}/cgroup.procs && i=0; while [ $i -lt {N} ]; do /bin/true; i=$((i+1)); done",
        cgroup.dir.display()
    );
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .status()
        .expect("run the burst");
    assert!(status.success());
    // Exits: N children and the shell itself.
    let (execs, exits) = (N as u64, N as u64 + 1);
    let drops_exec = h.handle.kernel_drops_of(Kind::Exec);
    let drops_exit = h.handle.kernel_drops_of(Kind::Exit);
    assert!(
        drops_exec > 0,
        "a one-page ring cannot hold {N} exec records"
    );
    h.handle.resume_draining();

    let id = cgroup.id;
    let seen = h
        .raw
        .wait(
            "every generated event, seen or counted as dropped",
            |events| {
                let seen_exec = typed::<v1::ProcessExec>(events, types::PROCESS_EXEC)
                    .filter(|(_, p)| p.process.as_ref().is_some_and(|i| i.cgroup_id == id))
                    .count() as u64;
                let seen_exit = typed::<v1::ProcessExit>(events, types::PROCESS_EXIT)
                    .filter(|(_, p)| p.process.as_ref().is_some_and(|i| i.cgroup_id == id))
                    .count() as u64;
                (seen_exec + drops_exec == execs && seen_exit + drops_exit == exits)
                    .then_some((seen_exec, seen_exit))
            },
        )
        .await;
    assert!(seen.0 > 0, "some exec records fit in the ring");
    // Nothing more arrives later (the counts are exact, not a lower bound).
    assert_eq!(h.handle.kernel_drops_of(Kind::Exec), drops_exec);

    // The drops are reported as an event, per type (summed over CPUs)...
    let reported = h
        .raw
        .wait("the collector.drops event", |events| {
            events
                .iter()
                .filter(|e| e.ty() == COLLECTOR_DROPS)
                .filter_map(|e| payload::<CollectorDrops>(e).ok())
                .map(|d| {
                    d.counts
                        .iter()
                        .filter(|c| c.stage == "kernel" && c.kind == Kind::Exec.name())
                        .map(|c| c.total)
                        .sum::<u64>()
                })
                .find(|total| *total == drops_exec)
        })
        .await;
    assert_eq!(reported, drops_exec);
    // ... and on /metrics.
    let addr = h.handle.metrics_addr().expect("metrics");
    let (status, body) = tidewatch_testkit::http_get(&format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    let on_metrics: u64 = body
        .lines()
        .filter(|l| {
            l.starts_with("tidewatch_ebpf_kernel_drops_total{")
                && l.contains("type=\"process.exec\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(on_metrics, drops_exec, "{body}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_processes_are_replayed_as_exists() {
    if !can_run("running_processes_are_replayed_as_exists") {
        return;
    }
    let arg = unique("exists");
    // A shell blocked in the `read` builtin on a pipe: running, and its argv
    // carries the unique argument ($0).
    let mut sleeper = std::process::Command::new("/bin/sh")
        .args(["-c", "read x", &arg])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let pid = sleeper.id();
    let harness = Harness::start("exists", |c| {
        c.replay_processes = true;
        c.replay_executables = true;
    })
    .await;
    let Some(h) = harness else {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        return;
    };
    let exists = h
        .raw
        .wait("process.exists for the sleeper", |events| {
            typed::<v1::ProcessExec>(events, types::PROCESS_EXISTS)
                .find(|(_, p)| p.process.as_ref().is_some_and(|i| i.pid == pid))
                .map(|(_, p)| p)
        })
        .await;
    assert_eq!(
        exists.argv,
        vec!["/bin/sh".to_string(), "-c".into(), "read x".into(), arg]
    );
    assert!(!exists.filename.is_empty());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let info = exists.process.expect("process");
    assert_eq!(info.ppid, std::process::id());
    assert!(info.cgroup_id > 0);
    h.shutdown().await;
}

/// Runs in a private network namespace (its own loopback, so the drop rule
/// touches nothing else on the machine): a reset, a connection whose data is
/// dropped (retransmits), and a connect whose SYNs are dropped (timeout).
const LOSSY_NETWORK: &str = r#"
import socket, struct, subprocess, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(); port = srv.getsockname()[1]

# Ports are read before the sockets close: a closed socket forgets an
# automatically bound port.
# Reset: the server closes with SO_LINGER 0, the client gets an RST.
c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
client_port = c.getsockname()[1]
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
try:
    c.recv(1)
except OSError:
    pass
print("reset", client_port, port, flush=True)
c.close()

# Retransmits: everything to the server's port is dropped on input from now
# on (dropped on output, a send fails locally and is not retransmitted).
c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
subprocess.run(["nft", "add table inet tidewatch; add chain inet tidewatch in { type filter hook input priority 0 ; }; add rule inet tidewatch in tcp dport %d drop" % port], check=True)
c.send(b"x" * 100)
time.sleep(2)
print("retransmit", c.getsockname()[1], port, flush=True)

# Timeout: one SYN retry (about 3 s), all dropped.
t = socket.socket(); t.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
t.bind(("127.0.0.1", 0)); client_port = t.getsockname()[1]
try:
    t.connect(("127.0.0.1", port))
except OSError as e:
    print("timeout", client_port, port, e.errno, flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_retransmits_and_connect_timeouts() {
    let Some(h) = Harness::start("lossy", |c| {
        c.retransmit_interval = Duration::from_millis(500);
    })
    .await
    else {
        return;
    };
    let script = std::env::temp_dir().join(format!("{}.py", unique("lossy")));
    std::fs::write(&script, LOSSY_NETWORK).expect("write script");
    let output = tokio::process::Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec python3 \"$0\""])
        .arg(&script)
        .output()
        .await
        .expect("run unshare, ip, nft and python3 (util-linux, iproute2, nftables, python3)");
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ports = |what: &str| -> (u32, u32) {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} line in {stdout}"));
        let mut parts = line
            .split_whitespace()
            .skip(1)
            .map(|p| p.parse::<u32>().expect("port"));
        (parts.next().expect("sport"), parts.next().expect("dport"))
    };

    let (sport, dport) = ports("reset");
    let reset = h
        .raw
        .wait("the client's reset", |events| {
            tcp_events(events, types::TCP_RESET)
                .into_iter()
                .find(|t| t.sport == sport && t.dport == dport)
        })
        .await;
    assert_eq!(reset.change, "reset");
    assert!(reset.process.expect("process").comm.starts_with("python"));

    let (sport, dport) = ports("retransmit");
    let retransmits = h
        .raw
        .wait("retransmits of the dropped data", |events| {
            let total: u32 = tcp_events(events, types::TCP_RETRANSMIT)
                .into_iter()
                .filter(|t| t.sport == sport && t.dport == dport)
                .map(|t| t.retransmits)
                .sum();
            (total > 0).then_some(total)
        })
        .await;
    assert!(retransmits >= 1);

    let (sport, dport) = ports("timeout");
    let timeout = h
        .raw
        .wait("the connect timeout", |events| {
            tcp_events(events, types::TCP_TIMEOUT)
                .into_iter()
                .find(|t| t.sport == sport && t.dport == dport)
        })
        .await;
    assert_eq!(timeout.change, "timeout");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_unreachable_the_ring_keeps_draining_and_losses_are_counted() {
    if !can_run("with_nats_unreachable_the_ring_keeps_draining_and_losses_are_counted") {
        return;
    }
    let cgroup = Cgroup2::create(&unique("unreachable"));
    let filter = cgroup.dir.display().to_string();
    let dead = tidewatch_testkit::free_port();
    const QUEUE: usize = 16;
    const IN_FLIGHT: usize = 8;
    let Some(h) = Harness::start("unreachable", |c| {
        c.common.nats_url = format!("nats://127.0.0.1:{dead}");
        c.include_cgroups = vec![filter];
        c.queue_capacity = QUEUE;
        c.max_in_flight = IN_FLIGHT;
    })
    .await
    else {
        return;
    };
    const N: u64 = 100;
    let script = format!(
        "echo $$ > {}/cgroup.procs && i=0; while [ $i -lt {N} ]; do /bin/true; i=$((i+1)); done",
        cgroup.dir.display()
    );
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .status()
        .expect("run the burst");
    assert!(status.success());
    // N execs and N + 1 exits, all read from the ring: none dropped in the
    // kernel although nothing can be published. The publisher holds at most
    // IN_FLIGHT unacknowledged events (then `send` waits), the queue QUEUE
    // more, the publish task one; everything beyond is counted as lost.
    let generated = 2 * N + 1;
    let held = (QUEUE + IN_FLIGHT + 1) as u64;
    let stats = h.handle.stats.clone();
    let read = |k: Kind| stats.read[k as usize].load(std::sync::atomic::Ordering::Relaxed);
    let lost = eventually("every record read, the excess counted", WAIT, || async {
        let read = read(Kind::Exec) + read(Kind::Exit);
        let lost = stats.lost_queue.load(std::sync::atomic::Ordering::Relaxed);
        (read == generated && lost + held >= generated).then_some(lost)
    })
    .await;
    assert_eq!(h.handle.kernel_drops_of(Kind::Exec), 0);
    assert_eq!(h.handle.kernel_drops_of(Kind::Exit), 0);
    let addr = h.handle.metrics_addr().expect("metrics");
    let (_, body) = tidewatch_testkit::http_get(&format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics");
    assert!(
        body.contains(&format!(
            "tidewatch_ebpf_events_lost_total{{component=\"collector-ebpf\",reason=\"queue_full\"}} {lost}"
        )),
        "{body}"
    );
    // No shutdown: with NATS down it would wait out the publish retries.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_events_are_spooled_and_replayed_once_nats_is_back() {
    if !can_run("during_an_outage_events_are_spooled_and_replayed_once_nats_is_back") {
        return;
    }
    let cgroup = Cgroup2::create(&unique("spool"));
    let filter = cgroup.dir.display().to_string();
    let spool = tempfile::tempdir().expect("spool dir");
    let spool_dir = spool.path().to_path_buf();
    let Some(mut h) = Harness::start("spool", |c| {
        c.include_cgroups = vec![filter];
        c.common.spool_dir = Some(spool_dir);
    })
    .await
    else {
        return;
    };
    let addr = h.handle.metrics_addr().expect("metrics");
    let metric = |body: &str, name: &str| -> u64 {
        body.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    h.server.kill().await;
    const N: usize = 50;
    // Execs and exits of the shell's children, plus the shell's own exit.
    let expected = (2 * N + 1) as u64;
    burst_in(&cgroup.dir, N);
    eventually("the burst's events to be spooled", WAIT, || async move {
        let (_, body) = tidewatch_testkit::http_get(&format!("http://{addr}/metrics"))
            .await
            .ok()?;
        (metric(&body, "tidewatch_spooled_total") >= expected).then_some(())
    })
    .await;

    h.server.restart().await;
    let js = h.server.jetstream().await;
    let node = format!("test-spool-{}", std::process::id());
    let raw = Raw::new(&js, &node).await;
    let events = raw
        .wait("every spooled event in the stream", |events| {
            let n = typed::<v1::ProcessExec>(events, types::PROCESS_EXEC)
                .filter(|(_, p)| p.filename == "/bin/true")
                .count();
            (n >= N).then(|| events.to_vec())
        })
        .await;
    let mut ids: Vec<&str> = events.iter().map(|e| e.id()).collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "no event stored twice");
    let (_, body) = tidewatch_testkit::http_get(&format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics");
    assert!(
        metric(&body, "tidewatch_spool_replayed_total") >= expected,
        "{body}"
    );
    assert_eq!(metric(&body, "tidewatch_spool_dropped_total"), 0, "{body}");
    h.shutdown().await;
}

/// Run `n` execs of /bin/true from a shell that first moves into `cgroup`.
fn burst_in(cgroup: &Path, n: usize) {
    let script = format!(
        "echo $$ > {}/cgroup.procs && i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done",
        cgroup.display()
    );
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .status()
        .expect("run the burst");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_filters_and_sampling_apply_in_the_kernel() {
    if !can_run("cgroup_filters_and_sampling_apply_in_the_kernel") {
        return;
    }
    let included = Cgroup2::create(&unique("include"));
    let excluded_name = format!(
        "{}/excluded",
        included
            .dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
    );
    let excluded = Cgroup2::create(&excluded_name);
    let (inc, exc) = (
        included.dir.display().to_string(),
        excluded.dir.display().to_string(),
    );
    let Some(h) = Harness::start("filters", |c| {
        c.include_cgroups = vec![inc];
        c.exclude_cgroups = vec![exc];
        c.sampling.insert("exec".into(), 10);
    })
    .await
    else {
        return;
    };
    const N: usize = 50;
    // First the excluded (nested) cgroup, then the included one: once the
    // included one's exits are all in, anything from the excluded one would be too.
    burst_in(&excluded.dir, N);
    burst_in(&included.dir, N);
    let (inc_id, exc_id) = (included.id, excluded.id);
    let execs = h
        .raw
        .wait("every exit of the included cgroup", |events| {
            let exits = typed::<v1::ProcessExit>(events, types::PROCESS_EXIT)
                .filter(|(_, p)| p.process.as_ref().is_some_and(|i| i.cgroup_id == inc_id))
                .count();
            (exits == N + 1).then(|| {
                typed::<v1::ProcessExec>(events, types::PROCESS_EXEC)
                    .filter(|(_, p)| p.process.as_ref().is_some_and(|i| i.cgroup_id == inc_id))
                    .count()
            })
        })
        .await;
    // One in ten per CPU: ceil(n_cpu / 10) summed over the CPUs that ran them.
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert!(
        (N / 10..=N / 10 + cpus).contains(&execs),
        "{execs} execs kept of {N} at one in ten"
    );
    let raw = h.raw.0.lock().await;
    let from_excluded = raw
        .events
        .iter()
        .filter_map(|e| match e.ty() {
            t if t == types::PROCESS_EXEC => payload::<v1::ProcessExec>(e).ok()?.process,
            t if t == types::PROCESS_EXIT => payload::<v1::ProcessExit>(e).ok()?.process,
            _ => None,
        })
        .filter(|p| p.cgroup_id == exc_id)
        .count();
    assert_eq!(
        from_excluded, 0,
        "the excluded cgroup is filtered in the kernel"
    );
    // Outside the included cgroup nothing is collected at all.
    assert!(
        raw.events.iter().all(|e| {
            payload::<v1::ProcessExit>(e)
                .ok()
                .and_then(|p| p.process)
                .or_else(|| payload::<v1::ProcessExec>(e).ok().and_then(|p| p.process))
                .is_none_or(|p| p.cgroup_id == inc_id)
        }),
        "only the included cgroup's events"
    );
    drop(raw);
    h.shutdown().await;
}

#[test]
fn the_binary_refuses_bad_config_with_a_clear_message() {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("config")));
    std::fs::write(&path, "events = [\"exec\", \"process.fork\"]\n").expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidewatch-collector-ebpf"))
        .arg("--config")
        .arg(&path)
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()
        .expect("run the collector");
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown event type \"process.fork\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn bad_config_is_refused_at_start() {
    let pending = std::future::pending::<()>();
    let unknown = Config {
        events: vec!["process.exec".into(), "process.fork".into()],
        common: CommonConfig::default().metrics_addr(None),
        ..Config::default()
    };
    let err = tidewatch_collector_ebpf::run(unknown, pending)
        .await
        .expect_err("an unknown event type is refused");
    assert!(
        err.to_string()
            .contains("unknown event type \"process.fork\""),
        "{err}"
    );

    for filter in ["kubepods.slice", "id:zero", "/no/such/cgroup/tidewatch"] {
        let malformed = Config {
            include_cgroups: vec![filter.into()],
            common: CommonConfig::default().metrics_addr(None),
            ..Config::default()
        };
        let err = tidewatch_collector_ebpf::run(malformed, std::future::pending::<()>())
            .await
            .expect_err("a malformed cgroup filter is refused");
        assert!(err.to_string().contains("malformed cgroup filter"), "{err}");
        assert!(err.to_string().contains(filter), "{err}");
    }

    let err = Config::from_toml("ring_bytes = 4096\nignore_slef = true").expect_err("typo");
    assert!(err.contains("unknown field `ignore_slef`"), "{err}");
}
