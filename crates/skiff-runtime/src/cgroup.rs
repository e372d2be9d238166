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

/// The cgroup a spare WebAssembly shim waits in. On v1 it enters it when it starts, and a
/// start renames it to the instance's ([`Cgroups::adopt`]): moving a process between
/// cgroups waits for an RCU grace period on the kernel's cgroup lock (about 9 ms here),
/// which this takes off the start's path.
pub fn spare_cgroup(pid: u32) -> String {
    format!("/skiff/spare-{pid}")
}

/// The cgroup paths process `pid` is in, one per hierarchy: (controllers, path). Empty
/// when it cannot be read (no such process).
fn cgroups_of(pid: u32) -> Vec<(String, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            Some((ctrls.to_string(), path.to_string()))
        })
        .collect()
}

/// Whether `pid` is in `cg` in the hierarchy of `controller` (v2: `""`, the unified one).
fn is_in(placed: &[(String, String)], controller: &str, cg: &str) -> bool {
    placed.iter().any(|(ctrls, path)| {
        let here = if controller.is_empty() { ctrls.is_empty() } else { ctrls.split(',').any(|c| c == controller) };
        here && path == cg
    })
}

impl Cgroups {
    /// The v1 controllers of [`OWN_V1`] the host has, one per hierarchy: controllers
    /// mounted together (`cpu` and `cpuacct` are links to `cpu,cpuacct` on most hosts)
    /// are one hierarchy, entered once.
    fn own_v1(&self) -> Vec<&'static str> {
        let mut seen = vec![];
        let mut out = vec![];
        for ctrl in OWN_V1.iter().filter(|c| self.root.join(c).is_dir()) {
            let real = fs::canonicalize(self.root.join(ctrl)).unwrap_or_else(|_| self.root.join(ctrl));
            if !seen.contains(&real) {
                seen.push(real);
                out.push(*ctrl);
            }
        }
        out
    }

    /// Writes `limits` into `cg`'s directory for `ctrl` (v1) or its one directory (v2).
    fn write_limits(&self, ctrl: &str, d: &Path, limits: &OwnLimits) -> std::io::Result<()> {
        let write = |file: &str, value: u64| fs::write(d.join(file), value.to_string());
        match (self.version, ctrl) {
            (CgroupVersion::V1, "memory") => limits.memory_max.map_or(Ok(()), |m| write("memory.limit_in_bytes", m)),
            (CgroupVersion::V1, "pids") => limits.pids_max.map_or(Ok(()), |p| write("pids.max", p)),
            (CgroupVersion::V1, _) => Ok(()),
            (CgroupVersion::V2, _) => {
                limits.memory_max.map_or(Ok(()), |m| write("memory.max", m))?;
                limits.pids_max.map_or(Ok(()), |p| write("pids.max", p))
            }
        }
    }

    /// Renames the cgroup `from` (with the processes in it) to `to`: what a start does
    /// with a spare shim's cgroup instead of moving the spare. An empty `to` left by an
    /// earlier run of the same instance is removed first. The limits are written by the
    /// shim's own [`Cgroups::enter`] once its program is loaded, as without a spare. v1
    /// only — v2 refuses renames — so false there, and wherever a hierarchy cannot be
    /// renamed (those renamed already are named back); the shim then moves itself.
    pub fn adopt(&self, from: &str, to: &str) -> bool {
        if self.version != CgroupVersion::V1 {
            return false;
        }
        let mut done: Vec<&str> = vec![];
        for ctrl in self.own_v1() {
            let target = self.dir(ctrl, to);
            let _ = fs::remove_dir(&target);
            if fs::rename(self.dir(ctrl, from), &target).is_err() {
                for back in done {
                    let _ = fs::rename(self.dir(back, to), self.dir(back, from));
                }
                return false;
            }
            done.push(ctrl);
        }
        true
    }

    /// Removes the cgroups of spare shims that are gone (killed before they could leave
    /// theirs); one that holds a process is busy and stays.
    pub fn sweep_spares(&self) {
        let parents: Vec<PathBuf> = match self.version {
            CgroupVersion::V1 => self.own_v1().iter().map(|c| self.dir(c, "/skiff")).collect(),
            CgroupVersion::V2 => vec![self.dir("", "/skiff")],
        };
        for parent in parents {
            for e in fs::read_dir(&parent).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("spare-") {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
    }

    /// Moves `pid` back to the root of each hierarchy and removes `cg`: a spare shim that
    /// was never used, on its way out. Best effort.
    pub fn leave(&self, cg: &str, pid: u32) {
        let ctrls: Vec<&str> = match self.version {
            CgroupVersion::V1 => self.own_v1(),
            CgroupVersion::V2 => vec![""],
        };
        for ctrl in ctrls {
            let root = if ctrl.is_empty() { self.root.clone() } else { self.root.join(ctrl) };
            let _ = fs::write(root.join("cgroup.procs"), pid.to_string());
            let _ = fs::remove_dir(self.dir(ctrl, cg));
        }
    }

    /// Makes `cg` (e.g. `/skiff/<id>`) with `limits` and moves process `pid` into it. On
    /// v2 the controllers are enabled down the path first.
    pub fn enter(&self, cg: &str, limits: &OwnLimits, pid: u32) -> std::io::Result<()> {
        // Where the process is already (a spare whose cgroup a start renamed), it is not
        // moved again: a move waits for the kernel's cgroup lock even when it changes nothing.
        let placed = cgroups_of(pid);
        match self.version {
            CgroupVersion::V1 => {
                for ctrl in self.own_v1() {
                    let d = self.dir(ctrl, cg);
                    fs::create_dir_all(&d)?;
                    self.write_limits(ctrl, &d, limits)?;
                    if !is_in(&placed, ctrl, cg) {
                        fs::write(d.join("cgroup.procs"), pid.to_string())?;
                    }
                }
            }
            CgroupVersion::V2 => {
                let rel = cg.trim_start_matches('/');
                let mut at = self.root.clone();
                for part in Path::new(rel).components() {
                    // The parent hands memory and pids down to its children.
                    fs::write(at.join("cgroup.subtree_control"), "+memory +pids")?;
                    at.push(part);
                    fs::create_dir_all(&at)?;
                }
                self.write_limits("", &at, limits)?;
                if !is_in(&placed, "", cg) {
                    fs::write(at.join("cgroup.procs"), pid.to_string())?;
                }
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

    /// A start renames a spare's cgroup to the instance's (v1); where
    /// a hierarchy cannot be renamed, those renamed are named back and the shim moves
    /// itself; v2 never renames.
    #[test]
    fn a_spares_cgroup_becomes_the_instances() {
        let t = tempfile::tempdir().unwrap();
        let v1 = t.path().join("v1");
        for c in ["memory", "pids", "cpu"] {
            fs::create_dir_all(v1.join(c).join("skiff/spare-7")).unwrap();
        }
        let cg = Cgroups::at(CgroupVersion::V1, &v1);
        // An empty directory of the instance's earlier run is replaced.
        fs::create_dir_all(v1.join("memory/skiff/w1")).unwrap();
        fs::write(v1.join("memory/skiff/spare-7/mark"), "spare").unwrap();
        assert!(cg.adopt(&spare_cgroup(7), "/skiff/w1"));
        for c in ["memory", "pids", "cpu"] {
            assert!(v1.join(c).join("skiff/w1").is_dir() && !v1.join(c).join("skiff/spare-7").exists(), "{c}");
        }
        assert!(v1.join("memory/skiff/w1/mark").exists(), "the spare's own directory, renamed");
        // `cpu` has no spare directory to rename: nothing stays renamed.
        for c in ["memory", "pids"] {
            fs::create_dir_all(v1.join(c).join("skiff/spare-8")).unwrap();
        }
        assert!(!cg.adopt(&spare_cgroup(8), "/skiff/w2"));
        for c in ["memory", "pids"] {
            assert!(v1.join(c).join("skiff/spare-8").is_dir() && !v1.join(c).join("skiff/w2").exists(), "{c}");
        }
        // Gone spares' cgroups are swept; an instance's stays.
        cg.sweep_spares();
        assert!(!v1.join("memory/skiff/spare-8").exists() && v1.join("memory/skiff/w1").is_dir());
        let v2 = t.path().join("v2");
        fs::create_dir_all(v2.join("skiff/spare-9")).unwrap();
        assert!(!Cgroups::at(CgroupVersion::V2, &v2).adopt(&spare_cgroup(9), "/skiff/w3"));
        assert!(v2.join("skiff/spare-9").is_dir());
    }

    #[test]
    fn a_process_already_in_its_cgroup_is_not_moved_again() {
        let placed = vec![
            ("cpu,cpuacct".to_string(), "/skiff/w1".to_string()),
            ("memory".to_string(), "/skiff/w1".to_string()),
            ("pids".to_string(), "/user.slice".to_string()),
            (String::new(), "/skiff/w1".to_string()),
        ];
        assert!(is_in(&placed, "cpu", "/skiff/w1") && is_in(&placed, "cpuacct", "/skiff/w1"));
        assert!(is_in(&placed, "memory", "/skiff/w1") && !is_in(&placed, "pids", "/skiff/w1"));
        assert!(is_in(&placed, "", "/skiff/w1"), "v2's unified hierarchy has no controllers listed");
        assert!(!is_in(&placed, "memory", "/skiff/w2"));
        assert!(!cgroups_of(std::process::id()).is_empty(), "this process's own cgroups are read");
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
