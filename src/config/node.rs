//! One node: its validated type, the rules a node must meet on its own
//! ([`node_from_spec`]), its pod CIDRs against the cluster CIDRs
//! ([`check_pod_scope`]), and the host name helpers routes compare names
//! with. The rules that span nodes are in `node_set`.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::address::{
    canonical_ip, canonical_net, forbidden_address, forbidden_net, parse_ssh_address, AddressOrigin,
};
use super::parse::parse_cidr;
use super::raw::NodeSpec;
use super::{invalid, ConfigError};

/// One node, as the rest of the program sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NodeConfig {
    /// Unique node name (the Kubernetes node name).
    pub name: String,
    /// SSH endpoint host (IP or DNS name).
    pub address: String,
    /// SSH port.
    pub port: u16,
    /// IPs that route to this node; the first is the target for name dials.
    pub internal_ips: Vec<IpAddr>,
    /// Pod CIDRs that route to this node.
    pub pod_cidrs: Vec<IpNet>,
    /// Further names that route to this node (a Kubernetes `Hostname`
    /// address that differs from the node name).
    pub hostnames: Vec<String>,
    /// DNS names that route to this node (Kubernetes `InternalDNS` and
    /// `ExternalDNS` addresses), lowercase, without a trailing dot. A name
    /// several nodes claim routes to none of them.
    pub dns_names: Vec<String>,
    /// The node's own host addresses inside the pod range (a CNI's tunnel
    /// address, such as Calico's `projectcalico.org/IPv4IPIPTunnelAddr`).
    /// They never route a dial anywhere; a dial to one, through whichever
    /// node, may use only the ports the node's own addresses allow.
    pub host_addresses: Vec<IpAddr>,
    /// The kubelet's port on this node, when known (Kubernetes reports it in
    /// `status.daemonEndpoints.kubeletEndpoint.Port`); `None` means the
    /// default, 10250. Dials to the node's own addresses may use this port.
    pub kubelet_port: Option<u16>,
}

impl NodeConfig {
    /// `host:port` of the SSH endpoint, for display and dialing.
    pub fn endpoint(&self) -> String {
        match self.address.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{}", self.port),
            _ => format!("{}:{}", self.address, self.port),
        }
    }
}

/// A host name as routes compare it: without surrounding space, in ASCII
/// lower case and without one trailing dot (`Node-3.` is `node-3`), the
/// way DNS treats those spellings.
pub fn normalize_name(name: &str) -> String {
    let n = name.trim();
    n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase()
}

/// `localhost` and `*.localhost` (RFC 6761) resolve to loopback: as a node
/// name they would route a client's `CONNECT localhost:...` to a node.
pub fn is_localhost(name: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    n == "localhost" || n.ends_with(".localhost")
}

/// Whether `name` is a valid node name: a DNS subdomain (lowercase letters,
/// digits, `-` and `.`, alphanumeric at both ends).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// Validates one node given as a [`NodeSpec`]; errors name the field as
/// `node.<field>`. `origin` says who wrote it: the admin API's
/// `POST /v1/nodes` is the operator's, a discovered Node is not, and only
/// the operator may give a DNS name as the SSH address.
pub fn node_from_spec(
    spec: NodeSpec,
    default_port: u16,
    origin: AddressOrigin,
) -> Result<NodeConfig, ConfigError> {
    validate_node("node", spec, default_port, origin)
}

pub(super) fn validate_node(
    key: &str,
    n: NodeSpec,
    default_port: u16,
    origin: AddressOrigin,
) -> Result<NodeConfig, ConfigError> {
    if !valid_node_name(&n.name) {
        return Err(invalid(
            format!("{key}.name"),
            format!(
                "{:?} is not a valid node name (lowercase letters, digits, '-' and '.')",
                n.name
            ),
        ));
    }
    if is_localhost(&n.name) {
        return Err(invalid(
            format!("{key}.name"),
            format!("{:?} names this host's loopback, never a node", n.name),
        ));
    }
    let address = match parse_ssh_address(n.address.trim(), origin) {
        Ok(a) => a.to_string(),
        Err(e) => return Err(invalid(format!("{key}.address"), e.to_string())),
    };
    if n.port == Some(0) {
        return Err(invalid(format!("{key}.port"), "must not be 0"));
    }
    if n.kubelet_port == Some(0) {
        return Err(invalid(format!("{key}.kubelet_port"), "must not be 0"));
    }
    let internal_ips = validate_internal_ips(key, n.internal_ips, &address)?;
    let pod_cidrs = validate_pod_cidrs(key, &n.pod_cidrs)?;
    let (hostnames, dns_names) = validate_names(key, &n.name, &n.hostnames, &n.dns_names)?;
    let host_addresses = validate_host_addresses(key, &n.host_addresses)?;
    Ok(NodeConfig {
        name: n.name,
        address,
        port: n.port.unwrap_or(default_port),
        internal_ips,
        pod_cidrs,
        hostnames,
        dns_names,
        host_addresses,
        kubelet_port: n.kubelet_port,
    })
}

/// `internal_ips`: canonical, routable, duplicates dropped; the SSH
/// address when absent, which must then be an IP.
fn validate_internal_ips(
    key: &str,
    list: Option<Vec<String>>,
    address: &str,
) -> Result<Vec<IpAddr>, ConfigError> {
    let Some(list) = list else {
        return match address.parse::<IpAddr>() {
            Ok(ip) => Ok(vec![ip]),
            Err(_) => Err(invalid(
                format!("{key}.internal_ips"),
                format!(
                    "must be set because the address {address:?} is not an IP: dials by node name need an IP the node's sshd can reach"
                ),
            )),
        };
    };
    if list.is_empty() {
        return Err(invalid(
            format!("{key}.internal_ips"),
            "must not be empty when set (omit it to default to the address)",
        ));
    }
    let mut ips = Vec::new();
    for (j, s) in list.iter().enumerate() {
        let ip: IpAddr = s.trim().parse().map_err(|_| {
            invalid(
                format!("{key}.internal_ips[{j}]"),
                format!("{s:?} is not an IP address"),
            )
        })?;
        let ip = canonical_ip(ip);
        if let Some(why) = forbidden_address(ip) {
            return Err(invalid(
                format!("{key}.internal_ips[{j}]"),
                format!("{ip} is {why}, which is never a node's address"),
            ));
        }
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// `pod_cidrs`: canonical, of a routable shape, duplicates dropped.
fn validate_pod_cidrs(key: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    let mut pod_cidrs = Vec::new();
    for (j, c) in list.iter().enumerate() {
        let k = format!("{key}.pod_cidrs[{j}]");
        let net = canonical_net(parse_cidr(&k, c)?);
        if let Some(why) = forbidden_net(net) {
            return Err(invalid(k, why));
        }
        if !pod_cidrs.contains(&net) {
            pod_cidrs.push(net);
        }
    }
    Ok(pod_cidrs)
}

/// `hostnames` and `dns_names`: normalized, valid, never loopback; a name
/// the node already has (its own, an earlier host name) is dropped.
fn validate_names(
    key: &str,
    name: &str,
    raw_hostnames: &[String],
    raw_dns_names: &[String],
) -> Result<(Vec<String>, Vec<String>), ConfigError> {
    let mut hostnames = Vec::new();
    for (j, h) in raw_hostnames.iter().enumerate() {
        let h = normalize_name(h);
        if !valid_node_name(&h) {
            return Err(invalid(
                format!("{key}.hostnames[{j}]"),
                format!("{h:?} is not a valid host name"),
            ));
        }
        if is_localhost(&h) {
            return Err(invalid(
                format!("{key}.hostnames[{j}]"),
                format!("{h:?} names this host's loopback, never a node"),
            ));
        }
        if h != name && !hostnames.contains(&h) {
            hostnames.push(h);
        }
    }
    let mut dns_names = Vec::new();
    for (j, h) in raw_dns_names.iter().enumerate() {
        let h = normalize_name(h);
        if !valid_node_name(&h) {
            return Err(invalid(
                format!("{key}.dns_names[{j}]"),
                format!("{h:?} is not a valid DNS name"),
            ));
        }
        if is_localhost(&h) {
            return Err(invalid(
                format!("{key}.dns_names[{j}]"),
                format!("{h:?} names this host's loopback, never a node"),
            ));
        }
        if h != name && !hostnames.contains(&h) && !dns_names.contains(&h) {
            dns_names.push(h);
        }
    }
    Ok((hostnames, dns_names))
}

/// `host_addresses`: canonical IPs, duplicates dropped.
fn validate_host_addresses(key: &str, list: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
    let mut host_addresses = Vec::new();
    for (j, s) in list.iter().enumerate() {
        let ip: IpAddr = s.trim().parse().map_err(|_| {
            invalid(
                format!("{key}.host_addresses[{j}]"),
                format!("{s:?} is not an IP address"),
            )
        })?;
        let ip = canonical_ip(ip);
        if !host_addresses.contains(&ip) {
            host_addresses.push(ip);
        }
    }
    Ok(host_addresses)
}

/// Checks that every pod CIDR of `node` lies inside `cluster_cidrs` (or,
/// with none, is no wider than the per-node limit). Separate from
/// [`validate_node`] because it depends on the `[proxy]` settings, which a
/// node read on its own (an API request, a discovered Node) does not carry.
pub fn check_pod_scope(
    key: &str,
    node: &NodeConfig,
    cluster_cidrs: &[IpNet],
) -> Result<(), ConfigError> {
    for (j, c) in node.pod_cidrs.iter().enumerate() {
        crate::config::address::check_pod_scope(canonical_net(*c), cluster_cidrs)
            .map_err(|e| invalid(format!("{key}.pod_cidrs[{j}]"), e))?;
    }
    Ok(())
}

/// A node for unit tests elsewhere in the crate: the first IP is the SSH
/// address, port 22, no host names, the default kubelet port.
#[cfg(test)]
pub(crate) fn test_node(name: &str, ips: &[&str], pods: &[&str]) -> NodeConfig {
    NodeConfig {
        name: name.into(),
        address: ips[0].into(),
        port: 22,
        internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        pod_cidrs: pods.iter().map(|s| s.parse().unwrap()).collect(),
        hostnames: Vec::new(),
        dns_names: Vec::new(),
        host_addresses: Vec::new(),
        kubelet_port: None,
    }
}
#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use ipnet::IpNet;

    use crate::config::tests::{err_of, parse};

    #[test]
    fn node_addresses_have_a_shape() {
        let node = |extra: &str| format!("[[node]]\nname = \"a\"\n{extra}");
        for (extra, key, what) in [
            ("address = \"127.0.0.1\"\n", "node[0].address", "loopback"),
            (
                "address = \"::ffff:127.0.0.1\"\n",
                "node[0].address",
                "loopback",
            ),
            ("address = \"0.0.0.0\"\n", "node[0].address", "unspecified"),
            (
                "address = \"10.0.0.1\"\ninternal_ips = [\"10.0.0.1\", \"169.254.169.254\"]\n",
                "node[0].internal_ips[1]",
                "link-local",
            ),
            (
                "address = \"10.0.0.1\"\ninternal_ips = [\"fe80::1\"]\n",
                "node[0].internal_ips[0]",
                "link-local",
            ),
            ("address = \"224.0.0.5\"\n", "node[0].address", "multicast"),
            (
                "address = \"10.0.0.1\"\ninternal_ips = [\"255.255.255.255\"]\n",
                "node[0].internal_ips[0]",
                "broadcast",
            ),
            (
                "address = \"10.0.0.1\"\npod_cidrs = [\"128.0.0.0/1\"]\n",
                "node[0].pod_cidrs[0]",
                "link-local",
            ),
            (
                "address = \"10.0.0.1\"\npod_cidrs = [\"127.0.0.0/24\"]\n",
                "node[0].pod_cidrs[0]",
                "loopback",
            ),
            (
                "address = \"10.0.0.1\"\npod_cidrs = [\"10.0.0.0/21\"]\n",
                "node[0].pod_cidrs[0]",
                "wider than /22",
            ),
            (
                "address = \"10.0.0.1\"\npod_cidrs = [\"fd00::/48\"]\n",
                "node[0].pod_cidrs[0]",
                "wider than /56",
            ),
            (
                "address = \"10.0.0.1\"\nhostnames = [\"localhost\"]\n",
                "node[0].hostnames[0]",
                "loopback",
            ),
        ] {
            let e = err_of(&node(extra));
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(what),
                "{extra}: {e}"
            );
        }
        // Mapped IPv6 is the IPv4 address everywhere, including the
        // duplicate check between nodes.
        let c = parse(&node(
            "address = \"::ffff:10.0.0.11\"\npod_cidrs = [\"::ffff:10.244.1.0/120\"]\n",
        ))
        .unwrap();
        assert_eq!(c.nodes[0].address, "10.0.0.11");
        assert_eq!(
            c.nodes[0].internal_ips,
            vec!["10.0.0.11".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            c.nodes[0].pod_cidrs,
            vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );
        let dup = "[[node]]\nname = \"a\"\naddress = \"10.0.0.11\"\n[[node]]\nname = \"b\"\naddress = \"10.0.0.12\"\ninternal_ips = [\"10.0.0.12\", \"::ffff:10.0.0.11\"]\n";
        let e = err_of(dup);
        assert!(
            e.contains("node[1].internal_ips")
                && e.contains("10.0.0.11 is already an internal IP of node \"a\""),
            "{e}"
        );
    }

    #[test]
    fn dns_names_and_host_addresses_of_a_node() {
        let node = |extra: &str| {
            parse(&format!(
                "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\n{extra}\n"
            ))
        };
        let c = node("dns_names = [\"IP-10-0-0-1.EC2.Internal.\", \"a\", \"ip-10-0-0-1.ec2.internal\"]\nhost_addresses = [\"::ffff:10.244.7.1\"]").unwrap();
        assert_eq!(
            c.nodes[0].dns_names,
            vec!["ip-10-0-0-1.ec2.internal".to_string()]
        );
        assert_eq!(
            c.nodes[0].host_addresses,
            vec!["10.244.7.1".parse::<IpAddr>().unwrap()]
        );
        let e = node("dns_names = [\"a_b\"]").unwrap_err().to_string();
        assert!(e.contains("node[0].dns_names[0]"), "{e}");
        let e = node("dns_names = [\"x.localhost\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        let e = node("host_addresses = [\"nope\"]").unwrap_err().to_string();
        assert!(e.contains("node[0].host_addresses[0]"), "{e}");
        let e = parse(
            "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\ndns_names = [\"n.example\"]\n\
             [[node]]\nname = \"b\"\naddress = \"10.0.0.2\"\ndns_names = [\"n.example.\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("node[1].dns_names"), "{e}");
    }

    #[test]
    fn ipv6_nodes() {
        let c =
            parse("[[node]]\nname = \"v6\"\naddress = \"fd00::11\"\npod_cidrs = [\"fd10::/64\"]\n")
                .unwrap();
        assert_eq!(c.nodes[0].endpoint(), "[fd00::11]:22");
    }
}
