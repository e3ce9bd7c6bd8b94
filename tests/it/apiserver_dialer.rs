//! kube-apiserver's egress dialer (`common::apiserver`, which copies
//! k8s.io/apiserver's HTTPConnect dialer byte for byte) against both of
//! the daemon's listeners kube-apiserver can use: the Unix socket and the
//! mTLS TCP listener, with an `https://127.0.0.1:PORT` URL (so no SNI, and
//! the server certificate carries an IP SAN of 127.0.0.1). Then what
//! kube-apiserver does next: TLS through the tunnel to a node-side TLS
//! server. And the one case kube-apiserver's dialer itself refuses: a
//! target that speaks first.

use crate::common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::apiserver::{
    self, read_response_head, sni_for, DialError, GoBufReader, Transport, MAX_REPLY_BYTES,
};
use common::pki::{egress_pki, issue_cert};
use common::{free_tcp_port, Cluster, ConfigSpec, Daemon};

const READY: Duration = Duration::from_secs(20);
/// The node-side TLS server (`openssl s_server -www`), on every address.
const TLS_PORT: u16 = 8443;
/// A server that greets first, then echoes lines.
const GREETER_PORT: u16 = 7025;
const GREETING: &[u8] = b"220 node-1 speaks first\r\n";

struct Setup {
    cluster: Cluster,
    daemon: Daemon,
    tls: PathBuf,
    mtls: Transport,
    servers: Vec<std::process::Child>,
}

fn setup() -> Setup {
    let cluster = Cluster::new(1);
    let tls = cluster.dir.join("tls");
    let pod = cluster.node(1).pod_ip;
    egress_pki(&tls, "client");
    issue_cert(
        &tls,
        "ca",
        "kubelet",
        "/CN=node-1",
        &format!("subjectAltName=IP:{pod}\nextendedKeyUsage=serverAuth\n"),
    );
    let port = free_tcp_port();
    let spec = ConfigSpec {
        extra: format!(
            "\n[proxy.tls]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"tls/server.pem\"\n\
             key_file = \"tls/server.key\"\nclient_ca_file = \"tls/ca.pem\"\n\
             client_names = [\"kube-apiserver-egress\"]\n"
        ),
        ..ConfigSpec::default()
    };
    let p = |f: &str| tls.join(f).to_str().unwrap().to_string();
    let s_server = cluster.spawn_in_node(
        1,
        "s_server.log",
        "openssl",
        &[
            "s_server",
            "-4",
            "-accept",
            &TLS_PORT.to_string(),
            "-cert",
            &p("kubelet.pem"),
            "-key",
            &p("kubelet.key"),
            "-www",
            "-quiet",
        ],
    );
    // GREETING as a Python bytes literal.
    let literal: String = GREETING
        .iter()
        .map(|b| match b {
            b'\r' => "\\r".to_string(),
            b'\n' => "\\n".to_string(),
            b => (*b as char).to_string(),
        })
        .collect();
    let greeter_py = format!(
        "import socket, threading\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {GREETER_PORT}))\n\
         s.listen(16)\n\
         def serve(c):\n\
         \x20   c.sendall(b'{literal}')\n\
         \x20   for line in c.makefile('rb'):\n\
         \x20       c.sendall(b'echo=' + line)\n\
         \x20   c.close()\n\
         while True:\n\
         \x20   c, _ = s.accept()\n\
         \x20   threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
    );
    let greeter = cluster.spawn_in_node(1, "greeter.log", "/usr/bin/python3", &["-c", &greeter_py]);
    for (port, what) in [(TLS_PORT, "s_server"), (GREETER_PORT, "greeter")] {
        assert!(
            cluster.wait_listening_in_node(1, &pod.to_string(), port, Duration::from_secs(10)),
            "{what} did not come up on {pod}:{port}"
        );
    }
    let daemon = Daemon::start_with(&cluster, &spec);
    daemon.wait_all_healthy(READY);
    let mtls = Transport::Mtls {
        url: format!("https://127.0.0.1:{port}"),
        ca: tls.join("ca.pem"),
        cert: tls.join("client.pem"),
        key: tls.join("client.key"),
    };
    Setup {
        cluster,
        daemon,
        tls,
        mtls,
        servers: vec![s_server, greeter],
    }
}

impl Drop for Setup {
    /// The node-side servers go first (the cluster's teardown would kill
    /// them too), and are reaped.
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// TLS over `conn` to the node-side server at `ip`, as kube-apiserver
/// speaks to a kubelet or webhook; returns the HTTP answer to `GET /`.
fn tls_get(conn: apiserver::Conn, ca: &Path, ip: std::net::Ipv4Addr) -> String {
    let config = Arc::new(apiserver::client_tls(ca, ca, None));
    let name = rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V4(ip).into());
    let client = rustls::ClientConnection::new(config, name).expect("tls client");
    let mut tls = rustls::StreamOwned::new(client, conn);
    tls.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("TLS through the tunnel");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // s_server closes without close_notify at times: what came
            // before is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!(
                "reading over TLS: {e} (got {:?})",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn kube_apiservers_dialer_gets_200_on_both_listeners_then_tls_to_the_node() {
    require_netns!("kube_apiservers_dialer_gets_200_on_both_listeners_then_tls_to_the_node");
    let s = setup();
    let node = s.cluster.node(1);
    let target = format!("{}:{TLS_PORT}", node.pod_ip);
    let url = match &s.mtls {
        Transport::Mtls { url, .. } => url.clone(),
        Transport::Unix(_) => unreachable!(),
    };
    assert_eq!(sni_for(&url), None, "an IP URL sends no SNI");
    for (what, transport) in [("unix", s.daemon.apiserver()), ("mtls", s.mtls.clone())] {
        for k in 0..3 {
            // 200 with no byte buffered after it, or dial fails.
            let conn = apiserver::dial(&transport, &target)
                .unwrap_or_else(|e| panic!("{what} dial {k}: {e}"));
            let answer = tls_get(conn, &s.tls.join("ca.pem"), node.pod_ip);
            assert!(
                answer.starts_with("HTTP/1.0 200 ok\r\n"),
                "{what} dial {k}: {answer:?}"
            );
        }
        // A refusal reaches kube-apiserver as its status line.
        match apiserver::dial(&transport, "192.0.2.1:443") {
            Err(DialError::Status { code: 403, status }) => {
                assert!(status.contains("proxy.service_cidrs"), "{what}: {status}")
            }
            other => panic!("{what}: {:?}", other.err()),
        }
    }
}

/// A target that speaks first: when its greeting is there before
/// kube-apiserver reads the reply (a pause makes that certain here), the
/// dialer over the Unix socket finds it buffered after the 200 and fails
/// the dial, as it would through any CONNECT proxy. Over mTLS the reply
/// comes in a TLS record of its own, Go reads one record at a time, and
/// the dial goes through. A client that reads the reply head and nothing
/// more gets the greeting byte for byte.
#[test]
fn a_greeting_from_the_node_fails_kube_apiservers_dial_over_the_unix_socket() {
    require_netns!("a_greeting_from_the_node_fails_kube_apiservers_dial_over_the_unix_socket");
    let s = setup();
    let target = format!("{}:{GREETER_PORT}", s.cluster.node(1).pod_ip);
    let pause = Duration::from_millis(500);

    match apiserver::dial_after(&s.daemon.apiserver(), &target, pause) {
        Err(DialError::Buffered(n)) => {
            assert_eq!(n, GREETING.len());
            assert_eq!(
                DialError::Buffered(n).to_string(),
                format!("unexpected {n} bytes of buffered data")
            );
        }
        Err(e) => panic!("unix: {e}"),
        Ok(_) => panic!("unix: the dial passed with the greeting buffered"),
    }

    let mut conn =
        apiserver::dial_after(&s.mtls, &target, pause).unwrap_or_else(|e| panic!("mtls: {e}"));
    let mut got = vec![0u8; GREETING.len()];
    conn.read_exact(&mut got).expect("greeting over mTLS");
    assert_eq!(got, GREETING);
    assert_eq!(common::echo_over(conn, "hi"), "echo=hi");

    let (status, mut raw) = s.daemon.connect(&target);
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    let mut got = vec![0u8; GREETING.len()];
    raw.read_exact(&mut got).expect("greeting");
    assert_eq!(got, GREETING);
}

// The dialer itself, without a daemon: its reading of replies as Go
// reads them.

/// A reader that hands out its chunks one read at a time, as a socket
/// does with separate segments.
struct Chunks(Vec<Vec<u8>>);

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() {
            return Ok(0);
        }
        let mut c = self.0.remove(0);
        let n = c.len().min(buf.len());
        if n < c.len() {
            self.0.insert(0, c.split_off(n));
        }
        buf[..n].copy_from_slice(&c[..n]);
        Ok(n)
    }
}

fn head_of(chunks: &[&[u8]]) -> (Result<(u16, String), DialError>, usize) {
    let mut br = GoBufReader::new(Chunks(chunks.iter().map(|c| c.to_vec()).collect()));
    let r = read_response_head(&mut br);
    (r, br.buffered())
}

#[test]
fn the_reply_is_read_as_go_reads_it() {
    let (r, left) = head_of(&[b"HTTP/1.1 200 Connection established\r\n\r\n"]);
    assert_eq!(r.unwrap().0, 200);
    assert_eq!(left, 0);
    // Bytes in the same read as the head stay buffered.
    let (r, left) = head_of(&[b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-x\r\n"]);
    assert_eq!(r.unwrap().0, 200);
    assert_eq!(left, 11);
    // ...but not bytes of a later read.
    let (_, left) = head_of(&[b"HTTP/1.1 200 OK\r\n\r\n", b"later"]);
    assert_eq!(left, 0);
    let (r, _) = head_of(&[b"HTTP/1.1 403 Forbidden: x\r\nContent-Length: 0\r\n\r\n"]);
    let (code, status) = r.unwrap();
    assert_eq!((code, status.as_str()), (403, "403 Forbidden: x"));
    for bad in [
        &b"HTTP/1.1200 OK\r\n\r\n"[..],
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/11 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n X: y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    ] {
        assert!(
            matches!(head_of(&[bad]).0, Err(DialError::Malformed(_))),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(matches!(
        head_of(&[b"HTTP/1.1 200 OK\r\n"]).0,
        Err(DialError::Read(_))
    ));
    // A long header line spans several buffers; past 1 MiB it fails.
    let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 10_000));
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(head_of(&[&long]).0.unwrap().0, 200);
    let mut huge = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', MAX_REPLY_BYTES));
    assert!(matches!(head_of(&[&huge]).0, Err(DialError::TooLarge)));
}

#[test]
fn sni_is_the_url_host_and_none_for_an_ip() {
    assert_eq!(sni_for("https://127.0.0.1:8132"), None);
    assert_eq!(sni_for("https://[::1]:8132"), None);
    assert_eq!(
        sni_for("https://egress.example:8132/x").as_deref(),
        Some("egress.example")
    );
}
