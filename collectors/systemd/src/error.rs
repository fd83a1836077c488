//! What can stop the collector.

use std::path::PathBuf;

use tidewatch_runtime::collector::{ErrorKind, Failure, SetupError};
use tidewatch_runtime::outbox::OutboxError;

use crate::config::ConfigError;

/// Why the collector could not start or stopped. Its [`ErrorKind`] is the
/// process exit code (the runtime's table).
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// Terminal: the configuration is invalid (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Retryable: the host could not bind the admin endpoint, build the
    /// NATS client or open the spool (see the runtime's spool policy).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// Retryable: `journalctl` could not be run or its output read.
    #[error("journal: {0}")]
    Journal(String),
    /// Retryable: a journal entry was neither acknowledged by the stream
    /// nor taken by the spool; the saved cursor is before it, so a restart
    /// resends it.
    #[error("publishing a journal entry: {0}")]
    Publish(#[source] OutboxError),
    /// Terminal: this host cannot run the collector as configured (journal
    /// files this user may not read: the wrong `systemd-journal` gid).
    #[error("{0}")]
    Unsupported(String),
    /// Retryable: the cursor file could not be read or written.
    #[error("cursor file {path}: {source}")]
    Cursor {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CollectorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CollectorError::Config(_) => ErrorKind::Config,
            CollectorError::Unsupported(_) => ErrorKind::Unsupported,
            CollectorError::Setup(e) => e.kind(),
            CollectorError::Journal(_)
            | CollectorError::Publish(_)
            | CollectorError::Cursor { .. } => ErrorKind::Retryable,
        }
    }
}

impl Failure for CollectorError {
    fn kind(&self) -> ErrorKind {
        CollectorError::kind(self)
    }
}
