//! The cluster: host certificates, nodes file

use crate::*;

pub(crate) fn node_dir(cluster: &Cluster, i: usize) -> PathBuf {
    cluster.dir.join(format!("node-{i}"))
}

pub(crate) fn host_key(cluster: &Cluster, i: usize) -> PathBuf {
    node_dir(cluster, i).join("ssh_host_ed25519_key")
}

pub(crate) fn path_with(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Signs node `i`'s current host key with the CA (`serial` tells the
/// certificates apart in sshd's log).
pub(crate) fn sign_host_key(cluster: &Cluster, i: usize, serial: u32) {
    let key = host_key(cluster, i);
    common::run(
        "/usr/bin/ssh-keygen",
        &[
            "-q",
            "-s",
            cluster.dir.join("host_ca").to_str().unwrap(),
            "-h",
            "-I",
            &format!("node-{i}-{serial}"),
            "-z",
            &serial.to_string(),
            "-n",
            &cluster.node(i).ip.to_string(),
            "-V",
            "-5m:+1d",
            path_with(&key, ".pub").to_str().unwrap(),
        ],
    );
}

/// Gives every node a host certificate from a fresh CA and makes
/// known_hosts trust only that CA (`@cert-authority`): no plain line lists
/// a node key, so every session checks a certificate.
pub(crate) fn use_host_certificates(cluster: &Cluster) {
    let ca = cluster.dir.join("host_ca");
    common::ssh_keygen(&ca, "soak-host-ca");
    for i in 1..=cluster.nodes.len() {
        sign_host_key(cluster, i, 0);
        let cfg = node_dir(cluster, i).join("sshd_config");
        let mut text = fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!(
            "HostCertificate {}\n",
            path_with(&host_key(cluster, i), "-cert.pub").display()
        ));
        fs::write(&cfg, text).unwrap();
        cluster.kill_sshd(i);
        cluster.start_sshd(i);
    }
    let ca_pub = fs::read_to_string(path_with(&ca, ".pub")).unwrap();
    let bare: Vec<&str> = ca_pub.split_whitespace().take(2).collect();
    fs::write(
        cluster.dir.join("known_hosts"),
        format!(
            "@cert-authority 10.200.{}.* {}\n",
            cluster.n,
            bare.join(" ")
        ),
    )
    .unwrap();
}

pub(crate) fn write_nodes_file(cluster: &Cluster, listed: &[usize]) {
    let items = listed
        .iter()
        .map(|&i| cluster.k8s_node_json(i, &[]))
        .collect();
    cluster.replace_file(
        &cluster.dir.join("nodes.json"),
        &Cluster::k8s_node_list(items),
    );
}
