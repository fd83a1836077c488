//! What the local autoscaler reads, as KEDA does: the ScaledObjects'
//! settings, and each consumer's lag from nats-server's `/jsz`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use serde_json::Value;

use super::UpArgs;
use crate::autoscale::ScalePolicy;

/// The ScaledObjects' settings: from `--keda-dir` (default `keda/` when it
/// exists), else from the manifests this build renders.
pub fn scale_policies(args: &UpArgs) -> anyhow::Result<Vec<(String, ScalePolicy)>> {
    let dir = args
        .keda_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("keda"));
    if dir.is_dir() {
        return crate::autoscale::read_scaled_objects(&dir);
    }
    // A private directory (mode 0700, unpredictable name), removed on drop.
    let rendered = tempfile::Builder::new()
        .prefix("tidewatch-keda-")
        .tempdir()?;
    let rendered_dir = rendered.path();
    for (path, contents) in crate::render::render()? {
        if let Some(name) = path.strip_prefix("keda/") {
            std::fs::write(rendered_dir.join(name), contents)?;
        }
    }
    crate::autoscale::read_scaled_objects(rendered_dir)
}

/// KEDA's lag for `consumer`: `num_pending + num_ack_pending` from
/// `/jsz?acc=$G&config=true&consumers=true`, as the nats-jetstream scaler reads it.
pub async fn consumer_lag(monitoring: &str, consumer: &str) -> anyhow::Result<u64> {
    let url = format!(
        "{}/jsz?acc=%24G&config=true&consumers=true",
        monitoring.trim_end_matches('/')
    );
    let body = http_get(&url).await?;
    let jsz: Value = serde_json::from_str(&body).context("/jsz is not JSON")?;
    let accounts = jsz["account_details"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for account in accounts {
        for stream in account["stream_detail"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            for c in stream["consumer_detail"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if c["name"] == consumer {
                    return Ok(c["num_pending"].as_u64().unwrap_or(0)
                        + c["num_ack_pending"].as_u64().unwrap_or(0));
                }
            }
        }
    }
    bail!("consumer {consumer} not in {url}")
}

/// A GET of the local, unauthenticated monitoring endpoint.
async fn http_get(url: &str) -> anyhow::Result<String> {
    let uri: http::Uri = url.parse().with_context(|| format!("{url} is not a URL"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), client.get(uri))
        .await
        .context("timed out")??;
    let status = response.status();
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        response.into_body().collect(),
    )
    .await
    .context("timed out reading the body")??
    .to_bytes();
    if !status.is_success() {
        bail!("{url}: {status}");
    }
    String::from_utf8(body.to_vec()).with_context(|| format!("{url}: not UTF-8"))
}
