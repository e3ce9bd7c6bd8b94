//! tunneler: keeps a verified SSH tunnel to every cluster node and carries
//! kube-apiserver's egress traffic (HTTP CONNECT) through them.
//!
//! The library holds everything; `main.rs` parses the command line
//! (`cli`) and dispatches to `daemon::run` or the admin `client`.
//!
//! # Module map
//!
//! Layers, bottom up. A module uses only modules in its own layer or
//! below; a lower layer tells a higher one things by a value it returns, a
//! channel, or a trait the higher one implements (named below), never by
//! naming it. `.ci/check-cycles.py` prints the graph and fails on a cycle
//! between top-level modules; `tests/layers.rs` runs it under `cargo test`.
//!
//! 1. **Leaves** (nothing of ours, or only each other):
//!    `error` typed tunnel errors and their failure classes;
//!    `address` the shape of node addresses and pod CIDRs;
//!    `config` TOML shapes and validated types; `timestamp` times on
//!    the wire; `backoff` reconnect delays with full jitter;
//!    `known_hosts` host key verification; `sockets` binding Unix
//!    sockets safely; `keygen` `tunneler keygen`.
//! 2. **SSH**: `identity` the client key; `ssh_context` what every
//!    session shares (settings, keys, russh config) in a cell a reload
//!    swaps; `readahead` the read-ahead buffer under russh on the SSH
//!    socket; `session` one SSH session's connect, verify, authenticate.
//! 3. **Node tunnel**: `probe` the active health probe, which drives a
//!    node through its `Probed` trait; `tunnel` one supervised node (its
//!    sessions, state, drain, reconnect), which implements `Probed` and
//!    spawns the probe; `shard` the runtime model: one thread per shard,
//!    each owning its nodes' sessions and every relay of their streams.
//! 4. **Data path**: `route` the lock-free route table; `relay` one
//!    stream over one channel; `tls` the mTLS listener; `proxy` the
//!    HTTP CONNECT front end; `healthy` a dial's bounded wait for its
//!    tunnel to come up; `activation` listeners passed in by systemd
//!    (socket activation); `metrics` the Prometheus metrics, read from
//!    the tunnels' counters at scrape time.
//! 5. **Control**: `config_store` the running config and the change
//!    lock; `registry` the live node map; `sources` where nodes
//!    come from and how each discovery source is doing; `node_set` how
//!    discovered Nodes are admitted; `reload` what a reload applies,
//!    derived from the config types; `control` every node-set change;
//!    `readiness` the ready latch.
//! 6. **Discovery**: `discovery` the nodes file; `kube_watch` the
//!    Kubernetes API source. Both feed `control`.
//! 7. **Admin**: `status` the status document and its builder;
//!    `admin_api` the typed wire protocol; `admin` the server, given
//!    narrow handles; `client` the CLI's side; `cli` the command line;
//!    `logging` the subscriber `tunneler run` installs.
//! 8. **Composition root**: `daemon` wires it all (binds, starts the
//!    tunnels, proxy, sources and admin API, reloads, shuts down); nothing
//!    but `main.rs` uses it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod activation;
pub mod address;
pub(crate) mod admin;
pub mod admin_api;
pub(crate) mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod config_store;
pub mod control;
pub mod daemon;
pub mod discovery;
pub(crate) mod error;
pub(crate) mod healthy;
pub(crate) mod identity;
pub mod keygen;
pub mod known_hosts;
pub(crate) mod kube_watch;
pub mod logging;
pub(crate) mod metrics;
pub mod node_set;
pub(crate) mod probe;
pub mod proxy;
pub(crate) mod readahead;
pub(crate) mod readiness;
pub(crate) mod registry;
pub(crate) mod relay;
pub(crate) mod reload;
pub mod route;
pub(crate) mod session;
pub mod shard;
pub mod sockets;
pub mod sources;
pub(crate) mod ssh_context;
pub mod status;
pub mod timestamp;
pub mod tls;
pub(crate) mod tunnel;
