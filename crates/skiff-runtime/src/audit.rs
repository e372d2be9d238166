//! Seccomp's records without polling: the kernel's audit multicast group
//! (`NETLINK_AUDIT`, `AUDIT_NLGRP_READLOG`). It carries every audit record whether or not
//! an audit daemon runs and without changing the host's audit settings; a seccomp filter
//! writes one (`AUDIT_SECCOMP`) for each call it answers with `SCMP_ACT_LOG`, and for its
//! other actions when the filter was loaded with `SECCOMP_FILTER_FLAG_LOG`. Needs
//! CAP_AUDIT_READ (root).

use netlink_sys::protocols::NETLINK_AUDIT;
use std::os::fd::{AsFd, BorrowedFd};

const AUDIT_NLGRP_READLOG: u32 = 1;
const AUDIT_SECCOMP: u16 = 1326;
const NLMSG_HDR: usize = 16;

/// The architectures of `AUDIT_ARCH_*` this module names the calls of.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;

/// One call a seccomp filter logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompRecord {
    pub pid: i32,
    /// `AUDIT_ARCH_*` of the call.
    pub arch: u32,
    pub syscall: u32,
    /// The filter's answer (`SECCOMP_RET_*`, its action bits).
    pub code: u32,
    pub comm: String,
}

impl SeccompRecord {
    /// The call's name, when the architecture is one this module knows.
    pub fn syscall_name(&self) -> Option<&'static str> {
        let table = match self.arch {
            AUDIT_ARCH_X86_64 => SYSCALLS_X86_64,
            AUDIT_ARCH_AARCH64 => SYSCALLS_AARCH64,
            _ => return None,
        };
        table.lines().find_map(|l| {
            let (nr, name) = l.split_once(' ')?;
            (nr.parse() == Ok(self.syscall)).then_some(name)
        })
    }

    /// The filter's answer as seccomp names it: `log`, `errno`, `kill_process`, ...
    pub fn action(&self) -> &'static str {
        match self.code & 0xffff_0000 {
            0x8000_0000 => "kill_process",
            0x0000_0000 => "kill_thread",
            0x0003_0000 => "trap",
            0x0005_0000 => "errno",
            0x7fc0_0000 => "user_notif",
            0x7ff0_0000 => "trace",
            0x7ffc_0000 => "log",
            _ => "allow",
        }
    }

    /// Whether the call was refused (anything but `log` and `allow`).
    pub fn denied(&self) -> bool {
        !matches!(self.action(), "log" | "allow")
    }
}

/// System call numbers and names (`NR name` lines, `#` comments), from Linux's uapi headers.
pub const SYSCALLS_X86_64: &str = include_str!("../data/syscalls-x86_64.txt");
pub const SYSCALLS_AARCH64: &str = include_str!("../data/syscalls-aarch64.txt");

/// The names in a table of [`SYSCALLS_X86_64`]'s form.
pub fn syscall_names(table: &'static str) -> impl Iterator<Item = &'static str> {
    table.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once(' ').map(|(_, n)| n.trim()))
}

/// The audit log's read-only multicast group: seccomp's records.
pub struct AuditEvents(crate::multicast::Multicast);

impl AuditEvents {
    pub fn open() -> std::io::Result<Self> {
        crate::multicast::Multicast::join(NETLINK_AUDIT, AUDIT_NLGRP_READLOG, 1 << 20).map(AuditEvents)
    }

    /// The seccomp records waiting (other records are skipped); see
    /// [`crate::multicast::Multicast::drain`].
    pub fn recv(&mut self) -> std::io::Result<Vec<SeccompRecord>> {
        self.0.drain(parse)
    }
}

impl AsFd for AuditEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The seccomp record of one datagram, if it holds one. The kernel sends each audit
/// record in a datagram of its own, and its `nlmsg_len` has not always counted the header
/// (the "length quirk" of kernel/audit.c): the text runs to the datagram's end.
fn parse(b: &[u8]) -> Option<SeccompRecord> {
    let kind = u16::from_ne_bytes([*b.get(4)?, *b.get(5)?]);
    if kind != AUDIT_SECCOMP {
        return None;
    }
    let text = String::from_utf8_lossy(b.get(NLMSG_HDR..)?);
    parse_text(text.trim_end_matches('\0'))
}

/// `audit(…): auid=… pid=42 comm="nc" exe="/bin/busybox" sig=0 arch=c000003e syscall=50 … code=0x7ffc0000`
fn parse_text(t: &str) -> Option<SeccompRecord> {
    let value = |key: &str| t.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')));
    let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some(SeccompRecord {
        pid: value("pid")?.parse().ok()?,
        arch: hex(value("arch")?)?,
        syscall: value("syscall")?.parse().ok()?,
        code: hex(value("code")?)?,
        comm: value("comm").unwrap_or_default().trim_matches('"').to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "audit(1796421733.192:2): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=19189 comm=\"nc\" exe=\"/bin/busybox\" sig=0 arch=c000003e syscall=50 compat=0 ip=0x481bd7 code=0x7ffc0000";

    fn message(kind: u16, text: &str) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDR];
        m[0..4].copy_from_slice(&((NLMSG_HDR + text.len()) as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(text.as_bytes());
        while !m.len().is_multiple_of(4) {
            m.push(0);
        }
        m
    }

    #[test]
    fn seccomp_records_are_read_with_their_call_and_action() {
        // A record as this machine's kernel printed it (`SCMP_ACT_LOG` on listen).
        assert_eq!(parse(&message(1300, "audit(1.1:1): arch=c000003e syscall=59 success=yes")), None);
        let r = parse(&message(AUDIT_SECCOMP, LINE)).unwrap();
        assert_eq!((r.pid, r.syscall, r.comm.as_str()), (19189, 50, "nc"));
        assert_eq!((r.syscall_name(), r.action(), r.denied()), (Some("listen"), "log", false));
        // With nlmsg_len counting the text only, the whole text is still read.
        let mut quirk = message(AUDIT_SECCOMP, LINE);
        quirk[0..4].copy_from_slice(&(LINE.len() as u32).to_ne_bytes());
        assert_eq!(parse(&quirk), Some(r));
        let denied = parse_text(&LINE.replace("syscall=50", "syscall=165").replace("0x7ffc0000", "0x50001")).unwrap();
        assert_eq!((denied.syscall_name(), denied.action(), denied.denied()), (Some("mount"), "errno", true));
        let arm = parse_text(&LINE.replace("c000003e", "c00000b7").replace("syscall=50", "syscall=201")).unwrap();
        assert_eq!(arm.syscall_name(), Some("listen"));
        assert!(parse_text("audit(1.1:1): pid=x").is_none());
    }
}
