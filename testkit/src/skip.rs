//! Tests that cannot run on this host: visible, never a silent `ok`.
//!
//! libtest hides the stderr of passing tests, so a test that returns early
//! would look tested. [`cannot_run`] fails the test under `CI`; elsewhere it
//! prints the reason and appends `test<TAB>reason` to the file named by
//! `TIDEWATCH_SKIP_LOG`, which `scripts/test` reads to end the run with a
//! list of everything that was not tested.

use std::io::Write;

/// The variable naming the file where skipped tests are recorded.
pub const SKIP_LOG: &str = "TIDEWATCH_SKIP_LOG";

/// Records that `test` cannot run here because of `why`. Panics when `CI` is
/// set: in CI every test must run.
pub fn cannot_run(test: &str, why: &str) {
    let log = std::env::var_os(SKIP_LOG).map(std::path::PathBuf::from);
    if let Err(e) = record(std::env::var_os("CI").is_some(), log.as_deref(), test, why) {
        panic!("{e}");
    }
}

fn record(ci: bool, log: Option<&std::path::Path>, test: &str, why: &str) -> Result<(), String> {
    if ci {
        return Err(format!("CI is set and {test} cannot run here: {why}"));
    }
    eprintln!("SKIPPED {test}: {why}");
    let Some(path) = log else {
        return Ok(());
    };
    let line = format!("{test}\t{}\n", why.replace(['\n', '\t'], " "));
    // One write of a short line to an O_APPEND file: concurrent tests do not
    // interleave.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| {
            format!(
                "{test} is skipped but cannot be recorded in {}: {e}",
                path.display()
            )
        })
}

/// `Ok` when this process runs as root, else why the test needs it.
pub fn require_root(what: &str) -> Result<(), String> {
    if euid_is_root() {
        Ok(())
    } else {
        Err(format!("needs root ({what})"))
    }
}

fn euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_recorded_in_the_log_and_fails_under_ci() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skips");
        record(false, Some(&log), "a::test", "no\tthing\nhere").expect("recorded");
        record(false, Some(&log), "b::test", "why").expect("recorded");
        let text = std::fs::read_to_string(&log).expect("log written");
        assert_eq!(text, "a::test\tno thing here\nb::test\twhy\n");
        let err = record(true, Some(&log), "c::test", "why").expect_err("CI fails");
        assert!(
            err.contains("CI is set and c::test cannot run here: why"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&log).expect("log"), text);
    }
}
