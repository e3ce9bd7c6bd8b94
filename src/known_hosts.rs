//! Host key verification against an OpenSSH known_hosts file.
//!
//! russh's own `check_known_hosts_path` re-reads the file on every call and
//! knows neither wildcards nor `@revoked`. With a thousand nodes reconnecting
//! that is a thousand reads, so [`KnownHostsStore`] parses the file once and
//! re-parses only when its modification time or size changes.
//!
//! Supported: plain and hashed (`|1|salt|hash`) host names, `[host]:port`,
//! comma-separated patterns with `*`, `?` and `!` negation, and `@revoked`
//! lines. `@cert-authority` lines are parsed but host certificates are not
//! yet accepted (a later issue adds certificate validation); a host that
//! presents a certificate is therefore rejected, never trusted blindly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hmac::{KeyInit, Mac};
use russh::keys::ssh_key::known_hosts::{HostPatterns, KnownHosts, Marker};
use russh::keys::ssh_key::{HashAlg, PublicKey};

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

/// The verdict for a presented host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host lists this key.
    Trusted,
    /// Lines exist for this host, but none with this key. Carries the
    /// fingerprints we expected, for the log.
    Mismatch {
        /// SHA256 fingerprints of the keys on record for this host.
        expected: Vec<String>,
    },
    /// No line names this host at all.
    Unknown,
    /// The key is marked `@revoked`.
    Revoked,
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

    /// Checks `key` for `host` (an IP or name) on `port`. Every name in
    /// `hosts` is tried, e.g. the node's address and its node name, as
    /// OpenSSH does with `HostKeyAlias`/`CheckHostIP`.
    pub fn check(&self, hosts: &[&str], port: u16, key: &PublicKey) -> Verdict {
        let candidates: Vec<String> = hosts.iter().map(|h| host_port_form(h, port)).collect();
        let matches_host = |p: &HostPatterns| candidates.iter().any(|c| patterns_match(p, c));

        let key_data = key.key_data();
        if self
            .lines
            .iter()
            .any(|l| matches!(l.marker, Some(Marker::Revoked)) && l.key.key_data() == key_data)
        {
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
        HostPatterns::Patterns(list) => {
            // OpenSSH match_hostname: a negated match wins over any positive one.
            let host = host.to_ascii_lowercase();
            let mut positive = false;
            for pat in list {
                let (neg, pat) = match pat.strip_prefix('!') {
                    Some(rest) => (true, rest),
                    None => (false, pat.as_str()),
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
    }
}

/// `*` and `?` glob matching, iterative, linear in practice.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
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
        assert_eq!(
            f.check(&["node-ab.example"], 22, &key(K2)),
            Verdict::Unknown
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
    fn wildcards() {
        assert!(wildcard_match(b"*", b"anything"));
        assert!(wildcard_match(b"a*c", b"abbbc"));
        assert!(!wildcard_match(b"a*c", b"abbbd"));
        assert!(wildcard_match(b"??", b"ab"));
        assert!(!wildcard_match(b"??", b"abc"));
        assert!(wildcard_match(b"", b""));
    }
}
