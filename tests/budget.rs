//! The relay's memory budget against real sshd: parked clients that never
//! read, each holding just under the per-stream stall floor, cannot push
//! out a client that reads steadily, and the bytes held for clients never
//! exceed `proxy.relay_buffer_budget`.
//!
//! Sizes are scaled down through the config (the rules are the same at the
//! 512 MiB default): stall floor 2 MiB, budget 8 MiB, parked answers of
//! 1.9 MiB.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{metric_value, node_status, poll, report, Cluster, ConfigSpec, Daemon, ECHO_PORT};

const READY: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;
/// `proxy.relay_buffer_budget`.
const BUDGET: usize = 8 * MIB;
/// `proxy.relay_stall_timeout`, in milliseconds.
const STALL_MS: u64 = 500;
/// Each parked stream's echo line: its answer stays under the 2 MiB floor.
const PARKED_LINE: usize = 1900 * 1024;
/// Parked before the budget is under pressure (they fit: 4 × 1.9 MiB).
const EARLY: usize = 4;
/// Parked afterwards; each one's arrival needs room.
const LATE: usize = 3;

/// Deterministic printable bytes (no newline) of `len`, from `seed`.
fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b'!' + (x % 90) as u8
        })
        .collect()
}

fn metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> usize {
    let text = d.metrics();
    metric_value(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
        as usize
}

fn buffered(d: &Daemon) -> usize {
    metric(d, "tunneler_relay_buffered_bytes", &[])
}

/// Bytes that ever reached the relay's queues and were not yet delivered:
/// buffered now plus dropped with reset streams, from one scrape.
fn queued_or_dropped(d: &Daemon) -> usize {
    let text = d.metrics();
    [
        "tunneler_relay_buffered_bytes",
        "tunneler_relay_dropped_bytes_total",
    ]
    .iter()
    .map(|name| {
        metric_value(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in\n{text}")) as usize
    })
    .sum()
}

fn resets(d: &Daemon, reason: &str) -> usize {
    metric(d, "tunneler_relay_resets_total", &[("reason", reason)])
}

/// Reads up to `want.len()` bytes; true when all arrived and match, false
/// when the stream ended early (reset). Panics on a wrong byte.
fn read_all_or_reset(s: &mut UnixStream, want: &[u8], what: &str) -> bool {
    let mut got = Vec::with_capacity(want.len());
    let mut buf = vec![0u8; 256 * 1024];
    while got.len() < want.len() {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{what}: read failed after {} bytes: {e}", got.len()),
        }
    }
    let n = got.len().min(want.len());
    assert!(
        got[..n] == want[..n] && got.len() <= want.len(),
        "{what}: the bytes that arrived differ from the echo answer"
    );
    got.len() == want.len()
}

#[test]
fn parked_streams_under_the_floor_are_reset_oldest_first_and_a_reader_is_never_reset() {
    require_netns!(
        "parked_streams_under_the_floor_are_reset_oldest_first_and_a_reader_is_never_reset"
    );
    let cluster = Cluster::new(1);
    let node = cluster.node(1);
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "[proxy]\n",
        &format!(
            "[proxy]\nrelay_buffer_budget = \"8MiB\"\nrelay_stream_buffer_limit = \"4MiB\"\n\
             relay_stall_floor = \"2MiB\"\nrelay_stall_timeout = \"{STALL_MS}ms\"\n"
        ),
        1,
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    assert_eq!(
        metric(&daemon, "tunneler_relay_buffer_budget_bytes", &[]),
        BUDGET
    );
    let target = format!("{}:{ECHO_PORT}", node.pod_ip);
    let prefix = format!("node=node-1 local={} echo=", node.pod_ip);
    let answer = |line: &[u8]| [prefix.as_bytes(), line, b"\n"].concat();

    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The legitimate stream: seeded 32 KiB lines, each answer read and
        // checked byte for byte before the next line goes out.
        let busy = scope.spawn(|| {
            let (status, s) = daemon.connect(&target);
            assert!(status.starts_with("HTTP/1.1 200"), "busy CONNECT: {status}");
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let (mut k, mut bytes) = (0u32, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let line = payload(32 * 1024, 1000 + k);
                w.write_all(&line).unwrap();
                w.write_all(b"\n").unwrap();
                let mut got = Vec::new();
                r.read_until(b'\n', &mut got)
                    .unwrap_or_else(|e| panic!("busy stream, answer {k}: {e}"));
                assert!(
                    got == answer(&line),
                    "busy stream, answer {k}: {} bytes, not the {} expected (reset or corrupted)",
                    got.len(),
                    answer(&line).len()
                );
                bytes += got.len();
                k += 1;
            }
            (k, bytes)
        });

        // Parks a client: it sends one long line and never reads the
        // answer. Waits until the daemon holds at least 1.2 MiB of it (the
        // rest sits in the client's socket buffer); returns its seed.
        let mut parked: Vec<(UnixStream, Vec<u8>)> = Vec::new();
        let mut held = Vec::new();
        let mut park = |i: usize| {
            let base = queued_or_dropped(&daemon);
            let (status, mut s) = daemon.connect(&target);
            assert!(status.starts_with("HTTP/1.1 200"), "parked {i}: {status}");
            let line = payload(PARKED_LINE, i as u32 + 1);
            s.write_all(&line).unwrap();
            s.write_all(b"\n").unwrap();
            let mut arrived = 0;
            let ok = poll(READY, || {
                // Bytes evicted meanwhile left the gauge but did arrive.
                arrived = queued_or_dropped(&daemon).saturating_sub(base);
                arrived >= 1200 * 1024
            });
            assert!(ok, "parked {i}: only {arrived} bytes reached the daemon");
            held.push(arrived);
            parked.push((s, answer(&line)));
        };
        for i in 0..EARLY {
            park(i);
        }
        assert_eq!(resets(&daemon, "budget"), 0, "the early parked streams fit");
        // Time is the subject: the early parked streams must have gone a
        // whole stall window without reading.
        std::thread::sleep(Duration::from_millis(2 * STALL_MS));
        for i in EARLY..EARLY + LATE {
            park(i);
        }
        let peak = metric(&daemon, "tunneler_relay_buffered_bytes_peak", &[]);
        let now = buffered(&daemon);
        let by_budget = resets(&daemon, "budget");
        let busy_before_stop = stop.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let (rounds, busy_bytes) = busy.join().expect("busy stream failed");
        assert!(!busy_before_stop);

        // Each parked client now reads: a reset one gets part of its
        // answer and then EOF, a kept one all of it.
        let mut was_reset = Vec::new();
        for (i, (s, want)) in parked.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            if !read_all_or_reset(s, want, &format!("parked {i}")) {
                was_reset.push(i);
            }
        }
        report(&format!(
            "relay budget: daemon held {:?} KiB per parked stream on arrival; peak buffered \
             {peak} B ({:.2} MiB) under a budget of {BUDGET} B; {now} B buffered after the last \
             park; reset by the budget: parked {was_reset:?} (counter {by_budget}); busy stream \
             {rounds} round trips, {busy_bytes} B checked",
            held.iter().map(|b| b / 1024).collect::<Vec<_>>(),
            peak as f64 / MIB as f64,
        ));
        assert!(peak <= BUDGET, "peak {peak} over the budget {BUDGET}");
        assert!(now <= BUDGET, "{now} buffered, over the budget {BUDGET}");
        // Together the parked answers cannot fit, so some must go; the
        // late ones plus the reader always fit, so none of them may.
        assert!(
            was_reset.len() >= 2,
            "only {was_reset:?} reset; the parked streams held {held:?}"
        );
        assert_eq!(
            was_reset,
            (0..was_reset.len()).collect::<Vec<_>>(),
            "reset streams must be the longest idle (the first parked)"
        );
        assert!(was_reset.len() <= EARLY);
        assert!(rounds > 0);
        // No other stream (the reader) was reset, for any reason.
        assert_eq!(resets(&daemon, "budget"), was_reset.len());
        assert_eq!(resets(&daemon, "stalled"), 0, "all were under the floor");
        assert_eq!(resets(&daemon, "too_slow"), 0);
        assert_eq!(
            metric(&daemon, "tunneler_relay_buffer_budget_bytes", &[]),
            BUDGET
        );
    });

    // Every stream is closed now: nothing may stay on the account.
    daemon.wait_for("all streams closed", READY, |s| {
        node_status(s, "node-1").is_some_and(|n| n["active_streams"] == 0)
    });
    assert_eq!(buffered(&daemon), 0);
}
