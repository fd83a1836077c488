//! The journal follower against a real `systemd-journald` and a real
//! nats-server, with the collector binary killed mid-stream.
//!
//! journald runs standalone in a private mount namespace: its sockets
//! (`/run/systemd/journal`) and its journal files (`/run/log/journal`) are
//! bind mounts of the test's temp dir, so the test writes entries through
//! the real native protocol and the collector reads the real files with
//! `journalctl --directory`. journald also reads `/dev/kmsg`, so a real OOM
//! kill in a memory-limited cgroup reaches the journal as the kernel wrote it.
//!
//! Needs root, `systemd-journald`, `journalctl` and `unshare`. Without them
//! the test is skipped with the reason, unless `CI` is set: then it fails.

mod support;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{Blackhole, Raw, cannot_run, counter, require_program, require_root, typed};
use tidewatch_proto::v1;
use tidewatch_runtime::cloudevents::AttributesReader;
use tidewatch_runtime::topology::types;
use tidewatch_testkit::{NatsServer, eventually, free_port, http_get};

const WAIT: Duration = Duration::from_secs(60);
const JOURNALD: &str = "/lib/systemd/systemd-journald";

/// A standalone journald in its own mount namespace; killed on drop (its
/// mounts go with its namespace).
struct Journald {
    child: Child,
    socket: PathBuf,
    logs: PathBuf,
    _dir: tempfile::TempDir,
}

impl Journald {
    fn start() -> Journald {
        let dir = tempfile::Builder::new()
            .prefix("tidewatch-journald-")
            .tempdir()
            .expect("tempdir");
        let sock = dir.path().join("sock");
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&sock).expect("mkdir sock");
        std::fs::create_dir_all(&logs).expect("mkdir logs");
        let conf = dir.path().join("journald.conf");
        std::fs::write(
            &conf,
            "[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\nReadKMsg=yes\nRateLimitBurst=0\n",
        )
        .expect("journald.conf");
        // unshare(1) execs sh, which execs journald: the child's pid is journald's.
        let script = format!(
            "set -e\n\
             mount --make-rprivate /\n\
             mkdir -p /run/systemd/journal /run/log/journal\n\
             mount --bind '{sock}' /run/systemd/journal\n\
             mount --bind '{logs}' /run/log/journal\n\
             mount --bind '{conf}' /etc/systemd/journald.conf\n\
             exec {JOURNALD}\n",
            sock = sock.display(),
            logs = logs.display(),
            conf = conf.display(),
        );
        let log = std::fs::File::create(dir.path().join("journald.log")).expect("log");
        let child = Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn unshare + systemd-journald");
        Journald {
            child,
            socket: sock.join("socket"),
            logs,
            _dir: dir,
        }
    }

    /// Send one entry over journald's native protocol.
    fn send(&self, fields: &[(&str, &str)]) {
        let mut datagram = Vec::new();
        for (k, v) in fields {
            let _ = writeln!(datagram, "{k}={v}");
        }
        let socket = UnixDatagram::unbound().expect("datagram socket");
        socket
            .send_to(&datagram, &self.socket)
            .expect("send to journald");
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup with a small memory limit (v1 `memory` controller, or cgroup2);
/// removed on drop.
struct MemoryCgroup {
    path: PathBuf,
}

impl MemoryCgroup {
    fn create() -> Result<MemoryCgroup, String> {
        let name = format!("tidewatch-systemd-oom-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let limit = (16u64 << 20).to_string();
        if v1.join("memory.limit_in_bytes").exists() {
            let path = v1.join(&name);
            std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let cg = MemoryCgroup { path };
            std::fs::write(cg.path.join("memory.limit_in_bytes"), &limit)
                .map_err(|e| format!("memory.limit_in_bytes: {e}"))?;
            // With swap accounting, swap must be limited too or nothing is killed.
            let memsw = cg.path.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                std::fs::write(&memsw, &limit).map_err(|e| format!("memsw: {e}"))?;
            }
            Ok(cg)
        } else if std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        {
            let path = v2.join(&name);
            std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let cg = MemoryCgroup { path };
            std::fs::write(cg.path.join("memory.max"), &limit)
                .map_err(|e| format!("memory.max: {e}"))?;
            let _ = std::fs::write(cg.path.join("memory.swap.max"), "0");
            Ok(cg)
        } else {
            Err("no memory cgroup controller (v1 or v2)".into())
        }
    }

    /// Run `tail /dev/zero` (it buffers one endless line) in the cgroup,
    /// under a name of its own (a symlink, so the kernel's `comm` is unique
    /// to this test), until the kernel OOM-kills it; the victim's pid and comm.
    fn oom_kill(&self, scratch: &Path) -> (u32, String) {
        let comm = format!("twoom{}", std::process::id() % 1_000_000);
        let tail = ["/usr/bin/tail", "/bin/tail"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("tail");
        let link = scratch.join(&comm);
        std::os::unix::fs::symlink(tail, &link).expect("symlink tail");
        let procs = self.path.join("cgroup.procs");
        let mut child = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "echo $$ > '{}' && exec '{}' /dev/zero",
                    procs.display(),
                    link.display()
                ),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the OOM victim");
        let pid = child.id();
        let status = child.wait().expect("wait for the OOM victim");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "the victim was OOM-killed: {status:?}"
        );
        (pid, comm)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The collector binary, killed on drop.
struct CollectorProcess {
    child: Child,
    metrics: String,
}

impl CollectorProcess {
    fn start(config: &Path, port: u16, log: &Path) -> CollectorProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("collector log");
        let child = Command::new(env!("CARGO_BIN_EXE_tidewatch-collector-systemd"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn the collector");
        CollectorProcess {
            child,
            metrics: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn wait_ready(&self) {
        eventually("the collector is ready", WAIT, || async {
            matches!(
                http_get(&format!("{}/readyz", self.metrics)).await,
                Ok((200, _))
            )
            .then_some(())
        })
        .await;
    }

    async fn counter(&self, name: &str) -> f64 {
        let (_, body) = http_get(&format!("{}/metrics", self.metrics))
            .await
            .expect("/metrics");
        counter(&body, name).unwrap_or(0.0)
    }

    fn signal(&mut self, signal: Signal) -> std::process::ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        kill(pid, signal).expect("signal the collector");
        self.child.wait().expect("wait for the collector")
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn marker(run: &str, i: usize) -> String {
    format!("tidewatch journal test {run} seq={i:05}")
}

/// Markers of `run` in the stream, with how often each appears.
fn marker_counts(
    events: &[tidewatch_runtime::cloudevents::Event],
    run: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (_, entry) in typed::<v1::JournalEntry>(events, types::JOURNAL_ENTRY) {
        if entry
            .message
            .starts_with(&format!("tidewatch journal test {run} "))
        {
            *counts.entry(entry.message).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_survive_a_killed_collector_without_gap_or_duplicate() {
    const TEST: &str = "journal_entries_survive_a_killed_collector_without_gap_or_duplicate";
    if let Err(why) = require_root()
        .and_then(|_| require_program(JOURNALD, "systemd"))
        .and_then(|_| require_program("journalctl", "systemd"))
        .and_then(|_| require_program("unshare", "util-linux"))
    {
        return cannot_run(TEST, &why);
    }
    let started = std::time::Instant::now();
    let phase = |name: &str| eprintln!("[{:>6.2}s] {name}", started.elapsed().as_secs_f64());
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    tidewatch_runtime::provision::provision(&js, &[], &Default::default())
        .await
        .expect("provision");
    let journald = Journald::start();
    eventually("journald listens", WAIT, || async {
        journald.socket.exists().then_some(())
    })
    .await;

    let node = format!("journal-test-{}", std::process::id());
    let work = tempfile::tempdir().expect("tempdir");
    // The outage spool is on (as in the DaemonSet); the cursor lives in it.
    let spool = work.path().join("spool");
    let cursor = spool.join("journal.cursor");
    let port = free_port();
    // The collector reaches NATS through a proxy that can swallow its
    // publishes: sent, never stored, never acknowledged.
    let proxy = Blackhole::start(server.client_port()).await;
    let config = work.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "nats_url = \"{}\"\nnode = \"{node}\"\nmetrics_addr = \"127.0.0.1:{port}\"\n\
             unit_states = false\njournal_directory = \"{}\"\nspool_dir = \"{}\"\n\
             journal_start = \"all\"\nmax_in_flight = 1024\n",
            proxy.url(),
            journald.logs.display(),
            spool.display(),
        ),
    )
    .expect("config");
    let log = work.path().join("collector.log");
    let raw = Raw::new(&js, &node).await;

    // Entries the collector must ignore and pick, at priority 6 and below.
    journald.send(&[
        ("PRIORITY", "6"),
        ("MESSAGE", "tidewatch journal test noise"),
        ("SYSLOG_IDENTIFIER", "tw-noise"),
    ]);
    journald.send(&[
        ("PRIORITY", "6"),
        (
            "MESSAGE",
            "E1127 08:15:02.123456    812 kubelet.go:2855] tidewatch journal test klog",
        ),
        ("SYSLOG_IDENTIFIER", "kubelet"),
    ]);
    journald.send(&[
        ("PRIORITY", "6"),
        (
            "MESSAGE",
            "I1127 08:15:02.123456    812 kubelet.go:2855] tidewatch journal test klog-info",
        ),
        ("SYSLOG_IDENTIFIER", "kubelet"),
    ]);
    // A real kernel OOM kill.
    let victim = match MemoryCgroup::create() {
        Ok(cg) => cg.oom_kill(work.path()),
        Err(why) => return cannot_run(TEST, &why),
    };

    // Run 1: killed with SIGKILL while a writer keeps adding entries; the
    // writer goes on for another 300 entries after the kill.
    let mut first = CollectorProcess::start(&config, port, &log);
    first.wait_ready().await;
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let socket = journald.socket.clone();
        let killed = killed.clone();
        std::thread::spawn(move || {
            let sender = UnixDatagram::unbound().expect("socket");
            let mut stop_at = usize::MAX;
            let mut i = 0;
            while i < stop_at && i < 100_000 {
                let datagram = format!(
                    "PRIORITY=3\nSYSLOG_IDENTIFIER=tw-journal-test\nMESSAGE={}\n",
                    marker("a", i)
                );
                // journald may push back briefly (full socket buffer): retry.
                let mut tries = 0;
                while sender.send_to(datagram.as_bytes(), &socket).is_err() && tries < 1000 {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                if stop_at == usize::MAX && killed.load(std::sync::atomic::Ordering::SeqCst) {
                    stop_at = i + 300;
                }
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                i += 1;
            }
            i
        })
    };
    raw.wait("part of the entries before the kill", WAIT, |events| {
        (marker_counts(events, "a").len() >= 200).then_some(())
    })
    .await;
    // Now its publishes vanish: it keeps reading entries and sending their
    // events, none is acknowledged. A cursor saved on send instead of on
    // ack would now run past entries the stream never got: a gap after the kill.
    proxy.swallow(true);
    let read_before = first.counter("tidewatch_events_in_total").await;
    eventually(
        "the collector reads on while nothing is acknowledged",
        WAIT,
        || async {
            (first.counter("tidewatch_events_in_total").await >= read_before + 50.0).then_some(())
        },
    )
    .await;
    let status = first.signal(Signal::SIGKILL);
    proxy.swallow(false);
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(!status.success());
    let seen_at_kill = marker_counts(&raw.all().await, "a").len();
    let total = writer.join().expect("writer");
    eprintln!("killed the collector with {seen_at_kill} of {total} entries stored");
    assert!(
        seen_at_kill < total,
        "the kill was mid-stream ({seen_at_kill} of {total} stored)"
    );

    phase("run 2");
    // Run 2: resumes after the saved cursor; every entry ends up stored once.
    let mut second = CollectorProcess::start(&config, port, &log);
    second.wait_ready().await;
    let events = raw
        .wait("every entry after the restart", WAIT, |events| {
            (marker_counts(events, "a").len() == total).then(|| events.to_vec())
        })
        .await;
    let counts = marker_counts(&events, "a");
    for i in 0..total {
        assert_eq!(
            counts.get(&marker("a", i)),
            Some(&1),
            "{} stored once",
            marker("a", i)
        );
    }
    // Ids are unique in the stream (JetStream dropped the re-sent ones).
    let mut ids: Vec<&str> = events.iter().map(|e| e.id()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "no event id twice in the stream");

    // The kubelet error line at priority 6 is there; its info line and the noise are not.
    let entries: Vec<v1::JournalEntry> = typed::<v1::JournalEntry>(&events, types::JOURNAL_ENTRY)
        .map(|(_, p)| p)
        .collect();
    assert!(
        entries
            .iter()
            .any(|e| e.message.ends_with("tidewatch journal test klog") && e.priority == 6)
    );
    assert!(
        !entries
            .iter()
            .any(|e| e.message.contains("klog-info") || e.message.contains("test noise"))
    );
    // The real OOM kill, as its own event type, with the victim parsed.
    let oom: Vec<(&tidewatch_runtime::cloudevents::Event, v1::JournalEntry)> =
        typed::<v1::JournalEntry>(&events, types::JOURNAL_OOM_KILL)
            .filter(|(_, p)| p.fields.get("OOM_VICTIM_PID") == Some(&victim.0.to_string()))
            .collect();
    assert_eq!(oom.len(), 1, "one OOM kill event for pid {}", victim.0);
    assert_eq!(
        oom[0].1.fields.get("OOM_VICTIM_COMM"),
        Some(&victim.1),
        "the victim's own name"
    );
    assert_eq!(
        oom[0].1.fields.get("_TRANSPORT").map(String::as_str),
        Some("kernel")
    );
    assert_eq!(oom[0].0.subject(), Some(format!("node/{node}").as_str()));

    phase("graceful stop");
    // A graceful stop saves the cursor of an entry at or after the last marker.
    let status = second.signal(Signal::SIGTERM);
    phase("stopped run 2");
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    let saved = std::fs::read_to_string(&cursor).expect("cursor saved");
    let seqnum = |c: &str| {
        tidewatch_collector_systemd::journal::cursor_position(c)
            .and_then(|(_, i)| u64::from_str_radix(i, 16).ok())
            .expect("cursor has a seqnum")
    };
    let last_marker = entries
        .iter()
        .filter(|e| e.message == marker("a", total - 1))
        .map(|e| seqnum(&e.cursor))
        .next()
        .expect("last marker");
    assert!(
        seqnum(saved.trim()) >= last_marker,
        "saved cursor {saved} covers the last entry"
    );

    phase("run 3");
    // Run 3: reads only what came after the cursor, not the journal again.
    for i in 0..10 {
        journald.send(&[
            ("PRIORITY", "3"),
            ("SYSLOG_IDENTIFIER", "tw-journal-test"),
            ("MESSAGE", &marker("b", i)),
        ]);
    }
    let third = CollectorProcess::start(&config, port, &log);
    third.wait_ready().await;
    raw.wait("the entries written while stopped", WAIT, |events| {
        (marker_counts(events, "b").len() == 10).then_some(())
    })
    .await;
    let read = third.counter("tidewatch_events_in_total").await;
    assert!(
        read < 100.0,
        "the third run resumed at the cursor: it read {read} entries, not the whole journal ({total}+)"
    );
    let events = raw.all().await;
    assert!(marker_counts(&events, "b").values().all(|&n| n == 1));
    assert!(marker_counts(&events, "a").values().all(|&n| n == 1));
    drop(third);
}
