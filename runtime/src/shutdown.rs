//! Shutdown signals.

/// Resolves on SIGTERM (Kubernetes, `tidewatch up`) or SIGINT (Ctrl-C).
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process is killed by the default action anyway.
        _ => std::future::pending::<()>().await,
    }
}
