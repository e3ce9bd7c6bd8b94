//! The client identity, loaded and checked the way OpenSSH's `ssh` does.
//!
//! - A private key file (and a passphrase file) readable or writable by
//!   group or others, or owned by another user, is refused with OpenSSH's
//!   own words: "UNPROTECTED PRIVATE KEY FILE! ... are too open". The check
//!   is made on the opened file descriptor, so the file read is the file
//!   checked.
//! - Encrypted OpenSSH keys are decrypted with `[ssh] passphrase_file`.
//! - With `[ssh] identity_agent` the private key stays in ssh-agent: the
//!   `identity_file` then names the public key (a `.pub` file, or a private
//!   key with a `.pub` beside it) and the agent is asked to sign at each
//!   connect.
//! - With `[ssh] certificate_file` we authenticate with that OpenSSH user
//!   certificate, which must certify our key.
//!
//! Key material never reaches a log, a `Debug` string or an error message:
//! [`Identity`]'s `Debug` shows the public fingerprint only, and the file
//! contents and the passphrase are held in `Zeroizing` buffers that are
//! wiped when dropped. (The decrypted key itself is an `ssh_key` type that
//! zeroizes its secret on drop.)

use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client::{self, AuthResult, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use zeroize::Zeroizing;

use crate::config::SshConfig;
use crate::error::TunnelError;

/// Why the identity could not be loaded. Messages name files, never their
/// contents.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Group or others may read or write the file.
    #[error("UNPROTECTED PRIVATE KEY FILE! Permissions {mode:04o} for '{path}' are too open. It is required that your private key files are NOT accessible by others (chmod 600).")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another user owns the file.
    #[error("bad ownership for '{path}': owned by uid {owner}, but tunneler runs as uid {euid}; a private key must belong to the user that uses it")]
    BadOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        euid: u32,
    },
    /// The file could not be read.
    #[error("cannot read '{path}': {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (an I/O error).
        reason: String,
    },
    /// The key is encrypted and no passphrase was configured.
    #[error("'{0}' is encrypted: set ssh.passphrase_file (or use ssh.identity_agent)")]
    Encrypted(PathBuf),
    /// The key could not be parsed or decrypted.
    #[error("cannot load the private key '{path}': {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The public key (agent mode) could not be loaded.
    #[error("cannot load the public key '{path}' for the agent identity: {reason}")]
    PublicKey {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The certificate could not be used.
    #[error("certificate '{path}': {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where the private half lives.
enum Signer {
    /// Loaded (and decrypted) from `identity_file`.
    Key(Arc<PrivateKey>),
    /// Held by ssh-agent behind this socket.
    Agent(PathBuf),
}

/// The loaded client identity.
pub struct Identity {
    signer: Signer,
    public: PublicKey,
    certificate: Option<Certificate>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Identity");
        match &self.signer {
            Signer::Key(_) => d.field("source", &"file"),
            Signer::Agent(p) => d.field("agent", p),
        };
        d.field(
            "fingerprint",
            &self.public.fingerprint(HashAlg::Sha256).to_string(),
        )
        .field(
            "certificate",
            &self.certificate.as_ref().map(|c| c.key_id()),
        )
        .finish()
    }
}

/// Our effective uid: the owner an identity file must have.
fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Opens `path` and checks, on the open descriptor, that it is a private
/// file of ours, as OpenSSH's `sshkey_perm_ok` does (plus the owner check).
/// Returns the contents in a buffer that is wiped on drop.
pub fn read_private_file(path: &Path) -> Result<Zeroizing<String>, IdentityError> {
    let read_err = |e: std::io::Error| IdentityError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let me = euid();
    if meta.uid() != me {
        return Err(IdentityError::BadOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid: me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(read_err)?;
    Ok(text)
}

/// Reads the passphrase: the file's first line, without its line ending.
fn read_passphrase(path: &Path) -> Result<Zeroizing<String>, IdentityError> {
    let text = read_private_file(path)?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(IdentityError::Read {
            path: path.to_path_buf(),
            reason: "the passphrase file is empty".into(),
        });
    }
    Ok(Zeroizing::new(line.to_string()))
}

fn sibling_pub(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "pub") {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl Identity {
    /// Loads the identity `ssh` describes. Called at start and on reload;
    /// an error stops the start (or rejects the reload).
    pub fn load(ssh: &SshConfig) -> Result<Identity, IdentityError> {
        let (signer, public) = match &ssh.identity_agent {
            Some(agent) => {
                let path = sibling_pub(&ssh.identity_file);
                let public =
                    russh::keys::load_public_key(&path).map_err(|e| IdentityError::PublicKey {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                (Signer::Agent(agent.clone()), public)
            }
            None => {
                let path = &ssh.identity_file;
                let text = read_private_file(path)?;
                let passphrase = ssh
                    .passphrase_file
                    .as_deref()
                    .map(read_passphrase)
                    .transpose()?;
                let key = russh::keys::decode_secret_key(
                    &text,
                    passphrase.as_ref().map(|p| p.as_str()),
                )
                .map_err(|e| match (e, &passphrase) {
                    (russh::keys::Error::KeyIsEncrypted, None) => {
                        IdentityError::Encrypted(path.clone())
                    }
                    (_, Some(_)) => IdentityError::Key {
                        path: path.clone(),
                        reason: "it cannot be decrypted with the passphrase from ssh.passphrase_file (wrong passphrase?)".into(),
                    },
                    // russh's parse errors describe the format, not the bytes.
                    (e, None) => IdentityError::Key {
                        path: path.clone(),
                        reason: e.to_string(),
                    },
                })?;
                let public = key.public_key().clone();
                (Signer::Key(Arc::new(key)), public)
            }
        };
        let certificate = match &ssh.certificate_file {
            None => None,
            Some(path) => {
                let cert_err = |reason: String| IdentityError::Certificate {
                    path: path.clone(),
                    reason,
                };
                let cert = russh::keys::load_openssh_certificate(path)
                    .map_err(|e| cert_err(e.to_string()))?;
                if cert.public_key() != public.key_data() {
                    return Err(cert_err(format!(
                        "it certifies {}, not the identity's key {}",
                        cert.public_key().fingerprint(HashAlg::Sha256),
                        public.fingerprint(HashAlg::Sha256)
                    )));
                }
                if !cert.cert_type().is_user() {
                    return Err(cert_err(
                        "it is a host certificate, not a user certificate".into(),
                    ));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                if now >= cert.valid_before() || now < cert.valid_after() {
                    tracing::warn!(path = %path.display(), key_id = cert.key_id(), "the user certificate is outside its validity window; nodes will refuse it");
                }
                Some(cert)
            }
        };
        Ok(Identity {
            signer,
            public,
            certificate,
        })
    }

    /// Authenticates `user` on `handle` with this identity.
    pub async fn authenticate<H: client::Handler>(
        &self,
        handle: &mut Handle<H>,
        user: &str,
    ) -> Result<AuthResult, TunnelError> {
        let failed = |e: String| TunnelError::Session(format!("authentication failed: {e}"));
        let hash = if self.public.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| failed(e.to_string()))?
                .flatten()
        } else {
            None
        };
        match (&self.signer, &self.certificate) {
            (Signer::Key(key), None) => handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await
                .map_err(|e| failed(e.to_string())),
            (Signer::Key(key), Some(cert)) => handle
                .authenticate_openssh_cert(user, key.clone(), cert.clone())
                .await
                .map_err(|e| failed(e.to_string())),
            (Signer::Agent(socket), cert) => {
                let mut agent = AgentClient::connect_uds(socket).await.map_err(|e| {
                    TunnelError::Identity(format!(
                        "cannot reach ssh-agent at {}: {e}",
                        socket.display()
                    ))
                })?;
                let held = agent.request_identities().await.map_err(|e| {
                    TunnelError::Identity(format!("ssh-agent at {}: {e}", socket.display()))
                })?;
                let has_key = held.iter().any(|i| match i {
                    AgentIdentity::PublicKey { key, .. } => {
                        key.key_data() == self.public.key_data()
                    }
                    AgentIdentity::Certificate { certificate, .. } => {
                        certificate.public_key() == self.public.key_data()
                    }
                });
                if !has_key {
                    return Err(TunnelError::Identity(format!(
                        "ssh-agent at {} does not hold the key {}",
                        socket.display(),
                        self.public.fingerprint(HashAlg::Sha256)
                    )));
                }
                let mut signer = PlainKeySigner {
                    agent,
                    key: self.public.clone(),
                };
                let r = match cert {
                    None => {
                        handle
                            .authenticate_publickey_with(
                                user,
                                self.public.clone(),
                                hash,
                                &mut signer,
                            )
                            .await
                    }
                    Some(cert) => {
                        handle
                            .authenticate_certificate_with(user, cert.clone(), hash, &mut signer)
                            .await
                    }
                };
                r.map_err(|e| failed(e.to_string()))
            }
        }
    }
}

/// Asks the agent to sign with the plain key, also for certificate
/// authentication: the signature is the key's either way, and the agent
/// then needs only the key, not the certificate too.
struct PlainKeySigner {
    agent: AgentClient<tokio::net::UnixStream>,
    key: PublicKey,
}

impl russh::Signer for PlainKeySigner {
    type Error = russh::AgentAuthError;

    async fn auth_sign(
        &mut self,
        _key: &AgentIdentity,
        hash_alg: Option<HashAlg>,
        to_sign: Vec<u8>,
    ) -> Result<Vec<u8>, Self::Error> {
        let id = AgentIdentity::from(self.key.clone());
        self.agent
            .sign_request(&id, hash_alg, to_sign)
            .await
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ssh_config(dir: &Path) -> SshConfig {
        SshConfig {
            user: "u".into(),
            identity_file: dir.join("id"),
            known_hosts_file: dir.join("known_hosts"),
            port: 22,
            connect_timeout: std::time::Duration::from_secs(1),
            keepalive_interval: std::time::Duration::from_secs(1),
            keepalive_max: 3,
            maximum_packet_size: crate::config::DEFAULT_MAXIMUM_PACKET_SIZE,
            window: crate::config::WindowBounds::default(),
            connections_per_node: 1,
            max_connections_per_node: 8,
            extra_session_idle: std::time::Duration::from_secs(60),
            max_concurrent_handshakes: 64,
            host_key_policy: Default::default(),
            passphrase_file: None,
            identity_agent: None,
            certificate_file: None,
        }
    }

    fn keygen(path: &Path, passphrase: &str) {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", passphrase, "-C", "t", "-f"])
            .arg(path)
            .output()
            .expect("ssh-keygen");
        assert!(out.status.success(), "{out:?}");
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The skip gate of these unit tests (they cannot use tests/common):
    /// true when `need` holds; otherwise prints `SKIP <test>: <why>`, or
    /// panics when `TUNNELER_REQUIRE_NETNS` is set, as CI does, so that a
    /// skipped test can never pass there.
    fn gate(test: &str, need: bool, why: &str) -> bool {
        if need {
            return true;
        }
        if std::env::var_os("TUNNELER_REQUIRE_NETNS").is_some() {
            panic!("{test}: TUNNELER_REQUIRE_NETNS is set, but this would skip: {why}");
        }
        use std::io::Write;
        // Straight to fd 2: libtest captures the output of passing tests.
        let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
        false
    }

    fn have_ssh_keygen(test: &str) -> bool {
        gate(
            test,
            Path::new("/usr/bin/ssh-keygen").exists(),
            "no /usr/bin/ssh-keygen",
        )
    }

    #[test]
    fn too_open_files_are_refused() {
        if !have_ssh_keygen("too_open_files_are_refused") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = ssh_config(dir.path());
        keygen(&cfg.identity_file, "");
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            chmod(&cfg.identity_file, mode);
            let e = Identity::load(&cfg).unwrap_err().to_string();
            assert!(e.contains("UNPROTECTED PRIVATE KEY FILE"), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
            assert!(e.contains("too open"), "{e}");
        }
        chmod(&cfg.identity_file, 0o600);
        assert!(Identity::load(&cfg).is_ok());
        chmod(&cfg.identity_file, 0o400);
        let id = Identity::load(&cfg).unwrap();
        // Debug shows the fingerprint, never key material.
        let dbg = format!("{id:?}");
        assert!(dbg.contains("SHA256:"), "{dbg}");
        let text = std::fs::read_to_string(&cfg.identity_file).unwrap();
        for line in text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!dbg.contains(line), "{dbg}");
        }
    }

    #[test]
    fn owner_must_be_us() {
        if !have_ssh_keygen("owner_must_be_us")
            || !gate(
                "owner_must_be_us",
                euid() == 0,
                "needs root to chown the key to another user",
            )
        {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = ssh_config(dir.path());
        keygen(&cfg.identity_file, "");
        std::os::unix::fs::chown(&cfg.identity_file, Some(65534), None).unwrap();
        let e = Identity::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("bad ownership"), "{e}");
    }

    #[test]
    fn encrypted_keys_need_the_right_passphrase() {
        if !have_ssh_keygen("encrypted_keys_need_the_right_passphrase") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ssh_config(dir.path());
        keygen(&cfg.identity_file, "correct horse");
        let e = Identity::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("encrypted"), "{e}");

        let pass = dir.path().join("pass");
        std::fs::write(&pass, "wrong\n").unwrap();
        chmod(&pass, 0o600);
        cfg.passphrase_file = Some(pass.clone());
        let e = Identity::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("wrong passphrase"), "{e}");
        assert!(!e.contains("wrong\n"), "{e}");

        std::fs::write(&pass, "correct horse\n").unwrap();
        assert!(Identity::load(&cfg).is_ok());
        chmod(&pass, 0o644);
        let e = Identity::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("too open"), "{e}");
    }

    #[test]
    fn certificate_must_certify_our_key() {
        if !have_ssh_keygen("certificate_must_certify_our_key") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ssh_config(dir.path());
        keygen(&cfg.identity_file, "");
        let ca = dir.path().join("ca");
        keygen(&ca, "");
        let other = dir.path().join("other");
        keygen(&other, "");
        // Two user certificates from the same CA: one for our key, one for
        // another key.
        for key in [&cfg.identity_file, &other] {
            let mut args = vec!["-q", "-s", ca.to_str().unwrap(), "-I", "t", "-n", "root"];
            let pubf = sibling_pub(key);
            args.push(pubf.to_str().unwrap());
            let out = std::process::Command::new("ssh-keygen")
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        cfg.certificate_file = Some(dir.path().join("other-cert.pub"));
        let e = Identity::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("not the identity's key"), "{e}");
        cfg.certificate_file = Some(dir.path().join("id-cert.pub"));
        let id = Identity::load(&cfg).unwrap();
        assert!(format!("{id:?}").contains("certificate: Some(\"t\")"));
    }

    #[test]
    fn agent_mode_reads_the_public_key() {
        if !have_ssh_keygen("agent_mode_reads_the_public_key") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ssh_config(dir.path());
        keygen(&cfg.identity_file, "secret");
        // A too-open private key does not matter: it is never read.
        chmod(&cfg.identity_file, 0o644);
        cfg.identity_agent = Some(dir.path().join("agent.sock"));
        let id = Identity::load(&cfg).unwrap();
        assert!(format!("{id:?}").contains("agent"));
        cfg.identity_file = dir.path().join("missing");
        let e = Identity::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("missing.pub"), "{e}");
    }
}
