//! How a collector process ends, one table for all of them:
//!
//! | code | meaning                                   | restart helps? |
//! |------|-------------------------------------------|----------------|
//! | 0    | stopped on SIGTERM/SIGINT, or a check passed | —           |
//! | 1    | runtime failure (NATS, API server, bus, port in use, spool disk) | yes |
//! | 2    | bad configuration or flags                | no             |
//! | 3    | this host cannot run the collector (`--check-host` says why) | no |
//!
//! Every collector error says which row it is through [`Failure::kind`].

use std::process::ExitCode;

/// What an error means for the process; each kind is one exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retryable: starting again later can succeed (NATS or the API server
    /// unreachable, the admin port taken, the spool disk failing). Exit 1.
    Retryable,
    /// Terminal: the configuration or flags are invalid; the same settings
    /// fail again. Exit 2.
    Config,
    /// Terminal: this host cannot run the collector (no eBPF, no Kubernetes
    /// credentials, no systemd). Exit 3.
    Unsupported,
}

impl ErrorKind {
    pub fn is_retryable(self) -> bool {
        self == ErrorKind::Retryable
    }

    /// The process exit code of this kind (see the table above).
    pub fn code(self) -> u8 {
        match self {
            ErrorKind::Retryable => FAILURE,
            ErrorKind::Config => BAD_CONFIG,
            ErrorKind::Unsupported => UNSUPPORTED_HOST,
        }
    }

    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }
}

/// Stopped cleanly, or a check passed.
pub const OK: u8 = 0;
/// A runtime failure; a restart may help.
pub const FAILURE: u8 = 1;
/// Bad configuration or flags (clap exits with 2 on bad flags too).
pub const BAD_CONFIG: u8 = 2;
/// This host cannot run the collector.
pub const UNSUPPORTED_HOST: u8 = 3;

/// A collector's error: which row of the table it is.
pub trait Failure: std::error::Error + Send + Sync + 'static {
    fn kind(&self) -> ErrorKind;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_code_per_kind() {
        assert_eq!(ErrorKind::Retryable.code(), 1);
        assert_eq!(ErrorKind::Config.code(), 2);
        assert_eq!(ErrorKind::Unsupported.code(), 3);
        assert!(ErrorKind::Retryable.is_retryable());
        assert!(!ErrorKind::Config.is_retryable());
        assert!(!ErrorKind::Unsupported.is_retryable());
    }
}
