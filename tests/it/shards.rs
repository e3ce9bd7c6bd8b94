//! Shards: each node, with its SSH sessions and every relay of its streams,
//! runs on one shard thread, and keeps it. Real sshd in namespaces, real
//! clients (std sockets, curl for the mTLS listener).
//!
//! Streams are counted per shard on the thread that actually relays them
//! (`tunneler_shard_streams_total`), and every task, relay and russh
//! callback of a node counts itself in `tunneler_shard_misplaced_total`
//! when it runs off its node's shard. So a relay run on the control thread
//! or on the wrong shard shows as a count on the wrong shard (or none) and
//! a non-zero misplaced counter.

use crate::common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::pki::egress_pki;
use common::*;

const READY: Duration = Duration::from_secs(30);

fn shard_of(status: &StatusDocument, name: &str) -> u64 {
    status
        .nodes
        .iter()
        .find(|n| n.name == name)
        .and_then(|n| n.shard)
        .map(|s| s as u64)
        .unwrap_or_else(|| panic!("no shard for {name} in status: {status:?}"))
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
}

/// One per-shard counter, for shards 0 and 1, as the metrics say.
fn per_shard(daemon: &Daemon, name: &str) -> [u64; 2] {
    let m = daemon.metrics();
    [0, 1].map(|s| metric(&m, name, &[("shard", &s.to_string())]) as u64)
}

/// Streams each shard's thread relayed since start.
fn streams_by_shard(daemon: &Daemon) -> [u64; 2] {
    per_shard(daemon, "tunneler_shard_streams_total")
}

/// The daemon's threads named like shard threads.
fn shard_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim().starts_with("shard-"))
        .count()
}

/// Connections each shard took over from the shard that accepted them.
fn moved_in_by_shard(daemon: &Daemon) -> [u64; 2] {
    per_shard(daemon, "tunneler_shard_moved_in_total")
}

/// CONNECT plus `payload` in one write, so the bytes past the head are read
/// on the accepting shard with the head and must travel with a hand-off;
/// then half-close and expect the 200 followed by the exact echo.
fn pipelined_echo(daemon: &Daemon, target: &str, payload: &[u8]) -> Result<(), String> {
    let mut s = UnixStream::connect(&daemon.egress).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes();
    req.extend_from_slice(payload);
    s.write_all(&req).map_err(|e| e.to_string())?;
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| e.to_string())?;
    let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
    if !got.starts_with(ok) {
        return Err(format!(
            "reply: {:?}",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        ));
    }
    compare_exact(&got[ok.len()..], payload)
}

#[test]
fn nodes_and_their_streams_stay_on_their_shard() {
    require_netns!("nodes_and_their_streams_stay_on_their_shard");
    let cluster = Cluster::new(4);
    let tls = cluster.dir.join("tls");
    egress_pki(&tls, "egress");
    let tls_port = free_tcp_port();
    let spec = ConfigSpec {
        extra: format!(
            "\n[runtime]\nshards = 2\n\n[proxy.tls]\nlisten = \"127.0.0.1:{tls_port}\"\n\
             cert_file = \"tls/server.pem\"\nkey_file = \"tls/server.key\"\n\
             client_ca_file = \"tls/ca.pem\"\nclient_names = [\"kube-apiserver-egress\"]\n"
        ),
        ..ConfigSpec::default()
    };
    let daemon = Daemon::start_with(&cluster, &spec);
    let status = daemon.wait_all_healthy(READY);
    assert_eq!(shard_threads(daemon.pid()), 2, "shard threads");

    // Spread: two nodes on each shard, in status and in the metrics.
    let names: Vec<String> = (1..=4).map(|i| cluster.node(i).name.clone()).collect();
    let shard: BTreeMap<String, u64> = names
        .iter()
        .map(|n| (n.clone(), shard_of(&status, n)))
        .collect();
    for s in [0, 1] {
        assert_eq!(
            shard.values().filter(|v| **v == s).count(),
            2,
            "nodes per shard: {shard:?}"
        );
    }
    let m = daemon.metrics();
    for s in ["0", "1"] {
        assert_eq!(metric(&m, "tunneler_shard_nodes", &[("shard", s)]), 2.0);
    }
    for (n, s) in &shard {
        assert_eq!(
            metric(&m, "tunneler_node_shard", &[("node", n)]),
            *s as f64,
            "{n}"
        );
    }
    assert_eq!(streams_by_shard(&daemon), [0, 0]);
    let mut expected = [0u64; 2];

    // Byte-exact streams through every node at once, over both plain
    // listeners, one of them with bytes right behind the head.
    let run_streams = |round: u64| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (1..=4)
                .map(|i| {
                    let daemon = &daemon;
                    let target = format!("{}:{RAW_ECHO_PORT}", cluster.node(i).pod_ip);
                    scope.spawn(move || -> Result<(), String> {
                        let seed = round * 100 + i as u64;
                        let (st, s) = daemon.connect(&target);
                        assert!(st.starts_with("HTTP/1.1 200"), "{target}: {st}");
                        echo_exact(s, &pattern(256 << 10, seed))?;
                        let (st, s) = daemon.connect_tcp(&target);
                        assert!(st.starts_with("HTTP/1.1 200"), "{target}: {st}");
                        echo_exact(s, &pattern(256 << 10, seed + 50))?;
                        pipelined_echo(daemon, &target, &pattern(64 << 10, seed + 70))
                    })
                })
                .collect();
            for (i, w) in workers.into_iter().enumerate() {
                w.join()
                    .expect("stream thread")
                    .unwrap_or_else(|e| panic!("node-{}: {e}", i + 1));
            }
        });
    };
    run_streams(1);
    for s in shard.values() {
        expected[*s as usize] += 3;
    }
    assert_eq!(streams_by_shard(&daemon), expected, "node shards {shard:?}");

    // A make-before-break reconnect of every node: new sessions, same shard.
    let m = daemon.metrics();
    let opens = |m: &str, n: &str| metric(m, "tunneler_ssh_tunnel_open_total", &[("node", n)]);
    let before: Vec<f64> = names.iter().map(|n| opens(&m, n)).collect();
    for n in &names {
        let (code, body) = daemon.admin("POST", &format!("/v1/nodes/{n}/reconnect"), None);
        assert_eq!(code, 200, "reconnect {n}: {body}");
    }
    let m = daemon.metrics();
    for (n, b) in names.iter().zip(&before) {
        assert_eq!(opens(&m, n), b + 1.0, "{n} got a new session");
    }
    let status = daemon.wait_all_healthy(READY);
    for (n, s) in &shard {
        assert_eq!(shard_of(&status, n), *s, "{n} kept its shard");
    }
    run_streams(2);
    for s in shard.values() {
        expected[*s as usize] += 3;
    }
    assert_eq!(streams_by_shard(&daemon), expected, "after reconnects");

    // Pool dials: the node that answered names itself; its shard relayed.
    let anycast = format!("{}:{ECHO_PORT}", cluster.anycast_service_ip());
    for k in 0..4 {
        let got = daemon.echo(&anycast, &format!("pool{k}"));
        let node = got
            .split_whitespace()
            .find_map(|w| w.strip_prefix("node="))
            .unwrap_or_else(|| panic!("pool echo: {got:?}"));
        expected[shard[node] as usize] += 1;
    }
    assert_eq!(streams_by_shard(&daemon), expected, "after pool dials");

    // The mTLS listener: the TLS session moves to the node's shard intact.
    let p = |f: &str| tls.join(f).to_str().unwrap().to_string();
    for i in [1, 2] {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-p", "--proxy"])
            .arg(format!("https://127.0.0.1:{tls_port}"))
            .args(["--proxy-cacert", &p("ca.pem")])
            .args(["--proxy-cert", &p("egress.pem")])
            .args(["--proxy-key", &p("egress.key")])
            .arg(format!("http://{}:{HTTP_PORT}/", cluster.node(i).pod_ip))
            .output()
            .unwrap();
        assert!(out.status.success(), "curl: {}", all_output(&out));
        let name = &cluster.node(i).name;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("node={name}")
        );
        expected[shard[name] as usize] += 1;
    }
    assert_eq!(streams_by_shard(&daemon), expected, "after TLS streams");

    // Both shards accept. A stream accepted on its node's shard stays
    // there, the others move once: with two nodes on each shard some of
    // the streams above took each way (a shard that accepted everything
    // would still see half its streams' nodes on the other shard).
    let moved = moved_in_by_shard(&daemon);
    let all: u64 = expected.iter().sum();
    let moved_all: u64 = moved.iter().sum();
    assert!(
        moved_all > 0 && moved_all < all,
        "hand-offs {moved:?} of {all} streams {expected:?}"
    );
    for s in 0..2 {
        assert!(moved[s] <= expected[s], "shard {s}: {moved:?} {expected:?}");
    }

    // Nothing of any node ran off its shard; every stream has ended.
    let m = daemon.metrics();
    assert_eq!(metric(&m, "tunneler_shard_misplaced_total", &[]), 0.0);
    let idle = poll(Duration::from_secs(10), || {
        let m = daemon.metrics();
        ["0", "1"].iter().all(|s| {
            metric_value(&m, "tunneler_shard_active_streams", &[("shard", s)]) == Some(0.0)
        })
    });
    assert!(idle, "streams still counted:\n{}", daemon.metrics());
    report(&format!(
        "shards: nodes {shard:?}, streams per shard {expected:?}, moved in {moved:?}"
    ));
}

/// A node removed and another added: the new one takes the freed place
/// (the least loaded shard), nobody else moves.
#[test]
fn a_new_node_fills_the_gap_a_removed_one_left() {
    require_netns!("a_new_node_fills_the_gap_a_removed_one_left");
    let cluster = Cluster::new(4);
    let spec = ConfigSpec {
        nodes: Some(vec![1, 2, 3]),
        extra: "\n[runtime]\nshards = 2\n".into(),
        ..ConfigSpec::default()
    };
    let daemon = Daemon::start_with(&cluster, &spec);
    let status = daemon.wait_all_healthy(READY);
    let before: Vec<u64> = (1..=3)
        .map(|i| shard_of(&status, &cluster.node(i).name))
        .collect();
    // Three nodes on two shards: the first shard has two.
    assert_eq!(before, [0, 1, 0]);
    let (code, body) = daemon.admin("DELETE", "/v1/nodes/node-1", None);
    assert_eq!(code, 200, "{body}");
    daemon.wait_status("node-1 gone from the shard", READY, |_| {
        metric_value(&daemon.metrics(), "tunneler_shard_nodes", &[("shard", "0")]) == Some(1.0)
    });
    let n4 = cluster.node(4);
    let add = format!(
        r#"{{"name": "{}", "address": "{}", "pod_cidrs": ["{}"]}}"#,
        n4.name, n4.ip, n4.pod_cidr
    );
    let (code, body) = daemon.admin("POST", "/v1/nodes", Some(&add));
    assert!(code == 200 || code == 201, "add: {code} {body}");
    let status = daemon.wait_all_healthy(READY);
    // Both shards had one node: the tie goes to shard 0, the freed one.
    assert_eq!(shard_of(&status, &n4.name), 0);
    assert_eq!(shard_of(&status, &cluster.node(2).name), 1);
    assert_eq!(shard_of(&status, &cluster.node(3).name), 0);
    let target = format!("{}:{RAW_ECHO_PORT}", n4.pod_ip);
    let (st, s) = daemon.connect(&target);
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    echo_exact(s, &pattern(128 << 10, 4)).unwrap();
    let m = daemon.metrics();
    assert_eq!(
        metric(&m, "tunneler_shard_streams_total", &[("shard", "0")]),
        1.0
    );
    assert_eq!(
        metric(&m, "tunneler_shard_streams_total", &[("shard", "1")]),
        0.0
    );
    assert_eq!(metric(&m, "tunneler_shard_misplaced_total", &[]), 0.0);
}
