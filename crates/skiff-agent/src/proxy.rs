//! Published ports: a userspace proxy in the agent, listening on the host and forwarding
//! to an instance's bridge address (TCP streams and UDP datagrams). No iptables needed.

use skiff_model::Protocol;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub bind: SocketAddr,
    pub protocol: Protocol,
}

struct Forward {
    target: SocketAddr,
    task: JoinHandle<()>,
}

#[derive(Default)]
pub struct Proxies {
    forwards: HashMap<PortKey, Forward>,
}

const MAX_UDP_PEERS: usize = 1024;
const UDP_IDLE: Duration = Duration::from_secs(60);

impl Proxies {
    /// Makes `key` forward to `target`, binding now so that a port in use is reported.
    pub async fn ensure(&mut self, key: PortKey, target: SocketAddr) -> std::io::Result<()> {
        if let Some(f) = self.forwards.get(&key) {
            if f.target == target && !f.task.is_finished() {
                return Ok(());
            }
        }
        self.remove(&key);
        let task = match key.protocol {
            Protocol::Tcp => {
                let l = TcpListener::bind(key.bind).await?;
                tokio::spawn(tcp_loop(l, target))
            }
            Protocol::Udp => {
                let s = UdpSocket::bind(key.bind).await?;
                tokio::spawn(udp_loop(Arc::new(s), target))
            }
        };
        self.forwards.insert(key, Forward { target, task });
        Ok(())
    }

    pub fn remove(&mut self, key: &PortKey) {
        if let Some(f) = self.forwards.remove(key) {
            f.task.abort();
        }
    }

    /// Drops every forward whose key is not in `keep`.
    pub fn retain(&mut self, keep: &[PortKey]) {
        let stale: Vec<PortKey> = self.forwards.keys().filter(|k| !keep.contains(k)).cloned().collect();
        for k in stale {
            self.remove(&k);
        }
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for f in self.forwards.values() {
            f.task.abort();
        }
    }
}

async fn tcp_loop(l: TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let Ok(Ok(mut outbound)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await
            else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

async fn udp_loop(sock: Arc<UdpSocket>, target: SocketAddr) {
    let peers: Arc<tokio::sync::Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Default::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let upstream = {
            let mut map = peers.lock().await;
            if let Some(u) = map.get(&client) {
                Arc::clone(u)
            } else {
                if map.len() >= MAX_UDP_PEERS {
                    continue;
                }
                let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap_or(target);
                let Ok(u) = UdpSocket::bind(bind).await else {
                    continue;
                };
                if u.connect(target).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                map.insert(client, Arc::clone(&u));
                // Replies from the instance go back to this client until it is idle.
                let (sock, u2, peers) = (Arc::clone(&sock), Arc::clone(&u), Arc::clone(&peers));
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65_536];
                    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, u2.recv(&mut b)).await {
                        let _ = sock.send_to(&b[..n], client).await;
                    }
                    peers.lock().await.remove(&client);
                });
                u
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn key(port: u16, protocol: Protocol) -> PortKey {
        PortKey { bind: SocketAddr::from(([127, 0, 0, 1], port)), protocol }
    }

    fn free_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).unwrap()
    }

    #[tokio::test]
    async fn forwards_udp_both_ways_per_client() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut b).await {
                let _ = echo.send_to(&b[..n], from).await;
            }
        });
        let port = free_port();
        let mut p = Proxies::default();
        p.ensure(key(port, Protocol::Udp), target).await.unwrap();
        for msg in [&b"one"[..], b"two"] {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.send_to(msg, ("127.0.0.1", port)).await.unwrap();
            let mut b = [0u8; 64];
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), c.recv_from(&mut b)).await.unwrap().unwrap();
            assert_eq!(&b[..n], msg);
        }
    }

    #[tokio::test]
    async fn forwards_tcp_and_reports_a_port_in_use() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let _ = s.write_all(&b[..n]).await;
                });
            }
        });
        let port = free_port();
        let mut p = Proxies::default();
        p.ensure(key(port, Protocol::Tcp), target).await.unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        let mut other = Proxies::default();
        assert!(other.ensure(key(port, Protocol::Tcp), target).await.is_err(), "bind conflict is reported");
        p.retain(&[]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(other.ensure(key(port, Protocol::Tcp), target).await.is_ok(), "port released after retain");
    }
}
