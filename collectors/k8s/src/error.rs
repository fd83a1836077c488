//! What can stop the collector.

use tidewatch_runtime::outbox::OutboxError;

/// Errors of the collector. Each says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// Terminal: the configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Terminal: neither a kubeconfig nor in-cluster credentials exist.
    #[error("no Kubernetes credentials: {0}")]
    Credentials(String),
    /// Retryable: the API server could not be reached or refused a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Retryable: NATS or its KV bucket could not be reached.
    #[error("NATS: {0}")]
    Nats(String),
    /// Terminal unless the disk recovers: the outbox (spool) could not open.
    #[error("outbox: {0}")]
    Outbox(#[from] OutboxError),
    /// Terminal: the admin endpoint could not bind.
    #[error("admin endpoint {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Kind of a [`CollectorError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Config,
    Credentials,
    Kube,
    Nats,
    Outbox,
    Bind,
}

impl CollectorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CollectorError::Config(_) => ErrorKind::Config,
            CollectorError::Credentials(_) => ErrorKind::Credentials,
            CollectorError::Kube(_) => ErrorKind::Kube,
            CollectorError::Nats(_) => ErrorKind::Nats,
            CollectorError::Outbox(_) => ErrorKind::Outbox,
            CollectorError::Bind { .. } => ErrorKind::Bind,
        }
    }

    /// Whether starting again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Kube | ErrorKind::Nats)
    }
}
