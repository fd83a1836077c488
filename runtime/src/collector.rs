//! What every collector's configuration shares: the node name it reports
//! as, and intervals written as seconds in its TOML file.

/// The node's hostname (what `NODE_NAME` defaults to outside Kubernetes),
/// or `localhost`.
pub fn default_node() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `#[serde(with = "tidewatch_runtime::collector::seconds")]`: a duration
/// written as a positive number of seconds (`2.5`), refused otherwise.
pub mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        if !(secs > 0.0 && secs.is_finite()) {
            return Err(serde::de::Error::custom(
                "a duration must be a positive number of seconds",
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct Interval {
        #[serde(with = "super::seconds")]
        every: std::time::Duration,
    }

    #[test]
    fn seconds_are_positive_and_finite() {
        let ok: Interval = serde_json::from_str(r#"{"every": 2.5}"#).expect("2.5 s");
        assert_eq!(ok.every, std::time::Duration::from_millis(2500));
        for bad in ["0", "-1"] {
            let err = serde_json::from_str::<Interval>(&format!(r#"{{"every": {bad}}}"#))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("positive number of seconds"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_node_name_is_never_empty() {
        assert!(!super::default_node().is_empty());
    }
}
