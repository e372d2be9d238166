//! The default seccomp filter: Docker's default profile (moby's `default.json`, carried
//! as data in `data/seccomp-default.json`, Apache-2.0), read exactly as moby reads it,
//! with skiff's stricter extras on top.
//!
//! It is an allow-list: every system call not listed fails with `EPERM` — so do the calls
//! added to kernels after the profile was written, `io_uring_*`, `socket(AF_VSOCK)` and
//! `socket(AF_ALG)`, `personality` with anything but the few harmless personas, and
//! `fanotify_init` — unless a capability the container holds opens them (moby's
//! `includes.caps`: `CAP_SYS_ADMIN` opens `mount`, `CAP_SYS_PTRACE` opens `ptrace`).
//!
//! Moby's rules, for the container's bounding capabilities, the node's architecture and
//! its kernel version:
//! * a rule whose `excludes` matches (an architecture, a capability held, a kernel at
//!   least that new) is left out; one whose `includes` does not match (every listed
//!   capability held, the architecture, the kernel) is left out;
//! * `architectures` is the native architecture's `archMap` entry with its
//!   sub-architectures (x86-64 also filters i386 and x32 calls, arm64 also arm).
//!
//! skiff's extras, kept from its earlier filter: without `CAP_SYS_PTRACE` no `ptrace`,
//! `process_vm_readv`/`writev` (moby allows them from kernel 4.8); without
//! `CAP_DAC_READ_SEARCH` no `name_to_handle_at`; without `CAP_SYS_TIME` no `adjtimex`
//! or `clock_adjtime` (read-only uses of them are rare in containers and have other
//! ways; these calls have a history of information leaks).

use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;

/// moby's profile, as shipped (see `data/README.md`).
const MOBY_DEFAULT: &str = include_str!("../data/seccomp-default.json");

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    arch_map: Vec<ArchMap>,
    syscalls: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: String,
    #[serde(default)]
    sub_architectures: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    names: Vec<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Value>>,
    #[serde(default)]
    includes: Option<Filter>,
    #[serde(default)]
    excludes: Option<Filter>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

/// Calls skiff denies beyond moby's profile, each with the capability that allows it.
const EXTRA_DENIED: &[(&str, &str)] = &[
    ("ptrace", "CAP_SYS_PTRACE"),
    ("process_vm_readv", "CAP_SYS_PTRACE"),
    ("process_vm_writev", "CAP_SYS_PTRACE"),
    ("name_to_handle_at", "CAP_DAC_READ_SEARCH"),
    ("adjtimex", "CAP_SYS_TIME"),
    ("clock_adjtime", "CAP_SYS_TIME"),
    ("clock_adjtime64", "CAP_SYS_TIME"),
];

/// The node as the profile's rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// moby's name of the native architecture (`amd64`, `arm64`, `arm`, ...).
    pub arch: String,
    /// (major, minor) of the running kernel.
    pub kernel: (u32, u32),
}

impl Host {
    /// This machine.
    pub fn current() -> Host {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Host { arch: moby_arch(std::env::consts::ARCH).to_string(), kernel: kernel_version(&release) }
    }
}

/// Rust's architecture name → moby's (Go's `GOARCH` through `goToNative`).
fn moby_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "x86" => "x86",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loongarch64",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "mips64" => "mips64",
        other => other,
    }
}

/// moby's architecture name → libseccomp's (`nativeToSeccomp`).
fn seccomp_arch(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "x86" => "SCMP_ARCH_X86",
        "amd64" => "SCMP_ARCH_X86_64",
        "arm" => "SCMP_ARCH_ARM",
        "arm64" => "SCMP_ARCH_AARCH64",
        "loongarch64" => "SCMP_ARCH_LOONGARCH64",
        "mips64" => "SCMP_ARCH_MIPS64",
        "mips64n32" => "SCMP_ARCH_MIPS64N32",
        "mipsel64" => "SCMP_ARCH_MIPSEL64",
        "mips3l64n32" => "SCMP_ARCH_MIPSEL64N32",
        "mipsle" => "SCMP_ARCH_MIPSEL",
        "ppc" => "SCMP_ARCH_PPC",
        "ppc64" => "SCMP_ARCH_PPC64",
        "ppc64le" => "SCMP_ARCH_PPC64LE",
        "riscv64" => "SCMP_ARCH_RISCV64",
        "s390" => "SCMP_ARCH_S390",
        "s390x" => "SCMP_ARCH_S390X",
        _ => return None,
    })
}

/// `6.18.44-fc` → (6, 18).
fn kernel_version(release: &str) -> (u32, u32) {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Whether `kernel` is at least `min` (`"4.8"`).
fn at_least(kernel: (u32, u32), min: &str) -> bool {
    kernel >= kernel_version(min)
}

/// moby's filter for one rule: whether it applies to a container with `caps` on `host`.
fn applies(rule: &Rule, caps: &[String], host: &Host) -> bool {
    if let Some(ex) = &rule.excludes {
        if ex.arches.contains(&host.arch) || ex.caps.iter().any(|c| caps.contains(c)) {
            return false;
        }
        if ex.min_kernel.as_deref().is_some_and(|m| at_least(host.kernel, m)) {
            return false;
        }
    }
    if let Some(inc) = &rule.includes {
        if !inc.arches.is_empty() && !inc.arches.contains(&host.arch) {
            return false;
        }
        if !inc.caps.iter().all(|c| caps.contains(c)) {
            return false;
        }
        if inc.min_kernel.as_deref().is_some_and(|m| !at_least(host.kernel, m)) {
            return false;
        }
    }
    true
}

/// The `linux.seccomp` section of the runtime spec for a container whose bounding set is
/// `caps`, on `host`.
pub fn profile_for(caps: &[String], host: &Host) -> Value {
    let Ok(p) = serde_json::from_str::<Profile>(MOBY_DEFAULT) else {
        // The profile is compiled in and tested; should it not parse, deny everything.
        return json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": []});
    };
    let mut architectures: Vec<String> = vec![];
    if let Some(native) = seccomp_arch(&host.arch) {
        if let Some(m) = p.arch_map.iter().find(|m| m.architecture == native) {
            architectures.push(m.architecture.clone());
            architectures.extend(m.sub_architectures.clone().unwrap_or_default());
        }
    }
    let mut syscalls = vec![];
    for rule in p.syscalls.iter().filter(|r| applies(r, caps, host)) {
        let opened_by_cap = rule.includes.as_ref().is_some_and(|i| !i.caps.is_empty());
        let names: Vec<&String> = rule
            .names
            .iter()
            .filter(|n| {
                opened_by_cap
                    || rule.action != "SCMP_ACT_ALLOW"
                    || !EXTRA_DENIED.iter().any(|(call, cap)| *call == n.as_str() && !caps.iter().any(|c| c == cap))
            })
            .collect();
        if names.is_empty() {
            continue;
        }
        let mut r = json!({"names": names, "action": rule.action});
        if let Some(e) = rule.errno_ret {
            r["errnoRet"] = json!(e);
        }
        if let Some(args) = &rule.args {
            r["args"] = json!(args);
        }
        syscalls.push(r);
    }
    let mut out = json!({"defaultAction": p.default_action, "syscalls": syscalls});
    if let Some(e) = p.default_errno_ret {
        out["defaultErrnoRet"] = json!(e);
    }
    if !architectures.is_empty() {
        out["architectures"] = json!(architectures);
    }
    out
}

/// The filter for a container with `caps` on this machine, reporting what `audit` asks.
pub fn profile(caps: &[String], audit: Audit) -> Value {
    with_audit(profile_for(caps, &Host::current()), audit)
}

/// What a container's filter reports to the threat detector: through the kernel's audit
/// log (`crate::audit` reads it), or by handing calls to a listener. Without any, the
/// filter is moby's and reports nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Each `listen` call is allowed and logged (`SCMP_ACT_LOG`): a new listening socket.
    pub listens: bool,
    /// Each refused call is logged (`SECCOMP_FILTER_FLAG_LOG`; runc 1.2 and later take
    /// the flag, see `Runc::seccomp_flags`).
    pub denials: bool,
    /// Without `denials`: the calls no rule names (those the default action refuses with
    /// EPERM) are handed to the listener at this socket (`SCMP_ACT_NOTIFY`, runc's
    /// `listenerPath`), which refuses them with EPERM and reports them. runc does not take
    /// NOTIFY as the default action, so each such call is named.
    pub notify: Option<std::path::PathBuf>,
}

/// The system calls whose every use the detector is told of when `Audit::listens`.
const LOGGED: &[&str] = &["listen"];

/// `profile` with `audit`'s logging: the logged calls leave the allow rules (a call in
/// two rules is an error for libseccomp) for one rule of their own.
pub fn with_audit(mut profile: Value, audit: Audit) -> Value {
    if audit.listens {
        if let Some(rules) = profile["syscalls"].as_array_mut() {
            // Only a call the profile allows outright, and names nowhere else, is logged
            // instead: one it refuses, or allows on conditions, stays as it is.
            let names = |r: &Value, call: &str| r["names"].as_array().is_some_and(|n| n.iter().any(|n| n == call));
            let outright = |r: &Value| r["action"] == "SCMP_ACT_ALLOW" && r["args"].is_null();
            let freed: Vec<&str> = LOGGED
                .iter()
                .copied()
                .filter(|c| {
                    rules.iter().any(|r| outright(r) && names(r, c))
                        && !rules.iter().any(|r| !outright(r) && names(r, c))
                })
                .collect();
            for r in rules.iter_mut().filter(|r| outright(r)) {
                if let Some(n) = r["names"].as_array_mut() {
                    n.retain(|n| !n.as_str().is_some_and(|n| freed.contains(&n)));
                }
            }
            rules.retain(|r| r["names"].as_array().is_none_or(|n| !n.is_empty()));
            if !freed.is_empty() {
                rules.push(json!({"names": freed, "action": "SCMP_ACT_LOG"}));
            }
        }
    }
    if audit.denials {
        profile["flags"] = json!(["SECCOMP_FILTER_FLAG_LOG"]);
    } else if let Some(path) = &audit.notify {
        notify_unnamed(&mut profile, path);
    }
    profile
}

/// Names every call of the profile's native architecture that no rule names in one rule
/// of its own, `SCMP_ACT_NOTIFY`, with the listener at `path`. Only where the default
/// action refuses with EPERM (what the listener answers), and not for a deny-all profile.
fn notify_unnamed(profile: &mut Value, path: &std::path::Path) {
    let eperm = profile["defaultAction"] == "SCMP_ACT_ERRNO" && profile["defaultErrnoRet"].as_u64().unwrap_or(1) == 1;
    let table = match profile["architectures"][0].as_str() {
        Some("SCMP_ARCH_X86_64") => crate::audit::SYSCALLS_X86_64,
        Some("SCMP_ARCH_AARCH64") => crate::audit::SYSCALLS_AARCH64,
        _ => return,
    };
    let Some(rules) = profile["syscalls"].as_array_mut().filter(|r| eperm && !r.is_empty()) else { return };
    let named: HashSet<String> = rules
        .iter()
        .flat_map(|r| r["names"].as_array().into_iter().flatten())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    let unnamed: Vec<&str> = crate::audit::syscall_names(table).filter(|n| !named.contains(*n)).collect();
    if unnamed.is_empty() {
        return;
    }
    rules.push(json!({"names": unnamed, "action": "SCMP_ACT_NOTIFY"}));
    profile["listenerPath"] = json!(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd64() -> Host {
        Host { arch: "amd64".into(), kernel: (6, 1) }
    }

    /// Whether `call` may be made with `arg0` by a container with `caps`: some allowing
    /// rule names it whose argument conditions (if any) `arg0` meets.
    fn allows(p: &Value, call: &str, arg0: Option<u64>) -> bool {
        p["syscalls"].as_array().unwrap().iter().any(|r| {
            r["action"] == "SCMP_ACT_ALLOW"
                && r["names"].as_array().unwrap().iter().any(|n| n == call)
                && r["args"].as_array().is_none_or(|args| {
                    args.iter().all(|a| {
                        let (v, x) = (a["value"].as_u64().unwrap(), arg0.unwrap_or(0));
                        match a["op"].as_str().unwrap() {
                            "SCMP_CMP_EQ" => x == v,
                            "SCMP_CMP_LT" => x < v,
                            "SCMP_CMP_GT" => x > v,
                            "SCMP_CMP_NE" => x != v,
                            "SCMP_CMP_MASKED_EQ" => x & v == a["valueTwo"].as_u64().unwrap_or(0),
                            _ => false,
                        }
                    })
                })
        })
    }

    #[test]
    fn the_profile_is_moby_s_allow_list() {
        let caps: Vec<String> = crate::spec::DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
        let p = profile_for(&caps, &amd64());
        assert_eq!((p["defaultAction"].as_str(), p["defaultErrnoRet"].as_u64()), (Some("SCMP_ACT_ERRNO"), Some(1)));
        assert_eq!(p["architectures"], json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]));
        for ok in ["read", "openat", "clone", "socket", "arch_prctl", "statx"] {
            assert!(allows(&p, ok, None), "{ok}");
        }
        for denied in ["io_uring_setup", "io_uring_enter", "fanotify_init", "mount", "unshare", "bpf", "kexec_load"] {
            assert!(!allows(&p, denied, None), "{denied}");
        }
        assert!(allows(&p, "socket", Some(2)), "AF_INET");
        assert!(!allows(&p, "socket", Some(38)), "AF_ALG");
        assert!(!allows(&p, "socket", Some(40)), "AF_VSOCK");
        assert!(allows(&p, "personality", Some(0)) && allows(&p, "personality", Some(0xffff_ffff)));
        assert!(!allows(&p, "personality", Some(0x0040_0000)), "READ_IMPLIES_EXEC");
        assert!(!allows(&p, "clone", Some(0x1000_0000)), "a new user namespace");
        // skiff's extras.
        for extra in ["ptrace", "process_vm_readv", "name_to_handle_at", "adjtimex"] {
            assert!(!allows(&p, extra, None), "{extra}");
        }
    }

    #[test]
    fn listens_and_denials_are_logged_only_when_asked() {
        let caps: Vec<String> = crate::spec::DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
        let plain = profile_for(&caps, &amd64());
        assert_eq!(with_audit(plain.clone(), Audit::default()), plain);
        let p = with_audit(plain, Audit { listens: true, denials: true, notify: None });
        let rules = p["syscalls"].as_array().unwrap();
        let naming =
            |call: &str| rules.iter().filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == call)).count();
        assert_eq!(naming("listen"), 1, "listen is in one rule only");
        assert!(rules.iter().any(|r| r["action"] == "SCMP_ACT_LOG" && r["names"] == json!(["listen"])));
        assert!(allows(&p, "accept4", None) && allows(&p, "bind", None), "the rest of the allow rule stays");
        assert_eq!(p["flags"], json!(["SECCOMP_FILTER_FLAG_LOG"]));
        assert!(rules.iter().all(|r| !r["names"].as_array().unwrap().is_empty()));
        // The deny-all fallback stays deny-all.
        let deny = json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": []});
        let notify = Some(std::path::PathBuf::from("/run/skiff/seccomp.sock"));
        assert_eq!(
            with_audit(deny.clone(), Audit { listens: true, notify: notify.clone(), ..Default::default() }),
            deny
        );
    }

    #[test]
    fn refused_calls_go_to_the_listener_where_the_flag_cannot_be_set() {
        let caps: Vec<String> = crate::spec::DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
        let plain = profile_for(&caps, &amd64());
        let path = std::path::PathBuf::from("/run/skiff/seccomp.sock");
        let p = with_audit(plain.clone(), Audit { listens: true, denials: false, notify: Some(path.clone()) });
        assert_eq!(p["listenerPath"], json!("/run/skiff/seccomp.sock"));
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO", "runc refuses NOTIFY as the default");
        let rules = p["syscalls"].as_array().unwrap();
        let notified: Vec<&str> = rules
            .iter()
            .filter(|r| r["action"] == "SCMP_ACT_NOTIFY")
            .flat_map(|r| r["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()))
            .collect();
        for call in ["mount", "ptrace", "bpf", "kexec_load", "unshare", "init_module"] {
            assert!(notified.contains(&call), "{call} is refused, so reported");
        }
        for call in ["read", "clone", "socket", "personality", "listen", "clone3"] {
            assert!(!notified.contains(&call), "{call} is named by another rule");
        }
        // A notified call is in no other rule (libseccomp refuses a call in two).
        for r in rules.iter().filter(|r| r["action"] != "SCMP_ACT_NOTIFY") {
            for n in r["names"].as_array().unwrap() {
                assert!(!notified.contains(&n.as_str().unwrap()), "{n} twice");
            }
        }
        // The flag wins where runc takes it; an unknown architecture is left alone.
        let flagged = with_audit(plain.clone(), Audit { listens: false, denials: true, notify: Some(path.clone()) });
        assert!(flagged["listenerPath"].is_null());
        let mut other = plain;
        other["architectures"] = json!(["SCMP_ARCH_RISCV64"]);
        assert!(with_audit(other, Audit { notify: Some(path), ..Default::default() })["listenerPath"].is_null());
    }

    #[test]
    fn capabilities_open_what_moby_opens_and_architectures_differ() {
        let mut caps: Vec<String> = crate::spec::DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
        caps.extend(["CAP_SYS_ADMIN".to_string(), "CAP_SYS_PTRACE".to_string(), "CAP_SYS_TIME".to_string()]);
        let p = profile_for(&caps, &amd64());
        for call in ["mount", "unshare", "ptrace", "process_vm_readv", "settimeofday", "adjtimex"] {
            assert!(allows(&p, call, None), "{call}");
        }
        assert!(allows(&p, "clone", Some(0x1000_0000)), "CAP_SYS_ADMIN may make namespaces");
        let arm = profile_for(&caps, &Host { arch: "arm64".into(), kernel: (6, 1) });
        assert_eq!(arm["architectures"], json!(["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]));
        assert!(!allows(&arm, "arch_prctl", None) && allows(&arm, "set_tls", None));
        let armv7 = profile_for(&caps, &Host { arch: "arm".into(), kernel: (6, 1) });
        assert!(armv7.get("architectures").is_none(), "no archMap entry: the native architecture only");
        let old = profile_for(&caps, &Host { arch: "amd64".into(), kernel: (4, 4) });
        assert!(allows(&old, "ptrace", None), "CAP_SYS_PTRACE's rule has no kernel condition");
        assert_eq!(kernel_version("6.18.44-fc-v1147"), (6, 18));
        assert_eq!(kernel_version("4.8"), (4, 8));
    }
}
