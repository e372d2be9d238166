//! `skiff attach`: the shim's side. A container started with a terminal (`tty`) or with
//! its standard input open (`stdin_open`) keeps that terminal, or its stdin pipe, in its
//! shim, never in the agent: an agent that restarts (or is upgraded) finds it there.
//!
//! The shim listens on `attach.sock` in the bundle (root's, mode 0600). A connection
//! starts with [`IN_HELLO`]; from then on it gets the container's output as it comes and
//! may write to its input; leaving never stops the container (that is `skiff stop`).
//! Both ways carry frames of `[kind: u8][length: u32, big-endian][bytes]`:
//! - to the shim: [`IN_HELLO`] (one byte of flags: [`HELLO_REPLAY`] asks for the output
//!   kept from before, up to [`RECENT_BYTES`]), [`IN_DATA`] (bytes for the terminal or
//!   stdin; dropped unless the container has `stdin_open`), [`IN_RESIZE`] (columns and
//!   rows, u16 each, big-endian), [`IN_CLOSE`] (close the container's stdin pipe, as
//!   `docker run -i` does at the end of its input; a terminal ignores it);
//! - from the shim: [`OUT_STDOUT`], [`OUT_STDERR`] (one stream on a terminal), and last
//!   [`OUT_EXIT`] (the container's exit code, i32 big-endian) once it has ended and
//!   `exit.json` is written.
//!
//! An attachment that does not keep up with the output (its queue of [`QUEUE`] pieces is
//! full, or a write waits [`WRITE_WAIT`]) is dropped and its socket shut, so a stalled
//! terminal never holds up the container or its log: it ends without [`OUT_EXIT`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const ATTACH_SOCKET: &str = "attach.sock";

pub const IN_DATA: u8 = 0;
pub const IN_RESIZE: u8 = 1;
pub const IN_HELLO: u8 = 2;
pub const IN_CLOSE: u8 = 3;
pub const OUT_STDOUT: u8 = 1;
pub const OUT_STDERR: u8 = 2;
pub const OUT_EXIT: u8 = 3;

/// [`IN_HELLO`]'s flag: send the output kept from before the attachment first.
pub const HELLO_REPLAY: u8 = 1;

/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Output pieces an attachment may have waiting before it is dropped.
const QUEUE: usize = 256;

/// The output kept for a replay: the newest bytes, in at most this many pieces.
pub const RECENT_BYTES: usize = 64 * 1024;
const RECENT_PIECES: usize = 128;

/// How long one write to an attachment may wait before it is dropped.
const WRITE_WAIT: Duration = Duration::from_secs(10);

/// How long a connection may take to say hello.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// How long the shim, at its end, lets attachments take what they were sent.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Sun paths are at most 107 bytes; a longer one is reached through `/proc/PID/fd`.
const SUN_PATH_MAX: usize = 100;

pub fn write_frame(w: &mut impl Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut frame = Vec::with_capacity(5 + data.len());
    frame.push(kind);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(data);
    w.write_all(&frame)
}

/// The next frame, `None` at the end of the stream. A frame longer than [`MAX_FRAME`]
/// is an error (the peer is not speaking this protocol).
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (kind, len) = frame_head(&head)?;
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(Some((kind, data)))
}

/// A frame's kind and length from its first five bytes; a length over [`MAX_FRAME`] is
/// an error.
pub fn frame_head(head: &[u8; 5]) -> io::Result<(u8, usize)> {
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    Ok((head[0], len))
}

/// A resize frame's bytes.
pub fn resize_bytes(cols: u16, rows: u16) -> [u8; 4] {
    let (c, r) = (cols.to_be_bytes(), rows.to_be_bytes());
    [c[0], c[1], r[0], r[1]]
}

/// An exit frame's code.
pub fn exit_code(data: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(data.try_into().ok()?))
}

/// A path for a socket named `name` in `dir` that fits a socket address: the path itself,
/// or (when too long) the same place through a descriptor of `dir` that the returned
/// guard holds open. `pid` is the process that will use the path (another process
/// reaches our descriptors through `/proc/PID/fd`).
pub fn socket_path(dir: &Path, name: &str, pid: u32) -> io::Result<(Option<OwnedFd>, PathBuf)> {
    let direct = dir.join(name);
    if direct.as_os_str().len() <= SUN_PATH_MAX {
        return Ok((None, direct));
    }
    let fd: OwnedFd = std::fs::File::open(dir)?.into();
    use std::os::fd::AsRawFd;
    let via = PathBuf::from(format!("/proc/{pid}/fd/{}/{name}", fd.as_raw_fd()));
    Ok((Some(fd), via))
}

/// Where input from attachments goes.
pub enum Input {
    /// The container's terminal (its master end): input (with `stdin_open`) and sizes.
    Terminal { master: std::fs::File, stdin_open: bool },
    /// The write end of the container's stdin pipe, until an attachment closes it.
    Pipe(Mutex<Option<std::fs::File>>),
    /// Nothing: input is dropped.
    None,
}

impl Input {
    /// A container that stops reading holds this write (and, on a pipe, the other
    /// attachments' input behind it); never its output or its log.
    fn write(&self, data: &[u8]) {
        match self {
            Input::Terminal { master, stdin_open: true } => {
                let _ = (&mut &*master).write_all(data);
            }
            Input::Pipe(p) => {
                if let Ok(mut p) = p.lock() {
                    if let Some(f) = p.as_mut() {
                        if f.write_all(data).is_err() {
                            *p = None;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn resize(&self, cols: u16, rows: u16) {
        if let Input::Terminal { master, .. } = self {
            let _ = skiff_sys::pty::resize(master.as_fd(), cols.clamp(1, 4096), rows.clamp(1, 4096));
        }
    }

    fn close(&self) {
        if let Input::Pipe(p) = self {
            if let Ok(mut p) = p.lock() {
                *p = None;
            }
        }
    }
}

type Piece = (u8, Arc<[u8]>);

struct Conn {
    id: u64,
    queue: SyncSender<Piece>,
    /// To shut the socket when the attachment is dropped.
    socket: UnixStream,
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    recent: VecDeque<Piece>,
    recent_bytes: usize,
    next_id: u64,
    /// The container's exit code, once it has ended.
    ended: Option<i32>,
}

/// The attachments of one container: output is offered to each and kept for replays.
#[derive(Clone, Default)]
pub struct Attachments {
    state: Arc<Mutex<State>>,
    writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Offers a piece to one attachment; `false` when it is to be dropped (its socket is
/// shut, so its writer and its peer see the end).
fn offer(c: &Conn, piece: Piece) -> bool {
    match c.queue.try_send(piece) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            let _ = c.socket.shutdown(std::net::Shutdown::Both);
            false
        }
    }
}

impl Attachments {
    /// Offers a piece of output to every attachment (one that is full or gone is
    /// dropped) and keeps it for replays.
    pub fn send(&self, kind: u8, data: &[u8]) {
        let Ok(mut st) = self.state.lock() else { return };
        let piece: Piece = (kind, Arc::from(data));
        st.recent_bytes += data.len();
        st.recent.push_back(piece.clone());
        while st.recent_bytes > RECENT_BYTES || st.recent.len() > RECENT_PIECES {
            match st.recent.pop_front() {
                Some((_, d)) => st.recent_bytes -= d.len(),
                None => break,
            }
        }
        st.conns.retain(|c| offer(c, piece.clone()));
    }

    /// Listens on `ATTACH_SOCKET` in `bundle` and serves each connection on threads of
    /// its own, for as long as the process lives.
    pub fn serve(&self, bundle: &Path, input: Input) -> io::Result<()> {
        let (guard, path) = socket_path(bundle, ATTACH_SOCKET, std::process::id())?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let input = Arc::new(input);
        let me = self.clone();
        std::thread::Builder::new().name("attach".into()).stack_size(64 * 1024).spawn(move || {
            // The guard keeps a long path's directory open while we listen.
            let _guard = guard;
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let (me, input) = (me.clone(), Arc::clone(&input));
                        let _ = std::thread::Builder::new()
                            .name("attach-in".into())
                            .stack_size(64 * 1024)
                            .spawn(move || me.serve_one(c, &input));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
        Ok(())
    }

    /// One attachment: its hello, then its input until it leaves.
    fn serve_one(&self, mut conn: UnixStream, input: &Input) {
        let _ = conn.set_read_timeout(Some(HELLO_WAIT));
        let flags = match read_frame(&mut conn) {
            Ok(Some((IN_HELLO, f))) => f.first().copied().unwrap_or(0),
            _ => return,
        };
        let _ = conn.set_read_timeout(None);
        let _ = conn.set_write_timeout(Some(WRITE_WAIT));
        let (Ok(mut out), Ok(socket)) = (conn.try_clone(), conn.try_clone()) else { return };
        let (tx, rx) = sync_channel::<Piece>(QUEUE);
        let id = {
            let Ok(mut st) = self.state.lock() else { return };
            let id = st.next_id;
            st.next_id += 1;
            let c = Conn { id, queue: tx, socket };
            // Under the same lock as `send`: the replay and what follows it have no gap.
            let mut open = flags & HELLO_REPLAY == 0 || st.recent.iter().all(|p| offer(&c, p.clone()));
            if let Some(code) = st.ended {
                // Too late for output as it comes: the replay (if asked), then the end.
                if open {
                    offer(&c, (OUT_EXIT, Arc::from(code.to_be_bytes().as_slice())));
                }
                open = false;
            } else if open {
                st.conns.push(c);
            }
            // The writer is known before `close` can look for it (it takes the list
            // after this lock).
            let writer = std::thread::Builder::new().name("attach-out".into()).stack_size(64 * 1024).spawn(move || {
                while let Ok((kind, data)) = rx.recv() {
                    if write_frame(&mut out, kind, &data).is_err() {
                        break;
                    }
                }
                // Dropped, left, or the container ended: the attachment ends.
                let _ = out.shutdown(std::net::Shutdown::Both);
            });
            if let (Ok(w), Ok(mut ws)) = (writer, self.writers.lock()) {
                ws.retain(|w| !w.is_finished());
                ws.push(w);
            }
            if !open {
                return;
            }
            id
        };
        while let Ok(Some((kind, data))) = read_frame(&mut conn) {
            match kind {
                IN_DATA => input.write(&data),
                IN_RESIZE if data.len() == 4 => {
                    input.resize(u16::from_be_bytes([data[0], data[1]]), u16::from_be_bytes([data[2], data[3]]))
                }
                IN_CLOSE => input.close(),
                _ => {}
            }
        }
        // The peer left: its queue goes (its writer ends at once).
        if let Ok(mut st) = self.state.lock() {
            st.conns.retain(|c| c.id != id);
        }
    }

    /// The container ended with `code`: each attachment gets it after what it was sent,
    /// then ends; waits (at most [`FLUSH_WAIT`]) for them to take it all.
    pub fn close(&self, code: i32) {
        if let Ok(mut st) = self.state.lock() {
            st.ended = Some(code);
            let exit: Piece = (OUT_EXIT, Arc::from(code.to_be_bytes().as_slice()));
            for c in std::mem::take(&mut st.conns) {
                offer(&c, exit.clone());
            }
        }
        let writers = self.writers.lock().map(|mut w| std::mem::take(&mut *w)).unwrap_or_default();
        let deadline = Instant::now() + FLUSH_WAIT;
        while Instant::now() < deadline && !writers.iter().all(|w| w.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(c: &mut UnixStream, flags: u8) {
        write_frame(c, IN_HELLO, &[flags]).unwrap();
    }

    fn attached(a: &Attachments, n: usize) {
        for _ in 0..500 {
            if a.state.lock().unwrap().conns.len() == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} attachments, not {n}", a.state.lock().unwrap().conns.len());
    }

    #[test]
    fn frames_round_trip_and_refuse_giants() {
        let mut buf = vec![];
        write_frame(&mut buf, IN_RESIZE, &resize_bytes(120, 40)).unwrap();
        write_frame(&mut buf, IN_DATA, b"ls\r").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((IN_RESIZE, vec![0, 120, 0, 40])));
        assert_eq!(read_frame(&mut r).unwrap(), Some((IN_DATA, b"ls\r".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let giant = [OUT_STDOUT, 0, 1, 0, 1];
        assert!(read_frame(&mut &giant[..]).is_err());
        // Cut inside a frame: an error, not a silent end.
        assert!(read_frame(&mut &buf[..7]).is_err());
        assert_eq!(exit_code(&(-3i32).to_be_bytes()), Some(-3));
        assert_eq!(exit_code(b"xy"), None);
    }

    #[test]
    fn long_directories_get_a_short_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let (guard, path) = socket_path(&deep, ATTACH_SOCKET, std::process::id()).unwrap();
        assert!(guard.is_some() && path.as_os_str().len() <= SUN_PATH_MAX, "{path:?}");
        let _l = UnixListener::bind(&path).unwrap();
        assert!(deep.join(ATTACH_SOCKET).exists());
        let (guard, path) = socket_path(dir.path(), ATTACH_SOCKET, std::process::id()).unwrap();
        assert!(guard.is_none());
        assert_eq!(path, dir.path().join(ATTACH_SOCKET));
    }

    #[test]
    fn attachments_get_output_input_goes_in_and_a_slow_one_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (mut stdin_r, stdin_w) = std::io::pipe().unwrap();
        let a = Attachments::default();
        a.send(OUT_STDOUT, b"before-");
        a.serve(dir.path(), Input::Pipe(Mutex::new(Some(std::fs::File::from(OwnedFd::from(stdin_w)))))).unwrap();
        // Only root (the agent) may connect: no local user reaches a container's terminal.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ATTACH_SOCKET)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "attach.sock is {:o}", mode & 0o777);
        let connect = || UnixStream::connect(dir.path().join(ATTACH_SOCKET)).unwrap();
        let (mut fast, mut slow, mut late) = (connect(), connect(), connect());
        hello(&mut fast, HELLO_REPLAY);
        hello(&mut slow, 0);
        attached(&a, 2);
        // The replay comes first, then what follows, with nothing lost between.
        a.send(OUT_STDERR, b"oops");
        assert_eq!(read_frame(&mut fast).unwrap(), Some((OUT_STDOUT, b"before-".to_vec())));
        assert_eq!(read_frame(&mut fast).unwrap(), Some((OUT_STDERR, b"oops".to_vec())));
        // Input reaches the container's stdin; IN_CLOSE closes it.
        write_frame(&mut fast, IN_DATA, b"hello\n").unwrap();
        let mut got = [0u8; 6];
        stdin_r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\n");
        // The slow one never reads: once its socket buffer and queue are full it is cut
        // off (its socket shut), and the fast one still gets everything.
        fast.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let piece = vec![b'x'; 32 * 1024];
        for _ in 0..(QUEUE * 8) {
            a.send(OUT_STDOUT, &piece);
            assert_eq!(read_frame(&mut fast).unwrap().map(|f| f.1.len()), Some(piece.len()));
        }
        attached(&a, 1);
        slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut drained = 0usize;
        while let Ok(Some(_)) = read_frame(&mut slow) {
            drained += 1;
        }
        assert!(drained < QUEUE * 8, "the slow attachment ended early, after {drained} pieces");
        // One that never says hello is never attached; one that leaves is let go.
        write_frame(&mut late, IN_DATA, b"ignored").unwrap();
        let mut gone = connect();
        hello(&mut gone, 0);
        attached(&a, 2);
        drop(gone);
        attached(&a, 1);
        write_frame(&mut fast, IN_CLOSE, b"").unwrap();
        let mut rest = vec![];
        stdin_r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "stdin closed");
        // The end: what was sent, then the exit code, then the end of the stream.
        a.send(OUT_STDOUT, b"last words");
        a.close(7);
        assert_eq!(read_frame(&mut fast).unwrap(), Some((OUT_STDOUT, b"last words".to_vec())));
        assert_eq!(read_frame(&mut fast).unwrap(), Some((OUT_EXIT, 7i32.to_be_bytes().to_vec())));
        assert_eq!(read_frame(&mut fast).unwrap(), None);
    }
}
