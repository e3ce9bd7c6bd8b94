//! `[proxy]`: the egress (HTTP CONNECT) front end: its listeners, the
//! service, cluster and pod network ranges, dial and drain bounds, the
//! node port policy and the mTLS listener (the relay's buffer limits are
//! in `relay`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use super::address::{canonical_net, forbidden_net, overlaps};
use super::parse::{parse_cidr, parse_duration, resolve, validate_group};
use super::raw::{RawProxy, RawTls};
use super::relay::{validate_relay, RelayLimits};
use super::{invalid, ConfigError};

/// A listener address for the egress proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum ListenAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address (loopback only, validated).
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Egress proxy settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyConfig {
    /// Where to accept CONNECT requests.
    pub listen: Vec<ListenAddr>,
    /// Service CIDRs, dialed through any healthy tunnel.
    pub service_cidrs: Vec<IpNet>,
    /// The cluster's pod ranges: every node's pod CIDRs must lie inside
    /// one of them. Empty means unset: then a pod CIDR may be no wider
    /// than `address::MAX_POD_PREFIX_V4` / `_V6`.
    pub cluster_cidrs: Vec<IpNet>,
    /// Ranges routable from every node whose addresses Node objects do not
    /// assign (Calico blocks, Cilium cluster-pool, a VPC's pod subnets): an
    /// address inside one that no node's pod CIDR claims is dialed through
    /// the pool, like a service address.
    pub pod_network_cidrs: Vec<IpNet>,
    /// Bound on a dial: waiting for a connecting tunnel plus the channel open.
    pub dial_timeout: Duration,
    /// How long a dial waits for a known tunnel that is not up yet
    /// (connecting, or in a short backoff) before 503; a service dial waits
    /// this long for any healthy member. At most `dial_timeout` (default:
    /// equal to it); 0 answers 503 at once.
    pub wait_for_healthy: Duration,
    /// How long a removed node or replaced session may keep serving the
    /// streams it already carries before it is closed.
    pub drain_timeout: Duration,
    /// A client must send its whole CONNECT head within this time.
    pub handshake_timeout: Duration,
    /// Connections that have not yet sent a full request, at most, on each
    /// `listen` entry separately (every listener has its own budget).
    pub max_pending_handshakes: usize,
    /// Streams per node; past it new dials to the node get 503 at once.
    pub max_streams_per_node: u64,
    /// Carry dials addressed to a node's own IP or name to 127.0.0.1 on
    /// that node, so kubelets may listen on loopback only.
    pub node_local_via_loopback: bool,
    /// Ports a dial to a node's own address may use besides the node's
    /// kubelet port (sorted, no duplicates).
    pub node_ports: Vec<u16>,
    /// Offsets inside each pod CIDR that are the node's own host-network
    /// addresses (a CNI bridge, a VXLAN device), not pods: a dial there
    /// is held to the node port policy like one to the node's own address.
    /// Sorted, no duplicates; `[0, 1]` (the network address and the first
    /// host address) by default.
    pub pod_host_offsets: Vec<u32>,
    /// Group that may use the egress Unix sockets (mode 0660 then).
    pub socket_group: Option<String>,
    /// The optional mTLS TCP listener.
    pub tls: Option<TlsConfig>,
    /// How much the relay may buffer for clients slower than their node.
    pub relay: RelayLimits,
    /// One access record per dial on the `tunneler::access` log target.
    pub access_log: bool,
}

/// The mTLS listener, as kube-apiserver's `transport.tcp.tlsConfig` expects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsConfig {
    /// Address to listen on (any address: clients must present a certificate).
    pub listen: std::net::SocketAddr,
    /// Server certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Server private key (PEM).
    pub key_file: PathBuf,
    /// CA that signs client certificates (PEM).
    pub client_ca_file: PathBuf,
    /// When not empty, a client certificate must carry one of these names
    /// as its subject CN or as a DNS subject alternative name.
    pub client_names: Vec<String>,
    /// Connections still in their TLS handshake or CONNECT head, at most,
    /// on this listener (its own budget, apart from `proxy.listen`'s).
    pub max_pending_handshakes: usize,
}

/// Parses a listener URL such as `unix:///run/x.sock` or `tcp://127.0.0.1:8131`.
pub fn parse_listen(key: &str, s: &str, base: &Path) -> Result<ListenAddr, ConfigError> {
    if let Some(path) = s.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(invalid(key, "unix:// needs a path"));
        }
        return Ok(ListenAddr::Unix(resolve(base, Path::new(path))));
    }
    if let Some(addr) = s.strip_prefix("tcp://") {
        let sa: std::net::SocketAddr = addr.parse().map_err(|_| {
            invalid(
                key,
                format!("{s:?}: expected tcp://IP:PORT, e.g. tcp://127.0.0.1:8131"),
            )
        })?;
        if !sa.ip().is_loopback() {
            return Err(invalid(
                key,
                format!("{s:?}: a plain TCP listener must be on a loopback address; it would otherwise be an unauthenticated proxy into the cluster"),
            ));
        }
        return Ok(ListenAddr::Tcp(sa));
    }
    Err(invalid(
        key,
        format!("{s:?}: expected unix://PATH or tcp://IP:PORT"),
    ))
}

/// `proxy.node_ports`: no 0, no duplicates; returned sorted.
fn validate_node_ports(mut ports: Vec<u16>) -> Result<Vec<u16>, ConfigError> {
    for (i, p) in ports.iter().enumerate() {
        if *p == 0 {
            return Err(invalid(format!("proxy.node_ports[{i}]"), "must not be 0"));
        }
        if ports[..i].contains(p) {
            return Err(invalid(
                format!("proxy.node_ports[{i}]"),
                format!("{p} is listed twice"),
            ));
        }
    }
    ports.sort_unstable();
    Ok(ports)
}

/// `proxy.pod_host_offsets` by default: the network address (flannel's
/// VXLAN device `flannel.1` holds it) and the first host address (the
/// `cni0`/`cbr0` bridge of the bridge plugin, flannel and kubenet).
pub const DEFAULT_POD_HOST_OFFSETS: [u32; 2] = [0, 1];

/// `proxy.pod_host_offsets`: no duplicates; returned sorted. An empty list
/// is allowed (every pod CIDR address is then a pod) but must be written.
fn validate_pod_host_offsets(mut offsets: Vec<u32>) -> Result<Vec<u32>, ConfigError> {
    for (i, o) in offsets.iter().enumerate() {
        if offsets[..i].contains(o) {
            return Err(invalid(
                format!("proxy.pod_host_offsets[{i}]"),
                format!("{o} is listed twice"),
            ));
        }
    }
    offsets.sort_unstable();
    Ok(offsets)
}

/// `proxy.tls.client_names`: certificate names as they appear in a CN or a
/// DNS SAN. Compared exactly, so a wildcard or an empty entry would only
/// ever confuse the reader: both are refused.
fn validate_client_names(names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::new();
    for (i, n) in names.into_iter().enumerate() {
        let key = format!("proxy.tls.client_names[{i}]");
        if n.is_empty() || n.len() > 253 {
            return Err(invalid(key, "must be 1 to 253 characters"));
        }
        if n.contains('*') {
            return Err(invalid(
                key,
                format!("{n:?}: wildcards are not supported; list each certificate name"),
            ));
        }
        if !n.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            return Err(invalid(
                key,
                format!("{n:?}: only printable ASCII is allowed"),
            ));
        }
        if out.contains(&n) {
            return Err(invalid(key, format!("{n:?} is listed twice")));
        }
        out.push(n);
    }
    Ok(out)
}

/// `proxy.listen` by default.
const DEFAULT_LISTEN: &str = "unix:///run/tunneler/egress.sock";
/// `proxy.max_pending_handshakes` by default (and so
/// `proxy.tls.max_pending_handshakes`'s).
const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// `proxy.dial_timeout` by default (and so `proxy.wait_for_healthy`'s).
const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// `proxy.drain_timeout` by default.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// `proxy.handshake_timeout` by default.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `proxy.max_streams_per_node` by default.
const DEFAULT_MAX_STREAMS_PER_NODE: u64 = 4096;
/// `proxy.node_local_via_loopback` by default.
const DEFAULT_NODE_LOCAL_VIA_LOOPBACK: bool = false;
/// `proxy.access_log` by default.
const DEFAULT_ACCESS_LOG: bool = true;

/// `[proxy]`; relative paths resolve against `base`.
pub(super) fn validate_proxy(p: RawProxy, base: &Path) -> Result<ProxyConfig, ConfigError> {
    let listen = validate_listen(
        p.listen.unwrap_or_else(|| vec![DEFAULT_LISTEN.to_string()]),
        base,
    )?;
    let mut service_cidrs = Vec::new();
    for (i, c) in p.service_cidrs.unwrap_or_default().iter().enumerate() {
        service_cidrs.push(parse_cidr(&format!("proxy.service_cidrs[{i}]"), c)?);
    }
    let cluster_cidrs =
        validate_cluster_cidrs(p.cluster_cidrs.unwrap_or_default(), &service_cidrs)?;
    let pod_network_cidrs = validate_pod_network_cidrs(
        p.pod_network_cidrs.unwrap_or_default(),
        &service_cidrs,
        &cluster_cidrs,
    )?;
    let max_pending_handshakes = match p.max_pending_handshakes {
        Some(0) => {
            return Err(invalid(
                "proxy.max_pending_handshakes",
                "must be at least 1",
            ))
        }
        Some(n) => n,
        None => DEFAULT_MAX_PENDING_HANDSHAKES,
    };
    let dial_timeout = parse_duration(
        "proxy.dial_timeout",
        p.dial_timeout.as_ref(),
        DEFAULT_DIAL_TIMEOUT,
    )?;
    let wait_for_healthy = validate_wait_for_healthy(p.wait_for_healthy.as_ref(), dial_timeout)?;
    Ok(ProxyConfig {
        listen,
        service_cidrs,
        cluster_cidrs,
        pod_network_cidrs,
        dial_timeout,
        wait_for_healthy,
        drain_timeout: parse_duration(
            "proxy.drain_timeout",
            p.drain_timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
        )?,
        handshake_timeout: parse_duration(
            "proxy.handshake_timeout",
            p.handshake_timeout.as_ref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )?,
        max_pending_handshakes,
        max_streams_per_node: match p.max_streams_per_node {
            Some(0) => return Err(invalid("proxy.max_streams_per_node", "must be at least 1")),
            Some(n) => n,
            None => DEFAULT_MAX_STREAMS_PER_NODE,
        },
        node_local_via_loopback: p
            .node_local_via_loopback
            .unwrap_or(DEFAULT_NODE_LOCAL_VIA_LOOPBACK),
        access_log: p.access_log.unwrap_or(DEFAULT_ACCESS_LOG),
        node_ports: validate_node_ports(p.node_ports.unwrap_or_default())?,
        pod_host_offsets: validate_pod_host_offsets(
            p.pod_host_offsets
                .unwrap_or_else(|| DEFAULT_POD_HOST_OFFSETS.to_vec()),
        )?,
        socket_group: validate_group("proxy.socket_group", p.socket_group)?,
        tls: match p.tls {
            None => None,
            Some(t) => Some(validate_tls(t, base, max_pending_handshakes)?),
        },
        relay: validate_relay(
            p.relay_buffer_budget,
            p.relay_stream_buffer_limit,
            p.relay_session_floor,
            p.relay_stopped_reader_timeout,
        )?,
    })
}

/// `proxy.listen`: each a listener URL, none twice.
fn validate_listen(listen_raw: Vec<String>, base: &Path) -> Result<Vec<ListenAddr>, ConfigError> {
    let mut listen = Vec::new();
    for (i, l) in listen_raw.iter().enumerate() {
        let addr = parse_listen(&format!("proxy.listen[{i}]"), l, base)?;
        if listen.contains(&addr) {
            return Err(invalid(
                format!("proxy.listen[{i}]"),
                format!("{l:?} is listed twice"),
            ));
        }
        listen.push(addr);
    }
    Ok(listen)
}

/// `proxy.cluster_cidrs`: canonical, of a routable shape, clear of the
/// service CIDRs.
fn validate_cluster_cidrs(
    raw: Vec<String>,
    service_cidrs: &[IpNet],
) -> Result<Vec<IpNet>, ConfigError> {
    let mut cluster_cidrs = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = format!("proxy.cluster_cidrs[{i}]");
        let net = canonical_net(parse_cidr(&key, c)?);
        if let Some(why) = forbidden_net(net) {
            return Err(invalid(key, why));
        }
        if let Some(s) = service_cidrs.iter().find(|s| overlaps(**s, net)) {
            return Err(invalid(key, format!("{net} overlaps the service CIDR {s}")));
        }
        cluster_cidrs.push(net);
    }
    Ok(cluster_cidrs)
}

/// `proxy.pod_network_cidrs`: as the cluster CIDRs, and inside them when
/// they are set; duplicates dropped.
fn validate_pod_network_cidrs(
    raw: Vec<String>,
    service_cidrs: &[IpNet],
    cluster_cidrs: &[IpNet],
) -> Result<Vec<IpNet>, ConfigError> {
    let mut pod_network_cidrs: Vec<IpNet> = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = format!("proxy.pod_network_cidrs[{i}]");
        let net = canonical_net(parse_cidr(&key, c)?);
        if let Some(why) = forbidden_net(net) {
            return Err(invalid(key, why));
        }
        if let Some(s) = service_cidrs.iter().find(|s| overlaps(**s, net)) {
            return Err(invalid(key, format!("{net} overlaps the service CIDR {s}")));
        }
        // The cluster CIDRs bound what any pod range may claim; a pod
        // network wider than them would reopen what they close.
        if !cluster_cidrs.is_empty()
            && !cluster_cidrs
                .iter()
                .any(|cc| cc.contains(&net.network()) && cc.contains(&net.broadcast()))
        {
            return Err(invalid(
                key,
                format!(
                    "{net} is not inside proxy.cluster_cidrs ({})",
                    cluster_cidrs
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if !pod_network_cidrs.contains(&net) {
            pod_network_cidrs.push(net);
        }
    }
    Ok(pod_network_cidrs)
}

/// `proxy.wait_for_healthy`: `dial_timeout` by default, never longer.
fn validate_wait_for_healthy(
    wait: Option<&String>,
    dial_timeout: Duration,
) -> Result<Duration, ConfigError> {
    // Zero is allowed here: no wait, 503 at once.
    let wait_for_healthy = match wait {
        Some(v) if humantime::parse_duration(v.trim()).is_ok_and(|d| d.is_zero()) => Duration::ZERO,
        v => parse_duration("proxy.wait_for_healthy", v, dial_timeout)?,
    };
    if wait_for_healthy > dial_timeout {
        return Err(invalid(
            "proxy.wait_for_healthy",
            format!(
                "{} is longer than proxy.dial_timeout ({}): the wait is part of the dial",
                humantime::format_duration(wait_for_healthy),
                humantime::format_duration(dial_timeout)
            ),
        ));
    }
    Ok(wait_for_healthy)
}

/// `[proxy.tls]`; its handshake budget defaults to `proxy`'s.
fn validate_tls(
    t: RawTls,
    base: &Path,
    max_pending_handshakes: usize,
) -> Result<TlsConfig, ConfigError> {
    Ok(TlsConfig {
        listen: t
            .listen
            .parse()
            .map_err(|_| invalid("proxy.tls.listen", format!("{:?} is not IP:PORT", t.listen)))?,
        cert_file: resolve(base, &t.cert_file),
        key_file: resolve(base, &t.key_file),
        client_ca_file: resolve(base, &t.client_ca_file),
        client_names: validate_client_names(t.client_names.unwrap_or_default())?,
        max_pending_handshakes: match t.max_pending_handshakes {
            Some(0) => {
                return Err(invalid(
                    "proxy.tls.max_pending_handshakes",
                    "must be at least 1",
                ))
            }
            Some(n) => n,
            None => max_pending_handshakes,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ipnet::IpNet;

    use crate::config::tests::{err_of, parse};

    #[test]
    fn wait_for_healthy_defaults_to_the_dial_timeout_and_stays_inside_it() {
        let p = |extra: &str| parse(extra).unwrap().proxy;
        assert_eq!(p("").wait_for_healthy, Duration::from_secs(5));
        assert_eq!(
            p("[proxy]\ndial_timeout = \"8s\"\n").wait_for_healthy,
            Duration::from_secs(8)
        );
        let set = p("[proxy]\ndial_timeout = \"8s\"\nwait_for_healthy = \"3s\"\n");
        assert_eq!(set.wait_for_healthy, Duration::from_secs(3));
        assert_eq!(
            p("[proxy]\nwait_for_healthy = \"0s\"\n").wait_for_healthy,
            Duration::ZERO
        );
        assert_eq!(
            err_of("[proxy]\ndial_timeout = \"2s\"\nwait_for_healthy = \"3s\"\n"),
            "invalid config: `proxy.wait_for_healthy`: 3s is longer than proxy.dial_timeout (2s): the wait is part of the dial"
        );
        assert!(err_of("[proxy]\nwait_for_healthy = \"3\"\n").contains("proxy.wait_for_healthy"));
    }

    #[test]
    fn node_ports_and_client_names() {
        let c = parse("[proxy]\nnode_ports = [10255, 4194]\n").unwrap();
        assert_eq!(c.proxy.node_ports, vec![4194, 10255]);
        assert!(parse("").unwrap().proxy.node_ports.is_empty());
        assert!(err_of("[proxy]\nnode_ports = [0]\n").contains("proxy.node_ports[0]"));
        assert!(err_of("[proxy]\nnode_ports = [1, 1]\n").contains("proxy.node_ports[1]"));
        assert!(err_of("[proxy]\nnode_ports = [70000]\n").contains("node_ports"));
        assert_eq!(parse("").unwrap().proxy.pod_host_offsets, vec![0, 1]);
        let c = parse("[proxy]\npod_host_offsets = [3, 0]\n").unwrap();
        assert_eq!(c.proxy.pod_host_offsets, vec![0, 3]);
        assert!(
            err_of("[proxy]\npod_host_offsets = [1, 1]\n").contains("proxy.pod_host_offsets[1]")
        );
        let tls = "[proxy]\nmax_pending_handshakes = 7\n[proxy.tls]\nlisten = \"127.0.0.1:1\"\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"\n";
        let t = parse(tls).unwrap().proxy.tls.unwrap();
        assert!(t.client_names.is_empty());
        assert_eq!(t.max_pending_handshakes, 7, "defaults to proxy's");
        let t = parse(&format!(
            "{tls}client_names = [\"kube-apiserver-egress\"]\nmax_pending_handshakes = 3\n"
        ))
        .unwrap()
        .proxy
        .tls
        .unwrap();
        assert_eq!(t.client_names, vec!["kube-apiserver-egress".to_string()]);
        assert_eq!(t.max_pending_handshakes, 3);
        for (bad, key) in [
            ("client_names = [\"\"]", "proxy.tls.client_names[0]"),
            (
                "client_names = [\"a\", \"*.b\"]",
                "proxy.tls.client_names[1]",
            ),
            ("client_names = [\"a\", \"a\"]", "proxy.tls.client_names[1]"),
            (
                "max_pending_handshakes = 0",
                "proxy.tls.max_pending_handshakes",
            ),
        ] {
            assert!(err_of(&format!("{tls}{bad}\n")).contains(key), "{bad}");
        }
    }

    #[test]
    fn pod_network_cidrs_lie_inside_the_cluster_cidrs_and_outside_the_services() {
        let with = |cluster: &str, nets: &str| {
            parse(&format!(
                "[proxy]\nservice_cidrs = [\"10.96.0.0/12\"]\ncluster_cidrs = [{cluster}]\npod_network_cidrs = [{nets}]\n"
            ))
        };
        let c = with(
            "\"10.244.0.0/16\"",
            "\"10.244.0.0/17\", \"::ffff:10.244.128.0/113\"",
        )
        .unwrap();
        assert_eq!(
            c.proxy.pod_network_cidrs,
            vec![
                "10.244.0.0/17".parse::<IpNet>().unwrap(),
                "10.244.128.0/17".parse().unwrap()
            ]
        );
        // Unset cluster CIDRs bound nothing.
        let c = with("", "\"100.64.0.0/10\"").unwrap();
        assert_eq!(c.proxy.pod_network_cidrs.len(), 1);
        let e = with("\"10.244.0.0/16\"", "\"10.244.0.0/15\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy.pod_network_cidrs[0]")
                && e.contains("not inside proxy.cluster_cidrs"),
            "{e}"
        );
        let e = with("", "\"10.96.0.0/16\"").unwrap_err().to_string();
        assert!(
            e.contains("proxy.pod_network_cidrs[0]") && e.contains("service CIDR 10.96.0.0/12"),
            "{e}"
        );
        let e = with("", "\"127.0.0.0/8\"").unwrap_err().to_string();
        assert!(e.contains("proxy.pod_network_cidrs[0]"), "{e}");
        let e = with("", "\"10.244.0.1/16\"").unwrap_err().to_string();
        assert!(e.contains("host bits"), "{e}");
    }

    #[test]
    fn cluster_cidrs_bound_pod_cidrs() {
        let with = |cidrs: &str, pod: &str| {
            parse(&format!(
                "[proxy]\nservice_cidrs = [\"10.96.0.0/12\"]\ncluster_cidrs = [{cidrs}]\n[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\npod_cidrs = [\"{pod}\"]\n"
            ))
        };
        let c = with("\"10.244.0.0/16\"", "10.244.0.0/20").unwrap();
        assert_eq!(
            c.proxy.cluster_cidrs,
            vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
        let e = with("\"10.244.0.0/16\"", "10.245.1.0/24")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node[0].pod_cidrs[0]") && e.contains("not inside proxy.cluster_cidrs"),
            "{e}"
        );
        let e = with("\"10.0.0.0/8\"", "10.244.0.0/24")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("proxy.cluster_cidrs[0]") && e.contains("service CIDR"),
            "{e}"
        );
        let e = with("\"0.0.0.0/0\"", "10.244.0.0/24")
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.cluster_cidrs[0]"), "{e}");
    }
}
