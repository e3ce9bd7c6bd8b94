//! The trust border of node discovery, against real sshd in namespaces and
//! a watched `kubectl get nodes -o json` file:
//! - a shared ExternalIP (ordinary NAT) is ambiguous: not routed by IP,
//!   reported once, and every node still joins and routes by name and pod
//!   CIDR; `::ffff:` spellings are the same address;
//! - a Node that claims loopback, link-local or half the Internet is left
//!   out and reported, and those destinations get 403 without a dial;
//! - a live Node that turns invalid keeps its last good routes until it is
//!   fixed (the fix applies) or deleted.

use crate::common;
use common::TunnelState;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{
    all_output, find_node, metric_value, node_names, report, Cluster, ConfigSpec, Daemon, Source,
    StatusDocument, ECHO_PORT,
};
use serde_json::{json, Value};
use tunneler::AmbiguousAddress;
use tunneler::SourceStatus;

const READY: Duration = Duration::from_secs(20);

/// The file source's record, once the status has one.
fn file_source(s: &StatusDocument) -> Option<SourceStatus> {
    s.sources.iter().find(|x| x.source == Source::File).cloned()
}

fn rejected_names(s: &StatusDocument) -> Vec<String> {
    file_source(s)
        .map(|f| f.rejected.into_iter().map(|x| x.name).collect())
        .unwrap_or_default()
}

fn names(s: &StatusDocument) -> Vec<String> {
    node_names(s)
}

/// Streams opened on all nodes since start: unchanged means nothing was
/// dialed through any tunnel.
fn total_streams(s: &StatusDocument) -> u64 {
    s.nodes.iter().map(|n| n.total_streams).sum()
}

/// CONNECT `target` and return the whole answer of a refused dial (status
/// line and body, which the proxy ends by closing), on one line.
/// Each target gets 403, and no stream opens on any tunnel for them.
fn assert_forbidden_without_a_dial(daemon: &Daemon, case: &str, targets: &[&str]) {
    let before = total_streams(&daemon.status());
    for target in targets {
        let answer = refused_answer(daemon, target);
        report(&format!("{case}: CONNECT {target} -> {answer}"));
        assert!(answer.starts_with("HTTP/1.1 403"), "{target}: {answer}");
    }
    assert_eq!(
        total_streams(&daemon.status()),
        before,
        "a refused dial opened a stream"
    );
}

fn refused_answer(daemon: &Daemon, target: &str) -> String {
    let mut s = UnixStream::connect(&daemon.egress).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    format!("{status} {body}").trim().to_string()
}

fn nodes_file_spec() -> ConfigSpec {
    ConfigSpec {
        nodes: Some(vec![]),
        extra: "\n[discovery]\nnodes_file = \"nodes.json\"\n".into(),
        ..ConfigSpec::default()
    }
}

fn with_address(mut node: Value, kind: &str, address: &str) -> Value {
    node["status"]["addresses"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "type": kind, "address": address }));
    node
}

#[test]
fn a_shared_external_ip_is_ambiguous_and_every_node_still_joins() {
    require_netns!("a_shared_external_ip_is_ambiguous_and_every_node_still_joins");
    let cluster = Cluster::new(3);
    let file = cluster.dir.join("nodes.json");
    let shared = "203.0.113.9";
    let node = |i: usize, ext: &str| {
        let n = cluster.node(i);
        with_address(
            cluster.k8s_node_json(i, &[n.pod_cidr.as_str()]),
            "ExternalIP",
            ext,
        )
    };
    std::fs::write(
        &file,
        Cluster::k8s_node_list(vec![node(1, shared), node(2, shared)]),
    )
    .unwrap();
    let daemon = Daemon::start_with(&cluster, &nodes_file_spec());
    daemon.wait_status("node-1 and node-2 healthy", READY, |s| {
        names(s) == ["node-1", "node-2"] && s.nodes.iter().all(|n| n.state == TunnelState::Healthy)
    });

    // node-3 joins later, spelling the shared address as IPv4-mapped IPv6.
    cluster.replace_file(
        &file,
        &Cluster::k8s_node_list(vec![
            node(1, shared),
            node(2, shared),
            node(3, &format!("::ffff:{shared}")),
        ]),
    );
    daemon.wait_node_state("node-3", TunnelState::Healthy, READY);
    let s = daemon.wait_all_healthy(READY);
    assert_eq!(names(&s), ["node-1", "node-2", "node-3"], "{s:?}");
    let src = file_source(&s).expect("file source in status");
    assert!(src.last_error.is_none(), "{src:?}");
    assert!(src.rejected.is_empty(), "{src:?}");
    assert_eq!(src.nodes, 3, "{src:?}");
    assert_eq!(
        s.ambiguous_addresses,
        vec![AmbiguousAddress {
            address: shared.to_string(),
            nodes: vec!["node-1".into(), "node-2".into(), "node-3".into()],
        }],
        "reported once, under its IPv4 spelling: {s:?}"
    );
    let m = daemon.metrics();
    assert_eq!(
        metric_value(&m, "tunneler_ambiguous_addresses", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "tunneler_discovery_rejected_nodes",
            &[("source", "file")]
        ),
        Some(0.0),
        "{m}"
    );
    let table = String::from_utf8_lossy(&daemon.cli(&["status"]).stdout).into_owned();
    assert!(
        table.contains(&format!(
            "address {shared} is AMBIGUOUS (claimed by node-1, node-2, node-3)"
        )),
        "{table}"
    );

    // The shared address is not routed by IP, however it is spelled, and
    // nothing is dialed for it.
    assert_forbidden_without_a_dial(
        &daemon,
        "case 1",
        &[
            &format!("{shared}:10250"),
            &format!("[::ffff:{shared}]:10250"),
        ],
    );

    // Every node still routes by name, by its own InternalIP and pod CIDR.
    for i in 1..=3 {
        let n = cluster.node(i);
        for target in [
            format!("node-{i}:{ECHO_PORT}"),
            format!("{}:{ECHO_PORT}", n.ip),
            format!("{}:{ECHO_PORT}", n.pod_ip),
        ] {
            let got = daemon.echo(&target, "nat");
            report(&format!(
                "case 1: CONNECT {target} -> 200, answered {got:?}"
            ));
            assert!(
                got.starts_with(&format!("node=node-{i} ")),
                "{target}: {got}"
            );
        }
    }

    // Config and API nodes stay strict, also against discovered ones, and
    // also when the address is spelled as IPv4-mapped IPv6.
    let n1 = cluster.node(1);
    let body = format!(r#"{{"name":"node-9","address":"::ffff:{}"}}"#, n1.ip);
    let (code, answer) = daemon.admin("POST", "/v1/nodes", Some(&body));
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer.contains(&format!(
            "{} is already an internal IP of discovered node \\\"node-1\\\"",
            n1.ip
        )) || answer.contains(&format!(
            "{} is already an internal IP of discovered node \"node-1\"",
            n1.ip
        )),
        "{answer}"
    );
    assert!(find_node(&daemon.status(), "node-9").is_none());
}

#[test]
fn a_node_that_claims_loopback_metadata_or_half_the_internet_is_rejected() {
    require_netns!("a_node_that_claims_loopback_metadata_or_half_the_internet_is_rejected");
    let cluster = Cluster::new(3);
    let file = cluster.dir.join("nodes.json");
    let evil = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": "evil" },
        "spec": { "podCIDR": "128.0.0.0/1", "podCIDRs": ["128.0.0.0/1"] },
        "status": { "addresses": [
            { "type": "InternalIP", "address": "127.0.0.1" },
            { "type": "ExternalIP", "address": "169.254.169.254" },
            { "type": "Hostname", "address": "evil" }
        ]}
    });
    let mut items: Vec<Value> = (1..=3)
        .map(|i| cluster.k8s_node_json(i, &[cluster.node(i).pod_cidr.as_str()]))
        .collect();
    items.push(evil);
    std::fs::write(&file, Cluster::k8s_node_list(items)).unwrap();
    let daemon = Daemon::start_with(&cluster, &nodes_file_spec());
    let s = daemon.wait_status("three healthy nodes and evil rejected", READY, |s| {
        names(s) == ["node-1", "node-2", "node-3"]
            && s.nodes.iter().all(|n| n.state == TunnelState::Healthy)
            && rejected_names(s) == ["evil"]
    });
    let src = file_source(&s).expect("file source in status");
    assert!(
        src.last_error.is_none(),
        "one bad Node is not a failing source: {src:?}"
    );
    let r = &src.rejected[0];
    report(&format!(
        "case 2: status sources[file].rejected = {}",
        serde_json::to_string(&src.rejected).unwrap()
    ));
    assert!(!r.kept, "{r:?}");
    assert!(r.reason.contains("127.0.0.1 is loopback"), "{r:?}");
    let m = daemon.metrics();
    assert_eq!(
        metric_value(
            &m,
            "tunneler_discovery_rejected_nodes",
            &[("source", "file")]
        ),
        Some(1.0),
        "{m}"
    );
    let forbidden = |m: &str| {
        metric_value(m, "tunneler_dials_total", &[("result", "forbidden")]).unwrap_or(0.0)
    };
    let forbidden_before = forbidden(&m);
    let out = daemon.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    report(&format!("case 2: tunneler status ->\n{table}"));
    assert!(
        table.contains(
            "discovery file: node \"evil\" REJECTED, not routed: address: 127.0.0.1 is loopback"
        ),
        "{}",
        all_output(&out)
    );

    // 403 without a dial: no stream opens on any tunnel.
    assert_forbidden_without_a_dial(
        &daemon,
        "case 2",
        &[
            "200.1.1.1:80",
            "169.254.169.254:80",
            "127.0.0.1:2379",
            "evil:10250",
        ],
    );
    assert_eq!(forbidden(&daemon.metrics()), forbidden_before + 4.0);

    // The other nodes keep working.
    for i in 1..=3 {
        let target = format!("{}:{ECHO_PORT}", cluster.node(i).pod_ip);
        let got = daemon.echo(&target, "still");
        report(&format!(
            "case 2: CONNECT {target} -> 200, answered {got:?}"
        ));
        assert!(
            got.starts_with(&format!("node=node-{i} ")),
            "{target}: {got}"
        );
    }
}

#[test]
fn a_node_that_turns_invalid_keeps_its_routes_until_fixed_or_deleted() {
    require_netns!("a_node_that_turns_invalid_keeps_its_routes_until_fixed_or_deleted");
    let cluster = Cluster::new(2);
    let file = cluster.dir.join("nodes.json");
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let good1 = cluster.k8s_node_json(1, &[n1.pod_cidr.as_str()]);
    let good2 = cluster.k8s_node_json(2, &[n2.pod_cidr.as_str()]);
    // The same Node, with a new host name alias, and (bad) half the Internet.
    let bad2 = with_address(
        cluster.k8s_node_json(2, &["128.0.0.0/1"]),
        "Hostname",
        "node-2-alias",
    );
    let fixed2 = with_address(good2.clone(), "Hostname", "node-2-alias");
    let list = |v: Vec<&Value>| Cluster::k8s_node_list(v.into_iter().cloned().collect());
    std::fs::write(&file, list(vec![&good1, &good2])).unwrap();
    let daemon = Daemon::start_with(&cluster, &nodes_file_spec());
    let good = daemon.wait_status("both healthy", READY, |s| {
        names(s) == ["node-1", "node-2"] && s.nodes.iter().all(|n| n.state == TunnelState::Healthy)
    });
    let since2 = find_node(&good, "node-2").unwrap().since.clone();
    let pod2 = format!("{}:{ECHO_PORT}", n2.pod_ip);

    // It turns invalid: kept at its last good config, reported, logged.
    cluster.replace_file(&file, &list(vec![&good1, &bad2]));
    let s = daemon.wait_status("node-2 rejected", READY, |s| {
        rejected_names(s) == ["node-2"]
    });
    let src = file_source(&s).expect("file source in status");
    let r = &src.rejected[0];
    assert!(r.kept, "{r:?}");
    assert!(r.reason.contains("128.0.0.0/1"), "{r:?}");
    assert_eq!(names(&s), ["node-1", "node-2"]);
    assert_eq!(
        find_node(&s, "node-2").unwrap().since,
        since2,
        "tunnel replaced: {s:?}"
    );
    let got = daemon.echo(&pod2, "kept");
    assert!(got.starts_with("node=node-2 "), "{got}");
    for target in ["200.1.1.1:80", "node-2-alias:7000"] {
        let answer = refused_answer(&daemon, target);
        assert!(answer.starts_with("HTTP/1.1 403"), "{target}: {answer}");
    }
    let logged = common::poll(READY, || {
        let log = daemon.log_tail(400);
        log.lines().any(|l| {
            l.contains("became invalid") && l.contains("node-2") && l.contains("128.0.0.0/1")
        })
    });
    assert!(logged, "no warning naming node-2:\n{}", daemon.log_tail(50));
    let table = String::from_utf8_lossy(&daemon.cli(&["status"]).stdout).into_owned();
    assert!(
        table.contains("node \"node-2\" REJECTED, keeping its last good config"),
        "{table}"
    );

    // Fixed: the fix applies (its new alias routes) and the report clears.
    cluster.replace_file(&file, &list(vec![&good1, &fixed2]));
    daemon.wait_status("node-2 fixed", READY, |s| {
        rejected_names(s).is_empty() && file_source(s).is_some()
    });
    daemon.wait_node_state("node-2", TunnelState::Healthy, READY);
    let got = daemon.echo(&format!("node-2-alias:{ECHO_PORT}"), "fixed");
    assert!(got.starts_with("node=node-2 "), "{got}");

    // Invalid again, then deleted: gone, routes and all.
    cluster.replace_file(&file, &list(vec![&good1, &bad2]));
    daemon.wait_status("node-2 rejected again", READY, |s| {
        rejected_names(s) == ["node-2"]
    });
    cluster.replace_file(&file, &list(vec![&good1]));
    let s = daemon.wait_status("node-2 deleted", READY, |s| {
        names(s) == ["node-1"] && rejected_names(s).is_empty()
    });
    assert!(
        file_source(&s).is_none_or(|f| f.last_error.is_none()),
        "{s:?}"
    );
    let answer = refused_answer(&daemon, &pod2);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", n1.pod_ip), "one");
    assert!(got.starts_with("node=node-1 "), "{got}");
}

/// Counts TCP connections to the host's own `127.0.0.1:22` while it lives,
/// dropping each at once. `None` when the port is taken (a real sshd).
struct LoopbackSshWatch {
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackSshWatch {
    fn start() -> Result<LoopbackSshWatch, String> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let l = std::net::TcpListener::bind("127.0.0.1:22")
            .map_err(|e| format!("cannot listen on 127.0.0.1:22 ({e}); something runs there"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        let count = std::sync::Arc::new(AtomicUsize::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, peer)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        eprintln!("127.0.0.1:22 accepted a connection from {peer}");
                        drop(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(LoopbackSshWatch {
            count,
            stop,
            thread: Some(thread),
        })
    }

    fn connections(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for LoopbackSshWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn forged_address_spellings_are_rejected_and_nothing_dials_loopback() {
    require_netns!("forged_address_spellings_are_rejected_and_nothing_dials_loopback");
    let watch = match LoopbackSshWatch::start() {
        Ok(w) => w,
        Err(why) => {
            common::skip(
                "forged_address_spellings_are_rejected_and_nothing_dials_loopback",
                &why,
            );
            return;
        }
    };
    let cluster = Cluster::new(1);
    let file = cluster.dir.join("nodes.json");
    // Each spelling glibc's resolver reads as 127.0.0.1 (or, the last ones,
    // as link-local and unspecified), with a second, valid InternalIP.
    let forged = [
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "localhost",
        "127.0.0.1.",
        "2852039166",
        "fe80::1%eth0",
        "0.0.0.0",
    ];
    let mut items = vec![cluster.k8s_node_json(1, &[cluster.node(1).pod_cidr.as_str()])];
    for (k, spelling) in forged.iter().enumerate() {
        items.push(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": format!("forged-{k}") },
            "status": { "addresses": [
                { "type": "InternalIP", "address": spelling },
                { "type": "InternalIP", "address": format!("10.203.250.{}", k + 1) },
            ]}
        }));
    }
    std::fs::write(&file, Cluster::k8s_node_list(items)).unwrap();
    let daemon = Daemon::start_with(&cluster, &nodes_file_spec());
    let want: Vec<String> = (0..forged.len()).map(|k| format!("forged-{k}")).collect();
    let s = daemon.wait_status(
        "node-1 healthy and every forged Node rejected",
        READY,
        |s| {
            names(s) == ["node-1"]
                && s.nodes.iter().all(|n| n.state == TunnelState::Healthy)
                && rejected_names(s) == want
        },
    );
    let src = file_source(&s).expect("file source in status");
    for (k, spelling) in forged.iter().enumerate() {
        let r = src
            .rejected
            .iter()
            .find(|r| r.name == format!("forged-{k}"))
            .unwrap();
        report(&format!("forged {spelling:?}: {}", r.reason));
        assert!(!r.kept, "{r:?}");
        assert!(
            r.reason.contains(&format!("{spelling:?}"))
                || r.reason.contains(&format!("{spelling} is")),
            "the reason names the address: {r:?}"
        );
    }
    // Give any dial a backoff round to happen.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        watch.connections(),
        0,
        "the daemon connected to this host's 127.0.0.1:22\n{}",
        daemon.log_tail(40)
    );
}

/// A Node object's own text with terminal escapes (its name) is shown
/// escaped: in `tunneler status`, in the status document and in the log.
#[test]
fn node_supplied_control_characters_are_shown_escaped() {
    require_netns!("node_supplied_control_characters_are_shown_escaped");
    let cluster = Cluster::new(1);
    let file = cluster.dir.join("nodes.json");
    let evil = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": "evil\u{1b}[2J\u{1b}]0;owned\u{7}" },
        "status": { "addresses": [{ "type": "InternalIP", "address": "10.203.251.1" }] }
    });
    let items = vec![
        cluster.k8s_node_json(1, &[cluster.node(1).pod_cidr.as_str()]),
        evil,
    ];
    std::fs::write(&file, Cluster::k8s_node_list(items)).unwrap();
    let daemon = Daemon::start_with(&cluster, &nodes_file_spec());
    let escaped = "evil\\u{1b}[2J\\u{1b}]0;owned\\u{7}";
    let s = daemon.wait_status("the escaped Node rejected", READY, |s| {
        rejected_names(s) == [escaped]
    });
    let raw = serde_json::to_string(&file_source(&s).unwrap().rejected).unwrap();
    assert!(!raw.contains("\\u001b"), "a raw ESC in the document: {raw}");
    let out = daemon.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    report(&format!("tunneler status ->\n{table}"));
    assert!(
        !table.contains('\u{1b}') && !table.contains('\u{7}'),
        "{table:?}"
    );
    assert!(
        table.contains(&format!("node \"{escaped}\" REJECTED")),
        "{table}"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(!log.contains('\u{1b}'), "a raw ESC in the log");
}
