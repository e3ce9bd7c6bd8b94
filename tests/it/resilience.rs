//! Faults inside one node's traffic never hurt the rest, since every
//! apiserver request to other nodes shares the same daemon: a client that stops reading beside busy streams on the same node, and the
//! active health probe taking a node out of the pool while it stays
//! connected. (Link loss, sshd restarts and host key changes are in
//! failover.rs.)

use crate::common;
use common::TunnelState;

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::{
    find_node, percentile, report, Cluster, ConfigSpec, Daemon, ECHO_PORT, FLOOD_PORT, HTTP_PORT,
};
use common::{NodeStatus, StatusDocument};

const READY: Duration = Duration::from_secs(20);

fn answered_by(answer: &str) -> &str {
    answer
        .strip_prefix("node=")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("")
}

/// A stream to a server that writes forever, never read. It is held, not
/// reset: its drain stops and its SSH session waits for it. Streams opened
/// afterwards on the same node go to another session: 5 short
/// request/response streams and 200 round trips on another stream all
/// complete, each within a generous sanity bound (the latency figures are
/// the benchmark's; here they are only printed). A stream that already
/// shared the held session waits with it, and carries on, byte-exact, once
/// the stopped client goes away: its close is the one thing that resets
/// the stalled stream.
#[test]
fn a_stalled_reader_does_not_slow_busy_streams_on_the_same_node() {
    require_netns!("a_stalled_reader_does_not_slow_busy_streams_on_the_same_node");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);

    // A neighbour on the session the stalled stream will hold.
    let (status, mut neighbour) = daemon.connect(&format!("{}:{ECHO_PORT}", node.ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    assert_eq!(
        common::echo_over(&mut neighbour, "warm"),
        format!("node=node-1 local={} echo=warm", node.ip)
    );

    // From here on nobody reads `stalled`.
    let (status, stalled) = daemon.connect(&format!("{}:{FLOOD_PORT}", node.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    let s = daemon.wait_status("the stalled stream's session held", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.congested_sessions == 1)
    });
    assert_eq!(find_node(&s, "node-1").unwrap().sessions, 1, "{s:?}");
    // The neighbour asks now; its answer waits behind the held session.
    neighbour.write_all(b"during\n").unwrap();

    let (status, mut rt) = daemon.connect(&format!("{}:{ECHO_PORT}", node.ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    rt.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let flood_start = Instant::now();
    let mut samples = Vec::with_capacity(200);
    let short: Vec<Duration> = std::thread::scope(|scope| {
        let shorts: Vec<_> = (0..5)
            .map(|k| {
                let daemon = &daemon;
                scope.spawn(move || {
                    let t = Instant::now();
                    let target = format!("{}:{ECHO_PORT}", node.pod_ip);
                    let (status, mut s) = daemon.connect(&target);
                    assert!(status.starts_with("HTTP/1.1 200"), "short {k}: {status:?}");
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let got = common::echo_over(&mut s, &format!("short{k}"));
                    assert_eq!(
                        got,
                        format!("node=node-1 local={} echo=short{k}", node.pod_ip)
                    );
                    let _ = s.shutdown(Shutdown::Both);
                    t.elapsed()
                })
            })
            .collect();
        for k in 0..200 {
            let t = Instant::now();
            let got = common::echo_over(&mut rt, &format!("rt{k}"));
            samples.push(t.elapsed());
            assert_eq!(got, format!("node=node-1 local={} echo=rt{k}", node.ip));
        }
        shorts.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let measured = flood_start.elapsed();

    let p50 = percentile(&samples, 50.0);
    let p99 = percentile(&samples, 99.0);
    let max = samples.iter().max().copied().unwrap_or_default();
    let status = daemon.status();
    let n = find_node(&status, "node-1").unwrap().clone();
    report(&format!(
        "stalled reader beside busy streams: 200 round trips p50 {p50:?} p99 {p99:?} max {max:?} \
         over {measured:?}; 5 short streams took {short:?}; node-1: sessions {} congested {} \
         active_streams {} blocked_seconds {}",
        n.sessions, n.congested_sessions, n.active_streams, n.blocked_seconds,
    ));
    common::assert_within(
        "slowest of 200 round trips beside a stalled reader",
        max,
        Duration::from_secs(2),
    );
    for (k, t) in short.iter().enumerate() {
        common::assert_within(
            &format!("short stream {k} beside a stalled reader"),
            *t,
            Duration::from_secs(3),
        );
    }
    assert_eq!(n.state, TunnelState::Healthy, "{n:?}");
    assert_eq!(n.reconnects, 0, "{n:?}");
    // They ran on a session of their own; the stalled stream was not reset
    // (the neighbour, rt and it are still open).
    assert_eq!(n.sessions, 2, "{n:?}");
    assert_eq!(n.active_streams, 3, "{n:?}");
    drop(rt);
    // The stopped client goes away: its stream is reset, the held session
    // moves on, and the neighbour gets its answer.
    drop(stalled);
    neighbour
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&mut neighbour)
        .read_line(&mut line)
        .expect("the neighbour's answer after the stalled client left");
    assert_eq!(
        line.trim_end(),
        format!("node=node-1 local={} echo=during", node.ip)
    );
    drop(neighbour);
    daemon.wait_status("streams released", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.active_streams == 0)
    });
}

/// `[health]` added and removed by a reload applies to running nodes: the
/// probe task waits on the reload, not on a timer.
#[test]
fn a_health_probe_added_and_removed_by_reload_applies_without_a_restart() {
    require_netns!("a_health_probe_added_and_removed_by_reload_applies_without_a_restart");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start_with(&cluster, &ConfigSpec::default());
    daemon.wait_all_healthy(READY);
    // Nothing listens on this port on the node: every probe fails.
    let dead = HTTP_PORT + 10000;
    cluster.write_config(&ConfigSpec {
        extra: format!(
            "\n[health]\nprobe = \"http://127.0.0.1:{dead}/\"\ninterval = \"1s\"\n\
             timeout = \"500ms\"\nunhealthy_after = 1\n"
        ),
        ..ConfigSpec::default()
    });
    let (code, body) = daemon.admin("POST", "/v1/reload", None);
    assert_eq!(code, 200, "{body}");
    daemon.wait_node_state("node-1", TunnelState::Unhealthy, READY);
    cluster.write_config(&ConfigSpec::default());
    let (code, body) = daemon.admin("POST", "/v1/reload", None);
    assert_eq!(code, 200, "{body}");
    daemon.wait_node_state("node-1", TunnelState::Healthy, READY);
}

fn rtt_known(n: &NodeStatus) -> bool {
    n.rtt_ms.is_some_and(|r| r >= 0.0)
}

#[test]
fn a_failing_health_probe_takes_the_node_out_of_the_pool_only() {
    require_netns!("a_failing_health_probe_takes_the_node_out_of_the_pool_only");
    let mut cluster = Cluster::new(2);
    let spec = ConfigSpec {
        extra: format!(
            "\n[health]\nprobe = \"http://127.0.0.1:{HTTP_PORT}/\"\ninterval = \"1s\"\n\
             timeout = \"500ms\"\nunhealthy_after = 2\n"
        ),
        ..ConfigSpec::default()
    };
    let daemon = Daemon::start_with(&cluster, &spec);
    daemon.wait_all_healthy(READY);
    // rtt_ms is a number for connected nodes; next_retry null outside backoff.
    let status = daemon.wait_status("rtt_ms known for every node", READY, |s| {
        s.nodes
            .iter()
            .all(|n| n.state == TunnelState::Healthy && rtt_known(n))
    });
    for n in &status.nodes {
        assert!(n.next_retry.is_none(), "{n:?}");
    }

    // Node 1's HTTP server goes away (its echo server stays): the probe
    // through node 1's tunnel fails, twice, and the node is `unhealthy`.
    cluster.restart_servers_with_http_port(1, HTTP_PORT + 10000);
    let t = Instant::now();
    let status = daemon.wait_node_state("node-1", TunnelState::Unhealthy, READY);
    report(&format!(
        "health probe (1s, unhealthy_after 2): node-1 unhealthy {:?} after its HTTP server went away",
        t.elapsed()
    ));
    let n1 = find_node(&status, "node-1").unwrap();
    assert!(n1.next_retry.is_none(), "connected, not in backoff: {n1:?}");
    assert_eq!(
        find_node(&status, "node-2").unwrap().state,
        TunnelState::Healthy
    );
    let status = daemon.wait_status("node-1 rtt while unhealthy", READY, |s| {
        find_node(s, "node-1").is_some_and(rtt_known)
    });
    report(&format!(
        "unhealthy node as shown: {:?}",
        find_node(&status, "node-1").unwrap()
    ));

    // Pool dials avoid it even when it is the less loaded node ...
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (st, s) = daemon.connect(&format!("{}:{ECHO_PORT}", n2.pod_ip));
        assert!(st.starts_with("HTTP/1.1 200"), "{st:?}");
        load.push(s);
    }
    let anycast = cluster.anycast_service_ip();
    for k in 0..8 {
        let got = daemon.echo(&format!("{anycast}:{ECHO_PORT}"), &format!("pool{k}"));
        assert_eq!(
            answered_by(&got),
            "node-2",
            "pool dial to an unhealthy node: {got}"
        );
    }
    // ... while dials addressed to node 1 still use it.
    for target in [
        format!("{}:{ECHO_PORT}", n1.ip),
        format!("{}:{ECHO_PORT}", n1.pod_ip),
        format!("node-1:{ECHO_PORT}"),
    ] {
        let got = daemon.echo(&target, "direct");
        assert_eq!(answered_by(&got), "node-1", "{target}: {got}");
    }

    // The HTTP server comes back: healthy, and back in the pool.
    cluster.restart_servers_with_http_port(1, HTTP_PORT);
    let t = Instant::now();
    daemon.wait_node_state("node-1", TunnelState::Healthy, READY);
    report(&format!(
        "health probe: node-1 healthy {:?} after its HTTP server came back",
        t.elapsed()
    ));
    let got = daemon.echo(&format!("{anycast}:{ECHO_PORT}"), "back");
    assert_eq!(
        answered_by(&got),
        "node-1",
        "less loaded healthy node: {got}"
    );
    drop(load);

    // In backoff, next_retry is a time and rtt_ms is null.
    cluster.kill_sshd(1);
    let status = daemon.wait_status("node-1 in backoff with next_retry", READY, |s| {
        find_node(s, "node-1")
            .is_some_and(|n| n.state == TunnelState::Backoff && n.next_retry.is_some())
    });
    let n = find_node(&status, "node-1").unwrap();
    let next = n.next_retry.as_deref().unwrap();
    assert!(
        next.len() >= 20 && next.as_bytes()[10] == b'T',
        "next_retry: {n:?}"
    );
    assert!(n.rtt_ms.is_none(), "rtt of a node without a session: {n:?}");
    cluster.start_sshd(1);
    let status = daemon.wait_node_state("node-1", TunnelState::Healthy, READY);
    assert!(find_node(&status, "node-1").unwrap().next_retry.is_none());
}

/// When keepalives declare a silently lost session dead, the client side of
/// every stream it carried is closed too: kube-apiserver must see the
/// stream end (and can retry), not hang on it forever.
#[test]
fn streams_of_a_silently_lost_session_are_closed() {
    require_netns!("streams_of_a_silently_lost_session_are_closed");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let n1 = cluster.node(1);
    let (status, mut s) = daemon.connect(&format!("{}:{ECHO_PORT}", n1.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    assert!(common::echo_over(&mut s, "before").starts_with("node=node-1 "));

    cluster.link_down(1);
    let t = Instant::now();
    daemon.wait_node_unhealthy("node-1", READY);
    // Once the session is known dead, the client stream must end promptly.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    let end = loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break "eof",
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(_) => break "still open",
        }
    };
    report(&format!(
        "silent link loss: the client stream on node-1 ended ({end}) {:?} after the link went down",
        t.elapsed()
    ));
    assert_ne!(
        end, "still open",
        "client stream left hanging after its session died"
    );
    assert_eq!(
        find_node(&daemon.status(), "node-1")
            .unwrap()
            .active_streams,
        0
    );
    cluster.link_up(1);
    daemon.wait_node_state("node-1", TunnelState::Healthy, READY);
}

/// kube-apiserver may dial the moment tunneler is up: a dial addressed to a
/// node whose tunnel is still connecting waits for it (within dial_timeout)
/// instead of failing.
#[test]
fn a_dial_right_after_start_waits_for_the_connecting_tunnel() {
    require_netns!("a_dial_right_after_start_waits_for_the_connecting_tunnel");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    let t = Instant::now();
    let n2 = cluster.node(2);
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", n2.pod_ip), "early");
    assert_eq!(got, format!("node=node-2 local={} echo=early", n2.pod_ip));
    report(&format!(
        "right after start: a node dial answered after {:?}",
        t.elapsed()
    ));
}

/// A service (pool) dial takes healthy tunnels only: while every tunnel is
/// still connecting it gets 503 at once when `wait_for_healthy` is 0 (by
/// default it would wait for the tunnel, which this test is not about;
/// restart.rs covers the wait). The node's link is down
/// from the start, so its TCP connect hangs for connect_timeout (2 s) and
/// the tunnel provably stays "connecting" around the dial: the same state
/// with the same `since` before and after it.
#[test]
fn a_pool_dial_while_every_tunnel_is_connecting_gets_503() {
    require_netns!("a_pool_dial_while_every_tunnel_is_connecting_gets_503");
    let cluster = Cluster::new(1);
    cluster.link_down(1);
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "[proxy]\n",
        "[proxy]\nwait_for_healthy = \"0s\"\n",
        1,
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    let target = format!("{}:{ECHO_PORT}", cluster.anycast_service_ip());
    let connecting = |s: &StatusDocument| {
        find_node(s, "node-1")
            .filter(|n| n.state == TunnelState::Connecting)
            .map(|n| n.since.clone())
    };
    // Each attempt is 2 s of "connecting"; a dial that straddles the end of
    // one is retried (bounded) rather than counted.
    let mut proven = None;
    for _ in 0..10 {
        let status = daemon.wait_status("node-1 connecting", READY, |s| connecting(s).is_some());
        let before = connecting(&status).unwrap();
        let (reply, _) = daemon.connect(&target);
        let after = connecting(&daemon.status());
        if after.as_ref() == Some(&before) {
            proven = Some(reply);
            break;
        }
    }
    let reply = proven.expect("never saw node-1 connecting both before and after a pool dial");
    assert_eq!(
        reply,
        format!(
            "HTTP/1.1 503 Service Unavailable: no healthy tunnel: none of 1 node(s) can take \
             service address {}: node-1 connecting",
            cluster.anycast_service_ip()
        )
    );
    // And the pool serves once the tunnel is up.
    cluster.link_up(1);
    daemon.wait_all_healthy(READY);
    let got = daemon.echo(&target, "pool");
    assert!(got.starts_with("node=node-1 "), "{got}");
}
