//! Config parsing and validation: never a panic, and whatever validates
//! satisfies the node-set rules the rest of the daemon relies on.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tunneler::{check_node_set, Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::from_toml(text, Path::new("/etc/tunneler")) {
        check_node_set(&c.nodes, &c.proxy.service_cidrs)
            .expect("validated config passes check_node_set");
        assert!(c.ssh.identity_file.is_absolute());
        assert!(c.ssh.known_hosts_file.is_absolute());
        assert!(c.reconnect.initial_backoff <= c.reconnect.max_backoff);
        for n in &c.nodes {
            assert!(n.port != 0);
            assert!(!n.internal_ips.is_empty());
        }
    }
});
