//! Load and attach: the BPF object, its filter settings, the tracepoints,
//! and the maps the collector reads (ring buffer, drop counters,
//! retransmits). Dropping [`Loaded::bpf`] detaches everything.

use std::path::Path;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};

use crate::config::Resolved;
use crate::error::CollectorError;
use crate::wire::{self, Kind};

/// The compiled BPF object (built by build.rs from ebpf/tidewatch.bpf.c).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidewatch.bpf.o"));

/// The loaded programs and the maps taken out of them.
pub struct Loaded {
    /// Owns the programs and their links: dropping it detaches everything.
    pub bpf: Ebpf,
    pub ring: RingBuf<MapData>,
    pub drops: PerCpuArray<MapData, u64>,
    pub retransmits: BpfHashMap<MapData, u64, [u8; wire::RETRANS_SIZE]>,
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

/// Load the programs, configure their filters, attach what `resolved`
/// turns on, and take the maps.
pub fn load(resolved: &Resolved) -> Result<Loaded, CollectorError> {
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
    Ok(Loaded {
        bpf,
        ring,
        drops,
        retransmits,
    })
}
