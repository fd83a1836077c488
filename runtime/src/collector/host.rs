//! The wiring every collector runs in: the metrics registry, the admin
//! endpoint, the NATS connection, the publisher and the outbox, the stop
//! signal, and the flush on the way out.
//!
//! ```text
//! Started::start ── C::start(config, metrics)     validate, load, credentials
//!                └─ CollectorHost::start          bind admin, connect, open outbox
//! Started::run ──── C::run(cx) until shutdown ─▶ readiness off, cx.stop = true,
//!                   wait for C::run, flush the outbox, stop the admin endpoint
//! ```
//!
//! The collector is started before the host so that a host that cannot run
//! it (no eBPF, no credentials) or a bad config is reported before any port
//! is bound or NATS is dialled.
//!
//! Spool policy (the same for every collector): a configured spool that
//! cannot be opened is fatal ([`SetupError::Spool`], exit 1, retryable).
//! A spool is asked for to survive NATS outages; running without it would
//! keep the process up but lose events in the next outage with only a log
//! line to show, and the systemd collector advances its journal cursor on
//! the strength of it. A crash loop is visible (restarts, alerts), the
//! kubelet retries with backoff, and the usual causes (a read-only or
//! missing hostPath, permissions, a full disk) are deployment faults best
//! seen at rollout. Without a spool directory events go straight to the
//! publisher. A disk that fills up *later* is not fatal: the outbox drops
//! and counts what the spool cannot write ([`OutboxError::Dropped`]) and
//! reports it once NATS is back.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::config::CollectorConfig;
use super::exit::ErrorKind;
use super::{Collector, component};
use crate::RuntimeError;
use crate::metrics::{self, Metrics, Readiness};
use crate::outbox::{Outbox, OutboxConfig, OutboxError};
use crate::publisher::{Publisher, PublisherConfig};

/// Why the host could not set a collector up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Retryable: the admin endpoint could not bind (port in use).
    #[error("admin endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Retryable: the NATS client could not be built (see
    /// [`RuntimeError::is_retryable`]; an unreachable server is not an
    /// error: the client keeps trying and the outbox spools).
    #[error(transparent)]
    Nats(RuntimeError),
    /// Retryable: the configured outage spool could not be opened (disk,
    /// permissions); fatal by policy, see the module docs.
    #[error("outage spool {dir}: {source}")]
    Spool {
        dir: PathBuf,
        #[source]
        source: OutboxError,
    },
}

impl SetupError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SetupError::Nats(e) if !e.is_retryable() => ErrorKind::Config,
            _ => ErrorKind::Retryable,
        }
    }
}

/// What a running collector gets from its host.
pub struct Context {
    /// Where events go: the publisher, or the spool while NATS is unreachable.
    pub outbox: Outbox,
    /// The connection, for collectors that also use KV.
    pub client: async_nats::Client,
    /// Served on `/metrics`, labelled `component="collector-<name>"`.
    pub metrics: Metrics,
    /// `/readyz`: the collector sets it once it follows its source; the
    /// host clears it when stopping.
    pub readiness: Readiness,
    /// Turns true when the collector should stop reading, publish what it
    /// read and return; see [`until`].
    pub stop: watch::Receiver<bool>,
}

/// Wait until `rx` holds `value`; false when its sender is gone.
pub async fn until(rx: &mut watch::Receiver<bool>, value: bool) -> bool {
    rx.wait_for(|v| *v == value).await.is_ok()
}

/// A bound, connected host, not yet running a collector.
pub struct CollectorHost {
    name: &'static str,
    client: async_nats::Client,
    outbox: Outbox,
    metrics: Metrics,
    readiness: Readiness,
    admin: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
}

impl CollectorHost {
    /// Bind the admin endpoint, connect to NATS (returning within
    /// [`crate::host::FIRST_CONNECT_GRACE`] even if it is down), open the
    /// outbox with the spool `config` names.
    pub async fn start<Cfg: CollectorConfig>(
        name: &'static str,
        config: &Cfg,
        metrics: Metrics,
    ) -> Result<CollectorHost, SetupError> {
        let common = config.common();
        let (admin, metrics_addr) = match common.metrics_addr {
            Some(addr) => {
                let (listener, local) = metrics::bind(addr)
                    .await
                    .map_err(|source| SetupError::Bind { addr, source })?;
                (Some(listener), Some(local))
            }
            None => (None, None),
        };
        let client = crate::host::connect(&common.nats_url, &component(name))
            .await
            .map_err(SetupError::Nats)?;
        let publisher = Publisher::new(
            client.clone(),
            PublisherConfig::default().max_in_flight(config.max_in_flight()),
            metrics.clone(),
        );
        let outbox = match config.spool_dir() {
            Some(dir) => Outbox::open(
                publisher,
                OutboxConfig::default()
                    .spool_dir(&dir)
                    .spool(config.spool())
                    .component(name)
                    .node(common.node.as_str()),
            )
            .map_err(|source| SetupError::Spool { dir, source })?,
            None => Outbox::without_spool(publisher),
        };
        tracing::info!(node = %common.node, metrics = ?metrics_addr, spool = ?config.spool_dir(), "collector-{name} connected");
        Ok(CollectorHost {
            name,
            client,
            outbox,
            metrics,
            readiness: Readiness::default(),
            admin,
            metrics_addr,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    /// Where `/metrics` is served (the real port when 0 was asked for).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Run `collector` until `shutdown` resolves or it returns by itself;
    /// then stop it, wait for it, and flush the outbox.
    pub async fn run<C: Collector>(
        self,
        collector: C,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), C::Error> {
        let CollectorHost {
            name,
            client,
            outbox,
            metrics,
            readiness,
            admin,
            metrics_addr: _,
        } = self;
        let (stop_tx, stop) = watch::channel(false);
        let admin = admin.map(|listener| {
            let mut stop = stop.clone();
            tokio::spawn(metrics::serve_admin(
                listener,
                metrics.clone(),
                readiness.clone(),
                async move {
                    until(&mut stop, true).await;
                },
            ))
        });
        let cx = Context {
            outbox: outbox.clone(),
            client,
            metrics,
            readiness: readiness.clone(),
            stop,
        };
        let running = collector.run(cx);
        tokio::pin!(running, shutdown);
        let result = tokio::select! {
            result = &mut running => result,
            _ = &mut shutdown => {
                tracing::info!("collector-{name}: shutting down: stop reading, publish what was read, wait for acks");
                readiness.set(false);
                stop_tx.send_replace(true);
                running.await
            }
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "collector-{name} stopped");
        }
        readiness.set(false);
        stop_tx.send_replace(true);
        if let Err(e) = outbox.flush().await {
            tracing::warn!(error = %e, "flushing the outbox at exit");
        }
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        result
    }
}

/// A collector started together with its host, not yet running.
pub struct Started<C> {
    pub host: CollectorHost,
    pub collector: C,
}

impl<C: Collector> Started<C> {
    /// Start the collector (validating `config`), then its host.
    pub async fn start(config: C::Config) -> Result<Started<C>, C::Error> {
        let metrics = Metrics::new(&component(C::NAME));
        let collector = C::start(config.clone(), &metrics).await?;
        let host = CollectorHost::start(C::NAME, &config, metrics).await?;
        Ok(Started { host, collector })
    }

    /// Run until `shutdown` resolves; see [`CollectorHost::run`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), C::Error> {
        self.host.run(self.collector, shutdown).await
    }
}

/// Start and run a collector until `shutdown` resolves (what the binary
/// does, and what tests call in-process).
pub async fn run<C: Collector>(
    config: C::Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), C::Error> {
    Started::<C>::start(config).await?.run(shutdown).await
}
