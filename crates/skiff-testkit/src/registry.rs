//! A real local registry (Debian's `docker-registry`) on 127.0.0.1 fed by `skopeo`, and a
//! fault-injecting TCP proxy in front of it (the only fake: it cuts and corrupts).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Registry {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
}

impl Registry {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Registry { dir, child, port })
    }

    /// Pushes an OCI layout (all platforms of an index) as `repo:tag`.
    pub fn push(&self, layout: &Path, repo_tag: &str) -> anyhow::Result<()> {
        let out = Command::new("skopeo")
            .args(["copy", "--all", "--dest-tls-verify=false"])
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo_tag}", self.port))
            .output()?;
        anyhow::ensure!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// A TCP proxy to the registry that counts the bytes it forwards to the client, and can
/// cut every connection after `cut_after` bytes or flip the byte at `flip_at`.
pub struct FaultProxy {
    pub port: u16,
    /// Bytes forwarded from the registry to clients.
    pub down: Arc<AtomicU64>,
}

impl FaultProxy {
    pub fn start(upstream: u16, cut_after: Option<u64>, flip_at: Option<u64>) -> anyhow::Result<Self> {
        Self::start_with(upstream, cut_after, flip_at, None)
    }

    /// Like `start`, also limiting each connection to `bytes_per_sec`.
    pub fn start_with(
        upstream: u16,
        cut_after: Option<u64>,
        flip_at: Option<u64>,
        bytes_per_sec: Option<u64>,
    ) -> anyhow::Result<Self> {
        Self::start_to(&format!("127.0.0.1:{upstream}"), cut_after, flip_at, bytes_per_sec)
    }

    /// The proxy in front of any `host:port`.
    pub fn start_to(
        upstream: &str,
        cut_after: Option<u64>,
        flip_at: Option<u64>,
        bytes_per_sec: Option<u64>,
    ) -> anyhow::Result<Self> {
        let upstream = upstream.to_string();
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let down = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&down);
        std::thread::spawn(move || {
            for c in l.incoming().take(10_000) {
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect(upstream.as_str()) else { continue };
                let (Ok(mut c_r), Ok(mut s_w)) = (client.try_clone(), server.try_clone()) else { continue };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_r, &mut s_w);
                    let _ = s_w.shutdown(std::net::Shutdown::Write);
                });
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    let (mut s_r, mut c_w) = (server, client);
                    let mut buf = [0u8; 16 * 1024];
                    let chunk = if bytes_per_sec.is_some() { 4 * 1024 } else { buf.len() };
                    let mut sent = 0u64;
                    loop {
                        let n = match s_r.read(&mut buf[..chunk]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut n = n;
                        if let Some(cut) = cut_after {
                            n = n.min((cut - sent) as usize);
                        }
                        if let Some(f) = flip_at {
                            if f >= sent && f < sent + n as u64 {
                                buf[(f - sent) as usize] ^= 0xff;
                            }
                        }
                        if c_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        if let Some(rate) = bytes_per_sec {
                            std::thread::sleep(Duration::from_micros(n as u64 * 1_000_000 / rate.max(1)));
                        }
                        if cut_after.is_some_and(|c| sent >= c) {
                            break;
                        }
                    }
                    let _ = c_w.shutdown(std::net::Shutdown::Both);
                    let _ = s_r.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Ok(FaultProxy { port, down })
    }
}

/// Skips (or, with SKIFF_REQUIRE_PRIVILEGED, fails) when root or the registry tools are
/// missing.
#[macro_export]
macro_rules! require_registry_tools {
    () => {
        $crate::require_privileged!();
        for bin in ["docker-registry", "skopeo"] {
            if $crate::which(bin).is_none() {
                if std::env::var_os("SKIFF_REQUIRE_PRIVILEGED").is_some() {
                    panic!("{bin} is not installed (apt-get install docker-registry skopeo)");
                }
                eprintln!("skipping: {bin} is not installed");
                return Ok(());
            }
        }
    };
}
