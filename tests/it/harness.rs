//! Checks the test harness itself with OpenSSH's own client, independent of
//! the daemon: the namespaces, sshd, keys, known_hosts and servers are what
//! the other integration tests assume.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::Cluster;

/// `ssh -W target` through node `i` with the cluster's key and known_hosts.
fn ssh_w(cluster: &Cluster, i: usize, target: &str, input: &str) -> std::process::Output {
    let node = cluster.node(i);
    let mut child = Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(&cluster.client_key)
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            cluster.dir.join("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-W",
            target,
            &format!("root@{}", node.ip),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn harness_nodes_answer_through_openssh() {
    require_netns!("harness_nodes_answer_through_openssh");
    let cluster = Cluster::new(2);
    for i in 1..=2 {
        let node = cluster.node(i);
        for ip in [node.ip, node.pod_ip, node.service_ip] {
            let out = ssh_w(&cluster, i, &format!("{ip}:{}", common::ECHO_PORT), "hi\n");
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                text.trim(),
                format!("node={} local={ip} echo=hi", node.name),
                "stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The host key swap makes OpenSSH refuse the node, as it should the daemon.
    cluster.replace_host_key(1);
    let node = cluster.node(1);
    let out = ssh_w(
        &cluster,
        1,
        &format!("{}:{}", node.ip, common::ECHO_PORT),
        "x\n",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The last line of an unprivileged `cargo test` (tests/zz_skipped.rs):
/// distinct tests are counted once however many parts of them skipped,
/// reasons are ranked by how many tests they stopped, and past three the
/// rest are summed up. Pure text in, text out: runs everywhere, also
/// under CI (where a real skip would fail instead).
#[test]
fn skip_summary_counts_each_test_once_and_ranks_reasons() {
    assert_eq!(common::skip_summary(""), "tunneler tests: none skipped");
    let records = "\
a\tneeds root\n\
b\tneeds root\n\
b\tno IPv6\n\
c\tneeds root\n\
d\tno IPv6\n\
e\tno ssh-agent\n\
f\tno ssh-keygen\n\
g\tno ssh-keygen\n\
h\tno socat\n\
a torn line without a tab\n";
    assert_eq!(
        common::skip_summary(records),
        "tunneler tests: 8 skipped (3 × needs root; 2 × no IPv6; 2 × no ssh-keygen; \
         2 × 2 other reasons (see the SKIP lines)); run as root, as .ci/run does, to run them"
    );
}
