//! The route table: which tunnel carries a CONNECT target.
//!
//! The table is immutable. A change to the node set builds a new table and
//! swaps it in atomically (`ArcSwap`), so every lookup is lock-free and sees
//! one consistent node set. Lookups cost one hash probe for names and
//! node IPs, and one hash probe per distinct pod-CIDR prefix length
//! (longest first) for pod IPs, independent of the number of nodes.
//!
//! Rules, first match wins:
//! 1. a node name, or an IP in a node's `internal_ips` → that node (for a
//!    name, the channel target is the node's first internal IP, since the
//!    node's sshd cannot resolve cluster names);
//! 2. an IP inside a node's `pod_cidrs` → that node (longest prefix wins);
//! 3. an IP inside `service_cidrs` → the pool of all nodes;
//! 4. an IP inside `pod_network_cidrs` (pods whose addresses no Node object
//!    assigns: Calico blocks, Cilium cluster-pool, a VPC's subnets) → the
//!    pool too: such a network is routable from every node;
//! 5. anything else → forbidden. This is not an open proxy.
//!
//! Names are every name a Node answers to (its name, `Hostname`,
//! `InternalDNS`, `ExternalDNS`), compared without ASCII case and without a
//! trailing dot; a name two nodes claim routes to neither, as an address
//! does.
//!
//! A CNI puts some of the node's own host addresses inside the pod range
//! (Calico's tunnel address). Those route as their range says, but a dial
//! to one is held to the node port policy of the node that names it,
//! whichever node carries it: otherwise the pod network would be a path
//! to any node's sshd.
//!
//! An internal IP that two or more nodes claim (discovered Nodes behind one
//! NAT address, or a forged Node naming another's address) is ambiguous:
//! it is routed by IP for none of them and answers forbidden, whatever
//! order the nodes come in. The nodes still route by name and pod CIDR.
//! A pod CIDR listed by two nodes is dropped the same way (admission
//! refuses overlaps, so this is a backstop, not a policy).
//! A dial to a node's own address (rule 1) is further limited by port
//! ([`NodePorts`]): such a dial lands on the node's host network, beside its
//! sshd, its etcd peer port or whatever else listens there, so only the
//! kubelet and the ports the operator listed are reachable. Pod and service
//! addresses keep every port: they belong to workloads, except the few
//! addresses of a pod CIDR that a CNI gives the node itself
//! ([`pod_host_address`]): a `cni0` bridge `.1` or a `flannel.1` `.0`
//! reaches the node's host network just as its InternalIP does.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::address::{canonical_ip, canonical_net};
use crate::config::{normalize_name, NodeConfig};

/// Where a target goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route<T> {
    /// Through this node, to `host` on the node's side.
    Node {
        /// The node's payload (its tunnel in the daemon).
        node: T,
        /// The host to put in the direct-tcpip request.
        host: String,
        /// True when the target is the node itself (its name or one of its
        /// internal IPs), not a pod on it.
        node_local: bool,
    },
    /// Through any healthy node (service CIDRs), to `host`.
    Pool {
        /// The host to put in the direct-tcpip request.
        host: String,
    },
    /// Not an allowed destination.
    Forbidden,
}

/// What a pool target is, for the route kind and for messages: an address
/// in a service CIDR (or a name), or a pod address no node claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// A pod address outside every node's pod CIDRs.
    Pod,
    /// A service address, or anything that is not an IP literal.
    Service,
}

impl std::fmt::Display for PoolKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolKind::Pod => "pod address",
            PoolKind::Service => "service address",
        })
    }
}

/// The kubelet's port when the Node does not say (Kubernetes' default).
pub const DEFAULT_KUBELET_PORT: u16 = 10250;

/// Which ports a dial to a node's own address (its name, a host name or an
/// internal IP) may use: the node's kubelet port and the operator's
/// `node_ports`. The node's SSH port is refused unless `node_ports` lists it,
/// also when a Node object claims it as its kubelet port: a tunnel back into
/// the node's own sshd would reach a login service with our identity's
/// source address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePorts {
    /// Ports allowed on every node besides its kubelet port.
    pub extra: Vec<u16>,
}

/// Why a dial to a node's own address was refused by port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodePortDenied {
    /// The port is the node's SSH port and `node_ports` does not list it.
    #[error("port {port} is the SSH port of node {node:?}; its addresses allow {allowed}; list {port} in proxy.node_ports to allow it")]
    SshPort {
        /// The refused port.
        port: u16,
        /// The node.
        node: String,
        /// The allowed ports, as text.
        allowed: String,
    },
    /// Neither the kubelet port nor listed in `node_ports`.
    #[error("port {port} is not allowed on node {node:?}; its addresses allow {allowed} (the kubelet and proxy.node_ports); list {port} in proxy.node_ports to allow it")]
    NotListed {
        /// The refused port.
        port: u16,
        /// The node.
        node: String,
        /// The allowed ports, as text.
        allowed: String,
    },
}

impl NodePorts {
    /// Allows `port` on `node`'s own addresses, or says why not.
    pub fn check(&self, node: &NodeConfig, port: u16) -> Result<(), NodePortDenied> {
        let kubelet = node.kubelet_port.unwrap_or(DEFAULT_KUBELET_PORT);
        if self.extra.contains(&port) {
            return Ok(());
        }
        if port != node.port && port == kubelet {
            return Ok(());
        }
        let allowed = self.describe(node);
        if port == node.port {
            Err(NodePortDenied::SshPort {
                port,
                node: node.name.clone(),
                allowed,
            })
        } else {
            Err(NodePortDenied::NotListed {
                port,
                node: node.name.clone(),
                allowed,
            })
        }
    }

    /// The allowed ports of `node`, e.g. `only 10250 (kubelet), 10255`.
    fn describe(&self, node: &NodeConfig) -> String {
        let kubelet = node.kubelet_port.unwrap_or(DEFAULT_KUBELET_PORT);
        let mut parts = Vec::new();
        if kubelet != node.port {
            parts.push(format!("{kubelet} (kubelet)"));
        }
        parts.extend(
            self.extra
                .iter()
                .filter(|p| **p != kubelet)
                .map(|p| p.to_string()),
        );
        if parts.is_empty() {
            "no port".to_string()
        } else {
            format!("only {}", parts.join(", "))
        }
    }
}

/// Whether `ip` is one of `node`'s own host-network addresses inside one of
/// its pod CIDRs: the address at one of `offsets` from the CIDR's network
/// address (0 the network address itself, 1 the first host address). A
/// CNI that puts a bridge or tunnel device on the node takes such an
/// address (see SECURITY.md for which), and a dial there lands on the node's
/// host network, beside its sshd, exactly as a dial to its InternalIP does.
pub fn pod_host_address(node: &NodeConfig, ip: IpAddr, offsets: &[u32]) -> bool {
    let ip = canonical_ip(ip);
    node.pod_cidrs.iter().any(|c| {
        let c = canonical_net(*c);
        if !c.contains(&ip) {
            return false;
        }
        let offset = match (c.network(), ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(u32::from(a) - u32::from(n)),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) - u128::from(n),
            _ => return false,
        };
        offsets.iter().any(|o| u128::from(*o) == offset)
    })
}

/// An immutable routing snapshot.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    nodes: Vec<T>,
    by_name: HashMap<String, (usize, IpAddr)>,
    by_ip: HashMap<IpAddr, usize>,
    /// Internal IPs claimed by more than one node, with the claimants.
    ambiguous: BTreeMap<IpAddr, Vec<String>>,
    /// (prefix length, network bits → node index), longest prefix first.
    pods_v4: Vec<(u8, HashMap<u32, usize>)>,
    pods_v6: Vec<(u8, HashMap<u128, usize>)>,
    services: Vec<IpNet>,
    /// Names (normalized) claimed by more than one node, with the claimants.
    ambiguous_names: BTreeMap<String, Vec<String>>,
    /// Pod networks routable from every node (`proxy.pod_network_cidrs`).
    pod_networks: Vec<IpNet>,
    /// Host addresses inside the pod range, with every node that names the
    /// address as its own: the node port policy of each applies.
    host_owners: HashMap<IpAddr, Vec<NodeConfig>>,
}

/// Why a target is not routed, for the refusal's text: each says which
/// setting or object decides it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotRouted {
    /// An address that several nodes claim as their own.
    #[error("{address} is claimed by nodes {}, so it routes to none of them; fix the Node objects", .nodes.join(", "))]
    AmbiguousAddress {
        /// The address.
        address: IpAddr,
        /// The claimants.
        nodes: Vec<String>,
    },
    /// A name that several nodes claim (a shared DNS name).
    #[error("{name:?} is a name of nodes {}, so it routes to none of them; use a node address", .nodes.join(", "))]
    AmbiguousName {
        /// The name (normalized).
        name: String,
        /// The claimants.
        nodes: Vec<String>,
    },
    /// A name that is no node's name or address name.
    #[error("{name:?} is not the name, Hostname, InternalDNS or ExternalDNS of any node (other names are not resolved)")]
    UnknownName {
        /// The name (normalized).
        name: String,
    },
    /// An address in no node's addresses or pod CIDRs and in no range.
    #[error("{address} is not a node, pod or service address: it is in no node's addresses or pod CIDRs, nor in proxy.pod_network_cidrs or proxy.service_cidrs")]
    OutsideRanges {
        /// The address.
        address: IpAddr,
    },
}

fn mask_v4(ip: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        ip & (u32::MAX << (32 - len as u32))
    }
}

fn mask_v6(ip: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        ip & (u128::MAX << (128 - len as u32))
    }
}

impl<T: Clone> RouteTable<T> {
    /// Builds a table from `(config, payload)` pairs. Addresses and CIDRs
    /// are compared in canonical form (IPv4-mapped IPv6 is IPv4). An
    /// internal IP or pod CIDR that several nodes claim routes to none of
    /// them; for names (unique once validated) the first node wins.
    pub fn build<'a>(
        nodes: impl IntoIterator<Item = (&'a NodeConfig, T)>,
        services: &[IpNet],
    ) -> RouteTable<T> {
        let nodes: Vec<(&NodeConfig, T)> = nodes.into_iter().collect();
        let mut claims: BTreeMap<IpAddr, BTreeSet<&str>> = BTreeMap::new();
        let mut pod_claims: HashMap<IpNet, HashSet<&str>> = HashMap::new();
        for (cfg, _) in &nodes {
            for ip in &cfg.internal_ips {
                claims
                    .entry(canonical_ip(*ip))
                    .or_default()
                    .insert(&cfg.name);
            }
            for c in &cfg.pod_cidrs {
                pod_claims
                    .entry(canonical_net(*c))
                    .or_default()
                    .insert(&cfg.name);
            }
        }
        let ambiguous: BTreeMap<IpAddr, Vec<String>> = claims
            .into_iter()
            .filter(|(_, who)| who.len() > 1)
            .map(|(ip, who)| (ip, who.into_iter().map(str::to_string).collect()))
            .collect();
        // Every name a node answers to, compared as DNS compares them. One
        // that two nodes claim is ambiguous whichever order they come in,
        // as for addresses.
        let mut name_claims: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        let mut host_owners: HashMap<IpAddr, Vec<NodeConfig>> = HashMap::new();
        for (cfg, _) in &nodes {
            for name in node_names(cfg) {
                name_claims
                    .entry(normalize_name(name))
                    .or_default()
                    .insert(&cfg.name);
            }
            for ip in &cfg.host_addresses {
                let owners = host_owners.entry(canonical_ip(*ip)).or_default();
                if !owners.iter().any(|o| o.name == cfg.name) {
                    owners.push((*cfg).clone());
                }
            }
        }
        let ambiguous_names: BTreeMap<String, Vec<String>> = name_claims
            .into_iter()
            .filter(|(_, who)| who.len() > 1)
            .map(|(n, who)| (n, who.into_iter().map(str::to_string).collect()))
            .collect();
        let mut t = RouteTable {
            nodes: Vec::new(),
            by_name: HashMap::new(),
            by_ip: HashMap::new(),
            ambiguous,
            pods_v4: Vec::new(),
            pods_v6: Vec::new(),
            services: services.to_vec(),
            ambiguous_names,
            pod_networks: Vec::new(),
            host_owners,
        };
        let mut v4: HashMap<u8, HashMap<u32, usize>> = HashMap::new();
        let mut v6: HashMap<u8, HashMap<u128, usize>> = HashMap::new();
        for (cfg, payload) in nodes {
            let idx = t.nodes.len();
            t.nodes.push(payload);
            if let Some(first) = cfg.internal_ips.first() {
                let first = canonical_ip(*first);
                for name in node_names(cfg) {
                    let name = normalize_name(name);
                    if !t.ambiguous_names.contains_key(&name) {
                        t.by_name.entry(name).or_insert((idx, first));
                    }
                }
            }
            for ip in &cfg.internal_ips {
                let ip = canonical_ip(*ip);
                if !t.ambiguous.contains_key(&ip) {
                    t.by_ip.entry(ip).or_insert(idx);
                }
            }
            for c in &cfg.pod_cidrs {
                let c = canonical_net(*c);
                if pod_claims.get(&c).is_some_and(|who| who.len() > 1) {
                    continue;
                }
                match c {
                    IpNet::V4(n) => {
                        let len = n.prefix_len();
                        v4.entry(len)
                            .or_default()
                            .entry(mask_v4(u32::from(n.network()), len))
                            .or_insert(idx);
                    }
                    IpNet::V6(n) => {
                        let len = n.prefix_len();
                        v6.entry(len)
                            .or_default()
                            .entry(mask_v6(u128::from(n.network()), len))
                            .or_insert(idx);
                    }
                }
            }
        }
        t.pods_v4 = v4.into_iter().collect();
        t.pods_v4.sort_by_key(|e| std::cmp::Reverse(e.0));
        t.pods_v6 = v6.into_iter().collect();
        t.pods_v6.sort_by_key(|e| std::cmp::Reverse(e.0));
        t
    }

    /// The same table with `nets` as pod networks routable from every node
    /// (`proxy.pod_network_cidrs`): an address inside one that no node's
    /// pod CIDR claims goes to the pool. A node's own address or pod CIDR
    /// still wins, so a claimed address keeps going to its owner.
    pub fn with_pod_networks(mut self, nets: &[IpNet]) -> RouteTable<T> {
        self.pod_networks = nets.iter().map(|n| canonical_net(*n)).collect();
        self
    }

    /// Names that more than one node claims, each with the names of its
    /// claimants (sorted). They answer forbidden.
    pub fn ambiguous_names(&self) -> &BTreeMap<String, Vec<String>> {
        &self.ambiguous_names
    }

    /// Why `host` is not routed (call it for a [`Route::Forbidden`]).
    pub fn not_routed(&self, host: &str) -> NotRouted {
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = canonical_ip(ip);
                match self.ambiguous.get(&ip) {
                    Some(who) => NotRouted::AmbiguousAddress {
                        address: ip,
                        nodes: who.clone(),
                    },
                    None => NotRouted::OutsideRanges { address: ip },
                }
            }
            Err(_) => {
                let name = normalize_name(host);
                match self.ambiguous_names.get(&name) {
                    Some(who) => NotRouted::AmbiguousName {
                        name,
                        nodes: who.clone(),
                    },
                    None => NotRouted::UnknownName { name },
                }
            }
        }
    }

    /// Holds a dial to a node's own host address inside the pod range (a
    /// CNI tunnel address, see [`NodeConfig::host_addresses`]) to the node
    /// port policy of every node that names it, whichever node carries the
    /// dial: such an address is that node's host network, beside its sshd.
    /// Other targets pass.
    pub fn check_host_address(
        &self,
        host: &str,
        port: u16,
        ports: &NodePorts,
    ) -> Result<(), NodePortDenied> {
        let Ok(ip) = host.parse::<IpAddr>() else {
            return Ok(());
        };
        match self.host_owners.get(&canonical_ip(ip)) {
            None => Ok(()),
            Some(owners) => owners.iter().try_for_each(|o| ports.check(o, port)),
        }
    }

    /// What a pool target is: a service address inside a service CIDR
    /// (or not an IP literal at all), else a pod address.
    pub fn pool_kind(&self, host: &str) -> PoolKind {
        match host.parse::<IpAddr>() {
            Ok(ip) if !self.services.iter().any(|s| s.contains(&canonical_ip(ip))) => PoolKind::Pod,
            _ => PoolKind::Service,
        }
    }

    /// An empty table (no nodes, no services): everything is forbidden.
    pub fn empty() -> RouteTable<T> {
        RouteTable::build(std::iter::empty(), &[])
    }

    /// Internal IPs that more than one node claims, each with the names of
    /// its claimants (sorted). They answer forbidden.
    pub fn ambiguous(&self) -> &BTreeMap<IpAddr, Vec<String>> {
        &self.ambiguous
    }

    /// Every node, for pool selection.
    pub fn nodes(&self) -> &[T] {
        &self.nodes
    }

    /// Routes a CONNECT host (an IP literal without brackets, or a name).
    pub fn lookup(&self, host: &str) -> Route<T> {
        let Ok(ip) = host.parse::<IpAddr>() else {
            return match self.by_name.get(&normalize_name(host)) {
                Some((idx, first)) => Route::Node {
                    node: self.nodes[*idx].clone(),
                    host: first.to_string(),
                    node_local: true,
                },
                None => Route::Forbidden,
            };
        };
        let ip = canonical_ip(ip);
        let host = ip.to_string();
        if self.ambiguous.contains_key(&ip) {
            return Route::Forbidden;
        }
        if let Some(idx) = self.by_ip.get(&ip) {
            return Route::Node {
                node: self.nodes[*idx].clone(),
                host,
                node_local: true,
            };
        }
        let pod = match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                self.pods_v4
                    .iter()
                    .find_map(|(len, m)| m.get(&mask_v4(bits, *len)))
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                self.pods_v6
                    .iter()
                    .find_map(|(len, m)| m.get(&mask_v6(bits, *len)))
            }
        };
        if let Some(idx) = pod {
            return Route::Node {
                node: self.nodes[*idx].clone(),
                host,
                node_local: false,
            };
        }
        if self.services.iter().any(|s| s.contains(&ip)) {
            return Route::Pool { host };
        }
        if self.pod_networks.iter().any(|s| s.contains(&ip)) {
            return Route::Pool { host };
        }
        Route::Forbidden
    }
}

/// Every name `cfg` answers to: its name, host names and DNS names.
fn node_names(cfg: &NodeConfig) -> impl Iterator<Item = &String> {
    std::iter::once(&cfg.name)
        .chain(&cfg.hostnames)
        .chain(&cfg.dns_names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_node as node;

    #[test]
    fn node_ports_allow_the_kubelet_and_the_list_never_ssh_by_default() {
        let mut n = node("node-1", &["10.0.0.11"], &[]);
        let none = NodePorts::default();
        assert_eq!(none.check(&n, 10250), Ok(()));
        let err = none.check(&n, 22).unwrap_err();
        assert!(matches!(err, NodePortDenied::SshPort { port: 22, .. }));
        assert!(err.to_string().contains("10250 (kubelet)"), "{err}");
        assert!(matches!(
            none.check(&n, 10255),
            Err(NodePortDenied::NotListed { port: 10255, .. })
        ));
        // The Node's own kubelet port replaces the default.
        n.kubelet_port = Some(10260);
        assert_eq!(none.check(&n, 10260), Ok(()));
        assert!(none.check(&n, 10250).is_err());
        // A Node that claims its SSH port as kubelet port gets nothing.
        n.kubelet_port = Some(22);
        let err = none.check(&n, 22).unwrap_err();
        assert!(matches!(err, NodePortDenied::SshPort { .. }));
        assert!(err.to_string().contains("allow no port"), "{err}");
        // Listed ports pass, the SSH port too when the operator lists it.
        let listed = NodePorts {
            extra: vec![22, 10255],
        };
        n.kubelet_port = None;
        assert_eq!(listed.check(&n, 22), Ok(()));
        assert_eq!(listed.check(&n, 10255), Ok(()));
        assert_eq!(listed.check(&n, 10250), Ok(()));
        assert!(listed.check(&n, 2379).is_err());
        // The message lists each allowed port once, the kubelet first.
        let listed = NodePorts {
            extra: vec![10250, 10255],
        };
        assert_eq!(
            listed.check(&n, 2379).unwrap_err().to_string(),
            "port 2379 is not allowed on node \"node-1\"; its addresses allow \
             only 10250 (kubelet), 10255 (the kubelet and proxy.node_ports); \
             list 2379 in proxy.node_ports to allow it"
        );
    }

    #[test]
    fn the_first_addresses_of_a_pod_cidr_are_the_node_s_own() {
        let n = node("node-1", &["10.0.0.11"], &["10.244.1.0/24", "fd10:1::/64"]);
        let at = |s: &str, o: &[u32]| pod_host_address(&n, s.parse().unwrap(), o);
        for host in [
            "10.244.1.0",
            "10.244.1.1",
            "::ffff:10.244.1.1",
            "fd10:1::",
            "fd10:1::1",
        ] {
            assert!(at(host, &[0, 1]), "{host}");
        }
        for pod in [
            "10.244.1.5",
            "10.244.1.255",
            "fd10:1::5",
            "10.244.2.1",
            "10.0.0.11",
        ] {
            assert!(!at(pod, &[0, 1]), "{pod}");
        }
        assert!(at("10.244.1.5", &[5]));
        assert!(!at("10.244.1.1", &[]));
    }

    fn table() -> RouteTable<String> {
        let nodes = [
            node(
                "node-1",
                &["10.0.0.11", "fd00::11"],
                &["10.244.1.0/24", "fd10:1::/64"],
            ),
            node("node-2", &["10.0.0.12"], &["10.244.0.0/16"]),
            node("node-3", &["10.0.0.13"], &["10.244.3.128/25"]),
        ];
        RouteTable::build(
            nodes.iter().map(|n| (n, n.name.clone())),
            &[
                "10.96.0.0/12".parse().unwrap(),
                "fd20::/108".parse().unwrap(),
            ],
        )
    }

    fn to(node: &str, host: &str) -> Route<String> {
        let node_local = !host.starts_with("10.244.") && !host.starts_with("fd10:");
        Route::Node {
            node: node.into(),
            host: host.into(),
            node_local,
        }
    }

    #[test]
    fn a_pod_cidr_listed_by_two_nodes_routes_to_neither() {
        // Admission refuses overlaps; the table still must not let input
        // order pick a winner if one ever slips through.
        let nodes = [
            node("a", &["10.0.0.1"], &["10.244.5.0/24"]),
            node("b", &["10.0.0.2"], &["10.244.5.0/24", "10.244.6.0/24"]),
        ];
        for order in [[&nodes[0], &nodes[1]], [&nodes[1], &nodes[0]]] {
            let t = RouteTable::build(order.into_iter().map(|n| (n, n.name.clone())), &[]);
            assert_eq!(t.lookup("10.244.5.9"), Route::Forbidden);
            assert_eq!(t.lookup("10.244.6.9"), to("b", "10.244.6.9"));
            assert_eq!(t.lookup("10.0.0.1"), to("a", "10.0.0.1"));
        }
    }

    #[test]
    fn names_and_node_ips() {
        let t = table();
        assert_eq!(t.lookup("node-1"), to("node-1", "10.0.0.11"));
        assert_eq!(t.lookup("NODE-2"), to("node-2", "10.0.0.12"));
        assert_eq!(t.lookup("10.0.0.13"), to("node-3", "10.0.0.13"));
        assert_eq!(t.lookup("fd00::11"), to("node-1", "fd00::11"));
        assert_eq!(t.lookup("::ffff:10.0.0.12"), to("node-2", "10.0.0.12"));
    }

    #[test]
    fn pods_longest_prefix_wins() {
        let t = table();
        assert_eq!(t.lookup("10.244.1.7"), to("node-1", "10.244.1.7"));
        assert_eq!(t.lookup("10.244.3.200"), to("node-3", "10.244.3.200"));
        assert_eq!(t.lookup("10.244.3.5"), to("node-2", "10.244.3.5"));
        assert_eq!(t.lookup("10.244.99.1"), to("node-2", "10.244.99.1"));
        assert_eq!(t.lookup("fd10:1::5"), to("node-1", "fd10:1::5"));
    }

    #[test]
    fn services_pool_and_forbidden() {
        let t = table();
        assert_eq!(
            t.lookup("10.96.0.1"),
            Route::Pool {
                host: "10.96.0.1".into()
            }
        );
        assert_eq!(
            t.lookup("fd20::a"),
            Route::Pool {
                host: "fd20::a".into()
            }
        );
        assert_eq!(t.lookup("10.112.0.1"), Route::Forbidden);
        assert_eq!(t.lookup("8.8.8.8"), Route::Forbidden);
        assert_eq!(t.lookup("example.com"), Route::Forbidden);
        assert_eq!(t.lookup("localhost"), Route::Forbidden);
        assert_eq!(t.lookup("127.0.0.1"), Route::Forbidden);
        assert_eq!(t.lookup(""), Route::Forbidden);
        assert_eq!(
            RouteTable::<String>::empty().lookup("10.0.0.11"),
            Route::Forbidden
        );
    }

    #[test]
    fn a_shared_address_routes_to_nobody_whatever_the_order() {
        let a = node("a", &["10.0.0.1", "203.0.113.9"], &["10.244.1.0/24"]);
        let b = node("b", &["10.0.0.2", "::ffff:203.0.113.9"], &["10.244.2.0/24"]);
        for order in [[&a, &b], [&b, &a]] {
            let t = RouteTable::build(order.into_iter().map(|n| (n, n.name.clone())), &[]);
            assert_eq!(t.lookup("203.0.113.9"), Route::Forbidden);
            assert_eq!(t.lookup("::ffff:203.0.113.9"), Route::Forbidden);
            assert_eq!(t.lookup("a"), to("a", "10.0.0.1"));
            assert_eq!(t.lookup("10.0.0.2"), to("b", "10.0.0.2"));
            assert_eq!(t.lookup("10.244.2.5"), to("b", "10.244.2.5"));
            let amb: Vec<_> = t.ambiguous().iter().collect();
            assert_eq!(
                amb,
                [(
                    &"203.0.113.9".parse::<IpAddr>().unwrap(),
                    &vec!["a".to_string(), "b".to_string()]
                )]
            );
        }
    }

    #[test]
    fn matches_a_brute_force_scan() {
        // Deterministic pseudo-random addresses compared against a linear
        // longest-prefix scan over the configured CIDRs.
        let nodes = [
            node("a", &["10.0.0.1"], &["10.244.0.0/16", "10.245.0.0/24"]),
            node("b", &["10.0.0.2"], &["10.244.7.0/24"]),
            node("c", &["10.0.0.3"], &["10.244.7.64/26", "10.246.0.0/15"]),
        ];
        let t = RouteTable::build(nodes.iter().map(|n| (n, n.name.clone())), &[]);
        let mut x: u32 = 0x0af4_0000;
        for _ in 0..20000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let ip = std::net::Ipv4Addr::from(0x0af4_0000 | (x & 0x0003_ffff));
            let ipa = IpAddr::V4(ip);
            let mut best: Option<(u8, &str)> = None;
            for n in &nodes {
                for c in &n.pod_cidrs {
                    if c.contains(&ipa) && best.is_none_or(|(l, _)| c.prefix_len() > l) {
                        best = Some((c.prefix_len(), &n.name));
                    }
                }
            }
            let expect = match best {
                Some((_, name)) => Route::Node {
                    node: name.to_string(),
                    host: ip.to_string(),
                    node_local: false,
                },
                None => Route::Forbidden,
            };
            assert_eq!(t.lookup(&ip.to_string()), expect, "{ip}");
        }
    }

    #[test]
    fn nodes_lists_every_payload_in_order() {
        let t = table();
        assert_eq!(t.nodes(), ["node-1", "node-2", "node-3"]);
        assert!(RouteTable::<String>::empty().nodes().is_empty());
    }

    #[test]
    fn masks_keep_exactly_the_prefix_bits() {
        assert_eq!(mask_v4(0xffff_ffff, 0), 0);
        assert_eq!(mask_v4(0x0af4_07c9, 24), 0x0af4_0700);
        assert_eq!(mask_v4(0x0af4_07c9, 1), 0);
        assert_eq!(mask_v4(0x8af4_07c9, 1), 0x8000_0000);
        assert_eq!(mask_v4(0x0af4_07c9, 32), 0x0af4_07c9);
        assert_eq!(mask_v6(u128::MAX, 0), 0);
        assert_eq!(mask_v6(u128::MAX, 64), u128::MAX << 64);
        assert_eq!(mask_v6(u128::MAX, 128), u128::MAX);
        assert_eq!(mask_v6(1 << 127 | 5, 1), 1 << 127);
    }

    #[test]
    fn a_zero_length_pod_cidr_catches_every_address_of_its_family() {
        // Config validation refuses /0, but the table must not panic on it
        // (a shift by the full width) nor let it leak into the other family.
        let nodes = [node("wide", &["10.0.0.1"], &["0.0.0.0/0"])];
        let t = RouteTable::build(nodes.iter().map(|n| (n, n.name.clone())), &[]);
        assert_eq!(
            t.lookup("192.0.2.7"),
            Route::Node {
                node: "wide".into(),
                host: "192.0.2.7".into(),
                node_local: false,
            }
        );
        assert_eq!(t.lookup("2001:db8::1"), Route::Forbidden);
    }

    #[test]
    fn mapped_and_unmapped_v6_stay_apart() {
        let t = table();
        // An IPv4-mapped spelling of a pod address routes like the IPv4
        // address, and is printed in its IPv4 form for the channel.
        assert_eq!(t.lookup("::ffff:10.244.1.7"), to("node-1", "10.244.1.7"));
        // A plain IPv6 address is never taken for an IPv4 one.
        assert_eq!(t.lookup("::a00:b"), Route::Forbidden);
        assert_eq!(t.lookup("fd00::12"), Route::Forbidden);
    }
    fn pool(host: &str) -> Route<String> {
        Route::Pool { host: host.into() }
    }

    #[test]
    fn pod_networks_go_to_the_pool_unless_a_node_claims_the_address() {
        let nodes = [
            node("node-1", &["10.0.0.11"], &["10.244.1.0/24"]),
            node("node-2", &["10.0.0.12"], &["10.244.2.0/24"]),
        ];
        let build = |nets: &[&str]| {
            let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
            RouteTable::build(
                nodes.iter().map(|n| (n, n.name.clone())),
                &["10.96.0.0/12".parse().unwrap()],
            )
            .with_pod_networks(&nets)
        };
        let t = build(&["10.244.0.0/16", "::ffff:100.64.0.0/106"]);
        // A block no Node names: any node may carry it.
        assert_eq!(t.lookup("10.244.77.5"), pool("10.244.77.5"));
        assert_eq!(t.lookup("::ffff:10.244.77.5"), pool("10.244.77.5"));
        assert_eq!(t.pool_kind("10.244.77.5"), PoolKind::Pod);
        assert_eq!(t.pool_kind("10.96.0.1"), PoolKind::Service);
        assert_eq!(PoolKind::Pod.to_string(), "pod address");
        assert_eq!(PoolKind::Service.to_string(), "service address");
        // A mapped pod network is compared in its IPv4 form.
        assert_eq!(t.lookup("100.64.3.4"), pool("100.64.3.4"));
        // Claimed addresses still go to their owner.
        assert_eq!(t.lookup("10.244.2.9"), to("node-2", "10.244.2.9"));
        assert_eq!(t.lookup("10.0.0.11"), to("node-1", "10.0.0.11"));
        // Outside every range: forbidden, and the reason names both keys.
        assert_eq!(t.lookup("10.245.0.1"), Route::Forbidden);
        let why = t.not_routed("10.245.0.1").to_string();
        assert!(
            why.contains("proxy.pod_network_cidrs") && why.contains("proxy.service_cidrs"),
            "{why}"
        );
        // Without the key the same address is forbidden.
        let t = build(&[]);
        assert_eq!(t.lookup("10.244.77.5"), Route::Forbidden);
        assert_eq!(
            t.not_routed("10.244.77.5"),
            NotRouted::OutsideRanges {
                address: "10.244.77.5".parse().unwrap()
            }
        );
    }

    #[test]
    fn every_node_name_routes_without_case_or_trailing_dot() {
        let mut a = node("node-1", &["10.0.0.11"], &[]);
        a.hostnames = vec!["node-1.lan".into()];
        a.dns_names = vec![
            "ip-10-0-0-11.ec2.internal".into(),
            "node-1.example.com".into(),
        ];
        let mut b = node("node-2", &["10.0.0.12"], &[]);
        b.dns_names = vec!["ip-10-0-0-12.ec2.internal".into()];
        let t = RouteTable::build(
            [(&a, "node-1".to_string()), (&b, "node-2".to_string())],
            &[],
        );
        for name in [
            "node-1",
            "node-1.",
            "NODE-1.LAN",
            "ip-10-0-0-11.ec2.internal",
            "IP-10-0-0-11.EC2.INTERNAL.",
            "node-1.example.com",
        ] {
            assert_eq!(t.lookup(name), to("node-1", "10.0.0.11"), "{name}");
        }
        assert_eq!(
            t.lookup("ip-10-0-0-12.ec2.internal."),
            to("node-2", "10.0.0.12")
        );
        assert_eq!(t.lookup("node-1.."), Route::Forbidden);
        assert_eq!(t.lookup("."), Route::Forbidden);
        assert!(t.ambiguous_names().is_empty());
        assert_eq!(
            t.not_routed("Other."),
            NotRouted::UnknownName {
                name: "other".into()
            }
        );
    }

    #[test]
    fn a_name_two_nodes_claim_routes_to_neither_whatever_the_order() {
        let mut a = node("a", &["10.0.0.1"], &[]);
        a.dns_names = vec!["shared.example.com".into(), "a.example.com".into()];
        let mut b = node("b", &["10.0.0.2"], &[]);
        b.dns_names = vec!["shared.example.com".into()];
        // A DNS name equal to another node's name makes that name
        // ambiguous too: a dial to it could be meant for either.
        let mut c = node("c", &["10.0.0.3"], &[]);
        c.dns_names = vec!["a".into()];
        for order in [[&a, &b, &c], [&c, &b, &a]] {
            let t = RouteTable::build(order.into_iter().map(|n| (n, n.name.clone())), &[]);
            assert_eq!(t.lookup("shared.example.com"), Route::Forbidden);
            assert_eq!(t.lookup("SHARED.example.com."), Route::Forbidden);
            assert_eq!(t.lookup("a"), Route::Forbidden);
            assert_eq!(t.lookup("a.example.com"), to("a", "10.0.0.1"));
            assert_eq!(t.lookup("b"), to("b", "10.0.0.2"));
            assert_eq!(t.lookup("c"), to("c", "10.0.0.3"));
            let amb: Vec<_> = t.ambiguous_names().iter().collect();
            assert_eq!(
                amb,
                [
                    (&"a".to_string(), &vec!["a".to_string(), "c".to_string()]),
                    (
                        &"shared.example.com".to_string(),
                        &vec!["a".to_string(), "b".to_string()]
                    ),
                ]
            );
            let why = t.not_routed("Shared.Example.com.").to_string();
            assert!(why.contains("nodes a, b"), "{why}");
        }
    }

    #[test]
    fn a_host_address_keeps_the_node_port_policy_of_every_node_naming_it() {
        let mut a = node("a", &["10.0.0.1"], &["10.244.1.0/24"]);
        a.host_addresses = vec!["10.244.77.1".parse().unwrap()];
        let mut b = node("b", &["10.0.0.2"], &["10.244.2.0/24"]);
        b.kubelet_port = Some(10260);
        b.host_addresses = vec![
            "10.244.2.64".parse().unwrap(),
            "10.244.77.1".parse().unwrap(),
        ];
        let t = RouteTable::build([(&a, "a".to_string()), (&b, "b".to_string())], &[])
            .with_pod_networks(&["10.244.0.0/16".parse().unwrap()]);
        let none = NodePorts::default();
        // Routing is unchanged: a host address is not a route.
        assert_eq!(t.lookup("10.244.2.64"), to("b", "10.244.2.64"));
        assert_eq!(t.lookup("10.244.77.1"), pool("10.244.77.1"));
        // b's own kubelet port passes, its SSH port never does.
        assert_eq!(t.check_host_address("10.244.2.64", 10260, &none), Ok(()));
        let err = t.check_host_address("10.244.2.64", 22, &none).unwrap_err();
        assert!(
            matches!(err, NodePortDenied::SshPort { port: 22, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("proxy.node_ports"), "{err}");
        assert!(t
            .check_host_address("::ffff:10.244.2.64", 22, &none)
            .is_err());
        // Named by both: each node's policy must allow the port.
        assert!(t.check_host_address("10.244.77.1", 10250, &none).is_err());
        assert!(t.check_host_address("10.244.77.1", 10260, &none).is_err());
        let both = NodePorts {
            extra: vec![10250, 10260],
        };
        assert_eq!(t.check_host_address("10.244.77.1", 10260, &both), Ok(()));
        // Pod addresses and names keep every port.
        assert_eq!(t.check_host_address("10.244.2.65", 22, &none), Ok(()));
        assert_eq!(t.check_host_address("a", 22, &none), Ok(()));
    }
}
