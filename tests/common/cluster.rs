//! The namespace cluster: nodes with sshd and test servers, and the
//! config that points a daemon at them.

use super::*;

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
    /// IPv6 pod CIDR `fd00:201:<n>:<i>::/64`, listed in the config too.
    pub pod_cidr6: String,
    /// IPv6 pod address on `lo`; `None` when the kernel has no IPv6.
    pub pod_ip6: Option<Ipv6Addr>,
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
    pub(super) slot: Option<Slot>,
    /// Further slots whose address blocks [`Cluster::add_local_addresses`]
    /// borrowed; released after everything else.
    extra_slots: Vec<Slot>,
    /// Address blocks [`Cluster::add_local_addresses`] has handed out.
    local_blocks: usize,
    bridge: String,
    opts: ClusterOptions,
}

/// How [`Cluster::with_options`] builds its nodes. The default is the test
/// layout that [`Cluster::new`] builds.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Pod and service addresses on each node's `lo` plus the Python
    /// servers. Without them a node runs only sshd, and a cluster may have
    /// up to [`MAX_BARE_NODES`] nodes instead of 14.
    pub servers: bool,
    /// sshd listens on the wildcard address instead of the node IP, so it
    /// also answers on addresses added by [`Cluster::add_local_addresses`].
    pub sshd_listen_any: bool,
    /// sshd's `MaxStartups`.
    pub max_startups: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            servers: true,
            sshd_listen_any: false,
            max_startups: "100".into(),
        }
    }
}

/// Node limit of a cluster built without servers (addresses 10.200.n.11
/// up to 10.200.n.210).
pub const MAX_BARE_NODES: usize = 200;

impl Cluster {
    /// Builds a cluster with `n_nodes` nodes. Call [`can_run`] first.
    pub fn new(n_nodes: usize) -> Cluster {
        Cluster::with_options(n_nodes, ClusterOptions::default())
    }

    /// Builds a cluster with `n_nodes` nodes laid out as `opts` says. Call
    /// [`can_run`] first.
    pub fn with_options(n_nodes: usize, opts: ClusterOptions) -> Cluster {
        let max = if opts.servers { 14 } else { MAX_BARE_NODES };
        assert!(
            (1..=max).contains(&n_nodes),
            "1..={max} nodes per cluster with these options"
        );
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
            extra_slots: Vec::new(),
            local_blocks: 0,
            bridge: format!("tnlbr{n}"),
            opts,
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
            let servers = self.opts.servers;
            // Bare nodes have no pod or service addresses (and may number
            // more than the 16 /28s that fit into 10.201.n.0/24).
            let pod_base = if servers { 16 * i as u8 } else { 0 };
            let node = Node {
                index: i,
                name: format!("node-{i}"),
                ns: ns.clone(),
                ip,
                pod_cidr: if servers {
                    format!("10.201.{n}.{pod_base}/28")
                } else {
                    String::new()
                },
                pod_ip: Ipv4Addr::new(10, 201, n as u8, pod_base + 5),
                service_ip: Ipv4Addr::new(10, 202, n as u8, 10 + i as u8),
                pod_cidr6: if servers {
                    format!("fd00:201:{n}:{i}::/64")
                } else {
                    String::new()
                },
                pod_ip6: None,
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
            if !servers {
                ssh_keygen(&node.host_key(), &format!("host-{}", node.name));
                self.write_sshd_config(i);
                self.start_sshd(i);
                continue;
            }
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

            let ip6: Ipv6Addr = format!("fd00:201:{n}:{i}::5").parse().unwrap();
            let has_v6 = run_quiet(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip6}/128"), "dev", "lo"],
            );

            ssh_keygen(&node.host_key(), &format!("host-{}", node.name));
            self.nodes[i - 1].pod_ip6 = has_v6.then_some(ip6);
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
        let listen = if self.opts.sshd_listen_any {
            "0.0.0.0".to_string()
        } else {
            node.ip.to_string()
        };
        let mut cfg = format!(
            "ListenAddress {listen}\n\
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
             MaxStartups {startups}\n\
             LogLevel VERBOSE\n",
            startups = self.opts.max_startups,
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
        self.spawn_servers(i, HTTP_PORT, "servers.log", "start");
    }

    /// Starts node `i`'s Python servers (echo, HTTP on `http_port`, flood)
    /// with stderr to `<node dir>/<log>`, and panics unless they report
    /// `ready`. `what` names the step in the panic message.
    fn spawn_servers(&mut self, i: usize, http_port: u16, log: &str, what: &str) {
        let node = &self.nodes[i - 1];
        let mut child = die_with_test(&mut Command::new("ip"))
            .args(["netns", "exec", &node.ns, "/usr/bin/python3", "-u"])
            .arg(self.dir.join("servers.py"))
            .args([
                node.name.as_str(),
                &ECHO_PORT.to_string(),
                &http_port.to_string(),
                &FLOOD_PORT.to_string(),
                &RAW_ECHO_PORT.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(node.dir.join(log)).unwrap())
            .spawn()
            .expect("spawn python servers");
        // The script prints "ready" once its sockets are bound, or exits
        // (closing stdout) when it cannot bind.
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let _ = out.read_line(&mut line);
        self.nodes[i - 1].servers = Some(child);
        if line.trim() != "ready" {
            let log = fs::read_to_string(self.nodes[i - 1].dir.join(log));
            panic!(
                "python servers in {} did not {what}: {log:?}",
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

    /// Puts `ip` on node `i`'s `lo`, as a pod or host address of a pod
    /// network that no Node describes, and routes it from every other node
    /// namespace to node `i` over the test bridge (a pod network is
    /// routable from every node). The host namespace gets no route: the
    /// address is reached through a node only. Gone with the namespaces.
    pub fn add_pod_network_address(&self, i: usize, ip: Ipv4Addr) {
        let node = self.node(i);
        run(
            "ip",
            &[
                "-n",
                &node.ns,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "lo",
            ],
        );
        for other in self.nodes.iter().filter(|o| o.index != i) {
            run(
                "ip",
                &[
                    "-n",
                    &other.ns,
                    "route",
                    "add",
                    &format!("{ip}/32"),
                    "via",
                    &node.ip.to_string(),
                    "dev",
                    &format!("tv{}n{}", self.n, other.index),
                ],
            );
        }
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

    /// Gives node `i` `count` more IPv4 addresses, for simulating many
    /// nodes behind one sshd (build the cluster with `servers: false` and
    /// `sshd_listen_any: true`). The addresses come in /24 blocks
    /// 10.201.s.0/24, 10.202.s.0/24 and 10.203.s.0/24 (.1 to .254) of this
    /// cluster's slot `s`, then of further slots acquired for the purpose.
    /// Each block is one address with its prefix on the node's `lo` (which
    /// makes the whole block local) and one host route via the node's SSH
    /// address, so the host keeps a single neighbour entry. Calls for
    /// several nodes each get blocks of their own.
    pub fn add_local_addresses(&mut self, i: usize, count: usize) -> Vec<Ipv4Addr> {
        assert!(
            !self.opts.servers,
            "pod and service addresses use these blocks in the test layout"
        );
        let (ns, gw) = (self.node(i).ns.clone(), self.node(i).ip);
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            // Each block goes to one namespace only: a later call (for
            // another node) starts at the next unused block.
            let k = self.local_blocks / 3;
            let b = [201u8, 202, 203][self.local_blocks % 3];
            self.local_blocks += 1;
            if k > self.extra_slots.len() {
                self.extra_slots.push(Slot::acquire());
            }
            let s = if k == 0 {
                self.n
            } else {
                self.extra_slots[k - 1].n
            };
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("10.{b}.{s}.1/24"),
                    "dev",
                    "lo",
                ],
            );
            run(
                "ip",
                &[
                    "route",
                    "add",
                    &format!("10.{b}.{s}.0/24"),
                    "via",
                    &gw.to_string(),
                    "dev",
                    &self.bridge,
                ],
            );
            for host in 1..=254u8 {
                if out.len() >= count {
                    break;
                }
                out.push(Ipv4Addr::new(10, b, s as u8, host));
            }
        }
        out
    }

    /// Appends known_hosts lines giving `ips` node `i`'s host key.
    pub fn add_known_hosts(&self, i: usize, ips: &[Ipv4Addr]) {
        let pubkey = fs::read_to_string(pub_path(&self.node(i).host_key())).unwrap();
        let mut parts = pubkey.split_whitespace();
        let (kt, kb) = (parts.next().unwrap(), parts.next().unwrap());
        let mut s = fs::read_to_string(self.dir.join("known_hosts")).unwrap_or_default();
        for ip in ips {
            s.push_str(&format!("{ip} {kt} {kb}\n"));
        }
        fs::write(self.dir.join("known_hosts"), s).unwrap();
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
        let ssh_extra = &spec.ssh_extra;
        // The test servers listen on the nodes' own addresses too, and node
        // addresses allow only the kubelet and `node_ports`.
        let node_ports = spec
            .node_ports
            .clone()
            .unwrap_or_else(|| vec![ECHO_PORT, FLOOD_PORT, RAW_ECHO_PORT, HTTP_PORT])
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            r#"[ssh]
user = "root"
identity_file = {identity:?}
known_hosts_file = "known_hosts"
port = 22
connect_timeout = "2s"
keepalive_interval = "1s"
keepalive_max = 3
{ssh_extra}

[reconnect]
initial_backoff = "100ms"
max_backoff = "1s"

[proxy]
listen = ["unix://{egress}", "tcp://127.0.0.1:0"]
service_cidrs = [{svc}]
dial_timeout = "2s"
node_ports = [{node_ports}]

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
            if node.pod_cidr.is_empty() {
                s.push_str(&format!(
                    "\n[[node]]\nname = \"{}\"\naddress = \"{}\"\n",
                    node.name, node.ip
                ));
            } else {
                s.push_str(&format!(
                    "\n[[node]]\nname = \"{}\"\naddress = \"{}\"\npod_cidrs = [\"{}\", \"{}\"]\n",
                    node.name, node.ip, node.pod_cidr, node.pod_cidr6
                ));
            }
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
        // Deleting the bridge also removes the host routes that
        // add_local_addresses pointed through it.
        run_quiet("ip", &["link", "del", &self.bridge]);
        if std::env::var_os("TUNNELER_TEST_KEEP").is_some() {
            if let Some(t) = self.tmp.take() {
                eprintln!("keeping {}", t.keep().display());
            }
        }
        drop(self.tmp.take());
        // The slot goes last, once nothing of ours is left in the kernel.
        drop(self.slot.take());
        self.extra_slots.clear();
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
    /// Extra lines inside the `[ssh]` table.
    pub ssh_extra: String,
    /// `proxy.node_ports`; the test servers' ports (echo, flood, HTTP)
    /// when `None`.
    pub node_ports: Option<Vec<u16>>,
}

// ---------------------------------------------------------------------------
// Helpers for the control, operability and local-security tests
// ---------------------------------------------------------------------------

impl Cluster {
    /// Replaces node `i`'s Python servers with ones whose HTTP server listens
    /// on `http_port` instead (echo and flood stay on their ports). Used to
    /// make an HTTP health probe on `HTTP_PORT` fail on one node while its
    /// echo server keeps answering.
    pub fn restart_servers_with_http_port(&mut self, i: usize, http_port: u16) {
        if let Some(mut c) = self.nodes[i - 1].servers.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn_servers(i, http_port, "servers2.log", "restart");
    }

    /// Starts `program args` inside node `i`'s namespace (stdout and stderr
    /// to `<node dir>/<log>`). The cluster's teardown kills it with every
    /// other process of the namespace.
    pub fn spawn_in_node(&self, i: usize, log: &str, program: &str, args: &[&str]) -> Child {
        let node = self.node(i);
        let out = fs::File::create(node.dir.join(log)).unwrap();
        die_with_test(&mut Command::new("ip"))
            .args(["netns", "exec", &node.ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in {}: {e}", node.ns))
    }

    /// Waits (bounded) until something listens on `ip:port` inside node
    /// `i`'s namespace; returns whether it does.
    pub fn wait_listening_in_node(&self, i: usize, ip: &str, port: u16, timeout: Duration) -> bool {
        let ns = self.node(i).ns.clone();
        let script = format!(
            "import socket,sys\ns=socket.socket()\ns.settimeout(0.5)\n\
             sys.exit(0 if s.connect_ex(('{ip}',{port}))==0 else 1)"
        );
        poll(timeout, || {
            run_quiet(
                "ip",
                &["netns", "exec", &ns, "/usr/bin/python3", "-c", &script],
            )
        })
    }

    /// Established TCP connections from the host namespace to node `i`'s
    /// sshd (the daemon's SSH sessions to it). Panics when `ss` fails, so a
    /// broken probe can never read as "no sessions".
    pub fn ssh_sessions_to(&self, i: usize) -> usize {
        self.ssh_session_ports(i).len()
    }

    /// The local (host-side) ports of the SSH sessions to node `i`, sorted:
    /// one per TCP connection, so a replaced session shows as a new port.
    pub fn ssh_session_ports(&self, i: usize) -> Vec<u16> {
        let ip = self.node(i).ip;
        let out = run("ss", &["-Htn", "state", "established"]);
        let want = format!("{ip}:22");
        let mut ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                // With a state filter the columns are Recv-Q Send-Q Local Peer.
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.get(3) != Some(&want.as_str()) {
                    return None;
                }
                f.get(2)?.rsplit(':').next()?.parse().ok()
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    /// For the TCP connections inside node `i`'s namespace to `port`, the
    /// pid of the process that holds each one (for a tunnelled stream, the
    /// sshd session process that carries it), sorted. Panics when `ss`
    /// fails or a connection shows no process.
    pub fn peer_pids_in_node(&self, i: usize, port: u16) -> Vec<u32> {
        let ns = &self.node(i).ns;
        let filter = format!("( dport = :{port} )");
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "ss",
                "-Htnp",
                "state",
                "established",
                &filter,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut pids: Vec<u32> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.split("pid=")
                    .nth(1)
                    .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no pid in ss line {l:?}"))
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// A `kubectl get nodes -o json` style `Node` object for node `i`, with
    /// its SSH address as InternalIP and a Hostname address; `pod_cidrs`
    /// become `spec.podCIDRs` (and the first one `spec.podCIDR`).
    pub fn k8s_node_json(&self, i: usize, pod_cidrs: &[&str]) -> Value {
        let node = self.node(i);
        let mut spec = serde_json::json!({ "providerID": format!("test://{}", node.name) });
        if let Some(first) = pod_cidrs.first() {
            spec["podCIDR"] = Value::from(*first);
            spec["podCIDRs"] = Value::from(pod_cidrs.to_vec());
        }
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "uid": format!("00000000-0000-0000-0000-{:012}", i),
                "resourceVersion": "1",
                "labels": { "kubernetes.io/hostname": node.name },
            },
            "spec": spec,
            "status": {
                "addresses": [
                    { "type": "InternalIP", "address": node.ip.to_string() },
                    { "type": "Hostname", "address": node.name },
                ],
                "conditions": [{ "type": "Ready", "status": "True" }],
            },
        })
    }

    /// Atomically replaces `path` with `contents` (temp file + rename), as
    /// a node-list writer should.
    pub fn replace_file(&self, path: &Path, contents: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, contents).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// A `kubectl get nodes -o json` document (`kind: List`) holding `items`.
    pub fn k8s_node_list(items: Vec<Value>) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": items,
            "metadata": { "resourceVersion": "" },
        }))
        .unwrap()
    }
}
