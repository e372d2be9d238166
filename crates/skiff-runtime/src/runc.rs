//! A thin, synchronous wrapper over the `runc` command line.

use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuncError {
    #[error("starting {bin}: {source}")]
    Spawn { bin: PathBuf, source: std::io::Error },
    #[error("runc {op} {id}: {message}")]
    Failed { op: &'static str, id: String, message: String },
    #[error("runc exec in {id} timed out after {timeout:?}")]
    Timeout { id: String, timeout: Duration },
}

#[derive(Debug, Clone)]
pub struct Runc {
    pub bin: PathBuf,
    pub root: PathBuf,
}

/// `1.1.5` from `runc version 1.1.5+ds1\ncommit: ...`.
pub fn parse_version(out: &str) -> Option<String> {
    let v = out.lines().next()?.strip_prefix("runc version ")?.trim();
    let v = v.split('+').next()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuncState {
    pub id: String,
    pub pid: i32,
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Runc {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Runc { bin: PathBuf::from("runc"), root: root.into() }
    }

    /// The runc version (`1.1.5` from `runc version 1.1.5+ds1`), if runc answers.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.bin).arg("--version").stdin(Stdio::null()).output().ok()?;
        parse_version(&String::from_utf8_lossy(&out.stdout))
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        c
    }

    fn run(&self, op: &'static str, id: &str, args: &[&str]) -> Result<Vec<u8>, RuncError> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| RuncError::Spawn { bin: self.bin.clone(), source })?;
        if !out.status.success() {
            return Err(RuncError::Failed {
                op,
                id: id.to_string(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// The container's state, or None when runc does not know it.
    pub fn state(&self, id: &str) -> Option<RuncState> {
        let out = self.run("state", id, &["state", id]).ok()?;
        serde_json::from_slice(&out).ok()
    }

    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuncError> {
        self.run("kill", id, &["kill", id, signal]).map(|_| ())
    }

    pub fn delete(&self, id: &str) -> Result<(), RuncError> {
        self.run("delete", id, &["delete", "--force", id]).map(|_| ())
    }

    pub fn list(&self) -> Vec<String> {
        self.run("list", "", &["list", "-q"])
            .map(|o| String::from_utf8_lossy(&o).lines().map(str::to_string).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    }

    /// Runs `argv` inside the container, capturing output, killed after `timeout`.
    pub fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecOutput, RuncError> {
        let mut child = self
            .command()
            .arg("exec")
            .arg(id)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RuncError::Spawn { bin: self.bin.clone(), source })?;
        let t_out = drain(child.stdout.take());
        let t_err = drain(child.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RuncError::Timeout { id: id.to_string(), timeout });
                }
            }
        };
        let stdout = t_out.join().unwrap_or_default();
        let stderr = t_err.join().unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Ok(ExecOutput { code, stdout, stderr })
    }
}

/// The most of each of an exec's stdout and stderr that is kept.
pub const MAX_EXEC_OUTPUT: u64 = 16 << 20;

/// Reads a child's pipe to its end on a thread, keeping the first [`MAX_EXEC_OUTPUT`]
/// bytes: the rest is read and dropped, so a command with more to say finishes rather
/// than dying of a broken pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = vec![];
        if let Some(mut p) = pipe {
            let _ = (&mut p).take(MAX_EXEC_OUTPUT).read_to_end(&mut v);
            let _ = std::io::copy(&mut p, &mut std::io::sink());
        }
        v
    })
}

/// The last error runc wrote to its `--log` file (JSON lines), if any.
pub fn last_log_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["level"] == "error").then(|| v["msg"].as_str().map(str::to_string))?
    })
}
