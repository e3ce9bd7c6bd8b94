//! The rules that span a node set. Config and API nodes (strict) share
//! nothing with each other ([`check_node_set`]) or with discovered nodes
//! ([`check_strict_against_discovered`]); discovered nodes must keep
//! fitting the `[proxy]` ranges a reload brings ([`check_discovered_fit`]).
//! Discovered nodes among themselves follow softer rules, settled one Node
//! at a time when they are admitted (`control::node_set`). The predicates
//! below are what all of them, and that admission, ask.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::address::{canonical_ip, canonical_net, overlaps};
use super::node::{check_pod_scope, NodeConfig};
use super::{invalid, ConfigError};

/// Checks strict nodes (config and API) against the discovered ones: a
/// strict node may share no name, host name, internal IP or pod range with
/// a discovered node. Discovered nodes among themselves follow softer
/// rules (a shared address is ambiguous, not an error), settled when they
/// are admitted.
pub fn check_strict_against_discovered(
    strict: &[NodeConfig],
    discovered: &[NodeConfig],
) -> Result<(), ConfigError> {
    for (i, n) in strict.iter().enumerate() {
        for d in discovered {
            let names = |x: &NodeConfig| {
                std::iter::once(x.name.clone())
                    .chain(x.hostnames.iter().cloned())
                    .chain(x.dns_names.iter().cloned())
                    .collect::<Vec<_>>()
            };
            let theirs = names(d);
            if let Some(h) = names(n).into_iter().find(|h| theirs.contains(h)) {
                return Err(invalid(
                    format!("node[{i}].name"),
                    format!(
                        "{h:?} is already the name or a host name of discovered node {:?}",
                        d.name
                    ),
                ));
            }
            for ip in &n.internal_ips {
                let ip = canonical_ip(*ip);
                if has_internal_ip(d, ip) {
                    return Err(invalid(
                        format!("node[{i}].internal_ips"),
                        format!(
                            "{ip} is already an internal IP of discovered node {:?}",
                            d.name
                        ),
                    ));
                }
                if let Some(c) = pod_cidr_holding(d, ip) {
                    return Err(invalid(
                        format!("node[{i}].internal_ips"),
                        format!(
                            "{ip} is inside pod CIDR {c} of discovered node {:?}",
                            d.name
                        ),
                    ));
                }
            }
            for ip in &d.internal_ips {
                let ip = canonical_ip(*ip);
                if let Some(c) = pod_cidr_holding(n, ip) {
                    return Err(invalid(
                        format!("node[{i}].pod_cidrs"),
                        format!(
                            "{c} holds {ip}, an internal IP of discovered node {:?}",
                            d.name
                        ),
                    ));
                }
            }
            for c in &n.pod_cidrs {
                let c = canonical_net(*c);
                if let Some(oc) = pod_cidr_overlapping(d, c) {
                    return Err(invalid(
                        format!("node[{i}].pod_cidrs"),
                        format!("{c} overlaps {oc} of discovered node {:?}", d.name),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks the rules that span nodes: unique names, each internal IP owned by
/// one node, pod CIDRs that do not overlap each other or the service CIDRs.
/// Shared by config validation and, later, by runtime node changes.
pub fn check_node_set(nodes: &[NodeConfig], service_cidrs: &[IpNet]) -> Result<(), ConfigError> {
    check_unique_names(nodes)?;
    let mut ips: HashMap<IpAddr, &str> = HashMap::new();
    let mut cidrs: Vec<(IpNet, &str)> = Vec::new();
    // A node address wins over pod and service routes, so one inside
    // another node's pod CIDR or a service CIDR would take those over.
    for (i, n) in nodes.iter().enumerate() {
        for ip in &n.internal_ips {
            let ip = canonical_ip(*ip);
            if let Some(s) = net_holding(service_cidrs, ip) {
                return Err(invalid(
                    format!("node[{i}].internal_ips"),
                    format!("{ip} is inside the service CIDR {s}"),
                ));
            }
            for o in nodes.iter().filter(|o| o.name != n.name) {
                if let Some(c) = pod_cidr_holding(o, ip) {
                    return Err(invalid(
                        format!("node[{i}].internal_ips"),
                        format!("{ip} is inside pod CIDR {c} of node {:?}", o.name),
                    ));
                }
            }
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        for ip in &n.internal_ips {
            // Compared in canonical form: `::ffff:10.0.0.11` is 10.0.0.11.
            let ip = canonical_ip(*ip);
            if let Some(other) = ips.insert(ip, &n.name) {
                return Err(invalid(
                    format!("node[{i}].internal_ips"),
                    format!("{ip} is already an internal IP of node {other:?}"),
                ));
            }
        }
        for c in &n.pod_cidrs {
            let c = &canonical_net(*c);
            for (oc, owner) in &cidrs {
                if overlaps(*oc, *c) {
                    return Err(invalid(
                        format!("node[{i}].pod_cidrs"),
                        format!("{c} overlaps {oc} of node {owner:?}"),
                    ));
                }
            }
            if let Some(s) = net_overlapping(service_cidrs, *c) {
                return Err(invalid(
                    format!("node[{i}].pod_cidrs"),
                    format!("{c} overlaps the service CIDR {s}"),
                ));
            }
            cidrs.push((*c, &n.name));
        }
    }
    Ok(())
}

/// Node names, host names and DNS names: each belongs to one node.
fn check_unique_names(nodes: &[NodeConfig]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for (i, n) in nodes.iter().enumerate() {
        if !names.insert(n.name.as_str()) {
            return Err(invalid(
                format!("node[{i}].name"),
                format!("duplicate node name {:?}", n.name),
            ));
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        for h in &n.hostnames {
            if !names.insert(h.as_str()) {
                return Err(invalid(
                    format!("node[{i}].hostnames"),
                    format!("{h:?} is already the name or a host name of another node"),
                ));
            }
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        for h in &n.dns_names {
            if !names.insert(h.as_str()) {
                return Err(invalid(
                    format!("node[{i}].dns_names"),
                    format!("{h:?} is already a name, host name or DNS name of another node"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks nodes a discovery source admitted against new `[proxy]` ranges
/// (a reload): each must still fit `cluster_cidrs`, and no pod CIDR or
/// internal IP of one may lie in a service CIDR. The error names the
/// service CIDRs: that is what the reload changed.
pub fn check_discovered_fit(
    discovered: &[NodeConfig],
    service_cidrs: &[IpNet],
    cluster_cidrs: &[IpNet],
) -> Result<(), ConfigError> {
    for d in discovered {
        let key = format!("discovered node {:?}", d.name);
        check_pod_scope(&key, d, cluster_cidrs)?;
        if let Some(c) = d
            .pod_cidrs
            .iter()
            .find(|c| net_overlapping(service_cidrs, **c).is_some())
        {
            return Err(invalid(
                "proxy.service_cidrs",
                format!("overlaps the pod CIDR {c} of discovered node {:?}", d.name),
            ));
        }
        if let Some(ip) = d
            .internal_ips
            .iter()
            .find(|ip| net_holding(service_cidrs, **ip).is_some())
        {
            return Err(invalid(
                "proxy.service_cidrs",
                format!("holds {ip}, an internal IP of discovered node {:?}", d.name),
            ));
        }
    }
    Ok(())
}

/// The first of `nets` that holds `ip`, as given (no canonical form).
pub(crate) fn net_holding(nets: &[IpNet], ip: IpAddr) -> Option<&IpNet> {
    nets.iter().find(|s| s.contains(&ip))
}

/// The first of `nets` that overlaps `net`, as given.
pub(crate) fn net_overlapping(nets: &[IpNet], net: IpNet) -> Option<&IpNet> {
    nets.iter().find(|s| overlaps(**s, net))
}

/// The pod CIDR of `node` that holds `ip`, compared in canonical form and
/// returned as the node lists it.
pub(crate) fn pod_cidr_holding(node: &NodeConfig, ip: IpAddr) -> Option<&IpNet> {
    node.pod_cidrs
        .iter()
        .find(|c| canonical_net(**c).contains(&ip))
}

/// The pod CIDR of `node`, in canonical form, that overlaps `net`.
pub(crate) fn pod_cidr_overlapping(node: &NodeConfig, net: IpNet) -> Option<IpNet> {
    node.pod_cidrs
        .iter()
        .map(|c| canonical_net(*c))
        .find(|oc| overlaps(net, *oc))
}

/// Whether `ip` (canonical) is an internal IP of `node`, compared in
/// canonical form: `::ffff:10.0.0.11` is 10.0.0.11.
pub(crate) fn has_internal_ip(node: &NodeConfig, ip: IpAddr) -> bool {
    node.internal_ips.iter().any(|o| canonical_ip(*o) == ip)
}
