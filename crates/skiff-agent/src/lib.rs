//! The node agent: keeps the instances of its desired deployments running.
//!
//! Architecture Invariant: desired state is persisted in `agent.db` before it is acted
//! on, and the agent needs nothing but its data directory to keep workloads running:
//! after a restart or a reboot it re-adopts live containers (same pids) and brings back
//! the ones that should run.
//! Architecture Invariant: the agent never schedules; it runs what it is given.
#![forbid(unsafe_code)]

pub mod admit;
pub mod cache;
pub mod detect;
pub mod devices;
mod exit;
mod exits;
#[cfg(test)]
mod fake;
mod gc;
mod health;
mod jobs;
pub mod join;
pub mod logs;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod proxy;
mod publish;
mod pull;
pub mod rebuild;
mod reconcile;
pub mod scrape;
pub mod session;
mod start;
pub mod state;
mod stop;
pub mod supervise;
pub mod tls;
mod trust;
pub mod tunnel;
pub mod update;

use skiff_image::ImageStore;
use skiff_model::metrics::MetricsSample;
use skiff_model::rollout;
use skiff_model::{Deployment, EventRecord, InstanceState, InstanceStatus, NetworkMode, RuntimeKind};
use skiff_runtime::nat::{Firewall, FirewallSetting, Nat};
use skiff_runtime::network::{veth_name, Bridge, Subnet};
use skiff_runtime::runc::ExecOutput;
use skiff_runtime::{OciRuntime, Runtime, WasmRuntime};
use skiff_sys::time::Clock;
use state::{InstanceRow, State};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Image(#[from] skiff_image::ImageError),
    #[error(transparent)]
    Runtime(#[from] skiff_runtime::RuntimeError),
    #[error(transparent)]
    Net(#[from] skiff_runtime::network::NetError),
    #[error("instance {0} not found")]
    NoInstance(String),
    #[error("{0}")]
    Other(String),
}

#[derive(Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub node_name: String,
    pub bridge_name: String,
    /// The pool each network's subnet on the bridge is cut from.
    pub subnet: String,
    /// The prefix of each network's subnet (`None`: the pool's default, see
    /// `Subnet::default_network_prefix`).
    pub network_prefix: Option<u8>,
    /// The `skiff` binary that runs shims.
    pub skiff_bin: PathBuf,
    /// How often every instance is looked at again though nothing said it changed (a
    /// safety net: exits, desired-state changes, health changes and pulls wake the loop).
    pub resync: Duration,
    /// How often what has no event is polled while it matters: a published port not yet
    /// answering, a shim that cannot be watched (no pidfd).
    pub poll: Duration,
    /// Automatic pruning of unused images when the disk fills up (`None`: never).
    pub image_gc: Option<skiff_image::GcPolicy>,
    /// How often the disk is checked against `image_gc`.
    pub image_gc_every: Duration,
    /// How images that are not in the store are pulled (`None`: they wait to be loaded).
    pub pull: Option<skiff_image::registry::PullOptions>,
    /// The address this node serves its site's image cache at (reported to the hub).
    pub cache_url: Option<String>,
    /// How often node and instances are sampled (CPU, memory, network, disk).
    pub metrics_every: Duration,
    /// Samples kept on disk until the hub acknowledges them (the newest win).
    pub metrics_buffer: usize,
    /// Refuse to start with a runc older than this (`--require-runc-min`).
    pub require_runc_min: Option<String>,
    /// What workloads may ask of this node (`--policy`, `/etc/skiff/policy.yaml`).
    pub policy: policy::Policy,
    /// What the agent reads the time from (the wall clock; in tests a `ManualClock`).
    pub clock: Arc<dyn Clock>,
    /// The runtime backends (`None`: runc and wasmtime under the data directory; tests
    /// give fakes).
    pub backends: Option<Backends>,
    /// What writes the bridge's outbound NAT (none: instances reach only this host).
    pub firewall: FirewallSetting,
    /// Where CDI device specs are read from, lowest priority first.
    pub cdi_dirs: Vec<PathBuf>,
    /// Runtime threat-detection rules (`None`: detection off; `skiff up` and `skiff agent`
    /// turn it on with the shipped rules unless `--no-detect`).
    pub detect: Option<Vec<detect::rules::Rule>>,
    /// The range services' virtual addresses come from (`--service-range`); `None`: the
    /// node offers no fleet services (no DNS of ours, no virtual addresses).
    pub services: Option<(std::net::Ipv4Addr, u8)>,
    /// Where other nodes' agents reach this one directly (`--mesh-advertise`), told to the
    /// hub.
    pub mesh_advertise: Option<String>,
    /// Below these the node reports DiskPressure or MemoryPressure and takes no new work.
    pub pressure: metrics::Floors,
}

impl AgentConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            data_dir: data_dir.into(),
            node_name: hostname(),
            bridge_name: "skiff0".into(),
            subnet: "10.213.0.0/20".into(),
            network_prefix: None,
            skiff_bin: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("skiff")),
            resync: Duration::from_secs(60),
            poll: Duration::from_millis(250),
            image_gc: Some(skiff_image::GcPolicy::default()),
            image_gc_every: Duration::from_secs(30),
            pull: None,
            cache_url: None,
            metrics_every: Duration::from_secs(15),
            // An hour at the default interval.
            metrics_buffer: 240,
            require_runc_min: None,
            clock: skiff_sys::time::system(),
            backends: None,
            firewall: FirewallSetting::auto(),
            cdi_dirs: skiff_runtime::cdi::DEFAULT_DIRS.iter().map(PathBuf::from).collect(),
            detect: None,
            policy: policy::Policy::default(),
            services: None,
            mesh_advertise: None,
            pressure: metrics::Floors::default(),
        }
    }
}

/// The node's DNS sockets (UDP, and TCP when it can be had).
type DnsSockets = (std::net::UdpSocket, Option<std::net::TcpListener>);

/// The node's DNS socket for its instances, on the bridge's gateway address (the bridge
/// made now if it is not there yet). A range that overlaps the bridge's subnet is an
/// error; a port 53 another program holds there only turns the node's DNS off.
fn open_dns(bridge: &Bridge, (net, prefix): (std::net::Ipv4Addr, u8)) -> Result<Option<DnsSockets>, AgentError> {
    let range = Subnet::parse(&format!("{net}/{prefix}"))?;
    if range.contains(bridge.subnet.base) || bridge.subnet.contains(range.base) {
        return Err(AgentError::Other(format!(
            "the service range {range} overlaps the bridge's subnet {}: give another with --service-range",
            bridge.subnet
        )));
    }
    bridge.ensure()?;
    let at = (bridge.subnet.gateway(), 53);
    match std::net::UdpSocket::bind(at).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
        Ok(s) => {
            // TCP too, for answers too long for UDP; without it, those fail.
            let tcp = std::net::TcpListener::bind(at).and_then(|l| l.set_nonblocking(true).map(|_| l));
            if let Err(e) = &tcp {
                warn!("the node's DNS for its instances answers over UDP only ({}:53/tcp: {e})", at.0);
            }
            Ok(Some((s, tcp.ok())))
        }
        Err(e) => {
            warn!(
                "the node's DNS for its instances is off ({}:53: {e}); they use the host's resolvers",
                bridge.subnet.gateway()
            );
            Ok(None)
        }
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "node".into())
}

/// What one reconcile pass leaves for the loop to wait for.
pub struct Agent {
    cfg: AgentConfig,
    node_id: String,
    /// Versions of what runs workloads (`runc`), found at start.
    versions: BTreeMap<String, String>,
    state: Mutex<State>,
    images: Arc<ImageStore>,
    runtimes: Backends,
    bridge: Bridge,
    /// The bridge's outbound NAT, written at start (with no firewall: the rules an earlier
    /// start may have left, removed then).
    nat: Nat,
    ports: tokio::sync::Mutex<publish::Ports>,
    /// Who is on which network of the bridge (enforced where the firewall is ours).
    lan: Mutex<Option<skiff_runtime::isolation::Lan>>,
    notify: Arc<Notify>,
    /// Container ids of the instances being stopped (by id, not name: a kept instance
    /// promoted to the name of one still stopping is not stopping).
    stopping: Mutex<HashSet<String>>,
    /// Operators' actions on single instances (name, container id, action), carried out
    /// at the start of the next pass, the only writer of rows they change.
    requests: Mutex<Vec<(String, String, skiff_model::proto::InstanceAction)>>,
    health: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Images being pulled, or whose last pull failed (and when to try again).
    pulls: Mutex<HashMap<String, PullState>>,
    sampler: metrics::Sampler,
    /// The names of workloads' own metrics to scrape and ship, and by container id the
    /// series last scraped (see [`scrape`]).
    scrape_names: Mutex<Vec<String>>,
    scraped: Mutex<HashMap<String, Vec<skiff_model::metrics::Series>>>,
    latest_metrics: Mutex<Option<MetricsSample>>,
    /// Image bytes by where they came from: hub, site cache, registry, reused on this node.
    image_bytes: [std::sync::atomic::AtomicU64; 4],
    /// Per deployment, the instances its published ports send traffic to (none until the
    /// loop has first judged it).
    serving: Mutex<Option<HashMap<String, Vec<String>>>>,
    /// Containers whose published port has answered once.
    answered: Mutex<HashSet<String>>,
    /// Containers whose failed update was reported.
    update_failed: Mutex<HashSet<String>>,
    /// Job errors already told (as events), so a pass does not repeat them.
    job_errors: Mutex<HashSet<String>>,
    /// Watches on running instances' shims: exits wake the loop.
    exits: exits::Exits,
    /// The /etc/hosts last written for each container (written again only on a change).
    hosts_written: Mutex<HashMap<String, String>>,
    /// Bumped when the state database changed ([`Agent::subscribe`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// WebAssembly programs (by content id) admission found runnable, and what they are.
    wasm_checked: Mutex<HashMap<String, &'static str>>,
    /// Image digests whose signatures the image policy accepted (`trust.rs`).
    trusted: Mutex<HashSet<String>>,
    /// Image digests the image policy warned about (one event each).
    warned: Mutex<HashSet<String>>,
    /// Instances a detection rule stopped (not started again by this agent).
    security_stopped: Mutex<HashSet<String>>,
    /// The threat detector, when it runs.
    detector: std::sync::OnceLock<detect::Detector>,
    /// The listener seccomp filters hand refused calls to (`<data>/seccomp.sock`), where
    /// the kernel and runc can: it answers them whether or not the detector runs.
    seccomp_listener: Option<detect::refused::Listener>,
    /// The hub's last word on the fleet's services (`mesh.json`), for `mesh::Mesh`.
    mesh_view: tokio::sync::watch::Sender<Arc<skiff_model::mesh::MeshView>>,
    /// The DNS socket on the gateway's address, bound at open (before any instance gets
    /// its resolv.conf) and taken by `mesh::Mesh::run`.
    dns_socket: Mutex<Option<DnsSockets>>,
    /// Whether instances on the bridge are given the node's DNS.
    dns: bool,
}

/// The node's runtime backends; each instance uses its deployment's.
#[derive(Clone)]
pub struct Backends {
    pub oci: Arc<dyn Runtime>,
    pub wasm: Arc<dyn Runtime>,
    pub runsc: Arc<dyn Runtime>,
}

impl Backends {
    fn of(&self, kind: RuntimeKind) -> Arc<dyn Runtime> {
        match kind {
            RuntimeKind::Oci => Arc::clone(&self.oci),
            RuntimeKind::Wasm => Arc::clone(&self.wasm),
            RuntimeKind::Runsc => Arc::clone(&self.runsc),
        }
    }
}

/// Whether gVisor runs on this machine: its version, or why not. Probed once per process
/// (a sandbox running `true`, about 0.1 s), when the agent opens.
pub fn runsc_status() -> &'static Result<String, String> {
    static STATUS: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    STATUS.get_or_init(|| skiff_runtime::runc::probe_runsc(skiff_runtime::runc::RUNSC_DEFAULT_PLATFORM))
}

/// Refuses a runc older than `min` (or one whose version is unknown).
fn check_runc(found: Option<&str>, min: &str) -> Result<(), AgentError> {
    let want = skiff_model::platform::version_key(min)
        .ok_or_else(|| AgentError::Other(format!("--require-runc-min: {min:?} is not a version (e.g. 1.2.8)")))?;
    let have = found.and_then(skiff_model::platform::version_key);
    match (found, have) {
        (_, Some(h)) if h >= want => Ok(()),
        (Some(v), _) => Err(AgentError::Other(format!(
            "runc {v} is older than {min}, the least --require-runc-min allows; upgrade runc (the distribution's \
             package, or a static build from github.com/opencontainers/runc/releases)"
        ))),
        (None, _) => Err(AgentError::Other(format!("--require-runc-min {min}: runc's version cannot be read"))),
    }
}

/// Versions of what runs workloads on this machine (`runc` → `1.1.5`).
pub fn runtime_versions() -> BTreeMap<String, String> {
    let runc = skiff_runtime::runc::Runc::new("");
    let mut v: BTreeMap<String, String> = runc.version().map(|v| ("runc".to_string(), v)).into_iter().collect();
    // The agent's own, for `skiff version`.
    v.insert("skiff".into(), env!("CARGO_PKG_VERSION").into());
    if let Ok(runsc) = runsc_status() {
        v.insert("runsc".into(), runsc.clone());
    }
    v
}

/// The runtimes this build offers (`wasm` needs the cargo feature).
pub fn runtimes() -> Vec<String> {
    let mut v = vec![RuntimeKind::Oci.to_string()];
    if skiff_runtime::wasm::AVAILABLE {
        v.push(RuntimeKind::Wasm.to_string());
    }
    if runsc_status().is_ok() {
        v.push(RuntimeKind::Runsc.to_string());
    }
    v
}

/// The longest a stopping instance's open connections are waited for.
pub(crate) const DRAIN: Duration = Duration::from_secs(5);

/// What a stopped instance's message says (`skiff stop INSTANCE`).
pub(crate) const HELD: &str = "stopped by request (skiff start runs it again)";

#[derive(Debug, Clone)]
pub(crate) enum PullState {
    Running,
    Failed { failures: u32, retry_at_ms: u64, error: String },
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Agent {
    pub fn open(mut cfg: AgentConfig) -> Result<Arc<Self>, AgentError> {
        // Every pull of this node meets the image rules of its policy.
        if let Some(pull) = cfg.pull.as_mut().filter(|_| !cfg.policy.image_policy.rules.is_empty()) {
            pull.policy = Some(Arc::clone(&cfg.policy.image_policy));
        }
        let data = &cfg.data_dir;
        std::fs::create_dir_all(data).map_err(|e| AgentError::Other(format!("creating {}: {e}", data.display())))?;
        // Before any container is made or `exec`ed into: runc needs it answering.
        let seccomp_listener = detect::refused::Listener::start(&data.join("seccomp.sock"));
        // gVisor is offered only where a sandbox runs (about 0.1 s to find out).
        if let Err(why) = runsc_status() {
            info!("the runsc runtime (gVisor) is not offered: {why}");
        }
        let versions = runtime_versions();
        if let Some(min) = &cfg.require_runc_min {
            check_runc(versions.get("runc").map(String::as_str), min)?;
        }
        if let Some(w) = versions.get("runc").and_then(|v| skiff_model::platform::runc_advisory(v)) {
            warn!("{w}");
        }
        // The bridge's flags are checked before agent.db is opened (and its old leases
        // adopted): a bad one changes nothing.
        let pool = Subnet::parse(&cfg.subnet)?;
        let network_prefix = cfg.network_prefix.unwrap_or_else(|| pool.default_network_prefix());
        if !(pool.prefix..=30).contains(&network_prefix) {
            return Err(AgentError::Other(format!(
                "--network-prefix: /{network_prefix} does not fit the pool {pool} (give /{} to /30)",
                pool.prefix
            )));
        }
        let (mut state, moved) = State::open_or_recover(&data.join("agent.db"), cfg.clock.now_ms())?;
        let images = Arc::new(ImageStore::open(data.join("images"))?);
        let runtimes = match &cfg.backends {
            Some(b) => b.clone(),
            None => Backends {
                oci: Arc::new(OciRuntime::new(data.join("instances"), data.join("runc"), &cfg.skiff_bin, "/skiff")?),
                wasm: Arc::new(WasmRuntime::new(data.join("wasm/instances"), data.join("wasm/cache"), &cfg.skiff_bin)?),
                runsc: Arc::new(OciRuntime::with_runc(
                    "runsc",
                    data.join("runsc/instances"),
                    skiff_runtime::runc::Runc::runsc(
                        data.join("runsc/state"),
                        skiff_runtime::runc::RUNSC_DEFAULT_PLATFORM,
                    ),
                    &cfg.skiff_bin,
                    "/skiff",
                )?),
            },
        };
        let rebuilt = match &moved {
            Some(_) => {
                let dirs: Vec<PathBuf> = RuntimeKind::ALL
                    .iter()
                    .flat_map(|k| {
                        let rt = runtimes.of(*k);
                        rt.known().into_iter().map(move |id| rt.instance_dir(&id))
                    })
                    .collect();
                Some(rebuild::rebuild(&mut state, rebuild::read_records(dirs))?)
            }
            None => None,
        };
        let adopted = state.adopt_old_leases()?;
        if adopted > 0 {
            info!(
                leases = adopted,
                "counted leases from before networks had subnets of their own on their first network"
            );
        }
        let node_id = match state.meta("node_id")? {
            Some(id) => id,
            None => {
                let id = skiff_sys::random::hex(4).map_err(|e| AgentError::Other(e.to_string()))?;
                state.set_meta("node_id", &id)?;
                id
            }
        };
        let bridge = Bridge { name: cfg.bridge_name.clone(), subnet: pool, network_prefix };
        let nat = Nat {
            bridge: bridge.name.clone(),
            subnet: bridge.subnet,
            firewall: cfg.firewall.firewall.unwrap_or(Firewall::Nft),
            services: cfg.services.and_then(|(net, prefix)| Subnet::parse(&format!("{net}/{prefix}")).ok()),
        };
        let dns_socket = match cfg.services {
            Some(range) => Some(open_dns(&bridge, range)?),
            None => None,
        }
        .flatten();
        let mesh_view = skiff_sys::regular::read(&data.join("mesh.json"), 16 << 20)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let notify = Arc::new(Notify::new());
        let agent = Arc::new(Agent {
            cfg,
            node_id,
            versions,
            state: Mutex::new(state),
            images,
            runtimes,
            bridge,
            nat,
            ports: Default::default(),
            lan: Default::default(),
            notify: Arc::clone(&notify),
            stopping: Default::default(),
            requests: Default::default(),
            health: Default::default(),
            pulls: Default::default(),
            sampler: Default::default(),
            scrape_names: Mutex::default(),
            scraped: Mutex::default(),
            latest_metrics: Default::default(),
            image_bytes: Default::default(),
            serving: Default::default(),
            answered: Default::default(),
            update_failed: Default::default(),
            job_errors: Default::default(),
            exits: exits::Exits::new(notify),
            hosts_written: Default::default(),
            changes: tokio::sync::watch::Sender::new(0),
            wasm_checked: Default::default(),
            trusted: Default::default(),
            warned: Default::default(),
            security_stopped: Default::default(),
            detector: Default::default(),
            seccomp_listener,
            mesh_view: tokio::sync::watch::Sender::new(Arc::new(mesh_view)),
            dns: dns_socket.is_some(),
            dns_socket: Mutex::new(dns_socket),
        });
        if let Some(rules) = agent.cfg.detect.clone() {
            match detect::Detector::start(&agent, rules) {
                Ok(d) => {
                    let _ = agent.detector.set(d);
                }
                Err(e) => warn!("runtime threat detection is off: the kernel's process events cannot be read: {e}"),
            }
        }
        if let (Some(aside), Some(r)) = (moved, rebuilt) {
            let msg = format!(
                "agent.db was unreadable and is kept as {}; rebuilt from the node: {} instance(s) of {} deployment(s) \
                 adopted, desired state from them until the hub sends the node's assignment",
                aside.display(),
                r.instances,
                r.deployments
            );
            agent.event(&agent.cfg.node_name, "StateRebuilt", &msg);
        }
        // The names to scrape, as the last assignment gave them (a restarted agent is not
        // sent its assignment again when nothing changed).
        let names = agent.db(|s| s.meta(scrape::NAMES_KEY)).ok().flatten();
        if let Some(names) = names.and_then(|n| serde_json::from_str::<Vec<String>>(&n).ok()) {
            agent.set_scraped_names(names);
        }
        Ok(agent)
    }

    /// Versions of what runs workloads (`runc` → `1.1.5`).
    /// Whether the image store holds `image` (a runnable one for this machine).
    pub fn has_image(&self, image: &str) -> bool {
        self.images.inspect(image).is_ok()
    }

    pub fn versions(&self) -> &BTreeMap<String, String> {
        &self.versions
    }

    /// The time by the agent's clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    pub fn images(&self) -> &Arc<ImageStore> {
        &self.images
    }

    fn db<T>(&self, f: impl FnOnce(&mut State) -> Result<T, state::StateError>) -> Result<T, AgentError> {
        let mut s = self.state.lock().map_err(|_| AgentError::Other("state lock poisoned".into()))?;
        let r = f(&mut s);
        let n = s.total_changes();
        if *self.changes.borrow() != n {
            self.changes.send_replace(n);
        }
        Ok(r?)
    }

    /// Changes whenever the node's state does (an instance, an event, the desired state):
    /// a watcher (`skiff get -w`) waits on it instead of polling.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn event(&self, object: &str, reason: &str, message: &str) {
        info!(object, reason, message, "event");
        let _ = self.db(|s| s.event(self.now_ms(), object, reason, message));
    }

    /// Unique per instance and template, so a replacement can run beside the old one.
    fn container_id(&self, instance: &str, template: &str) -> String {
        format!("{}-{instance}-{}", self.node_id, &template[..6.min(template.len())])
    }

    fn netns_name(&self, container_id: &str) -> String {
        format!("skiff-{container_id}")
    }

    /// Persists the new desired state, then wakes the reconcile loop.
    pub fn set_desired(&self, deployments: &[Deployment], revision: u64) -> Result<(), AgentError> {
        let all: Vec<(Deployment, Option<Vec<u32>>)> = deployments.iter().map(|d| (d.clone(), None)).collect();
        self.set_desired_slots(&all, revision)
    }

    pub fn desired(&self) -> Result<Vec<Deployment>, AgentError> {
        self.db(|s| s.desired())
    }

    /// Persists (fsync) a hub's assignment, with the names of the metrics to scrape, then
    /// acts on it.
    pub fn set_assignment(
        &self,
        deployments: &[(Deployment, Option<Vec<u32>>)],
        revision: u64,
        metrics: &[String],
        digest: Option<&str>,
    ) -> Result<(), AgentError> {
        self.db(|s| s.set_assignment(deployments, revision, Some(metrics), digest))?;
        self.set_scraped_names(metrics.to_vec());
        self.notify.notify_one();
        Ok(())
    }

    /// The revision to tell a hub this node holds: 0 when the names of the metrics to
    /// scrape were never stored with it (an agent from before them), so the hub sends
    /// the whole assignment again.
    pub fn hello_revision(&self) -> u64 {
        let names = self.db(|s| s.meta(scrape::NAMES_KEY)).ok().flatten();
        if names.is_none() {
            return 0;
        }
        self.desired_revision().unwrap_or(0)
    }

    /// The hub's digest of the assignment held, to say in the hello (none while the
    /// revision said is 0: the hub then sends the whole assignment).
    pub fn hello_digest(&self) -> Option<String> {
        if self.hello_revision() == 0 {
            return None;
        }
        self.db(|s| s.meta(state::DIGEST_KEY)).ok().flatten()
    }

    /// Persists (fsync) what a hub placed on this node, then acts on it.
    pub fn set_desired_slots(
        &self,
        deployments: &[(Deployment, Option<Vec<u32>>)],
        revision: u64,
    ) -> Result<(), AgentError> {
        self.db(|s| s.set_desired_slots(deployments, revision))?;
        self.notify.notify_one();
        Ok(())
    }

    /// Samples the node and its running instances; keeps the sample as the latest and
    /// on disk until the hub acknowledges it.
    fn sample_metrics(&self) -> Result<(), AgentError> {
        let rows = self.db(|s| s.instances())?;
        let stats: Vec<_> = rows
            .iter()
            .filter(|r| r.state == InstanceState::Running)
            .map(|r| (r, self.runtimes.of(r.spec.runtime).stats(&r.container_id), self.now_ms()))
            .collect();
        let running: Vec<metrics::Running<'_>> = stats
            .iter()
            .map(|(r, st, at)| metrics::Running {
                instance: &r.name,
                deployment: &r.deployment,
                container_id: &r.container_id,
                veth: (r.spec.network == NetworkMode::Bridge && r.ip.is_some())
                    .then(|| veth_name(&self.netns_name(&r.container_id))),
                restarts: r.restarts,
                started_at_ms: r.started_at_ms,
                cpu_usage_ns: st.cpu_usage_ns,
                memory_bytes: st.memory_bytes,
                read_at_ms: *at,
            })
            .collect();
        let now = self.now_ms();
        let bridge = &self.bridge.name;
        let net_dev = metrics::read_proc("/proc/net/dev");
        let sample = MetricsSample {
            node: self.cfg.node_name.clone(),
            time_ms: now,
            host: self.sampler.node(&self.cfg.data_dir, &net_dev, |n| n == bridge || n.starts_with("vsk")),
            instances: self
                .sampler
                .instances(&running, &net_dev)
                .into_iter()
                .zip(&running)
                .map(|(m, r)| skiff_model::metrics::InstanceMetrics { series: self.scraped(r.container_id), ..m })
                .collect(),
        };
        // Files of instances that ended are closed (those read in this round stay open).
        skiff_sys::kept::global().sweep();
        self.db(|s| s.push_metrics(&sample, self.cfg.metrics_buffer))?;
        if let Ok(mut l) = self.latest_metrics.lock() {
            *l = Some(sample);
        }
        Ok(())
    }

    /// How this agent pulls images it lacks (`None`: it does not).
    /// The threat detector's counters, when it runs.
    pub fn detect_stats(&self) -> Option<&Arc<detect::Stats>> {
        self.detector.get().map(|d| &d.stats)
    }

    pub fn pull_options(&self) -> Option<&skiff_image::registry::PullOptions> {
        self.cfg.pull.as_ref()
    }

    /// The newest sample of this node and its instances.
    pub fn latest_metrics(&self) -> Option<MetricsSample> {
        self.latest_metrics.lock().ok()?.clone()
    }

    /// Counts a pull's bytes by where they came from.
    pub(crate) fn count_image_bytes(&self, rep: &skiff_image::registry::PullReport) {
        use std::sync::atomic::Ordering::Relaxed;
        let b = &self.image_bytes;
        if rep.endpoint == "hub" {
            b[0].fetch_add(rep.bytes_received.saturating_sub(rep.bytes_from_cache), Relaxed);
            b[1].fetch_add(rep.bytes_from_cache, Relaxed);
        } else {
            b[2].fetch_add(rep.bytes_received, Relaxed);
        }
        b[3].fetch_add(rep.bytes_reused, Relaxed);
    }

    /// `skiff_image_bytes_total{source}` in the text exposition format.
    pub fn image_bytes_text(&self) -> String {
        let mut out = String::from(
            "# HELP skiff_image_bytes Image bytes this node pulled, by source (reused: taken from layers it held).\n\
             # TYPE skiff_image_bytes counter\n",
        );
        for (source, n) in ["hub", "site_cache", "registry", "reused"].iter().zip(&self.image_bytes) {
            let n = n.load(std::sync::atomic::Ordering::Relaxed);
            out.push_str(&format!(
                "skiff_image_bytes_total{{node=\"{}\",source=\"{source}\"}} {n}\n",
                self.cfg.node_name
            ));
        }
        out
    }

    /// What keeps the node from taking new work, by its newest sample (see
    /// [`metrics::pressure`]); read where the sample is kept, without copying it.
    pub fn pressure(&self) -> Vec<String> {
        let latest = self.latest_metrics.lock();
        latest.ok().and_then(|m| m.as_ref().map(|m| metrics::pressure(&m.host, &self.cfg.pressure))).unwrap_or_default()
    }

    /// Samples not yet acknowledged by the hub and after id `sent`, oldest first.
    pub fn unshipped_metrics(&self, sent: u64, limit: usize) -> Result<Vec<(u64, MetricsSample)>, AgentError> {
        self.db(|s| {
            let acked = s.meta("metrics_shipped")?.and_then(|v| v.parse().ok()).unwrap_or(0);
            s.metrics_since(acked.max(sent), limit)
        })
    }

    pub fn metrics_shipped(&self, id: u64) -> Result<(), AgentError> {
        self.db(|s| s.set_meta("metrics_shipped", &id.to_string()))
    }

    /// Events not yet shipped to the hub (after the last acknowledged id), oldest first.
    pub fn unshipped_events(&self, limit: usize) -> Result<Vec<(u64, EventRecord)>, AgentError> {
        self.db(|s| {
            let acked = s.meta("events_shipped")?.and_then(|v| v.parse().ok()).unwrap_or(0);
            s.events_since(acked, limit)
        })
    }

    /// Records that the hub has stored every event up to `id`.
    pub fn events_shipped(&self, id: u64) -> Result<(), AgentError> {
        self.db(|s| s.set_meta("events_shipped", &id.to_string()))
    }

    /// The revision of the desired state last persisted (0: none yet).
    pub fn desired_revision(&self) -> Result<u64, AgentError> {
        self.db(|s| s.desired_revision())
    }

    pub fn events(&self, limit: usize) -> Result<Vec<EventRecord>, AgentError> {
        self.db(|s| s.events(limit))
    }

    pub fn instances(&self) -> Result<Vec<InstanceStatus>, AgentError> {
        let rows = self.db(|s| s.instances())?;
        Ok(rows.iter().map(|r| self.status_of(r)).collect())
    }

    fn status_of(&self, r: &InstanceRow) -> InstanceStatus {
        InstanceStatus {
            name: r.name.clone(),
            deployment: r.deployment.clone(),
            node: self.cfg.node_name.clone(),
            container_id: r.container_id.clone(),
            state: r.state,
            health: r.health,
            pid: r.pid.filter(|p| *p > 0 && r.state == InstanceState::Running),
            ip: r.ip.clone(),
            networks: r.addresses.iter().map(|(n, a)| (n.clone(), a.to_string())).collect(),
            restarts: r.restarts,
            exit_code: r.exit_code,
            oom_killed: r.oom_killed,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            message: r.message.clone(),
            image: r.spec.image.clone(),
            ports: r.spec.ports.iter().map(|p| p.to_string()).collect(),
            template: rollout::template_hash(&r.spec),
            retiring: r.retiring,
        }
    }

    fn row(&self, instance: &str) -> Result<InstanceRow, AgentError> {
        self.db(|s| s.instance(instance))?.ok_or_else(|| AgentError::NoInstance(instance.into()))
    }

    /// The log file of an instance.
    /// The instance's row, if it is running (exec and its sessions need a live process).
    pub(crate) fn running_row(&self, instance: &str) -> Result<InstanceRow, AgentError> {
        let row = self.row(instance)?;
        if row.state != InstanceState::Running {
            return Err(AgentError::Runtime(skiff_runtime::RuntimeError::NotRunning(instance.into())));
        }
        Ok(row)
    }

    pub fn log_path(&self, instance: &str) -> Result<PathBuf, AgentError> {
        let row = self.row(instance)?;
        Ok(self.runtimes.of(row.spec.runtime).log_path(&row.container_id))
    }

    pub fn has_instance(&self, instance: &str) -> bool {
        matches!(self.db(|s| s.instance(instance)), Ok(Some(_)))
    }

    /// The instance's log: the last `tail` lines, then (with `follow`) new ones as they
    /// come, until the instance's container is gone (removed, or replaced by a new one of
    /// the same name, which the hub follows anew) or the receiver is dropped.
    pub fn log_stream(
        self: &Arc<Self>,
        instance: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<skiff_model::LogLine>, AgentError> {
        let row = self.row(instance)?;
        let path = self.runtimes.of(row.spec.runtime).log_path(&row.container_id);
        let (me, name, id) = (Arc::clone(self), instance.to_string(), row.container_id);
        let alive = move || matches!(me.db(|s| s.instance(&name)), Ok(Some(r)) if r.container_id == id);
        Ok(logs::stream(path, tail, follow, alive))
    }

    /// Runs `argv` in the instance; its output as text.
    pub async fn exec_result(
        &self,
        instance: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<skiff_model::proto::ExecResult, AgentError> {
        let out = self.exec(instance, argv, timeout).await?;
        Ok(skiff_model::proto::ExecResult {
            code: out.code,
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        })
    }

    pub async fn exec(&self, instance: &str, argv: Vec<String>, timeout: Duration) -> Result<ExecOutput, AgentError> {
        let row = self.running_row(instance)?;
        let rt = self.runtimes.of(row.spec.runtime);
        Ok(blocking(move || rt.exec(&row.container_id, &argv, timeout)).await?)
    }

    /// Whether every instance of these deployments is gone (after they were deleted).
    pub fn all_gone(&self, deployments: &[String]) -> bool {
        self.db(|s| s.instances())
            .map(|rows| !rows.iter().any(|r| deployments.contains(&r.deployment)))
            .unwrap_or(false)
    }
}

/// The instance whose network an instance of `network: service` shares: the named
/// deployment's instance of the same number (never a stateful set's: the hub refuses it).
pub(crate) fn network_owner(r: &InstanceRow) -> String {
    format!("{}-{}", r.spec.network_service.as_deref().unwrap_or_default(), slot_of(r).unwrap_or(1))
}

/// The names an instance answers to beside its own and its deployment's: a stateful set's
/// through its governing service (`web-0.nginx`, ….svc.cluster.local).
pub(crate) fn stable_names(r: &InstanceRow) -> Vec<String> {
    slot_of(r).filter(|_| !r.retiring).map(|s| r.spec.stable_names(s)).unwrap_or_default()
}

/// The slot an instance fills: `web-2` and, while it retires, `web-2-<tag>` (a stateful
/// set's `web-1` fills slot 2).
pub(crate) fn slot_of(r: &InstanceRow) -> Option<u32> {
    r.spec.slot_named(&r.name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_old_runc_is_refused_when_a_minimum_is_asked() {
        assert!(super::check_runc(Some("1.2.8"), "1.2.8").is_ok());
        assert!(super::check_runc(Some("1.3.3"), "1.2.8").is_ok());
        let e = super::check_runc(Some("1.1.5"), "1.2.8").unwrap_err().to_string();
        assert!(e.contains("runc 1.1.5 is older than 1.2.8"), "{e}");
        assert!(super::check_runc(None, "1.2.8").is_err());
        assert!(super::check_runc(Some("1.2.8"), "soon").unwrap_err().to_string().contains("not a version"));
    }

    #[test]
    fn failed_pulls_back_off_from_5_s_to_5_min() {
        let waits: Vec<u64> = (1..=8).map(|f| crate::pull::pull_backoff_ms(f) / 1000).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
    }
}
