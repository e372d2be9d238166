//! systemd's readiness protocol (`sd_notify`): a unit of `Type=notify` is started once
//! its process sends `READY=1` in a datagram to the socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` for an abstract socket). Outside systemd it does nothing.
//!
//! The variable is taken out of the environment at start ([`take_from_env`]): a child
//! that inherited it would answer for the service — runc, seeing it, waits for the
//! container itself to say `READY=1` (every start would hang), and would hand systemd
//! the container's pid as the service's.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;

static SOCKET: OnceLock<Option<OsString>> = OnceLock::new();

/// Keeps `$NOTIFY_SOCKET` for this process and removes it from the environment children
/// inherit. Call first thing in `main`, before any thread starts.
pub fn take_from_env() {
    let socket = std::env::var_os("NOTIFY_SOCKET");
    if socket.is_some() {
        std::env::remove_var("NOTIFY_SOCKET");
    }
    let _ = SOCKET.set(socket);
}

fn socket() -> Option<OsString> {
    SOCKET.get_or_init(|| std::env::var_os("NOTIFY_SOCKET")).clone()
}

/// Tells systemd the service is ready; false when not run by systemd.
pub fn ready() -> io::Result<bool> {
    match socket() {
        Some(socket) => send(&socket, "READY=1\n").map(|()| true),
        None => Ok(false),
    }
}

fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn readiness_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        super::send(path.as_os_str(), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("skiff-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        super::send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1\n").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
        assert!(super::send(std::ffi::OsStr::new("/nonexistent/notify"), "READY=1\n").is_err());
    }
}
