//! Samples

use crate::*;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) rss_kib: u64,
    pub(crate) fds: u64,
    pub(crate) tasks: u64,
    pub(crate) active: u64,
    pub(crate) client_open: i64,
}

/// One reading of the daemon: /proc, then `GET /metrics`; `t` counts from
/// `t0`, and `client_open` is the harness's own count of long streams.
pub(crate) fn sample(t0: Instant, client_open: i64, daemon: &Daemon) -> Option<Sample> {
    let pid = daemon.pid();
    let fds = common::fd_count(pid);
    let rss_kib = common::rss_kib(pid);
    let (code, text) = common::admin_request(&daemon.admin, "GET", "/metrics", None).ok()?;
    if code != 200 {
        return None;
    }
    Some(Sample {
        t: t0.elapsed().as_secs_f64(),
        rss_kib,
        fds,
        tasks: common::metric_sum(&text, "tunneler_runtime_tasks")? as u64,
        active: common::metric_sum(&text, "tunneler_active_streams").unwrap_or(0.0) as u64,
        client_open,
    })
}
