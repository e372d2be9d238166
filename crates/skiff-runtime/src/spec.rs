//! OCI runtime spec generation: image config + deployment → `config.json` for runc.
//!
//! Security defaults follow Docker's: its default capability set, `noNewPrivileges`,
//! masked and read-only `/proc` and `/sys` paths, a device cgroup that denies everything
//! but the standard devices, and a seccomp filter (see [`seccomp`]).

use serde_json::{json, Value};
use skiff_image::ImageConfig;
use skiff_model::validate::normalize_cap;
use skiff_model::{Deployment, NetworkMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("no command to run: the image has no Entrypoint or Cmd and the deployment sets none")]
    NoCommand,
    #[error("user {user:?}: {problem}")]
    User { user: String, problem: String },
    #[error("generated spec is not a valid OCI runtime spec: {0}")]
    Invalid(String),
}

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const ALL_CAPS: &[&str] = &[
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_READ",
    "CAP_AUDIT_WRITE",
    "CAP_BLOCK_SUSPEND",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_PERFMON",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_MODULE",
    "CAP_SYS_NICE",
    "CAP_SYS_PACCT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
];

/// Docker's masked paths (moby's `defaultLinuxMaskedPaths`): `/proc/interrupts` and the
/// thermal throttle counters leak what other tenants do (GHSA-6fw5-f8r9-fgfm), powercap
/// their energy use (GHSA-jq35-85cj-fj4p).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// [`MASKED_PATHS`] and each CPU's `thermal_throttle` directory this machine has.
pub fn masked_paths() -> Vec<String> {
    let mut v: Vec<String> = MASKED_PATHS.iter().map(|s| s.to_string()).collect();
    let mut cpus: Vec<String> = std::fs::read_dir("/sys/devices/system/cpu")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.strip_prefix("cpu").is_some_and(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_digit()))
                })
                .collect()
        })
        .unwrap_or_default();
    cpus.sort_by_key(|n| n[3..].parse::<u32>().unwrap_or(0));
    for cpu in cpus {
        let p = format!("/sys/devices/system/cpu/{cpu}/thermal_throttle");
        if std::path::Path::new(&p).exists() {
            v.push(p);
        }
    }
    v
}
pub const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// Everything about one instance that the spec needs besides the deployment.
pub struct SpecInput<'a> {
    pub deployment: &'a Deployment,
    pub image: &'a ImageConfig,
    /// The mounted overlay rootfs (used to resolve user names).
    pub rootfs: &'a Path,
    pub hostname: String,
    /// `Some(path)` joins that network namespace; `None` with bridge/none mode makes a new
    /// empty one; host mode shares the host's.
    pub netns: Option<PathBuf>,
    /// Files bind-mounted over `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`.
    pub etc_files: Vec<(PathBuf, &'static str)>,
    /// (host path, container path, read only) for every volume, already resolved.
    pub volumes: Vec<(PathBuf, String, bool)>,
    pub cgroups_path: String,
    /// A cgroup namespace of its own (as Docker gives on cgroup v2 hosts), so the
    /// container sees its own cgroup as the root of the hierarchy.
    pub cgroupns: bool,
    /// CDI devices (qualified names, kept as the annotation [`CDI_ANNOTATION`]) and their
    /// container edits.
    pub cdi_devices: &'a [String],
    pub cdi_edits: &'a [(String, crate::cdi::ContainerEdits)],
    /// What the seccomp filter reports to the audit log (the threat detector's).
    pub seccomp_audit: crate::seccomp::Audit,
    /// The host's init binary, mounted at [`skiff_sys::init::PATH`] as process 1 when the
    /// deployment asks for an init.
    pub init: Option<PathBuf>,
}

/// The spec annotation naming the CDI devices an instance holds (comma-separated): how the
/// agent knows which devices are taken.
pub const CDI_ANNOTATION: &str = "skiff.dev/cdi-devices";

/// The capability set after `cap_add` / `cap_drop`, Docker's rules: drop `ALL` first,
/// then add; add `ALL` means every capability.
pub fn capabilities(add: &[String], drop: &[String]) -> Vec<String> {
    let add: Vec<String> = add.iter().filter_map(|c| normalize_cap(c)).collect();
    let drop: Vec<String> = drop.iter().filter_map(|c| normalize_cap(c)).collect();
    let mut caps: Vec<String> = if add.iter().any(|c| c == "ALL") {
        ALL_CAPS.iter().map(|s| s.to_string()).collect()
    } else {
        DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
    };
    if drop.iter().any(|c| c == "ALL") {
        caps.clear();
    }
    caps.retain(|c| !drop.contains(c));
    for c in add {
        if c != "ALL" && !caps.contains(&c) {
            caps.push(c);
        }
    }
    caps.sort();
    caps
}

/// Docker's argv rule: an entrypoint set by the deployment drops the image's Cmd.
pub fn argv(d: &Deployment, img: &ImageConfig) -> Result<Vec<String>, SpecError> {
    let (entry, cmd) = match &d.entrypoint {
        Some(e) => (e.clone(), d.command.clone().unwrap_or_default()),
        None => (
            img.entrypoint.clone().unwrap_or_default(),
            d.command.clone().or_else(|| img.cmd.clone()).unwrap_or_default(),
        ),
    };
    let v: Vec<String> = entry.into_iter().chain(cmd).collect();
    if v.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(v)
}

/// Image env, then the deployment's on top; PATH defaults like Docker's.
pub fn env(d: &Deployment, img: &ImageConfig, hostname: &str) -> Vec<String> {
    let mut m: BTreeMap<String, String> = BTreeMap::new();
    m.insert("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    layer_env(&mut m, d, img, Some(hostname));
    m.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The image's variables, then HOSTNAME (containers), then the deployment's.
pub fn layer_env(m: &mut BTreeMap<String, String>, d: &Deployment, img: &ImageConfig, hostname: Option<&str>) {
    for kv in img.env.iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            m.insert(k.into(), v.into());
        }
    }
    if let Some(h) = hostname {
        m.insert("HOSTNAME".into(), h.into());
    }
    for (k, v) in &d.env {
        m.insert(k.clone(), v.clone());
    }
}

/// The most of an image's /etc/passwd or /etc/group that is read.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// An account database of the image (`etc/passwd`, `etc/group`), read inside the rootfs:
/// a symlink in the image never leads to the host's files, a FIFO or device is refused,
/// and it is capped. Absent: empty.
fn account_file(rootfs: &Path, file: &str) -> Result<String, String> {
    match skiff_sys::inroot::read(rootfs, file, MAX_ACCOUNT_FILE) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.is_not_found() => Ok(String::new()),
        Err(e) => Err(e.to_string()),
    }
}

fn lookup(text: &str, name: &str) -> Option<(u32, Option<u32>)> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            Some((f[2].parse().ok()?, f.get(3).and_then(|g| g.parse().ok())))
        } else {
            None
        }
    })
}

/// Resolves `user[:group]` (names or numbers) against the container's /etc/passwd and
/// /etc/group, as Docker does.
pub fn resolve_user(spec: Option<&str>, rootfs: &Path) -> Result<(u32, u32), SpecError> {
    let Some(spec) = spec.filter(|s| !s.is_empty()) else {
        return Ok((0, 0));
    };
    let err = |p: &str| SpecError::User { user: spec.to_string(), problem: p.to_string() };
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = account_file(rootfs, "/etc/passwd").map_err(|e| err(&e))?;
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (n, lookup(&passwd, u).and_then(|(_, g)| g)),
        Err(_) => {
            let (uid, gid) = lookup(&passwd, u).ok_or_else(|| err("no such user in the image's /etc/passwd"))?;
            (uid, gid)
        }
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                let group = account_file(rootfs, "/etc/group").map_err(|e| err(&e))?;
                lookup(&group, g).map(|(id, _)| id).ok_or_else(|| err("no such group in the image's /etc/group"))?
            }
        },
        None => primary.unwrap_or(0),
    };
    Ok((uid, gid))
}

/// Builds the OCI runtime spec.
pub fn generate(input: &SpecInput<'_>) -> Result<Value, SpecError> {
    let d = input.deployment;
    let img = input.image;
    let mut args = argv(d, img)?;
    let (uid, gid) = resolve_user(d.user.as_deref().or(img.user.as_deref()), input.rootfs)?;
    let cwd = d
        .working_dir
        .clone()
        .or_else(|| img.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    let caps = capabilities(&d.cap_add, &d.cap_drop);
    let shm_size = format!("size={}", d.shm_size_bytes.map(|b| b.div_ceil(1024)).unwrap_or(65536)) + "k";

    let system = 7; // the mounts every container has, before the deployment's own
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", shm_size]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    for (src, dst) in &input.etc_files {
        mounts.push(json!({"destination": dst, "type": "bind", "source": src, "options": ["rbind", "rprivate"]}));
    }
    for (src, dst, ro) in &input.volumes {
        let mut opts = vec!["rbind", "rprivate"];
        if *ro {
            opts.push("ro");
        }
        mounts.push(json!({"destination": dst, "type": "bind", "source": src, "options": opts}));
    }
    match (&input.init, d.init) {
        (Some(init), true) => {
            mounts.push(json!({"destination": skiff_sys::init::PATH, "type": "bind", "source": init, "options": ["rbind", "rprivate", "ro"]}));
            args.splice(0..0, [skiff_sys::init::PATH.to_string(), "--".to_string()]);
        }
        (None, true) => return Err(SpecError::Invalid("init: no init binary to mount".into())),
        _ => {}
    }
    for t in &d.tmpfs {
        let mut opts = vec!["nosuid".to_string(), "nodev".to_string(), format!("mode={:o}", t.mode.unwrap_or(0o1777))];
        if let Some(size) = t.size_bytes {
            opts.push(format!("size={size}"));
        }
        mounts.push(json!({"destination": t.target, "type": "tmpfs", "source": "tmpfs", "options": opts}));
    }

    // As Docker orders them: a mount below another's target comes after it (`tmpfs:
    // /run` must not hide `/run/secrets/db`, a ConfigMap's directory a file put in it).
    let depth = |m: &Value| m["destination"].as_str().map_or(0, |d| d.split('/').filter(|c| !c.is_empty()).count());
    mounts[system..].sort_by_key(depth);
    let mut namespaces =
        vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "uts"}), json!({"type": "mount"})];
    if input.cgroupns {
        namespaces.push(json!({"type": "cgroup"}));
    }
    match (d.network, &input.netns) {
        (NetworkMode::Host, _) => {}
        (_, Some(p)) => namespaces.push(json!({"type": "network", "path": p})),
        (_, None) => namespaces.push(json!({"type": "network"})),
    }

    let r = &d.resources;
    // The device cgroup denies everything; runc adds the standard devices (null, zero,
    // full, random, urandom, tty, ptmx) and we allow the ones the deployment maps.
    let mut cgroup_devices = vec![json!({"allow": false, "access": "rwm"})];
    let mut devices = vec![];
    for dev in &d.devices {
        if let Some((kind, major, minor)) = device_numbers(Path::new(&dev.host_path)) {
            devices.push(json!({"path": dev.container_path, "type": kind, "major": major, "minor": minor, "fileMode": 0o666, "uid": 0, "gid": 0}));
            cgroup_devices
                .push(json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": dev.permissions}));
        }
    }
    let mut resources = json!({"devices": cgroup_devices});
    let mut cpu = serde_json::Map::new();
    if let Some(q) = r.cfs_quota_us() {
        cpu.insert("quota".into(), json!(q));
        cpu.insert("period".into(), json!(skiff_model::Resources::CFS_PERIOD_US));
    }
    if let Some(s) = r.cpu_shares {
        cpu.insert("shares".into(), json!(s));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if let Some(m) = r.memory_bytes {
        // Docker: --memory alone gives memory+swap = 2×memory; skiff follows the issue's
        // edge default of no swap beyond the limit (memory+swap = memory).
        let mut mem = json!({"limit": m, "swap": m});
        if let Some(res) = r.memory_reservation_bytes {
            mem["reservation"] = json!(res);
        }
        resources["memory"] = mem;
    } else if let Some(res) = r.memory_reservation_bytes {
        resources["memory"] = json!({"reservation": res});
    }
    if let Some(p) = r.pids_limit {
        resources["pids"] = json!({"limit": p});
    }

    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": d.tty,
            "user": {"uid": uid, "gid": gid, "additionalGids": [gid]},
            "args": args,
            "env": env(d, img, &input.hostname),
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
            "oomScoreAdj": 0,
        },
        "root": {"path": input.rootfs, "readonly": d.read_only},
        "hostname": input.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": input.cgroups_path,
            "resources": resources,
            "devices": devices,
            "maskedPaths": masked_paths(),
            "readonlyPaths": READONLY_PATHS,
            "seccomp": crate::seccomp::profile(&caps, input.seccomp_audit.clone()),
        },
    });
    if !d.sysctls.is_empty() {
        spec["linux"]["sysctl"] = json!(d.sysctls);
    }
    if !d.ulimits.is_empty() {
        let rlimits: Vec<Value> = d
            .ulimits
            .iter()
            .map(|(name, u)| json!({"type": skiff_model::options::Ulimit::resource(name), "soft": u.soft, "hard": u.hard}))
            .collect();
        spec["process"]["rlimits"] = json!(rlimits);
    }
    if !input.cdi_devices.is_empty() {
        spec["annotations"] = json!({CDI_ANNOTATION: input.cdi_devices.join(",")});
    }
    crate::cdi::apply(&mut spec, input.cdi_edits).map_err(|e| SpecError::Invalid(e.to_string()))?;
    // Type-check against the OCI runtime spec schema before handing it to runc.
    let typed: oci_spec::runtime::Spec =
        serde_json::from_value(spec.clone()).map_err(|e| SpecError::Invalid(e.to_string()))?;
    serde_json::to_value(&typed).map_err(|e| SpecError::Invalid(e.to_string()))
}

pub(crate) fn device_numbers(p: &Path) -> Option<(&'static str, u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(p).ok()?;
    let kind = if m.file_type().is_char_device() {
        "c"
    } else if m.file_type().is_block_device() {
        "b"
    } else {
        return None;
    };
    let rdev = m.rdev();
    Some((kind, nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::Resources;

    fn input<'a>(d: &'a Deployment, img: &'a ImageConfig, root: &'a Path) -> SpecInput<'a> {
        SpecInput {
            deployment: d,
            image: img,
            rootfs: root,
            hostname: "web-1".into(),
            netns: Some("/var/run/netns/x".into()),
            etc_files: vec![],
            volumes: vec![("/data/v".into(), "/v".into(), true)],
            cgroups_path: "/skiff/x".into(),
            cgroupns: false,
            cdi_devices: &[],
            cdi_edits: &[],
            seccomp_audit: Default::default(),
            init: None,
        }
    }

    #[test]
    fn sysctls_ulimits_shm_and_init_reach_the_spec() {
        let t = tempfile::tempdir().unwrap();
        let mut d = Deployment::new("web", "img");
        d.command = Some(vec!["serve".into(), "-v".into()]);
        d.sysctls = BTreeMap::from([("net.core.somaxconn".to_string(), "1024".to_string())]);
        d.ulimits = BTreeMap::from([
            ("nofile".to_string(), skiff_model::options::Ulimit { soft: 1024, hard: 2048 }),
            ("core".to_string(), skiff_model::options::Ulimit { soft: u64::MAX, hard: u64::MAX }),
        ]);
        d.shm_size_bytes = Some(256 << 20);
        d.init = true;
        let img = ImageConfig::default();
        // Without an init binary to mount, asking for one is an error, not a silent skip.
        assert!(generate(&input(&d, &img, t.path())).is_err());
        let s = generate(&SpecInput { init: Some("/usr/bin/skiff".into()), ..input(&d, &img, t.path()) }).unwrap();
        assert_eq!(s["linux"]["sysctl"], json!({"net.core.somaxconn": "1024"}));
        assert_eq!(
            s["process"]["rlimits"],
            json!([
                {"type": "RLIMIT_CORE", "soft": u64::MAX, "hard": u64::MAX},
                {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 2048},
            ])
        );
        let mounts = s["mounts"].as_array().unwrap();
        let at = |dst: &str| mounts.iter().find(|m| m["destination"] == dst).cloned().unwrap();
        assert!(at("/dev/shm")["options"].as_array().unwrap().contains(&json!("size=262144k")));
        assert_eq!(at("/sbin/docker-init")["source"], "/usr/bin/skiff");
        assert_eq!(s["process"]["args"], json!(["/sbin/docker-init", "--", "serve", "-v"]));
        d.init = false;
        d.shm_size_bytes = None;
        let s = generate(&input(&d, &img, t.path())).unwrap();
        assert_eq!(s["process"]["args"], json!(["serve", "-v"]));
        let mounts = s["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/dev/shm" && m["options"][4] == "size=65536k"));
    }

    #[test]
    fn a_mount_below_another_comes_after_it() {
        let t = tempfile::tempdir().unwrap();
        let mut d = Deployment::new("web", "img");
        d.command = Some(vec!["true".into()]);
        d.tmpfs = vec![skiff_model::Tmpfs { target: "/run".into(), size_bytes: None, mode: None }];
        let img = ImageConfig::default();
        let mut i = input(&d, &img, t.path());
        i.volumes =
            vec![("/v/secret".into(), "/run/secrets/db".into(), true), ("/v/etc".into(), "/etc/app".into(), true)];
        let s = generate(&i).unwrap();
        let order: Vec<&str> =
            s["mounts"].as_array().unwrap()[7..].iter().map(|m| m["destination"].as_str().unwrap()).collect();
        assert_eq!(order, ["/run", "/etc/app", "/run/secrets/db"]);
    }

    #[test]
    fn tmpfs_mounts_carry_size_and_mode() {
        let t = tempfile::tempdir().unwrap();
        let mut d = Deployment::new("web", "img");
        d.command = Some(vec!["true".into()]);
        d.tmpfs = vec![
            skiff_model::Tmpfs { target: "/run".into(), size_bytes: Some(64 << 20), mode: Some(0o755) },
            skiff_model::Tmpfs { target: "/cache".into(), size_bytes: None, mode: None },
        ];
        let s = generate(&input(&d, &ImageConfig::default(), t.path())).unwrap();
        let mounts = s["mounts"].as_array().unwrap();
        let at = |dst: &str| mounts.iter().find(|m| m["destination"] == dst).cloned().unwrap();
        assert_eq!(at("/run")["type"], "tmpfs");
        assert_eq!(at("/run")["options"], json!(["nosuid", "nodev", "mode=755", format!("size={}", 64 << 20)]));
        assert_eq!(at("/cache")["options"], json!(["nosuid", "nodev", "mode=1777"]));
    }

    #[test]
    fn spec_carries_limits_and_security_defaults() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(t.path().join("etc/passwd"), "app:x:1000:1001::/:/bin/sh\n").unwrap();
        let mut d = Deployment::new("web", "img");
        d.resources = Resources {
            cpus_millis: Some(500),
            memory_bytes: Some(64 << 20),
            cpu_shares: Some(2048),
            pids_limit: Some(50),
            ..Default::default()
        };
        d.user = Some("app".into());
        d.cap_drop = vec!["NET_RAW".into()];
        d.cap_add = vec!["sys_time".into()];
        let img = ImageConfig {
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec!["echo hi".into()]),
            ..Default::default()
        };
        let s = generate(&input(&d, &img, t.path())).unwrap();
        assert_eq!(s["process"]["args"], json!(["/bin/sh", "-c", "echo hi"]));
        assert_eq!(s["process"]["user"]["uid"], 1000);
        assert_eq!(s["process"]["user"]["gid"], 1001);
        assert_eq!(s["process"]["noNewPrivileges"], true);
        let r = &s["linux"]["resources"];
        assert_eq!(
            (r["cpu"]["quota"].as_i64(), r["cpu"]["period"].as_u64(), r["cpu"]["shares"].as_u64()),
            (Some(50_000), Some(100_000), Some(2048))
        );
        assert_eq!((r["memory"]["limit"].as_i64(), r["memory"]["swap"].as_i64()), (Some(64 << 20), Some(64 << 20)));
        assert_eq!(r["pids"]["limit"], 50);
        let caps: Vec<String> = serde_json::from_value(s["process"]["capabilities"]["bounding"].clone()).unwrap();
        assert!(caps.contains(&"CAP_SYS_TIME".to_string()) && !caps.contains(&"CAP_NET_RAW".to_string()));
        assert!(!caps.contains(&"CAP_SYS_ADMIN".to_string()));
        let masked = s["linux"]["maskedPaths"].as_array().unwrap();
        assert!(masked.contains(&json!("/proc/kcore")) && masked.contains(&json!("/proc/interrupts")));
        assert_eq!(s["linux"]["namespaces"].as_array().unwrap().len(), 5);
        let v2 = generate(&SpecInput { cgroupns: true, ..input(&d, &img, t.path()) }).unwrap();
        assert!(
            v2["linux"]["namespaces"].as_array().unwrap().contains(&json!({"type": "cgroup"})),
            "cgroup v2: own cgroupns"
        );
        let vol = s["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == "/v").unwrap();
        assert!(vol["options"].as_array().unwrap().contains(&json!("ro")));
    }

    #[test]
    fn argv_follows_docker() {
        let img =
            ImageConfig { entrypoint: Some(vec!["/ep".into()]), cmd: Some(vec!["a".into()]), ..Default::default() };
        let mut d = Deployment::new("x", "i");
        assert_eq!(argv(&d, &img).unwrap(), ["/ep", "a"]);
        d.command = Some(vec!["b".into()]);
        assert_eq!(argv(&d, &img).unwrap(), ["/ep", "b"]);
        d.entrypoint = Some(vec!["/other".into()]);
        d.command = None;
        assert_eq!(argv(&d, &img).unwrap(), ["/other"]);
        assert!(matches!(argv(&Deployment::new("x", "i"), &ImageConfig::default()), Err(SpecError::NoCommand)));
    }

    #[test]
    fn caps_all() {
        assert!(capabilities(&[], &["ALL".into()]).is_empty());
        assert_eq!(capabilities(&["ALL".into()], &[]).len(), ALL_CAPS.len());
        assert_eq!(capabilities(&["NET_ADMIN".into()], &["ALL".into()]), vec!["CAP_NET_ADMIN".to_string()]);
    }

    #[test]
    fn users() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(t.path().join("etc/group"), "staff:x:50:\n").unwrap();
        assert_eq!(resolve_user(Some("1000:staff"), t.path()).unwrap(), (1000, 50));
        assert_eq!(resolve_user(Some("5:6"), t.path()).unwrap(), (5, 6));
        assert!(resolve_user(Some("ghost"), t.path()).is_err());
    }

    /// A hostile image: /etc/passwd a link to the host's /dev/zero (the agent would read
    /// forever) or to a host file; /etc/group a FIFO (a start would hang).
    #[test]
    fn an_images_account_files_are_read_inside_it_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", t.path().join("etc/passwd")).unwrap();
        let e = resolve_user(Some("root"), t.path()).unwrap_err().to_string();
        assert!(e.contains("no such user"), "the rootfs has no /dev/zero: {e}");
        std::fs::remove_file(t.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("etc/passwd")).unwrap();
        assert!(resolve_user(Some("root"), t.path()).is_err(), "not the host's root");
        std::fs::remove_file(t.path().join("etc/passwd")).unwrap();
        std::fs::write(t.path().join("etc/passwd"), "app:x:1000:1000::/:/bin/sh\n").unwrap();
        nix::unistd::mkfifo(&t.path().join("etc/group"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = resolve_user(Some("app:staff"), t.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::write(t.path().join("etc/big"), vec![b'x'; (MAX_ACCOUNT_FILE + 1) as usize]).unwrap();
        std::fs::remove_file(t.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("big", t.path().join("etc/passwd")).unwrap();
        assert!(resolve_user(Some("app"), t.path()).unwrap_err().to_string().contains("larger than"));
    }
}
