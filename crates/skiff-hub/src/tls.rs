//! Serving the API over TLS (rustls, ring). Client certificates are optional at the TLS
//! layer — operators authenticate with a bearer token, nodes with the certificate the hub
//! signed at join — and whoever presented one is handed to the router as [`Peer`].

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// The client certificate of a connection, as verified against the hub's CA.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Peer {
    /// The certificate's common name: the node name the hub wrote into it.
    pub node: Option<String>,
    /// The certificate's serial, hex.
    pub serial: Option<String>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs(pem_text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

pub fn key(pem_text: &str) -> Result<PrivateKeyDer<'static>, String> {
    let b = pem::parse(pem_text).map_err(|e| format!("not a PEM key: {e}"))?;
    PrivateKeyDer::try_from(b.into_contents()).map_err(|e| format!("unsupported key: {e}"))
}

/// The server side: `cert_pem`/`key_pem` for the hub; client certificates, when offered,
/// must chain to `ca_pem`.
pub fn server_config(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<rustls::ServerConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem)?, key(key_pem)?)
        .map_err(|e| format!("server certificate: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Name and serial of a verified client certificate.
pub(crate) fn peer_of(conn: &rustls::ServerConnection) -> Peer {
    let Some(der) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Peer::default();
    };
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => Peer {
            node: cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string),
            serial: Some(hex::encode(cert.raw_serial())),
        },
        Err(_) => Peer::default(),
    }
}
