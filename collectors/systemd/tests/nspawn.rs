//! Unit state against a real systemd: a Debian rootfs (debootstrap, cached
//! as a tarball) booted with `systemd-nspawn -b`, its `/run/dbus` bind-mounted
//! out so the collector talks to the container's system bus, and a unit
//! that crash-loops. The container's own journald writes its persistent
//! journal into the rootfs, which the collector follows too.
//!
//! Needs root, `systemd-nspawn` (systemd-container), `debootstrap` and, on
//! a cold cache, network access to Debian's default mirror. The rootfs
//! tarball is cached in `$TIDEWATCH_TEST_CACHE` (default
//! `/var/cache/tidewatch-tests`). Without these the test is skipped with the
//! reason, unless `CI` is set: then it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Raw, cannot_run, require_program, require_root, typed};
use tidewatch_collector_systemd::{Collector, Config, dbus};
use tidewatch_proto::v1;
use tidewatch_runtime::cloudevents::{AttributesReader, Event};
use tidewatch_runtime::collector::CommonConfig;
use tidewatch_runtime::topology::types;
use tidewatch_testkit::{NatsServer, eventually};

/// Debian release of the rootfs: bookworm ships systemd 252, like the CI host.
const SUITE: &str = "bookworm";
const TARBALL: &str = "debian-bookworm-minbase-systemd-dbus.tar";
const BOOT_WAIT: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(90);

/// The unit under test: fails with status 3 after a second, restarted a
/// second later, forever (no start limit); logs a kubelet-style error on
/// stderr (journaled at priority 6).
const CRASHY: &str = "[Unit]\n\
Description=Tidewatch test unit that crash-loops\n\
StartLimitIntervalSec=0\n\
\n\
[Service]\n\
Type=simple\n\
SyslogIdentifier=kubelet\n\
ExecStart=/bin/sh -c 'echo crashy starting; sleep 1; echo \"E1127 08:15:02.123456 1 crashy.go:1] tidewatch crashy is failing\" >&2; exit 3'\n\
Restart=on-failure\n\
RestartSec=1\n";

/// Fails once, then would wait an hour before restarting: stopped during
/// that wait.
const WAITY: &str = "[Unit]\n\
Description=Tidewatch test unit stopped while waiting to restart\n\
\n\
[Service]\n\
Type=simple\n\
ExecStart=/bin/sh -c 'sleep 1; exit 4'\n\
Restart=on-failure\n\
RestartSec=1h\n";

fn cache_dir() -> PathBuf {
    std::env::var_os("TIDEWATCH_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tidewatch-tests"))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            tail.join(" | ")
        ))
    }
}

/// The cached rootfs tarball, built with debootstrap (three attempts) when
/// missing. Written under a temporary name and renamed, so an interrupted
/// build never leaves a broken cache.
fn rootfs_tarball() -> Result<PathBuf, String> {
    let dir = cache_dir();
    let tarball = dir.join(TARBALL);
    if tarball.exists() {
        return Ok(tarball);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let build = tempfile::Builder::new()
        .prefix("rootfs-build-")
        .tempdir_in(&dir)
        .map_err(|e| format!("tempdir in {}: {e}", dir.display()))?;
    let root = build.path().join("rootfs");
    let mut last = String::new();
    for attempt in 1..=3 {
        let _ = std::fs::remove_dir_all(&root);
        eprintln!("debootstrap {SUITE} (attempt {attempt}): building the cached rootfs");
        // No mirror argument: debootstrap's default.
        match run(Command::new("debootstrap")
            .args(["--variant=minbase", "--include=systemd,dbus", SUITE])
            .arg(&root))
        {
            Ok(()) => {
                last.clear();
                break;
            }
            Err(e) => last = e,
        }
    }
    if !last.is_empty() {
        return Err(format!("debootstrap failed three times: {last}"));
    }
    let partial = build.path().join(format!("{TARBALL}.partial"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&partial)
        .arg("."))?;
    std::fs::rename(&partial, &tarball).map_err(|e| format!("rename into the cache: {e}"))?;
    Ok(tarball)
}

/// A booted container; stopped (its init killed) and its rootfs removed on drop.
struct Container {
    nspawn: Child,
    rootfs: PathBuf,
    bus_dir: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Container {
    fn boot(tarball: &Path, name: &str) -> Result<Container, String> {
        let dir = tempfile::Builder::new()
            .prefix("tidewatch-nspawn-")
            .tempdir_in("/var/tmp")
            .map_err(|e| format!("tempdir: {e}"))?;
        let rootfs = dir.path().join("rootfs");
        let bus_dir = dir.path().join("dbus");
        std::fs::create_dir_all(&rootfs).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&bus_dir).map_err(|e| e.to_string())?;
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-xf")
            .arg(tarball))?;
        for (name, unit) in [("crashy.service", CRASHY), ("waity.service", WAITY)] {
            std::fs::write(rootfs.join("etc/systemd/system").join(name), unit)
                .map_err(|e| format!("install {name}: {e}"))?;
        }
        let log = dir.path().join("nspawn.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let machine = format!("tidewatch-{name}-{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(&rootfs)
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                // SIGTERM to nspawn kills the container's init, and with it
                // every process of the container.
                "--kill-signal=SIGKILL",
                "--machine",
                &machine,
            ])
            .arg(format!("--bind={}:/run/dbus", bus_dir.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("spawn systemd-nspawn: {e}"))?;
        Ok(Container {
            nspawn,
            rootfs,
            bus_dir,
            log,
            _dir: dir,
        })
    }

    fn bus_address(&self) -> String {
        format!(
            "unix:path={}",
            self.bus_dir.join("system_bus_socket").display()
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Wait until the container's systemd answers on its bus and has booted.
    async fn wait_booted(&mut self) -> zbus::Connection {
        let address = self.bus_address();
        let nspawn = &mut self.nspawn;
        let log = self.log.clone();
        eventually(
            "the container's systemd to finish booting",
            BOOT_WAIT,
            || {
                let address = address.clone();
                let exited = nspawn.try_wait().ok().flatten();
                let log = log.clone();
                async move {
                    if let Some(status) = exited {
                        panic!(
                            "systemd-nspawn exited ({status}):\n{}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                    let conn = dbus::connect(&address).await.ok()?;
                    let state = dbus::system_state(&conn).await.ok()?;
                    matches!(state.as_str(), "running" | "degraded").then_some(conn)
                }
            },
        )
        .await
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM: nspawn kills the container's init (--kill-signal) and exits.
        if let Ok(pid) = i32::try_from(self.nspawn.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for _ in 0..200 {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// Transitions of `unit` in the stream, in order: (type suffix, payload).
fn unit_changes(events: &[Event], unit: &str) -> Vec<(String, v1::UnitStateChange)> {
    let subject = format!("unit/{unit}");
    events
        .iter()
        .filter(|e| e.subject() == Some(subject.as_str()))
        .filter(|e| e.ty().starts_with("dev.tidewatch.systemd.unit."))
        .map(|e| {
            let payload = tidewatch_runtime::event::payload::<v1::UnitStateChange>(e)
                .expect("UnitStateChange payload");
            let change = e.ty().rsplit('.').next().unwrap_or_default().to_string();
            (change, payload)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_unit_in_a_booted_systemd_is_reported() {
    const TEST: &str = "a_crash_looping_unit_in_a_booted_systemd_is_reported";
    if let Err(why) = require_root()
        .and_then(|_| require_program("systemd-nspawn", "systemd-container"))
        .and_then(|_| require_program("debootstrap", "debootstrap"))
        .and_then(|_| require_program("tar", "tar"))
    {
        return cannot_run(TEST, &why);
    }
    let tarball = match rootfs_tarball() {
        Ok(t) => t,
        Err(why) => return cannot_run(TEST, &why),
    };
    let mut container = match Container::boot(&tarball, "crashy") {
        Ok(c) => c,
        Err(why) => return cannot_run(TEST, &why),
    };
    let bus = container.wait_booted().await;

    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    tidewatch_runtime::provision::provision(&js, &[], &Default::default())
        .await
        .expect("provision");
    let node = format!("nspawn-test-{}", std::process::id());
    let work = tempfile::tempdir().expect("tempdir");
    let raw = Raw::new(&js, &node).await;
    let config = Config {
        common: CommonConfig::default()
            .nats_url(server.client_url())
            .node(node.clone())
            .metrics_addr(Some("127.0.0.1:0".parse().expect("addr"))),
        dbus_address: Some(container.bus_address()),
        units: vec!["crashy".into(), "waity".into(), "dbus".into()],
        crash_loop_restarts: 3,
        crash_loop_window: Duration::from_secs(600),
        journal_directory: Some(container.rootfs.join("var/log/journal")),
        journal_start: tidewatch_collector_systemd::config::JournalStart::All,
        cursor_file: Some(work.path().join("journal.cursor")),
        ..Config::default()
    };
    let collector = Collector::start(config).await.expect("collector starts");
    let handle = collector.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(collector.run(async {
        let _ = stopped.await;
    }));
    eventually("the collector is subscribed", WAIT, || async {
        handle.is_ready().then_some(())
    })
    .await;

    dbus::unit_job(&bus, "StartUnit", "crashy.service")
        .await
        .expect("StartUnit crashy.service");
    let changes = match raw
        .wait_or_all(WAIT, |events| {
            let changes = unit_changes(events, "crashy.service");
            changes
                .iter()
                .any(|(c, _)| c == "crashloop")
                .then_some(changes)
        })
        .await
    {
        Ok(changes) => changes,
        Err(events) => panic!(
            "crashy.service was not reported crash-looping; saw {:#?}\n{}",
            unit_changes(&events, "crashy.service"),
            container.log_tail()
        ),
    };
    dbus::unit_job(&bus, "StopUnit", "crashy.service")
        .await
        .expect("StopUnit crashy.service");

    let names: Vec<&str> = changes.iter().map(|(c, _)| c.as_str()).collect();
    let upto = names
        .iter()
        .position(|c| *c == "crashloop")
        .expect("crash loop");
    assert_eq!(
        &names[..=upto],
        [
            "started",
            "failed",
            "restarted",
            "started",
            "failed",
            "restarted",
            "started",
            "failed",
            "restarted",
            "crashloop"
        ],
        "transitions of crashy.service: {names:?}\n{}",
        container.log_tail()
    );
    let failed: Vec<&v1::UnitStateChange> = changes[..upto]
        .iter()
        .filter(|(c, _)| c == "failed")
        .map(|(_, p)| p)
        .collect();
    for f in &failed {
        assert_eq!(f.result, "exit-code", "{f:?}");
        assert_eq!(f.exec_main_status, 3, "{f:?}");
        assert_eq!(f.previous_active_state, "active", "{f:?}");
        assert_eq!(f.node, node);
    }
    let restarts: Vec<u32> = changes[..upto]
        .iter()
        .filter(|(c, _)| c == "restarted")
        .map(|(_, p)| p.n_restarts)
        .collect();
    assert_eq!(restarts, [1, 2, 3]);
    assert_eq!(changes[upto].1.n_restarts, 3);
    assert_eq!(changes[0].1.active_state, "active");

    // The stop is reported, and dbus.service (running since boot) stayed quiet.
    let events = raw
        .wait("crashy.service stopped", WAIT, |events| {
            unit_changes(events, "crashy.service")
                .iter()
                .any(|(c, _)| c == "stopped")
                .then(|| events.to_vec())
        })
        .await;
    assert!(unit_changes(&events, "dbus.service").is_empty());
    if let Some((_, stopped)) = unit_changes(&events, "crashy.service")
        .into_iter()
        .find(|(c, _)| c == "stopped")
    {
        // `deactivating`: stopped while running; `inactive`: the stop
        // canceled the restart's start job (a narrow race).
        eprintln!(
            "crashy.service stopped from {}",
            stopped.previous_active_state
        );
    }

    // A stop while the unit waits to be restarted (RestartSec) is a stop.
    dbus::unit_job(&bus, "StartUnit", "waity.service")
        .await
        .expect("StartUnit waity.service");
    raw.wait("waity.service failed", WAIT, |events| {
        unit_changes(events, "waity.service")
            .iter()
            .any(|(c, _)| c == "failed")
            .then_some(())
    })
    .await;
    dbus::unit_job(&bus, "StopUnit", "waity.service")
        .await
        .expect("StopUnit waity.service");
    let waity = raw
        .wait("waity.service stopped", WAIT, |events| {
            let changes = unit_changes(events, "waity.service");
            changes
                .iter()
                .any(|(c, _)| c == "stopped")
                .then_some(changes)
        })
        .await;
    let names: Vec<&str> = waity.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(names, ["started", "failed", "stopped"]);
    assert_eq!(waity[1].1.exec_main_status, 4);
    assert_eq!(waity[2].1.previous_active_state, "activating");

    // The unit's stderr, at priority 6 from "kubelet", came through the
    // container's journald as an error line.
    let events = raw
        .wait(
            "crashy's kubelet-style error line from the journal",
            WAIT,
            |events| {
                typed::<v1::JournalEntry>(events, types::JOURNAL_ENTRY)
                    .any(|(_, p)| {
                        p.unit == "crashy.service"
                            && p.message.contains("tidewatch crashy is failing")
                    })
                    .then(|| events.to_vec())
            },
        )
        .await;
    let line = typed::<v1::JournalEntry>(&events, types::JOURNAL_ENTRY)
        .find(|(_, p)| {
            p.unit == "crashy.service" && p.message.contains("tidewatch crashy is failing")
        })
        .map(|(_, p)| p)
        .expect("error line");
    assert_eq!(line.priority, 6);
    assert_eq!(
        line.fields.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("kubelet")
    );
    // "crashy starting" is info from the same unit: not an event.
    assert!(
        !typed::<v1::JournalEntry>(&events, types::JOURNAL_ENTRY)
            .any(|(_, p)| p.message.contains("crashy starting"))
    );

    // --check-host: yes for this container, no (one line, exit 3) without a bus.
    let check = |address: &str| {
        Command::new(env!("CARGO_BIN_EXE_tidewatch-collector-systemd"))
            .args([
                "--check-host",
                "--dbus-address",
                address,
                "--journal-directory",
            ])
            .arg(container.rootfs.join("var/log/journal"))
            .output()
            .expect("run --check-host")
    };
    let yes = check(&container.bus_address());
    assert!(
        yes.status.success(),
        "{}",
        String::from_utf8_lossy(&yes.stderr)
    );
    let missing = format!("unix:path={}", work.path().join("no-bus").display());
    let no = check(&missing);
    assert_eq!(no.status.code(), Some(3));
    let why = String::from_utf8_lossy(&no.stderr);
    assert_eq!(why.trim().lines().count(), 1, "{why}");
    assert!(why.contains("no systemd on the system D-Bus"), "{why}");

    let _ = stop.send(());
    task.await.expect("collector task").expect("collector ran");
    drop(container);
}

/// The uid the DaemonSet runs the collector as: `nobody`, because
/// dbus-daemon (1.14) refuses connections from a uid its user database
/// does not know, and 65534 is in every distribution's /etc/passwd.
const COLLECTOR_UID: u32 = 65534;
const POLICY: &str = include_str!("../dbus/tidewatch-collector-systemd.conf");

/// `setpriv` as the collector's uid with exactly `groups` as supplementary
/// groups, no capabilities: what the DaemonSet's securityContext gives it.
fn as_collector_user(groups: &[u32]) -> Command {
    as_user(COLLECTOR_UID, groups)
}

fn as_user(uid: u32, groups: &[u32]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.args(["--inh-caps=-all", "--bounding-set=-all", "--"]);
    cmd
}

/// A `Manager` method call (no arguments, or a unit to start) sent by the
/// collector's user; `Err(stderr)` when refused. (busctl prints every
/// AccessDenied as "Access denied", whoever refused.)
fn call_as_collector(
    bus: &str,
    groups: &[u32],
    method: &str,
    unit: Option<&str>,
) -> Result<(), String> {
    let mut cmd = as_collector_user(groups);
    cmd.args([
        "busctl",
        "--address",
        bus,
        "call",
        "org.freedesktop.systemd1",
    ])
    .args([
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        method,
    ]);
    if let Some(unit) = unit {
        cmd.args(["ss", unit, "replace"]);
    }
    let out = cmd.output().expect("run busctl");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A group's gid from a rootfs' /etc/group.
fn gid_of(rootfs: &Path, group: &str) -> u32 {
    let text = std::fs::read_to_string(rootfs.join("etc/group")).expect("etc/group");
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(group)).then(|| f.nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no group {group} in the rootfs"))
}

/// The DaemonSet's way: uid 65534 (nobody), no capabilities, the journal through the
/// `systemd-journal` group only, unit state over D-Bus reads only. Also that
/// this user cannot change a unit: refused by systemd (no polkit) as shipped,
/// and by the bus itself once dbus/tidewatch-collector-systemd.conf is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_runs_unprivileged_and_cannot_start_units() {
    use std::os::unix::fs::PermissionsExt as _;
    const TEST: &str = "the_collector_runs_unprivileged_and_cannot_start_units";
    if let Err(why) = require_root()
        .and_then(|_| require_program("systemd-nspawn", "systemd-container"))
        .and_then(|_| require_program("debootstrap", "debootstrap"))
        .and_then(|_| require_program("tar", "tar"))
        .and_then(|_| require_program("setpriv", "util-linux"))
        .and_then(|_| require_program("busctl", "systemd"))
    {
        return cannot_run(TEST, &why);
    }
    let tarball = match rootfs_tarball() {
        Ok(t) => t,
        Err(why) => return cannot_run(TEST, &why),
    };
    let mut container = match Container::boot(&tarball, "nonroot") {
        Ok(c) => c,
        Err(why) => return cannot_run(TEST, &why),
    };
    // The collector's user must reach the bus socket and the journal.
    let top = container
        .rootfs
        .parent()
        .expect("container dir")
        .to_path_buf();
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bus = container.wait_booted().await;
    let address = container.bus_address();
    let journal_gid = gid_of(&container.rootfs, "systemd-journal");
    let journal_dir = container.rootfs.join("var/log/journal");

    // As shipped (no policy file, no polkit): systemd refuses a non-root
    // StartUnit, and answers reads the collector does not need (ListJobs).
    let groups = [journal_gid];
    let refused = call_as_collector(&address, &groups, "StartUnit", Some("waity.service"))
        .expect_err("StartUnit by the collector's uid must be refused");
    assert!(refused.contains("Access denied"), "{refused}");
    // Why not the image's 65532: not in the node's /etc/passwd, so
    // dbus-daemon does not even let it connect.
    let unknown = as_user(65532, &groups)
        .args([
            "busctl",
            "--address",
            &address,
            "call",
            "org.freedesktop.DBus",
        ])
        .args(["/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId"])
        .output()
        .expect("busctl");
    assert!(!unknown.status.success(), "uid 65532 connected to the bus");
    call_as_collector(&address, &groups, "ListJobs", None).expect("systemd answers ListJobs");
    // With the policy the bus refuses everything but the collector's reads:
    // ListJobs, which systemd would answer, is refused now, so the policy
    // is what answers; StartUnit stays refused.
    std::fs::write(
        container
            .rootfs
            .join("etc/dbus-1/system.d/tidewatch-collector-systemd.conf"),
        POLICY,
    )
    .expect("install the policy");
    bus.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        "ReloadConfig",
        &(),
    )
    .await
    .expect("ReloadConfig");
    let refused = call_as_collector(&address, &groups, "ListJobs", None)
        .expect_err("the bus policy refuses what the collector does not call");
    assert!(refused.contains("Access denied"), "{refused}");
    let refused = call_as_collector(&address, &groups, "StartUnit", Some("waity.service"))
        .expect_err("StartUnit by the collector's uid must be refused");
    assert!(refused.contains("Access denied"), "{refused}");
    let waity = dbus::current_state(
        &bus,
        &tidewatch_collector_systemd::units::Selection::from_names(&["waity"]),
    )
    .await
    .expect("state");
    assert!(
        waity
            .iter()
            .all(|o| o.update.active_state.as_deref() != Some("active")),
        "{waity:?}"
    );

    // --check-host as that user: without the journal group it says which gid.
    let check = |groups: &[u32]| {
        as_collector_user(groups)
            .arg(env!("CARGO_BIN_EXE_tidewatch-collector-systemd"))
            .args(["--check-host", "--dbus-address", &address])
            .arg("--journal-directory")
            .arg(&journal_dir)
            .output()
            .expect("run --check-host")
    };
    let no = check(&[]);
    let why = String::from_utf8_lossy(&no.stderr);
    assert_eq!(no.status.code(), Some(3), "{why}");
    assert!(
        why.contains(&format!("--systemd-journal-gid {journal_gid}")),
        "{why}"
    );
    let yes = check(&[journal_gid]);
    assert!(
        yes.status.success(),
        "{}",
        String::from_utf8_lossy(&yes.stderr)
    );

    // The collector itself, as that user, under the policy: unit state and journal.
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    tidewatch_runtime::provision::provision(&js, &[], &Default::default())
        .await
        .expect("provision");
    let node = format!("nspawn-nonroot-{}", std::process::id());
    let raw = Raw::new(&js, &node).await;
    let work = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(work.path(), Some(COLLECTOR_UID), Some(COLLECTOR_UID))
        .expect("chown work dir");
    let config = work.path().join("systemd.toml");
    std::fs::write(&config, "journal_start = \"all\"\n").expect("config");
    let mut collector = as_collector_user(&[journal_gid])
        .arg(env!("CARGO_BIN_EXE_tidewatch-collector-systemd"))
        .args(["--nats-url", &server.client_url(), "--node", &node])
        .args(["--metrics-addr", "127.0.0.1:0", "--dbus-address", &address])
        .args(["--units", "crashy"])
        .arg("--config")
        .arg(&config)
        .arg("--journal-directory")
        .arg(&journal_dir)
        .arg("--cursor-file")
        .arg(work.path().join("journal.cursor"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the collector as nobody");
    // Wait until it is connected to NATS (past its preflight and D-Bus
    // subscription); crashy loops, so a late start still sees restarts.
    let connz = format!("{}/connz", server.monitoring_url());
    eventually(
        "the unprivileged collector connected to NATS",
        WAIT,
        || async {
            let (_, body) = tidewatch_testkit::http_get(&connz).await.ok()?;
            body.contains("tidewatch-collector-systemd").then_some(())
        },
    )
    .await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", collector.id())).unwrap_or_default();
    dbus::unit_job(&bus, "StartUnit", "crashy.service")
        .await
        .expect("StartUnit crashy.service (as root)");
    let seen = raw
        .wait_or_all(WAIT, |events| {
            let restarted = unit_changes(events, "crashy.service")
                .iter()
                .any(|(c, _)| c == "restarted");
            let journal = typed::<v1::JournalEntry>(events, types::JOURNAL_ENTRY)
                .any(|(_, p)| p.message.contains("tidewatch crashy is failing"));
            (restarted && journal).then_some(())
        })
        .await;
    let _ = dbus::unit_job(&bus, "StopUnit", "crashy.service").await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(collector.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    );
    let exit = collector.wait().expect("collector exits");
    if let Err(events) = seen {
        panic!(
            "the unprivileged collector did not report crashy's restart and error line; saw {:#?}\n{}",
            unit_changes(&events, "crashy.service"),
            container.log_tail()
        );
    }
    assert!(exit.success(), "clean stop: {exit}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&format!("Uid:\t{COLLECTOR_UID}\t{COLLECTOR_UID}"))),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Groups:") && l.contains(&journal_gid.to_string())),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000000000"),
        "{status}"
    );
    assert!(work.path().join("journal.cursor").exists(), "cursor saved");
    drop(container);
}
