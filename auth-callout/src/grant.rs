//! Who gets what: a verified ServiceAccount token of a collector's pod
//! becomes that collector's rights *on that pod's node* and nothing else.
//! Pure: the TokenReview's answer in, a grant or a denial out.

use std::collections::BTreeMap;

use serde::Deserialize;
use tidewatch_runtime::{host, topology};

use crate::jwt::Permissions;

/// The TokenReview `extra` key naming the node of the pod a token is bound
/// to (Kubernetes ≥ 1.30, `ServiceAccountTokenPodNodeInfo`).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// What decides grants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// The namespace of the collectors' ServiceAccounts.
    pub namespace: String,
    /// The audience tokens must be issued for (the projected volume's
    /// `audience`): a token meant for anything else is refused.
    pub audience: String,
    /// The NATS account grants are placed in: `$G`, server-config users'.
    pub account: String,
    /// The longest a grant lasts, in seconds, whatever the token's own
    /// expiry: the server disconnects the client then, and it reconnects
    /// with the token the kubelet has rotated meanwhile.
    pub max_grant_secs: i64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            namespace: "tidewatch-system".into(),
            audience: "nats".into(),
            account: "$G".into(),
            max_grant_secs: 3600,
        }
    }
}

/// The ServiceAccount of `collector`'s pods (the manifests use it).
pub fn service_account(collector: &str) -> String {
    format!("tidewatch-collector-{collector}")
}

/// What the collector on `node` may do: publish its own raw subject for
/// that node (the k8s collector also keeps the pod metadata bucket), and
/// receive replies on its own per-node inbox.
pub fn collector_permissions(collector: &str, node: &str) -> Permissions {
    let mut publish = vec![topology::subjects::raw(collector, node)];
    if collector == "k8s" {
        let b = topology::POD_METADATA.bucket;
        publish.extend([
            "$JS.API.INFO".to_string(),
            format!("$JS.API.STREAM.INFO.KV_{b}"),
            format!("$JS.API.DIRECT.GET.KV_{b}.>"),
            format!("$JS.API.STREAM.MSG.GET.KV_{b}"),
            format!("$KV.{b}.>"),
        ]);
    }
    Permissions {
        publish,
        subscribe: vec![format!("{}.>", host::node_inbox_prefix(collector, node))],
    }
}

/// The TokenReview's answer, as far as grants need it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Review {
    pub authenticated: bool,
    /// The API server's reason when not authenticated.
    pub error: Option<String>,
    pub username: String,
    /// The audiences the token is valid for, of those asked.
    pub audiences: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// A connection's rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub collector: String,
    pub node: String,
    pub permissions: Permissions,
    /// Unix seconds.
    pub expires: i64,
}

impl Grant {
    /// The name the server gives the connection (`ebpf@node-1`).
    pub fn user_name(&self) -> String {
        format!("{}@{}", self.collector, self.node)
    }
}

/// Why a connection was refused; also the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The client presented no token.
    NoToken,
    /// The API server did not authenticate the token (expired, revoked,
    /// the pod deleted, or not a token at all).
    Unauthenticated(String),
    /// The token is not for our audience.
    WrongAudience,
    /// The token is valid but not a Tidewatch collector's.
    NotACollector(String),
    /// The token is not bound to a pod on a node (a legacy Secret token,
    /// or a cluster older than 1.30): its node cannot be known.
    NoNode,
}

impl Denial {
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::NoToken => "no_token",
            Denial::Unauthenticated(_) => "unauthenticated",
            Denial::WrongAudience => "wrong_audience",
            Denial::NotACollector(_) => "not_a_collector",
            Denial::NoNode => "no_node",
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::NoToken => {
                f.write_str("no token presented (a projected ServiceAccount token is required)")
            }
            Denial::Unauthenticated(why) => write!(f, "token not authenticated: {why}"),
            Denial::WrongAudience => f.write_str("token not issued for this audience"),
            Denial::NotACollector(who) => {
                write!(f, "{who} is not a Tidewatch collector's service account")
            }
            Denial::NoNode => f.write_str(
                "token not bound to a pod on a node (Kubernetes >= 1.30 bound tokens are required)",
            ),
        }
    }
}

/// Decide. `token_expires` is the token's own `exp` if it has one.
pub fn decide(
    policy: &Policy,
    review: &Review,
    token_expires: Option<i64>,
    now: i64,
) -> Result<Grant, Denial> {
    if !review.authenticated {
        return Err(Denial::Unauthenticated(
            review
                .error
                .clone()
                .unwrap_or_else(|| "no reason given".into()),
        ));
    }
    // An API server that does not support audiences answers none: then the
    // audience was not checked and the token is refused.
    if !review.audiences.iter().any(|a| a == &policy.audience) {
        return Err(Denial::WrongAudience);
    }
    let prefix = format!("system:serviceaccount:{}:", policy.namespace);
    let collector = review
        .username
        .strip_prefix(&prefix)
        .and_then(|account| {
            topology::COLLECTORS
                .iter()
                .map(|c| c.name)
                .find(|c| service_account(c) == account)
        })
        .ok_or_else(|| Denial::NotACollector(review.username.clone()))?;
    let one = |key: &str| {
        review
            .extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
    };
    let (Some(node), Some(_pod)) = (one(NODE_NAME_EXTRA), one(POD_NAME_EXTRA)) else {
        return Err(Denial::NoNode);
    };
    let cap = now + policy.max_grant_secs;
    Ok(Grant {
        collector: collector.to_string(),
        node: node.clone(),
        permissions: collector_permissions(collector, node),
        expires: token_expires.map_or(cap, |exp| exp.min(cap)),
    })
}

/// The `exp` of a JWT bearer token, read without verifying: call it only
/// on a token the API server has just authenticated.
pub fn token_expiry(token: &str) -> Option<i64> {
    use base64::Engine as _;
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["exp"].as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(account: &str, node: &str) -> Review {
        Review {
            authenticated: true,
            error: None,
            username: format!("system:serviceaccount:tidewatch-system:{account}"),
            audiences: vec!["nats".into()],
            extra: BTreeMap::from([
                (NODE_NAME_EXTRA.to_string(), vec![node.to_string()]),
                (POD_NAME_EXTRA.to_string(), vec!["pod-x".to_string()]),
            ]),
        }
    }

    #[test]
    fn a_collector_token_grants_its_subject_on_its_node_only() {
        let g = decide(
            &Policy::default(),
            &bound("tidewatch-collector-ebpf", "ip-10-0-0-1.ec2.internal"),
            Some(2_000),
            1_000,
        )
        .expect("granted");
        assert_eq!(g.collector, "ebpf");
        assert_eq!(
            g.permissions.publish,
            vec!["tidewatch.raw.ebpf.ip-10-0-0-1_ec2_internal"]
        );
        assert_eq!(
            g.permissions.subscribe,
            vec!["_INBOX_ebpf_ip-10-0-0-1_ec2_internal.>"]
        );
        assert_eq!(g.expires, 2_000, "the token's expiry, inside the cap");
        let long = decide(
            &Policy::default(),
            &bound("tidewatch-collector-ebpf", "n"),
            Some(99_999),
            1_000,
        )
        .expect("granted");
        assert_eq!(long.expires, 1_000 + 3600, "capped");
        let k8s = decide(
            &Policy::default(),
            &bound("tidewatch-collector-k8s", "n"),
            None,
            0,
        )
        .expect("granted");
        assert!(
            k8s.permissions
                .publish
                .iter()
                .any(|s| s.starts_with("$KV.")),
            "k8s keeps the pods bucket"
        );
    }

    #[test]
    fn everything_else_is_denied_with_its_reason() {
        let p = Policy::default();
        let mut r = bound("tidewatch-collector-ebpf", "n");
        r.authenticated = false;
        r.error = Some("token has expired".into());
        assert_eq!(
            decide(&p, &r, None, 0).map_err(|d| d.reason()),
            Err("unauthenticated")
        );
        let mut r = bound("tidewatch-collector-ebpf", "n");
        r.audiences = vec!["https://kubernetes.default.svc".into()];
        assert_eq!(decide(&p, &r, None, 0), Err(Denial::WrongAudience));
        for account in ["default", "tidewatch-enrich", "tidewatch-collector-"] {
            assert_eq!(
                decide(&p, &bound(account, "n"), None, 0).map_err(|d| d.reason()),
                Err("not_a_collector")
            );
        }
        let mut other_namespace = bound("tidewatch-collector-ebpf", "n");
        other_namespace.username = "system:serviceaccount:evil:tidewatch-collector-ebpf".into();
        assert_eq!(
            decide(&p, &other_namespace, None, 0).map_err(|d| d.reason()),
            Err("not_a_collector")
        );
        let mut unbound = bound("tidewatch-collector-ebpf", "n");
        unbound.extra.clear();
        assert_eq!(decide(&p, &unbound, None, 0), Err(Denial::NoNode));
    }

    #[test]
    fn node_names_cannot_widen_a_grant() {
        // A node named to look like a wildcard or a prefix of another
        // node's subjects gets one literal token.
        for (node, token) in [("*", "_"), (">", "_"), ("a.b", "a_b"), ("", "_")] {
            let mut r = bound("tidewatch-collector-systemd", node);
            if node.is_empty() {
                r.extra.insert(NODE_NAME_EXTRA.into(), vec![String::new()]);
                assert_eq!(decide(&Policy::default(), &r, None, 0), Err(Denial::NoNode));
                continue;
            }
            let g = decide(&Policy::default(), &r, None, 0).expect("granted");
            assert_eq!(
                g.permissions.publish,
                vec![format!("tidewatch.raw.systemd.{token}")]
            );
        }
    }

    #[test]
    fn token_expiry_reads_exp() {
        use base64::Engine as _;
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        assert_eq!(
            token_expiry(&format!("{}.{}.sig", e("{}"), e(r#"{"exp":42}"#))),
            Some(42)
        );
        assert_eq!(token_expiry("opaque-token"), None);
    }
}
