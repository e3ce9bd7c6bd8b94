//! What an operator reads about each dial: one access record per stream on
//! every listener (with its client, route, node, session, bytes each way
//! and how it ended), one per refusal with its reason, and the live list
//! of streams (`tunneler streams`), which shows a stream that holds its
//! session while it does and forgets it once it ends.
//!
//! Real sshd on the nodes; the clients are Python sockets (plain, Unix and
//! `ssl` with a client certificate), as in tests/it/stream_ends.rs. The daemon
//! logs JSON, and every access line must be one JSON object without spans.

use crate::common;
use common::TunnelState;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

use common::pki::egress_pki;
use common::{all_output, free_tcp_port, report, Cluster, Daemon};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);

/// A CONNECT client: `client.py MODE ADDR TARGET OPTS_JSON`, MODE `unix`,
/// `tcp` or `tls`. Sends `send` bytes of the pattern `i % 251` (and
/// half-closes with `half_close`), waits `delay` seconds, then reads to
/// the end. Prints one JSON object: the status line, the bytes read and
/// how the read ended.
const CLIENT: &str = r#"
import json, socket, ssl, sys, time
mode, addr, target = sys.argv[1:4]
o = json.loads(sys.argv[4])
if mode == "unix":
    s = socket.socket(socket.AF_UNIX)
    s.connect(addr)
else:
    host, port = addr.rsplit(":", 1)
    s = socket.socket(socket.AF_INET)
    if o.get("rcvbuf"):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, o["rcvbuf"])
    s.connect((host, int(port)))
s.settimeout(o.get("timeout", 20))
if mode == "tls":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(o["ca"])
    ctx.load_cert_chain(o["cert"], o["key"])
    s = ctx.wrap_socket(s)
s.sendall(("CONNECT %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target).encode())
head = b""
while not head.endswith(b"\r\n\r\n"):
    c = s.recv(1)
    if not c:
        break
    head += c
status = head.split(b"\r\n")[0].decode()
if o.get("send"):
    s.sendall(bytes(i % 251 for i in range(o["send"])))
if o.get("half_close"):
    s.shutdown(socket.SHUT_WR)
if o.get("mark"):
    open(o["mark"], "w").write("waiting")
time.sleep(o.get("delay", 0))
n, end = 0, None
while True:
    try:
        b = s.recv(65536)
    except ConnectionResetError:
        end = "reset"; break
    except (ssl.SSLError, OSError) as e:
        end = "error: %r" % e; break
    if not b:
        end = "eof"; break
    n += len(b)
print(json.dumps({"status": status, "bytes": n, "end": end}))
"#;

/// A node-side server: `server.py PORT N`: sends N bytes of the pattern to
/// each client, then closes.
const SERVER: &str = r#"
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
data = bytes(i % 251 for i in range(n))
ls = socket.socket(socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", port))
ls.listen(64)
print("listening", flush=True)
def serve(c):
    c.sendall(data)
    c.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A cluster of `n` nodes and a daemon logging JSON, serving the Unix,
/// TCP and mTLS listeners.
struct Setup {
    cluster: Cluster,
    daemon: Daemon,
    tls_port: u16,
    client: PathBuf,
}

impl Setup {
    fn new(n: usize, proxy_extra: &str) -> Setup {
        let cluster = Cluster::new(n);
        let tls = cluster.dir.join("tls");
        egress_pki(&tls, "egress");
        let tls_port = free_tcp_port();
        let toml = cluster.config_toml(&common::ConfigSpec::default());
        let toml = toml.replacen("[proxy]\n", &format!("[proxy]\n{proxy_extra}\n"), 1);
        let toml = format!(
            "{toml}\n[proxy.tls]\nlisten = \"127.0.0.1:{tls_port}\"\n\
             cert_file = \"tls/server.pem\"\nkey_file = \"tls/server.key\"\n\
             client_ca_file = \"tls/ca.pem\"\n"
        );
        let daemon = Daemon::start_toml(&cluster, &toml, &["--log-format", "json"]);
        daemon.wait_all_healthy(READY);
        let client = cluster.dir.join("client.py");
        fs::write(&client, CLIENT).unwrap();
        Setup {
            cluster,
            daemon,
            tls_port,
            client,
        }
    }

    fn listener_addr(&self, listener: &str) -> String {
        match listener {
            "unix" => self.cluster.egress_socket().display().to_string(),
            "tcp" => self.daemon.tcp_listener().to_string(),
            _ => format!("127.0.0.1:{}", self.tls_port),
        }
    }

    /// Runs the client on `listener` (`unix`, `tcp` or `tls`) in the
    /// background.
    fn client(&self, listener: &str, target: &str, mut opts: Value) -> Child {
        let tls = self.cluster.dir.join("tls");
        for (k, f) in [
            ("ca", "ca.pem"),
            ("cert", "egress.pem"),
            ("key", "egress.key"),
        ] {
            opts[k] = Value::String(tls.join(f).display().to_string());
        }
        Command::new("python3")
            .arg(&self.client)
            .args([
                listener,
                &self.listener_addr(listener),
                target,
                &opts.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Starts the node-side server on node `i`, port `port`, sending `n`.
    fn serve(&self, i: usize, port: u16, n: usize) -> Child {
        let server = self.cluster.dir.join("server.py");
        fs::write(&server, SERVER).unwrap();
        let child = self.cluster.spawn_in_node(
            i,
            &format!("server-{port}.out"),
            "python3",
            &[server.to_str().unwrap(), &port.to_string(), &n.to_string()],
        );
        let ip = self.cluster.node(i).pod_ip.to_string();
        assert!(
            self.cluster
                .wait_listening_in_node(i, &ip, port, Duration::from_secs(10)),
            "the node-side server on port {port} did not start"
        );
        child
    }

    /// Every access record so far: the daemon's JSON lines whose target is
    /// `tunneler::access`. Any such line that is not one JSON object fails.
    fn records(&self) -> Vec<Value> {
        let log = fs::read_to_string(&self.daemon.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("tunneler::access"))
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("access line is not JSON ({e}): {l}"));
                v
            })
            .filter(|v| v["target"] == "tunneler::access")
            .map(|v| {
                // Shaped as every log line, with no span: the record's
                // fields, and the line's level, target and timestamp.
                assert!(v.get("span").is_none() && v.get("spans").is_none(), "{v}");
                let mut r = v["fields"].clone();
                for k in ["level", "target", "timestamp"] {
                    r[k] = v[k].clone();
                }
                r
            })
            .collect()
    }

    /// Waits for `n` records in all and returns them.
    fn wait_records(&self, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        common::poll(Duration::from_secs(10), || {
            got = self.records();
            got.len() >= n
        });
        got
    }

    /// `tunneler streams --json` on the daemon's admin socket.
    fn streams(&self, args: &[&str]) -> Value {
        let mut all = vec!["streams", "--json"];
        all.extend_from_slice(args);
        let out = self.daemon.cli(&all);
        assert!(out.status.success(), "{}", all_output(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("streams --json ({e}): {}", all_output(&out)))
    }
}

/// The client's verdict.
fn outcome(out: Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("client output {e}: {}", all_output(&out)))
}

/// Waits (bounded) for a client and returns its verdict.
fn finish(child: Child) -> Value {
    let guard = common::ChildGuard::from(child);
    let out = guard
        .wait_exit(Duration::from_secs(60))
        .expect("the client did not finish within 60 s");
    outcome(out)
}

/// The one record of `stream`.
fn only<'a>(records: &'a [Value], what: &str, pick: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&Value> = records.iter().filter(|r| pick(r)).collect();
    assert_eq!(found.len(), 1, "{what}: want one record, got {found:#?}");
    found[0]
}

/// Five streams over the three listeners, each ended by the node: one
/// record each, no more, with its listener and client identity (uid on
/// Unix, the certificate's name on mTLS, the address on TCP), route,
/// node, session, status 200, the exact bytes each way and `node_closed`.
#[test]
fn every_stream_gets_one_access_record_on_each_listener() {
    require_netns!("every_stream_gets_one_access_record_on_each_listener");
    let s = Setup::new(1, "");
    let node = s.cluster.node(1);
    const N: usize = 3 << 20;
    let _server = common::ChildGuard::from(s.serve(1, 7100, N));
    let download = format!("{}:7100", node.pod_ip);
    let echo = format!("{}:{}", node.pod_ip, common::RAW_ECHO_PORT);
    const M: usize = 1 << 20;
    // (listener, target, bytes to send, bytes the node sends back)
    let cases = [
        ("unix", &download, 0, N),
        ("tcp", &download, 0, N),
        ("tls", &download, 0, N),
        ("unix", &echo, M, M),
        ("tcp", &echo, M, M),
    ];
    for (i, (l, target, send, back)) in cases.iter().enumerate() {
        let opts = serde_json::json!({"send": send, "half_close": *send > 0});
        let v = finish(s.client(l, target, opts));
        report(&format!("{l} {target}: {v}"));
        assert_eq!(v["status"], "HTTP/1.1 200 Connection established", "{l}");
        assert_eq!(v["bytes"], *back, "{l}: {v}");
        // Each record is written when its stream ends: one more each time.
        let records = s.wait_records(i + 1);
        assert_eq!(records.len(), i + 1, "{records:#?}");
        let r = &records[i];
        let log = fs::read_to_string(&s.daemon.log).unwrap_or_default();
        let raw = log.lines().rfind(|l| l.contains("tunneler::access"));
        report(&format!("access line: {}", raw.unwrap_or_default()));
        assert_eq!(r["level"], "INFO");
        assert_eq!(r["message"], "access");
        assert_eq!(r["target"], "tunneler::access");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["route"], "pod", "{r}");
        assert_eq!(r["node"], node.name.as_str(), "{r}");
        assert_eq!(r["end"], "node_closed", "{r}");
        assert_eq!(r["bytes_to_client"], *back, "{r}");
        assert_eq!(r["bytes_to_node"], *send, "{r}");
        assert!(r["session"].as_u64().is_some_and(|n| n >= 1), "{r}");
        assert!(r["stream"].as_u64().is_some(), "{r}");
        assert_eq!(r["dst"], target.as_str(), "{r}");
        let connect = r["connect_ms"].as_f64().expect("connect_ms");
        let total = r["duration_ms"].as_f64().expect("duration_ms");
        assert!(connect > 0.0 && total >= connect, "{r}");
        assert_eq!(r["held_ms"].as_f64(), Some(0.0), "{r}");
        assert!(r.get("reason").is_none(), "{r}");
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
        match *l {
            "unix" => {
                assert_eq!(r["client_uid"], 0, "{r}");
                assert!(r.get("client_addr").is_none(), "{r}");
                let url = format!("unix://{}", s.cluster.egress_socket().display());
                assert_eq!(r["listener"], url.as_str(), "{r}");
            }
            "tcp" => {
                assert!(
                    r["client_addr"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("127.0.0.1:")),
                    "{r}"
                );
                assert!(r.get("client_uid").is_none() && r.get("client_cert").is_none());
                let url = format!("tcp://{}", s.daemon.tcp_listener());
                assert_eq!(r["listener"], url.as_str(), "{r}");
            }
            _ => {
                assert_eq!(r["client_cert"], "kube-apiserver-egress", "{r}");
                assert!(r["client_addr"].as_str().is_some(), "{r}");
                let url = format!("tls://127.0.0.1:{}", s.tls_port);
                assert_eq!(r["listener"], url.as_str(), "{r}");
            }
        }
    }
    // One record per stream: five distinct stream ids.
    let records = s.records();
    let mut ids: Vec<u64> = records
        .iter()
        .filter_map(|r| r["stream"].as_u64())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        cases.len(),
        "one record per stream: {records:#?}"
    );
    // The per-node histograms saw the same five streams and bytes.
    let m = s.daemon.metrics();
    let node_label = [("node", node.name.as_str())];
    let v = |name: &str| common::metric_value(&m, name, &node_label);
    assert_eq!(
        v("tunneler_stream_duration_seconds_count"),
        Some(5.0),
        "{m}"
    );
    assert_eq!(v("tunneler_stream_to_client_bytes_count"), Some(5.0), "{m}");
    let to_client = (3 * N + 2 * M) as f64;
    assert_eq!(
        v("tunneler_stream_to_client_bytes_sum"),
        Some(to_client),
        "{m}"
    );
    assert_eq!(
        v("tunneler_stream_to_node_bytes_sum"),
        Some((2 * M) as f64),
        "{m}"
    );
    let secs = v("tunneler_stream_duration_seconds_sum").unwrap_or_default();
    let logged: f64 = records
        .iter()
        .filter_map(|r| r["duration_ms"].as_f64())
        .sum();
    assert!(
        (secs * 1000.0 - logged).abs() < 50.0,
        "{secs} s vs {logged} ms"
    );
}

/// One record per refusal, written at once, with its status and reason:
/// 403 for an address no route allows, 504 for a dial that hangs past
/// dial_timeout, 503 for a node whose sshd is gone.
#[test]
fn each_refusal_gets_one_access_record_with_its_reason() {
    require_netns!("each_refusal_gets_one_access_record_with_its_reason");
    let s = Setup::new(2, "");
    let (n1, n2) = (s.cluster.node(1), s.cluster.node(2));
    let (st, _) = s.daemon.connect("192.0.2.1:80");
    assert!(st.starts_with("HTTP/1.1 403"), "{st:?}");
    let hole = std::net::Ipv4Addr::from(u32::from(n1.pod_ip) + 1);
    s.cluster.blackhole(1, hole);
    let (st, _) = s.daemon.connect(&format!("{hole}:{}", common::ECHO_PORT));
    assert!(st.starts_with("HTTP/1.1 504"), "{st:?}");
    s.cluster.kill_sshd(2);
    s.daemon
        .wait_status("node-2 failing to reconnect", READY, |d| {
            common::find_node(d, "node-2").is_some_and(|n| n.state == TunnelState::Backoff)
        });
    let (st, _) = s
        .daemon
        .connect(&format!("{}:{}", n2.pod_ip, common::ECHO_PORT));
    assert!(st.starts_with("HTTP/1.1 503"), "{st:?}");
    let records = s.wait_records(3);
    for r in &records {
        report(&format!("refusal record: {r}"));
    }
    assert_eq!(records.len(), 3, "{records:#?}");
    let code = |c: u64| move |r: &Value| r["status"].as_u64() == Some(c);
    let forbidden = only(&records, "403", code(403));
    let reason = forbidden["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(
            "Forbidden: 192.0.2.1:80: 192.0.2.1 is not a node, pod or service address"
        ),
        "{forbidden}"
    );
    assert!(forbidden.get("node").is_none() && forbidden.get("route").is_none());
    assert!(forbidden.get("end").is_none() && forbidden.get("session").is_none());
    let timeout = only(&records, "504", code(504));
    let reason = timeout["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("Gateway Timeout: channel open timed out after "),
        "{timeout}"
    );
    assert_eq!(timeout["node"], n1.name.as_str());
    assert_eq!(timeout["route"], "pod");
    let dur = timeout["duration_ms"].as_f64().unwrap_or_default();
    assert!(dur >= 1500.0, "{timeout}");
    let down = only(&records, "503", code(503));
    let reason = down["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("Service Unavailable: no healthy tunnel: node node-2 is backoff"),
        "{down}"
    );
    assert_eq!(down["node"], n2.name.as_str());
    for r in [forbidden, timeout, down] {
        assert_eq!(r["bytes_to_client"], 0, "{r}");
        assert_eq!(r["client_uid"], 0, "{r}");
    }
}

/// A download cut by its node's sshd dying: its record says
/// `session_lost`, with the bytes that did arrive.
#[test]
fn a_stream_cut_by_a_dying_sshd_is_recorded_as_session_lost() {
    require_netns!("a_stream_cut_by_a_dying_sshd_is_recorded_as_session_lost");
    let s = Setup::new(1, "");
    let node = s.cluster.node(1);
    let target = format!("{}:{}", node.pod_ip, common::FLOOD_PORT);
    let c = s.client("tcp", &target, serde_json::json!({}));
    assert!(
        common::poll(Duration::from_secs(20), || {
            s.streams(&[])["streams"][0]["bytes_to_client"]
                .as_u64()
                .is_some_and(|n| n >= 1 << 20)
        }),
        "the download did not get going"
    );
    s.cluster.kill_sshd(1);
    let v = finish(c);
    assert_eq!(v["end"], "reset", "{v}");
    let records = s.wait_records(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    report(&format!("cut record: {r}"));
    assert_eq!(r["end"], "session_lost", "{r}");
    assert_eq!(r["status"], 200, "{r}");
    let sent = r["bytes_to_client"].as_u64().unwrap_or_default();
    assert!(sent >= 1 << 20, "{r}");
    assert_eq!(
        v["bytes"].as_u64(),
        Some(sent),
        "client read vs record: {r}"
    );
}

/// A client that stops reading a download holds its session: `tunneler
/// streams` lists it as held (since a time), with bytes buffered, first
/// in `--sort buffered`; once the client goes, the list no longer has it,
/// and its record carries the time it was held.
#[test]
fn tunneler_streams_shows_a_held_stream_and_forgets_it_when_it_ends() {
    require_netns!("tunneler_streams_shows_a_held_stream_and_forgets_it_when_it_ends");
    // A small per-stream limit makes the hold come soon.
    let s = Setup::new(1, "relay_stream_buffer_limit = \"256KiB\"");
    let node = s.cluster.node(1);
    let target = format!("{}:{}", node.pod_ip, common::FLOOD_PORT);
    let mark = s.cluster.dir.join("mark");
    let opts =
        serde_json::json!({"rcvbuf": 4096, "delay": 600, "mark": mark.display().to_string()});
    let c = common::ChildGuard::from(s.client("tcp", &target, opts));
    let mut doc = Value::Null;
    let held = common::poll(Duration::from_secs(20), || {
        doc = s.streams(&["--node", &node.name]);
        doc["streams"][0]["holds_session"] == true
    });
    assert!(held, "the stream never held its session: {doc:#}");
    report(&format!("streams --json while held: {doc}"));
    let st = &doc["streams"][0];
    assert_eq!(doc["total"], 1, "{doc}");
    assert_eq!(st["target"], target.as_str());
    assert_eq!(st["node"], node.name.as_str());
    assert!(
        st["held_since"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{st}"
    );
    assert!(st["buffered_bytes"].as_u64().is_some_and(|b| b > 0), "{st}");
    assert!(st["session"].as_u64().is_some(), "{st}");
    // The table says so too.
    let out = s.daemon.cli(&["streams", "--sort", "buffered"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    report(&format!("tunneler streams:\n{table}"));
    assert!(out.status.success(), "{}", all_output(&out));
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.contains(&target) && row.contains("HELD since"),
        "{table}"
    );
    // Another node's filter lists nothing.
    let other = s.streams(&["--node", "node-9"]);
    assert_eq!(other["total"], 0, "{other}");
    // The client goes: the stream ends and leaves the list.
    drop(c);
    let gone = common::poll(Duration::from_secs(10), || s.streams(&[])["total"] == 0);
    assert!(gone, "{}", s.streams(&[]));
    let records = s.wait_records(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    report(&format!("held stream's record: {r}"));
    assert_eq!(r["end"], "client_closed", "{r}");
    assert!(r["held_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
}

/// `proxy.access_log = false`: a stream and a refusal, and no access
/// record at all, while the daemon's other log lines go on as before.
#[test]
fn access_log_false_writes_no_record() {
    require_netns!("access_log_false_writes_no_record");
    let s = Setup::new(1, "access_log = false");
    let node = s.cluster.node(1);
    let got = s
        .daemon
        .echo(&format!("{}:{}", node.pod_ip, common::ECHO_PORT), "x");
    assert!(got.starts_with("node=node-1"), "{got}");
    let (st, _) = s.daemon.connect("192.0.2.1:80");
    assert!(st.starts_with("HTTP/1.1 403"), "{st:?}");
    // The stream's own end is logged (at debug) once its relay is done:
    // by then its record would have been written.
    let ended = common::poll(Duration::from_secs(10), || {
        fs::read_to_string(&s.daemon.log).is_ok_and(|l| l.contains("stream closed"))
    });
    assert!(ended, "{}", s.daemon.log_tail(20));
    assert_eq!(s.records(), Vec::<Value>::new());
}
