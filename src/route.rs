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
//! 4. anything else → forbidden. This is not an open proxy.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::NodeConfig;

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

/// An immutable routing snapshot.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    nodes: Vec<T>,
    by_name: HashMap<String, (usize, IpAddr)>,
    by_ip: HashMap<IpAddr, usize>,
    /// (prefix length, network bits → node index), longest prefix first.
    pods_v4: Vec<(u8, HashMap<u32, usize>)>,
    pods_v6: Vec<(u8, HashMap<u128, usize>)>,
    services: Vec<IpNet>,
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
    /// Builds a table from `(config, payload)` pairs. The node set is assumed
    /// validated (`config::check_node_set`); on a conflict the first node wins.
    pub fn build<'a>(
        nodes: impl IntoIterator<Item = (&'a NodeConfig, T)>,
        services: &[IpNet],
    ) -> RouteTable<T> {
        let mut t = RouteTable {
            nodes: Vec::new(),
            by_name: HashMap::new(),
            by_ip: HashMap::new(),
            pods_v4: Vec::new(),
            pods_v6: Vec::new(),
            services: services.to_vec(),
        };
        let mut v4: HashMap<u8, HashMap<u32, usize>> = HashMap::new();
        let mut v6: HashMap<u8, HashMap<u128, usize>> = HashMap::new();
        for (cfg, payload) in nodes {
            let idx = t.nodes.len();
            t.nodes.push(payload);
            if let Some(first) = cfg.internal_ips.first() {
                for name in std::iter::once(&cfg.name).chain(&cfg.hostnames) {
                    t.by_name
                        .entry(name.to_ascii_lowercase())
                        .or_insert((idx, *first));
                }
            }
            for ip in &cfg.internal_ips {
                t.by_ip.entry(canonical(*ip)).or_insert(idx);
            }
            for c in &cfg.pod_cidrs {
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

    /// An empty table (no nodes, no services): everything is forbidden.
    pub fn empty() -> RouteTable<T> {
        RouteTable::build(std::iter::empty(), &[])
    }

    /// Every node, for pool selection.
    pub fn nodes(&self) -> &[T] {
        &self.nodes
    }

    /// Routes a CONNECT host (an IP literal without brackets, or a name).
    pub fn lookup(&self, host: &str) -> Route<T> {
        let Ok(ip) = host.parse::<IpAddr>() else {
            return match self.by_name.get(&host.to_ascii_lowercase()) {
                Some((idx, first)) => Route::Node {
                    node: self.nodes[*idx].clone(),
                    host: first.to_string(),
                    node_local: true,
                },
                None => Route::Forbidden,
            };
        };
        let ip = canonical(ip);
        let host = ip.to_string();
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
        Route::Forbidden
    }
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`) routes like the IPv4 address, so a
/// client cannot slip past the allowlist by spelling an address differently.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ips: &[&str], pods: &[&str]) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            address: ips[0].into(),
            port: 22,
            internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            pod_cidrs: pods.iter().map(|s| s.parse().unwrap()).collect(),
            hostnames: Vec::new(),
            kubelet_port: None,
        }
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
}
