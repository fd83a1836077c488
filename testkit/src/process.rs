//! One nats-server child process with its output captured to a log file.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::nats_server_binary;

/// How many log lines to quote when a server misbehaves.
const LOG_TAIL_LINES: usize = 40;

/// A running (or exited) nats-server. Killed and reaped on drop, so a failing
/// test never leaves a server or a zombie behind.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    // A Mutex so liveness can be checked through `&self` (`try_wait` needs
    // `&mut Child`).
    child: Mutex<Child>,
    pid: u32,
    log_path: PathBuf,
}

impl ServerProcess {
    /// Spawn nats-server with `args`, appending stdout and stderr to
    /// `log_path` (appending keeps earlier runs' logs across restarts).
    pub(crate) fn spawn<I, S>(args: I, log_path: &Path) -> ServerProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_as(args, log_path, None)
    }

    /// [`spawn`](Self::spawn) as another user: `(binary, uid)`, the binary
    /// being a copy that user may execute.
    pub(crate) fn spawn_as<I, S>(
        args: I,
        log_path: &Path,
        run_as: Option<(&Path, u32)>,
    ) -> ServerProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        use std::os::unix::process::CommandExt as _;
        let binary = run_as.map_or_else(nats_server_binary, |(b, _)| b.to_path_buf());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap_or_else(|e| panic!("open nats-server log {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone nats-server log file handle");
        let mut command = Command::new(&binary);
        if let Some((_, uid)) = run_as {
            command.uid(uid).gid(uid);
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        ServerProcess {
            pid: child.id(),
            child: Mutex::new(child),
            log_path: log_path.to_path_buf(),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        child.try_wait().ok().flatten()
    }

    pub(crate) fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Kill (SIGKILL) and reap, polling asynchronously so the runtime is not
    /// blocked. Falls back to a blocking wait if the process somehow survives
    /// 10 s.
    pub(crate) async fn kill(self) {
        {
            let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
            // Fails only if already reaped; then there is nothing to kill.
            let _ = child.kill();
        }
        let exited = crate::poll_until(Duration::from_secs(10), || async {
            self.exit_status().map(|_| ())
        })
        .await;
        if exited.is_none() {
            panic!(
                "nats-server pid {} did not exit within 10 s of SIGKILL\n{}",
                self.pid,
                self.log_tail()
            );
        }
        // Drop's kill/wait is now a no-op on the reaped child.
    }

    /// The last lines of the server's log, formatted for a panic message.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        // SIGKILL is instant, so the blocking wait is short; both calls only
        // fail if the child was already reaped.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file, with a header naming it.
pub(crate) fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            format!(
                "--- last {} lines of {} ---\n{}",
                lines.len() - start,
                path.display(),
                lines[start..].join("\n")
            )
        }
        Err(e) => format!("--- could not read {}: {e} ---", path.display()),
    }
}
