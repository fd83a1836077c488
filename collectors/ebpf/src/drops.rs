//! Drop reports: every `drops_interval`, what was lost (kernel ring
//! reservations per CPU and kind, the full queue, failed publishes) as a
//! `collector.drops` event, through the runtime's [`drops`] tally.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, PerCpuArray};
use tidewatch_runtime::drops::{self, Tally, Total};
use tidewatch_runtime::outbox::Outbox;
use tidewatch_runtime::topology::subjects;
use tokio::sync::watch;

use crate::kernel_drops::read_drops;
use crate::mapping::Ids;
use crate::stats::Stats;
use crate::wire::Kind;
use crate::{COLLECTOR, COLLECTOR_DROPS};

/// What the collector can lose events to, read at every report.
#[derive(Clone)]
pub struct Sources {
    pub kernel: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    pub stats: Arc<Stats>,
}

impl Sources {
    /// Every drop counter now: kernel per CPU and kind, then the queue and
    /// failed publishes.
    fn totals(&self) -> Vec<Total> {
        let mut totals = Vec::new();
        for (cpu, per_kind) in read_drops(&self.kernel).iter().enumerate() {
            for kind in Kind::ALL {
                totals.push(Total {
                    stage: "kernel",
                    kind: kind.name().into(),
                    cpu: cpu as u32,
                    total: per_kind[kind as usize],
                });
            }
        }
        for (stage, counter) in [
            ("queue", &self.stats.lost_queue),
            ("publish", &self.stats.lost_publish),
        ] {
            totals.push(Total {
                stage,
                kind: String::new(),
                cpu: 0,
                total: counter.load(Ordering::Relaxed),
            });
        }
        totals
    }
}

/// Every `interval` until `stop`, report what was lost since the last
/// report that reached the stream (or the spool).
pub async fn report_drops(
    sources: Sources,
    outbox: Outbox,
    node: String,
    interval: std::time::Duration,
    ids: Arc<Ids>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tally = Tally::default();
    let mut n: u64 = 0;
    let subject = subjects::raw(COLLECTOR, &node);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(report) = tally.report(&node, sources.totals()) else {
            continue;
        };
        n += 1;
        let event = match drops::event(ids.other("drops", n), COLLECTOR, &node, &report) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the drops event");
                continue;
            }
        };
        tracing::warn!(
            lost = report.delta,
            "events were lost; reporting {COLLECTOR_DROPS}"
        );
        let kept = match outbox.send(subject.as_str(), &event).await {
            Ok(receipt) => receipt.await.map(drop),
            Err(e) => Err(e),
        };
        match kept {
            Ok(()) => tally.reported(&report),
            Err(e) => tracing::warn!(error = %e, "drops event not stored; will report again"),
        }
    }
}
