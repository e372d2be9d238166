//! What Docker's `run` sets about a container besides its resources: kernel parameters
//! (`--sysctl`), process limits (`--ulimit`), `/dev/shm`'s size, an init process,
//! `/etc/hosts` entries (`--add-host`) and name resolution (`--dns*`). Compose and
//! Kubernetes files set the same through their own keys.

use crate::validate::ValidationError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A process limit: the soft value a process starts with, the hard one it may raise it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ulimit {
    pub soft: u64,
    pub hard: u64,
}

/// Docker's ulimit names and the resource each is (`RLIMIT_` + upper case).
pub const ULIMIT_NAMES: &[&str] = &[
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

impl Ulimit {
    /// `NAME=SOFT[:HARD]` (`--ulimit nofile=1024:4096`); `-1` is unlimited.
    pub fn parse(s: &str) -> Result<(String, Ulimit), String> {
        let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=SOFT[:HARD]"))?;
        let (soft, hard) = value.split_once(':').unwrap_or((value, value));
        let u = Ulimit { soft: Self::value(soft)?, hard: Self::value(hard)? };
        Ok((name.to_string(), u))
    }

    /// A limit's value: a count, or `-1` / `unlimited` for none.
    pub fn value(s: &str) -> Result<u64, String> {
        match s.trim() {
            "-1" | "unlimited" | "infinity" => Ok(u64::MAX),
            t => t.parse::<u64>().map_err(|_| format!("{t:?} is not a limit (a count, or -1 for none)")),
        }
    }

    /// The OCI spec's name of a limit (`nofile` → `RLIMIT_NOFILE`).
    pub fn resource(name: &str) -> String {
        format!("RLIMIT_{}", name.to_ascii_uppercase())
    }
}

/// A line of `/etc/hosts` beside the instance's own: `host` at `ip`, or at the node's
/// bridge gateway for `host-gateway` (as Docker's `--add-host host.docker.internal:host-gateway`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraHost {
    pub host: String,
    pub ip: String,
}

/// The address Docker spells for "the host, as the container reaches it".
pub const HOST_GATEWAY: &str = "host-gateway";

impl ExtraHost {
    /// `HOST:IP` or `HOST=IP` (compose accepts both; an IPv6 address may be in brackets).
    pub fn parse(s: &str) -> Result<ExtraHost, String> {
        let (host, ip) = match s.split_once('=') {
            Some(x) => x,
            None => s.split_once(':').ok_or_else(|| format!("{s:?} is not HOST:IP"))?,
        };
        let ip = ip.trim().trim_start_matches('[').trim_end_matches(']');
        Ok(ExtraHost { host: host.trim().to_string(), ip: ip.to_string() })
    }
}

/// How its instances resolve names: its own name servers (asked for what is not the
/// fleet's), search domains and resolver options, in place of the node's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl DnsConfig {
    pub fn is_default(&self) -> bool {
        *self == DnsConfig::default()
    }
}

/// Kernel parameters a container may set for itself: those of the namespaces it has of
/// its own (Docker's list). `net.*` needs a network namespace of its own.
fn sysctl_allowed(key: &str, own_network: bool) -> Result<(), &'static str> {
    const IPC: &[&str] = &[
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        return Ok(());
    }
    if key.starts_with("net.") {
        return if own_network {
            Ok(())
        } else {
            Err("needs a network of its own (not the host's, nor one shared with another)")
        };
    }
    Err("is not namespaced (kernel.msg*, kernel.sem, kernel.shm*, fs.mqueue.*, net.*): it would set the host's")
}

/// Checks the options of a deployment that runs in `own_network` (not the host's).
pub(crate) fn check(
    sysctls: &BTreeMap<String, String>,
    ulimits: &BTreeMap<String, Ulimit>,
    shm_size: Option<u64>,
    extra_hosts: &[ExtraHost],
    dns: &DnsConfig,
    own_network: bool,
) -> Result<(), ValidationError> {
    if sysctls.len() > 64 {
        return Err(ValidationError::new("sysctls", "more than 64"));
    }
    for (k, v) in sysctls {
        let field = format!("sysctls.{k}");
        let well_formed = !k.is_empty()
            && k.len() <= 128
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
            && !k.split(['.', '/']).any(|p| p.is_empty() || p == "..");
        if !well_formed {
            return Err(ValidationError::new(field, "is not a kernel parameter's name"));
        }
        sysctl_allowed(k, own_network).map_err(|why| ValidationError::new(&field, why))?;
        if v.len() > 4096 || v.chars().any(|c| c == '\n' || c == '\0') {
            return Err(ValidationError::new(field, "the value must be one line of at most 4096 bytes"));
        }
    }
    for (k, u) in ulimits {
        let field = format!("ulimits.{k}");
        if !ULIMIT_NAMES.contains(&k.as_str()) {
            return Err(ValidationError::new(field, format!("is not a limit ({})", ULIMIT_NAMES.join(", "))));
        }
        if u.soft > u.hard {
            return Err(ValidationError::new(field, format!("soft {} is above hard {}", u.soft, u.hard)));
        }
        // Real-time scheduling escapes the cgroup's CPU limit on most kernels (no
        // RT_GROUP_SCHED): one workload could starve the node and its agent. A nice
        // ceiling above 20 lets it raise its priority over the node's own processes.
        let starves = match k.as_str() {
            "rtprio" | "rttime" => u.hard > 0,
            "nice" => u.hard > 20,
            _ => false,
        };
        if starves {
            return Err(ValidationError::new(
                field,
                "would let the workload raise its scheduling priority over the node's (rtprio and rttime 0, nice at most 20)",
            ));
        }
    }
    if let Some(s) = shm_size {
        if !(4096..=(64u64 << 30)).contains(&s) {
            return Err(ValidationError::new("shm_size", format!("{s} bytes: must be 4 KiB to 64 GiB")));
        }
    }
    if extra_hosts.len() > 256 {
        return Err(ValidationError::new("extra_hosts", "more than 256"));
    }
    for (i, h) in extra_hosts.iter().enumerate() {
        let field = format!("extra_hosts[{i}]");
        let name_ok = !h.host.is_empty()
            && h.host.len() <= 253
            && h.host.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !name_ok {
            return Err(ValidationError::new(field, format!("{:?} is not a host name", h.host)));
        }
        if h.ip != HOST_GATEWAY && h.ip.parse::<std::net::IpAddr>().is_err() {
            return Err(ValidationError::new(field, format!("{:?} is not an IP address or host-gateway", h.ip)));
        }
    }
    if dns.servers.len() > 3 {
        return Err(ValidationError::new("dns.servers", "more than 3 (a resolver asks at most 3)"));
    }
    for (i, s) in dns.servers.iter().enumerate() {
        let field = format!("dns.servers[{i}]");
        match s.parse::<std::net::IpAddr>() {
            Err(_) => return Err(ValidationError::new(field, format!("{s:?} is not an IP address"))),
            // The node's DNS asks them from the host: a loopback one would be the node's
            // own services, which no instance reaches otherwise.
            Ok(ip) if ip.to_canonical().is_loopback() || ip.to_canonical().is_unspecified() => {
                return Err(ValidationError::new(field, format!("{s}: a loopback name server is the node's own")))
            }
            Ok(_) => {}
        }
    }
    for (what, list) in [("search", &dns.search), ("options", &dns.options)] {
        if list.len() > 32 {
            return Err(ValidationError::new(format!("dns.{what}"), "more than 32"));
        }
        for (i, s) in list.iter().enumerate() {
            if s.is_empty() || s.len() > 253 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ValidationError::new(format!("dns.{what}[{i}]"), format!("{s:?} is not one word")));
            }
        }
    }
    Ok(())
}

/// Files a deployment is given (a Kubernetes ConfigMap or Secret volume, compose
/// `configs` and `secrets`): written on the node beside the instance, mounted read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMount {
    /// Where: a directory that holds only these files, or (one file of path "") the file.
    pub target: String,
    pub files: Vec<MountedFile>,
    /// A secret's: its content is never shown (`get`, `describe`), only its size.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

/// One file of a [`FileMount`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountedFile {
    /// Below the mount's target (`conf.d/app.conf`); "" when the mount is this one file.
    #[serde(default)]
    pub path: String,
    /// The content, base64 (a ConfigMap's `binaryData` is not text).
    pub data: String,
    /// Permission bits (Kubernetes' `defaultMode` 0644; compose's 0444).
    pub mode: u32,
}

/// The first place of `d` where a secret still reads [`REDACTED`] (a spec read back
/// whose secret is not stored): its field.
pub fn redacted_left(d: &crate::Deployment) -> Option<String> {
    if let Some(k) = d.secret_env.iter().find(|k| d.env.get(*k).is_some_and(|v| v == REDACTED)) {
        return Some(format!("env.{k}"));
    }
    d.files.iter().enumerate().filter(|(_, m)| m.secret).find_map(|(i, m)| {
        m.files.iter().position(|f| f.data == REDACTED).map(|j| format!("files[{i}].files[{j}].data"))
    })
}

/// What a redacted secret's data reads as.
pub const REDACTED: &str = "<redacted>";

/// The most content a deployment's files may hold in all (Kubernetes' limit for one
/// ConfigMap or Secret).
pub const FILES_MAX_BYTES: usize = 1 << 20;

impl MountedFile {
    pub fn new(path: impl Into<String>, content: &[u8], mode: u32) -> Self {
        use base64::Engine;
        MountedFile { path: path.into(), data: base64::engine::general_purpose::STANDARD.encode(content), mode }
    }

    /// The content, decoded.
    pub fn content(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(&self.data).map_err(|e| format!("data is not base64: {e}"))
    }
}

/// Checks a deployment's file mounts: clean paths, modes, the size bound, no target twice.
pub(crate) fn check_files(mounts: &[FileMount]) -> Result<(), ValidationError> {
    let mut total = 0usize;
    let mut targets = std::collections::HashSet::new();
    for (i, m) in mounts.iter().enumerate() {
        let field = format!("files[{i}]");
        if !crate::validate::is_clean_absolute(&m.target) || m.target == "/" {
            return Err(ValidationError::new(
                format!("{field}.target"),
                format!("{:?} is not an absolute path below / without . or ..", m.target),
            ));
        }
        if !targets.insert(m.target.as_str()) {
            return Err(ValidationError::new(format!("{field}.target"), format!("{:?} is mounted twice", m.target)));
        }
        let single = m.files.len() == 1 && m.files[0].path.is_empty();
        for (j, f) in m.files.iter().enumerate() {
            let ff = format!("{field}.files[{j}]");
            let clean = f.path.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
            if !single && (f.path.is_empty() || f.path.starts_with('/') || !clean || f.path.len() > 253) {
                return Err(ValidationError::new(
                    format!("{ff}.path"),
                    format!("{:?} is not a relative path without . or ..", f.path),
                ));
            }
            if f.mode > 0o777 {
                return Err(ValidationError::new(
                    format!("{ff}.mode"),
                    format!("{:o} is more than 777 (octal)", f.mode),
                ));
            }
            // A secret read back redacted stands for the stored content (the hub puts it
            // back, or refuses the apply).
            if m.secret && f.data == REDACTED {
                continue;
            }
            total += f.content().map_err(|e| ValidationError::new(format!("{ff}.data"), e))?.len();
        }
        if total > FILES_MAX_BYTES {
            return Err(ValidationError::new("files", format!("more than {FILES_MAX_BYTES} bytes in all")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulimits_parse_as_docker_writes_them() {
        assert_eq!(Ulimit::parse("nofile=1024:4096").unwrap(), ("nofile".into(), Ulimit { soft: 1024, hard: 4096 }));
        assert_eq!(Ulimit::parse("core=0").unwrap().1, Ulimit { soft: 0, hard: 0 });
        assert_eq!(Ulimit::parse("memlock=-1:-1").unwrap().1, Ulimit { soft: u64::MAX, hard: u64::MAX });
        assert!(Ulimit::parse("nofile").is_err());
        assert!(Ulimit::parse("nofile=lots").is_err());
        assert_eq!(Ulimit::resource("nofile"), "RLIMIT_NOFILE");
    }

    #[test]
    fn extra_hosts_take_both_separators_and_brackets() {
        assert_eq!(ExtraHost::parse("db:10.0.0.5").unwrap(), ExtraHost { host: "db".into(), ip: "10.0.0.5".into() });
        assert_eq!(ExtraHost::parse("db=::1").unwrap().ip, "::1");
        assert_eq!(ExtraHost::parse("v6:[fe80::1]").unwrap().ip, "fe80::1");
        assert!(ExtraHost::parse("nothing").is_err());
    }

    #[test]
    fn checks_name_the_field() {
        let none: BTreeMap<String, String> = BTreeMap::new();
        let no_limits: BTreeMap<String, Ulimit> = BTreeMap::new();
        let ok = |s: &BTreeMap<String, String>, own| check(s, &no_limits, None, &[], &DnsConfig::default(), own);
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(ok(&one("net.core.somaxconn", "1024"), true).is_ok());
        assert!(ok(&one("kernel.shmmax", "1"), false).is_ok());
        let e = ok(&one("net.ipv4.ip_forward", "1"), false).unwrap_err();
        assert_eq!(e.field, "sysctls.net.ipv4.ip_forward");
        let e = ok(&one("kernel.hostname", "x"), true).unwrap_err();
        assert!(e.problem.contains("not namespaced"), "{e}");
        assert!(ok(&one("net/../../x", "1"), true).is_err());
        assert!(ok(&one("net.core.somaxconn", "1\nkernel.x=1"), true).is_err());

        let limits = BTreeMap::from([("nofile".to_string(), Ulimit { soft: 10, hard: 5 })]);
        let e = check(&none, &limits, None, &[], &DnsConfig::default(), true).unwrap_err();
        assert_eq!(e.field, "ulimits.nofile");
        let limits = BTreeMap::from([("files".to_string(), Ulimit { soft: 1, hard: 1 })]);
        assert!(check(&none, &limits, None, &[], &DnsConfig::default(), true).is_err());
        for (name, hard) in [("rtprio", 99), ("rttime", u64::MAX), ("nice", 40)] {
            let limits = BTreeMap::from([(name.to_string(), Ulimit { soft: 0, hard })]);
            let e = check(&none, &limits, None, &[], &DnsConfig::default(), true).unwrap_err();
            assert!(e.problem.contains("scheduling priority"), "{name}: {e}");
        }
        let limits = BTreeMap::from([("nice".to_string(), Ulimit { soft: 0, hard: 20 })]);
        assert!(check(&none, &limits, None, &[], &DnsConfig::default(), true).is_ok());

        let hosts = [ExtraHost { host: "gw".into(), ip: HOST_GATEWAY.into() }];
        assert!(check(&none, &no_limits, None, &hosts, &DnsConfig::default(), true).is_ok());
        let hosts = [ExtraHost { host: "bad host".into(), ip: "1.2.3.4".into() }];
        assert_eq!(
            check(&none, &no_limits, None, &hosts, &DnsConfig::default(), true).unwrap_err().field,
            "extra_hosts[0]"
        );
        let dns = DnsConfig { servers: vec!["dns.example".into()], ..Default::default() };
        assert_eq!(check(&none, &no_limits, None, &[], &dns, true).unwrap_err().field, "dns.servers[0]");
        for lo in ["127.0.0.53", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::ffff:0.0.0.0"] {
            let dns = DnsConfig { servers: vec![lo.into()], ..Default::default() };
            assert!(check(&none, &no_limits, None, &[], &dns, true).unwrap_err().problem.contains("loopback"), "{lo}");
        }
        assert_eq!(check(&none, &no_limits, Some(1), &[], &DnsConfig::default(), true).unwrap_err().field, "shm_size");
    }
}
