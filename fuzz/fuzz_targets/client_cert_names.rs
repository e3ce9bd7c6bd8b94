//! Client certificates on the mTLS listener: arbitrary bytes as an X.509
//! certificate, read for the names `proxy.tls.client_names` matches. The
//! chain check runs first in the daemon, but the reader must hold on any
//! input: no panic, and only names that are whole strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunneler::{certificate_names, name_allowed};

fuzz_target!(|data: &[u8]| {
    if let Some(names) = certificate_names(data) {
        let allowed = vec!["kube-apiserver-egress".to_string()];
        let ok = name_allowed(&names, &allowed);
        assert_eq!(
            ok,
            names.iter().any(|n| n.eq_ignore_ascii_case("kube-apiserver-egress"))
        );
    }
});
