//! Pseudo-terminals: the pair an interactive exec runs on (`skiff exec -it`), its window
//! size, and raw mode for the CLI's own terminal while a remote one is in use.

use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{OptionalActions, Termios, Winsize};
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// A terminal: the side a program reads and writes as its terminal (`slave`), and the
/// side that stands for the keyboard and screen (`master`).
pub struct Pair {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// A new terminal of `cols` × `rows` (neither end is anyone's controlling terminal, and
/// neither is inherited by a child unless given as its stdio).
pub fn open(cols: u16, rows: u16) -> io::Result<Pair> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(name.as_c_str(), OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty())?;
    resize(&master, cols, rows)?;
    Ok(Pair { master, slave })
}

/// Sets a terminal's window size (the kernel tells its foreground process group).
pub fn resize(fd: impl AsFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    Ok(rustix::termios::tcsetwinsize(fd, ws)?)
}

/// Makes reads and writes of `fd` return at once instead of waiting (for an event loop).
pub fn nonblocking(fd: impl AsFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    Ok(rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?)
}

/// Receives the file descriptor a process sent over `socket` (`SCM_RIGHTS`), as runc
/// sends a container's terminal to its `--console-socket`. The bytes sent with it (the
/// terminal's name) are discarded.
pub fn recv_fd(socket: impl AsFd) -> io::Result<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut name = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut name)];
    rustix::net::recvmsg(&socket, &mut iov, &mut ancillary, RecvFlags::CMSG_CLOEXEC)?;
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "no file descriptor came with the message"))
}

/// A terminal's window size as (columns, rows); `None` when `fd` is not a terminal.
pub fn size(fd: impl AsFd) -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    Some((ws.ws_col, ws.ws_row))
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: impl AsFd) -> bool {
    rustix::termios::isatty(fd)
}

/// The process's standard input in raw mode (every key as typed, no echo, no signals from
/// Ctrl-C: the remote terminal does that), restored when dropped.
pub struct RawStdin {
    saved: Termios,
}

impl RawStdin {
    /// `None` when standard input is not a terminal (nothing to change).
    pub fn enter() -> io::Result<Option<RawStdin>> {
        let stdin = io::stdin();
        if !is_terminal(&stdin) {
            return Ok(None);
        }
        let saved = rustix::termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(Some(RawStdin { saved }))
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(io::stdin(), OptionalActions::Now, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    #[test]
    fn a_pair_carries_bytes_and_its_size() {
        let p = super::open(100, 40).unwrap();
        assert_eq!(super::size(&p.slave), Some((100, 40)));
        assert!(super::is_terminal(&p.slave));
        super::resize(&p.master, 120, 50).unwrap();
        assert_eq!(super::size(&p.slave), Some((120, 50)));
        let mut master = std::fs::File::from(p.master);
        let mut slave = std::fs::File::from(p.slave);
        slave.write_all(b"hi\n").unwrap();
        let mut buf = [0u8; 16];
        let n = master.read(&mut buf).unwrap();
        // The line discipline turns "\n" into "\r\n" on the way out.
        assert_eq!(&buf[..n], b"hi\r\n");
        let f = tempfile::tempfile().unwrap();
        assert!(!super::is_terminal(&f));
        assert_eq!(super::size(&f), None);
    }

    #[test]
    fn a_terminal_passes_over_a_socket() {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        use std::os::fd::AsFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = super::open(90, 30).unwrap();
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        let fds = [p.master.as_fd()];
        assert!(ancillary.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(&a, &[std::io::IoSlice::new(b"/dev/pts/9")], &mut ancillary, SendFlags::empty()).unwrap();
        let got = super::recv_fd(&b).unwrap();
        assert_eq!(super::size(&got), Some((90, 30)));
        // Nothing sent with it: a clear error, not a hang (the writer closed).
        drop(a);
        assert!(super::recv_fd(&b).is_err());
    }
}
