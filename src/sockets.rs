//! Binding local sockets safely.
//!
//! A stale socket file from a crashed run is replaced, but only if it really
//! is a socket and nothing answers on it: we never delete a regular file an
//! operator mistyped as a socket path, and never steal a live daemon's socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

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
    /// Another process is serving on the socket.
    #[error("{path}: another process is already listening on this socket")]
    InUse {
        /// The path.
        path: String,
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
    let Some(group) = group else {
        return bind_unix(path, 0o600);
    };
    let p = path.display().to_string();
    let gid = match nix::unistd::Group::from_name(group) {
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
    };
    let listener = bind_unix(path, 0o600)?;
    nix::unistd::chown(path, None, Some(gid)).map_err(|e| BindError::Group {
        path: p.clone(),
        group: group.to_string(),
        reason: e.to_string(),
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|source| BindError::Io { path: p, source })?;
    Ok(listener)
}

/// Binds a Unix socket at `path` with mode `mode` (0600 for our sockets).
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let p = path.display().to_string();
    let io = |source| BindError::Io {
        path: p.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse { path: p });
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(BindError::NotASocket { path: p }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
