//! Reading a file of an untrusted tree (an image's rootfs, an unpacked layer) as the
//! tree itself would see it: every path — and every symlink met on the way, absolute
//! or relative — is resolved inside `root`, never on the host. So an image whose
//! `/etc/passwd` is a symlink to `/dev/zero` or `/etc/shadow` gets that path *inside
//! itself* (usually nothing), a FIFO or a device is refused instead of blocking or
//! streaming forever, and what is read is capped.
//!
//! `openat2(RESOLVE_IN_ROOT)` (Linux 5.6) does the resolution; on older kernels the same
//! walk is done component by component with `O_NOFOLLOW` and `readlinkat`.

use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InRootError {
    #[error("{path} (inside {root}): not found")]
    NotFound { root: PathBuf, path: String },
    #[error("{path} (inside {root}): {source}")]
    Io {
        root: PathBuf,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} (inside {root}): not a regular file")]
    NotRegular { root: PathBuf, path: String },
    #[error("{path} (inside {root}): larger than {max} bytes")]
    TooLarge { root: PathBuf, path: String, max: u64 },
}

impl InRootError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, InRootError::NotFound { .. })
    }
}

/// Symlinks followed in one lookup before giving up (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// Reads the regular file `path` of the tree at `root` (resolved inside it), at most
/// `max` bytes; anything that is not a regular file is an error, and nothing blocks.
pub fn read(root: &Path, path: &str, max: u64) -> Result<Vec<u8>, InRootError> {
    read_with(root, path, max, open)
}

type Opener = fn(&Path, &str) -> std::io::Result<OwnedFd>;

fn read_with(root: &Path, path: &str, max: u64, open: Opener) -> Result<Vec<u8>, InRootError> {
    let (f, size) = open_regular_with(root, path, open)?;
    let too_large = || InRootError::TooLarge { root: root.to_path_buf(), path: path.to_string(), max };
    if size > max {
        return Err(too_large());
    }
    let mut out = vec![];
    f.take(max + 1).read_to_end(&mut out).map_err(|e| io_error(root, path, e))?;
    if out.len() as u64 > max {
        return Err(too_large());
    }
    Ok(out)
}

fn io_error(root: &Path, path: &str, source: std::io::Error) -> InRootError {
    if source.kind() == std::io::ErrorKind::NotFound {
        InRootError::NotFound { root: root.to_path_buf(), path: path.to_string() }
    } else {
        InRootError::Io { root: root.to_path_buf(), path: path.to_string(), source }
    }
}

/// Opens the regular file `path` of the tree at `root` (resolved inside it) for reading.
pub fn open_regular(root: &Path, path: &str) -> Result<std::fs::File, InRootError> {
    open_regular_with(root, path, open).map(|(f, _)| f)
}

/// The regular file and its size; anything else is an error.
fn open_regular_with(root: &Path, path: &str, open: Opener) -> Result<(std::fs::File, u64), InRootError> {
    let fd = open(root, path).map_err(|e| io_error(root, path, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_error(root, path, e.into()))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(InRootError::NotRegular { root: root.to_path_buf(), path: path.to_string() });
    }
    Ok((std::fs::File::from(fd), st.st_size as u64))
}

/// Whether `path` names a regular file inside `root` (resolved inside it).
pub fn is_file(root: &Path, path: &str) -> bool {
    open(root, path)
        .and_then(|fd| Ok(rustix::fs::fstat(&fd)?))
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile)
}

/// Opens `path` inside `root` for reading without blocking (a FIFO opens at once).
fn open(root: &Path, path: &str) -> std::io::Result<OwnedFd> {
    let dir = std::fs::File::open(root)?;
    let rel = relative(path);
    match rustix::fs::openat2(&dir, &rel, FLAGS, Mode::empty(), ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOSYS) => open_by_walking(OwnedFd::from(dir), &rel, FLAGS),
        Err(e) => Err(e.into()),
    }
}

/// Read only, without blocking on a FIFO, never becoming a controlling terminal.
const FLAGS: OFlags = OFlags::RDONLY.union(OFlags::NONBLOCK).union(OFlags::CLOEXEC).union(OFlags::NOCTTY);

/// The path with its leading `/`s removed (`.` for the root itself).
fn relative(path: &str) -> PathBuf {
    let p: PathBuf = Path::new(path).components().filter(|c| !matches!(c, Component::RootDir)).collect();
    if p.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        p
    }
}

/// What `RESOLVE_IN_ROOT` does, for kernels without `openat2`: walks the components one
/// at a time with `O_NOFOLLOW`; a symlink's target is spliced into the remaining path
/// (absolute targets restart at the root), `..` never climbs above the root.
fn open_by_walking(root: OwnedFd, rel: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
    let mut pending: Vec<std::ffi::OsString> = rel.components().rev().filter_map(|c| component(c)).collect::<Vec<_>>();
    // The directories walked so far, root first: `..` pops one (never the root).
    let mut stack: Vec<OwnedFd> = vec![root];
    let mut links = 0;
    while let Some(name) = pending.pop() {
        let here = stack.last().ok_or_else(|| std::io::Error::other("lost the root"))?;
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        if name == "." {
            continue;
        }
        let last = pending.is_empty();
        let path_flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(here, name.as_os_str(), path_flags, Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        match rustix::fs::FileType::from_raw_mode(st.st_mode) {
            rustix::fs::FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(std::io::Error::from_raw_os_error(rustix::io::Errno::LOOP.raw_os_error()));
                }
                let target = rustix::fs::readlinkat(here, name.as_os_str(), Vec::new())?;
                let target: PathBuf =
                    <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(target.into_bytes()).into();
                if target.is_absolute() {
                    stack.truncate(1);
                }
                pending.extend(target.components().rev().filter_map(|c| component(c)));
            }
            rustix::fs::FileType::Directory if !last => stack.push(fd),
            _ if last => {
                return Ok(rustix::fs::openat(here, name.as_os_str(), flags | OFlags::NOFOLLOW, Mode::empty())?)
            }
            _ => return Err(std::io::Error::from_raw_os_error(rustix::io::Errno::NOTDIR.raw_os_error())),
        }
    }
    // The path ended on a directory (or was the root): open it.
    let here = stack.last().ok_or_else(|| std::io::Error::other("lost the root"))?;
    Ok(rustix::fs::openat(here, ".", flags, Mode::empty())?)
}

fn component(c: Component<'_>) -> Option<std::ffi::OsString> {
    match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some("..".into()),
        Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("root");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("real")).unwrap();
        std::fs::write(r.join("real/passwd"), "app:x:1000:1000::/:/bin/sh\n").unwrap();
        std::fs::write(t.path().join("host-secret"), "outside").unwrap();
        t
    }

    type Reader<'a> = &'a dyn Fn(&Path, &str) -> Result<Vec<u8>, InRootError>;

    fn check_all(read_fn: Reader<'_>) {
        let t = tree();
        let r = t.path().join("root");
        // Absolute and relative links resolve inside the root.
        symlink("/real/passwd", r.join("etc/passwd")).unwrap();
        assert_eq!(read_fn(&r, "/etc/passwd").unwrap(), b"app:x:1000:1000::/:/bin/sh\n");
        symlink("../../../../host-secret", r.join("etc/escape")).unwrap();
        assert!(read_fn(&r, "etc/escape").unwrap_err().is_not_found(), "no climbing out with ..");
        symlink(t.path().join("host-secret"), r.join("etc/abs")).unwrap();
        assert!(read_fn(&r, "/etc/abs").unwrap_err().is_not_found(), "an absolute link stays inside");
        // Devices and FIFOs are refused without blocking.
        symlink("/dev/zero", r.join("etc/zero")).unwrap();
        assert!(read_fn(&r, "/etc/zero").unwrap_err().is_not_found(), "/dev/zero of the root, which has none");
        nix::unistd::mkfifo(&r.join("etc/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(read_fn(&r, "/etc/fifo"), Err(InRootError::NotRegular { .. })));
        std::fs::write(r.join("etc/big"), vec![b'x'; 2000]).unwrap();
        assert!(matches!(read_fn(&r, "/etc/big"), Err(InRootError::TooLarge { max: 1000, .. })));
        symlink("loop", r.join("etc/loop")).unwrap();
        assert!(read_fn(&r, "/etc/loop").is_err());
    }

    #[test]
    fn reads_stay_inside_the_root_never_block_and_are_capped() {
        check_all(&|root, path| read(root, path, 1000));
    }

    #[test]
    fn the_walk_for_old_kernels_resolves_the_same_way() {
        check_all(&|root, path| {
            read_with(root, path, 1000, |root, path| {
                open_by_walking(OwnedFd::from(std::fs::File::open(root)?), &relative(path), FLAGS)
            })
        });
    }
}
