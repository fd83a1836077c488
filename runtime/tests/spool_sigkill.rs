//! A process killed with SIGKILL while spooling loses nothing `append`
//! returned `Ok` for (under `FsyncPolicy::EveryRecord`), and a torn last
//! record is skipped on reopen.
//!
//! The test binary runs itself as the child: with `SPOOL_SIGKILL_CHILD`
//! set, the test appends records forever, printing each id once `append`
//! returned; the parent kills it mid-stream.
#![allow(clippy::unwrap_used)]

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::Bytes;
use tidewatch_runtime::message::Record;
use tidewatch_runtime::spool::{FsyncPolicy, Spool, SpoolConfig};

const CHILD_ENV: &str = "SPOOL_SIGKILL_CHILD";

fn config() -> SpoolConfig {
    SpoolConfig {
        max_bytes: 64 * 1024 * 1024,
        segment_bytes: 4096,
        fsync: FsyncPolicy::EveryRecord,
    }
}

fn record(n: u64) -> Record {
    Record {
        subject: "tidewatch.events.node".into(),
        msg_id: format!("evt-{n}"),
        headers: vec![("ce-id".into(), format!("evt-{n}"))],
        payload: Bytes::from(vec![(n % 251) as u8; 100 + (n % 300) as usize]),
    }
}

fn newest_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

fn child(dir: &str) {
    let mut spool = Spool::open(dir, config()).unwrap();
    let mut out = std::io::stdout().lock();
    for n in 0..1_000_000u64 {
        spool.append(&record(n)).unwrap();
        writeln!(out, "acked {n}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_loses_nothing_acknowledged() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_loses_nothing_acknowledged",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("acked ") {
            acked.push(n.parse::<u64>().unwrap());
            if acked.len() >= 300 {
                break;
            }
        }
    }
    proc.kill().unwrap(); // SIGKILL
    proc.wait().unwrap();
    // Ids printed before the kill are acknowledged too.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(n) = line.strip_prefix("acked ") {
            acked.push(n.parse::<u64>().unwrap());
        }
    }
    let last_acked = *acked.last().unwrap();
    assert!(last_acked >= 299);

    // A kill mid-write: a frame header announcing a 1000-byte body, and
    // only part of the body, after the last whole record.
    let mut torn = 1000u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xAB; 4 + 1000]);
    OpenOptions::new()
        .append(true)
        .open(newest_segment(dir.path()))
        .unwrap()
        .write_all(&torn[..torn.len() / 2])
        .unwrap();

    let mut spool = Spool::open(dir.path(), config()).unwrap();
    assert!(spool.stats().corrupt_bytes >= (torn.len() / 2) as u64);
    let mut replayed = Vec::new();
    while let Some((_, r)) = spool.next().unwrap() {
        replayed.push(r);
    }
    // Everything acknowledged, in order, unchanged; at most one more record
    // (written, killed before it printed).
    assert!(replayed.len() as u64 > last_acked);
    assert!(replayed.len() as u64 <= last_acked + 2);
    for (n, r) in replayed.iter().enumerate() {
        assert_eq!(r, &record(n as u64));
    }

    // Appends go on after the skipped torn record.
    let next = replayed.len() as u64;
    spool.append(&record(next)).unwrap();
    drop(spool);
    let mut spool = Spool::open(dir.path(), config()).unwrap();
    let mut ids = Vec::new();
    while let Some((_, r)) = spool.next().unwrap() {
        ids.push(r.msg_id);
    }
    let expected: Vec<String> = (0..=next).map(|n| format!("evt-{n}")).collect();
    assert_eq!(ids, expected);
}
