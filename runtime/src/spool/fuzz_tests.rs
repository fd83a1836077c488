#![allow(clippy::unwrap_used)] // test code: a failed step is the test failing
//! Fuzzing the spool's readers with arbitrary bytes: `decode_frame`, and
//! opening a spool directory whose segment and ack files (and segment file
//! names) are anything at all. Nothing may panic, loop, or allocate more
//! than one frame of the configured size; whole records always come back.

use std::fs;

use bytes::Bytes;
use proptest::prelude::*;

use super::{
    ACK_FILE, FRAME_HEADER, Frame, FsyncPolicy, Spool, SpoolConfig, SpoolError, crc32,
    decode_frame, frame_record, segment_path,
};
use crate::message::Record;

/// 256 cases per property unless `PROPTEST_CASES` says otherwise (long runs).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Small enough that generated frames pass it: the cap is exercised.
const SEGMENT_BYTES: u64 = 1024;

fn spool_config() -> SpoolConfig {
    SpoolConfig {
        max_bytes: 64 * SEGMENT_BYTES,
        segment_bytes: SEGMENT_BYTES,
        fsync: FsyncPolicy::Never,
    }
}

fn record() -> impl Strategy<Value = Record> {
    (
        ".{0,12}",
        ".{0,24}",
        proptest::collection::vec(("[a-zA-Z-]{0,8}", ".{0,16}"), 0..4),
        proptest::collection::vec(any::<u8>(), 0..1200),
    )
        .prop_map(|(subject, msg_id, headers, payload)| Record {
            subject,
            msg_id,
            headers,
            payload: Bytes::from(payload),
        })
}

/// One damage done to good bytes.
#[derive(Debug, Clone)]
enum Edit {
    Append(Vec<u8>),
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    /// A length or count field overwritten: any u32 at any offset.
    Word(prop::sample::Index, u32),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Edit::Append),
        (any::<prop::sample::Index>(), 1u8..).prop_map(|(at, bits)| Edit::Flip(at, bits)),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
        (any::<prop::sample::Index>(), any::<u32>()).prop_map(|(at, w)| Edit::Word(at, w)),
    ]
}

fn apply(mut bytes: Vec<u8>, edit: &Edit) -> Vec<u8> {
    if bytes.is_empty() {
        return bytes;
    }
    match edit {
        Edit::Append(tail) => bytes.extend_from_slice(tail),
        Edit::Flip(at, bits) => {
            let i = at.index(bytes.len());
            bytes[i] ^= bits;
        }
        Edit::Truncate(at) => bytes.truncate(at.index(bytes.len())),
        Edit::Word(at, w) => {
            let i = at.index(bytes.len());
            for (b, new) in bytes[i..].iter_mut().zip(w.to_le_bytes()) {
                *b = new;
            }
        }
    }
    bytes
}

/// Any bytes, or good bytes (`good` of a record) damaged once.
fn damaged(good: fn(&Record) -> Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (record(), edit()).prop_map(move |(r, e)| apply(good(&r), &e)),
    ]
}

/// A frame header declaring `len` body bytes, with any checksum.
fn header(len: u32, crc: u32) -> Vec<u8> {
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Pieces a segment file is made of: whole frames (some over the cap),
/// frames claiming absurd lengths, and plain garbage.
#[derive(Debug, Clone)]
enum Piece {
    Frame(Record),
    Huge { len: u32, crc: u32 },
    Garbage(Vec<u8>),
    Torn(Record, usize),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => record().prop_map(Piece::Frame),
        1 => (any::<u32>(), any::<u32>()).prop_map(|(len, crc)| Piece::Huge { len, crc }),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Piece::Garbage),
        1 => (record(), any::<usize>()).prop_map(|(r, cut)| Piece::Torn(r, cut)),
    ]
}

fn bytes_of(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Frame(r) => out.extend(frame_record(r)),
            Piece::Huge { len, crc } => out.extend(header(*len, *crc)),
            Piece::Garbage(g) => out.extend_from_slice(g),
            Piece::Torn(r, cut) => {
                let f = frame_record(r);
                out.extend_from_slice(&f[..cut % f.len()]);
            }
        }
    }
    out
}

/// Segment file names: canonical ones, the extremes of the id space, and
/// names that parse to an id without being the spool's spelling of it.
fn segment_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (1u64..6).prop_map(|id| format!("{id:08}.seg")),
        1 => Just(format!("{}.seg", u64::MAX)),
        1 => Just(format!("{:08}.seg", u64::MAX - 1)),
        1 => (1u64..6).prop_map(|id| format!("{id}.seg")),
        1 => (1u64..6).prop_map(|id| format!("+{id:08}.seg")),
        1 => "[0-9+]{0,3}\\.seg",
    ]
}

fn ack_bytes() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        // A well-formed ack pointing anywhere.
        (0u64..8, any::<u64>()).prop_map(|(segment, offset)| {
            let mut b = segment.to_le_bytes().to_vec();
            b.extend_from_slice(&offset.to_le_bytes());
            let crc = crc32(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            Some(b)
        }),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some),
    ]
}

/// Every record the spool returns, failing instead of looping forever.
fn drain(spool: &mut Spool, bound: usize) -> Result<Vec<Record>, TestCaseError> {
    let mut out = Vec::new();
    while let Some((_, r)) = spool
        .next()
        .map_err(|e| TestCaseError::fail(format!("replay failed: {e}")))?
    {
        out.push(r);
        if out.len() > bound {
            return Err(TestCaseError::fail(format!(
                "replayed more than the {bound} records written: the reader loops"
            )));
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes: `None` only at the end, a record only where a whole
    /// checksummed frame within the cap is, and never past the bytes given.
    #[test]
    fn fuzz_decode_frame_arbitrary_bytes(
        bytes in damaged(frame_record),
        max_frame in (FRAME_HEADER as u64)..4096,
    ) {
        match decode_frame(&bytes, max_frame) {
            None => prop_assert!(bytes.is_empty()),
            Some(Frame::Record { record, len }) => {
                prop_assert!(len <= bytes.len() && len as u64 <= max_frame);
                prop_assert_eq!(frame_record(&record), bytes[..len].to_vec());
            }
            Some(Frame::Torn | Frame::Corrupt) => prop_assert!(!bytes.is_empty()),
        }
    }

    /// A header claiming more than the cap is corrupt, however many bytes
    /// follow and whatever its checksum: nothing is read for it.
    #[test]
    fn fuzz_decode_frame_declared_length_over_the_cap(
        over in 1u64..=u64::from(u32::MAX),
        crc in any::<u32>(),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let max_frame = SEGMENT_BYTES;
        let len = u32::try_from((max_frame - FRAME_HEADER as u64 + over).min(u64::from(u32::MAX))).unwrap();
        let mut bytes = header(len, crc);
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(decode_frame(&bytes, max_frame), Some(Frame::Corrupt));
    }

    /// encode → frame → decode is the identity, and every cut of the frame is torn.
    #[test]
    fn fuzz_frame_round_trip(record in record(), cut in any::<usize>()) {
        let frame = frame_record(&record);
        prop_assert_eq!(Record::decode(&record.encode()), Some(record.clone()));
        prop_assert_eq!(
            decode_frame(&frame, u64::MAX),
            Some(Frame::Record { record: record.clone(), len: frame.len() })
        );
        let cut = cut % frame.len();
        if cut > 0 {
            prop_assert_eq!(decode_frame(&frame[..cut], u64::MAX), Some(Frame::Torn));
        }
    }

    /// Arbitrary record bodies: `Record::decode` never panics, and what it
    /// accepts encodes back to the same bytes.
    #[test]
    fn fuzz_record_decode_arbitrary_bytes(body in damaged(Record::encode)) {
        if let Some(record) = Record::decode(&body) {
            prop_assert_eq!(record.encode(), body);
        }
    }

    /// Open a directory of arbitrary segment files (names and contents) and
    /// ack file: it opens or refuses with a typed error, replays only
    /// records that were written whole, never loops, and appends after.
    #[test]
    fn fuzz_open_arbitrary_spool_directory(
        files in proptest::collection::vec(
            (segment_name(), proptest::collection::vec(piece(), 0..6)),
            0..4,
        ),
        ack in ack_bytes(),
        extra in record(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut written = Vec::new();
        for (name, pieces) in &files {
            fs::write(dir.path().join(name), bytes_of(pieces)).unwrap();
            for p in pieces {
                if let Piece::Frame(r) = p {
                    written.push(r.clone());
                }
            }
        }
        if let Some(ack) = &ack {
            fs::write(dir.path().join(ACK_FILE), ack).unwrap();
        }
        let mut spool = match Spool::open(dir.path(), spool_config()) {
            Ok(spool) => spool,
            Err(e @ SpoolError::Config(_)) => {
                // Only a segment id with no successor is refused, by name.
                prop_assert!(e.to_string().contains(&u64::MAX.to_string()), "{}", e);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("open failed: {e}"))),
        };
        let replayed = drain(&mut spool, written.len())?;
        for r in &replayed {
            prop_assert!(written.contains(r), "replayed a record never written: {:?}", r);
            prop_assert!(frame_record(r).len() as u64 <= SEGMENT_BYTES, "a frame over the cap was read");
        }
        let too_large = frame_record(&extra).len() as u64 > SEGMENT_BYTES;
        match spool.append(&extra) {
            Ok(_) => prop_assert!(!too_large),
            Err(SpoolError::TooLarge { .. }) => prop_assert!(too_large),
            Err(e @ SpoolError::Config(_)) => {
                // Rolling past the last usable segment id is refused, by name.
                prop_assert!(e.to_string().contains(&(u64::MAX - 1).to_string()), "{}", e);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("append failed: {e}"))),
        }
        if !too_large {
            let after = drain(&mut spool, written.len() + 1)?;
            prop_assert_eq!(after.last(), Some(&extra));
        }
        drop(spool);
        // Reopening what the spool left behind replays at least the append.
        let mut spool = Spool::open(dir.path(), spool_config()).unwrap();
        let again = drain(&mut spool, written.len() + 1)?;
        if !too_large {
            prop_assert_eq!(again.last(), Some(&extra));
        }
    }
}

/// The length cap: a frame longer than a segment cannot have been
/// appended under this configuration; it is corrupt, not a record (and its
/// body is never read).
#[test]
fn a_frame_over_the_segment_size_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let big = Record {
        subject: "s".into(),
        msg_id: "big".into(),
        headers: vec![],
        payload: Bytes::from(vec![7u8; 2 * SEGMENT_BYTES as usize]),
    };
    let frame = frame_record(&big);
    fs::write(segment_path(dir.path(), 1), &frame).unwrap();
    let mut spool = Spool::open(dir.path(), spool_config()).unwrap();
    assert_eq!(spool.next().unwrap(), None);
    assert_eq!(spool.stats().corrupt_bytes, frame.len() as u64);
}

/// Found by `fuzz_open_arbitrary_spool_directory`: `1.seg` or `+2.seg`
/// parse to an id whose file (`00000002.seg`) is another one or none, and
/// the open failed with a retryable error, for ever.
#[test]
fn segment_names_are_only_the_spools_own_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let r = Record {
        subject: "s".into(),
        msg_id: "one".into(),
        headers: vec![],
        payload: Bytes::from_static(b"x"),
    };
    fs::write(segment_path(dir.path(), 1), frame_record(&r)).unwrap();
    fs::write(dir.path().join("1.seg"), frame_record(&r)).unwrap();
    fs::write(dir.path().join("+2.seg"), frame_record(&r)).unwrap();
    let mut spool = Spool::open(dir.path(), spool_config()).unwrap();
    assert_eq!(drain(&mut spool, 1).unwrap(), vec![r]);
}

/// Found by `fuzz_open_arbitrary_spool_directory`: a segment with the
/// largest id leaves no id to roll to (the next append overflowed `id + 1`).
#[test]
fn a_segment_with_the_last_possible_id_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}.seg", u64::MAX);
    fs::write(dir.path().join(&name), b"").unwrap();
    match Spool::open(dir.path(), spool_config()) {
        Err(e @ SpoolError::Config(_)) => {
            assert!(e.to_string().contains(&name), "{e}");
            assert!(!e.is_retryable());
        }
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("opened a spool that cannot roll"),
    }
    // The one before it works until it has to roll, then says so.
    fs::remove_file(dir.path().join(&name)).unwrap();
    fs::write(segment_path(dir.path(), u64::MAX - 1), b"").unwrap();
    let mut spool = Spool::open(dir.path(), spool_config()).unwrap();
    let r = |size| Record {
        subject: "s".into(),
        msg_id: "m".into(),
        headers: vec![],
        payload: Bytes::from(vec![0u8; size]),
    };
    spool.append(&r(600)).unwrap();
    let err = spool.append(&r(600)).unwrap_err();
    assert!(matches!(err, SpoolError::Config(_)), "{err}");
    assert!(
        err.to_string().contains(&(u64::MAX - 1).to_string()),
        "{err}"
    );
}

/// Set in the child process of [`huge_files_are_never_read_whole`].
const AS_LIMIT_ENV: &str = "TIDEWATCH_SPOOL_TEST_AS_LIMIT";

/// A 4 GiB (sparse) segment whose first frame claims 4 GiB, and a 4 GiB
/// ack file: opening reads neither whole. Runs in a child process whose
/// address space is capped 1 GiB above what it uses, so reading either
/// file whole fails the open instead of quietly taking 4 GiB.
#[test]
fn huge_files_are_never_read_whole() {
    if std::env::var_os(AS_LIMIT_ENV).is_none() {
        let name = concat!(module_path!(), "::huge_files_are_never_read_whole");
        let name = name.split_once("::").map_or(name, |(_, rest)| rest);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(AS_LIMIT_ENV, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "child failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let huge: u64 = 4 << 30;
    let seg = segment_path(dir.path(), 1);
    fs::write(&seg, header(u32::MAX, 0)).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(huge)
        .unwrap();
    let ack = dir.path().join(ACK_FILE);
    fs::File::create(&ack).unwrap().set_len(huge).unwrap();
    limit_address_space(1 << 30);
    let mut spool = Spool::open(dir.path(), spool_config()).unwrap();
    assert_eq!(spool.next().unwrap(), None);
    assert_eq!(spool.stats().corrupt_bytes, huge);
    assert_eq!(fs::metadata(&seg).unwrap().len(), 0, "torn tail cut");
}

/// Cap this process's address space at what it uses now plus `headroom`.
fn limit_address_space(headroom: u64) {
    use nix::sys::resource::{Resource, setrlimit};
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let limit = vm_kib * 1024 + headroom;
    setrlimit(Resource::RLIMIT_AS, limit, limit).unwrap();
}
