//! What happens on a single tunnelled stream: bulk data arrives byte for
//! byte in both directions, half-close and early bytes are carried, a
//! client that stops reading does not stall other streams, and failed dials
//! get 502 or 504.

use crate::common;
use common::TunnelState;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::time::{Duration, Instant};

use common::{find_node, read_head, Cluster, Daemon, Duplex, ECHO_PORT, RAW_ECHO_PORT};

const READY: Duration = Duration::from_secs(20);

/// Six concurrent streams (Unix and TCP listener, two nodes) each send 1 MiB
/// of a seeded pattern to the node's raw echo server and must get exactly
/// those bytes back, then EOF: a relay that loses, alters or adds one byte
/// in either direction fails here, at the offset where it happened.
#[test]
fn bulk_data_round_trips_intact_on_concurrent_streams() {
    require_netns!("bulk_data_round_trips_intact_on_concurrent_streams");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    const LEN: usize = 1 << 20;

    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6u64)
            .map(|k| {
                let node = cluster.node(k as usize % 2 + 1);
                let daemon = &daemon;
                scope.spawn(move || {
                    let data = common::pattern(LEN, k + 1);
                    let target = format!("{}:{RAW_ECHO_PORT}", node.pod_ip);
                    let result = if k % 2 == 0 {
                        let (st, s) = daemon.connect(&target);
                        assert!(st.starts_with("HTTP/1.1 200"), "stream {k}: {st:?}");
                        common::echo_exact(s, &data)
                    } else {
                        let (st, s) = daemon.connect_tcp(&target);
                        assert!(st.starts_with("HTTP/1.1 200"), "stream {k}: {st:?}");
                        common::echo_exact(s, &data)
                    };
                    if let Err(e) = result {
                        panic!("stream {k} to {}: {e}", node.name);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });

    // Three streams per node, 1 MiB each way.
    daemon.wait_status("byte counters", READY, |s| {
        cluster.nodes.iter().all(|n| {
            find_node(s, &n.name)
                .is_some_and(|n| n.bytes_in >= 3 * LEN as u64 && n.bytes_out >= 3 * LEN as u64)
        })
    });
}

/// A stream that carries data one way only, each way, byte-exactly: the
/// node side never sees more than it was sent (a duplicate would show as
/// extra bytes before EOF), and small writes arrive in order.
#[test]
fn small_writes_arrive_in_order_and_exactly() {
    require_netns!("small_writes_arrive_in_order_and_exactly");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let target = format!("{}:{RAW_ECHO_PORT}", cluster.node(1).pod_ip);
    let data = common::pattern(200_003, 42);
    let (st, s) = daemon.connect(&target);
    assert!(st.starts_with("HTTP/1.1 200"), "{st:?}");
    // Odd-sized writes from 1 to 4093 bytes, each flushed on its own.
    let mut w = s.clone_handle();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        let mut off = 0;
        let mut n = 1;
        while off < sent.len() {
            let end = (off + n).min(sent.len());
            w.write_all(&sent[off..end]).unwrap();
            off = end;
            n = n * 7 % 4093 + 1;
        }
        w.shutdown_write();
    });
    let got = common::read_to_eof(s).expect("read echo to EOF");
    writer.join().unwrap();
    common::compare_exact(&got, &data).unwrap();
}

#[test]
fn half_close_and_early_bytes_are_carried() {
    require_netns!("half_close_and_early_bytes_are_carried");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);
    let target = format!("{}:{ECHO_PORT}", node.pod_ip);

    // The client's write side ends: the server sees EOF, answers what it
    // got and closes, and the client reads everything up to EOF.
    let (status, mut s) = daemon.connect(&target);
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    s.write_all(b"one\ntwo\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest)
        .expect("EOF after the server closed (was the half-close forwarded?)");
    let local = node.pod_ip;
    assert_eq!(
        rest,
        format!("node=node-1 local={local} echo=one\nnode=node-1 local={local} echo=two\n")
    );

    // Bytes sent right behind the CONNECT head, before the 200 arrived.
    let mut s = std::os::unix::net::UnixStream::connect(&daemon.egress).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nearly\n").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(
        common::echo_over(&mut s, "late"),
        format!("node=node-1 local={local} echo=early")
    );
}

/// The known russh hazard: one stream whose client stops reading must not
/// freeze the other streams on the same SSH connection, nor its keepalives.
///
/// The stalled stream parks 2 MiB for its client. That is below the
/// relay's slow watermark (half of `relay_stream_buffer_limit`, 8 MiB by
/// default), so it does not even hold its session: other streams share it
/// freely. Afterwards it is still open and hands over every byte, then
/// EOF. (A client that stops reading an endless flood holds its session;
/// resilience.rs covers that one.)
#[test]
fn a_client_that_stops_reading_does_not_stall_other_streams() {
    require_netns!("a_client_that_stops_reading_does_not_stall_other_streams");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);

    const PARKED: usize = 2 << 20;
    let parked = common::pattern(PARKED, 7);
    let (status, mut stalled) = daemon.connect(&format!("{}:{RAW_ECHO_PORT}", node.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    // Send it all and read nothing: the echo piles up in the daemon.
    stalled.write_all(&parked).unwrap();
    daemon.wait_status("the parked bytes sent to the node", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.bytes_out >= PARKED as u64)
    });

    // For longer than keepalive_interval x keepalive_max (3 s), other
    // streams on the same tunnel keep answering. The time passing is the subject here, not a readiness wait.
    let start = Instant::now();
    let mut k = 0;
    let mut slowest = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(5) {
        let (status, mut s) = daemon.connect(&format!("{}:{ECHO_PORT}", node.pod_ip));
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "CONNECT while another stream is stalled: {status:?}"
        );
        let t = Instant::now();
        let got = common::echo_over(&mut s, &format!("k{k}"));
        assert_eq!(got, format!("node=node-1 local={} echo=k{k}", node.pod_ip));
        slowest = slowest.max(t.elapsed());
        k += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    common::assert_within(
        &format!("slowest of {k} echoes beside a stalled stream"),
        slowest,
        Duration::from_secs(3),
    );
    // The stalled stream is the only one left once the echo streams have
    // closed: still open...
    let status = daemon.wait_status("only the stalled stream open", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.active_streams == 1)
    });
    let n = find_node(&status, "node-1").unwrap();
    assert_eq!(n.state, TunnelState::Healthy, "{status:?}");
    assert_eq!(n.reconnects, 0, "the session was lost meanwhile: {n:?}");
    // ...and hands over all it holds, then EOF once we end our side.
    stalled.shutdown(Shutdown::Write).unwrap();
    let got = common::read_to_eof(&mut stalled).expect("read the parked echo");
    common::compare_exact(&got, &parked).unwrap();
    drop(stalled);
    daemon.wait_status("stalled stream released", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.active_streams == 0)
    });
}

#[test]
fn failed_dials_get_502_with_reason_or_504_on_timeout() {
    require_netns!("failed_dials_get_502_with_reason_or_504_on_timeout");
    let cluster = Cluster::new(1);
    let node = cluster.node(1);
    // Inside node 1's pod CIDR, routed into a black hole in node 1.
    let hole = Ipv4Addr::from(u32::from(node.pod_ip) + 1);
    cluster.blackhole(1, hole);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);

    // Nothing listens on port 1 of the pod address: sshd reports the
    // refusal. (On the node's own address port 1 is not allowed: 403.)
    let (status, _) = daemon.connect(&format!("{}:1", node.pod_ip));
    assert!(status.starts_with("HTTP/1.1 502 "), "{status:?}");
    assert!(
        status.trim_end().len() > "HTTP/1.1 502 ".len(),
        "502 without a reason phrase: {status:?}"
    );

    // The dial hangs: dial_timeout (2 s) answers 504.
    let t = Instant::now();
    let (status, _) = daemon.connect(&format!("{hole}:{ECHO_PORT}"));
    let took = t.elapsed();
    assert!(
        status.starts_with("HTTP/1.1 504"),
        "{status:?} after {took:?}"
    );
    // Not before the dial timeout (behaviour); and it does come (a sanity
    // bound, scaled by TUNNELER_TEST_TIME_FACTOR).
    assert!(
        took >= Duration::from_millis(1500),
        "504 after {took:?}, dial_timeout is 2s"
    );
    common::assert_within("504 with dial_timeout 2s", took, Duration::from_secs(10));

    // The tunnel is unaffected.
    let status = daemon.status();
    assert_eq!(
        find_node(&status, "node-1").unwrap().state,
        TunnelState::Healthy
    );
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", node.pod_ip), "fine");
    assert_eq!(got, format!("node=node-1 local={} echo=fine", node.pod_ip));
}

#[test]
fn a_hundred_concurrent_streams_on_one_node() {
    require_netns!("a_hundred_concurrent_streams_on_one_node");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);

    // Open all streams first, so they are really concurrent, then use them.
    let streams: Vec<_> = (0..100)
        .map(|k| {
            let target = if k % 2 == 0 {
                format!("{}:{ECHO_PORT}", node.ip)
            } else {
                format!("{}:{ECHO_PORT}", node.pod_ip)
            };
            let (status, s) = daemon.connect(&target);
            assert!(status.starts_with("HTTP/1.1 200"), "stream {k}: {status:?}");
            s
        })
        .collect();
    let status = daemon.status();
    assert_eq!(
        find_node(&status, "node-1").unwrap().active_streams,
        100,
        "{status:?}"
    );
    std::thread::scope(|scope| {
        for (k, s) in streams.into_iter().enumerate() {
            let node = &node;
            scope.spawn(move || {
                let local = if k % 2 == 0 { node.ip } else { node.pod_ip };
                let got = common::echo_over(s, &format!("s{k}"));
                assert_eq!(got, format!("node=node-1 local={local} echo=s{k}"));
            });
        }
    });
    daemon.wait_status("streams closed", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.active_streams == 0 && n.total_streams >= 100)
    });
}
