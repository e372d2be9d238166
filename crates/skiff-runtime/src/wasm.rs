//! The `wasm` backend: each instance is a `skiff shim` process that runs the WebAssembly
//! program itself, with wasmtime (`skiff-wasm`), instead of handing a bundle to runc.
//!
//! ```text
//! <root>/<id>/shim.json   log settings          <root>/<id>/wasm.json  module, argv, env, limits
//! <root>/<id>/shim.pid, shim.id, init.pid (the shim runs the guest)        (root's, 0711)
//! <root>/<id>/state/container.log[.N], exit.json, shim.log  (the instance's user's, 0700)
//! ```
//!
//! The shim sets up as root (joins the namespace, loads the program, binds its ports,
//! opens its log, enters its cgroup), then becomes the instance's own unprivileged user
//! ([`uid_for`]; group: its deployment's, [`gid_for`]) with no capabilities. What it
//! writes from then on is in `state/`, the only place that user may write; what the
//! agent writes for it (its settings) stays out of its reach.
//!
//! Everything else is as for containers: the shim is started the same way (its own
//! session, so it outlives the agent), its output goes to `container.log` and its end to
//! `exit.json`, and the agent adopts it after a restart through the same files. The shim
//! joins the instance's network namespace before anything else, so a `wasi:http`
//! component listens on the instance's address and `wasi:sockets` sees only that
//! namespace.
//!
//! Signals: a WASI program cannot catch any, so a stop signal ends it at once — the
//! shim's signal thread records `128 + signal` and exits (its output so far is kept).

use crate::cgroup::{CgroupLimits, CgroupStats};
use crate::logs::{LineSink, LogWriter};
use crate::runc::ExecOutput;
use crate::shim::{self, ShimConfig};
use crate::{CreateRequest, Liveness, Runtime, RuntimeError};
use serde::{Deserialize, Serialize};
use skiff_image::ImageInfo;
use skiff_model::{Deployment, ExitStatus, NetworkMode, Protocol};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The program's settings in the bundle.
pub const WASM_CONFIG: &str = "wasm.json";

/// Whether this build runs WebAssembly (the `wasm` cargo feature).
pub const AVAILABLE: bool = true;

/// `wasm.json`: what the shim runs, and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WasmShim {
    pub spec: skiff_wasm::Spec,
    /// The network namespace to join first (bridge mode); with none and `spec.network`
    /// off, the shim makes an empty one of its own.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The unprivileged user and group the shim becomes once it has set up ([`uid_for`],
    /// [`gid_for`]).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// The cgroup the shim enters (`/skiff/<id>`), and its limits.
    #[serde(default)]
    pub cgroup: Option<(String, crate::cgroup::OwnLimits)>,
}

pub use crate::wasm_user::{gid_for, uid_for};

/// Where an instance's shim writes once it dropped its privileges.
pub const STATE_DIR: &str = "state";

/// Memory a wasm shim uses beside its guest's linear memories (the engine, the compiled
/// code, the runtime): added to `--memory` for its cgroup's limit.
pub const SHIM_OVERHEAD: u64 = 64 << 20;
/// Tasks (threads) in a wasm shim's cgroup.
pub const SHIM_PIDS: u64 = 256;

/// Every address of this host's interfaces: out of bounds for guests unless allowed.
pub fn host_addrs() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return vec![] };
    let mut v: Vec<std::net::IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| std::net::IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

pub struct WasmRuntime {
    root: PathBuf,
    cache_dir: PathBuf,
    skiff_bin: PathBuf,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    /// The shim started ahead of need, if one is ready (see [`Spare`]).
    spare: Arc<Mutex<Option<Spare>>>,
    /// Whether starts use (and keep) a spare shim.
    use_spares: bool,
}

/// A shim started before it has work: `skiff shim --spare ROOT` has made its session, its
/// wasmtime engine and WASI linkers, and waits on its stdin for a bundle path. A start
/// hands it one and reads the usual `ok <pid>`, then a new spare is started in the
/// background. So a start pays neither for a process nor for wasmtime's set-up: the
/// pre-forked worker of servers and the zygote of Android, for one runtime. When the
/// agent goes away the spare reads EOF and exits.
struct Spare {
    pid: u32,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Spare {
    /// Starts one and waits (in the calling thread) until it says `ready`.
    fn start(skiff_bin: &Path, root: &Path) -> Option<Spare> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(skiff_bin)
            .arg("shim")
            .arg("--spare")
            .arg(root)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let (stdin, stdout, pid) = (child.stdin.take()?, child.stdout.take()?, child.id());
        shim::reap(child);
        let mut stdout = std::io::BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).ok()?;
        (line.trim() == "ready").then_some(Spare { pid, stdin, stdout })
    }

    /// Hands it `bundle`: its answer, or None when it is gone (start another way). Its
    /// cgroup becomes the instance's `cgroup` first, where the host allows (v1), so the
    /// shim need not move.
    fn run(mut self, bundle: &Path, id: &str, cgroup: &str) -> Option<Result<i32, shim::ShimError>> {
        use std::io::Write;
        let cgroups = crate::cgroup::Cgroups::detect();
        let own = crate::cgroup::spare_cgroup(self.pid);
        let adopted = cgroups.adopt(&own, cgroup);
        let sent = writeln!(self.stdin, "{}", bundle.display()).and_then(|_| self.stdin.flush());
        let answer = match sent.map(|_| shim::read_answer(&mut self.stdout, id)) {
            Err(_) | Ok(Err(shim::ShimError::NoAnswer { .. })) => None,
            Ok(answer) => Some(answer),
        };
        if !adopted {
            // Left empty once the shim moved to its own, or once a spare that failed has
            // exited (which may take a moment: removed in the background, with retries).
            let _ = std::thread::Builder::new().name("spare-cgroup".into()).spawn(move || cgroups.remove(&own));
        }
        answer
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io { op, path: path.to_path_buf(), source }
}

/// The program's argv. An image with a filesystem (`wasi/wasm`) follows Docker's rules
/// and its entrypoint names the module (`/app.wasm`); for an artifact — the image *is*
/// the module — argv[0] is the image's name, then the deployment's command.
pub fn argv(d: &Deployment, info: &ImageInfo) -> Vec<String> {
    if info.wasm.is_none() {
        return crate::spec::argv(d, &info.config).unwrap_or_default();
    }
    let name = d.image.rsplit('/').next().unwrap_or(&d.image).split([':', '@']).next().unwrap_or("main");
    let entry = d.entrypoint.clone().unwrap_or_else(|| vec![name.to_string()]);
    entry.into_iter().chain(d.command.iter().flatten().cloned()).collect()
}

/// What the instance runs, as the shim will be told (`wasm.json`'s `spec`).
pub fn spec(req: &CreateRequest<'_>, module: &skiff_image::WasmModule, cache_dir: &Path) -> skiff_wasm::Spec {
    let d = req.deployment;
    let mut env = std::collections::BTreeMap::new();
    crate::spec::layer_env(&mut env, d, &req.image.config, None);
    let mut http_ports: Vec<u16> =
        d.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.container_port).collect();
    http_ports.sort_unstable();
    http_ports.dedup();
    skiff_wasm::Spec {
        module: module.path.clone(),
        module_id: module.id.clone(),
        cache_dir: cache_dir.to_path_buf(),
        argv: argv(d, req.image),
        env: env.into_iter().collect(),
        preopens: req
            .volumes
            .iter()
            .map(|(host, guest, ro)| skiff_wasm::Preopen { host: host.clone(), guest: guest.clone(), read_only: *ro })
            .collect(),
        memory_bytes: d.resources.memory_bytes,
        cpus_millis: d.resources.cpus_millis,
        timeout_ms: d.wasm.timeout_ms,
        pool: d.wasm.pool,
        http_ports,
        network: d.network != NetworkMode::None,
        allow_local: d.wasm.allow_local,
        node_addrs: host_addrs(),
    }
}

/// The cgroup of a wasm instance (as a container's: `/skiff/<id>`).
fn cgroup_of(id: &str) -> String {
    format!("/skiff/{id}")
}

impl WasmRuntime {
    /// `root` holds instance directories, `cache_dir` the compiled programs.
    pub fn new(
        root: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        skiff_bin: impl Into<PathBuf>,
    ) -> Result<Self, RuntimeError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("create", &root))?;
        // Traversable (not listable) down to each instance's `state/`, which its shim
        // writes as the instance's own user.
        for d in [root.parent(), Some(root.as_path())].into_iter().flatten() {
            skiff_sys::perms::traversable(d).map_err(|e| RuntimeError::Io {
                op: "chmod",
                path: e.path,
                source: e.source,
            })?;
        }
        // Spares killed before they could leave their cgroups.
        crate::cgroup::Cgroups::detect().sweep_spares();
        Ok(WasmRuntime {
            root,
            cache_dir: cache_dir.into(),
            skiff_bin: skiff_bin.into(),
            log_max_bytes: 10 << 20,
            log_max_files: 3,
            spare: Default::default(),
            use_spares: true,
        })
    }

    /// Starts without a spare shim (each start launches one), as a benchmark compares.
    pub fn without_spares(mut self) -> Self {
        self.use_spares = false;
        self
    }

    /// Starts a spare in the background unless one is ready.
    fn refill(&self) {
        let (slot, bin, root) = (Arc::clone(&self.spare), self.skiff_bin.clone(), self.root.clone());
        if slot.lock().map(|s| s.is_some()).unwrap_or(true) {
            return;
        }
        let _ = std::thread::Builder::new().name("wasm-spare".into()).spawn(move || {
            if let Some(new) = Spare::start(&bin, &root) {
                if let Ok(mut s) = slot.lock() {
                    // Another refill may have been quicker: the extra one reads EOF and exits.
                    s.get_or_insert(new);
                }
            }
        });
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Where the instance's shim writes after dropping its privileges.
    pub fn state(&self, id: &str) -> PathBuf {
        self.dir(id).join(STATE_DIR)
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The shim of this instance, if it is alive: the process at its pid must have the
    /// identity (boot and start time) the shim recorded, since pids are reused.
    fn shim_pid(&self, id: &str) -> Option<i32> {
        let dir = self.dir(id);
        let pid: u32 = fs::read_to_string(dir.join(shim::SHIM_PID_FILE)).ok()?.trim().parse().ok()?;
        let recorded = fs::read_to_string(dir.join(shim::SHIM_ID_FILE)).ok()?;
        (crate::procfs::identity(pid)? == recorded.trim()).then_some(pid as i32)
    }

    fn shim_spec(&self, id: &str) -> Option<WasmShim> {
        shim::read_config(&self.dir(id), WASM_CONFIG).ok()
    }
}

impl Runtime for WasmRuntime {
    fn kind(&self) -> &'static str {
        "wasm"
    }

    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
        let module = req.wasm.as_ref().ok_or_else(|| RuntimeError::Unsupported {
            id: req.id.clone(),
            what: format!("image {} has no WebAssembly module", req.image.reference),
        })?;
        let dir = self.dir(&req.id);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let shim_cfg = ShimConfig {
            id: req.id.clone(),
            runc: PathBuf::new(),
            runc_root: PathBuf::new(),
            runc_args: vec![],
            start_in_netns: None,
            cgroups_path: String::new(),
            log_max_bytes: req.deployment.logging.max_size_bytes.unwrap_or(self.log_max_bytes),
            log_max_files: req.deployment.logging.max_files.unwrap_or(self.log_max_files),
            tty: false,
            stdin_open: false,
        };
        let uid = uid_for(&req.id);
        let gid = gid_for(&req.deployment.name);
        let limits = crate::cgroup::OwnLimits {
            memory_max: req.deployment.resources.memory_bytes.map(|m| m + SHIM_OVERHEAD),
            pids_max: Some(SHIM_PIDS),
        };
        let wasm = WasmShim {
            spec: spec(req, module, &self.cache_dir),
            netns: req.netns.clone(),
            uid: Some(uid),
            gid: Some(gid),
            cgroup: Some((cgroup_of(&req.id), limits)),
        };
        // The instance's directory is root's (traversable, for its state); `state/` is
        // the instance user's alone.
        crate::oci::set_mode(&dir, 0o711)?;
        let state = dir.join(STATE_DIR);
        fs::create_dir_all(&state).map_err(io("create", &state))?;
        let (owner, group) = (Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)));
        nix::unistd::chown(&state, owner, group).map_err(|e| RuntimeError::Io {
            op: "chown",
            path: state.clone(),
            source: e.into(),
        })?;
        crate::oci::set_mode(&state, 0o700)?;
        for (name, bytes) in
            [(shim::SHIM_CONFIG, serde_json::to_vec_pretty(&shim_cfg)), (WASM_CONFIG, serde_json::to_vec_pretty(&wasm))]
        {
            let p = dir.join(name);
            fs::write(&p, bytes.unwrap_or_default()).map_err(io("write", &p))?;
        }
        Ok(())
    }

    fn start(&self, id: &str) -> Result<i32, RuntimeError> {
        if self.use_spares {
            let spare = self.spare.lock().ok().and_then(|mut s| s.take());
            let answer = spare.and_then(|s| s.run(&self.dir(id), id, &cgroup_of(id)));
            // The next spare starts once this start is answered: starting it meanwhile
            // (a process and wasmtime's set-up) takes the CPU from the start being made.
            self.refill();
            if let Some(answer) = answer {
                return Ok(answer?);
            }
        }
        Ok(shim::launch(&self.skiff_bin, &self.dir(id), id)?)
    }

    fn liveness(&self, id: &str) -> Liveness {
        if let Some(e) = shim::recorded_exit(&self.state(id)) {
            return Liveness::Exited(e);
        }
        match self.shim_pid(id) {
            Some(pid) => Liveness::Running { pid },
            None => Liveness::Gone,
        }
    }

    fn watch_pid(&self, id: &str) -> Option<i32> {
        self.shim_pid(id)
    }

    fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let pid = self.shim_pid(id).ok_or_else(|| RuntimeError::NotRunning(id.to_string()))?;
        let name = signal.trim_start_matches("SIG");
        let sig: nix::sys::signal::Signal = format!("SIG{name}")
            .parse()
            .or_else(|_| name.parse::<i32>().map_err(|_| ()).and_then(|n| n.try_into().map_err(|_| ())))
            .map_err(|_| RuntimeError::Unsupported { id: id.into(), what: format!("signal {signal:?}") })?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(|e| RuntimeError::Io {
            op: "kill",
            path: self.dir(id),
            source: e.into(),
        })?;
        if sig == nix::sys::signal::Signal::SIGKILL {
            // The shim cannot record a SIGKILL itself: once it is gone, record it here.
            for _ in 0..200 {
                if self.shim_pid(id).is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.shim_pid(id).is_none() && !self.state(id).join(shim::EXIT_FILE).exists() {
                let exit = ExitStatus {
                    code: 137,
                    signal: Some(9),
                    oom_killed: false,
                    finished_at_ms: crate::time::now_ms(),
                    message: None,
                };
                shim::write_exit(&self.state(id), &exit);
            }
        }
        Ok(())
    }

    fn exec(&self, id: &str, _argv: &[String], _timeout: Duration) -> Result<ExecOutput, RuntimeError> {
        Err(no_exec(id))
    }

    fn exec_spawn(
        &self,
        id: &str,
        _argv: &[String],
        _tty: bool,
        _pid_file: &Path,
        _stdio: [std::process::Stdio; 3],
    ) -> Result<std::process::Child, RuntimeError> {
        Err(no_exec(id))
    }

    /// Names resolve through the host's resolver for now: nothing to rewrite.
    fn update_hosts(&self, _id: &str, _hosts: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(pid) = self.shim_pid(id) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            for _ in 0..100 {
                if self.shim_pid(id).is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        crate::cgroup::Cgroups::detect().remove(&cgroup_of(id));
        let dir = self.dir(id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        Ok(())
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.state(id).join(shim::LOG_FILE)
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir(id)
    }

    /// From the shim's own accounting in /proc: it is the instance.
    fn stats(&self, id: &str) -> CgroupStats {
        self.shim_pid(id).map(crate::procfs::process_stats).unwrap_or_default()
    }

    fn limits(&self, id: &str) -> CgroupLimits {
        let Some(w) = self.shim_spec(id) else { return CgroupLimits::default() };
        let period = skiff_model::Resources::CFS_PERIOD_US;
        CgroupLimits {
            cpu_quota_us: w.spec.cpus_millis.map(|m| (m * period / 1000) as i64),
            cpu_period_us: w.spec.cpus_millis.map(|_| period),
            memory_bytes: w.spec.memory_bytes,
            ..Default::default()
        }
    }

    fn known(&self) -> Vec<String> {
        fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Entry point of `skiff shim --spare ROOT` (see [`Spare`]): makes a session and wasmtime's
/// engine and linkers, says `ready`, then takes one bundle path (a directory of ROOT) from
/// stdin and becomes that instance's shim. EOF before that: exits.
pub fn spare_main(root: &Path) -> i32 {
    use std::io::{BufRead, Write};
    let _ = nix::unistd::setsid();
    let report = |msg: String| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{msg}");
        let _ = out.flush();
    };
    let warm = match skiff_wasm::Warm::new() {
        Ok(w) => w,
        Err(e) => {
            report(format!("err {e}"));
            return 1;
        }
    };
    // Waits in a cgroup of its own, which a start renames to the instance's (v1): the
    // move into a cgroup is made now, not during that start.
    let cgroups = crate::cgroup::Cgroups::detect();
    let (pid, own) = (std::process::id(), crate::cgroup::spare_cgroup(std::process::id()));
    let v1 = cgroups.version == crate::cgroup::CgroupVersion::V1;
    if v1 {
        let _ = cgroups.enter(&own, &Default::default(), pid);
    }
    report("ready".into());
    let mut line = String::new();
    if !matches!(std::io::stdin().lock().read_line(&mut line), Ok(n) if n > 0) {
        if v1 {
            cgroups.leave(&own, pid);
        }
        return 0;
    }
    let bundle = PathBuf::from(line.trim_end());
    let result = if bundle.parent() != Some(root) {
        Err(format!("{} is not an instance of {}", bundle.display(), root.display()))
    } else {
        shim::begin(&bundle).and_then(|cfg| run_shim(&bundle, &cfg, &report, Some(warm)))
    };
    match result {
        Ok(()) => 0,
        Err(msg) => {
            report(format!("err {msg}"));
            1
        }
    }
}

/// Compiles (into the cache) and checks a program without running it; returns what it
/// is. What `skiff run` and an embedded `skiff apply` ask before anything is stored.
pub fn check(module: &skiff_image::WasmModule, cache_dir: &Path) -> Result<&'static str, String> {
    skiff_wasm::check(&module.path, &module.id, cache_dir).map_err(|e| e.to_string())
}

/// Removes compiled programs of other wasmtime builds and of modules `keep` rejects;
/// returns the bytes freed.
pub fn prune_cache(cache_dir: &Path, keep: impl Fn(&str) -> bool) -> u64 {
    if !cache_dir.is_dir() {
        return 0;
    }
    let engine_id = || skiff_wasm::engine::engine(None, None).ok().map(|e| skiff_wasm::engine::id(&e));
    match skiff_wasm::cache::Cache::open(cache_dir) {
        Ok(c) => c.prune(engine_id, keep),
        Err(_) => 0,
    }
}

/// Becomes `uid` (group `gid`, no other groups, no capabilities left, no new privileges),
/// after handing the files of `state` to it. Everything that needed root is done by now:
/// the namespace joined, the program loaded, the ports bound, the log opened, the cgroup
/// entered. Files it makes are its group's too (umask 007): the deployment's volumes are
/// shared by its replicas.
fn drop_privileges(state: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use nix::unistd::{Gid, Uid};
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    for e in fs::read_dir(state).map_err(|e| format!("{}: {e}", state.display()))?.flatten() {
        let _ = nix::unistd::fchownat(None, &e.path(), Some(u), Some(g), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW);
    }
    nix::unistd::setgroups(&[g]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresgid(g, g, g).map_err(|e| format!("setresgid: {e}"))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o007));
    if nix::unistd::geteuid().is_root() {
        return Err("still root after dropping privileges".into());
    }
    Ok(())
}

/// `skiff shim` for a WebAssembly instance. Reports `ok <pid>` once the program is
/// loaded, checked and its ports bound (or `err <why>`, with nothing started), then runs
/// it; never returns once it reported `ok`.
pub(crate) fn run_shim(
    bundle: &Path,
    cfg: &ShimConfig,
    report: &dyn Fn(String),
    warm: Option<skiff_wasm::Warm>,
) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let w: WasmShim = shim::read_config(bundle, WASM_CONFIG)?;
    if let Some(ns) = &w.netns {
        // Before any thread exists: threads inherit the namespace of the one that made them.
        let f = fs::File::open(ns).map_err(|e| format!("opening {}: {e}", ns.display()))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("joining {}: {e}", ns.display()))?;
    } else if !w.spec.network {
        // `network: none`: an empty namespace of its own (only a loopback, down), as a
        // container gets, so no socket reaches anything.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("making an empty network namespace: {e}"))?;
    }
    // Stop signals are taken by this thread alone (blocked here, inherited blocked).
    let mut stops = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2] {
        stops.add(s);
    }
    stops.thread_block().map_err(|e| format!("blocking signals: {e}"))?;
    let t0 = std::time::Instant::now();
    let prepared = skiff_wasm::prepare_with(&w.spec, warm).map_err(|e| e.to_string())?;
    let state = bundle.join(STATE_DIR);
    let _ = fs::remove_file(state.join(shim::EXIT_FILE));
    shim::diag(
        &state,
        &format!(
            "{} {} ({:.2} ms)",
            prepared.program().describe(),
            if prepared.cached { "loaded from the compile cache" } else { "compiled" },
            t0.elapsed().as_secs_f64() * 1000.0
        ),
    );
    let log = LogWriter::open(&state.join(shim::LOG_FILE), cfg.log_max_bytes, cfg.log_max_files)
        .map_err(|e| format!("opening the log: {e}"))?;
    let log = Arc::new(Mutex::new(log));
    let (out, err) = (LineSink::new("stdout", Arc::clone(&log)), LineSink::new("stderr", log));
    let pid = std::process::id();
    let _ = fs::write(bundle.join(shim::PID_FILE), pid.to_string());
    if let Some((cg, limits)) = &w.cgroup {
        crate::cgroup::Cgroups::detect().enter(cg, limits, pid).map_err(|e| format!("entering cgroup {cg}: {e}"))?;
    }
    if let (Some(uid), Some(gid)) = (w.uid, w.gid) {
        drop_privileges(&state, uid, gid)?;
        shim::diag(&state, &format!("running as uid {uid}, gid {gid}, with no capabilities"));
    }
    report(format!("ok {pid}"));

    // Whoever ends first — the program or a signal — writes the exit record and exits.
    let done = Arc::new(Mutex::new(()));
    let finish = {
        let (bundle, out, err, done) = (state.clone(), out.clone(), err.clone(), Arc::clone(&done));
        move |code: i32, signal: Option<i32>, oom: bool, message: Option<String>| -> ! {
            let _once = done.lock();
            out.finish();
            err.finish();
            let exit = ExitStatus { code, signal, oom_killed: oom, finished_at_ms: crate::time::now_ms(), message };
            shim::write_exit(&bundle, &exit);
            std::process::exit(0)
        }
    };
    let on_end = finish.clone();
    let runner = std::thread::Builder::new().name("wasm".into()).spawn(move || {
        let o = prepared.run(skiff_wasm::Output::new(out), skiff_wasm::Output::new(err));
        on_end(o.code, None, o.oom, o.message)
    });
    if let Err(e) = runner {
        finish(1, None, false, Some(format!("starting the program's thread: {e}")));
    }
    loop {
        if let Ok(sig) = stops.wait() {
            let n = sig as i32;
            finish(128 + n, Some(n), false, Some(format!("stopped by {}", sig.as_str())));
        }
    }
}

fn no_exec(id: &str) -> RuntimeError {
    RuntimeError::Unsupported {
        id: id.to_string(),
        what: "exec: a WebAssembly instance has no shell or processes to run a command in".into(),
    }
}
