//! Admin API helpers (never panic: failures are recorded)

use crate::*;

pub(crate) fn node_state(daemon: &Daemon, i: usize) -> Option<TunnelState> {
    let s = daemon.try_status().ok()?;
    let name = format!("node-{i}");
    s.nodes.iter().find(|n| n.name == name).map(|n| n.state)
}

pub(crate) fn wait_healthy(daemon: &Daemon, i: usize, within: Duration) -> Result<(), String> {
    let mut last = None;
    let ok = common::poll(within, || {
        last = node_state(daemon, i);
        last == Some(TunnelState::Healthy)
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node-{i} not healthy within {within:?} (state {:?})",
            last.map(|s| s.to_string())
        ))
    }
}

pub(crate) fn admin_post(daemon: &Daemon, path: &str) -> Result<String, String> {
    match common::admin_request(&daemon.admin, "POST", path, None) {
        Ok((200, body)) => Ok(body),
        Ok((code, body)) => Err(format!("POST {path}: {code} {}", body.trim())),
        Err(e) => Err(format!("POST {path}: {e}")),
    }
}
