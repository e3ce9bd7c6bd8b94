//! The integration tests, as one test binary: each former `tests/*.rs`
//! file is a module here, and they share one `common` harness.
//!
//! Why one binary: each test binary links the whole dependency tree
//! (russh, kube, k8s-openapi, rustls), so thirty of them spent most of a
//! test build linking and most of `target/` holding near-identical
//! executables. Run one file's tests with a filter on its module name:
//! `cargo test --test it -- streams::`.
//!
//! Sharing a process is safe for these tests: none sets environment
//! variables, installs a global tracing subscriber, changes rlimits or the
//! working directory; the processes they count or watch (daemons, sshd)
//! are their own children, and every cluster takes its own slot (network
//! namespaces, bridge, addresses) under a lock that is unique across
//! threads and processes.
//!
//! Kept apart, as their own binaries:
//! - `tests/zz_skipped.rs`, the skip summary: it must run after every
//!   other test binary, in its own process, so that it counts their skips
//!   and prints the last line of `cargo test` uncaptured;
//! - `tests/layers.rs` and `tests/docs.rs`: quick checks of the source tree
//!   and the docs that need no namespaces, run by name while working
//!   (`cargo test --test layers --test docs`) without building or starting
//!   the namespace suite.
//!
//! `common` is declared first, with `#[macro_use]`, so that
//! `require_netns!` is in scope in every module below it.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod access_log;
mod apiserver_dialer;
mod audit;
mod budget;
mod cli;
mod control;
mod datapath;
mod deploy;
mod edge;
mod failover;
mod fair_flow;
mod harness;
mod kube_discovery;
mod multi_conn;
mod operability;
mod prometheus;
mod properties;
mod resilience;
mod restart;
mod routing;
mod security;
mod security_local;
mod shards;
mod slow_readers;
mod stream_ends;
mod streams;
mod trust;
