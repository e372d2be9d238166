//! The node's side of TLS to its hub (rustls with ring): trusts only the hub's CA and
//! presents the certificate the hub signed for this node.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

pub(crate) fn certs(pem_text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

pub(crate) fn key(pem_text: &str) -> Result<PrivateKeyDer<'static>, String> {
    let b = pem::parse(pem_text).map_err(|e| format!("not a PEM key: {e}"))?;
    PrivateKeyDer::try_from(b.into_contents()).map_err(|e| format!("unsupported key: {e}"))
}

/// Trusts only `ca_pem` and presents no certificate (the CLI, which sends a token).
pub fn trusting(ca_pem: &str) -> Result<rustls::ClientConfig, String> {
    Ok(builder(ca_pem)?.with_no_client_auth())
}

fn builder(
    ca_pem: &str,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots))
}

/// Trusts only `ca_pem`; presents `cert_pem` with `key_pem`.
pub fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig, String> {
    builder(ca_pem)?
        .with_client_auth_cert(certs(cert_pem)?, key(key_pem)?)
        .map_err(|e| format!("node certificate: {e}"))
}
