//! Ring drain: read the BPF ring buffer (woken by the kernel once a batch
//! waits, else on a timer) and the retransmits map into the bounded queue
//! to the publisher. Never waits on the queue: a full queue counts the
//! record as lost, so the kernel side never blocks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::stats::Stats;
use crate::wire::{self, Record};

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

/// Drain the ring until `stop`, then drain what the kernel already wrote.
pub async fn read_ring(
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

/// Every `interval`, move the aggregated retransmits into the queue.
pub async fn drain_retransmits(
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
