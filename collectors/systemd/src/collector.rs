//! Wiring: the unit follower (D-Bus) and the journal follower side by side,
//! as [`Systemd`], the [`host::Collector`] the runtime's collector host runs
//! (it owns the admin endpoint, NATS, the outbox and the flush on stop). On
//! stop: stop reading, wait for acks, save the cursor.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tidewatch_proto::v1;
use tidewatch_runtime::cloudevents::Event;
use tidewatch_runtime::collector::{self as host, Context, Started, until};
use tidewatch_runtime::event::{EventError, derive_id, new_event};
use tidewatch_runtime::metrics::{Metrics, Readiness};
use tidewatch_runtime::topology::{self, subjects};
use tokio::sync::watch;

use crate::COLLECTOR;
use crate::config::{Args, Config, Resolved};
use crate::dbus::Watch;
use crate::emit::Emitter;
use crate::error::CollectorError;
use crate::follow;
use crate::units::{Snapshot, Transition, UnitState};

/// The systemd collector, as the runtime's collector host runs it.
pub struct Systemd {
    resolved: Arc<Resolved>,
}

impl host::Collector for Systemd {
    const NAME: &'static str = COLLECTOR;
    const ABOUT: &'static str = "Tidewatch systemd collector: unit state over D-Bus and selected \
journal entries, published to tidewatch.raw.systemd.<node>. See README.md.";
    const CONFIG_ENV: &'static str = "TIDEWATCH_SYSTEMD_CONFIG";
    type Config = Config;
    type Args = Args;
    type Error = CollectorError;

    fn apply(args: Args, config: &mut Config) {
        args.apply(config);
    }

    /// The system D-Bus answers and a journal is there to read.
    async fn check_host(config: &Config) -> Result<(), String> {
        crate::preflight::check(config).await
    }

    async fn start(config: Config, _: &Metrics) -> Result<Systemd, CollectorError> {
        let resolved = Arc::new(config.validate()?);
        // Unreadable journal files (the wrong systemd-journal gid) would
        // otherwise follow nothing, silently.
        crate::preflight::journal_readable(&resolved.config)
            .map_err(CollectorError::Unsupported)?;
        tracing::info!(dbus = %resolved.dbus_address, cursor = %resolved.cursor_file.display(), "systemd collector configured");
        Ok(Systemd { resolved })
    }

    /// Follow units and the journal until `cx.stop` or until the journal
    /// follower fails; then stop both and return.
    async fn run(self, cx: Context) -> Result<(), CollectorError> {
        let Systemd { resolved } = self;
        let Context {
            outbox,
            metrics,
            readiness,
            stop: mut host_stop,
            ..
        } = cx;
        let config = &resolved.config;
        let emitter = Emitter::new(outbox, subjects::raw(COLLECTOR, &config.common.node));
        // Its own stop signal: a failed journal follower stops the unit
        // follower too, before the host hears of it.
        let (stop_tx, stop) = watch::channel(false);

        let (units_ready, mut units_ready_rx) = watch::channel(!config.unit_states);
        let (journal_ready, mut journal_ready_rx) = watch::channel(!config.journal);
        let units = config.unit_states.then(|| {
            tokio::spawn(follow_units(
                resolved.clone(),
                emitter.clone(),
                metrics.clone(),
                units_ready,
                stop.clone(),
            ))
        });
        let mut journal = config.journal.then(|| {
            tokio::spawn(follow::follow(
                resolved.clone(),
                emitter.clone(),
                metrics.clone(),
                journal_ready,
                stop.clone(),
            ))
        });
        let ready = tokio::spawn(async move {
            let _ = units_ready_rx.wait_for(|r| *r).await;
            let _ = journal_ready_rx.wait_for(|r| *r).await;
            readiness.set(true);
            tracing::info!("ready: following units and the journal");
        });

        let mut result = Ok(());
        let journal_done = async {
            match journal.as_mut() {
                Some(task) => Some(task.await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = until(&mut host_stop, true) => {}
            done = journal_done => {
                journal = None;
                result = flatten(done);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "journal follower stopped");
                }
            }
        }
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

/// A collector started with its host (connected, `/metrics` bound), not
/// yet following anything.
pub struct Collector(Started<Systemd>);

impl Collector {
    /// Validate the config, connect to NATS, bind `/metrics`.
    pub async fn start(config: Config) -> Result<Collector, CollectorError> {
        Started::start(config).await.map(Collector)
    }

    pub fn handle(&self) -> Handle {
        let host = &self.0.host;
        Handle {
            metrics: host.metrics().clone(),
            readiness: host.readiness().clone(),
            metrics_addr: host.metrics_addr(),
        }
    }

    /// Follow units and the journal until `shutdown` resolves or the
    /// journal follower fails; then drain and return.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), CollectorError> {
        self.0.run(shutdown).await
    }
}

/// Run a collector until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CollectorError> {
    host::run::<Systemd>(config, shutdown).await
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
    let source = topology::source(COLLECTOR, &config.common.node);
    let boot = boot_id();
    let clock = tokio::time::Instant::now();
    let mut states: HashMap<String, UnitState> = HashMap::new();
    let mut seeded = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        let opened = tokio::select! {
            _ = until(&mut stop, true) => return,
            opened = Watch::open(&resolved.dbus_address, &resolved.selection) => opened,
        };
        let (mut watch, snapshot) = match opened {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, address = %resolved.dbus_address, ?backoff, "cannot follow systemd over D-Bus; retrying");
                tokio::select! {
                    _ = until(&mut stop, true) => return,
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
                _ = until(&mut stop, true) => return,
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
            &config.common.node,
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
