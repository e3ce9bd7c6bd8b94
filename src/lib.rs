//! tunneler: keeps a verified SSH tunnel to every cluster node and carries
//! kube-apiserver's egress traffic (HTTP CONNECT) through them.
//!
//! The library holds everything; `main.rs` parses the command line
//! ([`cli`]) and dispatches to [`daemon::run`] or the admin [`client`].
//! Modules by layer, lowest first; a module uses only modules above it in
//! this list (the lower layers):
//! - leaves: [`config`] (TOML shapes and validated types), [`address`]
//!   (node addresses and pod CIDRs), [`error`] (typed tunnel errors),
//!   [`timestamp`] (times on the wire);
//! - SSH: [`session`] (one session's connect, verify, authenticate),
//!   [`known_hosts`], [`identity`], [`keygen`];
//! - the node tunnel: [`tunnel`] (one supervised node: sessions, state,
//!   drain, reconnect), [`backoff`], [`probe`] (the active health probe);
//! - the proxy: [`proxy`], [`relay`], [`route`], [`tls`], [`sockets`];
//!   and [`metrics`];
//! - control: [`config_store`] (the running config and the change lock),
//!   [`registry`] (the live node map), [`sources`] (where nodes
//!   come from, how each discovery source is doing), [`node_set`]
//!   (admitting discovered Nodes), [`reload`] (what a reload applies,
//!   derived from the config types), [`control`] (every node-set change),
//!   [`readiness`];
//! - discovery: [`discovery`] (the nodes file), [`kube_watch`];
//! - admin: [`status`] (the status document and its builder),
//!   [`admin_api`] (the typed wire protocol), [`admin`] (the server),
//!   [`client`] (the CLI's side), [`cli`] (the command line);
//! - [`daemon`]: the composition root, which nothing but `main` uses.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod admin;
pub mod admin_api;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod config_store;
pub mod control;
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
pub mod readiness;
pub mod registry;
pub mod relay;
pub mod reload;
pub mod route;
pub mod session;
pub mod sockets;
pub mod sources;
pub mod status;
pub mod timestamp;
pub mod tls;
pub mod tunnel;
