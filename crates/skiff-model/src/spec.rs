//! Desired state: what an operator asks skiff to run.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A named, replicated workload: the unit `skiff apply`, `skiff run` and `skiff up` create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub name: String,
    /// The compose project (or `default` for `skiff run`). Instances of one stack resolve
    /// each other by deployment name.
    #[serde(default = "default_stack")]
    pub stack: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Ports it serves to its peers as a fleet service (compose `expose`, a Kubernetes
    /// Service's `port` → `targetPort`), beside the container ports it publishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<crate::mesh::ServicePort>,
    /// Other names its service answers to (Kubernetes Services that select it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Memory-backed directories (`tmpfs:`, volumes of `type: tmpfs`), empty at each start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<Tmpfs>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<Dependency>,
    #[serde(default)]
    pub network: NetworkMode,
    /// The networks it joins on the bridge (as Docker's user-defined networks): its
    /// instances reach, and resolve by name, only instances that share one with them.
    /// Empty: its stack's own, `<stack>_default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// With `network: macvlan`: the segment and addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macvlan: Option<Macvlan>,
    /// Run-to-completion work (a Kubernetes Job or CronJob): see [`crate::job`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<crate::job::JobSpec>,
    /// A Kubernetes StatefulSet's numbered instances: see [`crate::stateful`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stateful: Option<crate::stateful::Stateful>,
    /// With `network: service`: the deployment whose network its instances share, each
    /// that deployment's instance of the same number (compose `network_mode:
    /// service:NAME`, a pod's second container): one address, one `localhost`, its ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_service: Option<String>,
    /// Another container of this deployment's pods (a Kubernetes pod of several
    /// containers): one instance beside each of that deployment's, of the same number on
    /// the same node, however many it has (its own `replicas` are not read); it shares
    /// that instance's network (`network: service`) or the host's, and its pod volumes
    /// (`VolumeSource::Pod`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_of: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// Its process runs on a terminal (`run -t`, compose `tty`, Kubernetes `tty`), held
    /// by the instance's shim for `skiff attach`; its output is the terminal's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// Its standard input stays open for `skiff attach` to write to (`run -i`, compose
    /// `stdin_open`, Kubernetes `stdin`); without it the process reads nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin_open: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceMapping>,
    /// Devices named through CDI (accelerators): `--device vendor.com/class=NAME`,
    /// `--gpus`, compose `deploy.resources.reservations.devices`, Kubernetes extended
    /// resources such as `nvidia.com/gpu: 1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_requests: Vec<DeviceRequest>,
    /// Signatures its image must carry, beside the node's own image policy
    /// (`skiff run --verify-key`, compose `x-skiff-signature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureRule>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Which nodes run it and how instances spread over them.
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,
    /// Time between SIGTERM and SIGKILL on stop, in milliseconds (Docker's default is 10 s).
    #[serde(default = "default_grace")]
    pub stop_grace_period_ms: u64,
    /// A horizontal autoscaler that sets `replicas` from CPU or memory use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::autoscale::AutoscaleSpec>,
    /// Where agents read the workload's own metrics (the Prometheus text format), which
    /// Pods, Object and External autoscaler metrics use: the `prometheus.io/scrape`,
    /// `/port` and `/path` annotations (Kubernetes) or labels (compose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrape: Option<crate::metrics::Scrape>,
    /// How instances are replaced when the template changes.
    #[serde(default, skip_serializing_if = "crate::rollout::UpdateConfig::is_default")]
    pub update: crate::rollout::UpdateConfig,
    /// What runs the instances: an OCI container (runc) or a WebAssembly program.
    #[serde(default, skip_serializing_if = "RuntimeKind::is_default")]
    pub runtime: RuntimeKind,
    /// Settings only the `wasm` runtime reads.
    #[serde(default, skip_serializing_if = "WasmOptions::is_default")]
    pub wasm: WasmOptions,
    /// How its instances' log files are kept (Docker's json-file `max-size`/`max-file`).
    #[serde(default, skip_serializing_if = "LogOptions::is_default")]
    pub logging: LogOptions,
    /// Kernel parameters of its own namespaces (`--sysctl`, compose `sysctls`, a pod's
    /// `securityContext.sysctls`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    /// Process limits by Docker's names (`nofile`, `nproc`, ...; `--ulimit`, compose `ulimits`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ulimits: BTreeMap<String, crate::options::Ulimit>,
    /// The size of `/dev/shm` (Docker's default is 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size_bytes: Option<u64>,
    /// A small init runs as its process 1: it forwards signals to the command and reaps
    /// the zombies of its orphans (`--init`, compose `init`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// Lines of `/etc/hosts` beside its own (`--add-host`, compose `extra_hosts`, a pod's
    /// `hostAliases`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<crate::options::ExtraHost>,
    /// Its own name servers, search domains and resolver options (`--dns*`, compose
    /// `dns*`, a pod's `dnsConfig`).
    #[serde(default, skip_serializing_if = "crate::options::DnsConfig::is_default")]
    pub dns: crate::options::DnsConfig,
    /// Files it is given, mounted read-only (ConfigMap and Secret volumes, compose
    /// `configs` and `secrets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<crate::options::FileMount>,
    /// Variables of `env` whose values are secrets (a Kubernetes Secret's): never shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
    /// The labels of its pods (a Kubernetes template's): what a Service applied later,
    /// in a file of its own, selects it by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
}

/// A deployment's log files: each instance's is rotated at `max_size_bytes`, and
/// `max_files` are kept in all; the node's defaults (10 MiB, 3) where not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u32>,
}

impl LogOptions {
    pub fn is_default(&self) -> bool {
        *self == LogOptions::default()
    }

    /// Reads one of Docker's `--log-opt`/compose `logging.options` keys (`max-size` =
    /// `10m`, `max-file` = `3`); the error says what is wrong with the value (or the key).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "max-size" => {
                self.max_size_bytes =
                    Some(crate::parse_bytes(value).map_err(|_| format!("{value:?} is not a size (10m, 1g)"))?);
            }
            "max-file" => {
                self.max_files = Some(value.trim().parse::<u32>().map_err(|_| format!("{value:?} is not a count"))?);
            }
            _ => return Err("the json-file driver takes max-size and max-file".into()),
        }
        Ok(())
    }
}

/// The runtime backend of a deployment's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// An OCI container run by runc.
    #[default]
    Oci,
    /// A WASI program (preview 1 module or preview 2 component) run by wasmtime.
    Wasm,
    /// An OCI container sandboxed by gVisor (`runsc`): its system calls are served by a
    /// user-space kernel, not the host's.
    Runsc,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Oci, RuntimeKind::Wasm, RuntimeKind::Runsc];

    pub fn is_default(&self) -> bool {
        *self == RuntimeKind::Oci
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            RuntimeKind::Oci => "oci",
            RuntimeKind::Wasm => "wasm",
            RuntimeKind::Runsc => "runsc",
        }
    }

    /// `oci`, `wasm` or `runsc` (also `runc`, `wasmtime` and `gvisor`, the programs behind them).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "oci" | "runc" => Some(RuntimeKind::Oci),
            "wasm" | "wasmtime" => Some(RuntimeKind::Wasm),
            "runsc" | "gvisor" => Some(RuntimeKind::Runsc),
            _ => None,
        }
    }

    /// Whether instances are OCI containers (an image for the host's platform, unpacked).
    pub fn is_container(&self) -> bool {
        *self != RuntimeKind::Wasm
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of the `wasm` runtime. `--memory` and `--cpus` (in [`Resources`]) apply to
/// WebAssembly instances too: memory caps linear memories and tables, CPU is a share of
/// one core's time enforced between wasm instructions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmOptions {
    /// Wall-clock limit: a command is stopped after this long (exit code 124); for an HTTP
    /// component, it bounds each request (504 when it runs out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// HTTP components: instances kept ready in a pool of this many slots (the pooling
    /// allocator), which is also the most requests served at once. Unset: a fresh
    /// instance per request, as many at once as requests arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<u32>,
    /// Whether the program may connect to loopback, link-local (cloud metadata) and the
    /// node's own addresses, which are out of bounds by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_local: bool,
}

impl WasmOptions {
    pub fn is_default(&self) -> bool {
        *self == WasmOptions::default()
    }
}

/// What a WebAssembly binary is, from its 8-byte preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WasmKind {
    /// A core module (WASI preview 1).
    Module,
    /// A component (WASI preview 2).
    Component,
}

impl WasmKind {
    /// `\0asm`, then version 1 (a module) or layer 1 (a component).
    pub fn detect(head: &[u8]) -> Option<WasmKind> {
        match head.get(..8)? {
            [0, b'a', b's', b'm', 1, 0, 0, 0] => Some(WasmKind::Module),
            [0, b'a', b's', b'm', _, _, 1, 0] => Some(WasmKind::Component),
            _ => None,
        }
    }

    /// The OS a Wasm OCI artifact config names for it.
    pub fn artifact_os(self) -> &'static str {
        match self {
            WasmKind::Module => "wasip1",
            WasmKind::Component => "wasip2",
        }
    }
}

/// The exit code of a WebAssembly command stopped by its wall-clock `timeout` (as
/// coreutils' `timeout` reports it).
pub const WASM_TIMEOUT_EXIT_CODE: i32 = 124;
/// The exit code of a WebAssembly instance that trapped (wasmtime's CLI reports a trap as
/// an abort, 128 + SIGABRT).
pub const WASM_TRAP_EXIT_CODE: i32 = 134;

/// `replicas` instances placed by the scheduler, or one on every matching node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementMode {
    #[default]
    Replicated,
    /// One instance on every node that matches (a Kubernetes DaemonSet, `mode: global`).
    Global,
}

/// Where a deployment's instances may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub mode: PlacementMode,
    /// Node labels that must all match (`site: factory-3`, `camera: "true"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// A node label whose values are spread over evenly (`site`), before nodes are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
    /// Move instances off a node that has been unreachable this long. Unset (the edge
    /// default): instances stay assigned to their node however long it is away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reschedule_after_ms: Option<u64>,
}

impl Placement {
    pub fn is_default(&self) -> bool {
        *self == Placement::default()
    }
}

pub fn default_stack() -> String {
    "default".to_string()
}
fn one() -> u32 {
    1
}
fn default_grace() -> u64 {
    10_000
}

impl Deployment {
    /// The networks its instances join: those named, else its stack's own.
    pub fn joined_networks(&self) -> Vec<String> {
        if self.networks.is_empty() {
            vec![format!("{}_default", self.stack)]
        } else {
            self.networks.clone()
        }
    }

    /// The deployment as shown to readers: every secret variable's and file's content replaced by
    /// [`crate::options::REDACTED`].
    pub fn redacted(mut self) -> Self {
        for k in &self.secret_env {
            if let Some(v) = self.env.get_mut(k) {
                *v = crate::options::REDACTED.to_string();
            }
        }
        for m in self.files.iter_mut().filter(|m| m.secret) {
            for f in &mut m.files {
                f.data = crate::options::REDACTED.to_string();
            }
        }
        self
    }

    /// A deployment with defaults for everything but its name and image.
    pub fn new(name: impl Into<String>, image: impl Into<String>) -> Self {
        Deployment {
            name: name.into(),
            stack: default_stack(),
            image: image.into(),
            entrypoint: None,
            command: None,
            env: BTreeMap::new(),
            working_dir: None,
            user: None,
            hostname: None,
            ports: vec![],
            expose: vec![],
            aliases: vec![],
            volumes: vec![],
            tmpfs: vec![],
            resources: Resources::default(),
            restart: RestartPolicy::default(),
            healthcheck: None,
            depends_on: vec![],
            network: NetworkMode::default(),
            network_service: None,
            pod_of: None,
            job: None,
            stateful: None,
            networks: vec![],
            macvlan: None,
            read_only: false,
            tty: false,
            stdin_open: false,
            cap_add: vec![],
            cap_drop: vec![],
            devices: vec![],
            device_requests: vec![],
            signature: None,
            labels: BTreeMap::new(),
            replicas: 1,
            placement: Placement::default(),
            stop_grace_period_ms: default_grace(),
            autoscale: None,
            scrape: None,
            update: Default::default(),
            runtime: RuntimeKind::default(),
            wasm: WasmOptions::default(),
            logging: LogOptions::default(),
            sysctls: BTreeMap::new(),
            ulimits: BTreeMap::new(),
            shm_size_bytes: None,
            init: false,
            extra_hosts: vec![],
            dns: Default::default(),
            files: vec![],
            secret_env: vec![],
            pod_labels: BTreeMap::new(),
        }
    }

    /// Requests in milli-units by [`crate::autoscale::Resource::index`] (cpu, memory): the
    /// reservation, else the limit (as Kubernetes defaults a request to its limit).
    pub fn requests_milli(&self) -> [Option<i64>; 2] {
        let r = &self.resources;
        let cpu = r.cpus_reservation_millis.or(r.cpus_millis).map(|m| m as i64);
        let mem = r.memory_reservation_bytes.or(r.memory_bytes).map(|b| (b as i64).saturating_mul(1000));
        [cpu, mem]
    }
}

/// Limits and reservations. CPU amounts are millicores, memory is bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `--cpus`: hard cap, enforced with the CFS quota over a 100 ms period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_millis: Option<u64>,
    /// `--memory`: hard cap; swap is limited to the same amount (memory+swap = memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// `--cpu-shares`: relative weight (Docker's 1024 = default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_reservation_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_reservation_bytes: Option<u64>,
}

impl Resources {
    /// The CFS period used for `--cpus`, in microseconds (Docker's).
    pub const CFS_PERIOD_US: u64 = 100_000;

    /// CFS quota for `--cpus`, in microseconds per [`Self::CFS_PERIOD_US`].
    pub fn cfs_quota_us(&self) -> Option<i64> {
        self.cpus_millis.map(|m| (m * Self::CFS_PERIOD_US / 1000) as i64)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RestartPolicy {
    #[default]
    No,
    Always,
    OnFailure {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_retries: Option<u32>,
    },
    UnlessStopped,
}

impl RestartPolicy {
    /// Parses Docker's spelling: `no`, `always`, `on-failure`, `on-failure:3`, `unless-stopped`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "no" | "\"no\"" | "never" => Some(Self::No),
            "always" => Some(Self::Always),
            "unless-stopped" => Some(Self::UnlessStopped),
            "on-failure" => Some(Self::OnFailure { max_retries: None }),
            _ => {
                let n = s.strip_prefix("on-failure:")?.parse().ok()?;
                Some(Self::OnFailure { max_retries: Some(n) })
            }
        }
    }

    /// Whether an instance that exited with `code` after `restarts` restarts should be
    /// started again. `stopped_by_user` is true when the operator stopped it.
    pub fn should_restart(&self, code: i32, restarts: u32, stopped_by_user: bool) -> bool {
        if stopped_by_user {
            return false;
        }
        match self {
            Self::No => false,
            Self::Always | Self::UnlessStopped => true,
            Self::OnFailure { max_retries } => code != 0 && max_retries.is_none_or(|m| restarts < m),
        }
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::No => f.write_str("no"),
            Self::Always => f.write_str("always"),
            Self::UnlessStopped => f.write_str("unless-stopped"),
            Self::OnFailure { max_retries: None } => f.write_str("on-failure"),
            Self::OnFailure { max_retries: Some(n) } => write!(f, "on-failure:{n}"),
        }
    }
}

/// Docker-like restart backoff: 100 ms doubling per consecutive restart, capped at one
/// minute; the streak resets once an instance has run for [`BACKOFF_RESET_MS`].
pub fn restart_backoff_ms(consecutive: u32) -> u64 {
    const CAP: u64 = 60_000;
    100u64.saturating_mul(1u64 << consecutive.min(20)).min(CAP)
}

/// An instance that ran at least this long before exiting restarts without delay growth.
pub const BACKOFF_RESET_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// The command: an argv executed directly (compose `CMD`), or a shell line run with
    /// `/bin/sh -c` when `shell` is true (compose `CMD-SHELL` or a plain string).
    pub test: Vec<String>,
    #[serde(default)]
    pub shell: bool,
    #[serde(default = "hc_interval")]
    pub interval_ms: u64,
    #[serde(default = "hc_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "hc_retries")]
    pub retries: u32,
    #[serde(default)]
    pub start_period_ms: u64,
}
fn hc_interval() -> u64 {
    30_000
}
fn hc_timeout() -> u64 {
    30_000
}
fn hc_retries() -> u32 {
    3
}

impl HealthCheck {
    pub fn argv(&self) -> Vec<String> {
        if self.shell {
            vec!["/bin/sh".into(), "-c".into(), self.test.join(" ")]
        } else {
            self.test.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl PortMapping {
    /// Parses Docker's `-p` syntax: `8080:80`, `127.0.0.1:8080:80`, `53:53/udp`, `80`.
    pub fn parse(s: &str) -> Option<Self> {
        let (spec, proto) = match s.rsplit_once('/') {
            Some((a, "tcp")) => (a, Protocol::Tcp),
            Some((a, "udp")) => (a, Protocol::Udp),
            Some(_) => return None,
            None => (s, Protocol::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (ip, host, cont) = match parts.as_slice() {
            [c] => (None, *c, *c),
            [h, c] => (None, *h, *c),
            [ip, h, c] => (Some(ip.trim_start_matches('[').trim_end_matches(']').to_string()), *h, *c),
            _ => return None,
        };
        let host_port: u16 = host.parse().ok()?;
        let container_port: u16 = cont.parse().ok()?;
        if host_port == 0 || container_port == 0 {
            return None;
        }
        if let Some(ip) = &ip {
            ip.parse::<std::net::IpAddr>().ok()?;
        }
        Some(PortMapping { host_ip: ip, host_port, container_port, protocol: proto })
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = &self.host_ip {
            write!(f, "{ip}:")?;
        }
        let p = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{}->{}/{p}", self.host_port, self.container_port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum VolumeSource {
    /// A host path bind-mounted into the container.
    Bind { path: String },
    /// A named volume, created under the node's data directory.
    Named { name: String },
    /// A volume of one instance slot's own (compose's `- /path`, a Kubernetes `emptyDir`):
    /// made under the node's data directory for `<deployment>-<slot>`, filled from the
    /// image's content at its target when new (as Docker fills volumes), kept across that
    /// slot's restarts and updates, removed once its deployment is gone from the node.
    Anonymous,
    /// A named volume of each instance's own (a StatefulSet's `volumeClaimTemplates`):
    /// `NAME-INSTANCE` (`www-web-0`, Kubernetes' name for its claim), kept when the
    /// instance or its deployment goes, taken again by the instance of that name.
    Claim { name: String },
    /// A volume of the pod's own (a Kubernetes `emptyDir` in a pod of several
    /// containers): one directory per slot of the pod's first container's deployment
    /// (`Deployment::pod_of`), mounted by each container of that pod that names it,
    /// empty when new, removed with the anonymous volumes of that slot.
    Pod { name: String },
}

/// A tmpfs mounted at `target` (`nosuid`, `nodev`; Docker's defaults otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tmpfs {
    pub target: String,
    /// At most this many bytes (unset: half the node's memory, the kernel's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Permission bits of its root (unset: 1777).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub source: VolumeSource,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Bridge,
    Host,
    None,
    /// An address of its own on the segment of a host interface (Docker's macvlan driver):
    /// see [`Macvlan`].
    Macvlan,
    /// The network of another deployment's instance: see `Deployment::network_service`.
    Service,
}

/// `network: macvlan`: each instance gets an interface of its own on `parent`'s segment,
/// with its own MAC and address, as a separate device on the plant network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Macvlan {
    /// The host interface whose segment it joins (`eth0`).
    pub parent: String,
    /// The segment's subnet (`192.168.1.0/24`); unset: the parent's own on each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The default route; unset: none (the segment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Where instances' addresses are leased from (a CIDR inside the subnet, kept out of
    /// the segment's DHCP pool by whoever runs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<String>,
    /// One fixed address (a deployment of one replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyCondition {
    #[default]
    ServiceStarted,
    ServiceHealthy,
    ServiceCompletedSuccessfully,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    pub name: String,
    #[serde(default)]
    pub condition: DependencyCondition,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    pub host_path: String,
    pub container_path: String,
    /// cgroup permissions, a subset of `rwm`.
    #[serde(default = "rwm")]
    pub permissions: String,
}
fn rwm() -> String {
    "rwm".to_string()
}

/// A deployment's own signature rule: an `images:` rule of a node's policy for this
/// deployment's image alone. Keys and certificates are PEM text, not file names: the
/// deployment travels to every node that runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureRule {
    /// `enforce` (the default) or `warn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// cosign public keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// `repository` (the default) or `any`: which repository a cosign signature may name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notation: Option<NotationRule>,
}

/// Notation: root certificates and the identities they vouch for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotationRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_store: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

impl SignatureRule {
    /// What can be checked without parsing keys (the node parses them at admission):
    /// `Err((field below signature, problem))`.
    pub fn check(&self) -> Result<(), (String, String)> {
        if !matches!(self.mode.as_deref(), None | Some("enforce") | Some("warn")) {
            return Err((
                "mode".into(),
                format!("{:?} is not one of enforce, warn", self.mode.as_deref().unwrap_or("")),
            ));
        }
        if !matches!(self.identity.as_deref(), None | Some("repository") | Some("any")) {
            let id = self.identity.as_deref().unwrap_or("");
            return Err(("identity".into(), format!("{id:?} is not one of repository, any")));
        }
        if self.keys.is_empty() && self.notation.is_none() {
            return Err(("keys".into(), "no key: give at least one public key, or notation".into()));
        }
        let pems = self.keys.iter().map(|k| ("keys", k));
        let certs = self.notation.iter().flat_map(|n| n.trust_store.iter().map(|c| ("notation.trust_store", c)));
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (field, pem) in pems.chain(certs) {
            let i = counts.entry(field).or_default();
            let at = format!("{field}[{i}]");
            *i += 1;
            if !pem.contains("-----BEGIN") {
                return Err((at, "is not PEM text (a deployment carries the key itself, not a file name)".into()));
            }
            if pem.len() > 64 * 1024 {
                return Err((at, "is larger than 64 KiB".into()));
            }
        }
        if counts.values().any(|n| *n > 32) {
            return Err(("keys".into(), "more than 32 keys or certificates".into()));
        }
        if let Some(n) = &self.notation {
            if n.trust_store.is_empty() {
                return Err(("notation.trust_store".into(), "list at least one root certificate".into()));
            }
            if n.identities.is_empty() {
                return Err(("notation.identities".into(), "list whom the trust store vouches for, or \"*\"".into()));
            }
        }
        Ok(())
    }
}

/// Devices of one CDI kind an instance needs: particular ones (`ids`), or a `count` of
/// any (0: every device of the kind the node has).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRequest {
    /// The CDI kind, `vendor.com/class` (`nvidia.com/gpu`).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub count: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The kind Docker's `--gpus` and compose's `capabilities: [gpu]` mean.
pub const GPU_KIND: &str = "nvidia.com/gpu";

impl DeviceRequest {
    /// Whether `s` is meant as a CDI name (`vendor.com/class=name`) rather than a host path.
    pub fn looks_like_cdi(s: &str) -> bool {
        !s.starts_with('/') && s.contains('=')
    }

    /// A fully qualified CDI name, `vendor.com/class=name`: that one device.
    pub fn parse_cdi(s: &str) -> Option<Self> {
        let (kind, id) = s.split_once('=')?;
        let r = DeviceRequest { kind: kind.to_string(), ids: vec![id.to_string()], count: 0 };
        r.check().ok().map(|_| r)
    }

    /// Docker's `--gpus`: `all`, a count, or `device=ID[,ID...]` (or `"device=0,1"`).
    pub fn parse_gpus(s: &str) -> Option<Self> {
        let s = s.trim_matches('"');
        let gpu = |ids: Vec<String>, count| DeviceRequest { kind: GPU_KIND.into(), ids, count };
        if s == "all" {
            return Some(gpu(vec![], 0));
        }
        if let Some(list) = s.strip_prefix("device=") {
            let ids: Vec<String> = list.split(',').map(str::trim).filter(|i| !i.is_empty()).map(String::from).collect();
            return (!ids.is_empty()).then(|| gpu(ids, 0));
        }
        s.parse::<u32>().ok().filter(|n| *n > 0).map(|n| gpu(vec![], n))
    }

    /// CDI's naming rules: `vendor.com/class`, ids of [A-Za-z0-9_.:-].
    pub fn check(&self) -> Result<(), String> {
        let word = |w: &str, extra: &str| {
            w.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && w.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
        };
        match self.kind.split_once('/') {
            Some((vendor, class)) if word(vendor, "._-") && word(class, "_-") => {}
            _ => return Err(format!("{:?} is not a CDI kind (vendor.com/class)", self.kind)),
        }
        if let Some(bad) = self.ids.iter().find(|i| !word(i, "_.:-")) {
            return Err(format!("{bad:?} is not a CDI device name"));
        }
        Ok(())
    }

    /// How the request reads: `nvidia.com/gpu=0`, `2 × nvidia.com/gpu`, `nvidia.com/gpu=all`.
    pub fn describe(&self) -> String {
        match (self.ids.as_slice(), self.count) {
            ([], 0) => format!("{}=all", self.kind),
            ([], n) => format!("{n} × {}", self.kind),
            (ids, _) => ids.iter().map(|i| format!("{}={i}", self.kind)).collect::<Vec<_>>().join(", "),
        }
    }
}

impl DeviceMapping {
    /// Parses Docker's `--device` / compose `devices:` syntax: `HOST[:CONTAINER[:PERMISSIONS]]`.
    /// Paths and permissions are checked by [`Deployment::validate`].
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let (host, cont, perms) = match parts.as_slice() {
            [h] => (*h, *h, "rwm"),
            [h, c] => (*h, *c, "rwm"),
            [h, c, p] => (*h, *c, *p),
            _ => return None,
        };
        Some(DeviceMapping { host_path: host.into(), container_path: cont.into(), permissions: perms.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        let p = PortMapping::parse("127.0.0.1:8080:80/udp").unwrap();
        assert_eq!(
            (p.host_ip.as_deref(), p.host_port, p.container_port, p.protocol),
            (Some("127.0.0.1"), 8080, 80, Protocol::Udp)
        );
        assert_eq!(PortMapping::parse("8080:80").unwrap().protocol, Protocol::Tcp);
        assert_eq!(PortMapping::parse("80").unwrap().host_port, 80);
        for bad in ["", "a:b", "0:80", "8080:80/sctp", "1.2.3:80:80", "70000:80"] {
            assert!(PortMapping::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn devices() {
        let d = DeviceMapping::parse("/dev/video0").unwrap();
        assert_eq!(
            (d.host_path.as_str(), d.container_path.as_str(), d.permissions.as_str()),
            ("/dev/video0", "/dev/video0", "rwm")
        );
        let d = DeviceMapping::parse("/dev/ttyUSB0:/dev/tty0:r").unwrap();
        assert_eq!((d.container_path.as_str(), d.permissions.as_str()), ("/dev/tty0", "r"));
        assert!(DeviceMapping::parse("/a:/b:r:x").is_none());
    }

    #[test]
    fn restart_policy() {
        assert_eq!(RestartPolicy::parse("on-failure:3"), Some(RestartPolicy::OnFailure { max_retries: Some(3) }));
        let p = RestartPolicy::OnFailure { max_retries: Some(3) };
        assert!(p.should_restart(1, 2, false));
        assert!(!p.should_restart(1, 3, false));
        assert!(!p.should_restart(0, 0, false));
        assert!(RestartPolicy::Always.should_restart(0, 100, false));
        assert!(!RestartPolicy::Always.should_restart(1, 0, true));
        assert!(RestartPolicy::parse("sometimes").is_none());
        assert_eq!(RestartPolicy::parse("on-failure:3").unwrap().to_string(), "on-failure:3");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(restart_backoff_ms(0), 100);
        assert_eq!(restart_backoff_ms(1), 200);
        assert_eq!(restart_backoff_ms(3), 800);
        assert_eq!(restart_backoff_ms(30), 60_000);
    }

    #[test]
    fn wasm_headers_tell_modules_from_components() {
        assert_eq!(WasmKind::detect(b"\0asm\x01\0\0\0rest"), Some(WasmKind::Module));
        assert_eq!(WasmKind::detect(b"\0asm\x0d\0\x01\0"), Some(WasmKind::Component));
        assert_eq!(WasmKind::detect(b"\x7fELF\x02\x01\x01\0"), None);
        assert_eq!(WasmKind::detect(b"\0asm"), None);
    }

    #[test]
    fn cfs_quota() {
        let r = Resources { cpus_millis: Some(500), ..Default::default() };
        assert_eq!(r.cfs_quota_us(), Some(50_000));
    }
}
