//! What can stop the collector.

use tidewatch_runtime::collector::{ErrorKind, Failure, SetupError};

/// Errors of the collector. Each says whether retrying can help; its
/// [`ErrorKind`] is the process exit code (the runtime's table).
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// Terminal: the configuration is invalid (exit 2).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Terminal: neither a kubeconfig nor in-cluster credentials exist (exit 3).
    #[error("no Kubernetes credentials: {0}")]
    Credentials(String),
    /// Retryable: the API server could not be reached or refused a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Retryable: the host could not bind the admin endpoint, build the
    /// NATS client or open the spool (see the runtime's spool policy).
    #[error(transparent)]
    Setup(#[from] SetupError),
}

impl CollectorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CollectorError::Config(_) => ErrorKind::Config,
            CollectorError::Credentials(_) => ErrorKind::Unsupported,
            CollectorError::Kube(_) => ErrorKind::Retryable,
            CollectorError::Setup(e) => e.kind(),
        }
    }

    /// Whether starting again later can succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

impl Failure for CollectorError {
    fn kind(&self) -> ErrorKind {
        CollectorError::kind(self)
    }
}
