//! CONNECT request parsing, then routing of the target: the allowlist must
//! never route a target that is not a node name, a node IP, a pod IP or a
//! service IP of the table below.
#![no_main]

use std::net::IpAddr;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use tunneler::NodeConfig;
use tunneler::{parse_authority, parse_head, Parsed, MAX_HEADER_BYTES};
use tunneler::{Route, RouteTable};

fn node(name: &str, ips: &[&str], pods: &[&str]) -> NodeConfig {
    NodeConfig {
        name: name.into(),
        address: ips[0].into(),
        port: 22,
        internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        pod_cidrs: pods.iter().map(|s| s.parse().unwrap()).collect(),
        hostnames: Vec::new(),
        dns_names: Vec::new(),
        host_addresses: Vec::new(),
        kubelet_port: None,
    }
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

fuzz_target!(|data: &[u8]| {
    let nodes = [
        node(
            "node-1",
            &["10.0.0.11", "fd00::11"],
            &["10.244.1.0/24", "fd10:1::/64"],
        ),
        node("node-2", &["10.0.0.12"], &["10.244.0.0/16"]),
        node("node-3", &["10.0.0.13"], &["10.244.3.128/25"]),
    ];
    let services: Vec<IpNet> = vec![
        "10.96.0.0/12".parse().unwrap(),
        "fd20::/108".parse().unwrap(),
    ];
    let table = RouteTable::build(nodes.iter().map(|n| (n, n.name.clone())), &services);

    let parsed = match parse_head(data) {
        Ok(p) => p,
        Err(_) => return,
    };
    let Parsed::Connect { target, len } = parsed else {
        assert!(data.len() < MAX_HEADER_BYTES);
        return;
    };
    assert!(len <= data.len());
    assert!(target.port != 0 && !target.host.is_empty());
    // The target prints back to the same authority.
    assert_eq!(parse_authority(&target.to_string()), Some(target.clone()));

    match table.lookup(&target.host) {
        Route::Forbidden => {}
        Route::Node {
            node: name, host, ..
        } => {
            let n = nodes.iter().find(|n| n.name == name).unwrap();
            let hip: IpAddr = host
                .parse()
                .expect("the channel host is always an IP literal");
            match target.host.parse::<IpAddr>() {
                Ok(ip) => {
                    let ip = canonical(ip);
                    assert_eq!(hip, ip);
                    assert!(
                        n.internal_ips.contains(&ip) || n.pod_cidrs.iter().any(|c| c.contains(&ip)),
                        "{ip} routed to {name}"
                    );
                }
                Err(_) => {
                    assert!(target.host.eq_ignore_ascii_case(&n.name));
                    assert_eq!(hip, n.internal_ips[0]);
                }
            }
        }
        Route::Pool { host } => {
            let ip: IpAddr = canonical(target.host.parse().expect("pool targets are IPs"));
            assert_eq!(host.parse::<IpAddr>().unwrap(), ip);
            assert!(services.iter().any(|s| s.contains(&ip)));
        }
    }
});
