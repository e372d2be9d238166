//! `skiff attach`: the shim's side. A container started with a terminal (`tty`) or with
//! its standard input open (`stdin_open`) keeps that terminal, or its stdin pipe, in its
//! shim, never in the agent: an agent that restarts (or is upgraded) finds it there.
//!
//! The shim listens on `attach.sock` in the bundle (root's, mode 0600). Each connection
//! gets the container's output from then on and may write to its input; leaving never
//! stops the container (that is `skiff stop`). Both ways carry frames of
//! `[kind: u8][length: u32, big-endian][bytes]`:
//! - to the shim: [`IN_DATA`] (bytes for the terminal or stdin; dropped unless the
//!   container has `stdin_open`), [`IN_RESIZE`] (columns and rows, u16 each, big-endian);
//! - from the shim: [`OUT_STDOUT`], [`OUT_STDERR`] (one stream on a terminal).
//!
//! An attachment that does not keep up with the output (its queue of [`QUEUE`] pieces is
//! full) is dropped, so a stalled terminal never holds up the container or its log. The
//! shim closes every attachment once the container has ended and `exit.json` is written.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

pub const ATTACH_SOCKET: &str = "attach.sock";

pub const IN_DATA: u8 = 0;
pub const IN_RESIZE: u8 = 1;
pub const OUT_STDOUT: u8 = 1;
pub const OUT_STDERR: u8 = 2;

/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Output pieces an attachment may have waiting before it is dropped.
const QUEUE: usize = 256;

/// Sun paths are at most 107 bytes; a longer one is reached through `/proc/self/fd`.
const SUN_PATH_MAX: usize = 100;

pub fn write_frame(w: &mut impl Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)?;
    w.write_all(data)
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
    /// The write end of the container's stdin pipe.
    Pipe(std::fs::File),
    /// Nothing: input is dropped.
    None,
}

impl Input {
    fn write(&self, data: &[u8]) {
        let to = match self {
            Input::Terminal { master, stdin_open: true } => master,
            Input::Pipe(p) => p,
            _ => return,
        };
        // A container that stops reading holds this one attachment's input, nothing else.
        let _ = (&mut &*to).write_all(data);
    }

    fn resize(&self, cols: u16, rows: u16) {
        if let Input::Terminal { master, .. } = self {
            let _ = skiff_sys::pty::resize(master.as_fd(), cols.clamp(1, 4096), rows.clamp(1, 4096));
        }
    }
}

type Piece = (u8, Arc<[u8]>);

/// The attachments of one container: output is offered to each.
#[derive(Clone, Default)]
pub struct Attachments {
    queues: Arc<Mutex<Vec<SyncSender<Piece>>>>,
}

impl Attachments {
    /// Offers a piece of output to every attachment; one that is full or gone is dropped.
    pub fn send(&self, kind: u8, data: &[u8]) {
        let Ok(mut queues) = self.queues.lock() else { return };
        if queues.is_empty() {
            return;
        }
        let piece: Arc<[u8]> = Arc::from(data);
        queues.retain(|q| match q.try_send((kind, Arc::clone(&piece))) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Listens on `ATTACH_SOCKET` in `bundle` and serves each connection on threads of
    /// its own, for as long as the process lives.
    pub fn serve(&self, bundle: &Path, input: Input) -> io::Result<()> {
        let (_guard, path) = socket_path(bundle, ATTACH_SOCKET, std::process::id())?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let input = Arc::new(input);
        let me = self.clone();
        std::thread::Builder::new().name("attach".into()).spawn(move || {
            // The guard keeps a long path's directory open while we listen.
            let _guard = _guard;
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => me.take(c, Arc::clone(&input)),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                }
            }
        })?;
        Ok(())
    }

    fn take(&self, conn: UnixStream, input: Arc<Input>) {
        let Ok(mut out) = conn.try_clone() else { return };
        let (tx, rx) = sync_channel::<Piece>(QUEUE);
        if let Ok(mut q) = self.queues.lock() {
            q.push(tx);
        }
        let _ = std::thread::Builder::new().name("attach-out".into()).spawn(move || {
            while let Ok((kind, data)) = rx.recv() {
                if write_frame(&mut out, kind, &data).is_err() {
                    break;
                }
            }
            // Dropped (too slow) or the container ended: the attachment ends.
            let _ = out.shutdown(std::net::Shutdown::Both);
        });
        let mut conn = conn;
        let _ = std::thread::Builder::new().name("attach-in".into()).spawn(move || {
            while let Ok(Some((kind, data))) = read_frame(&mut conn) {
                match kind {
                    IN_DATA => input.write(&data),
                    IN_RESIZE if data.len() == 4 => {
                        input.resize(u16::from_be_bytes([data[0], data[1]]), u16::from_be_bytes([data[2], data[3]]))
                    }
                    _ => {}
                }
            }
        });
    }

    /// Ends every attachment (their queues close once what they hold is written).
    pub fn close(&self) {
        if let Ok(mut q) = self.queues.lock() {
            q.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn attachments_get_output_and_a_slow_one_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (stdin_r, stdin_w) = std::io::pipe().unwrap();
        let a = Attachments::default();
        a.serve(dir.path(), Input::Pipe(std::fs::File::from(OwnedFd::from(stdin_w)))).unwrap();
        let mut fast = UnixStream::connect(dir.path().join(ATTACH_SOCKET)).unwrap();
        let slow = UnixStream::connect(dir.path().join(ATTACH_SOCKET)).unwrap();
        // Both are taken once the listener has seen them.
        for _ in 0..100 {
            if a.queues.lock().unwrap().len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(a.queues.lock().unwrap().len(), 2);
        write_frame(&mut fast, IN_DATA, b"hello\n").unwrap();
        let mut got = [0u8; 6];
        let mut stdin_r = stdin_r;
        stdin_r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\n");
        a.send(OUT_STDERR, b"oops");
        assert_eq!(read_frame(&mut fast).unwrap(), Some((OUT_STDERR, b"oops".to_vec())));
        // The slow one never reads: once its socket buffer and queue are full it is
        // dropped, and the fast one still gets everything.
        fast.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let piece = vec![b'x'; 32 * 1024];
        for _ in 0..(QUEUE * 8) {
            a.send(OUT_STDOUT, &piece);
            assert_eq!(read_frame(&mut fast).unwrap().map(|f| f.1.len()), Some(piece.len()));
        }
        assert_eq!(a.queues.lock().unwrap().len(), 1);
        a.close();
        drop(slow);
        assert_eq!(read_frame(&mut fast).unwrap(), None);
    }
}
