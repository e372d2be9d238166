//! systemd's readiness protocol (`sd_notify`): a unit of `Type=notify` is started once
//! its process sends `READY=1` in a datagram to the socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` for an abstract socket). Outside systemd it does nothing.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Tells systemd the service is ready; false when not run by systemd.
pub fn ready() -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => send(&socket, "READY=1\n").map(|()| true),
        None => Ok(false),
    }
}

/// Tells systemd the service is stopping.
pub fn stopping() -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => send(&socket, "STOPPING=1\n").map(|()| true),
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
