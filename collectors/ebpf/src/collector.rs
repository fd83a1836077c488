//! Wiring: [`Ebpf`], the collector the runtime's collector host runs (the
//! host owns `/metrics`, health, NATS, the outbox and the flush on stop).
//!
//! ```text
//! kernel ── ring buffer ──▶ reader task ──(bounded queue)──▶ publish task ──▶ outbox
//!   │ (reservation failures:   (ring)        (full: counted,    (publish)      (publisher or
//!   │  per-CPU per-type drops map)            never blocks)                    spool)
//!   └── retransmits map ◀── drained every retransmit_interval (ring)
//!   drops map, counters ──▶ drop reports every drops_interval (drops)
//! ```
//!
//! The reader never waits on NATS: when the queue is full (NATS unreachable
//! or slow) records are counted as lost (`tidewatch_ebpf_events_lost_total`)
//! and the ring keeps draining, so the kernel side never blocks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aya::Ebpf as Programs;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use tidewatch_runtime::collector::{self as host, Context, NoArgs, Started};
use tidewatch_runtime::metrics::Metrics;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::config::{self, Config};
use crate::drops;
use crate::error::CollectorError;
use crate::kernel_drops::{KernelDrops, read_drops};
use crate::load;
use crate::mapping::Ids;
use crate::publish::{self, Publishing};
use crate::ring;
use crate::wire::{self, Kind, Record};

pub use crate::stats::Stats;
pub use crate::{COLLECTOR, COLLECTOR_DROPS};
/// Payload of [`COLLECTOR_DROPS`]: what was lost since the collector started.
pub use tidewatch_proto::v1::{CollectorDrops, DropCount};

/// A loaded, attached collector, not yet publishing.
pub struct Ebpf {
    resolved: config::Resolved,
    // Owns the programs and their links: dropping it detaches everything.
    _programs: Programs,
    ring: RingBuf<MapData>,
    retransmits: BpfHashMap<MapData, u64, [u8; wire::RETRANS_SIZE]>,
    paused: Arc<watch::Sender<bool>>,
    drops: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    stats: Arc<Stats>,
}

impl host::Collector for Ebpf {
    const NAME: &'static str = COLLECTOR;
    const ABOUT: &'static str = "Tidewatch eBPF collector: process exec/exit, OOM kills and TCP \
connections from the kernel, published to tidewatch.raw.ebpf.<node>. Needs root or CAP_BPF and \
CAP_PERFMON (and CAP_SYS_RESOURCE before kernel 5.11); see README.md.";
    const CONFIG_ENV: &'static str = "TIDEWATCH_EBPF_CONFIG";
    type Config = Config;
    type Args = NoArgs;
    type Error = CollectorError;

    fn apply(_: NoArgs, _: &mut Config) {}

    /// Privileges, BTF and kernel version.
    async fn check_host(_: &Config) -> Result<(), String> {
        crate::preflight::check()
    }

    /// Validate the config (bad config is refused before anything loads),
    /// load and attach the programs, register the collector's metrics.
    async fn start(config: Config, metrics: &Metrics) -> Result<Ebpf, CollectorError> {
        let resolved = config.validate()?;
        let loaded = load::load(&resolved)?;
        let drops = Arc::new(Mutex::new(loaded.drops));
        let stats = Arc::new(Stats::default());
        metrics.register_collector(crate::stats::Exposition {
            stats: stats.clone(),
            kernel: drops.clone(),
        });
        tracing::info!(
            ring_bytes = resolved.config.ring_bytes,
            node = %resolved.config.common.node,
            "eBPF programs loaded and attached"
        );
        Ok(Ebpf {
            resolved,
            _programs: loaded.bpf,
            ring: loaded.ring,
            retransmits: loaded.retransmits,
            paused: Arc::new(watch::channel(false).0),
            drops,
            stats,
        })
    }

    /// Drain, publish and report until `cx.stop`; then stop reading,
    /// publish what was read, and return (the host waits for the acks).
    async fn run(self, cx: Context) -> Result<(), CollectorError> {
        let Ebpf {
            resolved,
            _programs,
            ring,
            retransmits,
            paused,
            drops,
            stats,
        } = self;
        let Context {
            outbox,
            metrics,
            readiness,
            stop,
            ..
        } = cx;
        let config = resolved.config;
        let ids = Arc::new(Ids::default());
        let (queue_tx, queue_rx) = mpsc::channel::<Record>(config.queue_capacity);

        // SAFETY: the ring buffer's fd is owned by the RingBuf, which the
        // AsyncFd owns until it is dropped; it stays open and unchanged.
        #[allow(unsafe_code)]
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| CollectorError::Load(format!("cannot poll the ring buffer: {e}")))?;
        let reader = tokio::spawn(ring::read_ring(
            ring,
            queue_tx.clone(),
            paused.subscribe(),
            stats.clone(),
            stop.clone(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(ring::drain_retransmits(
            retransmits,
            queue_tx.clone(),
            stats.clone(),
            config.retransmit_interval,
            stop.clone(),
        ));
        tasks.spawn(drops::report_drops(
            drops::Sources {
                kernel: drops,
                stats: stats.clone(),
            },
            outbox.clone(),
            config.common.node.clone(),
            config.drops_interval,
            ids.clone(),
            stop.clone(),
        ));
        drop(queue_tx);
        let publishing = tokio::spawn(publish::publish_all(
            Publishing {
                outbox,
                node: config.common.node.clone(),
                replay_processes: config.replay_processes,
                replay_executables: config.replay_executables,
                ids,
                stats,
                metrics,
                readiness,
            },
            queue_rx,
        ));

        let mut stopping = stop;
        host::until(&mut stopping, true).await;
        let _ = reader.await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        // The queue is closed now: this returns once what was read is sent.
        let _ = publishing.await;
        Ok(())
    }
}

/// A handle on a started collector, for tests and benchmarks.
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
        self.metrics.encode()
    }
}

/// A loaded, attached collector with its host (`/metrics` bound, NATS
/// connected), not yet publishing.
pub struct Collector(Started<Ebpf>);

impl Collector {
    /// Validate the config, load and attach the programs, then bind
    /// `/metrics` and connect. Bad config is refused before anything loads.
    pub async fn start(config: Config) -> Result<Collector, CollectorError> {
        Started::start(config).await.map(Collector)
    }

    pub fn handle(&self) -> Handle {
        let Started { host, collector } = &self.0;
        Handle {
            paused: collector.paused.clone(),
            drops: collector.drops.clone(),
            stats: collector.stats.clone(),
            metrics_addr: host.metrics_addr(),
            metrics: host.metrics().clone(),
        }
    }

    /// Drain, publish and report until `shutdown` resolves; then stop
    /// reading, publish what was read, wait for the acks, and detach.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), CollectorError> {
        self.0.run(shutdown).await
    }
}

/// Run a collector until `shutdown` resolves (tests call this in-process).
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CollectorError> {
    host::run::<Ebpf>(config, shutdown).await
}
