//! Can this host run the collector? `--check-host` answers in one plain
//! line, for `tidewatch up`: the system D-Bus must answer and a journal
//! must be there to read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// Why the collector cannot run here, if it cannot.
pub async fn check(config: &Config) -> Result<(), String> {
    let address = config.dbus_address();
    let dbus = match tokio::time::timeout(Duration::from_secs(5), async {
        let conn = crate::dbus::connect(&address).await?;
        crate::dbus::system_state(&conn).await
    })
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("no systemd on the system D-Bus at {address} ({e})")),
        Err(_) => Err(format!(
            "the system D-Bus at {address} did not answer within 5 s"
        )),
    };
    let journal = journal_present(config).and_then(|()| journal_readable(config));
    verdict(dbus, journal)
}

/// One line saying everything that is missing.
pub fn verdict(dbus: Result<(), String>, journal: Result<(), String>) -> Result<(), String> {
    let reasons: Vec<String> = [dbus.err(), journal.err()].into_iter().flatten().collect();
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the systemd collector cannot run here: {}",
            reasons.join("; ")
        ))
    }
}

/// Directories a journal is looked for in.
pub fn journal_dirs(config: &Config) -> Vec<PathBuf> {
    match &config.journal_directory {
        Some(dir) => vec![dir.clone()],
        None => vec![
            config.host_root.join("var/log/journal"),
            config.host_root.join("run/log/journal"),
        ],
    }
}

/// What a look for journal files found.
enum Scan {
    /// The first journal file (in name order).
    File(PathBuf),
    /// A directory this process may not list (journald's per-machine
    /// directory is group `systemd-journal`, mode 2750): files may well be
    /// there, for a reader in that group.
    Unreadable(PathBuf),
    Nothing,
}

fn scan(dir: &Path, depth: u32) -> Scan {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Scan::Unreadable(dir.to_path_buf());
        }
        Err(_) => return Scan::Nothing,
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut unreadable = None;
    for path in paths {
        if path.extension().is_some_and(|x| x == "journal") {
            return Scan::File(path);
        }
        if depth > 0 && path.is_dir() {
            match scan(&path, depth - 1) {
                Scan::File(file) => return Scan::File(file),
                Scan::Unreadable(d) => unreadable = unreadable.or(Some(d)),
                Scan::Nothing => {}
            }
        }
    }
    unreadable.map_or(Scan::Nothing, Scan::Unreadable)
}

/// A journal file exists where the collector will read, and `journalctl` runs.
pub fn journal_present(config: &Config) -> Result<(), String> {
    if !config.journal {
        return Ok(());
    }
    let dirs = journal_dirs(config);
    if dirs.iter().all(|d| matches!(scan(d, 1), Scan::Nothing)) {
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(format!("no journal files under {}", names.join(" or ")));
    }
    match std::process::Command::new(&config.journalctl)
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{} --version failed ({})",
            config.journalctl.display(),
            o.status
        )),
        Err(e) => Err(format!("cannot run {}: {e}", config.journalctl.display())),
    }
}

/// This process may read the journal files. Why check: the collector runs
/// as a non-root user whose only way in is the host's `systemd-journal`
/// group, whose gid differs between distributions, and `journalctl` given
/// unreadable files just prints a warning and follows nothing. So a wrong
/// gid is said at start, with the gid the files do have.
pub fn journal_readable(config: &Config) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    if !config.journal {
        return Ok(());
    }
    let mut found = None;
    for dir in journal_dirs(config) {
        match scan(&dir, 1) {
            Scan::File(file) => {
                found = Some(file);
                break;
            }
            Scan::Unreadable(d) => found = found.or(Some(d)),
            Scan::Nothing => {}
        }
    }
    let Some(file) = found else {
        return Ok(());
    };
    // A file to open, or a directory this process could not list.
    let opened = if file.is_dir() {
        std::fs::read_dir(&file).map(drop)
    } else {
        std::fs::File::open(&file).map(drop)
    };
    match opened {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let meta = std::fs::metadata(&file).ok();
            let gid = meta.as_ref().map(|m| m.gid());
            let mode = meta.as_ref().map(|m| m.mode() & 0o777).unwrap_or_default();
            let gid_text = gid.map(|g| g.to_string()).unwrap_or_else(|| "?".into());
            Err(format!(
                "cannot read the journal: {} is group {gid_text}, mode {mode:o}, and uid {} is not in group {gid_text} \
(add it as a supplementary group: tidewatch render --systemd-journal-gid {gid_text})",
                file.display(),
                current_uid(),
            ))
        }
        Err(e) => Err(format!("cannot read the journal: {}: {e}", file.display())),
    }
}

/// This process's uid (the owner of `/proc/self`).
fn current_uid() -> String {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_plainly_why_not() {
        assert!(verdict(Ok(()), Ok(())).is_ok());
        let err = verdict(Err("no bus".into()), Err("no journal".into())).expect_err("both");
        assert_eq!(
            err,
            "the systemd collector cannot run here: no bus; no journal"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn finds_journal_files_one_level_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            journal_directory: Some(dir.path().to_path_buf()),
            ..Config::default()
        };
        let err = journal_present(&config).expect_err("empty");
        assert!(err.contains("no journal files under"), "{err}");
        let machine = dir.path().join("3d1219c7c4c5404aaa1f6d2a48adfda4");
        std::fs::create_dir_all(&machine).expect("mkdir");
        std::fs::write(machine.join("system.journal"), b"").expect("write");
        assert!(matches!(scan(dir.path(), 1), Scan::File(_)));
    }
}
