//! A real etcd (Debian's `etcd-server`) on 127.0.0.1 for tests: one member or a
//! cluster, each member a process in a directory of its own, stopped and removed on drop.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// One etcd member.
pub struct Member {
    pub name: String,
    /// `127.0.0.1:PORT` of its client API.
    pub client: String,
    peer: String,
    dir: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of one or more members.
pub struct Etcd {
    pub members: Vec<Member>,
    _tmp: tempfile::TempDir,
}

fn port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts `n` members and waits (at most 30 s) until each answers `/health`. A port
    /// taken between our finding it free and etcd binding it (other tests pick ports
    /// too) is no failure: the cluster starts again on other ports, a few times.
    pub fn start(n: usize) -> Result<Etcd> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(n) {
                Err(e) if tries < 5 && e.to_string().contains("address already in use") => continue,
                r => return r,
            }
        }
    }

    fn start_once(n: usize) -> Result<Etcd> {
        let tmp = tempfile::tempdir()?;
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("m{i}");
            let (client, peer) = (format!("127.0.0.1:{}", port()?), format!("127.0.0.1:{}", port()?));
            members.push(Member { dir: tmp.path().join(&name), name, client, peer, child: None });
        }
        let mut e = Etcd { members, _tmp: tmp };
        let cluster = e.cluster();
        for m in &mut e.members {
            m.spawn(&cluster, "new")?;
        }
        for i in 0..e.members.len() {
            if let Err(err) = e.members[i].wait_healthy(Duration::from_secs(30)) {
                // The members that did start say so too: a port one of them could not take.
                let taken = e.members.iter().any(|m| m.log().contains("address already in use"));
                return Err(if taken { err.context("a port was taken: address already in use") } else { err });
            }
        }
        Ok(e)
    }

    /// `etcd://HOST:PORT,...` of every member, with `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<&str> = self.members.iter().map(|m| m.client.as_str()).collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    /// The member that leads the cluster now (by its `etcd_server_is_leader` metric).
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.child.is_some()
                && get(&m.client, "/metrics").is_ok_and(|t| t.lines().any(|l| l == "etcd_server_is_leader 1"))
        })
    }

    /// The sum of metric `name` (every label set) over the running members.
    pub fn metric(&self, name: &str) -> f64 {
        let value = |line: &str| {
            let (key, v) = line.rsplit_once(' ')?;
            let bare = key.split('{').next()?;
            (bare == name).then(|| v.parse::<f64>().ok()).flatten()
        };
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .filter_map(|m| get(&m.client, "/metrics").ok())
            .map(|t| t.lines().filter_map(value).sum::<f64>())
            .sum()
    }

    /// Kills member `i` (SIGKILL: a machine lost, not a clean stop).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` (SIGSTOP: a machine that hangs, its connections left open) or,
    /// with `run`, lets it go on (SIGCONT).
    pub fn freeze(&mut self, i: usize, run: bool) {
        if let Some(c) = &self.members[i].child {
            use nix::sys::signal::{kill, Signal};
            let signal = if run { Signal::SIGCONT } else { Signal::SIGSTOP };
            let _ = kill(nix::unistd::Pid::from_raw(c.id() as i32), signal);
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let cluster = self.cluster();
        let m = &mut self.members[i];
        m.spawn(&cluster, "existing")?;
        m.wait_healthy(Duration::from_secs(30))
    }

    /// Starts every stopped member again on its data, then waits until each answers (a
    /// cluster whose members all stopped has no leader until most are back).
    pub fn restart_all(&mut self) -> Result<()> {
        let cluster = self.cluster();
        for m in self.members.iter_mut().filter(|m| m.child.is_none()) {
            m.spawn(&cluster, "existing")?;
        }
        for m in &mut self.members {
            m.wait_healthy(Duration::from_secs(30))?;
        }
        Ok(())
    }

    fn cluster(&self) -> String {
        let cluster: Vec<String> = self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect();
        cluster.join(",")
    }
}

impl Member {
    fn spawn(&mut self, cluster: &str, state: &str) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log"))?;
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", cluster, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", "skiff-test", "--log-level", "warn"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian's etcd-server; scripts/deps.sh installs it)")?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, limit: Duration) -> Result<()> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if health(&self.client).unwrap_or(false) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!("etcd {} exited ({status}): {}", self.name, self.log())
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("etcd {} not healthy: {}", self.name, self.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether etcd at `addr` says it is healthy (it has a leader).
fn health(addr: &str) -> Result<bool> {
    Ok(get(addr, "/health")?.contains("\"health\":\"true\""))
}

/// A plain HTTP GET of `path` on etcd's client port: the whole answer.
fn get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
