//! Can this host run the collector? Answers plainly, for `tidewatch up` and
//! the collector's own start-up message.

use std::path::Path;

/// Capability numbers (linux/capability.h).
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities from `/proc/<pid>/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// `(major, minor)` from a kernel release string (`6.18.44-fc`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Why the collector cannot run here, if it cannot: missing capabilities,
/// no BTF, or a kernel older than 5.8 (BPF ring buffer).
pub fn check() -> Result<(), String> {
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_caps(&s))
        .unwrap_or(0);
    check_with(
        caps,
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .as_deref()
            .and_then(kernel_version),
    )
}

/// [`check`] with the host's facts passed in.
pub fn check_with(caps: u64, btf: bool, kernel: Option<(u32, u32)>) -> Result<(), String> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN covers BPF and PERFMON on every kernel.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    // Only kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    if !has(CAP_SYS_RESOURCE) && kernel.is_none_or(|v| v < (5, 11)) {
        missing.push("CAP_SYS_RESOURCE");
    }
    let mut reasons = Vec::new();
    if !missing.is_empty() {
        reasons.push(format!(
            "missing {} (run as root, or grant them)",
            missing.join(", ")
        ));
    }
    if !btf {
        reasons.push(
            "no BTF at /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF)".into(),
        );
    }
    match kernel {
        Some(v) if v < (5, 8) => reasons.push(format!(
            "kernel {}.{} is older than 5.8 (no BPF ring buffer)",
            v.0, v.1
        )),
        _ => {}
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the eBPF collector cannot run here: {}",
            reasons.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_caps_and_versions() {
        assert_eq!(
            effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
    }

    #[test]
    fn says_plainly_why_not() {
        assert!(check_with(0x1ff_ffff_ffff, true, Some((6, 1))).is_ok());
        let bpf_only = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_RESOURCE);
        assert!(check_with(bpf_only, true, Some((5, 15))).is_ok());
        // From 5.11 maps are charged to the memory cgroup, not RLIMIT_MEMLOCK.
        let no_resource = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert!(check_with(no_resource, true, Some((6, 18))).is_ok());
        assert!(check_with(no_resource, true, Some((5, 10))).is_err());
        let err = check_with(0, false, Some((5, 4))).expect_err("nothing works");
        assert!(
            err.contains("CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE"),
            "{err}"
        );
        assert!(err.contains("no BTF"), "{err}");
        assert!(err.contains("older than 5.8"), "{err}");
    }
}
