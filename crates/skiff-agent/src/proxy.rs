//! Published ports where the node has no firewall of ours (`--firewall none`, or none
//! that could be written) and for IPv6 host addresses: a userspace proxy in the agent,
//! listening on the host and forwarding to instances' bridge addresses (TCP streams and
//! UDP datagrams), round robin over the instances that serve. It stops with the agent;
//! the kernel's rules ([`skiff_runtime::ports`]) do not.
//!
//! A published port faces whatever network the node is on: TCP connections are capped in
//! total and per source address (over the cap a connection is closed at once), and one
//! that moves no byte in either direction for [`TCP_IDLE`] is closed.

use skiff_model::Protocol;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub bind: SocketAddr,
    pub protocol: Protocol,
}

/// Where a published port sends new connections: replaced as one value, so a switch
/// from old to new instances is atomic for every connection that follows.
type Targets = Arc<RwLock<Arc<Vec<SocketAddr>>>>;

struct Forward {
    targets: Targets,
    task: JoinHandle<()>,
}

/// Open connections per instance address, so a stopping instance can be drained.
#[derive(Clone, Default)]
pub struct Active(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct ActiveGuard(Active, IpAddr);

impl Active {
    fn enter(&self, ip: IpAddr) -> ActiveGuard {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(ip).or_default() += 1;
        }
        ActiveGuard(self.clone(), ip)
    }

    pub fn count(&self, ip: IpAddr) -> usize {
        self.0.lock().map(|m| m.get(&ip).copied().unwrap_or(0)).unwrap_or(0)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = (self.0).0.lock() {
            if let Some(n) = m.get_mut(&self.1) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.1);
                }
            }
        }
    }
}

pub struct Proxies {
    forwards: HashMap<PortKey, Forward>,
    active: Active,
    /// Open TCP connections over every published port.
    conns: skiff_sys::connlimit::ConnCounter,
    idle: Duration,
}

impl Default for Proxies {
    fn default() -> Self {
        Proxies::new(skiff_sys::connlimit::ConnLimits::within_fd_limit(MAX_TCP, MAX_TCP_PER_IP, 256))
    }
}

/// TCP connections through published ports at once, in all and from one address.
const MAX_TCP: usize = 8192;
const MAX_TCP_PER_IP: usize = 1024;
/// A proxied connection with no traffic for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(3600);

const MAX_UDP_PEERS: usize = 1024;
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long a new connection waits for an instance when none is serving (a stop-first
/// update, a restart), before it is closed.
const WAIT_FOR_TARGET: Duration = Duration::from_secs(5);
/// How long a connect to one instance may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Proxies {
    pub fn new(limits: skiff_sys::connlimit::ConnLimits) -> Self {
        let conns = skiff_sys::connlimit::ConnCounter::new(limits);
        Proxies { forwards: HashMap::new(), active: Active::default(), conns, idle: TCP_IDLE }
    }

    /// Closes proxied connections idle for `idle` instead of [`TCP_IDLE`].
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Makes `key` forward to `targets` (round robin), binding now so that a port in use
    /// is reported. A listener already bound keeps its socket; only its targets change.
    pub async fn ensure(&mut self, key: PortKey, mut targets: Vec<SocketAddr>) -> std::io::Result<()> {
        targets.sort();
        if let Some(f) = self.forwards.get(&key) {
            if !f.task.is_finished() {
                if let Ok(mut t) = f.targets.write() {
                    if **t != targets {
                        *t = Arc::new(targets);
                    }
                }
                return Ok(());
            }
        }
        self.remove(&key);
        let shared: Targets = Arc::new(RwLock::new(Arc::new(targets)));
        let task = match key.protocol {
            Protocol::Tcp => {
                let l = crate::mesh::listen_beside_services(key.bind)?;
                tokio::spawn(tcp_loop(l, Arc::clone(&shared), self.active.clone(), self.conns.clone(), self.idle))
            }
            Protocol::Udp => {
                let s = UdpSocket::bind(key.bind).await?;
                tokio::spawn(udp_loop(Arc::new(s), Arc::clone(&shared)))
            }
        };
        self.forwards.insert(key, Forward { targets: shared, task });
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

    /// The connection counter shared by every forward.
    pub fn active(&self) -> Active {
        self.active.clone()
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for f in self.forwards.values() {
            f.task.abort();
        }
    }
}

fn current(targets: &Targets) -> Arc<Vec<SocketAddr>> {
    targets.read().map(|t| Arc::clone(&t)).unwrap_or_default()
}

/// The targets to try for the `n`-th connection: all of them, starting at a rotating one.
async fn pick(targets: &Targets, n: usize) -> Vec<SocketAddr> {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_TARGET;
    loop {
        let t = current(targets);
        if !t.is_empty() || tokio::time::Instant::now() >= deadline {
            let k = n % t.len().max(1);
            return t[k..].iter().chain(&t[..k]).copied().collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn tcp_loop(
    l: TcpListener,
    targets: Targets,
    active: Active,
    conns: skiff_sys::connlimit::ConnCounter,
    idle: Duration,
) {
    let mut n = 0usize;
    loop {
        let Ok((inbound, from)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = conns.try_enter(from.ip()) else {
            drop(inbound);
            continue;
        };
        n = n.wrapping_add(1);
        let (targets, active) = (Arc::clone(&targets), active.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let accepted = tokio::time::Instant::now();
            // A target that refuses (just stopped, not listening yet) is skipped.
            for target in pick(&targets, n).await {
                // Counted from before the connect, so a drain cannot miss one in flight.
                let _guard = active.enter(target.ip());
                // Still a target once counted? An instance is taken off the targets before
                // its drain looks at the count: if it is gone now, its drain may already
                // have passed and its network be on the way out (a connect there would
                // hang, not fail).
                if !current(&targets).contains(&target) {
                    continue;
                }
                let outbound = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%target, error = %e, "published port: target refused");
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(%target, "published port: no answer from the target, trying the next");
                        continue;
                    }
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let connected_ms = accepted.elapsed().as_millis() as u64;
                let (sent, received) = relay(inbound, outbound, idle).await;
                let total_ms = accepted.elapsed().as_millis() as u64;
                tracing::debug!(%from, %target, connected_ms, total_ms, sent, received, "published port: connection ended");
                return;
            }
            tracing::debug!(%from, waited_ms = accepted.elapsed().as_millis() as u64, "published port: no target took the connection");
        });
    }
}

/// Copies from `from` to `to` until EOF or an error, noting when bytes last moved (ms
/// after `start`) and how many were copied (`count`).
async fn copy_half(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    start: tokio::time::Instant,
    last: Arc<std::sync::atomic::AtomicU64>,
    count: Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        count.fetch_add(n as u64, Relaxed);
        last.store(start.elapsed().as_millis() as u64, Relaxed);
    }
    let _ = to.shutdown().await;
}

/// Copies both ways until both sides closed, or until nothing moved for `idle`; the
/// bytes sent from `a` to `b` and back.
async fn relay(a: TcpStream, b: TcpStream, idle: Duration) -> (u64, u64) {
    use std::sync::atomic::AtomicU64;
    let start = tokio::time::Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let both = async {
        tokio::join!(
            copy_half(ar, bw, start, Arc::clone(&last), Arc::clone(&sent)),
            copy_half(br, aw, start, Arc::clone(&last), Arc::clone(&received))
        )
    };
    let watch = async {
        loop {
            let due = start + Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed)) + idle;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    tokio::select! {
        _ = both => {}
        _ = watch => {}
    }
    let read = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    (read(&sent), read(&received))
}

async fn udp_loop(sock: Arc<UdpSocket>, targets: Targets) {
    let mut clients = 0usize;
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
                // Each client sticks to one instance while it is active.
                clients = clients.wrapping_add(1);
                let t = current(&targets);
                let Some(&target) = t.get(clients % t.len().max(1)) else {
                    continue;
                };
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

    /// Publishes a free port forwarding to `targets` (another test may take a free port
    /// between the probe and the bind: then another one).
    async fn publish(p: &mut Proxies, protocol: Protocol, targets: Vec<SocketAddr>) -> u16 {
        for _ in 0..20 {
            let port = free_port();
            if p.ensure(key(port, protocol), targets.clone()).await.is_ok() {
                return port;
            }
        }
        panic!("no free port");
    }

    /// An echo server on loopback; returns its address.
    async fn echo_tcp() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Connects from `src` and says hello: whether the echo came back.
    async fn hello(port: u16, src: [u8; 4]) -> (bool, Option<TcpStream>) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from((src, 0))).unwrap();
        let Ok(mut s) = sock.connect(SocketAddr::from(([127, 0, 0, 1], port))).await else { return (false, None) };
        if s.write_all(b"hi").await.is_err() {
            return (false, None);
        }
        let mut b = [0u8; 2];
        let ok = matches!(tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await, Ok(Ok(_)));
        (ok, Some(s))
    }

    /// A flood from one address gets its share of a published port; others still connect,
    /// and a connection that goes quiet is closed.
    #[tokio::test]
    async fn a_flood_from_one_address_takes_only_its_share() {
        let target = echo_tcp().await;
        let limits = skiff_sys::connlimit::ConnLimits { total: 10, per_ip: 3, rate_per_ip: None };
        let mut p = Proxies::new(limits).with_idle(Duration::from_millis(500));
        let port = publish(&mut p, Protocol::Tcp, vec![target]).await;
        let mut held = vec![];
        let mut served = 0;
        for _ in 0..8 {
            let (ok, s) = hello(port, [127, 0, 0, 2]).await;
            served += ok as usize;
            held.extend(s);
        }
        assert_eq!(served, 3, "three from 127.0.0.2, the rest closed at once");
        assert!(hello(port, [127, 0, 0, 1]).await.0, "another address still gets in");
        // The flood goes quiet: closed after the idle time, its slots free again.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let mut closed = 0;
        for s in &mut held {
            let mut b = [0u8; 1];
            if matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        assert_eq!(closed, held.len(), "idle connections closed");
        assert!(hello(port, [127, 0, 0, 2]).await.0);
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
        let mut p = Proxies::default();
        let port = publish(&mut p, Protocol::Udp, vec![target]).await;
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
        let mut p = Proxies::default();
        let port = publish(&mut p, Protocol::Tcp, vec![target]).await;
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        // Another program holding a port: publishing on it is refused, not shared.
        p.retain(&[]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let program = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let mut other = Proxies::default();
        assert!(other.ensure(key(port, Protocol::Tcp), vec![target]).await.is_err(), "bind conflict is reported");
        drop(program);
        assert!(other.ensure(key(port, Protocol::Tcp), vec![target]).await.is_ok(), "port released");
    }

    /// A server on 127.0.0.<n> that answers every connection with `name` and closes.
    async fn named(n: u8, name: &'static str) -> SocketAddr {
        let l = TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, n), 0)).await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(name.as_bytes()).await;
            }
        });
        a
    }

    async fn ask(port: u16) -> String {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out)).await.unwrap().unwrap();
        out
    }

    #[tokio::test]
    async fn balances_skips_refusing_targets_and_switches_at_once() {
        let (a, b) = (named(2, "a").await, named(3, "b").await);
        let mut p = Proxies::default();
        let port = publish(&mut p, Protocol::Tcp, vec![a, b]).await;
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..6 {
            *seen.entry(ask(port).await).or_insert(0) += 1;
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [("a".to_string(), 3), ("b".to_string(), 3)]);

        // A target that refuses is passed over for the next one.
        let dead = std::net::TcpListener::bind("127.0.0.4:0").unwrap().local_addr().unwrap();
        p.ensure(key(port, Protocol::Tcp), vec![dead, b]).await.unwrap();
        for _ in 0..4 {
            assert_eq!(ask(port).await, "b");
        }
        // The same socket keeps listening while its targets change.
        p.ensure(key(port, Protocol::Tcp), vec![a]).await.unwrap();
        assert_eq!(ask(port).await, "a");

        // With no target, a connection waits for one instead of failing.
        p.ensure(key(port, Protocol::Tcp), vec![]).await.unwrap();
        let waiting = tokio::spawn(ask(port));
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.ensure(key(port, Protocol::Tcp), vec![b]).await.unwrap();
        assert_eq!(waiting.await.unwrap(), "b");
    }

    #[tokio::test]
    async fn counts_open_connections_per_instance() {
        let l = TcpListener::bind("127.0.0.5:0").await.unwrap();
        let target = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    let _ = s.read(&mut b).await;
                });
            }
        });
        let mut p = Proxies::default();
        let port = publish(&mut p, Protocol::Tcp, vec![target]).await;
        let active = p.active();
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        for _ in 0..100 {
            if active.count(target.ip()) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(active.count(target.ip()), 1);
        c.write_all(b"x").await.unwrap();
        drop(c);
        for _ in 0..100 {
            if active.count(target.ip()) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(active.count(target.ip()), 0);
    }
}
