//! Node discovery from the Kubernetes API, against a replay server.
//!
//! No Kubernetes API server can run on this machine, so this test serves
//! the two requests kube-rs's watcher makes, in the API's exact wire format:
//! a `NodeList` for the list call, and a chunked stream of watch events
//! (`{"type":"ADDED","object":{...}}` one per line) for the watch call. The
//! daemon under test is the real binary with a real kubeconfig.
//!
//! The discovered nodes' SSH address is the InternalIP of a namespace the
//! test's cluster creates, on a port nothing listens on: this test is
//! about the node set, not the tunnels, so its dials need only be refused
//! without leaving the machine. (A discovered SSH address is an IP literal
//! or nothing: a name such as `localhost` would be refused.)

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn node(name: &str, ip: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "1", "uid": format!("uid-{name}")},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": ip},
            {"type": "Hostname", "address": name}
        ]}
    })
}

/// The replay API server: a list answer and a controllable watch stream.
struct FakeApi {
    port: u16,
    items: Arc<Mutex<Vec<Value>>>,
    events: Arc<Mutex<Vec<mpsc::Sender<String>>>>,
    down: Arc<AtomicBool>,
}

fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
    }
    Some(line)
}

/// Answers one request; false when the connection must close.
fn serve_one(
    s: &mut TcpStream,
    line: &str,
    it: &Arc<Mutex<Vec<Value>>>,
    ev: &Arc<Mutex<Vec<mpsc::Sender<String>>>>,
    dn: &Arc<AtomicBool>,
) -> bool {
    if dn.load(Ordering::SeqCst) {
        let body =
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"down","code":503}"#;
        let _ = write!(
            s,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return false;
    }
    if !line.starts_with("GET /api/v1/nodes") {
        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        return true;
    }
    if line.contains("watch=true") || line.contains("watch=1") {
        let (tx, rx) = mpsc::channel::<String>();
        ev.lock().unwrap().push(tx);
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        // Bounded: the stream lives at most 60 s.
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line == "CLOSE" => break,
                Ok(line) => {
                    let chunk = format!("{line}\n");
                    let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                    if s.write_all(framed.as_bytes()).is_err() {
                        return false;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if dn.load(Ordering::SeqCst) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        return true;
    }
    let body = json!({
        "apiVersion": "v1",
        "kind": "NodeList",
        "metadata": {"resourceVersion": "100"},
        "items": *it.lock().unwrap(),
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).is_ok() && s.write_all(body.as_bytes()).is_ok()
}

impl FakeApi {
    fn start(items: Vec<Value>) -> FakeApi {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let items = Arc::new(Mutex::new(items));
        let events: Arc<Mutex<Vec<mpsc::Sender<String>>>> = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let (it, ev, dn) = (items.clone(), events.clone(), down.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let (it, ev, dn) = (it.clone(), ev.clone(), dn.clone());
                std::thread::spawn(move || {
                    // Keep-alive, as the real API server: several requests
                    // may come on one connection (bounded by count).
                    for _ in 0..100 {
                        let Some(line) = read_request(&mut s) else {
                            return;
                        };
                        if !serve_one(&mut s, &line, &it, &ev, &dn) {
                            return;
                        }
                    }
                });
            }
        });
        FakeApi {
            port,
            items,
            events,
            down,
        }
    }

    fn send(&self, kind: &str, obj: Value) {
        let line = json!({"type": kind, "object": obj}).to_string();
        self.events
            .lock()
            .unwrap()
            .retain(|tx| tx.send(line.clone()).is_ok());
    }
}

fn admin_get(sock: &Path, path: &str) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_status(sock: &Path, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Some((200, body)) = admin_get(sock, "/v1/status") {
            if let Ok(v) = serde_json::from_str::<Value>(&body) {
                if cond(&v) {
                    return v;
                }
                last = v;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}; last status: {last:#}");
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

fn kube_source(v: &Value) -> Value {
    v["sources"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["source"] == "kubernetes").cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn kubernetes_watch_list_add_delete_and_api_loss() {
    require_netns!("kubernetes_watch_list_add_delete_and_api_loss");
    let cluster = common::Cluster::new(3);
    let ip = |i: usize| cluster.node(i).ip.to_string();
    let api = FakeApi::start(vec![
        node("k-1", &ip(1), "10.210.1.0/24"),
        node("k-2", &ip(2), "10.210.2.0/24"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("id"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(d.join("known_hosts"), "").unwrap();
    std::fs::write(
        d.join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n",
            api.port
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("t.toml"),
        r#"
[ssh]
user = "x"
identity_file = "id"
known_hosts_file = "known_hosts"
port = 1
connect_timeout = "1s"
[reconnect]
initial_backoff = "1s"
max_backoff = "2s"
[proxy]
listen = ["unix://egress.sock"]
[admin]
socket = "admin.sock"
[discovery]
[discovery.kubernetes]
kubeconfig = "kubeconfig"
"#,
    )
    .unwrap();
    let log = std::fs::File::create(d.join("log")).unwrap();
    let _daemon = Daemon(
        common::die_with_test(&mut Command::new(env!("CARGO_BIN_EXE_tunneler")))
            .args(["run", "--config"])
            .arg(d.join("t.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let sock = d.join("admin.sock");
    let dump = || std::fs::read_to_string(d.join("log")).unwrap_or_default();

    // Initial list.
    let v = wait_status(&sock, "the listed nodes", |v| names(v) == ["k-1", "k-2"]);
    assert!(
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["source"] == "kubernetes"),
        "{v:#}"
    );
    assert!(
        kube_source(&v)["last_success"].is_string(),
        "{v:#}\n{}",
        dump()
    );

    // Watch: add, then delete.
    api.send("ADDED", node("k-3", &ip(3), "10.210.3.0/24"));
    wait_status(&sock, "k-3 added by a watch event", |v| {
        names(v) == ["k-1", "k-2", "k-3"]
    });
    // A Node that claims loopback and half the Internet is left out and
    // reported; the others stay.
    api.send("ADDED", node("k-evil", "127.0.0.1", "128.0.0.0/1"));
    let v = wait_status(&sock, "k-evil rejected", |v| {
        kube_source(v)["rejected"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["name"] == "k-evil"))
    });
    assert_eq!(names(&v), ["k-1", "k-2", "k-3"], "{v:#}");
    let reason = kube_source(&v)["rejected"][0]["reason"].to_string();
    assert!(reason.contains("127.0.0.1 is loopback"), "{reason}");
    api.send("DELETED", node("k-evil", "127.0.0.1", "128.0.0.0/1"));
    wait_status(&sock, "k-evil gone from rejected", |v| {
        kube_source(v)["rejected"]
            .as_array()
            .is_some_and(|r| r.is_empty())
    });
    api.send("DELETED", node("k-1", &ip(1), "10.210.1.0/24"));
    wait_status(&sock, "k-1 deleted by a watch event", |v| {
        names(v) == ["k-2", "k-3"]
    });

    // Routing follows: the pod CIDR of k-3 routes (to a node that is not up,
    // so 503), the deleted node's does not (403).
    let connect = |target: &str| -> String {
        let mut s = UnixStream::connect(d.join("egress.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    assert!(connect("10.210.3.9:80").starts_with("HTTP/1.1 503"));
    assert!(connect("10.210.1.9:80").starts_with("HTTP/1.1 403"));

    // The API goes away: the error shows, and the node set stays.
    api.items.lock().unwrap().clear();
    api.down.store(true, Ordering::SeqCst);
    api.send("CLOSE", Value::Null);
    let v = wait_status(&sock, "the API error in status", |v| {
        kube_source(v)["last_error"].is_string()
    });
    assert_eq!(
        names(&v),
        ["k-2", "k-3"],
        "a failing source keeps the last good set"
    );
    let (code, metrics) = admin_get(&sock, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("tunneler_discovery_errors_total"),
        "{metrics}"
    );
    // Still there a little later, after the watcher's retries.
    std::thread::sleep(Duration::from_secs(2));
    let v = wait_status(&sock, "status", |_| true);
    assert_eq!(names(&v), ["k-2", "k-3"]);
}

/// One CONNECT over the daemon's Unix listener; the reply's status line.
fn connect_status(sock: &Path, target: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The watch reads what the nodes file reads: a Calico tunnel annotation
/// holds dials to that address to the node port policy (decided before
/// any tunnel is needed, so this works without one), and an InternalDNS
/// name routes to its node (503 here, no tunnel: but not 403).
#[test]
fn kubernetes_watch_reads_calico_tunnel_annotations_and_dns_names() {
    require_netns!("kubernetes_watch_reads_calico_tunnel_annotations_and_dns_names");
    // SSH addresses on the test's own bridge (discovery takes IP literals
    // only); port 1 there refuses at once, so no tunnel comes up.
    let cluster = common::Cluster::new(2);
    let ip = |i: usize| cluster.node(i).ip.to_string();
    let mut k1 = node("k-1", &ip(1), "10.210.1.0/24");
    k1["metadata"]["annotations"] =
        json!({"projectcalico.org/IPv4VXLANTunnelAddr": "10.210.200.1"});
    k1["status"]["addresses"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "InternalDNS", "address": "ip-10-211-0-21.ec2.internal"}));
    let api = FakeApi::start(vec![k1, node("k-2", &ip(2), "10.210.2.0/24")]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("id"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(d.join("known_hosts"), "").unwrap();
    std::fs::write(
        d.join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n",
            api.port
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("t.toml"),
        r#"
[ssh]
user = "x"
identity_file = "id"
known_hosts_file = "known_hosts"
port = 1
connect_timeout = "1s"
[reconnect]
initial_backoff = "1s"
max_backoff = "2s"
[proxy]
listen = ["unix://egress.sock"]
pod_network_cidrs = ["10.210.0.0/16"]
wait_for_healthy = "0s"
[admin]
socket = "admin.sock"
[discovery.kubernetes]
kubeconfig = "kubeconfig"
"#,
    )
    .unwrap();
    let log = std::fs::File::create(d.join("log")).unwrap();
    let _daemon = Daemon(
        common::die_with_test(&mut Command::new(env!("CARGO_BIN_EXE_tunneler")))
            .args(["run", "--config"])
            .arg(d.join("t.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let sock = d.join("admin.sock");
    wait_status(&sock, "the listed nodes", |v| names(v) == ["k-1", "k-2"]);
    let egress = d.join("egress.sock");

    let line = connect_status(&egress, "10.210.200.1:22");
    assert!(
        line.starts_with("HTTP/1.1 403")
            && line.contains("node \"k-1\"")
            && line.contains("proxy.node_ports"),
        "{line}"
    );
    // The kubelet port passes the policy; the pool has no tunnel up.
    let line = connect_status(&egress, "10.210.200.1:10250");
    assert!(line.starts_with("HTTP/1.1 503"), "{line}");
    // Any other pool address keeps every port.
    let line = connect_status(&egress, "10.210.200.2:22");
    assert!(line.starts_with("HTTP/1.1 503"), "{line}");
    let line = connect_status(&egress, "IP-10-211-0-21.EC2.Internal.:10250");
    assert!(
        line.starts_with("HTTP/1.1 503") && line.contains("k-1"),
        "{line}"
    );
}
