//! The spool's drop ledger: how many events the spool lost, by
//! [`DropReason`], and how many of those a `collector.drops` report already
//! carried to the stream. Kept in `<spool dir>/drops`, so a restart neither
//! loses an unreported count nor reports one twice.
//!
//! The file is the one thing that must be writable when the disk is full
//! (that is when events are dropped), so it never grows: it is created at
//! its full size when the spool opens and every update overwrites a fixed
//! slot in place (`pwrite`), which needs no new block. Two slots, each with
//! a sequence number and a CRC, are written alternately; reading takes the
//! valid slot with the higher sequence, so a torn write (machine crash mid
//! update) leaves the previous copy.
//!
//! [`Ledger`] and the slot format ([`encode_slot`], [`newest`]) are pure;
//! [`LedgerFile`] only reads and writes the bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The ledger file's name in the spool directory.
pub(crate) const LEDGER_FILE: &str = "drops";
const MAGIC: u32 = 0x5444_5231; // "TDR1"
/// Bytes of one slot: magic, seq, epoch, totals, reported, CRC32, padding.
pub(crate) const SLOT: usize = 80;
const REASONS: usize = 3;

/// Why the spool lost an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The spool reached its `max_bytes`: its oldest segment was deleted
    /// with the unacknowledged records in it.
    Overflow,
    /// An append found no space on the file system (ENOSPC, EDQUOT): the
    /// new event was not kept.
    DiskFull,
    /// An append failed on another I/O error (EIO, the directory gone...):
    /// the new event was not kept.
    IoError,
}

impl DropReason {
    pub const ALL: [DropReason; REASONS] = [
        DropReason::Overflow,
        DropReason::DiskFull,
        DropReason::IoError,
    ];

    /// The metric label and the `kind` of its count in a drops report.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Overflow => "overflow",
            DropReason::DiskFull => "disk_full",
            DropReason::IoError => "io_error",
        }
    }

    /// What a failed write means for the event it carried.
    pub fn of(error: &io::Error) -> DropReason {
        match error.raw_os_error() {
            Some(code) if code == ENOSPC || code == EDQUOT => DropReason::DiskFull,
            _ if error.kind() == io::ErrorKind::StorageFull => DropReason::DiskFull,
            _ => DropReason::IoError,
        }
    }

    fn index(self) -> usize {
        match self {
            DropReason::Overflow => 0,
            DropReason::DiskFull => 1,
            DropReason::IoError => 2,
        }
    }
}

const ENOSPC: i32 = nix::errno::Errno::ENOSPC as i32;
const EDQUOT: i32 = nix::errno::Errno::EDQUOT as i32;

/// Drop totals since the spool was created, and what was reported of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ledger {
    /// Names this spool's life: report ids include it, so a spool deleted
    /// and recreated does not reuse an earlier life's report ids.
    pub epoch: u64,
    totals: [u64; REASONS],
    reported: [u64; REASONS],
}

/// One count of a report: reason, total so far, growth since the last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreported {
    pub reason: DropReason,
    pub total: u64,
    pub delta: u64,
}

impl Ledger {
    pub fn new(epoch: u64) -> Ledger {
        Ledger {
            epoch,
            ..Ledger::default()
        }
    }

    /// `n` more events lost for `reason`.
    pub fn count(&mut self, reason: DropReason, n: u64) {
        let slot = &mut self.totals[reason.index()];
        *slot = slot.saturating_add(n);
    }

    /// Events lost for `reason` since the spool was created.
    pub fn total(&self, reason: DropReason) -> u64 {
        self.totals[reason.index()]
    }

    /// What grew since the last report (reasons with a zero total left
    /// out), or `None` when nothing did.
    pub fn unreported(&self) -> Option<Vec<Unreported>> {
        let counts: Vec<Unreported> = DropReason::ALL
            .iter()
            .map(|&reason| Unreported {
                reason,
                total: self.totals[reason.index()],
                delta: self.totals[reason.index()].saturating_sub(self.reported[reason.index()]),
            })
            .filter(|c| c.total > 0)
            .collect();
        counts.iter().any(|c| c.delta > 0).then_some(counts)
    }

    /// A report carrying `counts` reached the stream.
    pub fn reported(&mut self, counts: &[Unreported]) {
        for c in counts {
            let slot = &mut self.reported[c.reason.index()];
            *slot = (*slot).max(c.total);
        }
    }
}

/// A slot's bytes: the ledger and its sequence number, checksummed.
pub(crate) fn encode_slot(seq: u64, ledger: &Ledger) -> [u8; SLOT] {
    let mut out = [0u8; SLOT];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&MAGIC.to_le_bytes());
    put(&seq.to_le_bytes());
    put(&ledger.epoch.to_le_bytes());
    for v in ledger.totals.iter().chain(ledger.reported.iter()) {
        put(&v.to_le_bytes());
    }
    let body = 4 + 8 + 8 + 8 * 2 * REASONS;
    let crc = crc32fast::hash(&out[..body]);
    out[body..body + 4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A slot's sequence number and ledger, or `None` if it is not a whole,
/// checksummed slot.
pub(crate) fn decode_slot(bytes: &[u8]) -> Option<(u64, Ledger)> {
    let body = 4 + 8 + 8 + 8 * 2 * REASONS;
    let bytes = bytes.get(..body + 4)?;
    let crc = u32::from_le_bytes(bytes[body..body + 4].try_into().ok()?);
    if crc32fast::hash(&bytes[..body]) != crc {
        return None;
    }
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    if u32::from_le_bytes(bytes[..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let mut ledger = Ledger::new(u64_at(12)?);
    for i in 0..REASONS {
        ledger.totals[i] = u64_at(20 + 8 * i)?;
        ledger.reported[i] = u64_at(20 + 8 * (REASONS + i))?;
    }
    Some((u64_at(4)?, ledger))
}

/// The newest valid slot of a ledger file's bytes: (slot index, seq, ledger).
pub(crate) fn newest(bytes: &[u8]) -> Option<(usize, u64, Ledger)> {
    (0..2)
        .filter_map(|i| {
            let slot = bytes.get(i * SLOT..(i + 1) * SLOT)?;
            decode_slot(slot).map(|(seq, ledger)| (i, seq, ledger))
        })
        .max_by_key(|(_, seq, _)| *seq)
}

/// The ledger file: two slots, written alternately in place.
pub(crate) struct LedgerFile {
    path: PathBuf,
    file: File,
    /// Sequence number of the newest slot written.
    seq: u64,
    /// The slot the newest copy is in (the next write goes to the other).
    slot: usize,
    /// Written since the last fsync.
    dirty: bool,
}

impl LedgerFile {
    /// Open the ledger in `dir`, creating it at full size (both slots
    /// written, fsynced) if it is missing or holds no valid slot.
    /// `epoch` names a new ledger. Returns whether it was (re)created.
    pub(crate) fn open(dir: &Path, epoch: u64) -> io::Result<(LedgerFile, Ledger, bool)> {
        let path = dir.join(LEDGER_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = [0u8; 2 * SLOT];
        let mut read = 0;
        while read < bytes.len() {
            match file.read_at(&mut bytes[read..], read as u64)? {
                0 => break,
                n => read += n,
            }
        }
        if let Some((slot, seq, ledger)) = newest(&bytes[..read]) {
            let mut ledger_file = LedgerFile {
                path,
                file,
                seq,
                slot,
                dirty: false,
            };
            if read < 2 * SLOT {
                // Written by a crash mid-creation: give it its full size now.
                ledger_file.store(&ledger)?;
                ledger_file.sync()?;
            }
            return Ok((ledger_file, ledger, false));
        }
        let ledger = Ledger::new(epoch);
        let mut both = Vec::with_capacity(2 * SLOT);
        both.extend_from_slice(&encode_slot(1, &ledger));
        both.extend_from_slice(&encode_slot(0, &ledger));
        file.write_all_at(&both, 0)?;
        file.sync_all()?;
        Ok((
            LedgerFile {
                path,
                file,
                seq: 1,
                slot: 0,
                dirty: false,
            },
            ledger,
            true,
        ))
    }

    /// Write `ledger` over the older slot (in place: no allocation, so it
    /// works on a full disk).
    pub(crate) fn store(&mut self, ledger: &Ledger) -> io::Result<()> {
        let slot = 1 - self.slot;
        let seq = self.seq + 1;
        self.file
            .write_all_at(&encode_slot(seq, ledger), (slot * SLOT) as u64)?;
        self.seq = seq;
        self.slot = slot;
        self.dirty = true;
        Ok(())
    }

    /// fsync what [`LedgerFile::store`] wrote, if anything.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reports_what_grew_and_remembers_what_was_reported() {
        let mut l = Ledger::new(7);
        assert_eq!(l.unreported(), None);
        l.count(DropReason::DiskFull, 3);
        let first = l.unreported().unwrap();
        assert_eq!(
            first,
            vec![Unreported {
                reason: DropReason::DiskFull,
                total: 3,
                delta: 3
            }]
        );
        l.count(DropReason::Overflow, 2);
        // The report of 3 lands after 2 more were counted.
        l.reported(&first);
        let second = l.unreported().unwrap();
        assert_eq!(second.len(), 2);
        assert_eq!(second[0].reason, DropReason::Overflow);
        assert_eq!((second[0].total, second[0].delta), (2, 2));
        assert_eq!((second[1].total, second[1].delta), (3, 0));
        l.reported(&second);
        assert_eq!(l.unreported(), None);
        // An older report landing late changes nothing.
        l.reported(&first);
        assert_eq!(l.unreported(), None);
    }

    #[test]
    fn slots_round_trip_and_the_newest_valid_one_wins() {
        let mut l = Ledger::new(42);
        l.count(DropReason::Overflow, 5);
        l.count(DropReason::IoError, 1);
        let a = encode_slot(3, &l);
        assert_eq!(decode_slot(&a), Some((3, l)));
        let mut newer = l;
        newer.count(DropReason::DiskFull, 9);
        let b = encode_slot(4, &newer);
        let mut file = [a, b].concat();
        assert_eq!(newest(&file), Some((1, 4, newer)));
        // A torn write of the newer slot leaves the older one.
        file[SLOT + 30] ^= 0xff;
        assert_eq!(newest(&file), Some((0, 3, l)));
        assert_eq!(newest(&file[..SLOT - 1]), None);
        assert_eq!(newest(&[0u8; 2 * SLOT]), None);
    }

    #[test]
    fn the_file_keeps_counts_across_reopen_and_never_grows() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, mut l, created) = LedgerFile::open(dir.path(), 9).unwrap();
        assert!(created);
        assert_eq!(l.epoch, 9);
        let len = std::fs::metadata(f.path()).unwrap().len();
        assert_eq!(len, 2 * SLOT as u64);
        for i in 0..5 {
            l.count(DropReason::DiskFull, 1);
            f.store(&l).unwrap();
            assert_eq!(std::fs::metadata(f.path()).unwrap().len(), len, "{i}");
        }
        f.sync().unwrap();
        drop(f);
        let (_, again, created) = LedgerFile::open(dir.path(), 10).unwrap();
        assert!(!created);
        assert_eq!(again, l);
        assert_eq!(again.total(DropReason::DiskFull), 5);
    }

    #[test]
    fn io_errors_name_their_reason() {
        let full = io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32);
        assert_eq!(DropReason::of(&full), DropReason::DiskFull);
        let quota = io::Error::from_raw_os_error(nix::errno::Errno::EDQUOT as i32);
        assert_eq!(DropReason::of(&quota), DropReason::DiskFull);
        let eio = io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32);
        assert_eq!(DropReason::of(&eio), DropReason::IoError);
    }
}
