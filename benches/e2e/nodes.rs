//! Many nodes

use crate::*;

/// Polls the daemon until every node is healthy; returns the time since
/// `t0` and the count of healthy nodes at the end.
pub(crate) fn time_to_healthy(
    d: &Daemon,
    t0: Instant,
    n: usize,
    limit: Duration,
) -> (Option<Duration>, usize) {
    let deadline = t0 + limit;
    let mut healthy = 0;
    while Instant::now() < deadline {
        if let Ok(s) = d.try_status() {
            let nodes = s.nodes;
            healthy = nodes.iter().filter(|x| x.state == "healthy").count();
            if nodes.len() == n && healthy == n {
                return (Some(t0.elapsed()), healthy);
            }
        }
        // The status of thousands of nodes is megabytes: poll it less often
        // so that the polling does not slow what it measures.
        std::thread::sleep(Duration::from_millis((n as u64 / 20).clamp(25, 250)));
    }
    (None, healthy)
}

pub(crate) struct NodesResult {
    pub(crate) label: String,
    pub(crate) n: usize,
    pub(crate) healthy_after: Option<Duration>,
    pub(crate) healthy: usize,
    pub(crate) rss_kib: u64,
}

pub(crate) fn real_nodes(sz: &Sizes) -> NodesResult {
    let n = sz.real_nodes;
    progress(&format!("building {n} node namespaces"));
    let cluster = Cluster::with_options(
        n,
        ClusterOptions {
            servers: false,
            ..ClusterOptions::default()
        },
    );
    progress(&format!("{n} real nodes: starting the daemon"));
    let toml = bench_toml(&cluster, &ConfigSpec::default());
    let t0 = Instant::now();
    let d = Daemon::start_toml(&cluster, &toml, &[]);
    let (after, healthy) = time_to_healthy(&d, t0, n, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    NodesResult {
        label: format!("{n} node namespaces, one sshd each"),
        n,
        healthy_after: after,
        healthy,
        rss_kib: rss_kib(d.pid()),
    }
}

/// Memory one simulated node costs the machine (sshd's two processes for
/// the connection, plus the daemon's share) until a run has measured it.
pub(crate) const SIM_NODE_COST_KIB: u64 = 2 << 10;
/// Memory left to everything else on the machine while simulated nodes run.
pub(crate) const MEM_RESERVE_KIB: u64 = 3 << 20;

/// One daemon run against `n` simulated nodes.
pub(crate) struct SimResult {
    pub(crate) n: usize,
    /// sshd processes (one namespace each) serving them.
    pub(crate) sshds: usize,
    /// Why the run did not happen (not enough memory or pids).
    pub(crate) skipped: Option<String>,
    pub(crate) healthy_after: Option<Duration>,
    pub(crate) healthy: usize,
    /// Daemon VmRSS with every node healthy and idle, at the end of the
    /// idle-CPU window.
    pub(crate) rss_kib: u64,
    /// VmRSS of the same daemon with no nodes.
    pub(crate) base_rss_kib: u64,
    /// Daemon CPU over the idle window, as a fraction of one core.
    pub(crate) idle_cpu: Option<f64>,
    /// Nodes still healthy at the end of the idle window.
    pub(crate) healthy_at_end: usize,
    /// Drop of the machine's MemAvailable from before the daemon started
    /// to all nodes healthy: sshd and daemon together.
    pub(crate) machine_kib: Option<u64>,
}

impl SimResult {
    pub(crate) fn skipped(n: usize, why: String) -> SimResult {
        progress(&format!("{n} simulated nodes: skipped, {why}"));
        SimResult {
            n,
            sshds: 0,
            skipped: Some(why),
            healthy_after: None,
            healthy: 0,
            rss_kib: 0,
            base_rss_kib: 0,
            idle_cpu: None,
            healthy_at_end: 0,
            machine_kib: None,
        }
    }

    pub(crate) fn per_tunnel_kib(&self) -> f64 {
        (self.rss_kib as f64 - self.base_rss_kib as f64) / self.n as f64
    }
}

/// `MemAvailable` of the machine in KiB.
pub(crate) fn mem_available_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Processes and threads of the whole machine, and the pid limit.
pub(crate) fn pids_in_use() -> (u64, u64) {
    let used = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok())
        .unwrap_or(0);
    let max = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(32768);
    (used, max)
}

/// Every count of simulated nodes in turn, each with a cluster and a daemon
/// of its own. A count the machine cannot hold (memory for the sshd
/// connections, pids) is skipped with the reason, not attempted.
pub(crate) fn sim_nodes(sz: &Sizes) -> Vec<SimResult> {
    let mut cost = SIM_NODE_COST_KIB as f64;
    let mut out = Vec::new();
    for &n in &sz.sim_nodes {
        let need = (n as f64 * cost * 1.15) as u64 + MEM_RESERVE_KIB;
        let avail = mem_available_kib();
        let (pids, pid_max) = pids_in_use();
        if avail < need {
            out.push(SimResult::skipped(
                n,
                format!(
                    "needs ~{} MiB available ({:.1} MiB per node + {} MiB reserve), the machine has {} MiB",
                    need >> 10,
                    cost * 1.15 / 1024.0,
                    MEM_RESERVE_KIB >> 10,
                    avail >> 10
                ),
            ));
            continue;
        }
        if pids + 2 * n as u64 + 2000 > pid_max {
            out.push(SimResult::skipped(
                n,
                format!(
                    "needs {} pids (2 sshd processes per node), {pids} of {pid_max} in use",
                    2 * n
                ),
            ));
            continue;
        }
        let r = sim_run(sz, n);
        if let Some(used) = r.machine_kib.filter(|_| r.healthy == n) {
            cost = (used as f64 / n as f64).max(SIM_NODE_COST_KIB as f64 / 2.0);
        }
        out.push(r);
    }
    out
}

/// `n` simulated nodes: addresses in 10.201-203.s.0/24 blocks (inside
/// 10.200.0.0/14) on the `lo` of a few namespaces, each namespace's sshd
/// listening on all of them, with `MaxStartups` above its share.
pub(crate) fn sim_run(sz: &Sizes, n: usize) -> SimResult {
    let sshds = n
        .div_ceil(sz.sim_per_sshd.max(1))
        .clamp(1, common::MAX_BARE_NODES);
    let per = n.div_ceil(sshds);
    progress(&format!(
        "{n} simulated nodes: building {sshds} namespace(s), {per} addresses each"
    ));
    let mut cluster = Cluster::with_options(
        sshds,
        ClusterOptions {
            servers: false,
            sshd_listen_any: true,
            max_startups: format!("{}", per + 100),
        },
    );
    let mut ips = Vec::with_capacity(n);
    for i in 1..=sshds {
        let mine = cluster.add_local_addresses(i, per.min(n - ips.len()));
        cluster.add_known_hosts(i, &mine);
        ips.extend(mine);
    }
    // No service CIDR: the harness's 10.202.s.0/24 holds simulated nodes.
    let none = ConfigSpec {
        nodes: Some(vec![]),
        service_cidrs: Some(vec![]),
        ..ConfigSpec::default()
    };
    let base = {
        let d = Daemon::start_toml(&cluster, &bench_toml(&cluster, &none), &[]);
        std::thread::sleep(Duration::from_secs(1));
        rss_kib(d.pid())
    };
    let mut extra = String::new();
    for (k, ip) in ips.iter().enumerate() {
        extra.push_str(&format!(
            "\n[[node]]\nname = \"sim-{}\"\naddress = \"{ip}\"\n",
            k + 1
        ));
    }
    let spec = ConfigSpec { extra, ..none };
    progress(&format!("{n} simulated nodes: starting the daemon"));
    let toml = bench_toml(&cluster, &spec);
    let mem0 = mem_available_kib();
    let t0 = Instant::now();
    let d = Daemon::start_toml(&cluster, &toml, &[]);
    let limit = Duration::from_secs(60) + Duration::from_millis(40 * n as u64);
    let (after, healthy) = time_to_healthy(&d, t0, n, limit);
    let machine_kib = after.map(|_| mem0.saturating_sub(mem_available_kib()));
    if after.is_none() {
        fail(format!(
            "{n} simulated nodes: only {healthy} healthy within {limit:?}"
        ));
    }
    // Idle: every tunnel up, no streams, only the keepalives.
    let settle = Duration::from_secs(2);
    std::thread::sleep(settle);
    let pid = d.pid();
    let idle_cpu = after.map(|_| {
        progress(&format!(
            "{n} simulated nodes: idle CPU over {} s",
            sz.idle_cpu_secs
        ));
        let (c0, w0) = (cpu_seconds(pid), Instant::now());
        std::thread::sleep(Duration::from_secs(sz.idle_cpu_secs));
        (cpu_seconds(pid) - c0) / w0.elapsed().as_secs_f64()
    });
    let rss = rss_kib(pid);
    let healthy_at_end = d.try_status().ok().map_or(0, |s| {
        s.nodes.iter().filter(|x| x.state == "healthy").count()
    });
    progress(&format!("{n} simulated nodes: tearing down"));
    drop(d);
    // The sshd sessions end with the daemon's connections; wait (bounded)
    // so the teardown has only the listeners left to kill.
    let nss: Vec<String> = cluster.nodes.iter().map(|x| x.ns.clone()).collect();
    common::poll(Duration::from_secs(30), || {
        nss.iter().all(|ns| {
            Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map_or(true, |o| {
                    o.stdout
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .count()
                        <= 1
                })
        })
    });
    drop(cluster);
    SimResult {
        n,
        sshds,
        skipped: None,
        healthy_after: after,
        healthy,
        rss_kib: rss,
        base_rss_kib: base,
        idle_cpu,
        healthy_at_end,
        machine_kib,
    }
}

pub(crate) fn nodes_table(
    sz: &Sizes,
    real: &NodesResult,
    sims: &[SimResult],
    ssh_rss: Option<u64>,
) -> Table {
    let mut nodes = Table::new(
        "Nodes: time from daemon start until all are healthy (production timing defaults: keepalive 10 s)",
        &[
            "nodes",
            "all healthy after",
            "healthy",
            "daemon RSS",
            "RSS/tunnel",
            "idle CPU",
            "machine memory",
        ],
    );
    if real.healthy_after.is_none() {
        fail(format!(
            "{}: only {} of {} nodes healthy before the deadline",
            real.label, real.healthy, real.n
        ));
    }
    nodes.row(vec![
        real.label.clone(),
        real.healthy_after
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "not reached".into()),
        format!("{}/{}", real.healthy, real.n),
        format!("{} KiB", real.rss_kib),
        "-".into(),
        "-".into(),
        "-".into(),
    ]);
    for r in sims {
        let label = format!(
            "{} simulated nodes, {} sshd{}",
            r.n,
            r.sshds,
            if r.sshds == 1 { "" } else { "s" }
        );
        if let Some(why) = &r.skipped {
            let mut row = vec![label, format!("n/a: {why}")];
            row.resize(7, NA.into());
            nodes.row(row);
            continue;
        }
        nodes.row(vec![
            label,
            r.healthy_after
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or_else(|| "not reached".into()),
            format!("{}/{} ({} at end)", r.healthy, r.n, r.healthy_at_end),
            format!("{:.1} MiB", r.rss_kib as f64 / 1024.0),
            format!("{:.1} KiB", r.per_tunnel_kib()),
            r.idle_cpu
                .map(|c| format!("{:.2} %", c * 100.0))
                .unwrap_or_else(|| NA.into()),
            r.machine_kib
                .map(|k| format!("{:.0} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| NA.into()),
        ]);
    }
    nodes.notes.push("simulated nodes: distinct addresses in 10.201-203.x.0/24 blocks on the lo of a few namespaces, each namespace's sshd (MaxStartups above its share) answering on all of them; one daemon for all".into());
    nodes.notes.push("RSS/tunnel: (daemon VmRSS with the nodes healthy and idle - VmRSS of the same daemon with no nodes) / nodes. idle CPU: the daemon's utime+stime over the idle window after all were healthy, % of one core. machine memory: drop of MemAvailable from daemon start to all healthy (sshd's processes and the daemon)".into());

    // The targets: per idle tunnel at the largest count that ran, and the
    // healthy time, RSS and idle CPU at the counts the targets name.
    let ran: Vec<&SimResult> = sims.iter().filter(|r| r.healthy_after.is_some()).collect();
    match ran.iter().max_by_key(|r| r.n) {
        Some(r) => {
            let k = r.per_tunnel_kib();
            record(
                "rss tunnel",
                format!(
                    "{k:.1} KiB at {} nodes{}",
                    r.n,
                    match ssh_rss {
                        Some(s) => format!(
                            " ({} one ssh -L process, {s} KiB)",
                            ratio(k, Some(s as f64))
                        ),
                        None => String::new(),
                    }
                ),
                Some(k <= 64.0),
            );
        }
        None => record(
            "rss tunnel",
            "n/a: no simulated-node run completed".into(),
            None,
        ),
    }
    let at = |n: usize| sims.iter().find(|r| r.n == n);
    let missing = |n: usize| -> String {
        match at(n) {
            Some(SimResult {
                skipped: Some(why), ..
            }) => format!("n/a: {why}"),
            Some(_) => "n/a: not all nodes became healthy (see errors)".into(),
            None => format!(
                "n/a: this run simulated {:?} nodes, not {n}",
                sims.iter().map(|r| r.n).collect::<Vec<_>>()
            ),
        }
    };
    match at(5000).filter(|r| r.healthy_after.is_some()) {
        Some(r) => {
            let secs = r.healthy_after.map_or(0.0, |d| d.as_secs_f64());
            record(
                "nodes healthy",
                format!("{secs:.1} s ({:.2}× the target)", secs / 30.0),
                Some(secs <= 30.0),
            );
            let mib = r.rss_kib as f64 / 1024.0;
            record(
                "nodes rss",
                format!("{mib:.0} MiB ({:.2}× the target)", mib / 400.0),
                Some(mib <= 400.0),
            );
        }
        None => {
            record("nodes healthy", missing(5000), None);
            record("nodes rss", missing(5000), None);
        }
    }
    match at(1000).and_then(|r| r.idle_cpu) {
        Some(c) => record(
            "idle cpu",
            format!(
                "{:.2} % of one core over {} s ({:.2}× the target)",
                c * 100.0,
                sz.idle_cpu_secs,
                c / 0.02
            ),
            Some(c <= 0.02),
        ),
        None => record("idle cpu", missing(1000), None),
    }
    nodes
}
