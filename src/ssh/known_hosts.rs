//! Host key verification against an OpenSSH known_hosts file, as OpenSSH's
//! `ssh` does it.
//!
//! russh's own `check_known_hosts_path` re-reads the file on every call and
//! knows neither wildcards, `@cert-authority` nor `@revoked`. With a thousand
//! nodes reconnecting that is a thousand reads, so [`KnownHostsStore`] parses
//! the file once and re-parses only when its modification time or size
//! changes.
//!
//! Supported, with OpenSSH's semantics:
//! - plain and hashed (`|1|salt|hash`) host names, `[host]:port` for ports
//!   other than 22, comma-separated patterns with `*`, `?` and `!` negation
//!   (a negated match wins over any positive one);
//! - `@revoked` lines: a revoked key is refused whatever else the file says,
//!   also when it is the key inside a certificate or the CA that signed it;
//! - `@cert-authority` lines: a host certificate is trusted when a CA line
//!   for the host names the key that signed it, it is a *host* certificate,
//!   one of its principals is the node's address or name, the current time
//!   lies inside its validity window, it carries no critical option, and its
//!   signature verifies. A certificate that fails any of this is treated like
//!   OpenSSH does: the plain key inside it is looked up as an ordinary host
//!   key ("No matching CA found. Retry with plain key"), so it can still be
//!   trusted by a plain line, but never by the certificate itself.
//!
//! [`KnownHostsStore::learn`] implements `host_key_policy = "accept-new"`:
//! it appends an unknown host's key under an exclusive lock, re-checking the
//! file under that lock, and replaces the file atomically (write a temporary
//! file, fsync, rename), so a reader never sees half a line and a changed
//! key is never accepted.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hmac::{KeyInit, Mac};
use russh::keys::ssh_key::known_hosts::{HostPatterns, KnownHosts, Marker};
use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};

/// One parsed line.
#[derive(Debug, Clone)]
struct Line {
    marker: Option<Marker>,
    patterns: HostPatterns,
    key: PublicKey,
}

/// A parsed known_hosts file.
#[derive(Debug, Clone, Default)]
pub struct KnownHostsFile {
    lines: Vec<Line>,
    /// Lines that could not be parsed (skipped, as OpenSSH does).
    pub skipped: usize,
}

/// The verdict for a presented host key or certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host lists this key, or a trusted CA signed a valid
    /// host certificate for it.
    Trusted,
    /// Lines exist for this host, but none with this key. Carries the
    /// fingerprints we expected, for the log.
    Mismatch {
        /// SHA256 fingerprints of the keys on record for this host.
        expected: Vec<String>,
    },
    /// No line names this host at all.
    Unknown,
    /// The key (or the CA that signed its certificate) is marked `@revoked`.
    Revoked,
    /// A CA line for this host exists, and the host presented a plain key
    /// that no plain line lists. A host a CA vouches for must present a
    /// certificate from it; a plain key there is what a man in the middle
    /// would offer, so it is never learned, under any policy.
    CertificateRequired,
    /// A CA line for this host exists, the host presented a certificate that
    /// does not satisfy it, and no plain line trusts the key inside it.
    CertificateRejected {
        /// Why the certificate was not accepted.
        reason: String,
    },
}

impl KnownHostsFile {
    /// Parses known_hosts text. Bad lines are counted and skipped.
    pub fn parse(text: &str) -> KnownHostsFile {
        let mut out = KnownHostsFile::default();
        for raw in text.lines() {
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            match KnownHosts::new(l).next() {
                Some(Ok(entry)) => out.lines.push(Line {
                    marker: entry.marker().cloned(),
                    patterns: entry.host_patterns().clone(),
                    key: entry.public_key().clone(),
                }),
                _ => out.skipped += 1,
            }
        }
        out
    }

    /// Number of usable lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// True when no usable line exists.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    fn is_revoked(&self, key: &russh::keys::ssh_key::public::KeyData) -> bool {
        self.lines
            .iter()
            .any(|l| matches!(l.marker, Some(Marker::Revoked)) && l.key.key_data() == key)
    }

    /// True when an `@cert-authority` line applies to one of `hosts` on
    /// `port`. The client advertises certificate host key algorithms only
    /// then, as OpenSSH orders its algorithms by what known_hosts holds.
    pub fn has_cert_authority_for(&self, hosts: &[&str], port: u16) -> bool {
        let candidates: Vec<String> = hosts.iter().map(|h| host_port_form(h, port)).collect();
        self.lines.iter().any(|l| {
            matches!(l.marker, Some(Marker::CertAuthority))
                && candidates.iter().any(|c| patterns_match(&l.patterns, c))
        })
    }

    /// Checks `key` for `host` (an IP or name) on `port`. Every name in
    /// `hosts` is tried, e.g. the node's address and its node name, as
    /// OpenSSH does with `HostKeyAlias`/`CheckHostIP`. A plain key that no
    /// plain line knows is [`Verdict::CertificateRequired`], not `Unknown`,
    /// where an `@cert-authority` line covers the host (OpenSSH would call
    /// it unknown, and `accept-new` would learn it).
    pub fn check(&self, hosts: &[&str], port: u16, key: &PublicKey) -> Verdict {
        match self.check_plain(hosts, port, key) {
            Verdict::Unknown if self.has_cert_authority_for(hosts, port) => {
                Verdict::CertificateRequired
            }
            v => v,
        }
    }

    /// [`KnownHostsFile::check`] against the plain (and `@revoked`) lines
    /// only.
    fn check_plain(&self, hosts: &[&str], port: u16, key: &PublicKey) -> Verdict {
        let candidates: Vec<String> = hosts.iter().map(|h| host_port_form(h, port)).collect();
        let matches_host = |p: &HostPatterns| candidates.iter().any(|c| patterns_match(p, c));

        let key_data = key.key_data();
        if self.is_revoked(key_data) {
            return Verdict::Revoked;
        }
        let mut expected = Vec::new();
        for l in &self.lines {
            if l.marker.is_some() || !matches_host(&l.patterns) {
                continue;
            }
            if l.key.key_data() == key_data {
                return Verdict::Trusted;
            }
            expected.push(l.key.fingerprint(HashAlg::Sha256).to_string());
        }
        if expected.is_empty() {
            Verdict::Unknown
        } else {
            Verdict::Mismatch { expected }
        }
    }

    /// Checks a host certificate for `hosts` on `port` at `now` (seconds
    /// since the epoch). See the module docs for the rules; a certificate
    /// that no CA line vouches for falls back to [`KnownHostsFile::check`]
    /// on the key inside it.
    pub fn check_certificate(
        &self,
        hosts: &[&str],
        port: u16,
        cert: &Certificate,
        now: u64,
    ) -> Verdict {
        if self.is_revoked(cert.public_key()) || self.is_revoked(cert.signature_key()) {
            return Verdict::Revoked;
        }
        let candidates: Vec<String> = hosts.iter().map(|h| host_port_form(h, port)).collect();
        let cas: Vec<&Line> = self
            .lines
            .iter()
            .filter(|l| {
                matches!(l.marker, Some(Marker::CertAuthority))
                    && candidates.iter().any(|c| patterns_match(&l.patterns, c))
            })
            .collect();
        let failure = if cas.is_empty() {
            None
        } else if !cas.iter().any(|l| l.key.key_data() == cert.signature_key()) {
            Some(format!(
                "certificate signed by {}, which is not a trusted CA for this host",
                cert.signature_key().fingerprint(HashAlg::Sha256)
            ))
        } else {
            match certificate_problem(cert, hosts, now) {
                None => return Verdict::Trusted,
                Some(p) => Some(p),
            }
        };
        let plain = PublicKey::new(cert.public_key().clone(), "");
        match (self.check_plain(hosts, port, &plain), failure) {
            (Verdict::Unknown, Some(reason)) => Verdict::CertificateRejected { reason },
            (v, _) => v,
        }
    }
}

/// Why a certificate signed by a trusted CA is still not acceptable for any
/// of `hosts` at `now`, or `None` when it is.
fn certificate_problem(cert: &Certificate, hosts: &[&str], now: u64) -> Option<String> {
    if !cert.cert_type().is_host() {
        return Some("not a host certificate".into());
    }
    if cert.verify_signature().is_err() {
        return Some("the CA signature does not verify".into());
    }
    if now < cert.valid_after() {
        return Some(format!(
            "not yet valid (valid after {})",
            cert.valid_after()
        ));
    }
    if now >= cert.valid_before() {
        return Some(format!("expired (valid before {})", cert.valid_before()));
    }
    // OpenSSH requires a principal for host certificates.
    let principals = cert.valid_principals();
    if !principals
        .iter()
        .any(|p| hosts.iter().any(|h| p.eq_ignore_ascii_case(h)))
    {
        return Some(format!(
            "no principal matches {} (certificate names {:?})",
            hosts.join(" or "),
            principals
        ));
    }
    // No critical option is defined for host certificates; OpenSSH refuses
    // certificates with options it does not know.
    if let Some((name, _)) = cert.critical_options().iter().next() {
        return Some(format!("unsupported critical option {name:?}"));
    }
    None
}

/// The name OpenSSH looks up: `host` on port 22, `[host]:port` otherwise.
fn host_port_form(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

fn patterns_match(p: &HostPatterns, host: &str) -> bool {
    match p {
        HostPatterns::HashedName { salt, hash } => {
            match hmac::Hmac::<sha1::Sha1>::new_from_slice(salt) {
                Ok(mac) => mac.chain_update(host.as_bytes()).verify_slice(hash).is_ok(),
                Err(_) => false,
            }
        }
        HostPatterns::Patterns(list) => pattern_list_match(list.iter().map(String::as_str), host),
    }
}

/// OpenSSH `match_hostname` over a comma-separated list: case-insensitive,
/// and a negated match wins over any positive one.
fn pattern_list_match<'a>(list: impl IntoIterator<Item = &'a str>, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let mut positive = false;
    for pat in list {
        let (neg, pat) = match pat.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, pat),
        };
        if wildcard_match(pat.to_ascii_lowercase().as_bytes(), host.as_bytes()) {
            if neg {
                return false;
            }
            positive = true;
        }
    }
    positive
}

/// `*` and `?` glob matching, iterative, O(len(pat) * len(s)) at worst.
fn wildcard_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// Modification time and size: what decides whether to re-parse.
type FileStamp = (SystemTime, u64);

/// What [`KnownHostsStore::learn`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learned {
    /// The key was appended: the host was unknown under the lock too.
    Added,
    /// Under the lock the file already said something about this host (e.g.
    /// another process recorded a key first); this is its verdict.
    Existing(Verdict),
}

/// A known_hosts file loaded once and reloaded only when it changes on disk.
#[derive(Debug)]
pub struct KnownHostsStore {
    path: PathBuf,
    state: Mutex<(Option<FileStamp>, Arc<KnownHostsFile>)>,
}

impl KnownHostsStore {
    /// Loads `path`. A missing or unreadable file is an error at start, so an
    /// operator learns about it at once rather than from `rejected` nodes.
    pub fn open(path: &Path) -> std::io::Result<KnownHostsStore> {
        let store = KnownHostsStore {
            path: path.to_path_buf(),
            state: Mutex::new((None, Arc::new(KnownHostsFile::default()))),
        };
        store.refresh()?;
        Ok(store)
    }

    /// The file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn refresh(&self) -> std::io::Result<Arc<KnownHostsFile>> {
        let meta = std::fs::metadata(&self.path)?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 != Some(stamp) {
            let text = std::fs::read_to_string(&self.path)?;
            let parsed = KnownHostsFile::parse(&text);
            if parsed.skipped > 0 {
                tracing::warn!(path = %self.path.display(), skipped = parsed.skipped, "known_hosts: skipped unparsable lines");
            }
            tracing::debug!(path = %self.path.display(), entries = parsed.len(), "known_hosts loaded");
            *st = (Some(stamp), Arc::new(parsed));
        }
        Ok(st.1.clone())
    }

    /// The current contents; re-parsed only if the file changed. If the file
    /// became unreadable, the last good contents stay in force.
    pub fn current(&self) -> Arc<KnownHostsFile> {
        match self.refresh() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "known_hosts unreadable; keeping the last good copy");
                self.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .1
                    .clone()
            }
        }
    }

    /// `accept-new`: records `key` for `record_as` on `port` unless, under
    /// an exclusive lock on `<file>.lock`, the file already has anything to
    /// say about `hosts`. The file is rewritten through a temporary file in
    /// the same directory and a rename, keeping its mode. Blocking: call it
    /// from `spawn_blocking`.
    pub fn learn(
        &self,
        hosts: &[&str],
        port: u16,
        record_as: &str,
        key: &PublicKey,
    ) -> std::io::Result<Learned> {
        let lock_path = sibling(&self.path, ".lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;

        let text = std::fs::read_to_string(&self.path)?;
        let verdict = KnownHostsFile::parse(&text).check(hosts, port, key);
        if verdict != Verdict::Unknown {
            return Ok(Learned::Existing(verdict));
        }
        let bare = PublicKey::new(key.key_data().clone(), "");
        let encoded = bare
            .to_openssh()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut new_text = text;
        if !new_text.is_empty() && !new_text.ends_with('\n') {
            new_text.push('\n');
        }
        new_text.push_str(&format!("{} {encoded}\n", host_port_form(record_as, port)));

        let mode = std::fs::metadata(&self.path)?.permissions().mode() & 0o7777;
        let tmp = sibling(
            &self.path,
            &format!(".tmp.{}.{}", std::process::id(), rand::random::<u32>()),
        );
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(new_text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        // Pick the new line up now rather than at the next change check.
        let _ = self.refresh();
        Ok(Learned::Added)
    }
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti";
    const CA: &str = include_str!("../../tests/fixtures/known_hosts/ca.pub");
    const CA2: &str = include_str!("../../tests/fixtures/known_hosts/ca2.pub");
    const HOST: &str = include_str!("../../tests/fixtures/known_hosts/host.pub");
    const CERT_OK: &str = include_str!("../../tests/fixtures/known_hosts/host-cert-valid.pub");
    const CERT_USER: &str = include_str!("../../tests/fixtures/known_hosts/user-cert.pub");
    const CERT_EXPIRED: &str =
        include_str!("../../tests/fixtures/known_hosts/host-cert-expired.pub");
    const CERT_OTHER_CA: &str =
        include_str!("../../tests/fixtures/known_hosts/host-cert-other-ca.pub");
    const CERT_NO_PRINCIPAL: &str =
        include_str!("../../tests/fixtures/known_hosts/host-cert-no-principal.pub");
    /// 2026-01-01, inside the "always:forever" window.
    const NOW: u64 = 1_767_225_600;

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s.trim()).unwrap()
    }

    fn cert(s: &str) -> Certificate {
        Certificate::from_openssh(s.trim()).unwrap()
    }

    fn bare(s: &str) -> String {
        s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn plain_port_and_patterns() {
        let f = KnownHostsFile::parse(&format!(
            "# comment\n10.0.0.1 {K1}\n[10.0.0.2]:2222 {K1}\n10.1.*,!10.1.0.9 {K2}\nnode-?.example {K2}\ngarbage line\n"
        ));
        assert_eq!(f.len(), 4);
        assert_eq!(f.skipped, 1);
        assert_eq!(f.check(&["10.0.0.1"], 22, &key(K1)), Verdict::Trusted);
        assert!(matches!(
            f.check(&["10.0.0.1"], 22, &key(K2)),
            Verdict::Mismatch { .. }
        ));
        assert_eq!(f.check(&["10.0.0.2"], 22, &key(K1)), Verdict::Unknown);
        assert_eq!(f.check(&["10.0.0.2"], 2222, &key(K1)), Verdict::Trusted);
        assert_eq!(f.check(&["10.1.3.4"], 22, &key(K2)), Verdict::Trusted);
        assert_eq!(f.check(&["10.1.0.9"], 22, &key(K2)), Verdict::Unknown);
        assert_eq!(f.check(&["node-a.example"], 22, &key(K2)), Verdict::Trusted);
        assert_eq!(f.check(&["NODE-A.example"], 22, &key(K2)), Verdict::Trusted);
        assert_eq!(
            f.check(&["node-ab.example"], 22, &key(K2)),
            Verdict::Unknown
        );
        // The node name is tried besides the address.
        assert_eq!(
            f.check(&["10.9.9.9", "node-b.example"], 22, &key(K2)),
            Verdict::Trusted
        );
    }

    #[test]
    fn hashed_hosts() {
        // Produced by `ssh-keygen -H` for host 10.0.0.1.
        let line = format!("|1|ORya5W8/u40VSJoE2h4yd5ztXE8=|w2wQuPRDMSEL2iJn1MgUdEkfrnM= {K1}");
        let f = KnownHostsFile::parse(&line);
        assert_eq!(f.len(), 1);
        assert_eq!(f.check(&["10.0.0.1"], 22, &key(K1)), Verdict::Trusted);
        assert!(matches!(
            f.check(&["10.0.0.1"], 22, &key(K2)),
            Verdict::Mismatch { .. }
        ));
        assert_eq!(f.check(&["10.0.0.99"], 22, &key(K1)), Verdict::Unknown);
    }

    #[test]
    fn revoked_wins() {
        let f = KnownHostsFile::parse(&format!("10.0.0.1 {K1}\n@revoked * {K1}\n"));
        assert_eq!(f.check(&["10.0.0.1"], 22, &key(K1)), Verdict::Revoked);
    }

    #[test]
    fn cert_authority_accepts_a_valid_host_certificate() {
        let f = KnownHostsFile::parse(&format!("@cert-authority 10.0.0.* {}\n", bare(CA)));
        assert!(f.has_cert_authority_for(&["10.0.0.1"], 22));
        assert!(!f.has_cert_authority_for(&["10.0.1.1"], 22));
        assert!(!f.has_cert_authority_for(&["10.0.0.1"], 2222));
        let c = cert(CERT_OK);
        assert_eq!(
            f.check_certificate(&["10.0.0.1", "n"], 22, &c, NOW),
            Verdict::Trusted
        );
        // The principal may be the node name instead.
        assert_eq!(
            f.check_certificate(&["10.0.0.7", "node-a"], 22, &c, NOW),
            Verdict::Trusted
        );
        // A CA line is not a plain host key line, and a host it covers
        // must present a certificate: a plain key there is refused.
        assert_eq!(
            f.check(&["10.0.0.1"], 22, &key(CA)),
            Verdict::CertificateRequired
        );
        assert_eq!(
            f.check(&["10.0.0.1"], 22, &key(HOST)),
            Verdict::CertificateRequired
        );
        // A host no CA line covers is unknown as before.
        assert_eq!(f.check(&["192.0.2.1"], 22, &key(HOST)), Verdict::Unknown);
    }

    #[test]
    fn certificate_rules() {
        let f = KnownHostsFile::parse(&format!("@cert-authority * {}\n", bare(CA)));
        let rejected =
            |c: &str, hosts: &[&str], now: u64| match f.check_certificate(hosts, 22, &cert(c), now)
            {
                Verdict::CertificateRejected { reason } => reason,
                other => panic!("expected a rejection, got {other:?}"),
            };
        assert!(rejected(CERT_USER, &["10.0.0.1"], NOW).contains("not a host certificate"));
        assert!(rejected(CERT_EXPIRED, &["10.0.0.1"], NOW).contains("expired"));
        assert!(rejected(CERT_EXPIRED, &["10.0.0.1"], 0).contains("not yet valid"));
        assert!(rejected(CERT_OTHER_CA, &["10.0.0.1"], NOW).contains("not a trusted CA"));
        assert!(rejected(CERT_NO_PRINCIPAL, &["10.0.0.1"], NOW).contains("no principal"));
        assert!(rejected(CERT_OK, &["10.0.0.2", "node-b"], NOW).contains("no principal"));
    }

    #[test]
    fn certificate_falls_back_to_the_plain_key() {
        // No CA at all: the key inside the certificate is looked up as usual.
        let f = KnownHostsFile::parse(&format!("10.0.0.1 {}\n", bare(HOST)));
        assert_eq!(
            f.check_certificate(&["10.0.0.1"], 22, &cert(CERT_OTHER_CA), NOW),
            Verdict::Trusted
        );
        let f = KnownHostsFile::parse(&format!("10.0.0.1 {K1}\n"));
        assert!(matches!(
            f.check_certificate(&["10.0.0.1"], 22, &cert(CERT_OK), NOW),
            Verdict::Mismatch { .. }
        ));
        let f = KnownHostsFile::parse(&format!("10.0.0.9 {K1}\n"));
        assert_eq!(
            f.check_certificate(&["10.0.0.1"], 22, &cert(CERT_OK), NOW),
            Verdict::Unknown
        );
    }

    #[test]
    fn revoked_certificate_key_or_ca() {
        let with_ca = format!("@cert-authority * {}\n", bare(CA));
        let f = KnownHostsFile::parse(&format!("{with_ca}@revoked * {}\n", bare(HOST)));
        assert_eq!(
            f.check_certificate(&["10.0.0.1"], 22, &cert(CERT_OK), NOW),
            Verdict::Revoked
        );
        let f = KnownHostsFile::parse(&format!("{with_ca}@revoked * {}\n", bare(CA)));
        assert_eq!(
            f.check_certificate(&["10.0.0.1"], 22, &cert(CERT_OK), NOW),
            Verdict::Revoked
        );
        // Revoking another CA changes nothing.
        let f = KnownHostsFile::parse(&format!("{with_ca}@revoked * {}\n", bare(CA2)));
        assert_eq!(
            f.check_certificate(&["10.0.0.1"], 22, &cert(CERT_OK), NOW),
            Verdict::Trusted
        );
    }

    #[test]
    fn tampered_certificate_fails_the_signature() {
        // Swap the certified key for another one: the CA signature no longer
        // covers it.
        let c = cert(CERT_OK);
        let mut blob = c.to_bytes().unwrap();
        let host = key(HOST).key_data().ed25519().unwrap().0;
        let other = key(K1).key_data().ed25519().unwrap().0;
        let at = blob.windows(32).position(|w| w == host).unwrap();
        blob[at..at + 32].copy_from_slice(&other);
        let forged = Certificate::from_bytes(&blob).unwrap();
        let f = KnownHostsFile::parse(&format!("@cert-authority * {}\n", bare(CA)));
        match f.check_certificate(&["10.0.0.1"], 22, &forged, NOW) {
            Verdict::CertificateRejected { reason } => assert!(reason.contains("signature")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn learn_appends_once_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, format!("10.0.0.1 {K1}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let store = KnownHostsStore::open(&path).unwrap();
        assert_eq!(
            store.current().check(&["10.0.0.2"], 22, &key(K2)),
            Verdict::Unknown
        );
        assert_eq!(
            store
                .learn(&["10.0.0.2"], 22, "10.0.0.2", &key(K2))
                .unwrap(),
            Learned::Added
        );
        assert_eq!(
            store.current().check(&["10.0.0.2"], 22, &key(K2)),
            Verdict::Trusted
        );
        // Known already: nothing appended.
        assert_eq!(
            store
                .learn(&["10.0.0.2"], 22, "10.0.0.2", &key(K2))
                .unwrap(),
            Learned::Existing(Verdict::Trusted)
        );
        // A changed key is never learned.
        assert!(matches!(
            store
                .learn(&["10.0.0.1"], 22, "10.0.0.1", &key(K2))
                .unwrap(),
            Learned::Existing(Verdict::Mismatch { .. })
        ));
        assert_eq!(
            store
                .learn(&["10.0.0.3"], 2222, "10.0.0.3", &key(K1))
                .unwrap(),
            Learned::Added
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.contains(&format!("[10.0.0.3]:2222 {K1}")), "{text}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
    }

    #[test]
    fn concurrent_learners_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, "").unwrap();
        let store = Arc::new(KnownHostsStore::open(&path).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let k = if i % 2 == 0 { K1 } else { K2 };
                    store.learn(&["10.0.0.5"], 22, "10.0.0.5", &key(k)).unwrap()
                })
            })
            .collect();
        let results: Vec<Learned> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| **r == Learned::Added).count(),
            1,
            "{results:?}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*", b"anything"));
        assert!(wildcard_match(b"a*c", b"abbbc"));
        assert!(!wildcard_match(b"a*c", b"abbbd"));
        assert!(wildcard_match(b"??", b"ab"));
        assert!(!wildcard_match(b"??", b"abc"));
        assert!(wildcard_match(b"", b""));
    }

    /// The obvious recursive definition of `*`/`?` globbing.
    fn reference_glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, _) => s.is_empty(),
            (Some(b'*'), _) => {
                reference_glob(&p[1..], s) || (!s.is_empty() && reference_glob(p, &s[1..]))
            }
            (Some(_), None) => false,
            (Some(b'?'), Some(_)) => reference_glob(&p[1..], &s[1..]),
            (Some(c), Some(d)) => c == d && reference_glob(&p[1..], &s[1..]),
        }
    }

    fn reference_list(list: &[String], host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let hits = |neg: bool| {
            list.iter().any(|p| {
                p.starts_with('!') == neg
                    && reference_glob(
                        p.trim_start_matches('!').to_ascii_lowercase().as_bytes(),
                        host.as_bytes(),
                    )
            })
        };
        !hits(true) && hits(false)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn glob_matches_reference(p in "[ab?*]{0,8}", s in "[abc]{0,10}") {
            proptest::prop_assert_eq!(
                wildcard_match(p.as_bytes(), s.as_bytes()),
                reference_glob(p.as_bytes(), s.as_bytes())
            );
        }

        #[test]
        fn pattern_lists_match_reference(
            list in proptest::collection::vec("!?[aB1.?*]{1,5}", 1..4),
            host in "[ab1.]{1,6}",
        ) {
            proptest::prop_assert_eq!(
                pattern_list_match(list.iter().map(String::as_str), &host),
                reference_list(&list, &host)
            );
            // And the same through a parsed known_hosts line.
            let f = KnownHostsFile::parse(&format!("{} {K1}", list.join(",")));
            if f.len() == 1 {
                proptest::prop_assert_eq!(
                    f.check(&[&host], 22, &key(K1)) == Verdict::Trusted,
                    reference_list(&list, &host)
                );
            }
        }
    }
}
