//! End-to-end routing through real sshd in network namespaces: every kind of
//! CONNECT target reaches exactly the node that owns it, real clients (curl)
//! work through both listeners, and bad requests get the documented status.

mod common;

use std::time::Duration;

use common::{find_node, Cluster, ConfigSpec, Daemon, StatusDocument, ECHO_PORT, HTTP_PORT};

const READY: Duration = Duration::from_secs(20);

#[test]
fn routes_by_node_ip_name_and_pod_ip_to_the_owning_node() {
    require_netns!("routes_by_node_ip_name_and_pod_ip_to_the_owning_node");
    let cluster = Cluster::new(3);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);

    for node in &cluster.nodes {
        let name = &node.name;
        // Node internal IP (defaults to the address).
        let got = daemon.echo(&format!("{}:{ECHO_PORT}", node.ip), "by-ip");
        assert_eq!(got, format!("node={name} local={} echo=by-ip", node.ip));
        // Node name: the target is the node's first internal IP.
        let got = daemon.echo(&format!("{name}:{ECHO_PORT}"), "by-name");
        assert_eq!(got, format!("node={name} local={} echo=by-name", node.ip));
        // An address inside the node's pod CIDR.
        let got = daemon.echo(&format!("{}:{ECHO_PORT}", node.pod_ip), "by-pod");
        assert_eq!(
            got,
            format!("node={name} local={} echo=by-pod", node.pod_ip)
        );
        // An IPv6 literal inside the node's IPv6 pod CIDR.
        match node.pod_ip6 {
            Some(ip6) => {
                let got = daemon.echo(&format!("[{ip6}]:{ECHO_PORT}"), "by-pod6");
                assert_eq!(got, format!("node={name} local={ip6} echo=by-pod6"));
            }
            None => common::skip(
                "routes_by_node_ip_name_and_pod_ip_to_the_owning_node (IPv6 part)",
                "no IPv6 in this kernel, so IPv6 pod routing is not checked",
            ),
        }
    }

    // Several lines over one tunnel, and the same through the TCP listener.
    let node = cluster.node(2);
    let (status, mut s) = daemon.connect_tcp(&format!("{}:{ECHO_PORT}", node.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    for k in 0..5 {
        let got = common::echo_over(&mut s, &format!("line{k}"));
        assert_eq!(
            got,
            format!("node=node-2 local={} echo=line{k}", node.pod_ip)
        );
    }
    drop(s);

    // Concurrent streams over all tunnels at once.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..24)
            .map(|k| {
                let node = cluster.node(k % 3 + 1);
                let daemon = &daemon;
                scope.spawn(move || {
                    let got =
                        daemon.echo(&format!("{}:{ECHO_PORT}", node.pod_ip), &format!("c{k}"));
                    assert_eq!(
                        got,
                        format!("node={} local={} echo=c{k}", node.name, node.pod_ip)
                    );
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });

    let status = daemon.status();
    for cn in &cluster.nodes {
        let n = find_node(&status, &cn.name).unwrap();
        assert!(n.total_streams >= 3, "{n:?}");
        assert!(n.bytes_in > 0, "{n:?}");
        assert!(n.bytes_out > 0, "{n:?}");
    }
}

/// Pool routing picks any healthy node, so the test gives every node one
/// shared ("anycast") service address to check that the pool works at all,
/// and then takes node 1 down: from then on the pool has exactly one
/// candidate, which makes dialling node 2's own service address
/// deterministic and shows the pool skips nodes that are not healthy.
#[test]
fn service_ips_use_the_pool_of_healthy_nodes() {
    require_netns!("service_ips_use_the_pool_of_healthy_nodes");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);

    let anycast = cluster.anycast_service_ip();
    for k in 0..8 {
        let got = daemon.echo(&format!("{anycast}:{ECHO_PORT}"), &format!("svc{k}"));
        assert!(
            got == format!("node=node-1 local={anycast} echo=svc{k}")
                || got == format!("node=node-2 local={anycast} echo=svc{k}"),
            "{got}"
        );
    }

    cluster.kill_sshd(1);
    daemon.wait_node_unhealthy("node-1", READY);

    let own = cluster.node(2).service_ip;
    for k in 0..4 {
        let got = daemon.echo(&format!("{own}:{ECHO_PORT}"), &format!("own{k}"));
        assert_eq!(got, format!("node=node-2 local={own} echo=own{k}"));
        let got = daemon.echo(&format!("{anycast}:{ECHO_PORT}"), &format!("any{k}"));
        assert_eq!(got, format!("node=node-2 local={anycast} echo=any{k}"));
    }

    // Node 1's own service address does not exist on node 2, so node 2's
    // sshd refuses the channel: 502 with the SSH reason.
    let (status, _) = daemon.connect(&format!("{}:{ECHO_PORT}", cluster.node(1).service_ip));
    assert!(status.starts_with("HTTP/1.1 502"), "{status:?}");
}

#[test]
fn curl_works_through_the_tcp_listener_and_the_admin_socket() {
    require_netns!("curl_works_through_the_tcp_listener_and_the_admin_socket");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let proxy = format!("http://{}", daemon.tcp_listener());

    for node in &cluster.nodes {
        for ip in [node.ip, node.pod_ip] {
            let out = common::run(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "10",
                    "-p",
                    "-x",
                    &proxy,
                    &format!("http://{ip}:{HTTP_PORT}/"),
                ],
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("node={}", node.name)
            );
        }
    }
    // curl by node name: the proxy resolves it, curl must not.
    let out = common::run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-p",
            "-x",
            &proxy,
            &format!("http://node-2:{HTTP_PORT}/"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node=node-2");

    // Streams end asynchronously after curl exits.
    daemon.wait_status("no active streams", READY, |s| {
        s.nodes.iter().all(|n| n.active_streams == 0)
    });
    let out = common::run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "--unix-socket",
            cluster.admin_socket().to_str().unwrap(),
            "http://localhost/v1/status",
        ],
    );
    // Decoding into the server's own types checks every field's type (the
    // counters are u64, `since` a string...).
    let status: StatusDocument = serde_json::from_slice(&out.stdout).expect("status json");
    assert!(!status.version.is_empty(), "{status:?}");
    assert!(status.uptime_seconds >= 0.0, "{status:?}");
    let listeners: Vec<&str> = status.listeners.iter().map(String::as_str).collect();
    let unix = format!("unix://{}", cluster.egress_socket().display());
    assert!(listeners.contains(&unix.as_str()), "{listeners:?}");
    assert!(
        listeners
            .iter()
            .any(|l| l.starts_with("tcp://127.0.0.1:") && !l.ends_with(":0")),
        "{listeners:?}"
    );
    let nodes = &status.nodes;
    assert_eq!(nodes.len(), 2);
    for (node, n) in cluster.nodes.iter().zip(nodes) {
        assert_eq!(n.name, node.name.as_str(), "{n:?}");
        assert_eq!(n.address, format!("{}:22", node.ip).as_str(), "{n:?}");
        assert_eq!(n.state, "healthy", "{n:?}");
        let since = n.since.as_str();
        assert!(
            since.len() >= 20 && since.as_bytes()[10] == b'T',
            "since: {since}"
        );
        assert!(n.last_error.is_none(), "{n:?}");
        assert!(n.total_streams >= 2, "{n:?}");
        assert_eq!(n.active_streams, 0, "{n:?}");
    }
}

#[test]
fn bad_requests_get_400_403_405() {
    require_netns!("bad_requests_get_400_403_405");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);

    // Outside every node, pod and service range (TEST-NET-1, never dialled).
    let (status, _) = daemon.connect("192.0.2.1:80");
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");
    let (status, _) = daemon.connect_tcp("192.0.2.1:80");
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");
    // An unknown name.
    let (status, _) = daemon.connect("no-such-node:10250");
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");
    // An IPv6 literal parses, but is in no range.
    let (status, _) = daemon.connect("[fd00::1]:10250");
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");

    let head = daemon.raw_request(b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head:?}");
    let head = daemon.raw_request(b"CONNECT HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head:?}");
    let head = daemon.raw_request(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 405"), "{head:?}");

    // The daemon still serves after all that.
    let node = cluster.node(1);
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", node.pod_ip), "still");
    assert_eq!(got, format!("node=node-1 local={} echo=still", node.pod_ip));
}

/// The key `tunneler keygen` writes, with the authorized_keys line it
/// prints, logs in to a real sshd and carries traffic.
#[test]
fn keygen_key_and_authorized_keys_line_work_against_sshd() {
    require_netns!("keygen_key_and_authorized_keys_line_work_against_sshd");
    let cluster = Cluster::new(1);
    let key = cluster.dir.join("generated").join("id_test");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let out = common::tunneler(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::all_output(&out));
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .expect("authorized_keys line")
        .to_string();
    cluster.set_authorized_keys(&line);

    let daemon = Daemon::start_with(
        &cluster,
        &ConfigSpec {
            identity_file: Some("generated/id_test".into()),
            ..ConfigSpec::default()
        },
    );
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", node.ip), "keygen");
    assert_eq!(got, format!("node=node-1 local={} echo=keygen", node.ip));
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    require_netns!("sigterm_stops_the_daemon_cleanly");
    let cluster = Cluster::new(1);
    // A stopping daemon lets open streams finish up to drain_timeout (60 s
    // by default; restart.rs tests the drain): 1 s here, so that the open
    // tunnel below is cut within the harness's 10 s wait for the exit.
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "[proxy]\n",
        "[proxy]\ndrain_timeout = \"1s\"\n",
        1,
    );
    let mut daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    // One open tunnel must not hold up shutdown past the drain timeout.
    let (status, _stream) = daemon.connect(&format!("{}:{ECHO_PORT}", cluster.node(1).ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    let exit = daemon.stop().expect("daemon exit status");
    assert!(exit.success(), "exit after SIGTERM: {exit}");
}

/// A daemon killed hard leaves its socket files behind; the next one on the
/// same config must still bind them, and SIGINT stops it like SIGTERM.
#[test]
fn restart_after_a_hard_kill_and_sigint() {
    require_netns!("restart_after_a_hard_kill_and_sigint");
    let cluster = Cluster::new(1);
    let mut first = Daemon::start(&cluster);
    first.wait_all_healthy(READY);
    first.stop_with("KILL");
    assert!(cluster.egress_socket().exists() || cluster.admin_socket().exists());

    let mut second = Daemon::start(&cluster);
    second.wait_all_healthy(READY);
    let node = cluster.node(1);
    let got = second.echo(&format!("{}:{ECHO_PORT}", node.ip), "again");
    assert_eq!(got, format!("node=node-1 local={} echo=again", node.ip));
    let exit = second.stop_with("INT").expect("exit status");
    assert!(exit.success(), "exit after SIGINT: {exit}");
}
