//! The watch state machine every object kind goes through: it turns the
//! watcher's list/watch events into *transitions* between remembered
//! snapshots, so a relist (after 410 Gone, a dropped connection or an API
//! server restart) yields nothing for objects that did not change and a
//! removal for objects that vanished meanwhile.
//!
//! The first list after start (or after winning leadership) is the
//! *baseline*: it is remembered but reported as [`Transition::Baseline`],
//! so a collector restart does not replay every pod's history.

use std::collections::{BTreeMap, BTreeSet};

/// What the watcher says, with the object already reduced to its snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<S> {
    /// A (re)list starts.
    Init,
    /// An object of the list.
    InitApply(String, S),
    /// The list is complete: anything not in it is gone.
    InitDone,
    /// Added or modified while watching.
    Apply(String, S),
    /// Deleted while watching.
    Delete(String, S),
}

/// A change between two remembered versions of one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition<S> {
    /// Seen in the first list: now known, nothing to report.
    Baseline(S),
    /// New (`old` None) or changed.
    Applied { old: Option<S>, new: S },
    /// Deleted, or missing from a relist.
    Removed(S),
}

/// Where the tracker is in the list/watch cycle.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Nothing listed yet.
    Unsynced,
    /// A list is in progress; `first` when it is the baseline.
    Listing { first: bool, seen: BTreeSet<String> },
    /// Watching.
    Synced,
}

/// Remembered snapshots by key (object uid) and the [`Phase`].
#[derive(Debug, Clone)]
pub struct Tracker<S> {
    phase: Phase,
    objects: BTreeMap<String, S>,
}

impl<S> Default for Tracker<S> {
    fn default() -> Self {
        Tracker {
            phase: Phase::Unsynced,
            objects: BTreeMap::new(),
        }
    }
}

impl<S: Clone + PartialEq> Tracker<S> {
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn get(&self, key: &str) -> Option<&S> {
        self.objects.get(key)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Fold one watcher input in; return the transitions it causes.
    pub fn step(&mut self, input: Input<S>) -> Vec<Transition<S>> {
        match input {
            Input::Init => {
                let first = matches!(self.phase, Phase::Unsynced)
                    || matches!(self.phase, Phase::Listing { first: true, .. });
                self.phase = Phase::Listing {
                    first,
                    seen: BTreeSet::new(),
                };
                Vec::new()
            }
            Input::InitApply(key, new) => {
                let first = match &mut self.phase {
                    Phase::Listing { first, seen } => {
                        seen.insert(key.clone());
                        *first
                    }
                    // A list item outside a list: treat it as a watch event.
                    _ => false,
                };
                if first {
                    self.objects.insert(key, new.clone());
                    vec![Transition::Baseline(new)]
                } else {
                    self.apply(key, new)
                }
            }
            Input::InitDone => {
                let phase = std::mem::replace(&mut self.phase, Phase::Synced);
                let Phase::Listing { seen, .. } = phase else {
                    return Vec::new();
                };
                let gone: Vec<String> = self
                    .objects
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                gone.into_iter()
                    .filter_map(|k| self.objects.remove(&k))
                    .map(Transition::Removed)
                    .collect()
            }
            Input::Apply(key, new) => self.apply(key, new),
            Input::Delete(key, last) => match self.objects.remove(&key) {
                Some(_) => vec![Transition::Removed(last)],
                None => Vec::new(),
            },
        }
    }

    fn apply(&mut self, key: String, new: S) -> Vec<Transition<S>> {
        let old = self.objects.insert(key, new.clone());
        if old.as_ref() == Some(&new) {
            return Vec::new();
        }
        vec![Transition::Applied { old, new }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &str) -> (String, String) {
        let (k, s) = v.split_once('=').unwrap_or((v, ""));
        (k.to_string(), s.to_string())
    }

    fn run(tracker: &mut Tracker<String>, inputs: &[&str]) -> Vec<Transition<String>> {
        let mut out = Vec::new();
        for i in inputs {
            let input = match *i {
                "init" => Input::Init,
                "done" => Input::InitDone,
                other => {
                    let (verb, rest) = other.split_once(' ').unwrap_or((other, ""));
                    let (k, s) = t(rest);
                    match verb {
                        "list" => Input::InitApply(k, s),
                        "apply" => Input::Apply(k, s),
                        "delete" => Input::Delete(k, s),
                        _ => unreachable!("test input {other}"),
                    }
                }
            };
            out.extend(tracker.step(input));
        }
        out
    }

    #[test]
    fn the_first_list_is_a_silent_baseline() {
        let mut tr = Tracker::default();
        let out = run(&mut tr, &["init", "list a=1", "list b=1", "done"]);
        assert_eq!(
            out,
            vec![
                Transition::Baseline("1".to_string()),
                Transition::Baseline("1".to_string())
            ]
        );
        assert_eq!(tr.phase(), &Phase::Synced);
        let out = run(&mut tr, &["apply a=2"]);
        assert_eq!(
            out,
            vec![Transition::Applied {
                old: Some("1".into()),
                new: "2".into()
            }]
        );
    }

    #[test]
    fn a_relist_reports_only_what_changed_or_vanished() {
        let mut tr = Tracker::default();
        run(
            &mut tr,
            &["init", "list a=1", "list b=1", "list c=1", "done"],
        );
        // 410 Gone: relist. a unchanged, b changed, c gone, d new.
        let out = run(
            &mut tr,
            &["init", "list a=1", "list b=2", "list d=1", "done"],
        );
        assert_eq!(
            out,
            vec![
                Transition::Applied {
                    old: Some("1".into()),
                    new: "2".into()
                },
                Transition::Applied {
                    old: None,
                    new: "1".into()
                },
                Transition::Removed("1".into()),
            ]
        );
        assert_eq!(tr.len(), 3);
        // The same relist again: nothing.
        let out = run(
            &mut tr,
            &["init", "list a=1", "list b=2", "list d=1", "done"],
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn an_interrupted_baseline_stays_a_baseline() {
        let mut tr = Tracker::default();
        run(&mut tr, &["init", "list a=1"]);
        let out = run(&mut tr, &["init", "list a=1", "list b=1", "done"]);
        assert!(out.iter().all(|t| matches!(t, Transition::Baseline(_))));
    }

    #[test]
    fn deletes_of_unknown_objects_and_repeated_applies_are_silent() {
        let mut tr = Tracker::default();
        run(&mut tr, &["init", "done"]);
        assert!(run(&mut tr, &["delete x=1"]).is_empty());
        assert_eq!(run(&mut tr, &["apply x=1", "apply x=1"]).len(), 1);
        assert_eq!(
            run(&mut tr, &["delete x=1"]),
            vec![Transition::Removed("1".into())]
        );
    }
}
