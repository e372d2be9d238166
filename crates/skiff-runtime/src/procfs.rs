//! Resource use of one process from /proc, for instances that are a process rather than
//! a cgroup (a WebAssembly instance is its shim).

use crate::cgroup::CgroupStats;

/// CPU (user + system) in clock ticks and the thread count, from `/proc/<pid>/stat`.
pub fn parse_stat(text: &str) -> Option<(u64, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) and 20 (num_threads), counted from 1 before the cut.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((ticks, f.get(17)?.parse().ok()?))
}

/// When the process started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn parse_start_time(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A process's identity on this boot: `<boot id> <start time>`. A pid alone can be reused;
/// a pid with the same start time on the same boot is the same process.
pub fn identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(format!("{} {}", boot_id()?, parse_start_time(&stat)?))
}

fn boot_id() -> Option<String> {
    Some(std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?.trim().to_string())
}

/// Resident memory in bytes, from `/proc/<pid>/status` (`VmRSS`).
pub fn parse_status_rss(text: &str) -> Option<u64> {
    let l = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub fn process_stats(pid: i32) -> CgroupStats {
    let tick_ns = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map(|t| 1_000_000_000 / t as u64)
        .unwrap_or(10_000_000);
    let read = |f: &str| skiff_sys::kept::read(format!("/proc/{pid}/{f}"));
    let stat = read("stat").and_then(|t| parse_stat(&t));
    let rss = read("status").and_then(|t| parse_status_rss(&t));
    CgroupStats {
        cpu_usage_ns: stat.map(|(ticks, _)| ticks * tick_ns).unwrap_or(0),
        memory_bytes: rss.unwrap_or(0),
        oom_kills: 0,
        pids: stat.map(|(_, threads)| threads).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stat_and_status_fixtures() {
        let stat = "4242 (skiff shim) S 1 4242 4242 0 -1 4194560 290 0 0 0 153 47 0 0 20 0 3 0 1234 \
                    2000000 300 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(super::parse_stat(stat), Some((200, 3)));
        assert_eq!(super::parse_start_time(stat), Some(1234));
        assert_eq!(super::parse_stat("garbage"), None);
        let me = super::identity(std::process::id()).unwrap();
        assert_eq!(me, super::identity(std::process::id()).unwrap());
        assert_eq!(me.split(' ').count(), 2);
        let status = "Name:\tskiff\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(super::parse_status_rss(status), Some(2048 * 1024));
    }
}
