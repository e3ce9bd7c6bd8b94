//! End-to-end benchmark: the daemon's CONNECT path against OpenSSH
//! `ssh -L` and against direct TCP, side by side in one run, ending with one
//! table of the performance targets (figure | target | measured | met).
//!
//! Run as root: `cargo bench --bench e2e` (the full run, about 20 minutes
//! with 5000 simulated nodes), or `TUNNELER_BENCH_SMOKE=1 cargo bench
//! --bench e2e` (or `-- --smoke`) for a tiny run of every measurement that
//! only shows the tool works (CI runs it). Without root and network
//! namespaces it prints SKIP and exits 0.
//!
//! Paths, all to the same node namespace built by the integration-test
//! harness (real OpenSSH sshd, no default route):
//! - `direct`: TCP from the host to the node IP (the physical limit);
//! - `ssh -L`: OpenSSH's client, `-c aes128-gcm@openssh.com`, same key and
//!   known_hosts, forwarding a loopback port to the node;
//! - `daemon tcp` / `daemon unix`: `CONNECT` through the daemon's TCP and
//!   Unix listeners (the release build of this crate's `tunneler`).
//!
//! `TUNNELER_BENCH_SSH_EXTRA` adds `[ssh]` lines to every daemon's config,
//! for A/B runs of a setting (`window_min = "8MiB"`, say).
//!
//! Sections, in the order they run (`TUNNELER_BENCH_ONLY=a,b` picks some):
//! - `rtt_ms`: the keepalive round trip `status --json` shows on an idle
//!   link (default 10 s keepalive), against a direct TCP echo to the node
//!   after the same idle gap, measured at the same time. It runs first,
//!   before anything else has used the tunnel;
//! - `throughput`: one stream of `TUNNELER_BENCH_BYTES` (1 GiB) per path,
//!   three runs interleaved, with CPU seconds per GB;
//! - `rtt`: 64-byte round trips on an open stream, p50 and p99;
//! - `dial`: connect + CONNECT + one round trip, 500 sequential dials, then
//!   2000 dials with 100 in flight (p99 also against direct TCP's);
//! - `streams`: 50, 1000 and 10 000 streams (`TUNNELER_BENCH_STREAMS`) held
//!   open on one tunnel, then echoing on all at once (median of five
//!   rounds, more for small counts: 101 for 50), RSS per idle stream;
//! - `slow`: readers slower than their node (see [`slow`]);
//! - `window`: the SSH window's trade-off, one daemon per window: one
//!   stream's download speed against the delay a 2 MB/s reader's
//!   neighbours on its session pay;
//! - `aggregate`: four nodes of their own, one stream each at once: the one
//!   daemon against four `ssh -L` processes, one per node;
//! - `nodes`: 40 node namespaces with one sshd each, then 1000 and 5000
//!   simulated nodes (`TUNNELER_BENCH_NODES=1000,5000`): distinct addresses
//!   in 10.201-203.x.0/24 blocks on the `lo` of a few namespaces (1000 per
//!   sshd, `MaxStartups` above that). Time until all are healthy, daemon
//!   RSS (per idle tunnel too), and the daemon's CPU over an idle window
//!   (`/proc/<pid>/stat` utime+stime). sshd costs about 2 MiB per
//!   connection: a count the machine's `MemAvailable` (or pid limit) cannot
//!   hold prints n/a with the reason instead of running.
//!
//! The servers in the node namespace are this binary re-executed there
//! (`e2e __serve`): a source that writes as many bytes as asked, and a raw
//! echo. Every loop and wait is bounded; the harness tears everything down
//! in `Drop`, also on panic.
//!
//! Figures are printed, never asserted (timing belongs here, not in a pass
//! or fail); the targets table says met or NOT MET, and that is no error.
//! Correctness is checked, on every path and every byte: a fast relay that
//! loses, duplicates or corrupts data must not look good.
//! - Bulk data is a pseudo-random pattern ([`pattern`]) keyed by a seed the
//!   client sends with its request, so the node-side source and the client
//!   derive the same bytes. The client checks every chunk on arrival, and
//!   the stream must end (EOF) after exactly the bytes asked for.
//! - Every echo is compared with the message sent, each message a different
//!   slice of a per-stream pattern; a stream then half-closes and must see
//!   EOF with nothing extra.
//! - Any error (a failed dial, a mismatch, a short or long stream, a node
//!   that never became healthy) is collected, printed after the figures,
//!   and makes the bench exit 1. A path with no samples prints "n/a".

#[path = "../../tests/common/mod.rs"]
mod common;

mod aggregate;
mod checks;
mod dial;
mod nodes;
mod one_node;
mod paths;
/// The seeded byte pattern every bench stream carries (shared with the
/// soak harness).
#[path = "../support/pattern.rs"]
mod pattern;
mod report;
mod rtt;
mod rtt_ms;
mod serve;
mod setup;
mod sizes;
mod slow;
mod streams;
mod throughput;

use aggregate::*;
use checks::*;
use dial::*;
use nodes::*;
use one_node::*;
use paths::*;
use report::*;
use rtt::*;
use rtt_ms::*;
use serve::start_servers;
use setup::*;
use sizes::*;
use streams::*;
use throughput::*;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    cpu_seconds, free_tcp_port, raise_nofile, rss_kib, ChildGuard, Cluster, ClusterOptions,
    ConfigSpec, Daemon,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Port of the byte source in the node namespace.
const SOURCE_PORT: u16 = 7100;
/// Port of the raw echo server in the node namespace.
const ECHO_PORT: u16 = 7101;
/// Size of one latency message.
const MSG: usize = 64;
/// Bound on any single socket operation of the bench client.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__serve") {
        serve::main(&args[2..]);
        return;
    }
    started();
    let smoke = args.iter().any(|a| a == "--smoke")
        || std::env::var("TUNNELER_BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0");
    if !common::can_run("e2e bench") {
        println!("SKIP e2e bench: needs root, network namespaces, OpenSSH sshd and ssh-keygen");
        return;
    }
    let nofile = raise_nofile();
    // The daemons inherit this: per-stream debug logging would be measured.
    std::env::set_var("RUST_LOG", "warn");
    let sz = Sizes::new(smoke);
    if let Some(bad) = sz.only.iter().find(|o| !SECTIONS.contains(&o.as_str())) {
        eprintln!(
            "TUNNELER_BENCH_ONLY: no section {bad:?}; sections: {}",
            SECTIONS.join(",")
        );
        std::process::exit(2);
    }
    if !smoke && nofile < 2 * 10_000 + 100 {
        eprintln!("warning: open-files limit is {nofile}; 10 000 streams may fail");
    }

    let mut out = String::new();
    out.push_str(&format!(
        "tunneler e2e benchmark ({}) — {} cores, {}, open-files limit {nofile}\ndaemon binary: {}\n",
        if smoke {
            "SMOKE: tiny sizes, figures meaningless"
        } else {
            "full"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        ssh_version(),
        common::tunneler_bin(),
    ));
    out.push_str("Ratios are value / peer (ssh -L unless the column names another): above 1 is better for throughput, below 1 is better for times, CPU and memory.\n");

    let mut tables = Vec::new();
    let mut per_stream = HashMap::new();
    let mut idle_tunnel_rss = None;
    if SECTIONS[..7].iter().any(|s| sz.runs(s)) {
        let (t, ps, itr) = one_node(&sz);
        tables.extend(t);
        per_stream = ps;
        idle_tunnel_rss = Some(itr);
    }
    if sz.runs("slow") {
        tables.push(slow::fair_budget(&sz));
    }
    if sz.runs("aggregate") {
        tables.push(aggregate(&sz));
    }
    if sz.runs("nodes") {
        let real = real_nodes(&sz);
        let sims = sim_nodes(&sz);
        tables.push(nodes_table(&sz, &real, &sims, idle_tunnel_rss.map(|r| r.1)));
        let per_tunnel = sims
            .iter()
            .filter(|r| r.healthy_after.is_some())
            .max_by_key(|r| r.n)
            .map(SimResult::per_tunnel_kib);
        tables.push(memory_table(&sz, per_tunnel, idle_tunnel_rss, &per_stream));
    }
    tables.push(targets_table(&sz, smoke));

    for t in &tables {
        out.push_str(&t.render());
    }
    out.push_str(&format!(
        "\ntotal bench time {:.0} s\n",
        started().elapsed().as_secs_f64()
    ));
    let errors = std::mem::take(&mut *errors().lock().unwrap_or_else(|e| e.into_inner()));
    if errors.is_empty() {
        out.push_str("\nOK: every byte and every echo checked, no errors\n");
        println!("{out}");
        return;
    }
    out.push_str(&format!("\nFAILED: {} error(s)\n", errors.len()));
    for e in &errors {
        out.push_str(&format!("  error: {e}\n"));
    }
    println!("{out}");
    // Everything with a Drop (namespaces, daemons, servers) is gone by now.
    std::process::exit(1);
}
