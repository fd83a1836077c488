//! correlate: finds root causes across enriched events and publishes
//! insights.
//!
//! Rules are pure state machines ([`crash_loop`]); this binary feeds them
//! and keeps their state per entity in the correlation KV bucket, updated
//! with compare-and-set on the entry's revision and retried on conflict, so
//! any number of replicas can handle events for the same pod.

mod crash_loop;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use clap::Parser;
use cloudevents::{AttributesReader, Event};
use tidewatch_proto::v1::ContainerRestart;
use tidewatch_runtime::event::{new_event, payload};
use tidewatch_runtime::host::{FunctionArgs, Host};
use tidewatch_runtime::topology::{self, subjects, types};
use tidewatch_runtime::{Context, Emitted, Function, Outcome};

use crash_loop::{CrashLoop, Restart, State};

/// Tidewatch correlate function: enriched events → insights.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    function: FunctionArgs,
    /// Restarts within the window that make a crash loop.
    #[arg(long, env = "TIDEWATCH_CRASHLOOP_THRESHOLD", default_value_t = 3)]
    crashloop_threshold: usize,
    /// Crash-loop window in seconds.
    #[arg(long, env = "TIDEWATCH_CRASHLOOP_WINDOW_SECS", default_value_t = 600)]
    crashloop_window_secs: i64,
}

struct Correlate {
    state: kv::Store,
    crash_loop: CrashLoop,
}

/// Compare-and-set attempts before giving the event back for redelivery.
const CAS_ATTEMPTS: usize = 16;

impl Correlate {
    async fn crash_loop(&self, event: &Event, restart: &ContainerRestart) -> Outcome {
        let Some(pod) = event.subject().filter(|s| s.starts_with("pod/")) else {
            return Outcome::reject("container event without a pod/<namespace>/<name> subject");
        };
        let at_ns = event
            .time()
            .and_then(|t| t.timestamp_nanos_opt())
            .unwrap_or(restart.finished_at_ns);
        let observed = Restart {
            event_id: event.id().to_string(),
            at_ns,
            exit_code: restart.exit_code,
            reason: restart.reason.clone(),
            container: restart.container.clone(),
        };
        let key = format!("crashloop.{}", topology::pod_keys::token(pod));
        for _ in 0..CAS_ATTEMPTS {
            let entry = match self.state.entry(key.as_str()).await {
                Ok(e) => e,
                Err(e) => {
                    return Outcome::retry(
                        Duration::from_secs(1),
                        format!("correlation state unavailable: {e}"),
                    );
                }
            };
            let (current, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<State>(&e.value) {
                        Ok(s) => (s, Some(e.revision)),
                        // Unreadable state (older format): start over rather than wedge the rule.
                        Err(_) => (State::default(), Some(e.revision)),
                    }
                }
                Some(e) => (State::default(), Some(e.revision)),
                None => (State::default(), None),
            };
            let (next, finding) = self.crash_loop.step(current.clone(), pod, observed.clone());
            if next != current {
                let bytes = match serde_json::to_vec(&next) {
                    Ok(b) => b,
                    Err(e) => return Outcome::reject(format!("state does not serialize: {e}")),
                };
                let written = match revision {
                    Some(rev) => self
                        .state
                        .update(key.as_str(), bytes.into(), rev)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => self
                        .state
                        .create(key.as_str(), bytes.into())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                };
                if let Err(reason) = written {
                    tracing::debug!(%key, %reason, "state changed under us; retrying");
                    continue;
                }
            }
            let Some(finding) = finding else {
                return Outcome::Done;
            };
            let source = topology::source(
                "correlate",
                topology::parse_source(event.source())
                    .map(|(_, n)| n)
                    .unwrap_or("cluster"),
            );
            let insight_type = types::insight(&finding.insight.kind);
            return match new_event(
                finding.message_id,
                &insight_type,
                &source,
                Some(pod),
                chrono::Utc::now(),
                &finding.insight,
            ) {
                Ok(out) => Outcome::emit(Emitted {
                    subject: subjects::insight(&finding.insight.kind),
                    event: out,
                }),
                Err(e) => Outcome::reject(format!("cannot build insight: {e}")),
            };
        }
        Outcome::retry(
            Duration::from_millis(200),
            format!("{key}: compare-and-set kept conflicting"),
        )
    }
}

impl Function for Correlate {
    async fn handle(&self, event: Event, _ctx: &Context) -> Outcome {
        match event.ty() {
            types::CONTAINER_RESTARTED | types::CONTAINER_OOMKILLED => {
                match payload::<ContainerRestart>(&event) {
                    Ok(restart) => self.crash_loop(&event, &restart).await,
                    Err(e) => Outcome::reject(e.to_string()),
                }
            }
            _ => Outcome::Done,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = Host::start(&topology::CORRELATE, args.function).await?;
    let js = async_nats::jetstream::new(host.client()?.clone());
    let state = js
        .get_key_value(topology::CORRELATION_STATE.bucket)
        .await
        .with_context(|| {
            format!(
                "KV bucket {} (run `tidewatch provision`)",
                topology::CORRELATION_STATE.bucket
            )
        })?;
    let crash_loop = CrashLoop {
        threshold: args.crashloop_threshold.max(1),
        window_ns: args.crashloop_window_secs.max(1) * 1_000_000_000,
    };
    host.run(Correlate { state, crash_loop }).await?;
    Ok(())
}
