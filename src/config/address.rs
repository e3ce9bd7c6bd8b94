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
//!   [`MAX_POD_PREFIX_V6`];
//! - an SSH address is an IP literal in Rust's strict grammar
//!   ([`parse_ssh_address`]). Text that is not one would go to the system
//!   resolver, and glibc's reads `127.1`, `2130706433`, `0x7f.0.0.1` and
//!   `017.0.0.1` as IPv4 addresses (`2852039166` is 169.254.169.254), and
//!   `localhost` as loopback: every ban above would be one spelling away.
//!   Only an operator may write a DNS name there, and then it must look
//!   like one (its last label starts with a letter, so no numeric spelling
//!   passes), and tunneler resolves it itself and checks every answer
//!   ([`connect_ban`]) before it dials any.

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

/// Whether `a` and `b` share an address. Two CIDRs either nest or are
/// apart, so they overlap exactly when one holds the other's network
/// address. Every overlap rule (pod CIDRs, service, cluster and pod
/// network CIDRs) asks this one question.
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why `net` may not be a pod CIDR by shape alone (it overlaps a range that
/// never names a node, or covers the IPv4-mapped IPv6 block), or `None`.
/// Expects the canonical form ([`canonical_net`]).
pub fn forbidden_net(net: IpNet) -> Option<String> {
    for (bad, why) in never_nodes() {
        if overlaps(net, bad) {
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

/// Where a node's SSH address was written, which decides whether a DNS
/// name may stand there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressOrigin {
    /// The operator's config file or admin API: an IP literal, or a DNS
    /// name that tunneler resolves and checks itself at each connect.
    Operator,
    /// A Node object, which the node itself may write: an IP literal only.
    Discovered,
}

/// A node's SSH address after [`parse_ssh_address`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshAddress {
    /// An IP literal, in canonical form and outside every ban.
    Ip(IpAddr),
    /// An operator-written DNS name (lowercase, no trailing dot), resolved
    /// at each connect with every answer checked.
    Name(String),
}

impl std::fmt::Display for SshAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshAddress::Ip(ip) => ip.fmt(f),
            SshAddress::Name(n) => f.write_str(n),
        }
    }
}

/// Why an SSH address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// An IP literal inside a range that never names a node.
    #[error("{ip} is {why}, which is never a node's address")]
    Forbidden {
        /// The address, canonical.
        ip: IpAddr,
        /// Which ban.
        why: &'static str,
    },
    /// Not an IP literal, where only one may stand.
    #[error(
        "{0:?} is not an IP address literal; a discovered Node's SSH address must be one \
         (no host names, no shortened, integer, hex or octal IPv4 spellings, no zone ids)"
    )]
    NotAnIp(String),
    /// Neither an IP literal nor a DNS name.
    #[error("{text:?} is neither an IP address literal nor a DNS host name: {why}")]
    NotAName {
        /// The text as written.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Parses a node's SSH address strictly. An IP literal must be one in
/// Rust's grammar (four decimal octets without leading zeros, or IPv6
/// without a zone id) and outside every ban of [`forbidden_address`]; it
/// comes back canonical. Anything else is a DNS name only for
/// [`AddressOrigin::Operator`], and only if it is shaped like one.
pub fn parse_ssh_address(text: &str, origin: AddressOrigin) -> Result<SshAddress, AddressError> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        let ip = canonical_ip(ip);
        return match forbidden_address(ip) {
            Some(why) => Err(AddressError::Forbidden { ip, why }),
            None => Ok(SshAddress::Ip(ip)),
        };
    }
    if origin == AddressOrigin::Discovered {
        return Err(AddressError::NotAnIp(text.to_string()));
    }
    let not = |why| AddressError::NotAName {
        text: text.to_string(),
        why,
    };
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(not("a host name has 1 to 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(not("each label has 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(not("only letters, digits, '-' and '.' may appear"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(not("a label may not start or end with '-'"));
        }
    }
    // The last label starting with a letter keeps out every spelling the
    // resolver would read as an IPv4 address (`127.1`, `0x7f.1`,
    // `2130706433`); no top-level domain starts with a digit.
    let last = name.rsplit('.').next().unwrap_or_default();
    if !last.as_bytes().first().is_some_and(u8::is_ascii_alphabetic) {
        return Err(not(
            "its last label starts with a digit, so a resolver would read it as a number",
        ));
    }
    if name == "localhost" || name.ends_with(".localhost") {
        return Err(not("localhost names this host's loopback, never a node"));
    }
    Ok(SshAddress::Name(name))
}

/// Why a connect to `ip` (an SSH address as parsed, or one a DNS name
/// resolved to) must not be made, or `None`: the bans of
/// [`forbidden_address`], plus the service CIDRs (a ClusterIP names a
/// service, never a node's sshd).
pub fn connect_ban(ip: IpAddr, service_cidrs: &[IpNet]) -> Option<String> {
    let ip = canonical_ip(ip);
    if let Some(why) = forbidden_address(ip) {
        return Some(why.to_string());
    }
    service_cidrs
        .iter()
        .find(|s| s.contains(&ip))
        .map(|s| format!("inside the service CIDR {s}"))
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
    fn ssh_addresses_are_strict_literals_or_operator_names() {
        use AddressOrigin::{Discovered, Operator};
        for forged in [
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "0x7f000001",
            "017.0.0.1",
            "0177.0.0.1",
            "127.0.0.1.",
            "2852039166",
            "localhost",
            "LOCALHOST.",
            "a.localhost",
            "fe80::1%eth0",
            "::1%1",
            "[::1]",
            "10.0.0.1:22",
            "",
            "node a",
            "-x.example",
        ] {
            for origin in [Discovered, Operator] {
                assert!(
                    parse_ssh_address(forged, origin).is_err(),
                    "{forged:?} accepted from {origin:?}"
                );
            }
        }
        for banned in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "169.254.169.254",
            "::ffff:127.0.0.1",
        ] {
            let e = parse_ssh_address(banned, Operator).unwrap_err();
            assert!(matches!(e, AddressError::Forbidden { .. }), "{banned}: {e}");
        }
        assert_eq!(
            parse_ssh_address("::ffff:10.0.0.11", Discovered).unwrap(),
            SshAddress::Ip(ip("10.0.0.11"))
        );
        assert_eq!(
            parse_ssh_address("node-1.example.com", Discovered).unwrap_err(),
            AddressError::NotAnIp("node-1.example.com".into())
        );
        assert_eq!(
            parse_ssh_address("Node-1.Example.COM.", Operator).unwrap(),
            SshAddress::Name("node-1.example.com".into())
        );
    }

    #[test]
    fn connect_bans_cover_service_cidrs() {
        let svc = [net("10.96.0.0/12")];
        assert!(connect_ban(ip("10.96.0.1"), &svc)
            .unwrap()
            .contains("10.96.0.0/12"));
        assert!(connect_ban(ip("127.0.0.1"), &svc)
            .unwrap()
            .contains("loopback"));
        assert_eq!(connect_ban(ip("10.0.0.11"), &svc), None);
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
