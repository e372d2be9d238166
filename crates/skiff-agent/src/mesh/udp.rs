//! UDP through the mesh. An instance's datagrams to a service's `(virtual address, port)`
//! are a *flow* per source address and port, as conntrack sees them: each flow goes to
//! one endpoint (an instance of this node, another node's agent directly, or the hub's
//! relay) and its replies come back from the virtual address. Between agents, and
//! through the relay, a flow rides one stream: each datagram is a 2-byte big-endian
//! length and its bytes ([`skiff_model::mesh::Dial`]). A flow ends after [`FLOW_IDLE`]
//! without a datagram either way, or when its stream ends.

use skiff_model::mesh::DATAGRAM_MAX;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// How long a flow lives without a datagram (conntrack's timeout for a UDP flow that is
/// not a stream).
pub const FLOW_IDLE: Duration = Duration::from_secs(30);

/// How long a write to another agent's stream may wait: a peer that stops reading ends
/// the flow rather than hold it.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// Datagrams a flow holds for its endpoint before it drops more (UDP's own answer to a
/// slow receiver).
pub const FLOW_QUEUE: usize = 64;

/// Where one side of a flow sends its datagrams.
pub enum Sink {
    /// A UDP socket: to the given address, or to the one it is connected to.
    Udp(Arc<UdpSocket>, Option<SocketAddr>),
    /// A stream to another agent or the relay, each datagram framed.
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

impl Sink {
    async fn send(&mut self, d: &[u8]) -> std::io::Result<()> {
        let sent = match self {
            Sink::Udp(s, Some(to)) => s.send_to(d, *to).await.map(drop),
            Sink::Udp(s, None) => s.send(d).await.map(drop),
            Sink::Stream(w) => {
                if d.len() > DATAGRAM_MAX {
                    return Err(std::io::Error::other("a datagram too long"));
                }
                let mut frame = Vec::with_capacity(d.len() + 2);
                frame.extend_from_slice(&(d.len() as u16).to_be_bytes());
                frame.extend_from_slice(d);
                let write = async {
                    w.write_all(&frame).await?;
                    w.flush().await
                };
                tokio::time::timeout(WRITE_WAIT, write).await.map_err(|_| std::io::Error::other("not read"))?
            }
        };
        match sent {
            // A server not there (yet): ICMP's word, as for a datagram sent alone.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => other,
        }
    }
}

/// One side of a flow: the datagrams it sends, and where the other side's go.
pub struct End {
    pub from: mpsc::Receiver<Vec<u8>>,
    pub to: Sink,
}

/// A socket connected to one peer as a flow's side (a reader of its own until the side
/// is dropped).
pub fn socket(sock: UdpSocket) -> End {
    let sock = Arc::new(sock);
    let (tx, from) = mpsc::channel(FLOW_QUEUE);
    let reader = Arc::clone(&sock);
    tokio::spawn(async move {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            let n = tokio::select! {
                r = reader.recv(&mut buf) => r,
                _ = tx.closed() => return,
            };
            match n {
                // Full: dropped, as the kernel drops a datagram for a full buffer.
                Ok(n) => {
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(buf[..n].to_vec()) {
                        return;
                    }
                }
                // A refused datagram (ICMP port unreachable) ends nothing: the server
                // may come back.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(_) => return,
            }
        }
    });
    End { from, to: Sink::Udp(sock, None) }
}

/// A stream carrying framed datagrams as a flow's side.
pub fn stream<S>(s: S) -> End
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, wr) = tokio::io::split(s);
    let (tx, from) = mpsc::channel(FLOW_QUEUE);
    tokio::spawn(async move {
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        loop {
            let frame = async {
                let len = usize::from(rd.read_u16().await?);
                if len > DATAGRAM_MAX {
                    return Err(std::io::Error::other("a datagram too long"));
                }
                rd.read_exact(&mut buf[..len]).await?;
                Ok(len)
            };
            let len = tokio::select! {
                r = frame => r,
                _ = tx.closed() => return,
            };
            // A full queue drops (as a full socket buffer does) rather than stall the
            // stream, which would stall the other side's writes.
            match len {
                Ok(len) => {
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(buf[..len].to_vec()) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    End { from, to: Sink::Stream(Box::new(wr)) }
}

/// A socket connected to one peer as a byte stream of framed datagrams (a flow of its
/// own carries them until it goes idle or the stream is dropped).
pub fn framed(sock: UdpSocket) -> tokio::io::DuplexStream {
    let (near, far) = tokio::io::duplex(DATAGRAM_MAX * 2);
    tokio::spawn(bridge(stream(far), socket(sock)));
    near
}

/// Carries datagrams between two sides until either ends, or neither sends for
/// [`FLOW_IDLE`].
pub async fn bridge(a: End, b: End) {
    bridge_within(a, b, FLOW_IDLE).await;
}

async fn bridge_within(mut a: End, mut b: End, within: Duration) {
    let idle = tokio::time::sleep(within);
    tokio::pin!(idle);
    loop {
        let sent = tokio::select! {
            d = a.from.recv() => match d {
                Some(d) => b.to.send(&d).await,
                None => return,
            },
            d = b.from.recv() => match d {
                Some(d) => a.to.send(&d).await,
                None => return,
            },
            () = &mut idle => return,
        };
        if sent.is_err() {
            return;
        }
        idle.as_mut().reset(tokio::time::Instant::now() + within);
    }
}

/// A UDP socket that may share its port with the node's published ports (both set
/// `SO_REUSEPORT`, which only sockets of the same user may join; the kernel gives each
/// datagram to the most specific address bound).
pub fn bind_beside_services(at: std::net::SocketAddrV4) -> std::io::Result<UdpSocket> {
    let fd = crate::publish::bind_reuseport(at, nix::sys::socket::SockType::Datagram)?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams keep their boundaries through a stream, both ways, and a flow ends when
    /// its stream does.
    #[tokio::test]
    async fn datagrams_cross_a_stream_whole() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = server.local_addr().unwrap();
        let (near, far) = tokio::io::duplex(1 << 16);
        // The far side: the stream to a socket connected to the server.
        let out = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        out.connect(at).await.unwrap();
        let far_side = tokio::spawn(bridge(stream(far), socket(out)));
        // The near side: datagrams in by a channel, replies to a client's socket.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let reply_to = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let (tx, from) = mpsc::channel(8);
        let near_side = tokio::spawn(bridge(
            End { from, to: Sink::Udp(reply_to, Some(client.local_addr().unwrap())) },
            stream(near),
        ));
        let big = vec![7u8; 60_000];
        for d in [b"one".to_vec(), Vec::new(), big.clone()] {
            tx.send(d).await.unwrap();
        }
        let mut buf = vec![0u8; DATAGRAM_MAX];
        let mut got = vec![];
        for _ in 0..3 {
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            got.push(buf[..n].to_vec());
            server.send_to(&buf[..n.min(5)], from).await.unwrap();
        }
        assert_eq!(got, [b"one".to_vec(), Vec::new(), big]);
        for want in [&b"one"[..], b"", &[7u8; 5]] {
            let n = client.recv(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], want);
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), near_side).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), far_side).await.unwrap().unwrap();
    }

    /// A flow with nothing to carry ends by itself, its stream closed behind it.
    #[tokio::test]
    async fn an_idle_flow_ends() {
        let (_tx, from) = mpsc::channel(1);
        let (near, mut far) = tokio::io::duplex(64);
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let within = Duration::from_millis(200);
        let flow = tokio::spawn(bridge_within(End { from, to: Sink::Udp(sock, None) }, stream(near), within));
        tokio::time::timeout(Duration::from_secs(10), flow).await.unwrap().unwrap();
        let mut rest = vec![];
        let read = tokio::time::timeout(Duration::from_secs(10), far.read_to_end(&mut rest)).await.unwrap();
        assert_eq!(read.unwrap(), 0, "the far side sees the end");
    }
}
