//! What operators and their tools see, checked against the running daemon
//! because that is what their dashboards, probes and scripts read:
//! Prometheus metrics after real traffic, `/healthz` and `/readyz`, JSON
//! logs, node discovery from a watched `kubectl get nodes -o json` file,
//! `status --watch` and shell completions.

use crate::common;
use common::TunnelState;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    all_output, find_node, free_tcp_port, metric_value, report, tunneler, tunneler_bin, Cluster,
    ConfigSpec, Daemon, Source, StatusDocument, ECHO_PORT,
};
use serde_json::Value;
use tunneler::SourceStatus;

const READY: Duration = Duration::from_secs(20);

fn curl(args: &[&str]) -> String {
    let out = common::run("curl", args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn want(m: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(m, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in /metrics:\n{m}"))
}

#[test]
fn metrics_after_real_traffic_on_the_admin_socket_and_a_tcp_listener() {
    require_netns!("metrics_after_real_traffic_on_the_admin_socket_and_a_tcp_listener");
    let cluster = Cluster::new(2);
    let port = free_tcp_port();
    let toml = cluster.config_toml(&ConfigSpec::default()).replace(
        "[admin]\n",
        &format!("[admin]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    let (n1, n2) = (cluster.node(1), cluster.node(2));

    // Real traffic: 5 good dials, one held open, and one of each failure.
    for k in 0..5 {
        let got = daemon.echo(&format!("{}:{ECHO_PORT}", n1.pod_ip), &format!("m{k}"));
        assert!(got.starts_with("node=node-1"), "{got}");
    }
    let (st, mut held) = daemon.connect(&format!("{}:{ECHO_PORT}", n1.ip));
    assert!(st.starts_with("HTTP/1.1 200"), "{st:?}");
    common::echo_over(&mut held, "held");
    let (st, _) = daemon.connect("192.0.2.1:80");
    assert!(st.starts_with("HTTP/1.1 403"), "{st:?}");
    let head = daemon.raw_request(b"CONNECT HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Port 1 on a pod address: dialed, refused by the node (a node's own
    // address would get 403 for a port outside node_ports).
    let (st, _) = daemon.connect(&format!("{}:1", n1.pod_ip));
    assert!(st.starts_with("HTTP/1.1 502"), "{st:?}");
    // A dial that hangs: 504 after dial_timeout (2 s).
    let hole = std::net::Ipv4Addr::from(u32::from(n1.pod_ip) + 1);
    cluster.blackhole(1, hole);
    let (st, _) = daemon.connect(&format!("{hole}:{ECHO_PORT}"));
    assert!(st.starts_with("HTTP/1.1 504"), "{st:?}");
    cluster.kill_sshd(2);
    daemon.wait_status("node-2 failing to reconnect", READY, |s| {
        find_node(s, "node-2").is_some_and(|n| n.state == TunnelState::Backoff)
    });
    let (st, _) = daemon.connect(&format!("{}:{ECHO_PORT}", n2.pod_ip));
    assert!(st.starts_with("HTTP/1.1 503"), "{st:?}");
    // Backoff starts when the session is lost; the refused reconnects follow.
    let refused = || {
        metric_value(
            &daemon.metrics(),
            "tunneler_ssh_tunnel_open_fail_total",
            &[("node", "node-2"), ("reason", "refused")],
        )
        .unwrap_or(0.0)
    };
    assert!(
        common::poll(READY, || refused() >= 1.0),
        "no refused reconnect of node-2 counted:\n{}",
        daemon.metrics()
    );
    daemon.wait_status("node-1 keepalive rtt", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.rtt_ms.is_some())
    });
    // Byte counters and the stream gauge are read at scrape time.
    daemon.wait_status("node-1 counters", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.active_streams == 1)
    });

    let admin = cluster.admin_socket();
    let m = curl(&[
        "-sS",
        "--fail",
        "--max-time",
        "10",
        "--unix-socket",
        admin.to_str().unwrap(),
        "http://localhost/metrics",
    ]);
    let n = |name| [("node", name)];
    assert_eq!(want(&m, "tunneler_tunnel_up", &n("node-1")), 1.0);
    assert_eq!(want(&m, "tunneler_tunnel_up", &n("node-2")), 0.0);
    assert!(want(&m, "tunneler_ssh_tunnel_open_total", &n("node-1")) >= 1.0);
    assert!(want(&m, "tunneler_ssh_tunnel_open_total", &n("node-2")) >= 1.0);
    for reason in ["timeout", "refused", "host_key", "auth", "other"] {
        want(
            &m,
            "tunneler_ssh_tunnel_open_fail_total",
            &[("node", "node-1"), ("reason", reason)],
        );
    }
    assert!(
        want(
            &m,
            "tunneler_ssh_tunnel_open_fail_total",
            &[("node", "node-2"), ("reason", "refused")]
        ) >= 1.0,
        "sshd of node-2 is down: connects are refused\n{m}"
    );
    assert!(want(&m, "tunneler_dials_total", &[("result", "ok")]) >= 6.0);
    for result in [
        "forbidden",
        "bad_request",
        "refused",
        "no_tunnel",
        "timeout",
    ] {
        assert!(
            want(&m, "tunneler_dials_total", &[("result", result)]) >= 1.0,
            "{result}"
        );
    }
    assert!(
        want(
            &m,
            "tunneler_dial_duration_seconds_count",
            &[("result", "ok")]
        ) >= 6.0
    );
    assert!(
        want(
            &m,
            "tunneler_dial_duration_seconds_sum",
            &[("result", "ok")]
        ) > 0.0
    );
    assert!(
        want(
            &m,
            "tunneler_dial_duration_seconds_bucket",
            &[("result", "ok"), ("le", "+Inf")]
        ) >= 6.0
    );
    let slow = want(
        &m,
        "tunneler_dial_duration_seconds_sum",
        &[("result", "timeout")],
    );
    assert!(slow >= 1.5, "a 2 s dial timeout recorded as {slow} s");
    assert_eq!(want(&m, "tunneler_active_streams", &n("node-1")), 1.0);
    assert!(
        want(
            &m,
            "tunneler_stream_bytes_total",
            &[("node", "node-1"), ("direction", "in")]
        ) > 0.0
    );
    assert!(
        want(
            &m,
            "tunneler_stream_bytes_total",
            &[("node", "node-1"), ("direction", "out")]
        ) > 0.0
    );
    let rtt = want(&m, "tunneler_keepalive_rtt_seconds", &n("node-1"));
    assert!((0.0..1.0).contains(&rtt), "rtt {rtt}");
    assert_eq!(want(&m, "tunneler_nodes", &[("state", "healthy")]), 1.0);
    let down: f64 = ["backoff", "connecting"]
        .iter()
        .map(|s| metric_value(&m, "tunneler_nodes", &[("state", s)]).unwrap_or(0.0))
        .sum();
    assert_eq!(down, 1.0, "{m}");
    for s in ["unhealthy", "draining", "rejected"] {
        assert_eq!(want(&m, "tunneler_nodes", &[("state", s)]), 0.0);
    }
    // No discovery source: present, 0 = never.
    assert_eq!(
        want(&m, "tunneler_discovery_last_success_timestamp_seconds", &[]),
        0.0
    );
    for line in m.lines().filter(|l| l.starts_with("# TYPE")) {
        assert!(line.contains(" tunneler_"), "foreign metric family: {line}");
    }

    // The same exposition on the TCP listener, and nothing else there.
    let tcp = curl(&[
        "-sS",
        "--fail",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/metrics"),
    ]);
    assert_eq!(want(&tcp, "tunneler_tunnel_up", &n("node-1")), 1.0);
    assert!(want(&tcp, "tunneler_dials_total", &[("result", "ok")]) >= 6.0);
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/v1/status"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    drop(held);
}

#[test]
fn readyz_goes_from_503_to_200_and_healthz_answers() {
    require_netns!("readyz_goes_from_503_to_200_and_healthz_answers");
    let cluster = Cluster::new(1);
    cluster.kill_sshd(1);
    let daemon = Daemon::start(&cluster);
    let (code, body) = daemon.admin("GET", "/healthz", None);
    assert_eq!(code, 200, "{body}");
    daemon.wait_status("a failed first attempt", READY, |s| {
        find_node(s, "node-1").is_some_and(|n| n.last_error.is_some())
    });
    let (code, body) = daemon.admin("GET", "/readyz", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("0 of 1"), "the reason says how many: {body}");

    cluster.start_sshd(1);
    let t = Instant::now();
    let mut last = (0, String::new());
    let ok = common::poll(READY, || {
        last = daemon.admin("GET", "/readyz", None);
        last.0 == 200
    });
    assert!(ok, "readyz never 200: {last:?}");
    report(&format!("readyz 200 {:?} after sshd came up", t.elapsed()));
    assert!(last.1.contains("1 of 1"), "{last:?}");
    let (code, _) = daemon.admin("GET", "/healthz", None);
    assert_eq!(code, 200);
}

#[test]
fn json_logs_are_one_object_per_line_with_span_fields() {
    require_netns!("json_logs_are_one_object_per_line_with_span_fields");
    let cluster = Cluster::new(1);
    let mut daemon = Daemon::start_toml(
        &cluster,
        &cluster.config_toml(&ConfigSpec::default()),
        &["--log-format", "json"],
    );
    daemon.wait_all_healthy(READY);
    let node = cluster.node(1);
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", node.pod_ip), "logged");
    assert!(got.starts_with("node=node-1"), "{got}");
    let (st, _) = daemon.connect(&format!("{}:1", node.pod_ip));
    assert!(st.starts_with("HTTP/1.1 502"), "{st:?}");
    let out = daemon.cli(&["nodes", "drain", "node-1"]);
    assert!(out.status.success(), "{}", all_output(&out));
    let exit = daemon.stop().expect("exit status");
    assert!(exit.success(), "{exit}");

    let log = std::fs::read_to_string(&daemon.log).unwrap();
    let mut lines = 0;
    let mut node_span = false;
    let mut stream_span = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
        let spans: Vec<&Value> = v["spans"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        node_span |= v["span"]["node"] == "node-1" || spans.iter().any(|s| s["node"] == "node-1");
        stream_span |= spans
            .iter()
            .copied()
            .chain([&v["span"]])
            .any(|s| s["stream"].is_number() && s["dst"].is_string());
    }
    assert!(lines >= 5, "only {lines} log lines");
    assert!(node_span, "no line carries the node span field:\n{log}");
    assert!(
        stream_span,
        "no line carries the stream span fields:\n{log}"
    );
    assert!(
        log.contains("\"audit\":true"),
        "the drain is an audit event:\n{log}"
    );
}

fn since(s: &StatusDocument, name: &str) -> String {
    find_node(s, name)
        .map(|n| n.since.clone())
        .unwrap_or_default()
}

/// The file source's record, once the status has one.
fn file_source(s: &StatusDocument) -> Option<SourceStatus> {
    s.sources.iter().find(|x| x.source == Source::File).cloned()
}

#[test]
fn nodes_file_is_reconciled_and_a_bad_file_keeps_the_last_good_set() {
    require_netns!("nodes_file_is_reconciled_and_a_bad_file_keeps_the_last_good_set");
    let cluster = Cluster::new(3);
    let file = cluster.dir.join("nodes.json");
    let (n2, n3) = (cluster.node(2), cluster.node(3));
    let list = |items: Vec<Value>| Cluster::k8s_node_list(items);
    std::fs::write(
        &file,
        list(vec![cluster.k8s_node_json(2, &[n2.pod_cidr.as_str()])]),
    )
    .unwrap();
    let daemon = Daemon::start_with(
        &cluster,
        &ConfigSpec {
            nodes: Some(vec![1]),
            extra: "\n[discovery]\nnodes_file = \"nodes.json\"\n".into(),
            ..ConfigSpec::default()
        },
    );
    let status = daemon.wait_all_healthy(READY);
    assert_eq!(
        find_node(&status, "node-1").unwrap().source,
        Some(Source::Config)
    );
    assert_eq!(
        find_node(&status, "node-2").unwrap().source,
        Some(Source::File),
        "{status:?}"
    );
    let src = file_source(&status).expect("file source in status");
    assert!(
        src.last_error.is_none() && src.last_success.is_some(),
        "{status:?}"
    );
    assert_eq!(src.nodes, 1, "{status:?}");
    for target in [
        format!("{}:{ECHO_PORT}", n2.pod_ip),
        format!("{}:{ECHO_PORT}", n2.ip),
        format!("node-2:{ECHO_PORT}"),
    ] {
        let got = daemon.echo(&target, "from-file");
        assert!(got.starts_with("node=node-2 "), "{target}: {got}");
    }
    let m = daemon.metrics();
    assert!(
        metric_value(&m, "tunneler_discovery_last_success_timestamp_seconds", &[])
            .is_some_and(|t| t > 1.7e9),
        "{m}"
    );
    // node-2's SSH session (its host-side TCP port) shows whether its
    // tunnel was replaced later on.
    let node2_session = cluster.ssh_session_ports(2);
    assert_eq!(node2_session.len(), 1, "{node2_session:?}");

    // Add node 3, by atomic replace; picked up soon (sanity bound below).
    cluster.replace_file(
        &file,
        &list(vec![
            cluster.k8s_node_json(2, &[n2.pod_cidr.as_str()]),
            cluster.k8s_node_json(3, &[]),
        ]),
    );
    let t = Instant::now();
    daemon.wait_status("node-3 added", READY, |s| find_node(s, "node-3").is_some());
    let took = t.elapsed();
    common::assert_within(
        "nodes_file: an added node showed up",
        took,
        Duration::from_secs(2),
    );
    daemon.wait_node_state("node-3", TunnelState::Healthy, READY);
    let got = daemon.echo(&format!("{}:{ECHO_PORT}", n3.ip), "added");
    assert!(got.starts_with("node=node-3 "), "{got}");
    let (st, _) = daemon.connect(&format!("{}:{ECHO_PORT}", n3.pod_ip));
    assert!(
        st.starts_with("HTTP/1.1 403"),
        "no pod CIDR listed yet: {st:?}"
    );

    // Change node 3: it gains its pod CIDRs (spec.podCIDRs).
    cluster.replace_file(
        &file,
        &list(vec![
            cluster.k8s_node_json(2, &[n2.pod_cidr.as_str()]),
            cluster.k8s_node_json(3, &[n3.pod_cidr.as_str(), n3.pod_cidr6.as_str()]),
        ]),
    );
    let t = Instant::now();
    let target = format!("{}:{ECHO_PORT}", n3.pod_ip);
    let routed = common::poll(READY, || {
        daemon.connect(&target).0.starts_with("HTTP/1.1 200")
    });
    assert!(routed, "changed node never routed its pod CIDR");
    common::assert_within(
        "nodes_file: a changed node routed its new pod CIDR",
        t.elapsed(),
        Duration::from_secs(5),
    );
    let got = daemon.echo(&target, "changed");
    assert!(got.starts_with("node=node-3 "), "{got}");
    daemon.wait_node_state("node-3", TunnelState::Healthy, READY);
    assert_eq!(
        cluster.ssh_session_ports(2),
        node2_session,
        "unchanged node-2 was replaced"
    );

    // Remove node 2.
    let (st, mut on2) = daemon.connect(&format!("{}:{ECHO_PORT}", n2.pod_ip));
    assert!(st.starts_with("HTTP/1.1 200"), "{st:?}");
    cluster.replace_file(
        &file,
        &list(vec![cluster.k8s_node_json(3, &[n3.pod_cidr.as_str()])]),
    );
    let t = Instant::now();
    daemon.wait_status("node-2 removed", READY, |s| {
        find_node(s, "node-2").is_none()
    });
    common::assert_within(
        "nodes_file: a removed node left the status",
        t.elapsed(),
        Duration::from_secs(5),
    );
    let (st, _) = daemon.connect(&format!("{}:{ECHO_PORT}", n2.pod_ip));
    assert!(st.starts_with("HTTP/1.1 403"), "{st:?}");
    // A stream it carried drains rather than being cut.
    let got = common::echo_over(&mut on2, "draining");
    assert!(got.starts_with("node=node-2 "), "{got}");
    drop(on2);
    let good = daemon.wait_node_state("node-3", TunnelState::Healthy, READY);

    // A file that is not a node list: the last good set stays, the error
    // shows in the status.
    let text = "{\"kind\": \"List\", \"items\": [";
    cluster.replace_file(&file, text);
    let s = daemon.wait_status("source error for invalid JSON", READY, |s| {
        file_source(s).is_some_and(|f| f.last_error.is_some())
    });
    let err = file_source(&s).unwrap().last_error.unwrap();
    report(&format!(
        "nodes_file with invalid JSON: last_error = {err:?}"
    ));
    assert!(err.contains("not a kubectl node list"), "{err}");
    assert_eq!(since(&s, "node-3"), since(&good, "node-3"));
    let out = daemon.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAILING"),
        "{}",
        all_output(&out)
    );
    // Bad Nodes in a good list: each is left out and reported by name;
    // node-3, live already, keeps its last good config.
    let bad: [(&str, String, &str, &str); 2] = [
        (
            "a bad pod CIDR",
            list(vec![cluster.k8s_node_json(3, &["10.201.0.0/33"])]),
            "node-3",
            "10.201.0.0/33",
        ),
        (
            "a name that is a static node",
            list(vec![
                cluster.k8s_node_json(3, &[n3.pod_cidr.as_str()]),
                cluster.k8s_node_json(1, &[]),
            ]),
            "node-1",
            "config or API node",
        ),
    ];
    for (what, text, name, reason) in &bad {
        cluster.replace_file(&file, text);
        let s = daemon.wait_status(&format!("{name} rejected for {what}"), READY, |s| {
            file_source(s).is_some_and(|f| f.rejected.iter().any(|x| x.name == *name))
        });
        let src = file_source(&s).unwrap();
        report(&format!(
            "nodes_file with {what}: rejected = {}",
            serde_json::to_string(&src.rejected).unwrap()
        ));
        assert!(src.last_error.is_none(), "{what}: {src:?}");
        let r = &src.rejected[0];
        assert!(r.reason.contains(reason), "{what}: {r:?}");
        let names_now: Vec<&str> = s.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names_now, vec!["node-1", "node-3"], "{what}");
        assert_eq!(
            find_node(&s, "node-1").unwrap().source,
            Some(Source::Config),
            "{what}"
        );
        assert_eq!(since(&s, "node-3"), since(&good, "node-3"), "{what}");
        let got = daemon.echo(&format!("{}:{ECHO_PORT}", n3.pod_ip), "kept");
        assert!(got.starts_with("node=node-3 "), "{what}: {got}");
        let out = daemon.cli(&["status"]);
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            table.contains(&format!("node \"{name}\" REJECTED")),
            "{what}: {}",
            all_output(&out)
        );
        // Back to the good file, which clears the report.
        cluster.replace_file(
            &file,
            &list(vec![cluster.k8s_node_json(3, &[n3.pod_cidr.as_str()])]),
        );
        daemon.wait_status("rejection cleared", READY, |s| {
            file_source(s).is_some_and(|f| f.last_error.is_none() && f.rejected.is_empty())
        });
    }
    let m = daemon.metrics();
    assert!(
        metric_value(&m, "tunneler_discovery_errors_total", &[]).is_some_and(|v| v >= 1.0),
        "{m}"
    );
    // A reload whose config names a node the file provides is refused.
    let good_config = std::fs::read_to_string(&daemon.config).unwrap();
    cluster.write_config(&ConfigSpec {
        nodes: Some(vec![1, 3]),
        extra: "\n[discovery]\nnodes_file = \"nodes.json\"\n".into(),
        ..ConfigSpec::default()
    });
    let out = daemon.cli(&["reload"]);
    let msg = all_output(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("node-3") && msg.contains("file"), "{msg}");
    let s = daemon.status();
    assert_eq!(
        find_node(&s, "node-3").unwrap().source,
        Some(Source::File),
        "{s:?}"
    );
    std::fs::write(&daemon.config, good_config).unwrap();

    // A missing file is a failing source too, not an empty node list.
    std::fs::remove_file(&file).unwrap();
    let s = daemon.wait_status("missing file error", READY, |s| {
        file_source(s).is_some_and(|f| f.last_error.is_some())
    });
    assert!(find_node(&s, "node-3").is_some(), "{s:?}");
}

#[test]
fn status_watch_redraws_and_completions_print() {
    for shell in ["bash", "zsh", "fish"] {
        let out = tunneler(&["completions", shell]);
        assert!(out.status.success(), "{}", all_output(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.len() > 200 && text.contains("tunneler"),
            "{shell}: {text}"
        );
    }
    require_netns!("status_watch_redraws_and_completions_print");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    // It redraws about once a second: wait (bounded) for two frames, then
    // end it with SIGINT as an operator's Ctrl-C would.
    let mut watch = common::ChildGuard::spawn(
        Command::new(tunneler_bin())
            .args(["status", "--watch", "--socket"])
            .arg(cluster.admin_socket())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    );
    let mut stdout = watch.child().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let two_frames = common::poll(READY, || {
        while let Ok(chunk) = rx.try_recv() {
            raw.extend_from_slice(&chunk);
        }
        // Two frame starts and the second one complete (the node row).
        let text = String::from_utf8_lossy(&raw);
        text.matches("\x1b[2J").count() >= 2
            && text
                .rsplit("\x1b[2J")
                .next()
                .is_some_and(|l| l.contains("node-1"))
    });
    common::run("kill", &["-INT", &watch.id().to_string()]);
    let out = watch.wait_exit(Duration::from_secs(10));
    assert!(out.is_some(), "status --watch did not stop on SIGINT");
    reader.join().unwrap();
    while let Ok(chunk) = rx.try_recv() {
        raw.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let frames = text.matches("\x1b[2J").count();
    assert!(two_frames && frames >= 2, "{frames} frame(s): {text:?}");
    let last = text.rsplit("\x1b[2J").next().unwrap_or_default();
    assert!(
        last.contains("NAME") && last.contains("node-1") && last.contains("healthy"),
        "{last:?}"
    );
}

/// `--log-format json` also holds when the daemon cannot start: log
/// shippers parse stderr line by line, so a plain-text line there is lost
/// or breaks the parser exactly when the message matters most.
#[test]
fn json_logs_stay_json_when_the_daemon_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    let out = tunneler(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", all_output(&out));
    std::fs::write(dir.path().join("known_hosts"), "").unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = dir.path().join("busy.toml");
    std::fs::write(
        &config,
        format!(
            "[ssh]\nuser = \"t\"\nidentity_file = \"id\"\nknown_hosts_file = \"known_hosts\"\n\
             [proxy]\nlisten = [\"tcp://{}\"]\n[admin]\nsocket = \"{}\"\n",
            busy.local_addr().unwrap(),
            dir.path().join("admin.sock").display()
        ),
    )
    .unwrap();
    let missing = dir.path().join("missing.toml");
    for (what, path) in [("missing config", &missing), ("port in use", &config)] {
        let out = common::ChildGuard::spawn(
            Command::new(tunneler_bin())
                .args(["run", "--log-format", "json", "--config"])
                .arg(path)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{what}: tunneler run kept running"));
        assert!(!out.status.success(), "{what}: {}", all_output(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.trim().is_empty(), "{what}: nothing on stderr");
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line:?}"));
            assert!(v["fields"]["message"].is_string(), "{what}: {line}");
        }
    }
    drop(busy);
}

/// Whether `pid` holds SIGHUP back or has a handler for it (from
/// /proc/PID/status): from then on a SIGHUP cannot end it.
fn takes_sighup(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let has_hup = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (libc::SIGHUP - 1)) != 0)
    };
    has_hup("SigBlk:") || has_hup("SigCgt:")
}

/// SIGHUP sent 0, 5, 20 and 50 ms after `tunneler run` starts (a
/// `systemctl reload` racing a start): the daemon runs on, comes up
/// healthy, and applies the reload once ready. Each delay is tried 3
/// times; before the handlers were installed first, 1 to 2 of 5 starts
/// died. The delays count from the spawn, except 0 ms, which is the moment
/// the process first takes the signal (held back from main's first
/// instruction): between exec and main the dynamic loader runs, and there
/// a signal's default action ends any program before its code can run.
#[test]
fn sighup_during_the_start_never_kills_the_daemon() {
    require_netns!("sighup_during_the_start_never_kills_the_daemon");
    let cluster = Cluster::new(1);
    let toml = cluster.config_toml(&ConfigSpec::default());
    for delay_ms in [0u64, 5, 20, 50] {
        for round in 0..3 {
            let mut d = Daemon::spawn_toml(&cluster, &toml, &[]);
            let spawned = Instant::now();
            let pid = d.pid();
            if delay_ms == 0 {
                let deadline = spawned + Duration::from_secs(5);
                while !takes_sighup(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_micros(50));
                }
                assert!(
                    takes_sighup(pid),
                    "the daemon never blocked or caught SIGHUP"
                );
            } else {
                std::thread::sleep(
                    (spawned + Duration::from_millis(delay_ms))
                        .saturating_duration_since(Instant::now()),
                );
            }
            let pid = i32::try_from(pid).unwrap();
            // SAFETY: kill(2) with a valid signal number on our own child.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
            d.wait_answering();
            d.wait_all_healthy(Duration::from_secs(20));
            let reloaded = common::poll(Duration::from_secs(10), || {
                d.log_tail(400).contains("SIGHUP received")
            });
            assert!(
                reloaded && d.is_running(),
                "SIGHUP at {delay_ms} ms (round {round}): running {}, log:\n{}",
                d.is_running(),
                d.log_tail(30)
            );
            let st = d.stop();
            assert!(
                st.is_some_and(|s| s.success()),
                "stop after SIGHUP at {delay_ms} ms: {st:?}"
            );
        }
        report(&format!(
            "SIGHUP {delay_ms} ms after start: survived 3 of 3"
        ));
    }
}
