//! The last line of `cargo test`: how many integration tests skipped, and
//! why.
//!
//! A test that cannot run here (no root, no network namespaces, no
//! ssh-agent) prints `SKIP <test>: <why>` and passes, so an unprivileged
//! run ends green with dozens of tests that never ran; those lines scroll
//! away among the `test result:` lines. Every skip also goes through
//! `common::skip`, which records it in a file for this `cargo test` run;
//! this binary, which cargo runs after the other test binaries (they run
//! in name order, and the library has no doctests to run after it), reads
//! that file, prints one summary line and removes it.
//!
//! It is a plain `main` (`harness = false` in Cargo.toml) so that the line
//! reaches the terminal uncaptured, and it always passes: the skips are
//! already decided, and `TUNNELER_REQUIRE_NETNS` (CI) is what turns them
//! into failures. Records of other runs (a filtered run that never reached
//! this binary, a run that was interrupted) are never counted here; those
//! whose `cargo` is gone are deleted.

mod common;

use std::fs;

fn main() {
    // `cargo test -- --list` asks every binary for its tests: this one has
    // none to list.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = common::skip_records_dir();
    let own = dir.join(format!("{}.log", common::skip_run_id()));
    let records = fs::read_to_string(&own).unwrap_or_default();
    let _ = fs::remove_file(&own);
    remove_stale(&dir);
    println!("{}", common::skip_summary(&records));
}

/// Deletes record files whose `cargo test` run has ended (its process is
/// gone, or its pid now belongs to a later process).
fn remove_stale(dir: &std::path::Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((pid, start)) = name.strip_suffix(".log").and_then(|id| id.split_once('-')) else {
            continue;
        };
        let alive = match (pid.parse::<u32>(), start.parse::<u64>()) {
            (Ok(pid), Ok(start)) => common::process_start_time(pid) == Some(start),
            _ => false,
        };
        if !alive {
            let _ = fs::remove_file(e.path());
        }
    }
}
