//! A handle on a process that stays with that process, not with its pid number (Linux 5.3+
//! `pidfd_open`): it becomes readable when the process ends, so a watcher learns of an
//! exit from the kernel at once instead of polling `/proc` or files, and a pid reused by
//! a later process is never mistaken for the one watched.

use std::os::fd::OwnedFd;

/// Opens a pidfd for `pid` (any process, not only a child). Fails with ESRCH when it has
/// already ended, ENOSYS on kernels before 5.3.
pub fn open(pid: i32) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| std::io::Error::other("pid 0 is not a process"))?;
    Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)?)
}

/// Kills the process a pidfd stands for (never a later process given its pid number).
pub fn kill(fd: impl std::os::fd::AsFd) -> std::io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL)?)
}

/// Tells the process a pidfd stands for that its terminal's window changed (SIGWINCH).
pub fn winch(fd: impl std::os::fd::AsFd) -> std::io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(fd, rustix::process::Signal::WINCH)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_becomes_readable_when_its_process_ends() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let fd = open(child.id() as i32).unwrap();
        let readable = |fd: &OwnedFd| {
            let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
            let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
            rustix::event::poll(&mut fds, Some(&zero)).unwrap() == 1
        };
        assert!(!readable(&fd), "running");
        winch(&fd).unwrap();
        assert!(!readable(&fd), "SIGWINCH is ignored by default");
        kill(&fd).unwrap();
        child.wait().unwrap();
        assert!(readable(&fd), "ended");
        assert!(open(0).is_err());
    }
}

/// One thread that waits (in `epoll`) on the pidfds it was given and calls `on_exit` with
/// a pidfd's key once its process has ended; it sleeps while nothing ends. Stopped when
/// dropped.
pub struct Watcher {
    epoll: Arc<OwnedFd>,
    stop: OwnedFd,
    fds: Arc<Mutex<HashMap<u64, OwnedFd>>>,
    next: AtomicU64,
}

use rustix::event::epoll;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const STOP: u64 = 0;

impl Watcher {
    pub fn start(on_exit: impl Fn(u64) + Send + 'static) -> std::io::Result<Watcher> {
        let epoll = Arc::new(epoll::create(epoll::CreateFlags::CLOEXEC)?);
        let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
        let stop = rustix::event::eventfd(0, flags)?;
        epoll::add(&*epoll, &stop, epoll::EventData::new_u64(STOP), epoll::EventFlags::IN)?;
        let fds: Arc<Mutex<HashMap<u64, OwnedFd>>> = Arc::default();
        let (ep, watched) = (Arc::clone(&epoll), Arc::clone(&fds));
        std::thread::Builder::new().name("exit-watcher".into()).stack_size(64 * 1024).spawn(move || {
            let mut events = Vec::with_capacity(64);
            loop {
                events.clear();
                match epoll::wait(&*ep, rustix::buffer::spare_capacity(&mut events), None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => return,
                }
                for e in events.drain(..) {
                    let key = e.data.u64();
                    if key == STOP {
                        return;
                    }
                    let fd = watched.lock().ok().and_then(|mut m| m.remove(&key));
                    if let Some(fd) = fd {
                        let _ = epoll::delete(&*ep, &fd);
                        on_exit(key);
                    }
                }
            }
        })?;
        Ok(Watcher { epoll, stop, fds, next: AtomicU64::new(STOP + 1) })
    }

    /// Watches the process behind `pidfd`; returns the key `on_exit` will be called with
    /// (once).
    pub fn add(&self, pidfd: OwnedFd) -> std::io::Result<u64> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fds = self.fds.lock().map_err(|_| std::io::Error::other("exit watcher: lock poisoned"))?;
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ONESHOT;
        epoll::add(&*self.epoll, &pidfd, epoll::EventData::new_u64(key), flags)?;
        fds.insert(key, pidfd);
        Ok(key)
    }

    /// Stops watching `key` (no call follows unless one is already under way).
    pub fn remove(&self, key: u64) {
        if let Some(fd) = self.fds.lock().ok().and_then(|mut m| m.remove(&key)) {
            let _ = epoll::delete(&*self.epoll, &fd);
        }
    }

    /// How many processes are watched.
    pub fn len(&self) -> usize {
        self.fds.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
    }
}

#[cfg(test)]
mod watcher_tests {
    use super::*;

    #[test]
    fn the_watcher_calls_back_once_per_ended_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Watcher::start(move |k| tx.send(k).unwrap()).unwrap();
        let mut a = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut b = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let ka = w.add(open(a.id() as i32).unwrap()).unwrap();
        let kb = w.add(open(b.id() as i32).unwrap()).unwrap();
        assert_eq!(w.len(), 2);
        w.remove(kb);
        b.kill().unwrap();
        b.wait().unwrap();
        a.kill().unwrap();
        a.wait().unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), ka);
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "b was removed");
        assert!(w.is_empty());
    }
}
