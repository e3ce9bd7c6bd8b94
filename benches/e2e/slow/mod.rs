//! Slow readers (`slow`): a client slower than its node is slowed, never cut.
//!

use crate::*;

mod budget;
mod readers;
mod shared;
mod stopped;
mod window;

pub(crate) use budget::*;
use readers::*;
pub(crate) use shared::*;
pub(crate) use stopped::*;
pub(crate) use window::*;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The default `proxy.relay_stream_buffer_limit`; `bench_toml` keeps it.
pub(crate) const STREAM_LIMIT: u64 = 8 << 20;
/// russh's per-channel queue: at most 2 MiB of packets
/// (`ssh::context::channel_queue_packets`).
pub(crate) const RUSSH_QUEUE: u64 = 2 << 20;
/// One packet of the default `ssh.maximum_packet_size`.
pub(crate) const PACKET: u64 = 256 << 10;
/// Allowance on top of the per-stream figures (allocator, kernel, noise).
pub(crate) const SLACK: u64 = 16 << 20;
/// The slow reader's pace, bytes per second.
pub(crate) const SLOW_RATE: f64 = 2e6;
/// The `kubectl cp`-like reader's pace, bytes per second.
pub(crate) const CP_RATE: f64 = 20e6;
/// Slow readers at once in the many-readers case.
pub(crate) const MANY: usize = 10;
/// How long the neighbours wait for the slow stream to be held.
pub(crate) const HOLD_WAIT: Duration = Duration::from_secs(15);

pub(crate) const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `b`, continuing from `h`: the checksum `kubectl cp`'s
/// case reports (the per-byte pattern check is what catches errors).
pub(crate) fn fnv(mut h: u64, b: &[u8]) -> u64 {
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The checksum of the first `bytes` bytes of `seed`'s pattern.
pub(crate) fn expected_fnv(seed: u64, bytes: u64) -> u64 {
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

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// A checked read of a whole source stream.
pub(crate) struct Got {
    pub(crate) elapsed: Duration,
    pub(crate) seed: u64,
    pub(crate) fnv: u64,
}

/// Asks the source on `s` for `bytes` bytes of a fresh seed, then reads
/// them, at `rate` bytes per second if given, checking every byte and
/// EOF right after the last. `got` shows progress to other threads.
pub(crate) fn read_source(
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
pub(crate) fn paced(
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
pub(crate) fn rtts_on(
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
pub(crate) fn rtts(
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

pub(crate) fn pct(v: &[Duration], p: f64) -> String {
    percentile(v, p).map(us).unwrap_or_else(|| NA.into())
}

/// The daemon's first node in `status --json`, if the admin API answers
/// with a status document (the server's own type, so a renamed field
/// fails to parse instead of reading as 0).
pub(crate) fn node_status(admin: &Path) -> Option<common::NodeStatus> {
    first_node(admin)
}

/// What the status showed over a stretch of the run.
#[derive(Default, Clone, Copy)]
pub(crate) struct Seen {
    pub(crate) polls: u64,
    pub(crate) max_sessions: u64,
    pub(crate) max_congested: u64,
    pub(crate) blocked_seconds: f64,
    pub(crate) streams_slowed: u64,
}

impl Seen {
    pub(crate) fn add(&mut self, n: &common::NodeStatus) {
        self.polls += 1;
        self.max_sessions = self.max_sessions.max(n.sessions);
        self.max_congested = self.max_congested.max(n.congested_sessions);
        self.blocked_seconds = n.blocked_seconds;
        self.streams_slowed = n.streams_slowed;
    }
}

/// Samples the VmRSS of `pids` and the node's status every 100 ms
/// until [`Watch::finish`].
pub(crate) struct Watch {
    pub(crate) rss0: Vec<u64>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) h: std::thread::JoinHandle<(Vec<u64>, Seen)>,
}

pub(crate) fn watch(pids: &[u32], admin: Option<&Path>) -> Watch {
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
    pub(crate) fn finish(self) -> (Vec<u64>, Seen) {
        self.stop.store(true, Ordering::Relaxed);
        self.h.join().unwrap_or_default()
    }
}

/// Waits until the slow stream has received `min` bytes and, with an
/// admin socket, until its node shows a congested session (or, with
/// `held`, time held by backpressure). Returns whether that was seen.
pub(crate) fn wait_held(got: &AtomicU64, min: u64, admin: Option<&Path>, held: bool) -> bool {
    common::poll(HOLD_WAIT, || {
        got.load(Ordering::Relaxed) >= min
            && admin.is_none_or(|a| {
                node_status(a).is_some_and(|n| {
                    let blocked = n.blocked_seconds > 0.0;
                    blocked || (!held && n.congested_sessions > 0)
                })
            })
    })
}

pub(crate) fn join<T>(h: std::thread::ScopedJoinHandle<'_, io::Result<T>>) -> io::Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(io::Error::other("bench thread panicked")))
}

pub(crate) const SLOW_PATHS: [PathKind; 2] = [PathKind::DaemonUnix, PathKind::SshL];

/// Cases 1, 2, 3 and 5 on the bench's daemon (default config).
pub(crate) fn on_node(ep: &Endpoints, sz: &Sizes, daemon: &Daemon, ssh: u32) -> Vec<Table> {
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
pub(crate) fn rss_cells(before: u64, peak: u64, bound: u64) -> [String; 4] {
    let growth = peak.saturating_sub(before) << 10;
    [
        format!("{before} KiB"),
        mib(growth),
        mib(bound),
        if growth <= bound { "yes" } else { "NO" }.into(),
    ]
}

pub(crate) fn status_table(label: &str, s: Seen) -> Table {
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
