//! Publishing: records from the queue become events (after the process
//! snapshot, when asked for) and go to the runtime's outbox in order; the
//! runtime's [`confirm_each`] counts what the stream stored, per kind.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tidewatch_runtime::metrics::{Metrics, Readiness};
use tidewatch_runtime::outbox::{Delivered, Outbox, OutboxError, confirm_each};
use tidewatch_runtime::topology::{self, subjects};
use tokio::sync::mpsc;

use crate::COLLECTOR;
use crate::attribution::{self, Resolver};
use crate::mapping::{Ids, to_event, wall_offset_ns};
use crate::snapshot;
use crate::stats::Stats;
use crate::wire::{Kind, Record};

/// What the publish task works with.
pub struct Publishing {
    pub outbox: Outbox,
    pub node: String,
    /// Send the process snapshot first.
    pub replay_processes: bool,
    /// ... with executable paths (needs CAP_SYS_PTRACE).
    pub replay_executables: bool,
    pub ids: Arc<Ids>,
    pub stats: Arc<Stats>,
    pub metrics: Metrics,
    /// Set once the snapshot is out and records flow.
    pub readiness: Readiness,
}

/// Publish every record from `queue` until it closes (the reader stopped).
/// While NATS is unreachable without a spool, `send` waits at the
/// publisher's in-flight bound and the reader counts what the queue cannot
/// hold: the kernel side never blocks.
pub async fn publish_all(publishing: Publishing, mut queue: mpsc::Receiver<Record>) {
    let Publishing {
        outbox,
        node,
        replay_processes,
        replay_executables,
        ids,
        stats,
        metrics,
        readiness,
    } = publishing;
    let subject = subjects::raw(COLLECTOR, &node);
    let source = topology::source(COLLECTOR, &node);
    let event_subject = format!("node/{node}");
    let counted = stats.clone();
    // Spooled events are counted as published once replayed
    // (tidewatch_spool_replayed_total), not here.
    let (confirm, confirmer) = confirm_each(move |kind: Kind, result| match result {
        Ok(Delivered::Stored(_)) => {
            counted.published[kind as usize].fetch_add(1, Ordering::Relaxed);
        }
        Ok(Delivered::Spooled) => {}
        // Counted and reported by the outbox (spool stage, disk_full/io_error).
        Err(OutboxError::Dropped { .. }) => {}
        Err(e) => {
            counted.lost_publish.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "event lost: not stored by the stream");
        }
    });
    let mut resolver = Resolver::new(attribution::cgroup2_root());
    resolver.rescan();

    if replay_processes {
        snapshot::replay(
            replay_executables,
            &node,
            &ids,
            &outbox,
            snapshot::Addressed {
                subject: &subject,
                source: &source,
                event_subject: &event_subject,
            },
            &stats,
        )
        .await;
    }
    readiness.set(true);

    let mut offset = wall_offset_ns();
    let mut since_offset = 0u32;
    while let Some(record) = queue.recv().await {
        // The wall clock may be stepped: re-read the offset now and then.
        since_offset += 1;
        if since_offset >= 10_000 {
            offset = wall_offset_ns();
            since_offset = 0;
        }
        let id = ids.record(&record.header);
        let event = match to_event(&record, id, &source, &event_subject, offset, &mut resolver) {
            Ok(e) => e,
            Err(e) => {
                metrics.refuse("malformed");
                tracing::warn!(error = %e, "cannot build event");
                continue;
            }
        };
        match outbox.send(subject.as_str(), &event).await {
            Ok(receipt) => {
                let _ = confirm.send((record.kind, receipt));
            }
            Err(e) => {
                stats.lost_publish.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "event refused");
            }
        }
    }
    drop(confirm);
    let _ = confirmer.await;
}
