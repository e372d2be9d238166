//! `skiff shim`: one small process per container that owns its stdio and exit status, so
//! the agent can restart (or be upgraded) without touching running containers.
//!
//! Life of a shim:
//! 1. The agent runs `skiff shim --bundle DIR --daemon`; the shim moves to a new session
//!    (so signals for the agent's terminal or process group never reach it). A tiny thread
//!    in the agent reaps it; if the agent dies, the shim is re-parented to init.
//! 2. The shim makes itself a child subreaper, creates two pipes and runs
//!    `runc run --detach` with them as the container's stdout/stderr.
//! 3. It reports `ok <pid>` (or `err <message>`) on the pipe the agent reads, then copies
//!    container output into `container.log` as JSON lines until the container exits.
//! 4. It waits for the container's init, reads the OOM counter from the cgroup, deletes
//!    the runc container, and finally writes `exit.json` (atomically). An `exit.json`
//!    therefore always means: the container is gone and the id is free again.

use crate::attach;
use crate::cgroup::Cgroups;
use crate::logs::{LogWriter, MAX_LINE};
use crate::runc::{last_log_error, Runc};
use serde::{Deserialize, Serialize};
use skiff_model::ExitStatus;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Written by the agent as `shim.json` in the bundle directory. A WebAssembly instance
/// has a `wasm.json` beside it ([`crate::wasm`]) and no runc settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimConfig {
    pub id: String,
    #[serde(default)]
    pub runc: PathBuf,
    #[serde(default)]
    pub runc_root: PathBuf,
    /// Global flags of the runtime binary (runsc's platform).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runc_args: Vec<String>,
    /// A network namespace the runtime binary is started in (runsc with `--network=host`
    /// takes the namespace it is started in as the sandbox's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_in_netns: Option<PathBuf>,
    #[serde(default)]
    pub cgroups_path: String,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    /// The container runs on a terminal the shim holds (`process.terminal` in its spec).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// Its stdin stays open for attachments to write to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin_open: bool,
}

pub const SHIM_CONFIG: &str = "shim.json";
pub const EXIT_FILE: &str = "exit.json";
pub const LOG_FILE: &str = "container.log";
pub const PID_FILE: &str = "init.pid";
/// Where runc sends a terminal container's terminal (only while it starts).
pub const CONSOLE_SOCKET: &str = "console.sock";
/// How long a terminal container's runtime may take to send its terminal.
const CONSOLE_WAIT: Duration = Duration::from_secs(60);
pub const SHIM_PID_FILE: &str = "shim.pid";
/// The shim's identity, `<boot id> <start time>` ([`crate::procfs::identity`]): tells the
/// shim from a later process that got its pid.
pub const SHIM_ID_FILE: &str = "shim.id";

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("starting the shim: {0}")]
    Spawn(std::io::Error),
    #[error("instance {id} did not start: {message}")]
    Start { id: String, message: String },
    #[error("shim for {id} gave no answer")]
    NoAnswer { id: String },
}

/// Starts a shim for the bundle and waits until the container runs; returns its pid.
/// Blocking: call it off the async runtime.
///
/// The shim puts itself in a new session; while this process lives, a small thread reaps
/// it when it ends. If this process dies first, the shim is re-parented to init.
pub fn launch(skiff_bin: &Path, bundle: &Path, id: &str) -> Result<i32, ShimError> {
    let mut child = Command::new(skiff_bin)
        .arg("shim")
        .arg("--bundle")
        .arg(bundle)
        .arg("--daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(ShimError::Spawn)?;
    let out = child.stdout.take();
    reap(child);
    match out {
        Some(out) => read_answer(&mut BufReader::new(out), id),
        None => Err(ShimError::NoAnswer { id: id.to_string() }),
    }
}

/// While this process lives, a tiny thread waits for `child` (a shim) when it ends.
pub(crate) fn reap(mut child: std::process::Child) {
    let _ = std::thread::Builder::new().name("shim-reaper".into()).stack_size(32 * 1024).spawn(move || {
        let _ = child.wait();
    });
}

/// The shim's answer on its stdout: `ok <pid>` or `err <message>`.
pub(crate) fn read_answer(out: &mut impl BufRead, id: &str) -> Result<i32, ShimError> {
    let mut line = String::new();
    let _ = out.take(64 * 1024).read_line(&mut line);
    let line = line.trim();
    if let Some(pid) = line.strip_prefix("ok ") {
        return pid.parse().map_err(|_| ShimError::NoAnswer { id: id.to_string() });
    }
    if let Some(msg) = line.strip_prefix("err ") {
        return Err(ShimError::Start { id: id.to_string(), message: msg.to_string() });
    }
    Err(ShimError::NoAnswer { id: id.to_string() })
}

/// Entry point of `skiff shim --bundle DIR [--daemon]`. Returns the process exit code.
pub fn main(bundle: &Path, daemon: bool) -> i32 {
    if !daemon {
        // By hand: start the daemon and print its answer.
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        let id = bundle.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return match launch(&exe, bundle, &id) {
            Ok(pid) => {
                println!("ok {pid}");
                0
            }
            Err(e) => {
                println!("err {e}");
                1
            }
        };
    }
    let _ = nix::unistd::setsid();
    let report = |msg: String| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{msg}");
        let _ = out.flush();
    };
    match run(bundle, &report) {
        Ok(()) => 0,
        Err(msg) => {
            report(format!("err {msg}"));
            1
        }
    }
}

pub(crate) fn diag(bundle: &Path, msg: &str) {
    if let Ok(mut f) = skiff_sys::regular::append(&bundle.join("shim.log")) {
        let _ = writeln!(f, "{} {msg}", crate::time::rfc3339_nanos(std::time::SystemTime::now()));
    }
}

/// Reads a JSON file of the bundle.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(bundle: &Path, name: &str) -> Result<T, String> {
    std::fs::read(bundle.join(name))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("reading {}: {e}", bundle.join(name).display()))
}

/// The exit the shim recorded, if it did.
pub fn recorded_exit(bundle: &Path) -> Option<ExitStatus> {
    serde_json::from_slice(&skiff_sys::regular::read(&bundle.join(EXIT_FILE), 64 * 1024).ok()?).ok()
}

/// Writes `exit.json` atomically: from then on the instance counts as ended.
pub(crate) fn write_exit(bundle: &Path, exit: &ExitStatus) {
    // Durably: after a power cut the exit is still known (or the instance counts as lost).
    let bytes = serde_json::to_vec(exit).unwrap_or_default();
    if skiff_sys::durable::write(&bundle.join(EXIT_FILE), &bytes, 0o600).is_err() {
        diag(bundle, "could not write exit.json");
    }
    diag(bundle, &format!("exited: code {} signal {:?} oom {}", exit.code, exit.signal, exit.oom_killed));
}

/// What every shim does first for its bundle: read its settings, record who it is, and
/// clear what a previous run of the instance left.
pub(crate) fn begin(bundle: &Path) -> Result<ShimConfig, String> {
    let cfg: ShimConfig = read_config(bundle, SHIM_CONFIG)?;
    let pid = std::process::id();
    let _ = std::fs::write(bundle.join(SHIM_PID_FILE), pid.to_string());
    let _ = std::fs::write(bundle.join(SHIM_ID_FILE), crate::procfs::identity(pid).unwrap_or_default());
    let _ = std::fs::remove_file(bundle.join(EXIT_FILE));
    let _ = std::fs::remove_file(bundle.join(PID_FILE));
    let _ = std::fs::remove_file(bundle.join(crate::attach::ATTACH_SOCKET));
    Ok(cfg)
}

fn run(bundle: &Path, report: &dyn Fn(String)) -> Result<(), String> {
    let cfg = begin(bundle)?;
    if bundle.join(crate::wasm::WASM_CONFIG).exists() {
        return crate::wasm::run_shim(bundle, &cfg, report, None);
    }
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("set_child_subreaper: {e}"))?;
    let runc = Runc {
        bin: cfg.runc.clone(),
        root: cfg.runc_root.clone(),
        args: cfg.runc_args.clone(),
        netns: cfg.start_in_netns.clone(),
    };
    let runc_log = bundle.join("runc.log");
    let _ = std::fs::remove_file(&runc_log);

    // With a terminal, runc makes it and sends us its master end over a console socket;
    // else the container's stdout and stderr are two pipes (and stdin a third, kept open
    // for attachments, with `stdin_open`).
    let mut console = None;
    let mut stdio = [Stdio::null(), Stdio::null(), Stdio::null()];
    let mut readers: Vec<(std::fs::File, u8, &str)> = vec![];
    let mut stdin_w = None;
    if cfg.tty {
        let (guard, path) = crate::attach::socket_path(bundle, CONSOLE_SOCKET, std::process::id())
            .map_err(|e| format!("the console socket: {e}"))?;
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|e| format!("the console socket: {e}"))?;
        console = Some((guard, path, listener));
    } else {
        let (out_r, out_w) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
        let (err_r, err_w) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
        stdio[1] = out_w.into();
        stdio[2] = err_w.into();
        readers.push((std::fs::File::from(std::os::fd::OwnedFd::from(out_r)), attach::OUT_STDOUT, "stdout"));
        readers.push((std::fs::File::from(std::os::fd::OwnedFd::from(err_r)), attach::OUT_STDERR, "stderr"));
        if cfg.stdin_open {
            let (in_r, in_w) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
            stdio[0] = in_r.into();
            stdin_w = Some(std::fs::File::from(std::os::fd::OwnedFd::from(in_w)));
        }
    }
    // `runc run --detach` is create + start in one process; the container keeps the pipes
    // as its stdio and, once runc exits, becomes our child (we are its subreaper).
    let mut run = runc.command();
    run.arg("--log").arg(&runc_log).arg("--log-format").arg("json").arg("run").arg("--detach");
    if let Some((_, path, _)) = &console {
        run.arg("--console-socket").arg(path);
    }
    let [stdin, stdout, stderr] = stdio;
    run.arg("--bundle")
        .arg(bundle)
        .arg("--pid-file")
        .arg(bundle.join(PID_FILE))
        .arg(&cfg.id)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    // runc connects while it creates the container: take the terminal meanwhile.
    let terminal = console.map(|(guard, path, listener)| {
        std::thread::spawn(move || {
            let _guard = guard;
            let got = accept_within(&listener, CONSOLE_WAIT).and_then(|conn| skiff_sys::pty::recv_fd(&conn));
            let _ = std::fs::remove_file(path);
            got
        })
    });
    // runc and the container start with Docker's umask (022), not the agent's 077: the
    // directories runc makes for mount points (`/run/secrets`) must be traversable by the
    // container's users, and its programs' files readable as they expect. Put back once
    // runc is done.
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // Started anywhere else the sandbox would take that namespace's network: no fallback.
    let status = match &cfg.start_in_netns {
        Some(ns) => std::fs::File::open(ns)
            .and_then(|f| crate::netlink::on_thread_in(&f, || run.status())?)
            .map_err(|e| format!("running {} in {}: {e}", runc.bin.display(), ns.display())),
        None => run.status().map_err(|e| format!("running {}: {e}", runc.bin.display())),
    };
    nix::sys::stat::umask(umask);
    // The command holds our copies of the pipes' write ends: only without them do the
    // copiers see the end of the output when the container is gone.
    drop(run);
    let status = status?;
    if !status.success() {
        let msg = last_log_error(&runc_log).unwrap_or_else(|| format!("runc run exited with {status}"));
        let _ = runc.delete(&cfg.id);
        return Err(msg);
    }
    // The container runs from here on: a step that fails below takes it down again, so
    // no container is left without its shim (no log, no exit, nothing to attach to).
    let started = (|| -> Result<(i32, attach::Input, LogWriter), String> {
        let pid: i32 = std::fs::read_to_string(bundle.join(PID_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| "runc run wrote no pid".to_string())?;
        let input = match terminal {
            Some(t) => {
                let master = t
                    .join()
                    .map_err(|_| "taking the terminal failed".to_string())?
                    .map_err(|e| format!("taking the container's terminal: {e}"))?;
                let master = std::fs::File::from(master);
                let reader = master.try_clone().map_err(|e| format!("the terminal: {e}"))?;
                readers.push((reader, attach::OUT_STDOUT, "stdout"));
                attach::Input::Terminal { master, stdin_open: cfg.stdin_open }
            }
            None => stdin_w.map_or(attach::Input::None, |w| attach::Input::Pipe(Mutex::new(Some(w)))),
        };
        let log = LogWriter::open(&bundle.join(LOG_FILE), cfg.log_max_bytes, cfg.log_max_files)
            .map_err(|e| format!("opening the log: {e}"))?;
        Ok((pid, input, log))
    })();
    let (pid, input, log) = match started {
        Ok(s) => s,
        Err(msg) => {
            let _ = runc.kill(&cfg.id, "KILL");
            let _ = runc.delete(&cfg.id);
            return Err(msg);
        }
    };
    let attachments = attach::Attachments::default();
    if let Err(e) = attachments.serve(bundle, input) {
        // The container runs all the same; only `skiff attach` cannot reach it.
        diag(bundle, &format!("no attachments: {e}"));
    }
    let log = Arc::new(Mutex::new(log));
    let copiers: Vec<_> = readers
        .into_iter()
        .map(|(r, kind, stream)| {
            let (log, attachments) = (Arc::clone(&log), attachments.clone());
            let tty = cfg.tty;
            std::thread::spawn(move || copy_output(r, kind, stream, tty, &log, &attachments))
        })
        .collect();
    report(format!("ok {pid}"));
    diag(bundle, &format!("container {} started, pid {pid}", cfg.id));

    let (code, signal) = wait_for(pid);
    // When it ended, as Docker's FinishedAt: the restart back-off counts from here, not
    // from after the clean-up below (`runc delete` is a process of its own).
    let finished_at_ms = crate::time::now_ms();
    for c in copiers {
        let _ = c.join();
    }
    let cg = Cgroups::detect();
    let oom_killed = cg.stats(&cfg.cgroups_path).oom_kills > 0;
    if let Err(e) = runc.delete(&cfg.id) {
        diag(bundle, &format!("runc delete: {e}"));
    }
    let exit = ExitStatus { code, signal, oom_killed, finished_at_ms, message: None };
    write_exit(bundle, &exit);
    // Attachments get the exit code after all the output, once `exit.json` is there.
    attachments.close(code);
    let _ = std::fs::remove_file(bundle.join(attach::ATTACH_SOCKET));
    Ok(())
}

/// Copies one output stream of the container, as it comes, to its attachments, and line
/// by line to its log (a line longer than [`MAX_LINE`] is split; on a terminal, whose
/// lines end "\r\n", the "\r" before a "\n" is dropped). Ends at the end of the stream (a
/// terminal's master reads EIO once the container's side is closed).
fn copy_output(
    mut r: std::fs::File,
    kind: u8,
    stream: &str,
    tty: bool,
    log: &Mutex<LogWriter>,
    attachments: &attach::Attachments,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::with_capacity(256);
    let flush = |line: &mut Vec<u8>| {
        if let Ok(mut w) = log.lock() {
            let _ = w.write(stream, line);
        }
        line.clear();
    };
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        attachments.send(kind, &buf[..n]);
        for mut piece in buf[..n].split_inclusive(|b| *b == b'\n') {
            while !piece.is_empty() {
                let room = MAX_LINE - line.len();
                let (now, rest) = piece.split_at(piece.len().min(room));
                line.extend_from_slice(now);
                piece = rest;
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if tty && line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    flush(&mut line);
                } else if line.len() == MAX_LINE {
                    flush(&mut line);
                }
            }
        }
    }
    if !line.is_empty() {
        flush(&mut line);
    }
}

/// Accepts one connection on `listener`, waiting at most `limit`.
fn accept_within(
    listener: &std::os::unix::net::UnixListener,
    limit: Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the runtime sent no terminal"))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits for the container's init (our child after re-parenting). Reaps any other
/// orphans on the way. Returns (code, signal) with Docker's 128+signal convention.
fn wait_for(pid: i32) -> (i32, Option<i32>) {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => return (code, None),
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => return (128 + sig as i32, Some(sig as i32)),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => {
                // Not our child (re-parenting failed): poll until it is gone; the code is lost.
                while Path::new(&format!("/proc/{pid}")).exists() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                return (255, None);
            }
        }
    }
}
