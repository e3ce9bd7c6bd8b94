//! Integration-test harness: a throwaway cluster of network namespaces, each
//! running a real OpenSSH sshd and small Python servers, plus a handle on a
//! `tunneler run` daemon configured for that cluster.
//!
//! Layout for slot `n` (allocated per cluster, unique across threads and
//! processes):
//! - host bridge `tnlbr<n>` with 10.200.n.1/24;
//! - node `i` (1-based) lives in namespace `tnl<n>-<i>`, reached through the
//!   veth pair `tv<n>h<i>` (host, on the bridge) / `tv<n>n<i>` (node), with the
//!   SSH address 10.200.n.(10+i)/24 and no default route;
//! - on the node's `lo`: pod address 10.201.n.(16i+1)/32 (pod CIDR
//!   10.201.n.(16i)/28), its own service address 10.202.n.(10+i)/32, and the
//!   shared "anycast" service address 10.202.n.100/32 that every node has;
//! - line echo server on port 7000 (`node=<name> local=<ip> echo=<line>`) and
//!   HTTP server on port 8080 (body `node=<name>`), both on 0.0.0.0.
//!
//! Only node SSH addresses on our own bridge are ever dialled from the host
//! namespace; pod and service addresses are reached through the daemon only.
//!
//! Everything is torn down in `Drop`, also when a test panics.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where slot lock directories live.
const SLOT_ROOT: &str = "/tmp/tunneler-test-slots";
/// Slots 1..=MAX_SLOT are for tests; 240 and above are left to the demo.
const MAX_SLOT: u32 = 239;
/// Port of the line echo server in every namespace.
pub const ECHO_PORT: u16 = 7000;
/// Port of the HTTP server in every namespace.
pub const HTTP_PORT: u16 = 8080;
/// Port of the server that writes endlessly to whoever connects.
pub const FLOOD_PORT: u16 = 7001;
/// Last octet of the service address every node carries.
pub const ANYCAST_OCTET: u8 = 100;

/// Python servers run inside each namespace (shared with the demo).
const SERVER_PY: &str = include_str!("../../deploy/demo/node-servers.py");

// ---------------------------------------------------------------------------
// Environment checks
// ---------------------------------------------------------------------------

/// Returns `Err(reason)` when this machine cannot run the namespace tests.
fn environment() -> &'static Result<(), String> {
    static ENV: OnceLock<Result<(), String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("?")
            .to_string();
        if uid != "0" {
            return Err(format!("effective uid is {uid}, not 0"));
        }
        for bin in ["/usr/sbin/sshd", "/usr/bin/ssh-keygen", "/usr/bin/python3"] {
            if !Path::new(bin).exists() {
                return Err(format!("{bin} missing"));
            }
        }
        let probe = format!("tnlprobe{}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &probe]).output();
        match out {
            Ok(o) if o.status.success() => {
                let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            }
            Ok(o) => {
                return Err(format!(
                    "ip netns add failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Err(format!("ip netns add failed: {e}")),
        }
        let _ = fs::create_dir_all("/run/sshd");
        Ok(())
    })
}

/// True when the namespace tests can run; otherwise prints a SKIP line.
pub fn can_run(test: &str) -> bool {
    match environment() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIP {test}: needs root and network namespaces ({why})");
            false
        }
    }
}

/// Early-returns from a test when the environment cannot run it.
#[macro_export]
macro_rules! require_netns {
    ($name:expr) => {
        if !$crate::common::can_run($name) {
            return;
        }
    };
}

// ---------------------------------------------------------------------------
// Small process helpers
// ---------------------------------------------------------------------------

/// Runs a command and panics with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {program} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command, ignoring failure (cleanup paths).
fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(pid: u32, sig: &str) {
    run_quiet("kill", &[&format!("-{sig}"), &pid.to_string()]);
}

fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Generates an unencrypted ed25519 key pair at `path` (and `path.pub`).
pub fn ssh_keygen(path: &Path, comment: &str) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    run(
        "/usr/bin/ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            path.to_str().unwrap(),
        ],
    );
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Does `PerSourcePenalties` exist in this sshd (OpenSSH >= 9.8)? Turning it
/// off keeps a test that kills sshd from being penalised on reconnect.
fn sshd_has_penalties(dir: &Path) -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let cfg = dir.join("probe_sshd_config");
        let key = dir.join("probe_host_key");
        ssh_keygen(&key, "probe");
        fs::write(
            &cfg,
            format!("HostKey {}\nPerSourcePenalties no\n", key.display()),
        )
        .unwrap();
        let ok = run_quiet("/usr/sbin/sshd", &["-t", "-f", cfg.to_str().unwrap()]);
        let _ = fs::remove_file(&cfg);
        ok
    })
}

// ---------------------------------------------------------------------------
// Slots
// ---------------------------------------------------------------------------

/// An exclusively owned slot number; released on drop.
struct Slot {
    n: u32,
    dir: PathBuf,
}

impl Slot {
    fn acquire() -> Slot {
        fs::create_dir_all(SLOT_ROOT).unwrap();
        let me = std::process::id();
        // Start at a pid-dependent offset so parallel processes rarely race
        // for the same numbers.
        let start = me % MAX_SLOT;
        for attempt in 0..2 {
            for k in 0..MAX_SLOT {
                let n = (start + k) % MAX_SLOT + 1;
                let dir = PathBuf::from(format!("{SLOT_ROOT}/{n}"));
                match fs::create_dir(&dir) {
                    Ok(()) => {
                        fs::write(dir.join("pid"), me.to_string()).unwrap();
                        // A crashed earlier run may have left this slot's
                        // namespaces and links behind.
                        remove_slot_leftovers(n);
                        return Slot { n, dir };
                    }
                    Err(_) if attempt == 0 => continue,
                    Err(_) => {
                        // Reclaim slots whose owner is gone. Renaming first
                        // makes the reclaim atomic between racing processes.
                        let owner = fs::read_to_string(dir.join("pid"))
                            .ok()
                            .and_then(|p| p.trim().parse::<u32>().ok());
                        let stale = match owner {
                            Some(pid) => !pid_alive(pid),
                            // Being created right now, or broken long ago.
                            None => fs::metadata(&dir)
                                .and_then(|m| m.modified())
                                .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
                                .unwrap_or(false),
                        };
                        if stale {
                            kill_stale_daemon(&dir);
                            let grave = PathBuf::from(format!("{SLOT_ROOT}/.stale-{n}-{me}"));
                            if fs::rename(&dir, &grave).is_ok() {
                                let _ = fs::remove_dir_all(&grave);
                            }
                            if fs::create_dir(&dir).is_ok() {
                                fs::write(dir.join("pid"), me.to_string()).unwrap();
                                remove_slot_leftovers(n);
                                return Slot { n, dir };
                            }
                        }
                    }
                }
            }
        }
        panic!("no free test slot in {SLOT_ROOT} (1..={MAX_SLOT})");
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A test process killed hard leaves its daemon running; its pid was
/// recorded in the slot dir.
fn kill_stale_daemon(slot_dir: &Path) {
    let Some(pid) = fs::read_to_string(slot_dir.join("daemon.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("tunneler") {
        signal(pid, "KILL");
    }
}

/// Deletes namespaces `tnl<n>-*`, veths `tv<n>h*` and bridge `tnlbr<n>`.
fn remove_slot_leftovers(n: u32) {
    let prefix = format!("tnl{n}-");
    if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&prefix) {
                kill_namespace_processes(name);
                run_quiet("ip", &["netns", "del", name]);
            }
        }
    }
    let veth = format!("tv{n}h");
    if let Ok(o) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let name = line.split(':').nth(1).unwrap_or("").trim();
            let name = name.split('@').next().unwrap_or("");
            if name.starts_with(&veth) {
                run_quiet("ip", &["link", "del", name]);
            }
        }
    }
    let bridge = format!("tnlbr{n}");
    run_quiet("ip", &["link", "del", &bridge]);
}

/// SIGKILLs every process in a namespace and waits (bounded) until gone.
fn kill_namespace_processes(ns: &str) {
    for _ in 0..3 {
        let pids = netns_pids(ns);
        if pids.is_empty() {
            return;
        }
        for pid in &pids {
            signal(*pid, "KILL");
        }
        poll(Duration::from_secs(2), || {
            pids.iter().all(|p| !pid_alive(*p))
        });
    }
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// One node namespace of a [`Cluster`].
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// Node name as written in the config (`node-<i>`).
    pub name: String,
    /// Network namespace name.
    pub ns: String,
    /// SSH address on the test bridge.
    pub ip: Ipv4Addr,
    /// The node's pod CIDR (a /28).
    pub pod_cidr: String,
    /// The one pod address configured on the node's `lo`.
    pub pod_ip: Ipv4Addr,
    /// A service address only this node carries.
    pub service_ip: Ipv4Addr,
    dir: PathBuf,
    servers: Option<Child>,
}

impl Node {
    fn sshd_config(&self) -> PathBuf {
        self.dir.join("sshd_config")
    }
    fn host_key(&self) -> PathBuf {
        self.dir.join("ssh_host_ed25519_key")
    }
    /// Path of this node's sshd log.
    pub fn sshd_log(&self) -> PathBuf {
        self.dir.join("sshd.log")
    }
}

/// A set of namespace nodes with sshd and test servers, owned by one test.
pub struct Cluster {
    /// Slot number: the third octet of every address.
    pub n: u32,
    /// Nodes, `nodes[0]` is node 1.
    pub nodes: Vec<Node>,
    /// Temp directory holding keys, configs and logs.
    pub dir: PathBuf,
    /// The client private key the config refers to by default.
    pub client_key: PathBuf,
    tmp: Option<tempfile::TempDir>,
    slot: Option<Slot>,
    bridge: String,
}

impl Cluster {
    /// Builds a cluster with `n_nodes` nodes. Call [`can_run`] first.
    pub fn new(n_nodes: usize) -> Cluster {
        assert!((1..=14).contains(&n_nodes), "1..=14 nodes per cluster");
        environment()
            .as_ref()
            .expect("environment checked by can_run");
        let slot = Slot::acquire();
        let n = slot.n;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("tnl{n}."))
            .tempdir_in("/tmp")
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let mut cluster = Cluster {
            n,
            nodes: Vec::new(),
            client_key: dir.join("id_ed25519"),
            dir,
            tmp: Some(tmp),
            slot: Some(slot),
            bridge: format!("tnlbr{n}"),
        };
        // From here on Drop cleans up whatever was created.
        cluster.build(n_nodes);
        cluster
    }

    fn build(&mut self, n_nodes: usize) {
        let n = self.n;
        fs::write(self.dir.join("servers.py"), SERVER_PY).unwrap();
        ssh_keygen(&self.client_key, "tunneler-test");
        let client_pub = fs::read_to_string(pub_path(&self.client_key)).unwrap();
        self.set_authorized_keys(&format!(
            "restrict,port-forwarding,command=\"/bin/false\" {}",
            client_pub.trim()
        ));

        let br = self.bridge.clone();
        run("ip", &["link", "add", &br, "type", "bridge"]);
        run(
            "ip",
            &["addr", "add", &format!("10.200.{n}.1/24"), "dev", &br],
        );
        run("ip", &["link", "set", &br, "up"]);

        for i in 1..=n_nodes {
            let ns = format!("tnl{n}-{i}");
            let vh = format!("tv{n}h{i}");
            let vn = format!("tv{n}n{i}");
            let node_dir = self.dir.join(format!("node-{i}"));
            fs::create_dir_all(&node_dir).unwrap();
            let ip = Ipv4Addr::new(10, 200, n as u8, 10 + i as u8);
            let pod_base = 16 * i as u8;
            let node = Node {
                index: i,
                name: format!("node-{i}"),
                ns: ns.clone(),
                ip,
                pod_cidr: format!("10.201.{n}.{pod_base}/28"),
                pod_ip: Ipv4Addr::new(10, 201, n as u8, pod_base + 1),
                service_ip: Ipv4Addr::new(10, 202, n as u8, 10 + i as u8),
                dir: node_dir,
                servers: None,
            };
            self.nodes.push(node);

            run("ip", &["netns", "add", &ns]);
            run(
                "ip",
                &[
                    "link", "add", &vh, "type", "veth", "peer", "name", &vn, "netns", &ns,
                ],
            );
            run("ip", &["link", "set", &vh, "master", &br]);
            run("ip", &["link", "set", &vh, "up"]);
            let node = &self.nodes[i - 1];
            let ipn = |args: &[&str]| {
                let mut v = vec!["-n", ns.as_str()];
                v.extend_from_slice(args);
                run("ip", &v);
            };
            ipn(&["link", "set", "lo", "up"]);
            ipn(&["addr", "add", &format!("{ip}/24"), "dev", &vn]);
            ipn(&["link", "set", &vn, "up"]);
            ipn(&["addr", "add", &format!("{}/32", node.pod_ip), "dev", "lo"]);
            ipn(&[
                "addr",
                "add",
                &format!("{}/32", node.service_ip),
                "dev",
                "lo",
            ]);
            ipn(&[
                "addr",
                "add",
                &format!("10.202.{n}.{ANYCAST_OCTET}/32"),
                "dev",
                "lo",
            ]);

            ssh_keygen(&node.host_key(), &format!("host-{}", node.name));
            self.write_sshd_config(i);
            self.start_servers(i);
            self.start_sshd(i);
        }
        self.write_known_hosts();
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Path of the Unix egress listener the default config uses.
    pub fn egress_socket(&self) -> PathBuf {
        self.dir.join("egress.sock")
    }

    /// Path of the admin socket the default config uses.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// Service CIDR of this cluster.
    pub fn service_cidr(&self) -> String {
        format!("10.202.{}.0/24", self.n)
    }

    /// Service address every node carries on its `lo`.
    pub fn anycast_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.n as u8, ANYCAST_OCTET)
    }

    /// Replaces authorized_keys (sshd re-reads it on every login).
    pub fn set_authorized_keys(&self, contents: &str) {
        let mut s = contents.trim_end().to_string();
        s.push('\n');
        fs::write(self.dir.join("authorized_keys"), s).unwrap();
    }

    fn write_sshd_config(&self, i: usize) {
        let node = self.node(i);
        let mut cfg = format!(
            "ListenAddress {ip}\n\
             Port 22\n\
             HostKey {key}\n\
             AuthorizedKeysFile {ak}\n\
             PidFile {dir}/sshd.pid\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             AllowTcpForwarding yes\n\
             PermitRootLogin prohibit-password\n\
             MaxStartups 100\n\
             LogLevel VERBOSE\n",
            ip = node.ip,
            key = node.host_key().display(),
            ak = self.dir.join("authorized_keys").display(),
            dir = node.dir.display(),
        );
        if sshd_has_penalties(&self.dir) {
            cfg.push_str("PerSourcePenalties no\n");
        }
        fs::write(node.sshd_config(), cfg).unwrap();
    }

    /// known_hosts with one plain line per node built from the host keys.
    pub fn write_known_hosts(&self) {
        let mut s = String::new();
        for node in &self.nodes {
            let pubkey = fs::read_to_string(pub_path(&node.host_key())).unwrap();
            let mut parts = pubkey.split_whitespace();
            let (kt, kb) = (parts.next().unwrap(), parts.next().unwrap());
            s.push_str(&format!("{} {kt} {kb}\n", node.ip));
        }
        fs::write(self.dir.join("known_hosts"), s).unwrap();
    }

    fn start_servers(&mut self, i: usize) {
        let node = &self.nodes[i - 1];
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.ns, "/usr/bin/python3", "-u"])
            .arg(self.dir.join("servers.py"))
            .args([
                node.name.as_str(),
                &ECHO_PORT.to_string(),
                &HTTP_PORT.to_string(),
                &FLOOD_PORT.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(node.dir.join("servers.log")).unwrap())
            .spawn()
            .expect("spawn python servers");
        // The script prints "ready" once both sockets are bound, or exits
        // (closing stdout) when it cannot bind.
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let _ = out.read_line(&mut line);
        let ok = line.trim() == "ready";
        self.nodes[i - 1].servers = Some(child);
        if !ok {
            let log = fs::read_to_string(self.nodes[i - 1].dir.join("servers.log"));
            panic!(
                "python servers in {} did not start: {log:?}",
                self.nodes[i - 1].ns
            );
        }
    }

    /// Starts sshd in node `i`'s namespace and waits until it accepts.
    pub fn start_sshd(&self, i: usize) {
        let node = self.node(i);
        // sshd daemonizes; its stdio goes to a file so nothing waits on a pipe.
        let start_log = node.dir.join("sshd.start.log");
        let out = fs::File::create(&start_log).unwrap();
        let status = Command::new("ip")
            .args(["netns", "exec", &node.ns, "/usr/sbin/sshd", "-f"])
            .arg(node.sshd_config())
            .arg("-E")
            .arg(node.sshd_log())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .status()
            .expect("spawn sshd");
        assert!(
            status.success(),
            "sshd in {} failed to start ({status}): {}",
            node.ns,
            fs::read_to_string(&start_log).unwrap_or_default()
        );
        let addr = SocketAddr::from((node.ip, 22));
        let up = poll(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .map(|mut s| {
                    // Read the banner so sshd sees an orderly client.
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = [0u8; 4];
                    s.read(&mut buf).map(|n| n > 0).unwrap_or(false)
                })
                .unwrap_or(false)
        });
        assert!(
            up,
            "sshd in {} did not come up: {}",
            node.ns,
            fs::read_to_string(node.sshd_log()).unwrap_or_default()
        );
    }

    /// Kills every sshd process (listener and per-connection children) in
    /// node `i`'s namespace and waits until they are gone.
    pub fn kill_sshd(&self, i: usize) {
        let ns = &self.node(i).ns;
        let gone = poll(Duration::from_secs(5), || {
            let pids: Vec<u32> = netns_pids(ns)
                .into_iter()
                .filter(|p| comm(*p).starts_with("sshd"))
                .collect();
            for p in &pids {
                signal(*p, "KILL");
            }
            pids.is_empty()
        });
        assert!(gone, "sshd processes in {ns} survived SIGKILL");
    }

    /// Gives node `i` a new host key and restarts its sshd, so known_hosts
    /// no longer matches it.
    pub fn replace_host_key(&self, i: usize) {
        self.kill_sshd(i);
        let node = self.node(i);
        ssh_keygen(&node.host_key(), &format!("host-{}-replaced", node.name));
        self.start_sshd(i);
    }

    /// Makes `ip` a silent black hole inside node `i`: a route through a
    /// made-up neighbour on the node's veth, so a TCP connect to it from
    /// the node hangs (the SYNs go to a MAC nobody has, and never leave the
    /// test bridge) instead of failing fast.
    pub fn blackhole(&self, i: usize, ip: Ipv4Addr) {
        let node = self.node(i);
        let dev = format!("tv{}n{}", self.n, i);
        let gw = format!("10.200.{}.250", self.n);
        let ns = node.ns.as_str();
        run_quiet(
            "ip",
            &[
                "-n",
                ns,
                "neigh",
                "replace",
                &gw,
                "lladdr",
                "02:00:00:00:00:fa",
                "dev",
                &dev,
                "nud",
                "permanent",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "replace",
                &format!("{ip}/32"),
                "via",
                &gw,
                "dev",
                &dev,
            ],
        );
    }

    /// Takes node `i`'s host-side veth down: a silent link loss, with no
    /// FIN or RST reaching either side.
    pub fn link_down(&self, i: usize) {
        run(
            "ip",
            &["link", "set", &format!("tv{}h{}", self.n, i), "down"],
        );
    }

    /// Undoes [`Cluster::link_down`].
    pub fn link_up(&self, i: usize) {
        run("ip", &["link", "set", &format!("tv{}h{}", self.n, i), "up"]);
    }

    /// TOML config for this cluster. `spec` selects nodes and extras.
    pub fn config_toml(&self, spec: &ConfigSpec) -> String {
        let identity = spec
            .identity_file
            .clone()
            .unwrap_or_else(|| "id_ed25519".to_string());
        let service_cidrs = spec
            .service_cidrs
            .clone()
            .unwrap_or_else(|| vec![self.service_cidr()]);
        let quoted = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = format!(
            r#"[ssh]
user = "root"
identity_file = {identity:?}
known_hosts_file = "known_hosts"
port = 22
connect_timeout = "2s"
keepalive_interval = "1s"
keepalive_max = 3

[reconnect]
initial_backoff = "100ms"
max_backoff = "1s"

[proxy]
listen = ["unix://{egress}", "tcp://127.0.0.1:0"]
service_cidrs = [{svc}]
dial_timeout = "2s"

[admin]
socket = "{admin}"
"#,
            egress = self.egress_socket().display(),
            admin = self.admin_socket().display(),
            svc = quoted(&service_cidrs),
        );
        let selected: Vec<usize> = spec
            .nodes
            .clone()
            .unwrap_or_else(|| (1..=self.nodes.len()).collect());
        for i in selected {
            let node = self.node(i);
            s.push_str(&format!(
                "\n[[node]]\nname = \"{}\"\naddress = \"{}\"\npod_cidrs = [\"{}\"]\n",
                node.name, node.ip, node.pod_cidr
            ));
        }
        s.push_str(&spec.extra);
        s
    }

    /// Writes `config.toml` into the cluster dir and returns its path.
    pub fn write_config(&self, spec: &ConfigSpec) -> PathBuf {
        let path = self.dir.join("config.toml");
        fs::write(&path, self.config_toml(spec)).unwrap();
        path
    }

    /// Tail of every node's sshd log, for failure reports.
    fn dump_logs(&self) {
        for node in &self.nodes {
            let log = fs::read_to_string(node.sshd_log()).unwrap_or_default();
            eprintln!("---- sshd log {} (tail) ----\n{}", node.ns, tail(&log, 20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for node in &mut self.nodes {
            if let Some(mut c) = node.servers.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            kill_namespace_processes(&node.ns);
            run_quiet("ip", &["netns", "del", &node.ns]);
            run_quiet(
                "ip",
                &["link", "del", &format!("tv{}h{}", self.n, node.index)],
            );
        }
        run_quiet("ip", &["link", "del", &self.bridge]);
        if std::env::var_os("TUNNELER_TEST_KEEP").is_some() {
            if let Some(t) = self.tmp.take() {
                eprintln!("keeping {}", t.keep().display());
            }
        }
        drop(self.tmp.take());
        // The slot goes last, once nothing of ours is left in the kernel.
        drop(self.slot.take());
    }
}

/// Options for [`Cluster::config_toml`].
#[derive(Clone, Default)]
pub struct ConfigSpec {
    /// Which nodes (1-based) to list; all when `None`.
    pub nodes: Option<Vec<usize>>,
    /// `ssh.identity_file`; `"id_ed25519"` (relative to the config) when `None`.
    pub identity_file: Option<String>,
    /// `proxy.service_cidrs`; the cluster's 10.202.n.0/24 when `None`.
    pub service_cidrs: Option<Vec<String>>,
    /// Appended verbatim at the end (after the `[[node]]` tables).
    pub extra: String,
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------

/// A running `tunneler run` process; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    /// The config file it was started with.
    pub config: PathBuf,
    /// Admin socket path.
    pub admin: PathBuf,
    /// Unix egress listener path.
    pub egress: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
}

/// Path of the binary under test.
pub fn tunneler_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tunneler")
}

impl Daemon {
    /// Starts the daemon on the cluster's default config.
    pub fn start(cluster: &Cluster) -> Daemon {
        Daemon::start_with(cluster, &ConfigSpec::default())
    }

    /// Starts the daemon with a config built from `spec`, and waits until
    /// the admin socket answers.
    pub fn start_with(cluster: &Cluster, spec: &ConfigSpec) -> Daemon {
        let config = cluster.write_config(spec);
        let log = cluster.dir.join("daemon.log");
        let child = Command::new(tunneler_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,tunneler=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(fs::File::create(cluster.dir.join("daemon.stdout")).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tunneler run");
        if let Some(slot) = &cluster.slot {
            let _ = fs::write(slot.dir.join("daemon.pid"), child.id().to_string());
        }
        let mut d = Daemon {
            child: Some(child),
            config,
            admin: cluster.admin_socket(),
            egress: cluster.egress_socket(),
            log,
        };
        let mut last = String::new();
        let ok = poll(Duration::from_secs(15), || {
            if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
                last = format!("daemon exited: {st}");
                return true;
            }
            match d.try_status() {
                Ok(_) => true,
                Err(e) => {
                    last = e;
                    false
                }
            }
        });
        assert!(
            ok && d.try_status().is_ok(),
            "daemon admin socket never answered: {last}"
        );
        d
    }

    /// Process id of the daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `GET /v1/status`, or an error string.
    pub fn try_status(&self) -> Result<Value, String> {
        let (code, body) = admin_get(&self.admin, "/v1/status")?;
        if code != 200 {
            return Err(format!("status {code}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("bad json ({e}): {body}"))
    }

    /// `GET /v1/status`; panics when the admin API does not answer.
    pub fn status_json(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("admin status: {e}"))
    }

    /// Polls the status until `cond` holds; panics with the last status
    /// after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = poll(timeout, || match self.try_status() {
            Ok(v) => {
                let hit = cond(&v);
                last = v;
                hit
            }
            Err(e) => {
                last = Value::String(e);
                false
            }
        });
        assert!(
            ok,
            "timed out after {timeout:?} waiting for {what}; last status:\n{}",
            serde_json::to_string_pretty(&last).unwrap()
        );
        last
    }

    /// Waits until every listed node is healthy.
    pub fn wait_all_healthy(&self, timeout: Duration) -> Value {
        self.wait_for("all nodes healthy", timeout, |s| {
            s["nodes"]
                .as_array()
                .map(|n| !n.is_empty() && n.iter().all(|n| n["state"] == "healthy"))
                .unwrap_or(false)
        })
    }

    /// Waits until node `name` has `state`.
    pub fn wait_node_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        self.wait_for(&format!("{name} {state}"), timeout, |s| {
            node_status(s, name)
                .map(|n| n["state"] == state)
                .unwrap_or(false)
        })
    }

    /// Waits until node `name` is in any state other than healthy.
    pub fn wait_node_unhealthy(&self, name: &str, timeout: Duration) -> Value {
        self.wait_for(&format!("{name} not healthy"), timeout, |s| {
            node_status(s, name)
                .map(|n| n["state"] != "healthy")
                .unwrap_or(false)
        })
    }

    /// The TCP egress listener's address, from the status `listeners`.
    pub fn tcp_listener(&self) -> SocketAddr {
        let s = self.status_json();
        s["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .find_map(|l| l.strip_prefix("tcp://"))
            .unwrap_or_else(|| panic!("no tcp listener in status: {s}"))
            .parse()
            .expect("tcp listener address")
    }

    /// CONNECT through the Unix listener.
    pub fn connect(&self, target: &str) -> (String, UnixStream) {
        let mut s = UnixStream::connect(&self.egress).expect("connect egress socket");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        let line = send_connect(&mut s, target);
        (line, s)
    }

    /// CONNECT through the TCP listener.
    pub fn connect_tcp(&self, target: &str) -> (String, TcpStream) {
        let mut s = TcpStream::connect(self.tcp_listener()).expect("connect egress tcp");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        let line = send_connect(&mut s, target);
        (line, s)
    }

    /// Sends raw bytes to the Unix listener and returns the response head.
    pub fn raw_request(&self, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(&self.egress).expect("connect egress socket");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(bytes).unwrap();
        read_head(&mut s)
    }

    /// CONNECT to `target` over the Unix listener, send `line`, return the
    /// echo server's answer. Panics unless the CONNECT got 200.
    pub fn echo(&self, target: &str, line: &str) -> String {
        let (status, s) = self.connect(target);
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "CONNECT {target}: {status}"
        );
        echo_over(s, line)
    }

    /// Last `lines` lines of the daemon log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), lines)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.stop_with("TERM")
    }

    /// Sends `sig` (a `kill` signal name) and waits (bounded, 10 s) for the
    /// exit status; SIGKILLs it after that.
    pub fn stop_with(&mut self, sig: &str) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log {} (tail) ----\n{}",
                self.log.display(),
                self.log_tail(60)
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The status entry for node `name`.
pub fn node_status<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
}

/// Writes `line` to an established tunnel and reads one answer line.
pub fn echo_over<S: Read + Write>(mut s: S, line: &str) -> String {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {
                if byte[0] == b'\n' {
                    break;
                }
                answer.push(byte[0]);
            }
            Err(e) => panic!("reading echo answer: {e} (got {answer:?})"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends a kube-apiserver style CONNECT and returns the status line.
pub fn send_connect<S: Read + Write>(s: &mut S, target: &str) -> String {
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(s);
    head.lines().next().unwrap_or("").to_string()
}

/// Reads a response head byte by byte up to and including `\r\n\r\n`, so
/// that no tunnel byte is consumed. Returns what was read on EOF.
pub fn read_head<S: Read>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            Err(e) => panic!(
                "reading response head: {e} (got {:?})",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Minimal HTTP/1.1 GET over a Unix socket: returns (status code, body).
pub fn admin_get(socket: &Path, path: &str) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding") && l.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Runs the tunneler binary with `args` and returns its output.
pub fn tunneler(args: &[&str]) -> Output {
    Command::new(tunneler_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tunneler")
}

/// stdout and stderr of `out` joined, for message assertions.
pub fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
