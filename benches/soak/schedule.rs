//! The fault schedule

use crate::*;

/// Runs one fault on `node`; Err names a step that failed.
pub(crate) fn run_fault(
    ctx: &Ctx,
    cluster: &Cluster,
    daemon: &Daemon,
    kind: FaultKind,
    node: usize,
    rotation: &mut u32,
) -> Result<(), String> {
    let file_nodes: Vec<usize> = (ctx.plan.config_nodes() + 1..=ctx.plan.nodes).collect();
    match kind {
        FaultKind::SshdKilled => {
            cluster.kill_sshd(node);
            std::thread::sleep(Duration::from_secs(3));
            cluster.start_sshd(node);
        }
        FaultKind::LinkDown => {
            cluster.link_down(node);
            // Longer than keepalive_interval x keepalive_max (1 s x 3).
            std::thread::sleep(Duration::from_secs(6));
            cluster.link_up(node);
        }
        FaultKind::HostKeyRotated => {
            *rotation += 1;
            let key = host_key(cluster, node);
            common::ssh_keygen(&key, &format!("node-{node}-rotated-{rotation}"));
            sign_host_key(cluster, node, *rotation);
            let pid: u32 = fs::read_to_string(node_dir(cluster, node).join("sshd.pid"))
                .map_err(|e| format!("sshd.pid: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("sshd.pid: {e}"))?;
            // sshd re-executes itself on SIGHUP with the new key and
            // certificate; its per-connection processes (our sessions)
            // live on. The old listener answers until it has re-executed,
            // so wait for the new one's "Server listening" in its log.
            let log = node_dir(cluster, node).join("sshd.log");
            let listening = || {
                fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches("Server listening on")
                    .count()
            };
            let before = listening();
            common::run("kill", &["-HUP", &pid.to_string()]);
            let addr = SocketAddr::from((cluster.node(node).ip, 22));
            let back = common::poll(Duration::from_secs(10), || {
                listening() > before
                    && TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                        .map(|mut s| {
                            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                            let mut b = [0u8; 4];
                            s.read(&mut b).map(|n| n > 0).unwrap_or(false)
                        })
                        .unwrap_or(false)
            });
            if !back {
                return Err(format!(
                    "sshd on node-{node} did not come back after SIGHUP"
                ));
            }
            // The new session can only be to the rotated key: the old one
            // is gone from disk and from the listener.
            admin_post(daemon, &format!("/v1/nodes/node-{node}/reconnect"))?;
        }
        FaultKind::Removed => {
            let keep: Vec<usize> = file_nodes.iter().copied().filter(|&i| i != node).collect();
            write_nodes_file(cluster, &keep);
            let gone = common::poll(Duration::from_secs(15), || {
                daemon
                    .try_status()
                    .map(|s| !s.nodes.iter().any(|n| n.name == format!("node-{node}")))
                    .unwrap_or(false)
            });
            std::thread::sleep(Duration::from_secs(3));
            write_nodes_file(cluster, &file_nodes);
            if !gone {
                return Err(format!(
                    "node-{node} still listed 15 s after leaving nodes_file"
                ));
            }
        }
        FaultKind::Drained => {
            admin_post(daemon, &format!("/v1/nodes/node-{node}/drain"))?;
            std::thread::sleep(Duration::from_secs(4));
            admin_post(daemon, &format!("/v1/nodes/node-{node}/undrain"))?;
        }
        FaultKind::Reconnected => {
            admin_post(daemon, &format!("/v1/nodes/node-{node}/reconnect"))?;
        }
    }
    wait_healthy(daemon, node, RECOVERY)
}

/// The fault thread: one fault at a time, in [`FAULT_ORDER`], until 85 %
/// of the load; every fault is undone before the next.
pub(crate) fn fault_schedule(ctx: &Ctx, cluster: &Cluster, daemon: &Daemon, done: &AtomicBool) {
    let plan = &ctx.plan;
    let targets: Vec<usize> = (STALLED + 1..=plan.config_nodes()).collect();
    let file_nodes: Vec<usize> = (plan.config_nodes() + 1..=plan.nodes).collect();
    let last_start = ctx.t0 + plan.load.mul_f64(0.85);
    let mut next = ctx.t0 + plan.fault_every;
    let mut rotation = 0;
    let mut k = 0usize;
    while !done.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= last_start {
            break;
        }
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(200)));
            continue;
        }
        let kind = FAULT_ORDER[k % FAULT_ORDER.len()];
        let node = if kind == FaultKind::Removed {
            file_nodes[(k / FAULT_ORDER.len()) % file_nodes.len()]
        } else {
            targets[k % targets.len()]
        };
        k += 1;
        let start = ctx.t0.elapsed();
        eprintln!(
            "[{:7.1}s] fault: {} on node-{node}",
            start.as_secs_f64(),
            kind.label()
        );
        let w = ctx.faults.begin(node, kind);
        let r = run_fault(ctx, cluster, daemon, kind, node, &mut rotation);
        ctx.faults.end(w);
        let end = ctx.t0.elapsed();
        ctx.stats
            .events
            .lock()
            .unwrap()
            .push((start, end, node, kind));
        match r {
            Ok(()) => eprintln!(
                "[{:7.1}s]   node-{node} healthy again after {:.1}s",
                end.as_secs_f64(),
                (end - start).as_secs_f64()
            ),
            Err(e) => ctx.stats.error(
                ctx.t0,
                format!("fault {} on node-{node}: {e}", kind.label()),
            ),
        }
        // Let the grace pass before the next fault.
        next = (Instant::now() + GRACE).max(next + plan.fault_every);
    }
}

/// `POST /v1/reload` every `reload_every` until `done`.
pub(crate) fn reloads(ctx: &Ctx, daemon: &Daemon, done: &AtomicBool) {
    let mut next = ctx.t0 + ctx.plan.reload_every;
    while !done.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        next += ctx.plan.reload_every;
        match admin_post(daemon, "/v1/reload") {
            Ok(_) => {
                ctx.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => ctx.stats.error(ctx.t0, format!("reload: {e}")),
        }
    }
}
