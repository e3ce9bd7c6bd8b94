//! The one-node sections (`rtt_ms` to `window`) on one cluster, daemon and `ssh -L`.

use crate::*;

/// Every section on the one stream node: a node namespace with the bench
/// servers, the daemon, and `ssh -L` beside it. Returns the tables, the
/// RSS per idle stream of each path, and (daemon, ssh) VmRSS with one idle
/// tunnel each.
pub(crate) fn one_node(sz: &Sizes) -> (Vec<Table>, HashMap<PathKind, f64>, (u64, u64)) {
    progress("building the stream node");
    let cluster = Cluster::with_options(1, ClusterOptions::default());
    let node_ip = cluster.node(1).ip;
    let _servers = start_servers(&cluster.node(1).ns);
    // sshd's connections to the echo server come from the node's own
    // ephemeral ports, and it closes first: tens of thousands of dials in
    // a minute would run the namespace out of ports. These sysctls belong
    // to the node namespace only.
    common::run(
        "ip",
        &[
            "netns",
            "exec",
            &cluster.node(1).ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    );
    let daemon = Daemon::start_toml(&cluster, &bench_toml(&cluster, &ConfigSpec::default()), &[]);
    daemon.wait_all_healthy(Duration::from_secs(30));
    let (ssh, forwards) = start_ssh_forward(&cluster, node_ip, &[SOURCE_PORT, ECHO_PORT]);
    let ep = Endpoints {
        node_ip,
        forwards,
        daemon_tcp: daemon.tcp_listener(),
        daemon_unix: daemon.egress.clone(),
    };
    let (dpid, spid) = (daemon.pid(), ssh.id());
    let idle_tunnel_rss = (rss_kib(dpid), rss_kib(spid));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    progress(&format!("daemon pid {dpid}, ssh -L pid {spid}"));

    let mut tables = Vec::new();
    // First, while the tunnel has carried nothing yet.
    if sz.runs("rtt_ms") {
        tables.push(status_rtt(&ep, sz, &daemon.admin));
    }
    if sz.runs("throughput") {
        tables.push(throughput(&ep, sz, dpid, spid));
    }
    if sz.runs("rtt") {
        tables.push(rtt(&ep, sz));
    }
    if sz.runs("dial") {
        tables.extend(dials(&ep, sz, &rt));
    }
    let mut per_stream = HashMap::new();
    if sz.runs("streams") {
        let (ct, ps) = concurrency(&ep, sz, &rt, dpid, spid);
        tables.extend(ct);
        per_stream = ps;
    }
    if sz.runs("slow") {
        tables.extend(slow::on_node(&ep, sz, &daemon, spid));
    }
    // SIGTERM, not SIGKILL: a profiling wrapper (TUNNELER_TEST_BIN) then
    // gets to write its output.
    let mut daemon = daemon;
    daemon.stop();
    drop(daemon);
    if sz.runs("slow") {
        // Needs a daemon of its own (one session per node) on the same node.
        tables.extend(slow::shared_session(&cluster, &ep, sz));
        tables.push(slow::stopped_reader(&cluster, &ep, sz));
    }
    if sz.runs("window") {
        tables.push(slow::window_tradeoff(&cluster, &ep, sz));
    }
    (tables, per_stream, idle_tunnel_rss)
}

pub(crate) fn ssh_version() -> String {
    Command::new("/usr/bin/ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}
