//! The mTLS listener, matching kube-apiserver's `transport.tcp.tlsConfig`.
//!
//! TLS 1.2 or newer (rustls supports nothing older), and a client
//! certificate signed by `client_ca_file` is required: a client without one
//! is refused in the handshake, before it can send a byte of CONNECT.
//!
//! A CA is often shared: the cluster CA signs every kubelet's client
//! certificate too. `client_names` narrows who gets in to certificates that
//! carry a listed name (subject CN, or a DNS subject alternative name); the
//! check runs inside the handshake, after the chain verified, so a refused
//! client gets a TLS `access_denied` alert and never reaches the proxy.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_rustls::TlsAcceptor;
use tracing::warn;
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::{DirectoryString, GeneralName};
use x509_cert::ext::pkix::SubjectAltName;

use crate::config::TlsConfig;

/// Why the TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("proxy.tls: {what} {path}: {reason}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    reason: String,
}

fn err(what: &'static str, path: &std::path::Path, reason: impl ToString) -> TlsError {
    TlsError {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Loads the certificates and builds the acceptor.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| err("cert_file", &cfg.cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("cert_file", &cfg.cert_file, e))?;
    if certs.is_empty() {
        return Err(err(
            "cert_file",
            &cfg.cert_file,
            "no certificate in the file",
        ));
    }
    // The error of a key parse never includes key bytes.
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| err("key_file", &cfg.key_file, e))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.client_ca_file)
        .map_err(|e| err("client_ca_file", &cfg.client_ca_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("client_ca_file", &cfg.client_ca_file, e))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| err("client_ca_file", &cfg.client_ca_file, e))?;
    }
    if roots.is_empty() {
        return Err(err(
            "client_ca_file",
            &cfg.client_ca_file,
            "no CA certificate in the file",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| err("client_ca_file", &cfg.client_ca_file, e))?;
    let verifier: Arc<dyn ClientCertVerifier> = if cfg.client_names.is_empty() {
        chain
    } else {
        Arc::new(NamedClients {
            chain,
            allowed: cfg.client_names.clone(),
        })
    };
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("cert_file", &cfg.cert_file, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| err("key_file", &cfg.key_file, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The names a certificate presents: every subject CN, then every DNS
/// subject alternative name. `None` when the certificate does not parse
/// (the chain check has accepted it by then, so this does not happen with
/// a well-formed certificate).
pub fn certificate_names(der: &[u8]) -> Option<Vec<String>> {
    /// id-at-commonName (RFC 4519).
    const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let tbs = cert.tbs_certificate();
    let mut names = Vec::new();
    for atv in tbs.subject().iter().filter(|a| a.oid == COMMON_NAME) {
        if let Ok(cn) = DirectoryString::try_from(&atv.value) {
            names.push(cn.value().into_owned());
        }
    }
    if let Ok(Some((_, san))) = tbs.get_extension::<SubjectAltName>() {
        for name in san.0 {
            if let GeneralName::DnsName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    Some(names)
}

/// Whether one of `presented` is listed in `allowed`, without regard to
/// ASCII case (DNS names have none, and CNs are compared the same way so
/// one rule covers both). A presented name is matched as text, never as a
/// pattern: a `*.example` SAN matches only the listed text `*.example`,
/// which config validation refuses.
pub fn name_allowed(presented: &[String], allowed: &[String]) -> bool {
    presented
        .iter()
        .any(|p| allowed.iter().any(|a| a.eq_ignore_ascii_case(p)))
}

/// The chain check, then the name check of `proxy.tls.client_names`.
#[derive(Debug)]
struct NamedClients {
    chain: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for NamedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = certificate_names(end_entity).unwrap_or_default();
        if name_allowed(&presented, &self.allowed) {
            return Ok(verified);
        }
        // Runs inside the connection's span, which names the peer.
        warn!(
            presented = ?presented,
            allowed = ?self.allowed,
            "client certificate refused: it chains to client_ca_file but carries none of proxy.tls.client_names"
        );
        Err(CertificateError::ApplicationVerificationFailure.into())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_match_as_text_without_case() {
        let allowed = v(&["kube-apiserver-egress"]);
        assert!(name_allowed(&v(&["kube-apiserver-egress"]), &allowed));
        assert!(name_allowed(&v(&["x", "KUBE-APISERVER-EGRESS"]), &allowed));
        assert!(!name_allowed(&v(&["system:node:node-1"]), &allowed));
        assert!(!name_allowed(&v(&["kube-apiserver-egress.evil"]), &allowed));
        assert!(!name_allowed(&v(&["kube-apiserver"]), &allowed));
        assert!(!name_allowed(&[], &allowed));
    }

    #[test]
    fn reads_subject_cn_and_dns_sans_of_a_real_certificate() {
        // openssl req -x509 -subj "/O=system:nodes/CN=kube-apiserver-egress"
        //   -addext "subjectAltName=DNS:egress.tunneler.local,IP:127.0.0.1"
        let der = include_bytes!("../../fuzz/corpus/client_cert_names/seed-ec-cn-and-san.der");
        assert_eq!(
            certificate_names(der),
            Some(v(&["kube-apiserver-egress", "egress.tunneler.local"])),
            "the O and the IP SAN are not names"
        );
        // Cut short, it is no certificate.
        assert_eq!(certificate_names(&der[..der.len() - 1]), None);
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert_eq!(certificate_names(b""), None);
        assert_eq!(certificate_names(&[0x30, 0x82, 0xff, 0xff, 0x01]), None);
    }
}
