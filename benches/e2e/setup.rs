//! Setup: configs, ssh -L

use crate::*;

/// The harness's test config with the production defaults for timing
/// (connect timeout, keepalives, backoff, dial timeout), so that the
/// figures are the ones an operator would see.
pub(crate) fn bench_toml(cluster: &Cluster, spec: &ConfigSpec) -> String {
    let mut t = cluster.config_toml(spec);
    let bench_ports = format!("node_ports = [{SOURCE_PORT}, {ECHO_PORT}, ");
    for (from, to) in [
        ("connect_timeout = \"2s\"", "connect_timeout = \"10s\""),
        (
            "keepalive_interval = \"1s\"",
            "keepalive_interval = \"10s\"",
        ),
        ("initial_backoff = \"100ms\"", "initial_backoff = \"1s\""),
        ("max_backoff = \"1s\"", "max_backoff = \"30s\""),
        ("dial_timeout = \"2s\"", "dial_timeout = \"5s\""),
        // The bench servers listen on the node's own address.
        ("node_ports = [", bench_ports.as_str()),
        (
            "[proxy]\n",
            "[proxy]\n# The 10 000-stream run needs more than the default 4096.\nmax_streams_per_node = 16384\n",
        ),
    ] {
        assert!(t.contains(from), "harness config changed: no {from}");
        t = t.replace(from, to);
    }
    // A/B runs: extra `[ssh]` lines for every daemon of the run (say
    // `window_min = "8MiB"`), e.g. to compare a setting on one machine.
    if let Ok(extra) = std::env::var("TUNNELER_BENCH_SSH_EXTRA") {
        assert!(t.contains("[ssh]\n"), "harness config changed: no [ssh]");
        t = t.replacen("[ssh]\n", &format!("[ssh]\n{extra}\n"), 1);
    }
    t
}

/// `ssh -N -L` for each remote port; returns the process and the local
/// ports once every forward accepts.
pub(crate) fn start_ssh_forward(
    cluster: &Cluster,
    ip: Ipv4Addr,
    ports: &[u16],
) -> (ChildGuard, HashMap<u16, u16>) {
    let forwards: HashMap<u16, u16> = ports.iter().map(|p| (*p, free_tcp_port())).collect();
    let mut cmd = Command::new("/usr/bin/ssh");
    cmd.args(["-N", "-F", "/dev/null", "-i"])
        .arg(&cluster.client_key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
            "-c",
            "aes128-gcm@openssh.com",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            cluster.dir.join("known_hosts").display()
        ));
    for (remote, local) in &forwards {
        cmd.arg("-L")
            .arg(format!("127.0.0.1:{local}:{ip}:{remote}"));
    }
    cmd.arg(format!("root@{ip}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(cluster.dir.join(format!("ssh-L-{ip}.log"))).unwrap());
    let mut guard = ChildGuard::spawn(&mut cmd);
    let up = common::poll(Duration::from_secs(15), || {
        if let Ok(Some(_)) = guard.child().try_wait() {
            return true;
        }
        forwards.values().all(|l| {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], *l)),
                Duration::from_millis(200),
            )
            .is_ok()
        })
    });
    let exited = matches!(guard.child().try_wait(), Ok(Some(_)));
    assert!(
        up && !exited,
        "ssh -L did not come up: {}",
        fs::read_to_string(cluster.dir.join(format!("ssh-L-{ip}.log"))).unwrap_or_default()
    );
    (guard, forwards)
}
