//! A single JetStream-enabled nats-server on ephemeral ports.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::process::ServerProcess;
use crate::{http_get, poll_until};

/// How long [`NatsServer::start`] waits for the server to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One nats-server with JetStream enabled, its client and monitoring ports
/// picked by the server itself (no port races), and its store in a temp dir
/// owned by this struct. Killed and reaped on drop.
#[derive(Debug)]
pub struct NatsServer {
    // Declared before `dir` so the process dies before its store is deleted.
    // `None` while killed (see [`NatsServer::kill`]).
    process: Option<ServerProcess>,
    log_path: PathBuf,
    client_port: u16,
    monitoring_port: u16,
    store_dir: PathBuf,
    dir: TempDir,
}

impl NatsServer {
    /// Start with JetStream, client port and HTTP monitoring port both
    /// ephemeral, store dir in a temp dir owned by the struct.
    ///
    /// Returns once the server accepts client connections (sends `INFO`) and
    /// `/healthz?js-enabled-only=true` answers 200 on the monitoring port.
    ///
    /// # Panics
    ///
    /// If the server exits or is not ready within ~10 s; the message includes
    /// the tail of the server's log.
    pub async fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("tidewatch-nats-")
            .tempdir()
            .expect("create temp dir for nats-server");
        let store_dir = dir.path().join("store");
        let ports_dir = dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir).expect("create ports_file_dir");
        let config = dir.path().join("nats-server.conf");
        std::fs::write(&config, JETSTREAM_LIMITS).expect("write nats-server config");

        // `-p -1` / `-m -1` let the server pick free ports; it reports them in
        // `<ports_dir>/<exe name>_<pid>.ports`.
        let args = [
            OsStr::new("-c"),
            config.as_os_str(),
            OsStr::new("-js"),
            OsStr::new("-a"),
            OsStr::new("127.0.0.1"),
            OsStr::new("-p"),
            OsStr::new("-1"),
            OsStr::new("-m"),
            OsStr::new("-1"),
            OsStr::new("-sd"),
            store_dir.as_os_str(),
            OsStr::new("--ports_file_dir"),
            ports_dir.as_os_str(),
        ];
        let log_path = dir.path().join("server.log");
        let process = ServerProcess::spawn(args, &log_path);
        let (client_port, monitoring_port) =
            wait_ready(&process, |pid| read_ports_file(&ports_dir, pid)).await;

        NatsServer {
            process: Some(process),
            log_path,
            client_port,
            monitoring_port,
            store_dir,
            dir,
        }
    }

    /// Kill the server (SIGKILL), keeping its store and ports: an outage
    /// that [`restart`](Self::restart) ends.
    pub async fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill().await;
        }
    }

    /// Start the server again on the same ports with the same store
    /// (killing it first if it runs), and wait until it is ready.
    ///
    /// # Panics
    ///
    /// If it is not ready within ~10 s (e.g. another process took a port).
    pub async fn restart(&mut self) {
        self.kill().await;
        let (client, monitoring) = (
            self.client_port.to_string(),
            self.monitoring_port.to_string(),
        );
        let config = self.dir.path().join("nats-server.conf");
        let args = [
            OsStr::new("-c"),
            config.as_os_str(),
            OsStr::new("-js"),
            OsStr::new("-a"),
            OsStr::new("127.0.0.1"),
            OsStr::new("-p"),
            OsStr::new(&client),
            OsStr::new("-m"),
            OsStr::new(&monitoring),
            OsStr::new("-sd"),
            self.store_dir.as_os_str(),
        ];
        let process = ServerProcess::spawn(args, &self.log_path);
        let ports = (self.client_port, self.monitoring_port);
        wait_ready(&process, |_| Some(ports)).await;
        self.process = Some(process);
    }

    /// Client URL, e.g. `nats://127.0.0.1:41234`.
    pub fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Client (NATS protocol) port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// HTTP monitoring base URL, e.g. `http://127.0.0.1:41235`.
    pub fn monitoring_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitoring_port)
    }

    /// HTTP monitoring port.
    pub fn monitoring_port(&self) -> u16 {
        self.monitoring_port
    }

    /// The server's store dir (`-sd`); JetStream data lives in `jetstream/`
    /// under it.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The file collecting the server's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last lines of the server's log, handy in assertion messages.
    pub fn log_tail(&self) -> String {
        crate::process::log_tail(&self.log_path)
    }

    /// A client connected to this server.
    ///
    /// # Panics
    ///
    /// If the connection fails.
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.client_url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.client_url()))
    }

    /// A JetStream context on a fresh connection.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.connect().await)
    }

    /// The server's process id (0 while [killed](Self::kill)).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, ServerProcess::pid)
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(ServerProcess::is_running)
    }

    /// The temp dir holding the store, ports file and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Wait until `process` accepts clients (sends `INFO`) and its
/// `/healthz?js-enabled-only=true` answers 200; `ports` finds its (client,
/// monitoring) ports from its pid.
async fn wait_ready(
    process: &ServerProcess,
    ports: impl Fn(u32) -> Option<(u16, u16)>,
) -> (u16, u16) {
    let ready = poll_until(START_TIMEOUT, || async {
        if let Some(status) = process.exit_status() {
            panic!(
                "nats-server exited during startup ({status})\n{}",
                process.log_tail()
            );
        }
        let (client_port, monitoring_port) = ports(process.pid())?;
        if !accepts_clients(client_port).await {
            return None;
        }
        let url = format!("http://127.0.0.1:{monitoring_port}/healthz?js-enabled-only=true");
        match http_get(&url).await {
            Ok((200, _)) => Some((client_port, monitoring_port)),
            _ => None,
        }
    })
    .await;
    ready.unwrap_or_else(|| {
        panic!(
            "nats-server (pid {}) not ready after {START_TIMEOUT:?}\n{}",
            process.pid(),
            process.log_tail()
        )
    })
}

/// Parse the ports file the server writes once it is listening.
///
/// The name is `<executable name>_<pid>.ports` (`nats-server_1234.ports` for
/// the usual binary); only the pid suffix is matched so a renamed binary
/// (via `TIDEWATCH_NATS_SERVER`) works too. A partially written file fails
/// to parse and is simply retried.
fn read_ports_file(dir: &Path, pid: u32) -> Option<(u16, u16)> {
    let suffix = format!("_{pid}.ports");
    let path = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|p| p.to_string_lossy().ends_with(&suffix))?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let port_of = |key: &str| -> Option<u16> {
        let url = json.get(key)?.get(0)?.as_str()?;
        url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
    };
    Some((port_of("nats")?, port_of("monitoring")?))
}

/// Whether the client port accepts a connection and greets with `INFO`.
async fn accepts_clients(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut greeting = [0u8; 4];
        stream.read_exact(&mut greeting).await.ok()?;
        (&greeting == b"INFO").then_some(())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// A test server's JetStream store limit. The topology's streams reserve
/// their production sizes (24 GiB); by default JetStream allows only 75 % of
/// the free disk, so a machine with less than 32 GB free would refuse to
/// provision. The limit is bookkeeping, not an allocation: tests store little.
pub(crate) const JETSTREAM_LIMITS: &str = "jetstream {\n  max_file_store: 1TB\n}\n";
