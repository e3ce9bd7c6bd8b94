//! Configuration: the TOML shapes serde reads, and the validated types the
//! rest of the daemon uses.
//!
//! The two are kept apart on purpose. The serde shapes mirror the file
//! (strings for durations, paths as written); [`Config::from_toml`] turns them
//! into domain types (`Duration`, `IpNet`, absolute `PathBuf`s) and rejects
//! anything inconsistent. Code after validation never has to re-check config.

pub mod address;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::address::{
    canonical_ip, canonical_net, forbidden_address, forbidden_net, parse_ssh_address, AddressOrigin,
};

/// Where `tunneler run` looks for its config unless `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tunneler/tunneler.toml";
/// Where the admin socket lives unless the config or `--socket` says otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tunneler/admin.sock";

/// A config error names the offending key, so an operator can find it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path tried.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or shape error (unknown key, wrong type, missing key).
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value that parsed but does not make sense.
    #[error("invalid config: `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the key, e.g. `node[2].pod_cidrs`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    /// The error as a reason for rejecting one node: the field and what is
    /// wrong, without the "invalid config" framing (a discovered Node is not
    /// the operator's config).
    pub fn node_reason(&self) -> String {
        match self {
            ConfigError::Invalid { key, reason } => {
                format!("{}: {reason}", key.strip_prefix("node.").unwrap_or(key))
            }
            ConfigError::Parse(e) => e.clone(),
            other => other.to_string(),
        }
    }
}

/// `[ssh] maximum_packet_size` by default: the most russh accepts. sshd
/// then sends channel data in 256 KiB packets instead of 32 KiB ones.
pub const DEFAULT_MAXIMUM_PACKET_SIZE: u32 = 256 * 1024;
/// The smallest packet size every SSH implementation must accept (RFC 4253).
pub const MIN_MAXIMUM_PACKET_SIZE: u32 = 32 * 1024;
/// russh refuses to read packets bigger than this.
pub const MAX_MAXIMUM_PACKET_SIZE: u32 = 256 * 1024;

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// serde shapes
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    ssh: RawSsh,
    #[serde(default)]
    reconnect: RawReconnect,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    health: Option<RawHealth>,
    discovery: Option<RawDiscovery>,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default, rename = "node")]
    nodes: Vec<NodeSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    shards: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    user: String,
    identity_file: PathBuf,
    known_hosts_file: PathBuf,
    port: Option<u16>,
    connect_timeout: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_max: Option<usize>,
    maximum_packet_size: Option<u32>,
    window_min: Option<String>,
    window_max: Option<String>,
    window_rate: Option<String>,
    connections_per_node: Option<usize>,
    max_connections_per_node: Option<usize>,
    extra_session_idle: Option<String>,
    max_concurrent_handshakes: Option<usize>,
    host_key_policy: Option<String>,
    passphrase_file: Option<PathBuf>,
    identity_agent: Option<PathBuf>,
    certificate_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconnect {
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
    stable_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<Vec<String>>,
    service_cidrs: Option<Vec<String>>,
    cluster_cidrs: Option<Vec<String>>,
    pod_network_cidrs: Option<Vec<String>>,
    dial_timeout: Option<String>,
    wait_for_healthy: Option<String>,
    drain_timeout: Option<String>,
    handshake_timeout: Option<String>,
    max_pending_handshakes: Option<usize>,
    max_streams_per_node: Option<u64>,
    node_local_via_loopback: Option<bool>,
    node_ports: Option<Vec<u16>>,
    pod_host_offsets: Option<Vec<u32>>,
    socket_group: Option<String>,
    tls: Option<RawTls>,
    relay_buffer_budget: Option<String>,
    relay_stream_buffer_limit: Option<String>,
    relay_session_floor: Option<String>,
    relay_stopped_reader_timeout: Option<String>,
    access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: String,
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: PathBuf,
    client_names: Option<Vec<String>>,
    max_pending_handshakes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    nodes_file: Option<PathBuf>,
    address_types: Option<Vec<String>>,
    kubernetes: Option<RawKube>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKube {
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    in_cluster: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    probe: String,
    interval: Option<String>,
    timeout: Option<String>,
    unhealthy_after: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    admin_uids: Option<Vec<u32>>,
    metrics_listen: Option<String>,
    ready_min_healthy: Option<usize>,
}

/// One node as written: a `[[node]]` table, and the body of the admin
/// API's `POST /v1/nodes` (the same shape on purpose, so a node moves
/// between the file and the API unchanged). [`node_from_spec`] validates it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// SSH address (IP or DNS name).
    pub address: String,
    /// SSH port; `ssh.port` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// IPs that route to the node; the address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_ips: Option<Vec<String>>,
    /// Pod CIDRs of the node.
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    /// Further names that route to the node.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// DNS names of the node (`InternalDNS`, `ExternalDNS`) that route to
    /// it. Unlike `hostnames`, a DNS name two discovered Nodes share is not
    /// a conflict: it routes to neither, as a shared address does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Addresses of the node's own host network inside the pod range (a
    /// CNI's tunnel or router address). They route nowhere by themselves;
    /// a dial to one is held to the node port policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_addresses: Vec<String>,
    /// The kubelet's port on the node, when not 10250.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet_port: Option<u16>,
}

// ---------------------------------------------------------------------------
// validated types
// ---------------------------------------------------------------------------

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// SSH client settings shared by every node.
    pub ssh: SshConfig,
    /// Reconnect backoff.
    pub reconnect: ReconnectConfig,
    /// The egress (HTTP CONNECT) front end.
    pub proxy: ProxyConfig,
    /// The admin API.
    pub admin: AdminConfig,
    /// The optional active health probe.
    pub health: Option<HealthConfig>,
    /// Node sources besides the static list.
    pub discovery: DiscoveryConfig,
    /// Threads and runtimes.
    pub runtime: RuntimeConfig,
    /// Statically configured nodes (`[[node]]`, hence the serialized name).
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
}

/// The most shards `runtime.shards` may ask for: more threads than that
/// only cost memory and wake-ups on any machine we run on.
pub const MAX_SHARDS: usize = 256;

/// Threads and runtimes (see `shard`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Shard threads, each owning the nodes placed on it. Defaults to the
    /// available cores. Restart.
    pub shards: usize,
}

impl RuntimeConfig {
    fn validate(raw: RawRuntime) -> Result<RuntimeConfig, ConfigError> {
        let shards = match raw.shards {
            Some(n) if (1..=MAX_SHARDS).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    "runtime.shards",
                    format!(
                        "{n}: must be between 1 and {MAX_SHARDS} (default: the available cores)"
                    ),
                ))
            }
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, MAX_SHARDS),
        };
        Ok(RuntimeConfig { shards })
    }
}

/// SSH client settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SshConfig {
    /// Remote user.
    pub user: String,
    /// Private key, absolute.
    pub identity_file: PathBuf,
    /// known_hosts file, absolute.
    pub known_hosts_file: PathBuf,
    /// Default SSH port for nodes that do not set one.
    pub port: u16,
    /// Bound on the TCP connect, and separately on handshake + auth.
    pub connect_timeout: Duration,
    /// Interval between keepalives.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the session is declared dead.
    pub keepalive_max: usize,
    /// Largest SSH packet we let the node send on a channel. Bigger packets
    /// mean fewer packets, reads and decrypt calls per byte relayed.
    pub maximum_packet_size: u32,
    /// The SSH window of each session, from the link's round trip.
    pub window: WindowBounds,
    /// SSH connections per node; streams are spread across them.
    pub connections_per_node: usize,
    /// Sessions per node at most, counting extra sessions opened on demand
    /// while every session is congested by a slow reader.
    pub max_connections_per_node: usize,
    /// An extra session that carried no stream for this long is closed.
    pub extra_session_idle: Duration,
    /// Handshakes in flight at once, over all nodes: a thousand nodes
    /// starting together must not swamp us or a shared sshd's MaxStartups.
    pub max_concurrent_handshakes: usize,
    /// What to do with a host that known_hosts does not know.
    pub host_key_policy: HostKeyPolicy,
    /// File holding the passphrase of an encrypted identity file.
    pub passphrase_file: Option<PathBuf>,
    /// ssh-agent socket that holds the identity; `identity_file` then names
    /// its public key (or a private key with a `.pub` beside it).
    pub identity_agent: Option<PathBuf>,
    /// OpenSSH user certificate for the identity.
    pub certificate_file: Option<PathBuf>,
}

/// How a session's SSH window is sized: one bandwidth-delay product of
/// the node's link at `rate`, kept within `min..=max`.
///
/// russh re-opens a channel's window as data *arrives*, so when one of a
/// session's streams is held for a slow reader, up to one window of its
/// data sits in the TCP stream ahead of every other stream's packets, and
/// each of those waits for the slow reader to drain it. A window of one
/// bandwidth-delay product keeps a stream at full speed and makes that
/// wait as short as the link allows. russh fixes the window per session at
/// connect, so it is chosen then, from the round trip of the TCP
/// handshake (and the lowest keepalive round trip the node has shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowBounds {
    /// The smallest window (also the window of a link too short to
    /// measure). Below about this, one stream no longer fills a LAN link.
    pub min: u32,
    /// The largest window: what a long link gets.
    pub max: u32,
    /// The per-stream rate, bytes per second, the window must sustain.
    pub rate: u64,
}

/// `ssh.window_min` by default: measured (1 GiB single-stream runs
/// against `ssh -L`, windows interleaved) as the smallest window at which
/// one stream moves within the run's noise of the 8 MiB window's speed on
/// a LAN link; 128 KiB cost a quarter of it, and CPU per byte.
pub const DEFAULT_WINDOW_MIN: u32 = 1 << 20;
/// `ssh.window_max` by default: the fixed window every session had before
/// windows were sized, enough for 500 MB/s over 16 ms.
pub const DEFAULT_WINDOW_MAX: u32 = 8 << 20;
/// `ssh.window_rate` by default: about OpenSSH sshd's ceiling for one
/// stream on this class of machine.
pub const DEFAULT_WINDOW_RATE: u64 = 512 << 20;
/// Bounds on what `ssh.window_min` and `ssh.window_max` may be: one
/// packet of the smallest size, and half of the 32-bit window field.
const WINDOW_FLOOR: u32 = 32 << 10;
const WINDOW_CEILING: u32 = 1 << 30;

impl WindowBounds {
    /// The window for a link with round trip `rtt` (`None`: not measured,
    /// which takes the smallest).
    pub fn for_rtt(&self, rtt: Option<Duration>) -> u32 {
        let Some(rtt) = rtt else { return self.min };
        let bdp = (self.rate as f64 * rtt.as_secs_f64()).min(self.max as f64);
        (bdp as u32).clamp(self.min, self.max)
    }
}

impl Default for WindowBounds {
    fn default() -> WindowBounds {
        WindowBounds {
            min: DEFAULT_WINDOW_MIN,
            max: DEFAULT_WINDOW_MAX,
            rate: DEFAULT_WINDOW_RATE,
        }
    }
}

fn validate_window(
    min: Option<String>,
    max: Option<String>,
    rate: Option<String>,
) -> Result<WindowBounds, ConfigError> {
    let d = WindowBounds::default();
    let bound = |key: &str, v: Option<String>, default: u32| -> Result<u32, ConfigError> {
        let n = parse_size(key, v.as_ref(), default as usize)?;
        if !(WINDOW_FLOOR as usize..=WINDOW_CEILING as usize).contains(&n) {
            return Err(invalid(key, "must be between 32KiB and 1GiB"));
        }
        Ok(n as u32)
    };
    let w = WindowBounds {
        min: bound("ssh.window_min", min, d.min)?,
        max: bound("ssh.window_max", max, d.max)?,
        rate: parse_size("ssh.window_rate", rate.as_ref(), d.rate as usize)? as u64,
    };
    if w.min > w.max {
        return Err(invalid(
            "ssh.window_min",
            "must not be greater than ssh.window_max",
        ));
    }
    if w.rate == 0 {
        return Err(invalid("ssh.window_rate", "must be greater than zero"));
    }
    Ok(w)
}

/// `[ssh] host_key_policy`. There is deliberately no value that turns host
/// key verification off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum HostKeyPolicy {
    /// Only hosts known_hosts trusts are accepted (the default).
    #[default]
    Strict,
    /// A host with no known_hosts entry at all has its key recorded and is
    /// accepted; a host whose key changed is still refused.
    AcceptNew,
}

/// Reconnect backoff settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconnectConfig {
    /// First retry delay (upper bound of the jittered delay).
    pub initial_backoff: Duration,
    /// Cap on the retry delay; also the retry interval for rejected nodes.
    pub max_backoff: Duration,
    /// A session that lived this long resets the backoff.
    pub stable_after: Duration,
}

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

/// Bounds on the bytes the relay holds for clients that read slower than
/// their node sends. Past them the relay stops draining the channel, which
/// slows the node down (see `relay`); nothing is reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RelayLimits {
    /// Bytes all streams together may hold, at every moment. Near it the
    /// sessions with the largest backlog are held first.
    pub buffer_budget: usize,
    /// Bytes one stream may hold before its drain waits for its client.
    pub stream_buffer_limit: usize,
    /// Bytes each SSH session may hold outside the budget, whatever the
    /// budget holds: the allowance that keeps a session flowing while
    /// stalled streams elsewhere fill the budget.
    pub session_floor: usize,
    /// A stream whose client has taken nothing for this long while its
    /// drain holds a session other streams ride on is reset: it would
    /// freeze them for as long as its client stays connected.
    pub stopped_reader_timeout: Duration,
}

impl Default for RelayLimits {
    fn default() -> RelayLimits {
        RelayLimits {
            buffer_budget: 512 << 20,
            stream_buffer_limit: 8 << 20,
            session_floor: 1 << 20,
            stopped_reader_timeout: Duration::from_secs(60),
        }
    }
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

/// What the health probe checks, from the node's side of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ProbeTarget {
    /// `http://host:port/path`: a GET that must answer 2xx.
    Http {
        /// Host as dialed on the node (usually 127.0.0.1).
        host: String,
        /// Port.
        port: u16,
        /// Path and query.
        path: String,
    },
    /// `tcp://host:port`: the channel open must succeed.
    Tcp {
        /// Host as dialed on the node.
        host: String,
        /// Port.
        port: u16,
    },
}

/// Node sources besides `[[node]]` and the admin API.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DiscoveryConfig {
    /// A watched `kubectl get nodes -o json` file.
    pub nodes_file: Option<PathBuf>,
    /// Which `status.addresses` type is the SSH address, in preference order.
    pub address_types: Vec<String>,
    /// Watch Node objects in the Kubernetes API.
    pub kubernetes: Option<KubeSource>,
}

/// How to reach the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum KubeSource {
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
    /// The pod's service account.
    InCluster,
}

/// The active health probe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthConfig {
    /// What to check.
    pub probe: ProbeTarget,
    /// Time between probes of one node.
    pub interval: Duration,
    /// Bound on one probe.
    pub timeout: Duration,
    /// Consecutive failures before the node is `unhealthy`.
    pub unhealthy_after: u32,
}

/// Admin API settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    /// The admin Unix socket.
    pub socket: PathBuf,
    /// Group that may use the admin socket (mode 0660 then).
    pub socket_group: Option<String>,
    /// Extra uids allowed on the admin socket besides root and our own.
    pub admin_uids: Vec<u32>,
    /// Optional TCP address serving `GET /metrics` only.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `/readyz` answers 200 when at least this many nodes are healthy.
    pub ready_min_healthy: usize,
}

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

fn parse_duration(
    key: &str,
    value: Option<&String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let d = humantime::parse_duration(v.trim()).map_err(|e| {
        invalid(
            key,
            format!("{v:?} is not a duration with a unit (like \"5s\" or \"250ms\"): {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

/// Parses a byte size with a binary unit: `"512MiB"`, `"900KiB"`, `"1GiB"`
/// or `"65536B"`. A unit is required, as for durations, so that a bare
/// number is never read in the wrong unit.
fn parse_size(key: &str, value: Option<&String>, default: usize) -> Result<usize, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let t = v.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => {
            return Err(invalid(
                key,
                format!("{v:?} is not a size with a unit (B, KiB, MiB or GiB, like \"64MiB\")"),
            ))
        }
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1usize << shift))
        .ok_or_else(|| invalid(key, format!("{v:?} is not a size this machine can hold")))
}

fn validate_relay(
    budget: Option<String>,
    stream_limit: Option<String>,
    session_floor: Option<String>,
    stopped_reader_timeout: Option<String>,
) -> Result<RelayLimits, ConfigError> {
    let d = RelayLimits::default();
    let r = RelayLimits {
        buffer_budget: parse_size(
            "proxy.relay_buffer_budget",
            budget.as_ref(),
            d.buffer_budget,
        )?,
        stream_buffer_limit: parse_size(
            "proxy.relay_stream_buffer_limit",
            stream_limit.as_ref(),
            d.stream_buffer_limit,
        )?,
        session_floor: parse_size(
            "proxy.relay_session_floor",
            session_floor.as_ref(),
            d.session_floor,
        )?,
        stopped_reader_timeout: parse_duration(
            "proxy.relay_stopped_reader_timeout",
            stopped_reader_timeout.as_ref(),
            d.stopped_reader_timeout,
        )?,
    };

    // One SSH packet (at most 64 KiB here) must always fit, or a stream
    // could never make progress; 1 MiB leaves room for several streams.
    if r.buffer_budget < 1 << 20 {
        return Err(invalid(
            "proxy.relay_buffer_budget",
            "must be at least 1MiB",
        ));
    }
    if r.stream_buffer_limit < 256 << 10 {
        return Err(invalid(
            "proxy.relay_stream_buffer_limit",
            "must be at least 256KiB",
        ));
    }
    if r.stream_buffer_limit > r.buffer_budget {
        return Err(invalid(
            "proxy.relay_stream_buffer_limit",
            "must not be greater than proxy.relay_buffer_budget",
        ));
    } // One packet of the largest size must fit in the floor, or a session
      // could need the budget for a single packet.
    if r.session_floor < MAX_MAXIMUM_PACKET_SIZE as usize {
        return Err(invalid(
            "proxy.relay_session_floor",
            "must be at least 256KiB (one SSH packet of the largest size)",
        ));
    }
    if r.session_floor > r.buffer_budget {
        return Err(invalid(
            "proxy.relay_session_floor",
            "must not be greater than proxy.relay_buffer_budget",
        ));
    }
    Ok(r)
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
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

fn parse_cidr(key: &str, s: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| invalid(key, format!("{s:?} is not a CIDR like 10.244.1.0/24")))?;
    if net.trunc() != net {
        return Err(invalid(
            key,
            format!("{s:?} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
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

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        let base = abs.parent().unwrap_or(Path::new("/"));
        Config::from_toml(&text, base)
    }

    /// Parses and validates TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Config::validate(raw, base)
    }

    fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
        let s = raw.ssh;
        if s.user.trim().is_empty() {
            return Err(invalid("ssh.user", "must not be empty"));
        }
        if s.port == Some(0) {
            return Err(invalid("ssh.port", "must not be 0"));
        }
        let keepalive_max = s.keepalive_max.unwrap_or(3);
        if keepalive_max == 0 {
            return Err(invalid("ssh.keepalive_max", "must be at least 1"));
        }
        let host_key_policy = match s.host_key_policy.as_deref() {
            None | Some("strict") => HostKeyPolicy::Strict,
            Some("accept-new") => HostKeyPolicy::AcceptNew,
            Some(other) => {
                return Err(invalid(
                    "ssh.host_key_policy",
                    format!("{other:?}: expected \"strict\" or \"accept-new\" (host key verification cannot be turned off)"),
                ))
            }
        };
        if s.identity_agent.is_some() && s.passphrase_file.is_some() {
            return Err(invalid(
                "ssh.passphrase_file",
                "cannot be used with ssh.identity_agent: the agent holds the decrypted key",
            ));
        }
        let connections_per_node = match s.connections_per_node {
            None => 1,
            Some(n @ 1..=16) => n,
            Some(_) => {
                return Err(invalid(
                    "ssh.connections_per_node",
                    "must be between 1 and 16",
                ))
            }
        };
        // Extra sessions are opened only while every session is congested
        // by a slow reader; 8 keeps a few spare without swamping sshd.
        let max_connections_per_node = match s.max_connections_per_node {
            None => connections_per_node.max(8),
            Some(n) if (connections_per_node..=64).contains(&n) => n,
            Some(_) => {
                return Err(invalid(
                    "ssh.max_connections_per_node",
                    "must be between ssh.connections_per_node and 64",
                ))
            }
        };
        let ssh = SshConfig {
            user: s.user,
            identity_file: resolve(base, &s.identity_file),
            known_hosts_file: resolve(base, &s.known_hosts_file),
            port: s.port.unwrap_or(22),
            connect_timeout: parse_duration(
                "ssh.connect_timeout",
                s.connect_timeout.as_ref(),
                Duration::from_secs(10),
            )?,
            keepalive_interval: parse_duration(
                "ssh.keepalive_interval",
                s.keepalive_interval.as_ref(),
                Duration::from_secs(10),
            )?,
            keepalive_max,
            maximum_packet_size: match s.maximum_packet_size {
                None => DEFAULT_MAXIMUM_PACKET_SIZE,
                Some(n) if (MIN_MAXIMUM_PACKET_SIZE..=MAX_MAXIMUM_PACKET_SIZE).contains(&n) => n,
                Some(_) => {
                    return Err(invalid(
                        "ssh.maximum_packet_size",
                        format!(
                            "must be between {MIN_MAXIMUM_PACKET_SIZE} and {MAX_MAXIMUM_PACKET_SIZE} bytes"
                        ),
                    ))
                }
            },
            window: validate_window(s.window_min, s.window_max, s.window_rate)?,
            connections_per_node,
            max_connections_per_node,
            extra_session_idle: parse_duration(
                "ssh.extra_session_idle",
                s.extra_session_idle.as_ref(),
                Duration::from_secs(60),
            )?,
            max_concurrent_handshakes: match s.max_concurrent_handshakes {
                None => 64,
                Some(0) => {
                    return Err(invalid(
                        "ssh.max_concurrent_handshakes",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
            },
            host_key_policy,
            passphrase_file: s.passphrase_file.map(|p| resolve(base, &p)),
            identity_agent: s.identity_agent.map(|p| resolve(base, &p)),
            certificate_file: s.certificate_file.map(|p| resolve(base, &p)),
        };

        let r = raw.reconnect;
        let reconnect = ReconnectConfig {
            initial_backoff: parse_duration(
                "reconnect.initial_backoff",
                r.initial_backoff.as_ref(),
                Duration::from_secs(1),
            )?,
            max_backoff: parse_duration(
                "reconnect.max_backoff",
                r.max_backoff.as_ref(),
                Duration::from_secs(30),
            )?,
            stable_after: parse_duration(
                "reconnect.stable_after",
                r.stable_after.as_ref(),
                Duration::from_secs(30),
            )?,
        };
        if reconnect.initial_backoff > reconnect.max_backoff {
            return Err(invalid(
                "reconnect.initial_backoff",
                "must not be greater than reconnect.max_backoff",
            ));
        }

        let p = raw.proxy;
        let listen_raw = p
            .listen
            .unwrap_or_else(|| vec!["unix:///run/tunneler/egress.sock".to_string()]);
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
        let mut service_cidrs = Vec::new();
        for (i, c) in p.service_cidrs.unwrap_or_default().iter().enumerate() {
            service_cidrs.push(parse_cidr(&format!("proxy.service_cidrs[{i}]"), c)?);
        }
        let mut cluster_cidrs = Vec::new();
        for (i, c) in p.cluster_cidrs.unwrap_or_default().iter().enumerate() {
            let key = format!("proxy.cluster_cidrs[{i}]");
            let net = crate::config::address::canonical_net(parse_cidr(&key, c)?);
            if let Some(why) = crate::config::address::forbidden_net(net) {
                return Err(invalid(key, why));
            }
            if let Some(s) = service_cidrs
                .iter()
                .find(|s| s.contains(&net.network()) || net.contains(&s.network()))
            {
                return Err(invalid(key, format!("{net} overlaps the service CIDR {s}")));
            }
            cluster_cidrs.push(net);
        }
        let mut pod_network_cidrs: Vec<IpNet> = Vec::new();
        for (i, c) in p.pod_network_cidrs.unwrap_or_default().iter().enumerate() {
            let key = format!("proxy.pod_network_cidrs[{i}]");
            let net = canonical_net(parse_cidr(&key, c)?);
            if let Some(why) = forbidden_net(net) {
                return Err(invalid(key, why));
            }
            if let Some(s) = service_cidrs
                .iter()
                .find(|s| s.contains(&net.network()) || net.contains(&s.network()))
            {
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
        let max_pending_handshakes = match p.max_pending_handshakes {
            Some(0) => {
                return Err(invalid(
                    "proxy.max_pending_handshakes",
                    "must be at least 1",
                ))
            }
            Some(n) => n,
            None => 1024,
        };
        let dial_timeout = parse_duration(
            "proxy.dial_timeout",
            p.dial_timeout.as_ref(),
            Duration::from_secs(5),
        )?;
        // Zero is allowed here: no wait, 503 at once.
        let wait_for_healthy = match p.wait_for_healthy.as_ref() {
            Some(v) if humantime::parse_duration(v.trim()).is_ok_and(|d| d.is_zero()) => {
                Duration::ZERO
            }
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
        let proxy = ProxyConfig {
            listen,
            service_cidrs,
            cluster_cidrs,
            pod_network_cidrs,
            dial_timeout,
            wait_for_healthy,
            drain_timeout: parse_duration(
                "proxy.drain_timeout",
                p.drain_timeout.as_ref(),
                Duration::from_secs(60),
            )?,
            handshake_timeout: parse_duration(
                "proxy.handshake_timeout",
                p.handshake_timeout.as_ref(),
                Duration::from_secs(10),
            )?,
            max_pending_handshakes,
            max_streams_per_node: match p.max_streams_per_node {
                Some(0) => return Err(invalid("proxy.max_streams_per_node", "must be at least 1")),
                Some(n) => n,
                None => 4096,
            },
            node_local_via_loopback: p.node_local_via_loopback.unwrap_or(false),
            access_log: p.access_log.unwrap_or(true),
            node_ports: validate_node_ports(p.node_ports.unwrap_or_default())?,
            pod_host_offsets: validate_pod_host_offsets(
                p.pod_host_offsets
                    .unwrap_or_else(|| DEFAULT_POD_HOST_OFFSETS.to_vec()),
            )?,
            socket_group: validate_group("proxy.socket_group", p.socket_group)?,
            tls: match p.tls {
                None => None,
                Some(t) => Some(TlsConfig {
                    listen: t.listen.parse().map_err(|_| {
                        invalid("proxy.tls.listen", format!("{:?} is not IP:PORT", t.listen))
                    })?,
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
                }),
            },
            relay: validate_relay(
                p.relay_buffer_budget,
                p.relay_stream_buffer_limit,
                p.relay_session_floor,
                p.relay_stopped_reader_timeout,
            )?,
        };
        let health = raw.health.map(validate_health).transpose()?;
        let runtime = RuntimeConfig::validate(raw.runtime)?;
        let discovery = match raw.discovery {
            None => DiscoveryConfig::default(),
            Some(d) => {
                // A discovered SSH address must be an IP literal (see
                // `address`), so the DNS-valued types cannot name one.
                const KNOWN: [&str; 2] = ["InternalIP", "ExternalIP"];
                let address_types = d
                    .address_types
                    .unwrap_or_else(|| vec!["InternalIP".into(), "ExternalIP".into()]);
                if address_types.is_empty() {
                    return Err(invalid("discovery.address_types", "must not be empty"));
                }
                for (i, t) in address_types.iter().enumerate() {
                    if !KNOWN.contains(&t.as_str()) {
                        return Err(invalid(
                            format!("discovery.address_types[{i}]"),
                            format!("{t:?} is not one of {}", KNOWN.join(", ")),
                        ));
                    }
                }
                let kubernetes = match d.kubernetes {
                    None => None,
                    Some(RawKube {
                        kubeconfig: Some(_),
                        in_cluster: true,
                    }) => {
                        return Err(invalid(
                            "discovery.kubernetes",
                            "set either kubeconfig or in_cluster = true, not both",
                        ))
                    }
                    Some(RawKube {
                        kubeconfig: Some(p),
                        ..
                    }) => Some(KubeSource::Kubeconfig(resolve(base, &p))),
                    Some(RawKube {
                        kubeconfig: None,
                        in_cluster: true,
                    }) => Some(KubeSource::InCluster),
                    Some(_) => {
                        return Err(invalid(
                            "discovery.kubernetes",
                            "needs kubeconfig = \"PATH\" or in_cluster = true",
                        ))
                    }
                };
                DiscoveryConfig {
                    nodes_file: d.nodes_file.map(|p| resolve(base, &p)),
                    address_types,
                    kubernetes,
                }
            }
        };

        let admin = AdminConfig {
            socket: raw
                .admin
                .socket
                .map(|s| resolve(base, &s))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            socket_group: validate_group("admin.socket_group", raw.admin.socket_group)?,
            admin_uids: raw.admin.admin_uids.unwrap_or_default(),
            metrics_listen: match raw.admin.metrics_listen {
                None => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    invalid(
                        "admin.metrics_listen",
                        format!("{a:?} is not IP:PORT, e.g. 127.0.0.1:9464"),
                    )
                })?),
            },
            ready_min_healthy: raw.admin.ready_min_healthy.unwrap_or(1),
        };
        if proxy
            .listen
            .contains(&ListenAddr::Unix(admin.socket.clone()))
        {
            return Err(invalid(
                "admin.socket",
                "is the same path as a proxy listener",
            ));
        }

        let mut nodes = Vec::new();
        for (i, n) in raw.nodes.into_iter().enumerate() {
            let key = format!("node[{i}]");
            let node = validate_node(&key, n, ssh.port, AddressOrigin::Operator)?;
            check_pod_scope(&key, &node, &proxy.cluster_cidrs)?;
            nodes.push(node);
        }
        check_node_set(&nodes, &proxy.service_cidrs)?;

        Ok(Config {
            ssh,
            reconnect,
            proxy,
            admin,
            health,
            discovery,
            runtime,
            nodes,
        })
    }
}

fn validate_group(key: &str, g: Option<String>) -> Result<Option<String>, ConfigError> {
    match g {
        Some(g) if g.trim().is_empty() => Err(invalid(key, "must not be empty")),
        Some(g) if g.contains(|c: char| c.is_whitespace() || c == ':' || c == '/') => {
            Err(invalid(key, format!("{g:?} is not a group name")))
        }
        other => Ok(other),
    }
}

fn validate_health(h: RawHealth) -> Result<HealthConfig, ConfigError> {
    let uri: hyper::Uri = h.probe.parse().map_err(|_| {
        invalid(
            "health.probe",
            format!(
                "{:?} is not a URL like http://127.0.0.1:10248/healthz or tcp://127.0.0.1:10250",
                h.probe
            ),
        )
    })?;
    let host = uri
        .host()
        .map(|s| s.trim_start_matches('[').trim_end_matches(']').to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("health.probe", "needs a host"))?;
    let probe = match uri.scheme_str() {
        Some("http") => ProbeTarget::Http {
            host,
            port: uri.port_u16().unwrap_or(80),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
        },
        Some("tcp") => ProbeTarget::Tcp {
            host,
            port: uri
                .port_u16()
                .ok_or_else(|| invalid("health.probe", "tcp:// needs a port"))?,
        },
        _ => {
            return Err(invalid(
                "health.probe",
                "scheme must be http:// or tcp:// (https is not supported: kubelet's healthz is plain HTTP on loopback)",
            ))
        }
    };
    let interval = parse_duration(
        "health.interval",
        h.interval.as_ref(),
        Duration::from_secs(30),
    )?;
    let timeout = parse_duration("health.timeout", h.timeout.as_ref(), Duration::from_secs(5))?;
    if timeout > interval {
        return Err(invalid(
            "health.timeout",
            "must not be longer than health.interval",
        ));
    }
    let unhealthy_after = h.unhealthy_after.unwrap_or(3);
    if unhealthy_after == 0 {
        return Err(invalid("health.unhealthy_after", "must be at least 1"));
    }
    Ok(HealthConfig {
        probe,
        interval,
        timeout,
        unhealthy_after,
    })
}

/// Validates one node given as the raw TOML/JSON shape (also used by the
/// admin API's `POST /v1/nodes`).
pub fn node_from_json(
    value: serde_json::Value,
    default_port: u16,
) -> Result<NodeConfig, ConfigError> {
    let raw: NodeSpec =
        serde_json::from_value(value).map_err(|e| ConfigError::Parse(e.to_string()))?;
    validate_node("node", raw, default_port, AddressOrigin::Operator)
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

fn validate_node(
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
    let internal_ips = match n.internal_ips {
        Some(list) => {
            if list.is_empty() {
                return Err(invalid(
                    format!("{key}.internal_ips"),
                    "must not be empty when set (omit it to default to the address)",
                ));
            }
            let mut ips = Vec::new();
            for (j, s) in list.iter().enumerate() {
                let ip: IpAddr = s.trim().parse().map_err(|_| {
                    invalid(format!("{key}.internal_ips[{j}]"), format!("{s:?} is not an IP address"))
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
            ips
        }
        None => match address.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                return Err(invalid(
                    format!("{key}.internal_ips"),
                    format!(
                        "must be set because the address {address:?} is not an IP: dials by node name need an IP the node's sshd can reach"
                    ),
                ))
            }
        },
    };
    let mut pod_cidrs = Vec::new();
    for (j, c) in n.pod_cidrs.iter().enumerate() {
        let k = format!("{key}.pod_cidrs[{j}]");
        let net = canonical_net(parse_cidr(&k, c)?);
        if let Some(why) = forbidden_net(net) {
            return Err(invalid(k, why));
        }
        if !pod_cidrs.contains(&net) {
            pod_cidrs.push(net);
        }
    }
    let mut hostnames = Vec::new();
    for (j, h) in n.hostnames.iter().enumerate() {
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
        if h != n.name && !hostnames.contains(&h) {
            hostnames.push(h);
        }
    }
    let mut dns_names = Vec::new();
    for (j, h) in n.dns_names.iter().enumerate() {
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
        if h != n.name && !hostnames.contains(&h) && !dns_names.contains(&h) {
            dns_names.push(h);
        }
    }
    let mut host_addresses = Vec::new();
    for (j, s) in n.host_addresses.iter().enumerate() {
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
                if d.internal_ips.iter().any(|o| canonical_ip(*o) == ip) {
                    return Err(invalid(
                        format!("node[{i}].internal_ips"),
                        format!(
                            "{ip} is already an internal IP of discovered node {:?}",
                            d.name
                        ),
                    ));
                }
                if let Some(c) = d
                    .pod_cidrs
                    .iter()
                    .find(|c| canonical_net(**c).contains(&ip))
                {
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
                if let Some(c) = n
                    .pod_cidrs
                    .iter()
                    .find(|c| canonical_net(**c).contains(&ip))
                {
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
                if let Some(oc) = d
                    .pod_cidrs
                    .iter()
                    .map(|o| canonical_net(*o))
                    .find(|oc| oc.contains(&c.network()) || c.contains(&oc.network()))
                {
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
    let mut names = HashSet::new();
    let mut ips: HashMap<IpAddr, &str> = HashMap::new();
    let mut cidrs: Vec<(IpNet, &str)> = Vec::new();
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
    // A node address wins over pod and service routes, so one inside
    // another node's pod CIDR or a service CIDR would take those over.
    for (i, n) in nodes.iter().enumerate() {
        for ip in &n.internal_ips {
            let ip = canonical_ip(*ip);
            if let Some(s) = service_cidrs.iter().find(|s| s.contains(&ip)) {
                return Err(invalid(
                    format!("node[{i}].internal_ips"),
                    format!("{ip} is inside the service CIDR {s}"),
                ));
            }
            for o in nodes.iter().filter(|o| o.name != n.name) {
                if let Some(c) = o
                    .pod_cidrs
                    .iter()
                    .find(|c| canonical_net(**c).contains(&ip))
                {
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
                if oc.contains(&c.network()) || c.contains(&oc.network()) {
                    return Err(invalid(
                        format!("node[{i}].pod_cidrs"),
                        format!("{c} overlaps {oc} of node {owner:?}"),
                    ));
                }
            }
            for s in service_cidrs {
                if s.contains(&c.network()) || c.contains(&s.network()) {
                    return Err(invalid(
                        format!("node[{i}].pod_cidrs"),
                        format!("{c} overlaps the service CIDR {s}"),
                    ));
                }
            }
            cidrs.push((*c, &n.name));
        }
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
    use super::*;

    const BASE: &str = r#"
[ssh]
user = "tunneler"
identity_file = "keys/id_ed25519"
known_hosts_file = "keys/known_hosts"
"#;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}{extra}"), Path::new("/etc/tunneler"))
    }

    #[test]
    fn the_ssh_window_is_bounded_and_sized_to_the_link() {
        let w = parse("").unwrap().ssh.window;
        assert_eq!(w, WindowBounds::default());
        assert_eq!(
            w.for_rtt(None),
            DEFAULT_WINDOW_MIN,
            "unmeasured: the smallest"
        );
        // A LAN round trip asks for less than the floor.
        assert_eq!(
            w.for_rtt(Some(Duration::from_micros(100))),
            DEFAULT_WINDOW_MIN
        );
        // 4 ms at 512 MiB/s is 2.1 MB.
        assert_eq!(w.for_rtt(Some(Duration::from_millis(4))), 2_147_483);
        // A long link gets the ceiling, never more.
        assert_eq!(
            w.for_rtt(Some(Duration::from_secs(3600))),
            DEFAULT_WINDOW_MAX
        );
        let c = parse("window_min = \"64KiB\"\nwindow_max = \"64MiB\"\nwindow_rate = \"1GiB\"\n")
            .unwrap();
        assert_eq!(
            c.ssh.window,
            WindowBounds {
                min: 64 << 10,
                max: 64 << 20,
                rate: 1 << 30
            }
        );
        for (extra, key, why) in [
            (
                "window_min = \"16KiB\"",
                "ssh.window_min",
                "between 32KiB and 1GiB",
            ),
            (
                "window_max = \"2GiB\"",
                "ssh.window_max",
                "between 32KiB and 1GiB",
            ),
            (
                "window_min = \"1MiB\"\nwindow_max = \"512KiB\"",
                "ssh.window_min",
                "not be greater",
            ),
            (
                "window_rate = \"0B\"",
                "ssh.window_rate",
                "greater than zero",
            ),
            ("window_rate = \"fast\"", "ssh.window_rate", "with a unit"),
        ] {
            match parse(&format!("{extra}\n")) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{extra}");
                    assert!(reason.contains(why), "{extra}: {reason}");
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn relay_limits_take_sizes_with_units() {
        let c = parse(
            "[proxy]\nrelay_buffer_budget = \"8MiB\"\nrelay_stream_buffer_limit = \"4MiB\"\nrelay_session_floor = \"512KiB\"\nrelay_stopped_reader_timeout = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(
            c.proxy.relay,
            RelayLimits {
                buffer_budget: 8 << 20,
                stream_buffer_limit: 4 << 20,
                session_floor: 512 << 10,
                stopped_reader_timeout: Duration::from_secs(120),
            }
        );
        assert_eq!(parse("").unwrap().proxy.relay, RelayLimits::default());
        for (extra, key, why) in [
            (
                "relay_buffer_budget = \"512\"",
                "proxy.relay_buffer_budget",
                "with a unit",
            ),
            (
                "relay_buffer_budget = \"1MB\"",
                "proxy.relay_buffer_budget",
                "with a unit",
            ),
            (
                "relay_buffer_budget = \"512KiB\"",
                "proxy.relay_buffer_budget",
                "at least 1MiB",
            ),
            (
                "relay_buffer_budget = \"99999999999999GiB\"",
                "proxy.relay_buffer_budget",
                "can hold",
            ),
            (
                "relay_buffer_budget = \"2MiB\"\nrelay_stream_buffer_limit = \"4MiB\"",
                "proxy.relay_stream_buffer_limit",
                "not be greater",
            ),
            (
                "relay_stream_buffer_limit = \"128KiB\"",
                "proxy.relay_stream_buffer_limit",
                "at least 256KiB",
            ),
            (
                "relay_session_floor = \"128KiB\"",
                "proxy.relay_session_floor",
                "at least 256KiB",
            ),
            (
                "relay_buffer_budget = \"2MiB\"\nrelay_stream_buffer_limit = \"1MiB\"\nrelay_session_floor = \"4MiB\"",
                "proxy.relay_session_floor",
                "not be greater",
            ),
            (
                "relay_session_floor = \"1\"",
                "proxy.relay_session_floor",
                "with a unit",
            ),
            (
                "relay_stopped_reader_timeout = \"0s\"",
                "proxy.relay_stopped_reader_timeout",
                "greater than zero",
            ),
            (
                "relay_stopped_reader_timeout = \"60\"",
                "proxy.relay_stopped_reader_timeout",
                "with a unit",
            ),
        ] {
            match parse(&format!("[proxy]\n{extra}\n")) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{extra}");
                    assert!(reason.contains(why), "{extra}: {reason}");
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn maximum_packet_size_defaults_to_256k_and_is_range_checked() {
        assert_eq!(parse("").unwrap().ssh.maximum_packet_size, 262_144);
        let c = parse("maximum_packet_size = 65535\n").unwrap();
        assert_eq!(c.ssh.maximum_packet_size, 65535);
        for bad in ["32767", "262145", "0"] {
            match parse(&format!("maximum_packet_size = {bad}\n")) {
                Err(ConfigError::Invalid { key, reason }) => {
                    assert_eq!(key, "ssh.maximum_packet_size");
                    assert_eq!(reason, "must be between 32768 and 262144 bytes");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_documented_shape_parses() {
        let c = parse(
            r#"
[reconnect]
initial_backoff = "1s"
max_backoff = "30s"

[proxy]
listen = ["unix:///run/tunneler/egress.sock", "tcp://127.0.0.1:8131"]
service_cidrs = ["10.96.0.0/12"]

[admin]
socket = "/run/tunneler/admin.sock"

[[node]]
name = "node-1"
address = "10.0.0.11"
pod_cidrs = ["10.244.1.0/24"]
"#,
        )
        .unwrap();
        assert_eq!(
            c.ssh.identity_file,
            PathBuf::from("/etc/tunneler/keys/id_ed25519")
        );
        assert_eq!(c.ssh.port, 22);
        assert_eq!(
            c.nodes[0].internal_ips,
            vec!["10.0.0.11".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.nodes[0].endpoint(), "10.0.0.11:22");
        assert_eq!(c.proxy.dial_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.listen.len(), 2);
    }

    #[test]
    fn health_probe() {
        let c = parse("[health]\nprobe = \"http://127.0.0.1:10248/healthz\"\n").unwrap();
        let h = c.health.unwrap();
        assert_eq!(
            h.probe,
            ProbeTarget::Http {
                host: "127.0.0.1".into(),
                port: 10248,
                path: "/healthz".into()
            }
        );
        assert_eq!(h.unhealthy_after, 3);
        let t = parse(
            "[health]\nprobe = \"tcp://127.0.0.1:10250\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n",
        )
        .unwrap();
        assert!(matches!(
            t.health.unwrap().probe,
            ProbeTarget::Tcp { port: 10250, .. }
        ));
        assert!(err_of("[health]\nprobe = \"https://x:1/\"\n").contains("health.probe"));
        assert!(err_of("[health]\nprobe = \"tcp://x\"\n").contains("health.probe"));
        assert!(
            err_of("[health]\nprobe = \"tcp://x:1\"\ninterval = \"1s\"\ntimeout = \"2s\"\n")
                .contains("health.timeout")
        );
    }

    #[test]
    fn zero_nodes_is_valid() {
        assert!(parse("").unwrap().nodes.is_empty());
    }

    fn err_of(extra: &str) -> String {
        parse(extra).unwrap_err().to_string()
    }

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
    fn errors_name_the_key() {
        assert!(err_of("[proxy]\nbogus = 1\n").contains("bogus"));
        assert!(err_of("[proxy]\ndial_timeout = \"5\"\n").contains("proxy.dial_timeout"));
        assert!(err_of("[proxy]\nservice_cidrs = [\"10.96.0.0/33\"]\n")
            .contains("proxy.service_cidrs[0]"));
        assert!(err_of("[proxy]\nlisten = [\"tcp://0.0.0.0:8131\"]\n").contains("loopback"));
        assert!(
            err_of("[reconnect]\ninitial_backoff = \"1m\"\nmax_backoff = \"1s\"\n")
                .contains("reconnect.initial_backoff")
        );
        let dup = "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\n[[node]]\nname = \"a\"\naddress = \"10.0.0.2\"\n";
        assert!(err_of(dup).contains("node[1].name"));
        let overlap = "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\npod_cidrs = [\"10.244.0.0/22\"]\n[[node]]\nname = \"b\"\naddress = \"10.0.0.2\"\npod_cidrs = [\"10.244.1.0/24\"]\n";
        assert!(err_of(overlap).contains("node[1].pod_cidrs"));
        let host_bits =
            "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\npod_cidrs = [\"10.244.1.1/24\"]\n";
        assert!(err_of(host_bits).contains("host bits"));
        let dns = "[[node]]\nname = \"a\"\naddress = \"node-a.example\"\n";
        assert!(err_of(dns).contains("node[0].internal_ips"));
        let bad_name = "[[node]]\nname = \"Node_A\"\naddress = \"10.0.0.1\"\n";
        assert!(err_of(bad_name).contains("node[0].name"));
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
    fn missing_user_is_named() {
        let e = Config::from_toml(
            "[ssh]\nidentity_file = \"a\"\nknown_hosts_file = \"b\"\n",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("user"), "{e}");
    }

    #[test]
    fn runtime_shards_default_to_the_cores_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(parse("").unwrap().runtime.shards, cores.min(MAX_SHARDS));
        assert_eq!(parse("[runtime]\nshards = 3\n").unwrap().runtime.shards, 3);
        assert_eq!(
            parse(&format!("[runtime]\nshards = {MAX_SHARDS}\n"))
                .unwrap()
                .runtime
                .shards,
            MAX_SHARDS
        );
        for bad in ["0", "257"] {
            let e = parse(&format!("[runtime]\nshards = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("runtime.shards") && e.contains("between 1 and 256"),
                "{e}"
            );
        }
        let e = parse("[runtime]\nshards = -1\n").unwrap_err().to_string();
        assert!(e.contains("shards"), "{e}");
        let e = parse("[runtime]\nthreads = 2\n").unwrap_err().to_string();
        assert!(e.contains("threads"), "{e}");
    }

    #[test]
    fn ssh_identity_and_trust_keys() {
        let c = parse("").unwrap();
        assert_eq!(c.ssh.host_key_policy, HostKeyPolicy::Strict);
        assert_eq!(c.ssh.passphrase_file, None);
        let c = Config::from_toml(
            "[ssh]\nuser = \"u\"\nidentity_file = \"k\"\nknown_hosts_file = \"kh\"\nhost_key_policy = \"accept-new\"\npassphrase_file = \"pass\"\ncertificate_file = \"k-cert.pub\"\n",
            Path::new("/etc/t"),
        )
        .unwrap();
        assert_eq!(c.ssh.host_key_policy, HostKeyPolicy::AcceptNew);
        assert_eq!(c.ssh.passphrase_file, Some(PathBuf::from("/etc/t/pass")));
        assert_eq!(
            c.ssh.certificate_file,
            Some(PathBuf::from("/etc/t/k-cert.pub"))
        );
        let e = Config::from_toml(
            "[ssh]\nuser = \"u\"\nidentity_file = \"k\"\nknown_hosts_file = \"kh\"\nhost_key_policy = \"no\"\n",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ssh.host_key_policy"), "{e}");
        let e = Config::from_toml(
            "[ssh]\nuser = \"u\"\nidentity_file = \"k\"\nknown_hosts_file = \"kh\"\nidentity_agent = \"/a.sock\"\npassphrase_file = \"p\"\n",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ssh.passphrase_file"), "{e}");
    }

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

    #[test]
    fn ipv6_nodes() {
        let c =
            parse("[[node]]\nname = \"v6\"\naddress = \"fd00::11\"\npod_cidrs = [\"fd10::/64\"]\n")
                .unwrap();
        assert_eq!(c.nodes[0].endpoint(), "[fd00::11]:22");
    }
}
