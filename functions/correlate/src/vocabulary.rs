//! The words every rule shares: a [`Finding`] (one version of an insight),
//! a [`Window`] of time as rules files write it, and what an exit code
//! means ([`exit_meaning`]). Rules depend on this module; it depends on none
//! of them.

use std::fmt;

use serde::{Deserialize, Serialize};
use tidewatch_proto::v1::Insight;

/// A duration written as `30s`, `10m`, `2h`, `500ms` or `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window(pub std::time::Duration);

impl Window {
    pub fn nanos(self) -> i64 {
        i64::try_from(self.0.as_nanos()).unwrap_or(i64::MAX)
    }
    pub fn parse(s: &str) -> Result<Window, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("duration {s:?}: expected a number and a unit (30s, 10m, 2h)"))?;
        let per_unit = match unit {
            "ms" => return Ok(Window(std::time::Duration::from_millis(n))),
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            u => {
                return Err(format!(
                    "duration {s:?}: unknown unit {u:?} (ms, s, m, h, d)"
                ));
            }
        };
        let secs = n
            .checked_mul(per_unit)
            .ok_or_else(|| format!("duration {s:?} is too long"))?;
        Ok(Window(std::time::Duration::from_secs(secs)))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        if self.0.subsec_nanos() != 0 {
            write!(f, "{}ms", self.0.as_millis())
        } else if s.is_multiple_of(3600) && s > 0 {
            write!(f, "{}h", s / 3600)
        } else if s.is_multiple_of(60) && s > 0 {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Window::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One version of an insight: the insight, the message id of this version
/// (stable per revision, so redelivery is deduplicated) and its subject.
/// Serializable: claims keep the version they may have to supersede.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub message_id: String,
    /// The entity the insight is about, `<kind>/<key>` (the event subject).
    pub subject: String,
    pub insight: Insight,
}

/// What a restart's exit code means (128 + n = killed by signal n).
pub fn exit_meaning(exit_code: i32, reason: &str) -> String {
    if reason.contains("ImagePull") || reason == "InvalidImageName" {
        return format!("startup failure: the image could not be pulled ({reason})");
    }
    if reason == "OOMKilled" {
        return "killed by the OOM killer: the container exceeded its memory limit".into();
    }
    match exit_code {
        137 => "killed by SIGKILL (exit 137): OOM kill or a failed liveness probe".into(),
        139 => "segmentation fault (SIGSEGV, exit 139): a crash in native code".into(),
        143 => "terminated by SIGTERM (exit 143)".into(),
        134 => "aborted (SIGABRT, exit 134)".into(),
        1 => "application error (exit 1)".into(),
        0 => "exited successfully but keeps being restarted (exit 0)".into(),
        c if c > 128 => format!("killed by signal {} (exit {c})", c - 128),
        c => format!("application exited with code {c}"),
    }
}
