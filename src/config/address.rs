//! The shape of node addresses and pod CIDRs, shared by every node source.
//!
//! A Node object is written by the node itself (a kubelet may set its own
//! `status.addresses`), so what it claims is input, not operator intent. The
//! route table is our allowlist, and these rules keep any one claim from
//! widening it:
//!
//! - one spelling per address: IPv4-mapped IPv6 (`::ffff:10.0.0.11`) is the
//!   IPv4 address, in every check and in the route table, so a duplicate
//!   cannot hide behind a second spelling;
//! - never a node address or inside a pod CIDR: loopback, unspecified,
//!   link-local (which holds the cloud metadata address 169.254.169.254),
//!   multicast and broadcast. None of these names a node: dialed through a
//!   tunnel they reach the node's own loopback services, its metadata
//!   endpoint, or nothing;
//! - a pod CIDR falls inside the configured cluster CIDRs, or, with none
//!   configured, is no wider than [`MAX_POD_PREFIX_V4`] /
//!   [`MAX_POD_PREFIX_V6`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The widest IPv4 pod CIDR one node may claim when no cluster CIDR is
/// configured: a /22 (1024 addresses). kube-controller-manager hands each
/// node a /24 by default (`--node-cidr-mask-size`), and the largest
/// per-node ranges in common use are a /23 (up to 256 pods a node); a /22
/// leaves headroom over both while keeping what a forged Node can claim to
/// 1024 addresses instead of, say, half the Internet.
pub const MAX_POD_PREFIX_V4: u8 = 22;

/// The widest IPv6 pod CIDR one node may claim when no cluster CIDR is
/// configured: a /56. Kubernetes' default per-node size is a /64; a /56 is
/// 256 of those, the usual site delegation size, and still only a sliver
/// of any provider's space.
pub const MAX_POD_PREFIX_V6: u8 = 56;

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as the IPv4 address; anything else
/// as it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// A CIDR inside `::ffff:0:0/96` as the IPv4 CIDR it maps; anything else
/// as it is.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        if n.prefix_len() >= 96 {
            if let Some(v4) = n.network().to_ipv4_mapped() {
                if let Ok(v4net) = Ipv4Net::new(v4, n.prefix_len() - 96) {
                    return IpNet::V4(v4net);
                }
            }
        }
    }
    net
}

/// Address ranges that never name a node, with why.
fn never_nodes() -> [(IpNet, &'static str); 9] {
    let v4 = |a: [u8; 4], l: u8| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap_or_default());
    let v6 = |a: Ipv6Addr, l: u8| IpNet::V6(Ipv6Net::new(a, l).unwrap_or_default());
    [
        (v4([0, 0, 0, 0], 8), "unspecified (0.0.0.0/8)"),
        (v4([127, 0, 0, 0], 8), "loopback"),
        (
            v4([169, 254, 0, 0], 16),
            "link-local (169.254.0.0/16, which holds the cloud metadata address 169.254.169.254)",
        ),
        (v4([224, 0, 0, 0], 4), "multicast"),
        (v4([255, 255, 255, 255], 32), "broadcast"),
        (v6(Ipv6Addr::UNSPECIFIED, 128), "unspecified (::)"),
        (v6(Ipv6Addr::LOCALHOST, 128), "loopback"),
        (
            v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
            "link-local (fe80::/10)",
        ),
        (
            v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
            "multicast",
        ),
    ]
}

/// Why `ip` can never be a node address, or `None` when it can. Checks
/// the canonical form, so `::ffff:127.0.0.1` is loopback too.
pub fn forbidden_address(ip: IpAddr) -> Option<&'static str> {
    let ip = canonical_ip(ip);
    never_nodes()
        .into_iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, why)| why)
}

/// Why `net` may not be a pod CIDR by shape alone (it overlaps a range that
/// never names a node, or covers the IPv4-mapped IPv6 block), or `None`.
/// Expects the canonical form ([`canonical_net`]).
pub fn forbidden_net(net: IpNet) -> Option<String> {
    for (bad, why) in never_nodes() {
        if net.contains(&bad.network()) || bad.contains(&net.network()) {
            return Some(format!("{net} overlaps {bad}: {why}"));
        }
    }
    if let IpNet::V6(n) = net {
        let mapped = Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0);
        if n.contains(&mapped) {
            return Some(format!(
                "{net} covers the IPv4-mapped block ::ffff:0:0/96; list IPv4 pod CIDRs as IPv4"
            ));
        }
    }
    None
}

/// Checks that `net` (canonical) lies in one of `cluster_cidrs`, or, with
/// none configured, is no wider than the per-node limits. The error says
/// what to change.
pub fn check_pod_scope(net: IpNet, cluster_cidrs: &[IpNet]) -> Result<(), String> {
    if cluster_cidrs.is_empty() {
        let (limit, family) = match net {
            IpNet::V4(_) => (MAX_POD_PREFIX_V4, "IPv4"),
            IpNet::V6(_) => (MAX_POD_PREFIX_V6, "IPv6"),
        };
        if net.prefix_len() < limit {
            return Err(format!(
                "{net} is wider than /{limit}, the largest {family} pod CIDR one node may have \
                 when proxy.cluster_cidrs is not set; set proxy.cluster_cidrs to the cluster's \
                 pod range to allow it"
            ));
        }
        return Ok(());
    }
    if cluster_cidrs.iter().any(|c| c.contains(&net)) {
        return Ok(());
    }
    let list: Vec<String> = cluster_cidrs.iter().map(|c| c.to_string()).collect();
    Err(format!(
        "{net} is not inside proxy.cluster_cidrs ({})",
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        assert_eq!(canonical_ip(ip("::ffff:10.0.0.11")), ip("10.0.0.11"));
        assert_eq!(canonical_ip(ip("fd00::1")), ip("fd00::1"));
        assert_eq!(
            canonical_net(net("::ffff:10.244.0.0/112")),
            net("10.244.0.0/16")
        );
        assert_eq!(canonical_net(net("fd00::/64")), net("fd00::/64"));
    }

    #[test]
    fn never_node_addresses() {
        for (s, why) in [
            ("127.0.0.1", "loopback"),
            ("::ffff:127.0.0.2", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let got = forbidden_address(ip(s)).unwrap_or_else(|| panic!("{s} accepted"));
            assert!(got.starts_with(why), "{s}: {got}");
        }
        for s in ["10.0.0.11", "203.0.113.9", "fd00::11", "2001:db8::1"] {
            assert_eq!(forbidden_address(ip(s)), None, "{s}");
        }
    }

    #[test]
    fn pod_cidr_shape_and_scope() {
        for s in [
            "128.0.0.0/1",
            "0.0.0.0/0",
            "127.0.0.0/24",
            "169.254.0.0/24",
            "::/0",
            "fe80::/64",
            "::ffff:0:0/95",
        ] {
            assert!(forbidden_net(canonical_net(net(s))).is_some(), "{s}");
        }
        assert_eq!(forbidden_net(net("10.244.1.0/24")), None);
        assert!(check_pod_scope(net("10.244.0.0/21"), &[]).is_err());
        assert!(check_pod_scope(net("10.244.0.0/22"), &[]).is_ok());
        assert!(check_pod_scope(net("fd00::/55"), &[]).is_err());
        assert!(check_pod_scope(net("fd00::/64"), &[]).is_ok());
        let cluster = [net("10.244.0.0/16")];
        assert!(check_pod_scope(net("10.244.0.0/17"), &cluster).is_ok());
        let e = check_pod_scope(net("10.245.0.0/24"), &cluster).unwrap_err();
        assert!(e.contains("proxy.cluster_cidrs"), "{e}");
    }
}
