//! `tidewatch new function` in a copy of this repository: the scaffolded
//! crate compiles and passes its own test, it is in the topology (so `up`
//! runs it), and its manifests and README section are there.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::binary;

/// Copy the repository's files (tracked, and new ones not ignored) into `to`.
fn copy_repo(from: &Path, to: &Path) {
    let listing = Command::new("git")
        .args(["ls-files", "-co", "--exclude-standard", "-z"])
        .current_dir(from)
        .output()
        .expect("git runs");
    assert!(
        listing.status.success(),
        "git ls-files: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    for file in listing.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let relative = Path::new(std::str::from_utf8(file).expect("utf-8 path"));
        let source = from.join(relative);
        if !source.is_file() {
            continue;
        }
        let target = to.join(relative);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&source, &target)
            .unwrap_or_else(|e| panic!("copy {}: {e}", relative.display()));
    }
}

/// A target dir for the copy that reuses this build's compiled registry
/// crates (hard links: nothing is copied or rebuilt) but none of the
/// workspace's own, which the copy builds afresh from its own sources.
/// Sharing the target dir itself would not do: the copy's crates have the
/// same names and hashes as ours and would overwrite them.
fn seeded_target_dir(ours: &Path, into: &Path) {
    fn link_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read dir").flatten() {
            let (source, target) = (entry.path(), to.join(entry.file_name()));
            if source.is_dir() {
                link_tree(&source, &target);
            } else if std::fs::hard_link(&source, &target).is_err() {
                std::fs::copy(&source, &target).expect("copy");
            }
        }
    }
    for sub in ["deps", "build", ".fingerprint"] {
        let Ok(entries) = std::fs::read_dir(ours.join(sub)) else {
            continue;
        };
        let to = into.join(sub);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains("tidewatch") {
                continue;
            }
            let source = entry.path();
            if source.is_dir() {
                link_tree(&source, &to.join(&name));
            } else if std::fs::hard_link(&source, to.join(&name)).is_err() {
                std::fs::copy(&source, to.join(&name)).expect("copy");
            }
        }
    }
}

#[test]
fn a_scaffolded_function_builds_passes_its_test_and_is_wired_in() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let temp = tempfile::tempdir().expect("temp dir");
    let copy = temp.path().join("main");
    copy_repo(&repo, &copy);

    let output = Command::new(binary("tidewatch"))
        .args([
            "new",
            "function",
            "siem",
            "--from",
            "insights",
            "--types",
            "dev.tidewatch.insight.*",
            "--repo",
        ])
        .arg(&copy)
        .output()
        .expect("tidewatch new function runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let topology = std::fs::read_to_string(copy.join("runtime/src/topology.rs")).expect("topology");
    assert!(
        topology.contains("pub const SIEM: FunctionSpec"),
        "spec added"
    );
    assert!(
        topology.contains("    SIEM,\n"),
        "listed in FUNCTIONS, which `up` runs"
    );
    assert!(
        std::fs::read_to_string(copy.join("Cargo.toml"))
            .expect("manifest")
            .contains("\"functions/siem\"")
    );
    let keda =
        std::fs::read_to_string(copy.join("keda/siem.yaml")).expect("keda manifest rendered");
    assert!(
        keda.contains("consumer: siem") && keda.contains("stream: TIDEWATCH_INSIGHTS"),
        "{keda}"
    );
    assert!(copy.join("knative/siem.yaml").is_file());
    assert!(
        std::fs::read_to_string(copy.join("keda/kustomization.yaml"))
            .expect("kustomization")
            .contains("siem.yaml")
    );
    assert!(
        std::fs::read_to_string(copy.join("deploy/nats.yaml"))
            .expect("nats")
            .contains("user: siem"),
        "a NATS user for it"
    );
    assert!(
        std::fs::read_to_string(copy.join("README.md"))
            .expect("README")
            .contains("### siem")
    );

    // A second scaffold with the same name is refused, naming the problem.
    let again = Command::new(binary("tidewatch"))
        .args(["new", "function", "siem", "--repo"])
        .arg(&copy)
        .output()
        .expect("runs");
    assert!(!again.status.success());

    // The scaffolded crate compiles and its own tests pass.
    let profile_dir = binary("tidewatch")
        .parent()
        .expect("profile dir")
        .to_path_buf();
    let target_dir = temp.path().join("target");
    seeded_target_dir(&profile_dir, &target_dir.join("debug"));
    let test = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--quiet", "-p", "tidewatch-siem"])
        .current_dir(&copy)
        .env("CARGO_TARGET_DIR", &target_dir)
        .output()
        .expect("cargo runs");
    assert!(
        test.status.success(),
        "the scaffolded function's test failed:\n{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
