//! Admin API request bodies (`POST /v1/nodes`): arbitrary bytes as JSON,
//! then node validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunneler::config::node_from_json;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(n) = node_from_json(value, 22) {
        assert!(n.port != 0);
        assert!(!n.internal_ips.is_empty());
        assert!(!n.name.is_empty() && n.name.len() <= 253);
        assert!(!n.address.is_empty() && !n.address.contains(char::is_whitespace));
    }
});
