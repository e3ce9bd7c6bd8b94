//! A slow reader is slowed down, never cut, against real sshd.
//!
//! A client reads a seeded pattern echoed by the node at 2 MB/s, while the
//! node side is fed as fast as the daemon takes it, and stops reading for
//! 3 s half-way: longer than `keepalive_interval × keepalive_max` (1 s × 2
//! here), so the session is held by our own backpressure for longer than
//! russh would allow an unanswered peer. It must get every byte and EOF,
//! with no reset and no reconnect; the relay's buffer for it stays within
//! `proxy.relay_stream_buffer_limit` (1 MiB here); a stream opened while it
//! holds its session gets a session of its own and echoes byte-exactly;
//! and that extra session closes once idle. And a node that dies while a
//! stopped reader holds its session is still noticed (the kernel's TCP
//! keepalive verdict, read while russh's own is paused).

use crate::common;
use common::TunnelState;

use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    find_node, metric_value, report, Cluster, ConfigSpec, Daemon, FLOOD_PORT, RAW_ECHO_PORT,
};

const READY: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;
/// `proxy.relay_stream_buffer_limit`.
const LIMIT: usize = MIB;
/// The slow stream's size and its reader's pace.
const SLOW_BYTES: usize = 8 * MIB;
const RATE: f64 = 2_000_000.0;
/// The reader stops this long, once 2 MiB arrived.
const PAUSE: Duration = Duration::from_secs(3);
/// The stream opened while the slow one holds its session.
const ECHO_BYTES: usize = 256 * 1024;

fn buffered(d: &Daemon, name: &str) -> usize {
    let text = d.metrics();
    metric_value(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in\n{text}")) as usize
}

#[test]
fn a_slow_reader_gets_every_byte_and_new_streams_get_their_own_session() {
    require_netns!("a_slow_reader_gets_every_byte_and_new_streams_get_their_own_session");
    let cluster = Cluster::new(1);
    let node = cluster.node(1);
    let toml = cluster
        .config_toml(&ConfigSpec {
            ssh_extra: "extra_session_idle = \"2s\"\n".into(),
            ..ConfigSpec::default()
        })
        .replacen("keepalive_max = 3", "keepalive_max = 2", 1)
        .replacen(
            "[proxy]\n",
            "[proxy]\nrelay_stream_buffer_limit = \"1MiB\"\n",
            1,
        );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    let target = format!("{}:{RAW_ECHO_PORT}", node.pod_ip);
    let rss_idle = common::rss_kib(daemon.pid());

    let slow_data = common::pattern(SLOW_BYTES, 11);
    let echo_data = common::pattern(ECHO_BYTES, 12);
    let done = AtomicBool::new(false);
    let max_buffered = AtomicU64::new(0);
    let max_rss = AtomicU64::new(0);
    let started = Instant::now();
    let (slow, (sessions_seen, ss_seen, echo_took)) = std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            let (status, s) = daemon.connect(&target);
            assert!(
                status.starts_with("HTTP/1.1 200"),
                "slow CONNECT: {status:?}"
            );
            let r = common::paced_echo(s, &slow_data, RATE, 2 * MIB, PAUSE);
            done.store(true, Ordering::Relaxed);
            r
        });
        // Memory, sampled while the slow stream runs.
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let b = buffered(&daemon, "tunneler_relay_buffered_bytes");
                max_buffered.fetch_max(b as u64, Ordering::Relaxed);
                max_rss.fetch_max(common::rss_kib(daemon.pid()), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Once the slow stream congests its session, a new stream.
        let s = daemon.wait_status("the slow stream's session congested", READY, |s| {
            find_node(s, "node-1").is_some_and(|n| n.congested_sessions == 1)
        });
        assert_eq!(find_node(&s, "node-1").unwrap().sessions, 1, "{s:?}");
        let (status, e) = daemon.connect(&target);
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "echo CONNECT: {status:?}"
        );
        let t = Instant::now();
        let seen = daemon.status();
        let sessions = find_node(&seen, "node-1").unwrap().sessions;
        let ss = cluster.ssh_sessions_to(1);
        common::echo_exact(e, &echo_data).expect("the echo beside a held session");
        let echo_took = t.elapsed();
        (slow.join().expect("slow reader"), (sessions, ss, echo_took))
    });
    let took = started.elapsed();
    let got = slow.expect("the slow stream was cut");
    common::compare_exact(&got, &slow_data).expect("slow stream");

    let status = daemon.status();
    let n = find_node(&status, "node-1").unwrap().clone();
    let peak = buffered(&daemon, "tunneler_relay_buffered_bytes_peak");
    let max_buffered = max_buffered.load(Ordering::Relaxed) as usize;
    report(&format!(
        "slow reader: {SLOW_BYTES} B at {RATE} B/s with a {PAUSE:?} pause took {took:?}, every \
         byte; stream opened beside it echoed {ECHO_BYTES} B in {echo_took:?} on session count \
         {sessions_seen} (ss: {ss_seen}); relay buffered max sampled {max_buffered} B, peak \
         {peak} B (limit {LIMIT} B); daemon RSS idle {rss_idle} KiB, max {} KiB; node: \
         blocked_seconds {}, streams_slowed {}, reconnects {}",
        max_rss.load(Ordering::Relaxed),
        n.blocked_seconds,
        n.streams_slowed,
        n.reconnects,
    ));
    // The new stream went to a session of its own.
    assert_eq!(sessions_seen, 2, "{status:?}");
    assert_eq!(ss_seen, 2, "TCP sessions to the node beside the held one");
    common::assert_within(
        "the echo opened beside a held session",
        echo_took,
        Duration::from_secs(5),
    );
    // Bounded: one stream's limit plus what the echo stream may hold.
    assert!(
        peak <= LIMIT + ECHO_BYTES,
        "relay peak {peak} B over {LIMIT} + {ECHO_BYTES}"
    );
    // Held through the pause (longer than the keepalive budget), and no
    // session was lost for it.
    assert!(n.blocked_seconds >= PAUSE.as_secs_f64() * 0.8, "{n:?}");
    assert_eq!(n.reconnects, 0, "{n:?}");
    assert_eq!(n.state, TunnelState::Healthy, "{n:?}");
    assert_eq!(n.streams_slowed, 1, "{n:?}");
    // The extra session closes once idle (extra_session_idle = 2s).
    daemon.wait_status("the idle extra session closed", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.sessions == 1 && n.active_streams == 0)
    });
    assert!(
        common::poll(READY, || cluster.ssh_sessions_to(1) == 1),
        "the extra TCP session to the node stayed"
    );
    assert_eq!(buffered(&daemon, "tunneler_relay_buffered_bytes"), 0);
}

#[test]
fn a_node_lost_while_a_stopped_reader_holds_its_session_is_noticed() {
    require_netns!("a_node_lost_while_a_stopped_reader_holds_its_session_is_noticed");
    let cluster = Cluster::new(1);
    let node = cluster.node(1);
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "[proxy]\n",
        "[proxy]\nrelay_stream_buffer_limit = \"1MiB\"\n",
        1,
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    // Never read: the flood holds the only session, for good.
    let (status, mut stalled) = daemon.connect(&format!("{}:{FLOOD_PORT}", node.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    daemon.wait_status("the session held", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.congested_sessions == 1 && n.blocked_seconds > 0.0)
    });
    // Silent loss: no FIN, no RST; russh's keepalive cannot run while held.
    cluster.link_down(1);
    let t = Instant::now();
    let s = daemon.wait_status("the node no longer healthy", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.state != TunnelState::Healthy)
    });
    let noticed = t.elapsed();
    let n = find_node(&s, "node-1").unwrap();
    // The held stream ends too: what was queued, then EOF or an error.
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let ended = loop {
        match stalled.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the held stream is still open 15 s after its node was lost")
            }
            Err(_) => break "error",
        }
    };
    report(&format!(
        "node lost during a hold: noticed after {noticed:?} (keepalive 1s x 3), state {}, \
         last_error {:?}; the held stream ended with {ended}",
        n.state, n.last_error
    ));
    common::assert_within(
        "noticing a node lost during a hold",
        noticed,
        Duration::from_secs(15),
    );
}
