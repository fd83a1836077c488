#![allow(clippy::unwrap_used)] // test code: a failed step is the test failing
//! Model-checks the outage spool against an in-memory queue: random
//! sequences of append / replay (with and without commit) / crash (drop
//! without flush, torn or truncated tail) / reopen.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Action, Cursor, FsyncPolicy, SegmentMeta, Spool, SpoolConfig, plan_append};
use crate::message::Record;
use bytes::Bytes;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append {
        size: usize,
    },
    Replay {
        n: usize,
        commit: bool,
        rewind: bool,
    },
    /// Drop without flush, then damage the newest segment's tail.
    Crash {
        tail: Tail,
    },
    Reopen,
}

#[derive(Debug, Clone)]
enum Tail {
    /// Nothing (a plain SIGKILL between writes).
    Intact,
    /// A kill mid-write: the first `frac` of the next frame made it.
    TornFrame { frac: u8 },
    /// Random bytes after the last record.
    Garbage { bytes: Vec<u8> },
    /// A machine crash: cut anywhere past what was fsynced.
    Truncate { frac: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..120).prop_map(|size| Op::Append { size }),
        3 => (0usize..8, any::<bool>(), any::<bool>())
            .prop_map(|(n, commit, rewind)| Op::Replay { n, commit, rewind }),
        1 => prop_oneof![
            Just(Tail::Intact),
            any::<u8>().prop_map(|frac| Tail::TornFrame { frac }),
            proptest::collection::vec(any::<u8>(), 1..40).prop_map(|bytes| Tail::Garbage { bytes }),
            any::<u8>().prop_map(|frac| Tail::Truncate { frac }),
        ]
        .prop_map(|tail| Op::Crash { tail }),
        1 => Just(Op::Reopen),
    ]
}

fn policy() -> impl Strategy<Value = FsyncPolicy> {
    prop_oneof![
        Just(FsyncPolicy::EveryRecord),
        Just(FsyncPolicy::Never),
        Just(FsyncPolicy::Interval(Duration::from_millis(1))),
        Just(FsyncPolicy::Interval(Duration::from_secs(3600))),
    ]
}

fn record(n: u64, size: usize) -> Record {
    Record {
        subject: format!("tidewatch.events.{}", n % 5),
        msg_id: format!("evt-{n}"),
        headers: vec![
            ("ce-id".into(), format!("evt-{n}")),
            ("Nats-Msg-Id".into(), format!("evt-{n}")),
        ],
        payload: Bytes::from((0..size).map(|i| (i as u64 ^ n) as u8).collect::<Vec<u8>>()),
    }
}

fn newest_segment(dir: &Path) -> Option<PathBuf> {
    let mut segs: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let id = path
                .file_name()?
                .to_str()?
                .strip_suffix(".seg")?
                .parse()
                .ok()?;
            Some((id, path))
        })
        .collect();
    segs.sort();
    segs.pop().map(|(_, p)| p)
}

/// The model: records not yet acknowledged, oldest first, with where the
/// spool said they end; and how far the replay has read.
struct Model {
    pending: Vec<(Cursor, Record)>,
    read: usize,
    dropped: u64,
}

fn run(ops: Vec<Op>, policy: FsyncPolicy, max_frames: u64, seg_frames: u64) {
    let dir = tempfile::tempdir().unwrap();
    // Frames are about 100..230 bytes here.
    let config = SpoolConfig {
        max_bytes: max_frames * 300,
        segment_bytes: seg_frames * 300,
        fsync: policy,
    };
    let mut spool = Some(Spool::open(dir.path(), config.clone()).unwrap());
    let mut model = Model {
        pending: Vec::new(),
        read: 0,
        dropped: 0,
    };
    let mut next_id = 0u64;
    for op in ops {
        let s = match spool.as_mut() {
            Some(s) => s,
            None => {
                // Crashed: the only way on is opening again.
                spool = Some(Spool::open(dir.path(), config.clone()).unwrap());
                model.read = 0;
                model.dropped = 0;
                spool.as_mut().unwrap()
            }
        };
        match op {
            Op::Append { size } => {
                let r = record(next_id, size);
                next_id += 1;
                let before = s.stats().dropped_records;
                let cursor = s.append(&r).unwrap();
                let delta = s.stats().dropped_records - before;
                // Overflow drops the oldest unacknowledged records, counted.
                assert!(delta as usize <= model.pending.len());
                model.pending.drain(..delta as usize);
                model.read = model.read.saturating_sub(delta as usize);
                model.dropped += delta;
                if let Some((last, _)) = model.pending.last() {
                    assert!(*last < cursor, "cursors must increase");
                }
                model.pending.push((cursor, r));
                let stats = s.stats();
                assert!(stats.bytes <= config.max_bytes, "{stats:?}");
                assert_eq!(
                    stats.pending_records,
                    model.pending.len() as u64,
                    "{stats:?} {:?}",
                    model
                        .pending
                        .iter()
                        .map(|(c, r)| (c, &r.msg_id))
                        .collect::<Vec<_>>()
                );
                assert_eq!(stats.dropped_records, model.dropped);
            }
            Op::Replay { n, commit, rewind } => {
                if rewind {
                    s.rewind();
                    model.read = 0;
                }
                let mut last = None;
                for _ in 0..n {
                    let peeked = s.peek().unwrap();
                    let got = s.next().unwrap();
                    assert_eq!(peeked, got, "peek and next disagree");
                    match (got, model.pending.get(model.read)) {
                        (None, None) => break,
                        (Some((c, r)), Some((mc, mr))) => {
                            assert_eq!(&r, mr, "replayed out of order or corrupted");
                            assert_eq!(&c, mc);
                            model.read += 1;
                            last = Some(c);
                        }
                        (got, want) => panic!("replayed {got:?}, model expects {want:?}"),
                    }
                }
                if commit && let Some(c) = last {
                    s.commit(c).unwrap();
                    model.pending.drain(..model.read);
                    model.read = 0;
                    assert_eq!(s.stats().pending_records, model.pending.len() as u64);
                }
            }
            Op::Crash { tail } => {
                let durable = s.durable();
                drop(spool.take());
                let Some(path) = newest_segment(dir.path()) else {
                    continue;
                };
                let len = fs::metadata(&path).unwrap().len();
                match tail {
                    Tail::Intact => {}
                    Tail::TornFrame { frac } => {
                        let frame = record(u64::MAX, 50).framed();
                        let cut = (frame.len() - 1) * frac as usize / 255;
                        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                        f.write_all(&frame[..cut.max(1)]).unwrap();
                    }
                    Tail::Garbage { bytes } => {
                        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                        f.write_all(&bytes).unwrap();
                    }
                    Tail::Truncate { frac } => {
                        // Only what was not fsynced can be lost.
                        let seg_id: u64 = path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .and_then(|n| n.strip_suffix(".seg"))
                            .and_then(|n| n.parse().ok())
                            .unwrap();
                        let floor = if durable.segment == seg_id {
                            durable.offset.min(len)
                        } else {
                            len
                        };
                        let cut = floor + (len - floor) * frac as u64 / 255;
                        if policy == FsyncPolicy::EveryRecord {
                            assert_eq!(floor, len, "EveryRecord left unsynced bytes");
                        }
                        OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .unwrap()
                            .set_len(cut)
                            .unwrap();
                        // Records past the cut are lost (they were not durable).
                        model
                            .pending
                            .retain(|(c, _)| c.segment != seg_id || c.offset <= cut);
                    }
                }
                model.read = 0;
            }
            Op::Reopen => {
                drop(spool.take());
                spool = Some(Spool::open(dir.path(), config.clone()).unwrap());
                model.read = 0;
                model.dropped = 0;
            }
        }
    }
    // Finally: reopen and replay everything that is left, exactly.
    drop(spool.take());
    let mut s = Spool::open(dir.path(), config).unwrap();
    let mut replayed = Vec::new();
    while let Some(item) = s.next().unwrap() {
        replayed.push(item);
    }
    assert_eq!(replayed, model.pending);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn spool_matches_model(
        ops in proptest::collection::vec(op(), 1..120),
        policy in policy(),
        max_frames in 2u64..12,
        seg_frames in 1u64..4,
    ) {
        run(ops, policy, max_frames.max(seg_frames), seg_frames);
    }

    /// Whatever bytes follow the last whole record, opening and replaying
    /// never panics and never yields anything but the whole records.
    #[test]
    fn arbitrary_tail_bytes_never_break_the_reader(
        sizes in proptest::collection::vec(0usize..100, 0..10),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { max_bytes: 1 << 20, segment_bytes: 1 << 16, fsync: FsyncPolicy::EveryRecord };
        let mut s = Spool::open(dir.path(), config.clone()).unwrap();
        let records: Vec<Record> = sizes.iter().enumerate().map(|(i, &n)| record(i as u64, n)).collect();
        for r in &records {
            s.append(r).unwrap();
        }
        drop(s);
        let path = newest_segment(dir.path()).unwrap();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&tail).unwrap();
        let mut s = Spool::open(dir.path(), config).unwrap();
        let mut got = Vec::new();
        while let Some((_, r)) = s.next().unwrap() {
            got.push(r);
        }
        // Random tail bytes could only form a record by matching a CRC32
        // and the record layout; the records themselves always come back.
        prop_assert!(got.len() >= records.len());
        prop_assert_eq!(&got[..records.len()], &records[..]);
    }

    /// The pure append plan: after carrying it out the spool is within
    /// `max_bytes`, no segment passes `segment_bytes`, and it drops a
    /// segment only when keeping it would pass `max_bytes`.
    #[test]
    fn plan_append_respects_bounds(
        sizes in proptest::collection::vec(0u64..=100, 0..12),
        frame_len in 1u64..=100,
        max_segs in 1u64..8,
    ) {
        let config = SpoolConfig { max_bytes: 100 * max_segs, segment_bytes: 100, fsync: FsyncPolicy::Never };
        // A reachable layout: the newest `max_segs` segments of `sizes`.
        let keep = sizes.len().saturating_sub(max_segs as usize);
        let segments: Vec<SegmentMeta> = sizes[keep..]
            .iter()
            .enumerate()
            .map(|(i, &bytes)| SegmentMeta { id: i as u64 + 1, bytes, ends: vec![] })
            .collect();
        let plan = plan_append(&segments, frame_len, &config);
        prop_assert_eq!(plan.last(), Some(&Action::Write));
        let mut sizes: Vec<u64> = segments.iter().map(|s| s.bytes).collect();
        let mut dropped = 0;
        for action in &plan {
            match action {
                Action::Roll { id } => {
                    prop_assert_eq!(*id, segments.last().map_or(0, |s| s.id) + 1);
                    sizes.push(0);
                }
                Action::DropOldest => {
                    // Only when what is left would not fit otherwise.
                    prop_assert!(sizes.iter().sum::<u64>() + frame_len > config.max_bytes);
                    prop_assert!(sizes.len() > 1);
                    sizes.remove(0);
                    dropped += 1;
                }
                Action::Write => {
                    let Some(active) = sizes.last_mut() else {
                        return Err(TestCaseError::fail("write without a segment"));
                    };
                    *active += frame_len;
                }
            }
        }
        prop_assert!(sizes.iter().sum::<u64>() <= config.max_bytes);
        prop_assert!(sizes.iter().all(|&s| s <= config.segment_bytes));
        prop_assert!(dropped <= segments.len());
    }
}
