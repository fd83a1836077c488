//! `tidewatch spool-dir`: give a collector's hostPath spool directory to
//! the non-root user the collector runs as. The k8s collector's
//! initContainer runs it: kubelet creates a `DirectoryOrCreate` hostPath
//! as root, mode 0755, and `fsGroup` does not apply to hostPath volumes,
//! so without this the collector (uid 65532) could not write its spool.
//! The image has no shell or `chown`, hence a subcommand.

use std::path::PathBuf;

use anyhow::{Context, bail};

#[derive(clap::Args, Debug)]
pub struct SpoolDirArgs {
    /// Owner to give the directory, `UID:GID`.
    #[arg(long, default_value = "65532:65532")]
    owner: String,
    /// The directory (created if missing).
    dir: PathBuf,
}

/// `UID:GID` as numbers.
fn parse_owner(owner: &str) -> anyhow::Result<(u32, u32)> {
    let Some((uid, gid)) = owner.split_once(':') else {
        bail!("--owner must be UID:GID, got {owner:?}");
    };
    let uid = uid.parse().with_context(|| format!("uid in {owner:?}"))?;
    let gid = gid.parse().with_context(|| format!("gid in {owner:?}"))?;
    Ok((uid, gid))
}

pub fn run(args: SpoolDirArgs) -> anyhow::Result<()> {
    let (uid, gid) = parse_owner(&args.owner)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    // Only the directory: what is inside was written by the collector, as
    // that user, already. Idempotent (needs CAP_CHOWN, nothing else).
    std::os::unix::fs::chown(&args.dir, Some(uid), Some(gid))
        .with_context(|| format!("chown {uid}:{gid} {}", args.dir.display()))?;
    println!("{} owned by {uid}:{gid}", args.dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_numeric_pairs() {
        assert_eq!(parse_owner("65532:65532").ok(), Some((65532, 65532)));
        assert!(parse_owner("65532").is_err());
        assert!(parse_owner("nonroot:1").is_err());
    }
}
