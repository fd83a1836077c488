//! correlate: finds root causes across enriched events and publishes
//! insights.
//!
//! Rules ([`rules`]) are pure state machines: crash loop ([`crash_loop`]),
//! bad rollout ([`bad_rollout`]) and declarative sequence rules
//! ([`sequence`]: OOM cascade, node runtime failure, service disruption and
//! whatever the rules file adds). This binary feeds them and keeps their
//! state per rule and entity in the correlation KV bucket (key
//! `<rule>.<entity key>`), updated with compare-and-set on the entry's
//! revision and retried on conflict (counted in
//! `tidewatch_kv_conflicts_total{op}`), so any number of replicas can handle
//! events for the same entity. The bucket's max age expires quiet entities.

mod bad_rollout;
mod crash_loop;
#[cfg(test)]
mod fuzz_tests;
mod incident;
mod observation;
mod rule;
mod rules;
mod sequence;
mod template;
mod vocabulary;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use clap::Parser;
use cloudevents::{AttributesReader, Event};
use tidewatch_runtime::event::new_event;
use tidewatch_runtime::host::{FunctionArgs, Host};
use tidewatch_runtime::metrics::{KvOp, Metrics};
use tidewatch_runtime::topology::{self, FunctionSpec, subjects, types};
use tidewatch_runtime::{Context, Emitted, Function, Outcome};

use observation::Observation;
use rule::{DynRule, State};
use rules::RulesFile;
use vocabulary::Finding;

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
    /// Seconds after an event was first folded in during which a repeat of
    /// it (same CloudEvent id) still republishes its finding; later repeats
    /// change and emit nothing. Keep it under the insights stream's dedupe
    /// window (120 s), which drops the republished copy.
    #[arg(
        long,
        env = "TIDEWATCH_CORRELATE_REPUBLISH_HORIZON_SECS",
        default_value_t = 60
    )]
    republish_horizon_secs: u64,
}

struct Correlate {
    state: kv::Store,
    /// Counts compare-and-set conflicts (`tidewatch_kv_conflicts_total`).
    metrics: Metrics,
    rules: Vec<Box<dyn DynRule>>,
    /// Which rules supersede which (one incident, one insight).
    roles: incident::Roles,
    /// Handlers of one process updating the same key take turns, so
    /// compare-and-set conflicts only happen between replicas.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Decoded state and its KV revision, per state key, as this process
    /// last wrote or read it: the steady state neither reads KV nor parses
    /// JSON, only writes with compare-and-set. If another replica wrote
    /// since, the compare-and-set fails and the retry reads KV.
    known: std::sync::Mutex<std::collections::HashMap<String, Known>>,
    /// Observations waiting for their state key's turn. Whoever gets the
    /// turn folds every observation waiting for that key and writes once
    /// (group commit): a hot key (a node, a Deployment) costs one
    /// compare-and-set per turn instead of one per event.
    waiting: std::sync::Mutex<std::collections::HashMap<String, Vec<Waiter>>>,
    /// See `Args::republish_horizon_secs`, in ns.
    republish_horizon_ns: i64,
    /// Supersession claims as last written or read (see `settle_claim`).
    claims: std::sync::Mutex<std::collections::HashMap<String, KnownClaim>>,
}

/// An observation waiting to be folded into one state key.
struct Waiter {
    key: String,
    obs: std::sync::Arc<Observation>,
    reply: tokio::sync::oneshot::Sender<Result<Option<Finding>, String>>,
}

/// A state key's value at a KV revision (`None`: no entry; create it).
struct Known {
    revision: Option<u64>,
    state: State,
    readable: bool,
}

/// State keys remembered at most (forgotten all at once when full).
const KNOWN_KEYS: usize = 100_000;

impl Correlate {
    fn new(
        state: kv::Store,
        rules: Vec<Box<dyn DynRule>>,
        roles: incident::Roles,
        metrics: Metrics,
    ) -> Correlate {
        Correlate {
            state,
            metrics,
            rules,
            roles,
            stripes: (0..256).map(|_| tokio::sync::Mutex::new(())).collect(),
            known: Default::default(),
            waiting: Default::default(),
            republish_horizon_ns: 60_000_000_000,
            claims: Default::default(),
        }
    }
    fn lock_known(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Take the remembered state of `key` (the caller holds its stripe, so
    /// nobody else in this process uses it meanwhile; it is put back after).
    fn take_known(&self, key: &str) -> Option<Known> {
        self.lock_known().remove(key)
    }
    fn remember(&self, key: String, known: Known) {
        let mut map = self.lock_known();
        if map.len() >= KNOWN_KEYS {
            map.clear();
        }
        map.insert(key, known);
    }
    fn stripe(&self, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.stripes[(h.finish() % self.stripes.len() as u64) as usize]
    }
    /// The current entry of `kv_key` from KV, decoded.
    async fn read(&self, rule: &dyn DynRule, kv_key: &str) -> Result<Known, String> {
        let entry = self
            .state
            .entry(kv_key)
            .await
            .map_err(|e| format!("correlation state unavailable: {e}"))?;
        let (bytes, revision) = match &entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (Some(e.value.as_ref()), Some(e.revision))
            }
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        };
        let (state, readable) = rule.decode(bytes);
        Ok(Known {
            revision,
            state,
            readable,
        })
    }
}

/// Compare-and-set attempts before giving the event back for redelivery.
const CAS_ATTEMPTS: usize = 64;
/// Longest one commit keeps retrying conflicts: well inside the runtime's
/// handler deadline (half of ack_wait), so a hot key gives the event back
/// for a later retry instead of being abandoned mid-write.
const CAS_DEADLINE: Duration = Duration::from_secs(5);

impl Correlate {
    /// Apply one rule to one key's state with compare-and-set, together
    /// with whatever else is waiting for the same state key.
    async fn apply(
        &self,
        rule: &dyn DynRule,
        key: &str,
        obs: &std::sync::Arc<Observation>,
    ) -> Result<Option<Finding>, Outcome> {
        let kv_key = rule.state_key(key);
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kv_key.clone())
            .or_default()
            .push(Waiter {
                key: key.to_string(),
                obs: obs.clone(),
                reply,
            });
        let retry = |reason: String| Outcome::retry(Duration::from_secs(1), reason);
        let _turn = self.stripe(&kv_key).lock().await;
        // The previous turn may have folded this observation already.
        match answer.try_recv() {
            Ok(result) => return result.map_err(retry),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                return Err(retry(format!(
                    "{kv_key}: the turn folding this event ended early"
                )));
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
        }
        let batch = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&kv_key)
            .unwrap_or_default();
        match self.commit(rule, &kv_key, &batch).await {
            Ok(findings) => {
                for (waiter, finding) in batch.into_iter().zip(findings) {
                    let _ = waiter.reply.send(Ok(finding));
                }
            }
            Err(reason) => {
                for waiter in batch {
                    let _ = waiter.reply.send(Err(reason.clone()));
                }
            }
        }
        match answer.try_recv() {
            Ok(result) => result.map_err(retry),
            Err(_) => Err(retry(format!("{kv_key}: event was not folded"))),
        }
    }

    /// Fold `batch` in order into the state at `kv_key` and write it with
    /// one compare-and-set; on conflict re-read and fold again. Returns
    /// each observation's finding, as if they had been applied one by one.
    async fn commit(
        &self,
        rule: &dyn DynRule,
        kv_key: &str,
        batch: &[Waiter],
    ) -> Result<Vec<Option<Finding>>, String> {
        let started = std::time::Instant::now();
        for attempt in 0..CAS_ATTEMPTS {
            if started.elapsed() > CAS_DEADLINE {
                return Err(format!(
                    "{kv_key}: compare-and-set kept conflicting for {CAS_DEADLINE:?} ({attempt} attempts)"
                ));
            }
            let known = match (attempt, self.take_known(kv_key)) {
                (0, Some(known)) => known,
                _ => self.read(rule, kv_key).await?,
            };
            let revision = known.revision;
            let mut state = known.state;
            let mut readable = known.readable;
            let mut changed = false;
            let mut findings = Vec::with_capacity(batch.len());
            for waiter in batch {
                let (next, c, finding) = rule.fold(state, readable, &waiter.key, &waiter.obs);
                state = next;
                readable = true;
                changed |= c;
                findings.push(finding);
            }
            if !changed {
                self.remember(
                    kv_key.to_string(),
                    Known {
                        revision,
                        state,
                        readable: true,
                    },
                );
                return Ok(findings);
            }
            let bytes = state.encode();
            // On error: the write that lost to another writer (None when
            // something else failed), and why.
            let written = match revision {
                Some(rev) => self
                    .state
                    .update(kv_key, bytes.into(), rev)
                    .await
                    .map_err(|e| {
                        let lost = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
                        (lost.then_some("update"), e.to_string())
                    }),
                None => self.state.create(kv_key, bytes.into()).await.map_err(|e| {
                    let lost = e.kind() == kv::CreateErrorKind::AlreadyExists;
                    (lost.then_some("create"), e.to_string())
                }),
            };
            match written {
                Ok(rev) => {
                    self.remember(
                        kv_key.to_string(),
                        Known {
                            revision: Some(rev),
                            state,
                            readable: true,
                        },
                    );
                    return Ok(findings);
                }
                Err((None, reason)) => {
                    // KV itself failed (timeout, no leader, payload too
                    // large): not a conflict, so re-reading and folding
                    // again would not help. (What we knew was taken out
                    // of the cache above, so the next try reads KV.)
                    return Err(format!("{kv_key}: writing state failed: {reason}"));
                }
                Err((Some(op), reason)) => {
                    self.metrics.kv_conflicts.get_or_create(&KvOp { op }).inc();
                    // Another replica wrote first: what we knew is stale;
                    // the next attempt reads KV.
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
        Err(format!("{kv_key}: compare-and-set kept conflicting"))
    }
}

impl Correlate {
    /// One incident, one insight: settle each finding against the claims
    /// of the pods it covers (`incident.rs`); superseding findings first,
    /// so one event's OOM cascade claims the pod before its crash loop asks.
    async fn settle(
        &self,
        mut findings: Vec<Finding>,
        now_ns: i64,
    ) -> Result<Vec<Finding>, String> {
        let rank = |f: &Finding| match self.roles.role(&f.insight.kind) {
            incident::Role::Superseding { .. } => 0,
            incident::Role::Plain => 1,
            incident::Role::Subordinate { .. } => 2,
        };
        findings.sort_by_key(rank);
        let mut out = Vec::with_capacity(findings.len());
        for mut finding in findings {
            let role = self.roles.role(&finding.insight.kind);
            let pods = self.roles.pods(&finding);
            let mut publish =
                pods.is_empty() || !matches!(role, incident::Role::Subordinate { .. });
            let mut also = Vec::new();
            let mut supersedes = Vec::new();
            for pod in &pods {
                let settled = self.settle_claim(pod, &finding, &role, now_ns).await?;
                if matches!(role, incident::Role::Subordinate { .. }) {
                    publish |= settled.publish;
                    if !settled.publish {
                        self.metrics.refuse("superseded");
                    }
                }
                also.extend(settled.also);
                supersedes.extend(settled.supersedes);
            }
            supersedes.sort();
            supersedes.dedup();
            finding.insight.supersedes = supersedes;
            if publish {
                out.push(finding);
            }
            out.extend(also);
        }
        Ok(out)
    }

    /// Settle one finding against one pod's claim, with compare-and-set.
    async fn settle_claim(
        &self,
        pod: &str,
        finding: &Finding,
        role: &incident::Role<'_>,
        now_ns: i64,
    ) -> Result<incident::Settled, String> {
        let key = format!("incident.{}", topology::pod_keys::token(pod));
        let _turn = self.stripe(&key).lock().await;
        let started = std::time::Instant::now();
        for attempt in 0.. {
            if started.elapsed() > CAS_DEADLINE {
                return Err(format!(
                    "{key}: compare-and-set kept conflicting for {CAS_DEADLINE:?}"
                ));
            }
            // The claim as this process last wrote or read it: a steady
            // crash loop costs one compare-and-set, not a read and a write.
            // A stale one (another replica wrote since) fails the write,
            // and the next attempt reads KV.
            let cached = if attempt == 0 {
                self.claim_cache().remove(&key)
            } else {
                None
            };
            let (claim, revision) = match cached {
                Some(known) => known,
                None => {
                    let entry = self
                        .state
                        .entry(&key)
                        .await
                        .map_err(|e| format!("correlation state unavailable: {e}"))?;
                    match &entry {
                        Some(e) if e.operation == kv::Operation::Put => (
                            serde_json::from_slice::<incident::Claim>(&e.value).ok(),
                            Some(e.revision),
                        ),
                        Some(e) => (None, Some(e.revision)),
                        None => (None, None),
                    }
                }
            };
            let settled = incident::Claim::settle(claim.as_ref(), finding, pod, role, now_ns);
            let Some(next) = &settled.write else {
                self.remember_claim(key, (claim, revision));
                return Ok(settled);
            };
            let bytes = serde_json::to_vec(next).unwrap_or_default();
            let written = match revision {
                Some(rev) => self
                    .state
                    .update(&key, bytes.into(), rev)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                None => self.state.create(&key, bytes.into()).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
            };
            match written {
                Ok(rev) => {
                    self.remember_claim(key, (Some(next.clone()), Some(rev)));
                    return Ok(settled);
                }
                Err((true, _)) => {
                    self.metrics
                        .kv_conflicts
                        .get_or_create(&KvOp { op: "claim" })
                        .inc();
                }
                Err((false, reason)) => {
                    return Err(format!("{key}: writing the claim failed: {reason}"));
                }
            }
        }
        Err(format!("{key}: compare-and-set kept conflicting"))
    }

    fn claim_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, KnownClaim>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember_claim(&self, key: String, known: KnownClaim) {
        let mut cache = self.claim_cache();
        if cache.len() >= KNOWN_KEYS {
            cache.clear();
        }
        cache.insert(key, known);
    }
}

/// A pod's claim and its KV revision, as this process last saw it.
type KnownClaim = (Option<incident::Claim>, Option<u64>);

impl Function for Correlate {
    fn accepts(&self, event_type: &str) -> bool {
        self.rules.iter().any(|r| r.wants(event_type))
    }

    async fn handle(&self, event: Event, _ctx: &Context) -> Outcome {
        let ty = event.ty();
        if !self.rules.iter().any(|r| r.wants(ty)) {
            return Outcome::Done;
        }
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let mut obs = Observation::from_event(&event, now);
        obs.republish_horizon_ns = self.republish_horizon_ns;
        let obs = std::sync::Arc::new(obs);
        // Every (rule, key) state is independent: update them concurrently
        // rather than one KV round trip after another.
        let updates: Vec<(&dyn DynRule, String)> = self
            .rules
            .iter()
            .filter(|r| r.wants(ty))
            .flat_map(|rule| {
                let rule: &dyn DynRule = rule.as_ref();
                rule.keys(&obs).into_iter().map(move |key| (rule, key))
            })
            .collect();
        let results = futures::future::join_all(
            updates
                .iter()
                .map(|(rule, key)| self.apply(*rule, key, &obs)),
        )
        .await;
        let mut findings = Vec::new();
        for result in results {
            match result {
                Ok(f) => findings.extend(f),
                Err(outcome) => return outcome,
            }
        }
        if findings.is_empty() {
            return Outcome::Done;
        }
        let findings = match self.settle(findings, now).await {
            Ok(f) => f,
            Err(reason) => return Outcome::retry(Duration::from_secs(1), reason),
        };
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

/// Refuse to start when a rule reads a type the consumer is not delivered:
/// the enriched stream's consumers filter by type (function.toml `types`),
/// so such a rule would silently never fire.
async fn check_delivered(
    js: &async_nats::jetstream::Context,
    durable: &str,
    file: &RulesFile,
) -> anyhow::Result<()> {
    let info = async {
        js.get_stream_no_info(topology::ENRICHED.name)
            .await?
            .consumer_info(durable)
            .await
            .map_err(async_nats::Error::from)
    }
    .await;
    let info = match info {
        Ok(info) => info,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this consumer's filters; not checking the rules' types against them");
            return Ok(());
        }
    };
    let mut filters = info.config.filter_subjects.clone();
    if !info.config.filter_subject.is_empty() {
        filters.push(info.config.filter_subject.clone());
    }
    if filters.is_empty() {
        return Ok(());
    }
    let missing = file.undelivered(|ty| {
        let subject = subjects::enriched("any", "any", ty);
        filters.iter().any(|f| subjects::matches(f, &subject))
    });
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(ty, rule)| format!("{ty} (rule {rule})"))
        .collect();
    anyhow::bail!(
        "the rules read types consumer {durable:?} is not delivered: {}. Add them to `types` in functions/correlate/function.toml and run `tidewatch provision` (events from before are in the raw stream: `tidewatch replay --stream raw --consumer enrich`)",
        list.join(", ")
    )
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

/// This function's place in the pipeline; the CLI reads the same file.
const SPEC: &str = include_str!("../function.toml");

/// See Cargo.toml: the per-event allocation pattern is cheap with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One thread: the handlers are short and mostly wait on NATS. Two workers
/// gave the same events/s for ~40% more CPU per event (cross-thread
/// wakeups); more throughput comes from more replicas (KEDA).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_rules {
        print!("{}", rules::DEFAULT_RULES);
        return Ok(());
    }
    let file = load_rules(args.rules.as_deref())?;
    let roles = file.roles();
    let file_for_check = file.clone();
    let rules = file.into_rules();
    if args.check_rules {
        let names: Vec<&str> = rules.iter().map(|r| r.name()).collect();
        println!("ok: {} rules: {}", names.len(), names.join(", "));
        return Ok(());
    }
    let spec = FunctionSpec::from_toml(SPEC)?;
    let host = Host::start(spec.clone(), args.function).await?;
    tracing::info!(rules = ?rules.iter().map(|r| r.name()).collect::<Vec<_>>(), "rules loaded");
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
    check_delivered(&js, spec.name, &file_for_check).await?;
    let metrics = host.metrics().clone();
    let mut correlate = Correlate::new(state, rules, roles, metrics);
    correlate.republish_horizon_ns =
        i64::try_from(args.republish_horizon_secs.saturating_mul(1_000_000_000))
            .unwrap_or(i64::MAX);
    host.run(correlate).await?;
    Ok(())
}

#[cfg(test)]
mod spec_tests {
    use tidewatch_runtime::topology::FunctionSpec;

    #[test]
    fn its_function_toml_is_valid() {
        let spec = FunctionSpec::from_toml(super::SPEC).expect("function.toml");
        assert_eq!(
            (spec.name, spec.consumer.stream, spec.output_stream),
            ("correlate", "enriched", Some("insights"))
        );
    }
}
