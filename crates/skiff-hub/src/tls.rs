//! Serving the API over TLS (rustls, ring). Client certificates are optional at the TLS
//! layer — operators authenticate with a bearer token, nodes with the certificate the hub
//! signed at join — and whoever presented one is handed to the router as [`Peer`].

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tower::ServiceExt;

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
fn peer_of(conn: &rustls::ServerConnection) -> Peer {
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

/// Serves `router` on `listener` over TLS until the task is dropped; each request carries
/// its connection's [`Peer`] as an extension.
pub async fn serve(listener: TcpListener, router: Router, cfg: rustls::ServerConfig) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    loop {
        let (tcp, addr): (_, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await;
            let tls = match handshake {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let peer = peer_of(tls.get_ref().1);
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await {
                tracing::debug!(%addr, error = %e, "connection ended");
            }
        });
    }
}
