//! Writes that survive a crash or a power cut: the new content goes to a temporary file
//! in the same directory, is flushed to disk (`fsync`), renamed over the old one, and
//! the directory is flushed so the rename itself is on disk. A reader (after a reboot)
//! sees the old file or the new one, never a torn one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct DurableError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DurableError + 'a {
    move |source| DurableError { op, path: path.to_path_buf(), source }
}

/// Replaces `path` with `bytes` (file mode `mode`), durably.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    let tmp = written_beside(path, bytes, mode)?;
    rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Makes `path` with `bytes` (file mode `mode`), durably, only if nothing is there:
/// `false` (and nothing written) when something is. Of several processes making the
/// same file at once, exactly one succeeds and the others read what it wrote.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, DurableError> {
    let tmp = written_beside(path, bytes, mode)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_parent(path).map(|_| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(err("link", path)(e)),
    }
}

/// `bytes` in a new, synced temporary file beside `path`.
fn written_beside(path: &Path, bytes: &[u8], mode: u32) -> Result<std::path::PathBuf, DurableError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // A fresh, unguessable name made only if nothing is there (never through a symlink):
    // the directory may be one that someone else can write to.
    let suffix =
        crate::random::hex(8).map_err(|e| err("naming a temporary file for", path)(std::io::Error::other(e)))?;
    let tmp = path.with_file_name(format!(".{name}.tmp-{suffix}"));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)
        .map_err(err("create", &tmp))?;
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err("write", &tmp)(e));
    }
    Ok(tmp)
}

/// Renames `from` to `to` and flushes the directory (or directories) involved.
pub fn rename(from: &Path, to: &Path) -> Result<(), DurableError> {
    std::fs::rename(from, to).map_err(err("rename", to))?;
    sync_parent(to)?;
    if from.parent() != to.parent() {
        sync_parent(from)?;
    }
    Ok(())
}

/// Flushes the directory that holds `path` (making a create, rename or unlink in it
/// durable).
pub fn sync_parent(path: &Path) -> Result<(), DurableError> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => sync_dir(Path::new(".")),
    }
}

/// Flushes a directory's entries.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err("sync", dir))
}

/// Flushes every dirty page of the filesystem holding `path` (`syncfs(2)`): one call
/// instead of an fsync per file, for a whole tree written before one rename publishes it.
pub fn sync_filesystem(path: &Path) -> Result<(), DurableError> {
    let f = std::fs::File::open(path).map_err(err("open", path))?;
    rustix::fs::syncfs(&f).map_err(|e| err("syncfs", path)(e.into()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_write_replaces_the_file_with_its_mode_and_leaves_no_temporary() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("refs.json");
        std::fs::write(&p, "old").unwrap();
        super::write(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1, "no temporary left");
        super::sync_filesystem(t.path()).unwrap();
        let e = super::write(&t.path().join("missing/x"), b"", 0o600).unwrap_err();
        assert!(e.to_string().starts_with("create "), "{e}");
    }

    #[test]
    fn create_new_makes_a_file_once_and_never_replaces_one() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("key");
        assert!(super::create_new(&p, b"first", 0o600).unwrap());
        assert!(!super::create_new(&p, b"second", 0o600).unwrap(), "a file is there");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "first");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1, "no temporary left");
    }
}
