//! The egress proxy: HTTP CONNECT as kube-apiserver speaks it.
//!
//! kube-apiserver opens one connection per dial and writes exactly
//! `CONNECT host:port HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`. The target comes
//! from the request line (the Host header is always 127.0.0.1). We open a
//! direct-tcpip channel on the routed tunnel and reply `200` only once the
//! node confirmed it; no byte follows the reply's headers until one side
//! speaks. Errors map to statuses the apiserver shows its users:
//!
//! | reply | when |
//! |---|---|
//! | 400 | malformed request |
//! | 405 | a method other than CONNECT |
//! | 403 | destination not allowed (not a node, pod or service address, or a port a node address does not allow); the reason names the setting that decides it |
//! | 503 | no healthy tunnel for the destination (after waiting up to `wait_for_healthy` for one coming up, see [`crate::proxy::healthy`]) |
//! | 502 | the node refused the channel (SSH reason in the reason phrase) |
//! | 504 | `dial_timeout` passed |
//!
//! Admission: every listener has its own budget of connections that have
//! not yet sent a complete head (on the mTLS listener, the TLS handshake
//! counts too). Past it, that listener turns new connections away at once;
//! a flood on one listener never makes another answer 503.
//!
//! Threads: accept, the TLS handshake and the head run on the control
//! runtime. Once a stream is routed to a node, the client connection moves
//! to that node's shard (see `shard`), with any bytes read past the head;
//! the channel open, the reply and the relay run there, beside the node's
//! SSH session. A pool dial picks its node first, then moves; a retry on a
//! node of another shard moves again.
//!
//! Its files: `head` parses the request head; `listen` holds the bound
//! listeners, their admission budgets and the accept loops; `refusal` maps
//! every refusal to its reply and metric; `dial` routes a stream, moves it
//! to its node's shard and relays it; `pool` picks the node of a pool dial.

pub mod access;
pub mod activation;
mod dial;
mod head;
pub(crate) mod healthy;
mod listen;
pub mod live;
mod pool;
mod refusal;
pub mod route;
pub mod sockets;
pub mod tls;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::DialMetrics;
use crate::proxy::live::LiveStreams;
use crate::proxy::route::{NodePorts, RouteTable};
use crate::tunnel::relay::{RelayBudget, RelayLimits};
use crate::tunnel::NodeTunnel;

pub use head::{parse_authority, parse_head, HeadError, Parsed, Target, MAX_HEADER_BYTES};
pub use listen::{HeadBudget, ProxyListener};

/// The live route table, swapped atomically when the node set changes.
pub type SharedRoutes = Arc<ArcSwap<RouteTable<Arc<NodeTunnel>>>>;

/// Settings the proxy needs at serve time.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Bound on waiting for a connecting tunnel plus the channel open.
    pub dial_timeout: Duration,
    /// Bound on waiting for a known tunnel to come up (inside `dial_timeout`).
    pub wait_for_healthy: Duration,
    /// Bound on reading the CONNECT head (and on a TLS handshake).
    pub handshake_timeout: Duration,
    /// Streams per node; past it new dials to the node get 503 at once.
    pub max_streams_per_node: u64,
    /// Carry node-addressed dials to 127.0.0.1 on the node.
    pub node_local_via_loopback: bool,
    /// Bounds on bytes buffered for slow clients.
    pub relay: RelayLimits,
    /// Ports allowed on node addresses besides each node's kubelet port.
    pub node_ports: NodePorts,
    /// Offsets in each pod CIDR that are the node's own address.
    pub pod_host_offsets: Vec<u32>,
    /// Write an access record per dial (target `tunneler::access`).
    pub access_log: bool,
}

impl ProxySettings {
    /// The proxy settings from validated config.
    pub fn from_config(p: &crate::config::ProxyConfig) -> ProxySettings {
        ProxySettings {
            dial_timeout: p.dial_timeout,
            wait_for_healthy: p.wait_for_healthy,
            handshake_timeout: p.handshake_timeout,
            max_streams_per_node: p.max_streams_per_node,
            node_local_via_loopback: p.node_local_via_loopback,
            relay: p.relay,
            node_ports: NodePorts {
                extra: p.node_ports.clone(),
            },
            pod_host_offsets: p.pod_host_offsets.clone(),
            access_log: p.access_log,
        }
    }
}

/// The egress proxy front end.
#[derive(Clone)]
pub struct EgressProxy {
    routes: SharedRoutes,
    settings: Arc<ArcSwap<ProxySettings>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// Stops the accept loops only; `cancel` also cuts connections.
    accepting: CancellationToken,
    next_stream: Arc<AtomicU64>,
    metrics: Arc<DialMetrics>,
    live: Arc<LiveStreams>,
}

impl EgressProxy {
    /// A proxy over `routes`. Connections are tracked on `tracker` and end
    /// when `cancel` fires.
    pub fn new(
        routes: SharedRoutes,
        settings: Arc<ArcSwap<ProxySettings>>,
        metrics: Arc<DialMetrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> EgressProxy {
        // The budget gauge shows the configured limit from the start; each
        // new stream re-applies it, so a reload takes effect there.
        RelayBudget::global().set_limit(settings.load().relay.buffer_budget);
        EgressProxy {
            routes,
            settings,
            tracker,
            accepting: cancel.clone(),
            cancel,
            next_stream: Arc::new(AtomicU64::new(1)),
            metrics,
            live: Arc::new(LiveStreams::default()),
        }
    }

    /// The streams open now, for the admin API.
    pub fn live_streams(&self) -> Arc<LiveStreams> {
        self.live.clone()
    }

    /// Makes the listeners stop accepting when `accepting` fires, while
    /// connections already accepted go on until they end or `cancel` fires
    /// (a graceful stop). The caller removes a Unix socket it bound after
    /// [`EgressProxy::serve`] returns; a socket passed in by the service
    /// manager stays, and new connections queue on it for the next daemon.
    pub fn stop_accepting_on(mut self, accepting: CancellationToken) -> EgressProxy {
        self.accepting = accepting;
        self
    }
}
