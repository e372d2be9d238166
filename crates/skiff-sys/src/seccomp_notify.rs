//! Seccomp user notifications (`SCMP_ACT_NOTIFY`): a container's filter hands the calls
//! it names to a listener instead of answering them itself. runc sends the listener's
//! descriptor over the profile's `listenerPath` socket (with the container's state as
//! JSON); the listener receives each call and answers it — here always with an error, so
//! a notified call is refused exactly as `SCMP_ACT_ERRNO` would, and is also seen.
//!
//! The two ioctls are the only `unsafe` in this crate: neither rustix nor nix wraps them.
//! Answering only ever refuses (never `SECCOMP_USER_NOTIF_FLAG_CONTINUE`), so nothing here
//! depends on the caller's memory, and a call whose caller has died is simply skipped.
#![allow(unsafe_code)]

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A call waiting for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// The kernel's cookie for the answer.
    pub id: u64,
    /// The caller (in the listener's PID namespace).
    pub pid: u32,
    /// The system call's number, for `arch` (`AUDIT_ARCH_*`).
    pub nr: i32,
    pub arch: u32,
}

/// Whether this kernel hands calls to a listener as this module needs: user notification
/// itself (Linux 5.0, probed with `SECCOMP_GET_NOTIF_SIZES`) and a filter's descriptor
/// hanging up once its processes are gone (Linux 5.8; before, each `exec`'s filter would
/// be kept for ever).
pub fn supported() -> bool {
    let release = rustix::system::uname().release().to_string_lossy().into_owned();
    let mut v = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) < (5, 8) {
        return false;
    }
    let mut sizes = libc::seccomp_notif_sizes { seccomp_notif: 0, seccomp_notif_resp: 0, seccomp_data: 0 };
    // SAFETY: SECCOMP_GET_NOTIF_SIZES writes one `struct seccomp_notif_sizes` into the
    // structure pointed at, which lives on this frame for the whole call.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_NOTIF_SIZES, 0, &mut sizes as *mut libc::seccomp_notif_sizes)
    };
    // The kernel's structures must not be larger than the ones this code passes.
    rc == 0
        && usize::from(sizes.seccomp_notif) <= std::mem::size_of::<libc::seccomp_notif>()
        && usize::from(sizes.seccomp_notif_resp) <= std::mem::size_of::<libc::seccomp_notif_resp>()
}

fn skipped(e: &std::io::Error) -> bool {
    // ENOENT: the caller died (or was interrupted) before the call was read or answered.
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINTR))
}

/// The next call waiting on the notification descriptor `fd` (which must be readable);
/// `None` when its caller went away meanwhile.
pub fn receive(fd: BorrowedFd<'_>) -> std::io::Result<Option<Call>> {
    // The kernel wants the structure zeroed.
    let mut n = libc::seccomp_notif {
        id: 0,
        pid: 0,
        flags: 0,
        data: libc::seccomp_data { nr: 0, arch: 0, instruction_pointer: 0, args: [0; 6] },
    };
    // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes one `struct seccomp_notif` (the layout libc
    // declares, as the ioctl number encodes) into the structure pointed at, which lives on
    // this frame for the whole call; `fd` is an open descriptor borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n as *mut libc::seccomp_notif) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return if skipped(&e) { Ok(None) } else { Err(e) };
    }
    Ok(Some(Call { id: n.id, pid: n.pid, nr: n.data.nr, arch: n.data.arch }))
}

/// Answers the call `id` on `fd` with the error `errno` (as the filter's `SCMP_ACT_ERRNO`
/// would). A caller that died meanwhile is no error.
pub fn refuse(fd: BorrowedFd<'_>, id: u64, errno: i32) -> std::io::Result<()> {
    let mut r = libc::seccomp_notif_resp { id, val: 0, error: -errno, flags: 0 };
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one `struct seccomp_notif_resp` from the
    // structure pointed at, which lives on this frame for the whole call; `fd` is an open
    // descriptor borrowed for the call. Only an error is answered: the call is not run.
    let rc =
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut r as *mut libc::seccomp_notif_resp) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if !skipped(&e) {
            return Err(e);
        }
    }
    Ok(())
}

/// What runc sends to a `listenerPath`: the container's state (JSON, at most 64 KiB, in
/// the same message) and the notification descriptor. `stream` should have a read timeout.
pub fn receive_listener(stream: &mut UnixStream) -> std::io::Result<(Vec<u8>, OwnedFd)> {
    let mut buf = vec![0u8; 64 << 10];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        stream.as_fd(),
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for m in control.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    // runc sends the state and the descriptor in one message, and may keep the
    // connection open after it: nothing more is waited for.
    let got = msg.bytes;
    buf.truncate(got);
    let fd = fd.ok_or_else(|| std::io::Error::other("the listener's message carried no descriptor"))?;
    Ok((buf, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_and_its_message_are_received() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let fds = [f.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        let body = br#"{"fds":["seccompFd"],"state":{"id":"c1"}}"#;
        rustix::net::sendmsg(&b, &[std::io::IoSlice::new(body)], &mut control, rustix::net::SendFlags::empty())
            .unwrap();
        drop(b);
        let (msg, fd) = receive_listener(&mut a).unwrap();
        assert_eq!(msg, body);
        assert!(rustix::fs::fstat(&fd).is_ok());

        // No descriptor: an error, not a hang.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut b, b"{}").unwrap();
        drop(b);
        assert!(receive_listener(&mut a).unwrap_err().to_string().contains("no descriptor"));
    }

    #[test]
    fn this_kernel_is_probed() {
        // This machine's kernel (6.x) has user notification; the probe must say so.
        let release = rustix::system::uname().release().to_string_lossy().into_owned();
        if release.starts_with("6.") {
            assert!(supported(), "{release}");
        }
    }

    #[test]
    fn a_descriptor_that_is_no_listener_is_an_error() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(receive(f.as_fd()).is_err());
        assert!(refuse(f.as_fd(), 1, libc::EPERM).is_err());
    }
}
