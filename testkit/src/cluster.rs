//! An N-node JetStream cluster whose nodes can be killed and restarted.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{ServerProcess, log_tail};
use crate::{free_ports, http_get, poll_until};

/// How long starting the cluster, or restarting a node, may take before we
/// give up. Meta-leader election normally takes ~1 s on localhost.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Whole-cluster start attempts; ports are picked with [`free_ports`] and can
/// be stolen before the servers bind them, in which case we retry with new ones.
const START_ATTEMPTS: usize = 3;

/// The JetStream cluster name written into every node's config.
const CLUSTER_NAME: &str = "tidewatch-test";

/// A JetStream cluster of real nats-servers (3 by default) on 127.0.0.1.
///
/// Nodes are named `n0`, `n1`, … (that is their JetStream `server_name`, as
/// seen in stream and meta leader info). Each node has its own config file,
/// store dir and log in a temp dir owned by the cluster, and fixed ports
/// chosen at start, so [`restart`](Self::restart) brings a node back exactly
/// as it was. All nodes are killed and reaped on drop.
#[derive(Debug)]
pub struct NatsCluster {
    // Declared before `dir` so the processes die before their stores are deleted.
    nodes: Vec<Node>,
    dir: TempDir,
}

#[derive(Debug)]
struct Node {
    name: String,
    client_port: u16,
    monitoring_port: u16,
    cluster_port: u16,
    config_path: PathBuf,
    store_dir: PathBuf,
    log_path: PathBuf,
    /// Run as this uid (with a copy of the binary it may execute).
    run_as: Option<(PathBuf, u32)>,
    process: Option<ServerProcess>,
}

/// Why one start attempt failed; port clashes are worth retrying.
enum StartFailure {
    PortInUse(String),
    Fatal(String),
}

impl NatsCluster {
    /// Start a 3-node cluster; see [`start_with`](Self::start_with).
    pub async fn start() -> NatsCluster {
        Self::start_with(3).await
    }

    /// Start an `n`-node cluster and wait until it is healthy: every node's
    /// `/healthz` answers 200, all nodes agree on a JetStream meta leader, and
    /// the leader sees every other node as a current peer (so R`n` streams
    /// can be created right away).
    ///
    /// # Panics
    ///
    /// If `n` < 2 (a one-node JetStream cluster never leaves "recovering meta
    /// layer"; use [`NatsServer`](crate::NatsServer) instead), or the cluster is not healthy within 30 s (the message
    /// includes each node's log tail).
    pub async fn start_with(n: usize) -> NatsCluster {
        assert!(
            n >= 2,
            "a JetStream cluster needs at least 2 nodes (got {n}); use NatsServer for one"
        );
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(n).await {
                Ok(cluster) => return cluster,
                Err(StartFailure::PortInUse(msg)) => last = msg,
                Err(StartFailure::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("cluster failed to start {START_ATTEMPTS} times on port clashes; last:\n{last}");
    }

    async fn try_start(n: usize) -> Result<NatsCluster, StartFailure> {
        let dir = tempfile::Builder::new()
            .prefix("tidewatch-nats-cluster-")
            .tempdir()
            .expect("create temp dir for nats cluster");
        let ports = free_ports(3 * n);
        let cluster_ports = &ports[2 * n..];
        let nodes = (0..n)
            .map(|i| {
                let name = format!("n{i}");
                let node_dir = dir.path().join(&name);
                std::fs::create_dir_all(&node_dir).expect("create node dir");
                Node {
                    client_port: ports[i],
                    monitoring_port: ports[n + i],
                    cluster_port: cluster_ports[i],
                    config_path: node_dir.join("nats-server.conf"),
                    store_dir: node_dir.join("store"),
                    log_path: node_dir.join("server.log"),
                    run_as: None,
                    process: None,
                    name,
                }
            })
            .collect();
        let mut cluster = NatsCluster { nodes, dir };
        for node in &cluster.nodes {
            let config = node.config(cluster_ports);
            std::fs::write(&node.config_path, config).expect("write nats-server config");
        }
        for node in &mut cluster.nodes {
            node.spawn();
        }

        let outcome = poll_until(CLUSTER_TIMEOUT, || async {
            if let Some(exited) = cluster.first_exited() {
                return Some(Err(exited));
            }
            cluster.healthy_meta_leader().await.map(|_| Ok(()))
        })
        .await;
        match outcome {
            Some(Ok(())) => Ok(cluster),
            Some(Err(node)) => {
                let log = log_tail(&cluster.nodes[node].log_path);
                let msg = format!("cluster node n{node} exited during startup\n{log}");
                if log.contains("address already in use") {
                    Err(StartFailure::PortInUse(msg))
                } else {
                    Err(StartFailure::Fatal(msg))
                }
            }
            None => Err(StartFailure::Fatal(format!(
                "cluster not healthy after {CLUSTER_TIMEOUT:?}\n{}",
                cluster.all_log_tails()
            ))),
        }
    }

    /// Number of nodes (running or not).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Client URLs, one per node, in node order (including stopped nodes).
    pub fn client_urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.client_url(i)).collect()
    }

    /// Client URL of `node`, e.g. `nats://127.0.0.1:41234`.
    pub fn client_url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.node(node).client_port)
    }

    /// Client port of `node`.
    pub fn client_port(&self, node: usize) -> u16 {
        self.node(node).client_port
    }

    /// HTTP monitoring base URL of `node`, e.g. `http://127.0.0.1:41235`.
    pub fn monitoring_url(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.node(node).monitoring_port)
    }

    /// HTTP monitoring port of `node`.
    pub fn monitoring_port(&self, node: usize) -> u16 {
        self.node(node).monitoring_port
    }

    /// Cluster (route) port of `node`.
    pub fn cluster_port(&self, node: usize) -> u16 {
        self.node(node).cluster_port
    }

    /// The `server_name` of `node` (`n0`, `n1`, …), as it appears in leader
    /// fields of stream and meta cluster info.
    pub fn node_name(&self, node: usize) -> &str {
        &self.node(node).name
    }

    /// The node index for a server name reported by JetStream, if it is one
    /// of ours.
    pub fn node_index(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    /// Store dir of `node` (kept across [`restart`](Self::restart)).
    pub fn store_dir(&self, node: usize) -> &Path {
        &self.node(node).store_dir
    }

    /// Config file of `node`.
    pub fn config_path(&self, node: usize) -> &Path {
        &self.node(node).config_path
    }

    /// Log file of `node` (appended to across restarts).
    pub fn log_path(&self, node: usize) -> &Path {
        &self.node(node).log_path
    }

    /// The last lines of `node`'s log, handy in assertion messages.
    pub fn log_tail(&self, node: usize) -> String {
        log_tail(&self.node(node).log_path)
    }

    /// Process id of `node`, if it has been started and not killed.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.node(node).process.as_ref().map(ServerProcess::pid)
    }

    /// Whether `node`'s process is alive.
    pub fn is_running(&self, node: usize) -> bool {
        self.node(node)
            .process
            .as_ref()
            .is_some_and(ServerProcess::is_running)
    }

    /// A client whose server list is every node's URL, so it fails over when
    /// the node it is connected to dies.
    ///
    /// # Panics
    ///
    /// If no node accepts the connection.
    pub async fn connect(&self) -> async_nats::Client {
        let urls = self.client_urls();
        async_nats::ConnectOptions::new()
            .connect(urls.clone())
            .await
            .unwrap_or_else(|e| panic!("connect to cluster {urls:?}: {e}"))
    }

    /// A JetStream context on a fresh [`connect`](Self::connect)ion.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.connect().await)
    }

    /// Kill `node` with SIGKILL (no graceful shutdown, like a crash) and reap
    /// it. A node that is not running is left alone.
    pub async fn kill(&mut self, node: usize) {
        if let Some(process) = self.node_mut(node).process.take() {
            process.kill().await;
        }
    }

    /// Start `node` again with the same config, ports and store dir (killing
    /// it first if it is still running), then wait until the whole cluster is
    /// healthy again, which includes the node having caught up with the meta
    /// leader and its streams.
    ///
    /// # Panics
    ///
    /// If the node exits or the cluster is not healthy within 30 s.
    pub async fn restart(&mut self, node: usize) {
        self.kill(node).await;
        self.node_mut(node).spawn();
        self.wait_until_healthy().await;
    }

    /// Restart `node` as `uid` (its directory handed over, and a copy of
    /// nats-server beside it that the user may execute), so a firewall can
    /// tell its packets from the other nodes' (`meta skuid`): see
    /// [`Partition`](crate::Partition). Needs root.
    ///
    /// # Panics
    ///
    /// As [`restart`](Self::restart), or if the directory cannot be handed over.
    pub async fn restart_as(&mut self, node: usize, uid: u32) {
        // The executable itself, as the running node shows it: what is on
        // PATH may be a launcher script (pyenv, pip) that user cannot run.
        let pid = self.pid(node).expect("the node runs");
        let real = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the node's executable");
        self.kill(node).await;
        let dir = self.dir.path().join(self.node_name(node));
        let binary = dir.join("nats-server");
        std::fs::copy(&real, &binary).expect("copy nats-server");
        for entry in walk(&dir) {
            std::os::unix::fs::lchown(&entry, Some(uid), Some(uid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", entry.display()));
        }
        // The temp dir itself must be traversable by that user.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("open the cluster dir");
        self.node_mut(node).run_as = Some((binary, uid));
        self.node_mut(node).spawn();
        self.wait_until_healthy().await;
    }

    /// Wait until every running node's `/healthz` answers 200, they agree on
    /// a meta leader, and the leader sees the other running nodes as current.
    /// Returns the meta leader's node index.
    ///
    /// # Panics
    ///
    /// If a running node exits, or the condition does not hold within 30 s.
    pub async fn wait_until_healthy(&self) -> usize {
        let outcome = poll_until(CLUSTER_TIMEOUT, || async {
            if let Some(node) = self.first_exited() {
                return Some(Err(node));
            }
            self.healthy_meta_leader().await.map(Ok)
        })
        .await;
        match outcome {
            Some(Ok(leader)) => leader,
            Some(Err(node)) => panic!("cluster node n{node} exited\n{}", self.log_tail(node)),
            None => panic!(
                "cluster not healthy after {CLUSTER_TIMEOUT:?}\n{}",
                self.all_log_tails()
            ),
        }
    }

    /// The current JetStream meta leader as seen by the first running node
    /// that answers, or `None` if there is none (e.g. during an election).
    pub async fn meta_leader(&self) -> Option<usize> {
        for i in self.running_nodes() {
            if let Some(jsz) = self.jsz(i).await {
                return self.node_index(meta_leader_name(&jsz)?);
            }
        }
        None
    }

    /// The node leading `stream`'s RAFT group, asked through `client`; `None`
    /// if the stream does not exist or has no leader right now.
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> Option<usize> {
        let js = async_nats::jetstream::new(client.clone());
        let info = js.get_stream(stream).await.ok()?;
        let leader = info.cached_info().cluster.as_ref()?.leader.as_ref()?;
        self.node_index(leader)
    }

    /// The temp dir holding every node's config, store and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn node(&self, node: usize) -> &Node {
        self.nodes.get(node).unwrap_or_else(|| {
            panic!(
                "node {node} out of range: cluster has {} nodes",
                self.nodes.len()
            )
        })
    }

    fn node_mut(&mut self, node: usize) -> &mut Node {
        let count = self.nodes.len();
        self.nodes
            .get_mut(node)
            .unwrap_or_else(|| panic!("node {node} out of range: cluster has {count} nodes"))
    }

    /// Nodes we started and have not killed (they may have crashed).
    fn started_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].process.is_some())
    }

    fn running_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .collect()
    }

    /// A node we started that has exited on its own (crash, bad config).
    fn first_exited(&self) -> Option<usize> {
        self.started_nodes().find(|&i| !self.is_running(i))
    }

    async fn jsz(&self, node: usize) -> Option<serde_json::Value> {
        match http_get(&format!("{}/jsz", self.monitoring_url(node))).await {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// The meta leader if the running nodes form a healthy cluster: all
    /// answer `/healthz` with 200 and agree on the meta leader, and the
    /// leader reports every other running node as a current peer.
    async fn healthy_meta_leader(&self) -> Option<usize> {
        let running = self.running_nodes();
        let mut leader: Option<(usize, serde_json::Value)> = None;
        for &i in &running {
            let healthz = format!("{}/healthz", self.monitoring_url(i));
            if !matches!(http_get(&healthz).await, Ok((200, _))) {
                return None;
            }
            let jsz = self.jsz(i).await?;
            let idx = self.node_index(meta_leader_name(&jsz)?)?;
            match &leader {
                Some((known, _)) if *known != idx => return None,
                Some(_) => {}
                None => leader = Some((idx, serde_json::Value::Null)),
            }
            if idx == i {
                leader = Some((idx, jsz));
            }
        }
        let (leader, leader_jsz) = leader?;
        // Only the leader's own view says whether followers are current.
        let replicas = leader_jsz.get("meta_cluster")?.get("replicas");
        let replicas = replicas
            .and_then(|r| r.as_array())
            .map_or(&[][..], Vec::as_slice);
        let all_current = running.iter().filter(|&&i| i != leader).all(|&i| {
            replicas.iter().any(|r| {
                r.get("name").and_then(|n| n.as_str()) == Some(self.node_name(i))
                    && r.get("current").and_then(|c| c.as_bool()) == Some(true)
            })
        });
        all_current.then_some(leader)
    }

    fn all_log_tails(&self) -> String {
        let mut out = String::new();
        for i in 0..self.nodes.len() {
            let _ = writeln!(
                out,
                "[n{i} running={}]\n{}",
                self.is_running(i),
                self.log_tail(i)
            );
        }
        out
    }
}

impl Node {
    /// The node's config: every node lists all route ports (itself included,
    /// which nats-server ignores) so the JetStream meta group expects the
    /// full cluster size from the start.
    fn config(&self, cluster_ports: &[u16]) -> String {
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("    \"nats-route://127.0.0.1:{p}\""))
            .collect();
        // JSON string syntax is valid NATS config string syntax, and escapes
        // any odd characters in the temp path.
        let store_dir = serde_json::to_string(&self.store_dir.to_string_lossy())
            .expect("serialize store dir path");
        format!(
            "server_name: \"{name}\"\n\
             listen: \"127.0.0.1:{client}\"\n\
             http: \"127.0.0.1:{http}\"\n\
             jetstream {{\n    store_dir: {store_dir}\n    max_file_store: 1TB\n}}\n\
             cluster {{\n    name: \"{CLUSTER_NAME}\"\n    listen: \"127.0.0.1:{cluster}\"\n    routes: [\n{routes}\n    ]\n}}\n",
            name = self.name,
            client = self.client_port,
            http = self.monitoring_port,
            cluster = self.cluster_port,
            routes = routes.join("\n"),
        )
    }

    fn spawn(&mut self) {
        let args = [std::ffi::OsStr::new("-c"), self.config_path.as_os_str()];
        let run_as = self.run_as.as_ref().map(|(b, uid)| (b.as_path(), *uid));
        self.process = Some(ServerProcess::spawn_as(args, &self.log_path, run_as));
    }
}

fn meta_leader_name(jsz: &serde_json::Value) -> Option<&str> {
    jsz.get("meta_cluster")?
        .get("leader")?
        .as_str()
        .filter(|s| !s.is_empty())
}

/// `dir` and everything below it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}
