//! Attribution: cgroup id → cgroup path → container id → pod uid.
//!
//! The kernel gives each event the id of the task's cgroup v2 cgroup (the
//! inode number of its directory in the cgroup2 mount). [`Resolver`] maps ids
//! to paths by walking the cgroup2 tree (cached; a miss rescans, at most
//! once per [`RESCAN_EVERY`]), and falls back to `/proc/<pid>/cgroup` for
//! cgroup v1 hierarchies. [`parse_path`] is the pure part: it recognises the
//! path shapes of the kubelet's cgroupfs and systemd drivers, containerd,
//! CRI-O and docker.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a cgroup path says about the container and pod it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attribution {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    /// `containerd`, `crio`, `docker`, or `unknown` when only a bare id was found.
    pub runtime: Option<&'static str>,
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// A pod uid (`8-4-4-4-12` hex; systemd writes `_` for `-`).
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let parts: Vec<&str> = uid.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    (parts.len() == 5
        && parts
            .iter()
            .zip(shape)
            .all(|(p, n)| p.len() == n && p.bytes().all(|c| c.is_ascii_hexdigit())))
    .then_some(uid)
}

/// Container id and runtime from one path component.
fn container(component: &str) -> Option<(String, &'static str)> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    for (prefix, runtime) in [
        ("cri-containerd-", "containerd"),
        ("crio-", "crio"),
        ("docker-", "docker"),
        ("libpod-", "podman"),
    ] {
        if let Some(id) = name.strip_prefix(prefix) {
            // crio-conmon-<id> is the monitor process, not the container.
            return is_hex_id(id).then(|| (id.to_string(), runtime));
        }
    }
    is_hex_id(name).then(|| (name.to_string(), "unknown"))
}

/// Recognise the container id and pod uid in a cgroup path (v1 or v2).
pub fn parse_path(path: &str) -> Attribution {
    let mut out = Attribution::default();
    for component in path.split('/').filter(|c| !c.is_empty()) {
        // systemd driver: kubepods-burstable-pod<uid>.slice (also kubelet-kubepods-…)
        if let Some(slice) = component.strip_suffix(".slice")
            && let Some((_, uid)) = slice.rsplit_once("-pod")
            && let Some(uid) = pod_uid(uid)
        {
            out.pod_uid = Some(uid);
            continue;
        }
        // cgroupfs driver: pod<uid>
        if let Some(uid) = component.strip_prefix("pod").and_then(pod_uid) {
            out.pod_uid = Some(uid);
            continue;
        }
        if let Some((id, runtime)) = container(component) {
            out.container_id = Some(id);
            out.runtime = Some(runtime);
        }
    }
    // A bare 64-hex directory under a pod is the container (cgroupfs driver);
    // the runtime is then only known for docker's /docker/<id>.
    if out.runtime == Some("unknown") && path.starts_with("/docker/") {
        out.runtime = Some("docker");
    }
    out
}

/// The most specific cgroup path in a `/proc/<pid>/cgroup` file: the v2
/// (`0::`) path when it names a container, else the first v1 path that does
/// (hybrid hosts keep containers in v1 hierarchies), else the v2 path.
pub fn path_from_proc_cgroup(text: &str) -> Option<String> {
    let mut v2 = None;
    let mut v1_container = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" {
            v2 = Some(path.to_string());
        } else if v1_container.is_none() && parse_path(path).container_id.is_some() {
            v1_container = Some(path.to_string());
        }
    }
    match (&v2, v1_container) {
        (Some(p), _) if parse_path(p).container_id.is_some() => v2,
        (_, Some(v1)) => Some(v1),
        _ => v2,
    }
}

/// Where the cgroup2 hierarchy is mounted, from `/proc/self/mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cgroup2 mount of this host.
pub fn cgroup2_root() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| cgroup2_mount(&m))
}

/// The cgroup v2 id of a cgroup directory (what `bpf_get_current_cgroup_id` returns).
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// Least time between two rescans of the cgroup tree on cache misses.
pub const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// A resolved cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    /// Path relative to the cgroup2 mount (`/kubepods.slice/…`), empty if unknown.
    pub path: String,
    pub attribution: Attribution,
}

/// Cached cgroup id → path → attribution.
pub struct Resolver {
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
    /// Attribution per cgroup id, for ids whose v2 path names a container.
    resolved: HashMap<u64, Resolved>,
    /// Attribution from `/proc/<pid>/cgroup`, for processes whose v2 cgroup
    /// says nothing (hybrid hosts keep containers in v1 hierarchies); read
    /// once per process, so an exit can still be attributed after /proc is gone.
    by_pid: HashMap<u32, Resolved>,
    last_scan: Option<Instant>,
}

/// Entries kept per cache before it is cleared (bounded memory).
const CACHE_LIMIT: usize = 65_536;

impl Resolver {
    pub fn new(root: Option<PathBuf>) -> Resolver {
        Resolver {
            root,
            by_id: HashMap::new(),
            resolved: HashMap::new(),
            by_pid: HashMap::new(),
            last_scan: None,
        }
    }

    /// Resolve a cgroup id; `pid` is used for the `/proc/<pid>/cgroup`
    /// fallback (cgroup v1 hierarchies, or a cgroup not in the v2 tree).
    pub fn resolve(&mut self, cgroup_id: u64, pid: u32) -> Resolved {
        if let Some(r) = self.resolved.get(&cgroup_id) {
            return r.clone();
        }
        let mut path = self.by_id.get(&cgroup_id).cloned();
        if path.is_none() && self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            self.rescan();
            path = self.by_id.get(&cgroup_id).cloned();
        }
        let path = path.unwrap_or_default();
        let attribution = parse_path(&path);
        if attribution.container_id.is_some() {
            let r = Resolved { path, attribution };
            if self.resolved.len() >= CACHE_LIMIT {
                self.resolved.clear();
            }
            self.resolved.insert(cgroup_id, r.clone());
            return r;
        }
        if pid == 0 {
            return Resolved { path, attribution };
        }
        if let Some(r) = self.by_pid.get(&pid) {
            return r.clone();
        }
        let from_proc = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| path_from_proc_cgroup(&t))
            .map(|p| (parse_path(&p), p));
        let r = match from_proc {
            Some((a, p)) if a.container_id.is_some() => Resolved {
                path: p,
                attribution: a,
            },
            Some((_, p)) if path.is_empty() => Resolved {
                path: p,
                attribution,
            },
            _ => Resolved { path, attribution },
        };
        if self.by_pid.len() >= CACHE_LIMIT {
            self.by_pid.clear();
        }
        self.by_pid.insert(pid, r.clone());
        r
    }

    /// Forget a process (after its exit was attributed).
    pub fn forget_pid(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }

    /// Walk the cgroup2 tree and rebuild the id → path map (invalidating
    /// removed cgroups).
    pub fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        let mut map = HashMap::with_capacity(self.by_id.len().max(64));
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(id) = cgroup_id(&dir) {
                let rel = dir
                    .strip_prefix(&root)
                    .map(|p| format!("/{}", p.display()))
                    .unwrap_or_default();
                map.insert(id, if rel == "/" { "/".into() } else { rel });
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
        }
        self.by_id = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "8f6a1c2b3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";
    const UID: &str = "0b5e7c1a-3f2d-4c6b-9a8e-1d2c3b4a5f60";

    fn uid_systemd() -> String {
        UID.replace('-', "_")
    }

    #[test]
    fn systemd_driver_containerd_v2() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            uid_systemd()
        );
        let a = parse_path(&path);
        assert_eq!(a.container_id.as_deref(), Some(CID));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
        assert_eq!(a.runtime, Some("containerd"));
    }

    #[test]
    fn systemd_driver_guaranteed_crio() {
        let path = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{CID}.scope",
            uid_systemd()
        );
        let a = parse_path(&path);
        assert_eq!(a.container_id.as_deref(), Some(CID));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
        assert_eq!(a.runtime, Some("crio"));
    }

    #[test]
    fn crio_conmon_is_not_the_container() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-conmon-{CID}.scope",
            uid_systemd()
        );
        let a = parse_path(&path);
        assert_eq!(a.container_id, None);
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn kind_nested_kubelet_slice() {
        let path = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope",
            uid_systemd()
        );
        let a = parse_path(&path);
        assert_eq!(a.container_id.as_deref(), Some(CID));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_driver_v1_and_v2() {
        for path in [
            format!("/kubepods/burstable/pod{UID}/{CID}"),
            format!("/kubepods/pod{UID}/{CID}"),
            format!("/kubepods/besteffort/pod{UID}/{CID}"),
        ] {
            let a = parse_path(&path);
            assert_eq!(a.container_id.as_deref(), Some(CID), "{path}");
            assert_eq!(a.pod_uid.as_deref(), Some(UID), "{path}");
        }
        let a = parse_path(&format!("/kubepods/burstable/pod{UID}/crio-{CID}"));
        assert_eq!(a.runtime, Some("crio"));
    }

    #[test]
    fn docker_outside_kubernetes() {
        let a = parse_path(&format!("/system.slice/docker-{CID}.scope"));
        assert_eq!(a.container_id.as_deref(), Some(CID));
        assert_eq!(a.pod_uid, None);
        assert_eq!(a.runtime, Some("docker"));
        let a = parse_path(&format!("/docker/{CID}"));
        assert_eq!(a.runtime, Some("docker"));
    }

    #[test]
    fn host_processes_have_no_container() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "",
        ] {
            assert_eq!(parse_path(path), Attribution::default(), "{path}");
        }
    }

    #[test]
    fn proc_cgroup_prefers_the_container_path() {
        let v2 = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope\n",
            uid_systemd()
        );
        assert!(path_from_proc_cgroup(&v2).expect("path").contains(CID));
        let hybrid = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n0::/\n"
        );
        assert_eq!(
            path_from_proc_cgroup(&hybrid),
            Some(format!("/kubepods/burstable/pod{UID}/{CID}"))
        );
        assert_eq!(
            path_from_proc_cgroup("0::/user.slice\n"),
            Some("/user.slice".into())
        );
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(v2), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn resolver_maps_real_cgroup_ids_to_paths() {
        let Some(root) = cgroup2_root() else { return };
        let mut r = Resolver::new(Some(root.clone()));
        let id = cgroup_id(&root).expect("root id");
        assert_eq!(r.resolve(id, 0).path, "/");
    }
}
