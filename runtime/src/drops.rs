//! Reports of lost events: `dev.tidewatch.kernel.collector.drops` events
//! ([`CollectorDrops`]) saying, per stage (`kernel`, `queue`, `publish`,
//! `spool`), kind and CPU, how many events were lost in total and since
//! the last report. The outbox reports its spool overflow this way; a
//! collector reports its own stages with the same [`Tally`] and [`event`].

use std::collections::BTreeMap;

use cloudevents::Event;
use tidewatch_proto::v1::{CollectorDrops, DropCount};

use crate::event::{EventError, new_event};
use crate::topology;

/// Running totals of lost events, and what the last report said.
#[derive(Debug, Default)]
pub struct Tally {
    /// (stage, kind, cpu) → total last reported.
    reported: BTreeMap<(String, String, u32), u64>,
}

/// One counter of lost events: where, what, and how many so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Total {
    pub stage: &'static str,
    /// Event kind, or empty when the stage does not tell kinds apart.
    pub kind: String,
    pub cpu: u32,
    pub total: u64,
}

impl Tally {
    /// The report for `totals` (zero totals left out), or `None` when
    /// nothing grew since the last [`Tally::reported`] one.
    pub fn report(
        &self,
        node: &str,
        totals: impl IntoIterator<Item = Total>,
    ) -> Option<CollectorDrops> {
        let counts: Vec<DropCount> = totals
            .into_iter()
            .filter(|t| t.total > 0)
            .map(|t| {
                let before = self
                    .reported
                    .get(&(t.stage.to_string(), t.kind.clone(), t.cpu))
                    .copied()
                    .unwrap_or(0);
                DropCount {
                    stage: t.stage.into(),
                    delta: t.total - before.min(t.total),
                    kind: t.kind,
                    cpu: t.cpu,
                    total: t.total,
                }
            })
            .collect();
        let delta: u64 = counts.iter().map(|c| c.delta).sum();
        (delta > 0).then(|| CollectorDrops {
            node: node.to_string(),
            counts,
            delta,
        })
    }

    /// `report` reached the stream: later reports count from it.
    pub fn reported(&mut self, report: &CollectorDrops) {
        for c in &report.counts {
            self.reported
                .insert((c.stage.clone(), c.kind.clone(), c.cpu), c.total);
        }
    }
}

/// The drops event of `component` on `node`, with id `id`.
pub fn event(
    id: String,
    component: &str,
    node: &str,
    report: &CollectorDrops,
) -> Result<Event, EventError> {
    new_event(
        id,
        topology::types::COLLECTOR_DROPS,
        &topology::source(component, node),
        Some(&format!("node/{node}")),
        chrono::Utc::now(),
        report,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(stage: &'static str, cpu: u32, total: u64) -> Total {
        Total {
            stage,
            kind: "process.exec".into(),
            cpu,
            total,
        }
    }

    #[test]
    fn reports_what_grew_since_the_last_report() {
        let mut tally = Tally::default();
        assert!(tally.report("n", [total("kernel", 0, 0)]).is_none());
        let first = tally
            .report("n", [total("kernel", 0, 5), total("queue", 0, 0)])
            .expect("grew");
        assert_eq!(first.delta, 5);
        assert_eq!(first.counts.len(), 1);
        // Not reported yet: the next report still counts from zero.
        let again = tally.report("n", [total("kernel", 0, 7)]).expect("grew");
        assert_eq!(again.delta, 7);
        tally.reported(&again);
        assert!(tally.report("n", [total("kernel", 0, 7)]).is_none());
        let later = tally
            .report("n", [total("kernel", 0, 9), total("kernel", 1, 1)])
            .expect("grew");
        assert_eq!(later.delta, 3);
        assert_eq!(later.counts[0].total, 9);
        assert_eq!(later.counts[0].delta, 2);
    }
}
