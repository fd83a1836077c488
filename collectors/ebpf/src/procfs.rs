//! Replay of already running processes from /proc, emitted once at start as
//! `process.exists` so consumers know what ran before the collector did.

use std::path::Path;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ; 100 on Linux).
const USER_HZ: u64 = 100;

/// A running process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcProcess {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    pub filename: String,
    pub argv: Vec<String>,
    /// Start time since boot, in nanoseconds.
    pub start_since_boot_ns: u64,
    /// `/proc/<pid>/cgroup` text.
    pub cgroup: String,
}

/// Parse `/proc/<pid>/stat`: (comm, ppid, starttime ticks).
pub fn parse_stat(stat: &str) -> Option<(String, u32, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // After comm: state(0) ppid(1) ... starttime is field 22 overall → index 19 here.
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((comm, ppid, start))
}

/// The real uid from `/proc/<pid>/status`.
pub fn parse_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// Read one process; `None` if it vanished meanwhile (or is a kernel thread
/// with nothing to say). `exe`: also resolve `/proc/<pid>/exe`, which needs
/// ptrace read access to the process; without it the path stays empty and
/// nothing is attempted (a denied attempt is an audit record per process
/// under AppArmor or SELinux).
pub fn read_process(proc_dir: &Path, pid: u32, exe: bool) -> Option<ProcProcess> {
    let dir = proc_dir.join(pid.to_string());
    let (comm, ppid, start) = parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let uid = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| parse_uid(&s))
        .unwrap_or(0);
    let argv = std::fs::read(dir.join("cmdline"))
        .map(|raw| crate::wire::split_args(&raw))
        .unwrap_or_default();
    let filename = if exe {
        std::fs::read_link(dir.join("exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Some(ProcProcess {
        pid,
        ppid,
        uid,
        comm,
        filename,
        argv,
        start_since_boot_ns: start.saturating_mul(1_000_000_000 / USER_HZ),
        cgroup: std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default(),
    })
}

/// Every process (thread-group leader) in `/proc`.
pub fn processes(proc_dir: &Path, exe: bool) -> Vec<ProcProcess> {
    let Ok(entries) = std::fs::read_dir(proc_dir) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .filter_map(|pid| read_process(proc_dir, pid, exe))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let stat = "1234 (my (weird) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        let (comm, ppid, start) = parse_stat(stat).expect("parses");
        assert_eq!(comm, "my (weird) proc");
        assert_eq!(ppid, 1);
        assert_eq!(start, 98765);
    }

    #[test]
    fn uid_line() {
        assert_eq!(
            parse_uid("Name:\tx\nUid:\t1000\t1000\t1000\t1000\n"),
            Some(1000)
        );
    }

    #[test]
    fn reads_this_process() {
        let me = read_process(Path::new("/proc"), std::process::id(), true).expect("self");
        assert_eq!(me.pid, std::process::id());
        assert!(!me.argv.is_empty());
        assert!(!me.filename.is_empty());
        assert!(
            processes(Path::new("/proc"), false)
                .iter()
                .any(|p| p.pid == 1)
        );
        // Without `exe` nothing that needs ptrace access is read.
        let me = read_process(Path::new("/proc"), std::process::id(), false).expect("self");
        assert!(me.filename.is_empty() && !me.argv.is_empty());
    }
}
