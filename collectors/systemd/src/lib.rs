//! Tidewatch systemd collector (being built; see issue 4).
