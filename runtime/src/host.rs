//! Everything a function binary needs around its handler: flags and
//! environment, logs and traces, the NATS connection, `/metrics`, the
//! chosen transport, and SIGTERM handling. A function's `main` is:
//!
//! ```no_run
//! # use tidewatch_runtime::{host::{FunctionArgs, Host}, function::*, topology::FunctionSpec};
//! # struct Echo;
//! # impl Function for Echo { async fn handle(&self, _: cloudevents::Event, _: &Context) -> Outcome { Outcome::Done } }
//! # async fn main_(args: FunctionArgs, own_file: &str) -> Result<(), Box<dyn std::error::Error>> {
//! // The crate's own spec (`include_str!("../function.toml")`), checked at start.
//! let spec = FunctionSpec::from_toml(own_file)?;
//! let host = Host::start(spec, args).await?;
//! host.run(Echo).await?;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;

#[cfg(test)]
mod tests {
    use super::connect_options;

    #[test]
    fn credentials_leave_the_url() {
        // A list stays a list: async-nats parses a comma-joined string as one URL.
        let (_, servers) =
            connect_options("nats://enrich:p%40ss@nats.ns.svc:4222, nats://other:4222");
        assert_eq!(servers, ["nats://nats.ns.svc:4222", "nats://other:4222"]);
        let (_, servers) = connect_options("127.0.0.1:4222");
        assert_eq!(servers, ["127.0.0.1:4222"]);
        let (_, servers) = connect_options("nats://s3cr3t@host:4222");
        assert_eq!(servers, ["nats://host:4222"]);
    }
}
use std::time::Duration;

use crate::consume::{self, PullConfig};
use crate::function::Function;
use crate::metrics::{self, Metrics, Readiness};
use crate::publisher::{Publisher, PublisherConfig};
use crate::serve_http::{self, HttpConfig};
use crate::telemetry::{self, Telemetry};
use crate::topology::{self, FunctionSpec};
use crate::{RuntimeError, shutdown};

/// Which transport delivers events to the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// JetStream durable pull consumer (KEDA mode).
    Jetstream,
    /// CloudEvents over HTTP on $PORT (Knative mode).
    Http,
}

/// Flags and environment shared by every function binary.
#[derive(Debug, Clone, clap::Args)]
pub struct FunctionArgs {
    /// NATS server(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// jetstream (KEDA) or http (Knative). Default: http when K_SERVICE is set, else jetstream.
    #[arg(long, env = "TIDEWATCH_TRANSPORT", value_enum)]
    pub transport: Option<Transport>,
    /// Port for the HTTP transport (Knative sets PORT).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Where emitted events are posted in HTTP mode (Knative SinkBinding sets K_SINK).
    #[arg(long, env = "K_SINK")]
    pub k_sink: Option<String>,
    /// Address of /metrics, /healthz and /readyz in JetStream mode (port 0 picks one).
    #[arg(long, env = "TIDEWATCH_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Handlers running at once (default: the function's, from its function.toml).
    #[arg(long, env = "TIDEWATCH_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Most messages per pull request (default: the concurrency).
    #[arg(long, env = "TIDEWATCH_BATCH")]
    pub batch: Option<usize>,
    /// Un-acked publishes allowed at once.
    #[arg(long, env = "TIDEWATCH_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Seconds one input may be held and retried in-process while a
    /// dependency (KV, a sink, NATS itself) is down, before a retry counts
    /// as a delivery: see `PullConfig::dependency_budget`.
    #[arg(long, env = "TIDEWATCH_DEPENDENCY_BUDGET_SECS", default_value_t = 900)]
    pub dependency_budget_secs: u64,
}

impl FunctionArgs {
    fn transport(&self) -> Transport {
        self.transport
            .unwrap_or(if std::env::var_os("K_SERVICE").is_some() {
                Transport::Http
            } else {
                Transport::Jetstream
            })
    }
}

/// A started function process: connected, instrumented, not yet serving.
pub struct Host {
    spec: FunctionSpec,
    args: FunctionArgs,
    client: Option<async_nats::Client>,
    /// Counts the client's connections; see [`connect_with_events`].
    connects: Option<tokio::sync::watch::Receiver<u64>>,
    metrics: Metrics,
    readiness: Readiness,
    _telemetry: Telemetry,
}

impl Host {
    /// Set up logs and traces, connect to NATS (always in JetStream mode; in
    /// HTTP mode only when NATS_URL is set, for functions that use KV).
    pub async fn start(spec: FunctionSpec, args: FunctionArgs) -> Result<Host, RuntimeError> {
        let telemetry = telemetry::init(spec.name);
        let wants_nats =
            args.transport() == Transport::Jetstream || std::env::var_os("NATS_URL").is_some();
        let (client, connects) = if wants_nats {
            let (client, connects) = connect_with_events(&args.nats_url, spec.name).await?;
            (Some(client), Some(connects))
        } else {
            (None, None)
        };
        Ok(Host {
            metrics: Metrics::new(spec.name),
            spec,
            args,
            client,
            connects,
            readiness: Readiness::default(),
            _telemetry: telemetry,
        })
    }

    /// The NATS connection, for functions that keep state in KV.
    pub fn client(&self) -> Result<&async_nats::Client, RuntimeError> {
        self.client.as_ref().ok_or_else(|| {
            RuntimeError::Setup(format!("{} needs NATS: set NATS_URL", self.spec.name))
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serve `function` on the chosen transport until SIGTERM/SIGINT, then drain.
    pub async fn run<F: Function>(self, function: F) -> Result<(), RuntimeError> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let when_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        tokio::spawn(async move {
            shutdown::signal().await;
            tracing::info!("shutdown signal received: draining");
            let _ = stop.send(true);
        });
        match self.args.transport() {
            Transport::Jetstream => {
                let client = self.client()?.clone();
                let (listener, addr) = metrics::bind(self.args.metrics_addr)
                    .await
                    .map_err(RuntimeError::Io)?;
                tracing::info!(%addr, "metrics on http://{addr}/metrics");
                let admin = tokio::spawn(metrics::serve_admin(
                    listener,
                    self.metrics.clone(),
                    self.readiness.clone(),
                    when_stopped(),
                ));
                let stream_key = self.spec.consumer.stream;
                let stream = topology::stream(stream_key).ok_or_else(|| {
                    RuntimeError::Setup(format!("no stream {stream_key} in the topology"))
                })?;
                let publisher = Publisher::new(
                    client.clone(),
                    PublisherConfig::default().max_in_flight(self.args.max_in_flight),
                    self.metrics.clone(),
                );
                let mut config = PullConfig::new(stream.name, self.spec.consumer.durable)
                    .batch(self.args.batch.unwrap_or(self.spec.concurrency))
                    .concurrency(self.args.concurrency.unwrap_or(self.spec.concurrency))
                    .dependency_budget(Duration::from_secs(self.args.dependency_budget_secs));
                if let Some(connects) = self.connects.clone() {
                    config = config.connects(connects);
                }
                let result = consume::run(
                    function,
                    self.spec.name,
                    client,
                    publisher,
                    config,
                    self.readiness.clone(),
                    when_stopped(),
                )
                .await;
                admin.abort();
                result
            }
            Transport::Http => {
                let addr = SocketAddr::from(([0, 0, 0, 0], self.args.port));
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(RuntimeError::Io)?;
                let sink = match &self.args.k_sink {
                    Some(s) => Some(
                        s.parse::<http::Uri>()
                            .map_err(|e| RuntimeError::Setup(format!("K_SINK {s:?}: {e}")))?,
                    ),
                    None => None,
                };
                let config = HttpConfig::new(addr).sink(sink);
                serve_http::run(
                    function,
                    self.spec.name,
                    listener,
                    config,
                    self.metrics.clone(),
                    self.readiness.clone(),
                    when_stopped(),
                )
                .await
            }
        }
    }
}

/// Credentials given as their own settings rather than in the URL: the
/// Kubernetes manifests pass them this way, so a password with `@` or `/`
/// needs no escaping and never appears in a URL that may be logged.
pub const NATS_USER_ENV: &str = "NATS_USER";
/// The password for [`NATS_USER_ENV`].
pub const NATS_PASSWORD_ENV: &str = "NATS_PASSWORD";
/// A PEM file of CA certificates to verify the server with; set, TLS is required.
pub const NATS_CA_FILE_ENV: &str = "NATS_CA_FILE";

/// A file holding a bearer token (a projected Kubernetes ServiceAccount
/// token), read again on every (re)connect because the kubelet rotates it.
/// The NATS auth callout (`tidewatch-auth-callout`) verifies it and grants
/// the collector named by [`NATS_USER_ENV`] the subjects of the node in
/// `NODE_NAME`, so the connection's inbox is [`node_inbox_prefix`].
pub const NATS_TOKEN_FILE_ENV: &str = "NATS_TOKEN_FILE";
/// The node a collector runs on (the Kubernetes downward API sets it).
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// The inbox prefix of a collector's connections on `node` when it
/// authenticates through the auth callout: one per collector and node, so
/// one node's collector cannot read another node's replies. The node goes
/// through [`topology::subjects::token`]: `a.b` must not nest under `a`.
pub fn node_inbox_prefix(collector: &str, node: &str) -> String {
    inbox_prefix(&format!(
        "{}_{}",
        topology::subjects::token(collector),
        topology::subjects::token(node)
    ))
}

/// Options that authenticate with the token in `file`, read at each
/// connect (a rotated token is picked up by the next reconnect; the
/// callout's grant expires with the token, which forces one), with the
/// inbox of `identity` (collector, node) if given.
pub fn token_file_options(
    file: std::path::PathBuf,
    identity: Option<(&str, &str)>,
) -> async_nats::ConnectOptions {
    let options = async_nats::ConnectOptions::with_auth_callback(move |_nonce| {
        let file = file.clone();
        async move {
            let token = tokio::fs::read_to_string(&file).await.map_err(|e| {
                async_nats::AuthError::new(format!(
                    "cannot read the NATS token file {}: {e}",
                    file.display()
                ))
            })?;
            let mut auth = async_nats::Auth::new();
            auth.token = Some(token.trim().to_string());
            Ok(auth)
        }
    });
    match identity {
        Some((collector, node)) => options.custom_inbox_prefix(node_inbox_prefix(collector, node)),
        None => options,
    }
}

/// The inbox prefix of `user`'s connections: replies to its requests (the
/// JetStream API, KV reads, pull deliveries) arrive under it, and the
/// rendered permissions let only that user subscribe there, so no component
/// can read another's deliveries through a shared `_INBOX.>`.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// Options for `url`, with credentials embedded in it (`nats://user:pass@host`,
/// `nats://token@host`, percent-encoded) taken out and applied: async-nats
/// ignores them in a URL. `NATS_USER`/`NATS_PASSWORD` in the environment
/// give credentials as separate settings (the URL's win), and `NATS_CA_FILE`
/// requires TLS verified against that CA. Returns the options and the
/// servers without credentials, one entry per server (pass the list to
/// `connect`, which would read a comma-joined string as one URL).
pub fn connect_options(url: &str) -> (async_nats::ConnectOptions, Vec<String>) {
    let mut options = match std::env::var_os(NATS_TOKEN_FILE_ENV) {
        Some(file) => {
            let user = std::env::var(NATS_USER_ENV).ok();
            let node = std::env::var(NODE_NAME_ENV).ok();
            token_file_options(
                std::path::PathBuf::from(file),
                user.as_deref().zip(node.as_deref()),
            )
        }
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(user), Some(password)) = (
        std::env::var_os(NATS_USER_ENV),
        std::env::var_os(NATS_PASSWORD_ENV),
    ) {
        let user = user.to_string_lossy().into_owned();
        options = options
            .custom_inbox_prefix(inbox_prefix(&user))
            .user_and_password(user, password.to_string_lossy().into_owned());
    }
    if let Some(ca) = std::env::var_os(NATS_CA_FILE_ENV) {
        options = options
            .add_root_certificates(std::path::PathBuf::from(ca))
            .require_tls(true);
    }
    let mut servers = Vec::new();
    for server in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let with_scheme = if server.contains("://") {
            server.to_string()
        } else {
            format!("nats://{server}")
        };
        match url::Url::parse(&with_scheme) {
            Ok(mut parsed) if !parsed.username().is_empty() => {
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                let user = decode(parsed.username());
                options = match parsed.password() {
                    Some(password) => options
                        .custom_inbox_prefix(inbox_prefix(&user))
                        .user_and_password(user, decode(password)),
                    None => options.token(user),
                };
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
                servers.push(parsed.to_string().trim_end_matches('/').to_string());
            }
            _ => servers.push(server.to_string()),
        }
    }
    (options, servers)
}

/// How long [`connect`] waits for the first connection before handing
/// back a client that keeps trying in the background.
pub const FIRST_CONNECT_GRACE: Duration = Duration::from_secs(5);

/// Connect to NATS, naming the process. The first connection is retried in
/// the background; this returns once it is up, or after
/// [`FIRST_CONNECT_GRACE`] (so a collector starting during an outage spools
/// instead of waiting, and one starting normally publishes directly).
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, RuntimeError> {
    connect_with_events(url, name)
        .await
        .map(|(client, _)| client)
}

/// [`connect`], also returning a count of the connections made so far,
/// which changes on every reconnect (the consumer sweeps for poison
/// messages then: see [`crate::poison`]).
pub async fn connect_with_events(
    url: &str,
    name: &str,
) -> Result<(async_nats::Client, tokio::sync::watch::Receiver<u64>), RuntimeError> {
    if std::env::var_os(NATS_TOKEN_FILE_ENV).is_some()
        && (std::env::var_os(NATS_USER_ENV).is_none() || std::env::var_os(NODE_NAME_ENV).is_none())
    {
        // Its grant allows only the collector's per-node inbox: without
        // both names every reply would be refused.
        return Err(RuntimeError::Setup(format!(
            "{NATS_TOKEN_FILE_ENV} is set: {NATS_USER_ENV} (the collector) and {NODE_NAME_ENV} must be set too"
        )));
    }
    let (options, servers) = connect_options(url);
    let (connects_tx, connects) = tokio::sync::watch::channel(0u64);
    let client = options
        .name(format!("tidewatch-{name}"))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let connects_tx = connects_tx.clone();
            async move {
                match event {
                    async_nats::Event::Connected => connects_tx.send_modify(|n| *n += 1),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from NATS; reconnecting")
                    }
                    _ => {}
                }
            }
        })
        .connect(&servers)
        .await
        .map_err(|e| RuntimeError::Connect {
            url: servers.join(","),
            reason: e.to_string(),
        })?;
    let mut connected = connects.clone();
    let up = tokio::time::timeout(FIRST_CONNECT_GRACE, connected.wait_for(|n| *n > 0)).await;
    if !matches!(up, Ok(Ok(_))) {
        tracing::warn!(url = %servers.join(","), "NATS not reachable yet; still trying in the background");
    }
    Ok((client, connects))
}
