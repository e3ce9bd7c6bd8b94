//! Slots: exclusively owned numbers (addresses, namespace and link names)
//! for one cluster, and what clears a slot after its owner is gone.

use super::*;

/// An exclusively owned slot number, held as an `flock` on
/// `SLOT_ROOT/<n>.lock`. The kernel drops the lock when its owner exits,
/// however it exits, so a crashed run never keeps a slot; the next owner
/// clears what the crashed one left in the kernel.
///
/// Each slot also has a reaper: a shell in its own session, outside the
/// test's process group, that waits for EOF on a pipe only this process
/// writes to. A test process killed hard (SIGKILL: no `Drop` runs) closes
/// the pipe; the reaper then takes the slot's lock (so it never races the
/// slot's next owner) and kills every process left in the slot's
/// namespaces (sshd, its sessions, anything started there) and deletes the
/// namespaces, veths and bridge. On an orderly end `Drop` kills the reaper
/// first (the cluster's own teardown does the clearing), so it never
/// touches a slot that a later cluster of the same process took.
pub(crate) struct Slot {
    pub(super) n: u32,
    /// The reaper, with the write end of its stdin (dropping that is what
    /// starts it, so it is killed before the lock goes).
    reaper: Option<Child>,
    /// Kept open: closing it releases the lock. Declared after `reaper`.
    _lock: fs::File,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut r) = self.reaper.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

/// The reaper's clearing, run by `flock` under the slot's lock as
/// `sh -c REAPER_CLEAR <slot>` (the slot number is `$0`).
const REAPER_CLEAR: &str = r#"
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^tnl$0-[0-9]+$"); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
done
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
    grep -E "^(tv$0h[0-9]+|tnlbr$0)$"); do
    ip link del "$l" 2>/dev/null
done
true"#;

/// Starts slot `n`'s reaper (see [`Slot`]); `None` when it cannot start,
/// which only loses the clearing after a hard kill.
fn spawn_reaper(n: u32) -> Option<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    // Waits for EOF, then `flock LOCK sh -c REAPER_CLEAR N`.
    cmd.args([
        "-c",
        "read -r _ || true\nexec flock \"$0\" sh -c \"$1\" \"$2\"",
    ])
    .arg(format!("{SLOT_ROOT}/{n}.lock"))
    .args([REAPER_CLEAR, &n.to_string()])
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it runs in the forked child
    // before exec. Its own session keeps the reaper out of the test's
    // process group, which a timeout may kill as a whole.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().ok()
}

impl Slot {
    pub(super) fn acquire() -> Slot {
        fs::create_dir_all(SLOT_ROOT).unwrap();
        // Start at a pid-dependent offset so parallel processes rarely
        // contend for the same numbers.
        let start = std::process::id() % MAX_SLOT;
        for k in 0..MAX_SLOT {
            let n = (start + k) % MAX_SLOT + 1;
            let path = format!("{SLOT_ROOT}/{n}.lock");
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            // flock locks belong to the open file description, so threads of
            // one process exclude each other as well as other processes do.
            if file.try_lock().is_ok() {
                kill_stale_daemon(n);
                remove_slot_leftovers(n);
                return Slot {
                    n,
                    reaper: spawn_reaper(n),
                    _lock: file,
                };
            }
        }
        panic!("no free test slot in {SLOT_ROOT} (1..={MAX_SLOT})");
    }

    /// Where the pid of this slot's daemon is recorded.
    pub(super) fn daemon_pid_file(&self) -> PathBuf {
        daemon_pid_file(self.n)
    }
}

fn daemon_pid_file(n: u32) -> PathBuf {
    PathBuf::from(format!("{SLOT_ROOT}/{n}.daemon"))
}

/// A test process killed hard leaves its daemon running; its pid was
/// recorded next to the slot lock.
fn kill_stale_daemon(n: u32) {
    let file = daemon_pid_file(n);
    let pid = fs::read_to_string(&file)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    let _ = fs::remove_file(&file);
    let Some(pid) = pid else { return };
    // Only a daemon run on this slot's config, in case the pid was reused.
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("tunneler") && cmdline.contains(&format!("/tmp/tnl{n}.")) {
        signal(pid, "KILL");
    }
}

/// Deletes namespaces `tnl<n>-*`, veths `tv<n>h*` and bridge `tnlbr<n>`.
fn remove_slot_leftovers(n: u32) {
    let prefix = format!("tnl{n}-");
    if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&prefix) {
                kill_namespace_processes(name);
                run_quiet("ip", &["netns", "del", name]);
            }
        }
    }
    let veth = format!("tv{n}h");
    if let Ok(o) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let name = line.split(':').nth(1).unwrap_or("").trim();
            let name = name.split('@').next().unwrap_or("");
            if name.starts_with(&veth) {
                run_quiet("ip", &["link", "del", name]);
            }
        }
    }
    let bridge = format!("tnlbr{n}");
    run_quiet("ip", &["link", "del", &bridge]);
}
