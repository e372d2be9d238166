//! Process events from the kernel without polling: the netlink process connector
//! (`NETLINK_CONNECTOR`, `CN_IDX_PROC`), which reports every `execve` on the host as it
//! happens. Needs CAP_NET_ADMIN (root).

use netlink_sys::{protocols::NETLINK_CONNECTOR, Socket, SocketAddr};

const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const NLMSG_DONE: u16 = 3;
/// nlmsghdr (16) + cn_msg (20): where the proc_event starts.
const EVENT_AT: usize = 36;

/// One event the detector cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// Process `tgid` (its thread `pid`) started a new program.
    Exec { pid: i32, tgid: i32 },
}

pub struct ProcEvents {
    sock: Socket,
    buf: Vec<u8>,
}

impl ProcEvents {
    /// Subscribes to the host's process events.
    pub fn open() -> std::io::Result<Self> {
        let mut sock = Socket::new(NETLINK_CONNECTOR)?;
        sock.bind(&SocketAddr::new(0, CN_IDX_PROC))?;
        sock.send(&listen_message(std::process::id()), 0)?;
        // A burst of execs must not overflow the socket between two reads. SO_RCVBUF is
        // capped by net.core.rmem_max (often 208 KiB, where every fork and exit of the host
        // also arrives); root may force it past that.
        let _ = sock.set_rx_buf_sz(4 << 20);
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &(4 << 20));
        Ok(ProcEvents { sock, buf: Vec::with_capacity(64 << 10) })
    }

    /// Blocks until the kernel sends events; returns those of interest (none for others).
    /// A receive buffer overrun (events lost) is `Err` with `ENOBUFS`: the caller counts
    /// it and reads on.
    pub fn recv(&mut self) -> std::io::Result<Vec<ProcEvent>> {
        self.buf.clear();
        let n = self.sock.recv(&mut self.buf, 0)?;
        Ok(parse(&self.buf[..n.min(self.buf.len())]))
    }
}

impl std::os::fd::AsFd for ProcEvents {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// `PROC_CN_MCAST_LISTEN` in a cn_msg in a netlink message from port `port`.
fn listen_message(port: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes()); // nlmsg_type
    m.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
    m.extend_from_slice(&port.to_ne_bytes()); // nlmsg_pid
    m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes()); // cb_id.idx
    m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes()); // cb_id.val
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // ack
    m.extend_from_slice(&4u16.to_ne_bytes()); // len
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    m
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// The exec events of one datagram (it may hold several netlink messages).
fn parse(mut b: &[u8]) -> Vec<ProcEvent> {
    let mut out = vec![];
    while let Some(len) = u32_at(b, 0).map(|l| l as usize) {
        if len < EVENT_AT + 24 || len > b.len() {
            break;
        }
        let ev = &b[EVENT_AT..len];
        if u32_at(ev, 0) == Some(PROC_EVENT_EXEC) {
            if let (Some(pid), Some(tgid)) = (u32_at(ev, 16), u32_at(ev, 20)) {
                out.push(ProcEvent::Exec { pid: pid as i32, tgid: tgid as i32 });
            }
        }
        // Netlink messages are 4-byte aligned.
        b = &b[(len + 3) & !3..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(what: u32, pid: u32, tgid: u32) -> Vec<u8> {
        let mut m = vec![0u8; 16 + 20 + 24];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[36..40].copy_from_slice(&what.to_ne_bytes());
        m[52..56].copy_from_slice(&pid.to_ne_bytes());
        m[56..60].copy_from_slice(&tgid.to_ne_bytes());
        m
    }

    #[test]
    fn exec_events_are_read_and_others_skipped() {
        let mut b = event(PROC_EVENT_EXEC, 42, 40);
        b.extend(event(0x8000_0000, 7, 7)); // exit
        b.extend(event(PROC_EVENT_EXEC, 9, 9));
        assert_eq!(parse(&b), [ProcEvent::Exec { pid: 42, tgid: 40 }, ProcEvent::Exec { pid: 9, tgid: 9 }]);
        assert!(parse(&b[..30]).is_empty(), "a short datagram");
        assert_eq!(listen_message(5).len(), 40);
    }
}
