//! `tidewatch own-dir`: hand a hostPath directory to a non-root collector.
//! kubelet creates a missing hostPath directory as root 0755, and a spool
//! written by an older, root collector holds root's files; the systemd
//! collector's init container (root, only `CAP_CHOWN`) runs this first.
//!
//! The directory is on the node and the previous collector could write it,
//! so nothing here follows a symlink, and a file with more than one link
//! (possibly a hard link to a file elsewhere on the node) is left as it is.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct OwnDirArgs {
    /// The new owner.
    #[arg(long)]
    uid: u32,
    /// The new group.
    #[arg(long)]
    gid: u32,
    /// The directory (not a symlink); it becomes mode 0700.
    dir: PathBuf,
}

pub fn run(args: OwnDirArgs) -> anyhow::Result<()> {
    own(&args.dir, args.uid, args.gid)
}

/// Give `dir` and what is in it to `uid`:`gid`. A directory they already
/// own is theirs, contents included (root without `CAP_DAC_READ_SEARCH`
/// could not even list its 0700 directory).
pub fn own(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "{} is not a directory", dir.display());
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    // Contents first: once the directory is the user's (0700), root without
    // CAP_DAC_OVERRIDE can no longer read it.
    hand_over_contents(dir, uid, gid)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", dir.display()))?;
    println!("{} is now {uid}:{gid}, mode 0700", dir.display());
    Ok(())
}

fn hand_over_contents(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.uid() == uid && meta.gid() == gid {
            continue;
        }
        if meta.file_type().is_symlink() {
            eprintln!("{}: a symlink, left alone", path.display());
            continue;
        }
        if meta.is_dir() {
            hand_over_contents(&path, uid, gid)?;
        } else if !meta.is_file() || meta.nlink() > 1 {
            eprintln!(
                "{}: not a plain file with one link, left alone",
                path.display()
            );
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_over_without_following_links() {
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(1)
            != 0
        {
            eprintln!("SKIPPED hands_over_without_following_links: needs root (chown)");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "node file").expect("write");
        let spool = tmp.path().join("spool");
        std::fs::create_dir_all(spool.join("segments")).expect("mkdir");
        std::fs::write(spool.join("journal.cursor"), "s=1").expect("write");
        std::fs::write(spool.join("segments/1.seg"), "x").expect("write");
        std::os::unix::fs::symlink(&outside, spool.join("link")).expect("symlink");
        std::fs::hard_link(&outside, spool.join("hard")).expect("hard link");

        own(&spool, 65534, 65534).expect("own");
        let owner = |p: &Path| {
            let m = std::fs::symlink_metadata(p).expect("stat");
            (m.uid(), m.gid())
        };
        assert_eq!(owner(&spool), (65534, 65534));
        assert_eq!(
            std::fs::metadata(&spool).expect("stat").mode() & 0o777,
            0o700
        );
        assert_eq!(owner(&spool.join("journal.cursor")), (65534, 65534));
        assert_eq!(owner(&spool.join("segments")), (65534, 65534));
        assert_eq!(owner(&spool.join("segments/1.seg")), (65534, 65534));
        // Neither the symlink's target nor a hard-linked node file changed hands.
        assert_eq!(owner(&outside), (0, 0));
        // Already theirs: nothing to do, and nothing fails.
        own(&spool, 65534, 65534).expect("again");
        // A symlink is never a directory to own.
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("dirlink")).expect("symlink");
        assert!(own(&tmp.path().join("dirlink"), 65534, 65534).is_err());
    }
}
