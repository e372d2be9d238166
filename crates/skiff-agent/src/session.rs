//! Interactive exec (`skiff exec -i/-t`): a command in an instance whose standard streams
//! are passed on as they come — on a terminal made for it when asked, as `docker exec -it`.
//!
//! With a terminal, `runc exec --tty` runs on one end of a pseudo-terminal the agent made
//! (runc makes the container's own terminal and copies between the two, passing on our
//! end's size at the start and on SIGWINCH); the agent reads and writes the other end.
//! Without one, the command's stdin, stdout and stderr are pipes.
//!
//! The caller holds the two channels. The command's end (its exit code) is the last
//! output, after every byte it wrote; a caller that drops the output channel ends the
//! command (it is killed, as a terminal hung up).

use crate::{blocking, Agent, AgentError};
use skiff_model::proto::{SessionInput, SessionOutput, SessionSpec, INPUT_WINDOW};
use skiff_model::Protocol;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The most bytes one output piece carries.
const OUTPUT_CHUNK: usize = 32 * 1024;

/// How long output is still read after the command ended (a background child of it may
/// hold its pipes open for ever).
const DRAIN: Duration = Duration::from_secs(2);

/// The two ends a caller holds: input in, output (then the exit code) out.
pub type Session = (mpsc::Sender<SessionInput>, mpsc::Receiver<SessionOutput>);

impl Agent {
    /// Starts `spec.argv` in `instance` and returns its channels at once.
    pub async fn exec_session(&self, instance: &str, spec: SessionSpec) -> Result<Session, AgentError> {
        spec.validate().map_err(AgentError::Other)?;
        if spec.attach {
            return self.attach_session(instance, &spec).await;
        }
        let row = self.running_row(instance)?;
        let rt = self.runtimes.of(row.spec.runtime);
        let tag = skiff_sys::random::hex(8).map_err(|e| AgentError::Other(format!("random: {e}")))?;
        let pid_file = rt.instance_dir(&row.container_id).join(format!("exec-{tag}.pid"));
        let io_err = |e: std::io::Error| AgentError::Other(format!("making the exec's terminal: {e}"));
        let (cols, rows) = spec.size();
        let (stdio, master) = if spec.tty {
            let pair = skiff_sys::pty::open(cols, rows).map_err(io_err)?;
            skiff_sys::pty::nonblocking(&pair.master).map_err(io_err)?;
            let (a, b) = (pair.slave.try_clone().map_err(io_err)?, pair.slave.try_clone().map_err(io_err)?);
            ([Stdio::from(a), Stdio::from(b), Stdio::from(pair.slave)], Some(pair.master))
        } else {
            let stdin = if spec.stdin { Stdio::piped() } else { Stdio::null() };
            ([stdin, Stdio::piped(), Stdio::piped()], None)
        };
        let (id, argv, tty, pf) = (row.container_id.clone(), spec.argv.clone(), spec.tty, pid_file.clone());
        let mut child = blocking(move || rt.exec_spawn(&id, &argv, tty, &pf, stdio)).await?;
        // Signals go through a pidfd: never to a later process given runc's pid number.
        let runc = skiff_sys::pidfd::open(child.id() as i32).ok().map(std::sync::Arc::new);
        tracing::info!(instance, tty = spec.tty, stdin = spec.stdin, "exec session started");

        let (out_tx, out_rx) = mpsc::channel::<SessionOutput>(64);
        let (in_tx, in_rx) = mpsc::channel::<SessionInput>(INPUT_WINDOW as usize);
        let mut readers = vec![];
        // Set once the command ended: output still unread is read until it stays quiet.
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        let writer: Option<Box<dyn AsyncWrite + Send + Unpin>>;
        let mut resize_fd: Option<OwnedFd> = None;
        let spawn_err = |e: std::io::Error| AgentError::Other(format!("reading the exec's output: {e}"));
        match master {
            Some(m) => {
                let reader =
                    tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(m.try_clone().map_err(spawn_err)?)
                        .map_err(spawn_err)?;
                readers.push(tokio::spawn(pass_on(reader, out_tx.clone(), SessionOutput::Stdout, exited.clone())));
                resize_fd = Some(m.try_clone().map_err(spawn_err)?);
                writer = if spec.stdin {
                    Some(Box::new(tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(m).map_err(spawn_err)?))
                } else {
                    None
                };
            }
            None => {
                if let Some(o) = child.stdout.take() {
                    let o = tokio::process::ChildStdout::from_std(o).map_err(spawn_err)?;
                    readers.push(tokio::spawn(pass_on(o, out_tx.clone(), SessionOutput::Stdout, exited.clone())));
                }
                if let Some(e) = child.stderr.take() {
                    let e = tokio::process::ChildStderr::from_std(e).map_err(spawn_err)?;
                    readers.push(tokio::spawn(pass_on(e, out_tx.clone(), SessionOutput::Stderr, exited.clone())));
                }
                writer = match child.stdin.take() {
                    Some(i) => Some(Box::new(tokio::process::ChildStdin::from_std(i).map_err(spawn_err)?)),
                    None => None,
                };
            }
        }
        tokio::spawn(feed(in_rx, writer, resize_fd, runc.clone()));
        let container = row.container_id.clone();
        tokio::spawn(async move {
            let mut waiting = tokio::task::spawn_blocking(move || child.wait());
            let status = tokio::select! {
                biased;
                s = &mut waiting => s,
                _ = out_tx.closed() => {
                    // The caller is gone: end the command as a hung-up terminal would.
                    kill_exec(&pid_file, &container, runc.as_deref()).await;
                    waiting.await
                }
            };
            let _ = exited_tx.send(true);
            let code = match status {
                Ok(Ok(s)) => {
                    use std::os::unix::process::ExitStatusExt;
                    Ok(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
                }
                Ok(Err(e)) => Err(format!("waiting for the exec: {e}")),
                Err(e) => Err(format!("waiting for the exec: {e}")),
            };
            // Every byte it wrote, then its end (the readers stop once nothing more comes).
            for r in readers {
                let _ = r.await;
            }
            let _ = std::fs::remove_file(&pid_file);
            let last = match code {
                Ok(c) => SessionOutput::Exit(c),
                Err(e) => SessionOutput::Error(e),
            };
            let _ = out_tx.send(last).await;
        });
        Ok((in_tx, out_rx))
    }
}

impl Agent {
    /// Attaches to `instance`'s own process through its shim (see
    /// `skiff_runtime::attach`): its output from now on (with `replay`, what the shim kept
    /// from before first); input and window sizes to its terminal or stdin (the shim drops
    /// input unless it was started with `stdin_open`). The session ends with the
    /// instance's exit code when it ends; a caller that leaves only detaches.
    async fn attach_session(&self, instance: &str, spec: &SessionSpec) -> Result<Session, AgentError> {
        use skiff_runtime::attach::{self, ATTACH_SOCKET, HELLO_REPLAY, IN_CLOSE, IN_DATA, IN_HELLO, IN_RESIZE};
        use skiff_runtime::attach::{OUT_EXIT, OUT_STDERR};
        let row = self.running_row(instance)?;
        if !row.spec.runtime.is_container() {
            return Err(AgentError::Other(format!(
                "instance {instance} is a WebAssembly program: it has no terminal or stdin to attach to \
                 (its output: skiff logs -f {instance})"
            )));
        }
        let dir = self.runtimes.of(row.spec.runtime).instance_dir(&row.container_id);
        let failed = |e: std::io::Error| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    " (it has just ended, or was started by an older skiff: it takes attachments once restarted)"
                }
                _ => "",
            };
            AgentError::Other(format!("attaching to {instance}: {e}{hint}"))
        };
        let d = dir.clone();
        let (guard, path) =
            blocking(move || attach::socket_path(&d, ATTACH_SOCKET, std::process::id())).await.map_err(failed)?;
        let conn = tokio::net::UnixStream::connect(&path).await.map_err(failed)?;
        drop(guard);
        tracing::info!(instance, tty = row.spec.tty, stdin = row.spec.stdin_open, "attached");
        let (mut from, mut to) = conn.into_split();
        let flags = if spec.replay { HELLO_REPLAY } else { 0 };
        send_frame(&mut to, IN_HELLO, &[flags]).await.map_err(failed)?;
        // Only a caller on a terminal sizes the container's (a script that watches must
        // not shrink a person's).
        if spec.tty && row.spec.tty && spec.cols > 0 && spec.rows > 0 {
            send_frame(&mut to, IN_RESIZE, &attach::resize_bytes(spec.cols, spec.rows)).await.map_err(failed)?;
        }
        let (out_tx, out_rx) = mpsc::channel::<SessionOutput>(64);
        let (in_tx, mut in_rx) = mpsc::channel::<SessionInput>(INPUT_WINDOW as usize);
        let caller = out_tx.clone();
        tokio::spawn(async move {
            let last = loop {
                let frame = tokio::select! {
                    f = next_frame(&mut from) => f,
                    // The caller left: detach (the instance runs on).
                    _ = out_tx.closed() => return,
                };
                match frame {
                    Ok(Some((OUT_EXIT, code))) => match attach::exit_code(&code) {
                        Some(c) => break SessionOutput::Exit(c),
                        None => break SessionOutput::Error("the shim sent a malformed exit".into()),
                    },
                    Ok(Some((kind, data))) => {
                        for piece in data.chunks(OUTPUT_CHUNK) {
                            let out = if kind == OUT_STDERR { SessionOutput::Stderr } else { SessionOutput::Stdout };
                            if out_tx.send(out(piece.to_vec())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        // No exit frame: a shim from before them, or this one fell behind
                        // and was cut off. The exit file says which, if it comes.
                        let d = dir.clone();
                        let exit = blocking(move || {
                            (0..20).find_map(|_| {
                                let e = skiff_runtime::shim::recorded_exit(&d);
                                if e.is_none() {
                                    std::thread::sleep(Duration::from_millis(100));
                                }
                                e
                            })
                        })
                        .await;
                        break match exit {
                            Some(e) => SessionOutput::Exit(e.code),
                            None => SessionOutput::Error(
                                "the attachment ended before the instance did: it fell behind the instance's \
                                 output (the instance runs on)"
                                    .into(),
                            ),
                        };
                    }
                }
            };
            let _ = out_tx.send(last).await;
        });
        let stdin_once = spec.stdin_once;
        tokio::spawn(async move {
            while let Some(i) = in_rx.recv().await {
                let sent = match i {
                    // A write that can go now goes, though the caller has just left (the
                    // keys typed before a detach); one the instance does not take does not
                    // outlive the caller.
                    SessionInput::Data(b) => tokio::select! {
                        biased;
                        r = send_frame(&mut to, IN_DATA, &b) => r,
                        _ = caller.closed() => return,
                    },
                    SessionInput::Resize { cols, rows } => {
                        send_frame(&mut to, IN_RESIZE, &attach::resize_bytes(cols, rows)).await
                    }
                    // As `docker run -i`: the end of this input is the end of the
                    // instance's; a plain attach leaves it open for the next one.
                    SessionInput::End if stdin_once => send_frame(&mut to, IN_CLOSE, &[]).await,
                    SessionInput::End => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Ok((in_tx, out_rx))
    }

    /// A TCP connection to `port` inside `instance`, as `kubectl port-forward` makes: to
    /// 127.0.0.1 in the instance's own network namespace, so a server listening only on
    /// its loopback is reached, whatever the network mode (a gVisor sandbox, whose
    /// loopback is its own, at its address). Output is what the instance sends; input
    /// goes to it; the end of input shuts the sending side; the session ends (exit 0)
    /// when the instance closes the connection, or when the caller leaves.
    ///
    /// UDP (the mesh's relay): a socket connected to the port the same way, its datagrams
    /// framed in both streams as between agents; the session ends after half a minute
    /// without one ([`crate::mesh::udp`]).
    pub async fn connect_session(&self, instance: &str, port: u16, protocol: Protocol) -> Result<Session, AgentError> {
        if port == 0 {
            return Err(AgentError::Other("port: must be 1 to 65535".into()));
        }
        let row = self.running_row(instance)?;
        let pid = row.pid.ok_or_else(|| AgentError::Other(format!("instance {instance} has no process")))?;
        let sandbox_ip = (row.spec.runtime == skiff_model::RuntimeKind::Runsc).then(|| row.ip.clone()).flatten();
        let connected = blocking(move || -> std::io::Result<Connected> {
            let wait = Duration::from_secs(10);
            let to = match &sandbox_ip {
                Some(ip) => std::net::SocketAddr::new(ip.parse().map_err(std::io::Error::other)?, port),
                None => std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
            };
            let open = move || match protocol {
                Protocol::Tcp => std::net::TcpStream::connect_timeout(&to, wait).map(Connected::Tcp),
                Protocol::Udp => {
                    let s = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
                    s.connect(to)?;
                    Ok(Connected::Udp(s))
                }
            };
            if sandbox_ip.is_some() {
                return open();
            }
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
            skiff_runtime::netlink::on_thread_in(&ns, open)?
        })
        .await
        .and_then(Connected::stream)
        .map_err(|e| AgentError::Other(format!("connecting to port {port} in {instance}: {e}")))?;
        tracing::info!(instance, port, ?protocol, "port-forward connection");
        let (mut from, mut to) = tokio::io::split(connected);
        let (out_tx, out_rx) = mpsc::channel::<SessionOutput>(64);
        let (in_tx, mut in_rx) = mpsc::channel::<SessionInput>(INPUT_WINDOW as usize);
        let caller = out_tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            let end = loop {
                let n = tokio::select! {
                    r = from.read(&mut buf) => r,
                    // The caller left: the connection goes with it.
                    _ = out_tx.closed() => return,
                };
                match n {
                    Ok(0) => break SessionOutput::Exit(0),
                    Ok(n) => {
                        if out_tx.send(SessionOutput::Stdout(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => break SessionOutput::Error(format!("the connection to port {port}: {e}")),
                }
            };
            let _ = out_tx.send(end).await;
        });
        tokio::spawn(async move {
            while let Some(i) = in_rx.recv().await {
                match i {
                    SessionInput::Data(b) => {
                        // A server that stops reading holds this write: the caller leaving
                        // ends it (and the connection) all the same.
                        tokio::select! {
                            r = to.write_all(&b) => if r.is_err() { return },
                            _ = caller.closed() => return,
                        }
                    }
                    SessionInput::End => {
                        let _ = to.shutdown().await;
                        return;
                    }
                    SessionInput::Resize { .. } => {}
                }
            }
        });
        Ok((in_tx, out_rx))
    }
}

/// A connection made inside an instance's network namespace.
enum Connected {
    Tcp(std::net::TcpStream),
    Udp(std::net::UdpSocket),
}

impl Connected {
    /// As a byte stream: a UDP socket's datagrams framed (each carried by a flow of
    /// its own until it goes idle).
    fn stream(self) -> std::io::Result<Box<dyn Stream>> {
        match self {
            Connected::Tcp(s) => {
                s.set_nonblocking(true)?;
                Ok(Box::new(tokio::net::TcpStream::from_std(s)?))
            }
            Connected::Udp(s) => {
                s.set_nonblocking(true)?;
                Ok(Box::new(crate::mesh::udp::framed(tokio::net::UdpSocket::from_std(s)?)))
            }
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// One frame to an instance's shim (see `skiff_runtime::attach`).
async fn send_frame(to: &mut (impl AsyncWrite + Unpin), kind: u8, data: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(data.len() + 5);
    skiff_runtime::attach::write_frame(&mut frame, kind, data)?;
    to.write_all(&frame).await
}

/// The next frame from an instance's shim; `None` at the end.
async fn next_frame(from: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match from.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (kind, len) = skiff_runtime::attach::frame_head(&head)?;
    let mut data = vec![0u8; len];
    from.read_exact(&mut data).await?;
    Ok(Some((kind, data)))
}

/// Copies one output stream into the session's channel until it ends (a terminal's end
/// reads EIO once nothing holds the other end) or, after the command `exited`, stays quiet
/// for [`DRAIN`] (a background child of it may hold its pipes open for ever). Waiting for
/// room in the channel is never cut short: a slow caller gets every byte.
async fn pass_on<R: AsyncRead + Unpin>(
    mut from: R,
    to: mpsc::Sender<SessionOutput>,
    wrap: fn(Vec<u8>) -> SessionOutput,
    mut exited: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut ended = false;
    loop {
        ended = ended || *exited.borrow();
        let read = if ended {
            match tokio::time::timeout(DRAIN, from.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = from.read(&mut buf) => r,
                changed = exited.changed() => {
                    // A sender gone counts as the end too.
                    ended = changed.is_err();
                    continue;
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send(wrap(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Passes the caller's input on: bytes to the command's stdin (when it has one), a new
/// size to the terminal (and SIGWINCH to runc, which passes it on), the end of input as
/// a closed pipe.
async fn feed(
    mut input: mpsc::Receiver<SessionInput>,
    mut writer: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    terminal: Option<OwnedFd>,
    runc: Option<std::sync::Arc<OwnedFd>>,
) {
    while let Some(i) = input.recv().await {
        match i {
            SessionInput::Data(bytes) => {
                let Some(w) = writer.as_mut() else { continue };
                if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
                    writer = None;
                }
            }
            SessionInput::Resize { cols, rows } => {
                let Some(t) = terminal.as_ref() else { continue };
                if skiff_sys::pty::resize(t.as_fd(), cols.clamp(1, 4096), rows.clamp(1, 4096)).is_ok() {
                    if let Some(r) = runc.as_deref() {
                        let _ = skiff_sys::pidfd::winch(r);
                    }
                }
            }
            SessionInput::End => {
                // A pipe's reader sees its end; a terminal is left as it is (its Ctrl-D
                // is a byte the caller sends).
                if terminal.is_none() {
                    writer = None;
                }
            }
        }
    }
}

/// Kills the command of an exec whose caller left: the process runc started (its pid from
/// the pid file, waited for a moment if runc has not written it yet), held by a pidfd and
/// checked to be in the container's cgroup before it is signalled; else runc itself.
async fn kill_exec(pid_file: &Path, container: &str, runc: Option<&OwnedFd>) {
    let in_container = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
            c.lines().any(|l| {
                let l = l.trim_end();
                l.ends_with(&format!("/{container}")) || l.contains(&format!("/{container}/"))
            })
        })
    };
    for _ in 0..20 {
        let pid = std::fs::read_to_string(pid_file).ok().and_then(|t| t.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|p| *p > 1) {
            // The pidfd first, then the check: the process checked is the one signalled.
            if let Ok(fd) = skiff_sys::pidfd::open(pid) {
                if in_container(pid) {
                    tracing::info!(pid, "the exec's caller left; killing its command");
                    let _ = skiff_sys::pidfd::kill(&fd);
                    return;
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(r) = runc {
        let _ = skiff_sys::pidfd::kill(r);
    }
}
