//! Where a guest may connect: its outgoing `wasi:http` requests and `wasi:sockets`
//! connections.
//!
//! * `network: none` — nothing at all: every outgoing request is denied, and the shim
//!   runs the guest in an empty network namespace of its own besides.
//! * otherwise the world, except — unless the deployment allows local targets
//!   (`x-skiff-wasm: {allow_local: true}`) — loopback, link-local (the cloud metadata
//!   service at 169.254.169.254 among them), unspecified and multicast addresses, and
//!   the node's own addresses (its API, its agent, whatever listens on the host).
//!
//! A name is resolved once, every address it resolves to is checked, and the connection
//! is made to a checked address: a name that resolves to an allowed address at the
//! check and a forbidden one at the connect (DNS rebinding) cannot slip through.

use http_body_util::BodyExt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// What a guest may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// Any network at all (`network: none` is false).
    pub network: bool,
    /// Loopback, link-local and the node's own addresses too.
    pub allow_local: bool,
    /// The node's own addresses (every interface of the host).
    pub node_addrs: Arc<Vec<IpAddr>>,
}

impl Egress {
    /// Why `ip` is out of bounds, if it is.
    pub fn refuse(&self, ip: IpAddr) -> Option<&'static str> {
        if !self.network {
            return Some("the instance has no network (network: none)");
        }
        if self.allow_local {
            return None;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let local = match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()
            }
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if local {
            return Some("a loopback, link-local or multicast address (allow_local is not set)");
        }
        if self.node_addrs.contains(&ip) {
            return Some("an address of the node itself (allow_local is not set)");
        }
        None
    }
}

/// The hooks `wasi:http` sends requests through.
pub(crate) struct Hooks {
    pub(crate) egress: Egress,
}

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (http::Response<WasiBody>, Box<dyn std::future::Future<Output = Result<(), Error>> + Send>),
                    Error,
                >,
            > + Send,
    > {
        drop(fut);
        let egress = self.egress.clone();
        Box::new(async move {
            let (resp, io) = send(&egress, request, options).await?;
            Ok((resp, Box::new(io) as Box<dyn std::future::Future<Output = Result<(), Error>> + Send>))
        })
    }
}

/// The addresses `host:port` resolves to, every one of them allowed; an error otherwise.
pub(crate) async fn resolve_allowed(egress: &Egress, host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    if !egress.network {
        return Err(Error::HttpRequestDenied);
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port)).await.map_err(|_| Error::DestinationNotFound)?.collect(),
    };
    if addrs.is_empty() {
        return Err(Error::DestinationNotFound);
    }
    if let Some(why) = addrs.iter().find_map(|a| egress.refuse(a.ip())) {
        tracing::debug!(%host, why, "outgoing request denied");
        return Err(Error::DestinationIpProhibited);
    }
    Ok(addrs)
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Sends `req` to one of the checked addresses of its authority (HTTP/1.1, TLS for https
/// with the name for SNI and verification against the web's roots).
async fn send(
    egress: &Egress,
    mut req: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<(http::Response<WasiBody>, impl std::future::Future<Output = Result<(), Error>> + Send), Error> {
    let uri = req.uri().clone();
    let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
    let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addrs = resolve_allowed(egress, authority.host(), port).await?;
    let connect_timeout = options.and_then(|o| o.connect_timeout).unwrap_or(Duration::from_secs(30));
    let first_byte = options.and_then(|o| o.first_byte_timeout).unwrap_or(Duration::from_secs(600));
    let mut tcp = None;
    for a in &addrs {
        if let Ok(Ok(s)) = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(a)).await {
            tcp = Some(s);
            break;
        }
    }
    let tcp = tcp.ok_or(Error::ConnectionRefused)?;
    let stream: Box<dyn Stream> = if tls {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| Error::TlsProtocolError)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(
            authority.host().trim_start_matches('[').trim_end_matches(']').to_string(),
        )
        .map_err(|_| Error::HttpRequestUriInvalid)?;
        let s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(Error::Tls)?;
        Box::new(s)
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)?
    .map_err(Error::Hyper)?;
    // On the wire the request line names the path only.
    *req.uri_mut() = http::Uri::builder()
        .path_and_query(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    let driver = tokio::spawn(conn);
    let resp = tokio::time::timeout(first_byte, sender.send_request(req))
        .await
        .map_err(|_| Error::ConnectionReadTimeout)?
        .map_err(Error::Hyper)?;
    let resp = resp.map(|b| b.map_err(Error::Hyper).boxed_unsync());
    let io = async move {
        match driver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Hyper(e)),
            Err(_) => Err(Error::ConnectionTerminated),
        }
    };
    Ok((resp, io))
}

/// What a guest's socket may use (`wasi:sockets`): the same bounds, for connections and
/// datagrams; binding and listening on its own namespace's addresses stays allowed.
pub(crate) fn socket_check(
    egress: Egress,
) -> impl Fn(
    SocketAddr,
    wasmtime_wasi::sockets::SocketAddrUse,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + Sync>>
       + Send
       + Sync
       + 'static {
    use wasmtime_wasi::sockets::SocketAddrUse;
    move |addr, usage| {
        let ok = match usage {
            SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => egress.network,
            _ => egress.refuse(addr.ip()).is_none(),
        };
        Box::pin(async move { ok })
    }
}

/// A body of bytes for a request made in tests.
#[cfg(test)]
pub(crate) fn body(b: &'static str) -> WasiBody {
    http_body_util::Full::new(bytes::Bytes::from(b))
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn egress(network: bool, allow_local: bool, node: &[&str]) -> Egress {
        Egress { network, allow_local, node_addrs: Arc::new(node.iter().map(|a| a.parse().unwrap()).collect()) }
    }

    #[test]
    fn local_and_node_addresses_are_out_of_bounds_unless_allowed() {
        let e = egress(true, false, &["10.0.0.5", "fd00::5"]);
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "10.0.0.5",
            "fd00::5",
            "224.0.0.1",
        ] {
            assert!(e.refuse(bad.parse().unwrap()).is_some(), "{bad}");
        }
        for ok in ["10.213.0.7", "93.184.216.34", "2001:db8::1"] {
            assert_eq!(e.refuse(ok.parse().unwrap()), None, "{ok}");
        }
        assert_eq!(egress(true, true, &["10.0.0.5"]).refuse("127.0.0.1".parse().unwrap()), None);
        assert!(egress(false, true, &[]).refuse("93.184.216.34".parse().unwrap()).unwrap().contains("network: none"));
    }

    /// A server on loopback answers only when the deployment allows local targets; with
    /// no network nothing is even looked up.
    #[tokio::test]
    async fn requests_go_only_where_the_policy_lets_them() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi").await;
            }
        });
        let req = || http::Request::builder().uri(format!("http://127.0.0.1:{port}/x")).body(body("")).unwrap();
        let denied = send(&egress(true, false, &[]), req(), None).await.err();
        assert!(matches!(denied, Some(Error::DestinationIpProhibited)), "{denied:?}");
        let none = send(&egress(false, true, &[]), req(), None).await.err();
        assert!(matches!(none, Some(Error::HttpRequestDenied)), "{none:?}");
        let (resp, io) = send(&egress(true, true, &[]), req(), None).await.unwrap();
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hi");
        let _ = io.await;
        let named = http::Request::builder().uri(format!("http://localhost:{port}/")).body(body("")).unwrap();
        assert!(send(&egress(true, false, &[]), named, None).await.is_err(), "a name resolving to loopback");
    }
}
