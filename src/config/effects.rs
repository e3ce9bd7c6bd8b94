//! The reload effect of every config key: when a changed key takes
//! effect. It sits beside the config types it describes; `control::reload`
//! compares two configs key by key and looks each changed key up here. A
//! unit test fails when a config key has no row, or a row names no key,
//! and others check that the configuration reference marks exactly the
//! `Restart` keys "Restart.", and that the example config's comments say
//! "restart" at exactly those keys.

/// When a changed key takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// At once (or from each node's next connect), by the reload itself.
    Live,
    /// For nodes added or changed from now on; `tunneler nodes remove`/`add`
    /// or a restart applies it to the others.
    NewNodes,
    /// Only after a restart: it shaped something built once at start (a
    /// bound socket, a semaphore, a watcher).
    Restart,
}

/// The reload effect of every config key: `section` covers the whole
/// section, `section.key` one key (and its sub-keys). The more specific
/// row wins.
pub const EFFECTS: &[(&str, Effect)] = &[
    ("ssh.user", Effect::Live),
    ("ssh.identity_file", Effect::Live),
    ("ssh.known_hosts_file", Effect::Live),
    ("ssh.port", Effect::Live),
    ("ssh.connect_timeout", Effect::Live),
    ("ssh.keepalive_interval", Effect::Live),
    ("ssh.keepalive_max", Effect::Live),
    ("ssh.connections_per_node", Effect::NewNodes),
    ("ssh.max_connections_per_node", Effect::NewNodes),
    ("ssh.extra_session_idle", Effect::Live),
    ("ssh.maximum_packet_size", Effect::Live),
    ("ssh.window", Effect::Live),
    ("ssh.max_concurrent_handshakes", Effect::Restart),
    ("ssh.host_key_policy", Effect::Live),
    ("ssh.passphrase_file", Effect::Live),
    ("ssh.identity_agent", Effect::Live),
    ("ssh.certificate_file", Effect::Live),
    ("reconnect", Effect::Live),
    ("proxy.listen", Effect::Restart),
    ("proxy.service_cidrs", Effect::Live),
    ("proxy.cluster_cidrs", Effect::Live),
    ("proxy.pod_network_cidrs", Effect::Live),
    ("proxy.dial_timeout", Effect::Live),
    ("proxy.wait_for_healthy", Effect::Live),
    ("proxy.drain_timeout", Effect::Live),
    ("proxy.handshake_timeout", Effect::Live),
    ("proxy.max_pending_handshakes", Effect::Restart),
    ("proxy.max_streams_per_node", Effect::Live),
    ("proxy.node_local_via_loopback", Effect::Live),
    ("proxy.node_ports", Effect::Live),
    ("proxy.pod_host_offsets", Effect::Live),
    ("proxy.socket_group", Effect::Restart),
    ("proxy.tls", Effect::Restart),
    ("proxy.relay", Effect::Live),
    ("proxy.access_log", Effect::Live),
    ("admin.socket", Effect::Restart),
    ("admin.socket_group", Effect::Restart),
    ("admin.admin_uids", Effect::Live),
    ("admin.metrics_listen", Effect::Restart),
    ("admin.ready_min_healthy", Effect::Live),
    ("health", Effect::Live),
    ("discovery", Effect::Restart),
    ("runtime", Effect::Restart),
    ("node", Effect::Live),
];

/// The row for `key`: exact, else the longest row that `key` extends at a
/// `.` or `_` boundary (`proxy.relay` covers `proxy.relay_buffer_budget`
/// as the reference spells it, `proxy.tls` covers `proxy.tls.listen`).
pub fn effect(key: &str) -> Option<Effect> {
    EFFECTS
        .iter()
        .filter(|(row, _)| {
            key == *row
                || key
                    .strip_prefix(row)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('_'))
        })
        .max_by_key(|(row, _)| row.len())
        .map(|(_, e)| *e)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::Value;

    use super::*;
    use crate::config::{example, example_text, Config};

    /// `config` as a JSON object of sections, as the diff sees it.
    fn sections(config: &Config) -> serde_json::Map<String, Value> {
        match serde_json::to_value(config).unwrap() {
            Value::Object(m) => m,
            other => panic!("config serializes to {other:?}"),
        }
    }

    /// Every key the config types serialize has a row, and every row names
    /// a key: a new config field cannot slip past the reload unnoticed.
    #[test]
    fn every_config_key_has_exactly_one_reload_row() {
        let row = |k: &str| EFFECTS.iter().any(|(r, _)| *r == k);
        let mut keys = Vec::new();
        for (section, value) in sections(&example()) {
            match value {
                Value::Object(m) if !row(&section) => {
                    for k in m.keys() {
                        let key = format!("{section}.{k}");
                        assert!(row(&key), "config key {key} has no reload row");
                        keys.push(key);
                    }
                }
                _ => assert!(row(&section), "config section {section} has no reload row"),
            }
            keys.push(section);
        }
        for (r, _) in EFFECTS {
            assert!(keys.iter().any(|k| k == r), "row {r} names no config key");
        }
        let mut rows: Vec<_> = EFFECTS.iter().map(|(r, _)| r).collect();
        rows.sort();
        rows.dedup();
        assert_eq!(rows.len(), EFFECTS.len(), "a key has two rows");
    }

    /// The reload column of docs/configuration.md says for every key what
    /// a reload does with it, and it must be what this table says:
    /// "restart" exactly when it needs one, "restart (or node remove/add)"
    /// for keys that apply to new nodes only, and otherwise a live kind
    /// ("live", "next connect", "new streams").
    #[test]
    fn the_reference_says_what_a_reload_applies() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("docs/configuration.md"))
            .expect("docs/configuration.md");
        let mut rows = 0;
        for line in text.lines() {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            // | `key` | default | reload | meaning |
            let (Some(key), Some(column)) = (cols.get(1), cols.get(3)) else {
                continue;
            };
            let Some(key) = key.strip_prefix('`').and_then(|k| k.split('`').next()) else {
                continue;
            };
            let Some(effect) = effect(&key.replace("[]", "")) else {
                continue;
            };
            rows += 1;
            let documented = match *column {
                "restart" => Effect::Restart,
                "restart (or node remove/add)" => Effect::NewNodes,
                "live" | "next connect" | "new streams" => Effect::Live,
                other => panic!("{key}: unknown reload column {other:?}"),
            };
            assert_eq!(
                documented, effect,
                "{key}: a reload's effect is {effect:?}, docs/configuration.md says {column:?}"
            );
        }
        assert!(rows > 30, "config reference table not found ({rows} rows)");
    }

    /// The example config's comment above a key (or above its section, for
    /// a row that covers a whole section) says "restart" exactly when a
    /// reload does not apply the key.
    #[test]
    fn the_example_config_says_restart_exactly_at_the_restart_keys() {
        let text = example_text();
        let says_restart =
            |block: &[&str]| block.iter().any(|l| l.to_lowercase().contains("restart"));
        let mut section = String::new();
        let mut block: Vec<&str> = Vec::new();
        let mut header_blocks: std::collections::HashMap<String, Vec<&str>> = Default::default();
        let mut keys = 0;
        for line in text.lines() {
            let bare = line.trim_start_matches('#').trim();
            if line.trim().is_empty() {
                block.clear();
            } else if bare.starts_with('[') && bare.ends_with(']') {
                section = bare.trim_matches(|c| c == '[' || c == ']').to_string();
                header_blocks.insert(section.clone(), std::mem::take(&mut block));
            } else if let Some((key, _)) = bare.split_once('=').filter(|(k, _)| {
                !k.trim().is_empty() && k.trim().chars().all(|c| c.is_ascii_lowercase() || c == '_')
            }) {
                let full = format!("{section}.{}", key.trim());
                let Some((row, effect)) = EFFECTS
                    .iter()
                    .filter(|(r, _)| {
                        full == *r
                            || full.starts_with(&format!("{r}."))
                            || full.starts_with(&format!("{r}_"))
                    })
                    .max_by_key(|(r, _)| r.len())
                else {
                    panic!("example key {full} has no reload row");
                };
                let said = if *row == full {
                    says_restart(&block)
                } else {
                    says_restart(header_blocks.get(*row).map_or(&[][..], |b| &b[..]))
                };
                assert_eq!(
                    said,
                    *effect == Effect::Restart,
                    "{full}: a reload's effect is {effect:?}, the example's comment {} restart",
                    if said {
                        "mentions a"
                    } else {
                        "does not mention a"
                    }
                );
                keys += 1;
                block.clear();
            } else {
                block.push(line);
            }
        }
        assert!(keys > 30, "only {keys} keys found in the example");
    }
}
