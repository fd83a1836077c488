//! Process snapshot: at start, every running process (from `/proc`) as a
//! `process.exists` event, so consumers know what ran before the collector.

use std::path::Path;
use std::sync::atomic::Ordering;

use tidewatch_proto::v1;
use tidewatch_runtime::event::new_event;
use tidewatch_runtime::outbox::Outbox;
use tidewatch_runtime::topology::types;

use crate::attribution;
use crate::mapping::Ids;
use crate::procfs;
use crate::stats::Stats;

/// Where replayed events go: the NATS subject, the CloudEvent source and subject.
pub struct Addressed<'a> {
    pub subject: &'a str,
    pub source: &'a str,
    pub event_subject: &'a str,
}

/// Send every running process and wait until each is kept; `executables`:
/// with their `/proc/<pid>/exe` (needs CAP_SYS_PTRACE).
pub async fn replay(
    executables: bool,
    node: &str,
    ids: &Ids,
    outbox: &Outbox,
    to: Addressed<'_>,
    stats: &Stats,
) {
    let Addressed {
        subject,
        source,
        event_subject,
    } = to;
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
    for p in procfs::processes(Path::new("/proc"), executables) {
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
        match outbox.send(subject, &event).await {
            Ok(c) => confirmations.push(c),
            Err(e) => tracing::warn!(error = %e, pid = p.pid, "process.exists refused"),
        }
    }
    let n = confirmations.len();
    for c in confirmations {
        // Stored, or spooled for replay: kept either way.
        if c.await.is_ok() {
            stats.replayed.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.lost_publish.fetch_add(1, Ordering::Relaxed);
        }
    }
    tracing::info!(processes = n, %node, "replayed running processes as process.exists");
}
