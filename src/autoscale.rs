//! KEDA's scaling arithmetic for the `nats-jetstream` trigger, reproduced
//! for `tidewatch up` (KEDA v2.20, read from its source; DESIGN.md):
//!
//! - lag = `num_pending + num_ack_pending` of the consumer;
//! - active = lag > `activationLagThreshold` (default 0);
//! - at 0 replicas and active: scale to max(minReplicaCount, 1);
//! - inactive for `cooldownPeriod` (default 300 s) with minReplicaCount 0: scale to 0;
//! - between 1 and max, the HPA's AverageValue rule: ratio = lag /
//!   (lagThreshold × current); if |1 − ratio| > 0.1, desired =
//!   ceil(lag / lagThreshold) clamped to [max(min, 1), maxReplicaCount];
//! - the HPA KEDA creates applies its behavior (Kubernetes'
//!   `normalizeDesiredReplicasWithBehaviors`, default or the ScaledObject's
//!   `advanced.horizontalPodAutoscalerConfig.behavior`): scale-up is
//!   stabilised over its window (0 s: none) and rate-limited by its
//!   policies (default per 15 s, the larger of +100 % and +4 pods);
//!   scale-down keeps the highest recommendation of its window (300 s) and
//!   is limited to −100 % per 15 s. A burst on a cluster goes 1 → 5 → 10,
//!   not 1 → 10, and so does `tidewatch up`;
//! - `tidewatch up` also caps replicas at what this host can usefully run
//!   (its cores, `--max-local-replicas`), and says so in each decision.
//!
//! [`Autoscaler::step`] is pure: it takes the time and the lag, returns the
//! decision and why, and is unit-tested against hand-computed cases.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize as _;
use serde_json::Value;

/// The scaling settings of one ScaledObject.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub lag_threshold: u64,
    pub activation_lag_threshold: u64,
    pub polling_interval: Duration,
    pub cooldown_period: Duration,
    /// HPA scale-down stabilization window.
    pub scale_down_window: Duration,
    /// The HPA's behavior (its scale-down window is `scale_down_window`).
    pub behavior: Behavior,
    /// Most replicas this host runs, whatever `max_replicas` says
    /// (`tidewatch up`; None on a cluster).
    pub host_cap: Option<u32>,
}

impl Default for ScalePolicy {
    /// KEDA's defaults.
    fn default() -> Self {
        ScalePolicy {
            min_replicas: 0,
            max_replicas: 100,
            lag_threshold: 10,
            activation_lag_threshold: 0,
            polling_interval: Duration::from_secs(30),
            cooldown_period: Duration::from_secs(300),
            scale_down_window: Duration::from_secs(300),
            behavior: Behavior::default(),
            host_cap: None,
        }
    }
}

/// One HPA scaling policy: at most `value` pods or percent per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatePolicy {
    pub percent: bool,
    pub value: u32,
    pub period: Duration,
}

/// How the HPA picks among policies (`selectPolicy`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Select {
    /// The policy allowing the largest change (the default).
    Max,
    /// The one allowing the smallest.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// One direction of an HPA behavior.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub stabilization: Duration,
    pub select: Select,
    pub policies: Vec<RatePolicy>,
}

/// `spec.behavior` of the HPA (Kubernetes defaults unless the ScaledObject
/// sets `advanced.horizontalPodAutoscalerConfig.behavior`). The scale-down
/// stabilization window lives in [`ScalePolicy::scale_down_window`].
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    pub up: Rules,
    pub down: Rules,
}

impl Default for Behavior {
    fn default() -> Self {
        let per15 = |percent, value| RatePolicy {
            percent,
            value,
            period: Duration::from_secs(15),
        };
        Behavior {
            up: Rules {
                stabilization: Duration::ZERO,
                select: Select::Max,
                policies: vec![per15(true, 100), per15(false, 4)],
            },
            down: Rules {
                stabilization: Duration::from_secs(300),
                select: Select::Max,
                policies: vec![per15(true, 100)],
            },
        }
    }
}

impl Rules {
    /// Most replicas allowed now (scale-up) from `current`, given the
    /// replicas `added` within each policy's period.
    fn up_limit(&self, current: u32, added: impl Fn(Duration) -> u32) -> Option<u32> {
        let limits = self.policies.iter().map(|p| {
            let start = current.saturating_sub(added(p.period));
            if p.percent {
                (f64::from(start) * (1.0 + f64::from(p.value) / 100.0)).ceil() as u32
            } else {
                start.saturating_add(p.value)
            }
        });
        match self.select {
            Select::Max => limits.max(),
            Select::Min => limits.min(),
            Select::Disabled => Some(current),
        }
    }

    /// Fewest replicas allowed now (scale-down) from `current`, given the
    /// replicas `removed` within each policy's period.
    fn down_limit(&self, current: u32, removed: impl Fn(Duration) -> u32) -> Option<u32> {
        let limits = self.policies.iter().map(|p| {
            let start = current.saturating_add(removed(p.period));
            if p.percent {
                (f64::from(start) * (1.0 - f64::from(p.value) / 100.0))
                    .ceil()
                    .max(0.0) as u32
            } else {
                start.saturating_sub(p.value)
            }
        });
        // The policy allowing the largest change is the lowest limit.
        match self.select {
            Select::Max => limits.min(),
            Select::Min => limits.max(),
            Select::Disabled => Some(current),
        }
    }
}

/// One scaling decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub reason: String,
}

/// Scaling state of one function.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    pub policy: ScalePolicy,
    /// When the trigger was last active (lag above the activation threshold).
    last_active: Option<Duration>,
    /// HPA recommendations (time, replicas) inside the stabilization windows.
    recommendations: VecDeque<(Duration, u32)>,
    /// Scale events (time, replicas added or removed) the HPA decided,
    /// for the rate policies.
    events: VecDeque<(Duration, i64)>,
}

impl Autoscaler {
    pub fn new(policy: ScalePolicy) -> Autoscaler {
        Autoscaler {
            policy,
            last_active: None,
            recommendations: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Decide, and remember the decision's scale event (the HPA counts
    /// what it changed within each policy's period), then apply the host cap.
    pub fn step(&mut self, now: Duration, lag: u64, current: u32) -> Decision {
        let mut decision = self.decide(now, lag, current);
        if decision.desired != current && current > 0 && decision.desired > 0 {
            self.events
                .push_back((now, i64::from(decision.desired) - i64::from(current)));
        }
        if let Some(cap) = self.policy.host_cap
            && decision.desired > cap
        {
            decision.reason = format!(
                "{}; capped at {cap}: this host's limit (--max-local-replicas; maxReplicaCount {} on a cluster)",
                decision.reason, self.policy.max_replicas
            );
            decision.desired = cap;
        }
        decision
    }

    fn changed_within(&self, now: Duration, period: Duration, up: bool) -> u32 {
        let total: i64 = self
            .events
            .iter()
            .filter(|(t, _)| now.saturating_sub(*t) < period)
            .map(|(_, d)| *d)
            .filter(|d| if up { *d > 0 } else { *d < 0 })
            .sum();
        u32::try_from(total.unsigned_abs()).unwrap_or(u32::MAX)
    }

    /// Decide the replica count at time `now` (monotonic, since start) for
    /// `lag` with `current` replicas running.
    fn decide(&mut self, now: Duration, lag: u64, current: u32) -> Decision {
        let p = &self.policy;
        let active = lag > p.activation_lag_threshold;
        if active {
            self.last_active = Some(now);
        }
        let floor = p.min_replicas.max(1);
        if current == 0 {
            if active {
                return Decision {
                    desired: floor.min(p.max_replicas),
                    reason: format!(
                        "activated: lag {lag} > activationLagThreshold {}",
                        p.activation_lag_threshold
                    ),
                };
            }
            return Decision {
                desired: p.min_replicas,
                reason: format!("idle: lag {lag}"),
            };
        }
        if !active && p.min_replicas == 0 {
            let since = now.saturating_sub(self.last_active.unwrap_or(Duration::ZERO));
            if since >= p.cooldown_period {
                self.recommendations.clear();
                return Decision {
                    desired: 0,
                    reason: format!(
                        "inactive for {}s >= cooldownPeriod {}s",
                        since.as_secs(),
                        p.cooldown_period.as_secs()
                    ),
                };
            }
        }
        let threshold = p.lag_threshold.max(1);
        let ratio = lag as f64 / (threshold as f64 * f64::from(current));
        let recommended = if (1.0 - ratio).abs() > 0.1 {
            let raw = lag.div_ceil(threshold);
            u32::try_from(raw)
                .unwrap_or(u32::MAX)
                .clamp(floor, p.max_replicas.max(floor))
        } else {
            current
        };
        self.recommendations.push_back((now, recommended));
        let keep = p.scale_down_window.max(p.behavior.up.stabilization);
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > keep)
        {
            self.recommendations.pop_front();
        }
        let longest_period = p
            .behavior
            .up
            .policies
            .iter()
            .chain(&p.behavior.down.policies)
            .map(|r| r.period)
            .max()
            .unwrap_or_default();
        while self
            .events
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > longest_period)
        {
            self.events.pop_front();
        }
        // Stabilisation: scale up to the lowest recommendation of the
        // up-window, down to the highest of the down-window.
        let within = |w: Duration| {
            self.recommendations
                .iter()
                .filter(move |(t, _)| now.saturating_sub(*t) <= w)
                .map(|(_, r)| *r)
        };
        let up_rec = within(p.behavior.up.stabilization)
            .min()
            .unwrap_or(recommended);
        let down_rec = within(p.scale_down_window).max().unwrap_or(recommended);
        let mut stabilised = current;
        if stabilised < up_rec {
            stabilised = up_rec;
        }
        if stabilised > down_rec {
            stabilised = down_rec;
        }
        let ceiling = p.max_replicas.max(floor);
        if stabilised > current {
            let limit = p
                .behavior
                .up
                .up_limit(current, |period| self.changed_within(now, period, true))
                .unwrap_or(current)
                .max(current)
                .min(ceiling);
            let desired = stabilised.min(limit);
            let mut reason =
                format!("lag {lag} / lagThreshold {threshold} → {recommended} (ratio {ratio:.2})");
            if desired < stabilised {
                reason.push_str(&format!(
                    "; scale-up policy allows {desired} now (per {}s: {})",
                    p.behavior
                        .up
                        .policies
                        .first()
                        .map_or(15, |r| r.period.as_secs()),
                    describe(&p.behavior.up)
                ));
            }
            return Decision { desired, reason };
        }
        if stabilised < current {
            let limit = p
                .behavior
                .down
                .down_limit(current, |period| self.changed_within(now, period, false))
                .unwrap_or(current)
                .min(current)
                .max(floor);
            let desired = stabilised.max(limit);
            let mut reason = format!(
                "scale down: highest recommendation in the last {}s is {stabilised}",
                p.scale_down_window.as_secs()
            );
            if desired > stabilised {
                reason.push_str(&format!(
                    "; scale-down policy allows {desired} now ({})",
                    describe(&p.behavior.down)
                ));
            }
            return Decision { desired, reason };
        }
        let reason = if recommended == current {
            format!("steady: lag {lag}, ratio {ratio:.2} within 10% of target")
        } else if recommended < current {
            format!(
                "holding {current}: recommendation {recommended}, but scale-down stabilization keeps {stabilised}"
            )
        } else {
            format!(
                "holding {current}: recommendation {recommended}, scale-up stabilization keeps {stabilised}"
            )
        };
        Decision {
            desired: current,
            reason,
        }
    }
}

/// `+100% or +4 pods per 15s (larger)`.
fn describe(rules: &Rules) -> String {
    let policies: Vec<String> = rules
        .policies
        .iter()
        .map(|p| {
            format!(
                "{}{} per {}s",
                p.value,
                if p.percent { "%" } else { " pods" },
                p.period.as_secs()
            )
        })
        .collect();
    let select = match rules.select {
        Select::Max => "the larger",
        Select::Min => "the smaller",
        Select::Disabled => "disabled",
    };
    format!("{} ({select})", policies.join(" or "))
}

/// Read the scaling settings of every ScaledObject in `dir` (keda/).
pub fn read_scaled_objects(dir: &Path) -> anyhow::Result<Vec<(String, ScalePolicy)>> {
    let mut found = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .with_context(|| format!("parse {}", path.display()))?;
            if value["kind"] != "ScaledObject" {
                continue;
            }
            let spec = &value["spec"];
            let trigger = spec["triggers"]
                .as_array()
                .and_then(|t| t.iter().find(|t| t["type"] == "nats-jetstream"))
                .with_context(|| {
                    format!(
                        "{}: ScaledObject without a nats-jetstream trigger",
                        path.display()
                    )
                })?;
            let number = |v: &Value, default: u64| -> anyhow::Result<u64> {
                match v {
                    Value::Null => Ok(default),
                    Value::Number(n) => n.as_u64().context("not a whole number"),
                    Value::String(s) => s
                        .parse()
                        .with_context(|| format!("{s:?} is not a whole number")),
                    other => anyhow::bail!("{other} is not a number"),
                }
            };
            let defaults = ScalePolicy::default();
            let metadata = &trigger["metadata"];
            let policy = ScalePolicy {
                min_replicas: number(&spec["minReplicaCount"], u64::from(defaults.min_replicas))?
                    as u32,
                max_replicas: number(&spec["maxReplicaCount"], u64::from(defaults.max_replicas))?
                    as u32,
                lag_threshold: number(&metadata["lagThreshold"], defaults.lag_threshold)?,
                activation_lag_threshold: number(
                    &metadata["activationLagThreshold"],
                    defaults.activation_lag_threshold,
                )?,
                polling_interval: std::time::Duration::from_secs(number(
                    &spec["pollingInterval"],
                    30,
                )?),
                cooldown_period: std::time::Duration::from_secs(number(
                    &spec["cooldownPeriod"],
                    300,
                )?),
                scale_down_window: defaults.scale_down_window,
                behavior: Behavior::default(),
                host_cap: None,
            };
            let behavior = &spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"];
            let mut policy = policy;
            for (direction, rules) in [
                ("scaleUp", &mut policy.behavior.up),
                ("scaleDown", &mut policy.behavior.down),
            ] {
                let b = &behavior[direction];
                if b.is_null() {
                    continue;
                }
                if !b["stabilizationWindowSeconds"].is_null() {
                    rules.stabilization =
                        Duration::from_secs(number(&b["stabilizationWindowSeconds"], 0)?);
                }
                rules.select = match b["selectPolicy"].as_str() {
                    None | Some("Max") => Select::Max,
                    Some("Min") => Select::Min,
                    Some("Disabled") => Select::Disabled,
                    Some(other) => anyhow::bail!(
                        "{}: selectPolicy {other:?} is not Max, Min or Disabled",
                        path.display()
                    ),
                };
                if let Some(list) = b["policies"].as_array() {
                    rules.policies = list
                        .iter()
                        .map(|p| {
                            Ok(RatePolicy {
                                percent: match p["type"].as_str() {
                                    Some("Percent") => true,
                                    Some("Pods") => false,
                                    other => anyhow::bail!(
                                        "{}: policy type {other:?} is not Pods or Percent",
                                        path.display()
                                    ),
                                },
                                value: number(&p["value"], 0)? as u32,
                                period: Duration::from_secs(number(&p["periodSeconds"], 15)?),
                            })
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
            }
            policy.scale_down_window = policy.behavior.down.stabilization;
            let consumer = metadata["consumer"]
                .as_str()
                .with_context(|| format!("{}: trigger without a consumer", path.display()))?
                .to_string();
            found.push((consumer, policy));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn scaler() -> Autoscaler {
        Autoscaler::new(ScalePolicy {
            min_replicas: 0,
            max_replicas: 5,
            lag_threshold: 100,
            activation_lag_threshold: 0,
            polling_interval: secs(5),
            cooldown_period: secs(30),
            scale_down_window: secs(20),
            ..ScalePolicy::default()
        })
    }

    #[test]
    fn activation_from_zero() {
        let mut s = scaler();
        assert_eq!(s.step(secs(0), 0, 0).desired, 0, "no lag: stay at zero");
        let d = s.step(secs(5), 1, 0);
        assert_eq!(d.desired, 1, "any lag above 0 activates");
        assert!(d.reason.contains("activated"));
        // Activation goes to max(min, 1) only, even with a huge lag; the HPA takes over after.
        assert_eq!(scaler().step(secs(0), 10_000, 0).desired, 1);
    }

    #[test]
    fn activation_threshold_is_strictly_greater() {
        let mut s = scaler();
        s.policy.activation_lag_threshold = 50;
        assert_eq!(s.step(secs(0), 50, 0).desired, 0);
        assert_eq!(s.step(secs(5), 51, 0).desired, 1);
    }

    #[test]
    fn hpa_average_value_with_tolerance_and_clamping() {
        let mut s = scaler();
        // lag 250, threshold 100, 1 replica: ratio 2.5 → ceil(2.5) = 3.
        assert_eq!(s.step(secs(0), 250, 1).desired, 3);
        // lag 310 at 3 replicas: ratio 1.033, inside the 10% band → stay at 3.
        assert_eq!(s.step(secs(5), 310, 3).desired, 3);
        // lag 340 at 3: ratio 1.133 → ceil(3.4) = 4.
        assert_eq!(s.step(secs(10), 340, 3).desired, 4);
        // lag 100 000: clamp to max 5.
        assert_eq!(s.step(secs(15), 100_000, 4).desired, 5);
        // min 2 is a floor for the HPA.
        let mut s = scaler();
        s.policy.min_replicas = 2;
        // lag 5 at 3 replicas recommends ceil(5/100) = 1, clamped up to min 2.
        assert_eq!(s.step(secs(0), 5, 3).desired, 2, "min is the floor");
    }

    #[test]
    fn scale_down_is_stabilised_then_cooldown_reaches_zero() {
        let mut s = scaler();
        assert_eq!(s.step(secs(0), 500, 1).desired, 5);
        // Lag drops: the recommendation is 1, but the window still holds 5.
        let d = s.step(secs(5), 50, 5);
        assert_eq!(d.desired, 5, "{}", d.reason);
        // After the 20 s window only low recommendations remain.
        let d = s.step(secs(26), 50, 5);
        assert_eq!(d.desired, 1, "{}", d.reason);
        // Lag 0 is inactive; 30 s after the last activity (t=26) it goes to zero.
        assert_eq!(s.step(secs(40), 0, 1).desired, 1);
        let d = s.step(secs(56), 0, 1);
        assert_eq!(d.desired, 0, "{}", d.reason);
        assert!(d.reason.contains("cooldownPeriod"));
    }

    #[test]
    fn min_replicas_above_zero_never_scales_to_zero() {
        let mut s = scaler();
        s.policy.min_replicas = 1;
        assert_eq!(s.step(secs(0), 0, 1).desired, 1);
        assert_eq!(s.step(secs(1000), 0, 1).desired, 1);
        assert_eq!(
            s.step(secs(0), 0, 0).desired,
            1,
            "min 1 brings a stopped function back"
        );
    }

    /// What a cluster does on a burst: the HPA KEDA creates allows the
    /// larger of +100 % and +4 pods per 15 s, so 1 → 5 → 10, not 1 → 10.
    #[test]
    fn a_burst_scales_up_at_the_hpa_default_rate() {
        let mut s = Autoscaler::new(ScalePolicy {
            max_replicas: 20,
            lag_threshold: 1000,
            polling_interval: secs(5),
            ..ScalePolicy::default()
        });
        let mut current = 1;
        let mut path = vec![current];
        for t in (0..60).step_by(5) {
            let d = s.step(secs(t), 100_000, current);
            if d.desired != current {
                current = d.desired;
                path.push(current);
            }
        }
        assert_eq!(
            path,
            [1, 5, 10, 20],
            "+4 pods (more than +100 % of 1), then +100 % each 15 s"
        );
        let d = Autoscaler::new(ScalePolicy {
            max_replicas: 20,
            lag_threshold: 1000,
            ..ScalePolicy::default()
        })
        .step(secs(0), 100_000, 1);
        assert!(
            d.reason.contains("scale-up policy allows 5"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn scale_down_after_the_window_is_rate_limited_by_policy() {
        let mut s = Autoscaler::new(ScalePolicy {
            max_replicas: 10,
            lag_threshold: 100,
            scale_down_window: secs(30),
            behavior: Behavior {
                down: Rules {
                    stabilization: secs(30),
                    select: Select::Max,
                    policies: vec![RatePolicy {
                        percent: false,
                        value: 2,
                        period: secs(15),
                    }],
                },
                ..Behavior::default()
            },
            ..ScalePolicy::default()
        });
        assert_eq!(s.step(secs(0), 1000, 10).desired, 10);
        // Lag gone (still active at 1): after the 30 s window, at most 2 pods per 15 s.
        assert_eq!(s.step(secs(10), 1, 10).desired, 10, "inside the window");
        assert_eq!(s.step(secs(31), 1, 10).desired, 8);
        assert_eq!(
            s.step(secs(36), 1, 8).desired,
            8,
            "2 removed within the period already"
        );
        assert_eq!(s.step(secs(47), 1, 8).desired, 6);
    }

    #[test]
    fn the_host_cap_limits_and_says_so() {
        let mut s = Autoscaler::new(ScalePolicy {
            max_replicas: 10,
            lag_threshold: 10,
            host_cap: Some(2),
            ..ScalePolicy::default()
        });
        let d = s.step(secs(0), 10_000, 1);
        assert_eq!(d.desired, 2);
        assert!(
            d.reason.contains("capped at 2") && d.reason.contains("maxReplicaCount 10"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_scaled_object_behavior_is_read() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("f.yaml"),
            r#"
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: f}
spec:
  scaleTargetRef: {name: f}
  minReplicaCount: 0
  maxReplicaCount: 8
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleUp:
          stabilizationWindowSeconds: 30
          selectPolicy: Min
          policies:
          - {type: Pods, value: 1, periodSeconds: 60}
          - {type: Percent, value: 50, periodSeconds: 60}
        scaleDown:
          stabilizationWindowSeconds: 120
  triggers:
  - type: nats-jetstream
    metadata: {consumer: f, lagThreshold: "100"}
"#,
        )
        .expect("write");
        let found = read_scaled_objects(dir.path()).expect("read");
        let policy = &found[0].1;
        assert_eq!(policy.behavior.up.stabilization, secs(30));
        assert_eq!(policy.behavior.up.select, Select::Min);
        assert_eq!(policy.behavior.up.policies.len(), 2);
        assert_eq!(policy.scale_down_window, secs(120));
        assert_eq!(
            policy.behavior.down.policies,
            Behavior::default().down.policies
        );
        // The smaller of +1 pod and +50 % per 60 s.
        let mut s = Autoscaler::new(policy.clone());
        assert_eq!(s.step(secs(0), 10_000, 2).desired, 3);
        assert_eq!(
            s.step(secs(5), 10_000, 3).desired,
            3,
            "one pod added in this minute"
        );
        assert_eq!(s.step(secs(61), 10_000, 3).desired, 4);
    }
}
