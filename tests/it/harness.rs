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

/// Env var naming the file where [`hard_killed_victim`] writes what it
/// started; set only by [`children_die_with_a_sigkilled_test`].
const VICTIM_OUT: &str = "TUNNELER_TEST_VICTIM_OUT";

/// Not a test of its own: the process that
/// [`children_die_with_a_sigkilled_test`] starts and SIGKILLs. It builds a
/// cluster with a daemon on it, writes the daemon's pid and every
/// process it can see in the node namespaces, then waits to be killed.
#[test]
#[ignore = "run by children_die_with_a_sigkilled_test in a process it SIGKILLs"]
fn hard_killed_victim() {
    require_netns!("hard_killed_victim");
    let Some(out) = std::env::var_os(VICTIM_OUT) else {
        panic!("{VICTIM_OUT} is not set: this runs only under children_die_with_a_sigkilled_test");
    };
    let cluster = Cluster::new(2);
    let daemon = common::Daemon::start(&cluster);
    daemon.wait_all_healthy(std::time::Duration::from_secs(30));
    let mut lines = vec![format!("daemon {}", daemon.pid())];
    for node in &cluster.nodes {
        let pids: Vec<String> = common::netns_pids(&node.ns)
            .iter()
            .map(|p| p.to_string())
            .collect();
        lines.push(format!("ns {} {}", node.ns, pids.join(" ")));
    }
    let tmp = std::path::PathBuf::from(&out).with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, &out).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(300));
}

/// A test process that is SIGKILLed (as cargo-mutants' timeout does) runs
/// no `Drop`: its daemon, node-side servers and sshd must still not
/// outlive it, and its namespaces must go. Runs [`hard_killed_victim`] in
/// a child process of this test binary, kills it once its cluster is up,
/// and checks that every process it had started is gone and that its
/// namespaces are deleted.
#[test]
fn children_die_with_a_sigkilled_test() {
    require_netns!("children_die_with_a_sigkilled_test");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("victim.txt");
    let log = std::fs::File::create(dir.path().join("victim.log")).unwrap();
    let mut victim = common::ChildGuard::spawn(
        // /proc/self/exe: this very binary, even when a rebuild has
        // replaced the file on disk meanwhile.
        Command::new("/proc/self/exe")
            .args([
                "--ignored",
                "--exact",
                "harness::hard_killed_victim",
                "--nocapture",
            ])
            .env(VICTIM_OUT, &out)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    let ready = common::poll(common::scaled(std::time::Duration::from_secs(90)), || {
        out.exists() || matches!(victim.child().try_wait(), Ok(Some(_)))
    });
    let victim_log = || std::fs::read_to_string(dir.path().join("victim.log")).unwrap_or_default();
    assert!(
        ready && out.exists(),
        "victim never came up: {}",
        victim_log()
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let mut pids = Vec::new();
    let mut namespaces = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("daemon") => pids.extend(words.filter_map(|p| p.parse::<u32>().ok())),
            Some("ns") => {
                namespaces.extend(words.next().map(str::to_string));
                let before = pids.len();
                pids.extend(words.filter_map(|p| p.parse::<u32>().ok()));
                // sshd and the servers: a namespace with nothing in it
                // would prove nothing.
                assert!(pids.len() > before, "no process in a namespace: {text}");
            }
            _ => panic!("unexpected line {line:?} in {text}"),
        }
    }
    assert_eq!(namespaces.len(), 2, "{text}");
    assert!(pids.iter().all(|p| common::pid_alive(*p)), "{text}");

    let victim_pid = victim.id() as libc::pid_t;
    // SAFETY: a plain kill(2) of our own child, which is still unreaped
    // (the ChildGuard holds it), so the pid cannot have been reused.
    assert_eq!(unsafe { libc::kill(victim_pid, libc::SIGKILL) }, 0);
    let _ = victim.child().wait();

    let gone = common::poll(common::scaled(std::time::Duration::from_secs(20)), || {
        pids.iter().all(|p| !common::pid_alive(*p))
    });
    let alive: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| common::pid_alive(*p))
        .collect();
    assert!(gone, "outlived the SIGKILLed test: {alive:?} of {text}");
    let cleared = common::poll(common::scaled(std::time::Duration::from_secs(20)), || {
        let list = common::run("ip", &["netns", "list"]);
        let list = String::from_utf8_lossy(&list.stdout).into_owned();
        namespaces.iter().all(|ns| {
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns.as_str()))
        })
    });
    assert!(cleared, "namespaces {namespaces:?} left behind");
}
