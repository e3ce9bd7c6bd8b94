//! The proxy's edge against hostile input, with real peers: which ports a
//! node's own address allows, per-listener admission under a flood, who
//! gets through the mTLS listener, and Unix sockets that never exist with a
//! looser mode than their final one.

use crate::common;

use std::fs;
use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pki::{egress_pki, issue_cert};
use common::{
    all_output, free_tcp_port, report, tunneler_bin, Cluster, ConfigSpec, Daemon, ECHO_PORT,
    HTTP_PORT,
};
use common::{closed_by_peer, http_get_over};

const READY: Duration = Duration::from_secs(20);

/// A kubelet stand-in: an HTTP server on the node's own address.
fn kubelet_stand_in(cluster: &Cluster, i: usize, port: u16) -> std::process::Child {
    let ip = cluster.node(i).ip.to_string();
    http_stand_in(cluster, i, &ip, port, &format!("kubelet-{i}"))
}

/// An HTTP server on `ip:port` in node `i`, answering `body`.
fn http_stand_in(
    cluster: &Cluster,
    i: usize,
    ip: &str,
    port: u16,
    body: &str,
) -> std::process::Child {
    let www = cluster.dir.join(format!("www{i}-{ip}-{port}"));
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), format!("{body}\n")).unwrap();
    let ip = ip.to_string();
    let child = cluster.spawn_in_node(
        i,
        &format!("http-{ip}-{port}.log"),
        "/usr/bin/python3",
        &[
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            &ip,
            "--directory",
            www.to_str().unwrap(),
        ],
    );
    assert!(
        cluster.wait_listening_in_node(i, &ip, port, Duration::from_secs(10)),
        "kubelet stand-in on node {i} did not start"
    );
    child
}

/// CONNECT over the Unix listener; the whole response head.
fn head_of(daemon: &Daemon, target: &str) -> String {
    daemon.raw_request(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
}

/// Numbered case 3 of the trust-boundary review (`CONNECT node-1:22` got
/// 200 and reached the node's sshd through its own tunnel), and the port
/// policy around it: the kubelet port (the Node's own, else 10250) and
/// `node_ports` pass on node addresses, everything else gets 403 without
/// a dial; pod and service addresses keep every port; the same holds with
/// `node_local_via_loopback`, and a reload changes `node_ports` at once.
#[test]
fn node_addresses_allow_only_the_kubelet_and_node_ports() {
    require_netns!("node_addresses_allow_only_the_kubelet_and_node_ports");
    let cluster = Cluster::new(2);
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let mut kubelet = kubelet_stand_in(&cluster, 1, 10250);
    // node-2 reports its kubelet on the HTTP server's port.
    let spec = ConfigSpec {
        nodes: Some(vec![1]),
        node_ports: Some(vec![ECHO_PORT]),
        extra: format!(
            "\n[[node]]\nname = \"node-2\"\naddress = \"{}\"\nkubelet_port = {HTTP_PORT}\n",
            n2.ip
        ),
        ..ConfigSpec::default()
    };
    let daemon = Daemon::start_with(&cluster, &spec);
    daemon.wait_all_healthy(READY);

    // Case 3: the node's sshd, by name and by IP.
    for target in ["node-1:22".to_string(), format!("{}:22", n1.ip)] {
        let head = head_of(&daemon, &target);
        let line = head.lines().next().unwrap_or("");
        report(&format!("CONNECT {target} -> {line}"));
        assert!(line.starts_with("HTTP/1.1 403"), "{target}: {head:?}");
        assert!(
            line.contains("SSH port") && line.contains("10250 (kubelet)") && line.contains("7000"),
            "the reason names the allowed ports: {line}"
        );
    }
    // The kubelet port passes, by name and by IP.
    for target in ["node-1:10250".to_string(), format!("{}:10250", n1.ip)] {
        let (st, s) = daemon.connect(&target);
        assert!(st.starts_with("HTTP/1.1 200"), "{target}: {st}");
        assert!(http_get_over(s).contains("kubelet-1"), "{target}");
    }
    // A listed node port passes.
    let got = daemon.echo(&format!("node-1:{ECHO_PORT}"), "listed");
    assert_eq!(got, format!("node=node-1 local={} echo=listed", n1.ip));
    // Other ports on the node's address are refused although a server
    // listens there (the HTTP server on 8080).
    let line = head_of(&daemon, &format!("{}:{HTTP_PORT}", n1.ip));
    assert!(line.starts_with("HTTP/1.1 403"), "{line:?}");
    assert!(
        line.contains("port 8080 is not allowed on node \"node-1\""),
        "{line}"
    );
    // node-2's own kubelet port replaces 10250 there.
    let (st, s) = daemon.connect(&format!("node-2:{HTTP_PORT}"));
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    assert!(http_get_over(s).contains("node=node-2"));
    let line = head_of(&daemon, "node-2:10250");
    assert!(
        line.starts_with("HTTP/1.1 403") && line.contains("8080 (kubelet)"),
        "{line:?}"
    );
    // Pod and service addresses keep every port: 8080 answers, and port 22
    // on a pod address is dialed (nothing listens there: 502, not 403).
    let (st, s) = daemon.connect(&format!("{}:{HTTP_PORT}", n1.pod_ip));
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    assert!(http_get_over(s).contains("node=node-1"));
    let (st, _) = daemon.connect(&format!("{}:22", n1.pod_ip));
    assert!(
        st.starts_with("HTTP/1.1 502"),
        "pod port 22 is dialed: {st}"
    );
    let (st, s) = daemon.connect(&format!("{}:{HTTP_PORT}", cluster.anycast_service_ip()));
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    assert!(http_get_over(s).contains("node=node-"));

    // node_local_via_loopback and node_ports = [22, 7000] by reload.
    let text = fs::read_to_string(&daemon.config).unwrap();
    let text = text.replace(
        &format!("node_ports = [{ECHO_PORT}]"),
        &format!("node_ports = [{ECHO_PORT}]\nnode_local_via_loopback = true"),
    );
    fs::write(&daemon.config, &text).unwrap();
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", all_output(&out));
    let line = head_of(&daemon, "node-1:22");
    report(&format!(
        "with node_local_via_loopback: CONNECT node-1:22 -> {}",
        line.lines().next().unwrap_or("")
    ));
    assert!(line.starts_with("HTTP/1.1 403"), "{line:?}");
    let line = head_of(&daemon, &format!("node-1:{HTTP_PORT}"));
    assert!(line.starts_with("HTTP/1.1 403"), "{line:?}");
    let got = daemon.echo(&format!("node-1:{ECHO_PORT}"), "lo");
    assert_eq!(got, "node=node-1 local=127.0.0.1 echo=lo");
    // The operator may list the SSH port explicitly; the dial then goes
    // (to the node's loopback, where this sshd does not listen: 502).
    let text = text.replace(
        &format!("node_ports = [{ECHO_PORT}]"),
        &format!("node_ports = [22, {ECHO_PORT}]"),
    );
    fs::write(&daemon.config, &text).unwrap();
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", all_output(&out));
    let (st, _) = daemon.connect("node-1:22");
    assert!(
        st.starts_with("HTTP/1.1 502"),
        "listed port 22 is dialed: {st}"
    );

    let metrics = daemon.metrics();
    assert!(
        common::metric_value(&metrics, "tunneler_dials_total", &[("result", "forbidden")])
            .unwrap_or(0.0)
            >= 6.0,
        "{metrics}"
    );
    let _ = kubelet.kill();
    let _ = kubelet.wait();
}

/// A CNI bridge's address in the node's pod CIDR (`cni0`'s `.1`, here the
/// first host address of node-1's /28) is the node's host network: port
/// 22 there gets 403 like the node's own address, the kubelet port
/// passes, and a pod address (offset 5) keeps every port. With
/// `proxy.pod_host_offsets = []` the bridge address is a pod again.
#[test]
fn a_pod_cidr_bridge_address_is_held_to_the_node_port_policy() {
    require_netns!("a_pod_cidr_bridge_address_is_held_to_the_node_port_policy");
    let cluster = Cluster::new(1);
    let n1 = cluster.node(1);
    let net: std::net::Ipv4Addr = n1.pod_cidr.split('/').next().unwrap().parse().unwrap();
    let bridge = std::net::Ipv4Addr::from(u32::from(net) + 1).to_string();
    common::run(
        "ip",
        &[
            "-n",
            &n1.ns,
            "addr",
            "add",
            &format!("{bridge}/32"),
            "dev",
            "lo",
        ],
    );
    // What listens on the host network at the bridge address: a stand-in
    // for sshd on 0.0.0.0:22, and the kubelet.
    let mut on22 = http_stand_in(&cluster, 1, &bridge, 22, "host-22");
    let mut kubelet = http_stand_in(&cluster, 1, &bridge, 10250, "kubelet-on-bridge");
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);

    for target in [format!("{bridge}:22"), format!("{net}:22")] {
        let line = head_of(&daemon, &target);
        report(&format!(
            "CONNECT {target} -> {}",
            line.lines().next().unwrap_or("")
        ));
        assert!(line.starts_with("HTTP/1.1 403"), "{target}: {line:?}");
        assert!(line.contains("SSH port of node \"node-1\""), "{line}");
    }
    let (st, s) = daemon.connect(&format!("{bridge}:10250"));
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    assert!(http_get_over(s).contains("kubelet-on-bridge"));
    // A pod address keeps every port.
    let (st, s) = daemon.connect(&format!("{}:{HTTP_PORT}", n1.pod_ip));
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    assert!(http_get_over(s).contains("node=node-1"));
    let (st, _) = daemon.connect(&format!("{}:22", n1.pod_ip));
    assert!(
        st.starts_with("HTTP/1.1 502"),
        "pod port 22 is dialed: {st}"
    );

    // The operator's offsets replace the defaults, live.
    let text = fs::read_to_string(&daemon.config).unwrap();
    let text = text.replacen("[proxy]\n", "[proxy]\npod_host_offsets = []\n", 1);
    fs::write(&daemon.config, &text).unwrap();
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", all_output(&out));
    let (st, s) = daemon.connect(&format!("{bridge}:22"));
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
    assert!(http_get_over(s).contains("host-22"));
    for c in [&mut on22, &mut kubelet] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The cluster CA's server and client certificates (apiserver egress by CN,
/// another client by DNS SAN, and a kubelet's client certificate).
fn cluster_ca(dir: &Path) {
    egress_pki(dir, "egress");
    issue_cert(
        dir,
        "ca",
        "by-san",
        "/CN=something-else",
        "subjectAltName=DNS:Egress.Tunneler.Local\nextendedKeyUsage=clientAuth\n",
    );
    issue_cert(
        dir,
        "ca",
        "kubelet",
        "/O=system:nodes/CN=system:node:node-1",
        "subjectAltName=DNS:node-1\nextendedKeyUsage=clientAuth\n",
    );
}

fn tls_section(port: u16, extra: &str) -> String {
    format!(
        "\n[proxy.tls]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"tls/server.pem\"\n\
         key_file = \"tls/server.key\"\nclient_ca_file = \"tls/ca.pem\"\n{extra}"
    )
}

/// `client_names` lets in certificates that carry a listed name as CN or
/// DNS SAN, and refuses a certificate of the same CA without one (a
/// kubelet's, the reason the setting exists) in the handshake, with a log
/// line that names what it presented.
#[test]
fn client_names_admit_listed_certificates_only() {
    require_netns!("client_names_admit_listed_certificates_only");
    let cluster = Cluster::new(1);
    let tls = cluster.dir.join("tls");
    cluster_ca(&tls);
    let port = free_tcp_port();
    let spec = ConfigSpec {
        extra: tls_section(
            port,
            "client_names = [\"kube-apiserver-egress\", \"egress.tunneler.local\"]\n",
        ),
        ..ConfigSpec::default()
    };
    let daemon = Daemon::start_with(&cluster, &spec);
    daemon.wait_all_healthy(READY);
    let url = format!("http://{}:{HTTP_PORT}/", cluster.node(1).pod_ip);
    let p = |f: &str| tls.join(f).to_str().unwrap().to_string();
    let curl = |who: &str| {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "-p", "--proxy"])
            .arg(format!("https://127.0.0.1:{port}"))
            .args(["--proxy-cacert", &p("ca.pem")])
            .args(["--proxy-cert", &p(&format!("{who}.pem"))])
            .args(["--proxy-key", &p(&format!("{who}.key"))])
            .arg(&url)
            .output()
            .unwrap()
    };
    for who in ["egress", "by-san"] {
        let out = curl(who);
        assert!(out.status.success(), "{who}: {}", all_output(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node=node-1");
    }
    let out = curl("kubelet");
    assert!(
        !out.status.success(),
        "kubelet cert got in: {}",
        all_output(&out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("node="));
    report(&format!(
        "mTLS with the cluster CA's kubelet certificate: curl says {:?}",
        String::from_utf8_lossy(&out.stderr).trim()
    ));
    let logged = common::poll(Duration::from_secs(5), || {
        fs::read_to_string(&daemon.log)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.contains("client certificate refused")
                    && l.contains("system:node:node-1")
                    && l.contains("127.0.0.1")
            })
    });
    assert!(
        logged,
        "no log line naming the presented names and the peer:\n{}",
        daemon.log_tail(30)
    );
    let line = fs::read_to_string(&daemon.log)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("client certificate refused"))
        .unwrap_or_default()
        .to_string();
    report(&format!("log: {line}"));
    // Still serving the listed client afterwards.
    let out = curl("egress");
    assert!(out.status.success(), "{}", all_output(&out));
}

/// The mTLS listener's pending budget is its own: idle TCP connections that
/// never start their TLS handshake fill it, the listener turns further ones
/// away, and Unix-socket dials (the apiserver's usual path) go on being
/// served. The same for the plain loopback TCP listener. With one shared
/// budget (as before), the Unix dial here got 503.
#[test]
fn a_handshake_flood_on_tcp_listeners_does_not_refuse_unix_dials() {
    require_netns!("a_handshake_flood_on_tcp_listeners_does_not_refuse_unix_dials");
    let cluster = Cluster::new(1);
    let tls = cluster.dir.join("tls");
    cluster_ca(&tls);
    let port = free_tcp_port();
    let spec = ConfigSpec {
        extra: tls_section(port, "max_pending_handshakes = 20\n"),
        ..ConfigSpec::default()
    };
    let toml = cluster.config_toml(&spec).replacen(
        "[proxy]\n",
        "[proxy]\nmax_pending_handshakes = 20\nhandshake_timeout = \"30s\"\n",
        1,
    );
    let daemon = Daemon::start_toml(&cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    let target = format!("{}:{ECHO_PORT}", cluster.node(1).pod_ip);

    // Fill the TLS listener: until a new connection is closed at once.
    let mut flood: Vec<TcpStream> = Vec::new();
    let full = |flood: &mut Vec<TcpStream>, addr: std::net::SocketAddr| {
        common::poll(Duration::from_secs(20), || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut b = [0u8; 512];
            match s.read(&mut b) {
                // Turned away: closed, or a 503 head on a plain listener.
                Ok(n) => {
                    assert!(
                        n == 0 || String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 503"),
                        "{:?}",
                        String::from_utf8_lossy(&b[..n])
                    );
                    true
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
                Err(_) => {
                    flood.push(s); // still pending: it holds a slot
                    assert!(flood.len() <= 200, "the budget never filled");
                    false
                }
            }
        })
    };
    let tls_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        full(&mut flood, tls_addr),
        "the TLS listener never turned anyone away"
    );
    // About 20: a connection the daemon had not accepted yet within the
    // probe's 300 ms also counts, hence the slack above 20.
    let on_tls = flood.len();
    report(&format!(
        "idle TLS connections holding the TLS listener's budget: {on_tls}"
    ));
    assert!((20..=60).contains(&on_tls), "{on_tls}");
    for k in 0..3 {
        let got = daemon.echo(&target, &format!("unix-during-tls-flood{k}"));
        assert!(got.starts_with("node=node-1 "), "{got}");
    }
    let (st, s) = daemon.connect_tcp(&target);
    assert!(
        st.starts_with("HTTP/1.1 200"),
        "plain TCP during TLS flood: {st}"
    );
    drop(s);

    // Then fill the plain TCP listener too.
    let before = flood.len();
    assert!(
        full(&mut flood, daemon.tcp_listener()),
        "the TCP listener never turned anyone away"
    );
    assert!(
        (20..=60).contains(&(flood.len() - before)),
        "{}",
        flood.len() - before
    );
    for k in 0..3 {
        let got = daemon.echo(&target, &format!("unix-during-both-floods{k}"));
        assert!(got.starts_with("node=node-1 "), "{got}");
    }
    // The flood is still pending, not silently dropped.
    let first = &mut flood[0];
    first.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(first.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a flood connection was closed early"
    );
    first.set_nonblocking(false).unwrap();
    first
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    assert!(!closed_by_peer(first));
}

/// A symbolic link at the egress or admin socket path: the daemon refuses
/// to start, says why, and leaves the link and its target as they were.
#[test]
fn a_symlink_at_a_socket_path_is_refused() {
    require_netns!("a_symlink_at_a_socket_path_is_refused");
    let cluster = Cluster::new(1);
    let victim = cluster.dir.join("victim");
    fs::write(&victim, "keep me\n").unwrap();
    for sock in [cluster.egress_socket(), cluster.admin_socket()] {
        let _ = fs::remove_file(&sock);
        std::os::unix::fs::symlink(&victim, &sock).unwrap();
        let config = cluster.write_config(&ConfigSpec::default());
        let out = Command::new(tunneler_bin())
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let msg = all_output(&out);
        assert!(!out.status.success(), "{msg}");
        assert!(msg.contains("is a symbolic link"), "{msg}");
        report(&format!(
            "{}: {}",
            sock.display(),
            msg.lines().last().unwrap_or("")
        ));
        assert_eq!(fs::read_link(&sock).unwrap(), victim);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me\n");
        fs::remove_file(&sock).unwrap();
    }
}

/// Connects to `path` as uid 65534 (nobody) with primary gid 65533 (no
/// group we use), and, when `in_nogroup`, with supplementary group 65534
/// (nogroup); returns Python's error or "ok".
fn connect_as_nobody(path: &Path, in_nogroup: bool) -> String {
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n\
                  try:\n    s.connect(sys.argv[1]); print('ok')\n\
                  except OSError as e:\n    print(e.strerror)";
    let groups = if in_nogroup {
        "--groups=65534"
    } else {
        "--clear-groups"
    };
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65533", groups])
        .args(["/usr/bin/python3", "-c", script])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What this proves: a socket is reachable by another user at no moment
/// before it has its final mode. The socket is bound in a private
/// directory (0700) where another user cannot connect even to a socket
/// with mode 0777 (checked: the control case); it gets its final mode and
/// group there; only then is it renamed to its final path, and rename is
/// atomic, so the final path never shows a looser socket. The probe is a
/// real connect as `nobody`, and the control shows the probe succeeds
/// where the mode allows it, so a loose staging would fail this test.
#[tokio::test]
async fn sockets_are_never_reachable_with_a_looser_mode() {
    require_netns!("sockets_are_never_reachable_with_a_looser_mode");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    // Searchable by nobody, like /run/tunneler.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();

    // Control: a world-connectable socket in a searchable directory.
    let open = dir.path().join("open.sock");
    let _open = tokio::net::UnixListener::bind(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(
        connect_as_nobody(&open, false),
        "ok",
        "the probe cannot connect at all"
    );

    for (group, mode) in [(None, 0o600), (Some("nogroup"), 0o660)] {
        let path = dir.path().join(format!("s{mode:o}.sock"));
        let staged = tunneler::stage(&path, mode, group).unwrap();
        // Staged: the directory is private, the socket already has its
        // final mode and group, and the final path does not exist.
        let d = fs::metadata(staged.dir()).unwrap();
        assert_eq!(d.mode() & 0o777, 0o700);
        assert_eq!(d.uid(), 0);
        let s = fs::metadata(staged.staged_path()).unwrap();
        assert_eq!(s.mode() & 0o777, mode);
        if group.is_some() {
            assert_eq!(s.gid(), 65534);
        }
        assert!(!path.exists());
        // Even loosened to 0777 inside it, nobody reaches the staged socket.
        fs::set_permissions(staged.staged_path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            connect_as_nobody(staged.staged_path(), true),
            "Permission denied"
        );
        fs::set_permissions(staged.staged_path(), fs::Permissions::from_mode(mode)).unwrap();
        let private = staged.dir().to_path_buf();
        let _l = staged.publish().unwrap();
        assert!(!private.exists(), "private directory left behind");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, mode);
        assert_eq!(connect_as_nobody(&path, false), "Permission denied");
        let in_group = connect_as_nobody(&path, true);
        match group {
            None => assert_eq!(in_group, "Permission denied"),
            Some(_) => assert_eq!(in_group, "ok", "the socket group may connect"),
        }
    }
    // The only entries left are the sockets: no staging directory.
    let mut left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["open.sock", "s600.sock", "s660.sock"]);
}
