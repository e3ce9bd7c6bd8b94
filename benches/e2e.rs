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

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ChildGuard, Cluster, ClusterOptions, ConfigSpec, Daemon};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Port of the byte source in the node namespace.
const SOURCE_PORT: u16 = 7100;
/// Port of the raw echo server in the node namespace.
const ECHO_PORT: u16 = 7101;
/// Size of one latency message.
const MSG: usize = 64;
/// Bound on any single socket operation of the bench client.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

/// Every section, in the order they run (`TUNNELER_BENCH_ONLY` names).
const SECTIONS: [&str; 9] = [
    "rtt_ms",
    "throughput",
    "rtt",
    "dial",
    "streams",
    "slow",
    "window",
    "aggregate",
    "nodes",
];

/// How much each measurement does; `smoke` makes everything tiny.
struct Sizes {
    /// Sections to run (`TUNNELER_BENCH_ONLY`); all when empty.
    only: Vec<String>,
    bulk_bytes: u64,
    bulk_runs: usize,
    rtt_count: usize,
    dial_seq: usize,
    dial_total: usize,
    dial_in_flight: usize,
    streams: Vec<usize>,
    open_concurrency: usize,
    real_nodes: usize,
    /// Simulated node counts, one daemon run each (`TUNNELER_BENCH_NODES`).
    sim_nodes: Vec<usize>,
    /// Simulated nodes served by one sshd (one namespace each).
    sim_per_sshd: usize,
    /// Seconds over which the daemon's idle CPU is read at each count.
    idle_cpu_secs: u64,
    /// Runs of the aggregate (4 nodes at once) throughput.
    agg_runs: usize,
    /// Rounds of "echo on all at once" per concurrent-stream count.
    echo_rounds: usize,
    /// Keepalive round trips read from `status` (`rtt_ms` section).
    status_rtt_samples: usize,
    /// Seconds of the single 2 MB/s slow reader (`slow`).
    slow_secs: u64,
    /// Seconds of each of the ten slow readers at once.
    slow_many_secs: u64,
    /// Seconds of the slow reader that neighbour streams run beside.
    slow_neigh_secs: u64,
    /// Bytes of the `kubectl cp`-like copy at 20 MB/s.
    cp_bytes: u64,
}

/// A comma-separated list of positive counts from the environment, if set
/// and not empty.
fn counts_from_env(var: &str) -> Option<Vec<usize>> {
    let v = std::env::var(var).ok()?;
    let counts: Vec<usize> = v
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect();
    (!counts.is_empty()).then_some(counts)
}

impl Sizes {
    fn new(smoke: bool) -> Sizes {
        let mut sz = Sizes::preset(smoke);
        sz.only = std::env::var("TUNNELER_BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(b) = std::env::var("TUNNELER_BENCH_BYTES")
            .ok()
            .and_then(|b| b.parse().ok())
        {
            sz.bulk_bytes = b;
        }
        if let Some(counts) = counts_from_env("TUNNELER_BENCH_NODES") {
            sz.sim_nodes = counts;
        }
        if let Some(counts) = counts_from_env("TUNNELER_BENCH_STREAMS") {
            sz.streams = counts;
        }
        sz
    }

    /// Rounds of "echo on all at once" for `n` streams: a round of 50
    /// streams takes about 2 ms, so five of them made a median that moved
    /// by half between runs; small counts get more rounds, up to 101, for
    /// about 5000 stream round trips in all.
    fn echo_rounds_for(&self, n: usize) -> usize {
        let more = (5000 / n.max(1)) | 1;
        self.echo_rounds.max(more.min(101))
    }

    /// Whether section `name` runs.
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    fn preset(smoke: bool) -> Sizes {
        if smoke {
            Sizes {
                only: Vec::new(),
                bulk_bytes: 8 << 20,
                bulk_runs: 1,
                rtt_count: 20,
                dial_seq: 20,
                dial_total: 50,
                dial_in_flight: 10,
                streams: vec![50],
                open_concurrency: 10,
                real_nodes: 3,
                sim_nodes: vec![5],
                // Two sshd namespaces even here, so that path runs in CI.
                sim_per_sshd: 3,
                idle_cpu_secs: 3,
                agg_runs: 1,
                echo_rounds: 2,
                status_rtt_samples: 1,
                slow_secs: 2,
                slow_many_secs: 2,
                // Enough bytes to pass the per-stream limit and be held.
                slow_neigh_secs: 8,
                cp_bytes: 16 << 20,
            }
        } else {
            Sizes {
                only: Vec::new(),
                bulk_bytes: 1 << 30,
                bulk_runs: 3,
                rtt_count: 10_000,
                dial_seq: 500,
                dial_total: 2000,
                dial_in_flight: 100,
                streams: vec![50, 1000, 10_000],
                open_concurrency: 100,
                real_nodes: 40,
                sim_nodes: vec![1000, 5000],
                sim_per_sshd: 1000,
                idle_cpu_secs: 30,
                agg_runs: 3,
                echo_rounds: 5,
                status_rtt_samples: 6,
                slow_secs: 60,
                slow_many_secs: 20,
                slow_neigh_secs: 30,
                cp_bytes: 512 << 20,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The byte pattern and the error list
// ---------------------------------------------------------------------------

/// The seeded byte pattern every bench stream carries (shared with the
/// soak harness).
#[path = "support/pattern.rs"]
mod pattern;

/// A fresh seed for each stream, so that bytes of one stream showing up
/// on another are caught too.
fn next_seed() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    pattern::word(
        0x7475_6e6e_656c_6572,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    )
}

/// Every correctness failure of this run; any makes the bench exit 1.
fn errors() -> &'static std::sync::Mutex<Vec<String>> {
    static E: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();
    E.get_or_init(Default::default)
}

/// Records a correctness failure (shown after the figures; exit 1).
fn fail(what: String) {
    progress(&format!("ERROR: {what}"));
    errors()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(what);
}

// ---------------------------------------------------------------------------
// The targets table
// ---------------------------------------------------------------------------

/// The performance targets, in the order the closing table lists them:
/// (key, section that measures it, figure, target). Sections fill in their
/// rows with [`record`]; a row no section filled says why.
const TARGETS: &[(&str, &str, &str, &str)] = &[
    (
        "throughput tcp",
        "throughput",
        "single-stream throughput, TCP listener",
        "≥ 1.2× ssh -L",
    ),
    (
        "throughput unix",
        "throughput",
        "single-stream throughput, Unix listener",
        "≥ 1.2× ssh -L",
    ),
    (
        "aggregate tcp",
        "aggregate",
        "aggregate throughput, 4 nodes × 1 stream, TCP",
        "≥ 1.0× 4 ssh -L",
    ),
    (
        "aggregate unix",
        "aggregate",
        "aggregate throughput, 4 nodes × 1 stream, Unix",
        "≥ 1.0× 4 ssh -L",
    ),
    (
        "rtt tcp",
        "rtt",
        "64 B round-trip p50, TCP",
        "≤ 0.9× ssh -L",
    ),
    (
        "rtt unix",
        "rtt",
        "64 B round-trip p50, Unix",
        "≤ 0.9× ssh -L",
    ),
    ("dial p50 tcp", "dial", "dial p50, TCP", "≤ 1.0× ssh -L"),
    ("dial p50 unix", "dial", "dial p50, Unix", "≤ 1.0× ssh -L"),
    (
        "dial seq tcp",
        "dial",
        "dial p99, sequential dials, TCP",
        "≤ 2 ms",
    ),
    (
        "dial seq unix",
        "dial",
        "dial p99, sequential dials, Unix",
        "≤ 2 ms",
    ),
    (
        "dial flight tcp",
        "dial",
        "dial p99, dials in flight, TCP",
        "≤ 1.5× direct TCP",
    ),
    (
        "dial flight unix",
        "dial",
        "dial p99, dials in flight, Unix",
        "≤ 1.5× direct TCP",
    ),
    (
        "echo50 tcp",
        "streams",
        "50 streams echoing at once, one tunnel, TCP",
        "≤ 1.0× ssh -L",
    ),
    (
        "echo50 unix",
        "streams",
        "50 streams echoing at once, one tunnel, Unix",
        "≤ 1.0× ssh -L",
    ),
    ("rss tunnel", "nodes", "RSS per idle tunnel", "≤ 64 KiB"),
    (
        "nodes healthy",
        "nodes",
        "5000 simulated nodes: all healthy after",
        "≤ 30 s",
    ),
    (
        "nodes rss",
        "nodes",
        "5000 simulated nodes: daemon RSS",
        "≤ 400 MiB",
    ),
    (
        "idle cpu",
        "nodes",
        "idle CPU at 1000 nodes, keepalive 10 s",
        "≤ 2 % of one core",
    ),
    (
        "rtt_ms",
        "rtt_ms",
        "status rtt_ms, idle link, keepalive 10 s",
        "≤ direct TCP echo + 1 ms",
    ),
];

/// What a section measured for one target, and whether it is met (`None`:
/// not measurable in this run; `measured` says why).
struct Outcome {
    measured: String,
    met: Option<bool>,
}

fn outcomes() -> &'static std::sync::Mutex<HashMap<&'static str, Outcome>> {
    static O: std::sync::OnceLock<std::sync::Mutex<HashMap<&'static str, Outcome>>> =
        std::sync::OnceLock::new();
    O.get_or_init(Default::default)
}

/// Fills in the targets-table row `key` (one of [`TARGETS`]).
fn record(key: &'static str, measured: String, met: Option<bool>) {
    assert!(TARGETS.iter().any(|t| t.0 == key), "no target row {key}");
    outcomes()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, Outcome { measured, met });
}

/// Records `value / peer` against `limit`: met when the ratio is at most
/// `limit` (`at_most`) or at least `limit`. `shown` is the value as printed.
fn record_ratio(
    key: &'static str,
    shown: impl Fn(f64) -> String,
    value: Option<f64>,
    peer: Option<f64>,
    peer_label: &str,
    limit: f64,
    at_most: bool,
) {
    match (value, peer) {
        (Some(v), Some(p)) if p > 0.0 && v.is_finite() => {
            let r = v / p;
            record(
                key,
                format!("{} = {r:.2}× {peer_label} ({})", shown(v), shown(p)),
                Some(if at_most { r <= limit } else { r >= limit }),
            );
        }
        (Some(v), _) => record(
            key,
            format!("{}; n/a: no {peer_label} figure", shown(v)),
            None,
        ),
        _ => record(key, "n/a: no samples (see errors)".into(), None),
    }
}

/// The closing table: every target with what this run measured.
fn targets_table(sz: &Sizes, smoke: bool) -> Table {
    let mut t = Table::new(
        "Targets (every figure from this run; ratios against the peer measured in the same run)",
        &["figure", "target", "measured", "met"],
    );
    let got = outcomes().lock().unwrap_or_else(|e| e.into_inner());
    for (key, section, figure, target) in TARGETS {
        let (measured, met) = match got.get(key) {
            Some(o) => (
                o.measured.clone(),
                match o.met {
                    Some(true) => "met",
                    Some(false) => "NOT MET",
                    None => "n/a",
                },
            ),
            None if !sz.runs(section) => (
                format!("not run (TUNNELER_BENCH_ONLY lacks {section})"),
                "-",
            ),
            None => ("n/a: not measured (see errors)".to_string(), "n/a"),
        };
        t.row(vec![
            figure.to_string(),
            target.to_string(),
            measured,
            met.to_string(),
        ]);
    }
    if smoke {
        t.notes
            .push("SMOKE run: tiny sizes, so these verdicts mean nothing".into());
    }
    t
}

// ---------------------------------------------------------------------------
// Servers inside the node namespace (`e2e __serve SOURCE_PORT ECHO_PORT`)
// ---------------------------------------------------------------------------

mod serve {
    use super::*;

    /// Entry point of the re-executed binary inside a namespace.
    pub fn main(args: &[String]) {
        let port = |i: usize| -> u16 { args.get(i).and_then(|p| p.parse().ok()).expect("port") };
        let source = TcpListener::bind(("0.0.0.0", port(0))).expect("bind source");
        let echo = std::net::TcpListener::bind(("0.0.0.0", port(1))).expect("bind echo");
        echo.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || echo_server(echo));
        println!("ready");
        let _ = io::stdout().flush();
        for conn in source.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = source_one(conn);
            });
        }
    }

    /// Reads a little-endian u64 count and u64 seed, writes that many bytes
    /// of the seed's [`pattern`], half-closes and waits for the client to
    /// close.
    fn source_one(mut s: TcpStream) -> io::Result<()> {
        let mut req = [0u8; 16];
        s.read_exact(&mut req)?;
        let [count, seed] =
            [&req[..8], &req[8..]].map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        while sent < count {
            let k = (count - sent).min(buf.len() as u64) as usize;
            pattern::fill(seed, sent, &mut buf[..k]);
            s.write_all(&buf[..k])?;
            sent += k as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink)? > 0 {}
        Ok(())
    }

    /// Raw echo on a current-thread runtime: thousands of connections are
    /// cheap, and one round trip wakes one thread.
    fn echo_server(l: std::net::TcpListener) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
    }
}

/// Starts the bench servers in `ns` and waits for their "ready".
fn start_servers(ns: &str) -> ChildGuard {
    let exe = std::env::current_exe().expect("current exe");
    let mut guard = ChildGuard::spawn(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(["__serve", &SOURCE_PORT.to_string(), &ECHO_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let mut out = guard.child().stdout.take().unwrap();
    let mut line = [0u8; 6];
    let ok = out.read_exact(&mut line).is_ok() && &line == b"ready\n";
    assert!(ok, "bench servers in {ns} did not start");
    guard
}

// ---------------------------------------------------------------------------
// Paths and client streams
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum PathKind {
    Direct,
    SshL,
    DaemonTcp,
    DaemonUnix,
}

const PATHS: [PathKind; 4] = [
    PathKind::Direct,
    PathKind::SshL,
    PathKind::DaemonTcp,
    PathKind::DaemonUnix,
];

impl PathKind {
    fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::SshL => "ssh -L",
            PathKind::DaemonTcp => "daemon tcp",
            PathKind::DaemonUnix => "daemon unix",
        }
    }
}

/// Where each path connects.
#[derive(Clone)]
struct Endpoints {
    node_ip: Ipv4Addr,
    /// Remote port → local `ssh -L` port.
    forwards: HashMap<u16, u16>,
    daemon_tcp: SocketAddr,
    daemon_unix: PathBuf,
}

/// A blocking client stream.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Stream {
    /// Half-closes the client's sending side.
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn connect_request(ip: Ipv4Addr, port: u16) -> String {
    format!("CONNECT {ip}:{port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// Checks a CONNECT response head; it is complete when this is called.
fn check_head(head: &[u8]) -> io::Result<()> {
    if head.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(head).lines().next().unwrap_or("")
        )))
    }
}

/// Reads a CONNECT response head. The servers speak only after the client
/// does, so nothing follows the head yet and reading in chunks is safe.
fn read_head_blocking<S: Read>(s: &mut S) -> io::Result<()> {
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 || head.len() > 8192 {
            return Err(io::Error::other("no complete CONNECT response"));
        }
        head.extend_from_slice(&buf[..n]);
    }
    check_head(&head)
}

impl Endpoints {
    /// Opens a stream to `port` on the node through `path`.
    fn dial(&self, path: PathKind, port: u16) -> io::Result<Stream> {
        let tcp = |a: SocketAddr| -> io::Result<Stream> {
            let s = TcpStream::connect_timeout(&a, IO_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(Stream::Tcp(s))
        };
        let mut s = match path {
            PathKind::Direct => return tcp(SocketAddr::from((self.node_ip, port))),
            PathKind::SshL => return tcp(SocketAddr::from(([127, 0, 0, 1], self.forwards[&port]))),
            PathKind::DaemonTcp => tcp(self.daemon_tcp)?,
            PathKind::DaemonUnix => {
                let s = UnixStream::connect(&self.daemon_unix)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Unix(s)
            }
        };
        s.write_all(connect_request(self.node_ip, port).as_bytes())?;
        read_head_blocking(&mut s)?;
        Ok(s)
    }

    /// The async twin of [`Endpoints::dial`].
    async fn dial_async(&self, path: PathKind, port: u16) -> io::Result<Box<dyn AsyncStream>> {
        let mut s: Box<dyn AsyncStream> = match path {
            PathKind::Direct | PathKind::SshL | PathKind::DaemonTcp => {
                let a = match path {
                    PathKind::Direct => SocketAddr::from((self.node_ip, port)),
                    PathKind::SshL => SocketAddr::from(([127, 0, 0, 1], self.forwards[&port])),
                    _ => self.daemon_tcp,
                };
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                if path != PathKind::DaemonTcp {
                    return Ok(Box::new(s));
                }
                Box::new(s)
            }
            PathKind::DaemonUnix => {
                Box::new(tokio::net::UnixStream::connect(&self.daemon_unix).await?)
            }
        };
        s.write_all(connect_request(self.node_ip, port).as_bytes())
            .await?;
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 512];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 || head.len() > 8192 {
                return Err(io::Error::other("no complete CONNECT response"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        check_head(&head)?;
        Ok(s)
    }
}

/// An async client stream of any path.
trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// Message `i` of the echo stream keyed by `seed`: its slice of the pattern.
fn message(seed: u64, i: u64) -> [u8; MSG] {
    let mut msg = [0u8; MSG];
    pattern::fill(seed, i * MSG as u64, &mut msg);
    msg
}

/// An echo that is not the message sent.
fn echo_mismatch(i: u64, sent: &[u8], back: &[u8]) -> io::Error {
    let at = sent.iter().zip(back).position(|(a, b)| a != b).unwrap_or(0);
    io::Error::other(format!(
        "echo {i} differs from what was sent at byte {at}: sent {:02x?}, got {:02x?}",
        &sent[at..(at + 8).min(MSG)],
        &back[at..(at + 8).min(MSG)]
    ))
}

/// One 64-byte round trip: message `i` of `seed`, compared on return.
fn round_trip<S: Read + Write>(s: &mut S, seed: u64, i: u64) -> io::Result<()> {
    let msg = message(seed, i);
    let mut back = [0u8; MSG];
    s.write_all(&msg)?;
    s.read_exact(&mut back).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::other(format!(
            "echo {i}: no complete reply within {IO_TIMEOUT:?} (bytes lost on the way?)"
        )),
        _ => e,
    })?;
    if back != msg {
        return Err(echo_mismatch(i, &msg, &back));
    }
    Ok(())
}

async fn round_trip_async(s: &mut Box<dyn AsyncStream>, seed: u64, i: u64) -> io::Result<()> {
    let msg = message(seed, i);
    let mut back = [0u8; MSG];
    s.write_all(&msg).await?;
    s.read_exact(&mut back).await?;
    if back != msg {
        return Err(echo_mismatch(i, &msg, &back));
    }
    Ok(())
}

/// Ends an echo stream: half-close, then the far side must close too with
/// nothing more (an extra byte is a duplicate the relay made up).
fn finish_echo(s: &mut Stream) -> io::Result<()> {
    s.shutdown_write()?;
    let mut extra = [0u8; 256];
    match s.read(&mut extra)? {
        0 => Ok(()),
        n => Err(io::Error::other(format!(
            "{n} unexpected byte(s) after the last echo"
        ))),
    }
}

async fn finish_echo_async(s: &mut Box<dyn AsyncStream>) -> io::Result<()> {
    s.shutdown().await?;
    let mut extra = [0u8; 256];
    match tokio::time::timeout(IO_TIMEOUT, s.read(&mut extra))
        .await
        .map_err(|_| io::Error::other("no EOF after the last echo"))??
    {
        0 => Ok(()),
        n => Err(io::Error::other(format!(
            "{n} unexpected byte(s) after the last echo"
        ))),
    }
}

// ---------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU seconds of `pid` (all threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Raises the open-files soft limit to the hard limit; children inherit it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------
// Statistics and the report
// ---------------------------------------------------------------------------

/// The `p`th percentile; `None` for no samples (never a figure).
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

/// "n/a" where a path produced no samples.
const NA: &str = "n/a";

fn us(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn ratio(v: f64, ssh: Option<f64>) -> String {
    match ssh {
        Some(s) if s > 0.0 && v.is_finite() => format!("{:.2}×", v / s),
        _ => "-".into(),
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

/// A titled table; printed at the end so that progress lines do not
/// interleave with results.
struct Table {
    title: String,
    head: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    fn new(title: impl Into<String>, head: &[&str]) -> Table {
        Table {
            title: title.into(),
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let cols = self.head.len();
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let mut s = String::from("  ");
            for (i, c) in r.iter().enumerate().take(cols) {
                let pad = w[i] - c.chars().count();
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str(&" ".repeat(pad + 2));
                    s.push_str(c);
                }
            }
            s.push('\n');
            s
        };
        let mut out = format!("\n{}\n", self.title);
        out.push_str(&line(&self.head));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }
}

/// One progress line on stderr. It also carries the system uptime, the
/// clock of `perf record` and `perf sched` (close to CLOCK_MONOTONIC), so a
/// profile of a whole run can be cut into the sections and paths these
/// lines mark.
fn progress(msg: &str) {
    let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let up = up.split_whitespace().next().unwrap_or("?");
    eprintln!(
        "[e2e {:>7.1}s up {up}] {msg}",
        started().elapsed().as_secs_f64()
    );
}

fn started() -> &'static Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    T.get_or_init(Instant::now)
}

// ---------------------------------------------------------------------------
// Setup: configs, ssh -L
// ---------------------------------------------------------------------------

/// The harness's test config with the production defaults for timing
/// (connect timeout, keepalives, backoff, dial timeout), so that the
/// figures are the ones an operator would see.
fn bench_toml(cluster: &Cluster, spec: &ConfigSpec) -> String {
    let mut t = cluster.config_toml(spec);
    let bench_ports = format!("node_ports = [{SOURCE_PORT}, {ECHO_PORT}, ");
    for (from, to) in [
        ("connect_timeout = \"2s\"", "connect_timeout = \"10s\""),
        (
            "keepalive_interval = \"1s\"",
            "keepalive_interval = \"10s\"",
        ),
        ("initial_backoff = \"100ms\"", "initial_backoff = \"1s\""),
        ("max_backoff = \"1s\"", "max_backoff = \"30s\""),
        ("dial_timeout = \"2s\"", "dial_timeout = \"5s\""),
        // The bench servers listen on the node's own address.
        ("node_ports = [", bench_ports.as_str()),
        (
            "[proxy]\n",
            "[proxy]\n# The 10 000-stream run needs more than the default 4096.\nmax_streams_per_node = 16384\n",
        ),
    ] {
        assert!(t.contains(from), "harness config changed: no {from}");
        t = t.replace(from, to);
    }
    // A/B runs: extra `[ssh]` lines for every daemon of the run (say
    // `window_min = "8MiB"`), e.g. to compare a setting on one machine.
    if let Ok(extra) = std::env::var("TUNNELER_BENCH_SSH_EXTRA") {
        assert!(t.contains("[ssh]\n"), "harness config changed: no [ssh]");
        t = t.replacen("[ssh]\n", &format!("[ssh]\n{extra}\n"), 1);
    }
    t
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

/// `ssh -N -L` for each remote port; returns the process and the local
/// ports once every forward accepts.
fn start_ssh_forward(
    cluster: &Cluster,
    ip: Ipv4Addr,
    ports: &[u16],
) -> (ChildGuard, HashMap<u16, u16>) {
    let forwards: HashMap<u16, u16> = ports.iter().map(|p| (*p, free_port())).collect();
    let mut cmd = Command::new("/usr/bin/ssh");
    cmd.args(["-N", "-F", "/dev/null", "-i"])
        .arg(&cluster.client_key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
            "-c",
            "aes128-gcm@openssh.com",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            cluster.dir.join("known_hosts").display()
        ));
    for (remote, local) in &forwards {
        cmd.arg("-L")
            .arg(format!("127.0.0.1:{local}:{ip}:{remote}"));
    }
    cmd.arg(format!("root@{ip}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(cluster.dir.join(format!("ssh-L-{ip}.log"))).unwrap());
    let mut guard = ChildGuard::spawn(&mut cmd);
    let up = common::poll(Duration::from_secs(15), || {
        if let Ok(Some(_)) = guard.child().try_wait() {
            return true;
        }
        forwards.values().all(|l| {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], *l)),
                Duration::from_millis(200),
            )
            .is_ok()
        })
    });
    let exited = matches!(guard.child().try_wait(), Ok(Some(_)));
    assert!(
        up && !exited,
        "ssh -L did not come up: {}",
        fs::read_to_string(cluster.dir.join(format!("ssh-L-{ip}.log"))).unwrap_or_default()
    );
    (guard, forwards)
}

// ---------------------------------------------------------------------------
// Stream measurements (one node)
// ---------------------------------------------------------------------------

/// The process whose CPU and memory a path costs, if any.
fn path_pid(path: PathKind, daemon: u32, ssh: u32) -> Option<u32> {
    match path {
        PathKind::Direct => None,
        PathKind::SshL => Some(ssh),
        PathKind::DaemonTcp | PathKind::DaemonUnix => Some(daemon),
    }
}

/// Asks the source for `bytes` bytes of a fresh seed's pattern and checks
/// every one on arrival, then that EOF comes right after the last.
fn bulk_once(ep: &Endpoints, path: PathKind, bytes: u64) -> io::Result<Duration> {
    let seed = next_seed();
    let t0 = Instant::now();
    let mut s = ep.dial(path, SOURCE_PORT)?;
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&bytes.to_le_bytes());
    req[8..].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&req)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        pattern::check_read(seed, bytes, got, &buf[..n])?;
        got += n as u64;
    }
    if got != bytes {
        return Err(io::Error::other(format!(
            "EOF after {got} of {bytes} bytes"
        )));
    }
    Ok(t0.elapsed())
}

fn throughput(ep: &Endpoints, sz: &Sizes, daemon: u32, ssh: u32) -> Table {
    progress("single-stream throughput");
    let mut rates: HashMap<PathKind, Vec<f64>> = HashMap::new();
    let mut cpu: HashMap<PathKind, Vec<f64>> = HashMap::new();
    // Paths interleaved per run so that noise from other load spreads out.
    for run in 1..=sz.bulk_runs {
        for path in PATHS {
            progress(&format!(
                "single-stream throughput, run {run}: {}",
                path.label()
            ));
            let pid = path_pid(path, daemon, ssh);
            let c0 = pid.map(cpu_seconds);
            match bulk_once(ep, path, sz.bulk_bytes) {
                Ok(d) => {
                    rates
                        .entry(path)
                        .or_default()
                        .push(sz.bulk_bytes as f64 / d.as_secs_f64());
                    if let (Some(pid), Some(c0)) = (pid, c0) {
                        let gb = sz.bulk_bytes as f64 / 1e9;
                        cpu.entry(path)
                            .or_default()
                            .push((cpu_seconds(pid) - c0) / gb);
                    }
                }
                Err(e) => fail(format!("throughput, {}: {e}", path.label())),
            }
        }
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut med: HashMap<PathKind, f64> = HashMap::new();
    let mut cmed: HashMap<PathKind, f64> = HashMap::new();
    for (p, v) in &mut rates {
        med.extend(median(v).map(|m| (*p, m)));
    }
    for (p, v) in &mut cpu {
        cmed.extend(median(v).map(|m| (*p, m)));
    }
    for (key, path) in [
        ("throughput tcp", PathKind::DaemonTcp),
        ("throughput unix", PathKind::DaemonUnix),
    ] {
        record_ratio(
            key,
            |v| format!("{:.0} MiB/s", mib(v)),
            med.get(&path).copied(),
            med.get(&PathKind::SshL).copied(),
            "ssh -L",
            1.2,
            false,
        );
    }
    let mut t = Table::new(
        format!(
            "Single-stream throughput: {} MiB per run, {} run(s), median [min-max]",
            sz.bulk_bytes >> 20,
            sz.bulk_runs
        ),
        &[
            "path",
            "runs ok",
            "MiB/s",
            "[min-max]",
            "Gbit/s",
            "vs ssh -L",
            "CPU s/GB",
            "vs ssh -L",
        ],
    );
    for path in PATHS {
        let (Some(v), Some(&m)) = (rates.get(&path), med.get(&path)) else {
            let mut row = vec![path.label().into(), format!("0/{}", sz.bulk_runs)];
            row.resize(8, NA.into());
            t.row(row);
            continue;
        };
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        let c = cmed.get(&path).copied();
        t.row(vec![
            path.label().into(),
            format!("{}/{}", v.len(), sz.bulk_runs),
            format!("{:.0}", mib(m)),
            format!("[{:.0}-{:.0}]", mib(lo), mib(hi)),
            format!("{:.2}", m * 8.0 / 1e9),
            ratio(m, med.get(&PathKind::SshL).copied()),
            c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
            c.map(|c| ratio(c, cmed.get(&PathKind::SshL).copied()))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.notes.push(
        "CPU s/GB: utime+stime of the daemon process or of ssh -L's ssh process per 10^9 bytes relayed (client side only; sshd not counted)".into(),
    );
    t.notes.push(format!(
        "every byte checked against a seeded pattern on arrival, and EOF right after the last (the check alone runs at {:.0} MiB/s on one core here)",
        pattern::check_rate() / (1u64 << 20) as f64
    ));
    t
}

fn rtt(ep: &Endpoints, sz: &Sizes) -> Table {
    progress("round-trip latency");
    let mut t = Table::new(
        format!(
            "Round trip of {MSG}-byte messages on an open stream ({} round trips)",
            sz.rtt_count
        ),
        &["path", "p50", "p99", "p50 vs ssh -L", "p99 vs ssh -L"],
    );
    let mut res: Vec<Latency> = Vec::new();
    for path in PATHS {
        progress(&format!("round-trip latency: {}", path.label()));
        let mut v = Vec::with_capacity(sz.rtt_count);
        let mut run = || -> io::Result<()> {
            let seed = next_seed();
            let mut s = ep.dial(path, ECHO_PORT)?;
            let warm = (sz.rtt_count / 10).max(5) as u64;
            for i in 0..warm {
                round_trip(&mut s, seed, i)?;
            }
            for i in 0..sz.rtt_count as u64 {
                let t0 = Instant::now();
                round_trip(&mut s, seed, warm + i)?;
                v.push(t0.elapsed());
            }
            finish_echo(&mut s)
        };
        if let Err(e) = run() {
            fail(format!(
                "round trip, {}: after {} round trips: {e}",
                path.label(),
                v.len()
            ));
            v.clear();
        }
        v.sort();
        res.push((path, percentile(&v, 50.0), percentile(&v, 99.0)));
    }
    latency_rows(&mut t, &res);
    record_latency(&res, ["rtt tcp", "rtt unix"], false, PathKind::SshL, 0.9);
    t
}

/// Records the daemon's rows of `res` (TCP, then Unix listener) for the
/// targets `keys`: their p50 (or p99) against `peer`'s, at most `limit`×.
fn record_latency(res: &[Latency], keys: [&'static str; 2], p99: bool, peer: PathKind, limit: f64) {
    let pick = |r: &Latency| if p99 { r.2 } else { r.1 };
    let of = |p: PathKind| {
        res.iter()
            .find(|r| r.0 == p)
            .and_then(pick)
            .map(|d| d.as_secs_f64())
    };
    for (key, path) in keys
        .into_iter()
        .zip([PathKind::DaemonTcp, PathKind::DaemonUnix])
    {
        record_ratio(
            key,
            |v| us(Duration::from_secs_f64(v)),
            of(path),
            of(peer),
            peer.label(),
            limit,
            true,
        );
    }
}

/// Records the daemon's sequential-dial p99 (TCP, then Unix listener)
/// against the absolute bound, with its ratio to `ssh -L` for reference.
fn record_dial_p99(res: &[Latency], dials: usize, bound: Duration) {
    let ssh = res.iter().find(|r| r.0 == PathKind::SshL).and_then(|r| r.2);
    for (key, path) in [
        ("dial seq tcp", PathKind::DaemonTcp),
        ("dial seq unix", PathKind::DaemonUnix),
    ] {
        match res.iter().find(|r| r.0 == path).and_then(|r| r.2) {
            Some(d) => record(
                key,
                format!(
                    "{} of {dials} dials ({} ssh -L)",
                    us(d),
                    match ssh {
                        Some(s) => ratio(d.as_secs_f64(), Some(s.as_secs_f64())),
                        None => NA.into(),
                    }
                ),
                Some(d <= bound),
            ),
            None => record(key, "n/a: no samples (see errors)".into(), None),
        }
    }
}

/// (path, p50, p99); `None` where the path produced no samples.
type Latency = (PathKind, Option<Duration>, Option<Duration>);

fn latency_rows(t: &mut Table, res: &[Latency]) {
    let ssh = res.iter().find(|r| r.0 == PathKind::SshL);
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let cell = |d: Option<Duration>| d.map(us).unwrap_or_else(|| NA.into());
    let rel = |d: Option<Duration>, s: Option<Duration>| match d {
        Some(d) => ratio(d.as_secs_f64(), secs(s)),
        None => NA.into(),
    };
    for (p, p50, p99) in res {
        t.row(vec![
            p.label().into(),
            cell(*p50),
            cell(*p99),
            rel(*p50, ssh.and_then(|s| s.1)),
            rel(*p99, ssh.and_then(|s| s.2)),
        ]);
    }
}

/// A dial plus one checked round trip (timed), then a checked close (not).
fn dial_once(ep: &Endpoints, path: PathKind) -> io::Result<Duration> {
    let seed = next_seed();
    let t0 = Instant::now();
    let mut s = ep.dial(path, ECHO_PORT)?;
    round_trip(&mut s, seed, 0)?;
    let d = t0.elapsed();
    finish_echo(&mut s)?;
    Ok(d)
}

async fn dial_once_async(ep: &Endpoints, path: PathKind) -> io::Result<Duration> {
    let seed = next_seed();
    let t0 = Instant::now();
    let mut s = tokio::time::timeout(IO_TIMEOUT, ep.dial_async(path, ECHO_PORT))
        .await
        .map_err(|_| io::Error::other("dial timed out"))??;
    tokio::time::timeout(IO_TIMEOUT, round_trip_async(&mut s, seed, 0))
        .await
        .map_err(|_| io::Error::other("round trip timed out"))??;
    let d = t0.elapsed();
    finish_echo_async(&mut s).await?;
    Ok(d)
}

/// Dial failures a path may have before the rest of its dials are skipped
/// (each can cost a full timeout); all of them are errors either way.
const DIAL_GIVE_UP: usize = 3;

fn dials(ep: &Endpoints, sz: &Sizes, rt: &tokio::runtime::Runtime) -> Vec<Table> {
    progress("dial latency, sequential");
    let mut seq = Table::new(
        format!(
            "Dial: connect (+CONNECT → 200) + one {MSG}-byte round trip, sequential ({} dials)",
            sz.dial_seq
        ),
        &["path", "p50", "p99", "p50 vs ssh -L", "p99 vs ssh -L"],
    );
    let mut res = Vec::new();
    for path in PATHS {
        progress(&format!("dial latency, sequential: {}", path.label()));
        let mut v = Vec::with_capacity(sz.dial_seq);
        let mut failed = 0;
        for _ in 0..sz.dial_seq {
            match dial_once(ep, path) {
                Ok(d) => v.push(d),
                Err(e) => {
                    failed += 1;
                    fail(format!("sequential dial, {}: {e}", path.label()));
                    if failed >= DIAL_GIVE_UP {
                        fail(format!(
                            "sequential dial, {}: gave up after {failed} failures",
                            path.label()
                        ));
                        break;
                    }
                }
            }
        }
        v.sort();
        res.push((path, percentile(&v, 50.0), percentile(&v, 99.0)));
    }
    latency_rows(&mut seq, &res);
    record_latency(
        &res,
        ["dial p50 tcp", "dial p50 unix"],
        false,
        PathKind::SshL,
        1.0,
    );
    record_dial_p99(&res, sz.dial_seq, Duration::from_millis(2));

    progress("dial latency, in flight");
    let mut par = Table::new(
        format!(
            "Dial as above with {} dials in flight ({} dials)",
            sz.dial_in_flight, sz.dial_total
        ),
        &[
            "path",
            "p50",
            "p99",
            "p50 vs ssh -L",
            "p99 vs ssh -L",
            "p99 vs direct",
        ],
    );
    let mut res = Vec::new();
    for path in PATHS {
        progress(&format!("dial latency, in flight: {}", path.label()));
        let per_task = sz.dial_total / sz.dial_in_flight;
        let (v, failed, last) = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..sz.dial_in_flight {
                let ep = ep.clone();
                set.spawn(async move {
                    let mut v = Vec::with_capacity(per_task);
                    let mut errs = Vec::new();
                    for _ in 0..per_task {
                        match dial_once_async(&ep, path).await {
                            Ok(d) => v.push(d),
                            Err(e) => errs.push(e.to_string()),
                        }
                        if errs.len() >= DIAL_GIVE_UP {
                            break;
                        }
                    }
                    (v, errs)
                });
            }
            let (mut all, mut errs) = (Vec::new(), Vec::new());
            while let Some(r) = set.join_next().await {
                match r {
                    Ok((v, e)) => {
                        all.extend(v);
                        errs.extend(e);
                    }
                    Err(e) => errs.push(format!("dial task failed: {e}")),
                }
            }
            (all, errs.len(), errs)
        });
        if failed > 0 {
            let mut distinct = last.clone();
            distinct.sort();
            distinct.dedup();
            fail(format!(
                "dials in flight, {}: {failed} failed, {} of {} succeeded: {}",
                path.label(),
                v.len(),
                sz.dial_total,
                distinct.join("; ")
            ));
        }
        let mut v = v;
        v.sort();
        res.push((path, percentile(&v, 50.0), percentile(&v, 99.0)));
    }
    latency_rows(&mut par, &res);
    let direct = res
        .iter()
        .find(|r| r.0 == PathKind::Direct)
        .and_then(|r| r.2)
        .map(|d| d.as_secs_f64());
    for (row, r) in par.rows.iter_mut().zip(&res) {
        row.push(match r.2 {
            Some(d) => ratio(d.as_secs_f64(), direct),
            None => NA.into(),
        });
    }
    record_latency(
        &res,
        ["dial flight tcp", "dial flight unix"],
        true,
        PathKind::Direct,
        1.5,
    );
    vec![seq, par]
}

/// Result of holding `n` streams open at once on one path.
struct ManyResult {
    ok: usize,
    open_time: Duration,
    echo_time: Duration,
    rss_per_stream_kib: Option<f64>,
    /// Distinct errors, each with how often it happened.
    errors: Vec<(String, usize)>,
}

async fn many_streams(
    ep: &Endpoints,
    path: PathKind,
    n: usize,
    open_conc: usize,
    rounds: usize,
    pid: Option<u32>,
) -> ManyResult {
    let rss0 = pid.map(rss_kib);
    let sem = Arc::new(tokio::sync::Semaphore::new(open_conc));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let ep = ep.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.ok();
            let seed = next_seed();
            let mut s = tokio::time::timeout(IO_TIMEOUT, ep.dial_async(path, ECHO_PORT))
                .await
                .map_err(|_| io::Error::other("dial timed out"))??;
            tokio::time::timeout(IO_TIMEOUT, round_trip_async(&mut s, seed, 0))
                .await
                .map_err(|_| io::Error::other("round trip timed out"))??;
            Ok::<_, io::Error>((s, seed))
        });
    }
    let mut open = Vec::with_capacity(n);
    let mut errors: Vec<String> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => errors.push(format!("open: {e}")),
            Err(e) => errors.push(format!("open task: {e}")),
        }
    }
    let open_time = t0.elapsed();
    // Let the relay settle before reading memory with every stream idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = pid.map(rss_kib);
    // Rounds of one more round trip on every stream at once; the median
    // round is the figure.
    let mut echo_times = Vec::with_capacity(rounds);
    for round in 0..rounds.max(1) as u64 {
        let t1 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (mut s, seed) in open.drain(..) {
            set.spawn(async move {
                let r = tokio::time::timeout(IO_TIMEOUT, round_trip_async(&mut s, seed, 1 + round))
                    .await
                    .map_err(|_| io::Error::other("round trip timed out"))
                    .and_then(|r| r);
                (r, s, seed)
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok((Ok(()), s, seed)) => open.push((s, seed)),
                Ok((Err(e), _, _)) => errors.push(format!("echo on all: {e}")),
                Err(e) => errors.push(format!("echo task: {e}")),
            }
        }
        echo_times.push(t1.elapsed());
    }
    echo_times.sort();
    let echo_time = echo_times[echo_times.len() / 2];
    // Every stream must then close cleanly, with nothing extra.
    let mut set = tokio::task::JoinSet::new();
    for (mut s, _) in open {
        set.spawn(async move { finish_echo_async(&mut s).await });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => errors.push(format!("close: {e}")),
            Err(e) => errors.push(format!("close task: {e}")),
        }
    }
    let rss_per_stream_kib = match (rss0, rss1) {
        (Some(a), Some(b)) if n > 0 => Some((b as f64 - a as f64) / n as f64),
        _ => None,
    };
    // Give the far side time to close everything before the next path.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ManyResult {
        ok,
        open_time,
        echo_time,
        rss_per_stream_kib,
        errors: count_distinct(errors),
    }
}

/// Distinct messages with their counts, most frequent first.
fn count_distinct(mut v: Vec<String>) -> Vec<(String, usize)> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in v.drain(..) {
        *counts.entry(e).or_default() += 1;
    }
    let mut out: Vec<(String, usize)> = counts.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

fn concurrency(
    ep: &Endpoints,
    sz: &Sizes,
    rt: &tokio::runtime::Runtime,
    daemon: u32,
    ssh: u32,
) -> (Vec<Table>, HashMap<PathKind, f64>) {
    let mut tables = Vec::new();
    let mut per_stream = HashMap::new();
    for &n in &sz.streams {
        progress(&format!("{n} concurrent streams"));
        let rounds = sz.echo_rounds_for(n);
        let mut t = Table::new(
            format!(
                "{n} concurrent streams over one tunnel (opened {} at a time, each echoes once, then all echo at once: median of {} rounds)",
                sz.open_concurrency, rounds
            ),
            &[
                "path",
                "ok",
                "open all",
                "vs ssh -L",
                "echo on all",
                "vs ssh -L",
                "RSS/stream",
            ],
        );
        let mut res = Vec::new();
        for path in PATHS {
            progress(&format!("{n} concurrent streams: {}", path.label()));
            let pid = path_pid(path, daemon, ssh);
            let r = rt.block_on(many_streams(ep, path, n, sz.open_concurrency, rounds, pid));
            if r.ok != n || !r.errors.is_empty() {
                let list: Vec<String> = r
                    .errors
                    .iter()
                    .take(5)
                    .map(|(e, k)| format!("{k}× {e}"))
                    .collect();
                fail(format!(
                    "{n} concurrent streams, {}: {} of {n} opened, echoed {} times and closed cleanly; {}",
                    path.label(),
                    r.ok,
                    1 + rounds,
                    list.join("; ")
                ));
            }
            if let Some(k) = r.rss_per_stream_kib {
                per_stream.insert(path, k);
            }
            res.push((path, r));
        }
        let ssh_r = res.iter().find(|r| r.0 == PathKind::SshL).map(|r| &r.1);
        for (p, r) in &res {
            t.row(vec![
                p.label().into(),
                format!("{}/{n}", r.ok),
                format!("{:.2} s", r.open_time.as_secs_f64()),
                ratio(
                    r.open_time.as_secs_f64(),
                    ssh_r.map(|s| s.open_time.as_secs_f64()),
                ),
                format!("{:.1} ms", r.echo_time.as_secs_f64() * 1e3),
                ratio(
                    r.echo_time.as_secs_f64(),
                    ssh_r.map(|s| s.echo_time.as_secs_f64()),
                ),
                r.rss_per_stream_kib
                    .map(|k| format!("{k:.1} KiB"))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        if n == 50 {
            let echo = |p: PathKind| {
                res.iter()
                    .find(|r| r.0 == p)
                    .filter(|r| r.1.ok == n)
                    .map(|r| r.1.echo_time.as_secs_f64())
            };
            for (key, path) in [
                ("echo50 tcp", PathKind::DaemonTcp),
                ("echo50 unix", PathKind::DaemonUnix),
            ] {
                record_ratio(
                    key,
                    |v| format!("{:.1} ms", v * 1e3),
                    echo(path),
                    echo(PathKind::SshL),
                    "ssh -L",
                    1.0,
                    true,
                );
            }
        }
        t.notes.push(format!(
            "ok: streams that opened, echoed (checked) {} times and then closed cleanly",
            1 + rounds
        ));
        t.notes.push("RSS/stream: VmRSS of the daemon or of ssh -L's ssh with all streams open and idle, minus before, divided by the count".into());
        tables.push(t);
    }
    (tables, per_stream)
}

// ---------------------------------------------------------------------------
// Keepalive round trip in the status (`rtt_ms`)
// ---------------------------------------------------------------------------

/// The keepalive interval [`bench_toml`] sets: the production default.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// `rtt_ms` of the daemon's first node in `status --json`.
fn first_node_rtt_ms(admin: &std::path::Path) -> Option<f64> {
    let (code, body) = common::admin_get(admin, "/v1/status").ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["nodes"].get(0)?["rtt_ms"].as_f64()
}

/// What an operator reads as the node's round trip on an idle link, against
/// what the same link really takes after the same idle gap: a direct TCP
/// echo to the node, one round trip every keepalive interval, run at the
/// same time. Runs first, while nothing else has used the tunnel.
///
/// Each new `rtt_ms` value is one keepalive ping; the value already there
/// when the section starts is not counted.
fn status_rtt(ep: &Endpoints, sz: &Sizes, admin: &std::path::Path) -> Table {
    let n = sz.status_rtt_samples;
    progress(&format!(
        "status rtt_ms on an idle link: {n} keepalive round trips, {}s apart",
        KEEPALIVE.as_secs()
    ));
    let (pings, direct) = std::thread::scope(|sc| {
        let direct = sc.spawn(|| -> io::Result<Vec<Duration>> {
            let seed = next_seed();
            let mut s = ep.dial(PathKind::Direct, ECHO_PORT)?;
            round_trip(&mut s, seed, 0)?;
            let mut v = Vec::with_capacity(n);
            for i in 0..n as u64 {
                std::thread::sleep(KEEPALIVE);
                let t0 = Instant::now();
                round_trip(&mut s, seed, 1 + i)?;
                v.push(t0.elapsed());
            }
            finish_echo(&mut s)?;
            Ok(v)
        });
        let deadline = Instant::now() + KEEPALIVE * (n as u32 + 2) + Duration::from_secs(5);
        let mut last = first_node_rtt_ms(admin);
        let mut pings = Vec::with_capacity(n);
        while pings.len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            if let Some(v) = first_node_rtt_ms(admin) {
                // A ping the section saw happen, not the one before it.
                if last.is_some_and(|l| l != v) {
                    pings.push(Duration::from_secs_f64(v / 1e3));
                }
                last = Some(v);
            }
        }
        let direct = direct
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("bench thread panicked")));
        (pings, direct)
    });
    if pings.len() < n {
        fail(format!(
            "rtt_ms: {} of {n} keepalive round trips showed in the status within {} intervals",
            pings.len(),
            n + 2
        ));
    }
    let direct = direct.unwrap_or_else(|e| {
        fail(format!("rtt_ms, direct TCP echo: {e}"));
        Vec::new()
    });
    let (mut pings, mut direct) = (pings, direct);
    pings.sort();
    direct.sort();
    let mut t = Table::new(
        format!(
            "Round trip after {} s idle: the status's rtt_ms (keepalive {} s, one node, no streams) against a direct TCP echo to the node after the same gap",
            KEEPALIVE.as_secs(),
            KEEPALIVE.as_secs()
        ),
        &["what", "samples", "p50", "min", "max", "p50 vs direct"],
    );
    let d50 = percentile(&direct, 50.0);
    for (what, v) in [("status rtt_ms", &pings), ("direct TCP echo", &direct)] {
        let cell = |d: Option<Duration>| d.map(us).unwrap_or_else(|| NA.into());
        t.row(vec![
            what.into(),
            v.len().to_string(),
            cell(percentile(v, 50.0)),
            cell(v.first().copied()),
            cell(v.last().copied()),
            match percentile(v, 50.0) {
                Some(p) => ratio(p.as_secs_f64(), d50.map(|d| d.as_secs_f64())),
                None => NA.into(),
            },
        ]);
    }
    match (percentile(&pings, 50.0), d50) {
        (Some(p), Some(d)) => {
            let gap = p.as_secs_f64() - d.as_secs_f64();
            record(
                "rtt_ms",
                format!(
                    "p50 {} vs direct {} ({:+.2} ms, {} samples)",
                    us(p),
                    us(d),
                    gap * 1e3,
                    pings.len()
                ),
                Some(gap <= 1e-3),
            );
        }
        _ => record("rtt_ms", "n/a: no samples (see errors)".into(), None),
    }
    t.notes.push("both include this machine's cost of waking from idle; the target is rtt_ms within 1 ms of the direct echo".into());
    t
}

// ---------------------------------------------------------------------------
// Aggregate throughput (`aggregate`): four nodes, one stream each, at once
// ---------------------------------------------------------------------------

/// Nodes of the aggregate run, one stream each.
const AGG_NODES: usize = 4;

/// One stream from each of [`AGG_NODES`] nodes at once: the daemon's one
/// process against one `ssh -L` process per node (which may spread over
/// every core). Every byte of every stream is checked.
fn aggregate(sz: &Sizes) -> Table {
    progress(&format!("aggregate: building {AGG_NODES} node namespaces"));
    let cluster = Cluster::with_options(
        AGG_NODES,
        ClusterOptions {
            servers: false,
            ..ClusterOptions::default()
        },
    );
    let _servers: Vec<ChildGuard> = cluster.nodes.iter().map(|n| start_servers(&n.ns)).collect();
    let daemon = Daemon::start_toml(&cluster, &bench_toml(&cluster, &ConfigSpec::default()), &[]);
    daemon.wait_all_healthy(Duration::from_secs(30));
    let mut ssh = Vec::new();
    let mut eps = Vec::new();
    for node in &cluster.nodes {
        let (g, forwards) = start_ssh_forward(&cluster, node.ip, &[SOURCE_PORT]);
        ssh.push(g);
        eps.push(Endpoints {
            node_ip: node.ip,
            forwards,
            daemon_tcp: daemon.tcp_listener(),
            daemon_unix: daemon.egress.clone(),
        });
    }
    let dpid = daemon.pid();
    let ssh_pids: Vec<u32> = ssh.iter().map(|g| g.id()).collect();
    let bytes = sz.bulk_bytes;
    let total = (AGG_NODES as u64 * bytes) as f64;
    progress(&format!(
        "aggregate throughput: {AGG_NODES} nodes × 1 stream of {} MiB at once",
        bytes >> 20
    ));
    let mut rates: HashMap<PathKind, Vec<f64>> = HashMap::new();
    let mut slowest: HashMap<PathKind, Vec<f64>> = HashMap::new();
    let mut cpu: HashMap<PathKind, Vec<f64>> = HashMap::new();
    for _ in 0..sz.agg_runs {
        for path in PATHS {
            let pids = match path {
                PathKind::Direct => Vec::new(),
                PathKind::SshL => ssh_pids.clone(),
                PathKind::DaemonTcp | PathKind::DaemonUnix => vec![dpid],
            };
            let c0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            let t0 = Instant::now();
            let res: Vec<io::Result<Duration>> = std::thread::scope(|sc| {
                let hs: Vec<_> = eps
                    .iter()
                    .map(|ep| sc.spawn(move || bulk_once(ep, path, bytes)))
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(io::Error::other("bench thread panicked")))
                    })
                    .collect()
            });
            let wall = t0.elapsed().as_secs_f64();
            let c1: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            let mut ok = true;
            let mut slow = f64::INFINITY;
            for (i, r) in res.into_iter().enumerate() {
                match r {
                    Ok(d) => slow = slow.min(bytes as f64 / d.as_secs_f64()),
                    Err(e) => {
                        ok = false;
                        fail(format!(
                            "aggregate throughput, {}, node {}: {e}",
                            path.label(),
                            i + 1
                        ));
                    }
                }
            }
            if ok {
                rates.entry(path).or_default().push(total / wall);
                slowest.entry(path).or_default().push(slow);
                if !pids.is_empty() {
                    cpu.entry(path).or_default().push((c1 - c0) / (total / 1e9));
                }
            }
        }
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let med =
        |m: &mut HashMap<PathKind, Vec<f64>>, p: PathKind| m.get_mut(&p).and_then(|v| median(v));
    let ssh_rate = med(&mut rates, PathKind::SshL);
    let ssh_cpu = med(&mut cpu, PathKind::SshL);
    let mut t = Table::new(
        format!(
            "Aggregate throughput: {AGG_NODES} nodes × 1 stream of {} MiB, all at once, {} run(s), median; ssh -L is one process per node",
            bytes >> 20,
            sz.agg_runs
        ),
        &[
            "path",
            "runs ok",
            "MiB/s (all)",
            "Gbit/s",
            "vs 4 ssh -L",
            "slowest stream MiB/s",
            "CPU s/GB",
            "vs 4 ssh -L",
        ],
    );
    for path in PATHS {
        let runs = rates.get(&path).map_or(0, Vec::len);
        let Some(r) = med(&mut rates, path) else {
            let mut row = vec![path.label().into(), format!("0/{}", sz.agg_runs)];
            row.resize(8, NA.into());
            t.row(row);
            continue;
        };
        let c = med(&mut cpu, path);
        t.row(vec![
            path.label().into(),
            format!("{runs}/{}", sz.agg_runs),
            format!("{:.0}", mib(r)),
            format!("{:.2}", r * 8.0 / 1e9),
            ratio(r, ssh_rate),
            med(&mut slowest, path)
                .map(|s| format!("{:.0}", mib(s)))
                .unwrap_or_else(|| NA.into()),
            c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
            c.map(|c| ratio(c, ssh_cpu)).unwrap_or_else(|| "-".into()),
        ]);
    }
    for (key, path) in [
        ("aggregate tcp", PathKind::DaemonTcp),
        ("aggregate unix", PathKind::DaemonUnix),
    ] {
        record_ratio(
            key,
            |v| format!("{:.2} Gbit/s", v * 8.0 / 1e9),
            med(&mut rates, path),
            ssh_rate,
            "4 ssh -L",
            1.0,
            false,
        );
    }
    t.notes.push("MiB/s (all): the bytes of the four streams over the time from the first dial to the last stream's EOF; every byte checked on arrival, EOF right after the last".into());
    t.notes.push("CPU s/GB: utime+stime of the daemon, or of the four ssh processes together, per 10^9 bytes relayed".into());
    drop(ssh);
    let mut daemon = daemon;
    daemon.stop();
    t
}

// ---------------------------------------------------------------------------
// Many nodes
// ---------------------------------------------------------------------------

/// Polls the daemon until every node is healthy; returns the time since
/// `t0` and the count of healthy nodes at the end.
fn time_to_healthy(
    d: &Daemon,
    t0: Instant,
    n: usize,
    limit: Duration,
) -> (Option<Duration>, usize) {
    let deadline = t0 + limit;
    let mut healthy = 0;
    while Instant::now() < deadline {
        if let Ok(s) = d.try_status() {
            let nodes = s.nodes;
            healthy = nodes.iter().filter(|x| x.state == "healthy").count();
            if nodes.len() == n && healthy == n {
                return (Some(t0.elapsed()), healthy);
            }
        }
        // The status of thousands of nodes is megabytes: poll it less often
        // so that the polling does not slow what it measures.
        std::thread::sleep(Duration::from_millis((n as u64 / 20).clamp(25, 250)));
    }
    (None, healthy)
}

struct NodesResult {
    label: String,
    n: usize,
    healthy_after: Option<Duration>,
    healthy: usize,
    rss_kib: u64,
}

fn real_nodes(sz: &Sizes) -> NodesResult {
    let n = sz.real_nodes;
    progress(&format!("building {n} node namespaces"));
    let cluster = Cluster::with_options(
        n,
        ClusterOptions {
            servers: false,
            ..ClusterOptions::default()
        },
    );
    progress(&format!("{n} real nodes: starting the daemon"));
    let toml = bench_toml(&cluster, &ConfigSpec::default());
    let t0 = Instant::now();
    let d = Daemon::start_toml(&cluster, &toml, &[]);
    let (after, healthy) = time_to_healthy(&d, t0, n, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    NodesResult {
        label: format!("{n} node namespaces, one sshd each"),
        n,
        healthy_after: after,
        healthy,
        rss_kib: rss_kib(d.pid()),
    }
}

/// Memory one simulated node costs the machine (sshd's two processes for
/// the connection, plus the daemon's share) until a run has measured it.
const SIM_NODE_COST_KIB: u64 = 2 << 10;
/// Memory left to everything else on the machine while simulated nodes run.
const MEM_RESERVE_KIB: u64 = 3 << 20;

/// One daemon run against `n` simulated nodes.
struct SimResult {
    n: usize,
    /// sshd processes (one namespace each) serving them.
    sshds: usize,
    /// Why the run did not happen (not enough memory or pids).
    skipped: Option<String>,
    healthy_after: Option<Duration>,
    healthy: usize,
    /// Daemon VmRSS with every node healthy and idle, at the end of the
    /// idle-CPU window.
    rss_kib: u64,
    /// VmRSS of the same daemon with no nodes.
    base_rss_kib: u64,
    /// Daemon CPU over the idle window, as a fraction of one core.
    idle_cpu: Option<f64>,
    /// Nodes still healthy at the end of the idle window.
    healthy_at_end: usize,
    /// Drop of the machine's MemAvailable from before the daemon started
    /// to all nodes healthy: sshd and daemon together.
    machine_kib: Option<u64>,
}

impl SimResult {
    fn skipped(n: usize, why: String) -> SimResult {
        progress(&format!("{n} simulated nodes: skipped, {why}"));
        SimResult {
            n,
            sshds: 0,
            skipped: Some(why),
            healthy_after: None,
            healthy: 0,
            rss_kib: 0,
            base_rss_kib: 0,
            idle_cpu: None,
            healthy_at_end: 0,
            machine_kib: None,
        }
    }

    fn per_tunnel_kib(&self) -> f64 {
        (self.rss_kib as f64 - self.base_rss_kib as f64) / self.n as f64
    }
}

/// `MemAvailable` of the machine in KiB.
fn mem_available_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Processes and threads of the whole machine, and the pid limit.
fn pids_in_use() -> (u64, u64) {
    let used = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok())
        .unwrap_or(0);
    let max = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(32768);
    (used, max)
}

/// Every count of simulated nodes in turn, each with a cluster and a daemon
/// of its own. A count the machine cannot hold (memory for the sshd
/// connections, pids) is skipped with the reason, not attempted.
fn sim_nodes(sz: &Sizes) -> Vec<SimResult> {
    let mut cost = SIM_NODE_COST_KIB as f64;
    let mut out = Vec::new();
    for &n in &sz.sim_nodes {
        let need = (n as f64 * cost * 1.15) as u64 + MEM_RESERVE_KIB;
        let avail = mem_available_kib();
        let (pids, pid_max) = pids_in_use();
        if avail < need {
            out.push(SimResult::skipped(
                n,
                format!(
                    "needs ~{} MiB available ({:.1} MiB per node + {} MiB reserve), the machine has {} MiB",
                    need >> 10,
                    cost * 1.15 / 1024.0,
                    MEM_RESERVE_KIB >> 10,
                    avail >> 10
                ),
            ));
            continue;
        }
        if pids + 2 * n as u64 + 2000 > pid_max {
            out.push(SimResult::skipped(
                n,
                format!(
                    "needs {} pids (2 sshd processes per node), {pids} of {pid_max} in use",
                    2 * n
                ),
            ));
            continue;
        }
        let r = sim_run(sz, n);
        if let Some(used) = r.machine_kib.filter(|_| r.healthy == n) {
            cost = (used as f64 / n as f64).max(SIM_NODE_COST_KIB as f64 / 2.0);
        }
        out.push(r);
    }
    out
}

/// `n` simulated nodes: addresses in 10.201-203.s.0/24 blocks (inside
/// 10.200.0.0/14) on the `lo` of a few namespaces, each namespace's sshd
/// listening on all of them, with `MaxStartups` above its share.
fn sim_run(sz: &Sizes, n: usize) -> SimResult {
    let sshds = n
        .div_ceil(sz.sim_per_sshd.max(1))
        .clamp(1, common::MAX_BARE_NODES);
    let per = n.div_ceil(sshds);
    progress(&format!(
        "{n} simulated nodes: building {sshds} namespace(s), {per} addresses each"
    ));
    let mut cluster = Cluster::with_options(
        sshds,
        ClusterOptions {
            servers: false,
            sshd_listen_any: true,
            max_startups: format!("{}", per + 100),
        },
    );
    let mut ips = Vec::with_capacity(n);
    for i in 1..=sshds {
        let mine = cluster.add_local_addresses(i, per.min(n - ips.len()));
        cluster.add_known_hosts(i, &mine);
        ips.extend(mine);
    }
    // No service CIDR: the harness's 10.202.s.0/24 holds simulated nodes.
    let none = ConfigSpec {
        nodes: Some(vec![]),
        service_cidrs: Some(vec![]),
        ..ConfigSpec::default()
    };
    let base = {
        let d = Daemon::start_toml(&cluster, &bench_toml(&cluster, &none), &[]);
        std::thread::sleep(Duration::from_secs(1));
        rss_kib(d.pid())
    };
    let mut extra = String::new();
    for (k, ip) in ips.iter().enumerate() {
        extra.push_str(&format!(
            "\n[[node]]\nname = \"sim-{}\"\naddress = \"{ip}\"\n",
            k + 1
        ));
    }
    let spec = ConfigSpec { extra, ..none };
    progress(&format!("{n} simulated nodes: starting the daemon"));
    let toml = bench_toml(&cluster, &spec);
    let mem0 = mem_available_kib();
    let t0 = Instant::now();
    let d = Daemon::start_toml(&cluster, &toml, &[]);
    let limit = Duration::from_secs(60) + Duration::from_millis(40 * n as u64);
    let (after, healthy) = time_to_healthy(&d, t0, n, limit);
    let machine_kib = after.map(|_| mem0.saturating_sub(mem_available_kib()));
    if after.is_none() {
        fail(format!(
            "{n} simulated nodes: only {healthy} healthy within {limit:?}"
        ));
    }
    // Idle: every tunnel up, no streams, only the keepalives.
    let settle = Duration::from_secs(2);
    std::thread::sleep(settle);
    let pid = d.pid();
    let idle_cpu = after.map(|_| {
        progress(&format!(
            "{n} simulated nodes: idle CPU over {} s",
            sz.idle_cpu_secs
        ));
        let (c0, w0) = (cpu_seconds(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(sz.idle_cpu_secs));
        (cpu_seconds(pid) - c0) / w0.elapsed().as_secs_f64()
    });
    let rss = rss_kib(pid);
    let healthy_at_end = d.try_status().ok().map_or(0, |s| {
        s.nodes.iter().filter(|x| x.state == "healthy").count()
    });
    progress(&format!("{n} simulated nodes: tearing down"));
    drop(d);
    // The sshd sessions end with the daemon's connections; wait (bounded)
    // so the teardown has only the listeners left to kill.
    let nss: Vec<String> = cluster.nodes.iter().map(|x| x.ns.clone()).collect();
    common::poll(Duration::from_secs(30), || {
        nss.iter().all(|ns| {
            Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map_or(true, |o| {
                    o.stdout
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .count()
                        <= 1
                })
        })
    });
    drop(cluster);
    SimResult {
        n,
        sshds,
        skipped: None,
        healthy_after: after,
        healthy,
        rss_kib: rss,
        base_rss_kib: base,
        idle_cpu,
        healthy_at_end,
        machine_kib,
    }
}

// ---------------------------------------------------------------------------
// Slow readers (`slow`): a client slower than its node is slowed, never cut
// ---------------------------------------------------------------------------

/// A reader slower than the node that feeds it, and what it costs its
/// neighbours, daemon against `ssh -L` on the same node.
///
/// The node-side source writes as fast as its socket takes bytes, so a
/// paced client is behind from the first second: the daemon must hold the
/// stream (buffer to its limit, then park the session) and lose nothing.
/// Every stream is checked byte by byte as in the other sections.
mod slow {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// The default `proxy.relay_stream_buffer_limit`; `bench_toml` keeps it.
    const STREAM_LIMIT: u64 = 8 << 20;
    /// russh's per-channel queue: at most 2 MiB of packets
    /// (`ssh::context::channel_queue_packets`).
    const RUSSH_QUEUE: u64 = 2 << 20;
    /// One packet of the default `ssh.maximum_packet_size`.
    const PACKET: u64 = 256 << 10;
    /// Allowance on top of the per-stream figures (allocator, kernel, noise).
    const SLACK: u64 = 16 << 20;
    /// The slow reader's pace, bytes per second.
    const SLOW_RATE: f64 = 2e6;
    /// The `kubectl cp`-like reader's pace, bytes per second.
    const CP_RATE: f64 = 20e6;
    /// Slow readers at once in the many-readers case.
    const MANY: usize = 10;
    /// How long the neighbours wait for the slow stream to be held.
    const HOLD_WAIT: Duration = Duration::from_secs(15);

    const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

    /// FNV-1a over `b`, continuing from `h`: the checksum `kubectl cp`'s
    /// case reports (the per-byte pattern check is what catches errors).
    fn fnv(mut h: u64, b: &[u8]) -> u64 {
        for x in b {
            h ^= *x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// The checksum of the first `bytes` bytes of `seed`'s pattern.
    fn expected_fnv(seed: u64, bytes: u64) -> u64 {
        let mut buf = vec![0u8; 1 << 20];
        let (mut h, mut off) = (FNV0, 0u64);
        while off < bytes {
            let k = (bytes - off).min(buf.len() as u64) as usize;
            pattern::fill(seed, off, &mut buf[..k]);
            h = fnv(h, &buf[..k]);
            off += k as u64;
        }
        h
    }

    fn mib(b: u64) -> String {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }

    /// A checked read of a whole source stream.
    struct Got {
        elapsed: Duration,
        seed: u64,
        fnv: u64,
    }

    /// Asks the source on `s` for `bytes` bytes of a fresh seed, then reads
    /// them, at `rate` bytes per second if given, checking every byte and
    /// EOF right after the last. `got` shows progress to other threads.
    fn read_source(
        s: &mut Stream,
        bytes: u64,
        rate: Option<f64>,
        got: &AtomicU64,
    ) -> io::Result<Got> {
        let seed = next_seed();
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&bytes.to_le_bytes());
        req[8..].copy_from_slice(&seed.to_le_bytes());
        s.write_all(&req)?;
        let t0 = Instant::now();
        // Small reads so that the pace is smooth.
        let mut buf = vec![0u8; 64 << 10];
        let (mut n_got, mut h) = (0u64, FNV0);
        loop {
            let n = s
                .read(&mut buf)
                .map_err(|e| io::Error::other(format!("after {n_got} of {bytes} bytes: {e}")))?;
            if n == 0 {
                break;
            }
            pattern::check_read(seed, bytes, n_got, &buf[..n])?;
            h = fnv(h, &buf[..n]);
            n_got += n as u64;
            got.store(n_got, Ordering::Relaxed);
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(n_got as f64 / rate);
                let el = t0.elapsed();
                if due > el {
                    std::thread::sleep(due - el);
                }
            }
        }
        if n_got != bytes {
            return Err(io::Error::other(format!(
                "EOF after {n_got} of {bytes} bytes"
            )));
        }
        Ok(Got {
            elapsed: t0.elapsed(),
            seed,
            fnv: h,
        })
    }

    /// Dials the source through `path` and reads `bytes` at `rate`.
    fn paced(
        ep: &Endpoints,
        path: PathKind,
        bytes: u64,
        rate: f64,
        got: &AtomicU64,
        done: &AtomicBool,
    ) -> io::Result<Got> {
        let r = ep
            .dial(path, SOURCE_PORT)
            .and_then(|mut s| read_source(&mut s, bytes, Some(rate), got));
        done.store(true, Ordering::Relaxed);
        r
    }

    /// Round trips on an open echo stream until `count` or `until`, with
    /// `gap` between them (an interactive user, not a flood).
    fn rtts_on(
        s: &mut Stream,
        seed: u64,
        first: u64,
        count: usize,
        until: Option<Instant>,
        gap: Duration,
        stop: Option<&AtomicBool>,
    ) -> io::Result<Vec<Duration>> {
        let mut v = Vec::new();
        for i in 0..count as u64 {
            if until.is_some_and(|u| Instant::now() >= u)
                || stop.is_some_and(|s| s.load(Ordering::Relaxed))
            {
                break;
            }
            let t0 = Instant::now();
            round_trip(s, seed, first + i)?;
            v.push(t0.elapsed());
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
        }
        v.sort();
        Ok(v)
    }

    /// A fresh echo stream: a few warm-up round trips, then `count` timed
    /// ones (or until `stop`), then a checked close.
    fn rtts(
        ep: &Endpoints,
        path: PathKind,
        count: usize,
        gap: Duration,
        stop: Option<&AtomicBool>,
    ) -> io::Result<Vec<Duration>> {
        let seed = next_seed();
        let mut s = ep.dial(path, ECHO_PORT)?;
        for i in 0..5 {
            round_trip(&mut s, seed, i)?;
        }
        let v = rtts_on(&mut s, seed, 5, count, None, gap, stop)?;
        finish_echo(&mut s)?;
        Ok(v)
    }

    fn pct(v: &[Duration], p: f64) -> String {
        percentile(v, p).map(us).unwrap_or_else(|| NA.into())
    }

    /// The daemon's first node in `status --json`, if the admin API answers.
    fn node_status(admin: &Path) -> Option<serde_json::Value> {
        let (code, body) = common::admin_get(admin, "/v1/status").ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["nodes"].get(0).cloned()
    }

    /// What the status showed over a stretch of the run.
    #[derive(Default, Clone, Copy)]
    pub struct Seen {
        polls: u64,
        max_sessions: u64,
        max_congested: u64,
        blocked_seconds: f64,
        streams_slowed: u64,
    }

    impl Seen {
        fn add(&mut self, n: &serde_json::Value) {
            self.polls += 1;
            let u = |k: &str| n[k].as_u64().unwrap_or(0);
            self.max_sessions = self.max_sessions.max(u("sessions"));
            self.max_congested = self.max_congested.max(u("congested_sessions"));
            self.blocked_seconds = n["blocked_seconds"].as_f64().unwrap_or(0.0);
            self.streams_slowed = u("streams_slowed");
        }
    }

    /// Samples the VmRSS of `pids` and the node's status every 100 ms
    /// until [`Watch::finish`].
    struct Watch {
        rss0: Vec<u64>,
        stop: Arc<AtomicBool>,
        h: std::thread::JoinHandle<(Vec<u64>, Seen)>,
    }

    fn watch(pids: &[u32], admin: Option<&Path>) -> Watch {
        let rss0: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (pids, admin, st) = (pids.to_vec(), admin.map(Path::to_path_buf), stop.clone());
        let mut peak = rss0.clone();
        let h = std::thread::spawn(move || {
            let mut seen = Seen::default();
            // Bounded: at most a few hours of 100 ms samples.
            for _ in 0..200_000 {
                for (p, m) in pids.iter().zip(peak.iter_mut()) {
                    *m = (*m).max(rss_kib(*p));
                }
                if let Some(n) = admin.as_deref().and_then(node_status) {
                    seen.add(&n);
                }
                if st.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (peak, seen)
        });
        Watch { rss0, stop, h }
    }

    impl Watch {
        /// Peak VmRSS of each pid (KiB) and what the status showed.
        fn finish(self) -> (Vec<u64>, Seen) {
            self.stop.store(true, Ordering::Relaxed);
            self.h.join().unwrap_or_default()
        }
    }

    /// Waits until the slow stream has received `min` bytes and, with an
    /// admin socket, until its node shows a congested session (or, with
    /// `held`, time held by backpressure). Returns whether that was seen.
    fn wait_held(got: &AtomicU64, min: u64, admin: Option<&Path>, held: bool) -> bool {
        common::poll(HOLD_WAIT, || {
            got.load(Ordering::Relaxed) >= min
                && admin.is_none_or(|a| {
                    node_status(a).is_some_and(|n| {
                        let blocked = n["blocked_seconds"].as_f64().unwrap_or(0.0) > 0.0;
                        blocked || (!held && n["congested_sessions"].as_u64().unwrap_or(0) > 0)
                    })
                })
        })
    }

    fn join<T>(h: std::thread::ScopedJoinHandle<'_, io::Result<T>>) -> io::Result<T> {
        h.join()
            .unwrap_or_else(|_| Err(io::Error::other("bench thread panicked")))
    }

    const SLOW_PATHS: [PathKind; 2] = [PathKind::DaemonUnix, PathKind::SshL];

    /// Cases 1, 2, 3 and 5 on the bench's daemon (default config).
    pub fn on_node(ep: &Endpoints, sz: &Sizes, daemon: &Daemon, ssh: u32) -> Vec<Table> {
        let w = watch(&[], Some(&daemon.admin));
        let (d, a) = (daemon.pid(), daemon.admin.as_path());
        let mut t = vec![
            one_reader(ep, sz, d, ssh),
            many_readers(ep, sz, d, ssh),
            new_stream_beside(ep, sz, a),
            kubectl_cp(ep, sz, a),
        ];
        let (_, seen) = w.finish();
        t.push(status_table(
            "default config (max_connections_per_node 8): over the cases above",
            seen,
        ));
        t
    }

    /// One RSS row cell set: before, peak growth, bound, within.
    fn rss_cells(before: u64, peak: u64, bound: u64) -> [String; 4] {
        let growth = peak.saturating_sub(before) << 10;
        [
            format!("{before} KiB"),
            mib(growth),
            mib(bound),
            if growth <= bound { "yes" } else { "NO" }.into(),
        ]
    }

    /// Case 1: one 2 MB/s reader of a pushing source on each path at once.
    fn one_reader(ep: &Endpoints, sz: &Sizes, daemon: u32, ssh: u32) -> Table {
        let bytes = (SLOW_RATE * sz.slow_secs as f64) as u64;
        progress(&format!(
            "slow: one 2 MB/s reader for {} s, daemon and ssh -L at once",
            sz.slow_secs
        ));
        let w = watch(&[daemon, ssh], None);
        let rss0 = w.rss0.clone();
        let res: Vec<io::Result<Got>> = std::thread::scope(|sc| {
            let hs: Vec<_> = SLOW_PATHS
                .iter()
                .map(|&p| {
                    sc.spawn(move || {
                        let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
                        paced(ep, p, bytes, SLOW_RATE, &got, &done)
                    })
                })
                .collect();
            hs.into_iter().map(join).collect()
        });
        let (peak, _) = w.finish();
        let mut t = Table::new(
            format!(
                "Slow reader: 2 MB/s from a node-side source that pushes as fast as it can, {} s ({}), daemon and ssh -L at once",
                sz.slow_secs,
                mib(bytes)
            ),
            &[
                "path",
                "every byte",
                "time",
                "MB/s",
                "RSS before",
                "RSS growth (peak)",
                "bound",
                "within",
            ],
        );
        let bound = STREAM_LIMIT + SLACK;
        for (i, (p, r)) in SLOW_PATHS.iter().zip(res).enumerate() {
            let mut row = vec![p.label().to_string()];
            match r {
                Ok(g) => row.extend([
                    "yes".to_string(),
                    format!("{:.1} s", g.elapsed.as_secs_f64()),
                    format!("{:.2}", bytes as f64 / g.elapsed.as_secs_f64() / 1e6),
                ]),
                Err(e) => {
                    fail(format!("slow reader, {}: {e}", p.label()));
                    row.extend(["NO".into(), NA.into(), NA.into()]);
                }
            }
            row.extend(rss_cells(rss0[i], peak[i], bound));
            t.row(row);
        }
        t.notes.push(format!(
            "bound: the per-stream limit ({}) + 16 MiB. RSS growth: peak VmRSS during the run (sampled every 100 ms) minus VmRSS just before; for ssh -L, ssh's own process against the same figure",
            mib(STREAM_LIMIT)
        ));
        t.notes.push("every byte checked against the seeded pattern on arrival, EOF right after the last: a reset or a short stream is an error (exit 1)".into());
        t
    }

    /// Case 2: ten slow readers at once on each path (all twenty at once).
    fn many_readers(ep: &Endpoints, sz: &Sizes, daemon: u32, ssh: u32) -> Table {
        let bytes = (SLOW_RATE * sz.slow_many_secs as f64) as u64;
        progress(&format!(
            "slow: {MANY} 2 MB/s readers for {} s on each path, all at once",
            sz.slow_many_secs
        ));
        let w = watch(&[daemon, ssh], None);
        let rss0 = w.rss0.clone();
        let res: Vec<Vec<io::Result<Got>>> = std::thread::scope(|sc| {
            let hs: Vec<Vec<_>> = SLOW_PATHS
                .iter()
                .map(|&p| {
                    (0..MANY)
                        .map(|_| {
                            sc.spawn(move || {
                                let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
                                paced(ep, p, bytes, SLOW_RATE, &got, &done)
                            })
                        })
                        .collect()
                })
                .collect();
            hs.into_iter()
                .map(|v| v.into_iter().map(join).collect())
                .collect()
        });
        let (peak, _) = w.finish();
        let mut t = Table::new(
            format!(
                "{MANY} slow readers at once on one node: 2 MB/s each, {} s ({} each)",
                sz.slow_many_secs,
                mib(bytes)
            ),
            &[
                "path",
                "complete",
                "slowest",
                "RSS before",
                "RSS growth (peak)",
                "bound",
                "within",
            ],
        );
        let bound = MANY as u64 * (STREAM_LIMIT + RUSSH_QUEUE + PACKET) + SLACK;
        for (i, (p, rs)) in SLOW_PATHS.iter().zip(res).enumerate() {
            let mut ok = 0;
            let mut slowest = Duration::ZERO;
            for r in rs {
                match r {
                    Ok(g) => {
                        ok += 1;
                        slowest = slowest.max(g.elapsed);
                    }
                    Err(e) => fail(format!("{MANY} slow readers, {}: {e}", p.label())),
                }
            }
            let mut row = vec![
                p.label().to_string(),
                format!("{ok}/{MANY}"),
                if ok > 0 {
                    format!("{:.1} s", slowest.as_secs_f64())
                } else {
                    NA.into()
                },
            ];
            row.extend(rss_cells(rss0[i], peak[i], bound));
            t.row(row);
        }
        t.notes.push(format!(
            "complete: every byte checked, EOF right after the last. bound: per held stream the limit ({}) + russh's queue ({}) + one packet (docs/flow-control.md), times {MANY}, + 16 MiB; the daemon-wide bound is proxy.relay_buffer_budget (512 MiB)",
            mib(STREAM_LIMIT),
            mib(RUSSH_QUEUE)
        ));
        t
    }

    /// Case 3: a stream opened after a slow reader started on the node.
    fn new_stream_beside(ep: &Endpoints, sz: &Sizes, admin: &Path) -> Table {
        let count = (sz.rtt_count / 5).clamp(20, 2000);
        let bytes = (SLOW_RATE * sz.slow_neigh_secs as f64) as u64;
        progress("slow: a stream opened after a slow reader started");
        let mut t = Table::new(
            format!(
                "A new stream opened after a 2 MB/s reader started on the same node: {MSG}-byte round trips ({count}), idle vs beside it"
            ),
            &[
                "path",
                "idle p50",
                "idle p99",
                "beside p50",
                "beside p99",
                "p50 vs idle",
                "p99 vs idle",
                "held seen",
                "slow reader",
            ],
        );
        for p in SLOW_PATHS {
            let idle = rtts(ep, p, count, Duration::ZERO, None).unwrap_or_else(|e| {
                fail(format!(
                    "new stream beside a slow reader, {} idle: {e}",
                    p.label()
                ));
                Vec::new()
            });
            let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
            let (beside, held, slow, during) = std::thread::scope(|sc| {
                let h = sc.spawn(|| paced(ep, p, bytes, SLOW_RATE, &got, &done));
                let admin = (p != PathKind::SshL).then_some(admin);
                let held = wait_held(&got, 2 << 20, admin, false);
                let beside = rtts(ep, p, count, Duration::ZERO, None);
                let during = !done.load(Ordering::Relaxed);
                (beside, held, join(h), during)
            });
            let beside = beside.unwrap_or_else(|e| {
                fail(format!(
                    "new stream beside a slow reader, {}: {e}",
                    p.label()
                ));
                Vec::new()
            });
            let slow_ok = match slow {
                Ok(_) => "every byte".to_string(),
                Err(e) => {
                    fail(format!(
                        "slow reader beside a new stream, {}: {e}",
                        p.label()
                    ));
                    "FAILED".into()
                }
            };
            if !during {
                t.notes.push(format!(
                    "{}: the slow reader ended before the measurement did",
                    p.label()
                ));
            }
            let rel = |q: f64| match (percentile(&beside, q), percentile(&idle, q)) {
                (Some(a), Some(i)) if !i.is_zero() => {
                    format!("{:.2}×", a.as_secs_f64() / i.as_secs_f64())
                }
                _ => NA.into(),
            };
            t.row(vec![
                p.label().into(),
                pct(&idle, 50.0),
                pct(&idle, 99.0),
                pct(&beside, 50.0),
                pct(&beside, 99.0),
                rel(50.0),
                rel(99.0),
                if p == PathKind::SshL {
                    "-".into()
                } else if held {
                    "yes".into()
                } else {
                    "no".into()
                },
                slow_ok,
            ]);
        }
        t.notes.push("target: daemon p50 beside ≤ 1.5× idle. The new stream is dialed once the slow reader has 2 MiB and (daemon) the node shows a congested or held session; the slow reader runs on through the measurement".into());
        t
    }

    /// Case 5: a `kubectl cp`-like copy at 20 MB/s and an interactive echo
    /// stream opened once the copy is under way.
    fn kubectl_cp(ep: &Endpoints, sz: &Sizes, admin: &Path) -> Table {
        let bytes = sz.cp_bytes;
        progress(&format!(
            "slow: kubectl cp-like, {} at 20 MB/s beside an interactive echo",
            mib(bytes)
        ));
        let mut t = Table::new(
            format!(
                "kubectl cp-like: {} from a node-side source to a 20 MB/s reader, with an echo stream opened afterwards (one {MSG}-byte round trip every 10 ms)",
                mib(bytes)
            ),
            &[
                "path", "copy", "time", "MB/s", "checksum", "echoes", "echo p50", "echo p99",
            ],
        );
        for p in SLOW_PATHS {
            let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
            let (cp, echo) = std::thread::scope(|sc| {
                let h = sc.spawn(|| paced(ep, p, bytes, CP_RATE, &got, &done));
                let admin = (p != PathKind::SshL).then_some(admin);
                wait_held(&got, (4 << 20).min(bytes / 4), admin, false);
                let echo = rtts(ep, p, 1_000_000, Duration::from_millis(10), Some(&done));
                (join(h), echo)
            });
            let echo = echo.unwrap_or_else(|e| {
                fail(format!("kubectl cp-like, echo on {}: {e}", p.label()));
                Vec::new()
            });
            let mut row = vec![p.label().to_string()];
            match cp {
                Ok(g) => {
                    let want = expected_fnv(g.seed, bytes);
                    if g.fnv != want {
                        fail(format!(
                            "kubectl cp-like, {}: checksum {:016x}, expected {want:016x}",
                            p.label(),
                            g.fnv
                        ));
                    }
                    row.extend([
                        "every byte".to_string(),
                        format!("{:.1} s", g.elapsed.as_secs_f64()),
                        format!("{:.1}", bytes as f64 / g.elapsed.as_secs_f64() / 1e6),
                        format!(
                            "{:016x} {}",
                            g.fnv,
                            if g.fnv == want {
                                "= source"
                            } else {
                                "≠ SOURCE"
                            }
                        ),
                    ]);
                }
                Err(e) => {
                    fail(format!("kubectl cp-like, {}: {e}", p.label()));
                    row.extend(["FAILED".into(), NA.into(), NA.into(), NA.into()]);
                }
            }
            row.extend([echo.len().to_string(), pct(&echo, 50.0), pct(&echo, 99.0)]);
            t.row(row);
        }
        t.notes.push("checksum: FNV-1a 64 of the bytes received, against the same over the source's pattern; every byte is also checked on arrival".into());
        t
    }

    /// What the neighbours of a 2 MB/s reader saw on its session.
    struct Beside {
        idle: Vec<Duration>,
        held: Vec<Duration>,
        download: Duration,
        slow_ok: bool,
        seen: bool,
    }

    /// On `p`: an echo and a download stream opened first, then a 2 MB/s
    /// reader of a pushing source on the same session; once it holds the
    /// session, round trips on the echo for `window` and a `bulk` download
    /// read as fast as it comes. Every byte is checked.
    fn beside_slow(
        ep: &Endpoints,
        p: PathKind,
        admin: &Path,
        count: usize,
        bytes: u64,
        bulk: u64,
        window: Duration,
    ) -> io::Result<Beside> {
        let seed = next_seed();
        let mut echo = ep.dial(p, ECHO_PORT)?;
        let mut dl = ep.dial(p, SOURCE_PORT)?;
        let idle = rtts_on(&mut echo, seed, 0, count, None, Duration::ZERO, None)?;
        let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
        let (held, dl_r, slow, seen) = std::thread::scope(|sc| {
            let h = sc.spawn(|| paced(ep, p, bytes, SLOW_RATE, &got, &done));
            let admin = (p != PathKind::SshL).then_some(admin);
            let seen = wait_held(&got, 2 << 20, admin, true);
            let until = Instant::now() + window;
            let d = sc
                .spawn(|| read_source(&mut dl, bulk, None, &AtomicU64::new(0)).map(|g| g.elapsed));
            let held = rtts_on(
                &mut echo,
                seed,
                count as u64,
                1_000_000,
                Some(until),
                Duration::ZERO,
                None,
            );
            (held, join(d), join(h), seen)
        });
        let held = held?;
        finish_echo(&mut echo)?;
        let slow_ok = match slow {
            Ok(_) => true,
            Err(e) => {
                fail(format!(
                    "slow reader beside its session's neighbours, {}: {e}",
                    p.label()
                ));
                false
            }
        };
        let download = dl_r?;
        if p != PathKind::SshL && !seen {
            fail(format!(
                "neighbours on a held session, {}: the session was never held within {HOLD_WAIT:?}",
                p.label()
            ));
        }
        Ok(Beside {
            idle,
            held,
            download,
            slow_ok,
            seen,
        })
    }

    /// Case 4: streams that already shared the session when it became
    /// held. A daemon of its own with one session per node, so they must.
    pub fn shared_session(cluster: &Cluster, ep: &Endpoints, sz: &Sizes) -> Vec<Table> {
        progress("slow: neighbours on the held session (max_connections_per_node = 1)");
        let spec = ConfigSpec {
            ssh_extra: "max_connections_per_node = 1".into(),
            ..ConfigSpec::default()
        };
        let daemon = Daemon::start_toml(cluster, &bench_toml(cluster, &spec), &[]);
        daemon.wait_all_healthy(Duration::from_secs(30));
        let w = watch(&[], Some(&daemon.admin));
        let count = (sz.rtt_count / 5).clamp(20, 2000);
        let bytes = (SLOW_RATE * sz.slow_neigh_secs as f64) as u64;
        let bulk = (sz.bulk_bytes / 64).max(1 << 20);
        let window = Duration::from_secs_f64(sz.slow_neigh_secs as f64 / 3.0);
        let win = node_status(&daemon.admin)
            .and_then(|n| n["window_bytes"].as_u64())
            .unwrap_or(0);
        let mut t = Table::new(
            format!(
                "Streams that already shared the session when a 2 MB/s reader made it held (daemon: max_connections_per_node = 1, SSH window {}): {MSG}-byte round trips for {:.1} s, and a {} download",
                mib(win),
                window.as_secs_f64(),
                mib(bulk)
            ),
            &[
                "path",
                "idle p50",
                "held p50",
                "held p99",
                "round trips",
                "download",
                "MB/s",
                "slow reader",
            ],
        );
        for p in SLOW_PATHS {
            match beside_slow(ep, p, &daemon.admin, count, bytes, bulk, window) {
                Ok(b) => t.row(vec![
                    p.label().into(),
                    pct(&b.idle, 50.0),
                    pct(&b.held, 50.0),
                    pct(&b.held, 99.0),
                    b.held.len().to_string(),
                    format!("{:.1} s", b.download.as_secs_f64()),
                    format!("{:.2}", bulk as f64 / b.download.as_secs_f64() / 1e6),
                    if b.slow_ok { "every byte" } else { "FAILED" }.into(),
                ]),
                Err(e) => {
                    fail(format!("neighbours on a held session, {}: {e}", p.label()));
                    let mut row = vec![p.label().to_string()];
                    row.resize(8, NA.into());
                    t.row(row);
                }
            }
        }
        t.notes.push("the echo and download streams are opened before the slow reader, on the same (only) session; the download is requested once the session is held and read as fast as it comes, every byte checked".into());
        t.notes.push("daemon: russh re-opens a channel's window as data arrives, so the held session carries the neighbours' node→client data behind up to one SSH window of the slow stream's, drained at 2 MB/s; the window is sized to the link (see the `window` table). ssh -L has per-channel windows and is not held".into());
        let (_, seen) = w.finish();
        let mut d = daemon;
        d.stop();
        vec![
            t,
            status_table("max_connections_per_node = 1: over the case above", seen),
        ]
    }

    /// The SSH window's trade-off, one daemon per window (`window_min =
    /// window_max`, one session per node): one stream's download speed
    /// alone, against what a 2 MB/s reader's neighbours on its session pay.
    /// `ssh -L`, with per-channel windows, is the reference row.
    pub fn window_tradeoff(cluster: &Cluster, ep: &Endpoints, sz: &Sizes) -> Table {
        const WINDOWS: [u64; 7] = [
            64 << 10,
            128 << 10,
            256 << 10,
            512 << 10,
            1 << 20,
            2 << 20,
            8 << 20,
        ];
        progress("window: download speed against neighbour delay, per SSH window");
        let alone = (sz.bulk_bytes / 4).max(8 << 20);
        let count = (sz.rtt_count / 10).clamp(20, 1000);
        let bytes = (SLOW_RATE * sz.slow_neigh_secs as f64) as u64;
        let bulk = (sz.bulk_bytes / 64).max(1 << 20);
        let window = Duration::from_secs_f64(sz.slow_neigh_secs as f64 / 3.0);
        let mut t = Table::new(
            format!(
                "SSH window trade-off (max_connections_per_node = 1): a {} download alone, and beside a 2 MB/s reader on the same session {MSG}-byte round trips for {:.1} s and a {} download",
                mib(alone),
                window.as_secs_f64(),
                mib(bulk)
            ),
            &[
                "window",
                "alone MB/s",
                "beside: p50",
                "p99",
                "download MB/s",
                "slow reader",
            ],
        );
        let row = |label: String, p: PathKind, admin: &Path| -> Vec<String> {
            let speed = ep
                .dial(p, SOURCE_PORT)
                .and_then(|mut s| read_source(&mut s, alone, None, &AtomicU64::new(0)))
                .map(|g| format!("{:.0}", alone as f64 / g.elapsed.as_secs_f64() / 1e6))
                .unwrap_or_else(|e| {
                    fail(format!("window {label}, download alone: {e}"));
                    "FAILED".into()
                });
            match beside_slow(ep, p, admin, count, bytes, bulk, window) {
                Ok(b) => vec![
                    label,
                    speed,
                    pct(&b.held, 50.0),
                    pct(&b.held, 99.0),
                    format!("{:.1}", bulk as f64 / b.download.as_secs_f64() / 1e6),
                    if b.slow_ok && (b.seen || p == PathKind::SshL) {
                        "every byte"
                    } else {
                        "FAILED"
                    }
                    .into(),
                ],
                Err(e) => {
                    fail(format!("window {label}, beside a slow reader: {e}"));
                    let mut r = vec![label, speed];
                    r.resize(6, NA.into());
                    r
                }
            }
        };
        for w in WINDOWS {
            let spec = ConfigSpec {
                ssh_extra: format!(
                    "max_connections_per_node = 1\nwindow_min = \"{w}B\"\nwindow_max = \"{w}B\""
                ),
                ..ConfigSpec::default()
            };
            let mut daemon = Daemon::start_toml(cluster, &bench_toml(cluster, &spec), &[]);
            daemon.wait_all_healthy(Duration::from_secs(30));
            let shown = node_status(&daemon.admin)
                .and_then(|n| n["window_bytes"].as_u64())
                .unwrap_or(0);
            if shown != w {
                fail(format!("window {w}: the status shows window_bytes {shown}"));
            }
            t.row(row(
                format!("{} KiB", w >> 10),
                PathKind::DaemonUnix,
                &daemon.admin,
            ));
            daemon.stop();
        }
        t.row(row(
            "ssh -L".into(),
            PathKind::SshL,
            Path::new("/nonexistent"),
        ));
        t.notes.push("one daemon per window, window_min = window_max; the neighbours' delay is about the window over the slow reader's rate (russh re-opens windows on arrival), and the download alone needs about one bandwidth-delay product plus the processing delay of a window update".into());
        t
    }

    /// The fair budget: a download from node-3, whose session carries
    /// nothing else, alone and then while eight stalled readers (four on
    /// node-1, four on node-2) fill a 1 MiB budget (`relay_stream_buffer_limit
    /// = 256KiB`, one session per node). `ssh -L`, one per node, does the
    /// same on the same nodes.
    pub fn fair_budget(sz: &Sizes) -> Table {
        progress("slow: fair budget, building 3 node namespaces");
        let cluster = Cluster::with_options(
            3,
            ClusterOptions {
                servers: false,
                ..ClusterOptions::default()
            },
        );
        let _servers: Vec<ChildGuard> =
            cluster.nodes.iter().map(|n| start_servers(&n.ns)).collect();
        let spec = ConfigSpec {
            ssh_extra: "max_connections_per_node = 1".into(),
            ..ConfigSpec::default()
        };
        let toml = bench_toml(&cluster, &spec).replacen(
            "[proxy]\n",
            // The smallest floor, so that the stalled sessions (4 × 256 KiB
            // each) reach into the shared budget and it binds.
            "[proxy]\nrelay_buffer_budget = \"1MiB\"\nrelay_stream_buffer_limit = \"256KiB\"\nrelay_session_floor = \"256KiB\"\n",
            1,
        );
        let mut daemon = Daemon::start_toml(&cluster, &toml, &[]);
        daemon.wait_all_healthy(Duration::from_secs(30));
        let mut ssh = Vec::new();
        let mut eps = Vec::new();
        for node in &cluster.nodes {
            let (g, forwards) = start_ssh_forward(&cluster, node.ip, &[SOURCE_PORT]);
            ssh.push(g);
            eps.push(Endpoints {
                node_ip: node.ip,
                forwards,
                daemon_tcp: daemon.tcp_listener(),
                daemon_unix: daemon.egress.clone(),
            });
        }
        let bulk = (sz.bulk_bytes / 4).max(32 << 20);
        let mut t = Table::new(
            format!("Fair budget: a {} download from node-3 alone, and while 8 stalled readers on node-1 and node-2 fill the budget (daemon: relay_buffer_budget 1MiB, relay_stream_buffer_limit 256KiB, relay_session_floor 256KiB, max_connections_per_node 1)", mib(bulk)),
            &["path", "alone MB/s", "beside stalled MB/s", "ratio", "held by the budget"],
        );
        let download = |p: PathKind| -> io::Result<f64> {
            let mut s = eps[2].dial(p, SOURCE_PORT)?;
            let g = read_source(&mut s, bulk, None, &AtomicU64::new(0))?;
            Ok(bulk as f64 / g.elapsed.as_secs_f64() / 1e6)
        };
        for p in [PathKind::DaemonUnix, PathKind::SshL] {
            let run = || -> io::Result<Vec<String>> {
                let alone = download(p)?;
                // Stalled: each asks for 1 TiB and never reads.
                let mut stalled = Vec::new();
                for ep in &eps[..2] {
                    for _ in 0..4 {
                        let mut s = ep.dial(p, SOURCE_PORT)?;
                        let mut req = [0u8; 16];
                        req[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                        req[8..].copy_from_slice(&next_seed().to_le_bytes());
                        s.write_all(&req)?;
                        stalled.push(s);
                    }
                }
                let held = || {
                    common::metric_value(
                        &daemon.metrics(),
                        "tunneler_relay_budget_held_streams",
                        &[],
                    )
                    .unwrap_or(0.0)
                };
                let full = p == PathKind::SshL || common::poll(HOLD_WAIT, || held() > 0.0);
                if !full {
                    fail("fair budget: the stalled readers never filled the budget".into());
                }
                let beside = download(p)?;
                let h = if p == PathKind::SshL {
                    NA.to_string()
                } else {
                    format!("{}", held())
                };
                drop(stalled);
                Ok(vec![
                    p.label().into(),
                    format!("{alone:.0}"),
                    format!("{beside:.0}"),
                    format!("{:.2}", beside / alone),
                    h,
                ])
            };
            match run() {
                Ok(r) => t.row(r),
                Err(e) => {
                    fail(format!("fair budget, {}: {e}", p.label()));
                    let mut r = vec![p.label().to_string()];
                    r.resize(5, NA.into());
                    t.row(r);
                }
            }
        }
        t.notes.push("target: the download beside the stalled readers at >= 50% of its speed alone (before the fair budget: 0.001 Gbit/s). `held by the budget`: tunneler_relay_budget_held_streams during the download".into());
        daemon.stop();
        t
    }

    /// A reader that stops beside neighbours on its session: after
    /// `relay_stopped_reader_timeout` (2 s here) its stream is reset, and
    /// the neighbours' echo and download complete.
    pub fn stopped_reader(cluster: &Cluster, ep: &Endpoints, sz: &Sizes) -> Table {
        progress("slow: a reader that stopped beside neighbours on its session");
        let spec = ConfigSpec {
            ssh_extra: "max_connections_per_node = 1".into(),
            ..ConfigSpec::default()
        };
        let toml = bench_toml(cluster, &spec).replacen(
            "[proxy]\n",
            "[proxy]\nrelay_stopped_reader_timeout = \"2s\"\n",
            1,
        );
        let mut daemon = Daemon::start_toml(cluster, &toml, &[]);
        daemon.wait_all_healthy(Duration::from_secs(30));
        // This daemon's own TCP listener (the Unix socket path is the same).
        let ep = &Endpoints {
            node_ip: ep.node_ip,
            forwards: ep.forwards.clone(),
            daemon_tcp: daemon.tcp_listener(),
            daemon_unix: ep.daemon_unix.clone(),
        };
        let bulk = (sz.bulk_bytes / 64).max(1 << 20);
        let mut t = Table::new(
            format!("A reader that stopped, beside neighbours on its session (max_connections_per_node = 1, relay_stopped_reader_timeout = 2s): {MSG}-byte round trips and a {} download", mib(bulk)),
            &["path", "stopped stream", "after", "round trips", "p99", "download MB/s"],
        );
        // TCP: a cut reaches a TCP client as a reset; on the Unix socket a
        // client that only reads sees EOF (see docs/operations.md).
        for p in [PathKind::DaemonTcp, PathKind::SshL] {
            let run = || -> io::Result<Vec<String>> {
                let seed = next_seed();
                let mut echo = ep.dial(p, ECHO_PORT)?;
                let mut dl = ep.dial(p, SOURCE_PORT)?;
                let mut stopped = ep.dial(p, SOURCE_PORT)?;
                let mut req = [0u8; 16];
                req[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                req[8..].copy_from_slice(&next_seed().to_le_bytes());
                stopped.write_all(&req)?;
                let t0 = Instant::now();
                // It never reads; the neighbours work beside it.
                std::thread::sleep(Duration::from_secs(1));
                let until = Instant::now() + Duration::from_secs(10);
                let rtts = rtts_on(
                    &mut echo,
                    seed,
                    0,
                    200,
                    Some(until),
                    Duration::from_millis(10),
                    None,
                )?;
                let d = read_source(&mut dl, bulk, None, &AtomicU64::new(0))?;
                finish_echo(&mut echo)?;
                // What the stopped stream shows when it finally reads.
                let mut buf = vec![0u8; 1 << 20];
                let mut end = String::from("still open");
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    match stopped.read(&mut buf) {
                        Ok(0) => {
                            end = "EOF (FIN)".into();
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                            end = "reset".into();
                            break;
                        }
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                || e.kind() == io::ErrorKind::TimedOut =>
                        {
                            continue
                        }
                        Err(e) => {
                            end = format!("{e}");
                            break;
                        }
                    }
                }
                Ok(vec![
                    p.label().into(),
                    end,
                    format!("{:.1} s", t0.elapsed().as_secs_f64()),
                    rtts.len().to_string(),
                    pct(&rtts, 99.0),
                    format!("{:.1}", bulk as f64 / d.elapsed.as_secs_f64() / 1e6),
                ])
            };
            match run() {
                Ok(r) => t.row(r),
                Err(e) => {
                    fail(format!(
                        "stopped reader beside neighbours, {}: {e}",
                        p.label()
                    ));
                    let mut r = vec![p.label().to_string()];
                    r.resize(6, NA.into());
                    t.row(r);
                }
            }
        }
        t.notes.push("the stopped stream asks for 1 TiB and never reads; the echo (one round trip per 10 ms) and the download run beside it on the same session. ssh -L stops only that channel. The daemon resets the stopped stream once it has read nothing for the timeout while others ride its session".into());
        daemon.stop();
        t
    }

    fn status_table(label: &str, s: Seen) -> Table {
        let mut t = Table::new(
            format!("Daemon status while slow readers ran ({label})"),
            &[
                "sessions (max)",
                "congested_sessions (max)",
                "blocked_seconds",
                "streams_slowed",
                "polls",
            ],
        );
        if s.polls == 0 {
            fail(format!("slow, {label}: the admin status never answered"));
            t.row(vec![NA.into(); 5]);
        } else {
            t.row(vec![
                s.max_sessions.to_string(),
                s.max_congested.to_string(),
                format!("{:.1}", s.blocked_seconds),
                s.streams_slowed.to_string(),
                s.polls.to_string(),
            ]);
        }
        t.notes.push("from `status --json` of the node, polled every 100 ms; blocked_seconds and streams_slowed are totals since the daemon started".into());
        t
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

fn nodes_table(sz: &Sizes, real: &NodesResult, sims: &[SimResult], ssh_rss: Option<u64>) -> Table {
    let mut nodes = Table::new(
        "Nodes: time from daemon start until all are healthy (production timing defaults: keepalive 10 s)",
        &[
            "nodes",
            "all healthy after",
            "healthy",
            "daemon RSS",
            "RSS/tunnel",
            "idle CPU",
            "machine memory",
        ],
    );
    if real.healthy_after.is_none() {
        fail(format!(
            "{}: only {} of {} nodes healthy before the deadline",
            real.label, real.healthy, real.n
        ));
    }
    nodes.row(vec![
        real.label.clone(),
        real.healthy_after
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "not reached".into()),
        format!("{}/{}", real.healthy, real.n),
        format!("{} KiB", real.rss_kib),
        "-".into(),
        "-".into(),
        "-".into(),
    ]);
    for r in sims {
        let label = format!(
            "{} simulated nodes, {} sshd{}",
            r.n,
            r.sshds,
            if r.sshds == 1 { "" } else { "s" }
        );
        if let Some(why) = &r.skipped {
            let mut row = vec![label, format!("n/a: {why}")];
            row.resize(7, NA.into());
            nodes.row(row);
            continue;
        }
        nodes.row(vec![
            label,
            r.healthy_after
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or_else(|| "not reached".into()),
            format!("{}/{} ({} at end)", r.healthy, r.n, r.healthy_at_end),
            format!("{:.1} MiB", r.rss_kib as f64 / 1024.0),
            format!("{:.1} KiB", r.per_tunnel_kib()),
            r.idle_cpu
                .map(|c| format!("{:.2} %", c * 100.0))
                .unwrap_or_else(|| NA.into()),
            r.machine_kib
                .map(|k| format!("{:.0} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| NA.into()),
        ]);
    }
    nodes.notes.push("simulated nodes: distinct addresses in 10.201-203.x.0/24 blocks on the lo of a few namespaces, each namespace's sshd (MaxStartups above its share) answering on all of them; one daemon for all".into());
    nodes.notes.push("RSS/tunnel: (daemon VmRSS with the nodes healthy and idle - VmRSS of the same daemon with no nodes) / nodes. idle CPU: the daemon's utime+stime over the idle window after all were healthy, % of one core. machine memory: drop of MemAvailable from daemon start to all healthy (sshd's processes and the daemon)".into());

    // The targets: per idle tunnel at the largest count that ran, and the
    // healthy time, RSS and idle CPU at the counts the targets name.
    let ran: Vec<&SimResult> = sims.iter().filter(|r| r.healthy_after.is_some()).collect();
    match ran.iter().max_by_key(|r| r.n) {
        Some(r) => {
            let k = r.per_tunnel_kib();
            record(
                "rss tunnel",
                format!(
                    "{k:.1} KiB at {} nodes{}",
                    r.n,
                    match ssh_rss {
                        Some(s) => format!(
                            " ({} one ssh -L process, {s} KiB)",
                            ratio(k, Some(s as f64))
                        ),
                        None => String::new(),
                    }
                ),
                Some(k <= 64.0),
            );
        }
        None => record(
            "rss tunnel",
            "n/a: no simulated-node run completed".into(),
            None,
        ),
    }
    let at = |n: usize| sims.iter().find(|r| r.n == n);
    let missing = |n: usize| -> String {
        match at(n) {
            Some(SimResult {
                skipped: Some(why), ..
            }) => format!("n/a: {why}"),
            Some(_) => "n/a: not all nodes became healthy (see errors)".into(),
            None => format!(
                "n/a: this run simulated {:?} nodes, not {n}",
                sims.iter().map(|r| r.n).collect::<Vec<_>>()
            ),
        }
    };
    match at(5000).filter(|r| r.healthy_after.is_some()) {
        Some(r) => {
            let secs = r.healthy_after.map_or(0.0, |d| d.as_secs_f64());
            record(
                "nodes healthy",
                format!("{secs:.1} s ({:.2}× the target)", secs / 30.0),
                Some(secs <= 30.0),
            );
            let mib = r.rss_kib as f64 / 1024.0;
            record(
                "nodes rss",
                format!("{mib:.0} MiB ({:.2}× the target)", mib / 400.0),
                Some(mib <= 400.0),
            );
        }
        None => {
            record("nodes healthy", missing(5000), None);
            record("nodes rss", missing(5000), None);
        }
    }
    match at(1000).and_then(|r| r.idle_cpu) {
        Some(c) => record(
            "idle cpu",
            format!(
                "{:.2} % of one core over {} s ({:.2}× the target)",
                c * 100.0,
                sz.idle_cpu_secs,
                c / 0.02
            ),
            Some(c <= 0.02),
        ),
        None => record("idle cpu", missing(1000), None),
    }
    nodes
}

/// Per idle tunnel and per idle stream, daemon against ssh -L.
/// `idle_tunnel_rss` is (daemon, ssh) VmRSS with one idle tunnel each.
fn memory_table(
    sz: &Sizes,
    per_tunnel: Option<f64>,
    idle_tunnel_rss: Option<(u64, u64)>,
    per_stream: &HashMap<PathKind, f64>,
) -> Table {
    let mut mem = Table::new("Memory summary", &["what", "daemon", "ssh -L", "vs ssh -L"]);
    let ssh_tunnel = idle_tunnel_rss.map(|r| r.1 as f64);
    let cell = |v: Option<f64>| v.map(|k| format!("{k:.1}")).unwrap_or_else(|| "-".into());
    mem.row(vec![
        "per idle tunnel (KiB)".into(),
        cell(per_tunnel),
        cell(ssh_tunnel),
        per_tunnel
            .map(|k| ratio(k, ssh_tunnel))
            .unwrap_or_else(|| "-".into()),
    ]);
    let ds = per_stream
        .get(&PathKind::DaemonUnix)
        .or(per_stream.get(&PathKind::DaemonTcp))
        .copied();
    let ss = per_stream.get(&PathKind::SshL).copied();
    mem.row(vec![
        "per idle stream (KiB)".into(),
        cell(ds),
        cell(ss),
        ds.map(|k| ratio(k, ss)).unwrap_or_else(|| "-".into()),
    ]);
    mem.notes.push(format!(
        "per idle tunnel: daemon from the largest simulated-node run; ssh -L is one whole `ssh -N -L` process per node (its VmRSS when idle; the daemon with 1 tunnel had {} KiB)",
        idle_tunnel_rss.map_or_else(|| NA.to_string(), |r| r.0.to_string())
    ));
    mem.notes.push(format!(
        "per idle stream: from the largest concurrent-stream run ({}), daemon over the Unix listener",
        sz.streams.last().copied().unwrap_or(0)
    ));
    mem
}

/// Every section on the one stream node: a node namespace with the bench
/// servers, the daemon, and `ssh -L` beside it. Returns the tables, the
/// RSS per idle stream of each path, and (daemon, ssh) VmRSS with one idle
/// tunnel each.
fn one_node(sz: &Sizes) -> (Vec<Table>, HashMap<PathKind, f64>, (u64, u64)) {
    progress("building the stream node");
    let cluster = Cluster::with_options(1, ClusterOptions::default());
    let node_ip = cluster.node(1).ip;
    let _servers = start_servers(&cluster.node(1).ns);
    // sshd's connections to the echo server come from the node's own
    // ephemeral ports, and it closes first: tens of thousands of dials in
    // a minute would run the namespace out of ports. These sysctls belong
    // to the node namespace only.
    common::run(
        "ip",
        &[
            "netns",
            "exec",
            &cluster.node(1).ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    );
    let daemon = Daemon::start_toml(&cluster, &bench_toml(&cluster, &ConfigSpec::default()), &[]);
    daemon.wait_all_healthy(Duration::from_secs(30));
    let (ssh, forwards) = start_ssh_forward(&cluster, node_ip, &[SOURCE_PORT, ECHO_PORT]);
    let ep = Endpoints {
        node_ip,
        forwards,
        daemon_tcp: daemon.tcp_listener(),
        daemon_unix: daemon.egress.clone(),
    };
    let (dpid, spid) = (daemon.pid(), ssh.id());
    let idle_tunnel_rss = (rss_kib(dpid), rss_kib(spid));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    progress(&format!("daemon pid {dpid}, ssh -L pid {spid}"));

    let mut tables = Vec::new();
    // First, while the tunnel has carried nothing yet.
    if sz.runs("rtt_ms") {
        tables.push(status_rtt(&ep, sz, &daemon.admin));
    }
    if sz.runs("throughput") {
        tables.push(throughput(&ep, sz, dpid, spid));
    }
    if sz.runs("rtt") {
        tables.push(rtt(&ep, sz));
    }
    if sz.runs("dial") {
        tables.extend(dials(&ep, sz, &rt));
    }
    let mut per_stream = HashMap::new();
    if sz.runs("streams") {
        let (ct, ps) = concurrency(&ep, sz, &rt, dpid, spid);
        tables.extend(ct);
        per_stream = ps;
    }
    if sz.runs("slow") {
        tables.extend(slow::on_node(&ep, sz, &daemon, spid));
    }
    // SIGTERM, not SIGKILL: a profiling wrapper (TUNNELER_TEST_BIN) then
    // gets to write its output.
    let mut daemon = daemon;
    daemon.stop();
    drop(daemon);
    if sz.runs("slow") {
        // Needs a daemon of its own (one session per node) on the same node.
        tables.extend(slow::shared_session(&cluster, &ep, sz));
        tables.push(slow::stopped_reader(&cluster, &ep, sz));
    }
    if sz.runs("window") {
        tables.push(slow::window_tradeoff(&cluster, &ep, sz));
    }
    (tables, per_stream, idle_tunnel_rss)
}

fn ssh_version() -> String {
    Command::new("/usr/bin/ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

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
