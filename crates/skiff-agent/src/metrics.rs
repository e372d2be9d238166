//! Sampling the node (from /proc and the data directory's filesystem) and its instances
//! (cgroup stats through the runtime, network counters from the host's side of each
//! instance's veth in the host's `/proc/net/dev`, read once for all). CPU is a rate, so
//! each sample is computed against the previous one; the parsers are pure and tested on
//! fixtures. The files are read through kept-open files ([`skiff_sys::kept`]).

use skiff_model::metrics::{InstanceMetrics, NodeMetrics};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// `(busy + idle, idle)` jiffies of the aggregate `cpu` line, and the number of `cpuN` lines.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64, u32)> {
    let mut total = None;
    let mut cpus = 0;
    for l in text.lines() {
        let mut it = l.split_whitespace();
        match it.next() {
            Some("cpu") => {
                // user nice system idle iowait irq softirq steal (guest time is already in user).
                let v: Vec<u64> = it.take(8).filter_map(|x| x.parse().ok()).collect();
                if v.len() >= 5 {
                    total = Some((v.iter().sum(), v[3] + v[4]));
                }
            }
            Some(c) if c.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    total.map(|(t, i)| (t, i, cpus.max(1)))
}

/// `(MemTotal, MemAvailable)` in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kib("MemTotal:"), kib("MemAvailable:"))
}

/// Each interface's received and sent bytes.
fn net_dev_lines(text: &str) -> impl Iterator<Item = (&str, u64, u64)> {
    text.lines().skip(2).filter_map(|l| {
        let (name, rest) = l.split_once(':')?;
        let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        (v.len() >= 9).then(|| (name.trim(), v[0], v[8]))
    })
}

/// Received and sent bytes summed over the interfaces `count` accepts.
pub fn parse_net_dev(text: &str, count: impl Fn(&str) -> bool) -> (u64, u64) {
    net_dev_lines(text).filter(|(name, ..)| count(name)).fold((0, 0), |(rx, tx), (_, r, t)| (rx + r, tx + t))
}

/// What an instance received and sent, from the host's side of its veth (which sends
/// what the instance receives): `(0, 0)` when the interface is not there.
pub fn veth_traffic(text: &str, veth: &str) -> (u64, u64) {
    net_dev_lines(text).find(|(name, ..)| *name == veth).map(|(_, rx, tx)| (tx, rx)).unwrap_or((0, 0))
}

/// A /proc file through a kept-open file; empty when unreadable.
pub fn read_proc(path: &str) -> String {
    skiff_sys::kept::read(path).unwrap_or_default()
}

pub fn parse_loadavg(text: &str) -> (f64, f64, f64) {
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
    match v.as_slice() {
        [a, b, c] => (*a, *b, *c),
        _ => (0.0, 0.0, 0.0),
    }
}

/// A floor of free space: a share of the whole, or an amount (`0`: no floor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    Percent(u8),
    Bytes(u64),
}

impl Floor {
    /// `5%` or a size (`2Gi`, `500m`, `0`), as kubelet's `--eviction-hard` thresholds.
    pub fn parse(s: &str) -> Result<Floor, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Floor::Percent(p)),
                _ => Err(format!("{s:?}: want a percentage from 0% to 100%, or a size such as 2Gi")),
            };
        }
        skiff_model::quantity::parse_bytes(t)
            .map(Floor::Bytes)
            .map_err(|_| format!("{s:?}: want a percentage such as 5%, or a size such as 2Gi"))
    }

    /// Whether `free` of `total` is below the floor (never when nothing is known).
    fn under(self, free: u64, total: u64) -> bool {
        total > 0
            && match self {
                Floor::Percent(p) => (free as u128) * 100 < (total as u128) * p as u128,
                Floor::Bytes(b) => free < b,
            }
    }
}

impl std::fmt::Display for Floor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Floor::Percent(p) => write!(f, "{p}%"),
            Floor::Bytes(b) => f.write_str(&skiff_model::format_bytes(*b)),
        }
    }
}

/// Below these the node takes no new work (`--disk-pressure-below`,
/// `--memory-pressure-below`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floors {
    /// Free space on the data filesystem (available to unprivileged writers, as `df`).
    pub disk: Floor,
    /// Memory available (`MemAvailable`).
    pub memory: Floor,
}

impl Default for Floors {
    fn default() -> Self {
        Floors { disk: Floor::Percent(5), memory: Floor::Percent(5) }
    }
}

/// What keeps the node from taking new work, as the kubelet's DiskPressure and
/// MemoryPressure conditions do (empty: nothing).
pub fn pressure(h: &NodeMetrics, floors: &Floors) -> Vec<String> {
    let checks = [
        ("DiskPressure", "of the data filesystem free", h.disk_total_bytes, h.disk_used_bytes, floors.disk),
        ("MemoryPressure", "of memory available", h.memory_total_bytes, h.memory_used_bytes, floors.memory),
    ];
    checks
        .into_iter()
        .filter_map(|(condition, what, total, used, floor)| {
            let free = total.saturating_sub(used);
            let percent = (free as u128 * 100 / (total as u128).max(1)) as u64;
            floor
                .under(free, total)
                .then(|| format!("{condition}: {percent}% {what} ({} MiB), below {floor}", free >> 20))
        })
        .collect()
}

/// What a sample is computed against: the previous CPU counters.
#[derive(Default)]
pub struct Sampler {
    node_cpu: Mutex<Option<(u64, u64)>>,
    /// Container id → (cgroup CPU usage in ns, when it was read in ms).
    instances: Mutex<HashMap<String, (u64, u64)>>,
}

/// What the sampler needs to know of one running instance.
pub struct Running<'a> {
    pub instance: &'a str,
    pub deployment: &'a str,
    pub container_id: &'a str,
    /// The host's side of its veth (bridge network), whose counters are its traffic.
    pub veth: Option<String>,
    pub restarts: u32,
    pub started_at_ms: Option<u64>,
    /// The cgroup's CPU usage counter in ns, and working set in bytes.
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    /// When the counters were read (ms): the rate's clock, exact even when a busy node
    /// delays the sampler between instances.
    pub read_at_ms: u64,
}

impl Sampler {
    /// The node: `data_dir` names the filesystem for disk figures; `net_dev` is the
    /// host's `/proc/net/dev`, where interfaces for which `own_interface` is true
    /// (skiff's bridge and veths) do not count as node traffic.
    pub fn node(&self, data_dir: &Path, net_dev: &str, own_interface: impl Fn(&str) -> bool) -> NodeMetrics {
        let mut m = NodeMetrics::default();
        if let Some((total, idle, cpus)) = parse_proc_stat(&read_proc("/proc/stat")) {
            m.cpus = cpus;
            if let Ok(mut prev) = self.node_cpu.lock() {
                if let Some((t0, i0)) = *prev {
                    let (dt, di) = (total.saturating_sub(t0), idle.saturating_sub(i0));
                    if dt > 0 {
                        m.cpu_cores = Some((dt - di.min(dt)) as f64 / dt as f64 * f64::from(cpus));
                    }
                }
                *prev = Some((total, idle));
            }
        }
        let (total, available) = parse_meminfo(&read_proc("/proc/meminfo"));
        (m.memory_total_bytes, m.memory_used_bytes) = (total, total.saturating_sub(available));
        // The block counts are u32 on some 32-bit targets.
        #[allow(clippy::unnecessary_cast)]
        if let Ok(s) = nix::sys::statvfs::statvfs(data_dir) {
            let frsize = s.fragment_size() as u64;
            m.disk_total_bytes = s.blocks() as u64 * frsize;
            m.disk_used_bytes = m.disk_total_bytes.saturating_sub(s.blocks_available() as u64 * frsize);
        }
        (m.rx_bytes, m.tx_bytes) = parse_net_dev(net_dev, |n| n != "lo" && !own_interface(n));
        (m.load1, m.load5, m.load15) = parse_loadavg(&read_proc("/proc/loadavg"));
        m
    }

    /// The instances running now, CPU as a rate since each one's previous sample and
    /// traffic from the host's `net_dev`; instances that are gone are forgotten.
    pub fn instances(&self, running: &[Running<'_>], net_dev: &str) -> Vec<InstanceMetrics> {
        let Ok(mut prev) = self.instances.lock() else { return vec![] };
        let out = running
            .iter()
            .map(|r| {
                let now_ms = r.read_at_ms;
                let cpu_cores = match prev.get(r.container_id) {
                    Some(&(ns0, t0)) if now_ms > t0 && r.cpu_usage_ns >= ns0 => {
                        Some((r.cpu_usage_ns - ns0) as f64 / ((now_ms - t0) as f64 * 1e6))
                    }
                    _ => None,
                };
                prev.insert(r.container_id.to_string(), (r.cpu_usage_ns, now_ms));
                let (rx_bytes, tx_bytes) = r.veth.as_deref().map(|v| veth_traffic(net_dev, v)).unwrap_or((0, 0));
                InstanceMetrics {
                    instance: r.instance.to_string(),
                    deployment: r.deployment.to_string(),
                    cpu_cores,
                    memory_bytes: r.memory_bytes,
                    rx_bytes,
                    tx_bytes,
                    restarts: r.restarts,
                    started_at_ms: r.started_at_ms,
                    series: vec![],
                }
            })
            .collect();
        prev.retain(|id, _| running.iter().any(|r| r.container_id == id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fixtures() {
        let stat =
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat(stat), Some((1000, 850, 2)));
        let mem = "MemTotal:        2048000 kB\nMemFree:          100 kB\nMemAvailable:    1024000 kB\n";
        assert_eq!(parse_meminfo(mem), (2048000 * 1024, 1024000 * 1024));
        let dev = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                   lo:    500       5    0    0    0     0          0         0      500       5    0    0    0     0       0          0\n  \
                   eth0: 1000      10    0    0    0     0          0         0     2000      20    0    0    0     0       0          0\n\
                   vsk12: 7000     10    0    0    0     0          0         0     7000      20    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(dev, |n| n != "lo" && !n.starts_with("vsk")), (1000, 2000));
        assert_eq!(veth_traffic(dev, "vsk12"), (7000, 7000));
        assert_eq!(veth_traffic(dev, "vsk13"), (0, 0), "gone: nothing");
        let asym = dev.replace("vsk12: 7000     10", "vsk12: 9000     10");
        assert_eq!(veth_traffic(&asym, "vsk12"), (7000, 9000), "the host side receives what the instance sends");
        assert_eq!(parse_loadavg("0.50 0.25 0.10 1/100 42\n"), (0.5, 0.25, 0.1));
        assert_eq!(parse_loadavg(""), (0.0, 0.0, 0.0));
    }

    #[test]
    fn pressure_below_the_floors() {
        let h = |disk_used: u64, mem_used: u64| NodeMetrics {
            disk_total_bytes: 100 << 20,
            disk_used_bytes: disk_used << 20,
            memory_total_bytes: 100 << 20,
            memory_used_bytes: mem_used << 20,
            ..Default::default()
        };
        let d = Floors::default();
        assert!(pressure(&h(95, 95), &d).is_empty(), "5% free is not below 5%");
        assert_eq!(
            pressure(&h(96, 96), &d),
            [
                "DiskPressure: 4% of the data filesystem free (4 MiB), below 5%",
                "MemoryPressure: 4% of memory available (4 MiB), below 5%"
            ]
        );
        assert!(pressure(&NodeMetrics::default(), &d).is_empty(), "nothing known, nothing reported");
        let off = Floors { disk: Floor::Bytes(0), memory: Floor::Percent(0) };
        assert!(pressure(&h(100, 100), &off).is_empty(), "0 turns a floor off");
        let abs = Floors { disk: Floor::Bytes(10 << 20), memory: Floor::Percent(100) };
        assert_eq!(pressure(&h(91, 0), &abs), ["DiskPressure: 9% of the data filesystem free (9 MiB), below 10Mi"]);
        assert!(pressure(&h(90, 0), &abs).is_empty(), "10 MiB free is not below 10 MiB");
        assert_eq!(pressure(&h(0, 1), &abs), ["MemoryPressure: 99% of memory available (99 MiB), below 100%"]);
        let huge = NodeMetrics { disk_total_bytes: u64::MAX, disk_used_bytes: u64::MAX, ..Default::default() };
        assert_eq!(pressure(&huge, &d).len(), 1, "no overflow on a huge filesystem");
    }

    #[test]
    fn floors_are_a_percentage_or_a_size() {
        assert_eq!(Floor::parse("5%"), Ok(Floor::Percent(5)));
        assert_eq!(Floor::parse("0"), Ok(Floor::Bytes(0)));
        assert_eq!(Floor::parse("2Gi"), Ok(Floor::Bytes(2 << 30)));
        assert_eq!(Floor::parse("500m"), Ok(Floor::Bytes(500 << 20)));
        for bad in ["101%", "-1%", "five", "%", ""] {
            assert!(Floor::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_cpu_is_a_rate_between_samples() {
        let s = Sampler::default();
        let run = |ns, at| Running {
            instance: "web-1",
            deployment: "web",
            container_id: "c1",
            veth: Some("vsk1".into()),
            restarts: 0,
            started_at_ms: None,
            cpu_usage_ns: ns,
            memory_bytes: 5,
            read_at_ms: at,
        };
        let dev = "h1\nh2\n  vsk1: 10 1 0 0 0 0 0 0 20 2 0 0 0 0 0 0\n";
        let first = &s.instances(&[run(1_000_000_000, 10_000)], dev)[0];
        assert_eq!(first.cpu_cores, None, "no rate from one sample");
        assert_eq!((first.rx_bytes, first.tx_bytes), (20, 10), "its veth's counters, seen from the instance");
        // 1.5 s of CPU in 2 s of wall time: 0.75 cores.
        assert_eq!(s.instances(&[run(2_500_000_000, 12_000)], dev)[0].cpu_cores, Some(0.75));
        assert!(s.instances(&[], dev).is_empty());
        assert_eq!(s.instances(&[run(3_000_000_000, 14_000)], dev)[0].cpu_cores, None, "forgotten once gone");
    }
}
