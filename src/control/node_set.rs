//! Admitting discovered Nodes into the live node set, one at a time.
//!
//! A discovery source (the nodes file, the Kubernetes API) hands us every
//! Node it knows. Each was already validated on its own at the discovery
//! border; here each is checked against the rest of the node set, and one
//! bad or conflicting Node is left out and reported instead of freezing the
//! whole source:
//!
//! - a Node that fails validation, or conflicts with a node it cannot share
//!   with (same name or host name, an overlapping pod range, an internal IP
//!   of a config or API node, a pod range outside the cluster CIDRs), is
//!   rejected;
//! - a rejected Node that is live already keeps its last good config, and
//!   so its routes, until it is fixed or deleted;
//! - an internal IP that two discovered Nodes claim (a shared ExternalIP
//!   behind NAT) is not a conflict: both join, and the route table treats
//!   the address as ambiguous (routed by IP for neither). The same holds
//!   for a DNS name (`InternalDNS`, `ExternalDNS`) two of them claim.
//!
//! Who wins a conflict is decided by state, not by luck: a live node keeps
//! what it has (its reservation is placed first), and newcomers are
//! placed in name order. So a forged Node cannot take a pod range or a
//! name away from a node that already holds it.
//!
//! What counts as holding an address or a range (canonical forms, CIDR
//! overlap) is asked of `config::node_set`, the same predicates the
//! config's own node-set checks use; only the rules on who may share what,
//! and the wording of a rejection, are this file's.
//!
//! Two discovered Nodes may share an SSH address (every node behind one NAT
//! address, with address_types preferring ExternalIP). The SSH address is
//! where we dial sshd, not a route: nothing is dialed *to* it through a
//! tunnel, and the host key known_hosts lists for it decides who may
//! answer. Rejecting the second Node would turn an ordinary NAT set-up into
//! missing nodes, so each keeps its own tunnel to that address. The shared
//! IP is also an internal IP of both, so it is reported as ambiguous and
//! not routed by IP. What remains is that those Nodes' tunnels all end on
//! whichever machine answers there; SECURITY.md says what that means.

use std::collections::{BTreeMap, HashSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::address::{canonical_ip, canonical_net};
use crate::config::{
    check_pod_scope, has_internal_ip, net_holding, net_overlapping, pod_cidr_holding,
    pod_cidr_overlapping, NodeConfig,
};

/// One Node as a source read it: its name (as written, for the report) and
/// either its validated config or why it is invalid.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// `metadata.name`, or a placeholder such as `items[3]` without one.
    pub name: String,
    /// The validated node, or the reason it failed validation.
    pub node: Result<NodeConfig, String>,
}

/// A Node left out of routing (or kept at its last good config), with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The Node's name.
    pub name: String,
    /// Why it was not applied.
    pub reason: String,
    /// True when the node is live and keeps serving its last good config.
    #[serde(default)]
    pub kept: bool,
}

/// What a source's Nodes come to after admission.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admission {
    /// The source's node set to apply (accepted Nodes, plus rejected live
    /// Nodes at their last good config), sorted by name.
    pub nodes: Vec<NodeConfig>,
    /// Rejected Nodes, sorted by name.
    pub rejected: Vec<Rejection>,
}

/// The node set a source's Nodes are admitted into.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// This source's nodes as they are live now (their last good configs).
    pub current: &'a [NodeConfig],
    /// Config and API nodes: nothing may be shared with them.
    pub strict: &'a [NodeConfig],
    /// Other discovery sources' nodes: internal IPs may be shared.
    pub other_discovered: &'a [NodeConfig],
    /// `proxy.service_cidrs`.
    pub service_cidrs: &'a [IpNet],
    /// `proxy.cluster_cidrs` (empty: per-node size limits).
    pub cluster_cidrs: &'a [IpNet],
}

fn names(n: &NodeConfig) -> impl Iterator<Item = &str> {
    std::iter::once(n.name.as_str()).chain(n.hostnames.iter().map(String::as_str))
}

/// Whose node a candidate is checked against: what it may share, and how
/// a rejection names the other node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A config or API node: nothing may be shared with it.
    Strict,
    /// A node of another discovery source.
    OtherSource,
    /// Another node of the same source.
    SameSource,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Holder::Strict => "config or API node",
            Holder::OtherSource => "node of another discovery source",
            Holder::SameSource => "node",
        })
    }
}

/// Why `n` cannot join beside `placed` (the source's other nodes) and the
/// context's other nodes, or `None` when it can.
fn conflict<'a>(
    n: &NodeConfig,
    placed: impl Iterator<Item = &'a NodeConfig> + Clone,
    cx: &Context<'_>,
) -> Option<String> {
    if let Err(e) = check_pod_scope("node", n, cx.cluster_cidrs) {
        return Some(e.node_reason());
    }
    for c in &n.pod_cidrs {
        let c = canonical_net(*c);
        if let Some(s) = net_overlapping(cx.service_cidrs, c) {
            return Some(format!("pod CIDR {c} overlaps the service CIDR {s}"));
        }
    }
    // A node address wins over pod and service routes, so one inside them
    // would take those destinations over.
    for ip in &n.internal_ips {
        let ip = canonical_ip(*ip);
        if let Some(s) = net_holding(cx.service_cidrs, ip) {
            return Some(format!("internal IP {ip} is inside the service CIDR {s}"));
        }
    }
    let strict = cx.strict.iter().map(|o| (o, Holder::Strict));
    let others = cx.other_discovered.iter().map(|o| (o, Holder::OtherSource));
    let same_source = placed.map(|o| (o, Holder::SameSource));
    for (o, what) in strict.chain(others).chain(same_source) {
        if o.name == n.name && what == Holder::SameSource {
            continue;
        }
        if let Some(h) = names(n).find(|h| names(o).any(|x| x == *h)) {
            return Some(format!(
                "the name {h:?} is already the name or a host name of {what} {:?}",
                o.name
            ));
        }
        // A DNS name two discovered Nodes share is ambiguous, not a
        // conflict (the route table routes it to neither); one that a
        // config or API node has is refused, as for internal IPs.
        if what == Holder::Strict {
            let theirs = |h: &str| names(o).any(|x| x == h) || o.dns_names.iter().any(|x| x == h);
            if let Some(h) = n.dns_names.iter().find(|h| theirs(h)) {
                return Some(format!(
                    "the DNS name {h:?} is already a name of {what} {:?}",
                    o.name
                ));
            }
            if let Some(h) = names(n).find(|h| o.dns_names.iter().any(|x| x == h)) {
                return Some(format!(
                    "the name {h:?} is already a DNS name of {what} {:?}",
                    o.name
                ));
            }
        }
        for ip in &n.internal_ips {
            let ip = canonical_ip(*ip);
            if what == Holder::Strict && has_internal_ip(o, ip) {
                return Some(format!("{ip} is an internal IP of {what} {:?}", o.name));
            }
            if let Some(oc) = pod_cidr_holding(o, ip) {
                return Some(format!(
                    "internal IP {ip} is inside pod CIDR {oc} of {what} {:?}",
                    o.name
                ));
            }
        }
        for c in &n.pod_cidrs {
            let c = canonical_net(*c);
            if let Some(oc) = pod_cidr_overlapping(o, c) {
                return Some(format!("pod CIDR {c} overlaps {oc} of {what} {:?}", o.name));
            }
        }
    }
    None
}

/// Admits a source's Nodes into the node set described by `cx`. Never
/// fails as a whole: every Node is either applied, kept at its last good
/// config, or left out, and the report says which and why. The result is
/// the same for the same input, whatever order the candidates come in.
pub fn admit(candidates: Vec<Candidate>, cx: &Context<'_>) -> Admission {
    let mut rejected: Vec<Rejection> = Vec::new();
    // First one of a name wins; a second is a mistake in the source.
    let mut by_name: BTreeMap<String, Result<NodeConfig, String>> = BTreeMap::new();
    let mut twice: HashSet<String> = HashSet::new();
    for c in candidates {
        match by_name.entry(c.name) {
            std::collections::btree_map::Entry::Occupied(e) => {
                twice.insert(e.key().clone());
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(c.node);
            }
        }
    }
    let current: BTreeMap<&str, &NodeConfig> =
        cx.current.iter().map(|n| (n.name.as_str(), n)).collect();
    for name in &twice {
        by_name.insert(
            name.clone(),
            Err(format!("the name {name:?} is listed more than once")),
        );
    }

    // Live nodes keep their reservation while the others are placed.
    let mut placed: BTreeMap<String, NodeConfig> = by_name
        .keys()
        .filter_map(|name| {
            current
                .get(name.as_str())
                .map(|n| (name.clone(), (*n).clone()))
        })
        .collect();

    let mut reject = |name: &str, reason: String, kept: bool| {
        // Both may carry a Node's own text: escaped for logs and status.
        rejected.push(Rejection {
            name: crate::text::escape_control(name).into_owned(),
            reason: crate::text::escape_control(&reason).into_owned(),
            kept,
        })
    };
    // Changed or now-invalid live nodes, in name order.
    for (name, node) in &by_name {
        let Some(cur) = current.get(name.as_str()) else {
            continue;
        };
        match node {
            Ok(n) if n == *cur => {}
            Ok(n) => {
                let why = conflict(n, placed.values().filter(|p| p.name != *name), cx);
                match why {
                    None => {
                        placed.insert(name.clone(), n.clone());
                    }
                    Some(why) => reject(name, why, true),
                }
            }
            Err(why) => reject(name, why.clone(), true),
        }
    }
    // New nodes, in name order.
    for (name, node) in &by_name {
        if current.contains_key(name.as_str()) {
            continue;
        }
        match node {
            Ok(n) => match conflict(n, placed.values(), cx) {
                None => {
                    placed.insert(name.clone(), n.clone());
                }
                Some(why) => reject(name, why, false),
            },
            Err(why) => reject(name, why.clone(), false),
        }
    }
    rejected.sort_by(|a, b| a.name.cmp(&b.name));
    Admission {
        nodes: placed.into_values().collect(),
        rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_node as node;

    fn ok(n: NodeConfig) -> Candidate {
        Candidate {
            name: n.name.clone(),
            node: Ok(n),
        }
    }

    fn cx<'a>(current: &'a [NodeConfig], strict: &'a [NodeConfig]) -> Context<'a> {
        Context {
            current,
            strict,
            other_discovered: &[],
            service_cidrs: &[],
            cluster_cidrs: &[],
        }
    }

    fn names_of(a: &Admission) -> Vec<&str> {
        a.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn shared_addresses_join_and_bad_nodes_are_left_out() {
        let cands = vec![
            ok(node("a", &["10.0.0.1", "203.0.113.9"], &["10.244.1.0/24"])),
            ok(node("b", &["10.0.0.2", "203.0.113.9"], &["10.244.2.0/24"])),
            Candidate {
                name: "bad".into(),
                node: Err("no address".into()),
            },
            ok(node("c", &["10.0.0.3"], &["10.244.2.128/25"])),
        ];
        let a = admit(cands, &cx(&[], &[]));
        assert_eq!(names_of(&a), ["a", "b"]);
        assert_eq!(a.rejected.len(), 2);
        assert_eq!(a.rejected[0].name, "bad");
        assert!(
            a.rejected[1].reason.contains("overlaps 10.244.2.0/24"),
            "{:?}",
            a.rejected
        );
    }

    #[test]
    fn order_of_input_does_not_matter_and_live_nodes_keep_what_they_hold() {
        let x = node("x", &["10.0.0.1"], &["10.244.1.0/24"]);
        let y = node("y", &["10.0.0.2"], &["10.244.1.0/24"]);
        let a1 = admit(vec![ok(x.clone()), ok(y.clone())], &cx(&[], &[]));
        let a2 = admit(vec![ok(y.clone()), ok(x.clone())], &cx(&[], &[]));
        assert_eq!(a1, a2);
        assert_eq!(names_of(&a1), ["x"]);
        // y is live with the range: a newcomer x cannot take it.
        let a3 = admit(
            vec![ok(x), ok(y.clone())],
            &cx(std::slice::from_ref(&y), &[]),
        );
        assert_eq!(names_of(&a3), ["y"]);
    }

    #[test]
    fn a_live_node_that_turns_bad_keeps_its_last_good_config() {
        let good = node("n", &["10.0.0.1"], &["10.244.1.0/24"]);
        let a = admit(
            vec![Candidate {
                name: "n".into(),
                node: Err("pod CIDR 128.0.0.0/1 is loopback".into()),
            }],
            &cx(std::slice::from_ref(&good), &[]),
        );
        assert_eq!(a.nodes, vec![good.clone()]);
        assert!(a.rejected[0].kept);
        // A change that conflicts is kept back the same way.
        let other = node("m", &["10.0.0.2"], &["10.244.2.0/24"]);
        let mut bad = good.clone();
        bad.pod_cidrs = vec!["10.244.2.0/25".parse().unwrap()];
        let a = admit(
            vec![ok(bad), ok(other.clone())],
            &cx(&[good.clone(), other.clone()], &[]),
        );
        assert_eq!(a.nodes, vec![other, good.clone()]);
        assert!(a.rejected[0].kept);
        // Deleted: gone.
        let a = admit(vec![], &cx(std::slice::from_ref(&good), &[]));
        assert!(a.nodes.is_empty());
    }

    #[test]
    fn strict_nodes_share_nothing_and_ssh_addresses_may_be_shared() {
        let st = node("static", &["10.0.0.1"], &[]);
        let a = admit(
            vec![
                ok(node("d1", &["10.0.0.2", "10.0.0.1"], &[])),
                ok(node("static", &["10.0.0.3"], &[])),
                ok(node("d2", &["10.0.0.4"], &[])),
            ],
            &cx(&[], std::slice::from_ref(&st)),
        );
        assert_eq!(names_of(&a), ["d2"]);
        let a = admit(
            vec![
                ok(node("d", &["203.0.113.9", "10.0.0.4"], &[])),
                ok(node("e", &["203.0.113.9", "10.0.0.5"], &[])),
            ],
            &cx(&[], &[]),
        );
        assert_eq!(names_of(&a), ["d", "e"]);
        assert!(a.rejected.is_empty());
    }

    #[test]
    fn an_address_inside_another_nodes_pods_or_the_services_is_refused() {
        let live = node("live", &["10.0.0.1"], &["10.244.1.0/24"]);
        let mut c = cx(std::slice::from_ref(&live), &[]);
        let services = ["10.96.0.0/12".parse().unwrap()];
        c.service_cidrs = &services;
        let a = admit(
            vec![
                ok(live.clone()),
                ok(node("pod-thief", &["10.0.0.2", "10.244.1.7"], &[])),
                ok(node("svc-thief", &["10.0.0.3", "10.96.0.1"], &[])),
            ],
            &c,
        );
        assert_eq!(names_of(&a), ["live"]);
        assert!(
            a.rejected[0]
                .reason
                .contains("inside pod CIDR 10.244.1.0/24"),
            "{:?}",
            a.rejected
        );
        assert!(
            a.rejected[1].reason.contains("inside the service CIDR"),
            "{:?}",
            a.rejected
        );
    }

    #[test]
    fn names_listed_twice_are_rejected() {
        let a = admit(
            vec![
                ok(node("n", &["10.0.0.1"], &[])),
                ok(node("n", &["10.0.0.2"], &[])),
            ],
            &cx(&[], &[]),
        );
        assert!(a.nodes.is_empty());
        assert!(a.rejected[0].reason.contains("more than once"));
    }

    #[test]
    fn a_shared_dns_name_joins_both_unless_a_strict_node_has_it() {
        let mut a = node("a", &["10.0.0.1"], &[]);
        a.dns_names = vec!["lb.example.com".into()];
        let mut b = node("b", &["10.0.0.2"], &[]);
        b.dns_names = vec!["lb.example.com".into(), "s".into()];
        let adm = admit(vec![ok(a.clone()), ok(b.clone())], &cx(&[], &[]));
        assert_eq!(names_of(&adm), ["a", "b"]);
        assert!(adm.rejected.is_empty(), "{adm:?}");
        // A config or API node's name (or DNS name) cannot be shared.
        let mut s = node("s", &["10.0.0.9"], &[]);
        s.dns_names = vec!["strict.example.com".into()];
        let mut c = node("c", &["10.0.0.3"], &[]);
        c.dns_names = vec!["strict.example.com".into()];
        let strict = [s];
        let adm = admit(vec![ok(a), ok(b), ok(c)], &cx(&[], &strict));
        assert_eq!(names_of(&adm), ["a"]);
        let why: Vec<&str> = adm.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert!(
            why[0].contains("\"s\"") && why[0].contains("config or API node"),
            "{why:?}"
        );
        assert!(why[1].contains("strict.example.com"), "{why:?}");
    }
}
