//! Container logs: JSON lines (`{"time","stream","log"}`, Docker's json-file shape) in
//! `container.log`, rotated by size to `container.log.1`, `.2`, ...

use skiff_model::LogLine;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Longest line kept as one record; longer output is split, as Docker splits at 16 KiB.
pub const MAX_LINE: usize = 16 * 1024;

pub struct LogWriter {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    size: u64,
}

impl LogWriter {
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> std::io::Result<Self> {
        // The directory may be writable by the instance (a wasm guest's state/): never
        // through a symlink, never a FIFO.
        let file = skiff_sys::regular::append(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter { path: path.to_path_buf(), max_bytes, max_files: max_files.max(1), file, size })
    }

    pub fn write(&mut self, stream: &str, line: &[u8]) -> std::io::Result<()> {
        let rec = LogLine {
            time: crate::time::rfc3339_nanos(std::time::SystemTime::now()),
            stream: stream.to_string(),
            log: String::from_utf8_lossy(line).into_owned(),
        };
        let mut bytes = serde_json::to_vec(&rec).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Keeps `max_files` files in all: the live one and `.1` .. `.{max_files-1}`.
    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        if self.max_files == 1 {
            fs::remove_file(&self.path)?;
        } else {
            let _ = fs::remove_file(name(self.max_files - 1));
            for i in (1..self.max_files - 1).rev() {
                let _ = fs::rename(name(i), name(i + 1));
            }
            fs::rename(&self.path, name(1))?;
        }
        self.file = skiff_sys::regular::append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// All retained log lines of a container, oldest first (rotated files included).
pub fn read_all(path: &Path) -> Vec<LogLine> {
    let mut files = vec![];
    for i in (1..100).rev() {
        let p = PathBuf::from(format!("{}.{i}", path.display()));
        if p.exists() {
            files.push(p);
        }
    }
    files.push(path.to_path_buf());
    let mut out = vec![];
    for f in files {
        let Ok(file) = skiff_sys::regular::open(&f) else { continue };
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            if let Ok(l) = serde_json::from_str::<LogLine>(&line) {
                out.push(l);
            }
        }
    }
    out
}

/// One stream of a process that writes bytes, not lines (a WebAssembly guest's stdout):
/// complete lines become records, a line longer than [`MAX_LINE`] is split, and what is
/// left without a newline is written by [`LineSink::finish`].
#[derive(Clone)]
pub struct LineSink {
    stream: &'static str,
    log: std::sync::Arc<std::sync::Mutex<LogWriter>>,
    partial: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl LineSink {
    pub fn new(stream: &'static str, log: std::sync::Arc<std::sync::Mutex<LogWriter>>) -> Self {
        LineSink { stream, log, partial: Default::default() }
    }

    fn record(&self, line: &[u8]) -> std::io::Result<()> {
        let mut w = self.log.lock().map_err(|_| std::io::Error::other("log lock poisoned"))?;
        w.write(self.stream, line)
    }

    /// Writes the last line, if it had no newline.
    pub fn finish(&self) {
        let rest = self.partial.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        if !rest.is_empty() {
            let _ = self.record(&rest);
        }
    }
}

impl Write for LineSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut partial = self.partial.lock().map_err(|_| std::io::Error::other("log lock poisoned"))?;
        for &b in bytes {
            if b == b'\n' {
                self.record(&partial)?;
                partial.clear();
            } else {
                partial.push(b);
                if partial.len() == MAX_LINE {
                    self.record(&partial)?;
                    partial.clear();
                }
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_sink_makes_records_of_lines_however_the_bytes_arrive() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("container.log");
        let log = std::sync::Arc::new(std::sync::Mutex::new(LogWriter::open(&p, 1 << 20, 1).unwrap()));
        let mut out = LineSink::new("stdout", log.clone());
        let err = LineSink::new("stderr", log);
        out.write_all(b"hel").unwrap();
        out.write_all(b"lo\nwor").unwrap();
        out.write_all(&vec![b'x'; MAX_LINE]).unwrap();
        out.write_all(b"\nlast").unwrap();
        out.clone().finish();
        err.finish();
        let lines: Vec<(String, String)> = read_all(&p).into_iter().map(|l| (l.stream, l.log)).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], ("stdout".into(), "hello".into()));
        assert_eq!(lines[1].1.len(), MAX_LINE);
        assert!(lines[1].1.starts_with("worxxx"));
        assert_eq!(lines[2].1, "x".repeat(3));
        assert_eq!(lines[3].1, "last");
    }

    #[test]
    fn rotates_and_reads_back_in_order() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("container.log");
        let mut w = LogWriter::open(&p, 300, 3).unwrap();
        for i in 0..20 {
            w.write("stdout", format!("line {i}").as_bytes()).unwrap();
        }
        assert!(p.with_extension("log.1").exists());
        assert!(!PathBuf::from(format!("{}.3", p.display())).exists());
        let lines = read_all(&p);
        let nums: Vec<u32> = lines.iter().map(|l| l.log.trim_start_matches("line ").parse().unwrap()).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
        assert_eq!(*nums.last().unwrap(), 19);
        assert!(nums.len() < 20, "old lines rotated away");
        let total: u64 = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(total <= 3 * 300 + 100);
    }
}
