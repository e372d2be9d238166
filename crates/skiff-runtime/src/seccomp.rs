//! The default seccomp filter.
//!
//! Docker's default profile is an allow-list whose effect, for a container with Docker's
//! default capabilities, is that a fixed set of dangerous system calls fails with `EPERM`.
//! skiff writes that set down directly as a deny-list (every call not listed is allowed),
//! which keeps the filter short for small devices while denying the same calls: module
//! loading, kexec, mounting, namespace creation/joining, keyrings, BPF, perf, clock and
//! swap changes, reboot, raw I/O ports, `ptrace`-like cross-process memory access, and
//! the old/obscure calls Docker leaves out, and `clone` with namespace flags.

use serde_json::{json, Value};

pub const DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
    "adjtimex",
];

/// CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
const NAMESPACE_FLAGS: &[u64] =
    &[0x0002_0000, 0x0200_0000, 0x0400_0000, 0x0800_0000, 0x1000_0000, 0x2000_0000, 0x4000_0000];

fn architectures() -> Value {
    match std::env::consts::ARCH {
        "x86_64" => json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
        "aarch64" => json!(["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
        "arm" => json!(["SCMP_ARCH_ARM"]),
        _ => json!([]),
    }
}

/// The `linux.seccomp` section of the runtime spec.
pub fn profile() -> Value {
    let mut rules = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}),
        // clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall
        // back to clone, whose flags are checked below (Docker does the same).
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}),
    ];
    for bit in NAMESPACE_FLAGS {
        // runc's SCMP_CMP_MASKED_EQ: `value` is the mask, `valueTwo` the expected bits.
        rules.push(json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                          "args": [{"index": 0, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"}]}));
    }
    json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": architectures(), "syscalls": rules})
}
