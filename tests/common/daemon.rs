//! A `tunneler run` process on a cluster's config, and the client side of
//! its admin API and egress listeners.

use super::*;

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
    /// Records the pid so a later run can kill it if this process crashes.
    pid_file: Option<PathBuf>,
}

/// Path of the binary under test: this crate's `tunneler`, or
/// `TUNNELER_TEST_BIN` when set (another build, or a profiling wrapper that
/// `exec`s one, for the benchmark).
pub fn tunneler_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("TUNNELER_TEST_BIN")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_tunneler").to_string())
    })
}

impl Daemon {
    /// Starts the daemon on the cluster's default config.
    pub fn start(cluster: &Cluster) -> Daemon {
        Daemon::start_with(cluster, &ConfigSpec::default())
    }

    /// Starts the daemon with a config built from `spec`, and waits until
    /// the admin socket answers.
    pub fn start_with(cluster: &Cluster, spec: &ConfigSpec) -> Daemon {
        Daemon::start_toml(cluster, &cluster.config_toml(spec), &[])
    }

    /// Process id of the daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `GET /v1/status` decoded into the daemon's own status types, or an
    /// error string. The same types the server serialises: a renamed field
    /// is a compile error here, not a wait that times out.
    pub fn try_status(&self) -> Result<StatusDocument, String> {
        let body = self.try_status_body()?;
        serde_json::from_str(&body).map_err(|e| format!("bad status ({e}): {body}"))
    }

    fn try_status_body(&self) -> Result<String, String> {
        let (code, body) = admin_get(&self.admin, "/v1/status")?;
        if code != 200 {
            return Err(format!("status {code}: {body}"));
        }
        Ok(body)
    }

    /// `GET /v1/status`, typed; panics when the admin API does not answer.
    pub fn status(&self) -> StatusDocument {
        self.try_status()
            .unwrap_or_else(|e| panic!("admin status: {e}"))
    }

    /// Polls the typed status until `cond` holds; panics with the last
    /// status after `timeout`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&StatusDocument) -> bool,
    ) -> StatusDocument {
        let mut last: Result<StatusDocument, String> = Err("no answer yet".into());
        let ok = poll(timeout, || {
            last = self.try_status();
            last.as_ref().is_ok_and(&cond)
        });
        match last {
            Ok(doc) if ok => doc,
            Ok(doc) => panic!(
                "timed out after {timeout:?} waiting for {what}; last status:\n{}",
                serde_json::to_string_pretty(&doc).unwrap()
            ),
            Err(e) => panic!("timed out after {timeout:?} waiting for {what}; last status: {e}"),
        }
    }

    /// Waits until every listed node is healthy.
    pub fn wait_all_healthy(&self, timeout: Duration) -> StatusDocument {
        self.wait_status("all nodes healthy", timeout, |s| {
            !s.nodes.is_empty() && s.nodes.iter().all(|n| n.state == TunnelState::Healthy)
        })
    }

    /// Waits until node `name` has `state`.
    pub fn wait_node_state(
        &self,
        name: &str,
        state: TunnelState,
        timeout: Duration,
    ) -> StatusDocument {
        self.wait_status(&format!("{name} {state}"), timeout, |s| {
            find_node(s, name).is_some_and(|n| n.state == state)
        })
    }

    /// Waits until node `name` is in any state other than healthy.
    pub fn wait_node_unhealthy(&self, name: &str, timeout: Duration) -> StatusDocument {
        self.wait_status(&format!("{name} not healthy"), timeout, |s| {
            find_node(s, name).is_some_and(|n| n.state != TunnelState::Healthy)
        })
    }

    /// The TCP egress listener's address, from the status `listeners`.
    pub fn tcp_listener(&self) -> SocketAddr {
        let s = self.status();
        s.listeners
            .iter()
            .find_map(|l| l.strip_prefix("tcp://"))
            .unwrap_or_else(|| panic!("no tcp listener in status: {:?}", s.listeners))
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

    /// kube-apiserver's egress transport to this daemon's Unix listener.
    pub fn apiserver(&self) -> super::apiserver::Transport {
        super::apiserver::Transport::Unix(self.egress.clone())
    }

    /// Dials `target` as kube-apiserver's egress dialer does, over the Unix
    /// listener.
    pub fn apiserver_dial(
        &self,
        target: &str,
    ) -> Result<super::apiserver::Conn, super::apiserver::DialError> {
        super::apiserver::dial(&self.apiserver(), target)
    }

    /// As [`Daemon::echo`], with kube-apiserver's dialer: sends `line` to the
    /// echo server at `target` and returns its answer. Panics unless the
    /// dial succeeds exactly as kube-apiserver requires (200, no byte
    /// buffered after the reply).
    pub fn apiserver_echo(&self, target: &str, line: &str) -> String {
        let conn = self
            .apiserver_dial(target)
            .unwrap_or_else(|e| panic!("kube-apiserver dial {target}: {e}"));
        echo_over(conn, line)
    }

    /// The status line kube-apiserver's dialer reports for a refused dial
    /// to `target` (e.g. `403 Forbidden: …`); panics when it succeeds or
    /// fails otherwise.
    pub fn apiserver_refusal(&self, target: &str) -> (u16, String) {
        match self.apiserver_dial(target) {
            Err(super::apiserver::DialError::Status { code, status }) => (code, status),
            Err(e) => panic!("kube-apiserver dial {target}: {e}"),
            Ok(_) => panic!("kube-apiserver dial {target} succeeded"),
        }
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
        if let Some(f) = self.pid_file.take() {
            let _ = fs::remove_file(f);
        }
    }
}

/// The status entry for node `name`.
pub fn find_node<'a>(status: &'a StatusDocument, name: &str) -> Option<&'a NodeStatus> {
    status.nodes.iter().find(|n| n.name == name)
}

/// The names of the nodes in `status`, in its order (sorted by name).
pub fn node_names(status: &StatusDocument) -> Vec<String> {
    status.nodes.iter().map(|n| n.name.clone()).collect()
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!(
                "reading response head: {e} (got {:?})",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// `GET path` over a Unix socket: returns (status code, body).
pub fn admin_get(socket: &Path, path: &str) -> Result<(u16, String), String> {
    curl_unix(socket, "GET", path, None, Duration::from_secs(5))
}

/// One HTTP/1.1 request over a Unix socket, made by curl (a real client,
/// which also undoes chunked transfer encoding): returns (status code,
/// body). A POST, PUT or DELETE always carries a (JSON) body, empty when
/// `body` is `None`.
fn curl_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--path-as-is", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "--max-time"])
        .arg(timeout.as_secs().to_string())
        .args(["-w", "\n%{http_code}"]);
    if body.is_some() || method != "GET" {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(body.unwrap_or(""));
    }
    let out = cmd
        .arg(format!("http://localhost{path}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            socket.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text
        .rsplit_once('\n')
        .ok_or_else(|| format!("no status from curl in {text:?}"))?;
    let code = code
        .trim()
        .parse()
        .map_err(|_| format!("bad status {code:?} from curl"))?;
    Ok((code, body.to_string()))
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

// ---------------------------------------------------------------------------
// Helpers for the control, operability and local-security tests
// ---------------------------------------------------------------------------

impl Daemon {
    /// Writes `toml` as the cluster's `config.toml` and starts `tunneler run
    /// --config config.toml` plus `args` (e.g. `--log-format json`); waits
    /// until the admin socket answers. For configs that [`ConfigSpec`]
    /// cannot express (keys inside `[proxy]`, `[admin]` or `[ssh]`).
    pub fn start_toml(cluster: &Cluster, toml: &str, args: &[&str]) -> Daemon {
        let mut d = Daemon::spawn_toml(cluster, toml, args);
        d.wait_answering();
        d
    }

    /// As [`Daemon::start_toml`], without waiting: returns as soon as the
    /// process is spawned (for what a test does during the start).
    pub fn spawn_toml(cluster: &Cluster, toml: &str, args: &[&str]) -> Daemon {
        let config = cluster.dir.join("config.toml");
        fs::write(&config, toml).unwrap();
        let admin = cluster.admin_socket();
        let log = cluster.dir.join("daemon.log");
        let child = die_with_test(&mut Command::new(tunneler_bin()))
            .args(["run", "--config"])
            .arg(&config)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,tunneler=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(fs::File::create(cluster.dir.join("daemon.stdout")).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tunneler run");
        let pid_file = cluster.slot.as_ref().map(|slot| slot.daemon_pid_file());
        if let Some(f) = &pid_file {
            let _ = fs::write(f, child.id().to_string());
        }
        Daemon {
            child: Some(child),
            config,
            admin,
            egress: cluster.egress_socket(),
            log,
            pid_file,
        }
    }

    /// Waits until the admin socket answers; panics (with the log) when it
    /// does not within 15 s or the daemon exits.
    pub fn wait_answering(&mut self) {
        let d = self;
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
            "daemon admin socket never answered: {last}\n{}",
            d.log_tail(20)
        );
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `sig` (a `kill` signal name such as "HUP") without waiting.
    pub fn send_signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c.id(), sig);
        }
    }

    /// One admin API request; panics when the socket does not answer.
    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        admin_request(&self.admin, method, path, body)
            .unwrap_or_else(|e| panic!("admin {method} {path}: {e}"))
    }

    /// `GET /metrics` on the admin socket.
    pub fn metrics(&self) -> String {
        let (code, body) = self.admin("GET", "/metrics", None);
        assert_eq!(code, 200, "GET /metrics: {body}");
        body
    }

    /// `tunneler <args> --socket ADMIN`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut v: Vec<&str> = args.to_vec();
        let sock = self.admin.to_str().unwrap().to_string();
        v.push("--socket");
        v.push(&sock);
        tunneler(&v)
    }
}

/// One HTTP/1.1 request with an optional JSON body over a Unix socket:
/// returns (status code, body).
pub fn admin_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    curl_unix(socket, method, path, body, Duration::from_secs(30))
}

/// The value of the first sample of `name` (exact metric name, e.g.
/// `tunneler_dials_total`) that carries every `labels` pair, from a
/// Prometheus/OpenMetrics text exposition.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.trim().parse::<f64>().ok())
            .flatten()
        })
        .next()
}

/// Sum of every sample of `name` in an exposition.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let n = series.split('{').next().unwrap_or("");
        if n == name {
            if let Ok(v) = v.trim().parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a line straight to fd 2, so that measured figures show up in a
/// normal `cargo test` run (libtest captures `eprintln!` of passing tests).
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `p`-th percentile (0..=100) of `samples` (nearest rank).
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// `text` with `lines` inserted at the top of its `[ssh]` table.
pub fn with_ssh_keys(text: &str, lines: &str) -> String {
    text.replacen("[ssh]\n", &format!("[ssh]\n{}\n", lines.trim_end()), 1)
}
