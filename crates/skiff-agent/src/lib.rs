//! The node agent: keeps the instances of its desired deployments running.
//!
//! Architecture Invariant: desired state is persisted in `agent.db` before it is acted
//! on, and the agent needs nothing but its data directory to keep workloads running:
//! after a restart or a reboot it re-adopts live containers (same pids) and brings back
//! the ones that should run.
//! Architecture Invariant: the agent never schedules; it runs what it is given.
#![forbid(unsafe_code)]

pub mod admit;
mod exits;
pub mod join;
pub mod logs;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod rebuild;
pub mod state;
pub mod supervise;
pub mod tls;
pub mod tunnel;
pub mod update;

use proxy::{PortKey, Proxies};
use skiff_image::{ImageStore, Target};
use skiff_model::metrics::MetricsSample;
use skiff_model::rollout;
use skiff_model::{
    Deployment, EventRecord, Health, InstanceState, InstanceStatus, NetworkMode, RuntimeKind, VolumeSource,
};
use skiff_runtime::network::{list_netns, netns_path, veth_name, Bridge, Subnet};
use skiff_runtime::runc::ExecOutput;
use skiff_runtime::time::now_ms;
use skiff_runtime::{CreateRequest, Liveness, OciRuntime, Runtime, WasmRuntime};
use state::{InstanceRow, State};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use supervise::{after_exit, after_probe, unmet_dependency, AfterExit, Peer};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

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
    pub subnet: String,
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
    /// How often node and instances are sampled (CPU, memory, network, disk).
    pub metrics_every: Duration,
    /// Samples kept on disk until the hub acknowledges them (the newest win).
    pub metrics_buffer: usize,
    /// Refuse to start with a runc older than this (`--require-runc-min`).
    pub require_runc_min: Option<String>,
    /// What workloads may ask of this node (`--policy`, `/etc/skiff/policy.yaml`).
    pub policy: policy::Policy,
}

impl AgentConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            data_dir: data_dir.into(),
            node_name: hostname(),
            bridge_name: "skiff0".into(),
            subnet: "10.213.0.0/20".into(),
            skiff_bin: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("skiff")),
            resync: Duration::from_secs(60),
            poll: Duration::from_millis(250),
            image_gc: Some(skiff_image::GcPolicy::default()),
            image_gc_every: Duration::from_secs(30),
            pull: None,
            metrics_every: Duration::from_secs(15),
            // An hour at the default interval.
            metrics_buffer: 240,
            require_runc_min: None,
            policy: policy::Policy::default(),
        }
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "node".into())
}

/// What one reconcile pass leaves for the loop to wait for.
struct Pass {
    /// When the next delayed start (restart back-off, pull retry) is due.
    next_start_ms: Option<u64>,
    /// Whether something must be polled soon (a new instance's port not answering yet).
    poll: bool,
}

pub struct Agent {
    cfg: AgentConfig,
    node_id: String,
    /// Versions of what runs workloads (`runc`), found at start.
    versions: BTreeMap<String, String>,
    state: Mutex<State>,
    images: Arc<ImageStore>,
    runtimes: Runtimes,
    bridge: Bridge,
    proxies: tokio::sync::Mutex<Proxies>,
    notify: Arc<Notify>,
    stopping: Mutex<HashSet<String>>,
    health: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Images being pulled, or whose last pull failed (and when to try again).
    pulls: Mutex<HashMap<String, PullState>>,
    sampler: metrics::Sampler,
    latest_metrics: Mutex<Option<MetricsSample>>,
    /// Per deployment, the instances its published ports send traffic to.
    serving: Mutex<HashMap<String, Vec<String>>>,
    /// Containers whose published port has answered once.
    answered: Mutex<HashSet<String>>,
    /// Containers whose failed update was reported.
    update_failed: Mutex<HashSet<String>>,
    /// Watches on running instances' shims: exits wake the loop.
    exits: exits::Exits,
    /// The /etc/hosts last written for each container (written again only on a change).
    hosts_written: Mutex<HashMap<String, String>>,
    /// Bumped when the state database changed ([`Agent::subscribe`]).
    changes: tokio::sync::watch::Sender<u64>,
}

/// The node's runtime backends; each instance uses its deployment's.
struct Runtimes {
    oci: Arc<dyn Runtime>,
    wasm: Arc<dyn Runtime>,
}

impl Runtimes {
    fn of(&self, kind: RuntimeKind) -> Arc<dyn Runtime> {
        match kind {
            RuntimeKind::Oci => Arc::clone(&self.oci),
            RuntimeKind::Wasm => Arc::clone(&self.wasm),
        }
    }
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
    runc.version().map(|v| ("runc".to_string(), v)).into_iter().collect()
}

/// The runtimes this build offers (`wasm` needs the cargo feature).
pub fn runtimes() -> Vec<String> {
    let mut v = vec![RuntimeKind::Oci.to_string()];
    if skiff_runtime::wasm::AVAILABLE {
        v.push(RuntimeKind::Wasm.to_string());
    }
    v
}

/// The longest a stopping instance's open connections are waited for.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum PullState {
    Running,
    Failed { failures: u32, retry_at_ms: u64, error: String },
}

/// Wait after the `failures`-th failed pull of an image: 5 s doubling to 5 min.
fn pull_backoff_ms(failures: u32) -> u64 {
    (5_000u64 << failures.saturating_sub(1).min(6)).min(300_000)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Agent {
    pub fn open(cfg: AgentConfig) -> Result<Arc<Self>, AgentError> {
        let data = &cfg.data_dir;
        std::fs::create_dir_all(data).map_err(|e| AgentError::Other(format!("creating {}: {e}", data.display())))?;
        let oci = OciRuntime::new(data.join("instances"), data.join("runc"), &cfg.skiff_bin, "/skiff")?;
        let versions = runtime_versions();
        if let Some(min) = &cfg.require_runc_min {
            check_runc(versions.get("runc").map(String::as_str), min)?;
        }
        if let Some(w) = versions.get("runc").and_then(|v| skiff_model::platform::runc_advisory(v)) {
            warn!("{w}");
        }
        let (mut state, moved) = State::open_or_recover(&data.join("agent.db"), now_ms())?;
        let images = Arc::new(ImageStore::open(data.join("images"))?);
        let runtimes = Runtimes {
            oci: Arc::new(oci),
            wasm: Arc::new(WasmRuntime::new(data.join("wasm/instances"), data.join("wasm/cache"), &cfg.skiff_bin)?),
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
        let node_id = match state.meta("node_id")? {
            Some(id) => id,
            None => {
                let id = skiff_sys::random::hex(4).map_err(|e| AgentError::Other(e.to_string()))?;
                state.set_meta("node_id", &id)?;
                id
            }
        };
        let bridge = Bridge { name: cfg.bridge_name.clone(), subnet: Subnet::parse(&cfg.subnet)? };
        let notify = Arc::new(Notify::new());
        let agent = Arc::new(Agent {
            cfg,
            node_id,
            versions,
            state: Mutex::new(state),
            images,
            runtimes,
            bridge,
            proxies: Default::default(),
            notify: Arc::clone(&notify),
            stopping: Default::default(),
            health: Default::default(),
            pulls: Default::default(),
            sampler: Default::default(),
            latest_metrics: Default::default(),
            serving: Default::default(),
            answered: Default::default(),
            update_failed: Default::default(),
            exits: exits::Exits::new(notify),
            hosts_written: Default::default(),
            changes: tokio::sync::watch::Sender::new(0),
        });
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
        Ok(agent)
    }

    /// Versions of what runs workloads (`runc` → `1.1.5`).
    pub fn versions(&self) -> &BTreeMap<String, String> {
        &self.versions
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
        let _ = self.db(|s| s.event(now_ms(), object, reason, message));
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
            .map(|r| (r, self.runtimes.of(r.spec.runtime).stats(&r.container_id), now_ms()))
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
        let now = now_ms();
        let bridge = &self.bridge.name;
        let net_dev = metrics::read_proc("/proc/net/dev");
        let sample = MetricsSample {
            node: self.cfg.node_name.clone(),
            time_ms: now,
            host: self.sampler.node(&self.cfg.data_dir, &net_dev, |n| n == bridge || n.starts_with("vsk")),
            instances: self.sampler.instances(&running, &net_dev),
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
    pub fn pull_options(&self) -> Option<&skiff_image::registry::PullOptions> {
        self.cfg.pull.as_ref()
    }

    /// The newest sample of this node and its instances.
    pub fn latest_metrics(&self) -> Option<MetricsSample> {
        self.latest_metrics.lock().ok()?.clone()
    }

    /// What keeps the node from taking new work, by its newest sample (see
    /// [`metrics::pressure`]); read where the sample is kept, without copying it.
    pub fn pressure(&self) -> Vec<String> {
        let latest = self.latest_metrics.lock();
        latest.ok().and_then(|m| m.as_ref().map(|m| metrics::pressure(&m.host))).unwrap_or_default()
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
    pub fn log_path(&self, instance: &str) -> Result<PathBuf, AgentError> {
        let row = self.row(instance)?;
        Ok(self.runtimes.of(row.spec.runtime).log_path(&row.container_id))
    }

    pub fn has_instance(&self, instance: &str) -> bool {
        matches!(self.db(|s| s.instance(instance)), Ok(Some(_)))
    }

    /// The instance's log: the last `tail` lines, then (with `follow`) new ones as they
    /// come, until the instance is gone or the receiver is dropped.
    pub fn log_stream(
        self: &Arc<Self>,
        instance: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<skiff_model::LogLine>, AgentError> {
        let path = self.log_path(instance)?;
        let (me, name) = (Arc::clone(self), instance.to_string());
        Ok(logs::stream(path, tail, follow, move || me.has_instance(&name)))
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
        let row = self.row(instance)?;
        if row.state != InstanceState::Running {
            return Err(AgentError::Runtime(skiff_runtime::RuntimeError::NotRunning(instance.into())));
        }
        let rt = self.runtimes.of(row.spec.runtime);
        Ok(blocking(move || rt.exec(&row.container_id, &argv, timeout)).await?)
    }

    /// Re-adopts what survived, removes leftovers, then reconciles until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), AgentError> {
        self.adopt().await?;
        let start = tokio::time::Instant::now();
        let (mut next_gc, mut next_sample, mut next_resync) = (start, start, start + self.cfg.resync);
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_gc {
                next_gc = now + self.cfg.image_gc_every;
                self.prune_images().await;
                let freed = self.prune_wasm_cache().await;
                if freed > 0 {
                    debug!(freed, "compiled wasm programs removed");
                }
            }
            if now >= next_sample {
                next_sample = now + self.cfg.metrics_every;
                let me = Arc::clone(&self);
                if let Err(e) = blocking(move || me.sample_metrics()).await {
                    warn!(error = %e, "sampling metrics failed");
                }
            }
            let full = now >= next_resync;
            if full {
                next_resync = now + self.cfg.resync;
            }
            // Sleep until the first of: the next due start, the next poll if something
            // must be polled, the periodic work; an event (exit, new desired state, health
            // change, finished pull or stop) wakes the loop before that.
            let mut due = next_gc.min(next_sample).min(next_resync);
            match self.reconcile(full).await {
                Ok(pass) => {
                    if let Some(at) = pass.next_start_ms {
                        let after = Duration::from_millis(at.saturating_sub(now_ms()));
                        due = due.min(tokio::time::Instant::now() + after);
                    }
                    if pass.poll || self.exits.any_unwatched() {
                        due = due.min(tokio::time::Instant::now() + self.cfg.poll);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reconcile failed");
                    due = due.min(tokio::time::Instant::now() + self.cfg.poll);
                }
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
        for (_, h) in self.health.lock().map(|mut m| std::mem::take(&mut *m)).unwrap_or_default() {
            h.abort();
        }
        self.exits.clear();
        Ok(())
    }

    /// Prunes unused images when the disk is above the high-water mark; images of desired
    /// deployments and of every instance still on the node (an old version being replaced
    /// runs on its layers) are never removed.
    pub async fn prune_images(self: &Arc<Self>) -> Option<skiff_image::Pruned> {
        let policy = self.cfg.image_gc?;
        let mut in_use: std::collections::BTreeSet<String> =
            self.db(|s| s.desired()).ok()?.into_iter().map(|d| d.image).collect();
        in_use.extend(self.db(|s| s.instances()).ok()?.into_iter().map(|r| r.spec.image));
        let images = Arc::clone(&self.images);
        match blocking(move || images.prune_to_watermark(&policy, &in_use)).await {
            Ok(Some(p)) => {
                let msg = format!(
                    "disk {:.0}% used (high-water mark {}%): removed {} unused image(s) [{}], freed {}; now {:.0}%",
                    p.used_percent_before,
                    policy.high_percent,
                    p.removed.len(),
                    p.removed.join(", "),
                    skiff_model::format_bytes(p.freed_bytes),
                    p.used_percent_after
                );
                info!("{msg}");
                self.event(&self.cfg.node_name, "ImagesPruned", &msg);
                Some(p)
            }
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "image pruning failed");
                None
            }
        }
    }

    /// Removes compiled WebAssembly programs that no desired deployment or instance runs,
    /// and those of another wasmtime build (after an upgrade). Returns the bytes freed.
    pub async fn prune_wasm_cache(self: &Arc<Self>) -> u64 {
        let (Ok(desired), Ok(rows)) = (self.db(|s| s.desired()), self.db(|s| s.instances())) else { return 0 };
        let wasm: Vec<Deployment> = desired
            .into_iter()
            .chain(rows.into_iter().map(|r| r.spec))
            .filter(|d| d.runtime == RuntimeKind::Wasm)
            .collect();
        let me = Arc::clone(self);
        blocking(move || {
            let keep: HashSet<String> = wasm
                .iter()
                .filter_map(|d| {
                    let info = me.images.inspect_for(&d.image, Target::Wasm).ok()?;
                    me.wasm_module(d, &info).ok().map(|m| m.id)
                })
                .collect();
            skiff_runtime::wasm::prune_cache(&me.cfg.data_dir.join("wasm/cache"), |id| keep.contains(id))
        })
        .await
    }

    async fn adopt(self: &Arc<Self>) -> Result<(), AgentError> {
        let bridge = self.bridge.clone();
        blocking(move || bridge.ensure()).await?;
        let _ = self.images.clean_tmp();
        let rows = self.db(|s| s.instances())?;
        let mine: HashSet<String> = rows.iter().map(|r| r.container_id.clone()).collect();
        let prefix = format!("{}-", self.node_id);
        for kind in RuntimeKind::ALL {
            let rt = self.runtimes.of(kind);
            let leftovers: Vec<String> =
                rt.known().into_iter().filter(|id| id.starts_with(&prefix) && !mine.contains(id)).collect();
            for id in leftovers {
                info!(container = %id, runtime = %kind, "removing leftover instance");
                let rt = Arc::clone(&rt);
                let _ = blocking(move || rt.remove(&id)).await;
            }
        }
        let ns_prefix = format!("skiff-{}-", self.node_id);
        for ns in list_netns(&ns_prefix) {
            if !mine.iter().any(|id| self.netns_name(id) == ns) {
                self.bridge.detach(&ns);
            }
        }
        for r in rows.iter().filter(|r| r.state == InstanceState::Running) {
            let rt = self.runtimes.of(r.spec.runtime);
            let id = r.container_id.clone();
            if let Liveness::Running { pid } = blocking(move || rt.liveness(&id)).await {
                info!(instance = %r.name, pid, "re-adopted running instance");
                if pid > 0 && r.pid != Some(pid) {
                    // A rebuilt row has no pid yet; watched from here, it is not asked again.
                    let name = r.name.clone();
                    self.update_row(&name, |row| (row.pid != Some(pid)).then(|| row.pid = Some(pid)))?;
                }
                self.start_health(r);
                self.watch_exit(r).await;
            }
        }
        Ok(())
    }

    /// One pass. `full` looks at every running instance; otherwise only at those whose
    /// shim ended or cannot be watched.
    async fn reconcile(self: &Arc<Self>, full: bool) -> Result<Pass, AgentError> {
        let now = now_ms();
        let desired_slots = self.db(|s| s.desired_slots())?;
        let desired: BTreeMap<&str, (&Deployment, &Vec<u32>)> =
            desired_slots.iter().map(|(d, i)| (d.name.as_str(), (d, i))).collect();
        let rows = self.db(|s| s.instances())?;
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();

        // Instances of deployments this node no longer runs.
        for r in rows.iter().filter(|r| !desired.contains_key(r.deployment.as_str())) {
            self.spawn_stop(r, &stopping, false);
        }

        // Observe running instances: those whose shim ended (or is not watched).
        for r in rows.iter().filter(|r| r.state == InstanceState::Running && !stopping.contains(&r.name)) {
            if !full && self.exits.quiet(&r.container_id) {
                continue;
            }
            let rt = self.runtimes.of(r.spec.runtime);
            let id = r.container_id.clone();
            let live = blocking(move || rt.liveness(&id)).await;
            if !matches!(live, Liveness::Running { .. }) {
                self.exits.forget(&r.container_id);
            }
            match live {
                Liveness::Running { pid } => {
                    if pid > 0 && r.pid != Some(pid) {
                        let mut r = r.clone();
                        r.pid = Some(pid);
                        self.db(|s| s.put_instance(&r))?;
                    }
                    if !self.exits.quiet(&r.container_id) {
                        self.watch_exit(r).await;
                    }
                }
                Liveness::Exited(exit) => {
                    let r = self.on_exit(r.clone(), exit, now, None);
                    self.db(|s| s.put_instance(&r))?;
                }
                Liveness::Gone => {
                    let exit = skiff_model::ExitStatus {
                        code: 255,
                        signal: None,
                        oom_killed: false,
                        finished_at_ms: now,
                        message: None,
                    };
                    let cause = "container lost (node rebooted or its shim was killed)";
                    let r = self.on_exit(r.clone(), exit, now, Some(("Lost", cause)));
                    self.db(|s| s.put_instance(&r))?;
                }
            }
        }
        let poll = self.observe_readiness(now, full).await?;

        // Updates: which old instances stay beside their replacements, which stop, and
        // which serve the published ports.
        let rows = self.db(|s| s.instances())?;
        let mut serving = HashMap::new();
        for (name, (d, slots)) in &desired {
            let wanted = rollout::template_hash(d);
            let insts: Vec<update::Inst> = rows
                .iter()
                .filter(|r| r.deployment == *name)
                .filter_map(|r| {
                    let tpl = rollout::template_hash(&r.spec);
                    Some(update::Inst {
                        name: r.name.clone(),
                        slot: slot_of(r)?,
                        tag: tpl[..6].to_string(),
                        current: tpl == wanted,
                        retiring: r.retiring,
                        state: r.state,
                        health: r.health,
                        restarts: r.restarts,
                        ready_since_ms: r.ready_since_ms,
                        retire_at_ms: r.retire_at_ms,
                        stopping: stopping.contains(&r.name),
                    })
                })
                .collect();
            let image_present = self.images.inspect_for(&d.image, Target::from(d.runtime)).is_ok();
            let inp = update::Input { deployment: name, cfg: &d.update, slots, image_present, now };
            let plan = update::plan(&inp, &insts);
            // Serving names as they are once renames below are done.
            let mut names = plan.serving;
            for a in &plan.actions {
                if let update::Action::Retire { name, to } | update::Action::Promote { name, to } = a {
                    names.iter_mut().filter(|n| *n == name).for_each(|n| n.clone_from(to));
                }
            }
            serving.insert(name.to_string(), names);
            for a in plan.actions {
                self.act(d, a, &rows, &stopping)?;
            }
        }
        if let Ok(mut s) = self.serving.lock() {
            *s = serving;
        }

        // Create rows for slots without a primary instance.
        let rows = self.db(|s| s.instances())?;
        let names: HashSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        for (d, slots) in desired.values() {
            for &i in slots.iter() {
                let name = d.instance_name(i);
                if names.contains(name.as_str()) {
                    continue;
                }
                let tpl = rollout::template_hash(d);
                let id = self.container_id(&name, &tpl);
                let row = InstanceRow::pending(name, d.name.clone(), id, (*d).clone());
                self.db(|s| s.put_instance(&row))?;
            }
        }

        // Start what is due and allowed.
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();
        let rows = self.db(|s| s.instances())?;
        for r in &rows {
            let due = matches!(r.state, InstanceState::Pending | InstanceState::Restarting)
                && r.next_start_ms.is_none_or(|t| t <= now);
            if !due || stopping.contains(&r.name) || !desired.contains_key(r.deployment.as_str()) {
                continue;
            }
            let peers: Vec<Peer<'_>> = rows
                .iter()
                .filter(|p| p.spec.stack == r.spec.stack)
                .map(|p| Peer {
                    deployment: &p.deployment,
                    state: p.state,
                    health: p.health,
                    has_healthcheck: p.spec.healthcheck.is_some(),
                    exit_code: p.exit_code,
                })
                .collect();
            if let Some(wait) = unmet_dependency(&r.spec, &peers) {
                if r.message.as_deref() != Some(&wait) {
                    let mut r = r.clone();
                    r.message = Some(wait);
                    self.db(|s| s.put_instance(&r))?;
                }
                continue;
            }
            self.start_instance(r.clone()).await?;
        }

        self.sync_hosts_and_ports().await?;
        let rows = self.db(|s| s.instances())?;
        let next_start_ms = rows
            .iter()
            .filter(|r| matches!(r.state, InstanceState::Pending | InstanceState::Restarting))
            .filter_map(|r| r.next_start_ms)
            .min();
        Ok(Pass { next_start_ms, poll })
    }

    /// Watches the instance's shim so that its end wakes the loop (or, if it cannot be
    /// watched, marks it for polling).
    async fn watch_exit(self: &Arc<Self>, r: &InstanceRow) {
        let rt = self.runtimes.of(r.spec.runtime);
        let id = r.container_id.clone();
        let (rt2, id2) = (Arc::clone(&rt), id.clone());
        match blocking(move || rt2.watch_pid(&id2)).await {
            Some(pid) => {
                self.exits.watch(&id, pid, || rt.watch_pid(&id) == Some(pid));
            }
            None => self.exits.poll_instead(&id),
        }
    }

    /// Marks running instances ready (healthy if probed, first published TCP port
    /// answering) or not, keeping the time they became ready. Returns whether a port is
    /// worth polling soon: an instance started in the last minute whose port does not
    /// answer yet (later ones are looked at on the resync).
    async fn observe_readiness(&self, now: u64, full: bool) -> Result<bool, AgentError> {
        let ready = |row: &InstanceRow, answers: bool| {
            answers && row.state == InstanceState::Running && matches!(row.health, None | Some(Health::Healthy))
        };
        let mut poll = false;
        for r in self.db(|s| s.instances())? {
            let running = r.state == InstanceState::Running;
            let recent = r.started_at_ms.is_some_and(|t| now.saturating_sub(t) < 60_000);
            let answers = running && (recent || full || self.port_answered(&r)) && self.port_answers(&r).await;
            poll |= running && recent && !answers;
            // Written only on a change, re-checked under the lock (a probe may have moved).
            if ready(&r, answers) == r.ready_since_ms.is_some() {
                continue;
            }
            let id = r.container_id;
            self.update_row(&r.name, |row| {
                let since =
                    if row.container_id == id && ready(row, answers) { row.ready_since_ms.or(Some(now)) } else { None };
                (since != row.ready_since_ms).then(|| row.ready_since_ms = since)
            })?;
        }
        Ok(poll)
    }

    /// Whether the instance's published port answered once (or it has none to ask).
    fn port_answered(&self, r: &InstanceRow) -> bool {
        !r.spec.ports.iter().any(|p| p.protocol == skiff_model::Protocol::Tcp)
            || r.ip.is_none()
            || self.answered.lock().is_ok_and(|a| a.contains(&r.container_id))
    }

    /// Reads, changes and writes one instance row under the state lock; `f` returns
    /// `None` to leave the row as it is. `Ok(None)` also when there is no such row.
    fn update_row<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut InstanceRow) -> Option<T>,
    ) -> Result<Option<T>, AgentError> {
        self.db(|s| {
            let Some(mut row) = s.instance(name)? else { return Ok(None) };
            let out = f(&mut row);
            if out.is_some() {
                s.put_instance(&row)?;
            }
            Ok(out)
        })
    }

    /// Whether the instance's first published TCP port accepts a connection (remembered
    /// per container once it did). Instances without one count as answering.
    async fn port_answers(&self, r: &InstanceRow) -> bool {
        if self.port_answered(r) {
            return true;
        }
        let Some(p) = r.spec.ports.iter().find(|p| p.protocol == skiff_model::Protocol::Tcp) else { return true };
        let Some(ip) = r.ip.as_ref().and_then(|i| i.parse::<Ipv4Addr>().ok()) else { return true };
        let addr = SocketAddr::new(IpAddr::V4(ip), p.container_port);
        let ok = matches!(
            tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        if ok {
            if let Ok(mut a) = self.answered.lock() {
                a.insert(r.container_id.clone());
            }
        }
        ok
    }

    /// Carries out one decision of the update planner.
    fn act(
        self: &Arc<Self>,
        d: &Deployment,
        a: update::Action,
        rows: &[InstanceRow],
        stopping: &HashSet<String>,
    ) -> Result<(), AgentError> {
        let row = |n: &str| rows.iter().find(|r| r.name == n).cloned();
        match a {
            update::Action::Stop { name, drop_image } => {
                if let Some(r) = row(&name) {
                    self.spawn_stop(&r, stopping, drop_image);
                }
            }
            update::Action::Retire { name, to } => {
                let Some(mut r) = row(&name) else { return Ok(()) };
                if rows.iter().any(|x| x.name == to) {
                    return Ok(());
                }
                self.stop_health(&name);
                r.name = to.clone();
                r.retiring = true;
                self.db(|s| s.rename_instance(&r, &name))?;
                self.rewrite_record(&r);
                let msg = format!("kept as {to} until its replacement ({}) is ready", d.image);
                self.event(&name, "Retiring", &msg);
            }
            update::Action::Promote { name, to } => {
                let Some(mut r) = row(&name) else { return Ok(()) };
                r.name = to.clone();
                r.retiring = false;
                r.retire_at_ms = None;
                self.db(|s| s.rename_instance(&r, &name))?;
                self.rewrite_record(&r);
                self.event(&to, "RolledBack", &format!("{name} takes its place again"));
                if r.state == InstanceState::Running {
                    self.start_health(&r);
                }
            }
            update::Action::Switch { names, retire_at_ms } => {
                for n in &names {
                    if let Some(mut r) = row(n) {
                        r.retire_at_ms = Some(retire_at_ms);
                        self.db(|s| s.put_instance(&r))?;
                    }
                }
                let secs = retire_at_ms.saturating_sub(now_ms()) / 1000;
                let msg = format!("traffic moved to the new instances; {} kept for {secs} s", names.join(", "));
                self.event(&d.name, "Switched", &msg);
            }
            update::Action::NeedImage => {
                if self.cfg.pull.is_some() {
                    let _ = self.pull_missing(&d.instance_name(1), &d.image, d.runtime);
                }
            }
            update::Action::Failed { name, why } => {
                let Some(r) = row(&name) else { return Ok(()) };
                let first = self.update_failed.lock().is_ok_and(|mut f| f.insert(r.container_id.clone()));
                if first {
                    self.event(&name, "UpdateFailed", &format!("new instance {why}; the old one keeps serving"));
                }
            }
        }
        Ok(())
    }

    /// Updates an instance's record in its directory after a rename (see `rebuild`).
    fn rewrite_record(&self, r: &InstanceRow) {
        let dir = self.runtimes.of(r.spec.runtime).instance_dir(&r.container_id);
        if dir.exists() {
            if let Err(e) = rebuild::write_record(&dir, r) {
                warn!(instance = %r.name, error = %e, "updating the instance's record");
            }
        }
    }

    /// Stops and removes `r` in the background (once), first taking it off the ports
    /// and waiting for its open connections to finish.
    fn spawn_stop(self: &Arc<Self>, r: &InstanceRow, stopping: &HashSet<String>, drop_image: bool) {
        if stopping.contains(&r.name) {
            return;
        }
        if let Ok(mut s) = self.stopping.lock() {
            if !s.insert(r.name.clone()) {
                return;
            }
        }
        let me = Arc::clone(self);
        let r = r.clone();
        tokio::spawn(async move {
            if let Err(e) = me.sync_hosts_and_ports().await {
                warn!(instance = %r.name, error = %e, "taking the instance off its ports");
            }
            me.drain(&r).await;
            me.stop_and_remove(&r).await;
            if drop_image {
                me.drop_unused_image(&r.spec.image);
            }
            if let Ok(mut s) = me.stopping.lock() {
                s.remove(&r.name);
            }
            me.notify.notify_one();
        });
    }

    /// Waits (at most `DRAIN`) until the proxy holds no connection to the instance.
    async fn drain(&self, r: &InstanceRow) {
        let Some(ip) = r.ip.as_ref().and_then(|i| i.parse::<IpAddr>().ok()) else { return };
        if r.spec.ports.is_empty() {
            return;
        }
        let active = self.proxies.lock().await.active();
        let deadline = tokio::time::Instant::now() + DRAIN;
        while active.count(ip) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Delete-then-download: removes an image that no instance and no desired deployment
    /// of the node uses any more.
    fn drop_unused_image(&self, image: &str) {
        let (Ok(rows), Ok(desired)) = (self.db(|s| s.instances()), self.desired()) else { return };
        let mut in_use: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let users = rows.iter().map(|r| (&r.spec.image, &r.name)).chain(desired.iter().map(|d| (&d.image, &d.name)));
        for (image, user) in users {
            in_use.entry(skiff_image::normalize_reference(image)).or_default().push(user.clone());
        }
        match self.images.remove(image, &in_use) {
            Ok(()) => self.event(image, "ImageRemoved", "deleted before its replacement downloads"),
            Err(e) => debug!(image, error = %e, "image kept"),
        }
    }

    /// Records an exit as an event and applies the restart policy; returns the row for
    /// the caller to store. `cause` (event reason, message) explains exits the container
    /// did not report itself.
    fn on_exit(
        &self,
        mut r: InstanceRow,
        exit: skiff_model::ExitStatus,
        now: u64,
        cause: Option<(&'static str, &str)>,
    ) -> InstanceRow {
        self.stop_health(&r.name);
        r.exit_code = Some(exit.code);
        r.oom_killed = exit.oom_killed;
        r.finished_at_ms = Some(exit.finished_at_ms);
        r.pid = None;
        r.health = None;
        r.health_failures = 0;
        let (reason, what) = match (cause, &exit.message) {
            (Some((reason, message)), _) => (reason, message.to_string()),
            (None, Some(m)) if exit.oom_killed => ("OOMKilled", format!("{m} (exit code {})", exit.code)),
            (None, None) if exit.oom_killed => ("OOMKilled", format!("OOM-killed (exit code {})", exit.code)),
            (None, Some(m)) => ("Exited", format!("exited with code {}: {m}", exit.code)),
            (None, None) => ("Exited", format!("exited with code {}", exit.code)),
        };
        self.event(&r.name, reason, &what);
        match after_exit(r.spec.restart, &exit, r.started_at_ms, r.streak, r.restarts, now) {
            AfterExit::Restart { at_ms, streak } => {
                r.state = InstanceState::Restarting;
                r.streak = streak;
                r.next_start_ms = Some(at_ms);
                r.message = Some(format!("{what}; restarting in {} ms", at_ms - now));
            }
            AfterExit::Stay => {
                r.state = InstanceState::Exited;
                r.next_start_ms = None;
                r.message = Some(what);
            }
        }
        r
    }

    /// Starts pulling `image` for `instance` unless a pull runs or failed recently; says
    /// what the instance waits for and when to look again.
    fn pull_missing(self: &Arc<Self>, instance: &str, image: &str, runtime: RuntimeKind) -> (String, u64) {
        let Some(mut opts) = self.cfg.pull.clone() else { return (format!("image {image} not found"), 5_000) };
        opts.platform = Some(Target::from(runtime).platform());
        let Ok(mut pulls) = self.pulls.lock() else { return ("image pulls: lock poisoned".into(), 5_000) };
        let now = now_ms();
        let failures = match pulls.get(image) {
            Some(PullState::Running) => return (format!("pulling {image}"), 1_000),
            Some(PullState::Failed { failures, retry_at_ms, error }) if *retry_at_ms > now => {
                let secs = (retry_at_ms - now).div_ceil(1000);
                return (format!("pulling {image} failed: {error}; trying again in {secs} s"), retry_at_ms - now);
            }
            Some(PullState::Failed { failures, .. }) => *failures,
            None => 0,
        };
        pulls.insert(image.to_string(), PullState::Running);
        drop(pulls);
        self.event(instance, "Pulling", image);
        let me = Arc::clone(self);
        let waiting = format!("pulling {image}");
        let (instance, image) = (instance.to_string(), image.to_string());
        tokio::spawn(async move {
            let res = skiff_image::registry::pull(Arc::clone(&me.images), &image, &opts).await;
            let state = match res {
                Ok(rep) => {
                    let msg =
                        format!("{image} ({}) from {}, {} B received", rep.digest, rep.endpoint, rep.bytes_received);
                    me.event(&instance, "Pulled", &msg);
                    None
                }
                Err(e) => {
                    let error = skiff_image::error::with_causes(&e);
                    me.event(&instance, "PullFailed", &format!("{image}: {error}"));
                    let failures = failures + 1;
                    Some(PullState::Failed { failures, retry_at_ms: now_ms() + pull_backoff_ms(failures), error })
                }
            };
            if let Ok(mut pulls) = me.pulls.lock() {
                match state {
                    Some(s) => pulls.insert(image, s),
                    None => pulls.remove(&image),
                };
            }
            me.notify.notify_one();
        });
        (waiting, 1_000)
    }

    /// Resolves image, network and volumes, creates the container and starts its shim.
    async fn start_instance(self: &Arc<Self>, mut r: InstanceRow) -> Result<(), AgentError> {
        // The node's own policy first: nothing of a refused workload is made.
        if let Err(v) = self.cfg.policy.check(&r.spec, &self.cfg.data_dir) {
            let msg = v.to_string();
            r.state = InstanceState::Failed;
            r.next_start_ms = None;
            r.message = Some(msg.clone());
            self.db(|s| s.put_instance(&r))?;
            self.event(&r.name, "PolicyViolation", &msg);
            return Ok(());
        }
        if self.cfg.pull.is_some() && self.images.inspect_for(&r.spec.image, Target::from(r.spec.runtime)).is_err() {
            let (message, retry_ms) = self.pull_missing(&r.name, &r.spec.image, r.spec.runtime);
            r.state = InstanceState::Pending;
            r.message = Some(message);
            r.next_start_ms = Some(now_ms() + retry_ms);
            self.db(|s| s.put_instance(&r))?;
            return Ok(());
        }
        let me = Arc::clone(self);
        let r2 = r.clone();
        let res = blocking(move || me.start_blocking(&r2)).await;
        let now = now_ms();
        match res {
            Ok((pid, ip)) => {
                let restarted = r.state == InstanceState::Restarting;
                if restarted {
                    r.restarts += 1;
                }
                r.state = InstanceState::Running;
                r.pid = Some(pid);
                r.ip = ip.map(|i| i.to_string());
                r.started_at_ms = Some(now);
                r.next_start_ms = None;
                r.message = None;
                r.health = r.spec.healthcheck.as_ref().map(|_| Health::Starting);
                r.health_failures = 0;
                self.db(|s| s.put_instance(&r))?;
                self.event(&r.name, if restarted { "Restarted" } else { "Started" }, &format!("pid {pid}"));
                self.start_health(&r);
                self.watch_exit(&r).await;
            }
            Err(AgentError::Image(e @ skiff_image::ImageError::NotFound(_))) => {
                // The image may be loaded later: keep trying, slowly.
                r.state = InstanceState::Pending;
                r.message = Some(e.to_string());
                r.next_start_ms = Some(now + 5_000);
                self.db(|s| s.put_instance(&r))?;
            }
            Err(e) => {
                warn!(instance = %r.name, error = %e, "start failed");
                // Counts as a failed run (exit 127, as a shell reports) for the restart policy;
                // an instance that will not be retried is Failed rather than Exited.
                let exit = skiff_model::ExitStatus {
                    code: 127,
                    signal: None,
                    oom_killed: false,
                    finished_at_ms: now,
                    message: None,
                };
                let mut r = self.on_exit(r, exit, now, Some(("Failed", &e.to_string())));
                if r.state == InstanceState::Exited {
                    r.state = InstanceState::Failed;
                }
                self.db(|s| s.put_instance(&r))?;
            }
        }
        Ok(())
    }

    fn start_blocking(&self, r: &InstanceRow) -> Result<(i32, Option<Ipv4Addr>), AgentError> {
        let id = &r.container_id;
        let rt = self.runtimes.of(r.spec.runtime);
        if let Liveness::Running { pid } = rt.liveness(id) {
            if pid > 0 {
                return Ok((pid, r.ip.as_ref().and_then(|i| i.parse().ok())));
            }
        }
        // The network namespace is set up on a second thread while the rootfs is mounted
        // and the bundle written: its path is known in advance, only runc needs it ready.
        let (ip, ns) = match r.spec.network {
            NetworkMode::Bridge => {
                let subnet = self.bridge.subnet;
                let ip = self.db(|s| s.lease(&r.name, subnet.hosts(), &subnet.to_string()))?;
                (Some(ip), Some(self.netns_name(id)))
            }
            NetworkMode::None | NetworkMode::Host => (None, None),
        };
        std::thread::scope(|scope| {
            let net = scope.spawn(|| -> Result<(), AgentError> {
                let (Some(ns), Some(ip)) = (&ns, ip) else { return Ok(()) };
                let attached =
                    netns_path(ns).exists() && Path::new(&format!("/sys/class/net/{}", veth_name(ns))).exists();
                if !attached {
                    self.bridge.attach(ns, ip)?;
                }
                Ok(())
            });
            let created = self.create_bundle(&*rt, r, ns.as_deref().map(netns_path), ip);
            let net = net.join().unwrap_or_else(|_| Err(AgentError::Other("network setup panicked".into())));
            created.and(net)
        })?;
        let pid = rt.start(id)?;
        Ok((pid, ip))
    }

    /// Image, volumes, /etc files, rootfs and spec: everything but the network and start.
    fn create_bundle(
        &self,
        rt: &dyn Runtime,
        r: &InstanceRow,
        netns: Option<PathBuf>,
        ip: Option<Ipv4Addr>,
    ) -> Result<(), AgentError> {
        let info = self.images.resolve_for(&r.spec.image, Target::from(r.spec.runtime))?;
        let wasm = match r.spec.runtime {
            RuntimeKind::Wasm => Some(self.wasm_module(&r.spec, &info)?),
            RuntimeKind::Oci => None,
        };
        let layer_dirs =
            info.layers.iter().map(|l| self.images.layer_dir(&l.diff_id)).collect::<Result<Vec<_>, _>>()?;
        let volumes = self.volumes(&r.spec)?;
        let hosts = if r.spec.network == NetworkMode::Host {
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
        } else {
            self.hosts_for(&r.spec.stack, &r.name, ip)?
        };
        let req = CreateRequest {
            id: r.container_id.clone(),
            hostname: r.spec.hostname.clone().unwrap_or_else(|| r.name.clone()),
            deployment: &r.spec,
            image: &info,
            layer_dirs,
            netns,
            hosts,
            resolv_conf: resolv_conf(r.spec.network == NetworkMode::Host),
            volumes,
            wasm,
        };
        rt.create(&req)?;
        // What a rebuild of agent.db finds this instance by (see `rebuild`).
        let rec = InstanceRow { ip: ip.map(|i| i.to_string()), ..r.clone() };
        rebuild::write_record(&rt.instance_dir(&r.container_id), &rec).map_err(AgentError::Other)?;
        Ok(())
    }

    /// The WebAssembly program a wasm deployment runs: the artifact's module, or the file
    /// its argv[0] names in a `wasi/wasm` image.
    pub(crate) fn wasm_module(
        &self,
        d: &Deployment,
        info: &skiff_image::ImageInfo,
    ) -> Result<skiff_image::WasmModule, AgentError> {
        let argv = skiff_runtime::wasm::argv(d, info);
        Ok(self.images.wasm_module(info, argv.first().map(String::as_str))?)
    }

    fn volumes(&self, d: &Deployment) -> Result<Vec<(PathBuf, String, bool)>, AgentError> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = vec![];
        let wasm = d.runtime == RuntimeKind::Wasm;
        for v in &d.volumes {
            let (src, named) = match &v.source {
                VolumeSource::Bind { path } => (PathBuf::from(path), false),
                VolumeSource::Named { name } => (self.cfg.data_dir.join("volumes").join(name).join("_data"), true),
            };
            let made = !src.exists();
            let fail = |e: std::io::Error| AgentError::Other(format!("volume source {}: {e}", src.display()));
            if made {
                // As `docker run -v` does, a missing source becomes an empty directory
                // (0755, as Docker makes it, whatever the agent's umask).
                std::fs::create_dir_all(&src)
                    .and_then(|_| std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)))
                    .map_err(fail)?;
            }
            // A wasm program runs as an unprivileged user of its deployment's group: the
            // volumes the agent made for it are that group's (setgid, so what one replica
            // writes the others read), and the way to a named one is traversable. A named
            // volume made for something else (a container's database, another wasm
            // deployment) is never handed over: it stays as it is.
            let gid_raw = skiff_runtime::wasm::gid_for(&d.name);
            let ours = made || {
                use std::os::unix::fs::MetadataExt;
                named && std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir() && m.gid() == gid_raw)
            };
            if wasm && named && !ours {
                warn!(deployment = %d.name, volume = %src.display(), "named volume belongs to another deployment; left as it is");
            }
            if wasm && ours {
                let gid = nix::unistd::Gid::from_raw(gid_raw);
                nix::unistd::chown(&src, None, Some(gid)).map_err(|e| fail(e.into()))?;
                std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o2770)).map_err(fail)?;
                if let Some(parent) = src.parent().filter(|_| named) {
                    skiff_sys::perms::traversable(parent).map_err(|e| AgentError::Other(e.to_string()))?;
                }
            }
            out.push((src, v.target.clone(), v.read_only));
        }
        Ok(out)
    }

    /// `/etc/hosts` for one instance: itself plus every addressed instance of its stack,
    /// reachable by instance name and by deployment (service) name.
    fn hosts_for(&self, stack: &str, me: &str, my_ip: Option<Ipv4Addr>) -> Result<String, AgentError> {
        let rows = self.db(|s| s.instances())?;
        let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if let Some(ip) = my_ip {
            let dep = rows.iter().find(|r| r.name == me).map(|r| r.deployment.clone()).unwrap_or_default();
            out.push_str(&format!("{ip}\t{me} {dep}\n"));
        }
        for r in rows.iter().filter(|r| r.spec.stack == stack && r.name != me && r.state == InstanceState::Running) {
            // Switched away from (blue-green): reachable by its own name, not the service's.
            let service = if r.retire_at_ms.is_some() { "" } else { r.deployment.as_str() };
            if let Some(ip) = &r.ip {
                out.push_str(&format!("{ip}\t{} {service}\n", r.name).replace(" \n", "\n"));
            }
        }
        Ok(out)
    }

    async fn sync_hosts_and_ports(self: &Arc<Self>) -> Result<(), AgentError> {
        // Held from before the state is read until the targets are set: two syncs at once
        // (the loop's and a stop's) would otherwise race, and the older state, written
        // last, put an instance that was drained and stopped back on its ports (a
        // connection there hangs until the connect times out).
        let mut proxies = self.proxies.lock().await;
        let rows = self.db(|s| s.instances())?;
        let serving = self.serving.lock().map(|s| s.clone()).unwrap_or_default();
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();
        // Each published port with the instances that serve it and the deployment's
        // instance names (to report a port that cannot be bound).
        let mut ports: HashMap<PortKey, (Vec<SocketAddr>, Vec<String>)> = HashMap::new();
        for r in rows.iter().filter(|r| r.state == InstanceState::Running && r.spec.network == NetworkMode::Bridge) {
            let my_ip = r.ip.as_ref().and_then(|i| i.parse().ok());
            if let Ok(h) = self.hosts_for(&r.spec.stack, &r.name, my_ip) {
                // Written only when it changed since this agent last wrote it.
                let same = self.hosts_written.lock().is_ok_and(|w| w.get(&r.container_id) == Some(&h));
                if !same && self.runtimes.of(r.spec.runtime).update_hosts(&r.container_id, &h).is_ok() {
                    if let Ok(mut w) = self.hosts_written.lock() {
                        w.insert(r.container_id.clone(), h);
                    }
                }
            }
            let serves =
                !stopping.contains(&r.name) && serving.get(&r.deployment).is_some_and(|names| names.contains(&r.name));
            for p in &r.spec.ports {
                let bind_ip: IpAddr =
                    p.host_ip.as_ref().and_then(|i| i.parse().ok()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                let key = PortKey { bind: SocketAddr::new(bind_ip, p.host_port), protocol: p.protocol };
                let entry = ports.entry(key).or_default();
                entry.1.push(r.name.clone());
                if let (true, Some(ip)) = (serves, my_ip) {
                    entry.0.push(SocketAddr::new(IpAddr::V4(ip), p.container_port));
                }
            }
        }
        let mut port_errors = vec![];
        for (key, (targets, names)) in &ports {
            if let Err(e) = proxies.ensure(key.clone(), targets.clone()).await {
                for n in names {
                    port_errors.push((n.clone(), format!("publishing {}: {e}", key.bind)));
                }
            }
        }
        let keep: Vec<PortKey> = ports.into_keys().collect();
        proxies.retain(&keep);
        drop(proxies);
        for (name, msg) in port_errors {
            if let Some(mut r) = self.db(|s| s.instance(&name))? {
                if r.message.as_deref() != Some(&msg) {
                    r.message = Some(msg.clone());
                    self.db(|s| s.put_instance(&r))?;
                    self.event(&name, "PortError", &msg);
                }
            }
        }
        Ok(())
    }

    /// SIGTERM (or the image's stop signal), the grace period, SIGKILL; then removes the
    /// container, its network namespace and its record.
    async fn stop_and_remove(self: &Arc<Self>, r: &InstanceRow) {
        self.stop_health(&r.name);
        let id = r.container_id.clone();
        let rt = self.runtimes.of(r.spec.runtime);
        let grace = Duration::from_millis(r.spec.stop_grace_period_ms);
        if r.state == InstanceState::Running {
            let sig = self
                .images
                .inspect_for(&r.spec.image, Target::from(r.spec.runtime))
                .ok()
                .and_then(|i| i.config.stop_signal)
                .unwrap_or_else(|| "TERM".into());
            let (rt2, id2) = (Arc::clone(&rt), id.clone());
            let _ = blocking(move || rt2.signal(&id2, sig.trim_start_matches("SIG"))).await;
            if !self.wait_exit(&rt, &id, grace).await {
                info!(instance = %r.name, "grace period over, killing");
                let (rt2, id2) = (Arc::clone(&rt), id.clone());
                let _ = blocking(move || rt2.signal(&id2, "KILL")).await;
                self.wait_exit(&rt, &id, Duration::from_secs(10)).await;
            }
        }
        let id2 = id.clone();
        if let Err(e) = blocking(move || rt.remove(&id2)).await {
            warn!(instance = %r.name, error = %e, "removing container");
        }
        self.bridge.detach(&self.netns_name(&id));
        self.exits.forget(&id);
        if let Ok(mut h) = self.hosts_written.lock() {
            h.remove(&id);
        }
        let _ = self.db(|s| s.delete_instance(&r.name));
        // A later container may get the same id (the same template again).
        for set in [&self.answered, &self.update_failed] {
            if let Ok(mut s) = set.lock() {
                s.remove(&id);
            }
        }
        self.event(&r.name, "Removed", "stopped and removed");
    }

    async fn wait_exit(&self, rt: &Arc<dyn Runtime>, id: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let rt = Arc::clone(rt);
            let id2 = id.to_string();
            match blocking(move || rt.liveness(&id2)).await {
                Liveness::Running { .. } => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => return true,
            }
        }
        false
    }

    fn start_health(self: &Arc<Self>, r: &InstanceRow) {
        let Some(hc) = r.spec.healthcheck.clone() else {
            return;
        };
        let me = Arc::clone(self);
        let name = r.name.clone();
        let id = r.container_id.clone();
        let runtime = r.spec.runtime;
        let started = r.started_at_ms.unwrap_or_else(now_ms);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(hc.interval_ms)).await;
                let rt = me.runtimes.of(runtime);
                let (id2, argv, timeout) = (id.clone(), hc.argv(), Duration::from_millis(hc.timeout_ms));
                let ok = matches!(blocking(move || rt.exec(&id2, &argv, timeout)).await, Ok(o) if o.code == 0);
                let in_start = now_ms() < started + hc.start_period_ms;
                // Read and written under one lock: the reconcile loop writes other fields
                // of the same row meanwhile.
                let changed = me.update_row(&name, |row| {
                    if row.state != InstanceState::Running || row.container_id != id {
                        return None;
                    }
                    let before = row.health;
                    let (health, failures) = after_probe(ok, row.health_failures, hc.retries, in_start, row.health);
                    row.health = health;
                    row.health_failures = failures;
                    Some((before, health))
                });
                let Ok(Some((before, health))) = changed else {
                    return;
                };
                if before != health {
                    if let Some(h) = health {
                        me.event(&name, "Health", &format!("now {h}"));
                    }
                    me.notify.notify_one();
                }
                debug!(instance = %name, ok, "health probe");
            }
        });
        if let Ok(mut m) = self.health.lock() {
            if let Some(old) = m.insert(r.name.clone(), task) {
                old.abort();
            }
        }
    }

    fn stop_health(&self, name: &str) {
        if let Ok(mut m) = self.health.lock() {
            if let Some(h) = m.remove(name) {
                h.abort();
            }
        }
    }

    /// Whether every instance of these deployments is gone (after they were deleted).
    pub fn all_gone(&self, deployments: &[String]) -> bool {
        self.db(|s| s.instances())
            .map(|rows| !rows.iter().any(|r| deployments.contains(&r.deployment)))
            .unwrap_or(false)
    }
}

/// The slot an instance fills: `web-2` and, while it retires, `web-2-<tag>`.
pub(crate) fn slot_of(r: &InstanceRow) -> Option<u32> {
    let rest = r.name.strip_prefix(&r.deployment)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

/// The host's resolv.conf without loopback name servers, which a container's own
/// network namespace cannot reach.
fn resolv_conf(host_network: bool) -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if host_network {
        return host;
    }
    host.lines()
        .filter(|l| {
            let mut it = l.split_whitespace();
            !(it.next() == Some("nameserver") && it.next().is_some_and(|a| a.starts_with("127.") || a == "::1"))
        })
        .map(|l| format!("{l}\n"))
        .collect()
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
        let waits: Vec<u64> = (1..=8).map(|f| super::pull_backoff_ms(f) / 1000).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
    }
}
