//! Serving the API: one accept loop for the hub (TLS, with the client certificate of
//! each connection handed to the router as [`Peer`]) and for `skiff up` on loopback
//! (plain HTTP). Whatever connects is held to limits, so a flood of connections cannot
//! lock the operator out:
//!
//! * open connections are capped in total (below the process's file limit) and per
//!   source address ([`skiff_sys::connlimit`]); over the cap a connection is closed at once;
//! * a TLS handshake must finish within 10 s and a request's headers within
//!   `header_timeout` (slowloris);
//! * a connection with no byte in either direction for `idle_timeout` is closed (an
//!   upgraded tunnel keeps its own liveness: the hub's pings).

use crate::tls::Peer;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use skiff_sys::connlimit::{ConnCounter, ConnLimits};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// How connections are served.
#[derive(Clone)]
pub struct ServeConfig {
    /// TLS (the hub); `None` serves plain HTTP (loopback only).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub limits: ConnLimits,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// File descriptors kept back from connections for everything else the process opens.
const FD_RESERVE: usize = 512;

impl ServeConfig {
    /// The defaults: `max_connections` in total (never above the file limit less a
    /// reserve), `max_per_ip` from one address opening at most `rate_per_ip` a second
    /// (ten times that at once: a site of nodes reconnecting after a hub restart), 10 s
    /// for headers, 120 s idle (longer than the longest long-poll, 60 s).
    pub fn new(tls: Option<rustls::ServerConfig>, max_connections: usize, max_per_ip: usize, rate_per_ip: f64) -> Self {
        ServeConfig {
            tls: tls.map(Arc::new),
            limits: ConnLimits::within_fd_limit(max_connections, max_per_ip, FD_RESERVE)
                .with_rate(rate_per_ip, rate_per_ip * 10.0),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true (then it stops accepting).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: ServeConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let counter = ConnCounter::new(cfg.limits);
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, addr): (_, SocketAddr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be given back.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let guard = match counter.try_enter(addr.ip()) {
            Ok(g) => g,
            Err(e) => {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%addr, refused, "connection refused: {e}");
                }
                drop(tcp);
                continue;
            }
        };
        let (acceptor, router, cfg) = (acceptor.clone(), router.clone(), cfg.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match acceptor {
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    let tls = match handshake {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let peer = crate::tls::peer_of(tls.get_ref().1);
                    connection(Watched::new(tls, guard), peer, router, &cfg, addr).await
                }
                None => connection(Watched::new(tcp, guard), Peer::default(), router, &cfg, addr).await,
            }
        });
    }
}

/// HTTP/1.1 (with upgrades) on one connection until it ends or idles out.
async fn connection<S>(io: Watched<S>, peer: Peer, router: Router, cfg: &ServeConfig, addr: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let last = Arc::clone(&io.last);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(cfg.header_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(%addr, error = %e, "connection ended");
            }
        }
        _ = idle(&last, cfg.idle_timeout) => tracing::debug!(%addr, "idle connection closed"),
    }
}

/// Resolves once nothing moved on the connection for `limit`.
async fn idle(last: &AtomicU64, limit: Duration) {
    let start = tokio::time::Instant::now();
    loop {
        let quiet_since = start + Duration::from_millis(last.load(Ordering::Relaxed));
        let due = quiet_since + limit;
        if tokio::time::Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

/// A connection's stream that notes when a byte last moved, and holds the connection's
/// slot for as long as the stream lives (also inside an upgraded tunnel).
struct Watched<S> {
    inner: S,
    start: tokio::time::Instant,
    /// Milliseconds after `start` of the last read or write.
    last: Arc<AtomicU64>,
    _slot: skiff_sys::connlimit::ConnGuard,
}

impl<S> Watched<S> {
    fn new(inner: S, slot: skiff_sys::connlimit::ConnGuard) -> Self {
        Watched { inner, start: tokio::time::Instant::now(), last: Arc::new(AtomicU64::new(0)), _slot: slot }
    }

    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(port: u16, src: [u8; 4]) -> Option<String> {
        let sock = tokio::net::TcpSocket::new_v4().ok()?;
        sock.bind(SocketAddr::from((src, 0))).ok()?;
        let mut s = sock.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.ok()?;
        s.write_all(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.ok()?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.ok()?.ok()?;
        Some(out)
    }

    /// Slow and idle connections from one address: over its cap they are closed at once,
    /// the ones it holds are closed when their headers do not come, and another address
    /// is served throughout.
    #[tokio::test]
    async fn a_connection_flood_from_one_address_does_not_lock_others_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let router = Router::new().route("/api/v1/health", axum::routing::get(|| async { "ok" }));
        let cfg = ServeConfig {
            tls: None,
            limits: ConnLimits { total: 50, per_ip: 20, rate_per_ip: None },
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(5),
        };
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(l, router, cfg, stop_rx));
        // 100 connections from 127.0.0.2 that send half a request line and wait.
        let mut flood = vec![];
        for _ in 0..100 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
            if let Ok(mut s) = sock.connect(SocketAddr::from(([127, 0, 0, 1], port))).await {
                let _ = s.write_all(b"GET /api/v1/hea").await;
                flood.push(s);
            }
        }
        let answer = get(port, [127, 0, 0, 1]).await.unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");
        // Every flooding connection ends: refused over the cap, or its headers timed out.
        let mut ended = 0;
        for s in &mut flood {
            let mut b = [0u8; 512];
            let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
            if matches!(r, Ok(Ok(_)) | Ok(Err(_))) {
                ended += 1;
            }
        }
        assert_eq!(ended, flood.len(), "every slow connection was closed");
        assert!(get(port, [127, 0, 0, 2]).await.is_some_and(|a| a.ends_with("ok")), "and the address may come back");
    }
}
