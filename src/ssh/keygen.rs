//! `tunneler keygen`: a fresh ed25519 identity for the tunnel account.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::{LineEnding, PrivateKey};

/// The authorized_keys options for a port-forward-only account: `restrict`
/// turns off everything (pty, agent and X11 forwarding, user rc), then only
/// port forwarding is allowed back, and the command does nothing.
pub const AUTHORIZED_KEYS_OPTIONS: &str = "restrict,port-forwarding,command=\"/bin/false\"";

/// What keygen wrote.
#[derive(Debug)]
pub struct Generated {
    /// The private key path.
    pub private: PathBuf,
    /// The public key path.
    pub public: PathBuf,
    /// The line to put in the nodes' authorized_keys.
    pub authorized_keys_line: String,
}

/// Why keygen failed.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// Refusing to overwrite an existing key.
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    /// I/O error writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Key encoding failed.
    #[error("encoding the key failed: {0}")]
    Encode(String),
}

/// Writes `out` (mode 0600) and `out.pub` (written last, so a `.pub` file's
/// presence means the pair is complete).
pub fn generate(out: &Path, comment: &str) -> Result<Generated, KeygenError> {
    let public_path = PathBuf::from(format!("{}.pub", out.display()));
    for p in [out, public_path.as_path()] {
        if p.exists() {
            return Err(KeygenError::Exists(p.to_path_buf()));
        }
    }
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(seed.as_mut());
    let pair = Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::new(KeypairData::Ed25519(pair), comment)
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let private_text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let public_text = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeygenError::Encode(e.to_string()))?;

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeygenError::Io { path, source }
    };
    if let Some(dir) = out.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io(out))?;
    f.write_all(private_text.as_bytes()).map_err(io(out))?;
    f.sync_all().map_err(io(out))?;
    drop(f);
    let mut p = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&public_path)
        .map_err(io(&public_path))?;
    p.write_all(format!("{public_text}\n").as_bytes())
        .map_err(io(&public_path))?;
    p.sync_all().map_err(io(&public_path))?;
    Ok(Generated {
        private: out.to_path_buf(),
        public: public_path,
        authorized_keys_line: format!("{AUTHORIZED_KEYS_OPTIONS} {public_text}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_loadable_pair() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("id_ed25519");
        let g = generate(&out, "tunneler@test").unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(g
            .authorized_keys_line
            .starts_with("restrict,port-forwarding,command="));
        let loaded = russh::keys::load_secret_key(&out, None).unwrap();
        let pubtext = std::fs::read_to_string(&g.public).unwrap();
        assert_eq!(
            loaded.public_key().to_openssh().unwrap(),
            pubtext
                .trim_end()
                .trim_end_matches(" tunneler@test")
                .to_string()
                + " tunneler@test"
        );
        assert!(matches!(generate(&out, "x"), Err(KeygenError::Exists(_))));
    }
}
