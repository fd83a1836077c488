//! `tidewatch-auth-callout`: binds what a collector may publish to the node
//! it runs on. nats-server (`authorization.auth_callout`) hands each
//! connection without a configured user to this service; the collector
//! presents its pod's projected ServiceAccount token, the Kubernetes API
//! verifies it (TokenReview), and the answer is a user JWT allowed exactly
//! `tidewatch.raw.<collector>.<that pod's node>` and that node's inbox. A
//! compromised node can then forge nothing about other nodes.
//!
//! - [`grant`]: the decision, pure: review in, grant or denial out.
//! - [`review`]: the TokenReview call.
//! - [`jwt`], [`nkey`]: the NATS JWTs and keys of the exchange.
//! - [`callout`]: the service loop (`run(nats, authority, shutdown)`).
//! - [`error`]: its errors, retryable or terminal.

pub mod callout;
pub mod error;
pub mod grant;
pub mod jwt;
pub mod nkey;
pub mod review;

pub use error::{CalloutError, ErrorKind};
