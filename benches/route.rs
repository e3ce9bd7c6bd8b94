//! Route lookup cost with 10 000 nodes: every CONNECT does one lookup, so
//! it must stay lock-free and O(log n) or better as clusters grow. Run:
//! `cargo bench --bench route`.
//!
//! Node `k` has the name `node-k`, the internal IP 10.(k/250).(k%250).10
//! inside 10.0.0.0/8, and the pod CIDR 10.(128 + k/256).(k%256).0/24.
//! Services are 172.16.0.0/12.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use tunneler::NodeConfig;
use tunneler::{Route, RouteTable};

const NODES: u32 = 10_000;

fn node_ip(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, (k / 250) as u8, (k % 250) as u8, 10)
}

fn table() -> RouteTable<u32> {
    let nodes: Vec<NodeConfig> = (0..NODES)
        .map(|k| NodeConfig {
            name: format!("node-{k}"),
            address: node_ip(k).to_string(),
            port: 22,
            internal_ips: vec![IpAddr::V4(node_ip(k))],
            pod_cidrs: vec![format!("10.{}.{}.0/24", 128 + k / 256, k % 256)
                .parse()
                .unwrap()],
            hostnames: Vec::new(),
            dns_names: Vec::new(),
            host_addresses: Vec::new(),
            kubelet_port: None,
        })
        .collect();
    RouteTable::build(
        nodes.iter().enumerate().map(|(k, n)| (n, k as u32)),
        &["172.16.0.0/12".parse().unwrap()],
    )
}

fn lookups(c: &mut Criterion) {
    let t = table();
    let k = 7_777;
    let cases = [
        ("node_ip", node_ip(k).to_string()),
        ("node_name", format!("node-{k}")),
        ("pod_ip", format!("10.{}.{}.42", 128 + k / 256, k % 256)),
        ("service_ip", "172.20.1.1".to_string()),
        ("forbidden", "192.0.2.1".to_string()),
    ];
    // The table must answer the way the cases are named.
    assert!(matches!(t.lookup(&cases[0].1), Route::Node { node, .. } if node == k));
    assert!(matches!(t.lookup(&cases[1].1), Route::Node { node, .. } if node == k));
    assert!(matches!(t.lookup(&cases[2].1), Route::Node { node, .. } if node == k));
    assert!(matches!(t.lookup(&cases[3].1), Route::Pool { .. }));
    assert!(matches!(t.lookup(&cases[4].1), Route::Forbidden));
    let mut g = c.benchmark_group("route_lookup_10k_nodes");
    for (name, host) in &cases {
        g.bench_function(*name, |b| b.iter(|| t.lookup(black_box(host))));
    }
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
