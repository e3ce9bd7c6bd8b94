//! Restarts that refuse nothing: the egress and admin sockets held by a
//! real socket activator (`systemd-socket-activate`, from Debian's systemd
//! package) while the daemon restarts under steady dialing, and a graceful
//! stop that lets open streams finish.

use crate::common;
use common::TunnelState;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    admin_get, assert_within, compare_exact, pattern, poll, report, Cluster, ConfigSpec, Daemon,
    ECHO_PORT, RAW_ECHO_PORT,
};

const READY: Duration = Duration::from_secs(20);
const ACTIVATOR: &str = "/usr/bin/systemd-socket-activate";

/// The activator and everything it starts, in their own process group,
/// killed as a group on drop (also when the test panics), so no daemon
/// outlives the test.
struct Activated {
    child: Option<std::process::Child>,
    dir: PathBuf,
}

impl Activated {
    /// The pid of the running `tunneler run`, as the loop wrote it.
    fn daemon_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("daemon.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn exits(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("exits"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Stops the loop: no further round, then SIGTERM to the daemon; waits
    /// (bounded) for the activator's process to end.
    fn stop(&mut self) -> bool {
        std::fs::write(self.dir.join("stop"), b"").unwrap();
        if let Some(pid) = self.daemon_pid() {
            kill(pid, "TERM");
        }
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let done = poll(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !done {
            self.child = Some(child);
        }
        done
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "---- daemon log (tail) ----\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Some(mut c) = self.child.take() {
            // The whole group: the activator's shell and its daemon.
            kill_group(c.id());
            let _ = c.wait();
        }
    }
}

fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL".to_string(), "--".into(), format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// The activator holds `egress` and `admin` (named for the daemon's
/// cross-check) and execs a shell loop; each round starts `tunneler run`
/// with the inherited descriptors (LISTEN_PID set to its own pid, as
/// systemd does) and records its exit status. The activator only execs on
/// the first connection, which the caller makes.
fn activate(cluster: &Cluster, config: &Path) -> Activated {
    let dir = cluster.dir.clone();
    let script = dir.join("loop.sh");
    std::fs::write(
        &script,
        r#"n=0
while [ ! -e "$DIR/stop" ] && [ "$n" -lt 30 ]; do
    n=$((n + 1))
    sh -c 'echo $$ > "$DIR/daemon.pid"; LISTEN_PID=$$ exec "$BIN" run --config "$CONFIG"' 2>>"$DIR/daemon.log"
    echo "exit $?" >> "$DIR/exits"
done
"#,
    )
    .unwrap();
    let child = common::die_with_test(&mut Command::new(ACTIVATOR))
        .arg("-l")
        .arg(cluster.egress_socket())
        .arg("-l")
        .arg(cluster.admin_socket())
        .arg("--fdname=egress:admin")
        .arg(format!("--setenv=DIR={}", dir.display()))
        .arg(format!("--setenv=BIN={}", common::tunneler_bin()))
        .arg(format!("--setenv=CONFIG={}", config.display()))
        .arg("--setenv=RUST_LOG=info,tunneler=debug")
        .arg("/bin/sh")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("activator.log")).unwrap())
        .process_group(0)
        .spawn()
        .expect("spawn systemd-socket-activate");
    Activated {
        child: Some(child),
        dir,
    }
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    sent: u64,
    /// Every dial that was not a 200 with the right echo: why.
    refused: Vec<String>,
    /// When each dial started, and how long it took.
    dials: Vec<(Instant, Duration)>,
}

/// One dial: CONNECT, one echo line, close. `Err` says what went wrong.
fn dial_once(egress: &Path, target: &str, line: &str, want_prefix: &str) -> Result<(), String> {
    let mut s = UnixStream::connect(egress).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.set_write_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let head = read_head_checked(&mut s)?;
    let status = head.lines().next().unwrap_or("").to_string();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("CONNECT {target}: {status:?}"));
    }
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send line: {e}"))?;
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => answer.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read echo: {e}")),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    if !(answer.starts_with(want_prefix) && answer.ends_with(&format!("echo={line}"))) {
        return Err(format!("echo {answer:?}, want {want_prefix}...echo={line}"));
    }
    Ok(())
}

/// `read_head` without its panic: a reset while reading is a failed dial.
fn read_head_checked(s: &mut UnixStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
            Ok(_) => head.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read reply: {e}")),
        }
        if head.len() > 16 * 1024 {
            return Err("reply head too long".into());
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Dials `target` one after another until `stop` (bounded in count).
fn dial_loop(
    egress: PathBuf,
    target: String,
    want_prefix: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Tally> {
    std::thread::spawn(move || {
        let mut t = Tally::default();
        while !stop.load(Ordering::Relaxed) && t.sent < 20_000 {
            let started = Instant::now();
            t.sent += 1;
            let line = format!("dial-{}", t.sent);
            if let Err(e) = dial_once(&egress, &target, &line, &want_prefix) {
                t.refused.push(e);
            }
            t.dials.push((started, started.elapsed()));
        }
        t
    })
}

fn all_healthy(admin: &Path) -> bool {
    let Ok((200, body)) = admin_get(admin, "/v1/status") else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return false;
    };
    v["nodes"]
        .as_array()
        .is_some_and(|n| !n.is_empty() && n.iter().all(|n| n["state"] == "healthy"))
}

/// With the egress and admin sockets held by systemd-socket-activate, the
/// daemon is restarted (SIGTERM, the loop starts the next one) four times
/// while two clients dial without pause: one to a pod (node-addressed), one
/// to the service address every node carries (pool). No dial is refused:
/// no ECONNREFUSED (the socket stays open and connections queue in its
/// backlog), no 503 (a dial waits for its tunnel to come up, within
/// `wait_for_healthy`); every dial gets its echo. Each restart window (from
/// the SIGTERM to every node healthy again under the new daemon) saw dials
/// start in it, and every old daemon exited 0.
#[test]
fn restarts_under_socket_activation_refuse_no_dial() {
    require_netns!("restarts_under_socket_activation_refuse_no_dial");
    if !Path::new(ACTIVATOR).exists() {
        common::skip(
            "restarts_under_socket_activation_refuse_no_dial",
            &format!("{ACTIVATOR} missing (Debian's systemd package)"),
        );
        return;
    }
    let cluster = Cluster::new(2);
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "dial_timeout = \"2s\"\n",
        "dial_timeout = \"15s\"\nwait_for_healthy = \"12s\"\ndrain_timeout = \"10s\"\n",
        1,
    );
    assert!(toml.contains("wait_for_healthy"), "config template changed");
    let config = cluster.dir.join("config.toml");
    std::fs::write(&config, toml).unwrap();
    let mut act = activate(&cluster, &config);
    let admin = cluster.admin_socket();
    let egress = cluster.egress_socket();
    // The first connection makes the activator start the loop; it queues
    // and is answered by the first daemon.
    assert!(
        poll(READY, || all_healthy(&admin)),
        "the first daemon never came up healthy"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let n1 = cluster.node(1);
    let node_dials = dial_loop(
        egress.clone(),
        format!("{}:{ECHO_PORT}", n1.pod_ip),
        format!("node=node-1 local={} ", n1.pod_ip),
        stop.clone(),
    );
    let pool_dials = dial_loop(
        egress.clone(),
        format!("{}:{ECHO_PORT}", cluster.anycast_service_ip()),
        "node=node-".into(),
        stop.clone(),
    );
    let windows = Arc::new(Mutex::new(Vec::new()));
    const RESTARTS: usize = 4;
    let mut pids = vec![act.daemon_pid().expect("daemon pid")];
    for round in 0..RESTARTS {
        // Some dials under the running daemon first.
        std::thread::sleep(Duration::from_millis(300));
        let old = *pids.last().unwrap();
        let began = Instant::now();
        kill(old, "TERM");
        assert!(
            poll(READY, || act.daemon_pid().is_some_and(|p| p != old)),
            "round {round}: no new daemon after SIGTERM to {old}"
        );
        pids.push(act.daemon_pid().unwrap());
        assert!(
            poll(READY, || all_healthy(&admin)),
            "round {round}: the new daemon never had every node healthy"
        );
        windows.lock().unwrap().push((began, Instant::now()));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let node = node_dials.join().expect("node dialer");
    let pool = pool_dials.join().expect("pool dialer");
    assert!(act.stop(), "the activator's loop did not end");

    let windows = windows.lock().unwrap().clone();
    let dials: Vec<(Instant, Duration)> = node.dials.iter().chain(&pool.dials).copied().collect();
    let worst = dials.iter().map(|d| d.1).max().unwrap_or_default();
    let sent = node.sent + pool.sent;
    let refused: Vec<&String> = node.refused.iter().chain(&pool.refused).collect();
    let in_windows: Vec<usize> = windows
        .iter()
        .map(|(a, b)| dials.iter().filter(|(t, _)| t >= a && t <= b).count())
        .collect();
    let window_lengths: Vec<Duration> = windows.iter().map(|(a, b)| *b - *a).collect();
    report(&format!(
        "restarts: {RESTARTS} (pids {pids:?}); dials sent {sent} (node {}, pool {}), refused {}, \
         worst delay {worst:?}; dials started inside each restart window {in_windows:?}, \
         windows {window_lengths:?}",
        node.sent,
        pool.sent,
        refused.len()
    ));
    assert!(refused.is_empty(), "refused dials: {refused:?}");
    assert!(
        in_windows.iter().all(|&n| n > 0),
        "a restart saw no dial: {in_windows:?}"
    );
    let exits = act.exits();
    assert_eq!(
        exits,
        vec!["exit 0".to_string(); RESTARTS + 1],
        "every daemon exits 0"
    );
    // The sockets stay: the activator holds them; no daemon removed them.
    assert!(egress.exists() && admin.exists());
    assert_within(
        "the worst dial across the restarts",
        worst,
        Duration::from_secs(30),
    );
}

/// Starts the daemon with `drain_timeout` and every node healthy.
fn daemon_with_drain(cluster: &Cluster, drain: &str) -> Daemon {
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "[proxy]\n",
        &format!("[proxy]\ndrain_timeout = \"{drain}\"\n"),
        1,
    );
    let daemon = Daemon::start_toml(cluster, &toml, &[]);
    daemon.wait_all_healthy(READY);
    daemon
}

/// SIGTERM under load: three streams to the raw echo server are carrying
/// data (half their pattern sent and echoed) when the daemon gets SIGTERM.
/// It stops accepting at once (its own socket is gone: a new connection
/// fails), but the open streams go on: the rest of each pattern is sent
/// after the SIGTERM and every byte comes back exactly, then EOF. Once they
/// are done the daemon exits 0 without waiting for the drain timeout.
#[test]
fn sigterm_stops_accepting_and_lets_open_streams_finish() {
    require_netns!("sigterm_stops_accepting_and_lets_open_streams_finish");
    let cluster = Cluster::new(1);
    let mut daemon = daemon_with_drain(&cluster, "60s");
    let target = format!("{}:{RAW_ECHO_PORT}", cluster.node(1).pod_ip);
    const LEN: usize = 512 * 1024;
    let mut streams = Vec::new();
    for seed in 1..=3u64 {
        let (status, s) = daemon.connect(&target);
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let data = pattern(LEN, seed);
        let mut w = s.try_clone().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let first = data[..LEN / 2].to_vec();
        let rest = data[LEN / 2..].to_vec();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&first)?;
            // The second half only after the SIGTERM.
            let _ = go_rx.recv();
            w.write_all(&rest)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let mut r = s;
        let reader = std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        streams.push((data, go_tx, writer, reader, got));
    }
    // Every stream is carrying data: half of it came back.
    assert!(
        poll(READY, || streams
            .iter()
            .all(|s| s.4.lock().unwrap().len() >= LEN / 2)),
        "the first halves never came back"
    );
    daemon.send_signal("TERM");
    // Stops accepting: its own Unix socket is removed, a new client fails.
    assert!(
        poll(Duration::from_secs(10), || UnixStream::connect(
            &daemon.egress
        )
        .is_err()),
        "the egress socket still accepts after SIGTERM"
    );
    assert!(
        Path::new(&format!("/proc/{}", daemon.pid())).exists(),
        "the daemon exited with streams open"
    );
    let t = Instant::now();
    for (i, (data, go, writer, reader, got)) in streams.into_iter().enumerate() {
        go.send(()).unwrap();
        writer
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: send: {e}"));
        reader
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: read: {e}"));
        let got = got.lock().unwrap();
        compare_exact(&got, &data).unwrap_or_else(|e| panic!("stream {i}: {e}"));
    }
    let status = daemon.stop_with("0").expect("exit status");
    assert_eq!(status.code(), Some(0), "{status}");
    // Well before the 60 s drain timeout: it exits once the streams ended.
    assert_within(
        "exit after the streams finished",
        t.elapsed(),
        Duration::from_secs(20),
    );
}

/// A stream still open when the drain timeout passes is cut, and the
/// daemon still exits 0, within the drain timeout plus its grace.
#[test]
fn a_stream_open_at_the_drain_timeout_is_cut_and_the_exit_is_clean() {
    require_netns!("a_stream_open_at_the_drain_timeout_is_cut_and_the_exit_is_clean");
    let cluster = Cluster::new(1);
    let mut daemon = daemon_with_drain(&cluster, "2s");
    let n1 = cluster.node(1);
    let (status, mut s) = daemon.connect(&format!("{}:{ECHO_PORT}", n1.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(
        common::echo_over(&mut s, "before"),
        format!("node=node-1 local={} echo=before", n1.pod_ip)
    );
    let t = Instant::now();
    daemon.send_signal("TERM");
    assert!(
        poll(Duration::from_secs(10), || daemon
            .log_tail(40)
            .contains("shutting down: stopped accepting")),
        "no graceful stop began: {}",
        daemon.log_tail(40)
    );
    // Still served while draining.
    assert_eq!(
        common::echo_over(&mut s, "draining"),
        format!("node=node-1 local={} echo=draining", n1.pod_ip)
    );
    // Waits for the exit without a second SIGTERM (which ends the drain):
    // `kill -0` only checks the process is there.
    let status = daemon.stop_with("0").expect("exit status");
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    // Cut: the client sees the end of the stream.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(common::closed_by_peer(&mut s), "the stream was not closed");
    assert!(
        daemon
            .log_tail(40)
            .contains("drain timeout: cutting the connections still open"),
        "{}",
        daemon.log_tail(40)
    );
    assert_within(
        "exit after SIGTERM with a stream open (drain 2 s + grace 5 s)",
        took,
        Duration::from_secs(12),
    );
}

/// A daemon started by systemd-socket-activate with sockets it cannot use
/// does not start: exit 1 and an error naming the socket and why. No
/// cluster is needed (no nodes); the passed sockets are left as they were.
#[test]
fn passed_sockets_it_cannot_use_stop_the_start_with_a_clear_error() {
    let name = "passed_sockets_it_cannot_use_stop_the_start_with_a_clear_error";
    if !Path::new(ACTIVATOR).exists() || !Path::new("/usr/bin/ssh-keygen").exists() {
        common::skip(name, &format!("{ACTIVATOR} or ssh-keygen missing"));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::ssh_keygen(&dir.join("id_ed25519"), "restart-test");
    std::fs::write(dir.join("known_hosts"), "").unwrap();
    let egress = dir.join("egress.sock");
    let admin = dir.join("admin.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[ssh]\nuser = \"root\"\nidentity_file = \"id_ed25519\"\nknown_hosts_file = \"known_hosts\"\n\n\
             [proxy]\nlisten = [\"unix://{}\"]\n\n[admin]\nsocket = \"{}\"\n",
            egress.display(),
            admin.display()
        ),
    )
    .unwrap();
    // Each case: the sockets to pass with their names, the mode the first
    // is given before the daemon starts (None: the activator's 0644), and
    // what the error must say (`DIR` is the temp dir).
    let cases: [(&[&str], &str, Option<u32>, &str); 3] = [
        (
            &["egress.sock", "stray.sock"],
            "egress:egress",
            None,
            "socket activation: passed fd 4 (\"egress\") is bound to unix://DIR/stray.sock, \
             which no setting names",
        ),
        (
            &["egress.sock"],
            "admin",
            None,
            "socket activation: passed fd 3 (\"admin\") is named \"admin\" but is bound to \
             unix://DIR/egress.sock, which the config uses for proxy.listen[0] (egress)",
        ),
        (
            &["egress.sock"],
            "egress",
            Some(0o666),
            "socket activation: passed fd 3 (\"egress\") at DIR/egress.sock has mode 666: \
             any local user may connect to proxy.listen[0]",
        ),
    ];
    for (socks, names, mode, want) in cases {
        for s in ["egress.sock", "stray.sock"] {
            let _ = std::fs::remove_file(dir.join(s));
        }
        let mut cmd = format!("exec {ACTIVATOR}");
        for s in socks {
            cmd.push_str(&format!(" -l {}", dir.join(s).display()));
        }
        cmd.push_str(&format!(
            " --fdname={names} {} run --config {}",
            common::tunneler_bin(),
            config.display()
        ));
        let guard = common::ChildGuard::spawn(
            Command::new("/bin/sh")
                .args(["-c", &cmd])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let first = dir.join(socks[0]);
        assert!(
            poll(Duration::from_secs(10), || first.exists()),
            "the activator never listened on {}",
            first.display()
        );
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&first, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        // The activator starts the daemon on the first connection.
        let _conn = {
            let mut c = None;
            assert!(
                poll(Duration::from_secs(10), || {
                    c = UnixStream::connect(&first).ok();
                    c.is_some()
                }),
                "the activator never listened on {}",
                first.display()
            );
            c
        };
        let out = guard
            .wait_exit(Duration::from_secs(20))
            .expect("the daemon started with sockets it cannot use");
        let stderr =
            String::from_utf8_lossy(&out.stderr).replace(&dir.display().to_string(), "DIR");
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
        assert!(!admin.exists(), "nothing was bound: {stderr}");
        assert!(first.exists(), "the passed socket is left in place");
        if let Some(m) = mode {
            use std::os::unix::fs::PermissionsExt;
            let now = std::fs::metadata(&first).unwrap().permissions().mode() & 0o777;
            assert_eq!(now, m, "the passed socket's mode is left as it was");
        }
    }
}

/// The cluster's config with a long dial timeout and `wait_for_healthy`,
/// so that a wait that should not happen, or one that should, shows.
fn long_wait_config(cluster: &Cluster) -> String {
    let toml = cluster.config_toml(&ConfigSpec::default()).replacen(
        "dial_timeout = \"2s\"\n",
        "dial_timeout = \"25s\"\nwait_for_healthy = \"20s\"\n",
        1,
    );
    assert!(toml.contains("wait_for_healthy"), "config template changed");
    toml
}

/// A dial for a node in backoff (its sshd is down) waits for it instead of
/// getting 503 at once: the CONNECT is sent while the node cannot be
/// healthy, sshd comes back only then, and the dial gets 200 and its echo.
#[test]
fn a_dial_waits_for_a_node_in_backoff_to_reconnect() {
    require_netns!("a_dial_waits_for_a_node_in_backoff_to_reconnect");
    let cluster = Cluster::new(1);
    let daemon = Daemon::start_toml(&cluster, &long_wait_config(&cluster), &[]);
    daemon.wait_all_healthy(READY);
    cluster.kill_sshd(1);
    daemon.wait_node_state("node-1", TunnelState::Backoff, READY);
    let n1 = cluster.node(1);
    let target = format!("{}:{ECHO_PORT}", n1.pod_ip);
    let egress = daemon.egress.clone();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let dial = std::thread::spawn(move || -> Result<String, String> {
        let mut s = UnixStream::connect(&egress).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(40))).ok();
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let _ = sent_tx.send(());
        let head = read_head_checked(&mut s)?;
        let status = head.lines().next().unwrap_or("").to_string();
        if !status.starts_with("HTTP/1.1 200") {
            return Err(status);
        }
        Ok(common::echo_over(s, "waited"))
    });
    sent_rx.recv_timeout(READY).expect("CONNECT sent");
    let before = daemon.status();
    let state = common::find_node(&before, "node-1").unwrap().state;
    assert_ne!(
        state,
        TunnelState::Healthy,
        "node-1 has no sshd: {before:?}"
    );
    let t = Instant::now();
    cluster.start_sshd(1);
    let got = dial
        .join()
        .unwrap()
        .expect("the dial waited and got through");
    assert_eq!(got, format!("node=node-1 local={} echo=waited", n1.pod_ip));
    report(&format!(
        "a dial sent while node-1 was {state} answered {:?} after sshd was restarted",
        t.elapsed()
    ));
}

/// A dial for a node whose host key was refused does not wait for it:
/// only an operator fixes that. With 20 s of `wait_for_healthy` the dial
/// gets 503 naming the refusal at once, far inside the bound.
#[test]
fn a_dial_for_a_node_with_a_refused_host_key_does_not_wait() {
    require_netns!("a_dial_for_a_node_with_a_refused_host_key_does_not_wait");
    let cluster = Cluster::new(2);
    cluster.replace_host_key(2);
    let daemon = Daemon::start_toml(&cluster, &long_wait_config(&cluster), &[]);
    daemon.wait_status("node-1 healthy, node-2 rejected", READY, |s| {
        common::find_node(s, "node-1").is_some_and(|n| n.state == TunnelState::Healthy)
            && common::find_node(s, "node-2").is_some_and(|n| n.state == TunnelState::Rejected)
    });
    let t = Instant::now();
    let (status, _) = daemon.connect(&format!("{}:{ECHO_PORT}", cluster.node(2).pod_ip));
    let took = t.elapsed();
    assert!(
        status.starts_with("HTTP/1.1 503 Service Unavailable: no healthy tunnel: node node-2 is ")
            && status.contains("host key verification failed"),
        "{status}"
    );
    assert_within(
        "a dial for a refused node (wait_for_healthy 20 s)",
        took,
        Duration::from_secs(10),
    );
    // The healthy node serves meanwhile.
    let n1 = cluster.node(1);
    assert_eq!(
        daemon.echo(&format!("{}:{ECHO_PORT}", n1.pod_ip), "ok"),
        format!("node=node-1 local={} echo=ok", n1.pod_ip)
    );
}

/// A second SIGTERM during the drain ends it: the open stream is cut and
/// the daemon exits 0 without waiting out its 60 s drain timeout.
#[test]
fn a_second_sigterm_ends_the_drain() {
    require_netns!("a_second_sigterm_ends_the_drain");
    let cluster = Cluster::new(1);
    let mut daemon = daemon_with_drain(&cluster, "60s");
    let n1 = cluster.node(1);
    let (status, mut s) = daemon.connect(&format!("{}:{ECHO_PORT}", n1.pod_ip));
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    daemon.send_signal("TERM");
    assert!(
        poll(Duration::from_secs(10), || daemon
            .log_tail(40)
            .contains("shutting down: stopped accepting")),
        "no graceful stop began: {}",
        daemon.log_tail(40)
    );
    assert_eq!(
        common::echo_over(&mut s, "draining"),
        format!("node=node-1 local={} echo=draining", n1.pod_ip)
    );
    let t = Instant::now();
    // Daemon::stop sends the second SIGTERM and waits (10 s at most).
    let status = daemon.stop().expect("exit status");
    assert_eq!(status.code(), Some(0), "{status}");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(common::closed_by_peer(&mut s), "the stream was not cut");
    let log = daemon.log_tail(40);
    assert!(
        log.contains("second signal: not waiting for the drain")
            && !log.contains("drain timeout: cutting"),
        "{log}"
    );
    assert_within(
        "exit after a second SIGTERM",
        t.elapsed(),
        Duration::from_secs(8),
    );
}
