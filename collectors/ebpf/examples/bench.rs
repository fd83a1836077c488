//! Benchmark of the eBPF collector, as ratios measured in one run.
//!
//! ```sh
//! cargo run --release -p tidewatch-collector-ebpf --example bench -- [seconds per phase] [rounds]
//! ```
//!
//! Needs root and `nats-server` on PATH (a private one is started). Each
//! round runs the same load twice, first without then with the collector:
//! a tight fork/exec loop (`/bin/true` from a shell) and a TCP
//! connect/accept/close loop on loopback (python3), each in its own
//! process. It prints, per round:
//!
//! - the fork/exec loop's rate without the collector, with its probes
//!   attached but every event filtered out in the kernel (the cost of the
//!   probes themselves), and with the collector publishing everything (on a
//!   small machine this includes the collector's and nats-server's CPU
//!   competing with the workload); the target is < 5 % slowdown;
//! - events the collector published per second, and its kernel drops;
//! - the collector's CPU (this process: it hosts only the collector) per
//!   10k events/s, in cores.

use std::time::{Duration, Instant};

use tidewatch_collector_ebpf::collector::Stats;
use tidewatch_collector_ebpf::wire::Kind;
use tidewatch_collector_ebpf::{Collector, Config};
use tidewatch_runtime::collector::CommonConfig;
use tidewatch_testkit::NatsServer;

const TCP_LOOP: &str = r#"
import socket, sys, time
end = time.time() + float(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(128); port = srv.getsockname()[1]
n = 0
while time.time() < end:
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
    c.close(); s.close(); n += 1
print(n)
"#;

/// Run the fork/exec loop and the TCP loop for `secs`; fork/exec iterations per second.
fn load(secs: f64) -> f64 {
    let tcp = std::process::Command::new("python3")
        .args(["-c", TCP_LOOP, &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    let script = format!(
        "end=$(( $(date +%s) + {} )); n=0; while [ $(date +%s) -lt $end ]; do i=0; while [ $i -lt 100 ]; do /bin/true; i=$((i+1)); done; n=$((n+100)); done; echo $n",
        secs.ceil() as u64
    );
    let start = Instant::now();
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .output()
        .expect("sh");
    let elapsed = start.elapsed().as_secs_f64();
    let _ = tcp.wait_with_output();
    let n: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    n / elapsed
}

/// CPU seconds this process has used (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15 overall (11 and 12 after the state field).
    match (f.get(10), f.get(11)) {
        (Some(u), Some(s)) => (u + s) as f64 / 100.0,
        _ => 0.0,
    }
}

fn published(stats: &Stats) -> u64 {
    stats
        .published
        .iter()
        .map(|p| p.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    tidewatch_runtime::provision::provision(&js, &Default::default())
        .await
        .expect("provision");

    println!(
        "{:>5} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7} {:>16}",
        "round",
        "w/o /s",
        "probes /s",
        "ratio",
        "full /s",
        "ratio",
        "events/s",
        "drops",
        "cores per 10k/s"
    );
    // An empty cgroup: filtering on it drops every event in the kernel.
    let root = tidewatch_collector_ebpf::attribution::cgroup2_root().expect("cgroup2");
    let empty = root.join(format!("tidewatch-bench-{}", std::process::id()));
    let _ = std::fs::create_dir(&empty);
    for round in 1..=rounds {
        let without = tokio::task::spawn_blocking(move || load(secs))
            .await
            .expect("load");

        let filtered = Config {
            common: CommonConfig::default()
                .nats_url(server.client_url())
                .node("bench")
                .metrics_addr(None),
            replay_processes: false,
            include_cgroups: vec![empty.display().to_string()],
            ..Config::default()
        };
        let collector = Collector::start(filtered).await.expect("collector");
        let probes = tokio::task::spawn_blocking(move || load(secs))
            .await
            .expect("load");
        drop(collector);

        let config = Config {
            common: CommonConfig::default()
                .nats_url(server.client_url())
                .node("bench")
                .metrics_addr(None),
            replay_processes: false,
            ..Config::default()
        };
        let collector = Collector::start(config).await.expect("collector");
        let handle = collector.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(collector.run(async {
            let _ = stopped.await;
        }));
        // Let replayed/startup traffic settle, then measure.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let published_before = published(&handle.stats);
        let cpu_before = cpu_seconds();
        let start = Instant::now();
        let with = tokio::task::spawn_blocking(move || load(secs))
            .await
            .expect("load");
        // Wait for the backlog to be published before reading the counters.
        let mut last = published(&handle.stats);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = published(&handle.stats);
            if now == last {
                break;
            }
            last = now;
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_before;
        let events = (published(&handle.stats) - published_before) as f64;
        let rate = events / wall;
        let drops: u64 = Kind::ALL.iter().map(|k| handle.kernel_drops_of(*k)).sum();
        let _ = stop.send(());
        let _ = task.await;
        println!(
            "{round:>5} {without:>10.0} {probes:>10.0} {:>7.3} {with:>10.0} {:>7.3} {rate:>10.0} {drops:>7} {:>16.3}",
            probes / without,
            with / without,
            (cpu / wall) / (rate / 10_000.0)
        );
    }
    let _ = std::fs::remove_dir(&empty);
}
