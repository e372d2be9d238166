//! A netlink multicast group read without blocking, a batch at a time: what the threat
//! detector's kernel sources have in common (audit records, connection tracking).

use netlink_sys::{Socket, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};

/// At most this many events are taken from one source at a time, so that a steady
/// producer on one source does not starve the others.
pub const BATCH: usize = 256;

pub struct Multicast {
    sock: Socket,
    buf: Vec<u8>,
}

impl Multicast {
    /// Joins group number `group` (1-based) of netlink `protocol`, with a receive buffer
    /// of `rx_buf` bytes for bursts.
    pub fn join(protocol: isize, group: u32, rx_buf: usize) -> std::io::Result<Self> {
        let mut sock = Socket::new(protocol)?;
        sock.bind(&SocketAddr::new(0, 1 << (group - 1)))?;
        let _ = sock.set_rx_buf_sz(rx_buf);
        sock.set_non_blocking(true)?;
        Ok(Multicast { sock, buf: Vec::with_capacity(64 << 10) })
    }

    /// What `parse` finds in the datagrams waiting, at most [`BATCH`] (and what the last
    /// datagram held); none when nothing waits. A receive buffer overrun (events lost) is
    /// `Err` with `ENOBUFS`.
    pub fn drain<T, I: IntoIterator<Item = T>>(&mut self, parse: impl Fn(&[u8]) -> I) -> std::io::Result<Vec<T>> {
        let mut out = vec![];
        while out.len() < BATCH {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(n) => out.extend(parse(&self.buf[..n.min(self.buf.len())])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

impl AsFd for Multicast {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
