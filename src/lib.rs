//! tunneler: keeps a verified SSH tunnel to every cluster node and carries
//! kube-apiserver's egress traffic (HTTP CONNECT) through them.
//!
//! The library holds everything; `main.rs` only parses the command line.
//! One module per concern:
//! - [`config`]: TOML shapes and validated types; [`address`]: the shape
//!   of node addresses and pod CIDRs;
//! - [`tunnel`]: one supervised node (its sessions, state, drain, reconnect),
//!   [`session`]: one SSH session's connect, verify and authenticate,
//!   [`backoff`]: reconnect delays with full jitter;
//! - [`known_hosts`]: host key verification; [`identity`]: the client key;
//! - [`probe`]: the optional active health probe;
//! - [`route`]: the lock-free route table;
//! - [`proxy`], [`relay`], [`tls`], [`sockets`]: the HTTP CONNECT front end,
//!   the stream relay, the mTLS listener and safe Unix sockets;
//! - [`admin`], [`status`], [`client`], [`metrics`]: the admin API, its
//!   document, its client and the Prometheus metrics;
//! - [`discovery`], [`kube_watch`]: node sources besides the config, and
//!   [`node_set`]: how their Nodes are admitted one at a time;
//! - [`shard`]: the runtime model: one thread per shard, each node and
//!   its streams owned by one shard;
//! - [`daemon`]: wiring, live node-set changes, reload and shutdown;
//! - [`keygen`], [`error`]: `tunneler keygen`, and typed tunnel errors.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod admin;
pub mod backoff;
pub mod client;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod error;
pub mod identity;
pub mod keygen;
pub mod known_hosts;
pub mod kube_watch;
pub mod metrics;
pub mod node_set;
pub mod probe;
pub mod proxy;
pub mod relay;
pub mod route;
pub mod session;
pub mod shard;
pub mod sockets;
pub mod status;
pub mod tls;
pub mod tunnel;
