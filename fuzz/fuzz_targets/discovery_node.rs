//! One Node object (JSON bytes) through the discovery border: shape, then
//! per-node validation, then admission beside a fixed live node, then the
//! route table. Whatever the Node says, nothing that never names a node
//! may become routable, a pod CIDR must fit the cluster CIDR (or the
//! per-node size limit), and the live node keeps its routes.
#![no_main]

use std::net::IpAddr;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use tunneler::{canonical_ip, canonical_net, forbidden_address, forbidden_net};
use tunneler::NodeConfig;
use tunneler::candidate_from_value;
use tunneler::{admit, AdmitContext};
use tunneler::{Route, RouteTable};

fn live() -> NodeConfig {
    NodeConfig {
        name: "live".into(),
        address: "10.0.0.1".into(),
        port: 22,
        internal_ips: vec!["10.0.0.1".parse().unwrap()],
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        hostnames: Vec::new(),
        dns_names: Vec::new(),
        host_addresses: Vec::new(),
        kubelet_port: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let types = ["InternalIP".to_string(), "ExternalIP".to_string()];
    let cand = candidate_from_value(value, 0, &types, 22);
    if let Ok(n) = &cand.node {
        assert!(!n.internal_ips.is_empty());
        for ip in &n.internal_ips {
            assert_eq!(canonical_ip(*ip), *ip, "not canonical: {ip}");
            assert!(forbidden_address(*ip).is_none(), "accepted {ip}");
        }
        if let Ok(ip) = n.address.parse::<IpAddr>() {
            assert_eq!(canonical_ip(ip).to_string(), n.address);
            assert!(forbidden_address(ip).is_none(), "accepted address {ip}");
        }
        for c in &n.pod_cidrs {
            assert_eq!(canonical_net(*c), *c);
            assert!(forbidden_net(*c).is_none(), "accepted pod CIDR {c}");
        }
    }
    let services: Vec<IpNet> = vec!["10.96.0.0/16".parse().unwrap()];
    let live = vec![live()];
    for cluster in [Vec::new(), vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]] {
        let a = admit(
            vec![cand.clone()],
            &AdmitContext {
                current: &[],
                strict: &[],
                other_discovered: &live,
                service_cidrs: &services,
                cluster_cidrs: &cluster,
            },
        );
        assert!(a.nodes.len() + a.rejected.len() == 1);
        for n in &a.nodes {
            for c in &n.pod_cidrs {
                assert!(tunneler::check_pod_scope(*c, &cluster).is_ok());
            }
        }
        let all: Vec<&NodeConfig> = live.iter().chain(&a.nodes).collect();
        let table = RouteTable::build(all.iter().map(|n| (*n, n.name.clone())), &services);
        for bad in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "255.255.255.255", "224.0.0.1", "::1", "fe80::1", "200.1.1.1"] {
            assert_eq!(table.lookup(bad), Route::Forbidden, "{bad} routed");
        }
        // The live node keeps its pod range whatever the newcomer claims.
        match table.lookup("10.244.1.7") {
            Route::Node { node, .. } => assert_eq!(node, "live"),
            other => panic!("live pod range lost: {other:?}"),
        }
    }
});
