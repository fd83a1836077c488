//! Where collectors publish: the [`Publisher`] while NATS is reachable, the
//! on-disk [`Spool`] while it is not, and a replay of the spool, in order
//! and with the same msg ids, once it is back.
//!
//! ```text
//!  send ──► route ──Publish──► Publisher ──ack──► Delivered::Stored
//!             │                    │ not acknowledged after retries
//!             └──Spool──► Spool ◄──┘                ──► Delivered::Spooled
//!                          │ replayer task: oldest first, a window at a time,
//!                          ▼ commit what the stream acknowledged
//!                        stream (Nats-Msg-Id dedupes anything sent twice)
//! ```
//!
//! The routing is a two-state machine ([`Mode`], [`route`], [`step`]):
//! once anything is spooled every later event is spooled too, until the
//! replayer has emptied the spool, so spooled events reach the stream in
//! the order they were sent. (An event whose publish was already in flight
//! when NATS went away may land before or after spooled ones; it is
//! stored once either way.)
//!
//! Losses: the spool drops its oldest segment when full, and an event it
//! cannot write (disk full, I/O error) is dropped and counted
//! ([`crate::spool`]); the sender gets [`OutboxError::Dropped`] and goes
//! on: a full disk never stops a collector. Losses are counted on
//! `tidewatch_spool_dropped_total{reason}` and reported as a
//! `dev.tidewatch.kernel.collector.drops` event (stage `spool`, kind = the
//! reason) once NATS is reachable and the spool has drained. The spool's
//! drop ledger keeps the totals and what was reported across restarts, so
//! a count is reported once, by whichever process gets to it.
//!
//! A collector started after a crash opens the same spool directory and
//! replays what the previous process had spooled.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::publish::PublishAck;
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::binding::nats::{to_nats, wire_size};
use crate::event::derive_id;
use crate::message::Record;
use crate::metrics::Metrics;
use crate::publisher::{Confirmation, PublishError, PublishErrorKind, Publisher, Unsent};
use crate::spool::{Cursor, DropReason, Spool, SpoolConfig, SpoolError, SpoolStats};
use crate::topology;

/// Outbox settings, builder style.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Directory of the spool; one per collector instance (a hostPath or
    /// emptyDir in Kubernetes, so it outlives the container).
    pub spool_dir: PathBuf,
    /// Size bounds and fsync policy of the spool.
    pub spool: SpoolConfig,
    /// How often the replayer looks again while NATS is down or a replay
    /// failed.
    pub retry_interval: Duration,
    /// Spooled events replayed per round (sent before waiting for acks).
    pub replay_window: usize,
    /// Component (`k8s`, `systemd`, `ebpf`) and node, for the subject and
    /// source of the overflow report.
    pub component: String,
    pub node: String,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            spool_dir: PathBuf::from("/var/lib/tidewatch/spool"),
            spool: SpoolConfig::default(),
            retry_interval: Duration::from_secs(1),
            replay_window: 256,
            component: "collector".into(),
            node: "unknown".into(),
        }
    }
}

impl OutboxConfig {
    pub fn spool_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spool_dir = dir.into();
        self
    }
    pub fn spool(mut self, spool: SpoolConfig) -> Self {
        self.spool = spool;
        self
    }
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }
    pub fn replay_window(mut self, window: usize) -> Self {
        self.replay_window = window.max(1);
        self
    }
    pub fn component(mut self, component: impl Into<String>) -> Self {
        self.component = component.into();
        self
    }
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = node.into();
        self
    }
}

/// What became of a sent event.
#[derive(Debug)]
pub enum Delivered {
    /// The stream stored it.
    Stored(PublishAck),
    /// The spool holds it: it survives this process being killed and is
    /// replayed, with its id, once NATS is reachable.
    Spooled,
}

/// What went wrong sending through the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Terminal: the event is over the size limit; neither published nor
    /// spooled (counted on `tidewatch_refused_total{reason="oversized"}`).
    #[error(transparent)]
    TooLarge(PublishError),
    /// Terminal: the stream refused the event; replaying it would be
    /// refused again, so it is not spooled.
    #[error(transparent)]
    Rejected(PublishError),
    /// Terminal for this event: NATS was unreachable and the spool could
    /// not write it (disk full, I/O error). It is lost, counted on
    /// `tidewatch_spool_dropped_total{reason}` and in the spool's drop
    /// ledger, and reported in the next `collector.drops` event; the sender
    /// should move on (later events are spooled once there is space).
    #[error("NATS unreachable and the spool could not keep event {id} ({}): {source}", reason.as_str())]
    Dropped {
        id: String,
        reason: DropReason,
        #[source]
        source: SpoolError,
    },
    /// Retryable: the spool failed outside an append (a flush's fsync, its
    /// worker task); what it holds is still replayed.
    #[error("NATS unreachable and the spool refused event {id}: {source}")]
    Spool {
        id: String,
        #[source]
        source: SpoolError,
    },
    /// Retryable: not acknowledged after retries, with no spool to fall
    /// back to (a [`Receipt`] made from a bare publisher confirmation).
    #[error(transparent)]
    Unavailable(PublishError),
    /// Retryable: the outbox is shutting down; the event was not kept.
    #[error("outbox closed: event {id} was not kept")]
    Closed { id: String },
    /// Terminal for this process: the spool directory cannot be created or
    /// opened (permissions, another owner holding its lock).
    #[error("cannot open the outage spool in {dir}: {source}")]
    Open {
        dir: std::path::PathBuf,
        #[source]
        source: SpoolError,
    },
}

/// Kind of an [`OutboxError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxErrorKind {
    TooLarge,
    Rejected,
    Dropped,
    Spool,
    Unavailable,
    Closed,
    Open,
}

impl OutboxError {
    pub fn kind(&self) -> OutboxErrorKind {
        match self {
            OutboxError::TooLarge(_) => OutboxErrorKind::TooLarge,
            OutboxError::Rejected(_) => OutboxErrorKind::Rejected,
            OutboxError::Dropped { .. } => OutboxErrorKind::Dropped,
            OutboxError::Spool { .. } => OutboxErrorKind::Spool,
            OutboxError::Unavailable(_) => OutboxErrorKind::Unavailable,
            OutboxError::Closed { .. } => OutboxErrorKind::Closed,
            OutboxError::Open { .. } => OutboxErrorKind::Open,
        }
    }
    /// Whether sending the same event later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind(),
            OutboxErrorKind::Spool | OutboxErrorKind::Unavailable | OutboxErrorKind::Closed
        )
    }
}

/// Where events go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Straight to the stream.
    Direct,
    /// Into the spool, behind what is already there.
    Spooling,
}

/// Where one event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Publish,
    Spool,
}

/// What happened that can change the [`Mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// An event was written to the spool.
    Spooled,
    /// The replayer found nothing left to replay.
    Drained,
}

/// Route an event: to the spool while anything is spooled (order) or the
/// connection is down (a publish would only wait and time out).
pub fn route(mode: Mode, connected: bool) -> Route {
    match (mode, connected) {
        (Mode::Direct, true) => Route::Publish,
        _ => Route::Spool,
    }
}

/// The next mode.
pub fn step(mode: Mode, input: Input) -> Mode {
    match (mode, input) {
        (_, Input::Spooled) => Mode::Spooling,
        (Mode::Spooling, Input::Drained) => Mode::Direct,
        (Mode::Direct, Input::Drained) => Mode::Direct,
    }
}

/// Resolves to what became of a sent event.
#[must_use = "an event is only known to be kept once its receipt resolves"]
pub struct Receipt {
    id: String,
    state: ReceiptState,
}

enum ReceiptState {
    Ready(Result<Delivered, OutboxError>),
    Confirming(Confirmation),
    Waiting(oneshot::Receiver<Result<Delivered, OutboxError>>),
}

impl Receipt {
    /// Id of the event.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::future::IntoFuture for Receipt {
    type Output = Result<Delivered, OutboxError>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            match self.state {
                ReceiptState::Ready(result) => result,
                ReceiptState::Confirming(confirmation) => {
                    confirmation.await.map(Delivered::Stored).map_err(classify)
                }
                ReceiptState::Waiting(receiver) => receiver
                    .await
                    .unwrap_or(Err(OutboxError::Closed { id: self.id })),
            }
        })
    }
}

/// Spool-backed publisher ([`Outbox::open`]), or a bare one
/// ([`Outbox::without_spool`]) for a collector run without a spool
/// directory. Cheap to clone; clones share the spool.
#[derive(Clone)]
pub struct Outbox {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Spooled {
        shared: Arc<Shared>,
        confirmations: mpsc::UnboundedSender<Job>,
    },
    // Boxed: a publisher is much larger than the spooled handle.
    Direct(Box<Publisher>),
}

struct Shared {
    publisher: Publisher,
    config: OutboxConfig,
    store: Mutex<Store>,
    /// Mirror of `store.mode == Spooling`, read without the lock on every send.
    spooling: AtomicBool,
    /// Wakes the replayer when something was spooled. Its own `Arc`, so the
    /// replayer can wait on it without keeping the outbox alive.
    wake: Arc<Notify>,
    metrics: Metrics,
}

struct Store {
    spool: Spool,
    mode: Mode,
    /// Spool stats last put on `/metrics`.
    seen: SpoolStats,
    /// The last append was dropped (logged once per run of drops).
    dropping: bool,
}

enum Job {
    Confirm {
        confirmation: Confirmation,
        reply: oneshot::Sender<Result<Delivered, OutboxError>>,
    },
    Flush(oneshot::Sender<()>),
}

impl Outbox {
    /// Open the spool (replaying what an earlier process left in it) and
    /// start the tasks that confirm publishes and replay the spool. They
    /// end when every clone of the outbox is dropped.
    pub fn open(publisher: Publisher, config: OutboxConfig) -> Result<Outbox, OutboxError> {
        let open_error = |source| OutboxError::Open {
            dir: config.spool_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.spool_dir).map_err(|source| {
            open_error(SpoolError::Io {
                path: config.spool_dir.clone(),
                source,
            })
        })?;
        let spool = Spool::open(&config.spool_dir, config.spool.clone()).map_err(open_error)?;
        let mode = if spool.is_empty() {
            Mode::Direct
        } else {
            Mode::Spooling
        };
        if mode == Mode::Spooling {
            tracing::info!(dir = %config.spool_dir.display(), pending = spool.stats().pending_records, "spool holds events from an earlier run; replaying them once NATS is reachable");
        }
        let metrics = publisher.metrics().clone();
        let shared = Arc::new(Shared {
            publisher,
            config,
            store: Mutex::new(Store {
                spool,
                mode,
                seen: SpoolStats::default(),
                dropping: false,
            }),
            spooling: AtomicBool::new(mode == Mode::Spooling),
            wake: Arc::new(Notify::new()),
            metrics,
        });
        shared.update_metrics(&mut shared.lock());
        let (confirmations, jobs) = mpsc::unbounded_channel();
        tokio::spawn(confirm_all(shared.clone(), jobs));
        tokio::spawn(replay(Arc::downgrade(&shared)));
        Ok(Outbox {
            inner: Inner::Spooled {
                shared,
                confirmations,
            },
        })
    }

    /// What a collector runs with: the spool `config` names when it has
    /// one, else (no spool configured, or it cannot be opened: said in the
    /// log) no spool.
    pub fn open_or_without_spool(publisher: Publisher, config: Option<OutboxConfig>) -> Outbox {
        let Some(config) = config else {
            return Outbox::without_spool(publisher);
        };
        let dir = config.spool_dir.clone();
        match Outbox::open(publisher.clone(), config) {
            Ok(outbox) => outbox,
            Err(e) => {
                tracing::error!(error = %e, dir = %dir.display(), "cannot open the outage spool; publishing without it");
                Outbox::without_spool(publisher)
            }
        }
    }

    /// No spool: events go straight to `publisher`, and one the stream does
    /// not acknowledge after the publisher's retries fails with
    /// [`OutboxError::Unavailable`].
    pub fn without_spool(publisher: Publisher) -> Outbox {
        Outbox {
            inner: Inner::Direct(Box::new(publisher)),
        }
    }

    /// Publish `event` to `subject`, or spool it if NATS is unreachable.
    /// Waits while the publisher's in-flight bound is reached (backpressure).
    pub async fn send(
        &self,
        subject: impl Into<String>,
        event: &Event,
    ) -> Result<Receipt, OutboxError> {
        let (shared, confirmations) = match &self.inner {
            Inner::Spooled {
                shared,
                confirmations,
            } => (shared, confirmations),
            Inner::Direct(publisher) => {
                return publisher
                    .send(subject, event)
                    .await
                    .map(Receipt::from)
                    .map_err(classify);
            }
        };
        let id = event.id().to_string();
        let subject = subject.into();
        let mode = if shared.spooling.load(Ordering::Acquire) {
            Mode::Spooling
        } else {
            Mode::Direct
        };
        match route(mode, shared.publisher.is_connected()) {
            Route::Publish => match shared.publisher.send(subject.as_str(), event).await {
                Ok(confirmation) => {
                    let (reply, receiver) = oneshot::channel();
                    if confirmations
                        .send(Job::Confirm {
                            confirmation,
                            reply,
                        })
                        .is_err()
                    {
                        return Err(OutboxError::Closed { id });
                    }
                    Ok(Receipt {
                        id,
                        state: ReceiptState::Waiting(receiver),
                    })
                }
                Err(e) => Err(classify(e)),
            },
            Route::Spool => {
                let (headers, payload) = to_nats(event);
                let size = wire_size(Some(&headers), &payload);
                let limit = shared.publisher.max_event_bytes();
                if size > limit {
                    shared.metrics.refuse("oversized");
                    return Err(OutboxError::TooLarge(PublishError::TooLarge {
                        id,
                        size,
                        limit,
                    }));
                }
                let record = Record::from_nats(subject, id.clone(), &headers, payload);
                let result = shared.clone().spool(record).await;
                Ok(Receipt {
                    id,
                    state: ReceiptState::Ready(result),
                })
            }
        }
    }

    /// Wait until every publish sent so far is acknowledged or spooled,
    /// then fsync the spool: call before a graceful exit.
    /// (Without a spool there is nothing to do: receipts say what became
    /// of each event.)
    pub async fn flush(&self) -> Result<(), OutboxError> {
        let Inner::Spooled {
            shared,
            confirmations,
        } = &self.inner
        else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        if confirmations.send(Job::Flush(done)).is_ok() {
            let _ = wait.await;
        }
        let syncing = shared.clone();
        tokio::task::spawn_blocking(move || syncing.lock().spool.sync())
            .await
            .map_err(|e| OutboxError::Spool {
                id: String::new(),
                source: SpoolError::Io {
                    path: shared.config.spool_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                },
            })?
            .map_err(|source| OutboxError::Spool {
                id: String::new(),
                source,
            })
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        match &self.inner {
            Inner::Spooled { shared, .. } => shared.lock().mode,
            Inner::Direct(_) => Mode::Direct,
        }
    }

    /// The spool's counters (all zero without a spool).
    pub fn spool_stats(&self) -> SpoolStats {
        match &self.inner {
            Inner::Spooled { shared, .. } => shared.lock().spool.stats(),
            Inner::Direct(_) => SpoolStats::default(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        match &self.inner {
            Inner::Spooled { shared, .. } => &shared.metrics,
            Inner::Direct(publisher) => publisher.metrics(),
        }
    }
}

/// A receipt for a publish made without a spool to fall back to: one that
/// is not acknowledged fails with `Unavailable`.
impl From<Confirmation> for Receipt {
    fn from(confirmation: Confirmation) -> Receipt {
        Receipt {
            id: confirmation.id().to_string(),
            state: ReceiptState::Confirming(confirmation),
        }
    }
}

fn classify(error: PublishError) -> OutboxError {
    match error.kind() {
        PublishErrorKind::TooLarge => OutboxError::TooLarge(error),
        PublishErrorKind::Unavailable => OutboxError::Unavailable(error),
        PublishErrorKind::Rejected => OutboxError::Rejected(error),
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the spool half-written
        // (appends are one write), so a poisoned lock is still usable.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Append to the spool off the async workers (an append may fsync).
    async fn spool(self: Arc<Self>, record: Record) -> Result<Delivered, OutboxError> {
        let id = record.msg_id.clone();
        let shared = self.clone();
        let appended = tokio::task::spawn_blocking(move || {
            let mut store = shared.lock();
            let result = store.spool.append(&record);
            match &result {
                Ok(_) => {
                    let was = store.mode;
                    store.mode = step(store.mode, Input::Spooled);
                    shared.spooling.store(true, Ordering::Release);
                    if was == Mode::Direct {
                        tracing::warn!(dir = %shared.config.spool_dir.display(), "NATS unreachable: spooling events to disk");
                    }
                    if std::mem::take(&mut store.dropping) {
                        tracing::warn!(dir = %shared.config.spool_dir.display(), "the spool takes events again");
                    }
                }
                Err(SpoolError::Dropped { reason, source, .. }) => {
                    if !std::mem::replace(&mut store.dropping, true) {
                        tracing::error!(dir = %shared.config.spool_dir.display(), reason = reason.as_str(), error = %source, "NATS unreachable and the spool cannot write: dropping events (counted, reported once NATS is back)");
                    }
                }
                Err(_) => {}
            }
            shared.update_metrics(&mut store);
            result
        })
        .await;
        match appended {
            Ok(Ok(_)) => {
                self.metrics.spooled.inc();
                self.wake.notify_one();
                Ok(Delivered::Spooled)
            }
            Ok(Err(source @ SpoolError::Dropped { .. })) => Err(OutboxError::Dropped {
                id,
                reason: match &source {
                    SpoolError::Dropped { reason, .. } => *reason,
                    _ => DropReason::IoError,
                },
                source,
            }),
            Ok(Err(source)) => Err(OutboxError::Spool { id, source }),
            Err(join) => Err(OutboxError::Spool {
                id,
                source: SpoolError::Io {
                    path: self.config.spool_dir.clone(),
                    source: std::io::Error::other(join.to_string()),
                },
            }),
        }
    }

    /// Put the spool's counters on `/metrics` (counters by their growth).
    fn update_metrics(&self, store: &mut Store) {
        let now = store.spool.stats();
        let grew = |new: u64, old: u64| new.saturating_sub(old);
        for reason in DropReason::ALL {
            let grown = grew(now.dropped(reason), store.seen.dropped(reason));
            if grown > 0 {
                self.metrics
                    .spool_dropped
                    .get_or_create(&crate::metrics::Reason {
                        reason: reason.as_str(),
                    })
                    .inc_by(grown);
            }
        }
        self.metrics
            .spool_corrupt_bytes
            .inc_by(grew(now.corrupt_bytes, store.seen.corrupt_bytes));
        self.metrics
            .spool_pending
            .set(i64::try_from(now.pending_records).unwrap_or(i64::MAX));
        self.metrics
            .spool_bytes
            .set(i64::try_from(now.bytes).unwrap_or(i64::MAX));
        store.seen = now;
    }
}

/// Await publish confirmations in one task; spool what NATS did not take.
async fn confirm_all(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut pending = FuturesUnordered::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut open = true;
    loop {
        tokio::select! {
            job = jobs.recv(), if open => match job {
                Some(Job::Confirm { confirmation, reply }) => {
                    let shared = shared.clone();
                    pending.push(async move {
                        let result = match confirmation.await {
                            Ok(ack) => Ok(Delivered::Stored(ack)),
                            Err(PublishError::Unavailable { unsent: Unsent(record), .. }) => {
                                shared.spool(*record).await
                            }
                            Err(e) => Err(classify(e)),
                        };
                        let _ = reply.send(result);
                    });
                }
                Some(Job::Flush(done)) => flushes.push(done),
                None => open = false,
            },
            Some(()) = pending.next(), if !pending.is_empty() => {}
            else => return,
        }
        if pending.is_empty() {
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

/// Await `(tag, receipt)` pairs in one task and hand each outcome to
/// `on_done` with its tag (a collector's per-kind counters, say), so a
/// sender never waits for acks. The task ends once the sender is dropped
/// and every receipt has settled.
pub fn confirm_each<T: Send + 'static>(
    mut on_done: impl FnMut(T, Result<Delivered, OutboxError>) + Send + 'static,
) -> (
    mpsc::UnboundedSender<(T, Receipt)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(T, Receipt)>();
    let task = tokio::spawn(async move {
        let mut pending = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                job = rx.recv(), if open => match job {
                    Some((tag, receipt)) => pending.push(async move { (tag, receipt.await) }),
                    None => open = false,
                },
                Some((tag, result)) = pending.next(), if !pending.is_empty() => on_done(tag, result),
                else => return,
            }
        }
    });
    (tx, task)
}

/// Replay the spool whenever it holds something and NATS is reachable.
/// Holds only a weak reference between rounds, so it ends with the outbox.
async fn replay(weak: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let interval = shared.config.retry_interval;
        let idle = !shared.spooling.load(Ordering::Acquire);
        let connected = shared.publisher.is_connected();
        let wait = if idle || !connected {
            // Losses counted with nothing left to replay (a full disk,
            // or an earlier process's unreported count) are reported too.
            let unreported =
                idle && connected && shared.lock().spool.ledger().unreported().is_some();
            if unreported {
                report_drops(&shared).await;
            }
            Some(interval)
        } else {
            match replay_round(&shared).await {
                Ok(Round::More) => None,
                Ok(Round::Drained) => {
                    report_drops(&shared).await;
                    Some(interval)
                }
                Err(reason) => {
                    tracing::debug!(%reason, "spool replay paused");
                    Some(interval)
                }
            }
        };
        if let Some(wait) = wait {
            let wake = shared.wake.clone();
            drop(shared);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

enum Round {
    More,
    Drained,
}

/// Why a replay round stopped early; the next round tries again.
#[derive(Debug, thiserror::Error)]
enum ReplayPause {
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("spool task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("replayed event not acknowledged: {0}")]
    Publish(PublishError),
}

/// Send the next window of spooled records, wait for their acks, commit
/// the acknowledged prefix.
async fn replay_round(shared: &Arc<Shared>) -> Result<Round, ReplayPause> {
    let window = shared.config.replay_window;
    let reader = shared.clone();
    let batch = tokio::task::spawn_blocking(move || {
        let mut store = reader.lock();
        store.spool.rewind();
        let mut batch = Vec::with_capacity(window);
        while batch.len() < window {
            match store.spool.next() {
                Ok(Some(item)) => batch.push(item),
                Ok(None) => break,
                Err(e) => return Err(ReplayPause::Spool(e)),
            }
        }
        if batch.is_empty() && store.spool.is_empty() {
            store.mode = step(store.mode, Input::Drained);
            reader
                .spooling
                .store(store.mode == Mode::Spooling, Ordering::Release);
            reader.update_metrics(&mut store);
        }
        Ok(batch)
    })
    .await??;
    if batch.is_empty() {
        tracing::info!("spool replayed; publishing directly again");
        return Ok(Round::Drained);
    }
    let mut confirmations = Vec::with_capacity(batch.len());
    for (cursor, record) in batch {
        let confirmation = shared
            .publisher
            .send_raw(
                record.subject.clone(),
                &record.msg_id,
                record.header_map(),
                record.payload.clone(),
            )
            .await;
        confirmations.push((cursor, confirmation));
    }
    let mut acked: Option<Cursor> = None;
    let mut failure = None;
    for (cursor, confirmation) in confirmations {
        match confirmation.await {
            Ok(_) if failure.is_none() => acked = Some(cursor),
            Ok(_) => {}
            Err(e) if e.kind() == PublishErrorKind::Rejected => {
                // The stream will never take it: skip it rather than block
                // everything behind it (counted as a failed publish).
                tracing::error!(error = %e, "spooled event refused by the stream; skipped");
                if failure.is_none() {
                    acked = Some(cursor);
                }
            }
            Err(e) => {
                failure.get_or_insert(ReplayPause::Publish(e));
            }
        }
    }
    if let Some(upto) = acked {
        let committer = shared.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let mut store = committer.lock();
            let before = store.spool.stats().pending_records;
            let result = store.spool.commit(upto);
            let after = store.spool.stats().pending_records;
            committer.update_metrics(&mut store);
            (before.saturating_sub(after), result)
        })
        .await?;
        shared.metrics.spool_replayed.inc_by(committed.0);
        if let Err(e) = committed.1 {
            // The commit holds in memory; the ack file is written by the
            // next commit. Not a reason to stop replaying (on a full disk,
            // replaying is what frees space).
            tracing::warn!(error = %e, "spool ack file not written");
        }
    }
    match failure {
        Some(reason) => Err(reason),
        None => Ok(Round::More),
    }
}

/// Once the spool has drained, say how many events it lost (overflow,
/// disk full, I/O errors) since the last report, as a `CollectorDrops`
/// event. Its id comes from the spool's life (the ledger's epoch) and the
/// totals, so a report published by a process that died before recording
/// it is deduplicated when the next one sends it again. Tried again later
/// if it cannot be published now.
async fn report_drops(shared: &Arc<Shared>) {
    let (ledger, counts) = {
        let store = shared.lock();
        let ledger = store.spool.ledger();
        match ledger.unreported() {
            Some(counts) => (ledger, counts),
            None => return,
        }
    };
    let config = &shared.config;
    let payload = drops_report(&config.node, &counts);
    let mut id_parts: Vec<Vec<u8>> = vec![
        b"spool-drops".to_vec(),
        config.component.as_bytes().to_vec(),
        config.node.as_bytes().to_vec(),
        ledger.epoch.to_be_bytes().to_vec(),
    ];
    for reason in DropReason::ALL {
        id_parts.push(ledger.total(reason).to_be_bytes().to_vec());
    }
    let id_parts: Vec<&[u8]> = id_parts.iter().map(Vec::as_slice).collect();
    let id = derive_id(&id_parts);
    let event = match crate::drops::event(id, &config.component, &config.node, &payload) {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the spool drops report");
            return;
        }
    };
    let subject = topology::subjects::raw(&config.component, &config.node);
    match shared.publisher.publish(subject, &event).await {
        Ok(_) => {
            tracing::warn!(
                dropped = payload.delta,
                counts = ?counts.iter().map(|c| (c.reason.as_str(), c.total)).collect::<Vec<_>>(),
                "the outage spool lost events (reported as collector.drops)"
            );
            let recorder = shared.clone();
            let recorded =
                tokio::task::spawn_blocking(move || recorder.lock().spool.reported(&counts)).await;
            match recorded {
                Ok(Ok(())) => {}
                // Held in memory; a restart may send the same report again
                // (same id: deduplicated within the stream's window).
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "drops report not recorded in the spool ledger")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "drops report not recorded in the spool ledger")
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "spool drops report not published yet"),
    }
}

/// The `CollectorDrops` payload for `counts`: stage `spool`, kind = the reason.
fn drops_report(
    node: &str,
    counts: &[crate::spool::Unreported],
) -> tidewatch_proto::v1::CollectorDrops {
    let counts: Vec<tidewatch_proto::v1::DropCount> = counts
        .iter()
        .map(|c| tidewatch_proto::v1::DropCount {
            stage: "spool".into(),
            kind: c.reason.as_str().into(),
            cpu: 0,
            total: c.total,
            delta: c.delta,
        })
        .collect();
    tidewatch_proto::v1::CollectorDrops {
        node: node.to_string(),
        delta: counts.iter().map(|c| c.delta).sum(),
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_the_stream_only_when_connected_and_nothing_is_spooled() {
        assert_eq!(route(Mode::Direct, true), Route::Publish);
        assert_eq!(route(Mode::Direct, false), Route::Spool);
        assert_eq!(route(Mode::Spooling, true), Route::Spool);
        assert_eq!(route(Mode::Spooling, false), Route::Spool);
    }

    #[test]
    fn spooling_lasts_until_the_spool_drains() {
        let mut mode = Mode::Direct;
        mode = step(mode, Input::Drained);
        assert_eq!(mode, Mode::Direct);
        mode = step(mode, Input::Spooled);
        assert_eq!(mode, Mode::Spooling);
        mode = step(mode, Input::Spooled);
        assert_eq!(mode, Mode::Spooling);
        mode = step(mode, Input::Drained);
        assert_eq!(mode, Mode::Direct);
    }

    #[test]
    fn error_kinds_say_what_a_retry_can_fix() {
        let closed = OutboxError::Closed { id: "x".into() };
        assert!(closed.is_retryable());
        let large = OutboxError::TooLarge(PublishError::TooLarge {
            id: "x".into(),
            size: 70_000,
            limit: 65_536,
        });
        assert_eq!(large.kind(), OutboxErrorKind::TooLarge);
        assert!(!large.is_retryable());
        assert!(large.to_string().contains("70000"));
    }
}
