//! correlate: finds root causes across enriched events and publishes
//! insights.
//!
//! Rules ([`rules`]) are pure state machines: crash loop ([`crash_loop`]),
//! bad rollout ([`bad_rollout`]) and declarative sequence rules
//! ([`sequence`]: OOM cascade, node runtime failure, service disruption and
//! whatever the rules file adds). This binary feeds them and keeps their
//! state per rule and entity in the correlation KV bucket (key
//! `<rule>.<entity key>`), updated with compare-and-set on the entry's
//! revision and retried on conflict, so any number of replicas can handle
//! events for the same entity. The bucket's max age expires quiet entities.

mod bad_rollout;
mod crash_loop;
mod observation;
mod rules;
mod sequence;
mod template;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use clap::Parser;
use cloudevents::{AttributesReader, Event};
use tidewatch_runtime::event::new_event;
use tidewatch_runtime::host::{FunctionArgs, Host};
use tidewatch_runtime::topology::{self, subjects, types};
use tidewatch_runtime::{Context, Emitted, Function, Outcome};

use observation::Observation;
use rules::{Finding, Rule, RulesFile};

/// Tidewatch correlate function: enriched events → insights.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    function: FunctionArgs,
    /// Rules file (TOML); the shipped rules when not given. See rules/default.toml.
    #[arg(long, env = "TIDEWATCH_RULES")]
    rules: Option<std::path::PathBuf>,
    /// Print the shipped rules file and exit.
    #[arg(long)]
    print_default_rules: bool,
    /// Check the rules file and exit.
    #[arg(long)]
    check_rules: bool,
}

struct Correlate {
    state: kv::Store,
    rules: Vec<Rule>,
    /// Handlers of one process updating the same key take turns, so
    /// compare-and-set conflicts only happen between replicas.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Revision and value this process last wrote, per state key.
    written: std::sync::Mutex<std::collections::HashMap<String, (u64, Vec<u8>)>>,
}

/// State keys remembered at most (forgotten all at once when full).
const KNOWN_KEYS: usize = 100_000;

impl Correlate {
    fn new(state: kv::Store, rules: Vec<Rule>) -> Correlate {
        Correlate {
            state,
            rules,
            stripes: (0..256).map(|_| tokio::sync::Mutex::new(())).collect(),
            written: Default::default(),
        }
    }
    fn known(&self, key: &str) -> Option<(u64, Vec<u8>)> {
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        written.get(key).cloned()
    }
    fn remember(&self, key: &str, value: Option<(u64, Vec<u8>)>) {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match value {
            Some(v) => {
                if written.len() >= KNOWN_KEYS {
                    written.clear();
                }
                written.insert(key.to_string(), v);
            }
            None => {
                written.remove(key);
            }
        }
    }
    fn stripe(&self, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.stripes[(h.finish() % self.stripes.len() as u64) as usize]
    }
}

/// Compare-and-set attempts before giving the event back for redelivery.
const CAS_ATTEMPTS: usize = 64;

impl Correlate {
    /// Apply one rule to one key's state with compare-and-set.
    async fn apply(
        &self,
        rule: &Rule,
        key: &str,
        obs: &Observation,
    ) -> Result<Option<Finding>, Outcome> {
        let kv_key = rule.state_key(key);
        let _turn = self.stripe(&kv_key).lock().await;
        for attempt in 0..CAS_ATTEMPTS {
            // What this process last wrote saves a read; if another replica
            // wrote since, the compare-and-set fails and the next attempt reads.
            let known = if attempt == 0 {
                self.known(&kv_key)
            } else {
                None
            };
            let (current, revision) = match known {
                Some((rev, value)) => (Some(value), Some(rev)),
                None => {
                    let entry = self.state.entry(kv_key.as_str()).await.map_err(|e| {
                        Outcome::retry(
                            Duration::from_secs(1),
                            format!("correlation state unavailable: {e}"),
                        )
                    })?;
                    match entry {
                        Some(e) if e.operation == kv::Operation::Put => {
                            (Some(e.value.to_vec()), Some(e.revision))
                        }
                        Some(e) => (None, Some(e.revision)),
                        None => (None, None),
                    }
                }
            };
            let (next, finding) = rule.step(current.as_deref(), key, obs);
            let Some(bytes) = next else {
                return Ok(finding);
            };
            let written = match revision {
                Some(rev) => self
                    .state
                    .update(kv_key.as_str(), bytes.clone().into(), rev)
                    .await
                    .map_err(|e| e.to_string()),
                None => self
                    .state
                    .create(kv_key.as_str(), bytes.clone().into())
                    .await
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(rev) => {
                    self.remember(&kv_key, Some((rev, bytes)));
                    return Ok(finding);
                }
                Err(reason) => {
                    self.remember(&kv_key, None);
                    tracing::debug!(key = %kv_key, %reason, attempt, "state changed under us; retrying");
                    if attempt > 2 {
                        // Jitter, so replicas stop colliding in lockstep.
                        let jitter =
                            u64::from(std::process::id()).wrapping_mul(attempt as u64 + 1) % 7;
                        tokio::time::sleep(Duration::from_millis((1 << attempt.min(5)) + jitter))
                            .await;
                    }
                }
            }
        }
        Err(Outcome::retry(
            Duration::from_millis(200),
            format!("{kv_key}: compare-and-set kept conflicting"),
        ))
    }
}

impl Function for Correlate {
    async fn handle(&self, event: Event, _ctx: &Context) -> Outcome {
        let ty = event.ty();
        if !self.rules.iter().any(|r| r.wants(ty)) {
            return Outcome::Done;
        }
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let obs = Observation::from_event(&event, now);
        let mut findings = Vec::new();
        for rule in self.rules.iter().filter(|r| r.wants(ty)) {
            for key in rule.keys(&obs) {
                match self.apply(rule, &key, &obs).await {
                    Ok(f) => findings.extend(f),
                    Err(outcome) => return outcome,
                }
            }
        }
        if findings.is_empty() {
            return Outcome::Done;
        }
        let node = topology::parse_source(event.source())
            .map(|(_, n)| n)
            .unwrap_or("cluster");
        let source = topology::source("correlate", node);
        let mut out = Vec::with_capacity(findings.len());
        for finding in findings {
            match new_event(
                finding.message_id,
                &types::insight(&finding.insight.kind),
                &source,
                Some(&finding.subject),
                chrono::Utc::now(),
                &finding.insight,
            ) {
                Ok(e) => out.push(Emitted {
                    subject: subjects::insight(&finding.insight.kind),
                    event: e,
                }),
                Err(e) => return Outcome::reject(format!("cannot build insight: {e}")),
            }
        }
        Outcome::Emit(out)
    }
}

fn load_rules(path: Option<&std::path::Path>) -> anyhow::Result<RulesFile> {
    match path {
        None => Ok(RulesFile::builtin()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading rules file {}", p.display()))?;
            RulesFile::parse(&text, &p.display().to_string())
                .map_err(|e| anyhow::anyhow!("invalid rules file: {e}"))
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_rules {
        print!("{}", rules::DEFAULT_RULES);
        return Ok(());
    }
    let rules = load_rules(args.rules.as_deref())?.into_rules();
    if args.check_rules {
        let names: Vec<&str> = rules.iter().map(Rule::name).collect();
        println!("ok: {} rules: {}", names.len(), names.join(", "));
        return Ok(());
    }
    let host = Host::start(&topology::CORRELATE, args.function).await?;
    tracing::info!(rules = ?rules.iter().map(Rule::name).collect::<Vec<_>>(), "rules loaded");
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
    host.run(Correlate::new(state, rules)).await?;
    Ok(())
}
