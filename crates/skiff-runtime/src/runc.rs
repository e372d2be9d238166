//! A thin, synchronous wrapper over the `runc` command line — and gVisor's `runsc`, which
//! speaks the same one.

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
    /// Global flags before each command (`--platform=ptrace` for runsc).
    pub args: Vec<String>,
    /// The network namespace commands run in: a gVisor sandbox answers on an abstract
    /// unix socket, which only processes in its network namespace reach. When the file
    /// cannot be opened (the namespace is gone) commands run where the caller is.
    pub netns: Option<PathBuf>,
}

/// `1.1.5` from `runc version 1.1.5+ds1\ncommit: ...` (and `0.0~20221219.0` from
/// `runsc version 0.0~20221219.0`).
pub fn parse_version(out: &str) -> Option<String> {
    let first = out.lines().next()?;
    let v = first.strip_prefix("runc version ").or_else(|| first.strip_prefix("runsc version "))?.trim();
    let v = v.split('+').next()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// gVisor's platforms that need nothing of the host but ptrace (`systrap` is newer
/// runsc's default, `ptrace` older ones'; `kvm` needs /dev/kvm).
pub const RUNSC_DEFAULT_PLATFORM: &str = "ptrace";

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
        Runc { bin: PathBuf::from("runc"), root: root.into(), args: vec![], netns: None }
    }

    /// gVisor's `runsc` on `platform`, its state under `root`. Each sandbox's network is
    /// chosen when it starts ([`Runc::runsc_network`]).
    pub fn runsc(root: impl Into<PathBuf>, platform: &str) -> Self {
        Runc {
            bin: PathBuf::from("runsc"),
            root: root.into(),
            args: vec![format!("--platform={platform}")],
            netns: None,
        }
    }

    /// Whether this is gVisor's runsc.
    pub fn is_runsc(&self) -> bool {
        self.bin.file_name().is_some_and(|n| n == "runsc")
    }

    /// runsc's network flag for a sandbox in `netns` (none: no network at all).
    ///
    /// In a namespace it is `--network=host` with runsc started inside that namespace (the
    /// shim's `start_in_netns`): the Sentry's sockets are host sockets, but in the
    /// instance's own namespace — the veth on the node's bridge — as with runc. gVisor's
    /// netstack (`--network=sandbox`) is not used: runsc before 2023 mistakes every
    /// namespace for the root one on kernels since 6.x, which expose
    /// `net.core.rmem_default` per namespace, and refuses to start.
    pub fn runsc_network(netns: Option<&Path>) -> &'static str {
        match netns {
            Some(_) => "--network=host",
            None => "--network=none",
        }
    }

    /// This runner with its commands run in `netns`.
    pub fn in_netns(&self, netns: Option<PathBuf>) -> Runc {
        Runc { netns, ..self.clone() }
    }

    /// Runs `f` (which starts a process) in [`Runc::netns`] when it can be joined.
    pub fn spawning<T: Send>(&self, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
        match self.netns.as_ref().and_then(|p| std::fs::File::open(p).ok()) {
            Some(ns) => crate::netlink::on_thread_in(&ns, f)?,
            None => f(),
        }
    }

    /// The runc version (`1.1.5` from `runc version 1.1.5+ds1`), if runc answers.
    pub fn version(&self) -> Option<String> {
        let out = Command::new(&self.bin).arg("--version").stdin(Stdio::null()).output().ok()?;
        parse_version(&String::from_utf8_lossy(&out.stdout))
    }

    /// The seccomp filter flags this runc applies (`runc features`, runc 1.1 and later;
    /// `SECCOMP_FILTER_FLAG_LOG` from runc 1.2). Empty when it says none or cannot say.
    pub fn seccomp_flags(&self) -> Vec<String> {
        self.seccomp_features("supportedFlags")
    }

    /// The seccomp actions this runc's libseccomp applies (`runc features`; runc 1.1 and
    /// later). Empty when it cannot say.
    pub fn seccomp_actions(&self) -> Vec<String> {
        self.seccomp_features("actions")
    }

    fn seccomp_features(&self, key: &str) -> Vec<String> {
        let Ok(out) = Command::new(&self.bin).arg("features").stdin(Stdio::null()).output() else { return vec![] };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let list = v["linux"]["seccomp"][key].as_array().cloned().unwrap_or_default();
        list.iter().filter_map(|f| f.as_str().map(str::to_string)).collect()
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root).args(&self.args);
        c
    }

    fn run(&self, op: &'static str, id: &str, args: &[&str]) -> Result<Vec<u8>, RuncError> {
        let out = self
            .spawning(|| self.command().args(args).stdin(Stdio::null()).output())
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
            .spawning(|| {
                self.command()
                    .arg("exec")
                    .arg(id)
                    .args(argv)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
            })
            .map_err(|source| RuncError::Spawn { bin: self.bin.clone(), source })?;
        let t_out = drain(child.stdout.take());
        let t_err = drain(child.stderr.take());
        let Some(status) = wait_bounded(&mut child, timeout) else {
            return Err(RuncError::Timeout { id: id.to_string(), timeout });
        };
        let stdout = t_out.join().unwrap_or_default();
        let stderr = t_err.join().unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Ok(ExecOutput { code, stdout, stderr })
    }
}

impl Runc {
    /// Starts `argv` in the container in the foreground, on the given stdio (`runc exec`).
    /// Its exit code is the command's (128 + the signal that ended it); the command's host
    /// pid is written to `pid_file`. With `tty`, runc makes a terminal in the container
    /// and copies between it and `stdio`, which should then be a terminal: runc passes on
    /// its size at the start and again whenever it gets SIGWINCH.
    pub fn exec_spawn(
        &self,
        id: &str,
        argv: &[String],
        tty: bool,
        pid_file: &Path,
        [stdin, stdout, stderr]: [Stdio; 3],
    ) -> Result<std::process::Child, RuncError> {
        self.spawning(|| {
            let mut c = self.command();
            c.arg("exec").arg("--pid-file").arg(pid_file);
            if tty {
                // As `docker exec -t`: programs that draw (top, vi) need to know the kind.
                c.args(["--tty", "--env", "TERM=xterm"]);
            }
            c.arg(id).args(argv).stdin(stdin).stdout(stdout).stderr(stderr).spawn()
        })
        .map_err(|source| RuncError::Spawn { bin: self.bin.clone(), source })
    }
}

/// Whether gVisor runs here: `runsc do true` in a throw-away sandbox (no network, the
/// host's root read-only under an overlay), bounded to 30 s. `Ok(version)`, or why not
/// (not installed, the kernel refuses its platform, ...).
pub fn probe_runsc(platform: &str) -> Result<String, String> {
    // A fresh directory of our own (created, not reused: nobody else's symlink or
    // directory is written through). Empty ones a killed probe left are removed first.
    sweep_probe_dirs(&std::env::temp_dir());
    let name = skiff_sys::random::hex(8).map_err(|e| format!("random: {e}"))?;
    let root = std::env::temp_dir().join(format!("skiff-runsc-probe-{name}"));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    }
    let runc = Runc::runsc(&root, platform);
    let version = match Command::new(&runc.bin).arg("--version").stdin(Stdio::null()).output() {
        Ok(out) => parse_version(&String::from_utf8_lossy(&out.stdout)).unwrap_or_else(|| "unknown".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("runsc is not installed".into()),
        Err(e) => return Err(format!("runsc: {e}")),
    };
    let res = (|| {
        let mut child = runc
            .command()
            .args([Runc::runsc_network(None), "do", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("runsc: {e}"))?;
        let err = drain(child.stderr.take());
        let Some(status) = wait_bounded(&mut child, Duration::from_secs(30)) else {
            return Err(format!("runsc --platform={platform} do true did not finish in 30 s"));
        };
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).trim().to_string();
        if status.success() {
            Ok(version)
        } else {
            let last = stderr.lines().last().unwrap_or("no output").to_string();
            Err(format!("runsc --platform={platform} cannot run a sandbox here ({status}): {last}"))
        }
    })();
    let _ = std::fs::remove_dir_all(&root);
    res
}

/// Removes empty `skiff-runsc-probe-*` directories older than a minute under `dir` (a
/// probe killed half-way cannot remove its own); anything else is left alone.
fn sweep_probe_dirs(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with("skiff-runsc-probe-")
            && std::fs::symlink_metadata(e.path()).is_ok_and(|m| {
                m.is_dir() && m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a.as_secs() > 60)
            });
        if stale {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// Waits for `child` at most `limit`; past it, kills it and says `None`.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_empty_probe_dirs_are_swept_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
        let mk = |name: &str, age: bool| {
            let p = t.path().join(name);
            std::fs::create_dir(&p).unwrap();
            if age {
                std::fs::File::open(&p).unwrap().set_modified(old).unwrap();
            }
            p
        };
        let stale = mk("skiff-runsc-probe-aa", true);
        let fresh = mk("skiff-runsc-probe-bb", false);
        let other = mk("somebody-else", true);
        let full = mk("skiff-runsc-probe-cc", false);
        std::fs::write(full.join("state"), "x").unwrap();
        std::fs::File::open(&full).unwrap().set_modified(old).unwrap();
        sweep_probe_dirs(t.path());
        assert!(!stale.exists() && fresh.exists() && other.exists() && full.exists());
    }
}
