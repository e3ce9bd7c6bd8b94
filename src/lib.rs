//! The library holds everything; `main.rs` parses the command line
//! (`cli`) and dispatches to `daemon::run` or the admin client. Each
//! folder is a room with one concern, and each file in it one part of
//! that concern; the folder's module doc lists its files.
//!
//! # Module map
//!
//! The tree is the architecture: one directory per layer, bottom up. A
//! module uses only modules in its own layer or below; a lower layer tells
//! a higher one things by a value it returns, a channel, or a trait the
//! higher one implements, never by naming it. `.ci/check-cycles.py` prints
//! the graph of the top-level modules and fails on a cycle;
//! `tests/layers.rs` runs it under `cargo test`.
//!
//! 1. **Leaves**: `error` typed tunnel errors and their failure classes;
//!    `config/` the TOML shapes (`raw`), the validated types with their
//!    defaults and one validation function per section (`ssh`, `proxy`,
//!    `relay`, `admin`, `discovery`, `runtime`), the node rules (`node`,
//!    `node_set`, `address`: the shape of node addresses and pod CIDRs,
//!    with the one CIDR `overlaps`) and the reload `effects` table beside
//!    the types it describes; `timestamp` times on the wire; `shard` the
//!    runtime model: one thread per shard, each owning
//!    its nodes' sessions and every relay of their streams; `memory`
//!    handing freed memory back to the system.
//! 2. **`ssh/`**: `identity` the client key, `known_hosts` host key
//!    verification, `keygen`, `context` what every session shares to
//!    connect (in a cell a reload swaps), `readahead` the read buffer
//!    under russh, `session` one SSH session's connect, verify,
//!    authenticate.
//! 3. **`tunnel/`**: one supervised node: `state` its states and their
//!    pure transitions, `supervisor` its life (connect, backoff, rejection,
//!    make-before-break) behind a `Connect` trait, `live` a session's
//!    keepalives and retirement, `load` and `open` the sessions' load and
//!    channel opens, `settings` the tunnel's own reloadable settings
//!    (backoff, probe, drain), `backoff`, `probe` (the active health
//!    probe, which drives a node through its `Probed` trait), `relay`
//!    (one stream over one channel, whose backpressure holds the node's
//!    session) and `flow` (the relay's memory: per-session floors and the
//!    shared budget).
//! 4. **`metrics/`**: the Prometheus metrics, read from the tunnels'
//!    counters at scrape time by a collector that walks a table of rows.
//! 5. **`proxy/`**: the HTTP CONNECT front end: `head` the pure CONNECT
//!    parser, `listen` listeners and admission, `refusal` the answers that
//!    refuse, `dial` and `pool` routing a dial to a node, `route` the
//!    lock-free route table, `tls` the mTLS listener, `sockets` safe Unix
//!    sockets, `activation` listeners passed in by systemd, `healthy` a
//!    dial's bounded wait for its tunnel to come up, `access` the access
//!    log, `live` the open streams.
//! 6. **`control/`**: every node-set change and reload, with
//!    `config_store` the running config and the change lock, `registry` the
//!    live node map, `sources` where nodes come from, `node_set` how
//!    discovered Nodes are admitted, `reload` what a reload changes (the
//!    diff over the config's effects table), `readiness` the ready latch.
//! 7. **`discovery/`**: the nodes file, and `kube_watch` the Kubernetes API
//!    source; both feed `control`.
//! 8. **`admin/`**: the admin API server, given narrow handles, with `api`
//!    the typed wire protocol shared with `client` (the CLI's side) and
//!    `status` the status document and its builder. `cli` the command line
//!    and `logging` the subscriber `tunneler run` installs sit beside it.
//! 9. **Composition root**: `daemon` wires it all (binds, starts the
//!    shards, tunnels, proxy, sources and admin API, reloads, shuts down),
//!    with `daemon::signals` every signal it handles (held back during the
//!    start, reload, stop, a second stop); nothing but `main.rs` uses it.
//!
//! # What is public
//!
//! Every module is private. The items below are re-exported for the
//! binary (its commands, the daemon and what runs around it) and for the
//! integration tests, benches and fuzz targets (the parsers, the route
//! table, node admission and the typed documents they drive directly).
//! Everything else is the crate's own, so the compiler reports what
//! nothing uses.

// Two calls need `unsafe`, and each allows it for itself alone: glibc's
// `malloc_trim`, in `memory`, and the kernel's `TCP_INFO` round trip of a
// fresh SSH socket, in `ssh::session` (no safe wrapper exposes it).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod cli;
mod config;
mod control;
mod daemon;
mod discovery;
mod error;
mod logging;
mod memory;
mod metrics;
mod proxy;
mod shard;
mod ssh;
mod text;
mod timestamp;
mod tunnel;

// The binary: its commands, the daemon, and what runs around it.
pub use admin::api::{Request, StreamsQuery};
pub use admin::client;
pub use cli::{check_config, keygen, manpages, Cli, Command, LogFormat};
pub use config::Config;
pub use daemon::{run, signals};
pub use logging::init as init_logging;
pub use proxy::activation::{take_listen_fds, PassedSockets};

// The integration tests, benches and fuzz targets.
pub use admin::api::{DrainChanged, ReloadReport};
pub use admin::status::{AmbiguousAddress, NodeStatus, StatusDocument, TunnelState};
pub use config::address::{
    canonical_ip, canonical_net, check_pod_scope, forbidden_address, forbidden_net, AddressOrigin,
};
pub use config::{check_node_set, node_from_spec, HostKeyPolicy, ListenAddr, NodeConfig};
pub use control::node_set::{admit, Context as AdmitContext};
pub use control::sources::{Source, SourceStatus};
pub use discovery::candidate_from_value;
pub use proxy::access::FIELDS as ACCESS_LOG_FIELDS;
pub use proxy::route::{Route, RouteTable};
pub use proxy::sockets::stage;
pub use proxy::tls::{certificate_names, name_allowed};
pub use proxy::{parse_authority, parse_head, Parsed, MAX_HEADER_BYTES};
pub use ssh::known_hosts::{KnownHostsFile, Verdict};
