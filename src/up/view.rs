//! What `up` shows, in one of three shapes:
//!
//! - `--json`: one JSON object per line (status, scaling decisions with
//!   reasons, processes started), for scripts and tests;
//! - stdout not a terminal: plain lines, one status line per second;
//! - stdout a terminal: a table redrawn in place (one row per function) with
//!   the most recent messages and decisions below it, so nothing scrolls away.
//!
//! The table is drawn by a pure function ([`table`]); [`View`] only decides
//! where text goes.

use std::collections::VecDeque;
use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;

use serde_json::{Value, json};

/// Lines kept under the table.
const LOG_LINES: usize = 12;

/// One function's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub function: String,
    /// Replicas the autoscaler wants.
    pub desired: u32,
    /// Replica processes alive now.
    pub running: usize,
    /// maxReplicaCount (what a cluster would run).
    pub max: u32,
    /// This host's cap, when it is below `max` (`--max-local-replicas`).
    pub host_cap: Option<u32>,
    /// KEDA's lag: pending + ack pending on the function's consumer.
    pub lag: u64,
    /// Events/s stored in the function's input stream.
    pub rate: f64,
    /// The last scaling decision: when, and why.
    pub decision: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Json,
    Lines,
    Table,
}

pub struct View {
    mode: Mode,
    state: Mutex<Screen>,
}

#[derive(Default)]
struct Screen {
    log: VecDeque<String>,
    /// Lines the last table took (to move back over them); 0 before the first.
    drawn: usize,
    /// Whether the table is being redrawn (between the first status and `finish`).
    live: bool,
}

/// Write to stdout, ignoring a closed pipe (`up | head` must not panic `up`).
fn write_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

impl View {
    /// JSON lines with `json`; else a table when stdout is a terminal, plain lines otherwise.
    pub fn new(json: bool) -> View {
        let mode = if json {
            Mode::Json
        } else if std::io::stdout().is_terminal() {
            Mode::Table
        } else {
            Mode::Lines
        };
        View {
            mode,
            state: Mutex::new(Screen::default()),
        }
    }

    fn screen(&self) -> std::sync::MutexGuard<'_, Screen> {
        // A panic while holding the lock leaves only display state behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message for people (`text`) or scripts (`event` with `fields`).
    pub fn say(&self, event: &str, fields: Value, text: &str) {
        match self.mode {
            Mode::Json => {
                let mut object = fields;
                object["event"] = json!(event);
                object["time"] = json!(chrono::Utc::now().to_rfc3339());
                write_out(&format!("{object}\n"));
            }
            Mode::Lines => write_out(&format!("tidewatch: {text}\n")),
            Mode::Table => self.log(format!(
                "{} {text}",
                chrono::Local::now().format("%H:%M:%S")
            )),
        }
    }

    /// What a function writes to stdout (export: insights), echoed.
    pub fn output(&self, line: &str) {
        match self.mode {
            Mode::Json | Mode::Lines => write_out(&format!("{line}\n")),
            Mode::Table => self.log(line.to_string()),
        }
    }

    fn log(&self, line: String) {
        let mut screen = self.screen();
        if !screen.live {
            // Before the first table and after the last: plain lines.
            write_out(&format!("tidewatch: {line}\n"));
            return;
        }
        screen.log.push_back(line);
        while screen.log.len() > LOG_LINES {
            screen.log.pop_front();
        }
    }

    /// Once per tick: every function's state.
    pub fn status(&self, rows: &[Row]) {
        match self.mode {
            Mode::Json => {
                let functions: Vec<Value> = rows
                    .iter()
                    .map(|r| json!({"function": r.function, "desired": r.desired, "replicas": r.running, "max": r.max, "host_cap": r.host_cap, "lag": r.lag, "rate": r.rate.round()}))
                    .collect();
                self.say("status", json!({"functions": functions}), "");
            }
            Mode::Lines => write_out(&format!(
                "tidewatch: {}  {}\n",
                chrono::Local::now().format("%H:%M:%S"),
                status_line(rows)
            )),
            Mode::Table => {
                let mut screen = self.screen();
                screen.live = true;
                let log: Vec<&str> = screen.log.iter().map(String::as_str).collect();
                let text = table(
                    &chrono::Local::now().format("%H:%M:%S").to_string(),
                    rows,
                    &log,
                );
                let lines = text.lines().count();
                // Back over the last table, clear to the end of the screen, and
                // draw with line wrap off so each row stays one line (the
                // terminal cuts what does not fit).
                let back = match screen.drawn {
                    0 => String::new(),
                    n => format!("\x1b[{n}F"),
                };
                write_out(&format!("{back}\x1b[J\x1b[?7l{text}\x1b[?7h"));
                screen.drawn = lines;
            }
        }
    }

    /// Stop redrawing: later messages print as plain lines under the last table.
    pub fn finish(&self) {
        let mut screen = self.screen();
        screen.live = false;
    }
}

/// `10`, or `2 here, 10 on a cluster` when this host caps it.
fn max_text(r: &Row) -> String {
    match r.host_cap {
        Some(cap) if cap < r.max => format!("{cap} here, {} on a cluster", r.max),
        _ => r.max.to_string(),
    }
}

/// The plain status line: `enrich 1/1 (max 10) lag 0 in 0/s | correlate …`.
pub fn status_line(rows: &[Row]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "{} {}/{} (max {}) lag {} in {:.0}/s",
                r.function,
                r.desired,
                r.running,
                max_text(r),
                r.lag,
                r.rate
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The table for a terminal: a header, one row per function, then `log`.
/// Every line ends with a newline.
pub fn table(now: &str, rows: &[Row], log: &[&str]) -> String {
    let name_width = rows
        .iter()
        .map(|r| r.function.len())
        .max()
        .unwrap_or(0)
        .max("FUNCTION".len());
    let mut text = format!("tidewatch up  {now}  (Ctrl-C stops everything)\n\n");
    text.push_str(&format!(
        "{:<name_width$}  {:>8}  {:>6}  {:>9}  {:>8}  LAST DECISION\n",
        "FUNCTION", "REPLICAS", "MAX", "LAG", "IN/S"
    ));
    for r in rows {
        text.push_str(&format!(
            "{:<name_width$}  {:>8}  {:>6}  {:>9}  {:>8.0}  {}\n",
            r.function,
            format!("{}/{}", r.desired, r.running),
            match r.host_cap {
                Some(cap) if cap < r.max => format!("{cap}/{}", r.max),
                _ => r.max.to_string(),
            },
            r.lag,
            r.rate,
            r.decision.as_deref().unwrap_or("-")
        ));
    }
    text.push_str("\nREPLICAS is desired/running; MAX a/b is this host's cap (--max-local-replicas, default its cores) / the cluster's maxReplicaCount. Recent:\n");
    for line in log {
        text.push_str("  ");
        text.push_str(line);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(function: &str, desired: u32, running: usize, decision: Option<&str>) -> Row {
        Row {
            function: function.into(),
            desired,
            running,
            max: 10,
            host_cap: Some(2),
            lag: 1532,
            rate: 8400.4,
            decision: decision.map(Into::into),
        }
    }

    #[test]
    fn the_table_has_a_row_per_function_and_the_log_below() {
        let rows = [
            row(
                "enrich",
                2,
                1,
                Some("12:00:01 0 → 2: lag 1532 above activation 0"),
            ),
            row("correlate", 0, 0, None),
            row("siem-export", 1, 1, None),
        ];
        let text = table(
            "12:00:02",
            &rows,
            &["12:00:01 scale enrich 0 → 2: lag 1532"],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "tidewatch up  12:00:02  (Ctrl-C stops everything)"
        );
        assert_eq!(
            lines[2],
            "FUNCTION     REPLICAS     MAX        LAG      IN/S  LAST DECISION"
        );
        assert_eq!(
            lines[3],
            "enrich            2/1    2/10       1532      8400  12:00:01 0 → 2: lag 1532 above activation 0"
        );
        assert_eq!(
            lines[4],
            "correlate         0/0    2/10       1532      8400  -"
        );
        assert!(lines[5].starts_with("siem-export "), "{}", lines[5]);
        assert!(
            lines[7].starts_with("REPLICAS is desired/running; MAX a/b is this host's cap"),
            "{}",
            lines[7]
        );
        assert_eq!(lines[8], "  12:00:01 scale enrich 0 → 2: lag 1532");
        assert_eq!(lines.len(), 9);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn the_plain_line_keeps_its_shape() {
        let rows = [row("enrich", 0, 0, None), row("export", 1, 1, None)];
        assert_eq!(
            status_line(&rows),
            "enrich 0/0 (max 2 here, 10 on a cluster) lag 1532 in 8400/s | export 1/1 (max 2 here, 10 on a cluster) lag 1532 in 8400/s"
        );
    }
}
