//! The `oci` backend: overlayfs rootfs over unpacked layers, a generated runtime spec,
//! and runc driven by a per-container shim.
//!
//! ```text
//! <root>/<id>/config.json   runtime spec        <root>/<id>/rootfs/  overlay mount
//! <root>/<id>/upper, work/  overlay rw layer    <root>/<id>/hosts, resolv.conf, hostname
//! <root>/<id>/shim.json     shim settings       <root>/<id>/container.log[.N], exit.json
//! ```

use crate::cgroup::{CgroupLimits, CgroupStats, Cgroups};
use crate::runc::{ExecOutput, Runc};
use crate::shim::{self, ShimConfig};
use crate::spec::{self, SpecInput};
use crate::{CreateRequest, Liveness, Runtime, RuntimeError};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct OciRuntime {
    /// `oci` (runc) or `runsc` (gVisor).
    kind: &'static str,
    root: PathBuf,
    runc: Runc,
    skiff_bin: PathBuf,
    cgroups: Cgroups,
    /// Parent of every container cgroup, e.g. `/skiff`.
    cgroup_parent: String,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
}

fn read_pid(dir: &Path, file: &str) -> Option<i32> {
    fs::read_to_string(dir.join(file)).ok().and_then(|p| p.trim().parse::<i32>().ok())
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io { op, path: path.to_path_buf(), source }
}

/// Sets a file's permission bits.
pub(crate) fn set_mode(p: &Path, mode: u32) -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(io("chmod", p))
}

/// Whether `path` is a mount point, from /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

impl OciRuntime {
    /// `root` holds instance directories; `runc_root` holds runc's state.
    pub fn new(
        root: impl Into<PathBuf>,
        runc_root: impl Into<PathBuf>,
        skiff_bin: impl Into<PathBuf>,
        cgroup_parent: &str,
    ) -> Result<Self, RuntimeError> {
        Self::with_runc("oci", root, Runc::new(runc_root.into()), skiff_bin, cgroup_parent)
    }

    /// The same backend over another runc-compatible binary (`runsc`), named `kind`.
    pub fn with_runc(
        kind: &'static str,
        root: impl Into<PathBuf>,
        runc: Runc,
        skiff_bin: impl Into<PathBuf>,
        cgroup_parent: &str,
    ) -> Result<Self, RuntimeError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("create", &root))?;
        fs::create_dir_all(&runc.root).map_err(io("create", &runc.root))?;
        Ok(OciRuntime {
            kind,
            root,
            runc,
            skiff_bin: skiff_bin.into(),
            cgroups: Cgroups::detect(),
            cgroup_parent: cgroup_parent.to_string(),
            log_max_bytes: 10 << 20,
            log_max_files: 3,
        })
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn cgroups_path(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent.trim_end_matches('/'))
    }

    pub fn runc(&self) -> &Runc {
        &self.runc
    }

    /// The runner for instance `id`: a gVisor sandbox is reached from inside the network
    /// namespace it was started in (its shim settings say which).
    fn runc_for(&self, id: &str) -> Runc {
        if !self.runc.is_runsc() {
            return self.runc.clone();
        }
        let netns = fs::read(self.dir(id).join(shim::SHIM_CONFIG))
            .ok()
            .and_then(|b| serde_json::from_slice::<ShimConfig>(&b).ok())
            .and_then(|c| c.start_in_netns);
        self.runc.in_netns(netns)
    }

    fn mount_rootfs(&self, id: &str, layers: &[PathBuf]) -> Result<PathBuf, RuntimeError> {
        let dir = self.dir(id);
        let rootfs = dir.join("rootfs");
        for d in ["rootfs", "upper", "work"] {
            fs::create_dir_all(dir.join(d)).map_err(io("create", &dir.join(d)))?;
        }
        // The container's `/` takes the upper directory's mode: 0755 as an image's root,
        // whatever the agent's restrictive umask made.
        set_mode(&dir.join("upper"), 0o755)?;
        if is_mounted(&rootfs) {
            return Ok(rootfs);
        }
        let lower: Vec<String> = layers.iter().rev().map(|p| p.display().to_string()).collect();
        if lower.is_empty() {
            return Err(RuntimeError::Mount { id: id.into(), message: "the image has no layers".into() });
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        if opts.len() >= 4000 {
            return Err(RuntimeError::Mount {
                id: id.into(),
                message: format!("{} layers make the overlay options longer than a page", layers.len()),
            });
        }
        nix::mount::mount(Some("overlay"), &rootfs, Some("overlay"), nix::mount::MsFlags::empty(), Some(opts.as_str()))
            .map_err(|e| RuntimeError::Mount { id: id.into(), message: e.to_string() })?;
        Ok(rootfs)
    }
}

impl Runtime for OciRuntime {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
        let dir = self.dir(&req.id);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let rootfs = self.mount_rootfs(&req.id, &req.layer_dirs)?;
        let r = (|| {
            fill_volumes(&rootfs, &req.fill_volumes)?;
            let files = [
                ("hosts", req.hosts.as_str(), "/etc/hosts"),
                ("resolv.conf", req.resolv_conf.as_str(), "/etc/resolv.conf"),
                ("hostname", &*format!("{}\n", req.hostname), "/etc/hostname"),
            ];
            let mut etc_files = vec![];
            for (name, body, dst) in files {
                let p = dir.join(name);
                fs::write(&p, body).map_err(io("write", &p))?;
                // Readable by the container's users, as the image's own /etc files are.
                set_mode(&p, 0o644)?;
                etc_files.push((p, dst));
            }
            let spec = spec::generate(&SpecInput {
                deployment: req.deployment,
                image: &req.image.config,
                rootfs: &rootfs,
                hostname: req.hostname.clone(),
                netns: req.netns.clone(),
                etc_files,
                volumes: req.volumes.clone(),
                cgroups_path: self.cgroups_path(&req.id),
                cgroupns: self.cgroups.version == crate::cgroup::CgroupVersion::V2,
                cdi_devices: &req.cdi_devices,
                cdi_edits: &req.cdi_edits,
                seccomp_audit: req.seccomp_audit.clone(),
                init: if req.deployment.init { Some(init_binary(&req.id)?) } else { None },
            })?;
            let p = dir.join("config.json");
            fs::write(&p, serde_json::to_vec_pretty(&spec).unwrap_or_default()).map_err(io("write", &p))?;
            let mut runc_args = self.runc.args.clone();
            if self.runc.is_runsc() {
                runc_args.push(Runc::runsc_network(req.netns.as_deref()).to_string());
            }
            let shim_cfg = ShimConfig {
                id: req.id.clone(),
                runc: self.runc.bin.clone(),
                runc_root: self.runc.root.clone(),
                runc_args,
                start_in_netns: req.netns.clone().filter(|_| self.runc.is_runsc()),
                cgroups_path: self.cgroups_path(&req.id),
                log_max_bytes: req.deployment.logging.max_size_bytes.unwrap_or(self.log_max_bytes),
                log_max_files: req.deployment.logging.max_files.unwrap_or(self.log_max_files),
                tty: req.deployment.tty,
                stdin_open: req.deployment.stdin_open,
            };
            let p = dir.join(shim::SHIM_CONFIG);
            fs::write(&p, serde_json::to_vec_pretty(&shim_cfg).unwrap_or_default()).map_err(io("write", &p))
        })();
        if r.is_err() {
            let _ = self.remove(&req.id);
        }
        r
    }

    fn start(&self, id: &str) -> Result<i32, RuntimeError> {
        Ok(shim::launch(&self.skiff_bin, &self.dir(id), id)?)
    }

    /// Cheap in the steady state: files and /proc only. runc is asked only when the shim
    /// is gone without having recorded an exit.
    fn liveness(&self, id: &str) -> Liveness {
        let dir = self.dir(id);
        if let Some(e) = shim::recorded_exit(&dir) {
            return Liveness::Exited(e);
        }
        if self.watch_pid(id).is_some() {
            // The shim is watching; it writes exit.json when the container ends.
            return Liveness::Running { pid: read_pid(&dir, shim::PID_FILE).unwrap_or(0) };
        }
        // runc keeps its state in <root>/<id>: without it there is nothing to ask about.
        // (runsc names its state files otherwise, so it is always asked.)
        if !self.runc.is_runsc() && !self.runc.root.join(id).exists() {
            return Liveness::Gone;
        }
        match self.runc_for(id).state(id) {
            Some(s) if s.status == "running" || s.status == "created" || s.status == "paused" => {
                Liveness::Running { pid: s.pid }
            }
            _ => Liveness::Gone,
        }
    }

    fn watch_pid(&self, id: &str) -> Option<i32> {
        let dir = self.dir(id);
        // The pid must still be our shim for this bundle (pids are reused after a reboot).
        let bundle = dir.display().to_string();
        let is_shim = |pid: &i32| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).split('\0').any(|a| a == bundle))
        };
        read_pid(&dir, shim::SHIM_PID_FILE).filter(is_shim)
    }

    fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        Ok(self.runc_for(id).kill(id, signal)?)
    }

    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecOutput, RuntimeError> {
        Ok(self.runc_for(id).exec(id, argv, timeout)?)
    }

    fn exec_spawn(
        &self,
        id: &str,
        argv: &[String],
        tty: bool,
        pid_file: &Path,
        stdio: [std::process::Stdio; 3],
    ) -> Result<std::process::Child, RuntimeError> {
        Ok(self.runc_for(id).exec_spawn(id, argv, tty, pid_file, stdio)?)
    }

    fn update_hosts(&self, id: &str, hosts: &str) -> Result<(), RuntimeError> {
        let p = self.dir(id).join("hosts");
        if fs::read_to_string(&p).ok().as_deref() == Some(hosts) {
            return Ok(());
        }
        // Truncate and write in place: a rename would leave the container's bind mount on
        // the old inode.
        fs::write(&p, hosts).map_err(io("write", &p))
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let runc = self.runc_for(id);
        if runc.state(id).is_some() {
            let _ = runc.kill(id, "KILL");
            let _ = runc.delete(id);
        }
        let dir = self.dir(id);
        let rootfs = dir.join("rootfs");
        if is_mounted(&rootfs) {
            nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| RuntimeError::Mount { id: id.into(), message: format!("unmount: {e}") })?;
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        // runc removes the cgroup on delete; clear an empty leftover from a crash.
        for c in [
            "cpu",
            "cpuacct",
            "cpuset",
            "memory",
            "devices",
            "freezer",
            "blkio",
            "pids",
            "systemd",
            "net_cls",
            "perf_event",
            "hugetlb",
            "",
        ] {
            let p = self.cgroups.root.join(c).join(self.cgroups_path(id).trim_start_matches('/'));
            if p.is_dir() {
                let _ = fs::remove_dir(&p);
            }
        }
        Ok(())
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir(id)
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir(id).join(shim::LOG_FILE)
    }

    fn stats(&self, id: &str) -> CgroupStats {
        self.cgroups.stats(&self.cgroups_path(id))
    }

    fn limits(&self, id: &str) -> CgroupLimits {
        self.cgroups.limits(&self.cgroups_path(id))
    }

    fn known(&self) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for id in self.runc.list() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// The binary an instance's init runs from: this one (see `skiff_sys::init`) when it is
/// built static, as released, so it runs in any image; else a static init of the host's
/// (Debian's `tini`).
fn init_binary(id: &str) -> Result<PathBuf, RuntimeError> {
    init_available().map_err(|what| RuntimeError::Unsupported { id: id.to_string(), what })
}

/// The init binary this node would mount (see [`init_binary`]), or why there is none:
/// what admission asks before a deployment with `init` is taken.
pub fn init_available() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().ok().filter(|e| skiff_sys::init::is_static_elf(e));
    exe.or_else(|| skiff_sys::init::HOST_INITS.iter().map(PathBuf::from).find(|p| skiff_sys::init::is_static_elf(p)))
        .ok_or_else(|| {
            format!(
                "init: this skiff binary is dynamically linked (it cannot run inside an image) and no static init \
                 is installed ({})",
                skiff_sys::init::HOST_INITS.join(", ")
            )
        })
}

/// Copies what the image holds at each volume's target into the new volume: the rootfs
/// is mounted and nothing runs in it yet. A target reached through a symbolic link of the
/// image is not followed (the link would be resolved on the host, outside the image):
/// that volume stays empty.
fn fill_volumes(rootfs: &Path, fills: &[(PathBuf, String)]) -> Result<(), RuntimeError> {
    for (volume, target) in fills {
        let mut from = rootfs.to_path_buf();
        let mut inside = true;
        for c in Path::new(target).components() {
            if let std::path::Component::Normal(part) = c {
                from.push(part);
                match fs::symlink_metadata(&from) {
                    Ok(m) if !m.file_type().is_symlink() => {}
                    _ => {
                        inside = false;
                        break;
                    }
                }
            }
        }
        if !inside || !from.is_dir() {
            continue;
        }
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg("--")
            .arg(from.join("."))
            .arg(volume)
            .output()
            .map_err(io("run cp for", volume))?;
        if !out.status.success() {
            return Err(RuntimeError::Io {
                op: "fill",
                path: volume.clone(),
                source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_filled_from_the_image_but_never_through_its_links() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("rootfs");
        fs::create_dir_all(root.join("app/node_modules/left-pad")).unwrap();
        fs::write(root.join("app/node_modules/left-pad/index.js"), "pad").unwrap();
        // An image's link to a host directory: followed on the host, it would copy the
        // host's files into the container's volume.
        let host = t.path().join("host-secrets");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("key"), "secret").unwrap();
        std::os::unix::fs::symlink(&host, root.join("data")).unwrap();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        for d in [&a, &b, &c] {
            fs::create_dir_all(d).unwrap();
        }
        let fills = [(a.clone(), "/app/node_modules".into()), (b.clone(), "/data".into()), (c.clone(), "/none".into())];
        fill_volumes(&root, &fills).unwrap();
        assert_eq!(fs::read_to_string(a.join("left-pad/index.js")).unwrap(), "pad");
        assert_eq!(fs::read_dir(&b).unwrap().count(), 0, "not through the image's link");
        assert_eq!(fs::read_dir(&c).unwrap().count(), 0, "nothing there in the image");
    }
}
