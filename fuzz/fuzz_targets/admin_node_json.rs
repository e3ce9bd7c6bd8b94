//! Admin API request bodies (`POST /v1/nodes`): arbitrary bytes through
//! the admin API's own request parser, then the node validation the API
//! applies to what it parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunneler::{node_from_spec, AddressOrigin, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(Request::AddNode(spec)) = Request::parse("POST", "/v1/nodes", data) else {
        return;
    };
    if let Ok(n) = node_from_spec(spec, 22, AddressOrigin::Operator) {
        assert!(n.port != 0);
        assert!(!n.internal_ips.is_empty());
        assert!(!n.name.is_empty() && n.name.len() <= 253);
        assert!(!n.address.is_empty() && !n.address.contains(char::is_whitespace));
    }
});
