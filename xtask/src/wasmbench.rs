//! `xtask wasm-bench SKIFF DIR ITERATIONS COUNTS`: the `wasm` runtime beside the `oci`
//! runtime and bare runc, driven through the same backend calls the agent makes
//! (`Runtime::create` + `Runtime::start`, a shim per instance).
//!
//! * Start: from "create this instance" until its program runs — each program's first act
//!   is to create the file `go` in a host directory, and the clock stops when inotify
//!   reports it. WASI
//!   cold (compile cache emptied first), warm (cached), the oci backend (overlay, spec,
//!   shim, `runc run`), and bare `runc run -d` of a prepared bundle. Network: none.
//! * Memory: COUNTS idle instances of each kind started together; per instance, the
//!   PSS and USS of their processes (shim, and for containers the container's process)
//!   and the drop of the host's MemAvailable (which counts the kernel's share as well:
//!   page tables, cgroups, mounts).
//!
//! A benchmark, not a test: it prints figures and asserts nothing.

use anyhow::{bail, Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use skiff_image::{ImageStore, Target};
use skiff_model::{Deployment, NetworkMode, RuntimeKind};
use skiff_runtime::{CreateRequest, Liveness, OciRuntime, Runtime, WasmRuntime};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Bench {
    dir: PathBuf,
    store: ImageStore,
    oci: OciRuntime,
    /// Starts hand the program to a spare shim started ahead of need (the default).
    wasm: WasmRuntime,
    /// Each start launches a shim.
    wasm_launch: WasmRuntime,
    fifo_dir: PathBuf,
    n: std::sync::atomic::AtomicU32,
}

const BUSYBOX: &str = "bench/busybox:1";
const SIGNAL: &str = "bench/signal:1";
const IDLE: &str = "bench/idle:1";

fn meminfo_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// (PSS, USS, anonymous) of a process in KiB, from smaps_rollup. USS also counts the
/// binary's code pages that no other process maps (all of them, for a lone instance);
/// anonymous memory is what the instance itself allocated.
fn pss_uss_kib(pid: i32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |k: &str| -> u64 {
        text.lines().filter(|l| l.starts_with(k)).filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).sum()
    };
    (field("Pss:"), field("Private_Clean:") + field("Private_Dirty:"), field("Anonymous:"))
}

fn settle() {
    // Let freed memory and page cache settle before reading MemAvailable.
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(2));
}

impl Bench {
    fn new(skiff: &Path, dir: &Path) -> Result<Self> {
        let store = ImageStore::open(dir.join("images"))?;
        let layout = dir.join("busybox-layout");
        skiff_testkit::ImageBuilder::busybox()?.write_oci_layout(&layout, BUSYBOX)?;
        store.load(&layout, Some(BUSYBOX))?;
        for (name, bytes) in [(SIGNAL, skiff_testkit::wasm::signal()?), (IDLE, skiff_testkit::wasm::idle()?)] {
            let f = skiff_testkit::wasm::write(dir, &format!("{}.wasm", name.replace(['/', ':'], "_")), &bytes)?;
            store.import_wasm(&f, name)?;
        }
        let fifo_dir = dir.join("b");
        std::fs::create_dir_all(&fifo_dir)?;
        // A wasm program runs as an unprivileged user of its own: it may write here.
        std::fs::set_permissions(&fifo_dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
        Ok(Bench {
            store,
            oci: OciRuntime::new(dir.join("instances"), dir.join("runc"), skiff, "/skiffbench")?,
            wasm: WasmRuntime::new(dir.join("wasm/instances"), dir.join("wasm/cache"), skiff)?,
            wasm_launch: WasmRuntime::new(dir.join("wasm/instances"), dir.join("wasm/cache"), skiff)?.without_spares(),
            dir: dir.to_path_buf(),
            fifo_dir,
            n: Default::default(),
        })
    }

    fn runtime(&self, kind: RuntimeKind, spare: bool) -> &dyn Runtime {
        match (kind, spare) {
            (RuntimeKind::Oci | RuntimeKind::Runsc, _) => &self.oci,
            (RuntimeKind::Wasm, true) => &self.wasm,
            (RuntimeKind::Wasm, false) => &self.wasm_launch,
        }
    }

    /// Creates and starts one instance of `image` on the `kind` backend; returns its id.
    fn start(&self, kind: RuntimeKind, spare: bool, image: &str, cmd: &[&str]) -> Result<String> {
        let rt = self.runtime(kind, spare);
        let id = format!("bench-{}", self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut d = Deployment::new("bench", image);
        d.runtime = kind;
        d.network = NetworkMode::None;
        if !cmd.is_empty() {
            d.command = Some(cmd.iter().map(|s| s.to_string()).collect());
        }
        let info = self.store.resolve_for(image, Target::from(kind))?;
        let layer_dirs = info.layers.iter().map(|l| self.store.layer_dir(&l.diff_id)).collect::<Result<_, _>>()?;
        let wasm = match kind {
            RuntimeKind::Wasm => Some(self.store.wasm_module(&info, None)?),
            RuntimeKind::Oci | RuntimeKind::Runsc => None,
        };
        let req = CreateRequest {
            id: id.clone(),
            hostname: "bench".into(),
            deployment: &d,
            image: &info,
            layer_dirs,
            netns: None,
            hosts: "127.0.0.1\tlocalhost\n".into(),
            resolv_conf: String::new(),
            volumes: vec![(self.fifo_dir.clone(), "/b".into(), false)],
            fill_volumes: vec![],
            wasm,
            cdi_devices: vec![],
            cdi_edits: vec![],
            seccomp_audit: Default::default(),
        };
        rt.create(&req)?;
        rt.start(&id)?;
        Ok(id)
    }

    fn stop(&self, kind: RuntimeKind, id: &str) {
        let rt = self.runtime(kind, false);
        let _ = rt.signal(id, "KILL");
        for _ in 0..500 {
            if !matches!(rt.liveness(id), Liveness::Running { .. }) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = rt.remove(id);
    }

    /// Watches the signal directory for `go` (removed first); arm before starting.
    fn arm(&self) -> Result<Inotify> {
        arm(&self.fifo_dir)
    }

    /// One start of `image` on the `kind` backend, in seconds.
    fn time_start(&self, kind: RuntimeKind, spare: bool, image: &str, cmd: &[&str]) -> Result<f64> {
        let watch = self.arm()?;
        let t0 = Instant::now();
        let id = self.start(kind, spare, image, cmd)?;
        let t1 = wait_go(&watch);
        // Stopped whether or not it started in time.
        self.stop(kind, &id);
        Ok((t1? - t0).as_secs_f64())
    }

    /// Bare `runc run -d` of a bundle prepared once (rootfs copied, config written).
    fn time_runc(&self, bundle: &Path, i: u32) -> Result<f64> {
        let watch = self.arm()?;
        let root = self.dir.join("runc-bare");
        let id = format!("bare-{i}");
        let t0 = Instant::now();
        let st = std::process::Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["run", "-d", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            bail!("runc run failed");
        }
        let t1 = wait_go(&watch)?;
        let _ = std::process::Command::new("runc").arg("--root").arg(&root).args(["delete", "--force", &id]).status();
        Ok((t1 - t0).as_secs_f64())
    }

    fn bare_bundle(&self) -> Result<PathBuf> {
        let bundle = self.dir.join("bare");
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs)?;
        let info = self.store.resolve(BUSYBOX)?;
        let layer = self.store.layer_dir(&info.layers[0].diff_id)?;
        let st =
            std::process::Command::new("cp").arg("-a").arg(format!("{}/.", layer.display())).arg(&rootfs).status()?;
        if !st.success() {
            bail!("copying the rootfs");
        }
        let st = std::process::Command::new("runc").arg("spec").current_dir(&bundle).status()?;
        if !st.success() {
            bail!("runc spec");
        }
        let p = bundle.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p)?)?;
        c["process"]["terminal"] = false.into();
        c["process"]["args"] = serde_json::json!(["sh", "-c", CONTAINER_CMD]);
        c["mounts"].as_array_mut().context("mounts")?.push(serde_json::json!({
            "destination": "/b", "type": "bind", "source": self.fifo_dir, "options": ["rbind"],
        }));
        std::fs::write(&p, serde_json::to_vec(&c)?)?;
        Ok(bundle)
    }

    /// Starts `count` idle instances of `kind`, measures, removes them.
    fn memory(&self, kind: RuntimeKind, count: usize) -> Result<[f64; 4]> {
        let rt = self.runtime(kind, true);
        settle();
        let before = meminfo_available_kib();
        let mut ids = vec![];
        let progress = |done: usize| {
            if count >= 100 && done.is_multiple_of(count / 10) {
                eprintln!("  {kind}: {done}/{count} idle instances running");
            }
        };
        for i in 0..count {
            let started = match kind {
                RuntimeKind::Wasm => self.start(kind, true, IDLE, &[]),
                RuntimeKind::Oci | RuntimeKind::Runsc => self.start(kind, true, BUSYBOX, &["sleep", "1000000"]),
            };
            match started {
                Ok(id) => ids.push(id),
                Err(e) => {
                    // Those already started go before the error does.
                    for id in &ids {
                        self.stop(kind, id);
                    }
                    return Err(e);
                }
            }
            progress(i + 1);
        }
        settle();
        let after = meminfo_available_kib();
        let (mut pss, mut uss, mut anon) = (0u64, 0u64, 0u64);
        for id in &ids {
            let dir = match kind {
                RuntimeKind::Wasm => self.dir.join("wasm/instances").join(id),
                RuntimeKind::Oci | RuntimeKind::Runsc => self.dir.join("instances").join(id),
            };
            let mut pids = vec![];
            if let Ok(p) = std::fs::read_to_string(dir.join("shim.pid")) {
                pids.extend(p.trim().parse::<i32>().ok());
            }
            if let (RuntimeKind::Oci, Liveness::Running { pid }) = (kind, rt.liveness(id)) {
                pids.push(pid);
            }
            for p in pids {
                let (a, b, c) = pss_uss_kib(p);
                pss += a;
                uss += b;
                anon += c;
            }
        }
        for id in &ids {
            self.stop(kind, id);
        }
        let n = count as f64;
        Ok([pss as f64 / n, uss as f64 / n, anon as f64 / n, before.saturating_sub(after) as f64 / n])
    }
}

/// The container's program: the same start signal, then idle.
const CONTAINER_CMD: &str = "touch /b/go; exec sleep 1000000";

/// Watches `dir` for the creation of `go` (removed first).
fn arm(dir: &Path) -> Result<Inotify> {
    let _ = std::fs::remove_file(dir.join("go"));
    let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
    ino.add_watch(dir, AddWatchFlags::IN_CREATE)?;
    Ok(ino)
}

/// Waits (at most 30 s) until `go` is created; returns when that was seen.
fn wait_go(ino: &Inotify) -> Result<Instant> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the program did not start within 30 s");
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(ms))?;
        if let Ok(events) = ino.read_events() {
            if events.iter().any(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("go"))) {
                return Ok(Instant::now());
            }
        }
    }
}

/// `xtask wasm-bench-cli SKIFF DATA ITERATIONS WASM_IMAGE CONTAINER_IMAGE`: end to end
/// against a running `skiff up` on DATA: `skiff run` of the start-signal program as a
/// wasm instance and as a container (network none), until its first act; each is deleted
/// (and gone) before the next starts.
pub fn cli(skiff: &str, data: &str, iterations: &str, wasm_image: &str, container_image: &str) -> Result<()> {
    let iterations: usize = iterations.parse().context("ITERATIONS")?;
    // Beside the data directory, which only root may enter.
    let dir = Path::new(data).parent().unwrap_or(Path::new("/tmp")).join("signal");
    std::fs::create_dir_all(&dir)?;
    // A wasm program runs as an unprivileged user of its own: it may write here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
    let vol = format!("{}:/b", dir.display());
    let skiff_cmd = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(skiff).arg("--data").arg(data).args(args).output()?)
    };
    let once = |name: &str, image: &str, extra: &[&str]| -> Result<f64> {
        let watch = arm(&dir)?;
        let t0 = Instant::now();
        let mut args = vec!["run", image, "--name", name, "--network", "none", "--stop-timeout", "1", "-v", &vol];
        args.extend_from_slice(extra);
        let out = skiff_cmd(&args)?;
        if !out.status.success() {
            bail!("skiff run: {}", String::from_utf8_lossy(&out.stderr));
        }
        let t1 = wait_go(&watch)?;
        skiff_cmd(&["delete", "deployment", name])?;
        let gone = format!("\"{name}-1\"");
        for _ in 0..200 {
            let out = skiff_cmd(&["get", "instances", "-o", "json"])?;
            if !String::from_utf8_lossy(&out.stdout).contains(&gone) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((t1 - t0).as_secs_f64())
    };
    let (mut w, mut c) = (vec![], vec![]);
    for i in 0..iterations {
        w.push(once(&format!("w{i}"), wasm_image, &["--runtime", "wasm"])?);
        c.push(once(&format!("c{i}"), container_image, &["--", "sh", "-c", CONTAINER_CMD])?);
    }
    let (w50, w90) = stats(w);
    let (c50, c90) = stats(c);
    println!("skiff run until the program's first act (ms; {iterations} runs each, network none):");
    println!("  {:<52} {:>8} {:>8}", "", "p50", "p90");
    println!("  {:<52} {w50:>8.2} {w90:>8.2}", "skiff run --runtime wasm");
    println!("  {:<52} {c50:>8.2} {c90:>8.2}", "skiff run (container under runc)");
    println!("  ratio (p50): container / wasm = {:.1}x", c50 / w50);
    Ok(())
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5) * 1000.0, at(0.9) * 1000.0)
}

pub fn run(skiff: &str, dir: &str, iterations: &str, counts: &[&str]) -> Result<()> {
    let iterations: usize = iterations.parse().context("ITERATIONS")?;
    let counts: Vec<usize> = counts.iter().map(|c| c.parse().context("COUNTS")).collect::<Result<_>>()?;
    let skiff = PathBuf::from(skiff);
    let dir = PathBuf::from(dir);
    let b = Bench::new(&skiff, &dir)?;
    let bundle = b.bare_bundle()?;
    let (mut cold, mut warm, mut launched, mut oci, mut runc) = (vec![], vec![], vec![], vec![], vec![]);
    eprintln!("start: {iterations} of each, interleaved");
    // A start outside the figures loads the binary into the page cache and a first spare.
    b.time_start(RuntimeKind::Wasm, true, SIGNAL, &[])?;
    for i in 0..iterations {
        let _ = std::fs::remove_dir_all(dir.join("wasm/cache"));
        cold.push(b.time_start(RuntimeKind::Wasm, false, SIGNAL, &[])?);
        launched.push(b.time_start(RuntimeKind::Wasm, false, SIGNAL, &[])?);
        warm.push(b.time_start(RuntimeKind::Wasm, true, SIGNAL, &[])?);
        oci.push(b.time_start(RuntimeKind::Oci, false, BUSYBOX, &["sh", "-c", CONTAINER_CMD])?);
        runc.push(b.time_runc(&bundle, i as u32)?);
        // The spare used above is replaced in the background meanwhile (as between an
        // agent's starts); this only makes sure of it.
        std::thread::sleep(Duration::from_millis(20));
    }
    let (w50, w90) = stats(warm);
    let (l50, l90) = stats(launched);
    let (c50, c90) = stats(cold);
    let (o50, o90) = stats(oci);
    let (r50, r90) = stats(runc);
    println!("start, from create to the program's first act (ms; {iterations} runs each, network none):");
    println!("  {:<52} {:>8} {:>8}", "", "p50", "p90");
    println!("  {:<52} {w50:>8.2} {w90:>8.2}", "wasm, warm (compile cache hit, spare shim ready)");
    println!("  {:<52} {l50:>8.2} {l90:>8.2}", "wasm, warm (compile cache hit, shim launched)");
    println!("  {:<52} {c50:>8.2} {c90:>8.2}", "wasm, cold (compiled at start, shim launched)");
    println!("  {:<52} {o50:>8.2} {o90:>8.2}", "oci backend (overlay, spec, shim, runc run)");
    println!("  {:<52} {r50:>8.2} {r90:>8.2}", "bare runc run -d (bundle prepared beforehand)");
    println!(
        "  ratios (p50): oci backend / wasm warm = {:.1}x, bare runc / wasm warm = {:.1}x \
         (with a launched shim: {:.1}x, {:.1}x)",
        o50 / w50,
        r50 / w50,
        o50 / l50,
        r50 / l50
    );
    if counts.is_empty() {
        return Ok(());
    }
    println!();
    println!("memory per idle instance (KiB): PSS, USS and anonymous memory of its processes; the host's");
    println!("MemAvailable drop / N (the kernel's share too: page tables, cgroups, mounts, namespaces):");
    println!("  {:<30} {:>7} {:>9} {:>9} {:>9} {:>12}", "", "N", "PSS", "USS", "anon", "MemAvail");
    for &n in &counts {
        for kind in [RuntimeKind::Wasm, RuntimeKind::Oci] {
            let [pss, uss, anon, drop] = b.memory(kind, n)?;
            let what = match kind {
                RuntimeKind::Wasm => "wasm (its shim)",
                RuntimeKind::Oci | RuntimeKind::Runsc => "container (shim + process)",
            };
            println!("  {what:<30} {n:>7} {pss:>9.0} {uss:>9.0} {anon:>9.0} {drop:>12.0}");
        }
    }
    Ok(())
}
