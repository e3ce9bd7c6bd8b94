//! Binding local sockets safely.
//!
//! A stale socket file from a crashed run is replaced, but only if it really
//! is a socket and a connect to it is refused (ECONNREFUSED: no listener):
//! we never delete a regular file an operator mistyped as a socket path,
//! never follow a symbolic link placed at the socket path, and never steal
//! a live daemon's socket. Any other connect error (a full backlog, no
//! permission) says nothing about whether a daemon listens there, so it
//! refuses the start, naming the path. The probe connect is non-blocking:
//! a blocking one would wait for a full backlog to drain.
//!
//! A socket is never reachable with a looser mode than its final one. Binding
//! creates the socket file with the process umask's mode, and a chmod after
//! it leaves a window in which anyone may connect (and keep the connection).
//! So the socket is bound inside a fresh private directory (mode 0700, ours)
//! beside the final path, given its final mode and group there, and only then
//! renamed into place: `rename` is atomic, so the path shows either nothing,
//! the old stale socket, or the finished socket. The process-wide umask is
//! not touched (other threads may be creating files).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why a Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The path exists and is not a socket.
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: String,
    },
    /// The path is a symbolic link.
    #[error("{path}: is a symbolic link; refusing to follow or replace it (remove it, or point the setting at the real path)")]
    Symlink {
        /// The path.
        path: String,
    },
    /// Another process is serving on the socket.
    #[error("{path}: another process is already listening on this socket")]
    InUse {
        /// The path.
        path: String,
    },
    /// A connect to the existing socket failed for another reason than
    /// "refused", so it may be a live daemon's.
    #[error("{path}: cannot tell whether a process listens on this socket (connect: {source}); refusing to replace it (stop whatever holds it, or remove it if it is stale)")]
    Unverifiable {
        /// The path.
        path: String,
        /// The connect error.
        source: std::io::Error,
    },
    /// The socket group could not be applied.
    #[error("{path}: socket_group {group:?}: {reason}")]
    Group {
        /// The path.
        path: String,
        /// The group.
        group: String,
        /// Why.
        reason: String,
    },
    /// The private directory the socket is bound in is not private.
    #[error("{path}: the private directory {dir} came out with mode {mode:o} or another owner; refusing to bind there")]
    NotPrivate {
        /// The path.
        path: String,
        /// The directory.
        dir: String,
        /// Its mode.
        mode: u32,
    },
    /// Any I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Binds a Unix socket at `path`: mode 0600, or 0660 and owned by `group`
/// when one is given (so e.g. kube-apiserver's group may connect).
pub fn bind_unix_for(path: &Path, group: Option<&str>) -> Result<UnixListener, BindError> {
    match group {
        None => bind_unix(path, 0o600),
        Some(g) => stage(path, 0o660, Some(g))?.publish(),
    }
}

/// Binds a Unix socket at `path` with mode `mode` (0600 for our sockets).
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    stage(path, mode, None)?.publish()
}

/// A socket bound in its private directory with its final mode and group,
/// not yet at its final path. [`StagedSocket::publish`] moves it there;
/// dropping it removes the directory and the socket.
#[derive(Debug)]
pub struct StagedSocket {
    listener: UnixListener,
    dir: tempfile::TempDir,
    staged: PathBuf,
    path: PathBuf,
}

impl StagedSocket {
    /// Where the socket is now (inside the private directory).
    pub fn staged_path(&self) -> &Path {
        &self.staged
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Renames the finished socket to its final path (atomically replacing
    /// a stale socket there) and removes the private directory.
    pub fn publish(self) -> Result<UnixListener, BindError> {
        let p = self.path.display().to_string();
        // Checked again right before the rename: a link placed since the
        // first check is refused too (rename would replace the link itself,
        // never its target, but the operator should hear about it).
        check_existing(&self.path)?;
        std::fs::rename(&self.staged, &self.path)
            .map_err(|source| BindError::Io { path: p, source })?;
        drop(self.dir);
        Ok(self.listener)
    }
}

/// The first half of [`bind_unix_for`]: checks `path`, then binds a socket
/// with `mode` (and `group`) in a new private directory beside it.
pub fn stage(path: &Path, mode: u32, group: Option<&str>) -> Result<StagedSocket, BindError> {
    let p = path.display().to_string();
    let io = |source| BindError::Io {
        path: p.clone(),
        source,
    };
    let gid = match group {
        None => None,
        Some(group) => Some(match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => g.gid,
            Ok(None) => {
                return Err(BindError::Group {
                    path: p,
                    group: group.to_string(),
                    reason: "no such group".into(),
                })
            }
            Err(e) => {
                return Err(BindError::Group {
                    path: p,
                    group: group.to_string(),
                    reason: e.to_string(),
                })
            }
        }),
    };
    check_existing(path)?;
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        std::fs::create_dir_all(&parent).map_err(io)?;
    }
    let dir = tempfile::Builder::new()
        .prefix(".tnl")
        .rand_bytes(6)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&parent)
        .map_err(io)?;
    let meta = std::fs::symlink_metadata(dir.path()).map_err(io)?;
    if !meta.is_dir() || meta.mode() & 0o077 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(BindError::NotPrivate {
            path: p,
            dir: dir.path().display().to_string(),
            mode: meta.mode() & 0o7777,
        });
    }
    let staged = dir.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(io)?;
    if let (Some(gid), Some(group)) = (gid, group) {
        nix::unistd::chown(&staged, None, Some(gid)).map_err(|e| BindError::Group {
            path: p.clone(),
            group: group.to_string(),
            reason: e.to_string(),
        })?;
    }
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(StagedSocket {
        listener,
        dir,
        staged,
        path: path.to_path_buf(),
    })
}

/// Refuses a symbolic link, a non-socket or a live socket at `path`; a
/// stale socket (a connect is refused) or nothing at all is fine.
fn check_existing(path: &Path) -> Result<(), BindError> {
    let p = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(BindError::Symlink { path: p }),
        Ok(meta) if meta.file_type().is_socket() => match probe_connect(path) {
            Ok(()) => Err(BindError::InUse { path: p }),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(source) => Err(BindError::Unverifiable { path: p, source }),
        },
        Ok(_) => Err(BindError::NotASocket { path: p }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BindError::Io { path: p, source }),
    }
}

/// One non-blocking connect to the Unix socket at `path`.
fn probe_connect(path: &Path) -> std::io::Result<()> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
    s.connect(&SockAddr::unix(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket whose backlog is full answers a connect with EAGAIN, not
    /// "refused": its daemon is alive, only busy. It is not replaced.
    #[tokio::test]
    async fn a_socket_with_a_full_backlog_is_not_taken_for_stale() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let l = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        l.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        l.listen(0).unwrap();
        let mut held = Vec::new();
        let full = (0..64).any(|_| match probe_connect_held(&path) {
            Ok(s) => {
                held.push(s);
                false
            }
            Err(_) => true,
        });
        assert!(full, "the backlog never filled");
        let err = bind_unix(&path, 0o600).unwrap_err();
        assert!(matches!(err, BindError::Unverifiable { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("refusing to replace it"), "{text}");
        drop(held);
        drop(l);
    }

    fn probe_connect_held(path: &Path) -> std::io::Result<socket2::Socket> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
        s.connect(&SockAddr::unix(path)?)?;
        Ok(s)
    }

    #[tokio::test]
    async fn replaces_stale_refuses_files_and_live_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = bind_unix(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // live: refused
        assert!(matches!(
            bind_unix(&path, 0o600),
            Err(BindError::InUse { .. })
        ));
        drop(l);
        // stale: replaced
        let _l2 = bind_unix(&path, 0o600).unwrap();
        // regular file: refused and untouched
        let f = dir.path().join("file");
        std::fs::write(&f, b"keep me").unwrap();
        assert!(matches!(
            bind_unix(&f, 0o600),
            Err(BindError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn socket_group_gives_0660_and_the_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        // Our own primary group always exists and we may chown to it.
        let gid = nix::unistd::getegid();
        let Ok(Some(group)) = nix::unistd::Group::from_gid(gid) else {
            eprintln!("SKIP socket_group test: our gid {gid} has no name");
            return;
        };
        let _l = bind_unix_for(&path, Some(&group.name)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid.as_raw());
        let missing = dir.path().join("m.sock");
        assert!(matches!(
            bind_unix_for(&missing, Some("no-such-group-tunneler")),
            Err(BindError::Group { .. })
        ));
        assert!(
            !missing.exists(),
            "nothing is bound when the group is wrong"
        );
    }

    #[tokio::test]
    async fn a_symlink_at_the_path_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("s.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = bind_unix(&link, 0o600).unwrap_err();
        assert!(matches!(err, BindError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_link(&link).unwrap(), target);
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        // A dangling link too: nothing is created at its target.
        let gone = dir.path().join("gone");
        let dangling = dir.path().join("d.sock");
        std::os::unix::fs::symlink(&gone, &dangling).unwrap();
        assert!(matches!(
            bind_unix(&dangling, 0o600),
            Err(BindError::Symlink { .. })
        ));
        assert!(!gone.exists());
        // No private directory is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");
    }

    #[tokio::test]
    async fn the_staged_socket_is_final_before_it_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let staged = stage(&path, 0o600, None).unwrap();
        assert!(!path.exists(), "nothing at the final path before publish");
        let dmode = std::fs::metadata(staged.dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let smode = std::fs::metadata(staged.staged_path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(smode, 0o600, "final mode already while private");
        let private = staged.dir().to_path_buf();
        let _l = staged.publish().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!private.exists(), "the private directory is removed");
    }
}
