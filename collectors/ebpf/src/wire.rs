//! The records the BPF programs write to the ring buffer (and the retransmit
//! map), parsed from bytes. Layouts mirror `ebpf/tidewatch.bpf.c`; the C side
//! checks its sizes with `_Static_assert`, the tests here check the offsets.

use tidewatch_runtime::topology::types;

/// Event kinds, in the order of the BPF `K_*` constants (the index into the
/// drop, sampling and sequence maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Exec = 0,
    Exit = 1,
    Oom = 2,
    TcpConnect = 3,
    TcpAccept = 4,
    TcpClose = 5,
    TcpRefused = 6,
    TcpTimeout = 7,
    TcpReset = 8,
    TcpRetransmit = 9,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Exec,
        Kind::Exit,
        Kind::Oom,
        Kind::TcpConnect,
        Kind::TcpAccept,
        Kind::TcpClose,
        Kind::TcpRefused,
        Kind::TcpTimeout,
        Kind::TcpReset,
        Kind::TcpRetransmit,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub fn from_u32(v: u32) -> Option<Kind> {
        Self::ALL.get(v as usize).copied()
    }

    /// Short name used in config and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Exec => "process.exec",
            Kind::Exit => "process.exit",
            Kind::Oom => "memory.oomkill",
            Kind::TcpConnect => "tcp.connect",
            Kind::TcpAccept => "tcp.accept",
            Kind::TcpClose => "tcp.close",
            Kind::TcpRefused => "tcp.refused",
            Kind::TcpTimeout => "tcp.timeout",
            Kind::TcpReset => "tcp.reset",
            Kind::TcpRetransmit => "tcp.retransmit",
        }
    }

    /// The CloudEvent type this kind is published as.
    pub fn event_type(self) -> &'static str {
        match self {
            Kind::Exec => types::PROCESS_EXEC,
            Kind::Exit => types::PROCESS_EXIT,
            Kind::Oom => types::OOM_KILL,
            Kind::TcpConnect => types::TCP_CONNECT,
            Kind::TcpAccept => types::TCP_ACCEPT,
            Kind::TcpClose => types::TCP_CLOSE,
            Kind::TcpRefused => types::TCP_REFUSED,
            Kind::TcpTimeout => types::TCP_TIMEOUT,
            Kind::TcpReset => types::TCP_RESET,
            Kind::TcpRetransmit => types::TCP_RETRANSMIT,
        }
    }

    /// `TcpConnection.change` for TCP kinds.
    pub fn tcp_change(self) -> &'static str {
        self.name().strip_prefix("tcp.").unwrap_or("")
    }

    /// A kind named by its short name (`process.exec`), its last part
    /// (`exec`) or its full CloudEvent type.
    pub fn parse(s: &str) -> Option<Kind> {
        Self::ALL.iter().copied().find(|k| {
            k.name() == s || k.event_type() == s || k.name().rsplit('.').next() == Some(s)
        })
    }
}

pub const HDR_SIZE: usize = 64;
pub const FILENAME_SIZE: usize = 256;
pub const ARGS_SIZE: usize = 1024;
pub const EXEC_SIZE: usize = HDR_SIZE + 16 + FILENAME_SIZE + ARGS_SIZE;
pub const EXIT_SIZE: usize = 80;
pub const OOM_SIZE: usize = 88;
pub const TCP_SIZE: usize = HDR_SIZE + 8 + 32 + 8 + 8 + 16;
pub const RETRANS_SIZE: usize = HDR_SIZE + 8 + 32 + 8;

/// Who an event is about, as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub kind: u32,
    pub cpu: u32,
    pub seq: u64,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub filename: String,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// `task->exit_code`: status << 8 | 0x80 if core dumped | signal.
    pub raw_code: i32,
    pub runtime_ns: u64,
}

impl Exit {
    pub fn signal(&self) -> u32 {
        (self.raw_code & 0x7f) as u32
    }
    pub fn core_dumped(&self) -> bool {
        self.raw_code & 0x80 != 0
    }
    /// As the shell sees it: the status, or 128 + signal when killed.
    pub fn exit_code(&self) -> i32 {
        match self.signal() {
            0 => (self.raw_code >> 8) & 0xff,
            s => 128 + s as i32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oom {
    pub total_pages: u64,
    pub rss_pages: u64,
    pub memcg: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcp {
    /// 4 or 6.
    pub family: u16,
    pub saddr: std::net::IpAddr,
    pub sport: u16,
    pub daddr: std::net::IpAddr,
    pub dport: u16,
    pub duration_ns: u64,
    pub retransmits: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Exec(Exec),
    Exit(Exit),
    Oom(Oom),
    Tcp(Tcp),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub header: Header,
    pub body: Body,
}

/// Why a record could not be parsed (a collector/BPF mismatch; counted).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record is {len} bytes, expected {expected}")]
    Size {
        kind: Kind,
        len: usize,
        expected: usize,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

/// A NUL-terminated C string in a fixed buffer.
fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn header(b: &[u8]) -> Header {
    Header {
        kind: u32_at(b, 0),
        cpu: u32_at(b, 4),
        seq: u64_at(b, 8),
        ts_ns: u64_at(b, 16),
        cgroup_id: u64_at(b, 24),
        pid: u32_at(b, 32),
        tgid: u32_at(b, 36),
        ppid: u32_at(b, 40),
        uid: u32_at(b, 44),
        comm: c_str(&b[48..64]),
    }
}

fn addr(family: u16, bytes: &[u8]) -> std::net::IpAddr {
    if family == 6 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&bytes[..16]);
        std::net::IpAddr::from(a)
    } else {
        std::net::IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

/// Split the raw argument area (`mm->arg_start..arg_end`) into arguments.
pub fn split_args(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|&c| c == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn expect(kind: Kind, b: &[u8], expected: usize) -> Result<(), WireError> {
    if b.len() < expected {
        return Err(WireError::Size {
            kind,
            len: b.len(),
            expected,
        });
    }
    Ok(())
}

/// Parse one ring-buffer record.
pub fn parse(b: &[u8]) -> Result<Record, WireError> {
    if b.len() < HDR_SIZE {
        return Err(WireError::Short(b.len()));
    }
    let header = header(b);
    let kind = Kind::from_u32(header.kind).ok_or(WireError::UnknownKind(header.kind))?;
    let body = match kind {
        Kind::Exec => {
            expect(kind, b, EXEC_SIZE)?;
            let filename_len = (u32_at(b, 64) as usize).min(FILENAME_SIZE);
            let args_len = (u32_at(b, 68) as usize).min(ARGS_SIZE);
            let truncated = u32_at(b, 72) != 0;
            let filename_at = HDR_SIZE + 16;
            let args_at = filename_at + FILENAME_SIZE;
            let filename = c_str(&b[filename_at..filename_at + filename_len]);
            let mut argv = split_args(&b[args_at..args_at + args_len]);
            if truncated {
                // The last argument was cut at the bound: keep it, flagged.
                argv.retain(|a| !a.is_empty());
            }
            Body::Exec(Exec {
                filename,
                argv,
                argv_truncated: truncated,
            })
        }
        Kind::Exit => {
            expect(kind, b, EXIT_SIZE)?;
            Body::Exit(Exit {
                raw_code: u32_at(b, 64) as i32,
                runtime_ns: u64_at(b, 72),
            })
        }
        Kind::Oom => {
            expect(kind, b, OOM_SIZE)?;
            Body::Oom(Oom {
                total_pages: u64_at(b, 64),
                rss_pages: u64_at(b, 72),
                memcg: u32_at(b, 80) != 0,
            })
        }
        Kind::TcpRetransmit => {
            expect(kind, b, RETRANS_SIZE)?;
            Body::Tcp(tcp_body(b, 0, u32_at(b, 104)))
        }
        _ => {
            expect(kind, b, TCP_SIZE)?;
            let mut tcp = tcp_body(b, u64_at(b, 104), u32_at(b, 112));
            tcp.bytes_sent = u64_at(b, 120);
            tcp.bytes_received = u64_at(b, 128);
            Body::Tcp(tcp)
        }
    };
    Ok(Record { kind, header, body })
}

/// The TCP part shared by ring records and retransmit map values (from offset 64).
fn tcp_body(b: &[u8], duration_ns: u64, retransmits: u32) -> Tcp {
    let family = u16_at(b, 64);
    Tcp {
        family,
        sport: u16_at(b, 66),
        dport: u16_at(b, 68),
        saddr: addr(family, &b[72..88]),
        daddr: addr(family, &b[88..104]),
        duration_ns,
        retransmits,
        bytes_sent: 0,
        bytes_received: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(kind: Kind) -> Vec<u8> {
        let mut b = vec![0u8; HDR_SIZE];
        b[0..4].copy_from_slice(&(kind as u32).to_ne_bytes());
        b[4..8].copy_from_slice(&1u32.to_ne_bytes());
        b[8..16].copy_from_slice(&42u64.to_ne_bytes());
        b[16..24].copy_from_slice(&1000u64.to_ne_bytes());
        b[24..32].copy_from_slice(&7u64.to_ne_bytes());
        b[32..36].copy_from_slice(&100u32.to_ne_bytes());
        b[36..40].copy_from_slice(&100u32.to_ne_bytes());
        b[40..44].copy_from_slice(&1u32.to_ne_bytes());
        b[44..48].copy_from_slice(&0u32.to_ne_bytes());
        b[48..52].copy_from_slice(b"true");
        b
    }

    #[test]
    fn exec_record() {
        let mut b = hdr(Kind::Exec);
        b.resize(EXEC_SIZE, 0);
        b[64..68].copy_from_slice(&9u32.to_ne_bytes());
        let args = b"/bin/true\0hello\0";
        b[68..72].copy_from_slice(&(args.len() as u32).to_ne_bytes());
        b[80..89].copy_from_slice(b"/bin/true");
        b[336..336 + args.len()].copy_from_slice(args);
        let r = parse(&b).expect("parses");
        assert_eq!(r.kind, Kind::Exec);
        assert_eq!(r.header.seq, 42);
        assert_eq!(r.header.cpu, 1);
        assert_eq!(r.header.cgroup_id, 7);
        assert_eq!(r.header.comm, "true");
        assert_eq!(
            r.body,
            Body::Exec(Exec {
                filename: "/bin/true".into(),
                argv: vec!["/bin/true".into(), "hello".into()],
                argv_truncated: false
            })
        );
    }

    #[test]
    fn exit_codes_and_signals() {
        let exited = Exit {
            raw_code: 3 << 8,
            runtime_ns: 0,
        };
        assert_eq!((exited.exit_code(), exited.signal()), (3, 0));
        let killed = Exit {
            raw_code: 9,
            runtime_ns: 0,
        };
        assert_eq!((killed.exit_code(), killed.signal()), (137, 9));
        let cored = Exit {
            raw_code: 0x80 | 11,
            runtime_ns: 0,
        };
        assert!(cored.core_dumped());
        assert_eq!(cored.signal(), 11);
    }

    #[test]
    fn tcp_record() {
        let mut b = hdr(Kind::TcpRefused);
        b.resize(TCP_SIZE, 0);
        b[64..66].copy_from_slice(&4u16.to_ne_bytes());
        b[66..68].copy_from_slice(&5555u16.to_ne_bytes());
        b[68..70].copy_from_slice(&80u16.to_ne_bytes());
        b[72..76].copy_from_slice(&[127, 0, 0, 1]);
        b[88..92].copy_from_slice(&[10, 0, 0, 2]);
        let r = parse(&b).expect("parses");
        let Body::Tcp(tcp) = r.body else {
            panic!("tcp")
        };
        assert_eq!(tcp.saddr.to_string(), "127.0.0.1");
        assert_eq!(tcp.daddr.to_string(), "10.0.0.2");
        assert_eq!((tcp.sport, tcp.dport), (5555, 80));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert_eq!(parse(&[0u8; 10]), Err(WireError::Short(10)));
        let mut b = hdr(Kind::Exec);
        b[0..4].copy_from_slice(&99u32.to_ne_bytes());
        assert_eq!(parse(&b), Err(WireError::UnknownKind(99)));
        let b = hdr(Kind::Exit);
        assert!(matches!(parse(&b), Err(WireError::Size { .. })));
    }

    #[test]
    fn kinds_parse_by_any_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
            assert_eq!(Kind::parse(k.event_type()), Some(k));
        }
        assert_eq!(Kind::parse("exec"), Some(Kind::Exec));
        assert_eq!(Kind::parse("oomkill"), Some(Kind::Oom));
        assert_eq!(Kind::parse("refused"), Some(Kind::TcpRefused));
        assert_eq!(Kind::parse("bogus"), None);
    }
}
