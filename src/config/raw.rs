//! The serde shapes: the file as written (strings for durations, paths as
//! given), every table `deny_unknown_fields` so that a misspelt key is an
//! error, not a silently ignored line. The section validators turn them
//! into the types the rest of the daemon uses.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) ssh: RawSsh,
    #[serde(default)]
    pub(super) reconnect: RawReconnect,
    #[serde(default)]
    pub(super) proxy: RawProxy,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    pub(super) health: Option<RawHealth>,
    pub(super) discovery: Option<RawDiscovery>,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    #[serde(default, rename = "node")]
    pub(super) nodes: Vec<NodeSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) shards: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSsh {
    pub(super) user: String,
    pub(super) identity_file: PathBuf,
    pub(super) known_hosts_file: PathBuf,
    pub(super) port: Option<u16>,
    pub(super) connect_timeout: Option<String>,
    pub(super) keepalive_interval: Option<String>,
    pub(super) keepalive_max: Option<usize>,
    pub(super) maximum_packet_size: Option<u32>,
    pub(super) window_min: Option<String>,
    pub(super) window_max: Option<String>,
    pub(super) window_rate: Option<String>,
    pub(super) connections_per_node: Option<usize>,
    pub(super) max_connections_per_node: Option<usize>,
    pub(super) extra_session_idle: Option<String>,
    pub(super) max_concurrent_handshakes: Option<usize>,
    pub(super) host_key_policy: Option<String>,
    pub(super) passphrase_file: Option<PathBuf>,
    pub(super) identity_agent: Option<PathBuf>,
    pub(super) certificate_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReconnect {
    pub(super) initial_backoff: Option<String>,
    pub(super) max_backoff: Option<String>,
    pub(super) stable_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) listen: Option<Vec<String>>,
    pub(super) service_cidrs: Option<Vec<String>>,
    pub(super) cluster_cidrs: Option<Vec<String>>,
    pub(super) pod_network_cidrs: Option<Vec<String>>,
    pub(super) dial_timeout: Option<String>,
    pub(super) wait_for_healthy: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) handshake_timeout: Option<String>,
    pub(super) max_pending_handshakes: Option<usize>,
    pub(super) max_streams_per_node: Option<u64>,
    pub(super) node_local_via_loopback: Option<bool>,
    pub(super) node_ports: Option<Vec<u16>>,
    pub(super) pod_host_offsets: Option<Vec<u32>>,
    pub(super) socket_group: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) relay_buffer_budget: Option<String>,
    pub(super) relay_stream_buffer_limit: Option<String>,
    pub(super) relay_session_floor: Option<String>,
    pub(super) relay_stopped_reader_timeout: Option<String>,
    pub(super) access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) listen: String,
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
    pub(super) client_ca_file: PathBuf,
    pub(super) client_names: Option<Vec<String>>,
    pub(super) max_pending_handshakes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) nodes_file: Option<PathBuf>,
    pub(super) address_types: Option<Vec<String>>,
    pub(super) kubernetes: Option<RawKube>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKube {
    pub(super) kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub(super) in_cluster: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) probe: String,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) unhealthy_after: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) socket: Option<PathBuf>,
    pub(super) socket_group: Option<String>,
    pub(super) admin_uids: Option<Vec<u32>>,
    pub(super) metrics_listen: Option<String>,
    pub(super) ready_min_healthy: Option<usize>,
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
