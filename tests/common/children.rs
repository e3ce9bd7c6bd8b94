//! The harness's child processes: they die with the test that started
//! them, however it ends.

use super::*;

/// Makes `cmd`'s process die with the thread that spawns it: the kernel
/// sends it SIGKILL (`PR_SET_PDEATHSIG`) when that thread exits, also
/// when the whole test process is SIGKILLed (cargo-mutants' timeout),
/// where no `Drop` runs. Every long-lived child of the harness (daemons,
/// the node-side servers, [`ChildGuard::spawn`], [`Cluster::spawn_in_node`])
/// goes through here. What the setting does not reach (sshd, which
/// daemonizes, and its session processes; the namespaces themselves) the
/// slot's reaper clears (see [`Slot`]).
///
/// The trap: the signal follows the *thread* that forked, not the process.
/// libtest runs each test on its own thread, which outlives everything the
/// test spawns; a child spawned from a short-lived helper thread would be
/// killed when that thread ends. No child is shared between tests (no
/// lazily started fixture), so none needs a process-long thread.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (prctl, getppid, raise): no allocation
    // and no locks. Tests may use `unsafe` for this; the daemon never does.
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then no
            // signal would ever come, so go now.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        })
    }
}

/// A child process that is killed (and reaped) when the guard drops, also
/// when the test panics, so no `tunneler run` outlives its test.
pub struct ChildGuard(Option<Child>);

impl From<Child> for ChildGuard {
    fn from(child: Child) -> ChildGuard {
        ChildGuard(Some(child))
    }
}

impl ChildGuard {
    /// Spawns `cmd` under the guard.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(Some(
            die_with_test(cmd)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        ))
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits (bounded by `timeout`) for the child to exit by itself and
    /// returns its status and output; `None` (and the child is killed) when
    /// it is still running after `timeout`.
    pub fn wait_exit(mut self, timeout: Duration) -> Option<Output> {
        let mut child = self.0.take()?;
        let exited = poll(timeout, || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        child.wait_with_output().ok()
    }

    /// The child, for its pipes.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
