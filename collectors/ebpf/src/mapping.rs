//! Event mapping: a kernel record → its CloudEvent (payload, wall time,
//! container and pod attribution), and the deterministic ids.

use tidewatch_proto::v1;
use tidewatch_runtime::cloudevents::Event;
use tidewatch_runtime::event::{EventError, derive_id, new_event};

use crate::COLLECTOR;
use crate::attribution::{self, Resolver};
use crate::wire::{Body, Header, Record};

/// Kernel page size (x86_64 and the common aarch64 configuration).
const PAGE_SIZE: u64 = 4096;

/// Identity of this collector run, for deterministic event ids.
pub struct Ids {
    boot_id: String,
    /// Load time: the per-CPU sequences restart with every load.
    nonce: [u8; 8],
}

impl Ids {
    /// The id of a kernel record: per-CPU sequences restart with every load.
    pub fn record(&self, header: &Header) -> String {
        derive_id(&[
            self.boot_id.as_bytes(),
            COLLECTOR.as_bytes(),
            &self.nonce,
            &header.cpu.to_be_bytes(),
            &header.seq.to_be_bytes(),
        ])
    }
    /// The id of the `n`th event of another sort (`exists`, `drops`).
    pub fn other(&self, what: &str, n: u64) -> String {
        derive_id(&[
            self.boot_id.as_bytes(),
            COLLECTOR.as_bytes(),
            &self.nonce,
            what.as_bytes(),
            &n.to_be_bytes(),
        ])
    }
}

impl Default for Ids {
    /// This boot and this load.
    fn default() -> Ids {
        Ids {
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            nonce: (chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64)
                .to_be_bytes(),
        }
    }
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, to turn kernel timestamps into wall time.
pub fn wall_offset_ns() -> i64 {
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

/// The CloudEvent of `record`; an exit also forgets the process in `resolver`.
pub fn to_event(
    record: &Record,
    id: String,
    source: &str,
    subject: &str,
    offset: i64,
    resolver: &mut Resolver,
) -> Result<Event, EventError> {
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
