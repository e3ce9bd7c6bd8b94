//! What happens on a single tunnelled stream: bulk data arrives intact,
//! half-close and early bytes are carried, a client that stops reading does
//! not stall other streams, and failed dials get 502 or 504.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::time::{Duration, Instant};

use common::{node_status, read_head, Cluster, Daemon, ECHO_PORT, FLOOD_PORT};

const READY: Duration = Duration::from_secs(20);

/// Deterministic printable payload of `len` bytes.
fn payload(len: usize, seed: u32) -> String {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (b'!' + (x % 90) as u8) as char
        })
        .collect()
}

#[test]
fn bulk_data_round_trips_intact_on_concurrent_streams() {
    require_netns!("bulk_data_round_trips_intact_on_concurrent_streams");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);

    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6u32)
            .map(|k| {
                let node = cluster.node(k as usize % 2 + 1);
                let daemon = &daemon;
                scope.spawn(move || {
                    let data = payload(1 << 20, k + 1);
                    let target = format!("{}:{ECHO_PORT}", node.pod_ip);
                    let (status, mut s) = if k % 2 == 0 {
                        let (st, s) = daemon.connect(&target);
                        (st, Box::new(s) as Box<dyn ReadWriteSend>)
                    } else {
                        let (st, s) = daemon.connect_tcp(&target);
                        (st, Box::new(s) as Box<dyn ReadWriteSend>)
                    };
                    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
                    s.write_all(data.as_bytes()).unwrap();
                    s.write_all(b"\n").unwrap();
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line).unwrap();
                    let want = format!("node={} local={} echo={data}\n", node.name, node.pod_ip);
                    assert!(
                        line == want,
                        "stream {k}: got {} bytes, want {}",
                        line.len(),
                        want.len()
                    );
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });

    daemon.wait_for("byte counters", READY, |s| {
        cluster.nodes.iter().all(|n| {
            node_status(s, &n.name).is_some_and(|n| {
                n["bytes_in"].as_u64().unwrap_or(0) >= 3 << 20
                    && n["bytes_out"].as_u64().unwrap_or(0) >= 3 << 20
            })
        })
    });
}

trait ReadWriteSend: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWriteSend for T {}

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
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
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
#[test]
fn a_client_that_stops_reading_does_not_stall_other_streams() {
    require_netns!("a_client_that_stops_reading_does_not_stall_other_streams");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);

    let (status, stalled) = daemon.connect(&format!("{}:{FLOOD_PORT}", node.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // Let the flood fill every buffer between the server and us. The
    // daemon may keep the stalled stream or reset it (it resets once a
    // per-stream buffer limit is reached); either way nothing else stalls.
    // The time passing is the subject here, not a readiness wait.
    std::thread::sleep(Duration::from_secs(1));

    // For longer than keepalive_interval × keepalive_max (3 s), other
    // streams on the same tunnel keep answering promptly.
    let start = Instant::now();
    let mut k = 0;
    while start.elapsed() < Duration::from_secs(5) {
        let (status, mut s) = daemon.connect(&format!("{}:{ECHO_PORT}", node.ip));
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "CONNECT while another stream is stalled: {status}"
        );
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let t = Instant::now();
        let got = common::echo_over(&mut s, &format!("k{k}"));
        assert_eq!(got, format!("node=node-1 local={} echo=k{k}", node.ip));
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "slow echo: {:?}",
            t.elapsed()
        );
        k += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = daemon.status_json();
    assert_eq!(
        node_status(&status, "node-1").unwrap()["state"],
        "healthy",
        "{status}"
    );
    drop(stalled);
    daemon.wait_for("stalled stream released", READY, |s| {
        node_status(s, "node-1").is_some_and(|n| n["active_streams"] == 0)
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
    assert!(status.starts_with("HTTP/1.1 502 "), "{status}");
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
        "{status} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "504 after {took:?}, dial_timeout is 2s"
    );

    // The tunnel is unaffected.
    let status = daemon.status_json();
    assert_eq!(node_status(&status, "node-1").unwrap()["state"], "healthy");
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
            assert!(status.starts_with("HTTP/1.1 200"), "stream {k}: {status}");
            s
        })
        .collect();
    let status = daemon.status_json();
    assert_eq!(
        node_status(&status, "node-1").unwrap()["active_streams"],
        100,
        "{status}"
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
    daemon.wait_for("streams closed", READY, |s| {
        node_status(s, "node-1").is_some_and(|n| {
            n["active_streams"] == 0 && n["total_streams"].as_u64().unwrap_or(0) >= 100
        })
    });
}
