//! `tidewatch`: run the pipeline locally and talk to it.
//!
//! - `up` ([`up`]): find or start nats-server, provision, run the functions,
//!   show a live view; Ctrl-C stops everything.
//! - `emit`, `burst` ([`emit`]): publish well-formed synthetic events.
//! - `tail` ([`tail`]): follow streams as readable JSON.
//! - `provision`, `status` ([`status`]): create the topology, inspect it.
//! - `replay` ([`replay`]): re-deliver stored events to one function.
//! - `bench` ([`bench`]): our publish path against raw async-nats.
//!
//! [`local_nats`] finds and starts a local nats-server for `up` and `bench`.

mod autoscale;
mod bench;
mod bench_pipeline;
mod child_process;
mod emit;
mod functions;
mod local_nats;
mod own_dir;
mod render;
mod replay;
mod scaffold;
mod secrets;
mod status;
mod tail;
mod up;

use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

/// Tidewatch turns what happens on Kubernetes nodes into answers.
///
/// Start here:   tidewatch up            (runs everything locally)
/// Then, in another terminal:
///               tidewatch emit --type dev.tidewatch.k8s.container.restarted \
///                   --subject pod/default/web-1 --count 3 \
///                   --data '{"container":"app","exitCode":137,"reason":"OOMKilled"}'
///               tidewatch tail          (watch events flow)
///               tidewatch status        (streams, consumers, lag)
#[derive(Parser)]
#[command(name = "tidewatch", version, verbatim_doc_comment)]
struct Cli {
    /// NATS server URL (comma-separated for several).
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Tidewatch locally: find or start nats-server, provision, run the functions, show a live view.
    Up(up::UpArgs),
    /// Publish one or more well-formed events (for demos and tests).
    Emit(emit::EmitArgs),
    /// Publish a burst of synthetic events at a given rate, with a progress bar.
    Burst(emit::BurstArgs),
    /// Follow streams and print events as readable JSON, one per line.
    Tail(tail::TailArgs),
    /// Create or converge streams, consumers and KV buckets (idempotent).
    Provision(status::ProvisionArgs),
    /// Show streams, consumers (pending / ack pending) and KV buckets.
    Status,
    /// Re-deliver stored events to one function, or to a subject, without disturbing live consumers.
    Replay(replay::ReplayArgs),
    /// Benchmarks, reported as ratios against a raw baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List the event types Tidewatch knows and the payload each carries.
    Types,
    /// Add things: `tidewatch new function <name>` scaffolds a function with its own consumer.
    #[command(subcommand)]
    New(scaffold::NewCommand),
    /// Render the Kubernetes manifests (deploy/, keda/, knative/) from the topology; --check fails if they drifted.
    Render(render::RenderArgs),
    /// Generate the NATS passwords and TLS certificates the manifests read (untracked; kept on re-runs).
    Secrets(secrets::SecretsArgs),
    /// Hand a (hostPath) directory to a non-root user, never following links: the systemd collector's init container.
    OwnDir(own_dir::OwnDirArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    // `up` starts its server where a chosen NATS_URL points; the default it may move.
    let url_set = !matches!(
        matches.value_source("nats_url"),
        None | Some(clap::parser::ValueSource::DefaultValue)
    );
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Up(args) => up::run(&cli.nats_url, url_set, args).await,
        Command::Emit(args) => emit::emit(&connect(&cli.nats_url).await?, args).await,
        Command::Burst(args) => emit::burst(&connect(&cli.nats_url).await?, args).await,
        Command::Tail(args) => tail::run(&connect(&cli.nats_url).await?, args).await,
        Command::Provision(args) => status::provision(&connect(&cli.nats_url).await?, args).await,
        Command::Status => status::status(&connect(&cli.nats_url).await?).await,
        Command::Replay(args) => replay::run(&connect(&cli.nats_url).await?, args).await,
        Command::Bench(cmd) => bench::run(&cli.nats_url, cmd).await,
        Command::Render(args) => render::run(args),
        Command::Secrets(args) => secrets::run(args),
        Command::OwnDir(args) => own_dir::run(args),
        Command::New(command) => scaffold::run(command),
        Command::Types => {
            for t in tidewatch_runtime::topology::types::ALL {
                println!("{:<48} {:<28} {}", t.name, t.payload, t.description);
            }
            Ok(())
        }
    }
}

/// Connect once, failing fast with a hint when nothing answers.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    try_connect(url).await.with_context(|| {
        format!("cannot reach NATS at {}. Start Tidewatch with `tidewatch up` (it starts nats-server if needed), or set NATS_URL", local_nats::redact(url))
    })
}

/// One connection attempt with a short timeout (no retry loop).
pub async fn try_connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let (options, servers) = tidewatch_runtime::host::connect_options(url);
    let client = options
        .name("tidewatch-cli")
        .connection_timeout(Duration::from_secs(2))
        .connect(&servers)
        .await?;
    Ok(client)
}

/// A publisher for a CLI command.
pub fn publisher(
    client: &async_nats::Client,
    config: tidewatch_runtime::publisher::PublisherConfig,
) -> tidewatch_runtime::publisher::Publisher {
    tidewatch_runtime::publisher::Publisher::new(
        client.clone(),
        config,
        tidewatch_runtime::metrics::Metrics::new("cli"),
    )
}

/// A token unique to this invocation, hashed into the ids of the events it
/// creates so two runs never collide while one run's retries deduplicate.
pub fn invocation_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    )
}

/// This machine's name, for event sources.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
