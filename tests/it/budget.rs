//! The relay's global buffer budget against real sshd: several slow
//! readers on one node together want more than `proxy.relay_buffer_budget`
//! (4 × 4 MiB against 8 MiB here). Past the budget the relay holds
//! sessions (largest share first) instead of resetting streams: every
//! reader gets every byte and EOF, and the bytes held for clients never
//! exceed the budget plus one session floor (1 MiB) per session.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{find_node, metric_value, report, Cluster, ConfigSpec, Daemon, RAW_ECHO_PORT};

const READY: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;
/// `proxy.relay_buffer_budget`.
const BUDGET: usize = 8 * MIB;
/// Readers, each reading this much at this pace.
const READERS: usize = 4;
const BYTES: usize = 6 * MIB;
const RATE: f64 = 3_000_000.0;
/// How long each reader stops after its first bytes.
const PAUSE: Duration = Duration::from_secs(3);

fn metric(d: &Daemon, name: &str) -> usize {
    let text = d.metrics();
    metric_value(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in\n{text}")) as usize
}

#[test]
fn slow_readers_over_the_budget_are_held_not_reset_and_memory_stays_bounded() {
    require_netns!("slow_readers_over_the_budget_are_held_not_reset_and_memory_stays_bounded");
    let cluster = Cluster::new(1);
    let node = cluster.node(1);
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "[proxy]\n",
        "[proxy]\nrelay_buffer_budget = \"8MiB\"\nrelay_stream_buffer_limit = \"4MiB\"\n",
        1,
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    assert_eq!(
        metric(&daemon, "tunneler_relay_buffer_budget_bytes"),
        BUDGET
    );
    let target = format!("{}:{RAW_ECHO_PORT}", node.pod_ip);

    let done = AtomicBool::new(false);
    let max_buffered = AtomicU64::new(0);
    let budget_held = AtomicU64::new(0);
    let started = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        // All readers connect first (so they share sessions and the
        // budget binds), then read at their pace.
        let streams: Vec<_> = (0..READERS)
            .map(|i| {
                let (status, s) = daemon.connect(&target);
                assert!(status.starts_with("HTTP/1.1 200"), "reader {i}: {status:?}");
                s
            })
            .collect();
        let readers: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                scope.spawn(move || {
                    let want = common::pattern(BYTES, 100 + i as u64);
                    // Every reader first stops for PAUSE after its first
                    // bytes, so the node's output has to pile up against
                    // the budget whatever the machine's speed; then reads
                    // at its pace.
                    let got = common::paced_echo(s, &want, RATE, 1, PAUSE)?;
                    common::compare_exact(&got, &want).map_err(|e| format!("reader {i}: {e}"))
                })
            })
            .collect();
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let text = daemon.metrics();
                let get = |n: &str| metric_value(&text, n, &[]).unwrap_or(0.0) as u64;
                max_buffered.fetch_max(get("tunneler_relay_buffered_bytes"), Ordering::Relaxed);
                budget_held.fetch_max(get("tunneler_relay_budget_held_streams"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = readers.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        r
    });
    let took = started.elapsed();
    let peak = metric(&daemon, "tunneler_relay_buffered_bytes_peak");
    let status = daemon.status();
    let n = find_node(&status, "node-1").unwrap().clone();
    report(&format!(
        "budget: {READERS} readers x {BYTES} B at {RATE} B/s took {took:?}; peak buffered {peak} B \
         (max sampled {}), budget {BUDGET} B; at most {} streams held by the budget at once; \
         node: sessions {} congested {} blocked_seconds {} streams_slowed {}",
        max_buffered.load(Ordering::Relaxed),
        budget_held.load(Ordering::Relaxed),
        n.sessions,
        n.congested_sessions,
        n.blocked_seconds,
        n.streams_slowed,
    ));
    for r in &results {
        assert!(r.is_ok(), "a slow reader lost bytes or was cut: {r:?}");
    }
    // Each reader may sit on a session of its own, each with its floor.
    let bound = BUDGET + n.sessions.max(READERS as u64) as usize * MIB;
    assert!(
        peak <= bound,
        "peak {peak} over the budget {BUDGET} plus floors ({bound})"
    );
    assert!(peak > 0);
    assert_eq!(n.reconnects, 0, "{n:?}");
    // The node was slowed (its sessions held), not the readers cut.
    assert!(n.blocked_seconds > 0.0, "{n:?}");
    daemon.wait_status("all streams closed", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.active_streams == 0)
    });
    assert_eq!(metric(&daemon, "tunneler_relay_buffered_bytes"), 0);
    assert_eq!(metric(&daemon, "tunneler_relay_budget_used_bytes"), 0);
}
