//! Benchmark of the eBPF collector's full path — reserve a ring record in
//! the kernel, read it, attribute it, publish it and get the stream's ack —
//! as capacity and CPU per event, with a baseline measured in the same run.
//!
//! ```sh
//! cargo build --release -p tidewatch-collector-ebpf --example bench
//! sudo ./target/release/examples/bench [seconds per step] [rounds]
//! ```
//!
//! Needs root and `nats-server` on PATH (a private one is started). The load
//! is this binary re-run as a generator (`--load`) that spawns `/bin/true`
//! (an exec event and an exit event each), unpaced or at a set rate, in a
//! cgroup of its own; the collector includes only that cgroup, so the rest
//! of the (shared) machine is filtered out in the kernel while every load
//! event takes the full path. Per round:
//!
//! 1. baseline: the generator unpaced, without the collector (execs/s);
//! 2. steps: with the collector, the generator offers 25, 50 and 75 % of the
//!    baseline rate, then runs unpaced. A step is sustained when nothing
//!    was dropped (kernel ring, collector queue, publish) and every exec was
//!    published; the capacity is the highest rate sustained. Published
//!    events that fall short of the execs without a counted drop abort the
//!    bench: the numbers would not be what they claim;
//! 3. drain: with draining paused, the unpaced generator fills a ring big
//!    enough to hold its whole output (no drops); then draining resumes and
//!    the backlog is read, attributed, published and acked as fast as the
//!    collector can: events/s with the collector never idle, the load
//!    stopped, and CPU µs per event of the collector (this process hosts
//!    only it) and of nats-server.

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tidewatch_collector_ebpf::stats::Stats;
use tidewatch_collector_ebpf::wire::Kind;
use tidewatch_collector_ebpf::{Collector, CollectorError, Config, Handle};
use tidewatch_runtime::collector::CommonConfig;
use tidewatch_testkit::NatsServer;

/// The generator: wait for "go" on stdin (the parent moves it into the load
/// cgroup first), spawn `/bin/true` for `secs`, at `rate` per second
/// (0: as fast as it can), and print how many and how long.
fn generate(rate: f64, secs: f64) {
    let mut go = String::new();
    let _ = std::io::stdin().lock().read_line(&mut go);
    let start = Instant::now();
    let end = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while start.elapsed() < end {
        if rate > 0.0 {
            let due = Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if std::process::Command::new("/bin/true")
            .status()
            .is_ok_and(|s| s.success())
        {
            n += 1;
        }
    }
    println!("{n} {}", start.elapsed().as_secs_f64());
}

/// Run the generator in `cgroup`: (execs, seconds).
fn load(cgroup: &Path, rate: f64, secs: f64) -> (u64, f64) {
    let exe = std::env::current_exe().expect("own path");
    let mut child = std::process::Command::new(exe)
        .args(["--load", &rate.to_string(), &secs.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("generator starts");
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())
        .expect("generator moved into the load cgroup");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("generator told to go");
    drop(stdin);
    let out = child.wait_with_output().expect("generator ends");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let n = fields.next().and_then(|v| v.parse().ok());
    let secs = fields.next().and_then(|v| v.parse().ok());
    match (n, secs) {
        (Some(n), Some(s)) => (n, s),
        _ => panic!("generator printed {text:?}"),
    }
}

/// CPU seconds (user + system) of a process so far, without its reaped
/// children (the generators).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // By position: fields can be negative (tpgid is -1 without a terminal),
    // so skipping what does not parse would shift utime onto cutime. utime
    // and stime are fields 14 and 15 overall, 11 and 12 after the comm.
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn sum(counters: &[std::sync::atomic::AtomicU64]) -> u64 {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

/// Everything counted as lost: kernel reservations that failed, records
/// the publisher queue refused, publishes never stored.
fn dropped(handle: &Handle) -> u64 {
    let kernel: u64 = Kind::ALL.iter().map(|k| handle.kernel_drops_of(*k)).sum();
    kernel
        + handle.stats.lost_queue.load(Ordering::Relaxed)
        + handle.stats.lost_publish.load(Ordering::Relaxed)
}

/// Counters at one moment, to take differences of.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    execs: u64,
    published: u64,
    dropped: u64,
    cpu: f64,
    nats_cpu: f64,
}

fn snapshot(handle: &Handle, nats: &str) -> Snapshot {
    let stats: &Stats = &handle.stats;
    Snapshot {
        at: Instant::now(),
        execs: stats.published[Kind::Exec as usize].load(Ordering::Relaxed),
        published: sum(&stats.published),
        dropped: dropped(handle),
        cpu: cpu_seconds("self"),
        nats_cpu: cpu_seconds(nats),
    }
}

/// Wait until every record read has been published (or counted lost) and
/// the counters stand still.
async fn settle(handle: &Handle) {
    let mut last = (u64::MAX, u64::MAX);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let read = sum(&handle.stats.read);
        let done = sum(&handle.stats.published)
            + handle.stats.lost_queue.load(Ordering::Relaxed)
            + handle.stats.lost_publish.load(Ordering::Relaxed);
        if read == done && (read, done) == last {
            return;
        }
        last = (read, done);
    }
}

struct Running {
    handle: Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), CollectorError>>,
}

async fn start(server: &NatsServer, cgroup: &Path, ring_bytes: u32, queue: usize) -> Running {
    let config = Config {
        common: CommonConfig::default()
            .nats_url(server.client_url())
            .node("bench")
            .metrics_addr(None),
        replay_processes: false,
        include_cgroups: vec![cgroup.display().to_string()],
        ring_bytes,
        queue_capacity: queue,
        ..Config::default()
    };
    let collector = Collector::start(config).await.expect("collector");
    let handle = collector.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(collector.run(async {
        let _ = stopped.await;
    }));
    Running { handle, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// One step: the generator at `rate` (0: unpaced) with the collector running.
/// Returns (execs/s achieved, sustained, collector µs/event, nats µs/event).
async fn step(
    running: &Running,
    nats: &str,
    cgroup: &Path,
    rate: f64,
    secs: f64,
) -> (f64, bool, f64, f64) {
    let before = snapshot(&running.handle, nats);
    let cg = cgroup.to_path_buf();
    let (execs, took) = tokio::task::spawn_blocking(move || load(&cg, rate, secs))
        .await
        .expect("load");
    settle(&running.handle).await;
    let after = snapshot(&running.handle, nats);
    let published_execs = after.execs - before.execs;
    let dropped = after.dropped - before.dropped;
    assert!(
        dropped > 0 || published_execs == execs,
        "{execs} execs, {published_execs} exec events published and no drop counted: \
         the collector did not take the full path for this load"
    );
    let achieved = execs as f64 / took;
    // A paced step the generator could not keep up with offered less than
    // asked; it counts as sustained only at the rate it reached.
    let sustained = dropped == 0;
    let events = (after.published - before.published).max(1) as f64;
    (
        achieved,
        sustained,
        (after.cpu - before.cpu) * 1e6 / events,
        (after.nats_cpu - before.nats_cpu) * 1e6 / events,
    )
}

/// Fill the ring with draining paused, then drain it: (events, events/s,
/// collector µs/event, nats µs/event).
async fn drain(server: &NatsServer, nats: &str, cgroup: &Path, secs: f64) -> (u64, f64, f64, f64) {
    // Big enough for everything the unpaced generator makes in `secs`
    // (~1.4 KiB per exec record), and a queue that takes a whole ring.
    let running = start(server, cgroup, 64 << 20, 1 << 20).await;
    running.handle.pause_draining();
    let cg = cgroup.to_path_buf();
    // Twice the step length: a longer drain, finer CPU ticks per event.
    let (execs, _) = tokio::task::spawn_blocking(move || load(&cg, 0.0, 2.0 * secs))
        .await
        .expect("load");
    assert_eq!(
        dropped(&running.handle),
        0,
        "the ring overflowed while paused; the drain would not be measured on the whole load"
    );
    let before = snapshot(&running.handle, nats);
    running.handle.resume_draining();
    // Every exec and its exit, plus the generator's own exit.
    let expected = 2 * execs + 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut after = snapshot(&running.handle, nats);
    while after.published - before.published < expected {
        assert!(
            Instant::now() < deadline,
            "{} of {expected} events published after draining for 2 minutes",
            after.published - before.published
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        after = snapshot(&running.handle, nats);
    }
    let events = after.published - before.published;
    assert_eq!(
        (events, after.dropped),
        (expected, 0),
        "drain: published {events} of {expected} events"
    );
    running.stop().await;
    let wall = after.at.duration_since(before.at).as_secs_f64();
    (
        events,
        events as f64 / wall,
        (after.cpu - before.cpu) * 1e6 / events as f64,
        (after.nats_cpu - before.nats_cpu) * 1e6 / events as f64,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--load") {
        let num = |i: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(0.0);
        generate(num(1), num(2));
        return;
    }
    let secs: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(secs, rounds));
}

async fn bench(secs: f64, rounds: usize) {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    tidewatch_runtime::provision::provision(&js, &[], &Default::default())
        .await
        .expect("provision");
    let nats = server.pid().to_string();
    let root = tidewatch_collector_ebpf::attribution::cgroup2_root().expect("cgroup2");
    let cgroup = root.join(format!("tidewatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("load cgroup");

    for round in 1..=rounds {
        println!("round {round}");
        let cg = cgroup.clone();
        let (execs, took) = tokio::task::spawn_blocking(move || load(&cg, 0.0, secs))
            .await
            .expect("load");
        let baseline = execs as f64 / took;
        println!("  baseline, no collector: {baseline:>7.0} execs/s");

        let running = start(&server, &cgroup, Config::default().ring_bytes, 65_536).await;
        let mut capacity = 0f64;
        let mut unpaced = 0f64;
        for share in [0.25, 0.5, 0.75, 0.0] {
            let rate = baseline * share;
            let (achieved, sustained, cpu, nats_cpu) =
                step(&running, &nats, &cgroup, rate, secs).await;
            let offered = if share == 0.0 {
                "unpaced".to_string()
            } else {
                format!("{rate:.0}/s")
            };
            println!(
                "  offered {offered:>8}: {achieved:>7.0} execs/s ({:>6.0} events/s) {}  CPU/event: collector {cpu:.1} µs, nats-server {nats_cpu:.1} µs",
                achieved * 2.0,
                if sustained { "0 drops" } else { "DROPS  " },
            );
            if sustained {
                capacity = capacity.max(achieved);
            }
            if share == 0.0 {
                unpaced = achieved;
            }
        }
        running.stop().await;
        println!(
            "  sustained with 0 drops: {capacity:.0} execs/s ({:.2} of the baseline; unpaced with the collector {:.2}){}",
            capacity / baseline,
            unpaced / baseline,
            if capacity == unpaced {
                ": every rate this machine could offer; the drain is the collector's limit"
            } else {
                ""
            }
        );

        let (events, rate, cpu, nats_cpu) = drain(&server, &nats, &cgroup, secs).await;
        println!(
            "  drain of a {events}-event backlog: {rate:.0} events/s ({:.0} execs/s), CPU/event: collector {cpu:.1} µs, nats-server {nats_cpu:.1} µs ({:.3} collector cores per 10k events/s)",
            rate / 2.0,
            cpu * 1e-2,
        );
    }
    let _ = std::fs::remove_dir(&cgroup);
}
