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
    let journal = journal_present(config);
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

fn has_journal_files(dir: &Path, depth: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|e| {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "journal") {
            return true;
        }
        depth > 0 && path.is_dir() && has_journal_files(&path, depth - 1)
    })
}

/// A journal file exists where the collector will read, and `journalctl` runs.
pub fn journal_present(config: &Config) -> Result<(), String> {
    if !config.journal {
        return Ok(());
    }
    let dirs = journal_dirs(config);
    if !dirs.iter().any(|d| has_journal_files(d, 1)) {
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
        assert!(has_journal_files(dir.path(), 1));
    }
}
