//! Test harness: a real `skiff up` (hub + agent) in a temporary data directory with its
//! own bridge and subnet, driven through the real CLI. Everything it creates is removed
//! on drop, even when the test fails.
#![allow(dead_code)]

pub mod fleet;

use anyhow::{bail, Context, Result};
use skiff_model::{EventRecord, InstanceStatus};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "localhost/skiff-test:1";
static N: AtomicU32 = AtomicU32::new(0);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_skiff")
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub bridge: String,
    pub subnet: String,
    up: Option<Child>,
    pub up_log: PathBuf,
    /// `RUST_LOG` of the processes this node starts.
    pub rust_log: String,
    /// More environment for `skiff up` (a `PATH` without some tool, say).
    pub up_env: Vec<(String, String)>,
    /// `skiff up --firewall`: `none` (tests leave the host's forwarding and firewall
    /// alone) unless a test of NAT asks for one.
    pub firewall: &'static str,
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// Polls `f` every 100 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Node {
    /// A node with the busybox test image loaded (plus `extra` images: (name, builder)).
    pub fn new() -> Result<Self> {
        let node = Self::bare()?;
        node.load(&skiff_testkit::ImageBuilder::busybox()?, IMAGE)?;
        Ok(node)
    }

    /// A node with an empty data directory.
    pub fn bare() -> Result<Self> {
        Self::bare_in(&std::env::temp_dir())
    }

    /// A node whose data directory is made in `parent` (a small tmpfs, say).
    pub fn bare_in(parent: &Path) -> Result<Self> {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = tempfile::Builder::new().prefix("skiff-test-").tempdir_in(parent)?;
        let node = Node {
            bridge: format!("skt{}x{n}", pid % 100_000),
            subnet: format!("10.{}.{}.0/24", 214 + (pid % 20), (n * 7 + pid / 20) % 250),
            dir,
            up: None,
            up_log: PathBuf::new(),
            rust_log: "info".into(),
            up_env: Vec::new(),
            firewall: "none",
        };
        Ok(node)
    }

    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    pub fn load(&self, img: &skiff_testkit::ImageBuilder, name: &str) -> Result<()> {
        let layout = self.data().join(format!("layout-{}", name.replace(['/', ':'], "_")));
        img.write_oci_layout(&layout, name)?;
        let out = self.cli(&["image", "load", layout.to_str().unwrap_or_default()])?;
        if !out.status.success() {
            bail!("image load: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::remove_dir_all(&layout)?;
        Ok(())
    }

    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin())
            .arg("--data")
            .arg(self.data())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running skiff")
    }

    /// Runs the CLI with `input` on its standard input (then closed).
    pub fn cli_input(&self, args: &[&str], input: &[u8]) -> Result<Output> {
        use std::io::Write;
        let mut child = Command::new(bin())
            .arg("--data")
            .arg(self.data())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running skiff")?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let input = input.to_vec();
        // Written beside the reading: a command that echoes its input fills the pipes.
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output()?;
        let _ = writer.join();
        Ok(out)
    }

    /// Runs the CLI and returns stdout, failing on a non-zero exit.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "skiff {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.data().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// `skiff up` on this node's data dir, bridge and subnet, with a random API port.
    fn up_command(&self, compose: Option<&Path>) -> Command {
        let mut cmd = Command::new(bin());
        cmd.env(NO_DISK_PRESSURE.0, NO_DISK_PRESSURE.1).arg("--data").arg(self.data()).args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--bridge",
            &self.bridge,
            "--subnet",
            &self.subnet,
            // Samples every second, so `skiff top` has figures quickly.
            "--metrics-interval",
            "1",
            "--firewall",
            self.firewall,
        ]);
        if let Some(f) = compose {
            cmd.arg("-f").arg(f);
        }
        cmd
    }

    /// Runs `skiff up -f compose` expecting it to refuse and exit; returns its output.
    pub fn up_refused(&self, compose: &Path) -> Result<Output> {
        self.up_refused_with(Some(compose), &[])
    }

    /// As `up_refused`, with `extra` arguments to `skiff up`.
    pub fn up_refused_with(&self, compose: Option<&Path>, extra: &[&str]) -> Result<Output> {
        Ok(self.up_command(compose).args(extra).stdin(Stdio::null()).output()?)
    }

    /// Starts `skiff up` (optionally with a compose file) and waits for its API.
    pub fn up(&mut self, compose: Option<&Path>) -> Result<()> {
        self.up_with(compose, &[])
    }

    /// As `up`, with `extra` arguments to `skiff up`.
    pub fn up_with(&mut self, compose: Option<&Path>, extra: &[&str]) -> Result<()> {
        let n = N.fetch_add(1, Ordering::SeqCst);
        self.up_log = self.data().join(format!("up-{n}.log"));
        let log = std::fs::File::create(&self.up_log)?;
        let mut cmd = self.up_command(compose);
        cmd.args(extra);
        let _ = std::fs::remove_file(self.data().join("admin.conf"));
        let child = cmd
            .env("RUST_LOG", &self.rust_log)
            .envs(self.up_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.up = Some(child);
        wait_for(Duration::from_secs(30), "the hub API", || {
            if let Some(c) = self.up.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Some(Err(anyhow::anyhow!("skiff up exited with {st}: {}", self.log())));
                }
            }
            self.data()
                .join("admin.conf")
                .exists()
                .then(|| self.cli(&["get", "nodes"]).ok().filter(|o| o.status.success()).map(|_| Ok(())))?
        })?
    }

    /// Starts `skiff --data DIR ARGS...` in the background (a hub or an agent) as this
    /// node's long-running process, logging to a file; SIGINT on cleanup.
    pub fn spawn(&mut self, args: &[&str]) -> Result<()> {
        self.spawn_in(None, args)
    }

    /// As `spawn`, inside the network namespace `netns` when given (via nsenter, which
    /// keeps the host's /sys and cgroup mounts that runc needs).
    pub fn spawn_in(&mut self, netns: Option<&str>, args: &[&str]) -> Result<()> {
        self.spawn_full(netns, args, &[])
    }

    /// As `spawn`, with extra environment variables (a crash point, say).
    pub fn spawn_env(&mut self, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        self.spawn_full(None, args, env)
    }

    fn spawn_full(&mut self, netns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        let n = N.fetch_add(1, Ordering::SeqCst);
        self.up_log = self.data().join(format!("proc-{n}.log"));
        let log = std::fs::File::create(&self.up_log)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = cmd
            .arg("--data")
            .arg(self.data())
            .args(args)
            .env("RUST_LOG", &self.rust_log)
            .env(NO_DISK_PRESSURE.0, NO_DISK_PRESSURE.1)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.up = Some(child);
        Ok(())
    }

    /// The `server` in this node's admin.conf (a hub's URL).
    pub fn server(&self) -> Result<String> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(self.data().join("admin.conf"))?)?;
        v["server"].as_str().map(str::to_string).context("admin.conf has no server")
    }

    /// Writes `yaml` as compose.yaml and starts `skiff up` with it; returns the file.
    pub fn up_compose(&mut self, yaml: &str) -> Result<PathBuf> {
        let f = self.write("compose.yaml", yaml)?;
        self.up(Some(&f))?;
        Ok(f)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.up_log).unwrap_or_default()
    }

    /// Waits (at most `limit`) for this node's process to exit by itself; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let c = self.up.as_mut().context("no process")?;
        let st = wait_for(limit, "the process to exit", || c.try_wait().ok().flatten())?;
        self.up = None;
        Ok(st)
    }

    pub fn up_pid(&self) -> Option<u32> {
        self.up.as_ref().map(|c| c.id())
    }

    /// SIGKILL to `skiff up`: the agent dies without any chance to clean up.
    pub fn kill_up(&mut self) -> Result<()> {
        if let Some(mut c) = self.up.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// The NAT rules this node's agent writes (their names: nft table, iptables chains).
    pub fn nat(&self) -> Option<skiff_runtime::nat::Nat> {
        let subnet = skiff_runtime::network::Subnet::parse(&self.subnet).ok()?;
        Some(skiff_runtime::nat::Nat {
            bridge: self.bridge.clone(),
            subnet,
            firewall: skiff_runtime::nat::Firewall::Nft,
            services: None,
        })
    }

    /// SIGTERM to `skiff up` (a service manager stopping it): it exits, leaving workloads
    /// running.
    pub fn terminate_up(&mut self) -> Result<()> {
        if let Some(mut c) = self.up.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let st = wait_for(Duration::from_secs(60), "skiff up to exit on SIGTERM", || c.try_wait().ok().flatten());
            if st.is_err() {
                let _ = c.kill();
                let _ = c.wait();
            }
            st?;
        }
        Ok(())
    }

    /// SIGINT to `skiff up` (Ctrl-C): stops the stack and exits.
    pub fn interrupt_up(&mut self) -> Result<()> {
        self.end_up(false)
    }

    /// SIGINT to `skiff up`; `fast` (a test's teardown): then SIGKILL to every container
    /// of this node (runc's and gVisor's), so that the stop does not wait out the grace
    /// period of each workload that ignores SIGTERM (a shell as PID 1 does). The agent
    /// still stops and cleans up as it always does. (Killed after the SIGINT, and again
    /// each second until it exits: a restart policy may start one again meanwhile.)
    fn end_up(&mut self, fast: bool) -> Result<()> {
        if let Some(mut c) = self.up.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(60);
            for round in 0.. {
                if Instant::now() >= deadline {
                    break;
                }
                // Again each second: one the agent restarted before it took the SIGINT.
                if fast && round % 10 == 0 {
                    self.kill_workloads();
                }
                if c.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            c.kill()?;
            c.wait()?;
            bail!("skiff up did not stop within 60 s of SIGINT");
        }
        Ok(())
    }

    /// SIGKILL to every container of this node (runc's and gVisor's).
    fn kill_workloads(&self) {
        let data = self.data();
        for (tool, root) in [("runc", data.join("runc")), ("runsc", data.join("runsc/state"))] {
            for id in containers(tool, &root) {
                let _ = Command::new(tool).arg("--root").arg(&root).args(["kill", "--all", &id, "KILL"]).output();
            }
        }
    }

    pub fn instances(&self) -> Result<Vec<InstanceStatus>> {
        Ok(serde_json::from_str(&self.ok(&["get", "instances", "-o", "json"])?)?)
    }

    pub fn instance(&self, name: &str) -> Result<InstanceStatus> {
        self.instances()?.into_iter().find(|i| i.name == name).with_context(|| format!("no instance {name}"))
    }

    /// The manifest digest an image reference points at in the local store.
    pub fn image_digest(&self, reference: &str) -> Result<String> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["image", "inspect", reference])?)?;
        Ok(v["manifest_digest"].as_str().unwrap_or_default().to_string())
    }

    pub fn events(&self) -> Result<Vec<EventRecord>> {
        Ok(serde_json::from_str(&self.ok(&["get", "events", "-o", "json"])?)?)
    }

    /// Waits until `name` satisfies `pred`, returning its last status.
    pub fn wait_instance(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&InstanceStatus) -> bool,
    ) -> Result<InstanceStatus> {
        wait_for(limit, &format!("{name} {what}"), || self.instance(name).ok().filter(|i| pred(i)))
            .with_context(|| format!("last status: {:?}\nlog:\n{}", self.instance(name).ok(), self.log()))
    }

    pub fn wait_running(&self, name: &str) -> Result<InstanceStatus> {
        self.wait_instance(name, Duration::from_secs(30), "running", |i| {
            i.state == skiff_model::InstanceState::Running && i.pid.is_some()
        })
    }

    pub fn cleanup(&mut self) {
        let _ = self.end_up(true);
        let data = self.data().to_path_buf();
        // Whatever survived (a failed test, a killed agent): containers, mounts, netns.
        let runc_root = data.join("runc");
        for id in containers("runc", &runc_root) {
            let _ = Command::new("runc").arg("--root").arg(&runc_root).args(["delete", "--force", &id]).output();
        }
        // WebAssembly instances are shims with no runc container behind them; gVisor
        // sandboxes are processes (shim, runsc-sandbox, runsc-gofer) naming their bundle.
        let owned = [data.join("wasm/instances"), data.join("runsc/")].map(|p| p.display().to_string());
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = pid.file_name().to_string_lossy().parse::<i32>() else { continue };
            if std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| owned.iter().any(|o| String::from_utf8_lossy(&c).contains(o.as_str())))
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let runsc_root = data.join("runsc/state");
        for id in containers("runsc", &runsc_root) {
            let _ = Command::new("runsc").arg("--root").arg(&runsc_root).args(["delete", "--force", &id]).output();
        }
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let prefix = data.display().to_string();
            let mut mounts: Vec<&str> =
                info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mounts {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Ok(s) = skiff_agent::state::State::open(&data.join("agent.db")) {
            if let Ok(Some(id)) = s.meta("node_id") {
                for ns in skiff_runtime::network::list_netns(&format!("skiff-{id}-")) {
                    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
                }
                for c in ["cpu", "cpuacct", "memory", "pids", "devices", "freezer", "blkio", "cpuset", "systemd", ""] {
                    if let Ok(rd) = std::fs::read_dir(Path::new("/sys/fs/cgroup").join(c).join("skiff")) {
                        for e in rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&id)) {
                            let _ = std::fs::remove_dir(e.path());
                        }
                    }
                }
            }
        }
        // NAT rules a killed agent left (`remove` clears both firewalls' rules).
        if let Some(nat) = self.nat() {
            nat.remove();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        remove_service_route_if_unused();
    }
}

/// The ids of the containers `tool` (runc, runsc) keeps state for under `root`.
fn containers(tool: &str, root: &Path) -> Vec<String> {
    let out = Command::new(tool).arg("--root").arg(root).args(["list", "--quiet"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(String::from).collect()).unwrap_or_default()
}

/// The default service range's `local` route, once no agent of any test runs: an agent
/// removes it when it stops, one killed on purpose leaves it behind.
fn remove_service_route_if_unused() {
    let running = std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|p| {
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else { return false };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        args.first().is_some_and(|a| a.ends_with(b"skiff")) && args.iter().any(|a| *a == b"agent" || *a == b"up")
    });
    if !running {
        let (net, prefix) = skiff_model::mesh::DEFAULT_SERVICE_RANGE;
        let r = format!("{net}/{prefix}");
        let _ = Command::new("ip").args(["route", "del", "local", &r, "dev", "lo", "table", "local"]).output();
    }
}

/// The test machine's disk is shared and its free space comes and goes (once 287 MB): a
/// node under test takes work whatever it is (`--disk-pressure-below 0`; a test that wants
/// the pressure sets the flag, which wins).
pub const NO_DISK_PRESSURE: (&str, &str) = ("SKIFF_DISK_PRESSURE_BELOW", "0");

impl Drop for Node {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Minimal HTTP GET over loopback, returning the body.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// `skiff get KIND -w -o json` running against a node's hub: each change arrives as one
/// JSON line. Killed on drop.
pub struct Watch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watch {
    pub fn start(n: &Node, kind: &str) -> Result<Self> {
        let mut child = Command::new(bin())
            .arg("--data")
            .arg(n.data())
            .args(["get", kind, "-w", "-o", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("running skiff get -w")?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Watch { child, lines })
    }

    /// The first printed document (in order) for which `f` is true, within `limit`.
    pub fn until<T: serde::de::DeserializeOwned>(&self, limit: Duration, f: impl Fn(&T) -> bool) -> Result<T> {
        let end = std::time::Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).context("waiting for the watch to print a match")?;
            let doc: T = serde_json::from_str(&line).with_context(|| format!("not a list: {line}"))?;
            if f(&doc) {
                return Ok(doc);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A site behind an uplink that can fail: a network namespace joined to the host by a
/// veth pair (host end `host_ip`, namespace end `.2`). Removed on drop.
pub struct Uplink {
    pub netns: String,
    host_if: String,
    pub host_ip: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Uplink {
    pub fn new() -> Result<Self> {
        let id = std::process::id() % 100_000;
        let (netns, host_if, peer) = (format!("skup{id}"), format!("skup{id}h"), format!("skup{id}a"));
        let net = format!("10.251.{}", id % 250);
        let link = Uplink { netns: netns.clone(), host_if: host_if.clone(), host_ip: format!("{net}.1") };
        ip(&["netns", "add", &netns])?;
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &netns])?;
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{net}.2/24"), "dev", &peer])?;
        ip(&["-n", &netns, "link", "set", &peer, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(link)
    }

    /// The uplink dies (`false`) or comes back (`true`): the host end goes down or up.
    pub fn set(&self, up: bool) -> Result<()> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// A skiff command on a real terminal (a pseudo-terminal this test made), as a person at
/// a keyboard runs it: what it shows is collected, keys are typed, the window resized.
/// Killed on drop.
pub struct Terminal {
    child: Child,
    master: std::fs::File,
    shown: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Terminal {
    pub fn spawn(n: &Node, args: &[&str], (cols, rows): (u16, u16)) -> Result<Self> {
        let pair = skiff_sys::pty::open(cols, rows)?;
        let child = Command::new(bin())
            .arg("--data")
            .arg(n.data())
            .args(args)
            .stdin(Stdio::from(pair.slave.try_clone()?))
            .stdout(Stdio::from(pair.slave.try_clone()?))
            .stderr(Stdio::from(pair.slave))
            .spawn()
            .context("running skiff on a terminal")?;
        let master = std::fs::File::from(pair.master);
        let shown = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut reader, seen) = (master.try_clone()?, std::sync::Arc::clone(&shown));
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            // Ends with EIO once the command and everything holding the terminal are gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    return;
                }
                if let Ok(mut s) = seen.lock() {
                    s.extend_from_slice(&buf[..n]);
                }
            }
        });
        Ok(Terminal { child, master, shown })
    }

    /// Everything shown so far, as text.
    pub fn screen(&self) -> String {
        self.shown.lock().map(|s| String::from_utf8_lossy(&s).into_owned()).unwrap_or_default()
    }

    /// Waits until `text` has been shown after what `expect` matched last time.
    pub fn expect(&self, text: &str, limit: Duration) -> Result<()> {
        wait_for(limit, &format!("{text:?} on the terminal"), || self.screen().contains(text).then_some(()))
            .with_context(|| format!("the terminal shows:\n{}", self.screen()))?;
        // Forget what was matched, so the next expect sees only what comes after it.
        if let Ok(mut s) = self.shown.lock() {
            let t = text.as_bytes();
            if let Some(at) = s.windows(t.len()).position(|w| w == t) {
                s.drain(..at + t.len());
            }
        }
        Ok(())
    }

    /// Types `keys`.
    pub fn send(&mut self, keys: &str) -> Result<()> {
        use std::io::Write;
        self.master.write_all(keys.as_bytes())?;
        Ok(())
    }

    /// Resizes the window and tells the command, as a terminal emulator does (the kernel
    /// signals only a terminal's own session, which the command is not).
    pub fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        skiff_sys::pty::resize(&self.master, cols, rows)?;
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGWINCH)?;
        Ok(())
    }

    /// The command's exit code, waiting at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> Result<i32> {
        let status = wait_for(limit, "the command on the terminal to end", || self.child.try_wait().ok().flatten())
            .with_context(|| format!("the terminal shows:\n{}", self.screen()))?;
        status.code().with_context(|| format!("ended by a signal: {status}"))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process the test started (a `skiff port-forward`, a git daemon); killed on drop.
pub struct Started(Child);

impl Started {
    pub fn spawn(cmd: &mut std::process::Command) -> Result<Self> {
        Ok(Started(cmd.stdout(Stdio::null()).spawn()?))
    }

    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `skiff port-forward` running in the background.
pub struct Forward;

impl Forward {
    pub fn start(n: &Node, args: &[&str]) -> Result<Started> {
        Started::spawn(Command::new(bin()).arg("--data").arg(n.data()).args(args))
    }
}
