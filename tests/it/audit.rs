//! The dependency check `.ci/run` runs (`.ci/audit`, cargo-audit against the
//! offline RustSec snapshot) can fail: it refuses a lock file holding a
//! version an advisory covers, passes on ours, and takes an ignore line
//! only with a reason.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn audit(lock: &str, ignore: Option<&Path>) -> Output {
    let mut c = Command::new(repo().join(".ci/audit"));
    c.arg(lock).current_dir(repo());
    if let Some(f) = ignore {
        c.env("TUNNELER_AUDIT_IGNORE", f);
    }
    c.output().expect("run .ci/audit")
}

/// Whether cargo-audit and the snapshot are there; skips otherwise (a
/// failure under CI, where `.ci/run` has run `.ci/audit` already).
fn can_audit(test: &str) -> bool {
    let db = std::env::var("TUNNELER_ADVISORY_DB")
        .map(|d| repo().join(d))
        .unwrap_or_else(|_| repo().join("../shared/advisory-db"));
    if !db.join("crates").is_dir() {
        common::skip(test, &format!("no advisory database at {}", db.display()));
        return false;
    }
    let installed = Command::new("cargo")
        .args(["audit", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        common::skip(
            test,
            "cargo-audit is not installed (cargo install cargo-audit --locked)",
        );
        return false;
    }
    true
}

#[test]
fn the_advisory_check_fails_on_a_vulnerable_lock_file_and_passes_on_ours() {
    if !can_audit("the_advisory_check_fails_on_a_vulnerable_lock_file_and_passes_on_ours") {
        return;
    }
    let fixture = "tests/fixtures/audit/vulnerable.Cargo.lock";
    let out = audit(fixture, None);
    let text = common::all_output(&out);
    assert!(!out.status.success(), "the fixture passed:\n{text}");
    assert!(
        text.contains("RUSTSEC-2021-0003") && text.contains("smallvec"),
        "{text}"
    );
    for lock in ["Cargo.lock", "fuzz/Cargo.lock"] {
        let out = audit(lock, None);
        assert!(
            out.status.success(),
            "{lock}:\n{}",
            common::all_output(&out)
        );
    }

    // No snapshot: the check fails and says where it looked.
    let out = Command::new(repo().join(".ci/audit"))
        .current_dir(repo())
        .env("TUNNELER_ADVISORY_DB", "/nonexistent/advisory-db")
        .output()
        .unwrap();
    let text = common::all_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("no RustSec advisory database at /nonexistent/advisory-db"),
        "{text}"
    );

    // An ignore line needs a reason; with one, the advisory is let through.
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare");
    std::fs::write(&bare, "RUSTSEC-2021-0003\n").unwrap();
    let out = audit(fixture, Some(&bare));
    let text = common::all_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("RUSTSEC-2021-0003 has no reason"), "{text}");
    let reasoned = dir.path().join("reasoned");
    std::fs::write(
        &reasoned,
        "# comment\nRUSTSEC-2021-0003 the fixture never calls insert_many\n",
    )
    .unwrap();
    let out = audit(fixture, Some(&reasoned));
    assert!(out.status.success(), "{}", common::all_output(&out));
}
