//! `ssh.connections_per_node`: several SSH sessions to one node, with
//! streams spread across them, against a real sshd.

use crate::common;
use common::TunnelState;

use std::time::Duration;

use common::{find_node, Cluster, ConfigSpec, Daemon, ECHO_PORT};

const READY: Duration = Duration::from_secs(20);

/// How many of the node's tunnelled streams (connections to the echo port
/// inside the node) each sshd session process carries, sorted.
fn streams_per_session(cluster: &Cluster) -> Vec<usize> {
    let pids = cluster.peer_pids_in_node(1, ECHO_PORT);
    let mut counts: Vec<usize> = Vec::new();
    let mut last = None;
    for p in pids {
        if last == Some(p) {
            *counts.last_mut().unwrap() += 1;
        } else {
            counts.push(1);
            last = Some(p);
        }
    }
    counts.sort_unstable();
    counts
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
    let target = format!("{}:{ECHO_PORT}", node.pod_ip);
    assert!(
        common::poll(Duration::from_secs(10), || cluster.ssh_sessions_to(1) == 3),
        "expected 3 SSH sessions, saw {}",
        cluster.ssh_sessions_to(1)
    );
    let first_sessions = cluster.ssh_session_ports(1);

    // 30 concurrent streams, all answered by the right node, spread over
    // the three sessions: each new stream takes the least loaded session,
    // so 30 streams opened one after another make 10 on each.
    let streams: Vec<_> = (0..30)
        .map(|k| {
            let (status, mut s) = daemon.connect(&target);
            assert!(status.starts_with("HTTP/1.1 200"), "stream {k}: {status:?}");
            // One echo, so the node-side connection surely exists.
            let got = common::echo_over(&mut s, &format!("m{k}"));
            assert_eq!(got, format!("node=node-1 local={} echo=m{k}", node.pod_ip));
            s
        })
        .collect();
    let spread = streams_per_session(&cluster);
    assert_eq!(
        spread,
        vec![10, 10, 10],
        "streams per SSH session (sshd process) for 30 streams"
    );
    for (k, s) in streams.into_iter().enumerate() {
        let got = common::echo_over(s, &format!("again{k}"));
        assert_eq!(
            got,
            format!("node=node-1 local={} echo=again{k}", node.pod_ip)
        );
    }
    daemon.wait_status("the 30 streams closed", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.active_streams == 0)
    });

    // A planned reconnect replaces all three sessions, one by one, without
    // cutting a stream that is open meanwhile.
    let (status, mut long) = daemon.connect(&target);
    assert!(status.starts_with("HTTP/1.1 200"));
    let before = common::echo_over(&mut long, "before");
    assert!(before.ends_with("echo=before"), "{before:?}");
    let out = common::tunneler(&[
        "nodes",
        "--socket",
        daemon_socket(&cluster).as_str(),
        "reconnect",
        "node-1",
    ]);
    assert!(out.status.success(), "{}", common::all_output(&out));
    let after = common::echo_over(&mut long, "after");
    assert!(after.ends_with("echo=after"), "{after:?}");
    let status = daemon.status();
    let n = find_node(&status, "node-1").unwrap();
    assert_eq!(n.state, TunnelState::Healthy, "{n:?}");
    assert_eq!(
        n.reconnects, 0,
        "a planned reconnect loses no session: {n:?}"
    );

    // Once the long stream ends, its old session drains away: three
    // sessions again, none of them one of the first three.
    drop(long);
    let mut now = Vec::new();
    let replaced = common::poll(READY, || {
        now = cluster.ssh_session_ports(1);
        now.len() == 3 && now.iter().all(|p| !first_sessions.contains(p))
    });
    assert!(
        replaced,
        "sessions before the reconnect {first_sessions:?}, after {now:?}"
    );
    // The new sessions carry streams too.
    let got = daemon.echo(&target, "new");
    assert_eq!(got, format!("node=node-1 local={} echo=new", node.pod_ip));
}

fn daemon_socket(cluster: &Cluster) -> String {
    cluster.admin_socket().display().to_string()
}
