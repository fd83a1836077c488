//! What the enriched stream's readers want. Every consumer of the enriched
//! stream filters by event type on the server (its function's `types`,
//! provisioned as filter subjects); an event no consumer's filter matches
//! would be stored for nobody. enrich reads the consumers' filters from
//! JetStream itself (the one source of truth: whatever `tidewatch
//! provision` or an operator set), every [`REFRESH`], and acks such events
//! without storing them (`tidewatch_events_uninterested_total`).
//!
//! A consumer without a filter (a SIEM reading everything, or `tidewatch
//! tail` on the enriched stream) wants everything. Until the consumers were
//! listed once, or if they cannot be, everything is wanted: failing open
//! stores too much, never too little. Events from before a new interest
//! are in the raw stream: `tidewatch replay --stream raw --consumer enrich`
//! enriches them again for it.

use std::sync::RwLock;
use std::time::Duration;

use futures::TryStreamExt as _;
use tidewatch_runtime::topology::{self, subjects};

/// How often the consumers are listed again.
pub const REFRESH: Duration = Duration::from_secs(10);

/// The filters of the enriched stream's consumers; `None`: everything.
#[derive(Debug, Default)]
pub struct Interest {
    filters: RwLock<Option<Vec<String>>>,
}

impl Interest {
    /// Whether some consumer would receive `subject`.
    pub fn wants(&self, subject: &str) -> bool {
        match &*self.filters.read().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(filters) => filters.iter().any(|f| subjects::matches(f, subject)),
        }
    }

    /// Whether some consumer could receive an event of type `ty`, whatever
    /// its collector and node: each filter's collector and node levels are
    /// taken as it names them. Lets the runtime ack an unread type without
    /// even decoding the event.
    pub fn wants_type(&self, ty: &str) -> bool {
        let guard = self.filters.read().unwrap_or_else(|p| p.into_inner());
        let Some(filters) = &*guard else { return true };
        filters.iter().any(|f| {
            let mut levels = f.split('.').skip(2);
            let level = |l: Option<&str>| match l {
                None | Some("*") | Some(">") => "x".to_string(),
                Some(l) => l.to_string(),
            };
            let (collector, node) = (level(levels.next()), level(levels.next()));
            subjects::matches(f, &subjects::enriched(&collector, &node, ty))
        })
    }

    /// Set from the consumers' filter subjects (one list per consumer; an
    /// empty list is a consumer without a filter).
    pub fn set(&self, consumers: &[Vec<String>]) {
        let filters = if consumers.iter().any(Vec::is_empty) {
            None
        } else {
            Some(consumers.iter().flatten().cloned().collect())
        };
        *self.filters.write().unwrap_or_else(|p| p.into_inner()) = filters;
    }

    /// List the enriched stream's consumers' filters.
    pub async fn list(js: &async_nats::jetstream::Context) -> Result<Vec<Vec<String>>, String> {
        let stream = js
            .get_stream_no_info(topology::ENRICHED.name)
            .await
            .map_err(|e| e.to_string())?;
        let infos: Vec<_> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(infos
            .into_iter()
            .map(|info| {
                let config = info.config;
                let mut filters = config.filter_subjects;
                if !config.filter_subject.is_empty() {
                    filters.push(config.filter_subject);
                }
                filters
            })
            .collect())
    }

    /// Keep the filters current until the process ends.
    pub async fn follow(self: std::sync::Arc<Self>, js: async_nats::jetstream::Context) {
        let mut timer = tokio::time::interval(REFRESH);
        loop {
            timer.tick().await;
            match Interest::list(&js).await {
                Ok(consumers) => self.set(&consumers),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the enriched stream's consumers; keeping the last interest")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewatch_runtime::topology::types;

    #[test]
    fn an_event_is_wanted_when_a_consumer_filter_matches_it() {
        let interest = Interest::default();
        let exec = subjects::enriched("ebpf", "node-1", types::PROCESS_EXEC);
        let restart = subjects::enriched("k8s", "node-1", types::CONTAINER_RESTARTED);
        assert!(interest.wants(&exec), "nothing listed yet: everything");
        interest.set(&[vec![
            "tidewatch.enriched.*.*.dev.tidewatch.k8s.>".into(),
            "tidewatch.replay.enriched.correlate".into(),
        ]]);
        assert!(interest.wants(&restart));
        assert!(!interest.wants(&exec), "no consumer reads process execs");
        // A consumer without a filter wants everything.
        interest.set(&[
            vec!["tidewatch.enriched.*.*.dev.tidewatch.k8s.>".into()],
            vec![],
        ]);
        assert!(interest.wants(&exec));
        // No consumer at all: nothing is wanted.
        interest.set(&[]);
        assert!(!interest.wants(&restart));
        // By type alone, whatever the collector and node.
        interest.set(&[vec!["tidewatch.enriched.*.*.dev.tidewatch.k8s.>".into()]]);
        assert!(interest.wants_type(types::CONTAINER_RESTARTED));
        assert!(!interest.wants_type(types::PROCESS_EXEC));
        interest.set(&[vec![
            "tidewatch.enriched.ebpf.*.dev.tidewatch.kernel.>".into(),
        ]]);
        assert!(
            interest.wants_type(types::PROCESS_EXEC),
            "a filter naming its collector"
        );
        interest.set(&[vec!["tidewatch.enriched.>".into()]]);
        assert!(interest.wants_type(types::PROCESS_EXEC));
    }
}
