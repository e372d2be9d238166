//! Fixtures for tests, benchmarks and the demo: OCI images built locally from Debian's
//! busybox-static (no registry needed), crafted layers (including malicious ones), and
//! guards for privileged tests.
#![forbid(unsafe_code)]

pub mod etcd;
pub mod registry;
pub mod tls;
pub mod traffic;
pub mod wasm;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

pub const BUSYBOX: &str = "/bin/busybox";

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Builds tar layers entry by entry.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder { b: tar::Builder::new(Vec::new()) }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    /// Writes a raw name into the header without the tar crate's path checks, so tests
    /// can build the malicious entries a hostile registry could serve.
    fn raw_name(h: &mut tar::Header, name: &str) -> Result<()> {
        let field = &mut h.as_old_mut().name;
        if name.len() >= field.len() {
            bail!("name too long for a raw header: {name}");
        }
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        Ok(())
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Result<Self> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        Self::raw_name(&mut h, path)?;
        h.set_cksum();
        self.b.append(&h, std::io::empty())?;
        Ok(self)
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Result<Self> {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        Self::raw_name(&mut h, path)?;
        h.set_cksum();
        self.b.append(&h, data)?;
        Ok(self)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Result<Self> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        Self::raw_name(&mut h, path)?;
        h.set_link_name(target)?;
        h.set_cksum();
        self.b.append(&h, std::io::empty())?;
        Ok(self)
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Result<Self> {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        Self::raw_name(&mut h, path)?;
        let field = &mut h.as_old_mut().linkname;
        field.fill(0);
        field[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.b.append(&h, std::io::empty())?;
        Ok(self)
    }

    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Result<Self> {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0);
        Self::raw_name(&mut h, path)?;
        h.set_device_major(major)?;
        h.set_device_minor(minor)?;
        h.set_cksum();
        self.b.append(&h, std::io::empty())?;
        Ok(self)
    }

    pub fn fifo(mut self, path: &str) -> Result<Self> {
        let mut h = Self::header(tar::EntryType::Fifo, 0o644, 0);
        Self::raw_name(&mut h, path)?;
        h.set_cksum();
        self.b.append(&h, std::io::empty())?;
        Ok(self)
    }

    pub fn whiteout(self, path: &str) -> Result<Self> {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), 0o644, b"")
    }

    pub fn opaque(self, dir: &str) -> Result<Self> {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self.b.into_inner()?)
    }
}

/// A root filesystem layer with busybox-static and a symlink per applet, `/etc/passwd`,
/// and a page for `httpd` under `/www`.
pub fn busybox_layer() -> Result<Vec<u8>> {
    let bb = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX} (apt-get install busybox-static)"))?;
    let out = std::process::Command::new(BUSYBOX).arg("--list").output().context("busybox --list")?;
    let mut l = LayerBuilder::new();
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "www", "var", "root", "data"] {
        l = l.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    l = l.file("bin/busybox", 0o755, &bb)?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() && !applet.contains('/') {
            l = l.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }
    l = l
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")?
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?
        .file("www/index.html", 0o644, b"hello from skiff\n")?;
    l.finish()
}

/// A layer as stored (possibly gzip-compressed) and its diff_id.
type LayerBlob = (Vec<u8>, String);

/// An image under construction: layers (uncompressed tars) plus the runtime config.
#[derive(Clone)]
pub struct ImageBuilder {
    pub layers: Vec<Vec<u8>>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub architecture: String,
    pub variant: Option<String>,
    /// `linux`, or `wasi` for a `wasi/wasm` image.
    pub os: String,
    pub gzip: bool,
}

impl ImageBuilder {
    pub fn busybox() -> Result<Self> {
        Ok(ImageBuilder {
            layers: vec![busybox_layer()?],
            entrypoint: None,
            cmd: Some(vec!["/bin/sh".into()]),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: None,
            architecture: host_arch().into(),
            variant: skiff_model::platform::host_arch().1.map(Into::into),
            os: "linux".into(),
            gzip: true,
        })
    }

    /// A `wasi/wasm` image (Docker+Wasm's shape): one layer holding `/app.wasm`, which is
    /// its entrypoint.
    pub fn wasi(module: &[u8]) -> Result<Self> {
        let layer = LayerBuilder::new().file("app.wasm", 0o755, module)?.finish()?;
        Ok(ImageBuilder {
            layers: vec![layer],
            entrypoint: Some(vec!["/app.wasm".into()]),
            cmd: None,
            env: vec![],
            working_dir: None,
            architecture: "wasm".into(),
            variant: None,
            os: "wasi".into(),
            gzip: true,
        })
    }

    pub fn layer(mut self, tar: Vec<u8>) -> Self {
        self.layers.push(tar);
        self
    }

    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Returns (config json, [(compressed blob, diff_id)]).
    fn blobs(&self) -> Result<(Vec<u8>, Vec<LayerBlob>)> {
        let mut layers = vec![];
        for l in &self.layers {
            let diff = sha256(l);
            let blob = if self.gzip {
                // gzip's and Go's default level, as `gzip`, `docker push` and `skopeo` compress
                // (it stores incompressible blocks instead of Huffman-coding them).
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                std::io::Write::write_all(&mut e, l)?;
                e.finish()?
            } else {
                l.clone()
            };
            layers.push((blob, diff));
        }
        let config = serde_json::json!({
            "architecture": self.architecture,
            "variant": self.variant,
            "os": self.os,
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": self.working_dir.clone().unwrap_or_default(),
            },
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()},
        });
        Ok((serde_json::to_vec(&config)?, layers))
    }

    /// Writes this image's blobs and manifest into `dir`'s blob store; returns the
    /// manifest's (digest, size).
    fn write_blobs(&self, dir: &Path) -> Result<(String, usize)> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        let put = |b: &[u8]| -> Result<(String, usize)> {
            let d = sha256(b);
            std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b)?;
            Ok((d, b.len()))
        };
        let (config, layers) = self.blobs()?;
        let (cd, cs) = put(&config)?;
        let mut ldesc = vec![];
        for (blob, _) in &layers {
            let (d, s) = put(blob)?;
            let mt = if self.gzip {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            ldesc.push(serde_json::json!({"mediaType": mt, "digest": d, "size": s}));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": ldesc,
        }))?;
        put(&manifest)
    }

    fn write_index(dir: &Path, entries: Vec<serde_json::Value>) -> Result<()> {
        let index = serde_json::json!({"schemaVersion": 2, "manifests": entries});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(())
    }

    /// Writes an OCI image layout directory naming the image `name`.
    pub fn write_oci_layout(&self, dir: &Path, name: &str) -> Result<String> {
        let (md, ms) = self.write_blobs(dir)?;
        let entry = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
        });
        Self::write_index(dir, vec![entry])?;
        Ok(md)
    }

    /// Writes a multi-platform OCI layout: an image index (itself a blob) over `images`,
    /// each for its own `architecture`/`variant`. Returns the index digest.
    pub fn write_multi_arch_layout(dir: &Path, name: &str, images: &[ImageBuilder]) -> Result<String> {
        let mut manifests = vec![];
        for img in images {
            let (md, ms) = img.write_blobs(dir)?;
            let mut platform = serde_json::json!({"architecture": img.architecture, "os": img.os});
            if let Some(v) = &img.variant {
                platform["variant"] = serde_json::json!(v);
            }
            manifests.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms, "platform": platform}));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests,
        }))?;
        let d = sha256(&index);
        std::fs::write(dir.join("blobs/sha256").join(d.trim_start_matches("sha256:")), &index)?;
        let entry = serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": index.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
        });
        Self::write_index(dir, vec![entry])?;
        Ok(d)
    }

    /// Writes a tarball in the classic `docker save` format (manifest.json, `<id>.json`,
    /// `<n>/layer.tar`).
    pub fn write_docker_save(&self, path: &Path, name: &str) -> Result<()> {
        let plain = ImageBuilder { gzip: false, ..self.clone() };
        let (config, layers) = plain.blobs()?;
        let cid = sha256(&config).trim_start_matches("sha256:").to_string();
        let mut b = tar::Builder::new(std::fs::File::create(path)?);
        let mut add = |p: &str, data: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, p, data)?;
            Ok(())
        };
        add(&format!("{cid}.json"), &config)?;
        let mut lnames = vec![];
        for (i, (blob, _)) in layers.iter().enumerate() {
            let n = format!("layer{i}/layer.tar");
            add(&n, blob)?;
            lnames.push(n);
        }
        let manifest = serde_json::json!([{"Config": format!("{cid}.json"), "RepoTags": [name], "Layers": lnames}]);
        add("manifest.json", &serde_json::to_vec(&manifest)?)?;
        b.into_inner()?.sync_all()?;
        Ok(())
    }
}

pub fn host_arch() -> &'static str {
    skiff_model::platform::host_arch().0
}

/// `len` bytes that do not compress (a xorshift stream), for images of a given size.
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Why privileged tests cannot run here, if they cannot: not root, or runc missing.
pub fn privileged_skip_reason() -> Option<String> {
    if !nix_is_root() {
        return Some("needs root (CI runs these as root)".into());
    }
    for bin in ["runc", "ip"] {
        if which(bin).is_none() {
            return Some(format!("{bin} is not installed (apt-get install runc iproute2)"));
        }
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("{BUSYBOX} is missing (apt-get install busybox-static)"));
    }
    None
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// The seccomp probe (`probes/seccomp.c`), built static with the host's C compiler (the
/// setup scripts install gcc and libc6-dev): a binary that runs in a busybox image.
pub fn seccomp_probe() -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("seccomp.c");
    std::fs::write(&src, include_str!("../probes/seccomp.c"))?;
    let out = dir.path().join("probe");
    let r = std::process::Command::new("gcc").args(["-static", "-O1", "-o"]).arg(&out).arg(&src).output()?;
    anyhow::ensure!(r.status.success(), "gcc -static seccomp.c: {}", String::from_utf8_lossy(&r.stderr));
    Ok(std::fs::read(out)?)
}

pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(bin)).find(|p| p.is_file())
}

/// Returns early from a test with a printed reason when privileged tests cannot run.
/// With `SKIFF_REQUIRE_PRIVILEGED=1` (set by CI) a missing prerequisite fails instead.
#[macro_export]
macro_rules! require_privileged {
    () => {
        if let Some(reason) = $crate::privileged_skip_reason() {
            if std::env::var_os("SKIFF_REQUIRE_PRIVILEGED").is_some() {
                panic!("privileged test cannot run: {reason}");
            }
            eprintln!("skipping: {reason}");
            return Ok(());
        }
    };
}

/// A tmpfs of a given size, for disk-full and high-water-mark tests; unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(bytes: u64) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "skiff-test"])
            .arg(dir.path())
            .output()?;
        anyhow::ensure!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn resize(&self, bytes: u64) -> Result<()> {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(self.dir.path())
            .output()?;
        anyhow::ensure!(out.status.success(), "remount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A Docker daemon of the test's own (Debian's `docker.io`): its own data root, sockets
/// and managed containerd under `dir`, no bridge and no iptables rules (the host's
/// forwarding policy is left alone). Stopped, and its mounts removed, on drop.
pub struct Dockerd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    sock: String,
}

impl Dockerd {
    pub fn start(dir: &Path, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let sock = format!("unix://{}", dir.join("docker.sock").display());
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let child = std::process::Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args(["-H", &sock, "--bridge", "none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let d = Dockerd { child, dir: dir.to_path_buf(), sock };
        for _ in 0..300 {
            if d.cli(&["info"]).is_ok() {
                return Ok(d);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::bail!("dockerd did not start: {}", std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default())
    }

    /// Runs `docker ARGS` against this daemon; its stdout, or an error with its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("docker").args(["-H", &self.sock]).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = nix_kill(self.child.id());
        for _ in 0..150 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // What a daemon that did not stop cleanly leaves mounted under its roots.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let root = self.dir.display().to_string();
            let mut under: Vec<&str> =
                mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&root)).collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in under {
                let _ = std::process::Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

/// SIGTERM to `pid` (docker stops its containers and containerd on it).
fn nix_kill(pid: u32) -> std::io::Result<()> {
    let st = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}
