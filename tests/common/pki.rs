//! Test certificates made with the real `openssl` command: a CA and leaf
//! certificates signed by it, for the mTLS listener's tests.

use std::fs;
use std::path::Path;
use std::process::Command;

use super::all_output;

/// Runs `openssl` in `dir`; panics with its output when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        all_output(&out)
    );
}

/// A self-signed CA `<name>.pem`/`<name>.key` with subject `/CN=<name>`.
pub fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// A certificate `<name>.pem`/`<name>.key` with subject `subj`, signed by `ca`.
pub fn issue_cert(dir: &Path, ca: &str, name: &str, subj: &str, ext: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subj,
        ],
    );
    fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// The mTLS listener's usual certificates in `dir` (created if needed): the
/// CA `ca`, the daemon's `server` certificate with an IP SAN of 127.0.0.1
/// (kube-apiserver sends no SNI for an IP URL, so the certificate must name
/// the IP), and kube-apiserver's client certificate `<client>` with the CN
/// `kube-apiserver-egress`.
pub fn egress_pki(dir: &Path, client: &str) {
    fs::create_dir_all(dir).unwrap();
    make_ca(dir, "ca");
    issue_cert(
        dir,
        "ca",
        "server",
        "/CN=tunneler",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    issue_cert(
        dir,
        "ca",
        client,
        "/CN=kube-apiserver-egress",
        "extendedKeyUsage=clientAuth\n",
    );
}
