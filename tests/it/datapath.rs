//! The SSH data path against a real OpenSSH sshd: big packets through the
//! read-ahead buffer, a quiet log with the default packet size, and the
//! keepalive round trip measured by one request at a time.

use crate::common;

use std::time::{Duration, Instant};

use common::{find_node, Cluster, Daemon, RAW_ECHO_PORT};

const READY: Duration = Duration::from_secs(20);

/// With the default config (256 KiB packets, which russh complains about
/// at error level on every connect), a session connects, carries a bulk
/// echo byte for byte, and the daemon's log holds no error at all.
#[test]
fn a_default_config_connect_carries_bulk_data_and_logs_no_error() {
    require_netns!("a_default_config_connect_carries_bulk_data_and_logs_no_error");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let target = format!("{}:{RAW_ECHO_PORT}", cluster.node(1).pod_ip);
    // Several full 256 KiB packets each way, plus an odd tail.
    let data = common::pattern(3 * 1024 * 1024 + 12_345, 7);
    let (st, s) = daemon.connect(&target);
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    common::echo_exact(s, &data).unwrap();
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("tunnel healthy"),
        "the log shows no connect at all, so it proves nothing:\n{log}"
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "errors in the daemon log: {errors:#?}");
}

/// Data segments the daemon sent on its SSH connection to `ip`, from the
/// kernel's own count (`ss -ti`).
fn data_segs_out(ip: std::net::Ipv4Addr) -> u64 {
    let out = common::run(
        "ss",
        &["-tinH", "state", "established", "dst", &format!("{ip}:22")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("data_segs_out:"))
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 1, "want one SSH connection to {ip}: {text}");
    counts[0]
}

/// On an idle session our keepalive ping goes out before russh's own
/// keepalive would, so the two never leave together: sshd's second answer
/// would wait on Nagle for our delayed ACK and the round trip in status
/// would read 40 ms. With `keepalive_interval = 1s`, one request every
/// 0.75 s makes about 12 in 9 s; both together made about 18.
#[test]
fn an_idle_session_sends_one_keepalive_request_per_period() {
    require_netns!("an_idle_session_sends_one_keepalive_request_per_period");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let ip = cluster.node(1).ip;
    daemon.wait_status("a keepalive round trip", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.rtt_ms.is_some())
    });
    let window = Duration::from_secs(9);
    let before = data_segs_out(ip);
    let t0 = Instant::now();
    // Measuring a rate over a fixed window: the sleep is the measurement.
    std::thread::sleep(window);
    let sent = data_segs_out(ip) - before;
    let secs = t0.elapsed().as_secs_f64();
    // One request per 0.75 s, plus one at the window's edge and one
    // russh keepalive if a loaded machine delayed a ping past the
    // interval: at most 14 here. Two requests per second would be 18.
    let most = (secs / 0.75).ceil() as u64 + 2;
    assert!(
        sent <= most,
        "{sent} requests in {secs:.1} s: more than one per 0.75 s (at most {most})"
    );
    assert!(
        sent >= (secs / 0.75 / 2.0) as u64,
        "{sent} requests in {secs:.1} s: the keepalive ping stopped"
    );
    let rtt = find_node(&daemon.status(), "node-1").and_then(|n| n.rtt_ms);
    assert!(rtt.is_some(), "no round trip in status after {secs:.1} s");
}

/// The first `rtt_ms` after a connect is the link's round trip, not a
/// stall: three nodes, two daemon starts, every first sample under 20 ms
/// (the link's round trip is well under 1 ms; the stall it guards against
/// was 41 to 48 ms). A ping sent right after authentication met sshd's
/// `hostkeys-00@openssh.com` announcement on the wire, and its answer
/// waited in sshd's Nagle for our delayed ACK of the announcement.
#[test]
fn the_first_round_trip_after_connect_measures_the_link() {
    require_netns!("the_first_round_trip_after_connect_measures_the_link");
    let cluster = Cluster::new(3);
    let mut firsts = Vec::new();
    for _ in 0..2 {
        let mut daemon = Daemon::start(&cluster);
        let mut first: Vec<Option<f64>> = Vec::new();
        // Polled every 10 ms: the next ping comes 0.75 s after the first.
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if let Ok(s) = daemon.try_status() {
                first = s.nodes.iter().map(|n| n.rtt_ms).collect();
                if first.len() == 3 && first.iter().all(Option::is_some) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        common::report(&format!("first rtt_ms after connect: {first:?}"));
        firsts.extend(
            first
                .into_iter()
                .map(|r| r.expect("an rtt_ms for every node")),
        );
        daemon.stop();
    }
    assert!(
        firsts.iter().all(|&ms| ms < 20.0),
        "first rtt_ms after connect: {firsts:?}"
    );
}
