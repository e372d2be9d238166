//! Reading cgroup limits and statistics, for v1 (per-controller hierarchies) and v2
//! (unified). runc *applies* a container's limits from the OCI spec; skiff only *reads*
//! them here. A WebAssembly instance has no runc: its shim makes its own cgroup and
//! enters it ([`Cgroups::enter`]), with the memory and pids limits the agent gave it.
//!
//! The root is a parameter so that tests point it at a fixture directory.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct Cgroups {
    pub version: CgroupVersion,
    pub root: PathBuf,
}

/// Limits as configured on a container's cgroup. `None` means unlimited or not readable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub cpu_quota_us: Option<i64>,
    pub cpu_period_us: Option<u64>,
    /// v1 `cpu.shares` (v2: None; compare `cpu_weight` with [`shares_to_weight`]).
    pub cpu_shares: Option<u64>,
    /// v2 `cpu.weight` as read (v1: None).
    pub cpu_weight: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// memory + swap (v1 `memory.memsw.limit_in_bytes`; v2 memory.max + memory.swap.max).
    pub memory_swap_bytes: Option<u64>,
    pub pids_max: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    pub oom_kills: u64,
    pub pids: u64,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// `max` and v1's "unlimited" sentinel (a huge page-rounded number) map to None.
fn limit(s: Option<String>) -> Option<u64> {
    let s = s?;
    if s == "max" || s == "-1" {
        return None;
    }
    let v: u64 = s.parse().ok()?;
    (v < (1u64 << 62)).then_some(v)
}

fn key_in(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

/// Counters sampled every few seconds are read through kept-open files.
fn sampled_u64(p: &Path) -> Option<u64> {
    skiff_sys::kept::read(p)?.trim().parse().ok()
}

fn sampled_keyed(p: &Path, key: &str) -> Option<u64> {
    key_in(&skiff_sys::kept::read(p)?, key)
}

/// runc's conversion from cpu.shares to cpu.weight on cgroup v2.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + ((shares.saturating_sub(2)) * 9999) / 262_142
}

/// The limits of a cgroup skiff makes itself (a WebAssembly shim's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnLimits {
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
}

/// The v1 controllers a skiff-made cgroup joins (those the host has).
const OWN_V1: &[&str] = &["memory", "pids", "cpu", "cpuacct"];

impl Cgroups {
    /// Makes `cg` (e.g. `/skiff/<id>`) with `limits` and moves process `pid` into it. On
    /// v2 the controllers are enabled down the path first.
    pub fn enter(&self, cg: &str, limits: &OwnLimits, pid: u32) -> std::io::Result<()> {
        let write = |dir: &Path, file: &str, value: String| fs::write(dir.join(file), value);
        match self.version {
            CgroupVersion::V1 => {
                // Controllers mounted together (`cpu` and `cpuacct` are links to
                // `cpu,cpuacct` on most hosts) are one hierarchy, entered once: each move
                // waits for the kernel's cgroup lock, milliseconds of a start.
                let mut seen = vec![];
                for ctrl in OWN_V1.iter().filter(|c| self.root.join(c).is_dir()) {
                    let real = fs::canonicalize(self.root.join(ctrl)).unwrap_or_else(|_| self.root.join(ctrl));
                    if seen.contains(&real) {
                        continue;
                    }
                    seen.push(real);
                    let d = self.dir(ctrl, cg);
                    fs::create_dir_all(&d)?;
                    match *ctrl {
                        "memory" => {
                            if let Some(m) = limits.memory_max {
                                write(&d, "memory.limit_in_bytes", m.to_string())?;
                            }
                        }
                        "pids" => {
                            if let Some(p) = limits.pids_max {
                                write(&d, "pids.max", p.to_string())?;
                            }
                        }
                        _ => {}
                    }
                    write(&d, "cgroup.procs", pid.to_string())?;
                }
            }
            CgroupVersion::V2 => {
                let rel = cg.trim_start_matches('/');
                let mut at = self.root.clone();
                for part in Path::new(rel).components() {
                    // The parent hands memory and pids down to its children.
                    write(&at, "cgroup.subtree_control", "+memory +pids".into())?;
                    at.push(part);
                    fs::create_dir_all(&at)?;
                }
                if let Some(m) = limits.memory_max {
                    write(&at, "memory.max", m.to_string())?;
                }
                if let Some(p) = limits.pids_max {
                    write(&at, "pids.max", p.to_string())?;
                }
                write(&at, "cgroup.procs", pid.to_string())?;
            }
        }
        Ok(())
    }

    /// Removes `cg` (once its processes are gone) wherever [`Cgroups::enter`] made it.
    /// A process that was just killed can hold its cgroup for a moment after it is gone
    /// from the process table (the directory is busy): each directory is tried again for
    /// up to a second.
    pub fn remove(&self, cg: &str) {
        let dirs: Vec<PathBuf> = match self.version {
            CgroupVersion::V1 => OWN_V1.iter().map(|ctrl| self.dir(ctrl, cg)).collect(),
            CgroupVersion::V2 => vec![self.dir("", cg)],
        };
        for d in dirs {
            for _ in 0..50 {
                match fs::remove_dir(&d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
    }

    /// Detects the host's mode: v2 when `/sys/fs/cgroup` is itself cgroup2, else v1
    /// (hybrid hosts count as v1, as runc treats them).
    pub fn detect() -> Self {
        let root = PathBuf::from("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers").exists();
        Cgroups { version: if v2 { CgroupVersion::V2 } else { CgroupVersion::V1 }, root }
    }

    pub fn at(version: CgroupVersion, root: impl Into<PathBuf>) -> Self {
        Cgroups { version, root: root.into() }
    }

    /// The directory of `cg` (an OCI `cgroupsPath` such as `/skiff/abc`) for `controller`.
    fn dir(&self, controller: &str, cg: &str) -> PathBuf {
        let rel = cg.trim_start_matches('/');
        match self.version {
            CgroupVersion::V1 => self.root.join(controller).join(rel),
            CgroupVersion::V2 => self.root.join(rel),
        }
    }

    pub fn exists(&self, cg: &str) -> bool {
        self.dir("memory", cg).exists()
    }

    pub fn limits(&self, cg: &str) -> CgroupLimits {
        match self.version {
            CgroupVersion::V1 => {
                let cpu = self.dir("cpu", cg);
                let mem = self.dir("memory", cg);
                CgroupLimits {
                    cpu_quota_us: read_trim(&cpu.join("cpu.cfs_quota_us"))
                        .and_then(|s| s.parse().ok())
                        .filter(|q: &i64| *q > 0),
                    cpu_period_us: read_trim(&cpu.join("cpu.cfs_period_us")).and_then(|s| s.parse().ok()),
                    cpu_shares: read_trim(&cpu.join("cpu.shares")).and_then(|s| s.parse().ok()),
                    cpu_weight: None,
                    memory_bytes: limit(read_trim(&mem.join("memory.limit_in_bytes"))),
                    memory_swap_bytes: limit(read_trim(&mem.join("memory.memsw.limit_in_bytes"))),
                    pids_max: limit(read_trim(&self.dir("pids", cg).join("pids.max"))),
                }
            }
            CgroupVersion::V2 => {
                let d = self.dir("", cg);
                let (quota, period) = match read_trim(&d.join("cpu.max")) {
                    Some(s) => {
                        let mut it = s.split_whitespace();
                        let q = it.next().and_then(|q| q.parse().ok());
                        let p = it.next().and_then(|p| p.parse().ok());
                        (q, p)
                    }
                    None => (None, None),
                };
                let weight: Option<u64> = read_trim(&d.join("cpu.weight")).and_then(|s| s.parse().ok());
                let mem = limit(read_trim(&d.join("memory.max")));
                let swap = limit(read_trim(&d.join("memory.swap.max")));
                CgroupLimits {
                    cpu_quota_us: quota,
                    cpu_period_us: period,
                    cpu_shares: None,
                    cpu_weight: weight,
                    memory_bytes: mem,
                    memory_swap_bytes: match (mem, swap) {
                        (Some(m), Some(s)) => Some(m + s),
                        _ => None,
                    },
                    pids_max: limit(read_trim(&d.join("pids.max"))),
                }
            }
        }
    }

    /// Usage counters (read through kept-open files: see [`skiff_sys::kept`]).
    pub fn stats(&self, cg: &str) -> CgroupStats {
        match self.version {
            CgroupVersion::V1 => {
                let mem = self.dir("memory", cg);
                let usage = sampled_u64(&mem.join("memory.usage_in_bytes")).unwrap_or(0);
                // Working set, as cAdvisor/kubelet compute it: usage minus inactive file cache.
                let inactive = sampled_keyed(&mem.join("memory.stat"), "total_inactive_file").unwrap_or(0);
                CgroupStats {
                    cpu_usage_ns: sampled_u64(&self.dir("cpuacct", cg).join("cpuacct.usage")).unwrap_or(0),
                    memory_bytes: usage.saturating_sub(inactive),
                    oom_kills: sampled_keyed(&mem.join("memory.oom_control"), "oom_kill").unwrap_or(0),
                    pids: sampled_u64(&self.dir("pids", cg).join("pids.current")).unwrap_or(0),
                }
            }
            CgroupVersion::V2 => {
                let d = self.dir("", cg);
                let usage = sampled_u64(&d.join("memory.current")).unwrap_or(0);
                let inactive = sampled_keyed(&d.join("memory.stat"), "inactive_file").unwrap_or(0);
                CgroupStats {
                    cpu_usage_ns: sampled_keyed(&d.join("cpu.stat"), "usage_usec").unwrap_or(0) * 1000,
                    memory_bytes: usage.saturating_sub(inactive),
                    oom_kills: sampled_keyed(&d.join("memory.events"), "oom_kill").unwrap_or(0),
                    pids: sampled_u64(&d.join("pids.current")).unwrap_or(0),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }

    #[test]
    fn own_cgroups_on_both_versions() {
        let t = tempfile::tempdir().unwrap();
        let v1 = t.path().join("v1");
        for c in ["memory", "pids", "cpu"] {
            fs::create_dir_all(v1.join(c)).unwrap();
        }
        let limits = OwnLimits { memory_max: Some(96 << 20), pids_max: Some(64) };
        Cgroups::at(CgroupVersion::V1, &v1).enter("/skiff/w1", &limits, 42).unwrap();
        assert_eq!(fs::read_to_string(v1.join("memory/skiff/w1/memory.limit_in_bytes")).unwrap(), "100663296");
        assert_eq!(fs::read_to_string(v1.join("pids/skiff/w1/pids.max")).unwrap(), "64");
        assert_eq!(fs::read_to_string(v1.join("cpu/skiff/w1/cgroup.procs")).unwrap(), "42");
        assert!(!v1.join("cpuacct").exists(), "a controller the host lacks is left out");
        // Controllers mounted together are entered once, through either name.
        std::os::unix::fs::symlink(v1.join("cpu"), v1.join("cpuacct")).unwrap();
        fs::remove_file(v1.join("cpu/skiff/w1/cgroup.procs")).unwrap();
        Cgroups::at(CgroupVersion::V1, &v1).enter("/skiff/w1", &limits, 43).unwrap();
        assert_eq!(fs::read_to_string(v1.join("cpu/skiff/w1/cgroup.procs")).unwrap(), "43");
        let v2 = t.path().join("v2");
        fs::create_dir_all(&v2).unwrap();
        Cgroups::at(CgroupVersion::V2, &v2).enter("/skiff/w1", &limits, 42).unwrap();
        assert_eq!(fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap(), "+memory +pids");
        assert_eq!(fs::read_to_string(v2.join("skiff/cgroup.subtree_control")).unwrap(), "+memory +pids");
        assert_eq!(fs::read_to_string(v2.join("skiff/w1/memory.max")).unwrap(), "100663296");
        assert_eq!(fs::read_to_string(v2.join("skiff/w1/pids.max")).unwrap(), "64");
        assert_eq!(fs::read_to_string(v2.join("skiff/w1/cgroup.procs")).unwrap(), "42");
    }

    #[test]
    fn v2_fixture() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(r, "skiff/c1/cpu.max", "50000 100000\n");
        write(r, "skiff/c1/cpu.weight", &format!("{}\n", shares_to_weight(2048)));
        write(r, "skiff/c1/memory.max", "536870912\n");
        write(r, "skiff/c1/memory.swap.max", "0\n");
        write(r, "skiff/c1/pids.max", "100\n");
        write(r, "skiff/c1/memory.current", "10485760\n");
        write(r, "skiff/c1/memory.stat", "anon 1\ninactive_file 1048576\n");
        write(r, "skiff/c1/memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n");
        write(r, "skiff/c1/cpu.stat", "usage_usec 2500\nuser_usec 2000\n");
        write(r, "skiff/c1/pids.current", "3\n");
        let cg = Cgroups::at(CgroupVersion::V2, r);
        let l = cg.limits("/skiff/c1");
        assert_eq!(l.cpu_quota_us, Some(50_000));
        assert_eq!(l.cpu_period_us, Some(100_000));
        assert_eq!(l.cpu_weight, Some(shares_to_weight(2048)));
        assert_eq!(l.memory_bytes, Some(512 << 20));
        assert_eq!(l.memory_swap_bytes, Some(512 << 20));
        assert_eq!(l.pids_max, Some(100));
        let s = cg.stats("/skiff/c1");
        assert_eq!(s, CgroupStats { cpu_usage_ns: 2_500_000, memory_bytes: 9 << 20, oom_kills: 1, pids: 3 });
        write(r, "skiff/c2/cpu.max", "max 100000\n");
        write(r, "skiff/c2/memory.max", "max\n");
        let l = cg.limits("/skiff/c2");
        assert_eq!((l.cpu_quota_us, l.memory_bytes), (None, None));
    }

    #[test]
    fn v1_fixture() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(r, "cpu/skiff/c1/cpu.cfs_quota_us", "150000\n");
        write(r, "cpu/skiff/c1/cpu.cfs_period_us", "100000\n");
        write(r, "cpu/skiff/c1/cpu.shares", "512\n");
        write(r, "memory/skiff/c1/memory.limit_in_bytes", "67108864\n");
        write(r, "memory/skiff/c1/memory.memsw.limit_in_bytes", "67108864\n");
        write(r, "memory/skiff/c1/memory.usage_in_bytes", "4096\n");
        write(r, "memory/skiff/c1/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n");
        write(r, "pids/skiff/c1/pids.max", "max\n");
        let cg = Cgroups::at(CgroupVersion::V1, r);
        let l = cg.limits("/skiff/c1");
        assert_eq!(
            (l.cpu_quota_us, l.cpu_shares, l.memory_bytes, l.pids_max),
            (Some(150_000), Some(512), Some(64 << 20), None)
        );
        assert_eq!(cg.stats("/skiff/c1").oom_kills, 2);
        write(r, "memory/skiff/c2/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(cg.limits("/skiff/c2").memory_bytes, None);
    }
}
