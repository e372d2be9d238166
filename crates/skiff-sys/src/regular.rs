//! Opening files in directories that a less trusted party may also write to (a wasm
//! guest's `state/`, after it dropped to its own user): a symlink there is never followed,
//! a FIFO or device is never opened for real use, and reads are capped — so a root
//! process appending to a log, or reading an exit record, cannot be pointed at
//! `/etc/shadow`, made to block, or fed `/dev/zero`.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

fn checked(f: File, path: &Path) -> std::io::Result<File> {
    if f.metadata()?.is_file() {
        Ok(f)
    } else {
        Err(std::io::Error::other(format!("{} is not a regular file", path.display())))
    }
}

/// Opens `path` for appending, creating it (mode 0600 before the umask) if missing.
pub fn append(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc_flags()).open(path)?;
    checked(f, path)
}

/// Opens `path` for reading.
pub fn open(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new().read(true).custom_flags(libc_flags()).open(path)?;
    checked(f, path)
}

/// Reads at most `max` bytes of `path`; a longer file is an error.
pub fn read(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![];
    open(path)?.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::other(format!("{} is larger than {max} bytes", path.display())));
    }
    Ok(buf)
}

/// O_NOFOLLOW | O_NONBLOCK (a FIFO opens without waiting for a writer and is then refused).
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_fifos_and_large_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("secret");
        std::fs::write(&target, "keep").unwrap();
        let link = t.path().join("container.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(append(&link).is_err());
        assert!(read(&link, 100).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let fifo = t.path().join("exit.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read(&fifo, 100).unwrap_err().to_string().contains("not a regular file"));
        let big = t.path().join("big");
        std::fs::write(&big, vec![b'x'; 200]).unwrap();
        assert!(read(&big, 100).is_err());
        assert_eq!(read(&big, 200).unwrap().len(), 200);
        let mut f = append(&t.path().join("new.log")).unwrap();
        std::io::Write::write_all(&mut f, b"line\n").unwrap();
    }
}
