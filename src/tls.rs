//! The mTLS listener, matching kube-apiserver's `transport.tcp.tlsConfig`.
//!
//! TLS 1.2 or newer (rustls supports nothing older), and a client
//! certificate signed by `client_ca_file` is required: a client without one
//! is refused in the handshake, before it can send a byte of CONNECT.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

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
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| err("client_ca_file", &cfg.client_ca_file, e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("cert_file", &cfg.cert_file, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| err("key_file", &cfg.key_file, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
