//! Node discovery: a watched `kubectl get nodes -o json` file, and (in
//! `kube_watch`) the Kubernetes API.
//!
//! Every source hands the daemon its whole desired node set, and the daemon
//! reconciles by difference (see `Control::sync_source`). A failing source
//! never tears tunnels down: the last good set stays, the error is shown in
//! the status and metrics, and the source retries. (The old Kubernetes
//! SSHTunneler dropped every tunnel when its node list failed to load.)
//!
//! This is the trust border: a Node object is written by the node itself,
//! so each is validated on its own here ([`candidate_from_value`]) and a
//! bad one becomes a rejected [`Candidate`] instead of failing the list.
//! Only a document that is not a node list at all fails as a whole.

pub(crate) mod kube_watch;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::NodeConfig;
use crate::control::node_set::Candidate;
use crate::control::sources::Source;
use crate::control::Control;
use k8s_openapi::api::core::v1::{Node, NodeAddress};

use crate::config::address::{parse_ssh_address, AddressError, AddressOrigin};
use crate::config::{is_localhost, node_from_spec, normalize_name, valid_node_name, NodeSpec};

/// `kubectl get nodes -o json`: a `List` (or `NodeList`) of `Node`.
#[derive(Debug, Deserialize)]
pub struct K8sNodeList {
    /// `kind`: List or NodeList.
    #[serde(default)]
    pub kind: Option<String>,
    /// The nodes, read one at a time by [`candidate_from_value`].
    pub items: Vec<serde_json::Value>,
}

/// Node annotations in which a CNI publishes the node's own address inside
/// the pod range (its tunnel interface): calico-node writes these for IPIP
/// and VXLAN. A dial to such an address reaches the node's host network,
/// so it is held to the node port policy (see `proxy::route`).
pub const HOST_ADDRESS_ANNOTATIONS: [&str; 3] = [
    "projectcalico.org/IPv4IPIPTunnelAddr",
    "projectcalico.org/IPv4VXLANTunnelAddr",
    "projectcalico.org/IPv6VXLANTunnelAddr",
];

/// Turns one Kubernetes Node into our node config.
///
/// - the SSH address is the first `status.addresses` entry whose type comes
///   first in `address_types`;
/// - every IP-valued address becomes an internal IP (the SSH address first);
/// - a `Hostname` address that differs from the name becomes an extra name;
/// - `InternalDNS` and `ExternalDNS` addresses become DNS names (lowercase,
///   no trailing dot; invalid ones are left out);
/// - the Calico tunnel annotations ([`HOST_ADDRESS_ANNOTATIONS`]) become
///   host addresses;
/// - pod CIDRs come from `spec.podCIDRs`, else `spec.podCIDR`;
/// - the kubelet port comes from `status.daemonEndpoints` (0 is unset).
///
/// The result passes every rule a `[[node]]` table must meet.
pub fn node_from_k8s(
    n: &Node,
    address_types: &[String],
    default_port: u16,
) -> Result<NodeConfig, String> {
    let name = n
        .metadata
        .name
        .clone()
        .ok_or("not a Node object: metadata.name is missing")?;
    let status = n.status.as_ref();
    let addrs: &[NodeAddress] = status
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let address = address_types
        .iter()
        .find_map(|t| addrs.iter().find(|a| &a.type_ == t))
        .map(|a| a.address.clone())
        .ok_or_else(|| {
            format!(
                "no status.addresses entry of type {}",
                address_types.join(" or ")
            )
        })?;
    // An IP-valued address that is not an IP literal is a forged spelling
    // (`127.1`, `0x7f.0.0.1`, `localhost`...): the whole Node is refused,
    // not just that entry, since the node's own writer is not to be trusted.
    for a in addrs {
        if IP_TYPES.contains(&a.type_.as_str()) {
            // The bans on a literal are checked below, naming the field.
            if let Err(e @ AddressError::NotAnIp(_)) =
                parse_ssh_address(&a.address, AddressOrigin::Discovered)
            {
                return Err(format!("Node {name:?}: status.addresses {}: {e}", a.type_));
            }
        }
    }
    let mut internal_ips: Vec<String> = Vec::new();
    if address.parse::<IpAddr>().is_ok() {
        internal_ips.push(address.clone());
    }
    for a in addrs {
        if a.address.parse::<IpAddr>().is_ok() && !internal_ips.contains(&a.address) {
            internal_ips.push(a.address.clone());
        }
    }
    let hostnames: Vec<String> = addrs
        .iter()
        .filter(|a| a.type_ == "Hostname")
        .map(|a| normalize_name(&a.address))
        .filter(|h| *h != name)
        .collect();
    // DNS names are extra routes, never needed to reach the node: one
    // that is not a valid name is left out rather than failing the Node,
    // which was accepted before such names routed.
    let dns_names: Vec<String> = addrs
        .iter()
        .filter(|a| a.type_ == "InternalDNS" || a.type_ == "ExternalDNS")
        .map(|a| normalize_name(&a.address))
        .filter(|h| valid_node_name(h) && !is_localhost(h))
        .collect();
    // Host addresses only ever narrow what a dial may reach, so one that
    // does not parse is simply not known.
    let host_addresses: Vec<String> = n
        .metadata
        .annotations
        .as_ref()
        .map(|a| {
            HOST_ADDRESS_ANNOTATIONS
                .iter()
                .filter_map(|k| a.get(*k))
                .map(|v| v.trim().to_string())
                .filter(|v| v.parse::<IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    let spec = n.spec.as_ref();
    let pod_cidrs = match spec.and_then(|s| s.pod_cidrs.clone()) {
        Some(list) if !list.is_empty() => list,
        _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    let kubelet_port = match status
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .map(|e| e.port)
        .filter(|p| *p != 0)
    {
        None => None,
        Some(p) => Some(u16::try_from(p).map_err(|_| {
            format!(
                "kubelet_port: {p} (status.daemonEndpoints.kubeletEndpoint.Port) is not a TCP port"
            )
        })?),
    };
    let raw = NodeSpec {
        name,
        address,
        port: None,
        internal_ips: (!internal_ips.is_empty()).then_some(internal_ips),
        pod_cidrs,
        hostnames,
        dns_names,
        host_addresses,
        kubelet_port,
    };
    node_from_spec(raw, default_port, AddressOrigin::Discovered).map_err(|e| e.node_reason())
}

/// The `status.addresses` types whose value is an IP address.
const IP_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// Reads one Node object (JSON) through the discovery border: its shape,
/// then every rule a node must meet on its own. Never fails: a Node that
/// does not pass is a [`Candidate`] carrying the reason. `index` names a
/// Node that has no readable name.
pub fn candidate_from_value(
    value: serde_json::Value,
    index: usize,
    address_types: &[String],
    default_port: u16,
) -> Candidate {
    let name = value
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("items[{index}]"));
    let node = serde_json::from_value::<Node>(value)
        .map_err(|e| format!("not a Node object: {e}"))
        .and_then(|n| node_from_k8s(&n, address_types, default_port));
    Candidate { name, node }
}

/// Reads one Node object from the Kubernetes API through the discovery
/// border, as [`candidate_from_value`] does for one from a file.
pub fn candidate_from_node(
    n: &Node,
    index: usize,
    address_types: &[String],
    default_port: u16,
) -> Candidate {
    let name = n
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| format!("items[{index}]"));
    Candidate {
        name,
        node: node_from_k8s(n, address_types, default_port),
    }
}

/// Parses a `kubectl get nodes -o json` document into one candidate per
/// Node. A document that is not a node list fails as a whole (and the
/// caller keeps the last good set); a bad Node only fails itself.
pub fn parse_node_list(
    text: &str,
    address_types: &[String],
    default_port: u16,
) -> Result<Vec<Candidate>, String> {
    let list: K8sNodeList =
        serde_json::from_str(text).map_err(|e| format!("not a kubectl node list: {e}"))?;
    if let Some(kind) = &list.kind {
        if kind != "List" && kind != "NodeList" {
            return Err(format!("kind is {kind:?}, expected List or NodeList"));
        }
    }
    Ok(list
        .items
        .into_iter()
        .enumerate()
        .map(|(i, v)| candidate_from_value(v, i, address_types, default_port))
        .collect())
}

/// A file's identity for change detection: an atomic rename changes the
/// inode, an in-place write changes mtime or size.
fn stamp(path: &Path) -> std::io::Result<(u64, SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((
        m.ino(),
        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        m.len(),
    ))
}

/// How often the nodes file is checked: an atomic replace is picked up
/// within this time, at the cost of one `stat` a poll.
pub const FILE_POLL: Duration = Duration::from_millis(500);

/// Watches `path` and reconciles the daemon's `file` nodes on every change.
/// Polling is deliberate: it sees atomic renames, editors' in-place writes
/// and files on any filesystem, at the cost of one stat per half second.
pub async fn watch_file(
    control: Arc<Control>,
    path: PathBuf,
    address_types: Vec<String>,
    cancel: CancellationToken,
) {
    let source = Source::File;
    let mut last: Option<(u64, SystemTime, u64)> = None;
    let mut failed_stamp: Option<(u64, SystemTime, u64)> = None;
    loop {
        match stamp(&path) {
            Ok(st) if Some(st) != last && Some(st) != failed_stamp => {
                let outcome = match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let port = control.default_ssh_port();
                        match parse_node_list(&text, &address_types, port) {
                            Ok(nodes) => control
                                .sync_source(source, nodes)
                                .await
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(format!("cannot read: {e}")),
                };
                match outcome {
                    Ok(report) => {
                        info!(path = %path.display(), ?report, "nodes file applied");
                        last = Some(st);
                        failed_stamp = None;
                        control.source_ok(source);
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "nodes file rejected; keeping the last good node set");
                        failed_stamp = Some(st);
                        control.source_failed(source, format!("{}: {e}", path.display()));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if failed_stamp.is_some() || last.is_some() || !control.source_has_error(source) {
                    warn!(path = %path.display(), error = %e, "nodes file unreadable; keeping the last good node set");
                }
                failed_stamp = None;
                last = None;
                control.source_failed(source, format!("{}: {e}", path.display()));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(FILE_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types() -> Vec<String> {
        vec!["InternalIP".into(), "ExternalIP".into()]
    }

    const LIST: &str = r#"{
      "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
      "items": [
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": "node-a", "labels": {"x": "y"}},
         "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]},
         "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 10255}},
            "addresses": [
            {"type": "Hostname", "address": "node-a.internal"},
            {"type": "ExternalIP", "address": "203.0.113.5"},
            {"type": "InternalIP", "address": "10.0.0.11"}]}},
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": "node-b"},
         "spec": {"podCIDR": "10.244.2.0/24"},
         "status": {"addresses": [{"type": "ExternalIP", "address": "203.0.113.6"}]}}
      ]}"#;

    #[test]
    fn kubectl_list_parses() {
        let nodes: Vec<NodeConfig> = parse_node_list(LIST, &types(), 22)
            .unwrap()
            .into_iter()
            .map(|c| c.node.unwrap())
            .collect();
        assert_eq!(nodes.len(), 2);
        let a = &nodes[0];
        assert_eq!(a.name, "node-a");
        assert_eq!(a.address, "10.0.0.11", "InternalIP preferred");
        assert_eq!(
            a.internal_ips,
            vec![
                "10.0.0.11".parse::<IpAddr>().unwrap(),
                "203.0.113.5".parse().unwrap()
            ]
        );
        assert_eq!(a.pod_cidrs.len(), 2, "podCIDRs wins over podCIDR");
        assert_eq!(a.hostnames, vec!["node-a.internal".to_string()]);
        assert_eq!(a.kubelet_port, Some(10255));
        let b = &nodes[1];
        assert_eq!(b.address, "203.0.113.6", "falls back to ExternalIP");
        assert_eq!(b.pod_cidrs, vec!["10.244.2.0/24".parse().unwrap()]);
        assert_eq!(b.kubelet_port, None, "no daemonEndpoints: the default");
    }

    #[test]
    fn bad_documents_fail_whole() {
        assert!(parse_node_list("{}", &types(), 22).is_err());
        assert!(parse_node_list("not json", &types(), 22).is_err());
        assert!(parse_node_list(r#"{"kind":"PodList","items":[]}"#, &types(), 22).is_err());
        assert!(parse_node_list(r#"{"kind":"List","items":{}}"#, &types(), 22).is_err());
        assert_eq!(
            parse_node_list(r#"{"kind":"List","items":[]}"#, &types(), 22).unwrap(),
            vec![]
        );
    }

    #[test]
    fn a_bad_node_fails_alone_with_its_name_and_reason() {
        let doc = r#"{"kind":"List","items":[
          {"metadata":{"name":"x"},"status":{"addresses":[{"type":"Hostname","address":"x"}]}},
          {"metadata":{"name":"y"},"spec":{"podCIDR":"nope"},"status":{"addresses":[{"type":"InternalIP","address":"10.0.0.1"}]}},
          {"metadata":{"name":"evil"},"spec":{"podCIDR":"128.0.0.0/1"},"status":{"addresses":[
             {"type":"InternalIP","address":"10.0.0.9"}]}},
          {"metadata":{"name":"lo"},"status":{"addresses":[{"type":"InternalIP","address":"127.0.0.1"}]}},
          {"metadata":{"name":"meta"},"status":{"addresses":[{"type":"InternalIP","address":"10.0.0.8"},
             {"type":"ExternalIP","address":"169.254.169.254"}]}},
          {"kind":"Node"},
          {"metadata":{"name":"short"},"status":{"addresses":[{"type":"InternalIP","address":"127.1"},
             {"type":"InternalIP","address":"10.0.0.7"}]}},
          {"metadata":{"name":"good"},"status":{"addresses":[{"type":"InternalIP","address":"::ffff:10.0.0.2"}]}}
        ]}"#;
        let c = parse_node_list(doc, &types(), 22).unwrap();
        let reason = |i: usize| c[i].node.clone().unwrap_err();
        assert_eq!(c[0].name, "x");
        assert!(
            reason(0).contains("no status.addresses entry"),
            "{}",
            reason(0)
        );
        assert!(reason(1).contains("pod_cidrs[0]"), "{}", reason(1));
        assert!(reason(2).contains("128.0.0.0/1"), "{}", reason(2));
        assert!(reason(3).contains("loopback"), "{}", reason(3));
        assert!(
            reason(4).contains("internal_ips[1]") && reason(4).contains("link-local"),
            "{}",
            reason(4)
        );
        assert_eq!(c[5].name, "items[5]");
        assert!(reason(5).contains("not a Node object"), "{}", reason(5));
        assert!(
            reason(6).contains("Node \"short\"") && reason(6).contains("\"127.1\""),
            "{}",
            reason(6)
        );
        let good = c[7].node.clone().unwrap();
        assert_eq!(good.address, "10.0.0.2", "mapped IPv6 is written as IPv4");
        assert_eq!(
            good.internal_ips,
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn dns_addresses_and_calico_tunnel_annotations_are_read() {
        let doc = r#"{"kind":"List","items":[
          {"metadata":{"name":"ip-10-0-1-2.ec2.internal","annotations":{
              "projectcalico.org/IPv4IPIPTunnelAddr":"10.244.77.0",
              "projectcalico.org/IPv4VXLANTunnelAddr":" 10.244.78.1 ",
              "projectcalico.org/IPv6VXLANTunnelAddr":"not an ip",
              "other.io/addr":"10.244.79.1"}},
           "status":{"addresses":[
             {"type":"InternalIP","address":"10.0.1.2"},
             {"type":"Hostname","address":"Node-3."},
             {"type":"InternalDNS","address":"ip-10-0-1-2.ec2.internal"},
             {"type":"InternalDNS","address":"IP-10-0-1-2.us-east-2.compute.internal."},
             {"type":"ExternalDNS","address":"ec2-3-1-2-3.compute.amazonaws.com"},
             {"type":"ExternalDNS","address":"bad_name.example"},
             {"type":"ExternalDNS","address":"localhost"}]}}
        ]}"#;
        let c = parse_node_list(doc, &types(), 22).unwrap();
        let n = c[0].node.clone().unwrap();
        assert_eq!(n.hostnames, vec!["node-3".to_string()]);
        assert_eq!(
            n.dns_names,
            vec![
                "ip-10-0-1-2.us-east-2.compute.internal".to_string(),
                "ec2-3-1-2-3.compute.amazonaws.com".to_string()
            ],
            "the node name itself and invalid names are left out"
        );
        assert_eq!(
            n.host_addresses,
            vec![
                "10.244.77.0".parse::<IpAddr>().unwrap(),
                "10.244.78.1".parse().unwrap()
            ]
        );
        assert_eq!(n.internal_ips, vec!["10.0.1.2".parse::<IpAddr>().unwrap()]);
    }
}
