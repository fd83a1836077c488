//! Services: their cluster IPs in the pod metadata bucket
//! (`svcip.<ip>` → `{"namespace", "name"}`), so enrich can name the
//! service a connection went to. Pure.

use bytes::Bytes;
use k8s_openapi::api::core::v1::Service;
use tidewatch_runtime::topology::pod_keys;

/// What is kept of a Service.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceSnapshot {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<String>,
}

impl ServiceSnapshot {
    pub fn from_service(s: &Service) -> Option<ServiceSnapshot> {
        let uid = s.metadata.uid.clone().filter(|u| !u.is_empty())?;
        let spec = s.spec.as_ref();
        let mut ips: Vec<String> = spec
            .and_then(|s| s.cluster_ips.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(spec.and_then(|s| s.cluster_ip.clone()))
            .filter(|ip| !ip.is_empty() && ip != "None")
            .collect();
        ips.sort();
        ips.dedup();
        Some(ServiceSnapshot {
            uid,
            namespace: s.metadata.namespace.clone().unwrap_or_default(),
            name: s.metadata.name.clone().unwrap_or_default(),
            cluster_ips: ips,
        })
    }

    pub fn keys(&self) -> Vec<String> {
        self.cluster_ips
            .iter()
            .map(|ip| pod_keys::by_service_ip(ip))
            .collect()
    }

    /// The JSON value enrich reads.
    pub fn value(&self) -> Bytes {
        Bytes::from(serde_json::json!({"namespace": self.namespace, "name": self.name}).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ips_become_keys_and_headless_services_none() {
        let s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop", "uid": "u1"},
            "spec": {"clusterIP": "10.43.0.10", "clusterIPs": ["10.43.0.10", "fd00::a"]}
        }))
        .expect("Service");
        let s = ServiceSnapshot::from_service(&s).expect("uid");
        assert_eq!(s.keys(), vec!["svcip.10_43_0_10", "svcip.fd00__a"]);
        let v: serde_json::Value = serde_json::from_slice(&s.value()).expect("json");
        assert_eq!(v, serde_json::json!({"namespace": "shop", "name": "api"}));
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop", "uid": "u2"},
            "spec": {"clusterIP": "None"}
        }))
        .expect("Service");
        assert!(
            ServiceSnapshot::from_service(&headless)
                .expect("uid")
                .keys()
                .is_empty()
        );
    }
}
