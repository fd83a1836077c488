//! The journal cursor: which entry was acknowledged last, and when to write
//! it down. Entries are acknowledged strictly in journal order (the
//! committer awaits each one's stream ack in turn), so the saved cursor
//! never runs ahead of what the stream holds: a restart at any moment
//! neither skips an entry nor (thanks to deterministic ids) stores one twice.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Cursor bookkeeping, pure: `acked` is the newest entry whose event the
/// stream acknowledged (or that needed no event); `saved` what is on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub acked: Option<String>,
    pub saved: Option<String>,
    /// Acknowledged since the last save.
    pub unsaved: u64,
}

/// Write the cursor after at most this many acknowledged entries, even
/// while entries keep coming.
pub const SAVE_EVERY: u64 = 256;

impl Checkpoint {
    pub fn resume(saved: Option<String>) -> Checkpoint {
        Checkpoint {
            acked: saved.clone(),
            saved,
            unsaved: 0,
        }
    }

    /// The entry at `cursor` is done (its event stored, or no event needed).
    /// `true` when it is time to save (`idle`: nothing else is waiting).
    pub fn ack(&mut self, cursor: String, idle: bool) -> bool {
        self.acked = Some(cursor);
        self.unsaved += 1;
        idle || self.unsaved >= SAVE_EVERY
    }

    /// What to write now, if anything changed since the last save.
    pub fn to_save(&self) -> Option<&str> {
        match (&self.acked, &self.saved) {
            (Some(a), Some(s)) if a == s => None,
            (Some(a), _) => Some(a),
            (None, _) => None,
        }
    }

    pub fn saved(&mut self) {
        self.saved = self.acked.clone();
        self.unsaved = 0;
    }
}

/// The cursor file.
#[derive(Debug, Clone)]
pub struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    pub fn new(path: &Path) -> CursorFile {
        CursorFile {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved cursor; `None` when there is none yet.
    pub fn load(&self) -> std::io::Result<Option<String>> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replace the file atomically (write a temp file, fsync, rename).
    pub fn store(&self, cursor: &str) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(cursor.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_when_idle_or_after_a_batch_and_only_what_changed() {
        let mut c = Checkpoint::resume(Some("c0".into()));
        assert_eq!(c.to_save(), None);
        assert!(!c.ack("c1".into(), false));
        assert!(c.ack("c2".into(), true));
        assert_eq!(c.to_save(), Some("c2"));
        c.saved();
        assert_eq!(c.to_save(), None);
        let mut due = false;
        for i in 0..SAVE_EVERY {
            due = c.ack(format!("d{i}"), false);
        }
        assert!(due);
        assert_eq!(Checkpoint::default().to_save(), None);
    }

    #[test]
    fn the_file_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = CursorFile::new(&dir.path().join("sub/journal.cursor"));
        assert_eq!(file.load().expect("no file yet"), None);
        file.store("s=a;i=1").expect("store");
        file.store("s=a;i=2").expect("store");
        assert_eq!(file.load().expect("load").as_deref(), Some("s=a;i=2"));
    }
}
