//! Counters read again and again (cgroup and `/proc` files sampled every few seconds),
//! kept open and read from offset 0 each time: the kernel regenerates such a file on
//! each read from the start, so a sample costs one `pread` per file instead of an
//! `open`, a `read` and a `close`.
//!
//! A kept file whose object went away (a removed cgroup answers `ENODEV`, an exited
//! process `ESRCH` or nothing) is opened afresh once, so a path that names a new object
//! (a cgroup made again under the same name) reads the new one. [`KeptFiles::sweep`]
//! closes what was not read since the sweep before: the caller sweeps once per sampling
//! round, so files of instances that ended are closed after at most one round. An open
//! file does not keep its cgroup from being removed.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Bytes read from one kept file at most (counters and stat files are small).
const MAX_BYTES: usize = 64 * 1024;

pub struct KeptFiles {
    inner: Mutex<Inner>,
    /// Files kept open at most; past it, a file is read the plain way.
    cap: usize,
}

#[derive(Default)]
struct Inner {
    files: HashMap<PathBuf, Kept>,
    round: u64,
}

struct Kept {
    file: File,
    read_in: u64,
}

/// Reads all of `f` from offset 0.
fn pread_all(f: &File) -> std::io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if buf.len() >= MAX_BYTES {
                return Err(std::io::Error::other("kept file larger than 64 KiB"));
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = f.read_at(&mut buf[len..], len as u64)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

impl KeptFiles {
    pub fn new(cap: usize) -> Self {
        KeptFiles { inner: Mutex::new(Inner::default()), cap }
    }

    /// The whole of `path`, read through a kept file. An empty read counts as gone.
    pub fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
        let Ok(mut inner) = self.inner.lock() else { return std::fs::read_to_string(path) };
        let round = inner.round;
        if let Some(k) = inner.files.get_mut(path) {
            k.read_in = round;
            match pread_all(&k.file) {
                Ok(s) if !s.is_empty() => return Ok(s),
                _ => drop(inner.files.remove(path)),
            }
        }
        let file = File::open(path)?;
        let text = pread_all(&file)?;
        if inner.files.len() < self.cap {
            inner.files.insert(path.to_path_buf(), Kept { file, read_in: round });
        }
        Ok(text)
    }

    /// Closes every file not read since the previous sweep.
    pub fn sweep(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            let round = inner.round;
            inner.files.retain(|_, k| k.read_in == round);
            inner.round += 1;
        }
    }

    /// Files open now.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.files.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The process's kept files (at most 1,024 open: a node samples a few files for each of
/// its instances, and a process may hold only so many files).
pub fn global() -> &'static KeptFiles {
    static KEPT: std::sync::OnceLock<KeptFiles> = std::sync::OnceLock::new();
    KEPT.get_or_init(|| KeptFiles::new(1024))
}

/// `path` through the process's kept files; `None` when it cannot be read.
pub fn read(path: impl AsRef<Path>) -> Option<String> {
    global().read_to_string(path.as_ref()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_current_content_and_follows_a_replaced_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("counter");
        std::fs::write(&p, "1\n").unwrap();
        let kept = KeptFiles::new(8);
        assert_eq!(kept.read_to_string(&p).unwrap(), "1\n");
        assert_eq!(kept.len(), 1);
        // Rewritten in place (as the kernel regenerates a counter): the new content.
        std::fs::write(&p, "22\n").unwrap();
        assert_eq!(kept.read_to_string(&p).unwrap(), "22\n");
        // Replaced by a new file of the same name: the kept one reads empty (truncated
        // before the rename here), so the path is opened again.
        std::fs::write(&p, "").unwrap();
        let q = t.path().join("new");
        std::fs::write(&q, "3\n").unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert_eq!(kept.read_to_string(&p).unwrap(), "3\n");
        assert!(kept.read_to_string(&t.path().join("missing")).is_err());
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn proc_files_are_regenerated_on_each_read() {
        // `rchar` counts the bytes this process has read, these reads included.
        let kept = KeptFiles::new(8);
        let p = Path::new("/proc/self/io");
        let rchar = |t: String| -> u64 { t.lines().find_map(|l| l.strip_prefix("rchar: ")?.parse().ok()).unwrap() };
        let a = rchar(kept.read_to_string(p).unwrap());
        let b = rchar(kept.read_to_string(p).unwrap());
        assert!(b > a, "{b} > {a}: read afresh");
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn a_sweep_closes_what_was_not_read_and_the_cap_holds() {
        let t = tempfile::tempdir().unwrap();
        let kept = KeptFiles::new(2);
        let paths: Vec<PathBuf> = (0..3).map(|i| t.path().join(i.to_string())).collect();
        for p in &paths {
            std::fs::write(p, "x").unwrap();
            assert_eq!(kept.read_to_string(p).unwrap(), "x");
        }
        assert_eq!(kept.len(), 2, "past the cap a file is read without being kept");
        kept.sweep();
        assert_eq!(kept.len(), 2, "all read in the round before");
        kept.read_to_string(&paths[0]).unwrap();
        kept.sweep();
        assert_eq!(kept.len(), 1, "only the one read since");
        kept.sweep();
        assert!(kept.is_empty());
    }
}
