//! Property tests (proptest) that run in `cargo test`:
//! - the route table answers exactly as a brute-force scan over the same
//!   random node set does;
//! - a validated config printed back to TOML parses to the same config.
//!
//! known_hosts pattern matching is checked against a reference matcher in
//! `src/ssh/known_hosts.rs` (it needs private functions).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use proptest::prelude::*;
use tunneler::{check_node_set, Config, HostKeyPolicy, ListenAddr, NodeConfig};
use tunneler::{Route, RouteTable};

// ---------------------------------------------------------------------------
// Route table vs brute force
// ---------------------------------------------------------------------------

/// Addresses from a small space so that random nodes, CIDRs and lookups
/// collide often: 10.0.x.y and fd00::x:y.
fn small_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..4, any::<u8>()).prop_map(|(x, y)| IpAddr::V4(Ipv4Addr::new(10, 0, x, y))),
        (0u16..4, 0u16..256)
            .prop_map(|(x, y)| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, x, y))),
    ]
}

fn small_net() -> impl Strategy<Value = IpNet> {
    (small_ip(), 0u8..=32).prop_map(|(ip, len)| match ip {
        IpAddr::V4(_) => IpNet::new(ip, 18 + len % 15).unwrap().trunc(),
        IpAddr::V6(_) => IpNet::new(ip, 112 + len % 17).unwrap().trunc(),
    })
}

fn raw_node(i: usize) -> impl Strategy<Value = NodeConfig> {
    (
        proptest::collection::vec(small_ip(), 1..3),
        proptest::collection::vec(small_net(), 0..3),
    )
        .prop_map(move |(ips, pods)| NodeConfig {
            name: format!("node-{i}"),
            address: ips[0].to_string(),
            port: 22,
            internal_ips: ips,
            pod_cidrs: pods,
            hostnames: Vec::new(),
            dns_names: Vec::new(),
            host_addresses: Vec::new(),
            kubelet_port: None,
        })
}

/// A valid node set: nodes are added while the set stays valid, as the
/// daemon's config validation and admin API guarantee.
fn node_set() -> impl Strategy<Value = (Vec<NodeConfig>, Vec<IpNet>)> {
    (
        proptest::collection::vec(small_net(), 0..2),
        (0usize..6).prop_flat_map(|n| (0..n).map(raw_node).collect::<Vec<_>>()),
    )
        .prop_map(|(services, candidates)| {
            let mut nodes: Vec<NodeConfig> = Vec::new();
            for c in candidates {
                nodes.push(c);
                if check_node_set(&nodes, &services).is_err() {
                    nodes.pop();
                }
            }
            (nodes, services)
        })
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The routing rules read straight off the module docs, by linear scan.
fn brute_force(nodes: &[NodeConfig], services: &[IpNet], host: &str) -> Route<String> {
    let Ok(ip) = host.parse::<IpAddr>() else {
        return nodes
            .iter()
            .find(|n| n.name.eq_ignore_ascii_case(host))
            .map(|n| Route::Node {
                node: n.name.clone(),
                host: n.internal_ips[0].to_string(),
                node_local: true,
            })
            .unwrap_or(Route::Forbidden);
    };
    let ip = canonical(ip);
    if let Some(n) = nodes.iter().find(|n| n.internal_ips.contains(&ip)) {
        return Route::Node {
            node: n.name.clone(),
            host: ip.to_string(),
            node_local: true,
        };
    }
    let mut best: Option<(u8, &NodeConfig)> = None;
    for n in nodes {
        for c in &n.pod_cidrs {
            if c.contains(&ip) && best.is_none_or(|(l, _)| c.prefix_len() > l) {
                best = Some((c.prefix_len(), n));
            }
        }
    }
    if let Some((_, n)) = best {
        return Route::Node {
            node: n.name.clone(),
            host: ip.to_string(),
            node_local: false,
        };
    }
    if services.iter().any(|s| s.contains(&ip)) {
        return Route::Pool {
            host: ip.to_string(),
        };
    }
    Route::Forbidden
}

fn lookup_host() -> impl Strategy<Value = String> {
    prop_oneof![
        small_ip().prop_map(|ip| ip.to_string()),
        // IPv4-mapped spellings must route like the IPv4 address.
        (0u8..4, any::<u8>()).prop_map(|(x, y)| format!("::ffff:10.0.{x}.{y}")),
        (0usize..7).prop_map(|i| format!("node-{i}")),
        (0usize..7).prop_map(|i| format!("NODE-{i}")),
        "[a-z0-9.-]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn route_lookup_equals_brute_force(
        (nodes, services) in node_set(),
        hosts in proptest::collection::vec(lookup_host(), 1..40),
    ) {
        let table = RouteTable::build(nodes.iter().map(|n| (n, n.name.clone())), &services);
        for h in &hosts {
            prop_assert_eq!(table.lookup(h), brute_force(&nodes, &services, h), "host {}", h);
        }
        // Every node's own addresses route to it.
        for n in &nodes {
            for ip in &n.internal_ips {
                prop_assert_eq!(
                    table.lookup(&ip.to_string()),
                    Route::Node { node: n.name.clone(), host: ip.to_string(), node_local: true }
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Config round trip
// ---------------------------------------------------------------------------

fn q(s: &str) -> String {
    format!("{s:?}")
}

fn ms(d: std::time::Duration) -> String {
    q(&format!("{}ms", d.as_millis()))
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    format!(
        "[{}]",
        items
            .into_iter()
            .map(|s| q(&s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Prints a validated config as TOML that states every setting of
/// `[ssh]`, `[reconnect]`, `[proxy]`, `[admin]` and `[[node]]` explicitly.
/// It does not print `[health]`, `[discovery]` or `[proxy.tls]`; the
/// generated configs leave those unset, and [`round_trip`] compares the
/// whole config, so nothing left out here can be lost unseen.
fn to_toml(c: &Config) -> String {
    let s = &c.ssh;
    let mut t = format!(
        "[ssh]\nuser = {}\nidentity_file = {}\nknown_hosts_file = {}\nport = {}\nconnect_timeout = {}\nkeepalive_interval = {}\nkeepalive_max = {}\nconnections_per_node = {}\nmax_connections_per_node = {}\nextra_session_idle = {}\nmax_concurrent_handshakes = {}\nhost_key_policy = {}\n",
        q(&s.user),
        q(&s.identity_file.display().to_string()),
        q(&s.known_hosts_file.display().to_string()),
        s.port,
        ms(s.connect_timeout),
        ms(s.keepalive_interval),
        s.keepalive_max,
        s.connections_per_node,
        s.max_connections_per_node,
        ms(s.extra_session_idle),
        s.max_concurrent_handshakes,
        q(match s.host_key_policy {
            HostKeyPolicy::Strict => "strict",
            HostKeyPolicy::AcceptNew => "accept-new",
        }),
    );
    for (k, v) in [
        ("passphrase_file", &s.passphrase_file),
        ("identity_agent", &s.identity_agent),
        ("certificate_file", &s.certificate_file),
    ] {
        if let Some(p) = v {
            t.push_str(&format!("{k} = {}\n", q(&p.display().to_string())));
        }
    }
    let r = &c.reconnect;
    t.push_str(&format!(
        "\n[reconnect]\ninitial_backoff = {}\nmax_backoff = {}\nstable_after = {}\n",
        ms(r.initial_backoff),
        ms(r.max_backoff),
        ms(r.stable_after)
    ));
    let p = &c.proxy;
    t.push_str(&format!(
        "\n[proxy]\nlisten = {}\nservice_cidrs = {}\ndial_timeout = {}\ndrain_timeout = {}\nhandshake_timeout = {}\nmax_pending_handshakes = {}\nmax_streams_per_node = {}\nnode_local_via_loopback = {}\n",
        list(p.listen.iter().map(|l| match l {
            ListenAddr::Unix(p) => format!("unix://{}", p.display()),
            ListenAddr::Tcp(a) => format!("tcp://{a}"),
        })),
        list(p.service_cidrs.iter().map(|c| c.to_string())),
        ms(p.dial_timeout),
        ms(p.drain_timeout),
        ms(p.handshake_timeout),
        p.max_pending_handshakes,
        p.max_streams_per_node,
        p.node_local_via_loopback,
    ));
    if let Some(g) = &p.socket_group {
        t.push_str(&format!("socket_group = {}\n", q(g)));
    }
    let a = &c.admin;
    t.push_str(&format!(
        "\n[admin]\nsocket = {}\nadmin_uids = [{}]\nready_min_healthy = {}\n",
        q(&a.socket.display().to_string()),
        a.admin_uids
            .iter()
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        a.ready_min_healthy,
    ));
    if let Some(g) = &a.socket_group {
        t.push_str(&format!("socket_group = {}\n", q(g)));
    }
    if let Some(m) = &a.metrics_listen {
        t.push_str(&format!("metrics_listen = {}\n", q(&m.to_string())));
    }
    for n in &c.nodes {
        t.push_str(&format!(
            "\n[[node]]\nname = {}\naddress = {}\nport = {}\ninternal_ips = {}\npod_cidrs = {}\nhostnames = {}\n",
            q(&n.name),
            q(&n.address),
            n.port,
            list(n.internal_ips.iter().map(|i| i.to_string())),
            list(n.pod_cidrs.iter().map(|c| c.to_string())),
            list(n.hostnames.iter().cloned()),
        ));
        if let Some(k) = n.kubelet_port {
            t.push_str(&format!("kubelet_port = {k}\n"));
        }
    }
    t
}

fn duration_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        (1u64..5000).prop_map(|n| format!("{n}ms")),
        (1u64..120).prop_map(|n| format!("{n}s")),
        (1u64..3).prop_map(|n| format!("{n}m")),
    ])
}

/// Settings beyond the basics, each present or not: (connections_per_node,
/// keepalive_max, max_streams_per_node, node_local_via_loopback,
/// ready_min_healthy, metrics_listen port, a node's kubelet_port).
type Extras = (
    Option<usize>,
    Option<usize>,
    Option<u64>,
    Option<bool>,
    Option<usize>,
    Option<u16>,
    Option<u16>,
);

fn extras() -> impl Strategy<Value = Extras> {
    (
        proptest::option::of(1usize..5),
        proptest::option::of(1usize..10),
        proptest::option::of(1u64..5000),
        proptest::option::of(any::<bool>()),
        proptest::option::of(0usize..4),
        proptest::option::of(1u16..),
        proptest::option::of(1u16..),
    )
}

fn config_text() -> impl Strategy<Value = String> {
    (
        "[a-z]{1,8}",
        proptest::option::of(1u16..),
        [
            duration_text(),
            duration_text(),
            duration_text(),
            duration_text(),
            duration_text(),
            duration_text(),
        ],
        proptest::option::of(prop_oneof![Just("strict"), Just("accept-new")]),
        proptest::option::of("[a-z]{1,6}"),
        node_set(),
        extras(),
    )
        .prop_map(|(user, port, d, policy, cert, (nodes, services), x)| {
            let mut t = format!(
                "[ssh]\nuser = {}\nidentity_file = \"keys/id\"\nknown_hosts_file = \"/kh\"\n",
                q(&user)
            );
            if let Some(p) = port {
                t.push_str(&format!("port = {p}\n"));
            }
            if let Some(v) = &d[0] {
                t.push_str(&format!("connect_timeout = {}\n", q(v)));
            }
            if let Some(p) = policy {
                t.push_str(&format!("host_key_policy = {}\n", q(p)));
            }
            if let Some(c) = cert {
                t.push_str(&format!("certificate_file = {}\n", q(&c)));
            }
            if let Some(v) = &d[4] {
                t.push_str(&format!("keepalive_interval = {}\n", q(v)));
            }
            if let Some(v) = x.0 {
                t.push_str(&format!("connections_per_node = {v}\n"));
            }
            if let Some(v) = x.1 {
                t.push_str(&format!("keepalive_max = {v}\n"));
            }
            t.push_str("\n[proxy]\n");
            t.push_str(&format!(
                "service_cidrs = {}\n",
                list(services.iter().map(|c| c.to_string()))
            ));
            if let Some(v) = &d[1] {
                t.push_str(&format!("dial_timeout = {}\n", q(v)));
            }
            if let Some(v) = &d[5] {
                t.push_str(&format!("drain_timeout = {}\n", q(v)));
            }
            if let Some(v) = x.2 {
                t.push_str(&format!("max_streams_per_node = {v}\n"));
            }
            if let Some(v) = x.3 {
                t.push_str(&format!("node_local_via_loopback = {v}\n"));
            }
            t.push_str("\n[admin]\n");
            if let Some(v) = x.4 {
                t.push_str(&format!("ready_min_healthy = {v}\n"));
            }
            if let Some(v) = x.5 {
                t.push_str(&format!("metrics_listen = \"127.0.0.1:{v}\"\n"));
            }
            t.push_str("\n[reconnect]\n");
            if let Some(v) = &d[2] {
                t.push_str(&format!("initial_backoff = {}\n", q(v)));
            }
            if let Some(v) = &d[3] {
                t.push_str(&format!("stable_after = {}\n", q(v)));
            }
            for (i, n) in nodes.iter().enumerate() {
                t.push_str(&format!(
                    "\n[[node]]\nname = {}\naddress = {}\ninternal_ips = {}\npod_cidrs = {}\n",
                    q(&n.name),
                    q(&n.address),
                    list(n.internal_ips.iter().map(|i| i.to_string())),
                    list(n.pod_cidrs.iter().map(|c| c.to_string())),
                ));
                if let (0, Some(k)) = (i, x.6) {
                    t.push_str(&format!("kubelet_port = {k}\n"));
                }
            }
            t
        })
}

/// The round trip itself: `Err` describes the first way printing and
/// parsing back changed the config.
fn round_trip(first: &Config) -> Result<(), TestCaseError> {
    let base = Path::new("/etc/tunneler");
    // What to_toml leaves out must be unset (the equality below would
    // catch it too; these say why).
    prop_assert!(first.health.is_none(), "to_toml does not print [health]");
    prop_assert!(
        first.proxy.tls.is_none(),
        "to_toml does not print [proxy.tls]"
    );
    let printed = to_toml(first);
    let second = Config::from_toml(&printed, base)
        .map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
    prop_assert_eq!(first, &second, "{}", printed);
    // And printing is stable.
    prop_assert_eq!(to_toml(&second), printed);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn config_round_trips_through_toml(text in config_text()) {
        // Random settings may be invalid (e.g. initial_backoff >
        // max_backoff); those are not round-trip cases. prop_assume! makes
        // proptest fail if too many are, so the property cannot pass on
        // nothing; known_valid_config_round_trips covers one fixed case.
        let first = Config::from_toml(&text, Path::new("/etc/tunneler"));
        prop_assume!(first.is_ok());
        round_trip(&first.unwrap())?;
    }
}

/// One config known to be valid, with a setting in every printed table, so
/// that the property above cannot pass by never getting past parsing.
#[test]
fn known_valid_config_round_trips() {
    let text = "[ssh]\nuser = \"tunnel\"\nidentity_file = \"keys/id\"\nknown_hosts_file = \"/kh\"\n\
        port = 2222\nconnect_timeout = \"3s\"\nkeepalive_interval = \"5s\"\nkeepalive_max = 4\n\
        connections_per_node = 2\nhost_key_policy = \"accept-new\"\n\n\
        [reconnect]\ninitial_backoff = \"200ms\"\nmax_backoff = \"20s\"\nstable_after = \"1m\"\n\n\
        [proxy]\nservice_cidrs = [\"10.96.0.0/16\"]\ndial_timeout = \"4s\"\ndrain_timeout = \"7s\"\n\
        max_streams_per_node = 77\nnode_local_via_loopback = true\n\n\
        [admin]\nready_min_healthy = 2\nmetrics_listen = \"127.0.0.1:9100\"\nadmin_uids = [1000]\n\n\
        [[node]]\nname = \"node-1\"\naddress = \"10.0.0.11\"\ninternal_ips = [\"10.0.0.11\"]\n\
        pod_cidrs = [\"10.244.1.0/24\"]\nkubelet_port = 10255\n";
    let first = Config::from_toml(text, Path::new("/etc/tunneler"))
        .unwrap_or_else(|e| panic!("the known-valid config was refused: {e}"));
    assert_eq!(first.proxy.max_streams_per_node, 77);
    assert_eq!(first.admin.admin_uids, vec![1000]);
    assert_eq!(first.nodes[0].kubelet_port, Some(10255));
    round_trip(&first).unwrap();
}

// ---------------------------------------------------------------------------
// No set of Nodes widens the allowlist
// ---------------------------------------------------------------------------

/// Addresses a Node might claim: ordinary ones that collide often, other
/// spellings of them, and every kind that never names a node.
fn claimed_address() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u8..3, 0u8..4).prop_map(|(x, y)| format!("10.0.{x}.{y}")),
        1 => (0u8..3, 0u8..4).prop_map(|(x, y)| format!("::ffff:10.0.{x}.{y}")),
        1 => any::<u32>().prop_map(|x| Ipv4Addr::from(x).to_string()),
        1 => prop_oneof![
            Just("127.0.0.1"), Just("127.9.9.9"), Just("::1"), Just("0.0.0.0"), Just("::"),
            Just("169.254.169.254"), Just("fe80::1"), Just("224.0.0.1"), Just("ff02::1"),
            Just("255.255.255.255"), Just("::ffff:127.0.0.1"), Just("::ffff:169.254.169.254"),
            Just("localhost"), Just("node-a.example"),
        ].prop_map(str::to_string),
    ]
}

/// Pod CIDRs a Node might claim: plausible ones, wide ones, and ones that
/// cover what never names a node.
fn claimed_cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0u8..4, 20u8..=28).prop_map(|(x, len)| {
            IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 244, x * 16, 0)), len).unwrap().trunc().to_string()
        }),
        2 => (any::<u32>(), 0u8..=32).prop_map(|(x, len)| {
            IpNet::new(IpAddr::V4(Ipv4Addr::from(x)), len).unwrap().trunc().to_string()
        }),
        1 => (any::<u128>(), 0u8..=128).prop_map(|(x, len)| {
            IpNet::new(IpAddr::V6(Ipv6Addr::from(x)), len).unwrap().trunc().to_string()
        }),
        1 => prop_oneof![
            Just("128.0.0.0/1"), Just("0.0.0.0/0"), Just("::/0"), Just("::ffff:0:0/96"),
            Just("::ffff:10.244.0.0/120"), Just("127.0.0.0/8"), Just("169.254.0.0/16"),
            Just("10.96.0.0/24"), Just("fd10::/64"), Just("10.244.0.1/24"),
            Just("127.0.0.0/24"), Just("169.254.169.0/24"),
        ].prop_map(str::to_string),
    ]
}

/// One Node object as JSON, as adversarial as a kubelet could write it.
fn k8s_node() -> impl Strategy<Value = serde_json::Value> {
    (
        prop_oneof![
            Just("n0"),
            Just("n1"),
            Just("n2"),
            Just("n3"),
            Just("n4"),
            Just("localhost")
        ],
        proptest::collection::vec(
            (
                prop_oneof![Just("InternalIP"), Just("ExternalIP"), Just("Hostname")],
                claimed_address(),
            ),
            0..4,
        ),
        proptest::collection::vec(claimed_cidr(), 0..3),
    )
        .prop_map(|(name, addrs, cidrs)| {
            let addresses: Vec<serde_json::Value> = addrs
                .into_iter()
                .map(|(t, a)| serde_json::json!({"type": t, "address": a}))
                .collect();
            serde_json::json!({
                "metadata": {"name": name},
                "spec": {"podCIDRs": cidrs},
                "status": {"addresses": addresses},
            })
        })
}

/// Loopback, unspecified, link-local, multicast or broadcast, by the
/// standard library's own predicates (a model apart from the code under
/// test).
fn never_a_node(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.octets()[0] == 0
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

fn destination() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..3, 0u8..4).prop_map(|(x, y)| IpAddr::V4(Ipv4Addr::new(10, 0, x, y))),
        (0u8..64, any::<u8>()).prop_map(|(x, y)| IpAddr::V4(Ipv4Addr::new(10, 244, x, y))),
        any::<u32>().prop_map(|x| IpAddr::V4(Ipv4Addr::from(x))),
        any::<u128>().prop_map(|x| IpAddr::V6(Ipv6Addr::from(x))),
        prop_oneof![
            Just("127.0.0.1"),
            Just("169.254.169.254"),
            Just("200.1.1.1"),
            Just("::1"),
            Just("0.0.0.0"),
            Just("255.255.255.255"),
            Just("10.96.0.1"),
            Just("fe80::1"),
        ]
        .prop_map(|s| s.parse().unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever Nodes two discovery rounds list, a destination that is not
    /// a node address, inside an admitted pod CIDR that fits the cluster
    /// CIDRs (or the per-node size limit), or inside a service CIDR is
    /// forbidden; and nothing routed to a node is ever loopback,
    /// unspecified, link-local, multicast or broadcast.
    #[test]
    fn no_set_of_nodes_widens_the_allowlist(
        round1 in proptest::collection::vec(k8s_node(), 0..6),
        round2 in proptest::collection::vec(k8s_node(), 0..6),
        with_cluster in any::<bool>(),
        dests in proptest::collection::vec(destination(), 1..60),
    ) {
        use tunneler::candidate_from_value;
        use tunneler::{admit, AdmitContext};

        let services: Vec<IpNet> = vec!["10.96.0.0/16".parse().unwrap()];
        let cluster: Vec<IpNet> = if with_cluster {
            vec!["10.244.0.0/18".parse().unwrap()]
        } else {
            Vec::new()
        };
        let types = vec!["InternalIP".to_string(), "ExternalIP".to_string()];
        let candidates = |round: &[serde_json::Value]| {
            round
                .iter()
                .enumerate()
                .map(|(i, v)| candidate_from_value(v.clone(), i, &types, 22))
                .collect::<Vec<_>>()
        };
        let cx = |current| AdmitContext {
            current,
            strict: &[],
            other_discovered: &[],
            service_cidrs: &services,
            cluster_cidrs: &cluster,
        };
        let first = admit(candidates(&round1), &cx(&[]));
        let second = admit(candidates(&round2), &cx(&first.nodes));
        let nodes = second.nodes;
        let table = RouteTable::build(nodes.iter().map(|n| (n, n.name.clone())), &services);

        let node_ips: Vec<IpAddr> = nodes.iter().flat_map(|n| n.internal_ips.iter().map(|ip| canonical(*ip))).collect();
        // The model of "fits": inside the cluster CIDR, or no wider than a
        // /22 (IPv4) or /56 (IPv6) without one.
        for n in &nodes {
            for c in &n.pod_cidrs {
                let fits = match (cluster.first(), c) {
                    (Some(cl), _) => cl.contains(c),
                    (None, IpNet::V4(_)) => c.prefix_len() >= 22,
                    (None, IpNet::V6(_)) => c.prefix_len() >= 56,
                };
                prop_assert!(fits, "{} admitted with {}", n.name, c);
            }
        }
        for d in dests {
            let allowed = node_ips.contains(&canonical(d))
                || nodes.iter().any(|n| n.pod_cidrs.iter().any(|c| c.contains(&canonical(d))))
                || services.iter().any(|s| s.contains(&canonical(d)));
            let got = table.lookup(&d.to_string());
            if !allowed {
                prop_assert_eq!(&got, &Route::Forbidden, "{} routed", d);
            }
            if let Route::Node { node, .. } = &got {
                prop_assert!(!never_a_node(d), "{} routed to {}", d, node);
                // Routed by exact IP only when one node claims it.
                let claimants = nodes.iter().filter(|n| n.internal_ips.iter().any(|ip| canonical(*ip) == canonical(d))).count();
                prop_assert!(claimants <= 1, "{} claimed by {} nodes but routed", d, claimants);
            }
        }
        prop_assert_eq!(table.lookup("localhost"), Route::Forbidden);
    }
}
