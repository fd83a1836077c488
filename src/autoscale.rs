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
//! - scale-down is stabilised: the highest recommendation of the last
//!   window (300 s default) wins.
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
    /// HPA recommendations (time, replicas) inside the stabilization window.
    recommendations: VecDeque<(Duration, u32)>,
}

impl Autoscaler {
    pub fn new(policy: ScalePolicy) -> Autoscaler {
        Autoscaler {
            policy,
            last_active: None,
            recommendations: VecDeque::new(),
        }
    }

    /// Decide the replica count at time `now` (monotonic, since start) for
    /// `lag` with `current` replicas running.
    pub fn step(&mut self, now: Duration, lag: u64, current: u32) -> Decision {
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
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > p.scale_down_window)
        {
            self.recommendations.pop_front();
        }
        if recommended >= current {
            let reason = if recommended == current {
                format!("steady: lag {lag}, ratio {ratio:.2} within 10% of target")
            } else {
                format!("lag {lag} / lagThreshold {threshold} → {recommended} (ratio {ratio:.2})")
            };
            return Decision {
                desired: recommended,
                reason,
            };
        }
        let stabilised = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommended);
        if stabilised < current {
            Decision {
                desired: stabilised,
                reason: format!(
                    "scale down: highest recommendation in the last {}s is {stabilised}",
                    p.scale_down_window.as_secs()
                ),
            }
        } else {
            Decision {
                desired: current,
                reason: format!(
                    "holding {current}: recommendation {recommended}, but scale-down stabilization keeps {stabilised}"
                ),
            }
        }
    }
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
            };
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
}
