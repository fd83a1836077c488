//! Journal entries, pure: parse a `journalctl -o json` line, decide whether
//! it is worth an event ([`Rules::select`]), and derive its deterministic id
//! from the journal cursor.
//!
//! Selected: entries of priority ≤ `max_priority` (warning by default);
//! kernel OOM-killer lines (the `Killed process` line becomes its own
//! `journal.oomkill` event); and error lines of the container runtime and
//! kubelet, which log to stderr and so are journaled at priority 6: matched
//! on unit or identifier plus text (klog `E1127 …`/`F1127 …`, logrus
//! `level=error`, JSON `"level":"error"`).

use std::collections::{BTreeMap, BTreeSet};

use tidewatch_runtime::event::derive_id;

/// One journal entry, as much of it as events carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// `__CURSOR`: where the entry is in the journal.
    pub cursor: String,
    pub realtime_us: u64,
    /// Syslog priority; entries without one are treated as info (6).
    pub priority: u32,
    pub message: String,
    /// `_SYSTEMD_UNIT`, else `UNIT` (systemd's messages about a unit), else empty.
    pub unit: String,
    /// `SYSLOG_IDENTIFIER`, else `_COMM`.
    pub identifier: String,
    pub pid: u32,
    /// `_TRANSPORT` (`kernel`, `stdout`, `journal`, `syslog`...).
    pub transport: String,
    /// Fields kept for context.
    pub fields: BTreeMap<String, String>,
}

/// Fields copied into [`Entry::fields`] when present.
const KEPT_FIELDS: &[&str] = &[
    "_SYSTEMD_UNIT",
    "UNIT",
    "SYSLOG_IDENTIFIER",
    "_COMM",
    "_EXE",
    "_PID",
    "_TRANSPORT",
    "_BOOT_ID",
    "_HOSTNAME",
    "_SYSTEMD_CGROUP",
    "_SYSTEMD_INVOCATION_ID",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "ERRNO",
    "EXIT_CODE",
    "EXIT_STATUS",
];

/// Why a line could not be read as an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("entry has no __CURSOR")]
    NoCursor,
}

/// A field value: journalctl writes strings, byte arrays for binary or
/// non-UTF-8 values, and arrays of those for repeated fields (first wins).
fn text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) if items.iter().all(|v| v.is_u64()) => {
            let bytes: Vec<u8> = items
                .iter()
                .filter_map(|v| v.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        serde_json::Value::Array(items) => items.iter().find_map(text),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parse one line of `journalctl -o json`.
pub fn parse(line: &str) -> Result<Entry, ParseError> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| ParseError::NotJson("not an object".into()))?;
    let get = |k: &str| obj.get(k).and_then(text);
    let cursor = get("__CURSOR").ok_or(ParseError::NoCursor)?;
    let fields: BTreeMap<String, String> = KEPT_FIELDS
        .iter()
        .filter_map(|k| get(k).map(|v| (k.to_string(), v)))
        .collect();
    Ok(Entry {
        cursor,
        realtime_us: get("__REALTIME_TIMESTAMP")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        priority: get("PRIORITY").and_then(|v| v.parse().ok()).unwrap_or(6),
        message: get("MESSAGE").unwrap_or_default(),
        unit: get("_SYSTEMD_UNIT")
            .or_else(|| get("UNIT"))
            .unwrap_or_default(),
        identifier: get("SYSLOG_IDENTIFIER")
            .or_else(|| get("_COMM"))
            .unwrap_or_default(),
        pid: get("_PID").and_then(|v| v.parse().ok()).unwrap_or(0),
        transport: get("_TRANSPORT").unwrap_or_default(),
        fields,
    })
}

/// Why an entry was selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selected {
    /// The kernel OOM killer killed a process (`dev.tidewatch.systemd.journal.oomkill`).
    OomKill,
    /// Anything else worth an event (`dev.tidewatch.systemd.journal.entry`).
    Entry,
}

impl Selected {
    pub fn event_type(self) -> &'static str {
        use tidewatch_runtime::topology::types;
        match self {
            Selected::OomKill => types::JOURNAL_OOM_KILL,
            Selected::Entry => types::JOURNAL_ENTRY,
        }
    }
}

/// Which entries become events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Entries at this priority or more severe (lower) are selected.
    pub max_priority: u32,
    /// Units/identifiers whose error text is selected whatever the priority
    /// (`kubelet` matches `kubelet.service` and identifier `kubelet`).
    pub error_units: BTreeSet<String>,
}

impl Rules {
    pub fn new<S: AsRef<str>>(max_priority: u32, error_units: &[S]) -> Rules {
        Rules {
            max_priority,
            error_units: error_units
                .iter()
                .map(|u| {
                    let u = u.as_ref();
                    u.strip_suffix(".service").unwrap_or(u).to_string()
                })
                .collect(),
        }
    }

    pub fn select(&self, entry: &Entry) -> Option<Selected> {
        if entry.transport == "kernel" {
            if is_oom_kill(&entry.message) {
                return Some(Selected::OomKill);
            }
            if is_oom_line(&entry.message) {
                return Some(Selected::Entry);
            }
        }
        if entry.priority <= self.max_priority {
            return Some(Selected::Entry);
        }
        let unit = entry.unit.strip_suffix(".service").unwrap_or(&entry.unit);
        let watched =
            self.error_units.contains(unit) || self.error_units.contains(&entry.identifier);
        (watched && is_error_text(&entry.message)).then_some(Selected::Entry)
    }
}

/// `Out of memory: Killed process 1234 (x) …` or `Memory cgroup out of memory: Killed process …`.
pub fn is_oom_kill(message: &str) -> bool {
    message.contains("out of memory: Killed process")
        || message.contains("Out of memory: Killed process")
}

/// Other OOM-killer lines: `x invoked oom-killer: …`, `oom-kill:constraint=…`, `oom_reaper: …`.
fn is_oom_line(message: &str) -> bool {
    message.contains("invoked oom-killer")
        || message.starts_with("oom-kill:")
        || message.starts_with("oom_reaper:")
}

/// Victim pid and command of an OOM kill line.
pub fn oom_victim(message: &str) -> Option<(u32, String)> {
    let rest = message.split("Killed process ").nth(1)?;
    let (pid, rest) = rest.split_once(' ')?;
    let comm = rest.strip_prefix('(')?.split_once(')')?.0;
    Some((pid.parse().ok()?, comm.to_string()))
}

/// klog error/fatal (`E1127 08:15:02.123456 …`), logrus/logfmt
/// (`level=error`), JSON (`"level":"error"`).
pub fn is_error_text(message: &str) -> bool {
    let b = message.as_bytes();
    let klog = b.len() > 6
        && matches!(b[0], b'E' | b'F')
        && b[1..5].iter().all(u8::is_ascii_digit)
        && b[5] == b' ';
    klog || ["error", "fatal", "panic"].iter().any(|level| {
        message.contains(&format!("level={level}"))
            || message.contains(&format!("\"level\":\"{level}\""))
            || message.contains(&format!("\"level\": \"{level}\""))
    })
}

/// `s=` (sequence number id) and `i=` (sequence number) of a cursor.
pub fn cursor_position(cursor: &str) -> Option<(&str, &str)> {
    let mut s = None;
    let mut i = None;
    for part in cursor.split(';') {
        match part.split_once('=') {
            Some(("s", v)) => s = Some(v),
            Some(("i", v)) => i = Some(v),
            _ => {}
        }
    }
    Some((s?, i?))
}

/// Deterministic event id of an entry: the journal's sequence number id and
/// the entry's sequence number (the whole cursor when it has neither), so
/// re-reading an entry after a restart produces the same id and JetStream
/// drops the duplicate.
pub fn event_id(cursor: &str) -> String {
    match cursor_position(cursor) {
        Some((s, i)) => derive_id(&[b"systemd-journal", s.as_bytes(), i.as_bytes()]),
        None => derive_id(&[b"systemd-journal", cursor.as_bytes()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURSOR: &str = "s=0fb8e6b1c7a24b5b9f0c5ba7a1b2c3d4;i=1a2;b=5d1f2e3c4b5a69788796a5b4c3d2e1f0;m=2b1c3d;t=60a1b2c3d4e5f;x=1f2e3d4c5b6a7988";

    fn line(fields: serde_json::Value) -> String {
        let mut obj = serde_json::json!({
            "__CURSOR": CURSOR,
            "__REALTIME_TIMESTAMP": "1764230400123456",
        });
        if let (Some(o), Some(f)) = (obj.as_object_mut(), fields.as_object()) {
            o.extend(f.clone());
        }
        obj.to_string()
    }

    #[test]
    fn parses_journalctl_json() {
        let e = parse(&line(serde_json::json!({
            "PRIORITY": "3",
            "MESSAGE": [104, 105, 255],
            "_SYSTEMD_UNIT": "kubelet.service",
            "SYSLOG_IDENTIFIER": "kubelet",
            "_PID": "812",
            "_TRANSPORT": "stdout",
            "IGNORED": "x",
        })))
        .expect("parses");
        assert_eq!(e.cursor, CURSOR);
        assert_eq!(e.realtime_us, 1_764_230_400_123_456);
        assert_eq!(e.priority, 3);
        assert_eq!(e.message, "hi\u{fffd}");
        assert_eq!(e.unit, "kubelet.service");
        assert_eq!(e.pid, 812);
        assert!(!e.fields.contains_key("IGNORED"));
        assert_eq!(
            e.fields.get("SYSLOG_IDENTIFIER").map(String::as_str),
            Some("kubelet")
        );
        assert_eq!(parse("{}"), Err(ParseError::NoCursor));
        assert!(matches!(parse("nope"), Err(ParseError::NotJson(_))));
    }

    #[test]
    fn selects_warnings_oom_and_runtime_errors() {
        let rules = Rules::new(4, &["kubelet", "containerd.service"]);
        let entry = |prio: u32, unit: &str, ident: &str, transport: &str, msg: &str| Entry {
            priority: prio,
            unit: unit.into(),
            identifier: ident.into(),
            transport: transport.into(),
            message: msg.into(),
            ..Default::default()
        };
        assert_eq!(
            rules.select(&entry(4, "", "x", "journal", "disk almost full")),
            Some(Selected::Entry)
        );
        assert_eq!(
            rules.select(&entry(6, "cron.service", "cron", "syslog", "ok")),
            None
        );
        let oom = "Memory cgroup out of memory: Killed process 4242 (tail) total-vm:52108kB, anon-rss:31284kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:108kB oom_score_adj:0";
        assert_eq!(
            rules.select(&entry(3, "", "kernel", "kernel", oom)),
            Some(Selected::OomKill)
        );
        assert_eq!(oom_victim(oom), Some((4242, "tail".into())));
        assert_eq!(
            rules.select(&entry(
                6,
                "",
                "kernel",
                "kernel",
                "oom-kill:constraint=CONSTRAINT_MEMCG,task=tail,pid=4242,uid=0"
            )),
            Some(Selected::Entry)
        );
        // kubelet's stderr lands at priority 6: matched on unit + klog text.
        let klog =
            "E1127 08:15:02.123456    812 kubelet.go:2855] \"Container runtime network not ready\"";
        assert_eq!(
            rules.select(&entry(6, "kubelet.service", "kubelet", "stdout", klog)),
            Some(Selected::Entry)
        );
        assert_eq!(
            rules.select(&entry(6, "", "kubelet", "stdout", klog)),
            Some(Selected::Entry)
        );
        let info = "I1127 08:15:02.123456    812 kubelet.go:2855] fine";
        assert_eq!(
            rules.select(&entry(6, "kubelet.service", "kubelet", "stdout", info)),
            None
        );
        let logrus = "time=\"2026-11-27T08:15:02Z\" level=error msg=\"failed to pull\"";
        assert_eq!(
            rules.select(&entry(
                6,
                "containerd.service",
                "containerd",
                "stdout",
                logrus
            )),
            Some(Selected::Entry)
        );
        // The same text from a unit nobody asked about is not selected.
        assert_eq!(
            rules.select(&entry(6, "cron.service", "cron", "stdout", logrus)),
            None
        );
        assert!(is_error_text(r#"{"level":"error","msg":"x"}"#));
        assert!(is_error_text("F1127 08:15:02.1 1 x] fatal"));
        assert!(!is_error_text("Error: starts with E but is not klog"));
    }

    #[test]
    fn ids_come_from_the_cursor_position() {
        assert_eq!(
            cursor_position(CURSOR),
            Some(("0fb8e6b1c7a24b5b9f0c5ba7a1b2c3d4", "1a2"))
        );
        // Same position (the realtime/monotonic parts may differ in form): same id.
        let same = "s=0fb8e6b1c7a24b5b9f0c5ba7a1b2c3d4;i=1a2;b=x;m=1;t=2;x=3";
        assert_eq!(event_id(CURSOR), event_id(same));
        let next = "s=0fb8e6b1c7a24b5b9f0c5ba7a1b2c3d4;i=1a3;b=x;m=1;t=2;x=3";
        assert_ne!(event_id(CURSOR), event_id(next));
        assert_eq!(event_id("opaque"), event_id("opaque"));
    }
}
