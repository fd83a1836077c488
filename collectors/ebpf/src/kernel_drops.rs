//! The kernel's drop counters: a per-CPU array of how many ring
//! reservations failed, per event kind. Read by the drop reports and by
//! `/metrics`.

use std::sync::Mutex;

use aya::maps::{MapData, PerCpuArray};

use crate::wire::Kind;

/// Per-CPU, per-kind kernel drop counters (`[cpu][kind]`).
pub type KernelDrops = Vec<[u64; Kind::COUNT]>;

/// The kernel's drop counters now.
pub fn read_drops(drops: &Mutex<PerCpuArray<MapData, u64>>) -> KernelDrops {
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
