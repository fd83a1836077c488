//! Stopping the processes the CLI starts (functions, collectors, nats-server)
//! the way Kubernetes does: SIGTERM, a grace period, then SIGKILL.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;

/// SIGTERM `child`, wait up to `grace`, then SIGKILL. Always reaps it.
pub async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        eprintln!("tidewatch: pid {pid} did not stop within {grace:?}; killing it");
    }
    let _ = child.kill().await;
}
