//! The command-line surface: `status` (table, JSON, exit codes),
//! `check-config` against the fixture folders, and `keygen`.

use crate::common;
use common::TunnelState;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{all_output, find_node, tunneler, Cluster, Daemon, StatusDocument};

const READY: Duration = Duration::from_secs(20);

#[test]
fn status_reports_table_json_and_exit_codes() {
    require_netns!("status_reports_table_json_and_exit_codes");
    let cluster = Cluster::new(2);
    let daemon = Daemon::start(&cluster);
    daemon.wait_all_healthy(READY);
    let sock = cluster.admin_socket();
    let sock = sock.to_str().unwrap();

    let out = tunneler(&["status", "--socket", sock]);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let header = stdout.lines().next().unwrap_or_default();
    for col in [
        "NAME",
        "ADDRESS",
        "STATE",
        "SINCE",
        "STREAMS",
        "RTT",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "column {col} missing in {header:?}");
    }
    for node in &cluster.nodes {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(node.name.as_str()))
            .unwrap_or_else(|| panic!("no row for {} in\n{stdout}", node.name));
        assert!(row.contains(&format!("{}:22", node.ip)), "{row}");
        assert!(row.contains("healthy"), "{row}");
    }

    // --config finds the socket through the config file.
    let out = tunneler(&["status", "--config", daemon.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));

    let out = tunneler(&["status", "--socket", sock, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let json: StatusDocument = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(json.nodes.len(), 2, "{json:?}");
    assert_eq!(
        find_node(&json, "node-2").unwrap().state,
        TunnelState::Healthy
    );

    // One node down: exit 1, and the row says so.
    cluster.kill_sshd(2);
    daemon.wait_node_unhealthy("node-2", READY);
    let out = tunneler(&["status", "--socket", sock]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some("node-2"))
        .unwrap_or_else(|| panic!("no row for node-2 in\n{stdout}"));
    assert!(!row.contains("healthy"), "{row}");
    let out = tunneler(&["status", "--socket", sock, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
}

#[test]
fn status_without_a_daemon_exits_2_and_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-listens-here.sock");
    let out = tunneler(&["status", "--socket", sock.to_str().unwrap()]);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains(sock.to_str().unwrap()), "{text}");

    // A stale socket file with no listener behind it.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = tunneler(&["status", "--socket", stale.to_str().unwrap(), "--json"]);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains(stale.to_str().unwrap()), "{text}");
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {}", dir.display());
    v
}

/// Copies a fixture into a fresh directory next to a real key pair and a
/// known_hosts file at the relative paths the fixtures use, so that only
/// the config's own content decides the outcome.
fn stage(fixture: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let key = keys.join("id_ed25519");
    if Path::new("/usr/bin/ssh-keygen").exists() {
        common::ssh_keygen(&key, "fixture");
    } else {
        let out = tunneler(&["keygen", "--out", key.to_str().unwrap()]);
        assert!(out.status.success(), "{}", all_output(&out));
    }
    // Any well-formed key will do as the nodes' host key.
    let pubkey = fs::read_to_string(keys.join("id_ed25519.pub")).unwrap();
    let blob: Vec<&str> = pubkey.split_whitespace().take(2).collect();
    fs::write(
        keys.join("known_hosts"),
        format!(
            "10.0.0.11 {}\n10.0.0.12 {}\n",
            blob.join(" "),
            blob.join(" ")
        ),
    )
    .unwrap();
    // One neutral name for every fixture: check-config prints `path: error`,
    // and a fixture's own name (`missing_user.toml`) must not be what
    // "names the key".
    let path = dir.path().join("config.toml");
    fs::copy(fixture, &path).unwrap();
    (dir, path)
}

#[test]
fn check_config_accepts_valid_fixtures() {
    for fixture in fixtures("valid") {
        let (_dir, path) = stage(&fixture);
        let out = tunneler(&["check-config", "--config", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{} rejected: {}",
            fixture.display(),
            all_output(&out)
        );
    }
}

/// Each invalid fixture starts with `# expect: a | b`: the error message
/// must name at least one of those (the offending key or value).
#[test]
fn check_config_rejects_invalid_fixtures_naming_the_key() {
    let mut failures = Vec::new();
    for fixture in fixtures("invalid") {
        let text = fs::read_to_string(&fixture).unwrap();
        let expect: Vec<String> = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect:"))
            .unwrap_or_else(|| panic!("{} lacks a '# expect:' line", fixture.display()))
            .split('|')
            .map(|s| s.trim().to_string())
            .collect();
        let (dir, path) = stage(&fixture);
        let out = tunneler(&["check-config", "--config", path.to_str().unwrap()]);
        // Only what the error itself says: without the staged path and
        // the directory the test put it in.
        let msg = all_output(&out)
            .replace(path.to_str().unwrap(), "<config>")
            .replace(dir.path().to_str().unwrap(), "<dir>");
        let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
        if out.status.success() {
            failures.push(format!("{name}: accepted (exit 0): {msg}"));
        } else if !expect.iter().any(|e| msg.contains(e.as_str())) {
            failures.push(format!("{name}: message does not name {expect:?}: {msg}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn check_config_reports_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let out = tunneler(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        all_output(&out).contains("absent.toml"),
        "{}",
        all_output(&out)
    );
}

#[test]
fn keygen_writes_a_private_key_and_an_authorized_keys_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    let out = tunneler(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", all_output(&out));

    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key mode {mode:o}");
    let pubkey = fs::read_to_string(dir.path().join("id.pub")).expect("id.pub");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .unwrap_or_else(|| panic!("no key line in {stdout:?}"));
    assert!(line.starts_with("restrict,port-forwarding"), "{line}");
    assert!(line.contains("command=\"/bin/false\""), "{line}");
    let blob = pubkey.split_whitespace().nth(1).expect("key blob in .pub");
    assert!(line.contains(blob), ".pub {pubkey:?} vs line {line:?}");

    // OpenSSH reads both files as an ed25519 key pair.
    if Path::new("/usr/bin/ssh-keygen").exists() {
        for f in [key.clone(), dir.path().join("id.pub")] {
            let out = std::process::Command::new("/usr/bin/ssh-keygen")
                .arg("-l")
                .arg("-f")
                .arg(&f)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                f.display(),
                all_output(&out)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("(ED25519)"));
        }
        let out = std::process::Command::new("/usr/bin/ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", all_output(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(blob));
    } else {
        common::skip(
            "keygen_writes_a_private_key_and_an_authorized_keys_line (OpenSSH check)",
            "no /usr/bin/ssh-keygen to read the key back",
        );
    }

    // It refuses to overwrite an existing key, says so, and changes
    // neither file.
    let before = fs::read(&key).unwrap();
    let before_pub = fs::read(dir.path().join("id.pub")).unwrap();
    let out = tunneler(&["keygen", "--out", key.to_str().unwrap()]);
    let msg = all_output(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "keygen over an existing key: {msg}"
    );
    assert!(
        msg.contains("already exists") && msg.contains(key.to_str().unwrap()),
        "{msg}"
    );
    assert_eq!(fs::read(&key).unwrap(), before, "keygen changed the key");
    assert_eq!(
        fs::read(dir.path().join("id.pub")).unwrap(),
        before_pub,
        "keygen changed the .pub"
    );
}
