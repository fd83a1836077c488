//! Wiring: connect to NATS, serve `/metrics` and health, run the unit
//! follower (D-Bus) and the journal follower side by side, and drain on
//! shutdown (stop reading, wait for acks, save the cursor).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tidewatch_proto::v1;
use tidewatch_runtime::cloudevents::Event;
use tidewatch_runtime::event::{EventError, derive_id, new_event};
use tidewatch_runtime::metrics::{self, Metrics, Readiness};
use tidewatch_runtime::outbox::{Outbox, OutboxConfig, OutboxError};
use tidewatch_runtime::publisher::{Publisher, PublisherConfig};
use tidewatch_runtime::spool::{FsyncPolicy, SpoolConfig};
use tidewatch_runtime::topology::{self, subjects};
use tokio::sync::watch;

use crate::config::{self, Config, Resolved};
use crate::dbus::Watch;
use crate::emit::Emitter;
use crate::follow::{self, stopped};
use crate::units::{Snapshot, Transition, UnitState};

/// Collector name in subjects, sources and metrics.
pub const COLLECTOR: &str = "systemd";

/// Why the collector could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// Terminal: the configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Retryable: NATS could not be reached.
    #[error(transparent)]
    Runtime(#[from] tidewatch_runtime::RuntimeError),
    /// Retryable: the admin endpoint could not be bound (port in use).
    #[error("admin endpoint {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Retryable: `journalctl` could not be run or its output read.
    #[error("journal: {0}")]
    Journal(String),
    /// Retryable: a journal entry was neither acknowledged by the stream
    /// nor taken by the spool; the saved cursor is before it, so a restart
    /// resends it.
    #[error("publishing a journal entry: {0}")]
    Publish(#[source] OutboxError),
    /// Retryable: the cursor file could not be read or written.
    #[error("cursor file {path}: {source}")]
    Cursor {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether retrying (restarting the process) can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Retryable,
    Terminal,
}

impl CollectorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CollectorError::Config(_) => ErrorKind::Terminal,
            CollectorError::Runtime(e) if !e.is_retryable() => ErrorKind::Terminal,
            _ => ErrorKind::Retryable,
        }
    }
}

/// A handle on a started collector, for tests and `tidewatch up`.
#[derive(Clone)]
pub struct Handle {
    metrics: Metrics,
    readiness: Readiness,
    metrics_addr: Option<SocketAddr>,
}

impl Handle {
    /// Subscribed to D-Bus and following the journal (what is enabled).
    pub fn is_ready(&self) -> bool {
        self.readiness.get()
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// A connected collector, not yet following anything.
pub struct Collector {
    resolved: Arc<Resolved>,
    emitter: Emitter,
    admin: Option<tokio::net::TcpListener>,
    handle: Handle,
}

impl Collector {
    /// Validate the config, connect to NATS, bind `/metrics`.
    pub async fn start(config: Config) -> Result<Collector, CollectorError> {
        let resolved = Arc::new(config.validate()?);
        let config = &resolved.config;
        let client =
            tidewatch_runtime::host::connect(&config.nats_url, "collector-systemd").await?;
        let metrics = Metrics::new(COLLECTOR);
        let publisher = Publisher::new(
            client,
            PublisherConfig::default().max_in_flight(config.max_in_flight),
            metrics.clone(),
        );
        let subject = subjects::raw(COLLECTOR, &config.node);
        let spool = config.spool_dir.as_ref().map(|dir| {
            OutboxConfig::default()
                .spool_dir(dir)
                // fsync every record: the journal cursor moves on once an
                // entry is spooled, so a spooled entry must survive a
                // machine crash too (the journal rate makes this cheap).
                .spool(SpoolConfig {
                    max_bytes: config.spool_max_bytes,
                    fsync: FsyncPolicy::EveryRecord,
                    ..SpoolConfig::default()
                })
                .component(COLLECTOR)
                .node(config.node.as_str())
        });
        let emitter = Emitter::new(Outbox::open_or_without_spool(publisher, spool), subject);
        let (admin, metrics_addr) = match config.metrics_addr {
            Some(addr) => {
                let (listener, local) = metrics::bind(addr)
                    .await
                    .map_err(|source| CollectorError::Admin { addr, source })?;
                (Some(listener), Some(local))
            }
            None => (None, None),
        };
        tracing::info!(node = %config.node, dbus = %resolved.dbus_address, cursor = %resolved.cursor_file.display(), spool = ?config.spool_dir, metrics = ?metrics_addr, "systemd collector connected");
        Ok(Collector {
            handle: Handle {
                metrics,
                readiness: Readiness::default(),
                metrics_addr,
            },
            resolved,
            emitter,
            admin,
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Follow units and the journal until `shutdown` resolves or the journal
    /// follower fails; then drain and return.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), CollectorError> {
        let Collector {
            resolved,
            emitter,
            admin,
            handle,
        } = self;
        let config = &resolved.config;
        let (stop_tx, stop) = watch::channel(false);
        let admin = admin.map(|listener| {
            let mut stop = stop.clone();
            tokio::spawn(metrics::serve_admin(
                listener,
                handle.metrics.clone(),
                handle.readiness.clone(),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            ))
        });

        let (units_ready, mut units_ready_rx) = watch::channel(!config.unit_states);
        let (journal_ready, mut journal_ready_rx) = watch::channel(!config.journal);
        let units = config.unit_states.then(|| {
            tokio::spawn(follow_units(
                resolved.clone(),
                emitter.clone(),
                handle.metrics.clone(),
                units_ready,
                stop.clone(),
            ))
        });
        let mut journal = config.journal.then(|| {
            tokio::spawn(follow::follow(
                resolved.clone(),
                emitter.clone(),
                handle.metrics.clone(),
                journal_ready,
                stop.clone(),
            ))
        });
        let readiness = handle.readiness.clone();
        let ready = tokio::spawn(async move {
            let _ = units_ready_rx.wait_for(|r| *r).await;
            let _ = journal_ready_rx.wait_for(|r| *r).await;
            readiness.set(true);
            tracing::info!("ready: following units and the journal");
        });

        tokio::pin!(shutdown);
        let mut result = Ok(());
        let journal_done = async {
            match journal.as_mut() {
                Some(task) => Some(task.await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => tracing::info!("shutting down: stop reading, wait for acks, save the cursor"),
            done = journal_done => {
                journal = None;
                result = flatten(done);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "journal follower stopped");
                }
            }
        }
        handle.readiness.set(false);
        ready.abort();
        let _ = stop_tx.send(true);
        if let Some(task) = journal {
            let done = flatten(Some(task.await));
            if result.is_ok() {
                result = done;
            }
        }
        if let Some(task) = units {
            let _ = task.await;
        }
        emitter.flush().await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        result
    }
}

fn flatten(
    done: Option<Result<Result<(), CollectorError>, tokio::task::JoinError>>,
) -> Result<(), CollectorError> {
    match done {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(CollectorError::Journal(format!("journal task: {e}"))),
        None => Ok(()),
    }
}

/// Run a collector until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CollectorError> {
    Collector::start(config).await?.run(shutdown).await
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): part of unit event ids.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The event for a unit transition. Its id hashes the boot, the unit, the
/// change, the unit's invocation id (new for every start) and its restart
/// count, so a retried publish is dropped as a duplicate while two real
/// transitions never share an id.
pub fn unit_event(
    unit: &str,
    transition: &Transition,
    node: &str,
    source: &str,
    boot_id: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<Event, EventError> {
    let s = &transition.snapshot;
    let nanos = at.timestamp_nanos_opt().unwrap_or_default().to_be_bytes();
    // Without an invocation id (units that never ran), the time tells
    // transitions apart.
    let tail: &[u8] = if s.invocation_id.is_empty() {
        &nanos
    } else {
        &[]
    };
    let id = derive_id(&[
        boot_id.as_bytes(),
        COLLECTOR.as_bytes(),
        unit.as_bytes(),
        transition.change.name().as_bytes(),
        s.invocation_id.as_bytes(),
        &s.n_restarts.to_be_bytes(),
        tail,
    ]);
    let payload = v1::UnitStateChange {
        unit: unit.to_string(),
        node: node.to_string(),
        active_state: s.active_state.clone(),
        sub_state: s.sub_state.clone(),
        result: s.result.clone(),
        n_restarts: s.n_restarts,
        exec_main_status: s.exec_main_status,
        previous_active_state: transition.previous_active_state.clone(),
    };
    new_event(
        id,
        transition.change.event_type(),
        source,
        Some(&format!("unit/{unit}")),
        at,
        &payload,
    )
}

/// Follow unit state over D-Bus until `stop`, reconnecting (with backoff)
/// when the bus goes away. After a reconnect the fresh state is compared
/// with the last known one, so transitions during the outage are reported.
async fn follow_units(
    resolved: Arc<Resolved>,
    emitter: Emitter,
    metrics: Metrics,
    ready: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let config = &resolved.config;
    let source = topology::source(COLLECTOR, &config.node);
    let boot = boot_id();
    let clock = tokio::time::Instant::now();
    let mut states: HashMap<String, UnitState> = HashMap::new();
    let mut seeded = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        let opened = tokio::select! {
            _ = stopped(&mut stop) => return,
            opened = Watch::open(&resolved.dbus_address, &resolved.selection) => opened,
        };
        let (mut watch, snapshot) = match opened {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, address = %resolved.dbus_address, ?backoff, "cannot follow systemd over D-Bus; retrying");
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        let now = clock.elapsed().as_secs_f64();
        for observation in snapshot {
            let state = states
                .remove(&observation.unit)
                .unwrap_or_else(|| UnitState::new(Snapshot::default()));
            let (state, transitions) = state.step(&observation.update, now, resolved.crash_loop);
            if seeded {
                publish(
                    &emitter,
                    &metrics,
                    &observation.unit,
                    &transitions,
                    config,
                    &source,
                    &boot,
                )
                .await;
            }
            states.insert(observation.unit, state);
        }
        seeded = true;
        tracing::info!(units = states.len(), "subscribed to systemd unit changes");
        ready.send_replace(true);
        loop {
            let observation = tokio::select! {
                _ = stopped(&mut stop) => return,
                o = watch.next() => o,
            };
            let Some(observation) = observation else {
                tracing::warn!("D-Bus connection lost; reconnecting");
                break;
            };
            if !resolved.selection.watches(&observation.unit) {
                continue;
            }
            metrics.events_in.inc();
            let now = clock.elapsed().as_secs_f64();
            let state = states
                .remove(&observation.unit)
                .unwrap_or_else(|| UnitState::new(Snapshot::default()));
            let (state, transitions) = state.step(&observation.update, now, resolved.crash_loop);
            states.insert(observation.unit.clone(), state);
            publish(
                &emitter,
                &metrics,
                &observation.unit,
                &transitions,
                config,
                &source,
                &boot,
            )
            .await;
        }
    }
}

async fn publish(
    emitter: &Emitter,
    metrics: &Metrics,
    unit: &str,
    transitions: &[Transition],
    config: &Config,
    source: &str,
    boot: &str,
) {
    for transition in transitions {
        tracing::info!(unit, change = transition.change.name(), active = %transition.snapshot.active_state, sub = %transition.snapshot.sub_state, result = %transition.snapshot.result, n_restarts = transition.snapshot.n_restarts, "unit transition");
        let event = match unit_event(
            unit,
            transition,
            &config.node,
            source,
            boot,
            chrono::Utc::now(),
        ) {
            Ok(e) => e,
            Err(e) => {
                metrics.refuse("unit_event_invalid");
                tracing::warn!(error = %e, unit, "cannot build a unit event");
                continue;
            }
        };
        match emitter.send(&event).await {
            // Sent in order; the stream's ack is awaited off the D-Bus path
            // (failures are counted on tidewatch_publish_failed_total).
            Ok(sent) => {
                let id = tidewatch_runtime::event::describe(&event);
                tokio::spawn(async move {
                    if let Err(e) = sent.kept().await {
                        tracing::warn!(error = %e, event = %id, "unit event not stored");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, unit, "unit event not sent"),
        }
    }
}
