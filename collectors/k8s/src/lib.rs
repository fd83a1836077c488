//! Tidewatch Kubernetes collector: watches the API server and publishes
//! *semantic changes* (not raw objects) to `tidewatch.raw.k8s.<node>`, and
//! keeps the pod metadata KV bucket current for enrichment.
//!
//! A tour, from the edges in:
//!
//! - [`collector`]: [`K8s`], the collector the runtime's collector host
//!   runs, and [`run`]: kube watchers (pods of this node on every replica;
//!   cluster-scoped kinds on the leader only) into trackers, diffs, the
//!   sink and KV.
//! - [`lease`]: leader election on a Lease: pure [`lease::step`] plus the
//!   API calls.
//! - [`tracker`]: the list/watch state machine that turns watcher events
//!   into transitions, silent on the first list and free of duplicates on
//!   relists.
//! - Diffs, all pure: [`pod`] (containers, phase, Ready, eviction, KV
//!   metadata), [`node`] (conditions), [`rollout`] (Deployments and
//!   ReplicaSets), [`endpoints`] (EndpointSlices per service), [`warning`]
//!   (Warning Events), [`service`] (cluster IPs for KV), [`stability`]
//!   (restarted containers that stopped restarting, on a clock).
//! - [`change`]: a semantic change and its CloudEvent, with a deterministic id.
//! - [`kv`]: the desired contents of the KV bucket and pending writes.
//! - [`sink`]: the one place that publishes (through the runtime's outbox)
//!   and writes KV.
//! - [`config`] (the TOML config and the collector's own flags), [`error`],
//!   [`quantity`] (resource quantities).

pub mod change;
pub mod collector;
pub mod config;
pub mod endpoints;
pub mod error;
pub mod kv;
pub mod lease;
pub mod node;
pub mod pod;
pub mod quantity;
pub mod rollout;
pub mod service;
pub mod sink;
pub mod stability;
pub mod tracker;
pub mod warning;

pub use collector::{K8s, credentials, run, run_with_client};
pub use config::Config;
pub use error::CollectorError;
