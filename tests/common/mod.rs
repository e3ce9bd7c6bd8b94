//! Integration-test harness: a throwaway cluster of network namespaces, each
//! running a real OpenSSH sshd and small Python servers, plus a handle on a
//! `tunneler run` daemon configured for that cluster.
//!
//! Layout for slot `n` (allocated per cluster, unique across threads and
//! processes):
//! - host bridge `tnlbr<n>` with 10.200.n.1/24;
//! - node `i` (1-based) lives in namespace `tnl<n>-<i>`, reached through the
//!   veth pair `tv<n>h<i>` (host, on the bridge) / `tv<n>n<i>` (node), with the
//!   SSH address 10.200.n.(10+i)/24 and no default route;
//! - on the node's `lo`: pod address 10.201.n.(16i+5)/32 (pod CIDR
//!   10.201.n.(16i)/28), its own service address 10.202.n.(10+i)/32, and the
//!   shared "anycast" service address 10.202.n.100/32 that every node has,
//!   and (where IPv6 works) the pod address fd00:201:n:i::5/128 in the
//!   node's second pod CIDR fd00:201:n:i::/64. Pods sit at offset 5: the
//!   first addresses of a pod CIDR are the node's own by default
//!   (`proxy.pod_host_offsets`), as a CNI bridge holds them;
//! - line echo server on port 7000 (`node=<name> local=<ip> echo=<line>`) and
//!   HTTP server on port 8080 (body `node=<name>`), plus a server on 7001
//!   that floods whoever connects, and a raw byte echo on 7002 (for
//!   byte-exact checks, with EOF); all on the wildcard address.
//!
//! Only node SSH addresses on our own bridge are ever dialled from the host
//! namespace; pod and service addresses are reached through the daemon only.
//!
//! Everything is torn down in `Drop`, also when a test panics.
//!
//! Environment:
//! - `TUNNELER_REQUIRE_NETNS` (set by `.ci/run`): every skip ([`skip`],
//!   also through [`can_run`] and `require_netns!`) becomes a failure, so CI
//!   is never green with tests that did not run.
//! - `TUNNELER_TEST_TIME_FACTOR` (a positive number, default 1): scales every
//!   time bound the tests keep ([`assert_within`], [`scaled`]). Those are
//!   generous sanity bounds that print the measured value; raise the factor
//!   on a slow or loaded machine. Speed figures belong in the benchmark.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
#[allow(unused_imports)]
pub use tunneler::Source;
#[allow(unused_imports)]
pub use tunneler::{NodeStatus, StatusDocument, TunnelState};

pub mod apiserver;
mod children;
mod cluster;
mod daemon;
pub mod pki;
mod procfs;
mod slot;

#[allow(unused_imports)]
pub use children::{die_with_test, ChildGuard};
#[allow(unused_imports)]
pub use cluster::{Cluster, ClusterOptions, ConfigSpec, Node, MAX_BARE_NODES};
#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use procfs::*;
pub(crate) use slot::Slot;

/// Where slot lock directories live.
const SLOT_ROOT: &str = "/tmp/tunneler-test-slots";
/// Slots 1..=MAX_SLOT are for tests; 240 and above are left to the demo.
const MAX_SLOT: u32 = 239;
/// Port of the line echo server in every namespace.
pub const ECHO_PORT: u16 = 7000;
/// Port of the HTTP server in every namespace.
pub const HTTP_PORT: u16 = 8080;
/// Port of the server that writes endlessly to whoever connects.
pub const FLOOD_PORT: u16 = 7001;
/// Port of the raw echo server: sends back every byte it receives, as
/// received, and half-closes after the client's EOF.
pub const RAW_ECHO_PORT: u16 = 7002;
/// Last octet of the service address every node carries.
pub const ANYCAST_OCTET: u8 = 100;

/// Python servers run inside each namespace (shared with the demo).
const SERVER_PY: &str = include_str!("../../deploy/demo/node-servers.py");

// ---------------------------------------------------------------------------
// Environment checks
// ---------------------------------------------------------------------------

/// Returns `Err(reason)` when this machine cannot run the namespace tests.
fn environment() -> &'static Result<(), String> {
    static ENV: OnceLock<Result<(), String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("?")
            .to_string();
        if uid != "0" {
            return Err(format!("effective uid is {uid}, not 0"));
        }
        for bin in ["/usr/sbin/sshd", "/usr/bin/ssh-keygen", "/usr/bin/python3"] {
            if !Path::new(bin).exists() {
                return Err(format!("{bin} missing"));
            }
        }
        let probe = format!("tnlprobe{}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &probe]).output();
        match out {
            Ok(o) if o.status.success() => {
                let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            }
            Ok(o) => {
                return Err(format!(
                    "ip netns add failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Err(format!("ip netns add failed: {e}")),
        }
        let _ = fs::create_dir_all("/run/sshd");
        Ok(())
    })
}

/// True when the namespace tests can run; otherwise goes through [`skip`].
pub fn can_run(test: &str) -> bool {
    match environment() {
        Ok(()) => true,
        Err(why) => {
            skip(test, &format!("needs root and network namespaces ({why})"));
            false
        }
    }
}

/// The one gate for every environment-dependent skip in the integration
/// tests. Prints `SKIP <test>: <why>` straight to fd 2 (libtest captures
/// `eprintln!` of passing tests, and a skip must be visible in a normal
/// `cargo test` run), or panics when `TUNNELER_REQUIRE_NETNS` is set, as
/// `.ci/run` does: there a skip would hide that nothing was tested. The
/// caller returns (or leaves out the part) after it. Each skip is also
/// recorded for the run's last line, the count that `tests/zz_skipped.rs`
/// prints, since the `SKIP` lines scroll away in a full run.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("TUNNELER_REQUIRE_NETNS").is_some() {
        panic!("{test}: TUNNELER_REQUIRE_NETNS is set, but this would skip: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    record_skip(test, why);
}

/// Where skips of one `cargo test` run are collected for the summary that
/// `tests/zz_skipped.rs` prints last: one file per run, so a filtered run or
/// an interrupted one never mixes its records into another's count.
pub fn skip_records_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("skips")
}

/// Names the `cargo test` run this process belongs to: cargo starts every
/// test binary as its own child, so the parent's pid and start time (which
/// tells a reused pid apart) are the same for all binaries of one run, and
/// differ from every earlier run.
pub fn skip_run_id() -> String {
    let ppid = std::os::unix::process::parent_id();
    format!("{ppid}-{}", process_start_time(ppid).unwrap_or(0))
}

/// A process's start time in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), or `None` when the process is gone.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from after its closing parenthesis (field 3 onwards).
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Reasons the summary line names before it sums up the rest as "other".
const SKIP_REASONS_SHOWN: usize = 3;

/// One line from this run's records (`test<TAB>why` per skip; a test that
/// skipped more than one part is counted once).
pub fn skip_summary(records: &str) -> String {
    let mut tests = std::collections::BTreeSet::new();
    let mut by_reason: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
        std::collections::BTreeMap::new();
    for line in records.lines() {
        let Some((test, why)) = line.split_once('\t') else {
            continue;
        };
        tests.insert(test);
        by_reason.entry(why).or_default().insert(test);
    }
    if tests.is_empty() {
        return "tunneler tests: none skipped".to_string();
    }
    let mut reasons: Vec<(&str, usize)> = by_reason.iter().map(|(w, t)| (*w, t.len())).collect();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut parts: Vec<String> = reasons
        .iter()
        .take(SKIP_REASONS_SHOWN)
        .map(|(why, n)| format!("{n} × {why}"))
        .collect();
    if reasons.len() > SKIP_REASONS_SHOWN {
        let rest: usize = reasons[SKIP_REASONS_SHOWN..].iter().map(|r| r.1).sum();
        parts.push(format!(
            "{rest} × {} other reasons (see the SKIP lines)",
            reasons.len() - SKIP_REASONS_SHOWN
        ));
    }
    format!(
        "tunneler tests: {} skipped ({}); run as root, as .ci/run does, to run them",
        tests.len(),
        parts.join("; ")
    )
}

/// Appends `test<TAB>why` to this run's record file. One short `write` on a
/// file opened for appending, so lines of parallel tests never interleave.
/// A record that cannot be written only costs the summary line its count;
/// the skip itself was already printed.
fn record_skip(test: &str, why: &str) {
    let dir = skip_records_dir();
    if fs::create_dir_all(&dir).is_err() {
        return;
    }
    let line = format!(
        "{}\t{}\n",
        test.replace(['\t', '\n'], " "),
        why.replace(['\t', '\n'], " ")
    );
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.log", skip_run_id())))
    {
        let _ = f.write_all(line.as_bytes());
    }
}

// ---------------------------------------------------------------------------
// Timing: sanity bounds only
// ---------------------------------------------------------------------------

/// The one factor every time bound in the tests is scaled by:
/// `TUNNELER_TEST_TIME_FACTOR` (a positive number, default 1). Tests assert
/// behaviour; where a bound on elapsed time stays, it is a generous sanity
/// check (did it happen at all, not how fast), and a slow or loaded machine
/// raises the factor instead of editing tests. Speed is measured by the
/// benchmark (benches/e2e/), not here.
pub fn time_factor() -> f64 {
    static FACTOR: OnceLock<f64> = OnceLock::new();
    *FACTOR.get_or_init(|| match std::env::var("TUNNELER_TEST_TIME_FACTOR") {
        Err(_) => 1.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => f,
            _ => panic!("TUNNELER_TEST_TIME_FACTOR={v:?}: want a positive number"),
        },
    })
}

/// `base` scaled by [`time_factor`].
pub fn scaled(base: Duration) -> Duration {
    base.mul_f64(time_factor())
}

/// Prints `measured` and asserts it is below `bound` scaled by
/// [`time_factor`]: a sanity bound, never a performance target.
pub fn assert_within(what: &str, measured: Duration, bound: Duration) {
    let limit = scaled(bound);
    let _ = writeln!(
        std::io::stderr(),
        "TIMING {what}: {measured:?} (sanity bound {limit:?} = {bound:?} x TUNNELER_TEST_TIME_FACTOR {})",
        time_factor()
    );
    assert!(
        measured < limit,
        "{what} took {measured:?}, over the sanity bound {limit:?} ({bound:?} x \
         TUNNELER_TEST_TIME_FACTOR {}); on a slow machine raise the factor",
        time_factor()
    );
}

// ---------------------------------------------------------------------------
// Byte-exact streams
// ---------------------------------------------------------------------------

/// `len` bytes of a seeded xorshift pattern (all 256 byte values occur), so
/// a lost, repeated, reordered or altered byte is seen at its offset.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A connected stream whose halves can be used from two threads.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// A second handle on the same socket, for the writer thread.
    fn clone_handle(&self) -> Self;
    /// Ends our sending side (half-close); reading goes on.
    fn shutdown_write(&self);
}

impl Duplex for UnixStream {
    fn clone_handle(&self) -> Self {
        self.try_clone().expect("clone unix stream")
    }
    fn shutdown_write(&self) {
        self.shutdown(std::net::Shutdown::Write)
            .expect("shutdown write");
    }
}

impl Duplex for TcpStream {
    fn clone_handle(&self) -> Self {
        self.try_clone().expect("clone tcp stream")
    }
    fn shutdown_write(&self) {
        self.shutdown(std::net::Shutdown::Write)
            .expect("shutdown write");
    }
}

/// Over a stream CONNECTed to the node's raw echo server
/// ([`RAW_ECHO_PORT`]): sends `data` (from a second thread, so neither side
/// waits on the other's buffers), half-closes, and reads until EOF. Returns
/// `Err` naming the first difference: the echo must be `data` exactly, no
/// byte lost, changed or added, and then EOF.
pub fn echo_exact<S: Duplex>(s: S, data: &[u8]) -> Result<(), String> {
    let mut w = s.clone_handle();
    let out = data.to_vec();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&out)?;
        w.shutdown_write();
        Ok(())
    });
    let got = read_to_eof(s);
    let sent = writer.join().expect("writer thread");
    let got = got.map_err(|e| format!("reading the echo: {e} (sent {:?})", sent))?;
    sent.map_err(|e| format!("sending: {e}"))?;
    compare_exact(&got, data)
}

/// Over a stream CONNECTed to the raw echo server: sends `data` from a
/// second thread as fast as the daemon takes it, half-closes, and reads
/// the echo at `rate` bytes per second (reads of at most 64 KiB, each
/// followed by a sleep until `bytes / rate`), stopping for `pause` once
/// `pause_at` bytes arrived. A reader slower than its node, pacing being
/// the subject. Returns what arrived up to EOF, or the error.
pub fn paced_echo(
    s: UnixStream,
    data: &[u8],
    rate: f64,
    pause_at: usize,
    pause: Duration,
) -> Result<Vec<u8>, String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let out = data.to_vec();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&out)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut r = s;
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut paused = Duration::ZERO;
    let result = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(format!("read failed after {} bytes: {e}", got.len())),
        }
        if paused.is_zero() && got.len() >= pause_at && !pause.is_zero() {
            std::thread::sleep(pause);
            paused = pause;
        }
        let due = Duration::from_secs_f64(got.len() as f64 / rate) + paused;
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    };
    let sent = writer.join().expect("writer thread");
    result?;
    sent.map_err(|e| format!("sending: {e}"))?;
    Ok(got)
}

/// Reads until EOF.
pub fn read_to_eof<S: Read>(mut s: S) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(got)
}

/// `Ok` when `got == want`; else where they first differ, and both lengths.
pub fn compare_exact(got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Err(format!(
        "content differs: got {} bytes, want {}; first difference at offset {at}",
        got.len(),
        want.len()
    ))
}

/// Early-returns from a test when the environment cannot run it.
#[macro_export]
macro_rules! require_netns {
    ($name:expr) => {
        if !$crate::common::can_run($name) {
            return;
        }
    };
}

// ---------------------------------------------------------------------------
// Small process helpers
// ---------------------------------------------------------------------------

/// Runs a command and panics with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {program} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command, ignoring failure (cleanup paths).
fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(pid: u32, sig: &str) {
    run_quiet("kill", &[&format!("-{sig}"), &pid.to_string()]);
}

pub fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Generates an unencrypted ed25519 key pair at `path` (and `path.pub`).
pub fn ssh_keygen(path: &Path, comment: &str) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    run(
        "/usr/bin/ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            path.to_str().unwrap(),
        ],
    );
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Does `PerSourcePenalties` exist in this sshd (OpenSSH >= 9.8)? Turning it
/// off keeps a test that kills sshd from being penalised on reconnect.
fn sshd_has_penalties(dir: &Path) -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let cfg = dir.join("probe_sshd_config");
        let key = dir.join("probe_host_key");
        ssh_keygen(&key, "probe");
        fs::write(
            &cfg,
            format!("HostKey {}\nPerSourcePenalties no\n", key.display()),
        )
        .unwrap();
        let ok = run_quiet("/usr/sbin/sshd", &["-t", "-f", cfg.to_str().unwrap()]);
        let _ = fs::remove_file(&cfg);
        ok
    })
}

/// SIGKILLs every process in a namespace and waits (bounded) until gone.
fn kill_namespace_processes(ns: &str) {
    for _ in 0..3 {
        let pids = netns_pids(ns);
        if pids.is_empty() {
            return;
        }
        for pid in &pids {
            signal(*pid, "KILL");
        }
        poll(Duration::from_secs(2), || {
            pids.iter().all(|p| !pid_alive(*p))
        });
    }
}

/// The last `lines` lines of `s`.
fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Reads until EOF or error; true when the peer closed (EOF or reset)
/// within the socket's read timeout.
pub fn closed_by_peer<S: Read>(s: &mut S) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// `GET /` over an established tunnel; returns the whole response.
pub fn http_get_over<S: Read + Write>(mut s: S) -> String {
    s.write_all(b"GET / HTTP/1.0\r\nHost: kubelet\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
