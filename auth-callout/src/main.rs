//! `tidewatch-auth-callout`: the service's flags and wiring; everything
//! else is the library's.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tidewatch_auth_callout::callout::{self, Authority};
use tidewatch_auth_callout::grant::Policy;
use tidewatch_auth_callout::nkey::AccountKey;
use tidewatch_runtime::metrics::{self, Metrics, Readiness};

/// Grant collectors node-scoped NATS rights from their ServiceAccount tokens.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// NATS URL; credentials come from NATS_USER/NATS_PASSWORD, the CA from NATS_CA_FILE.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The issuer account seed (`SA...`), a file from the callout's Secret.
    #[arg(long, env = "TIDEWATCH_AUTH_ISSUER_SEED_FILE")]
    issuer_seed_file: PathBuf,
    /// The namespace of the collectors' ServiceAccounts.
    #[arg(
        long,
        env = "TIDEWATCH_AUTH_NAMESPACE",
        default_value = "tidewatch-system"
    )]
    namespace: String,
    /// The audience the collectors' projected tokens are issued for.
    #[arg(long, env = "TIDEWATCH_AUTH_AUDIENCE", default_value = "nats")]
    audience: String,
    /// The longest a grant lasts, in seconds (also bounded by the token's expiry).
    #[arg(long, env = "TIDEWATCH_AUTH_MAX_GRANT_SECS", default_value_t = 3600)]
    max_grant_secs: i64,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "TIDEWATCH_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = tidewatch_runtime::telemetry::init("auth-callout");
    let seed = std::fs::read_to_string(&args.issuer_seed_file).with_context(|| {
        format!(
            "cannot read the issuer seed {}",
            args.issuer_seed_file.display()
        )
    })?;
    let issuer = AccountKey::from_seed(&seed).context("the issuer seed file")?;
    let kube_config = kube::Config::infer()
        .await
        .context("no Kubernetes API credentials (in-cluster ServiceAccount or KUBECONFIG)")?;
    let kubernetes = kube::Client::try_from(kube_config).context("Kubernetes client")?;
    let nats = tidewatch_runtime::host::connect(&args.nats_url, "auth-callout").await?;
    let metrics = Metrics::new("auth-callout");
    let readiness = Readiness::default();
    let (listener, _) = metrics::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    let admin = tokio::spawn(metrics::serve_admin(
        listener,
        metrics.clone(),
        readiness.clone(),
        tidewatch_runtime::shutdown::signal(),
    ));
    tracing::info!(issuer = %issuer.public_key(), namespace = %args.namespace, "answering NATS authorization requests");
    readiness.set(true);
    let authority = Authority {
        policy: Policy {
            namespace: args.namespace,
            audience: args.audience,
            max_grant_secs: args.max_grant_secs,
            ..Policy::default()
        },
        issuer,
        kubernetes,
        metrics,
    };
    callout::run(nats, authority, tidewatch_runtime::shutdown::signal()).await?;
    readiness.set(false);
    admin.abort();
    Ok(())
}
