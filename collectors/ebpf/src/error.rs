//! Why the collector could not start or run.

use tidewatch_runtime::collector::{ErrorKind, Failure, SetupError};

use crate::config::ConfigError;

/// Why the collector could not start or run. Its [`ErrorKind`] is the
/// process exit code (the runtime's table).
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// Terminal: the configuration is invalid (exit 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Terminal: this host cannot load the programs (exit 3).
    #[error(
        "cannot load the eBPF programs: {0} (needs root or CAP_BPF + CAP_PERFMON, plus CAP_SYS_RESOURCE before kernel 5.11; a kernel >= 5.8 with BTF at /sys/kernel/btf/vmlinux; tracefs mounted)"
    )]
    Load(String),
    /// Terminal: this kernel lacks a tracepoint the programs attach to (exit 3).
    #[error("cannot attach {program} to {target}: {reason}")]
    Attach {
        program: &'static str,
        target: String,
        reason: String,
    },
    /// Retryable: the host could not bind the admin endpoint, build the
    /// NATS client or open the spool (see the runtime's spool policy).
    #[error(transparent)]
    Setup(#[from] SetupError),
}

impl CollectorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CollectorError::Config(_) => ErrorKind::Config,
            CollectorError::Load(_) | CollectorError::Attach { .. } => ErrorKind::Unsupported,
            CollectorError::Setup(e) => e.kind(),
        }
    }
}

impl Failure for CollectorError {
    fn kind(&self) -> ErrorKind {
        CollectorError::kind(self)
    }
}
