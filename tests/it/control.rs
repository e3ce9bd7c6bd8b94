//! Operators change nodes while traffic flows, and a change must never cost
//! a stream it was not aimed at: drain and undrain, make-before-break reconnect, remove and add, reload by command
//! and by SIGHUP, refused changes that change nothing, and a long-lived
//! stream on an untouched node that survives all of it.

use crate::common;
use common::TunnelState;

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{
    all_output, find_node, node_names, report, Cluster, ConfigSpec, Daemon, Source, StatusDocument,
    ECHO_PORT,
};
use tunneler::{DrainChanged, ReloadReport};

const READY: Duration = Duration::from_secs(20);

/// The node name in an echo answer (`node=<name> local=... echo=...`).
fn answered_by(answer: &str) -> &str {
    answer
        .strip_prefix("node=")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("")
}

/// `since` of node `name`.
fn since(status: &StatusDocument, name: &str) -> String {
    find_node(status, name)
        .unwrap_or_else(|| panic!("{name} missing from status: {status:?}"))
        .since
        .clone()
}

fn names(status: &StatusDocument) -> Vec<String> {
    node_names(status)
}

/// Opens a stream to `target` and checks one echo on it.
fn open_echo(daemon: &Daemon, target: &str, node: &str) -> UnixStream {
    let (status, mut s) = daemon.connect(target);
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "CONNECT {target}: {status:?}"
    );
    let got = common::echo_over(&mut s, "open");
    assert_eq!(answered_by(&got), node, "{got}");
    s
}

/// One more echo on a stream that must still work.
fn still_works(s: &mut UnixStream, node: &str, what: &str) {
    let got = common::echo_over(&mut *s, what);
    assert!(
        got.starts_with(&format!("node={node} ")) && got.ends_with(&format!("echo={what}")),
        "long-lived stream after {what}: {got:?}"
    );
}

fn cli_ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli(args);
    assert!(
        out.status.success(),
        "tunneler {args:?}: {}",
        all_output(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until node `name` has no open stream, so pool choices by load are
/// deterministic.
fn wait_streams(daemon: &Daemon, name: &str, n: u64) {
    daemon.wait_status(&format!("{name} with {n} stream(s)"), READY, |s| {
        find_node(s, name).is_some_and(|x| x.active_streams == n)
    });
}

#[test]
fn drain_takes_a_node_out_of_the_pool_while_its_streams_and_node_dials_go_on() {
    require_netns!("drain_takes_a_node_out_of_the_pool_while_its_streams_and_node_dials_go_on");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let anycast = format!("{}:{ECHO_PORT}", cluster.anycast_service_ip());

    // A stream on node 1 opened before the drain, and two held on node 2:
    // the pool picks the less loaded of two, so while node 1 is in the pool
    // every service dial goes to it, which makes "avoids it" meaningful.
    let mut long = open_echo(&daemon, &format!("{}:{ECHO_PORT}", n1.pod_ip), "node-1");
    let _load2: Vec<_> = (0..2)
        .map(|_| open_echo(&daemon, &format!("{}:{ECHO_PORT}", n2.pod_ip), "node-2"))
        .collect();
    wait_streams(&daemon, "node-1", 1);
    wait_streams(&daemon, "node-2", 2);
    let got = daemon.echo(&anycast, "pool-before");
    assert_eq!(
        answered_by(&got),
        "node-1",
        "pool prefers the idle node: {got}"
    );

    for (round, via_api) in [(1, false), (2, true)] {
        if via_api {
            let (code, body) = daemon.admin("POST", "/v1/nodes/node-1/drain", None);
            assert_eq!(code, 200, "{body}");
            let v: DrainChanged = serde_json::from_str(&body).unwrap();
            assert_eq!(v.state, "draining", "{v:?}");
        } else {
            let out = cli_ok(&daemon, &["nodes", "drain", "node-1"]);
            assert!(out.contains("draining"), "{out}");
        }
        let status =
            daemon.wait_node_state("node-1", TunnelState::Draining, Duration::from_secs(5));
        assert_eq!(
            find_node(&status, "node-2").unwrap().state,
            TunnelState::Healthy
        );

        // Pool dials avoid it, although it is the less loaded node.
        wait_streams(&daemon, "node-1", 1);
        for k in 0..8 {
            let got = daemon.echo(&anycast, &format!("r{round}-pool{k}"));
            assert_eq!(
                answered_by(&got),
                "node-2",
                "service dial while node-1 drains: {got}"
            );
        }
        // Node-addressed dials still go to it, by IP, pod IP and name.
        for target in [
            format!("{}:{ECHO_PORT}", n1.ip),
            format!("{}:{ECHO_PORT}", n1.pod_ip),
            format!("node-1:{ECHO_PORT}"),
        ] {
            let got = daemon.echo(&target, "direct");
            assert_eq!(answered_by(&got), "node-1", "{target}: {got}");
        }
        still_works(&mut long, "node-1", &format!("drained{round}"));

        if via_api {
            let (code, body) = daemon.admin("POST", "/v1/nodes/node-1/undrain", None);
            assert_eq!(code, 200, "{body}");
        } else {
            cli_ok(&daemon, &["nodes", "undrain", "node-1"]);
        }
        daemon.wait_node_state("node-1", TunnelState::Healthy, Duration::from_secs(5));
        for k in 0..3 {
            wait_streams(&daemon, "node-1", 1);
            let got = daemon.echo(&anycast, &format!("r{round}-back{k}"));
            assert_eq!(
                answered_by(&got),
                "node-1",
                "undrained node back in the pool: {got}"
            );
        }
        still_works(&mut long, "node-1", &format!("undrained{round}"));
    }

    // Unknown node: 404 and a non-zero exit, nothing changes.
    let (code, body) = daemon.admin("POST", "/v1/nodes/no-such-node/drain", None);
    assert_eq!(code, 404, "{body}");
    let out = daemon.cli(&["nodes", "drain", "no-such-node"]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
    assert!(
        all_output(&out).contains("no-such-node"),
        "{}",
        all_output(&out)
    );
    let status = daemon.status();
    assert!(
        status.nodes.iter().all(|n| n.state == TunnelState::Healthy),
        "{status:?}"
    );
}

#[test]
fn make_before_break_reconnect_keeps_open_streams() {
    require_netns!("make_before_break_reconnect_keeps_open_streams");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let n1 = cluster.node(1);
    let target = format!("{}:{ECHO_PORT}", n1.pod_ip);

    let mut long = open_echo(&daemon, &target, "node-1");
    assert!(
        common::poll(Duration::from_secs(5), || cluster.ssh_sessions_to(1) == 1),
        "one SSH session before the reconnect, saw {}",
        cluster.ssh_sessions_to(1)
    );
    let before = daemon.status();
    let reconnects_before = find_node(&before, "node-1").unwrap().reconnects;

    let t = Instant::now();
    cli_ok(&daemon, &["nodes", "reconnect", "node-1"]);
    report(&format!(
        "make-before-break reconnect of node-1 took {:?}",
        t.elapsed()
    ));

    // The stream opened before keeps working, new dials work.
    still_works(&mut long, "node-1", "after-reconnect");
    let got = daemon.echo(&target, "new-dial");
    assert_eq!(answered_by(&got), "node-1", "{got}");
    let status = daemon.status();
    let n = find_node(&status, "node-1").unwrap();
    assert_eq!(n.state, TunnelState::Healthy, "{n:?}");
    assert!(
        n.last_error.is_none(),
        "a planned reconnect is no error: {n:?}"
    );
    let reconnects = n.reconnects;
    // `reconnects` counts lost sessions; a planned replacement loses none,
    // and the state never left healthy, so `since` stays.
    assert_eq!(reconnects, reconnects_before, "{n:?}");
    assert_eq!(
        n.since,
        find_node(&before, "node-1").unwrap().since,
        "{n:?}"
    );

    // The new session was made before the old one broke: the old one stays
    // while it carries the long-lived stream, and closes once that ends.
    assert!(
        common::poll(Duration::from_secs(5), || cluster.ssh_sessions_to(1) == 2),
        "old and new SSH session while the old one drains, saw {}",
        cluster.ssh_sessions_to(1)
    );
    still_works(&mut long, "node-1", "while-old-drains");
    long.shutdown(Shutdown::Both).ok();
    drop(long);
    assert!(
        common::poll(READY, || cluster.ssh_sessions_to(1) == 1),
        "the drained old session was not closed, saw {}",
        cluster.ssh_sessions_to(1)
    );

    // The same through the HTTP API; and an unknown node is a 404.
    let mut long = open_echo(&daemon, &target, "node-1");
    let (code, body) = daemon.admin("POST", "/v1/nodes/node-1/reconnect", None);
    assert_eq!(code, 200, "{body}");
    still_works(&mut long, "node-1", "after-api-reconnect");
    let got = daemon.echo(&target, "new-dial-2");
    assert_eq!(answered_by(&got), "node-1", "{got}");
    let (code, body) = daemon.admin("POST", "/v1/nodes/ghost/reconnect", None);
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        find_node(&daemon.status(), "node-1").unwrap().state,
        TunnelState::Healthy
    );
}

#[test]
fn remove_then_add_again_and_refused_changes_change_nothing() {
    require_netns!("remove_then_add_again_and_refused_changes_change_nothing");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let (n1, n2) = (cluster.node(1), cluster.node(2));

    // A stream open at removal drains: it keeps flowing until it ends.
    let mut draining = open_echo(&daemon, &format!("{}:{ECHO_PORT}", n1.pod_ip), "node-1");
    cli_ok(&daemon, &["nodes", "remove", "node-1"]);
    let status = daemon.status();
    assert_eq!(names(&status), vec!["node-2".to_string()], "{status:?}");
    still_works(&mut draining, "node-1", "after-remove");
    assert_eq!(
        cluster.ssh_sessions_to(1),
        1,
        "closed before its stream ended"
    );
    drop(draining);
    // No longer routed at all: its addresses are outside every range now.
    for target in [
        format!("{}:{ECHO_PORT}", n1.ip),
        format!("{}:{ECHO_PORT}", n1.pod_ip),
        format!("node-1:{ECHO_PORT}"),
    ] {
        let (reply, _) = daemon.connect(&target);
        assert!(
            reply.starts_with("HTTP/1.1 403"),
            "{target} after remove: {reply}"
        );
    }
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", n2.pod_ip), "unaffected");
    assert_eq!(answered_by(&got), "node-2");
    // Without streams to drain, the tunnel closes promptly.
    assert!(
        common::poll(READY, || cluster.ssh_sessions_to(1) == 0),
        "removed node's session still open"
    );
    // Removing it again: 404, non-zero exit.
    let out = daemon.cli(&["nodes", "remove", "node-1"]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));

    let ip = n1.ip.to_string();
    cli_ok(
        &daemon,
        &[
            "nodes",
            "add",
            "node-1",
            "--address",
            &ip,
            "--pod-cidr",
            &n1.pod_cidr,
        ],
    );
    let status = daemon.wait_node_state("node-1", TunnelState::Healthy, READY);
    assert_eq!(
        find_node(&status, "node-1").unwrap().source,
        Some(Source::Api),
        "{status:?}"
    );
    for target in [
        format!("{}:{ECHO_PORT}", n1.ip),
        format!("{}:{ECHO_PORT}", n1.pod_ip),
        format!("node-1:{ECHO_PORT}"),
    ] {
        let got = daemon.echo(&target, "re-added");
        assert_eq!(answered_by(&got), "node-1", "{target}: {got}");
    }

    // Refused changes: a 4xx with a clear message, and nothing changes.
    let before = daemon.status();
    let out = daemon.cli(&["nodes", "add", "node-1", "--address", &ip]);
    let msg = all_output(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("node-1") && msg.contains("exists") && msg.contains("409"),
        "{msg}"
    );
    let (code, body) = daemon.admin(
        "POST",
        "/v1/nodes",
        Some(&format!(r#"{{"name":"node-2","address":"{}"}}"#, n2.ip)),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("node-2"), "{body}");

    let bad_cidr = format!("10.201.{}.300/28", cluster.n);
    let out = daemon.cli(&[
        "nodes",
        "add",
        "node-9",
        "--address",
        &format!("10.200.{}.99", cluster.n),
        "--pod-cidr",
        &bad_cidr,
    ]);
    let msg = all_output(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("400") && msg.contains("pod_cidrs"), "{msg}");
    assert!(
        msg.contains(&bad_cidr),
        "message should quote the bad CIDR: {msg}"
    );
    let (code, body) = daemon.admin(
        "POST",
        "/v1/nodes",
        Some(&format!(
            r#"{{"name":"node-9","address":"10.200.{}.99","pod_cidrs":["not-a-cidr"]}}"#,
            cluster.n
        )),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not-a-cidr"), "{body}");
    // A CIDR that overlaps node 2's: refused too.
    let (code, body) = daemon.admin(
        "POST",
        "/v1/nodes",
        Some(&format!(
            r#"{{"name":"node-9","address":"10.200.{}.99","pod_cidrs":["{}"]}}"#,
            cluster.n, n2.pod_cidr
        )),
    );
    assert!((400..500).contains(&code), "{code} {body}");
    let (code, body) = daemon.admin("POST", "/v1/nodes", Some("{not json"));
    assert_eq!(code, 400, "{body}");

    let after = daemon.status();
    assert_eq!(names(&after), names(&before), "{after:?}");
    for name in ["node-1", "node-2"] {
        assert_eq!(
            since(&after, name),
            since(&before, name),
            "{name} was touched"
        );
        assert_eq!(find_node(&after, name).unwrap().state, TunnelState::Healthy);
    }
    let (reply, _) = daemon.connect(&format!("10.200.{}.99:{ECHO_PORT}", cluster.n));
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
}

/// Rewrites the config to list `nodes` (and `extra`) and returns the path.
fn rewrite(cluster: &Cluster, nodes: &[usize], extra: &str) {
    cluster.write_config(&ConfigSpec {
        nodes: Some(nodes.to_vec()),
        extra: extra.to_string(),
        ..ConfigSpec::default()
    });
}

#[test]
fn reload_applies_only_the_difference_and_a_broken_reload_changes_nothing() {
    require_netns!("reload_applies_only_the_difference_and_a_broken_reload_changes_nothing");
    let cluster = Cluster::new(4);
    let daemon = Daemon::start_with(
        &cluster,
        &ConfigSpec {
            nodes: Some(vec![1, 2, 3]),
            ..ConfigSpec::default()
        },
    );
    daemon.wait_all_healthy(READY);
    let n4 = cluster.node(4);
    cli_ok(
        &daemon,
        &[
            "nodes",
            "add",
            "node-4",
            "--address",
            &n4.ip.to_string(),
            "--pod-cidr",
            &n4.pod_cidr,
        ],
    );
    let start = daemon.wait_all_healthy(READY);
    assert_eq!(names(&start).len(), 4, "{start:?}");
    // `since` has a resolution of one second: let it tick over once, so a
    // node that got reconnected would show a new value.
    let (status, mut long1) = daemon.connect(&format!("{}:{ECHO_PORT}", cluster.node(1).pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    std::thread::sleep(Duration::from_millis(1100));

    // `tunneler reload` dropping node 3.
    rewrite(&cluster, &[1, 2], "");
    let out = cli_ok(&daemon, &["reload"]);
    let report: ReloadReport = serde_json::from_str(out.trim()).expect("reload report json");
    assert_eq!(report.nodes.removed, vec!["node-3"], "{report:?}");
    assert!(report.nodes.added.is_empty(), "{report:?}");
    assert!(report.nodes.changed.is_empty(), "{report:?}");
    let status = daemon.status();
    assert_eq!(
        names(&status),
        vec!["node-1", "node-2", "node-4"],
        "{status:?}"
    );
    for name in ["node-1", "node-2", "node-4"] {
        assert_eq!(since(&status, name), since(&start, name), "{name} moved");
        assert_eq!(
            find_node(&status, name).unwrap().state,
            TunnelState::Healthy
        );
    }
    assert_eq!(
        find_node(&status, "node-4").unwrap().source,
        Some(Source::Api)
    );
    let (reply, _) = daemon.connect(&format!("{}:{ECHO_PORT}", cluster.node(3).pod_ip));
    assert!(
        reply.starts_with("HTTP/1.1 403"),
        "dropped node still routed: {reply}"
    );
    still_works(&mut long1, "node-1", "after-reload");
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", n4.pod_ip), "api-node");
    assert_eq!(answered_by(&got), "node-4");

    // SIGHUP dropping node 2 (and bringing node 3 back).
    rewrite(&cluster, &[1, 3], "");
    daemon.send_signal("HUP");
    let status = daemon.wait_status("SIGHUP applied", READY, |s| {
        names(s) == vec!["node-1", "node-3", "node-4"]
    });
    assert_eq!(since(&status, "node-1"), since(&start, "node-1"));
    assert_eq!(since(&status, "node-4"), since(&start, "node-4"));
    daemon.wait_node_state("node-3", TunnelState::Healthy, READY);
    still_works(&mut long1, "node-1", "after-sighup");
    let (reply, _) = daemon.connect(&format!("{}:{ECHO_PORT}", cluster.node(2).pod_ip));
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");

    // Broken reloads change nothing and say why.
    let before = daemon.status();
    let good = std::fs::read_to_string(&daemon.config).unwrap();
    let broken: [(&str, String, &[&str]); 3] = [
        (
            "invalid TOML",
            format!("{good}\n[[node]\nname = \"x\"\n"),
            // The parser's own words and the line at fault, not just the
            // "invalid config:" every config error starts with.
            &["TOML parse error", "[[node]"],
        ),
        (
            "invalid value",
            good.replace("dial_timeout = \"2s\"", "dial_timeout = \"2\""),
            &["proxy.dial_timeout"],
        ),
        (
            "overlapping pod CIDRs",
            format!(
                "{good}\n[[node]]\nname = \"node-x\"\naddress = \"10.200.{}.98\"\npod_cidrs = [\"{}\"]\n",
                cluster.n,
                cluster.node(1).pod_cidr
            ),
            &["pod_cidrs"],
        ),
    ];
    for (what, text, expect) in &broken {
        assert_ne!(text, &good, "{what}: the replacement did not apply");
        std::fs::write(&daemon.config, text).unwrap();
        let out = daemon.cli(&["reload"]);
        let msg = all_output(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {msg}");
        for e in expect.iter() {
            assert!(
                msg.contains(e),
                "{what}: message {msg:?} does not name {e:?}"
            );
        }
        // SIGHUP with the same file: logged, nothing changes.
        let rejected = || {
            std::fs::read_to_string(&daemon.log)
                .unwrap_or_default()
                .matches("reload rejected")
                .count()
        };
        let seen = rejected();
        daemon.send_signal("HUP");
        assert!(
            common::poll(READY, || rejected() > seen),
            "{what}: no 'reload rejected' in the log after SIGHUP\n{}",
            daemon.log_tail(20)
        );
        let after = daemon.status();
        assert_eq!(names(&after), names(&before), "{what}");
        for name in names(&before) {
            assert_eq!(
                since(&after, &name),
                since(&before, &name),
                "{what}: {name}"
            );
            assert_eq!(
                find_node(&after, &name).unwrap().state,
                TunnelState::Healthy,
                "{what}"
            );
        }
        // The running config still works: dial_timeout etc. unchanged.
        still_works(&mut long1, "node-1", "after-broken-reload");
    }
    std::fs::write(&daemon.config, &good).unwrap();
    let out = cli_ok(&daemon, &["reload"]);
    let r: ReloadReport = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r.nodes.unchanged, 2, "{r:?}");
    still_works(&mut long1, "node-1", "after-good-reload");
}

/// A stream on node 1, which nobody touches, carried through every change
/// and fault on the other nodes.
#[test]
fn a_stream_on_an_untouched_node_survives_every_change_to_the_others() {
    require_netns!("a_stream_on_an_untouched_node_survives_every_change_to_the_others");
    let cluster = Cluster::new(3);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let (n2, n3) = (cluster.node(2), cluster.node(3));
    let mut long = open_echo(
        &daemon,
        &format!("{}:{ECHO_PORT}", cluster.node(1).pod_ip),
        "node-1",
    );
    let start = daemon.status();
    let check = |long: &mut UnixStream, step: &str| {
        still_works(long, "node-1", step);
        let s = daemon.status();
        let n = find_node(&s, "node-1").unwrap();
        assert_eq!(n.state, TunnelState::Healthy, "after {step}: {n:?}");
        assert_eq!(since(&s, "node-1"), since(&start, "node-1"), "after {step}");
        assert_eq!(n.active_streams, 1, "after {step}: {n:?}");
    };

    cli_ok(&daemon, &["nodes", "drain", "node-2"]);
    daemon.wait_node_state("node-2", TunnelState::Draining, READY);
    check(&mut long, "drain-node-2");
    cli_ok(&daemon, &["nodes", "undrain", "node-2"]);
    check(&mut long, "undrain-node-2");

    cli_ok(&daemon, &["nodes", "reconnect", "node-3"]);
    check(&mut long, "reconnect-node-3");

    cli_ok(&daemon, &["nodes", "remove", "node-2"]);
    check(&mut long, "remove-node-2");
    cli_ok(
        &daemon,
        &[
            "nodes",
            "add",
            "node-2",
            "--address",
            &n2.ip.to_string(),
            "--pod-cidr",
            &n2.pod_cidr,
        ],
    );
    daemon.wait_node_state("node-2", TunnelState::Healthy, READY);
    check(&mut long, "add-node-2");

    rewrite(&cluster, &[1], "");
    cli_ok(&daemon, &["reload"]);
    let s = daemon.status();
    assert_eq!(
        names(&s),
        vec!["node-1", "node-2"],
        "api node-2 stays: {s:?}"
    );
    check(&mut long, "reload-dropping-node-3");
    rewrite(&cluster, &[1, 3], "");
    daemon.send_signal("HUP");
    daemon.wait_node_state("node-3", TunnelState::Healthy, READY);
    check(&mut long, "sighup-adding-node-3");

    cluster.kill_sshd(3);
    daemon.wait_node_unhealthy("node-3", READY);
    check(&mut long, "sshd-of-node-3-killed");
    cluster.start_sshd(3);
    daemon.wait_node_state("node-3", TunnelState::Healthy, READY);
    check(&mut long, "sshd-of-node-3-back");

    cluster.link_down(2);
    daemon.wait_node_unhealthy("node-2", READY);
    check(&mut long, "link-of-node-2-down");
    cluster.link_up(2);
    daemon.wait_node_state("node-2", TunnelState::Healthy, READY);
    check(&mut long, "link-of-node-2-up");

    cluster.replace_host_key(3);
    daemon.wait_node_state("node-3", TunnelState::Rejected, READY);
    check(&mut long, "host-key-of-node-3-changed");

    let got = daemon.echo(&format!("{}:{ECHO_PORT}", n2.pod_ip), "end");
    assert_eq!(answered_by(&got), "node-2");
    let _ = n3;
}

/// A reload that changes one node's settings replaces only that node: its
/// `since` moves and its new pod CIDR routes, a stream it carried drains
/// instead of being cut, and the other node is untouched.
#[test]
fn reload_replaces_a_changed_node_and_its_old_streams_drain() {
    require_netns!("reload_replaces_a_changed_node_and_its_old_streams_drain");
    let cluster = Cluster::new(2);
    let n1 = cluster.node(1);
    // Node 1 starts without its IPv4 pod CIDR.
    let base = cluster.config_toml(&ConfigSpec::default());
    let without = base.replacen(&format!("\"{}\", ", n1.pod_cidr), "", 1);
    assert_ne!(without, base, "pod CIDR line not found");
    let daemon = Daemon::start_toml(&cluster, &without, &[]);
    let start = daemon.wait_all_healthy(READY);
    let (reply, _) = daemon.connect(&format!("{}:{ECHO_PORT}", n1.pod_ip));
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let mut old = open_echo(&daemon, &format!("{}:{ECHO_PORT}", n1.ip), "node-1");
    std::thread::sleep(Duration::from_millis(1100)); // `since` has 1 s resolution

    std::fs::write(&daemon.config, &base).unwrap();
    let out = cli_ok(&daemon, &["reload"]);
    let r: ReloadReport = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r.nodes.changed, vec!["node-1"], "{r:?}");
    assert_eq!(r.nodes.unchanged, 1, "{r:?}");
    let status = daemon.wait_node_state("node-1", TunnelState::Healthy, READY);
    assert_ne!(
        since(&status, "node-1"),
        since(&start, "node-1"),
        "{status:?}"
    );
    assert_eq!(
        since(&status, "node-2"),
        since(&start, "node-2"),
        "{status:?}"
    );
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", n1.pod_ip), "new-cidr");
    assert_eq!(answered_by(&got), "node-1", "{got}");
    still_works(&mut old, "node-1", "replaced-session-drains");
}

/// Drain is the operator's intent: it holds across a reconnect, an sshd
/// restart and a reload that leaves the node unchanged.
#[test]
fn drain_survives_reconnects_and_reloads() {
    require_netns!("drain_survives_reconnects_and_reloads");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    cli_ok(&daemon, &["nodes", "drain", "node-1"]);
    daemon.wait_node_state("node-1", TunnelState::Draining, READY);

    cli_ok(&daemon, &["nodes", "reconnect", "node-1"]);
    let s = daemon.status();
    assert_eq!(
        find_node(&s, "node-1").unwrap().state,
        TunnelState::Draining,
        "after a planned reconnect: {s:?}"
    );
    cluster.kill_sshd(1);
    daemon.wait_status("node-1 down", READY, |s| {
        find_node(s, "node-1")
            .is_some_and(|n| n.state == TunnelState::Backoff || n.state == TunnelState::Connecting)
    });
    cluster.start_sshd(1);
    let s = daemon.wait_status("node-1 connected again", READY, |s| {
        find_node(s, "node-1")
            .is_some_and(|n| n.state == TunnelState::Draining || n.state == TunnelState::Healthy)
    });
    assert_eq!(
        find_node(&s, "node-1").unwrap().state,
        TunnelState::Draining,
        "after sshd came back: {s:?}"
    );
    cli_ok(&daemon, &["reload"]);
    let s = daemon.status();
    assert_eq!(
        find_node(&s, "node-1").unwrap().state,
        TunnelState::Draining,
        "after reload: {s:?}"
    );
    let anycast = format!("{}:{ECHO_PORT}", cluster.anycast_service_ip());
    for k in 0..4 {
        let got = daemon.echo(&anycast, &format!("p{k}"));
        assert_eq!(answered_by(&got), "node-2", "{got}");
    }
}

/// A removed node's metric series go with it and come back when it is
/// added again; `nodes add` takes `--port` and `--internal-ip`.
#[test]
fn removed_node_leaves_the_metrics_and_add_takes_port_and_internal_ips() {
    require_netns!("removed_node_leaves_the_metrics_and_add_takes_port_and_internal_ips");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let n1 = cluster.node(1);
    assert!(daemon.metrics().contains("node=\"node-1\""));
    cli_ok(&daemon, &["nodes", "remove", "node-1"]);
    let m = daemon.metrics();
    assert!(
        !m.contains("node=\"node-1\""),
        "removed node still in /metrics:\n{m}"
    );
    assert!(m.contains("node=\"node-2\""));

    // Re-added under another name, with the port and an extra internal IP
    // (its pod address, as a node with two addresses would have).
    let ip = n1.ip.to_string();
    let pod = n1.pod_ip.to_string();
    cli_ok(
        &daemon,
        &[
            "nodes",
            "add",
            "worker-a",
            "--address",
            &ip,
            "--port",
            "22",
            "--internal-ip",
            &ip,
            "--internal-ip",
            &pod,
        ],
    );
    let s = daemon.wait_node_state("worker-a", TunnelState::Healthy, READY);
    assert_eq!(
        find_node(&s, "worker-a").unwrap().address,
        format!("{ip}:22").as_str()
    );
    let got = daemon.echo(&format!("{pod}:{ECHO_PORT}"), "by-internal-ip");
    assert_eq!(got, format!("node=node-1 local={pod} echo=by-internal-ip"));
    // A dial by name goes to the first internal IP.
    let got = daemon.echo(&format!("worker-a:{ECHO_PORT}"), "by-name");
    assert_eq!(got, format!("node=node-1 local={ip} echo=by-name"));
    assert!(daemon.metrics().contains("node=\"worker-a\""));
    // A bad port is refused.
    let out = daemon.cli(&[
        "nodes",
        "add",
        "worker-b",
        "--address",
        "10.9.9.9",
        "--port",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
    assert!(find_node(&daemon.status(), "worker-b").is_none());
}

/// Dials keep succeeding while the node is reconnected (make-before-break)
/// again and again, and while a second node is drained and undrained: no
/// dial falls into the gap between two sessions or two pool states.
#[test]
fn dials_under_load_never_fail_across_planned_reconnects_and_drains() {
    require_netns!("dials_under_load_never_fail_across_planned_reconnects_and_drains");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let n1 = cluster.node(1);
    let anycast = cluster.anycast_service_ip();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (done, failures) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (daemon, stop) = (&daemon, &stop);
                scope.spawn(move || {
                    let mut done = 0u32;
                    let mut failures = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        let target = if w % 2 == 0 {
                            format!("{}:{ECHO_PORT}", n1.pod_ip)
                        } else {
                            format!("{anycast}:{ECHO_PORT}")
                        };
                        let (status, s) = daemon.connect(&target);
                        if !status.starts_with("HTTP/1.1 200") {
                            failures.push(format!("{target}: {status:?}"));
                            continue;
                        }
                        let got = common::echo_over(s, &format!("w{w}-{done}"));
                        if !got.ends_with(&format!("echo=w{w}-{done}")) {
                            failures.push(format!("{target}: answer {got:?}"));
                        }
                        done += 1;
                    }
                    (done, failures)
                })
            })
            .collect();
        for round in 0..3 {
            cli_ok(&daemon, &["nodes", "reconnect", "node-1"]);
            cli_ok(&daemon, &["nodes", "drain", "node-2"]);
            std::thread::sleep(Duration::from_millis(200)); // traffic meanwhile is the subject
            cli_ok(&daemon, &["nodes", "undrain", "node-2"]);
            cli_ok(&daemon, &["nodes", "drain", "node-1"]);
            std::thread::sleep(Duration::from_millis(200));
            cli_ok(&daemon, &["nodes", "undrain", "node-1"]);
            let s = daemon.status();
            assert!(
                s.nodes.iter().all(|n| n.state == TunnelState::Healthy),
                "round {round}: {s:?}"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut done = 0;
        let mut failures = Vec::new();
        for w in workers {
            let (d, f) = w.join().unwrap();
            done += d;
            failures.extend(f);
        }
        (done, failures)
    });
    report(&format!(
        "dials during 3 planned reconnects and 6 drain/undrain: {done} ok, {} failed",
        failures.len()
    ));
    assert!(done >= 20, "only {done} dials completed");
    assert!(failures.is_empty(), "failed dials: {failures:#?}");
}

/// Key rotation as docs/operations.md describes it: authorize the new key, point
/// the config at it and reload (sessions stay), reconnect make-before-break
/// (the new session logs in with the new key), then drop the old key.
#[test]
fn key_rotation_by_reload_and_reconnect() {
    require_netns!("key_rotation_by_reload_and_reconnect");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    let start = daemon.wait_all_healthy(READY);
    let old_pub = std::fs::read_to_string(cluster.dir.join("id_ed25519.pub")).unwrap();
    let new_key = cluster.dir.join("id_new");
    common::ssh_keygen(&new_key, "rotated");
    let new_pub = std::fs::read_to_string(cluster.dir.join("id_new.pub")).unwrap();
    cluster.set_authorized_keys(&format!("{}\n{}", old_pub.trim(), new_pub.trim()));
    let mut long = open_echo(
        &daemon,
        &format!("{}:{ECHO_PORT}", cluster.node(1).pod_ip),
        "node-1",
    );
    std::thread::sleep(Duration::from_millis(1100)); // `since` has 1 s resolution

    // A missing key file is refused and changes nothing.
    cluster.write_config(&ConfigSpec {
        identity_file: Some("id_missing".into()),
        ..ConfigSpec::default()
    });
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
    assert!(
        all_output(&out).contains("id_missing"),
        "{}",
        all_output(&out)
    );

    cluster.write_config(&ConfigSpec {
        identity_file: Some("id_new".into()),
        ..ConfigSpec::default()
    });
    cli_ok(&daemon, &["reload"]);
    let s = daemon.status();
    assert_eq!(
        since(&s, "node-1"),
        since(&start, "node-1"),
        "reload reconnected: {s:?}"
    );
    still_works(&mut long, "node-1", "after-reload");

    // Only the new key is authorized now; a reconnect must use it.
    cluster.set_authorized_keys(&new_pub);
    cli_ok(&daemon, &["nodes", "reconnect", "node-1"]);
    let s = daemon.wait_node_state("node-1", TunnelState::Healthy, READY);
    assert!(
        find_node(&s, "node-1").unwrap().last_error.is_none(),
        "{s:?}"
    );
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", cluster.node(1).ip), "new-key");
    assert_eq!(answered_by(&got), "node-1");
    still_works(&mut long, "node-1", "after-reconnect");
    let fp = common::run(
        "/usr/bin/ssh-keygen",
        &["-l", "-f", new_key.to_str().unwrap()],
    );
    let fp = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let log = std::fs::read_to_string(cluster.node(1).sshd_log()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("Accepted publickey") && l.contains(&fp)),
        "no login with the new key {fp} in the sshd log:\n{log}"
    );
}

/// Removing a node drains its streams for at most `proxy.drain_timeout`;
/// then the tunnel closes and so do the streams still on it.
#[test]
fn remove_closes_the_tunnel_after_the_drain_timeout() {
    require_netns!("remove_closes_the_tunnel_after_the_drain_timeout");
    let cluster = Cluster::new(2);
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "[proxy]\n",
        "[proxy]\ndrain_timeout = \"2s\"\n",
        1,
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    let mut s = open_echo(
        &daemon,
        &format!("{}:{ECHO_PORT}", cluster.node(1).pod_ip),
        "node-1",
    );
    // Seen before it must go, so the "0 sessions" below means something.
    assert_eq!(
        cluster.ssh_sessions_to(1),
        1,
        "session of node-1 before remove"
    );
    cli_ok(&daemon, &["nodes", "remove", "node-1"]);
    let t = Instant::now();
    still_works(&mut s, "node-1", "within-drain-timeout");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 64];
    let end = loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break "eof",
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(_) => break "still open",
        }
    };
    let took = t.elapsed();
    report(&format!(
        "drain_timeout 2s: the removed node's last stream ended ({end}) after {took:?}"
    ));
    assert_ne!(end, "still open", "stream outlived the drain timeout");
    assert!(
        took >= Duration::from_millis(1500),
        "ended after {took:?} with drain_timeout 2s"
    );
    common::assert_within(
        "the removed node's last stream ended, drain_timeout 2s",
        took,
        Duration::from_secs(10),
    );
    assert!(
        common::poll(READY, || cluster.ssh_sessions_to(1) == 0),
        "session of the removed node still open"
    );
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", cluster.node(2).pod_ip), "ok");
    assert_eq!(answered_by(&got), "node-2");
}
