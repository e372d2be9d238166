//! Agents connecting to each other directly, over TLS with the identities the hub issued:
//! each side presents its node certificate and checks the other's against the fleet's CA.
//! The caller also checks that the certificate names the node it meant to reach; the
//! callee that the caller's node may reach the service it asks for (the hub's
//! `clients`), so a node reaches no further than the hub said, and a deleted node
//! (dropped from every list) nothing.

use crate::join::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tls::certs(ca_pem)? {
        roots.add(c).map_err(|e| format!("CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// Node certificates signed by the fleet's CA (they are client certificates).
fn node_verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, String> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|e| format!("node certificate verifier: {e}"))
}

/// The common name of a certificate (the node name the hub wrote into it) and its serial
/// in hex (as the hub keeps it).
pub(crate) fn identity(der: &CertificateDer<'_>) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    Some((cn?, hex::encode(cert.raw_serial())))
}

/// Accepts the server only if its certificate is a node certificate of the fleet that
/// names `node`, with one of the serials the hub says `node` holds.
#[derive(Debug)]
struct PeerIs {
    node: String,
    serials: Vec<String>,
    verifier: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerIs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier.verify_client_cert(end_entity, intermediates, now)?;
        match identity(end_entity) {
            Some((cn, serial)) if cn == self.node && self.serials.contains(&serial) => {
                Ok(ServerCertVerified::assertion())
            }
            other => Err(rustls::Error::General(format!(
                "expected node {:?} with a certificate the hub knows, the peer is {other:?}",
                self.node
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client for a direct connection to `node`'s agent, holding one of `serials`.
pub(crate) fn client_config(id: &Identity, node: &str, serials: &[String]) -> Result<rustls::ClientConfig, String> {
    let (cert, key) = id.current_pair().map_err(|e| e.to_string())?;
    let ca = id.ca().map_err(|e| e.to_string())?;
    let p = provider();
    let verifier = PeerIs {
        node: node.to_string(),
        serials: serials.to_vec(),
        verifier: node_verifier(&ca)?,
        provider: Arc::clone(&p),
    };
    rustls::ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(crate::tls::certs(&cert)?, crate::tls::key(&key)?)
        .map_err(|e| format!("node certificate: {e}"))
}

/// The TLS server for direct connections from other nodes' agents: a node certificate of
/// the fleet is required.
pub(crate) fn server_config(id: &Identity) -> Result<rustls::ServerConfig, String> {
    let (cert, key) = id.current_pair().map_err(|e| e.to_string())?;
    let ca = id.ca().map_err(|e| e.to_string())?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(node_verifier(&ca)?)
        .with_single_cert(crate::tls::certs(&cert)?, crate::tls::key(&key)?)
        .map_err(|e| format!("node certificate: {e}"))
}
