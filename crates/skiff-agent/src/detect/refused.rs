//! The listener containers' seccomp filters hand refused calls to (`SCMP_ACT_NOTIFY`,
//! where runc cannot log them). Each call is answered EPERM at once — it is never run —
//! and, while threat detection runs, reported to the detector.
//!
//! It runs whenever the kernel supports it, not only with detection: runc connects to a
//! container's `listenerPath` for every `exec` into it, so a container made with one
//! needs it answering whatever the agent's settings are later. It has its own thread: a
//! workload that loops on refused calls costs this thread a few system calls each (past
//! a budget, not even the `/proc` reads), never the detector's other sources.

use skiff_runtime::audit::SeccompRecord;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

/// A refused call, attributed while its caller waited.
#[derive(Debug)]
pub struct Refused {
    /// The caller's container.
    pub id: String,
    pub record: SeccompRecord,
}

/// Filters listened to at once; one past that is dropped (its calls fail with ENOSYS).
const MAX_FILTERS: usize = 8192;
/// Calls of one filter attributed and reported per second; the rest are only refused.
const REPORTS_PER_SECOND: u32 = 100;
/// Reports waiting for the detector; past that they are dropped (and counted).
const QUEUE: usize = 1024;

/// Where reports go: the detector's queue, and a socket that wakes its `poll`.
struct Sink {
    tx: std::sync::mpsc::SyncSender<Refused>,
    wake: UnixStream,
}

/// The running listener.
pub struct Listener {
    pub path: PathBuf,
    sink: Arc<Mutex<Option<Sink>>>,
}

/// One filter's descriptor and its report budget.
struct Filter {
    fd: OwnedFd,
    window: Instant,
    reported: u32,
}

impl Listener {
    /// Listens at `path` (only root may connect) when the kernel and `runc` can hand calls
    /// over; `None` otherwise.
    pub fn start(path: &Path) -> Option<Listener> {
        if !skiff_sys::seccomp_notify::supported() {
            return None;
        }
        let runc = skiff_runtime::runc::Runc::new("");
        if !runc.seccomp_actions().iter().any(|a| a == "SCMP_ACT_NOTIFY") {
            return None;
        }
        let bind = || -> std::io::Result<UnixListener> {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let listener = match bind() {
            Ok(l) => l,
            Err(e) => {
                warn!(path = %path.display(), "refused system calls are not handed over: {e}");
                return None;
            }
        };
        let sink: Arc<Mutex<Option<Sink>>> = Arc::default();
        let s = Arc::clone(&sink);
        let spawned = std::thread::Builder::new().name("seccomp".into()).spawn(move || serve(listener, &s));
        if let Err(e) = spawned {
            warn!("refused system calls are not handed over: {e}");
            return None;
        }
        Some(Listener { path: path.to_path_buf(), sink })
    }

    /// Reports go to the returned queue from now on; the socket becomes readable when
    /// there are some.
    pub fn report(&self) -> std::io::Result<(std::sync::mpsc::Receiver<Refused>, UnixStream)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let (wake, read) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        read.set_nonblocking(true)?;
        if let Ok(mut s) = self.sink.lock() {
            *s = Some(Sink { tx, wake });
        }
        Ok((rx, read))
    }
}

/// The listener's thread: never returns (a container's `exec` needs it), whatever fails.
fn serve(listener: UnixListener, sink: &Mutex<Option<Sink>>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut filters: Vec<Filter> = vec![];
    let mut dropped = 0u64;
    loop {
        let ready: Vec<PollFlags> = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(filters.iter().map(|f| PollFd::new(f.fd.as_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("the seccomp listener's poll: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
        };
        let mut ready = ready.into_iter();
        let polled = filters.len();
        if ready.next().is_some_and(|r| !r.is_empty()) {
            accept(&listener, &mut filters);
        }
        // Filters accepted just now were not polled: they are kept as they are.
        let fresh = filters.split_off(polled);
        let mut kept = Vec::with_capacity(filters.len() + fresh.len());
        for (mut f, revents) in std::mem::take(&mut filters).into_iter().zip(ready) {
            if revents.contains(PollFlags::POLLIN) && !answer(&mut f, sink, &mut dropped) {
                continue;
            }
            if !revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                kept.push(f);
            }
        }
        kept.extend(fresh);
        filters = kept;
    }
}

/// Takes the filters runc connects with (a message each, read with a bound).
fn accept(listener: &UnixListener, filters: &mut Vec<Filter>) {
    for _ in 0..64 {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // Out of descriptors, say: not a reason to spin.
                warn!("the seccomp listener's accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        match skiff_sys::seccomp_notify::receive_listener(&mut stream) {
            Ok(_) if filters.len() >= MAX_FILTERS => warn!("too many seccomp filters to listen to"),
            Ok((_, fd)) => filters.push(Filter { fd, window: Instant::now(), reported: 0 }),
            Err(e) => warn!("a seccomp filter's listener message: {e}"),
        }
    }
}

/// Reads one call, attributes it (within the filter's budget), refuses it and reports it.
/// False when the filter is no good any more.
fn answer(f: &mut Filter, sink: &Mutex<Option<Sink>>, dropped: &mut u64) -> bool {
    let call = match skiff_sys::seccomp_notify::receive(f.fd.as_fd()) {
        Ok(Some(c)) => c,
        Ok(None) => return true,
        Err(e) => {
            warn!("reading a refused call: {e}");
            return false;
        }
    };
    if f.window.elapsed() >= Duration::from_secs(1) {
        f.window = Instant::now();
        f.reported = 0;
    }
    let reporting = sink.lock().is_ok_and(|s| s.is_some()) && f.reported < REPORTS_PER_SECOND;
    // Read while the caller waits: it cannot exit before its answer.
    let attributed = reporting
        .then(|| {
            let cgroup = super::read(format!("/proc/{}/cgroup", call.pid))?;
            let id = super::container_of(&cgroup)?.to_string();
            let comm = super::read_capped(format!("/proc/{}/comm", call.pid), 64).unwrap_or_default();
            Some((id, comm.trim_end().to_string()))
        })
        .flatten();
    if let Err(e) = skiff_sys::seccomp_notify::refuse(f.fd.as_fd(), call.id, nix::errno::Errno::EPERM as i32) {
        // Dropping the filter ends the caller's wait (with ENOSYS).
        warn!("answering a refused call: {e}");
        return false;
    }
    let Some((id, comm)) = attributed else { return true };
    f.reported += 1;
    // Answered as the filter's default would: SECCOMP_RET_ERRNO (EPERM).
    let record =
        SeccompRecord { pid: call.pid as i32, arch: call.arch, syscall: call.nr as u32, code: 0x0005_0000, comm };
    if let Ok(s) = sink.lock() {
        if let Some(s) = s.as_ref() {
            if s.tx.try_send(Refused { id, record }).is_err() {
                *dropped += 1;
                if dropped.is_power_of_two() {
                    warn!("refused calls not reported (the detector is behind): {dropped} so far");
                }
            }
            let _ = std::io::Write::write(&mut &s.wake, &[1]);
        }
    }
    true
}
