//! Validation of desired state. Every error names the field and the problem.

use crate::{Deployment, NetworkMode, RuntimeKind, VolumeSource};
use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    pub field: String,
    pub problem: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ValidationError { field: field.into(), problem: problem.into() }
    }
}

/// Networks one deployment may join.
pub const MAX_NETWORKS: usize = 16;

/// A DNS label: lower-case letters, digits and `-`, starting with a letter or digit, at
/// most 63 characters. Used for deployment and stack names, which become host names.
/// An absolute path with no `.` or `..` part (and no empty one but a trailing slash): what
/// it names does not depend on how a checker and a mounter resolve `..`.
pub fn is_clean_absolute(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.is_empty() || rest.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// A named volume's name, as Docker takes it: a letter or digit, then letters, digits,
/// `_`, `.` and `-` (it is a directory of the node's `volumes`: never `.` or `..`, no `/`).
pub fn check_volume_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = name.len() <= 128
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        return Ok(());
    }
    Err(ValidationError::new(
        field,
        format!("{name:?} is not a volume name (a letter or digit, then letters, digits, '_', '.' or '-')"),
    ))
}

pub fn check_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{name:?} is not a valid name (lower-case letters, digits, '-' and '_', at most 63 characters)"),
        ))
    }
}

const KNOWN_CAPS: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// Normalises `net_admin`, `CAP_NET_ADMIN` and `NET_ADMIN` to `CAP_NET_ADMIN`; `ALL` stays.
pub fn normalize_cap(c: &str) -> Option<String> {
    let up = c.trim().to_ascii_uppercase();
    if up == "ALL" {
        return Some(up);
    }
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    KNOWN_CAPS.contains(&bare).then(|| format!("CAP_{bare}"))
}

impl Deployment {
    fn check_macvlan(&self) -> Result<(), ValidationError> {
        let m = match (self.network, &self.macvlan) {
            (NetworkMode::Macvlan, Some(m)) => m,
            (NetworkMode::Macvlan, None) => {
                return Err(ValidationError::new("macvlan", "network: macvlan needs its parent interface"))
            }
            (_, Some(_)) => return Err(ValidationError::new("macvlan", "is only for network: macvlan")),
            (_, None) => return Ok(()),
        };
        let iface_ok = !m.parent.is_empty()
            && m.parent.len() <= 15
            && m.parent.chars().all(|c| c.is_ascii_alphanumeric() || "_.-@".contains(c))
            && m.parent != "."
            && m.parent != "..";
        if !iface_ok {
            return Err(ValidationError::new("macvlan.parent", format!("{:?} is not an interface name", m.parent)));
        }
        let cidr = |field: &str, v: &Option<String>| -> Result<Option<ipnet::Ipv4Net>, ValidationError> {
            v.as_deref()
                .map(|s| {
                    s.parse::<ipnet::Ipv4Net>().map_err(|_| {
                        ValidationError::new(field, format!("{s:?} is not an IPv4 subnet like 192.168.1.0/24"))
                    })
                })
                .transpose()
        };
        let addr = |field: &str, v: &Option<String>| -> Result<Option<std::net::Ipv4Addr>, ValidationError> {
            v.as_deref()
                .map(|s| s.parse().map_err(|_| ValidationError::new(field, format!("{s:?} is not an IPv4 address"))))
                .transpose()
        };
        let subnet = cidr("macvlan.subnet", &m.subnet)?;
        let range = cidr("macvlan.ip_range", &m.ip_range)?;
        let gateway = addr("macvlan.gateway", &m.gateway)?;
        let ip = addr("macvlan.ip", &m.ip)?;
        match (ip, range) {
            (None, None) => {
                return Err(ValidationError::new(
                    "macvlan",
                    "needs ip or ip_range: addresses on a shared segment are never guessed",
                ))
            }
            (Some(_), Some(_)) => return Err(ValidationError::new("macvlan.ip", "and ip_range exclude each other")),
            (Some(_), None)
                if self.replicas > 1
                    || self.autoscale.is_some()
                    || self.placement.mode == crate::PlacementMode::Global =>
            {
                return Err(ValidationError::new("macvlan.ip", "is one address: for several replicas set ip_range"))
            }
            _ => {}
        }
        if let Some(subnet) = subnet {
            let inside = |field: &str, a: Option<std::net::Ipv4Addr>| match a {
                Some(a) if !subnet.contains(&a) => {
                    Err(ValidationError::new(field, format!("{a} is not in the subnet {subnet}")))
                }
                _ => Ok(()),
            };
            inside("macvlan.ip", ip)?;
            inside("macvlan.gateway", gateway)?;
            if let Some(r) = range.filter(|r| !subnet.contains(r)) {
                return Err(ValidationError::new("macvlan.ip_range", format!("{r} is not in the subnet {subnet}")));
            }
        }
        if range.is_some_and(|r| r.prefix_len() > 30) {
            return Err(ValidationError::new("macvlan.ip_range", "holds no usable address (at most /30)"));
        }
        Ok(())
    }

    /// What it serves as a fleet service: ports once each, names as DNS labels.
    fn check_service(&self) -> Result<(), ValidationError> {
        if self.expose.len() > 64 {
            return Err(ValidationError::new("expose", "more than 64 ports"));
        }
        for (i, p) in self.expose.iter().enumerate() {
            if p.port == 0 || p.target == 0 {
                return Err(ValidationError::new(format!("expose[{i}]"), "ports are 1 to 65535"));
            }
            if self.expose[..i].iter().any(|o| o.is(p.port, p.protocol)) {
                return Err(ValidationError::new(format!("expose[{i}]"), format!("port {p} is exposed twice")));
            }
        }
        if self.aliases.len() > 16 {
            return Err(ValidationError::new("aliases", "more than 16 names"));
        }
        for (i, a) in self.aliases.iter().enumerate() {
            let label = !a.is_empty()
                && a.len() <= 63
                && a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && a.starts_with(|c: char| c.is_ascii_alphanumeric())
                && !a.ends_with('-');
            if !label {
                return Err(ValidationError::new(
                    format!("aliases[{i}]"),
                    format!("{a:?} is not a DNS label (lower-case letters, digits and '-', at most 63 characters)"),
                ));
            }
        }
        Ok(())
    }

    /// `network: service`: what comes from the deployment whose network it shares cannot
    /// be set here too (Docker refuses the same with `--network container:`).
    fn check_network_service(&self) -> Result<(), ValidationError> {
        let target = match (self.network, &self.network_service) {
            (NetworkMode::Service, Some(t)) => t,
            (NetworkMode::Service, None) => {
                return Err(ValidationError::new("network_service", "network: service needs the deployment to share"))
            }
            (_, Some(_)) => return Err(ValidationError::new("network_service", "only with network: service")),
            (_, None) => return Ok(()),
        };
        check_name("network_service", target)?;
        if *target == self.name {
            return Err(ValidationError::new("network_service", "is this deployment itself"));
        }
        let from = |field: &str| ValidationError::new(field, format!("comes from {target}, whose network it shares"));
        if self.hostname.is_some() {
            return Err(from("hostname"));
        }
        if !self.extra_hosts.is_empty() {
            return Err(from("extra_hosts"));
        }
        if self.dns != Default::default() {
            return Err(from("dns"));
        }
        if self.placement.mode == crate::PlacementMode::Global {
            return Err(ValidationError::new(
                "placement.mode",
                format!("global: its instances follow {target}'s, one beside each of the same number"),
            ));
        }
        if self.runtime != RuntimeKind::Oci {
            return Err(ValidationError::new(
                "runtime",
                "only runc's containers share a network (gVisor and WebAssembly have stacks of their own)",
            ));
        }
        Ok(())
    }

    /// Another container of `pod_of`'s pods: in its network (or both on the host's),
    /// following its instances, so nothing of its own that would count or place them.
    fn check_pod_of(&self) -> Result<(), ValidationError> {
        let Some(owner) = &self.pod_of else { return Ok(()) };
        check_name("pod_of", owner)?;
        if *owner == self.name {
            return Err(ValidationError::new("pod_of", "is this deployment itself"));
        }
        match (self.network, &self.network_service) {
            (NetworkMode::Service, Some(n)) if n == owner => {}
            (NetworkMode::Host, _) => {}
            _ => {
                return Err(ValidationError::new(
                    "network",
                    format!("a container of {owner}'s pods shares its network: network: service of {owner}, or host"),
                ))
            }
        }
        let follows = |field: &str, what: &str| {
            ValidationError::new(field, format!("{what}: its instances follow {owner}'s, one beside each"))
        };
        if self.autoscale.is_some() {
            return Err(follows("autoscale", "scale the pod's first container"));
        }
        if self.placement.mode == crate::PlacementMode::Global {
            return Err(follows("placement.mode", "global"));
        }
        if self.stateful.is_some() {
            return Err(follows("stateful", "a stateful set"));
        }
        if self.job.is_some() {
            return Err(ValidationError::new("job", "a job's pod of several containers is not supported"));
        }
        Ok(())
    }

    fn check_job(&self) -> Result<(), ValidationError> {
        let Some(job) = &self.job else { return Ok(()) };
        job.check(self.replicas)?;
        if !matches!(self.restart, crate::RestartPolicy::No | crate::RestartPolicy::OnFailure { .. }) {
            return Err(ValidationError::new(
                "restart",
                "a job's instances run to completion: no or on-failure (Kubernetes' Never, OnFailure)",
            ));
        }
        if self.placement.mode == crate::PlacementMode::Global {
            return Err(ValidationError::new("placement.mode", "global: a job runs on one node"));
        }
        if self.autoscale.is_some() {
            return Err(ValidationError::new("autoscale", "a job's instances are its completions"));
        }
        Ok(())
    }

    fn check_networks(&self) -> Result<(), ValidationError> {
        self.check_macvlan()?;
        self.check_network_service()?;
        self.check_pod_of()?;
        if self.networks.is_empty() {
            return Ok(());
        }
        if self.network != NetworkMode::Bridge {
            return Err(ValidationError::new("networks", "joins networks on the bridge: needs network: bridge"));
        }
        if self.networks.len() > MAX_NETWORKS {
            return Err(ValidationError::new("networks", format!("more than {MAX_NETWORKS} networks")));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in self.networks.iter().enumerate() {
            let field = format!("networks[{i}]");
            let ok = n.len() <= 64
                && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok {
                return Err(ValidationError::new(
                    field,
                    format!("{n:?} is not a network name (letters, digits, '_', '.' and '-', at most 64 characters)"),
                ));
            }
            if !seen.insert(n) {
                return Err(ValidationError::new(field, format!("{n:?} is listed twice")));
            }
        }
        Ok(())
    }

    /// Checks everything that can be checked without I/O. `skiff apply`, `skiff run` and the
    /// hub call this before anything is stored.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name("name", &self.name)?;
        self.check_job()?;
        self.check_stateful()?;
        check_name("stack", &self.stack)?;
        self.check_networks()?;
        self.check_service()?;
        if self.image.trim().is_empty() {
            return Err(ValidationError::new("image", "must not be empty"));
        }
        if self.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ValidationError::new("image", format!("{:?} is not an image reference", self.image)));
        }
        if let Some(b) = self.logging.max_size_bytes {
            if !(4096..=(64u64 << 30)).contains(&b) {
                return Err(ValidationError::new(
                    "logging.max_size_bytes",
                    format!("{b} bytes: must be 4 KiB to 64 GiB"),
                ));
            }
        }
        if let Some(n) = self.logging.max_files {
            if !(1..=100).contains(&n) {
                return Err(ValidationError::new("logging.max_files", format!("{n}: must be 1 to 100")));
            }
            if self.logging.max_size_bytes.is_none() {
                // As Docker: files are only rotated at a size.
                return Err(ValidationError::new("logging.max_files", "needs max-size"));
            }
        }
        if self.replicas > 1000 {
            return Err(ValidationError::new("replicas", format!("{} is more than the limit of 1000", self.replicas)));
        }
        for (k, v) in &self.placement.node_selector {
            if !is_label_key(k) {
                return Err(ValidationError::new(
                    format!("placement.node_selector.{k}"),
                    "is not a label key (letters, digits, '-', '_', '.', '/'; at most 253 characters)",
                ));
            }
            if v.len() > 63 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ValidationError::new(
                    format!("placement.node_selector.{k}"),
                    format!("{v:?} is not a label value (at most 63 characters, no whitespace)"),
                ));
            }
        }
        if let Some(k) = &self.placement.spread_by {
            if !is_label_key(k) {
                return Err(ValidationError::new("placement.spread_by", format!("{k:?} is not a label key")));
            }
        }
        if let Some(a) = &self.autoscale {
            if self.placement.mode == crate::PlacementMode::Global {
                return Err(ValidationError::new("autoscale", "a global deployment runs one instance per node"));
            }
            let checked = a
                .check(self.requests_milli())
                .map_err(|e| ValidationError::new(format!("autoscale.{}", e.field), e.problem))?;
            let own = checked.metrics.iter().position(|m| matches!(m.source, crate::autoscale::Source::Pods { .. }));
            if let (Some(i), None) = (own, &self.scrape) {
                return Err(ValidationError::new(
                    format!("autoscale.metrics[{i}]"),
                    "a Pods metric is read from the workload's own metrics: set prometheus.io/scrape (and /port, /path)",
                ));
            }
            // The agent reads pages from the host: it cannot reach a macvlan child (the
            // driver keeps parent and children apart) or a workload with no network.
            if let (Some(i), crate::NetworkMode::None | crate::NetworkMode::Macvlan) = (own, self.network) {
                return Err(ValidationError::new(
                    format!("autoscale.metrics[{i}]"),
                    "a Pods metric is scraped from the host, which cannot reach this workload's network",
                ));
            }
        }
        if let Some(s) = &self.scrape {
            s.check().map_err(|e| ValidationError::new("scrape", e))?;
        }
        self.update.check().map_err(|(field, problem)| ValidationError::new(format!("update.{field}"), problem))?;
        if self.placement.reschedule_after_ms == Some(0) {
            return Err(ValidationError::new("placement.reschedule_after", "must be greater than 0"));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ValidationError::new(format!("env.{k}"), "is not a valid variable name"));
            }
        }
        if let Some(wd) = &self.working_dir {
            if !wd.starts_with('/') {
                return Err(ValidationError::new("working_dir", format!("{wd:?} must be an absolute path")));
            }
        }
        let r = &self.resources;
        if r.cpus_millis == Some(0) {
            return Err(ValidationError::new("resources.cpus", "must be greater than 0"));
        }
        if let Some(m) = r.memory_bytes {
            // runc refuses limits below what the kernel can honour; Docker's minimum is 6 MiB.
            // A WebAssembly memory grows in 64 KiB pages: one page is the least it can have.
            let (min, spelled) = match self.runtime {
                RuntimeKind::Oci => (6 << 20, "6MiB"),
                RuntimeKind::Wasm => (WASM_PAGE, "64KiB (one wasm page)"),
                // The limit covers gVisor's own kernel (the Sentry) too.
                RuntimeKind::Runsc => (RUNSC_MIN_MEMORY, "64MiB (gVisor's own kernel counts against it)"),
            };
            if m < min {
                return Err(ValidationError::new(
                    "resources.memory",
                    format!("{m} bytes is below the minimum of {spelled}"),
                ));
            }
        }
        if let Some(s) = r.cpu_shares {
            if !(2..=262_144).contains(&s) {
                return Err(ValidationError::new("resources.cpu_shares", format!("{s} is outside 2..=262144")));
            }
        }
        if let Some(p) = r.pids_limit {
            if p == 0 || p < -1 {
                return Err(ValidationError::new(
                    "resources.pids",
                    format!("{p} must be positive (or -1 for unlimited)"),
                ));
            }
        }
        if let (Some(res), Some(lim)) = (r.memory_reservation_bytes, r.memory_bytes) {
            if res > lim {
                return Err(ValidationError::new("resources.reservations.memory", "is larger than the memory limit"));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.host_port == 0 || p.container_port == 0 {
                return Err(ValidationError::new(format!("ports[{i}]"), "ports must be between 1 and 65535"));
            }
            if !seen.insert((p.host_ip.clone(), p.host_port, p.protocol)) {
                return Err(ValidationError::new(
                    format!("ports[{i}]"),
                    format!("host port {} is published twice", p.host_port),
                ));
            }
        }
        if self.network != crate::NetworkMode::Bridge && !self.ports.is_empty() {
            return Err(ValidationError::new("ports", "published ports need the bridge network mode"));
        }
        for (i, t) in self.tmpfs.iter().enumerate() {
            if !is_clean_absolute(&t.target) || t.target == "/" {
                return Err(ValidationError::new(
                    format!("tmpfs[{i}].target"),
                    format!("{:?} is not an absolute path below / without . or ..", t.target),
                ));
            }
            if t.mode.is_some_and(|m| m > 0o7777) {
                return Err(ValidationError::new(format!("tmpfs[{i}].mode"), "is more than 7777 (octal)"));
            }
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.target.starts_with('/') {
                return Err(ValidationError::new(
                    format!("volumes[{i}].target"),
                    format!("{:?} must be an absolute path", v.target),
                ));
            }
            match &v.source {
                VolumeSource::Bind { path } if !is_clean_absolute(path) => {
                    return Err(ValidationError::new(
                        format!("volumes[{i}].source"),
                        format!("{path:?} must be an absolute path without . or .. parts"),
                    ));
                }
                VolumeSource::Named { name } | VolumeSource::Claim { name } | VolumeSource::Pod { name } => {
                    check_volume_name(&format!("volumes[{i}].source"), name)?
                }
                _ => {}
            }
        }
        for (field, caps) in [("cap_add", &self.cap_add), ("cap_drop", &self.cap_drop)] {
            for c in caps {
                if normalize_cap(c).is_none() {
                    return Err(ValidationError::new(field, format!("{c:?} is not a Linux capability")));
                }
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            if !d.host_path.starts_with("/dev/") || !d.container_path.starts_with('/') {
                return Err(ValidationError::new(format!("devices[{i}]"), "needs /dev/HOST[:/CONTAINER[:rwm]]"));
            }
            if !is_clean_absolute(&d.host_path) || !is_clean_absolute(&d.container_path) {
                return Err(ValidationError::new(format!("devices[{i}]"), "paths must not have . or .. parts"));
            }
            if d.permissions.is_empty() || !d.permissions.chars().all(|c| "rwm".contains(c)) {
                return Err(ValidationError::new(
                    format!("devices[{i}]"),
                    format!("permissions {:?} must be a subset of rwm", d.permissions),
                ));
            }
        }
        if let Some(h) = &self.healthcheck {
            if h.test.is_empty() {
                return Err(ValidationError::new("healthcheck.test", "must not be empty"));
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 {
                return Err(ValidationError::new("healthcheck", "interval and timeout must be greater than 0"));
            }
        }
        for (i, d) in self.depends_on.iter().enumerate() {
            if d.name == self.name {
                return Err(ValidationError::new(format!("depends_on[{i}]"), "a deployment cannot depend on itself"));
            }
        }
        if let Some(sig) = &self.signature {
            sig.check().map_err(|(f, p)| ValidationError::new(format!("signature.{f}"), p))?;
        }
        for (i, r) in self.device_requests.iter().enumerate() {
            r.check().map_err(|e| ValidationError::new(format!("device_requests[{i}]"), e))?;
        }
        crate::options::check_files(&self.files)?;
        crate::options::check(
            &self.sysctls,
            &self.ulimits,
            self.shm_size_bytes,
            &self.extra_hosts,
            &self.dns,
            // Sharing another's network is no network of its own: its `net.*` would be
            // that instance's.
            !matches!(self.network, crate::NetworkMode::Host | crate::NetworkMode::Service),
        )?;
        self.validate_runtime()
    }

    /// What the chosen runtime can honour: a WebAssembly instance has no Linux user,
    /// capabilities, devices, host name or shell, so asking for them is an error rather
    /// than something silently dropped.
    fn validate_runtime(&self) -> Result<(), ValidationError> {
        if self.runtime.is_container() {
            if !self.wasm.is_default() {
                return Err(ValidationError::new("wasm", "is only read by the wasm runtime (runtime: wasm)"));
            }
            if self.runtime == RuntimeKind::Runsc && self.network == crate::NetworkMode::Host {
                return Err(ValidationError::new(
                    "network",
                    "host is not for a sandbox: gVisor's own network stack would take the host's interfaces (runtime: runsc)",
                ));
            }
            if self.runtime == RuntimeKind::Runsc && (!self.devices.is_empty() || !self.device_requests.is_empty()) {
                let field = if self.devices.is_empty() { "device_requests" } else { "devices" };
                return Err(ValidationError::new(
                    field,
                    "a gVisor sandbox passes no host devices through (runtime: runsc); use runtime: oci",
                ));
            }
            return Ok(());
        }
        let unsupported = [
            ("user", self.user.is_some()),
            ("cap_add", !self.cap_add.is_empty()),
            ("cap_drop", !self.cap_drop.is_empty()),
            ("devices", !self.devices.is_empty()),
            ("tmpfs", !self.tmpfs.is_empty()),
            ("device_requests", !self.device_requests.is_empty()),
            ("hostname", self.hostname.is_some()),
            ("working_dir", self.working_dir.is_some()),
            ("tty", self.tty),
            ("stdin_open", self.stdin_open),
            ("resources.cpu_shares", self.resources.cpu_shares.is_some()),
            ("resources.pids", self.resources.pids_limit.is_some()),
            ("sysctls", !self.sysctls.is_empty()),
            ("ulimits", !self.ulimits.is_empty()),
            ("shm_size", self.shm_size_bytes.is_some()),
            ("init", self.init),
            ("files", !self.files.is_empty()),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(ValidationError::new(*field, "is not supported by the wasm runtime"));
        }
        if self.healthcheck.is_some() {
            return Err(ValidationError::new(
                "healthcheck",
                "a wasm instance has no shell to run a check in; publish a port and readiness follows it",
            ));
        }
        if self.wasm.timeout_ms == Some(0) {
            return Err(ValidationError::new("wasm.timeout", "must be greater than 0"));
        }
        if let Some(p) = self.wasm.pool {
            if !(1..=1000).contains(&p) {
                return Err(ValidationError::new("wasm.pool", format!("{p} is outside 1..=1000")));
            }
        }
        Ok(())
    }
}

/// The size of a WebAssembly memory page.
pub const WASM_PAGE: u64 = 64 << 10;
/// The least memory limit a gVisor sandbox is given.
pub const RUNSC_MIN_MEMORY: u64 = 64 << 20;

/// A node label key: `site`, `camera`, `skiff.dev/zone`.
pub fn is_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && k.starts_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortMapping, Resources};

    fn check(mutate: impl FnOnce(&mut Deployment), want: Option<&str>) {
        let mut d = Deployment::new("web", "img:1");
        mutate(&mut d);
        assert_eq!(d.validate().err().map(|e| e.to_string()).as_deref(), want);
    }

    /// A Pods metric is read by scraping: the workload must ask for it, on a network the
    /// host reaches; the scrape settings themselves are checked.
    #[test]
    fn pods_metrics_need_a_scraped_reachable_workload() {
        let pods = || {
            serde_json::from_value::<crate::autoscale::AutoscaleSpec>(serde_json::json!({"maxReplicas": 3,
                "metrics": [{"type": "Pods", "name": "q", "targetType": "AverageValue", "averageValue": "5"}]}))
            .unwrap()
        };
        let scrape = || Some(crate::metrics::Scrape { port: 9100, path: "/metrics".into() });
        check(
            |d| d.autoscale = Some(pods()),
            Some("autoscale.metrics[0]: a Pods metric is read from the workload's own metrics: set prometheus.io/scrape (and /port, /path)"),
        );
        check(
            |d| {
                d.autoscale = Some(pods());
                d.scrape = scrape();
            },
            None,
        );
        check(
            |d| {
                d.autoscale = Some(pods());
                d.scrape = scrape();
                d.network = crate::NetworkMode::None;
            },
            Some("autoscale.metrics[0]: a Pods metric is scraped from the host, which cannot reach this workload's network"),
        );
        // Declared without a Pods metric: kept, whatever the network.
        check(
            |d| {
                d.scrape = scrape();
                d.network = crate::NetworkMode::None;
            },
            None,
        );
        check(
            |d| d.scrape = Some(crate::metrics::Scrape { port: 9100, path: "metrics".into() }),
            Some("scrape: \"metrics\" is not a URL path (such as /metrics)"),
        );
    }

    #[test]
    fn host_paths_have_no_dot_parts() {
        for ok in ["/", "/srv", "/srv/data/", "/dev/bus/usb/001/002", "/a..b/.c"] {
            assert!(is_clean_absolute(ok), "{ok}");
        }
        for bad in ["", "srv", "/x/../var/lib/skiff", "/srv/./data", "/srv//data", "/..", "/dev/bus/usb/../../sda"] {
            assert!(!is_clean_absolute(bad), "{bad}");
        }
        check(
            |d| {
                d.volumes = vec![crate::Volume {
                    source: VolumeSource::Bind { path: "/x/../var/lib/skiff".into() },
                    target: "/d".into(),
                    read_only: false,
                }]
            },
            Some("volumes[0].source: \"/x/../var/lib/skiff\" must be an absolute path without . or .. parts"),
        );
        check(
            |d| d.devices = vec![crate::DeviceMapping::parse("/dev/bus/usb/../../sda").unwrap()],
            Some("devices[0]: paths must not have . or .. parts"),
        );
    }

    #[test]
    fn a_deployment_s_signature_rule_is_checked_naming_the_field() {
        let rule = |f: fn(&mut crate::SignatureRule)| {
            move |d: &mut Deployment| {
                let mut r = crate::SignatureRule {
                    keys: vec!["-----BEGIN PUBLIC KEY-----\nMFk=\n-----END PUBLIC KEY-----\n".into()],
                    ..Default::default()
                };
                f(&mut r);
                d.signature = Some(r);
            }
        };
        check(rule(|_| {}), None);
        check(rule(|r| r.mode = Some("strict".into())), Some("signature.mode: \"strict\" is not one of enforce, warn"));
        check(rule(|r| r.keys.clear()), Some("signature.keys: no key: give at least one public key, or notation"));
        check(
            rule(|r| r.keys.push("/etc/skiff/k.pub".into())),
            Some("signature.keys[1]: is not PEM text (a deployment carries the key itself, not a file name)"),
        );
        check(
            rule(|r| r.notation = Some(crate::NotationRule { trust_store: vec![], identities: vec!["*".into()] })),
            Some("signature.notation.trust_store: list at least one root certificate"),
        );
    }

    #[test]
    fn validation_table() {
        check(|_| {}, None);
        check(
            |d| d.name = "Web".into(),
            Some("name: \"Web\" is not a valid name (lower-case letters, digits, '-' and '_', at most 63 characters)"),
        );
        check(|d| d.image = "".into(), Some("image: must not be empty"));
        check(
            |d| d.resources = Resources { memory_bytes: Some(1024), ..Default::default() },
            Some("resources.memory: 1024 bytes is below the minimum of 6MiB"),
        );
        check(|d| d.resources.cpu_shares = Some(1), Some("resources.cpu_shares: 1 is outside 2..=262144"));
        check(|d| d.cap_add = vec!["FLY".into()], Some("cap_add: \"FLY\" is not a Linux capability"));
        check(|d| d.working_dir = Some("rel".into()), Some("working_dir: \"rel\" must be an absolute path"));
        check(
            |d| {
                d.ports = vec![PortMapping::parse("80:80").unwrap()];
                d.replicas = 2;
            },
            None,
        );
        check(|d| d.update.max_failure_ratio = -0.5, Some("update.max_failure_ratio: must be between 0 and 1"));
    }

    #[test]
    fn macvlan_needs_a_parent_and_addresses_it_was_given() {
        let mv = |m: crate::Macvlan| {
            move |d: &mut Deployment| {
                d.network = NetworkMode::Macvlan;
                d.macvlan = Some(m);
            }
        };
        let base = crate::Macvlan {
            parent: "eth0".into(),
            subnet: Some("192.168.1.0/24".into()),
            gateway: Some("192.168.1.1".into()),
            ip_range: Some("192.168.1.64/28".into()),
            ip: None,
        };
        check(mv(base.clone()), None);
        check(mv(crate::Macvlan { ip_range: None, ip: Some("192.168.1.50".into()), ..base.clone() }), None);
        check(
            mv(crate::Macvlan { ip_range: None, ..base.clone() }),
            Some("macvlan: needs ip or ip_range: addresses on a shared segment are never guessed"),
        );
        check(
            mv(crate::Macvlan { ip: Some("10.0.0.5".into()), ip_range: None, ..base.clone() }),
            Some("macvlan.ip: 10.0.0.5 is not in the subnet 192.168.1.0/24"),
        );
        check(
            mv(crate::Macvlan { ip_range: Some("10.0.0.0/28".into()), ..base.clone() }),
            Some("macvlan.ip_range: 10.0.0.0/28 is not in the subnet 192.168.1.0/24"),
        );
        check(
            mv(crate::Macvlan { parent: "eth0/../x".into(), ..base.clone() }),
            Some("macvlan.parent: \"eth0/../x\" is not an interface name"),
        );
        check(
            mv(crate::Macvlan { subnet: Some("192.168.1.0".into()), ..base.clone() }),
            Some("macvlan.subnet: \"192.168.1.0\" is not an IPv4 subnet like 192.168.1.0/24"),
        );
        let fixed = crate::Macvlan { ip_range: None, ip: Some("192.168.1.50".into()), ..base.clone() };
        check(
            |d| {
                mv(fixed)(d);
                d.replicas = 2;
            },
            Some("macvlan.ip: is one address: for several replicas set ip_range"),
        );
        check(|d| d.network = NetworkMode::Macvlan, Some("macvlan: network: macvlan needs its parent interface"));
        check(|d| d.macvlan = Some(base.clone()), Some("macvlan: is only for network: macvlan"));
        check(
            |d| {
                mv(base.clone())(d);
                d.ports = vec![crate::PortMapping::parse("8080:80").unwrap()];
            },
            Some("ports: published ports need the bridge network mode"),
        );
    }

    #[test]
    fn a_pods_other_container_shares_its_network_and_follows_its_instances() {
        let member = |d: &mut Deployment| {
            d.pod_of = Some("db".into());
            d.network = NetworkMode::Service;
            d.network_service = Some("db".into());
        };
        check(member, None);
        check(
            |d| {
                d.pod_of = Some("db".into());
                d.network = NetworkMode::Host;
            },
            None,
        );
        check(
            |d| d.pod_of = Some("db".into()),
            Some("network: a container of db's pods shares its network: network: service of db, or host"),
        );
        check(
            |d| {
                member(d);
                d.network_service = Some("other".into());
                d.pod_of = Some("db".into());
            },
            Some("network: a container of db's pods shares its network: network: service of db, or host"),
        );
        check(
            |d| {
                d.pod_of = Some(d.name.clone());
            },
            Some("pod_of: is this deployment itself"),
        );
        check(
            |d| {
                d.pod_of = Some("db".into());
                d.network = NetworkMode::Host;
                d.placement.mode = crate::PlacementMode::Global;
            },
            Some("placement.mode: global: its instances follow db's, one beside each"),
        );
        check(
            |d| {
                member(d);
                d.stateful = Some(crate::stateful::Stateful { service: None, pod_management: Default::default() });
                d.update.max_surge = crate::rollout::IntOrPercent::Int(0);
            },
            Some("stateful: a stateful set: its instances follow db's, one beside each"),
        );
        check(
            |d| {
                member(d);
                d.volumes.push(crate::Volume {
                    source: VolumeSource::Pod { name: "Bad/Name".into() },
                    target: "/x".into(),
                    read_only: false,
                });
            },
            Some("volumes[0].source: \"Bad/Name\" is not a volume name (a letter or digit, then letters, digits, '_', '.' or '-')"),
        );
    }

    #[test]
    fn a_shared_network_names_its_deployment_and_takes_what_comes_with_it() {
        let shares = |d: &mut Deployment| {
            d.network = NetworkMode::Service;
            d.network_service = Some("db".into());
        };
        check(shares, None);
        check(
            |d| d.network = NetworkMode::Service,
            Some("network_service: network: service needs the deployment to share"),
        );
        check(|d| d.network_service = Some("db".into()), Some("network_service: only with network: service"));
        let with = |f: fn(&mut Deployment)| {
            move |d: &mut Deployment| {
                shares(d);
                f(d)
            }
        };
        check(with(|d| d.network_service = Some(d.name.clone())), Some("network_service: is this deployment itself"));
        check(with(|d| d.network_service = Some("Bad Name".into())), Some("network_service: \"Bad Name\" is not a valid name (lower-case letters, digits, '-' and '_', at most 63 characters)"));
        check(
            with(|d| d.ports = vec![crate::PortMapping::parse("8080:80").unwrap()]),
            Some("ports: published ports need the bridge network mode"),
        );
        check(with(|d| d.hostname = Some("h".into())), Some("hostname: comes from db, whose network it shares"));
        let e = {
            let mut d = Deployment::new("web", "img:1");
            with(|d| {
                d.sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
            })(&mut d);
            d.validate().unwrap_err().to_string()
        };
        assert!(e.starts_with("sysctls.net.ipv4.ip_forward") || e.contains("network of its own"), "{e}");
        check(
            with(|d| d.networks = vec!["back".into()]),
            Some("networks: joins networks on the bridge: needs network: bridge"),
        );
        check(
            with(|d| d.placement.mode = crate::PlacementMode::Global),
            Some("placement.mode: global: its instances follow db's, one beside each of the same number"),
        );
        check(
            with(|d| d.runtime = RuntimeKind::Runsc),
            Some("runtime: only runc's containers share a network (gVisor and WebAssembly have stacks of their own)"),
        );
    }

    #[test]
    fn jobs_run_to_completion_on_one_node() {
        let job = |j: crate::job::JobSpec| {
            move |d: &mut Deployment| {
                d.replicas = j.completions;
                d.job = Some(j);
            }
        };
        let base = crate::job::JobSpec { completions: 3, parallelism: 2, ..Default::default() };
        check(job(base.clone()), None);
        check(
            |d| {
                job(base.clone())(d);
                d.replicas = 1;
            },
            Some("replicas: a job's instances are its completions (3), not 1"),
        );
        check(job(crate::job::JobSpec { completions: 0, ..base.clone() }), Some("job.completions: must be 1 to 100"));
        check(job(crate::job::JobSpec { parallelism: 0, ..base.clone() }), Some("job.parallelism: must be 1 to 100"));
        check(
            |d| {
                job(base.clone())(d);
                d.restart = crate::RestartPolicy::Always;
            },
            Some("restart: a job's instances run to completion: no or on-failure (Kubernetes' Never, OnFailure)"),
        );
        let cron = |c: &str| crate::job::Schedule {
            cron: c.into(),
            time_zone: None,
            concurrency_policy: Default::default(),
            starting_deadline_seconds: None,
            suspend: false,
        };
        check(job(crate::job::JobSpec { schedule: Some(cron("*/5 * * * *")), ..base.clone() }), None);
        check(
            job(crate::job::JobSpec { schedule: Some(cron("every day")), ..base.clone() }),
            Some("job.schedule: \"every day\" is not a cron pattern: Invalid pattern: Pattern must have 5 fields when seconds are disallowed."),
        );
    }

    #[test]
    fn runsc_rules() {
        let runsc = |d: &mut Deployment| d.runtime = RuntimeKind::Runsc;
        check(runsc, None);
        check(
            |d| {
                runsc(d);
                d.resources.memory_bytes = Some(32 << 20);
            },
            Some("resources.memory: 33554432 bytes is below the minimum of 64MiB (gVisor's own kernel counts against it)"),
        );
        check(
            |d| {
                runsc(d);
                d.network = crate::NetworkMode::Host;
            },
            Some("network: host is not for a sandbox: gVisor's own network stack would take the host's interfaces (runtime: runsc)"),
        );
        check(
            |d| {
                runsc(d);
                d.wasm.pool = Some(2);
            },
            Some("wasm: is only read by the wasm runtime (runtime: wasm)"),
        );
        assert_eq!(RuntimeKind::parse("gvisor"), Some(RuntimeKind::Runsc));
        assert!(RuntimeKind::Runsc.is_container() && !RuntimeKind::Wasm.is_container());
    }

    #[test]
    fn wasm_rules() {
        let wasm = |d: &mut Deployment| d.runtime = RuntimeKind::Wasm;
        check(wasm, None);
        check(
            |d| {
                wasm(d);
                d.resources.memory_bytes = Some(64 << 10);
                d.resources.cpus_millis = Some(200);
                d.wasm.timeout_ms = Some(5_000);
                d.wasm.pool = Some(8);
            },
            None,
        );
        check(
            |d| {
                wasm(d);
                d.resources.memory_bytes = Some(1000);
            },
            Some("resources.memory: 1000 bytes is below the minimum of 64KiB (one wasm page)"),
        );
        check(
            |d| {
                wasm(d);
                d.user = Some("1000".into());
            },
            Some("user: is not supported by the wasm runtime"),
        );
        check(
            |d| {
                wasm(d);
                d.resources.cpu_shares = Some(512);
            },
            Some("resources.cpu_shares: is not supported by the wasm runtime"),
        );
        check(
            |d| {
                wasm(d);
                d.healthcheck = Some(crate::HealthCheck {
                    test: vec!["true".into()],
                    shell: false,
                    interval_ms: 1000,
                    timeout_ms: 1000,
                    retries: 3,
                    start_period_ms: 0,
                });
            },
            Some(
                "healthcheck: a wasm instance has no shell to run a check in; publish a port and readiness follows it",
            ),
        );
        check(
            |d| {
                wasm(d);
                d.wasm.pool = Some(0);
            },
            Some("wasm.pool: 0 is outside 1..=1000"),
        );
        check(
            |d| {
                wasm(d);
                d.wasm.timeout_ms = Some(0);
            },
            Some("wasm.timeout: must be greater than 0"),
        );
        check(
            |d| {
                wasm(d);
                d.tty = true;
            },
            Some("tty: is not supported by the wasm runtime"),
        );
        check(|d| d.wasm.timeout_ms = Some(1000), Some("wasm: is only read by the wasm runtime (runtime: wasm)"));
        assert_eq!(RuntimeKind::parse("wasmtime"), Some(RuntimeKind::Wasm));
        assert_eq!(RuntimeKind::parse("crun"), None);
    }

    #[test]
    fn caps() {
        assert_eq!(normalize_cap("net_admin").as_deref(), Some("CAP_NET_ADMIN"));
        assert_eq!(normalize_cap("CAP_SYS_ADMIN").as_deref(), Some("CAP_SYS_ADMIN"));
        assert_eq!(normalize_cap("ALL").as_deref(), Some("ALL"));
        assert!(normalize_cap("NOPE").is_none());
    }
}
