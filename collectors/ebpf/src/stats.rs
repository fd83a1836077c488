//! The collector's own counters, and how they reach `/metrics`: a
//! collector on the runtime's registry reads them (and the kernel's drop
//! map) at every scrape, so they carry the same `tidewatch_` prefix and
//! `component="collector-ebpf"` label as the runtime's metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

use crate::kernel_drops::read_drops;
use crate::wire::Kind;

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

/// [`Stats`] and the kernel's drop counters as Prometheus metrics.
pub struct Exposition {
    pub stats: Arc<Stats>,
    pub kernel: Arc<Mutex<PerCpuArray<MapData, u64>>>,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ebpf metrics")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeCpu {
    r#type: &'static str,
    cpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Type {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let kernel = read_drops(&self.kernel);
        let counter = |v: u64| ConstCounter::new(v);
        {
            let mut family = encoder.encode_descriptor(
                "ebpf_kernel_drops",
                "Ring buffer reservations that failed in the kernel (events lost), per type and CPU",
                None,
                counter(0).metric_type(),
            )?;
            for (cpu, per_kind) in kernel.iter().enumerate() {
                for kind in Kind::ALL {
                    let labels = TypeCpu {
                        r#type: kind.name(),
                        cpu: cpu.to_string(),
                    };
                    counter(per_kind[kind as usize]).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        for (name, help, values) in [
            (
                "ebpf_events_read",
                "Records read from the kernel, per type",
                &self.stats.read,
            ),
            (
                "ebpf_events_published",
                "Events the stream acknowledged, per type",
                &self.stats.published,
            ),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, None, counter(0).metric_type())?;
            for kind in Kind::ALL {
                let labels = Type {
                    r#type: kind.name(),
                };
                counter(values[kind as usize].load(Ordering::Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "ebpf_events_lost",
            "Events read from the kernel but not stored, by reason",
            None,
            counter(0).metric_type(),
        )?;
        for (reason, v) in [
            ("queue_full", &self.stats.lost_queue),
            ("publish_failed", &self.stats.lost_publish),
            ("malformed", &self.stats.malformed),
        ] {
            counter(v.load(Ordering::Relaxed)).encode(family.encode_family(&Reason { reason })?)?;
        }
        Ok(())
    }
}
