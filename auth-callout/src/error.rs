//! What can go wrong, and whether trying again can help.

/// The callout's errors. A denied connection is not an error: it is a
/// [`crate::grant::Denial`], answered to the server.
#[derive(Debug, thiserror::Error)]
pub enum CalloutError {
    /// Terminal: the issuer key (or a key in a request) is malformed.
    #[error("{0}")]
    Key(String),
    /// Terminal for that request: the server's request did not verify or
    /// parse; it goes unanswered and the server refuses the client.
    #[error("authorization request refused: {0}")]
    Request(String),
    /// Retryable: the Kubernetes API did not answer the TokenReview.
    #[error("token review failed: {0}")]
    Review(String),
    /// Retryable: NATS refused the subscription or a reply.
    #[error("NATS: {0}")]
    Nats(String),
    /// Terminal: the configuration or a file it names is unusable.
    #[error("{0}")]
    Config(String),
}

/// [`CalloutError`]'s variants without their data, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Key,
    Request,
    Review,
    Nats,
    Config,
}

impl CalloutError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CalloutError::Key(_) => ErrorKind::Key,
            CalloutError::Request(_) => ErrorKind::Request,
            CalloutError::Review(_) => ErrorKind::Review,
            CalloutError::Nats(_) => ErrorKind::Nats,
            CalloutError::Config(_) => ErrorKind::Config,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Review | ErrorKind::Nats)
    }
}
