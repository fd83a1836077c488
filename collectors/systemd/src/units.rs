//! Unit state tracking, pure: what systemd reports about a unit goes in as
//! [`Update`]s (merged from `PropertiesChanged`, `GetAll` and `JobRemoved`),
//! and [`UnitState::step`] says which [`Transition`]s happened — started,
//! stopped, failed (with result and exit status), restarted (with the restart
//! count) and crash loop (restarts within a window passed a threshold).
//!
//! systemd sends a service's `org.freedesktop.systemd1.Service` properties
//! (`Result`, `NRestarts`, `ExecMainStatus`) *before* its
//! `org.freedesktop.systemd1.Unit` properties (`ActiveState`, `SubState`) for
//! the same change, so by the time the state moves the result is known.
//!
//! On systemd 252 (as booted in the nspawn test) a service that exits with
//! `Restart=` goes `active` → `failed`/`failed` → `activating`/`auto-restart`
//! → (after `RestartSec`, `NRestarts` + 1) `inactive`/`dead` → `active`:
//! one failed, one restarted, one started — that passage through
//! `inactive` is the restart, not a stop (a stop during the wait reaches
//! `inactive` without the increment, and is reported as stopped; a stop
//! right after the passage cancels the restart's start job, and the
//! `JobRemoved` with result `canceled` reports it as stopped). Older
//! systemd goes straight to `auto-restart`; that counts as the failure.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

/// What is known about a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub active_state: String,
    pub sub_state: String,
    pub result: String,
    pub n_restarts: u32,
    pub exec_main_status: i32,
    /// Hex of the unit's `InvocationID` (new for every start).
    pub invocation_id: String,
}

impl Default for Snapshot {
    /// A unit systemd has not loaded yet: inactive, never restarted.
    fn default() -> Self {
        Snapshot {
            active_state: "inactive".into(),
            sub_state: "dead".into(),
            result: "success".into(),
            n_restarts: 0,
            exec_main_status: 0,
            invocation_id: String::new(),
        }
    }
}

/// The properties one signal or call carried; `None` = not in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub active_state: Option<String>,
    pub sub_state: Option<String>,
    pub result: Option<String>,
    pub n_restarts: Option<u32>,
    pub exec_main_status: Option<i32>,
    pub invocation_id: Option<String>,
    /// Result of a job for the unit that finished (`JobRemoved`).
    pub job_result: Option<String>,
}

impl Update {
    /// Whether the update carries anything this module looks at.
    pub fn is_empty(&self) -> bool {
        *self == Update::default()
    }
}

/// What happened to a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    Started,
    Stopped,
    Failed,
    Restarted,
    CrashLoop,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::Started => "started",
            Change::Stopped => "stopped",
            Change::Failed => "failed",
            Change::Restarted => "restarted",
            Change::CrashLoop => "crashloop",
        }
    }

    /// CloudEvent type of the change.
    pub fn event_type(self) -> &'static str {
        use tidewatch_runtime::topology::types;
        match self {
            Change::Started => types::UNIT_STARTED,
            Change::Stopped => types::UNIT_STOPPED,
            Change::Failed => types::UNIT_FAILED,
            Change::Restarted => types::UNIT_RESTARTED,
            Change::CrashLoop => types::UNIT_CRASH_LOOP,
        }
    }
}

/// One transition, with the unit's state right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub change: Change,
    pub previous_active_state: String,
    pub snapshot: Snapshot,
    /// Restarts inside the crash-loop window (for [`Change::CrashLoop`]).
    pub restarts_in_window: u32,
}

/// Crash-loop detection: restart times (seconds, any monotonic clock)
/// inside the window, and whether this loop was already reported.
#[derive(Debug, Clone, PartialEq)]
pub struct CrashWindow {
    restarts: VecDeque<f64>,
    looping: bool,
}

/// Crash-loop threshold: `restarts` restarts within `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrashLoopRule {
    pub restarts: u32,
    pub window: Duration,
}

impl CrashWindow {
    pub fn new() -> CrashWindow {
        CrashWindow {
            restarts: VecDeque::new(),
            looping: false,
        }
    }

    /// Record a restart at `now`; `Some(count)` when this one starts a crash loop.
    pub fn restart(&mut self, now: f64, rule: CrashLoopRule) -> Option<u32> {
        let window = rule.window.as_secs_f64();
        while self.restarts.front().is_some_and(|t| now - t > window) {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        let count = self.restarts.len() as u32;
        if count < rule.restarts {
            self.looping = false;
            return None;
        }
        if self.looping {
            return None;
        }
        self.looping = true;
        Some(count)
    }

    /// The unit was stopped on purpose: a later loop is a new one.
    pub fn reset(&mut self) {
        self.restarts.clear();
        self.looping = false;
    }
}

impl Default for CrashWindow {
    fn default() -> Self {
        CrashWindow::new()
    }
}

/// Everything tracked for one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitState {
    pub known: Snapshot,
    window: CrashWindow,
    /// `NRestarts` when the unit entered `auto-restart`: leaving it for
    /// `inactive` with a higher count is the restart; with the same count,
    /// a stop.
    auto_restart_from: Option<u32>,
    /// Passed through `inactive` to restart and not up yet: a start job
    /// canceled now (a stop during the restart) leaves it stopped.
    restart_pending: bool,
}

/// Job results that fail a start without the unit ever changing state.
const FAILED_JOB_RESULTS: &[&str] = &["dependency", "assert"];

fn is_up(state: &str) -> bool {
    matches!(state, "active" | "reloading")
}

impl UnitState {
    pub fn new(known: Snapshot) -> UnitState {
        UnitState {
            known,
            window: CrashWindow::new(),
            auto_restart_from: None,
            restart_pending: false,
        }
    }

    /// Merge `update` observed at `now` (seconds on a monotonic clock) and
    /// say what changed, in causal order: failed, restarted, crash loop,
    /// started / stopped.
    pub fn step(
        mut self,
        update: &Update,
        now: f64,
        rule: CrashLoopRule,
    ) -> (UnitState, Vec<Transition>) {
        let before = self.known.clone();
        let mut next = before.clone();
        if let Some(v) = &update.active_state {
            next.active_state = v.clone();
        }
        if let Some(v) = &update.sub_state {
            next.sub_state = v.clone();
        }
        if let Some(v) = &update.result {
            next.result = v.clone();
        }
        if let Some(v) = update.n_restarts {
            next.n_restarts = v;
        }
        if let Some(v) = update.exec_main_status {
            next.exec_main_status = v;
        }
        if let Some(v) = &update.invocation_id {
            next.invocation_id = v.clone();
        }
        let mut out = Vec::new();
        let mut emit = |change: Change, snapshot: &Snapshot, in_window: u32| {
            out.push(Transition {
                change,
                previous_active_state: before.active_state.clone(),
                snapshot: snapshot.clone(),
                restarts_in_window: in_window,
            })
        };

        let failed_now = next.active_state == "failed" && before.active_state != "failed";
        // Straight into auto-restart (older systemd); 252 passes through
        // `failed` first, already reported.
        let auto_restart = next.sub_state == "auto-restart"
            && before.sub_state != "auto-restart"
            && before.active_state != "failed";
        if failed_now || auto_restart {
            emit(Change::Failed, &next, 0);
        } else if let Some(job) = &update.job_result
            && FAILED_JOB_RESULTS.contains(&job.as_str())
            && !is_up(&next.active_state)
        {
            let mut failed = next.clone();
            failed.result = job.clone();
            emit(Change::Failed, &failed, 0);
        }
        if next.n_restarts > before.n_restarts {
            emit(Change::Restarted, &next, 0);
            if let Some(count) = self.window.restart(now, rule) {
                emit(Change::CrashLoop, &next, count);
            }
        }
        if next.active_state == "active" && !is_up(&before.active_state) {
            emit(Change::Started, &next, 0);
        }
        // systemd 252 passes auto-restart → inactive/dead → active on every
        // restart, `NRestarts` going up just before: that `inactive` is the
        // restart. Without the increment it is a stop during the wait.
        let restarting = before.sub_state == "auto-restart"
            && self.auto_restart_from.is_some_and(|n| next.n_restarts > n);
        let entered_inactive = next.active_state == "inactive" && before.active_state != "inactive";
        let canceled_restart = self.restart_pending
            && next.active_state == "inactive"
            && update.job_result.as_deref() == Some("canceled");
        if (entered_inactive && !restarting) || canceled_restart {
            emit(Change::Stopped, &next, 0);
            self.window.reset();
        }
        self.restart_pending = next.active_state == "inactive"
            && (restarting || self.restart_pending)
            && !canceled_restart;
        if next.sub_state == "auto-restart" {
            if before.sub_state != "auto-restart" {
                self.auto_restart_from = Some(before.n_restarts.min(next.n_restarts));
            }
        } else {
            self.auto_restart_from = None;
        }
        self.known = next;
        (self, out)
    }
}

/// Which units are watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Names(BTreeSet<String>),
}

impl Selection {
    /// From config names: `*` means all; a name without a type suffix is a
    /// `.service`.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Selection {
        if names.iter().any(|n| n.as_ref() == "*") {
            return Selection::All;
        }
        Selection::Names(names.iter().map(|n| full_name(n.as_ref())).collect())
    }

    pub fn watches(&self, unit: &str) -> bool {
        match self {
            Selection::All => true,
            Selection::Names(names) => names.contains(unit),
        }
    }
}

/// `kubelet` → `kubelet.service`; names with a type suffix stay.
pub fn full_name(name: &str) -> String {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".target",
        ".mount",
        ".timer",
        ".path",
        ".slice",
        ".scope",
        ".device",
        ".swap",
        ".automount",
    ];
    if SUFFIXES.iter().any(|s| name.ends_with(s)) {
        name.to_string()
    } else {
        format!("{name}.service")
    }
}

/// Unit name from its D-Bus object path
/// (`/org/freedesktop/systemd1/unit/kubelet_2eservice` → `kubelet.service`):
/// systemd escapes every byte outside `[A-Za-z0-9]` as `_xx`.
pub fn unit_from_path(path: &str) -> Option<String> {
    let escaped = path.strip_prefix("/org/freedesktop/systemd1/unit/")?;
    if escaped.is_empty() || escaped.contains('/') {
        return None;
    }
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = escaped.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: CrashLoopRule = CrashLoopRule {
        restarts: 3,
        window: Duration::from_secs(60),
    };

    fn unit(active: &str, sub: &str) -> Update {
        Update {
            active_state: Some(active.into()),
            sub_state: Some(sub.into()),
            ..Default::default()
        }
    }

    fn service(result: &str, n_restarts: u32, status: i32) -> Update {
        Update {
            result: Some(result.into()),
            n_restarts: Some(n_restarts),
            exec_main_status: Some(status),
            ..Default::default()
        }
    }

    fn run(
        state: UnitState,
        steps: &[(f64, Update)],
    ) -> (UnitState, Vec<(Change, String, u32, i32)>) {
        let mut state = state;
        let mut seen = Vec::new();
        for (t, u) in steps {
            let (next, transitions) = state.step(u, *t, RULE);
            state = next;
            for tr in transitions {
                seen.push((
                    tr.change,
                    tr.snapshot.result.clone(),
                    if tr.change == Change::CrashLoop {
                        tr.restarts_in_window
                    } else {
                        tr.snapshot.n_restarts
                    },
                    tr.snapshot.exec_main_status,
                ));
            }
        }
        (state, seen)
    }

    #[test]
    fn a_crash_looping_service_as_systemd_252_reports_it() {
        let mut steps = vec![
            (0.0, service("success", 0, 0)),
            (0.0, unit("active", "running")),
        ];
        for n in 1..=4 {
            let t = f64::from(n) * 2.0;
            steps.push((t, service("exit-code", n - 1, 3)));
            steps.push((t, unit("activating", "auto-restart")));
            steps.push((t + 1.0, service("success", n, 3)));
            steps.push((t + 1.0, unit("active", "running")));
        }
        let (_, seen) = run(UnitState::new(Snapshot::default()), &steps);
        let names: Vec<Change> = seen.iter().map(|s| s.0).collect();
        use Change::*;
        assert_eq!(
            names,
            [
                Started, Failed, Restarted, Started, Failed, Restarted, Started, Failed, Restarted,
                CrashLoop, Started, Failed, Restarted, Started
            ]
        );
        // failed carries result and exit status; restarts count up; the loop
        // is reported once, with the restarts in the window.
        assert_eq!(seen[1], (Failed, "exit-code".into(), 0, 3));
        assert_eq!(seen[2].2, 1);
        assert_eq!(seen[8].2, 3);
        assert_eq!(seen[9], (CrashLoop, "success".into(), 3, 3));
        assert_eq!(seen[12].2, 4);
    }

    #[test]
    fn systemd_252_passes_through_failed_and_inactive_on_each_restart() {
        // The signal sequence recorded from the booted Debian 12 container.
        let mut steps = vec![
            (0.0, service("success", 0, 0)),
            (0.0, unit("active", "running")),
        ];
        for n in 1..=4 {
            let t = f64::from(n) * 2.0;
            steps.push((t, service("exit-code", n - 1, 3)));
            steps.push((t, unit("failed", "failed")));
            steps.push((t, unit("activating", "auto-restart")));
            steps.push((t + 1.0, service("exit-code", n, 3)));
            steps.push((t + 1.0, service("success", n, 0)));
            steps.push((t + 1.0, unit("inactive", "dead")));
            steps.push((t + 1.0, unit("active", "running")));
        }
        let (_, seen) = run(UnitState::new(Snapshot::default()), &steps);
        let names: Vec<Change> = seen.iter().map(|s| s.0).collect();
        use Change::*;
        assert_eq!(
            names,
            [
                Started, Failed, Restarted, Started, Failed, Restarted, Started, Failed, Restarted,
                CrashLoop, Started, Failed, Restarted, Started
            ]
        );
        assert_eq!(seen[1], (Failed, "exit-code".into(), 0, 3));
        assert_eq!(seen[9].2, 3);
    }

    #[test]
    fn a_stop_during_the_restart_wait_is_a_stop() {
        use Change::*;
        let (_, seen) = run(
            UnitState::new(Snapshot::default()),
            &[
                (0.0, unit("active", "running")),
                (1.0, service("exit-code", 0, 3)),
                (1.0, unit("failed", "failed")),
                (1.0, unit("activating", "auto-restart")),
                // StopUnit while waiting RestartSec: no NRestarts increment.
                (1.5, unit("inactive", "dead")),
            ],
        );
        let names: Vec<Change> = seen.iter().map(|s| s.0).collect();
        assert_eq!(names, [Started, Failed, Stopped]);
    }

    #[test]
    fn a_stop_that_cancels_the_restart_is_a_stop() {
        use Change::*;
        let job = |result: &str| Update {
            job_result: Some(result.into()),
            ..Default::default()
        };
        let crash_then_restart = [
            (0.0, unit("active", "running")),
            (1.0, service("exit-code", 0, 3)),
            (1.0, unit("failed", "failed")),
            (1.0, unit("activating", "auto-restart")),
            (2.0, service("exit-code", 1, 3)),
            (2.0, unit("inactive", "dead")),
        ];
        // StopUnit replaces the pending start job: it is canceled, the unit stays down.
        let mut steps = crash_then_restart.to_vec();
        steps.push((2.1, job("canceled")));
        steps.push((2.1, job("done")));
        let (_, seen) = run(UnitState::new(Snapshot::default()), &steps);
        let names: Vec<Change> = seen.iter().map(|s| s.0).collect();
        assert_eq!(names, [Started, Failed, Restarted, Stopped]);
        // The start job finishing is no stop, whatever order the signals come in.
        let mut steps = crash_then_restart.to_vec();
        steps.push((2.1, job("done")));
        steps.push((2.1, unit("active", "running")));
        let (_, seen) = run(UnitState::new(Snapshot::default()), &steps);
        let names: Vec<Change> = seen.iter().map(|s| s.0).collect();
        assert_eq!(names, [Started, Failed, Restarted, Started]);
    }

    #[test]
    fn restarts_spread_beyond_the_window_are_no_loop() {
        let mut w = CrashWindow::new();
        assert_eq!(w.restart(0.0, RULE), None);
        assert_eq!(w.restart(50.0, RULE), None);
        assert_eq!(w.restart(100.0, RULE), None); // 0.0 fell out
        assert_eq!(w.restart(105.0, RULE), Some(3));
        assert_eq!(w.restart(106.0, RULE), None); // same loop
        // Quiet for longer than the window: a new loop is reported again.
        assert_eq!(w.restart(300.0, RULE), None);
        assert_eq!(w.restart(301.0, RULE), None);
        assert_eq!(w.restart(302.0, RULE), Some(3));
    }

    #[test]
    fn stop_start_and_final_failure() {
        use Change::*;
        let (state, seen) = run(
            UnitState::new(Snapshot::default()),
            &[
                (0.0, unit("activating", "start")),
                (0.0, unit("active", "running")),
                (1.0, unit("reloading", "reload")),
                (1.0, unit("active", "running")),
                (2.0, unit("deactivating", "stop-sigterm")),
                (2.0, unit("inactive", "dead")),
                (3.0, unit("active", "running")),
                (4.0, service("timeout", 0, 0)),
                (4.0, unit("failed", "failed")),
                // Same state repeated: nothing new.
                (5.0, unit("failed", "failed")),
            ],
        );
        let names: Vec<Change> = seen.iter().map(|s| s.0).collect();
        assert_eq!(names, [Started, Stopped, Started, Failed]);
        assert_eq!(seen[3].1, "timeout");
        assert_eq!(state.known.active_state, "failed");
    }

    #[test]
    fn a_failed_dependency_fails_the_start() {
        let update = Update {
            job_result: Some("dependency".into()),
            ..Default::default()
        };
        let (_, seen) = run(
            UnitState::new(Snapshot::default()),
            &[(0.0, update.clone())],
        );
        assert_eq!(seen, [(Change::Failed, "dependency".into(), 0, 0)]);
        let done = Update {
            job_result: Some("done".into()),
            ..Default::default()
        };
        let (_, seen) = run(UnitState::new(Snapshot::default()), &[(0.0, done)]);
        assert!(seen.is_empty());
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/kubelet_2eservice").as_deref(),
            Some("kubelet.service")
        );
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/cri_2ddocker_2eservice").as_deref(),
            Some("cri-docker.service")
        );
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/bad_zz"),
            None
        );
        assert_eq!(unit_from_path("/org/freedesktop/systemd1"), None);
        assert_eq!(full_name("kubelet"), "kubelet.service");
        assert_eq!(full_name("sockets.target"), "sockets.target");
        let s = Selection::from_names(&["kubelet", "x.socket"]);
        assert!(s.watches("kubelet.service") && s.watches("x.socket"));
        assert!(!s.watches("cron.service"));
        assert!(Selection::from_names(&["*"]).watches("cron.service"));
    }
}
