//! tunneler: keeps a verified SSH tunnel to every cluster node and carries
//! kube-apiserver's egress traffic (HTTP CONNECT) through them.
//!
//! The library holds everything; `main.rs` only parses the command line.
//! One module per concern:
//! - [`config`]: TOML shapes and validated types;
//! - [`tunnel`]: one supervised SSH connection per node;
//! - [`known_hosts`]: host key verification;
//! - [`identity`]: loading and checking the client key;
//! - [`route`]: the lock-free route table;
//! - [`proxy`] and [`relay`]: the HTTP CONNECT front end and stream relay;
//! - [`admin`], [`status`], [`client`]: the admin API and its client;
//! - [`daemon`]: wiring and shutdown.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

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
pub mod probe;
pub mod proxy;
pub mod relay;
pub mod route;
pub mod session;
pub mod sockets;
pub mod status;
pub mod tls;
pub mod tunnel;
