//! End-to-end routing through real sshd in network namespaces: every kind of
//! CONNECT target reaches exactly the node that owns it, real clients (curl)
//! work through both listeners, and bad requests get the documented status.
//! Where a test stands in for kube-apiserver it dials with
//! `common::apiserver`, which behaves as kube-apiserver's egress dialer
//! does byte for byte (one write, Go's reply parsing, no byte buffered
//! after the 200).

use crate::common;
use common::TunnelState;

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
        let got = daemon.apiserver_echo(&format!("{}:{ECHO_PORT}", node.ip), "by-ip");
        assert_eq!(got, format!("node={name} local={} echo=by-ip", node.ip));
        // Node name: the target is the node's first internal IP.
        let got = daemon.apiserver_echo(&format!("{name}:{ECHO_PORT}"), "by-name");
        assert_eq!(got, format!("node={name} local={} echo=by-name", node.ip));
        // An address inside the node's pod CIDR.
        let got = daemon.apiserver_echo(&format!("{}:{ECHO_PORT}", node.pod_ip), "by-pod");
        assert_eq!(
            got,
            format!("node={name} local={} echo=by-pod", node.pod_ip)
        );
        // An IPv6 literal inside the node's IPv6 pod CIDR.
        match node.pod_ip6 {
            Some(ip6) => {
                let got = daemon.apiserver_echo(&format!("[{ip6}]:{ECHO_PORT}"), "by-pod6");
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
                    let got = daemon
                        .apiserver_echo(&format!("{}:{ECHO_PORT}", node.pod_ip), &format!("c{k}"));
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
        let got = daemon.apiserver_echo(&format!("{anycast}:{ECHO_PORT}"), &format!("svc{k}"));
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
        let got = daemon.apiserver_echo(&format!("{own}:{ECHO_PORT}"), &format!("own{k}"));
        assert_eq!(got, format!("node=node-2 local={own} echo=own{k}"));
        let got = daemon.apiserver_echo(&format!("{anycast}:{ECHO_PORT}"), &format!("any{k}"));
        assert_eq!(got, format!("node=node-2 local={anycast} echo=any{k}"));
    }

    // Node 1's own service address does not exist on node 2, so node 2's
    // sshd refuses the channel: 502 with the SSH reason.
    let (code, status) =
        daemon.apiserver_refusal(&format!("{}:{ECHO_PORT}", cluster.node(1).service_ip));
    assert_eq!(code, 502, "{status}");
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
        assert_eq!(n.state, TunnelState::Healthy, "{n:?}");
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
    let (code, status) = daemon.apiserver_refusal("192.0.2.1:80");
    assert_eq!(code, 403, "{status}");
    let (status, _) = daemon.connect_tcp("192.0.2.1:80");
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");
    // An unknown name.
    let (code, status) = daemon.apiserver_refusal("no-such-node:10250");
    assert_eq!(code, 403, "{status}");
    // An IPv6 literal parses, but is in no range.
    let (code, status) = daemon.apiserver_refusal("[fd00::1]:10250");
    assert_eq!(code, 403, "{status}");

    let head = daemon.raw_request(b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head:?}");
    let head = daemon.raw_request(b"CONNECT HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head:?}");
    let head = daemon.raw_request(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 405"), "{head:?}");

    // The daemon still serves after all that.
    let node = cluster.node(1);
    let got = daemon.apiserver_echo(&format!("{}:{ECHO_PORT}", node.pod_ip), "still");
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
    let got = daemon.apiserver_echo(&format!("{}:{ECHO_PORT}", node.ip), "keygen");
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
    let _stream = daemon
        .apiserver_dial(&format!("{}:{ECHO_PORT}", cluster.node(1).ip))
        .unwrap_or_else(|e| panic!("{e}"));
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
    let got = second.apiserver_echo(&format!("{}:{ECHO_PORT}", node.ip), "again");
    assert_eq!(got, format!("node=node-1 local={} echo=again", node.ip));
    let exit = second.stop_with("INT").expect("exit status");
    assert!(exit.success(), "exit after SIGINT: {exit}");
}

/// `[proxy]` of `cluster`'s default config with `lines` added at its top.
fn with_proxy_keys(toml: &str, lines: &str) -> String {
    toml.replacen("[proxy]\n", &format!("[proxy]\n{lines}\n"), 1)
}

/// Streams each node has carried so far, by name.
fn carried(daemon: &Daemon) -> std::collections::BTreeMap<String, u64> {
    daemon
        .status()
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.total_streams))
        .collect()
}

/// A pod of a pod network that no Node describes (a Calico block, a
/// Cilium cluster-pool range) lives on node-2, and every node namespace
/// routes it to node-2. Without `pod_network_cidrs` it is refused with a
/// reason that names the key; with the key (added by a reload) it is
/// reached through whichever node the pool picks, also with node-2
/// drained, when the pool cannot pick node-2 at all. An address outside
/// every range stays refused.
#[test]
fn a_pod_network_no_node_describes_is_reached_through_the_pool() {
    require_netns!("a_pod_network_no_node_describes_is_reached_through_the_pool");
    let cluster = Cluster::new(3);
    let n = cluster.n;
    // Node pod CIDRs are 10.201.n.16/28 to .48/28: .200 is in no block.
    let pod: std::net::Ipv4Addr = format!("10.201.{n}.200").parse().unwrap();
    cluster.add_pod_network_address(2, pod);
    let base = cluster.config_toml(&ConfigSpec::default());
    let mut daemon = Daemon::start_toml(&cluster, &base, &[]);
    daemon.wait_all_healthy(READY);
    let target = format!("{pod}:{ECHO_PORT}");

    let (code, status) = daemon.apiserver_refusal(&target);
    assert_eq!(code, 403, "{status}");
    assert!(
        status.contains("proxy.pod_network_cidrs") && status.contains("proxy.service_cidrs"),
        "{status}"
    );

    // Live on reload.
    let with_key = with_proxy_keys(&base, &format!("pod_network_cidrs = [\"10.201.{n}.0/24\"]"));
    std::fs::write(&daemon.config, &with_key).unwrap();
    let (code, body) = daemon.admin("POST", "/v1/reload", None);
    assert_eq!(code, 200, "{body}");

    let want = |k: &str| format!("node=node-2 local={pod} echo={k}");
    let before = carried(&daemon);
    for k in 0..10 {
        let line = format!("undrained{k}");
        assert_eq!(daemon.apiserver_echo(&target, &line), want(&line));
    }
    daemon.wait_status("no active streams", READY, |s| {
        s.nodes.iter().all(|n| n.active_streams == 0)
    });
    let after = carried(&daemon);
    let total: u64 = after.iter().map(|(k, v)| v - before[k]).sum();
    assert_eq!(total, 10, "{before:?} -> {after:?}");

    let (code, body) = daemon.admin("POST", "/v1/nodes/node-2/drain", None);
    assert_eq!(code, 200, "{body}");
    let before = carried(&daemon);
    for k in 0..10 {
        let line = format!("drained{k}");
        assert_eq!(daemon.apiserver_echo(&target, &line), want(&line));
    }
    daemon.wait_status("no active streams", READY, |s| {
        s.nodes.iter().all(|n| n.active_streams == 0)
    });
    let after = carried(&daemon);
    assert_eq!(
        after["node-2"], before["node-2"],
        "a drained node carried a pool dial"
    );
    assert_eq!(
        after["node-1"] + after["node-3"] - before["node-1"] - before["node-3"],
        10,
        "{before:?} -> {after:?}"
    );

    // A claimed address still goes to its owner, and one in no range is
    // refused with the keys to change.
    let owned = cluster.node(3).pod_ip;
    assert_eq!(
        daemon.apiserver_echo(&format!("{owned}:{ECHO_PORT}"), "owned"),
        format!("node=node-3 local={owned} echo=owned")
    );
    let outside = format!("10.203.{n}.5:{ECHO_PORT}");
    let (code, status) = daemon.apiserver_refusal(&outside);
    assert_eq!(code, 403, "{status}");
    assert!(
        status.contains("proxy.pod_network_cidrs") && status.contains("proxy.service_cidrs"),
        "{status}"
    );
    let exit = daemon.stop().expect("daemon exit status");
    assert!(exit.success(), "{exit}");
}

/// A `kubectl get nodes -o json` Node for node `i` with extra addresses,
/// annotations and a kubelet port.
fn k8s_node(
    cluster: &Cluster,
    i: usize,
    addresses: &[(&str, &str)],
    annotations: &[(&str, &str)],
    kubelet_port: Option<u16>,
) -> serde_json::Value {
    let n = cluster.node(i);
    let mut node = cluster.k8s_node_json(i, &[n.pod_cidr.as_str()]);
    for (kind, address) in addresses {
        node["status"]["addresses"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({ "type": kind, "address": address }));
    }
    for (k, v) in annotations {
        node["metadata"]["annotations"][*k] = serde_json::Value::from(*v);
    }
    if let Some(p) = kubelet_port {
        node["status"]["daemonEndpoints"] = serde_json::json!({ "kubeletEndpoint": { "Port": p } });
    }
    node
}

fn nodes_file_config(cluster: &Cluster, proxy: &str, node_ports: Option<Vec<u16>>) -> String {
    let spec = ConfigSpec {
        nodes: Some(vec![]),
        extra: "\n[discovery]\nnodes_file = \"nodes.json\"\n".into(),
        node_ports,
        ..ConfigSpec::default()
    };
    with_proxy_keys(&cluster.config_toml(&spec), proxy)
}

/// Calico's tunnel address of a node lies in the pod network; calico-node
/// publishes it as a Node annotation. A dial to it is held to the node
/// port policy although the pool (any node) carries it: 403 on the SSH
/// port and on a port not listed, the kubelet port passes. A pod address
/// beside it keeps every port.
#[test]
fn a_calico_tunnel_address_keeps_the_node_port_policy() {
    require_netns!("a_calico_tunnel_address_keeps_the_node_port_policy");
    let cluster = Cluster::new(3);
    let n = cluster.n;
    let tunnel: std::net::Ipv4Addr = format!("10.201.{n}.201").parse().unwrap();
    let pod: std::net::Ipv4Addr = format!("10.201.{n}.202").parse().unwrap();
    cluster.add_pod_network_address(2, tunnel);
    cluster.add_pod_network_address(2, pod);
    // The kubelet port is the echo server's, and node_ports lists nothing.
    let items = (1..=3)
        .map(|i| {
            let ann = if i == 2 {
                vec![("projectcalico.org/IPv4IPIPTunnelAddr", format!("{tunnel}"))]
            } else {
                vec![]
            };
            let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
            k8s_node(&cluster, i, &[], &ann, Some(ECHO_PORT))
        })
        .collect();
    std::fs::write(
        cluster.dir.join("nodes.json"),
        Cluster::k8s_node_list(items),
    )
    .unwrap();
    let toml = nodes_file_config(
        &cluster,
        &format!("pod_network_cidrs = [\"10.201.{n}.0/24\"]"),
        Some(vec![]),
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_status("three healthy nodes", READY, |s| {
        s.nodes.len() == 3 && s.nodes.iter().all(|n| n.state == TunnelState::Healthy)
    });

    let (code, status) = daemon.apiserver_refusal(&format!("{tunnel}:22"));
    assert_eq!(code, 403, "{status}");
    assert!(
        status.contains("SSH port of node \"node-2\"") && status.contains("proxy.node_ports"),
        "{status}"
    );
    let (code, status) = daemon.apiserver_refusal(&format!("{tunnel}:{HTTP_PORT}"));
    assert_eq!(code, 403, "{status}");
    assert!(status.contains("proxy.node_ports"), "{status}");
    assert_eq!(
        daemon.apiserver_echo(&format!("{tunnel}:{ECHO_PORT}"), "kubelet"),
        format!("node=node-2 local={tunnel} echo=kubelet")
    );
    // A pod beside it: any port.
    let conn = daemon
        .apiserver_dial(&format!("{pod}:{HTTP_PORT}"))
        .unwrap_or_else(|e| panic!("pod dial: {e}"));
    assert!(
        common::http_get_over(conn).ends_with("node=node-2\n"),
        "pod HTTP answer"
    );
}

/// Every Node address type routes to its node: `InternalDNS` and
/// `ExternalDNS` names, in any case and with a trailing dot, like the
/// node's name and `Hostname`. A DNS name two Nodes claim routes to
/// neither, as a shared IP does, and the status lists it.
#[test]
fn every_node_name_type_routes_and_a_shared_name_routes_to_neither() {
    require_netns!("every_node_name_type_routes_and_a_shared_name_routes_to_neither");
    let cluster = Cluster::new(3);
    let n = cluster.n;
    let internal_dns = format!("ip-10-200-{n}-11.ec2.internal");
    let items = vec![
        k8s_node(
            &cluster,
            1,
            &[
                ("InternalDNS", internal_dns.as_str()),
                ("ExternalDNS", "node-1.example.com."),
            ],
            &[],
            None,
        ),
        k8s_node(
            &cluster,
            2,
            &[("InternalDNS", "shared.example.internal")],
            &[],
            None,
        ),
        k8s_node(
            &cluster,
            3,
            &[("ExternalDNS", "Shared.Example.Internal")],
            &[],
            None,
        ),
    ];
    std::fs::write(
        cluster.dir.join("nodes.json"),
        Cluster::k8s_node_list(items),
    )
    .unwrap();
    let daemon = Daemon::start_toml(&cluster, &nodes_file_config(&cluster, "", None), &[]);
    let status = daemon.wait_status("three healthy nodes", READY, |s| {
        s.nodes.len() == 3 && s.nodes.iter().all(|n| n.state == TunnelState::Healthy)
    });

    let ip1 = cluster.node(1).ip;
    for name in [
        internal_dns.clone(),
        internal_dns.to_uppercase(),
        format!("{internal_dns}."),
        "node-1.example.com".to_string(),
        "NODE-1.Example.COM.".to_string(),
        "node-1.".to_string(),
    ] {
        assert_eq!(
            daemon.apiserver_echo(&format!("{name}:{ECHO_PORT}"), "dns"),
            format!("node=node-1 local={ip1} echo=dns"),
            "{name}"
        );
    }
    let ip3 = cluster.node(3).ip;
    assert_eq!(
        daemon.apiserver_echo(&format!("NODE-3.:{ECHO_PORT}"), "name"),
        format!("node=node-3 local={ip3} echo=name")
    );
    for name in ["shared.example.internal", "SHARED.example.internal."] {
        let (code, status) = daemon.apiserver_refusal(&format!("{name}:{ECHO_PORT}"));
        assert_eq!(code, 403, "{status}");
        assert!(status.contains("node-2, node-3"), "{status}");
    }
    assert_eq!(
        status.ambiguous_addresses,
        vec![tunneler::AmbiguousAddress {
            address: "shared.example.internal".into(),
            nodes: vec!["node-2".into(), "node-3".into()],
        }]
    );
    assert_eq!(
        common::metric_value(&daemon.metrics(), "tunneler_ambiguous_addresses", &[]),
        Some(1.0)
    );
}
