//! Bounded on-disk outage spool: where a collector puts encoded messages
//! while NATS is unreachable, replayed in order once it is back.
//!
//! # Layout
//!
//! A spool is a directory of segment files `00000001.seg`, `00000002.seg`...
//! (ids increase; the highest is the one being appended to) and an `ack`
//! file holding the position up to which the stream acknowledged replayed
//! records. A segment is a sequence of frames:
//!
//! ```text
//! [len: u32 LE][crc32(body): u32 LE][body: len bytes]
//! ```
//!
//! The body is a [`Record`](crate::message::Record): subject, `Nats-Msg-Id`, NATS headers and
//! payload, exactly what [`Publisher::send_raw`](crate::publisher::Publisher::send_raw)
//! needs, so a replay keeps the event's msg id and the stream deduplicates
//! anything that was published twice.
//!
//! One process owns a spool directory at a time: [`Spool::open`] takes an
//! exclusive `flock` on `<dir>/lock` (released when the process dies, so a
//! SIGKILLed collector's successor opens it at once) and refuses a second
//! owner with [`SpoolError::Locked`].
//!
//! # Crash safety
//!
//! Every append is one `write` of a whole frame straight to the file (no
//! user-space buffer), so a process crash (SIGKILL, panic, OOM kill) loses
//! nothing `append` returned `Ok` for: the bytes are in the kernel's page
//! cache. What a *machine* crash (power loss, kernel panic) can lose
//! depends on the [`FsyncPolicy`]:
//!
//! - [`FsyncPolicy::EveryRecord`]: nothing that `append` returned `Ok` for.
//! - [`FsyncPolicy::Interval`] (the default, 200 ms): the records appended
//!   since the last fsync, i.e. at most one interval's worth (the fsync is
//!   done by the first append after the interval has elapsed, by
//!   [`Spool::sync`], and when a segment is rolled).
//! - [`FsyncPolicy::Never`]: whatever the OS had not written back yet.
//!
//! A crash in the middle of a write leaves a torn last record; opening the
//! spool detects it (short frame, CRC mismatch, or a length over the
//! segment size, refused before anything is read for it), counts its bytes as
//! corrupt, and truncates it away so appends go on after the last whole
//! record. A bad frame inside an older segment (disk corruption) ends the
//! replay of that segment: the rest of it is counted as corrupt and skipped;
//! the reader never panics and never returns a corrupted record.
//!
//! # Bounds and overflow
//!
//! The spool never holds more than [`SpoolConfig::max_bytes`]. When an
//! append would pass it, the oldest whole segment is deleted (drop oldest),
//! and its not yet acknowledged records are counted in
//! [`SpoolStats::dropped_records`] / [`SpoolStats::dropped_bytes`], for the
//! caller to put on `/metrics` and report as an event once NATS is back.
//!
//! # A full disk
//!
//! The file system can fill up before `max_bytes` (a small volume, or
//! other writers). An append that fails then (ENOSPC on the write, on a
//! segment roll, or any other I/O error) keeps nothing of the record and
//! returns [`SpoolError::Dropped`]: the record is lost, and counted. The
//! spool stays usable; appends work again once there is space (a replay
//! deleting acknowledged segments frees it). The newest record is the one
//! dropped, not the oldest: deleting spooled events to make room would
//! hand the space to whatever else is filling the disk.
//!
//! Every loss (overflow or a failed append) is counted in the drop
//! [`ledger`] (`<dir>/drops`), with what was already reported, so the
//! count survives restarts until a report carries it; the ledger is
//! written in place in a file created at full size at open, so a full
//! disk cannot stop it.
//!
//! # Replay
//!
//! [`Spool::next`] returns records oldest first, each with a [`Cursor`];
//! [`Spool::commit`] records that the stream acknowledged everything up to
//! and including a cursor (deleting segments that are wholly acknowledged).
//! Records are removed only by `commit` (or overflow): a reader that fails
//! or crashes before committing gets them again ([`Spool::rewind`], or the
//! next [`Spool::open`]), which is harmless since their msg ids are the same.
//!
//! The pure decisions (how to frame and decode bytes, what an append must
//! do first: roll, drop oldest, write) are separate functions over plain
//! data (`plan_append`, `decode_frame`); [`Spool`] only carries them out.
//! Their model check (random appends, replays, crashes and torn tails
//! against an in-memory queue) is `model_tests.rs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::message::Record;

pub mod ledger;

use ledger::LedgerFile;
pub use ledger::{DropReason, Ledger, Unreported};

/// Bytes of a frame's header: length and CRC32.
const FRAME_HEADER: usize = 8;
const SEGMENT_SUFFIX: &str = ".seg";
const ACK_FILE: &str = "ack";
const ACK_TMP: &str = "ack.tmp";
const LOCK_FILE: &str = "lock";

/// When the spool calls `fsync` (see the module docs for what a crash can lose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every append, before it returns: nothing acknowledged is lost.
    EveryRecord,
    /// On the first append after this much time since the last fsync, and
    /// on every segment roll.
    Interval(Duration),
    /// Never; the OS writes back when it likes.
    Never,
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Upper bound of all segment files together.
    pub max_bytes: u64,
    /// A segment is rolled (closed, a new one started) before it would
    /// pass this size. Also the largest record (frame) accepted.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: 256 * 1024 * 1024,
            segment_bytes: 8 * 1024 * 1024,
            fsync: FsyncPolicy::Interval(Duration::from_millis(200)),
        }
    }
}

/// What went wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Retryable: a file operation failed (disk full, permissions fixed
    /// later...). A failed append wrote nothing that a reader will see.
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Terminal: the record is larger than a segment; it was not spooled.
    #[error("record {msg_id} is {size} bytes framed, over the {limit}-byte segment size")]
    TooLarge {
        msg_id: String,
        size: u64,
        limit: u64,
    },
    /// Terminal: another live process holds this spool directory (two
    /// collectors must never share one: their replays would interleave).
    #[error(
        "spool {dir} is in use by another process (each collector instance needs its own spool directory)"
    )]
    Locked { dir: PathBuf },
    /// Terminal for this record: appending it failed (disk full, I/O
    /// error), nothing of it was kept, and it is counted in the drop ledger
    /// under `reason`. The spool itself stays usable: later appends work
    /// once the cause is gone.
    #[error("spool {path}: {source}: record {msg_id} dropped ({})", reason.as_str())]
    Dropped {
        msg_id: String,
        reason: DropReason,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Terminal: the configuration cannot work (e.g. a segment larger
    /// than the whole spool, or too small for one frame header).
    #[error("invalid spool configuration: {0}")]
    Config(String),
}

impl SpoolError {
    /// Whether trying the same operation later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SpoolError::Io { .. })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// CRC-32 (IEEE 802.3, as zlib and gzip compute it).
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// A record's whole frame (header plus body), built in one buffer.
pub(crate) fn frame_record(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + record.body_len());
    out.extend_from_slice(&[0; FRAME_HEADER]);
    record.encode_into(&mut out);
    let len = (out.len() - FRAME_HEADER) as u32;
    let crc = crc32(&out[FRAME_HEADER..]);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Frame a body: length, CRC32, body.
#[cfg(test)]
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// What the bytes at a position hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A whole, checksummed record, `len` bytes long including the header.
    Record { record: Record, len: usize },
    /// Fewer bytes than the frame claims (or than a header): a torn write.
    Torn,
    /// The checksum or the body does not match: corruption.
    Corrupt,
}

/// The body length a frame header declares, if a frame of that length fits
/// in `max_frame` bytes (the configured segment size: `append` refuses
/// anything longer). Checked before anything is read or allocated for the
/// body, so a corrupt length of up to 4 GiB costs nothing.
fn declared_len(header: &[u8; FRAME_HEADER], max_frame: u64) -> Option<usize> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    (FRAME_HEADER as u64 + u64::from(len) <= max_frame).then_some(len as usize)
}

/// Decode the frame at the start of `bytes` (`bytes` is everything up to
/// the end of the segment), allowing frames of at most `max_frame` bytes.
/// `None` at the exact end.
pub(crate) fn decode_frame(bytes: &[u8], max_frame: u64) -> Option<Frame> {
    if bytes.is_empty() {
        return None;
    }
    let Some((header, rest)) = bytes.split_first_chunk::<FRAME_HEADER>() else {
        return Some(Frame::Torn);
    };
    let Some(len) = declared_len(header, max_frame) else {
        return Some(Frame::Corrupt);
    };
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if rest.len() < len {
        return Some(Frame::Torn);
    }
    let body = &rest[..len];
    if crc32(body) != crc {
        return Some(Frame::Corrupt);
    }
    Some(match Record::decode(body) {
        Some(record) => Frame::Record {
            record,
            len: FRAME_HEADER + len,
        },
        None => Frame::Corrupt,
    })
}

/// Where a record ends: acknowledging a cursor acknowledges that record
/// and every one before it. Ordered like the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub segment: u64,
    /// Offset just past the record in its segment.
    pub offset: u64,
}

/// What the spool knows about one segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentMeta {
    pub id: u64,
    /// Bytes of whole records (the file is never longer once opened).
    pub bytes: u64,
    /// End offset of each record, in order.
    pub ends: Vec<u64>,
}

/// One step an append must take, in order, before/as writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Close the active segment (fsync per policy) and start segment `id`.
    Roll { id: u64 },
    /// Delete the oldest segment, counting its unacknowledged records.
    DropOldest,
    /// Write the frame at the end of the active segment.
    Write,
}

/// Decide what appending a frame of `frame_len` bytes takes, given the
/// current segments (oldest first, the last is active) and the bounds.
/// Pure: [`Spool::append`] carries the actions out.
pub(crate) fn plan_append(
    segments: &[SegmentMeta],
    frame_len: u64,
    config: &SpoolConfig,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut sizes: Vec<u64> = segments.iter().map(|s| s.bytes).collect();
    // Saturating: `Spool::roll` refuses an id that is not new.
    let last_id = segments.last().map_or(0, |s| s.id);
    match sizes.last() {
        None => {
            actions.push(Action::Roll {
                id: last_id.saturating_add(1),
            });
            sizes.push(0);
        }
        Some(&active) if active > 0 && active + frame_len > config.segment_bytes => {
            actions.push(Action::Roll {
                id: last_id.saturating_add(1),
            });
            sizes.push(0);
        }
        Some(_) => {}
    }
    let mut total: u64 = sizes.iter().sum();
    let mut oldest = 0;
    while total + frame_len > config.max_bytes && sizes.len() - oldest > 1 {
        total -= sizes[oldest];
        oldest += 1;
        actions.push(Action::DropOldest);
    }
    actions.push(Action::Write);
    actions
}

/// Counters and sizes, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Segment files on disk.
    pub segments: usize,
    /// Bytes on disk in segments (acknowledged records included until
    /// their segment is deleted).
    pub bytes: u64,
    /// Records not yet acknowledged by [`Spool::commit`].
    pub pending_records: u64,
    /// Records appended since open.
    pub appended: u64,
    /// Unacknowledged records deleted by the overflow policy since open.
    pub dropped_records: u64,
    /// Their bytes (frames).
    pub dropped_bytes: u64,
    /// Records an append could not keep for lack of space (ENOSPC,
    /// EDQUOT) since open.
    pub disk_full_records: u64,
    /// Records an append could not keep for another I/O error since open.
    pub io_error_records: u64,
    /// Bytes skipped as torn or corrupt since open.
    pub corrupt_bytes: u64,
}

impl SpoolStats {
    /// Records lost for `reason` since open.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Overflow => self.dropped_records,
            DropReason::DiskFull => self.disk_full_records,
            DropReason::IoError => self.io_error_records,
        }
    }
}

/// The spool. Not shared between processes: one spool directory per
/// collector instance.
pub struct Spool {
    dir: PathBuf,
    /// Exclusive `flock` on `<dir>/lock`, released when the spool is dropped
    /// or the process dies.
    _lock: nix::fcntl::Flock<File>,
    config: SpoolConfig,
    /// Oldest first; the last is the active one. Never empty after open.
    segments: Vec<SegmentMeta>,
    active: File,
    /// Everything before this is acknowledged.
    committed: Cursor,
    /// The next record `next` returns starts here.
    read: Cursor,
    reader: Option<(u64, File)>,
    last_sync: Instant,
    /// Position up to which the active segment is fsynced.
    synced: Cursor,
    stats: SpoolStats,
    /// Losses since the spool was created, and what was reported of them.
    ledger: Ledger,
    ledger_file: LedgerFile,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:08}{SEGMENT_SUFFIX}"))
}

/// Segment ids only grow; one named `u64::MAX` (never rolled to) has no successor.
fn no_next_segment(dir: &Path, id: u64) -> SpoolError {
    SpoolError::Config(format!(
        "segment {} has the last usable id, so no segment can follow it; move the spool's segments away",
        segment_path(dir, id).display()
    ))
}

impl Spool {
    /// Open (or create) the spool in `dir`, recovering from a crash: a torn
    /// or corrupt tail of the newest segment is truncated away.
    pub fn open(dir: impl AsRef<Path>, config: SpoolConfig) -> Result<Spool, SpoolError> {
        if config.segment_bytes < FRAME_HEADER as u64 + 32
            || config.segment_bytes > config.max_bytes
        {
            return Err(SpoolError::Config(format!(
                "segment_bytes {} must be at least {} and at most max_bytes {}",
                config.segment_bytes,
                FRAME_HEADER + 32,
                config.max_bytes
            )));
        }
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => SpoolError::Locked { dir: dir.clone() },
                other => SpoolError::Io {
                    path: lock_path.clone(),
                    source: io::Error::from(other),
                },
            })?;
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let ledger_path = dir.join(ledger::LEDGER_FILE);
        let (ledger_file, ledger, _) =
            LedgerFile::open(&dir, epoch).map_err(io_err(&ledger_path))?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            // Only the spool's own spelling: `1.seg` or `+1.seg` would parse to
            // an id whose file (`00000001.seg`) is another one, or none.
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|&id| segment_path(&dir, id).file_name() == Some(name.as_os_str()))
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        if ids.last() == Some(&u64::MAX) {
            return Err(no_next_segment(&dir, u64::MAX));
        }
        let mut stats = SpoolStats::default();
        let mut segments = Vec::with_capacity(ids.len().max(1));
        for (i, &id) in ids.iter().enumerate() {
            let path = segment_path(&dir, id);
            let (ends, good, size) = scan(&path, config.segment_bytes).map_err(io_err(&path))?;
            stats.corrupt_bytes += size - good;
            let last = i + 1 == ids.len();
            if last && good < size {
                // Torn tail: cut it so appends continue after the last whole record.
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                file.set_len(good).map_err(io_err(&path))?;
                file.sync_all().map_err(io_err(&path))?;
            }
            segments.push(SegmentMeta {
                id,
                bytes: good,
                ends,
            });
        }
        if segments.is_empty() {
            let path = segment_path(&dir, 1);
            File::create(&path).map_err(io_err(&path))?;
            sync_dir(&dir)?;
            segments.push(SegmentMeta {
                id: 1,
                bytes: 0,
                ends: Vec::new(),
            });
        }
        let (active_id, active_bytes) = segments.last().map(|s| (s.id, s.bytes)).unwrap_or((1, 0));
        let path = segment_path(&dir, active_id);
        let active = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let first = Cursor {
            segment: segments.first().map_or(active_id, |s| s.id),
            offset: 0,
        };
        let ack = read_ack(&dir);
        let mut committed = ack.map_or(first, |ack| ack.max(first));
        // A machine crash can lose segment bytes the ack file still points
        // past: never treat records appended from now on as acknowledged.
        if let Some(last) = segments.last()
            && committed.segment >= last.id
        {
            committed = committed.min(Cursor {
                segment: last.id,
                offset: last.bytes,
            });
        }
        if let Some(seg) = segments.iter().find(|s| s.id == committed.segment) {
            committed.offset = committed.offset.min(seg.bytes);
        }
        if ack.is_some_and(|ack| ack > committed) {
            // Rewrite it, or records appended from now on would be taken
            // as acknowledged at the next open.
            write_ack(&dir, committed, config.fsync != FsyncPolicy::Never)?;
        }
        let mut spool = Spool {
            _lock: lock,
            dir,
            config,
            segments,
            active,
            committed,
            read: committed,
            reader: None,
            last_sync: Instant::now(),
            synced: Cursor {
                segment: active_id,
                offset: active_bytes,
            },
            stats,
            ledger,
            ledger_file,
        };
        spool.delete_acknowledged()?;
        Ok(spool)
    }

    /// Append a record. Once this returns `Ok`, the record survives a crash
    /// of the process (and of the machine, under `FsyncPolicy::EveryRecord`).
    pub fn append(&mut self, record: &Record) -> Result<Cursor, SpoolError> {
        let frame = frame_record(record);
        let len = frame.len() as u64;
        if len > self.config.segment_bytes {
            return Err(SpoolError::TooLarge {
                msg_id: record.msg_id.clone(),
                size: len,
                limit: self.config.segment_bytes,
            });
        }
        match self.append_frame(&frame) {
            Ok(cursor) => {
                // The record is kept from here on (a failed fsync is an
                // `Io` error, not a drop: the reader will find the record).
                match self.config.fsync {
                    FsyncPolicy::EveryRecord => self.sync()?,
                    FsyncPolicy::Interval(every) if self.last_sync.elapsed() >= every => {
                        self.sync()?
                    }
                    _ => {}
                }
                Ok(cursor)
            }
            Err(SpoolError::Io { path, source }) => {
                // Nothing of the record is on disk: it is lost, and counted.
                let reason = DropReason::of(&source);
                match reason {
                    DropReason::DiskFull => self.stats.disk_full_records += 1,
                    _ => self.stats.io_error_records += 1,
                }
                self.count_drops(reason, 1);
                Err(SpoolError::Dropped {
                    msg_id: record.msg_id.clone(),
                    reason,
                    path,
                    source,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Carry out [`plan_append`] for one frame.
    fn append_frame(&mut self, frame: &[u8]) -> Result<Cursor, SpoolError> {
        let len = frame.len() as u64;
        for action in plan_append(&self.segments, len, &self.config) {
            match action {
                Action::Roll { id } => self.roll(id)?,
                Action::DropOldest => self.drop_oldest()?,
                Action::Write => {}
            }
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(SpoolError::Config("no active segment".into()));
        };
        let path = segment_path(&self.dir, seg.id);
        if let Err(e) = self.active.write_all(frame) {
            // Leave no partial frame behind for the reader or the next append.
            let _ = self.active.set_len(seg.bytes);
            return Err(io_err(&path)(e));
        }
        seg.bytes += len;
        seg.ends.push(seg.bytes);
        let cursor = Cursor {
            segment: seg.id,
            offset: seg.bytes,
        };
        self.stats.appended += 1;
        Ok(cursor)
    }

    /// Count `n` lost records in the ledger and write it (in place: this
    /// works on a full disk). A failed write leaves the count in memory,
    /// written with the next one.
    fn count_drops(&mut self, reason: DropReason, n: u64) {
        self.ledger.count(reason, n);
        let _ = self.ledger_file.store(&self.ledger);
    }

    /// Losses since the spool was created, and what was reported of them.
    pub fn ledger(&self) -> Ledger {
        self.ledger
    }

    /// A drops report carrying `counts` reached the stream: remember it
    /// (fsynced), so a restart does not report them again.
    pub fn reported(&mut self, counts: &[Unreported]) -> Result<(), SpoolError> {
        self.ledger.reported(counts);
        let path = self.ledger_file.path().to_path_buf();
        self.ledger_file
            .store(&self.ledger)
            .and_then(|()| self.ledger_file.sync())
            .map_err(io_err(&path))
    }

    /// fsync the active segment (and the drop ledger, if it changed) now.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        let ledger_path = self.ledger_file.path().to_path_buf();
        self.ledger_file.sync().map_err(io_err(&ledger_path))?;
        let Some(seg) = self.segments.last() else {
            return Ok(());
        };
        let path = segment_path(&self.dir, seg.id);
        self.active.sync_data().map_err(io_err(&path))?;
        self.last_sync = Instant::now();
        self.synced = Cursor {
            segment: seg.id,
            offset: seg.bytes,
        };
        Ok(())
    }

    /// Everything up to here is fsynced (survives a machine crash).
    pub fn durable(&self) -> Cursor {
        self.synced
    }

    fn roll(&mut self, id: u64) -> Result<(), SpoolError> {
        if let Some(last) = self.segments.last().map(|s| s.id)
            && (id <= last || id == u64::MAX)
        {
            return Err(no_next_segment(&self.dir, last));
        }
        if self.config.fsync != FsyncPolicy::Never && !self.segments.is_empty() {
            self.sync()?;
        }
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.set_len(0).map_err(io_err(&path))?;
        if self.config.fsync != FsyncPolicy::Never {
            sync_dir(&self.dir)?;
        }
        self.active = file;
        self.segments.push(SegmentMeta {
            id,
            bytes: 0,
            ends: Vec::new(),
        });
        self.synced = Cursor {
            segment: id,
            offset: 0,
        };
        Ok(())
    }

    fn drop_oldest(&mut self) -> Result<(), SpoolError> {
        if self.segments.len() < 2 {
            return Ok(());
        }
        let oldest = self.segments.remove(0);
        let from = if self.committed.segment == oldest.id {
            self.committed.offset
        } else if self.committed.segment > oldest.id {
            u64::MAX
        } else {
            0
        };
        let mut start = 0;
        let mut lost = 0;
        for &end in &oldest.ends {
            if start >= from {
                lost += 1;
                self.stats.dropped_bytes += end - start;
            }
            start = end;
        }
        self.stats.dropped_records += lost;
        if lost > 0 {
            self.count_drops(DropReason::Overflow, lost);
        }
        let path = segment_path(&self.dir, oldest.id);
        if self.reader.as_ref().is_some_and(|(id, _)| *id == oldest.id) {
            self.reader = None;
        }
        fs::remove_file(&path).map_err(io_err(&path))?;
        let first = self.first_cursor();
        self.committed = self.committed.max(first);
        self.read = self.read.max(first);
        Ok(())
    }

    fn first_cursor(&self) -> Cursor {
        Cursor {
            segment: self.segments.first().map_or(0, |s| s.id),
            offset: 0,
        }
    }

    /// The next record to replay and its cursor, without moving on.
    pub fn peek(&mut self) -> Result<Option<(Cursor, Record)>, SpoolError> {
        loop {
            let Some(index) = self.segments.iter().position(|s| s.id >= self.read.segment) else {
                return Ok(None);
            };
            let seg = &self.segments[index];
            if seg.id != self.read.segment {
                self.read = Cursor {
                    segment: seg.id,
                    offset: 0,
                };
            }
            if self.read.offset >= seg.bytes {
                match self.segments.get(index + 1) {
                    Some(next) => {
                        self.read = Cursor {
                            segment: next.id,
                            offset: 0,
                        };
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let (id, end) = (seg.id, seg.bytes);
            let max_frame = self.config.segment_bytes;
            let path = segment_path(&self.dir, id);
            let file = match &mut self.reader {
                Some((open, file)) if *open == id => file,
                slot => {
                    let file = File::open(&path).map_err(io_err(&path))?;
                    &mut slot.insert((id, file)).1
                }
            };
            let mut header = [0u8; FRAME_HEADER];
            let available = end - self.read.offset;
            let result = (|| -> io::Result<Option<Frame>> {
                if available < FRAME_HEADER as u64 {
                    return Ok(Some(Frame::Torn));
                }
                file.seek(SeekFrom::Start(self.read.offset))?;
                file.read_exact(&mut header)?;
                let Some(len) = declared_len(&header, max_frame) else {
                    return Ok(Some(Frame::Corrupt));
                };
                if (FRAME_HEADER + len) as u64 > available {
                    return Ok(Some(Frame::Torn));
                }
                let mut buf = vec![0u8; FRAME_HEADER + len];
                buf[..FRAME_HEADER].copy_from_slice(&header);
                file.read_exact(&mut buf[FRAME_HEADER..])?;
                Ok(decode_frame(&buf, max_frame))
            })();
            match result {
                Ok(Some(Frame::Record { record, len })) => {
                    return Ok(Some((
                        Cursor {
                            segment: id,
                            offset: self.read.offset + len as u64,
                        },
                        record,
                    )));
                }
                Ok(None) => return Ok(None),
                Ok(Some(Frame::Torn | Frame::Corrupt)) => {
                    // Corrupt inside a segment: skip the rest of it.
                    self.stats.corrupt_bytes += available;
                    self.skip_rest(index);
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // The file is shorter than we thought (truncated behind us).
                    self.stats.corrupt_bytes += available;
                    self.skip_rest(index);
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
    }

    /// Stop reading segment `index` where the reader is: what follows is
    /// not a record. The active segment is cut there, so appends go on
    /// after the last good record.
    fn skip_rest(&mut self, index: usize) {
        let at = self.read.offset;
        let seg = &mut self.segments[index];
        seg.bytes = at;
        seg.ends.retain(|&e| e <= at);
        if index + 1 == self.segments.len() {
            let _ = self.active.set_len(at);
        }
    }

    /// The next record to replay and its cursor; moves on past it.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<(Cursor, Record)>, SpoolError> {
        let next = self.peek()?;
        if let Some((cursor, _)) = &next {
            self.read = *cursor;
        }
        Ok(next)
    }

    /// Replay from the last commit again (after a failed publish).
    pub fn rewind(&mut self) {
        self.read = self.committed;
    }

    /// The stream acknowledged every record up to and including `upto`:
    /// forget them (deleting wholly acknowledged segments) and remember it
    /// across restarts (the ack file, fsynced with its directory unless the
    /// policy is [`FsyncPolicy::Never`]). Committing an older cursor than
    /// before is a no-op.
    ///
    /// On an error the commit still holds in memory (nothing is replayed
    /// twice by this process); only its record on disk is missing, which
    /// the next commit writes.
    pub fn commit(&mut self, upto: Cursor) -> Result<(), SpoolError> {
        if upto <= self.committed {
            return Ok(());
        }
        self.committed = upto;
        self.read = self.read.max(upto);
        // Segments first: a missing segment counts as acknowledged at open
        // (whatever the ack file says), and deleting frees the space the
        // ack file needs on a full disk.
        self.delete_acknowledged()?;
        write_ack(&self.dir, upto, self.config.fsync != FsyncPolicy::Never)
    }

    fn delete_acknowledged(&mut self) -> Result<(), SpoolError> {
        while self.segments.len() > 1 {
            let first = &self.segments[0];
            let done = self.committed.segment > first.id
                || (self.committed.segment == first.id && self.committed.offset >= first.bytes);
            if !done {
                break;
            }
            let oldest = self.segments.remove(0);
            if self.reader.as_ref().is_some_and(|(id, _)| *id == oldest.id) {
                self.reader = None;
            }
            let path = segment_path(&self.dir, oldest.id);
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        let first = self.first_cursor();
        self.committed = self.committed.max(first);
        self.read = self.read.max(first);
        Ok(())
    }

    /// Current counters and sizes.
    pub fn stats(&self) -> SpoolStats {
        let pending = self
            .segments
            .iter()
            .map(|s| {
                s.ends
                    .iter()
                    .filter(|&&end| {
                        Cursor {
                            segment: s.id,
                            offset: end,
                        } > self.committed
                    })
                    .count() as u64
            })
            .sum();
        SpoolStats {
            segments: self.segments.len(),
            bytes: self.segments.iter().map(|s| s.bytes).sum(),
            pending_records: pending,
            ..self.stats.clone()
        }
    }

    /// Whether every record has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.stats().pending_records == 0
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Scan a segment file: the end offsets of its whole records, how many
/// leading bytes are whole records, and the file's size. Reads one frame at
/// a time (each at most `max_frame` bytes), never the whole file.
fn scan(path: &Path, max_frame: u64) -> io::Result<(Vec<u64>, u64, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = io::BufReader::new(file);
    let mut ends = Vec::new();
    let mut at = 0u64;
    let mut frame = Vec::new();
    loop {
        let mut header = [0u8; FRAME_HEADER];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let Some(len) = declared_len(&header, max_frame) else {
            break;
        };
        if at + (FRAME_HEADER + len) as u64 > size {
            break;
        }
        frame.clear();
        frame.extend_from_slice(&header);
        frame.resize(FRAME_HEADER + len, 0);
        match reader.read_exact(&mut frame[FRAME_HEADER..]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let Some(Frame::Record { len, .. }) = decode_frame(&frame, max_frame) else {
            break;
        };
        at += len as u64;
        ends.push(at);
    }
    Ok((ends, at, size))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The ack file's bytes: segment, offset, CRC32 of both.
fn encode_ack(cursor: Cursor) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend_from_slice(&cursor.segment.to_le_bytes());
    bytes.extend_from_slice(&cursor.offset.to_le_bytes());
    let crc = crc32(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Write the ack file: to a temporary file, renamed into place, so it is
/// either the old or the new one. With `durable`, the temporary file is
/// fsynced before the rename and the directory after it: otherwise a
/// machine crash can bring back an older ack file (or, with segment
/// deletions not yet on disk, deleted segments), and their acknowledged
/// records would be replayed, possibly after the stream's 120 s duplicate
/// window. Two fsyncs per commit, and a commit is one per replay window
/// (256 records by default), not per record.
fn write_ack(dir: &Path, cursor: Cursor, durable: bool) -> Result<(), SpoolError> {
    let bytes = encode_ack(cursor);
    let tmp = dir.join(ACK_TMP);
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&bytes).map_err(io_err(&tmp))?;
    if durable {
        file.sync_all().map_err(io_err(&tmp))?;
    }
    drop(file);
    let path = dir.join(ACK_FILE);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

fn read_ack(dir: &Path) -> Option<Cursor> {
    // One byte more than an ack tells a longer (corrupt) file apart
    // without reading all of it.
    let mut bytes = Vec::with_capacity(21);
    File::open(dir.join(ACK_FILE))
        .ok()?
        .take(21)
        .read_to_end(&mut bytes)
        .ok()?;
    let bytes: [u8; 20] = bytes.try_into().ok()?;
    let (body, crc) = bytes.split_at(16);
    if crc32(body).to_le_bytes() != crc {
        return None;
    }
    let mut segment = [0u8; 8];
    let mut offset = [0u8; 8];
    segment.copy_from_slice(&body[..8]);
    offset.copy_from_slice(&body[8..]);
    Some(Cursor {
        segment: u64::from_le_bytes(segment),
        offset: u64::from_le_bytes(offset),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;
    use bytes::Bytes;

    #[test]
    fn one_spool_directory_has_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(dir.path(), SpoolConfig::default()).unwrap();
        match Spool::open(dir.path(), SpoolConfig::default()) {
            Err(e @ SpoolError::Locked { .. }) => {
                assert!(!e.is_retryable());
                assert!(e.to_string().contains("in use by another process"), "{e}");
            }
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("two owners of one spool"),
        }
        drop(first);
        Spool::open(dir.path(), SpoolConfig::default()).expect("free again once dropped");
    }

    fn record(i: usize, size: usize) -> Record {
        Record {
            subject: format!("tidewatch.test.{}", i % 3),
            msg_id: format!("id-{i:04}"),
            headers: vec![
                ("ce-id".into(), format!("id-{i:04}")),
                ("ce-type".into(), "dev.tidewatch.test".into()),
            ],
            payload: Bytes::from(vec![(i % 251) as u8; size]),
        }
    }

    fn config(max: u64, seg: u64, fsync: FsyncPolicy) -> SpoolConfig {
        SpoolConfig {
            max_bytes: max,
            segment_bytes: seg,
            fsync,
        }
    }

    fn drain(spool: &mut Spool) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some((_, r)) = spool.next().unwrap() {
            out.push(r);
        }
        out
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn record_round_trips_and_frames_detect_damage() {
        let r = record(7, 40);
        assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        let f = r.framed();
        assert_eq!(f, frame(&r.encode()));
        assert_eq!(
            decode_frame(&f, u64::MAX),
            Some(Frame::Record {
                record: r.clone(),
                len: f.len()
            })
        );
        for cut in 1..f.len() {
            assert_eq!(
                decode_frame(&f[..cut], u64::MAX),
                Some(Frame::Torn),
                "cut at {cut}"
            );
        }
        let mut flipped = f.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert_eq!(decode_frame(&flipped, u64::MAX), Some(Frame::Corrupt));
        assert_eq!(decode_frame(&[], u64::MAX), None);
    }

    #[test]
    fn record_keeps_nats_headers_and_msg_id() {
        let mut headers = HeaderMap::new();
        headers.append("ce-id", "abc");
        headers.append("Nats-Msg-Id", "abc");
        let r = Record::from_nats("s", "abc", &headers, Bytes::from_static(b"x"));
        let back = r.header_map();
        assert_eq!(back.get("ce-id").map(|v| v.as_str()), Some("abc"));
        assert_eq!(back.get("Nats-Msg-Id").map(|v| v.as_str()), Some("abc"));
        assert_eq!(r.msg_id, "abc");
    }

    #[test]
    fn plan_rolls_and_drops_oldest_within_bounds() {
        let c = config(300, 100, FsyncPolicy::Never);
        let seg = |id, bytes| SegmentMeta {
            id,
            bytes,
            ends: vec![],
        };
        assert_eq!(
            plan_append(&[], 50, &c),
            vec![Action::Roll { id: 1 }, Action::Write]
        );
        assert_eq!(plan_append(&[seg(1, 50)], 50, &c), vec![Action::Write]);
        assert_eq!(
            plan_append(&[seg(1, 60)], 50, &c),
            vec![Action::Roll { id: 2 }, Action::Write]
        );
        assert_eq!(
            plan_append(&[seg(1, 100), seg(2, 100), seg(3, 90)], 50, &c),
            vec![Action::Roll { id: 4 }, Action::DropOldest, Action::Write]
        );
    }

    #[test]
    fn appends_replay_in_order_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(1 << 20, 512, FsyncPolicy::EveryRecord);
        let mut spool = Spool::open(dir.path(), c.clone()).unwrap();
        let records: Vec<_> = (0..40).map(|i| record(i, 30)).collect();
        for r in &records {
            spool.append(r).unwrap();
        }
        assert!(spool.stats().segments > 1);
        assert_eq!(drain(&mut spool), records);
        spool.rewind();
        assert_eq!(drain(&mut spool), records);
        drop(spool);
        let mut spool = Spool::open(dir.path(), c).unwrap();
        assert_eq!(spool.stats().pending_records, 40);
        assert_eq!(drain(&mut spool), records);
    }

    #[test]
    fn commit_removes_records_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(1 << 20, 512, FsyncPolicy::EveryRecord);
        let mut spool = Spool::open(dir.path(), c.clone()).unwrap();
        let records: Vec<_> = (0..30).map(|i| record(i, 30)).collect();
        for r in &records {
            spool.append(r).unwrap();
        }
        let mut cursor = None;
        for _ in 0..20 {
            cursor = spool.next().unwrap().map(|(c, _)| c);
        }
        spool.commit(cursor.unwrap()).unwrap();
        assert_eq!(spool.stats().pending_records, 10);
        drop(spool);
        let mut spool = Spool::open(dir.path(), c).unwrap();
        assert_eq!(drain(&mut spool), records[20..]);
    }

    #[test]
    fn overflow_drops_oldest_segment_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let frame = record(0, 30).framed().len() as u64;
        let c = config(frame * 8, frame * 2, FsyncPolicy::Never);
        let mut spool = Spool::open(dir.path(), c).unwrap();
        for i in 0..20 {
            spool.append(&record(i, 30)).unwrap();
            assert!(spool.stats().bytes <= frame * 8);
        }
        let stats = spool.stats();
        assert_eq!(stats.dropped_records, 12);
        assert_eq!(stats.dropped_bytes, 12 * frame);
        let ids: Vec<_> = drain(&mut spool).into_iter().map(|r| r.msg_id).collect();
        let expected: Vec<_> = (12..20).map(|i| format!("id-{i:04}")).collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn torn_tail_is_skipped_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(1 << 20, 1 << 16, FsyncPolicy::EveryRecord);
        let mut spool = Spool::open(dir.path(), c.clone()).unwrap();
        for i in 0..5 {
            spool.append(&record(i, 30)).unwrap();
        }
        drop(spool);
        let path = segment_path(dir.path(), 1);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        let torn = record(5, 30).framed();
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);
        let mut spool = Spool::open(dir.path(), c).unwrap();
        assert_eq!(spool.stats().corrupt_bytes, (torn.len() / 2) as u64);
        spool.append(&record(6, 30)).unwrap();
        let ids: Vec<_> = drain(&mut spool).into_iter().map(|r| r.msg_id).collect();
        assert_eq!(
            ids,
            [
                "id-0000", "id-0001", "id-0002", "id-0003", "id-0004", "id-0006"
            ]
        );
    }

    #[test]
    fn commit_writes_the_ack_file_in_place_and_reopen_resumes_there() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(1 << 20, 512, FsyncPolicy::Interval(Duration::from_secs(1)));
        let mut spool = Spool::open(dir.path(), c.clone()).unwrap();
        for i in 0..10 {
            spool.append(&record(i, 30)).unwrap();
        }
        let mut upto = None;
        for _ in 0..4 {
            upto = spool.next().unwrap().map(|(c, _)| c);
        }
        let upto = upto.unwrap();
        spool.commit(upto).unwrap();
        assert_eq!(
            fs::read(dir.path().join(ACK_FILE)).unwrap(),
            encode_ack(upto)
        );
        assert!(!dir.path().join(ACK_TMP).exists(), "renamed into place");
        drop(spool);
        let mut spool = Spool::open(dir.path(), c).unwrap();
        let ids: Vec<_> = drain(&mut spool).into_iter().map(|r| r.msg_id).collect();
        assert_eq!(ids.first().map(String::as_str), Some("id-0004"));
        assert_eq!(ids.len(), 6);
    }

    #[test]
    fn a_commit_whose_ack_file_cannot_be_written_still_frees_segments() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(1 << 20, 256, FsyncPolicy::Never);
        let mut spool = Spool::open(dir.path(), c.clone()).unwrap();
        let records: Vec<_> = (0..20).map(|i| record(i, 30)).collect();
        for r in &records {
            spool.append(r).unwrap();
        }
        let segments = spool.stats().segments;
        assert!(segments > 3);
        let mut upto = None;
        for _ in 0..15 {
            upto = spool.next().unwrap().map(|(c, _)| c);
        }
        // The ack file cannot be written (as on a full disk).
        fs::create_dir(dir.path().join(ACK_TMP)).unwrap();
        let err = spool.commit(upto.unwrap()).unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(
            spool.stats().segments < segments,
            "acknowledged segments deleted"
        );
        assert_eq!(
            spool.stats().pending_records,
            5,
            "the commit holds in memory"
        );
        drop(spool);
        // The next process replays at most the rest of one segment again.
        fs::remove_dir(dir.path().join(ACK_TMP)).unwrap();
        let mut spool = Spool::open(dir.path(), c).unwrap();
        let replayed = drain(&mut spool);
        assert!(replayed.len() < 15 && replayed.ends_with(&records[15..]));
    }

    #[test]
    fn a_failed_append_is_a_counted_drop_that_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(1 << 20, 256, FsyncPolicy::Never);
        let mut spool = Spool::open(dir.path(), c.clone()).unwrap();
        spool.append(&record(0, 30)).unwrap();
        // The next segment cannot be created (as on a full disk, or EIO).
        let next = segment_path(dir.path(), 2);
        fs::create_dir(&next).unwrap();
        let mut dropped = 0;
        for i in 1..10 {
            match spool.append(&record(i, 30)) {
                Ok(_) => {}
                Err(SpoolError::Dropped { reason, .. }) => {
                    assert_eq!(reason, DropReason::IoError);
                    dropped += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(dropped > 0);
        assert_eq!(spool.stats().io_error_records, dropped);
        assert_eq!(spool.ledger().total(DropReason::IoError), dropped);
        drop(spool);
        fs::remove_dir(&next).unwrap();
        let mut spool = Spool::open(dir.path(), c).unwrap();
        assert_eq!(spool.ledger().total(DropReason::IoError), dropped);
        let unreported = spool.ledger().unreported().unwrap();
        spool.reported(&unreported).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path(), config(1 << 20, 256, FsyncPolicy::Never)).unwrap();
        assert_eq!(spool.ledger().unreported(), None, "reported once");
        assert_eq!(spool.ledger().total(DropReason::IoError), dropped);
    }

    #[test]
    fn bad_config_and_oversized_records_are_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let err = Spool::open(dir.path(), config(100, 200, FsyncPolicy::Never))
            .err()
            .unwrap();
        assert!(!err.is_retryable());
        let mut spool = Spool::open(dir.path(), config(1000, 100, FsyncPolicy::Never)).unwrap();
        let err = spool.append(&record(0, 200)).unwrap_err();
        assert!(matches!(err, SpoolError::TooLarge { .. }));
        assert!(!err.is_retryable());
    }
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod model_tests;

#[cfg(test)]
impl Record {
    /// The frame the spool writes for this record (tests tear it).
    pub(crate) fn framed(&self) -> Vec<u8> {
        frame_record(self)
    }
}
