//! Files written in containers, without polling: fanotify marks on each container's
//! root filesystem (its overlay, marked whole with `FAN_MARK_FILESYSTEM`, so the writes
//! of a container's own mount namespace are seen through the node's mount of it). Each
//! file closed after writing is one event, with the writer's pid and the file's path.
//! Volumes are other filesystems and are not watched. Needs CAP_SYS_ADMIN (root).

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

/// A file a process closed after writing to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub pid: i32,
    /// As the kernel names the file: the path in the container when the writer was in
    /// it, else the node's path (below the container's `rootfs`).
    pub path: String,
}

pub struct FileWrites {
    fan: Fanotify,
}

impl FileWrites {
    pub fn open() -> std::io::Result<Self> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            // Non-blocking: the event's file is opened for us, and a FIFO opened for
            // reading would otherwise wait for a writer.
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC | EventFFlags::O_NONBLOCK,
        )?;
        Ok(FileWrites { fan })
    }

    /// Watches the overlay mounted at `rootfs`. The mark ends with the filesystem (the
    /// container's overlay is unmounted when it is removed). Anything but an overlay is
    /// refused: a directory whose overlay is not mounted (after a reboot) would otherwise
    /// mark the node's own filesystem whole.
    pub fn watch(&self, rootfs: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let fs = nix::sys::statfs::statfs(rootfs)?;
        // An overlay, and mounted there: on a node whose own root is an overlay (a
        // read-only image, an agent in a container) a plain directory is on one too.
        let parent = rootfs.parent().unwrap_or(Path::new("/"));
        let own_mount = std::fs::metadata(rootfs)?.dev() != std::fs::metadata(parent)?.dev();
        if fs.filesystem_type() != nix::sys::statfs::OVERLAYFS_SUPER_MAGIC || !own_mount {
            return Err(std::io::Error::other(format!("{} is not an overlay mount", rootfs.display())));
        }
        self.fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            MaskFlags::FAN_CLOSE_WRITE,
            None,
            Some(rootfs),
        )?;
        Ok(())
    }

    /// The writes waiting (none when nothing is), at most [`crate::multicast::BATCH`] and
    /// then what the last read brought; the flag says the kernel's queue overflowed
    /// (events were lost).
    pub fn recv(&self) -> std::io::Result<(Vec<Write>, bool)> {
        let (mut out, mut lost) = (vec![], false);
        while out.len() < crate::multicast::BATCH {
            let events = match self.fan.read_events() {
                Ok(e) => e,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            };
            if events.is_empty() {
                break;
            }
            for ev in events {
                // An overflow (the queue of 16384 events was full) has no file.
                let Some(fd) = ev.fd() else {
                    lost |= ev.mask().contains(MaskFlags::FAN_Q_OVERFLOW);
                    continue;
                };
                let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
                if let Ok(p) = std::fs::read_link(link) {
                    out.push(Write { pid: ev.pid(), path: p.to_string_lossy().into_owned() });
                }
            }
        }
        Ok((out, lost))
    }
}

impl AsFd for FileWrites {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fan.as_fd()
    }
}

/// `path` as the container sees it: what follows `/rootfs` when the kernel gave the
/// node's path of `rootfs` (a file written through the node's mount).
pub fn in_container(path: &str, rootfs: &Path) -> String {
    match Path::new(path).strip_prefix(rootfs) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_named_as_the_container_sees_them() {
        let root = Path::new("/var/lib/skiff/containers/ab-web-1/rootfs");
        assert_eq!(in_container("/var/lib/skiff/containers/ab-web-1/rootfs/etc/passwd", root), "/etc/passwd");
        assert_eq!(in_container("/etc/passwd", root), "/etc/passwd");
    }

    #[test]
    fn only_an_overlay_is_watched() {
        // Marking a plain directory would watch the whole filesystem it lies on.
        let Ok(w) = FileWrites::open() else { return eprintln!("fanotify needs CAP_SYS_ADMIN: skipped") };
        let dir = tempfile::tempdir().unwrap();
        let err = w.watch(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is not an overlay mount"), "{err}");
    }
}
