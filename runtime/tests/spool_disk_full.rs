//! The outbox with its spool on a real, small tmpfs that fills up while a
//! real nats-server is down: appends fail with ENOSPC, the outbox goes on
//! (the events it cannot keep are counted as `disk_full` drops), the
//! replay after the outage works on the full disk and frees it, the drop
//! count is reported once as a `collector.drops` event, and the count
//! survives a restart of the outbox (reported once, not lost, not twice).
//!
//! Needs root (mount); elsewhere it says it cannot run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use tidewatch_runtime::binding::nats::from_nats;
use tidewatch_runtime::metrics::{Metrics, Reason};
use tidewatch_runtime::outbox::{Delivered, Mode, Outbox, OutboxConfig, OutboxError};
use tidewatch_runtime::provision::{ProvisionOptions, provision};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::spool::{DropReason, FsyncPolicy, SpoolConfig, SpoolError};
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::{NatsServer, eventually};

const WAIT: Duration = Duration::from_secs(30);
const TMPFS_BYTES: u64 = 256 * 1024;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Result<Tmpfs, String> {
        tidewatch_testkit::skip::require_root("mounting a tmpfs")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map_err(|e| format!("mount: {e}"))?;
        if !status.success() {
            return Err(format!("mount -t tmpfs failed: {status}"));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn event(i: usize) -> Event {
    EventBuilderV10::new()
        .id(format!("full-{i:05}"))
        .source("/tidewatch/full-test/node-1")
        .ty("test.full")
        .data("application/octet-stream", vec![b'x'; 1000])
        .build()
        .expect("event")
}

fn spool_config() -> SpoolConfig {
    // Far more than the tmpfs holds: the disk fills before the spool's bound.
    SpoolConfig {
        max_bytes: 64 << 20,
        segment_bytes: 32 * 1024,
        fsync: FsyncPolicy::Interval(Duration::from_millis(200)),
    }
}

async fn open(client: &async_nats::Client, dir: &Path) -> Outbox {
    // A dropped outbox releases its spool lock once its tasks end.
    eventually("the spool to open", WAIT, || async {
        let publisher = Publisher::new(
            client.clone(),
            PublisherConfig::default()
                .ack_timeout(Duration::from_millis(500))
                .max_attempts(2),
            Metrics::new("full-test"),
        );
        Outbox::open(
            publisher,
            OutboxConfig::default()
                .spool_dir(dir)
                .spool(spool_config())
                .retry_interval(Duration::from_millis(100))
                .component("full-test")
                .node("node-1"),
        )
        .ok()
    })
    .await
}

/// Send events `range` while NATS is down: how many were spooled and how
/// many dropped for a full disk (anything else fails the test).
async fn send_all(outbox: &Outbox, range: std::ops::Range<usize>) -> (u64, u64) {
    let subject = subjects::raw("full-test", "node-1");
    let (mut spooled, mut dropped) = (0, 0);
    for i in range {
        let receipt = outbox.send(subject.clone(), &event(i)).await.expect("send");
        match receipt.await {
            Ok(Delivered::Spooled) => spooled += 1,
            Err(OutboxError::Dropped {
                reason: DropReason::DiskFull,
                source: SpoolError::Dropped { .. },
                ..
            }) => dropped += 1,
            other => panic!("event {i}: {other:?}"),
        }
    }
    (spooled, dropped)
}

/// The drops reports in RAW, oldest first.
async fn reports(client: &async_nats::Client) -> Vec<tidewatch_proto::v1::CollectorDrops> {
    use futures::StreamExt;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(topology::RAW.name).await.expect("raw");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut out = Vec::new();
    let mut messages = consumer
        .fetch()
        .max_messages(10_000)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    while let Some(Ok(message)) = messages.next().await {
        let event = from_nats(message.headers.as_ref(), &message.payload).expect("event");
        if event.ty() == topology::types::COLLECTOR_DROPS {
            out.push(tidewatch_runtime::event::payload(&event).expect("CollectorDrops"));
        }
    }
    out
}

fn disk_full_total(report: &tidewatch_proto::v1::CollectorDrops) -> (u64, u64) {
    let count = report
        .counts
        .iter()
        .find(|c| c.stage == "spool" && c.kind == "disk_full")
        .expect("a disk_full count");
    (count.total, count.delta)
}

async fn outage(server: &mut NatsServer, client: &async_nats::Client) {
    server.kill().await;
    eventually("the client to notice the outage", WAIT, || async {
        (client.connection_state() != async_nats::connection::State::Connected).then_some(())
    })
    .await;
}

fn used_bytes(dir: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    (stat.blocks() - stat.blocks_free()) as u64 * stat.fragment_size()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_counts_and_reports_once_across_restarts() {
    let tmpfs = match Tmpfs::mount(TMPFS_BYTES) {
        Ok(t) => t,
        Err(why) => {
            tidewatch_testkit::skip::cannot_run(
                "a_full_disk_drops_counts_and_reports_once_across_restarts",
                &why,
            );
            return;
        }
    };
    let dir: PathBuf = tmpfs.path().join("spool");
    let mut server = NatsServer::start().await;
    let client = server.connect().await;
    provision(
        &jetstream::new(client.clone()),
        &[],
        &ProvisionOptions::default(),
    )
    .await
    .expect("provision");

    // 1. Outage on a disk that fills up: the outbox goes on, counting.
    let outbox = open(&client, &dir).await;
    outage(&mut server, &client).await;
    let (spooled, dropped) = send_all(&outbox, 0..400).await;
    assert!(spooled > 50, "the tmpfs holds some: {spooled}");
    assert!(dropped > 50, "400 KB do not fit in 256 KiB: {dropped}");
    assert!(
        used_bytes(tmpfs.path()) > TMPFS_BYTES - 8 * 1024,
        "the disk is full"
    );
    let stats = outbox.spool_stats();
    assert_eq!(stats.disk_full_records, dropped);
    assert_eq!(stats.pending_records, spooled);
    let disk_full = Reason {
        reason: "disk_full",
    };
    assert_eq!(
        outbox
            .metrics()
            .spool_dropped
            .get(&disk_full)
            .map(|c| c.get()),
        Some(dropped)
    );

    // 2. NATS is back: the replay runs on the full disk (commits delete
    //    segments first), everything spooled arrives, the drops are
    //    reported once, and the disk has room again.
    server.restart().await;
    eventually(
        "the spool to drain and the report to arrive",
        WAIT,
        || async {
            let reports = reports(&client).await;
            (outbox.mode() == Mode::Direct && !reports.is_empty()).then_some(())
        },
    )
    .await;
    let reports1 = reports(&client).await;
    assert_eq!(reports1.len(), 1, "{reports1:?}");
    assert_eq!(disk_full_total(&reports1[0]), (dropped, dropped));
    let js = jetstream::new(client.clone());
    let stored = js
        .get_stream(topology::RAW.name)
        .await
        .expect("raw")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(stored, spooled + 1, "every spooled event and one report");
    assert!(
        used_bytes(tmpfs.path()) < TMPFS_BYTES / 2,
        "acknowledged segments deleted"
    );

    // 3. Another full outage; the outbox is dropped (a restart) before NATS
    //    is back, and opened again on the still full disk.
    outage(&mut server, &client).await;
    let (spooled2, dropped2) = send_all(&outbox, 1000..1400).await;
    assert!(dropped2 > 50, "{dropped2}");
    outbox.flush().await.expect("flush");
    drop(outbox);
    let outbox = open(&client, &dir).await;
    assert_eq!(outbox.spool_stats().pending_records, spooled2);
    server.restart().await;
    eventually("the second report to arrive", WAIT, || async {
        let reports = reports(&client).await;
        (outbox.mode() == Mode::Direct && reports.len() >= 2).then_some(())
    })
    .await;
    let reports2 = reports(&client).await;
    assert_eq!(reports2.len(), 2, "{reports2:?}");
    assert_eq!(
        disk_full_total(&reports2[1]),
        (dropped + dropped2, dropped2),
        "the count survived the restart and only the new drops are new"
    );

    // 4. Restarted again with everything reported: nothing is reported twice.
    drop(outbox);
    let outbox = open(&client, &dir).await;
    // A repeat would go out at open: watch for one over two seconds.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        assert_eq!(reports(&client).await.len(), 2, "no report repeated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outbox.mode(), Mode::Direct);
}
