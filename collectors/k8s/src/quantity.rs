//! Kubernetes resource quantities (`128Mi`, `1G`, `200m`, `1.5`, `1e3`)
//! as bytes and millicores. Pure.

/// The quantity as a plain number, None when it does not parse.
pub fn value(q: &str) -> Option<f64> {
    let q = q.trim();
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = q.strip_suffix(suffix) {
            return number
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map(|n| n * factor);
        }
    }
    q.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// Bytes (memory), rounded up.
pub fn bytes(q: &str) -> Option<i64> {
    value(q).map(|v| v.ceil() as i64)
}

/// Millicores (cpu), rounded up.
pub fn millis(q: &str) -> Option<i64> {
    value(q).map(|v| (v * 1000.0).ceil() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(bytes("128Mi"), Some(128 << 20));
        assert_eq!(bytes("1Gi"), Some(1 << 30));
        assert_eq!(bytes("500M"), Some(500_000_000));
        assert_eq!(bytes("1e3"), Some(1000));
        assert_eq!(bytes("129"), Some(129));
        assert_eq!(millis("200m"), Some(200));
        assert_eq!(millis("1"), Some(1000));
        assert_eq!(millis("0.5"), Some(500));
        assert_eq!(bytes("lots"), None);
        assert_eq!(bytes("Mi"), None);
    }
}
