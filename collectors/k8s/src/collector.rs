//! Wiring: kube watchers → [`Tracker`] → diff modules → [`Sink`] and KV,
//! as [`K8s`], the [`host::Collector`] the runtime's collector host runs
//! (it owns the admin endpoint, NATS, the outbox and the flush on stop).
//!
//! - Pods of this node (`spec.nodeName=<node>`): always, on every replica.
//! - Nodes, Warning Events, Deployments + ReplicaSets, EndpointSlices and
//!   Services: only while this replica leads (see [`crate::lease`]); each
//!   leadership term starts with a fresh, silent baseline.
//!
//! Every watch runs through kube's `watcher` with its default backoff: it
//! relists on 410 Gone, re-watches from the last resourceVersion (bookmarks
//! keep that fresh) when a connection drops, and keeps retrying while the
//! API server is down. The [`Tracker`] makes relists produce no duplicates.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as KubeEvent, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tidewatch_runtime::collector::{self as host, CollectorHost, Context, until};
use tidewatch_runtime::metrics::{Metrics, Readiness};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::change::{COLLECTOR, Change};
use crate::config::{Args, Config};
use crate::endpoints::{Services, SliceSnapshot};
use crate::error::CollectorError;
use crate::kv::Mirror;
use crate::lease::{Elector, Timing};
use crate::node::{self, NodeSnapshot};
use crate::pod::{self, PodSnapshot};
use crate::rollout::{DeploymentSnapshot, ReplicaSetSnapshot, Rollouts};
use crate::service::ServiceSnapshot;
use crate::sink::{Bucket, Sink};
use crate::tracker::{Input, Tracker, Transition};
use crate::warning::{self, EventSnapshot};

/// How often deleted pods past their grace period are removed from KV and
/// failed KV writes retried.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often restarted containers are checked for stability.
const STABLE_CHECK: Duration = Duration::from_secs(15);

/// Kubernetes credentials: a kubeconfig (`KUBECONFIG`, `~/.kube/config`) or
/// the in-cluster service account. Err says plainly which are missing.
pub async fn credentials() -> Result<kube::Config, CollectorError> {
    kube::Config::infer().await.map_err(|e| {
        CollectorError::Credentials(format!(
            "neither a kubeconfig (KUBECONFIG or ~/.kube/config) nor in-cluster credentials (KUBERNETES_SERVICE_HOST and the service account token) were found: {e}"
        ))
    })
}

/// The Kubernetes collector, as the runtime's collector host runs it.
pub struct K8s {
    config: Config,
    client: Client,
}

impl K8s {
    /// A collector on `client` (a test's scripted API server, say).
    pub fn with_client(config: Config, client: Client) -> Result<K8s, CollectorError> {
        config.validate().map_err(CollectorError::Config)?;
        Ok(K8s { config, client })
    }
}

impl host::Collector for K8s {
    const NAME: &'static str = COLLECTOR;
    const ABOUT: &'static str = "Tidewatch Kubernetes collector: semantic pod, node, rollout, endpoint \
and Warning Event changes, published to tidewatch.raw.k8s.<node>; pod metadata kept in the \
tidewatch-pods KV bucket. Uses a kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster credentials.";
    const CONFIG_ENV: &'static str = "TIDEWATCH_K8S_CONFIG";
    type Config = Config;
    type Args = Args;
    type Error = CollectorError;

    fn apply(args: Args, config: &mut Config) {
        args.apply(config);
    }

    /// Kubernetes credentials (kubeconfig or in-cluster) exist.
    async fn check_host(_: &Config) -> Result<(), String> {
        credentials().await.map(drop).map_err(|e| e.to_string())
    }

    async fn start(config: Config, _: &Metrics) -> Result<K8s, CollectorError> {
        config.validate().map_err(CollectorError::Config)?;
        let client = Client::try_from(credentials().await?)?;
        K8s::with_client(config, client)
    }

    async fn run(self, cx: Context) -> Result<(), CollectorError> {
        self.watch(cx).await;
        Ok(())
    }
}

/// Run with credentials from the environment until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), CollectorError> {
    host::run::<K8s>(config, shutdown).await
}

/// Run against `client` until `shutdown` resolves.
pub async fn run_with_client(
    config: Config,
    client: Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CollectorError> {
    let collector = K8s::with_client(config, client)?;
    let metrics = Metrics::new(&host::component(COLLECTOR));
    let host = CollectorHost::start(COLLECTOR, &collector.config, metrics).await?;
    host.run(collector, shutdown).await
}

impl K8s {
    /// Pods of this node on every replica; cluster-scoped kinds while leading.
    async fn watch(self, cx: Context) {
        let K8s { config, client } = self;
        let Context {
            outbox,
            client: nats,
            metrics,
            readiness,
            stop: stop_rx,
        } = cx;
        let node = &config.common.node;
        let js = async_nats::jetstream::new(nats);
        let sink = Sink::new(outbox, node, metrics.clone());
        let mut tasks = tokio::task::JoinSet::new();

        // Pods of this node.
        let pods = Api::<Pod>::all(client.clone());
        let pod_config = watcher::Config::default()
            .fields(&format!("spec.nodeName={node}"))
            .timeout(config.watch_timeout_secs);
        tasks.spawn(
            PodWatch {
                sink: sink.clone(),
                bucket: Bucket::new(js.clone()),
                grace: config.pod_grace,
                refresh: config.kv_refresh,
                stable_after: config.stable_after,
                readiness,
                metrics: metrics.clone(),
            }
            .run(pods, pod_config, stop_rx.clone()),
        );

        // Leadership.
        let (leader_tx, leader_rx) = watch::channel(false);
        if config.leader_election {
            let elector = Elector {
                api: Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
                name: config.lease_name.clone(),
                identity: config.holder(),
                timing: Timing {
                    lease_duration: config.lease_duration,
                    renew_deadline: config.renew_deadline,
                    retry_period: config.retry_period,
                },
            };
            tasks.spawn(elector.run(leader_tx, stop_rx.clone()));
        } else {
            leader_tx.send_replace(true);
            // Keep the sender alive for the life of the collector.
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                until(&mut stop, true).await;
                drop(leader_tx);
            });
        }
        tasks.spawn(lead_cluster_watches(
            client,
            config.clone(),
            sink,
            Bucket::new(js),
            metrics,
            leader_rx,
            stop_rx,
        ));

        while let Some(result) = tasks.join_next().await {
            if let Err(e) = result {
                tracing::warn!(error = %e, "a collector task failed");
            }
        }
    }
}

/// A watcher event with its object reduced to a snapshot.
fn input<K, S>(event: watcher::Event<K>, snapshot: impl Fn(&K) -> Option<S>) -> Option<Input<S>>
where
    K: Resource,
{
    let keyed = |obj: &K| -> Option<(String, S)> {
        let uid = obj.meta().uid.clone()?;
        Some((uid, snapshot(obj)?))
    };
    Some(match event {
        watcher::Event::Init => Input::Init,
        watcher::Event::InitDone => Input::InitDone,
        watcher::Event::InitApply(obj) => {
            let (k, s) = keyed(&obj)?;
            Input::InitApply(k, s)
        }
        watcher::Event::Apply(obj) => {
            let (k, s) = keyed(&obj)?;
            Input::Apply(k, s)
        }
        watcher::Event::Delete(obj) => {
            let (k, s) = keyed(&obj)?;
            Input::Delete(k, s)
        }
    })
}

/// A resilient watch stream of `api`.
fn watch_stream<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, config).default_backoff()
}

/// Ticks every `every`, the first one `every` from now (the first list
/// writes everything anyway).
fn refresh_timer(every: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

fn now_ns() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

fn tombstone(pod: &PodSnapshot) -> bytes::Bytes {
    prost::Message::encode_to_vec(&pod.metadata(now_ns())).into()
}

/// The watch of this node's pods and what it writes.
struct PodWatch {
    sink: Sink,
    bucket: Bucket,
    /// How long a deleted pod's metadata stays.
    grace: Duration,
    /// How often every entry is put again (the bucket expires the rest).
    refresh: Duration,
    /// See [`crate::stability`].
    stable_after: Duration,
    readiness: Readiness,
    metrics: Metrics,
}

impl PodWatch {
    async fn run(self, api: Api<Pod>, config: watcher::Config, mut stop: watch::Receiver<bool>) {
        let PodWatch {
            sink,
            mut bucket,
            grace,
            refresh,
            stable_after,
            readiness,
            metrics,
        } = self;
        let mut stability = crate::stability::Stability::new(stable_after);
        // Often enough that "stable" comes within seconds of the window.
        let mut stable_check =
            refresh_timer(STABLE_CHECK.min(stable_after.max(Duration::from_millis(100))));
        let mut stream = std::pin::pin!(watch_stream(api, config));
        let mut tracker = Tracker::<PodSnapshot>::default();
        let mut mirror = Mirror::default();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut resync = refresh_timer(refresh);
        let mut synced = false;
        loop {
            tokio::select! {
                _ = until(&mut stop, true) => break,
                _ = sweep.tick() => mirror.sweep(Instant::now()),
                _ = resync.tick() => mirror.refresh(),
                _ = stable_check.tick() => {
                    let due = stability.due(now_ns());
                    if !due.is_empty() {
                        sink.emit(due).await;
                    }
                }
                event = stream.next() => match event {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "pod watch failed; retrying with backoff");
                        metrics.refuse("watch_error");
                    }
                    Some(Ok(event)) => {
                        metrics.events_in.inc();
                        let Some(input) = input(event, PodSnapshot::from_pod) else { continue };
                        for transition in tracker.step(input) {
                            match transition {
                                Transition::Baseline(p) => {
                                    stability.observe(&p, true, now_ns());
                                    mirror.set(&p.uid, p.keys(), prost::Message::encode_to_vec(&p.metadata(0)).into());
                                }
                                Transition::Applied { old, new } => {
                                    stability.observe(&new, false, now_ns());
                                    mirror.set(&new.uid, new.keys(), prost::Message::encode_to_vec(&new.metadata(0)).into());
                                    sink.emit(pod::changes(old.as_ref(), &new)).await;
                                }
                                Transition::Removed(p) => {
                                    stability.removed(&p.uid);
                                    sink.emit(vec![pod::deleted(&p)]).await;
                                    mirror.bury(&p.uid, Some(tombstone(&p)), Instant::now(), grace);
                                }
                            }
                        }
                        if matches!(tracker.phase(), crate::tracker::Phase::Synced) && !synced {
                            synced = true;
                            readiness.set(true);
                            // Entries of pods deleted while no collector ran
                            // here are not refreshed, and expire with the
                            // bucket's max_age: no listing of the bucket
                            // (which this collector's NATS user may not do).
                        }
                    }
                },
            }
            bucket.flush(&mut mirror).await;
        }
        // Last chance for pending writes, bounded: shutdown must not hang on
        // an unreachable NATS.
        let _ = tokio::time::timeout(SWEEP_INTERVAL, bucket.flush(&mut mirror)).await;
    }
}

/// Run the cluster-scoped watches whenever this replica leads.
async fn lead_cluster_watches(
    client: Client,
    config: Config,
    sink: Sink,
    mut bucket: Bucket,
    metrics: Metrics,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = until(&mut stop, true) => return,
            led = until(&mut leader, true) => if !led { return },
        }
        tracing::info!("leading: watching cluster-scoped objects");
        let session = watch_cluster(client.clone(), &config, &sink, &mut bucket, &metrics);
        tokio::select! {
            _ = until(&mut stop, true) => return,
            _ = until(&mut leader, false) => {
                tracing::info!("lost leadership: stopped watching cluster-scoped objects");
            }
            _ = session => return,
        }
    }
}

/// One watch event of a cluster-scoped kind.
enum Cluster {
    Node(watcher::Event<Node>),
    Event(watcher::Event<KubeEvent>),
    Deployment(watcher::Event<Deployment>),
    ReplicaSet(watcher::Event<ReplicaSet>),
    Slice(watcher::Event<EndpointSlice>),
    Service(watcher::Event<Service>),
}

/// State of one leadership term.
#[derive(Default)]
struct ClusterState {
    nodes: Tracker<NodeSnapshot>,
    events: Tracker<EventSnapshot>,
    deployments: Tracker<DeploymentSnapshot>,
    replica_sets: Tracker<ReplicaSetSnapshot>,
    slices: Tracker<SliceSnapshot>,
    services: Tracker<ServiceSnapshot>,
    rollouts: Rollouts,
    endpoints: Services,
    service_ips: Mirror,
}

impl ClusterState {
    /// Pure: fold in one event, return the changes to publish.
    fn step(&mut self, event: Cluster) -> Vec<Change> {
        let mut out = Vec::new();
        match event {
            Cluster::Node(e) => {
                for t in input(e, NodeSnapshot::from_node)
                    .map(|i| self.nodes.step(i))
                    .unwrap_or_default()
                {
                    if let Transition::Applied { old, new } = t {
                        out.extend(node::changes(old.as_ref(), &new));
                    }
                }
            }
            Cluster::Event(e) => {
                for t in input(e, EventSnapshot::from_event)
                    .map(|i| self.events.step(i))
                    .unwrap_or_default()
                {
                    if let Transition::Applied { old, new } = t {
                        out.extend(warning::changes(old.as_ref(), &new));
                    }
                }
            }
            Cluster::Deployment(e) => {
                for t in input(e, DeploymentSnapshot::from_deployment)
                    .map(|i| self.deployments.step(i))
                    .unwrap_or_default()
                {
                    out.extend(self.rollouts.deployment(t));
                }
            }
            Cluster::ReplicaSet(e) => {
                for t in input(e, ReplicaSetSnapshot::from_replica_set)
                    .map(|i| self.replica_sets.step(i))
                    .unwrap_or_default()
                {
                    out.extend(self.rollouts.replica_set(t));
                }
            }
            Cluster::Slice(e) => {
                for t in input(e, SliceSnapshot::from_slice)
                    .map(|i| self.slices.step(i))
                    .unwrap_or_default()
                {
                    out.extend(self.endpoints.slice(t));
                }
            }
            Cluster::Service(e) => {
                for t in input(e, ServiceSnapshot::from_service)
                    .map(|i| self.services.step(i))
                    .unwrap_or_default()
                {
                    match t {
                        Transition::Baseline(s) | Transition::Applied { new: s, .. } => {
                            self.service_ips.set(&s.uid, s.keys(), s.value());
                        }
                        Transition::Removed(s) => self.service_ips.remove(&s.uid),
                    }
                }
            }
        }
        out
    }
}

async fn watch_cluster(
    client: Client,
    config: &Config,
    sink: &Sink,
    bucket: &mut Bucket,
    metrics: &Metrics,
) {
    let base = watcher::Config::default().timeout(config.watch_timeout_secs);
    let streams = vec![
        watch_stream(Api::<Node>::all(client.clone()), base.clone())
            .map_ok(Cluster::Node)
            .boxed(),
        watch_stream(
            Api::<KubeEvent>::all(client.clone()),
            base.clone().fields("type=Warning"),
        )
        .map_ok(Cluster::Event)
        .boxed(),
        watch_stream(Api::<Deployment>::all(client.clone()), base.clone())
            .map_ok(Cluster::Deployment)
            .boxed(),
        watch_stream(Api::<ReplicaSet>::all(client.clone()), base.clone())
            .map_ok(Cluster::ReplicaSet)
            .boxed(),
        watch_stream(Api::<EndpointSlice>::all(client.clone()), base.clone())
            .map_ok(Cluster::Slice)
            .boxed(),
        watch_stream(Api::<Service>::all(client), base)
            .map_ok(Cluster::Service)
            .boxed(),
    ];
    let mut events = futures::stream::select_all(streams);
    let mut state = ClusterState::default();
    let mut retry = tokio::time::interval(SWEEP_INTERVAL);
    let mut resync = refresh_timer(config.kv_refresh);
    loop {
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(event)) => {
                    metrics.events_in.inc();
                    let changes = state.step(event);
                    sink.emit(changes).await;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cluster watch failed; retrying with backoff");
                    metrics.refuse("watch_error");
                }
            },
            // Retry failed KV writes.
            _ = retry.tick() => {}
            _ = resync.tick() => state.service_ips.refresh(),
        }
        bucket.flush(&mut state.service_ips).await;
    }
}
