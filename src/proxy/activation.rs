//! Listening sockets handed in by the service manager (socket activation).
//!
//! With `tunneler.socket`, systemd (or `systemd-socket-activate`) owns the
//! egress and admin sockets and passes them to each daemon it starts as
//! file descriptors 3, 4, ... (`LISTEN_FDS`, for the pid in `LISTEN_PID`,
//! named by `LISTEN_FDNAMES`). While the daemon restarts, the sockets stay
//! open in the service manager, so kube-apiserver's connections queue in
//! the kernel's backlog and are served by the next daemon instead of being
//! refused.
//!
//! **Matching.** A passed socket serves the setting whose address it is
//! bound to: a Unix socket the `unix://` entry of `proxy.listen` or the
//! `admin.socket` with the same path (or the same file, through a symbolic
//! link in a directory), a TCP socket the `tcp://` entry, `proxy.tls.listen`
//! or `admin.metrics_listen` with the same address. Matching by address
//! needs no second list of names to keep in step with the config, and one
//! `.socket` unit may carry both sockets (systemd gives every socket of a
//! unit the same name). Names are a cross-check only: a socket named
//! `egress`, `admin` or `metrics` must match a setting of that role.
//! Any other name (systemd's default is the unit's name) is not checked.
//!
//! **Errors.** The daemon does not start when a passed socket is not a
//! listening stream socket, matches no setting, matches one of another role
//! than its name, or is a Unix socket any local user may connect to (mode
//! o+w: systemd's default `SocketMode=0666` would make an open proxy). A
//! configured address without a passed socket is bound as usual.
//!
//! **Ownership.** The service manager owns a passed socket's path and mode:
//! the daemon never chmods, chowns, replaces or unlinks it (so the next
//! daemon finds it), and `socket_group` does not apply to it. The
//! `LISTEN_*` variables are removed from the environment once read, so no
//! child process takes the sockets for its own.

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use socket2::{Socket, Type};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// More passed sockets than this is a broken environment, not a config.
const MAX_PASSED: usize = 64;

/// Why the passed sockets cannot be used. The daemon does not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is not a number.
    #[error("socket activation: LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a count we accept.
    #[error("socket activation: LISTEN_FDS={0:?} is not a count of descriptors (0 to 64)")]
    BadCount(String),
    /// `LISTEN_FDNAMES` does not name every descriptor.
    #[error("socket activation: LISTEN_FDNAMES has {names} name(s) for LISTEN_FDS={fds}")]
    NameCount {
        /// Names given.
        names: usize,
        /// Descriptors passed.
        fds: usize,
    },
    /// A passed descriptor cannot serve as a listener.
    #[error("socket activation: passed {which}: {reason}")]
    Unusable {
        /// Which descriptor, e.g. `fd 3 ("egress")`.
        which: String,
        /// Why.
        reason: String,
    },
    /// A passed socket matches no setting.
    #[error(
        "socket activation: passed {which} is bound to {addr}, which no setting names \
         (proxy.listen, proxy.tls.listen, admin.socket, admin.metrics_listen), or which \
         another passed socket already serves; fix the .socket unit or the config"
    )]
    Unmatched {
        /// Which descriptor.
        which: String,
        /// Its address.
        addr: String,
    },
    /// A passed socket's name says one role, its address another.
    #[error(
        "socket activation: passed {which} is named {name:?} but is bound to {addr}, \
         which the config uses for {setting} ({role})"
    )]
    WrongRole {
        /// Which descriptor.
        which: String,
        /// Its name.
        name: String,
        /// Its address.
        addr: String,
        /// The setting it matched.
        setting: String,
        /// That setting's role.
        role: &'static str,
    },
    /// A passed Unix socket any local user may connect to.
    #[error(
        "socket activation: passed {which} at {path} has mode {mode:o}: any local user may \
         connect to {setting}; set SocketMode=0600 (or 0660 with SocketGroup=) in the .socket unit"
    )]
    WorldAccessible {
        /// Which descriptor.
        which: String,
        /// The socket's path.
        path: String,
        /// Its mode.
        mode: u32,
        /// The setting it serves.
        setting: String,
    },
}

/// What a configured listener is for; also the name a passed socket may
/// carry to say which it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The CONNECT listeners (`proxy.listen`, `proxy.tls.listen`).
    Egress,
    /// The admin API socket (`admin.socket`).
    Admin,
    /// The Prometheus listener (`admin.metrics_listen`).
    Metrics,
}

impl Role {
    /// The descriptor name that means this role.
    pub fn name(self) -> &'static str {
        match self {
            Role::Egress => "egress",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
        }
    }

    fn from_name(name: &str) -> Option<Role> {
        [Role::Egress, Role::Admin, Role::Metrics]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// Parses the socket-activation variables (pure, for tests). `None` for a
/// variable that is not set. Descriptors are for us only when `LISTEN_PID`
/// is our pid; otherwise (a variable left over from a parent) none are.
/// Without `LISTEN_FDNAMES` every descriptor is named `unknown`, as
/// `sd_listen_fds_with_names(3)` does.
pub fn parse_listen_env(
    our_pid: u32,
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
) -> Result<Vec<(RawFd, String)>, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_string()))?;
    if pid != our_pid {
        return Ok(Vec::new());
    }
    let count: usize = match fds.trim().parse() {
        Ok(n) if n <= MAX_PASSED => n,
        _ => return Err(ActivationError::BadCount(fds.to_string())),
    };
    let names: Vec<String> = match names {
        None => vec!["unknown".to_string(); count],
        Some("") if count == 0 => Vec::new(),
        Some(n) => n.split(':').map(str::to_string).collect(),
    };
    if names.len() != count {
        return Err(ActivationError::NameCount {
            names: names.len(),
            fds: count,
        });
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, n)| (LISTEN_FDS_START + i as RawFd, n))
        .collect())
}

/// Reads and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, and
/// returns the descriptors passed to this process, each checked to be an
/// open socket (through `/proc/self/fd`), so that taking ownership of them
/// is sound. Call it first thing in `main`, before any thread starts
/// (changing the environment is not thread-safe) and before anything else
/// could take the descriptors for its own.
pub fn take_listen_fds() -> Result<Vec<(RawFd, String)>, ActivationError> {
    let var = |k: &str| std::env::var(k).ok();
    let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let passed = parse_listen_env(
        std::process::id(),
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
    )?;
    for (fd, name) in &passed {
        let which = describe(*fd, name);
        match std::fs::metadata(format!("/proc/self/fd/{fd}")) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(ActivationError::Unusable {
                    which,
                    reason: "not a socket".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ActivationError::Unusable {
                    which,
                    reason: "not an open descriptor (LISTEN_FDS counts more than were passed)"
                        .into(),
                })
            }
            Err(e) => {
                return Err(ActivationError::Unusable {
                    which,
                    reason: format!("cannot inspect it through /proc/self/fd: {e}"),
                })
            }
        }
    }
    Ok(passed)
}

fn describe(fd: RawFd, name: &str) -> String {
    format!("fd {fd} ({name:?})")
}

/// Where a passed socket is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bound {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Unix(p) => write!(f, "unix://{}", p.display()),
            Bound::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[derive(Debug)]
struct Passed {
    which: String,
    name: String,
    bound: Bound,
    socket: Socket,
}

/// The listening sockets passed to this process, until each is taken by
/// the setting it is bound to. [`PassedSockets::finish`] refuses any left.
#[derive(Debug, Default)]
pub struct PassedSockets {
    left: Vec<Passed>,
}

impl PassedSockets {
    /// No passed sockets: every listener is bound by the daemon.
    pub fn none() -> PassedSockets {
        PassedSockets::default()
    }

    /// Checks each passed descriptor: a listening stream socket bound to a
    /// path or an IP address. Each is made close-on-exec and non-blocking.
    pub fn new(fds: Vec<(OwnedFd, String)>) -> Result<PassedSockets, ActivationError> {
        let mut left = Vec::new();
        for (fd, name) in fds {
            use std::os::fd::AsRawFd;
            let which = describe(fd.as_raw_fd(), &name);
            let unusable = |reason: String| ActivationError::Unusable {
                which: which.clone(),
                reason,
            };
            let socket = Socket::from(fd);
            socket
                .set_cloexec(true)
                .map_err(|e| unusable(format!("cannot set close-on-exec: {e}")))?;
            let ty = socket
                .r#type()
                .map_err(|e| unusable(format!("not a socket: {e}")))?;
            if ty != Type::STREAM {
                return Err(unusable(format!(
                    "a {ty:?} socket; the egress and admin listeners are stream sockets \
                     (ListenStream=, not ListenDatagram= or ListenSequentialPacket=)"
                )));
            }
            if !socket
                .is_listener()
                .map_err(|e| unusable(format!("cannot query it: {e}")))?
            {
                return Err(unusable("not listening (a connected socket?)".into()));
            }
            let addr = socket
                .local_addr()
                .map_err(|e| unusable(format!("no local address: {e}")))?;
            let bound = if let Some(p) = addr.as_pathname() {
                Bound::Unix(p.to_path_buf())
            } else if let Some(a) = addr.as_socket() {
                Bound::Tcp(a)
            } else {
                return Err(unusable(
                    "bound to no path or IP address (abstract and unnamed sockets are not supported)"
                        .into(),
                ));
            };
            socket
                .set_nonblocking(true)
                .map_err(|e| unusable(format!("cannot make it non-blocking: {e}")))?;
            left.push(Passed {
                which,
                name,
                bound,
                socket,
            });
        }
        Ok(PassedSockets { left })
    }

    /// How many passed sockets are not yet taken.
    pub fn len(&self) -> usize {
        self.left.len()
    }

    /// True when no passed socket is left.
    pub fn is_empty(&self) -> bool {
        self.left.is_empty()
    }

    /// The passed Unix socket bound to `path`, for `setting` (e.g.
    /// `proxy.listen[0]`) of `role`; `None` when none was passed for it.
    pub fn take_unix(
        &mut self,
        path: &Path,
        role: Role,
        setting: &str,
    ) -> Result<Option<std::os::unix::net::UnixListener>, ActivationError> {
        let Some(i) = self.left.iter().position(|p| match &p.bound {
            Bound::Unix(b) => same_file(b, path),
            Bound::Tcp(_) => false,
        }) else {
            return Ok(None);
        };
        let p = self.left.remove(i);
        check_role(&p, role, setting)?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.mode() & 0o002 != 0 {
                return Err(ActivationError::WorldAccessible {
                    which: p.which,
                    path: path.display().to_string(),
                    mode: meta.mode() & 0o7777,
                    setting: setting.to_string(),
                });
            }
        }
        Ok(Some(OwnedFd::from(p.socket).into()))
    }

    /// The passed TCP socket bound to `addr`, for `setting` of `role`.
    pub fn take_tcp(
        &mut self,
        addr: std::net::SocketAddr,
        role: Role,
        setting: &str,
    ) -> Result<Option<std::net::TcpListener>, ActivationError> {
        let Some(i) = self.left.iter().position(|p| p.bound == Bound::Tcp(addr)) else {
            return Ok(None);
        };
        let p = self.left.remove(i);
        check_role(&p, role, setting)?;
        Ok(Some(OwnedFd::from(p.socket).into()))
    }

    /// Refuses, before anything is bound, a passed socket bound to none of
    /// the configured addresses (`unix` paths, `tcp` addresses).
    pub fn check_known(
        &self,
        unix: &[&Path],
        tcp: &[std::net::SocketAddr],
    ) -> Result<(), ActivationError> {
        for p in &self.left {
            let known = match &p.bound {
                Bound::Unix(b) => unix.iter().any(|u| same_file(b, u)),
                Bound::Tcp(a) => tcp.contains(a),
            };
            if !known {
                return Err(ActivationError::Unmatched {
                    which: p.which.clone(),
                    addr: p.bound.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Refuses the first passed socket no setting took.
    pub fn finish(self) -> Result<(), ActivationError> {
        match self.left.into_iter().next() {
            None => Ok(()),
            Some(p) => Err(ActivationError::Unmatched {
                which: p.which,
                addr: p.bound.to_string(),
            }),
        }
    }
}

fn check_role(p: &Passed, role: Role, setting: &str) -> Result<(), ActivationError> {
    match Role::from_name(&p.name) {
        Some(named) if named != role => Err(ActivationError::WrongRole {
            which: p.which.clone(),
            name: p.name.clone(),
            addr: p.bound.to_string(),
            setting: setting.to_string(),
            role: role.name(),
        }),
        _ => Ok(()),
    }
}

/// The same path, or two paths to one file (a symbolic link on the way,
/// e.g. /var/run and /run).
fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_ours_only_for_our_pid() {
        let p = |pid, fds, names| parse_listen_env(42, pid, fds, names);
        assert!(p(None, Some("2"), None).unwrap().is_empty());
        assert!(p(Some("42"), None, None).unwrap().is_empty());
        // Another process's sockets: not ours, whatever else is set.
        assert!(p(Some("7"), Some("2"), Some("a")).unwrap().is_empty());
        assert_eq!(
            p(Some("42"), Some("2"), Some("egress:admin")).unwrap(),
            vec![(3, "egress".to_string()), (4, "admin".to_string())]
        );
        assert_eq!(
            p(Some("42"), Some("1"), None).unwrap(),
            vec![(3, "unknown".to_string())]
        );
        assert!(p(Some("42"), Some("0"), Some("")).unwrap().is_empty());
        assert!(matches!(
            p(Some("x"), Some("1"), None),
            Err(ActivationError::BadPid(_))
        ));
        assert!(matches!(
            p(Some("42"), Some("-1"), None),
            Err(ActivationError::BadCount(_))
        ));
        assert!(matches!(
            p(Some("42"), Some("65"), None),
            Err(ActivationError::BadCount(_))
        ));
        let err = p(Some("42"), Some("2"), Some("egress")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "socket activation: LISTEN_FDNAMES has 1 name(s) for LISTEN_FDS=2"
        );
    }

    fn unix_listener(dir: &Path, name: &str) -> (PathBuf, OwnedFd) {
        let path = dir.join(name);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        (path, OwnedFd::from(l))
    }

    #[test]
    fn sockets_match_their_setting_by_address_and_leftovers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (egress, e) = unix_listener(dir.path(), "egress.sock");
        let (admin, a) = unix_listener(dir.path(), "admin.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let mut passed = PassedSockets::new(vec![
            (e, "egress".into()),
            (a, "admin".into()),
            (OwnedFd::from(tcp), "tunneler.socket".into()),
        ])
        .unwrap();
        assert_eq!(passed.len(), 3);
        let other = dir.path().join("other.sock");
        assert!(passed
            .take_unix(&other, Role::Egress, "proxy.listen[1]")
            .unwrap()
            .is_none());
        let l = passed
            .take_unix(&egress, Role::Egress, "proxy.listen[0]")
            .unwrap()
            .expect("the egress socket");
        assert_eq!(
            l.local_addr().unwrap().as_pathname(),
            Some(egress.as_path())
        );
        // Through a symbolic link to the directory: the same file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(passed
            .take_unix(&link.join("admin.sock"), Role::Admin, "admin.socket")
            .unwrap()
            .is_some());
        assert!(admin.exists());
        assert!(passed
            .take_tcp(tcp_addr, Role::Metrics, "admin.metrics_listen")
            .unwrap()
            .is_some());
        assert!(passed.is_empty());
        passed.finish().unwrap();

        let (_, stray) = unix_listener(dir.path(), "stray.sock");
        let passed = PassedSockets::new(vec![(stray, "egress".into())]).unwrap();
        let err = passed
            .check_known(&[&egress, &admin], &[tcp_addr])
            .unwrap_err();
        assert!(matches!(err, ActivationError::Unmatched { .. }), "{err}");
        assert!(err.to_string().contains("stray.sock"), "{err}");
        let err = passed.finish().unwrap_err();
        assert!(matches!(err, ActivationError::Unmatched { .. }), "{err}");
    }

    #[test]
    fn a_name_of_another_role_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (admin, a) = unix_listener(dir.path(), "admin.sock");
        let mut passed = PassedSockets::new(vec![(a, "egress".into())]).unwrap();
        let err = passed
            .take_unix(&admin, Role::Admin, "admin.socket")
            .unwrap_err();
        assert!(matches!(err, ActivationError::WrongRole { .. }), "{err}");
        assert!(
            err.to_string().contains("named \"egress\"")
                && err.to_string().contains("admin.socket (admin)"),
            "{err}"
        );
    }

    #[test]
    fn sockets_that_cannot_listen_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Datagram: wrong type.
        let d = std::os::unix::net::UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
        let err = PassedSockets::new(vec![(OwnedFd::from(d), "egress".into())]).unwrap_err();
        assert!(err.to_string().contains("DGRAM"), "{err}");
        // A stream socket that is not listening.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = PassedSockets::new(vec![(OwnedFd::from(a), "x".into())]).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        // A regular file is no socket at all.
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let err = PassedSockets::new(vec![(OwnedFd::from(f), "x".into())]).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        // World-connectable: refused, and left as it was.
        let (path, fd) = unix_listener(dir.path(), "open.sock");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut passed = PassedSockets::new(vec![(fd, "egress".into())]).unwrap();
        let err = passed
            .take_unix(&path, Role::Egress, "proxy.listen[0]")
            .unwrap_err();
        assert!(
            matches!(err, ActivationError::WorldAccessible { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mode 666"), "{err}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
    }
}
