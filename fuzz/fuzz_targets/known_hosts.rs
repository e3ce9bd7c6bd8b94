//! known_hosts parsing and matching. Input: known_hosts text, then a line
//! `\n--\n`, then host names (one per line) to check a fixed key and a fixed
//! host certificate against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunneler::{KnownHostsFile, Verdict};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFnkMSKsscSxIOcqIJqT1IBgRZbzeg4RR1hUqkvJzp+r";
const CERT: &str = include_str!("../../tests/fixtures/known_hosts/host-cert-valid.pub");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, hosts) = text
        .split_once("\n--\n")
        .unwrap_or((text, "10.0.0.1\nnode-a"));
    let parsed = KnownHostsFile::parse(file);
    let names: Vec<&str> = hosts.lines().take(4).collect();
    let key = russh::keys::ssh_key::PublicKey::from_openssh(KEY).unwrap();
    let cert = russh::keys::ssh_key::Certificate::from_openssh(CERT.trim()).unwrap();
    for port in [22u16, 2222] {
        let v = parsed.check(&names, port, &key);
        let _ = parsed.has_cert_authority_for(&names, port);
        let c = parsed.check_certificate(&names, port, &cert, 1_767_225_600);
        // A certificate is never trusted less strictly than its plain key
        // would be refused: a revoked key stays revoked inside a certificate.
        if v == Verdict::Revoked {
            assert_eq!(c, Verdict::Revoked);
        }
    }
});
