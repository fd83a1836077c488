//! One incident, one insight: supersession between rules.
//!
//! A rule may declare that it explains another rule's findings better
//! (`supersedes = [{ rule = "crash-loop", relation = "same-pod" }]`): an
//! OOM cascade over the crash loop of the same pod, a node runtime failure
//! over the crash loops of pods on that node that begin after it, a bad
//! rollout over the crash loops of the new ReplicaSet's pods. The link is
//! a **claim** per pod, kept in the correlation bucket (`incident.<pod>`)
//! and written with compare-and-set like rule state, so replicas, replays
//! and redeliveries reach the same end whatever the order:
//!
//! - a subordinate finding (crash loop) about a pod a superseding incident
//!   owns, while that incident is open, is not published: its evidence is
//!   the owner's (the owner lists the pod's restarts already);
//! - a superseding finding about a pod whose claim a subordinate insight
//!   holds takes the claim over and publishes that insight's last revision
//!   once more, status `superseded`, `superseded_by` the owner, so nothing
//!   is left dangling; the owner lists it in `supersedes`.
//!
//! [`Claim::settle`] is pure (the state machine); main.rs does the I/O.

use serde::{Deserialize, Serialize};
use tidewatch_proto::v1::Insight;
use tidewatch_runtime::event::derive_id;

use crate::vocabulary::Finding;

/// How a superseding incident covers the subordinate's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relation {
    /// The incident's own entity is the pod.
    SamePod,
    /// The pods on the incident's node that it lists as affected (those
    /// restarting after the root cause).
    PodOnNode,
    /// The new ReplicaSet's pods the rollout incident lists as affected.
    PodOfReplicaset,
}

/// One `supersedes` entry of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Supersedes {
    /// The rule whose findings this one absorbs (`crash-loop`).
    pub rule: String,
    pub relation: Relation,
}

impl Supersedes {
    pub fn validate(&self) -> Result<(), String> {
        if self.rule != "crash-loop" {
            return Err(format!(
                "supersedes {:?}: only crash-loop findings (per pod) can be superseded",
                self.rule
            ));
        }
        Ok(())
    }
}

/// The pods an insight covers under `relation` (`<ns>/<name>`).
pub fn covered_pods(insight: &Insight, relation: Relation) -> Vec<String> {
    let pods = insight
        .affected
        .iter()
        .filter(|e| e.kind == "pod")
        .map(|e| format!("{}/{}", e.namespace, e.name));
    match relation {
        // The first affected entity is the incident's own.
        Relation::SamePod => insight
            .affected
            .first()
            .filter(|e| e.kind == "pod")
            .map(|e| vec![format!("{}/{}", e.namespace, e.name)])
            .unwrap_or_default(),
        Relation::PodOnNode | Relation::PodOfReplicaset => pods.collect(),
    }
}

/// What a claim remembers of a subordinate insight it superseded: the
/// revision published for it, kept so a redelivery publishes it again
/// (same message id) if the first publish was lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Superseded {
    pub finding: Finding,
    pub at_ns: i64,
}

/// The superseding revision of `last` (a subordinate's last published
/// version), about `pod`, explained by `owner`: one revision more, its own
/// message id, so a repeat is deduplicated.
fn superseding_revision(mut last: Finding, owner: &Insight, pod: &str) -> Finding {
    let insight = &mut last.insight;
    insight.revision = insight.revision.saturating_add(1);
    insight.status = "superseded".into();
    insight.superseded_by = owner.id.clone();
    insight.summary = format!(
        "superseded by {} {}: {}",
        owner.kind, owner.id, insight.summary
    );
    if insight.affected.is_empty() {
        let (namespace, name) = pod.split_once('/').unwrap_or(("", pod));
        insight.affected = vec![tidewatch_proto::v1::Entity {
            kind: "pod".into(),
            name: name.into(),
            namespace: namespace.into(),
        }];
    }
    last.message_id = derive_id(&[
        insight.id.as_bytes(),
        b"superseded",
        &u64::from(insight.revision).to_be_bytes(),
    ]);
    last
}

/// Who explains a pod's trouble now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub owner_id: String,
    pub owner_kind: String,
    /// Until when the owner's claim holds: its last evidence plus its
    /// window while open, its resolution once resolved (ns).
    pub until_ns: i64,
    /// The owner's last published version, when the owner is a
    /// subordinate rule (what a superseding revision is made from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Finding>,
    /// Subordinate insights the owner superseded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<Superseded>,
}

/// Who supersedes whom: per superseding rule, its entries and window.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    superseding: Vec<(String, Vec<Supersedes>, i64)>,
}

impl Roles {
    pub fn add(&mut self, kind: &str, supersedes: &[Supersedes], window_ns: i64) {
        if !supersedes.is_empty() {
            self.superseding
                .push((kind.to_string(), supersedes.to_vec(), window_ns));
        }
    }

    /// The role of a finding of `kind`.
    pub fn role(&self, kind: &str) -> Role<'_> {
        if let Some((_, entries, window_ns)) = self.superseding.iter().find(|(k, _, _)| k == kind) {
            return Role::Superseding {
                rules: entries.iter().map(|e| e.rule.as_str()).collect(),
                window_ns: *window_ns,
            };
        }
        let by: Vec<&str> = self
            .superseding
            .iter()
            .filter(|(_, entries, _)| entries.iter().any(|e| e.rule == kind))
            .map(|(k, _, _)| k.as_str())
            .collect();
        if by.is_empty() {
            Role::Plain
        } else {
            Role::Subordinate { by }
        }
    }

    /// The pods a finding's claim covers.
    pub fn pods(&self, finding: &Finding) -> Vec<String> {
        let insight = &finding.insight;
        let mut pods: Vec<String> = match self.role(&insight.kind) {
            Role::Plain => Vec::new(),
            Role::Subordinate { .. } => covered_pods(insight, Relation::SamePod),
            Role::Superseding { .. } => self
                .superseding
                .iter()
                .filter(|(k, _, _)| *k == insight.kind)
                .flat_map(|(_, entries, _)| entries.iter().map(|e| e.relation))
                .flat_map(|relation| covered_pods(insight, relation))
                .collect(),
        };
        pods.sort();
        pods.dedup();
        pods
    }
}

/// What a finding is to supersession.
#[derive(Debug, Clone, PartialEq)]
pub enum Role<'a> {
    /// Nobody supersedes it, it supersedes nobody.
    Plain,
    /// Superseded by these rules (per pod).
    Subordinate { by: Vec<&'a str> },
    /// Supersedes these rules, covering these pods, for this long after
    /// its last evidence.
    Superseding { rules: Vec<&'a str>, window_ns: i64 },
}

/// What to do after settling one claim.
#[derive(Debug, Default, PartialEq)]
pub struct Settled {
    /// The claim to write (None: unchanged).
    pub write: Option<Claim>,
    /// Publish the finding itself.
    pub publish: bool,
    /// Also publish these (superseded revisions of earlier insights).
    pub also: Vec<Finding>,
    /// Insight ids the finding supersedes (for its `supersedes` list).
    pub supersedes: Vec<String>,
}

/// How long a superseded revision is published again on redelivery: the
/// republish horizon (inside the insights stream's dedupe window).
pub const REPUBLISH_NS: i64 = 60_000_000_000;

impl Claim {
    /// Settle `finding` (in `role`) against this pod's claim (`None`: no
    /// claim yet). `now_ns`: receive time, for the republish horizon.
    pub fn settle(
        claim: Option<&Claim>,
        finding: &Finding,
        pod: &str,
        role: &Role<'_>,
        now_ns: i64,
    ) -> Settled {
        let insight = &finding.insight;
        let live = claim.filter(|c| c.until_ns >= insight.first_seen_ns.min(insight.last_seen_ns));
        match role {
            Role::Plain => Settled {
                publish: true,
                ..Settled::default()
            },
            // Superseded once, superseded for good: never republished as open.
            Role::Subordinate { .. }
                if claim.is_some_and(|c| {
                    c.superseded
                        .iter()
                        .any(|s| s.finding.insight.id == insight.id)
                }) =>
            {
                Settled::default()
            }
            Role::Subordinate { by } => match live {
                // A superseding incident owns the pod: attach, stay quiet.
                Some(c) if by.contains(&c.owner_kind.as_str()) && c.owner_id != insight.id => {
                    Settled::default()
                }
                _ => {
                    let next = Claim {
                        owner_id: insight.id.clone(),
                        owner_kind: insight.kind.clone(),
                        until_ns: insight.last_seen_ns,
                        last: Some(finding.clone()),
                        // What was superseded stays so (see above).
                        superseded: claim.map(|c| c.superseded.clone()).unwrap_or_default(),
                    };
                    Settled {
                        write: (claim != Some(&next)).then_some(next),
                        publish: true,
                        ..Settled::default()
                    }
                }
            },
            Role::Superseding { rules, window_ns } => {
                let until_ns = if insight.status == "resolved" {
                    insight.last_seen_ns
                } else {
                    insight.last_seen_ns.saturating_add(*window_ns)
                };
                match claim {
                    Some(c) if c.owner_id == insight.id => {
                        // Ours already: extend it; re-publish a superseded
                        // revision a redelivery may have lost.
                        let also = c
                            .superseded
                            .iter()
                            .filter(|s| now_ns.saturating_sub(s.at_ns) <= REPUBLISH_NS)
                            .map(|s| s.finding.clone())
                            .collect();
                        let mut next = c.clone();
                        next.until_ns = until_ns;
                        Settled {
                            write: (next != *c).then_some(next),
                            publish: true,
                            also,
                            supersedes: c
                                .superseded
                                .iter()
                                .map(|s| s.finding.insight.id.clone())
                                .collect(),
                        }
                    }
                    Some(c)
                        if c.until_ns >= insight.first_seen_ns
                            && rules.contains(&c.owner_kind.as_str()) =>
                    {
                        // A subordinate insight was published first: supersede it by a revision.
                        let last = c.last.clone().unwrap_or_else(|| Finding {
                            message_id: String::new(),
                            subject: format!("pod/{pod}"),
                            insight: Insight {
                                id: c.owner_id.clone(),
                                kind: c.owner_kind.clone(),
                                ..Insight::default()
                            },
                        });
                        let superseded = superseding_revision(last, insight, pod);
                        let next = Claim {
                            owner_id: insight.id.clone(),
                            owner_kind: insight.kind.clone(),
                            until_ns,
                            last: None,
                            superseded: vec![Superseded {
                                finding: superseded.clone(),
                                at_ns: now_ns,
                            }],
                        };
                        Settled {
                            write: Some(next),
                            publish: true,
                            supersedes: vec![superseded.insight.id.clone()],
                            also: vec![superseded],
                        }
                    }
                    // Another superseding incident holds the pod: both stand.
                    Some(c)
                        if c.until_ns >= insight.first_seen_ns
                            && !c.owner_kind.is_empty()
                            && c.last.is_none() =>
                    {
                        Settled {
                            publish: true,
                            ..Settled::default()
                        }
                    }
                    _ => Settled {
                        write: Some(Claim {
                            owner_id: insight.id.clone(),
                            owner_kind: insight.kind.clone(),
                            until_ns,
                            last: None,
                            superseded: Vec::new(),
                        }),
                        publish: true,
                        ..Settled::default()
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewatch_proto::v1::Entity;

    fn finding(
        kind: &str,
        id: &str,
        revision: u32,
        pods: &[&str],
        first_s: i64,
        last_s: i64,
    ) -> Finding {
        let affected = pods
            .iter()
            .map(|p| {
                let (ns, name) = p.split_once('/').expect("ns/name");
                Entity {
                    kind: "pod".into(),
                    name: name.into(),
                    namespace: ns.into(),
                }
            })
            .collect();
        Finding {
            message_id: format!("{id}-{revision}"),
            subject: format!("pod/{}", pods[0]),
            insight: Insight {
                id: id.into(),
                kind: kind.into(),
                revision,
                status: "open".into(),
                affected,
                first_seen_ns: first_s * 1_000_000_000,
                last_seen_ns: last_s * 1_000_000_000,
                summary: format!("{kind} {id}"),
                ..Insight::default()
            },
        }
    }

    fn roles() -> Roles {
        let mut roles = Roles::default();
        let entry = |relation| {
            vec![Supersedes {
                rule: "crash-loop".into(),
                relation,
            }]
        };
        roles.add("oom-cascade", &entry(Relation::SamePod), 600_000_000_000);
        roles.add(
            "node-runtime-failure",
            &entry(Relation::PodOnNode),
            600_000_000_000,
        );
        roles
    }

    /// Settle findings in order against one pod's claim, as the engine does:
    /// what gets published, and the claim after.
    fn play(findings: &[Finding]) -> (Vec<Finding>, Option<Claim>) {
        let roles = roles();
        let mut claim: Option<Claim> = None;
        let mut published = Vec::new();
        for f in findings {
            let role = roles.role(&f.insight.kind);
            let pods = roles.pods(f);
            let mut publish = pods.is_empty() || !matches!(role, Role::Subordinate { .. });
            let mut also = Vec::new();
            let mut supersedes = Vec::new();
            for pod in &pods {
                let settled = Claim::settle(claim.as_ref(), f, pod, &role, 0);
                if let Some(next) = settled.write.clone() {
                    claim = Some(next);
                }
                publish |= settled.publish && matches!(role, Role::Subordinate { .. });
                also.extend(settled.also);
                supersedes.extend(settled.supersedes);
            }
            let mut f = f.clone();
            f.insight.supersedes = supersedes;
            if publish {
                published.push(f);
            }
            published.extend(also);
        }
        (published, claim)
    }

    /// The live insights: each id's highest revision, unless superseded.
    fn live(published: &[Finding]) -> Vec<String> {
        let mut latest: std::collections::BTreeMap<&str, &Insight> = Default::default();
        for f in published {
            let e = latest.entry(f.insight.id.as_str()).or_insert(&f.insight);
            if f.insight.revision >= e.revision {
                *e = &f.insight;
            }
        }
        latest
            .values()
            .filter(|i| i.status != "superseded")
            .map(|i| i.kind.clone())
            .collect()
    }

    #[test]
    fn the_oom_cascade_first_keeps_the_crash_loop_quiet() {
        let oom = finding("oom-cascade", "O", 1, &["shop/cart"], 10, 40);
        let crash = finding("crash-loop", "C", 1, &["shop/cart"], 12, 60);
        let (published, _) = play(&[oom, crash]);
        assert_eq!(
            published
                .iter()
                .map(|f| f.insight.id.as_str())
                .collect::<Vec<_>>(),
            ["O"]
        );
    }

    #[test]
    fn a_crash_loop_published_first_is_superseded_by_a_revision() {
        let crash = finding("crash-loop", "C", 2, &["shop/cart"], 12, 60);
        let oom = finding("oom-cascade", "O", 1, &["shop/cart"], 10, 70);
        let later_crash = finding("crash-loop", "C", 3, &["shop/cart"], 12, 80);
        let (published, claim) = play(&[crash, oom, later_crash]);
        let ids: Vec<(&str, u32, &str)> = published
            .iter()
            .map(|f| {
                (
                    f.insight.id.as_str(),
                    f.insight.revision,
                    f.insight.status.as_str(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            [("C", 2, "open"), ("O", 1, "open"), ("C", 3, "superseded")]
        );
        assert_eq!(published[2].insight.superseded_by, "O");
        assert_eq!(
            published[1].insight.supersedes,
            ["C"],
            "the owner lists what it absorbed"
        );
        assert_eq!(claim.expect("claim").owner_id, "O");
        assert_eq!(live(&published), ["oom-cascade"]);
    }

    #[test]
    fn either_order_leaves_one_live_insight() {
        let crash = finding("crash-loop", "C", 1, &["shop/cart"], 12, 60);
        let oom = finding("oom-cascade", "O", 1, &["shop/cart"], 10, 61);
        for order in [
            vec![crash.clone(), oom.clone()],
            vec![oom.clone(), crash.clone()],
        ] {
            let (published, _) = play(&order);
            assert_eq!(live(&published), ["oom-cascade"], "{order:?}");
        }
    }

    #[test]
    fn a_redelivered_superseding_finding_repeats_the_superseded_revision() {
        let crash = finding("crash-loop", "C", 1, &["shop/cart"], 12, 60);
        let oom = finding("oom-cascade", "O", 1, &["shop/cart"], 10, 61);
        let (first, claim) = play(&[crash, oom.clone()]);
        let roles = roles();
        let role = roles.role("oom-cascade");
        let again = Claim::settle(claim.as_ref(), &oom, "shop/cart", &role, 1_000);
        assert_eq!(again.also.len(), 1, "published again within the horizon");
        assert_eq!(
            again.also[0].message_id, first[2].message_id,
            "same message id: deduplicated"
        );
        let late = Claim::settle(claim.as_ref(), &oom, "shop/cart", &role, REPUBLISH_NS + 1);
        assert!(late.also.is_empty(), "not past the horizon");
    }

    #[test]
    fn a_crash_loop_after_the_owner_went_quiet_is_its_own_incident() {
        let oom = finding("oom-cascade", "O", 1, &["shop/cart"], 10, 40);
        // 10 minutes after the OOM cascade's last evidence.
        let crash = finding("crash-loop", "C", 1, &["shop/cart"], 700, 760);
        let (published, _) = play(&[oom, crash]);
        assert_eq!(live(&published), ["crash-loop", "oom-cascade"]);
    }

    #[test]
    fn a_node_failure_covers_the_pods_it_lists() {
        let mut node = finding("node-runtime-failure", "N", 1, &["shop/a", "shop/b"], 5, 50);
        node.insight.affected.insert(
            0,
            Entity {
                kind: "node".into(),
                name: "n1".into(),
                namespace: String::new(),
            },
        );
        assert_eq!(roles().pods(&node), ["shop/a", "shop/b"]);
        // same-pod covers only the incident's own pod.
        let mut oom = finding("oom-cascade", "O", 1, &["shop/a", "shop/b"], 5, 50);
        oom.insight.affected.truncate(2);
        assert_eq!(roles().pods(&oom), ["shop/a"]);
    }

    #[test]
    fn a_superseded_insight_is_never_republished_as_open() {
        let crash = finding("crash-loop", "C", 1, &["shop/cart"], 12, 60);
        let oom = finding("oom-cascade", "O", 1, &["shop/cart"], 10, 61);
        // The crash loop goes on long after the OOM cascade's claim lapsed.
        let much_later = finding("crash-loop", "C", 9, &["shop/cart"], 3_000, 3_600);
        let (published, claim) = play(&[crash, oom, much_later]);
        let c: Vec<(u32, &str)> = published
            .iter()
            .filter(|f| f.insight.id == "C")
            .map(|f| (f.insight.revision, f.insight.status.as_str()))
            .collect();
        assert_eq!(c, [(1, "open"), (2, "superseded")]);
        assert!(
            claim
                .expect("claim")
                .superseded
                .iter()
                .any(|s| s.finding.insight.id == "C")
        );
    }
}
