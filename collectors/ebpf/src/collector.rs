//! Load the BPF programs, drain the ring buffer, publish events.
//!
//! ```text
//! kernel ── ring buffer ──▶ reader task ──(bounded queue)──▶ publish task ──▶ JetStream
//!   │ (reservation failures:                (full: counted,       (Publisher: bounded
//!   │  per-CPU per-type drops map)           never blocks)          in-flight, retries)
//!   └── retransmits map ◀── drained every retransmit_interval
//! ```
//!
//! The reader never waits on NATS: when the queue is full (NATS unreachable
//! or slow) records are counted as lost (`tidewatch_ebpf_events_lost_total`)
//! and the ring keeps draining, so the kernel side never blocks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use futures::StreamExt;
use tidewatch_proto::v1;
use tidewatch_runtime::event::{derive_id, new_event};
use tidewatch_runtime::metrics::{Metrics, Readiness};
use tidewatch_runtime::outbox::{Delivered, Outbox, OutboxConfig, Receipt};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::spool::SpoolConfig;
use tidewatch_runtime::topology::{self, subjects, types};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::sync::{OnceCell, mpsc, watch};

use crate::attribution::{self, Resolver};
use crate::config::{self, Config};
use crate::procfs;
use crate::wire::{self, Body, Header, Kind, Record};

/// The compiled BPF object (built by build.rs from ebpf/tidewatch.bpf.c).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidewatch.bpf.o"));

/// Kernel page size (x86_64 and the common aarch64 configuration).
const PAGE_SIZE: u64 = 4096;

/// Collector name in subjects and sources.
pub const COLLECTOR: &str = "ebpf";

/// Payload of [`COLLECTOR_DROPS`]: what was lost since the collector started.
pub use tidewatch_proto::v1::{CollectorDrops, DropCount};
/// CloudEvent type of the periodic drop report.
pub use tidewatch_runtime::topology::types::COLLECTOR_DROPS;

/// Why the collector could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(
        "cannot load the eBPF programs: {0} (needs root or CAP_BPF + CAP_PERFMON, plus CAP_SYS_RESOURCE before kernel 5.11; a kernel >= 5.8 with BTF at /sys/kernel/btf/vmlinux; tracefs mounted)"
    )]
    Load(String),
    #[error("cannot attach {program} to {target}: {reason}")]
    Attach {
        program: &'static str,
        target: String,
        reason: String,
    },
    #[error("admin endpoint {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] tidewatch_runtime::RuntimeError),
}

/// Counters the collector keeps besides the runtime's.
#[derive(Default)]
pub struct Stats {
    /// Records read from the ring (and retransmit map), per kind.
    pub read: [AtomicU64; Kind::COUNT],
    /// Events the stream acknowledged, per kind.
    pub published: [AtomicU64; Kind::COUNT],
    /// Records dropped because the queue to the publisher was full.
    pub lost_queue: AtomicU64,
    /// Events not acknowledged after every retry, or refused.
    pub lost_publish: AtomicU64,
    /// Ring records that did not parse (collector/BPF mismatch).
    pub malformed: AtomicU64,
    /// `process.exists` events sent at start.
    pub replayed: AtomicU64,
}

/// Per-CPU, per-kind kernel drop counters (`[cpu][kind]`).
pub type KernelDrops = Vec<[u64; Kind::COUNT]>;

/// A handle on a started collector, for tests and the admin endpoint.
#[derive(Clone)]
pub struct Handle {
    paused: Arc<watch::Sender<bool>>,
    drops: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    pub stats: Arc<Stats>,
    metrics_addr: Option<SocketAddr>,
    metrics: Metrics,
}

impl Handle {
    /// Stop reading the ring (it fills; the kernel counts what does not fit).
    pub fn pause_draining(&self) {
        self.paused.send_replace(true);
    }
    pub fn resume_draining(&self) {
        self.paused.send_replace(false);
    }
    /// The kernel's drop counters now.
    pub fn kernel_drops(&self) -> KernelDrops {
        read_drops(&self.drops)
    }
    /// Kernel drops of one kind, summed over CPUs.
    pub fn kernel_drops_of(&self, kind: Kind) -> u64 {
        self.kernel_drops().iter().map(|c| c[kind as usize]).sum()
    }
    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// The Prometheus exposition `/metrics` serves.
    pub fn render_metrics(&self) -> String {
        render_metrics(self)
    }
}

fn read_drops(drops: &Mutex<PerCpuArray<MapData, u64>>) -> KernelDrops {
    let drops = drops.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: KernelDrops = Vec::new();
    for kind in Kind::ALL {
        if let Ok(values) = drops.get(&(kind as u32), 0) {
            for (cpu, v) in values.iter().enumerate() {
                if out.len() <= cpu {
                    out.resize(cpu + 1, [0; Kind::COUNT]);
                }
                out[cpu][kind as usize] = *v;
            }
        }
    }
    out
}

/// Identity of this collector run, for deterministic event ids.
struct Ids {
    boot_id: String,
    /// Load time: the per-CPU sequences restart with every load.
    nonce: [u8; 8],
}

impl Ids {
    fn record(&self, header: &Header) -> String {
        derive_id(&[
            self.boot_id.as_bytes(),
            COLLECTOR.as_bytes(),
            &self.nonce,
            &header.cpu.to_be_bytes(),
            &header.seq.to_be_bytes(),
        ])
    }
    fn other(&self, what: &str, n: u64) -> String {
        derive_id(&[
            self.boot_id.as_bytes(),
            COLLECTOR.as_bytes(),
            &self.nonce,
            what.as_bytes(),
            &n.to_be_bytes(),
        ])
    }
}

/// A loaded, attached collector, not yet publishing.
pub struct Collector {
    resolved: config::Resolved,
    // Owns the programs and their links: dropping it detaches everything.
    _bpf: Ebpf,
    ring: RingBuf<MapData>,
    retransmits: BpfHashMap<MapData, u64, [u8; wire::RETRANS_SIZE]>,
    handle: Handle,
    admin: Option<tokio::net::TcpListener>,
    readiness: Readiness,
}

/// Mount tracefs and bpffs when they are missing (a fresh host or container).
pub fn ensure_mounts() {
    let tracefs = Path::new("/sys/kernel/tracing");
    if !tracefs.join("events").exists() && !Path::new("/sys/kernel/debug/tracing/events").exists() {
        mount("tracefs", "nodev", tracefs);
    }
    let bpffs = Path::new("/sys/fs/bpf");
    let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    });
    if !mounted && bpffs.exists() {
        mount("bpf", "bpf", bpffs);
    }
}

fn mount(fstype: &str, device: &str, target: &Path) {
    match std::process::Command::new("mount")
        .args(["-t", fstype, device])
        .arg(target)
        .output()
    {
        Ok(o) if o.status.success() => {
            tracing::info!(%fstype, target = %target.display(), "mounted")
        }
        Ok(o) => {
            tracing::warn!(%fstype, target = %target.display(), stderr = %String::from_utf8_lossy(&o.stderr).trim(), "mount failed")
        }
        Err(e) => tracing::warn!(%fstype, error = %e, "cannot run mount"),
    }
}

fn tracepoint(
    bpf: &mut Ebpf,
    program: &'static str,
    category: &str,
    name: &str,
) -> Result<(), CollectorError> {
    let attach_err = |reason: String| CollectorError::Attach {
        program,
        target: format!("tracepoint {category}/{name}"),
        reason,
    };
    let prog: &mut TracePoint = bpf
        .program_mut(program)
        .ok_or_else(|| attach_err("not in the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
    prog.load().map_err(|e| attach_err(format!("{e:#}")))?;
    prog.attach(category, name)
        .map_err(|e| attach_err(e.to_string()))?;
    Ok(())
}

fn raw_tracepoint(bpf: &mut Ebpf, program: &'static str, name: &str) -> Result<(), CollectorError> {
    let attach_err = |reason: String| CollectorError::Attach {
        program,
        target: format!("raw tracepoint {name}"),
        reason,
    };
    let prog: &mut RawTracePoint = bpf
        .program_mut(program)
        .ok_or_else(|| attach_err("not in the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
    prog.load().map_err(|e| attach_err(format!("{e:#}")))?;
    prog.attach(name).map_err(|e| attach_err(e.to_string()))?;
    Ok(())
}

impl Collector {
    /// Validate the config, load and attach the programs, bind `/metrics`.
    /// Bad config is refused here, before anything is loaded.
    pub async fn start(config: Config) -> Result<Collector, CollectorError> {
        let resolved = config.validate()?;
        ensure_mounts();
        let mut bpf = EbpfLoader::new()
            .map_max_entries("events", resolved.config.ring_bytes)
            .load(BPF_OBJECT)
            .map_err(|e| {
                // Say plainly why, when the host is the reason.
                let why = crate::preflight::check().err().unwrap_or_default();
                CollectorError::Load(format!("{e:#} {why}").trim_end().to_string())
            })?;

        // Configure the filters before any program runs.
        {
            let load = |e: aya::maps::MapError| CollectorError::Load(e.to_string());
            let mut cfg: Array<_, u64> = Array::try_from(
                bpf.map_mut("tw_config")
                    .ok_or_else(|| CollectorError::Load("no tw_config map".into()))?,
            )
            .map_err(load)?;
            let own = if resolved.config.ignore_self {
                u64::from(std::process::id())
            } else {
                0
            };
            cfg.set(0, own, 0).map_err(load)?;
            cfg.set(1, u64::from(!resolved.include.is_empty()), 0)
                .map_err(load)?;
            for (i, every) in resolved.sample_every.iter().enumerate() {
                cfg.set(2 + i as u32, *every, 0).map_err(load)?;
            }
            // Wake the reader early once a quarter of the ring (at most
            // 256 KiB) waits; otherwise it drains every POLL_INTERVAL.
            let wakeup = u64::from(resolved.config.ring_bytes / 4).min(256 << 10);
            cfg.set(2 + Kind::COUNT as u32, wakeup, 0).map_err(load)?;
            for (map, ids) in [
                ("cgroup_include", &resolved.include),
                ("cgroup_exclude", &resolved.exclude),
            ] {
                let mut m: BpfHashMap<_, u64, u8> = BpfHashMap::try_from(
                    bpf.map_mut(map)
                        .ok_or_else(|| CollectorError::Load(format!("no {map} map")))?,
                )
                .map_err(load)?;
                for id in ids {
                    m.insert(id, 1, 0).map_err(load)?;
                }
            }
        }

        let on = |k: Kind| resolved.sample_every[k as usize] != 0;
        tracepoint(&mut bpf, "tw_exec", "sched", "sched_process_exec")?;
        tracepoint(&mut bpf, "tw_exit", "sched", "sched_process_exit")?;
        if on(Kind::Oom) {
            raw_tracepoint(&mut bpf, "tw_oom_kill", "mark_victim")?;
        }
        let tcp = [
            Kind::TcpConnect,
            Kind::TcpAccept,
            Kind::TcpClose,
            Kind::TcpRefused,
            Kind::TcpTimeout,
            Kind::TcpReset,
            Kind::TcpRetransmit,
        ];
        if tcp.iter().any(|k| on(*k)) {
            tracepoint(&mut bpf, "tw_tcp_state", "sock", "inet_sock_set_state")?;
        }
        if on(Kind::TcpRetransmit) {
            tracepoint(&mut bpf, "tw_retransmit", "tcp", "tcp_retransmit_skb")?;
        }

        let take = |bpf: &mut Ebpf, name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| CollectorError::Load(format!("no {name} map")))
        };
        let load = |e: aya::maps::MapError| CollectorError::Load(e.to_string());
        let ring = RingBuf::try_from(take(&mut bpf, "events")?).map_err(load)?;
        let drops = PerCpuArray::try_from(take(&mut bpf, "drops")?).map_err(load)?;
        let retransmits = BpfHashMap::try_from(take(&mut bpf, "retransmits")?).map_err(load)?;

        let (admin, metrics_addr) = match resolved.config.metrics_addr {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| CollectorError::Admin { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| CollectorError::Admin { addr, source })?;
                (Some(listener), Some(local))
            }
            None => (None, None),
        };
        let (paused, _) = watch::channel(false);
        let handle = Handle {
            paused: Arc::new(paused),
            drops: Arc::new(Mutex::new(drops)),
            stats: Arc::new(Stats::default()),
            metrics_addr,
            metrics: Metrics::new(COLLECTOR),
        };
        tracing::info!(
            ring_bytes = resolved.config.ring_bytes,
            node = %resolved.config.node,
            metrics = ?metrics_addr,
            "eBPF programs loaded and attached"
        );
        Ok(Collector {
            resolved,
            _bpf: bpf,
            ring,
            retransmits,
            handle,
            admin,
            readiness: Readiness::default(),
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Drain, publish and report until `shutdown` resolves; then stop
    /// reading, publish what was read, wait for the acks, and detach.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), CollectorError> {
        let Collector {
            resolved,
            _bpf,
            ring,
            retransmits,
            handle,
            admin,
            readiness,
        } = self;
        let config = Arc::new(resolved.config);
        let ids = Arc::new(Ids {
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            nonce: (chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64)
                .to_be_bytes(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (queue_tx, queue_rx) = mpsc::channel::<Record>(config.queue_capacity);
        let publisher: Arc<OnceCell<Publisher>> = Arc::new(OnceCell::new());

        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = admin {
            tasks.spawn(serve_admin(
                listener,
                handle.clone(),
                readiness.clone(),
                stop_rx.clone(),
            ));
        }
        // SAFETY: the ring buffer's fd is owned by the RingBuf, which the
        // AsyncFd owns until it is dropped; it stays open and unchanged.
        #[allow(unsafe_code)]
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| CollectorError::Load(format!("cannot poll the ring buffer: {e}")))?;
        let reader = tokio::spawn(read_ring(
            ring,
            queue_tx.clone(),
            handle.paused.subscribe(),
            handle.stats.clone(),
            stop_rx.clone(),
        ));
        tasks.spawn(drain_retransmits(
            retransmits,
            queue_tx.clone(),
            handle.stats.clone(),
            config.retransmit_interval,
            stop_rx.clone(),
        ));
        tasks.spawn(report_drops(
            handle.clone(),
            publisher.clone(),
            config.clone(),
            ids.clone(),
            stop_rx.clone(),
        ));
        drop(queue_tx);
        let publishing = tokio::spawn(publish_all(
            config.clone(),
            ids,
            handle.clone(),
            publisher.clone(),
            queue_rx,
            readiness.clone(),
            stop_rx.clone(),
        ));

        shutdown.await;
        tracing::info!("shutting down: stop reading, publish what was read, wait for acks");
        readiness.set(false);
        let _ = stop_tx.send(true);
        let _ = reader.await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let _ = publishing.await;
        Ok(())
    }
}

/// Run a collector until `shutdown` resolves (mini-redis style; tests call
/// this in-process).
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CollectorError> {
    Collector::start(config).await?.run(shutdown).await
}

/// How often the ring is drained when the kernel has not woken the reader
/// (it wakes it early once a quarter of the ring, at most 256 KiB, waits).
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Most records read in one go before yielding to other tasks.
const DRAIN_BATCH: usize = 4096;

fn drain(ring: &mut RingBuf<MapData>, queue: &mpsc::Sender<Record>, stats: &Stats) -> usize {
    let mut n = 0;
    while n < DRAIN_BATCH {
        let Some(item) = ring.next() else { break };
        n += 1;
        match wire::parse(&item) {
            Ok(record) => {
                stats.read[record.kind as usize].fetch_add(1, Ordering::Relaxed);
                if queue.try_send(record).is_err() {
                    stats.lost_queue.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "malformed ring buffer record");
            }
        }
    }
    n
}

async fn read_ring(
    mut ring: AsyncFd<RingBuf<MapData>>,
    queue: mpsc::Sender<Record>,
    mut paused: watch::Receiver<bool>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            // Final drain: what the kernel already wrote is published.
            while drain(ring.get_mut(), &queue, &stats) > 0 {}
            return;
        }
        if *paused.borrow_and_update() {
            tokio::select! {
                _ = paused.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        if drain(ring.get_mut(), &queue, &stats) == DRAIN_BATCH {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            guard = ring.readable_mut() => match guard {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &queue, &stats);
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "polling the ring buffer failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = paused.changed() => {}
            _ = stop.changed() => {}
            // The kernel wakes the reader only once a batch waits (see
            // submit() in the BPF source); smaller batches are read on a timer.
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

async fn drain_retransmits(
    mut map: BpfHashMap<MapData, u64, [u8; wire::RETRANS_SIZE]>,
    queue: mpsc::Sender<Record>,
    stats: Arc<Stats>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        round += 1;
        let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for (i, key) in keys.into_iter().enumerate() {
            let Ok(value) = map.get(&key, 0) else {
                continue;
            };
            let _ = map.remove(&key);
            match wire::parse(&value) {
                Ok(mut record) => {
                    // Not from a per-CPU sequence: number by round and index.
                    record.header.cpu = u32::MAX;
                    record.header.seq = (round << 20) | i as u64;
                    stats.read[record.kind as usize].fetch_add(1, Ordering::Relaxed);
                    if queue.try_send(record).is_err() {
                        stats.lost_queue.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "malformed retransmit entry");
                }
            }
        }
    }
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, to turn kernel timestamps into wall time.
fn wall_offset_ns() -> i64 {
    use nix::time::{ClockId, clock_gettime};
    let ns = |c| {
        clock_gettime(c)
            .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
            .unwrap_or(0)
    };
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_MONOTONIC)
}

fn process_info(h: &Header, wall_ns: i64, r: &attribution::Resolved) -> v1::ProcessInfo {
    v1::ProcessInfo {
        pid: h.pid,
        tgid: h.tgid,
        ppid: h.ppid,
        uid: h.uid,
        comm: h.comm.clone(),
        cgroup_id: h.cgroup_id,
        monotonic_ns: h.ts_ns,
        wall_time_ns: wall_ns,
        container_id: r.attribution.container_id.clone().unwrap_or_default(),
        pod_uid: r.attribution.pod_uid.clone().unwrap_or_default(),
    }
}

fn to_event(
    record: &Record,
    id: String,
    source: &str,
    subject: &str,
    offset: i64,
    resolver: &mut Resolver,
) -> Result<tidewatch_runtime::cloudevents::Event, tidewatch_runtime::event::EventError> {
    let h = &record.header;
    let wall_ns = h.ts_ns as i64 + offset;
    let time = chrono::DateTime::from_timestamp_nanos(wall_ns);
    let resolved = resolver.resolve(h.cgroup_id, h.tgid);
    if matches!(record.body, Body::Exit(_)) {
        resolver.forget_pid(h.tgid);
    }
    let process = Some(process_info(h, wall_ns, &resolved));
    let ty = record.kind.event_type();
    match &record.body {
        Body::Exec(e) => new_event(
            id,
            ty,
            source,
            Some(subject),
            time,
            &v1::ProcessExec {
                process,
                filename: e.filename.clone(),
                argv: e.argv.clone(),
                argv_truncated: e.argv_truncated,
            },
        ),
        Body::Exit(e) => new_event(
            id,
            ty,
            source,
            Some(subject),
            time,
            &v1::ProcessExit {
                process,
                exit_code: e.exit_code(),
                signal: e.signal(),
                core_dumped: e.core_dumped(),
                runtime_ns: e.runtime_ns,
            },
        ),
        Body::Oom(o) => new_event(
            id,
            ty,
            source,
            Some(subject),
            time,
            &v1::OomKill {
                victim: process,
                total_pages: o.rss_pages,
                // (the victim's resident pages: anon + file + shmem)
                rss_pages: o.rss_pages,
                // PAGE_COUNTER_MAX (no limit) and above read as "unknown" (0).
                memory_limit_bytes: if o.memcg && o.total_pages < (i64::MAX as u64) / PAGE_SIZE {
                    (o.total_pages * PAGE_SIZE) as i64
                } else {
                    0
                },
                cgroup_path: resolved.path.clone(),
            },
        ),
        Body::Tcp(t) => new_event(
            id,
            ty,
            source,
            Some(subject),
            time,
            &v1::TcpConnection {
                process,
                change: record.kind.tcp_change().to_string(),
                family: u32::from(t.family),
                saddr: t.saddr.to_string(),
                sport: u32::from(t.sport),
                daddr: t.daddr.to_string(),
                dport: u32::from(t.dport),
                duration_ns: t.duration_ns,
                retransmits: t.retransmits,
                bytes_sent: t.bytes_sent,
                bytes_received: t.bytes_received,
            },
        ),
    }
}

/// Await confirmations in one task and count the outcome per kind.
async fn confirm_all(mut rx: mpsc::UnboundedReceiver<(Kind, Receipt)>, stats: Arc<Stats>) {
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            job = rx.recv(), if open => match job {
                Some((kind, receipt)) => pending.push(async move { (kind, receipt.await) }),
                None => open = false,
            },
            Some((kind, result)) = pending.next(), if !pending.is_empty() => match result {
                // Spooled events are counted as published once replayed
                // (tidewatch_spool_replayed_total), not here.
                Ok(Delivered::Stored(_)) => { stats.published[kind as usize].fetch_add(1, Ordering::Relaxed); }
                Ok(Delivered::Spooled) => {}
                Err(e) => {
                    stats.lost_publish.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "event lost: not stored by the stream");
                }
            },
            else => return,
        }
    }
}

async fn publish_all(
    config: Arc<Config>,
    ids: Arc<Ids>,
    handle: Handle,
    publisher_cell: Arc<OnceCell<Publisher>>,
    mut queue: mpsc::Receiver<Record>,
    readiness: Readiness,
    mut stop: watch::Receiver<bool>,
) {
    // Until NATS answers, records wait in the bounded queue; once it is
    // full the reader counts what it cannot keep (and never blocks).
    let mut attempt = 0u32;
    let client = loop {
        let connect = tidewatch_runtime::host::connect(&config.nats_url, "collector-ebpf");
        let result = tokio::select! {
            c = connect => c,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                // Shutting down without ever reaching NATS: what was queued is lost, and counted.
                queue.close();
                while queue.recv().await.is_some() {
                    handle.stats.lost_publish.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        };
        match result {
            Ok(client) => break client,
            Err(e) => {
                attempt += 1;
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::warn!(error = %e, attempt, "cannot connect to NATS; retrying (events beyond the queue are counted as lost)");
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), stop.wait_for(|s| *s)).await;
            }
        }
    };
    let publisher = Publisher::new(
        client,
        PublisherConfig::default().max_in_flight(config.max_in_flight),
        handle.metrics.clone(),
    );
    let _ = publisher_cell.set(publisher.clone());
    let spool = config.spool_dir.as_ref().map(|dir| {
        OutboxConfig::default()
            .spool_dir(dir)
            .spool(SpoolConfig {
                max_bytes: config.spool_max_bytes,
                ..SpoolConfig::default()
            })
            .component(COLLECTOR)
            .node(config.node.as_str())
    });
    let sink = Outbox::open_or_without_spool(publisher.clone(), spool);
    let subject = subjects::raw(COLLECTOR, &config.node);
    let source = topology::source(COLLECTOR, &config.node);
    let event_subject = format!("node/{}", config.node);
    let (confirm_tx, confirm_rx) = mpsc::unbounded_channel();
    let confirmer = tokio::spawn(confirm_all(confirm_rx, handle.stats.clone()));
    let mut resolver = Resolver::new(attribution::cgroup2_root());
    resolver.rescan();

    if config.replay_processes {
        replay(
            &config,
            &ids,
            &publisher,
            &subject,
            &source,
            &event_subject,
            &handle.stats,
        )
        .await;
    }
    readiness.set(true);

    let mut offset = wall_offset_ns();
    let mut since_offset = 0u32;
    while let Some(record) = queue.recv().await {
        since_offset += 1;
        if since_offset >= 10_000 {
            offset = wall_offset_ns();
            since_offset = 0;
        }
        let id = ids.record(&record.header);
        let event = match to_event(&record, id, &source, &event_subject, offset, &mut resolver) {
            Ok(e) => e,
            Err(e) => {
                handle.metrics.refuse("malformed");
                tracing::warn!(error = %e, "cannot build event");
                continue;
            }
        };
        match sink.send(subject.as_str(), &event).await {
            Ok(receipt) => {
                let _ = confirm_tx.send((record.kind, receipt));
            }
            Err(e) => {
                handle.stats.lost_publish.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "event refused");
            }
        }
    }
    drop(confirm_tx);
    let _ = confirmer.await;
    if let Err(e) = sink.flush().await {
        tracing::warn!(error = %e, "cannot fsync the outage spool at exit");
    }
}

async fn replay(
    config: &Config,
    ids: &Ids,
    publisher: &Publisher,
    subject: &str,
    source: &str,
    event_subject: &str,
    stats: &Stats,
) {
    let boot_wall_ns = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|b| b.trim().parse::<i64>().ok())
        })
        .unwrap_or(0)
        * 1_000_000_000;
    let root = attribution::cgroup2_root();
    let mut confirmations = Vec::new();
    for p in procfs::processes(Path::new("/proc")) {
        let cgroup_path = attribution::path_from_proc_cgroup(&p.cgroup).unwrap_or_default();
        let cgroup_id = p
            .cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .and_then(|rel| {
                let root = root.as_ref()?;
                attribution::cgroup_id(&root.join(rel.trim_start_matches('/'))).ok()
            })
            .unwrap_or(0);
        let a = attribution::parse_path(&cgroup_path);
        let wall = boot_wall_ns + p.start_since_boot_ns as i64;
        let info = v1::ProcessInfo {
            pid: p.pid,
            tgid: p.pid,
            ppid: p.ppid,
            uid: p.uid,
            comm: p.comm.clone(),
            cgroup_id,
            monotonic_ns: p.start_since_boot_ns,
            wall_time_ns: wall,
            container_id: a.container_id.unwrap_or_default(),
            pod_uid: a.pod_uid.unwrap_or_default(),
        };
        let payload = v1::ProcessExec {
            process: Some(info),
            filename: p.filename,
            argv: p.argv,
            argv_truncated: false,
        };
        let id = ids.other("exists", u64::from(p.pid));
        let Ok(event) = new_event(
            id,
            types::PROCESS_EXISTS,
            source,
            Some(event_subject),
            chrono::DateTime::from_timestamp_nanos(wall),
            &payload,
        ) else {
            continue;
        };
        match publisher.send(subject, &event).await {
            Ok(c) => confirmations.push(c),
            Err(e) => tracing::warn!(error = %e, pid = p.pid, "process.exists refused"),
        }
    }
    let n = confirmations.len();
    for c in confirmations {
        if c.await.is_ok() {
            stats.replayed.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.lost_publish.fetch_add(1, Ordering::Relaxed);
        }
    }
    tracing::info!(processes = n, node = %config.node, "replayed running processes as process.exists");
}

async fn report_drops(
    handle: Handle,
    publisher: Arc<OnceCell<Publisher>>,
    config: Arc<Config>,
    ids: Arc<Ids>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(config.drops_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_kernel: KernelDrops = Vec::new();
    let mut last_queue = 0;
    let mut last_publish = 0;
    let mut n: u64 = 0;
    let subject = subjects::raw(COLLECTOR, &config.node);
    let source = topology::source(COLLECTOR, &config.node);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(publisher) = publisher.get() else {
            continue;
        };
        let kernel = handle.kernel_drops();
        let mut counts = Vec::new();
        for (cpu, per_kind) in kernel.iter().enumerate() {
            for kind in Kind::ALL {
                let total = per_kind[kind as usize];
                let before = last_kernel.get(cpu).map(|c| c[kind as usize]).unwrap_or(0);
                if total > 0 {
                    counts.push(DropCount {
                        stage: "kernel".into(),
                        kind: kind.name().into(),
                        cpu: cpu as u32,
                        total,
                        delta: total - before.min(total),
                    });
                }
            }
        }
        let queue = handle.stats.lost_queue.load(Ordering::Relaxed);
        let publish = handle.stats.lost_publish.load(Ordering::Relaxed);
        for (stage, total, before) in [
            ("queue", queue, last_queue),
            ("publish", publish, last_publish),
        ] {
            if total > 0 {
                counts.push(DropCount {
                    stage: stage.into(),
                    kind: String::new(),
                    cpu: 0,
                    total,
                    delta: total - before.min(total),
                });
            }
        }
        let delta: u64 = counts.iter().map(|c| c.delta).sum();
        if delta == 0 {
            continue;
        }
        n += 1;
        let payload = CollectorDrops {
            node: config.node.clone(),
            counts,
            delta,
        };
        let event = match new_event(
            ids.other("drops", n),
            COLLECTOR_DROPS,
            &source,
            Some(&format!("node/{}", config.node)),
            chrono::Utc::now(),
            &payload,
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the drops event");
                continue;
            }
        };
        tracing::warn!(
            lost = delta,
            "events were lost; reporting {COLLECTOR_DROPS}"
        );
        match publisher.publish(subject.as_str(), &event).await {
            Ok(_) => {
                last_kernel = kernel;
                last_queue = queue;
                last_publish = publish;
            }
            Err(e) => tracing::warn!(error = %e, "drops event not stored; will report again"),
        }
    }
}

fn render_metrics(handle: &Handle) -> String {
    use std::fmt::Write as _;
    let base = handle.metrics.encode();
    let mut out = base.strip_suffix("# EOF\n").unwrap_or(&base).to_string();
    let c = "component=\"ebpf\"";
    out.push_str("# HELP tidewatch_ebpf_kernel_drops Ring buffer reservations that failed in the kernel (events lost), per type and CPU.\n# TYPE tidewatch_ebpf_kernel_drops counter\n");
    for (cpu, per_kind) in handle.kernel_drops().iter().enumerate() {
        for kind in Kind::ALL {
            let _ = writeln!(
                out,
                "tidewatch_ebpf_kernel_drops_total{{{c},type=\"{}\",cpu=\"{cpu}\"}} {}",
                kind.name(),
                per_kind[kind as usize]
            );
        }
    }
    out.push_str("# HELP tidewatch_ebpf_events_read Records read from the kernel, per type.\n# TYPE tidewatch_ebpf_events_read counter\n");
    for kind in Kind::ALL {
        let _ = writeln!(
            out,
            "tidewatch_ebpf_events_read_total{{{c},type=\"{}\"}} {}",
            kind.name(),
            handle.stats.read[kind as usize].load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP tidewatch_ebpf_events_published Events the stream acknowledged, per type.\n# TYPE tidewatch_ebpf_events_published counter\n");
    for kind in Kind::ALL {
        let _ = writeln!(
            out,
            "tidewatch_ebpf_events_published_total{{{c},type=\"{}\"}} {}",
            kind.name(),
            handle.stats.published[kind as usize].load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP tidewatch_ebpf_events_lost Events read from the kernel but not stored, by reason.\n# TYPE tidewatch_ebpf_events_lost counter\n");
    for (reason, v) in [
        ("queue_full", &handle.stats.lost_queue),
        ("publish_failed", &handle.stats.lost_publish),
        ("malformed", &handle.stats.malformed),
    ] {
        let _ = writeln!(
            out,
            "tidewatch_ebpf_events_lost_total{{{c},reason=\"{reason}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    out.push_str("# EOF\n");
    out
}

/// `/metrics`, `/healthz`, `/readyz` over plain HTTP/1.1 (one request per connection).
async fn serve_admin(
    listener: tokio::net::TcpListener,
    handle: Handle,
    readiness: Readiness,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = stop.changed() => return,
        };
        let handle = handle.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            loop {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..]))
                    .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                    break;
                }
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render_metrics(&handle),
                ),
                "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".into()),
                "/readyz" if readiness.get() => ("200 OK", "text/plain", "ready\n".into()),
                "/readyz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n".into(),
                ),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics, /healthz, /readyz\n".into(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
