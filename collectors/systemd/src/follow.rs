//! The journal edge: run `journalctl -o json -f` (resuming after the saved
//! cursor), turn selected entries into events, and save the cursor only
//! once the stream acknowledged them.
//!
//! ```text
//! journalctl ──lines──▶ reader ──(ordered queue of slots)──▶ committer ──▶ cursor file
//!                         │ selected: send event                 awaits each ack in order
//!                         └ filtered: nothing to send            then acknowledges the cursor
//! ```
//!
//! An entry counts as done once its event is stored in the stream or held,
//! fsynced, by the outage spool (which replays it, in order and with its
//! id, after an outage or a restart: waiting for the stream instead would
//! re-read and re-spool every entry of a long outage on restart, beyond
//! JetStream's duplicate window); filtered entries are done once everything
//! before them is. `journalctl -f --cursor-file` does not save its cursor
//! on SIGTERM, and would save it before the stream has the entry anyway, so
//! the cursor is kept here ([`crate::checkpoint`]).

use std::ffi::OsString;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tidewatch_proto::v1;
use tidewatch_runtime::cloudevents::Event;
use tidewatch_runtime::collector::until;
use tidewatch_runtime::event::{EventError, new_event};
use tidewatch_runtime::metrics::Metrics;
use tidewatch_runtime::topology;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};

use crate::COLLECTOR;
use crate::checkpoint::{Checkpoint, CursorFile};
use crate::config::{Config, JournalStart, Resolved};
use crate::emit::{Emitter, Sent};
use crate::error::CollectorError;
use crate::journal::{self, Entry, Selected};

/// An entry read, in journal order, waiting for the committer.
enum Slot {
    /// No event for it: done as soon as everything before it is.
    Filtered(String),
    /// Its event was sent; done once the stream stored it.
    Sent(String, Sent),
}

/// Arguments for `journalctl`, resuming after `after` when set.
pub fn arguments(config: &Config, after: Option<&str>) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-o", "json", "-f", "--no-pager"]
        .into_iter()
        .map(OsString::from)
        .collect();
    if let Some(dir) = &config.journal_directory {
        args.push("--directory".into());
        args.push(dir.into());
    } else if config.host_root != std::path::Path::new("/") {
        args.push("--root".into());
        args.push(config.host_root.clone().into());
    }
    match after {
        Some(cursor) => {
            args.push("--after-cursor".into());
            args.push(cursor.into());
            args.push("--no-tail".into());
        }
        None => match config.journal_start {
            JournalStart::Now => args.extend(["-n".into(), "0".into()]),
            JournalStart::Boot => args.extend(["-b".into(), "--no-tail".into()]),
            JournalStart::All => args.push("--no-tail".into()),
        },
    }
    args
}

/// The event for a selected entry.
pub fn entry_event(
    entry: &Entry,
    selected: Selected,
    node: &str,
    source: &str,
) -> Result<Event, EventError> {
    let mut fields: std::collections::HashMap<String, String> =
        entry.fields.clone().into_iter().collect();
    if selected == Selected::OomKill
        && let Some((pid, comm)) = journal::oom_victim(&entry.message)
    {
        fields.insert("OOM_VICTIM_PID".into(), pid.to_string());
        fields.insert("OOM_VICTIM_COMM".into(), comm);
    }
    let payload = v1::JournalEntry {
        unit: entry.unit.clone(),
        node: node.to_string(),
        priority: entry.priority,
        message: entry.message.clone(),
        cursor: entry.cursor.clone(),
        realtime_us: entry.realtime_us,
        pid: entry.pid,
        fields,
    };
    let subject = if entry.unit.is_empty() {
        format!("node/{node}")
    } else {
        format!("unit/{}", entry.unit)
    };
    let time = i64::try_from(entry.realtime_us)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_micros)
        .unwrap_or_else(chrono::Utc::now);
    new_event(
        journal::event_id(&entry.cursor),
        selected.event_type(),
        source,
        Some(&subject),
        time,
        &payload,
    )
}

/// Follow the journal until `stop` turns true; then stop reading, wait for
/// every sent entry's ack, save the cursor and return.
pub async fn follow(
    resolved: Arc<Resolved>,
    emitter: Emitter,
    metrics: Metrics,
    ready: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) -> Result<(), CollectorError> {
    let file = CursorFile::new(&resolved.cursor_file);
    let saved = file.load().map_err(|source| CollectorError::Cursor {
        path: file.path().to_path_buf(),
        source,
    })?;
    match &saved {
        Some(c) => tracing::info!(cursor = %c, "resuming the journal after the saved cursor"),
        None => {
            tracing::info!(start = ?resolved.config.journal_start, "no saved cursor: starting the journal fresh")
        }
    }
    let (slots, queue) = mpsc::channel::<Slot>(1024);
    let committer = tokio::spawn(commit(queue, Checkpoint::resume(saved.clone()), file));
    let read = read(resolved, emitter, metrics, saved, slots, ready, stop).await;
    let committed = committer
        .await
        .unwrap_or_else(|e| Err(CollectorError::Journal(format!("committer task: {e}"))));
    // The committer's error (a publish that never got its ack) explains a
    // reader that stopped because the committer went away.
    committed.and(read)
}

async fn read(
    resolved: Arc<Resolved>,
    emitter: Emitter,
    metrics: Metrics,
    saved: Option<String>,
    slots: mpsc::Sender<Slot>,
    ready: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), CollectorError> {
    let config = &resolved.config;
    let source = topology::source(COLLECTOR, &config.common.node);
    let mut last_read = saved;
    let mut backoff = Duration::from_millis(500);
    loop {
        let args = arguments(config, last_read.as_deref());
        let mut child = tokio::process::Command::new(&config.journalctl)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                CollectorError::Journal(format!("cannot run {}: {e}", config.journalctl.display()))
            })?;
        tracing::info!(journalctl = %config.journalctl.display(), ?args, "following the journal");
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| CollectorError::Journal("journalctl has no stdout".into()))?;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(stderr = %line, "journalctl");
                }
            });
        }
        ready.send_replace(true);
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = tokio::select! {
                biased;
                _ = until(&mut stop, true) => {
                    let _ = child.kill().await;
                    return Ok(());
                }
                line = lines.next_line() => line,
            };
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading journalctl output");
                    break;
                }
            };
            let entry = match journal::parse(&line) {
                Ok(entry) => entry,
                Err(e) => {
                    metrics.refuse("journal_unparseable");
                    tracing::warn!(error = %e, "skipping a journalctl line");
                    continue;
                }
            };
            metrics.events_in.inc();
            let cursor = entry.cursor.clone();
            let slot = match resolved.rules.select(&entry) {
                None => Slot::Filtered(cursor.clone()),
                Some(selected) => match entry_event(&entry, selected, &config.common.node, &source)
                {
                    Err(e) => {
                        metrics.refuse("journal_event_invalid");
                        tracing::warn!(error = %e, cursor = %cursor, "cannot build an event for a journal entry");
                        Slot::Filtered(cursor.clone())
                    }
                    // Waits while the in-flight bound is reached; a
                    // shutdown then leaves the entry unsent (and unsaved).
                    Ok(event) => match tokio::select! {
                        biased;
                        _ = until(&mut stop, true) => {
                            let _ = child.kill().await;
                            return Ok(());
                        }
                        sent = emitter.send(&event) => sent,
                    } {
                        Ok(sent) => Slot::Sent(cursor.clone(), sent),
                        // Refused for good (over 64 KiB, or by the
                        // stream): counted and logged; waiting cannot fix it.
                        Err(e) if !e.is_retryable() => {
                            tracing::warn!(error = %e, cursor = %cursor, "journal entry refused");
                            Slot::Filtered(cursor.clone())
                        }
                        Err(e) => return Err(CollectorError::Publish(e)),
                    },
                },
            };
            let queued = tokio::select! {
                biased;
                _ = until(&mut stop, true) => {
                    // The committer still settles this entry: its event
                    // may already be on its way.
                    let _ = slots.send(slot).await;
                    let _ = child.kill().await;
                    return Ok(());
                }
                queued = slots.reserve() => queued,
            };
            match queued {
                Ok(permit) => permit.send(slot),
                Err(_) => {
                    return Err(CollectorError::Journal(
                        "the cursor committer stopped".into(),
                    ));
                }
            }
            last_read = Some(cursor);
            backoff = Duration::from_millis(500);
        }
        let status = child.wait().await;
        tracing::warn!(
            ?status,
            "journalctl ended; restarting it after the last entry read"
        );
        tokio::select! {
            _ = until(&mut stop, true) => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Acknowledge entries strictly in order, saving the cursor when the queue
/// is idle or every [`crate::checkpoint::SAVE_EVERY`] entries.
async fn commit(
    mut queue: mpsc::Receiver<Slot>,
    mut checkpoint: Checkpoint,
    file: CursorFile,
) -> Result<(), CollectorError> {
    let save = |checkpoint: &mut Checkpoint| -> Result<(), CollectorError> {
        if let Some(cursor) = checkpoint.to_save() {
            file.store(cursor)
                .map_err(|source| CollectorError::Cursor {
                    path: file.path().to_path_buf(),
                    source,
                })?;
            checkpoint.saved();
        }
        Ok(())
    };
    while let Some(slot) = queue.recv().await {
        let cursor = match slot {
            Slot::Filtered(cursor) => cursor,
            Slot::Sent(cursor, sent) => match sent.kept().await {
                Ok(_stored_or_spooled) => cursor,
                Err(e) if !e.is_retryable() => {
                    tracing::warn!(error = %e, cursor = %cursor, "journal entry refused by the stream; moving on");
                    cursor
                }
                Err(e) => {
                    // Keep what is acknowledged; the restart resumes here.
                    save(&mut checkpoint)?;
                    return Err(CollectorError::Publish(e));
                }
            },
        };
        if checkpoint.ack(cursor, queue.is_empty()) {
            save(&mut checkpoint)?;
        }
    }
    save(&mut checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewatch_runtime::cloudevents::AttributesReader;

    #[test]
    fn journalctl_resumes_after_the_cursor() {
        let mut config = Config {
            journal_directory: Some("/j".into()),
            ..Config::default()
        };
        let args = |c: &Config, after| {
            arguments(c, after)
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            args(&config, Some("s=1;i=2")),
            "-o json -f --no-pager --directory /j --after-cursor s=1;i=2 --no-tail"
        );
        assert_eq!(
            args(&config, None),
            "-o json -f --no-pager --directory /j -n 0"
        );
        config.journal_directory = None;
        config.host_root = "/host".into();
        config.journal_start = JournalStart::Boot;
        assert_eq!(
            args(&config, None),
            "-o json -f --no-pager --root /host -b --no-tail"
        );
    }

    #[test]
    fn entries_become_events_with_cursor_ids() {
        let entry = Entry {
            cursor: "s=ab;i=7;b=c;m=1;t=2;x=3".into(),
            realtime_us: 1_764_230_400_000_000,
            priority: 3,
            message: "Memory cgroup out of memory: Killed process 42 (tail) total-vm:1kB".into(),
            transport: "kernel".into(),
            ..Default::default()
        };
        let e =
            entry_event(&entry, Selected::OomKill, "n1", "/tidewatch/systemd/n1").expect("event");
        assert_eq!(e.ty(), topology::types::JOURNAL_OOM_KILL);
        assert_eq!(e.subject(), Some("node/n1"));
        assert_eq!(e.id(), journal::event_id(&entry.cursor));
        let p: v1::JournalEntry = tidewatch_runtime::event::payload(&e).expect("payload");
        assert_eq!(
            p.fields.get("OOM_VICTIM_PID").map(String::as_str),
            Some("42")
        );
        assert_eq!(p.cursor, entry.cursor);
        let unit = Entry {
            unit: "kubelet.service".into(),
            ..entry
        };
        let e = entry_event(&unit, Selected::Entry, "n1", "/tidewatch/systemd/n1").expect("event");
        assert_eq!(e.subject(), Some("unit/kubelet.service"));
        assert_eq!(e.ty(), topology::types::JOURNAL_ENTRY);
    }
}
