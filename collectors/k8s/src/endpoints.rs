//! Service endpoints from EndpointSlices: a service whose ready endpoints
//! drop to zero ([`types::ENDPOINTS_EMPTY`], JSON as correlate expects) and
//! one that has ready endpoints again ([`types::ENDPOINTS_RECOVERED`]). A
//! service's count is the sum over its slices (label
//! `kubernetes.io/service-name`). Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use tidewatch_proto::v1::EndpointsChange;
use tidewatch_runtime::topology::types;

use crate::change::{Change, Payload};
use crate::tracker::Transition;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What is kept of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SliceSnapshot {
    pub uid: String,
    pub namespace: String,
    /// Empty for slices not managed for a Service.
    pub service: String,
    pub resource_version: String,
    pub ready: u32,
    /// `<ns>/<pod>` of endpoints that are not ready.
    pub not_ready_pods: Vec<String>,
}

impl SliceSnapshot {
    pub fn from_slice(slice: &EndpointSlice) -> Option<SliceSnapshot> {
        let meta = &slice.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let mut ready = 0u32;
        let mut not_ready_pods = Vec::new();
        for e in &slice.endpoints {
            // A nil `ready` means ready (API documentation of EndpointConditions).
            if e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) {
                ready += 1;
            } else if let Some(target) = &e.target_ref
                && target.kind.as_deref() == Some("Pod")
            {
                not_ready_pods.push(format!(
                    "{}/{}",
                    target
                        .namespace
                        .clone()
                        .unwrap_or_else(|| namespace.clone()),
                    target.name.clone().unwrap_or_default()
                ));
            }
        }
        not_ready_pods.sort();
        Some(SliceSnapshot {
            uid,
            service: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned()
                .unwrap_or_default(),
            namespace,
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            ready,
            not_ready_pods,
        })
    }
}

/// Slices by uid, summed per service.
#[derive(Debug, Default)]
pub struct Services {
    slices: BTreeMap<String, SliceSnapshot>,
}

impl Services {
    /// (slice count, ready endpoints, not-ready pods) of a service.
    fn service(&self, namespace: &str, service: &str) -> (usize, u32, Vec<String>) {
        let mut slices = 0;
        let mut ready = 0;
        let mut pods = Vec::new();
        for s in self
            .slices
            .values()
            .filter(|s| s.namespace == namespace && s.service == service)
        {
            slices += 1;
            ready += s.ready;
            pods.extend(s.not_ready_pods.iter().cloned());
        }
        pods.sort();
        pods.dedup();
        (slices, ready, pods)
    }

    /// Fold in a slice transition.
    pub fn slice(&mut self, t: Transition<SliceSnapshot>) -> Vec<Change> {
        let (slice, baseline) = match t {
            Transition::Baseline(s) => (s, true),
            Transition::Applied { new, .. } => (new, false),
            Transition::Removed(s) => {
                // A service that lost a slice but keeps others may drop to
                // zero; one that lost its last slice is gone, not empty.
                let (ns, svc) = (s.namespace.clone(), s.service.clone());
                let before = self.service(&ns, &svc);
                self.slices.remove(&s.uid);
                let after = self.service(&ns, &svc);
                return self.compare(&s, before, after);
            }
        };
        if slice.service.is_empty() {
            return Vec::new();
        }
        let before = self.service(&slice.namespace, &slice.service);
        self.slices.insert(slice.uid.clone(), slice.clone());
        if baseline {
            return Vec::new();
        }
        let after = self.service(&slice.namespace, &slice.service);
        self.compare(&slice, before, after)
    }

    fn compare(
        &self,
        slice: &SliceSnapshot,
        (slices_before, ready_before, _): (usize, u32, Vec<String>),
        (slices_after, ready_after, pods): (usize, u32, Vec<String>),
    ) -> Vec<Change> {
        if slice.service.is_empty() || slices_before == 0 || slices_after == 0 {
            return Vec::new();
        }
        let subject = format!("service/{}/{}", slice.namespace, slice.service);
        let key = format!("{}/{}", slice.namespace, slice.service);
        if ready_before > 0 && ready_after == 0 {
            vec![Change::new(
                types::ENDPOINTS_EMPTY,
                subject,
                &[&key, "empty", &slice.uid, &slice.resource_version],
                None,
                Payload::Endpoints(EndpointsChange {
                    namespace: slice.namespace.clone(),
                    service: slice.service.clone(),
                    ready: 0,
                    not_ready_pods: pods,
                }),
            )]
        } else if ready_before == 0 && ready_after > 0 {
            vec![Change::new(
                types::ENDPOINTS_RECOVERED,
                subject,
                &[&key, "recovered", &slice.uid, &slice.resource_version],
                None,
                Payload::Endpoints(EndpointsChange {
                    namespace: slice.namespace.clone(),
                    service: slice.service.clone(),
                    ready: ready_after,
                    not_ready_pods: pods,
                }),
            )]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::fixture;

    fn slice(v: &serde_json::Value) -> SliceSnapshot {
        let s: EndpointSlice = serde_json::from_value(v.clone()).expect("EndpointSlice");
        SliceSnapshot::from_slice(&s).expect("uid")
    }

    #[test]
    fn a_service_drops_to_zero_and_recovers() {
        let not_ready_json = fixture("09-endpointslice-not-ready.json");
        let not_ready = slice(&not_ready_json);
        assert_eq!(not_ready.service, "backend-api-service");
        assert_eq!(not_ready.ready, 0);
        assert_eq!(not_ready.not_ready_pods.len(), 1);
        let mut ready_json = not_ready_json.clone();
        ready_json["endpoints"][0]["conditions"]["ready"] = true.into();
        ready_json["metadata"]["resourceVersion"] = "1200".into();
        let ready = slice(&ready_json);
        let mut s = Services::default();
        assert!(s.slice(Transition::Baseline(ready.clone())).is_empty());
        let c = s.slice(Transition::Applied {
            old: Some(ready.clone()),
            new: not_ready.clone(),
        });
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ty, types::ENDPOINTS_EMPTY);
        assert_eq!(c[0].subject, "service/default/backend-api-service");
        let Payload::Endpoints(data) = &c[0].payload else {
            panic!("an endpoints change")
        };
        assert_eq!(data.namespace, "default");
        assert_eq!(data.service, "backend-api-service");
        assert_eq!(data.ready, 0);
        assert_eq!(
            data.not_ready_pods[0],
            "default/backend-api-75fb46b7bd-xtkrh"
        );
        // Still empty: quiet.
        assert!(
            s.slice(Transition::Applied {
                old: Some(not_ready.clone()),
                new: not_ready.clone()
            })
            .is_empty()
        );
        let mut again = ready_json;
        again["metadata"]["resourceVersion"] = "1300".into();
        let c = s.slice(Transition::Applied {
            old: Some(not_ready),
            new: slice(&again),
        });
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ty, types::ENDPOINTS_RECOVERED);
    }

    #[test]
    fn a_deleted_service_is_not_empty_and_other_slices_count() {
        let ready = slice(&fixture("09a-endpointslice-ready.json"));
        assert_eq!(ready.ready, 2);
        let mut s = Services::default();
        s.slice(Transition::Baseline(ready.clone()));
        assert!(s.slice(Transition::Removed(ready.clone())).is_empty());
        // Two slices of one service: losing the ready one empties it.
        let mut other = slice(&fixture("09-endpointslice-not-ready.json"));
        other.service = ready.service.clone();
        other.namespace = ready.namespace.clone();
        let mut s = Services::default();
        s.slice(Transition::Baseline(ready.clone()));
        s.slice(Transition::Baseline(other));
        let c = s.slice(Transition::Removed(ready));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ty, types::ENDPOINTS_EMPTY);
    }
}
