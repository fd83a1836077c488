//! Tidewatch Kubernetes collector (being built; see issue 4).
