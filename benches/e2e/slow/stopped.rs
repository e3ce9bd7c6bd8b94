//! A reader that stops: cut, and its neighbours keep moving.

use super::*;

/// A reader that stops beside neighbours on its session: after
/// `relay_stopped_reader_timeout` (2 s here) its stream is reset, and
/// the neighbours' echo and download complete.
pub(crate) fn stopped_reader(cluster: &Cluster, ep: &Endpoints, sz: &Sizes) -> Table {
    progress("slow: a reader that stopped beside neighbours on its session");
    let spec = ConfigSpec {
        ssh_extra: "max_connections_per_node = 1".into(),
        ..ConfigSpec::default()
    };
    let toml = bench_toml(cluster, &spec).replacen(
        "[proxy]\n",
        "[proxy]\nrelay_stopped_reader_timeout = \"2s\"\n",
        1,
    );
    let mut daemon = Daemon::start_toml(cluster, &toml, &[]);
    daemon.wait_all_healthy(Duration::from_secs(30));
    // This daemon's own TCP listener (the Unix socket path is the same).
    let ep = &Endpoints {
        node_ip: ep.node_ip,
        forwards: ep.forwards.clone(),
        daemon_tcp: daemon.tcp_listener(),
        daemon_unix: ep.daemon_unix.clone(),
    };
    let bulk = (sz.bulk_bytes / 64).max(1 << 20);
    let mut t = Table::new(
        format!("A reader that stopped, beside neighbours on its session (max_connections_per_node = 1, relay_stopped_reader_timeout = 2s): {MSG}-byte round trips and a {} download", mib(bulk)),
        &["path", "stopped stream", "after", "round trips", "p99", "download MB/s"],
    );
    // TCP: a cut reaches a TCP client as a reset; on the Unix socket a
    // client that only reads sees EOF (see docs/operations.md).
    for p in [PathKind::DaemonTcp, PathKind::SshL] {
        let run = || -> io::Result<Vec<String>> {
            let seed = next_seed();
            let mut echo = ep.dial(p, ECHO_PORT)?;
            let mut dl = ep.dial(p, SOURCE_PORT)?;
            let mut stopped = ep.dial(p, SOURCE_PORT)?;
            let mut req = [0u8; 16];
            req[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            req[8..].copy_from_slice(&next_seed().to_le_bytes());
            stopped.write_all(&req)?;
            let t0 = Instant::now();
            // It never reads; the neighbours work beside it.
            std::thread::sleep(Duration::from_secs(1));
            let until = Instant::now() + Duration::from_secs(10);
            let rtts = rtts_on(
                &mut echo,
                seed,
                0,
                200,
                Some(until),
                Duration::from_millis(10),
                None,
            )?;
            let d = read_source(&mut dl, bulk, None, &AtomicU64::new(0))?;
            finish_echo(&mut echo)?;
            // What the stopped stream shows when it finally reads.
            let mut buf = vec![0u8; 1 << 20];
            let mut end = String::from("still open");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match stopped.read(&mut buf) {
                    Ok(0) => {
                        end = "EOF (FIN)".into();
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        end = "reset".into();
                        break;
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::TimedOut =>
                    {
                        continue
                    }
                    Err(e) => {
                        end = format!("{e}");
                        break;
                    }
                }
            }
            Ok(vec![
                p.label().into(),
                end,
                format!("{:.1} s", t0.elapsed().as_secs_f64()),
                rtts.len().to_string(),
                pct(&rtts, 99.0),
                format!("{:.1}", bulk as f64 / d.elapsed.as_secs_f64() / 1e6),
            ])
        };
        match run() {
            Ok(r) => t.row(r),
            Err(e) => {
                fail(format!(
                    "stopped reader beside neighbours, {}: {e}",
                    p.label()
                ));
                let mut r = vec![p.label().to_string()];
                r.resize(6, NA.into());
                t.row(r);
            }
        }
    }
    t.notes.push("the stopped stream asks for 1 TiB and never reads; the echo (one round trip per 10 ms) and the download run beside it on the same session. ssh -L stops only that channel. The daemon resets the stopped stream once it has read nothing for the timeout while others ride its session".into());
    daemon.stop();
    t
}
