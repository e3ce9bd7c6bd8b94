//! `ssh.connections_per_node`: several SSH sessions to one node, with
//! streams spread across them, against a real sshd.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{node_status, Cluster, ConfigSpec, Daemon, ECHO_PORT};

const READY: Duration = Duration::from_secs(20);

/// Established TCP connections to port 22 inside the node's namespace.
fn ssh_sessions(ns: &str) -> usize {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ss",
            "-Htn",
            "state",
            "established",
            "( sport = :22 )",
        ])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn three_sessions_per_node_carry_streams_and_reconnect() {
    require_netns!("three_sessions_per_node_carry_streams_and_reconnect");
    let cluster = Cluster::new(1);
    let spec = ConfigSpec {
        ssh_extra: "connections_per_node = 3\n".into(),
        ..Default::default()
    };
    let daemon = Daemon::start_with(&cluster, &spec);
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);
    assert!(
        common::poll(Duration::from_secs(10), || ssh_sessions(&node.ns) == 3),
        "expected 3 SSH sessions, saw {}",
        ssh_sessions(&node.ns)
    );

    // 30 concurrent streams, all answered by the right node.
    let streams: Vec<_> = (0..30)
        .map(|k| {
            let (status, s) = daemon.connect(&format!("{}:{ECHO_PORT}", node.ip));
            assert!(status.starts_with("HTTP/1.1 200"), "stream {k}: {status}");
            s
        })
        .collect();
    for (k, s) in streams.into_iter().enumerate() {
        let got = common::echo_over(s, &format!("m{k}"));
        assert_eq!(got, format!("node=node-1 local={} echo=m{k}", node.ip));
    }

    // A planned reconnect replaces all three sessions, one by one, without
    // cutting a stream that is open meanwhile.
    let (status, mut long) = daemon.connect(&format!("{}:{ECHO_PORT}", node.ip));
    assert!(status.starts_with("HTTP/1.1 200"));
    let before = common::echo_over(&mut long, "before");
    assert!(before.ends_with("echo=before"), "{before}");
    let out = common::tunneler(&[
        "nodes",
        "--socket",
        daemon_socket(&cluster).as_str(),
        "reconnect",
        "node-1",
    ]);
    assert!(out.status.success(), "{}", common::all_output(&out));
    let after = common::echo_over(&mut long, "after");
    assert!(after.ends_with("echo=after"), "{after}");
    let status = daemon.status_json();
    assert_eq!(node_status(&status, "node-1").unwrap()["state"], "healthy");
}

fn daemon_socket(cluster: &Cluster) -> String {
    cluster.admin_socket().display().to_string()
}
