//! Operations with the real Prometheus tools (Debian's `prometheus`
//! package): a Prometheus server scrapes the daemon's `metrics_listen` and
//! the test reads what arrived through Prometheus's HTTP API; `promtool`
//! lints our exposition, runs the alert rules' unit tests, and parses every
//! query of the Grafana dashboard. Every metric name the rules and the
//! dashboard use must be one the daemon exports.

use crate::common;
use common::TunnelState;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_tcp_port, metric_value, ChildGuard, Cluster, ConfigSpec, Daemon};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
const PROMTOOL: &str = "/usr/bin/promtool";
const PROMETHEUS: &str = "/usr/bin/prometheus";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// False (after [`common::skip`]) when Debian's prometheus package is not
/// installed; `.ci/run` installs it, and there the skip is a failure.
fn have_prometheus_tools(test: &str) -> bool {
    for tool in [PROMTOOL, PROMETHEUS] {
        if !Path::new(tool).exists() {
            common::skip(
                test,
                &format!("{tool} is missing (apt-get install prometheus)"),
            );
            return false;
        }
    }
    true
}

/// Runs promtool with `args` in `dir`, feeding `stdin`; (success, output).
fn promtool(dir: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(PROMTOOL)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn promtool {args:?}: {e}"));
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every PromQL expression of the dashboard, with Grafana's variables
/// replaced by values Prometheus accepts, and the panel titles.
fn dashboard() -> (Vec<String>, Vec<String>) {
    let path = repo("deploy/grafana/tunneler-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let d: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut exprs = Vec::new();
    let mut titles = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        titles.push(p["title"].as_str().unwrap_or_default().to_string());
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let e = t["expr"].as_str().expect("expr");
            exprs.push(
                e.replace("$__rate_interval", "5m")
                    .replace("$instance", ".*"),
            );
        }
    }
    (exprs, titles)
}

/// `tunneler_*` names a PromQL expression or rules file refers to.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tunneler_") {
        let start = i + at;
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        // Part of a longer identifier (e.g. a rule name): not a metric.
        if start > 0 && ident(bytes[start - 1]) {
            i = start + 1;
            continue;
        }
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        names.insert(text[start..end].to_string());
        i = end;
    }
    names
}

/// Sample names an exposition can carry, from its `# TYPE` lines.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in exposition.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(kind)) = (it.next(), it.next()) else {
            continue;
        };
        match kind {
            // OpenMetrics names the family, the classic format the sample.
            "counter" if name.ends_with("_total") => {
                names.insert(name.to_string());
            }
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn alert_rules_fire_and_stay_quiet() {
    if !have_prometheus_tools("alert_rules_fire_and_stay_quiet") {
        return;
    }
    let dir = repo("deploy/prometheus");
    let (ok, out) = promtool(&dir, &["check", "rules", "tunneler-rules.yaml"], None);
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
    // Each alert has a firing and a quiet case in the test file.
    let (ok, out) = promtool(&dir, &["test", "rules", "tunneler-rules.test.yaml"], None);
    assert!(ok, "promtool test rules:\n{out}");
    let rules = std::fs::read_to_string(dir.join("tunneler-rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("tunneler-rules.test.yaml")).unwrap();
    for alert in [
        "TunnelerNodeTunnelDown",
        "TunnelerDialFailureRatioHigh",
        "TunnelerHostKeyMismatch",
        "TunnelerDiscoveryFailing",
        "TunnelerNoHealthyNode",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
        let cases = tests.matches(&format!("alertname: {alert}")).count();
        assert!(
            cases >= 2,
            "{alert}: {cases} test case(s), want a firing and a quiet one"
        );
    }
}

#[test]
fn dashboard_queries_parse_and_cover_the_panels() {
    if !have_prometheus_tools("dashboard_queries_parse_and_cover_the_panels") {
        return;
    }
    let (exprs, titles) = dashboard();
    for want in [
        "Tunnels by state",
        "Dial latency p50 / p99",
        "Dial errors by reason",
        "Active streams",
        "Bytes per node",
        "Keepalive RTT",
        "Reconnects and failed connects",
    ] {
        assert!(
            titles.iter().any(|t| t == want),
            "no panel {want:?} in {titles:?}"
        );
    }
    // promtool parses PromQL in rule files: one recording rule per query.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        assert!(
            !metric_names(e).is_empty(),
            "query {e:?} names no tunneler metric"
        );
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    std::fs::write(dir.path().join("dashboard.yaml"), &rules).unwrap();
    let (ok, out) = promtool(dir.path(), &["check", "rules", "dashboard.yaml"], None);
    assert!(ok, "a dashboard query does not parse:\n{out}\n{rules}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

/// One instant query against Prometheus's HTTP API: the result vector.
fn query(prom: u16, q: &str) -> Vec<Value> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{prom}/api/v1/query"),
            "--data-urlencode",
            &format!("query={q}"),
        ])
        .output()
        .expect("curl");
    let v: Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    assert_eq!(v["status"], "success", "query {q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The single value of `q`, once Prometheus has one.
fn scalar(prom: u16, q: &str) -> Option<f64> {
    let r = query(prom, q);
    if r.len() != 1 {
        return None;
    }
    r[0]["value"][1].as_str()?.parse().ok()
}

/// Waits until Prometheus's value of `q` is `want`; panics with the last
/// value seen otherwise.
fn wait_value(prom: u16, q: &str, want: f64) {
    let mut last = None;
    let ok = common::poll(READY, || {
        last = scalar(prom, q);
        last == Some(want)
    });
    assert!(ok, "Prometheus: {q} = {last:?}, want {want}");
}

#[test]
fn a_real_prometheus_scrapes_the_daemon() {
    require_netns!("a_real_prometheus_scrapes_the_daemon");
    if !have_prometheus_tools("a_real_prometheus_scrapes_the_daemon") {
        return;
    }
    let cluster = Cluster::new(2);
    let port = free_tcp_port();
    let toml = cluster.config_toml(&ConfigSpec::default()).replace(
        "[admin]\n",
        &format!("[admin]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    let n1 = cluster.node(1);

    // Known traffic: 5 good dials to node-1 (one held open), one refused
    // with 403.
    for k in 0..4 {
        let got = daemon.echo(
            &format!("{}:{}", n1.pod_ip, common::ECHO_PORT),
            &format!("m{k}"),
        );
        assert!(got.starts_with("node=node-1"), "{got}");
    }
    let (st, mut held) = daemon.connect(&format!("{}:{}", n1.pod_ip, common::ECHO_PORT));
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    common::echo_over(&mut held, "held");
    let (st, _) = daemon.connect("192.0.2.1:80");
    assert!(st.starts_with("HTTP/1.1 403"), "{st}");

    // Our exposition passes promtool's linter, as scraped over TCP.
    let exposition = common::run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{port}/metrics"),
        ],
    );
    let exposition = String::from_utf8_lossy(&exposition.stdout).into_owned();
    let (ok, out) = promtool(Path::new("/"), &["check", "metrics"], Some(&exposition));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
    common::report(&format!(
        "promtool check metrics: exit 0, no findings ({} lines of exposition)",
        exposition.lines().count()
    ));

    // Asked for OpenMetrics (as Prometheus asks), the same families come in
    // that format.
    let om = common::run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            &format!("http://127.0.0.1:{port}/metrics"),
        ],
    );
    let om = String::from_utf8_lossy(&om.stdout).into_owned();
    assert!(om.ends_with("# EOF\n"), "not OpenMetrics:\n{om}");
    assert!(!exposition.contains("# EOF"), "classic format with # EOF");
    assert!(om.contains("# TYPE tunneler_dials counter"), "{om}");
    assert!(
        exposition.contains("# TYPE tunneler_dials_total counter"),
        "{exposition}"
    );
    assert_eq!(exported_names(&om), exported_names(&exposition));

    // The alert rules and the dashboard name only metrics we export.
    let exported = exported_names(&exposition);
    let rules = std::fs::read_to_string(repo("deploy/prometheus/tunneler-rules.yaml")).unwrap();
    let (exprs, _) = dashboard();
    for (what, text) in [("alert rules", rules), ("dashboard", exprs.join("\n"))] {
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{what}: no tunneler metric found");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} use metrics we do not export: {unknown:?}\nexported: {exported:?}"
        );
    }

    // A real Prometheus server scrapes metrics_listen every second.
    let prom = free_tcp_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tunneler\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = ChildGuard::spawn(
        Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    let up = common::poll(READY, || scalar(prom, "up{job=\"tunneler\"}") == Some(1.0));
    assert!(
        up,
        "Prometheus never scraped the daemon: {:?}\n{}",
        query(prom, "up"),
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );

    // Labels as Prometheus stores them: job and instance from the scrape,
    // node from us.
    let r = query(prom, "tunneler_tunnel_up");
    let mut nodes: Vec<String> = r
        .iter()
        .map(|s| {
            assert_eq!(s["metric"]["job"], "tunneler", "{s}");
            assert_eq!(s["metric"]["instance"], format!("127.0.0.1:{port}"), "{s}");
            assert_eq!(s["value"][1], "1", "{s}");
            s["metric"]["node"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2"], "{r:?}");

    // Dial counters and the histogram carry exactly the dials made.
    wait_value(prom, "tunneler_dials_total{result=\"ok\"}", 5.0);
    wait_value(prom, "tunneler_dials_total{result=\"forbidden\"}", 1.0);
    wait_value(
        prom,
        "tunneler_dial_duration_seconds_count{result=\"ok\"}",
        5.0,
    );
    wait_value(
        prom,
        "tunneler_dial_duration_seconds_bucket{result=\"ok\",le=\"+Inf\"}",
        5.0,
    );
    let p99 = scalar(
        prom,
        "histogram_quantile(0.99, sum by (le) (tunneler_dial_duration_seconds_bucket{result=\"ok\"}))",
    )
    .expect("dial p99");
    assert!(p99.is_finite() && p99 > 0.0 && p99 <= 25.0, "p99 {p99}");

    // Stream counters: the held stream, and the bytes the daemon counted.
    wait_value(prom, "tunneler_active_streams{node=\"node-1\"}", 1.0);
    wait_value(prom, "tunneler_active_streams{node=\"node-2\"}", 0.0);
    let direct = metric_value(
        &daemon.metrics(),
        "tunneler_stream_bytes_total",
        &[("node", "node-1"), ("direction", "out")],
    )
    .expect("bytes out");
    assert!(direct > 0.0, "no bytes counted for node-1");
    wait_value(
        prom,
        "tunneler_stream_bytes_total{node=\"node-1\",direction=\"out\"}",
        direct,
    );
    wait_value(
        prom,
        "tunneler_stream_bytes_total{node=\"node-2\",direction=\"out\"}",
        0.0,
    );
    drop(held);
    wait_value(prom, "tunneler_active_streams{node=\"node-1\"}", 0.0);

    // A node whose sshd dies: down, and one lost session counted.
    wait_value(prom, "tunneler_reconnects_total{node=\"node-2\"}", 0.0);
    cluster.kill_sshd(2);
    daemon.wait_status("node-2 down", READY, |s| {
        common::find_node(s, "node-2").is_some_and(|n| n.state != TunnelState::Healthy)
    });
    wait_value(prom, "tunneler_tunnel_up{node=\"node-2\"}", 0.0);
    wait_value(prom, "tunneler_reconnects_total{node=\"node-2\"}", 1.0);
    wait_value(prom, "tunneler_tunnel_up{node=\"node-1\"}", 1.0);
    wait_value(prom, "tunneler_reconnects_total{node=\"node-1\"}", 0.0);
    wait_value(prom, "tunneler_nodes{state=\"healthy\"}", 1.0);
    common::report("Prometheus 2.42 scraped tunneler: tunnel_up, dials, dial histogram, streams, bytes, reconnects and nodes arrived with the expected labels and values");
}

#[test]
fn metric_names_are_found_in_queries() {
    let got = metric_names(
        "sum by (le) (rate(tunneler_dial_duration_seconds_bucket{x=\"tunneler_y\"}[5m])) / on() TunnelerX_tunneler_no",
    );
    let want: BTreeSet<String> = ["tunneler_dial_duration_seconds_bucket", "tunneler_y"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
    let exported = exported_names(
        "# TYPE tunneler_dials counter\n# TYPE tunneler_d histogram\n# TYPE tunneler_up gauge\n# TYPE tunneler_c_total counter\n",
    );
    assert!(exported.contains("tunneler_c_total"));
    assert!(!exported.contains("tunneler_c_total_total"));
    assert!(exported.contains("tunneler_dials_total"));
    assert!(exported.contains("tunneler_d_bucket"));
    assert!(exported.contains("tunneler_up"));
    assert!(!exported.contains("tunneler_dials"));
}
