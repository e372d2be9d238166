//! Remote nodes (`skiff hub`): join tokens, joining, node authorization, heartbeats,
//! placement with [`crate::schedule`], and each node's assignments by revision.
//!
//! Architecture Invariant: a node reaches only its own assignments and status, and only
//! with the one certificate the hub last signed for it (a re-join or a revoke retires the
//! old one).

use crate::pki::Ca;
use crate::schedule::{self, NodeState, NodeView, Plan, Platforms};
use crate::store::{NodeRecord, NodeSpec, Store, TokenRecord};
use crate::tls::Peer;
use serde::{Deserialize, Serialize};
use skiff_model::metrics::MetricsSample;
use skiff_model::proto::{Assigned, Assignment, JoinRequest, JoinResponse, NodeStatus, StatusAck};
use skiff_model::{Deployment, EventRecord, InstanceStatus};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A node is Ready while its heartbeats arrive within this long of each other.
pub const HEARTBEAT_GRACE_MS: u64 = 40_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetError {
    /// 400: the request names what is wrong.
    Invalid(String),
    /// 401: no or unknown credentials.
    Unauthenticated(String),
    /// 403: known, but not allowed.
    Forbidden(String),
    /// 404
    NotFound(String),
    /// 500
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> FleetError {
    FleetError::Internal(e.to_string())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    /// Shown once; the hub keeps only its hash.
    pub token: String,
    pub expires_ms: Option<u64>,
}

/// Events kept per node on the hub.
pub const EVENTS_PER_NODE: usize = 1000;

#[derive(Debug, Clone)]
struct Seen {
    last_ms: u64,
    state: NodeState,
    since_ms: u64,
    problems: Vec<String>,
}

impl Seen {
    /// Heard from: Ready, or NotReady while it reports problems. Returns whether the
    /// state changed.
    fn heard(&mut self, now: u64) -> bool {
        self.last_ms = now;
        let state = if self.problems.is_empty() { NodeState::Ready } else { NodeState::NotReady };
        let changed = state != self.state;
        if changed {
            self.state = state;
            self.since_ms = now;
        }
        changed
    }
}

pub struct Fleet {
    pub ca: Ca,
    pub ca_sha256: String,
    store: Arc<dyn Store>,
    seen: Mutex<BTreeMap<String, Seen>>,
    statuses: Mutex<BTreeMap<String, Vec<InstanceStatus>>>,
    events: Mutex<BTreeMap<String, std::collections::VecDeque<EventRecord>>>,
    started_ms: u64,
    /// The newest placement revision, for long-polls.
    changed: tokio::sync::watch::Sender<u64>,
    tunnels: Mutex<BTreeMap<String, Arc<crate::tunnel::Tunnel>>>,
    /// Something placement depends on changed (a node joined or came back).
    dirty: std::sync::atomic::AtomicBool,
    /// Every node's assignment at one revision (see `assignment`).
    #[allow(clippy::type_complexity)]
    assignments: Mutex<Option<(u64, Arc<BTreeMap<String, Arc<Assignment>>>)>>,
    tunnel_serial: std::sync::atomic::AtomicU64,
    /// How the platforms of an image are found out (the registry, in `skiff hub`).
    lookup: Option<PlatformLookup>,
    /// Image → the platforms it was last seen to have; absent: any architecture.
    platforms: Mutex<BTreeMap<String, Platforms>>,
    /// Deployment → why some of its instances have no node, as of the last placement.
    unschedulable: Mutex<BTreeMap<String, String>>,
    /// Each node's newest resource sample.
    samples: Mutex<BTreeMap<String, MetricsSample>>,
}

/// Finds out which `(architecture, variant)`s an image is built for.
pub type PlatformLookup = Arc<dyn Fn(String) -> crate::BoxFuture<'static, Result<Platforms, String>> + Send + Sync>;

/// How long a platform lookup may take before the image counts as "any architecture".
const LOOKUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Fleet {
    pub fn new(ca: Ca, store: Arc<dyn Store>) -> Result<Self, FleetError> {
        let ca_sha256 = ca.fingerprint().map_err(internal)?;
        let rev = store.revision().map_err(internal)?;
        Ok(Fleet {
            ca,
            ca_sha256,
            store,
            seen: Mutex::new(BTreeMap::new()),
            statuses: Mutex::new(BTreeMap::new()),
            events: Mutex::new(BTreeMap::new()),
            started_ms: now_ms(),
            changed: tokio::sync::watch::channel(rev).0,
            tunnels: Mutex::new(BTreeMap::new()),
            assignments: Mutex::new(None),
            dirty: std::sync::atomic::AtomicBool::new(false),
            tunnel_serial: std::sync::atomic::AtomicU64::new(1),
            lookup: None,
            platforms: Mutex::new(BTreeMap::new()),
            unschedulable: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn with_platform_lookup(mut self, lookup: PlatformLookup) -> Self {
        self.lookup = Some(lookup);
        self
    }

    /// Looks up the platforms of `images` (concurrently, each within 10 s) so that
    /// placement matches them to node architectures. Returns a warning for each image
    /// whose platforms stay unknown: it may still run (loaded offline, a registry only the
    /// nodes reach), so it is placed on any architecture. Marks placement dirty when
    /// something was learnt.
    pub async fn learn_platforms(&self, images: &[String]) -> Vec<String> {
        let Some(lookup) = &self.lookup else { return vec![] };
        let mut unique: Vec<&String> = images.iter().collect();
        unique.sort();
        unique.dedup();
        let found = futures_util::future::join_all(unique.into_iter().map(|image| async move {
            let r = tokio::time::timeout(LOOKUP_LIMIT, lookup(image.clone()))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_LIMIT:?}")));
            (image, r)
        }))
        .await;
        let mut warnings = vec![];
        let Ok(mut known) = self.platforms.lock() else { return vec!["platforms: lock poisoned".into()] };
        for (image, r) in found {
            match r {
                Ok(p) if !p.is_empty() => {
                    if known.insert(image.clone(), p.clone()).as_ref() != Some(&p) {
                        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok(_) => warnings
                    .push(format!("image {image}: the registry lists no platforms; placing on any architecture")),
                Err(e) => warnings.push(format!("image {image}: platforms unknown ({e}); placing on any architecture")),
            }
        }
        warnings
    }

    /// Deployment → why some of its instances have no node, as of the last placement.
    pub fn unschedulable(&self) -> BTreeMap<String, String> {
        self.unschedulable.lock().map(|u| u.clone()).unwrap_or_default()
    }

    fn known_platforms(&self) -> BTreeMap<String, Platforms> {
        self.platforms.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Registers a node's new tunnel (replacing an older one of the same node).
    pub fn open_tunnel(&self, node: &str, out: tokio::sync::mpsc::Sender<String>) -> Arc<crate::tunnel::Tunnel> {
        let serial = self.tunnel_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Arc::new(crate::tunnel::Tunnel::new(out, serial));
        if let Ok(mut m) = self.tunnels.lock() {
            m.insert(node.to_string(), Arc::clone(&t));
        }
        t
    }

    /// Forgets a node's tunnel, unless a newer one has replaced it.
    pub fn close_tunnel(&self, node: &str, serial: u64) {
        if let Ok(mut m) = self.tunnels.lock() {
            if m.get(node).is_some_and(|t| t.serial == serial) {
                m.remove(node);
            }
        }
    }

    pub fn tunnel(&self, node: &str) -> Option<Arc<crate::tunnel::Tunnel>> {
        self.tunnels.lock().ok()?.get(node).cloned()
    }

    pub fn create_token(&self, ttl_ms: Option<u64>) -> Result<CreatedToken, FleetError> {
        if ttl_ms == Some(0) {
            return Err(FleetError::Invalid("ttl: must be more than 0".into()));
        }
        let t = crate::pki::new_join_token(&self.ca_sha256).map_err(internal)?;
        let now = now_ms();
        let expires_ms = ttl_ms.map(|t| now.saturating_add(t));
        self.store
            .create_token(&TokenRecord {
                id: t.id.clone(),
                secret_sha256: crate::pki::secret_hash(&t.secret),
                created_ms: now,
                expires_ms,
                revoked: false,
            })
            .map_err(internal)?;
        Ok(CreatedToken { id: t.id.clone(), token: t.to_string(), expires_ms })
    }

    fn check_token(&self, presented: &str) -> Result<(), FleetError> {
        let unauth = |m: &str| FleetError::Unauthenticated(format!("token: {m}"));
        let (id, secret) = presented.split_once('.').ok_or_else(|| unauth("not <id>.<secret>"))?;
        let rec = self.store.token(id).map_err(internal)?.ok_or_else(|| unauth("unknown token"))?;
        let hash = crate::pki::sha256_hex(secret.as_bytes());
        if !crate::api::constant_time_eq(hash.as_bytes(), rec.secret_sha256.as_bytes()) {
            return Err(unauth("unknown token"));
        }
        if rec.revoked {
            return Err(FleetError::Forbidden(format!("token: {id} has been revoked")));
        }
        if rec.expires_ms.is_some_and(|e| e <= now_ms()) {
            return Err(FleetError::Forbidden(format!("token: {id} has expired")));
        }
        Ok(())
    }

    /// Checks the token and the request, signs the node's CSR and records the node.
    pub fn join(&self, req: &JoinRequest) -> Result<JoinResponse, FleetError> {
        self.check_token(&req.token)?;
        skiff_model::validate::check_name("node", &req.node).map_err(|e| FleetError::Invalid(e.to_string()))?;
        for (k, v) in &req.spec.labels {
            if !skiff_model::validate::is_label_key(k) || v.len() > 63 || v.chars().any(char::is_whitespace) {
                return Err(FleetError::Invalid(format!("spec.labels.{k}: not a valid label")));
            }
        }
        if req.spec.arch.is_empty() || req.spec.os.is_empty() {
            return Err(FleetError::Invalid("spec: os and arch are required".into()));
        }
        let (cert, serial) = self.ca.sign_node(&req.node, &req.csr).map_err(|e| FleetError::Invalid(e.to_string()))?;
        self.store.put_node(&req.node, &serial, now_ms(), &req.spec).map_err(internal)?;
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(JoinResponse { cert, ca: self.ca.pem().to_string() })
    }

    /// Records the runtimes a node says it has (in its hello), when they changed: a node
    /// upgraded to a build with WebAssembly takes wasm instances from then on.
    pub fn set_runtimes(&self, name: &str, runtimes: &[String]) -> Result<(), FleetError> {
        let Some(rec) = self.store.node(name).map_err(internal)? else { return Ok(()) };
        if rec.info.runtimes == runtimes {
            return Ok(());
        }
        let info = NodeSpec { runtimes: runtimes.to_vec(), ..rec.info };
        self.store.put_node(name, &rec.cert_serial, rec.joined_ms, &info).map_err(internal)?;
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The node record behind a connection's certificate, if it may act as `name`.
    pub fn authorize(&self, peer: &Peer, name: &str) -> Result<NodeRecord, FleetError> {
        let (Some(who), Some(serial)) = (&peer.node, &peer.serial) else {
            return Err(FleetError::Unauthenticated("a node certificate is required (join first)".into()));
        };
        let rec = self
            .store
            .node(who)
            .map_err(internal)?
            .ok_or_else(|| FleetError::Forbidden(format!("node {who:?} is not joined")))?;
        if rec.revoked {
            return Err(FleetError::Forbidden(format!("node {who:?} has been revoked")));
        }
        if &rec.cert_serial != serial {
            return Err(FleetError::Forbidden(format!("this certificate of node {who:?} has been replaced")));
        }
        if who != name {
            return Err(FleetError::Forbidden(format!("node {who:?} may not act for node {name:?}")));
        }
        Ok(rec)
    }

    pub fn revoke_node(&self, name: &str) -> Result<(), FleetError> {
        if !self.store.revoke_node(name).map_err(internal)? {
            return Err(FleetError::NotFound(format!("node {name:?} not found")));
        }
        // Its open connection goes too; a new one is refused at the handshake's authorize.
        if let Some(t) = self.tunnel(name) {
            t.kick.notify_one();
        }
        if let Ok(mut m) = self.samples.lock() {
            m.remove(name);
        }
        self.reschedule()?;
        Ok(())
    }

    /// Records a heartbeat: the instances the node reports and the events it ships.
    pub fn heartbeat(&self, node: &str, status: NodeStatus) -> Result<StatusAck, FleetError> {
        self.touch(node);
        Ok(self.report(node, status))
    }

    /// The node was heard from (any frame or pong on its tunnel, or a status report).
    pub fn touch(&self, node: &str) {
        let now = now_ms();
        let changed = match self.seen.lock() {
            Ok(mut seen) => seen
                .entry(node.to_string())
                .or_insert(Seen { last_ms: now, state: NodeState::Unknown, since_ms: now, problems: vec![] })
                .heard(now),
            Err(_) => false,
        };
        if changed {
            // Placement runs on the next tick, once for however many nodes came up.
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Stores what a node reports: its instances and the events it ships.
    pub fn report(&self, node: &str, status: NodeStatus) -> StatusAck {
        let ack = StatusAck { events_through: status.events_through };
        if let Ok(mut ev) = self.events.lock() {
            let q = ev.entry(node.to_string()).or_default();
            q.extend(status.events);
            while q.len() > EVENTS_PER_NODE {
                q.pop_front();
            }
        }
        if let Ok(mut st) = self.statuses.lock() {
            st.insert(node.to_string(), status.instances);
        }
        if let Ok(mut seen) = self.seen.lock() {
            if let Some(s) = seen.get_mut(node) {
                if s.problems != status.problems {
                    s.problems = status.problems;
                    if s.heard(now_ms()) {
                        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        ack
    }

    /// Keeps the newest of the samples a node shipped (older ones, buffered while it was
    /// offline, arrive first and are superseded).
    pub fn record_metrics(&self, node: &str, samples: Vec<MetricsSample>) {
        let Some(newest) = samples.into_iter().max_by_key(|m| m.time_ms) else { return };
        if let Ok(mut all) = self.samples.lock() {
            if all.get(node).is_none_or(|m| m.time_ms < newest.time_ms) {
                all.insert(node.to_string(), newest);
            }
        }
    }

    /// The newest sample of every node that shipped one.
    pub fn metrics(&self) -> Vec<MetricsSample> {
        self.samples.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Resolves when the placement revision may have moved past `after`.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Events nodes shipped (of one node, or all), oldest first, at most `limit` per node.
    pub fn events(&self, node: Option<&str>, limit: usize) -> Vec<EventRecord> {
        let Ok(ev) = self.events.lock() else { return vec![] };
        ev.iter()
            .filter(|(n, _)| node.is_none_or(|want| want == n.as_str()))
            .flat_map(|(_, q)| q.iter().skip(q.len().saturating_sub(limit)).cloned())
            .collect()
    }

    /// Ready (or NotReady, while it reports problems) / Unknown from heartbeats; a node
    /// not heard from since the hub started is Unknown from the hub's start.
    fn state_of(&self, node: &str, now: u64) -> (NodeState, u64) {
        let mut seen = match self.seen.lock() {
            Ok(s) => s,
            Err(_) => return (NodeState::Unknown, self.started_ms),
        };
        match seen.get_mut(node) {
            Some(s) => {
                if s.state != NodeState::Unknown && now.saturating_sub(s.last_ms) > HEARTBEAT_GRACE_MS {
                    s.state = NodeState::Unknown;
                    s.since_ms = s.last_ms + HEARTBEAT_GRACE_MS;
                }
                (s.state, s.since_ms)
            }
            None => (NodeState::Unknown, self.started_ms),
        }
    }

    pub fn views(&self) -> Result<Vec<NodeView>, FleetError> {
        let now = now_ms();
        Ok(self
            .store
            .nodes()
            .map_err(internal)?
            .into_iter()
            .filter(|n| !n.revoked)
            .map(|n| {
                let (state, since) = self.state_of(&n.name, now);
                NodeView {
                    name: n.name,
                    labels: n.info.labels,
                    arch: n.info.arch,
                    variant: n.info.variant,
                    cpu_millis: n.info.cpu_millis,
                    memory_bytes: n.info.memory_bytes,
                    runtimes: n.info.runtimes,
                    state,
                    state_since_ms: since,
                }
            })
            .collect())
    }

    /// The problems a node last reported (why it is NotReady).
    pub fn problems(&self, node: &str) -> Vec<String> {
        self.seen.lock().ok().and_then(|s| s.get(node).map(|x| x.problems.clone())).unwrap_or_default()
    }

    pub fn reported_instances(&self) -> Vec<InstanceStatus> {
        self.statuses.lock().map(|s| s.values().flatten().cloned().collect()).unwrap_or_default()
    }

    /// The nodes holding instances of `deployment`, by name.
    pub fn nodes_of(&self, deployment: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .store
            .slots()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.deployment == deployment)
            .map(|s| s.node)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Wakes the nodes' long-polls and tunnels after a change of the store's revision made
    /// outside `reschedule` (a rollout's next wave).
    pub fn revision_changed(&self) {
        if let Ok(rev) = self.store.revision() {
            self.changed.send_if_modified(|r| {
                let newer = rev > *r;
                if newer {
                    *r = rev;
                }
                newer
            });
        }
    }

    /// Where `deployments` would run if they were the whole desired state, without
    /// storing anything (`apply --dry-run`): instance name → node, and the unplaceable.
    pub fn plan(&self, deployments: &[Deployment]) -> Result<Plan, FleetError> {
        let current = self.store.slots().map_err(internal)?;
        Ok(schedule::schedule(deployments, &self.known_platforms(), &self.views()?, &current, now_ms()))
    }

    /// Places every deployment over the joined nodes and stores the result; wakes the
    /// nodes' long-polls and tunnels when the revision moved (by this placement or by any
    /// change to deployments before it, since `set_slots` returns the current revision).
    pub fn reschedule(&self) -> Result<Plan, FleetError> {
        let deployments: Vec<Deployment> = self.store.list().map_err(internal)?.into_iter().map(|s| s.spec).collect();
        let current = self.store.slots().map_err(internal)?;
        let plan = schedule::schedule(&deployments, &self.known_platforms(), &self.views()?, &current, now_ms());
        self.store.set_slots(&plan.slots).map_err(internal)?;
        if let Ok(mut u) = self.unschedulable.lock() {
            u.clone_from(&plan.unschedulable);
        }
        self.revision_changed();
        Ok(plan)
    }

    /// Places again if a node joined or came back since the last placement, or if `force`
    /// (node states also change by time passing: heartbeats that stop).
    pub fn tick(&self, force: bool) -> Result<(), FleetError> {
        if self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) || force {
            self.reschedule()?;
        }
        Ok(())
    }

    /// The node's assignment at the current revision. Every node's is computed in one pass
    /// per revision and shared, so a change that wakes thousands of long-polls reads the
    /// store once, not once per node.
    pub fn assignment(&self, node: &str) -> Result<Assignment, FleetError> {
        let revision = self.store.revision().map_err(internal)?;
        let cached = self.assignments.lock().ok().and_then(|c| c.as_ref().filter(|(r, _)| *r == revision).cloned());
        let all = match cached {
            Some((_, all)) => all,
            None => {
                let specs: BTreeMap<String, Deployment> =
                    self.store.list().map_err(internal)?.into_iter().map(|s| (s.spec.name.clone(), s.spec)).collect();
                // Deployments rolling out in waves: nodes not reached yet keep the old template.
                let mut waves = BTreeMap::new();
                for (name, d) in &specs {
                    if let Some(w) = crate::rollouts::wave_of(d, &self.store.history(name).map_err(internal)?) {
                        waves.insert(name.clone(), w);
                    }
                }
                let mut per_node: BTreeMap<String, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
                for s in self.store.slots().map_err(internal)? {
                    per_node.entry(s.node).or_default().entry(s.deployment).or_default().push(s.index);
                }
                let all: BTreeMap<String, Arc<Assignment>> = per_node
                    .into_iter()
                    .map(|(n, deps)| {
                        let deployments = deps
                            .into_iter()
                            .filter_map(|(d, indexes)| {
                                let spec = match waves.get(&d) {
                                    Some((reached, base)) if !reached.contains(&n) => base,
                                    _ => specs.get(&d)?,
                                };
                                Some(Assigned { spec: spec.clone(), indexes })
                            })
                            .collect();
                        (n, Arc::new(Assignment { revision, deployments }))
                    })
                    .collect();
                let all = Arc::new(all);
                if let Ok(mut c) = self.assignments.lock() {
                    *c = Some((revision, Arc::clone(&all)));
                }
                all
            }
        };
        Ok(match all.get(node) {
            Some(a) => (**a).clone(),
            None => Assignment { revision, deployments: vec![] },
        })
    }

    /// The node's assignment once the revision passes `after` (at once if it has), or
    /// after `wait` with the current one.
    pub async fn wait_assignment(
        &self,
        node: &str,
        after: u64,
        wait: std::time::Duration,
    ) -> Result<Assignment, FleetError> {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|r| *r > after)).await;
        self.assignment(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use skiff_model::proto::JoinToken;

    fn fleet() -> (tempfile::TempDir, Fleet) {
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let ca = Ca::load_or_create(&t.path().join("pki")).unwrap();
        let f = Fleet::new(ca, store).unwrap();
        (t, f)
    }

    fn join_req(token: &str, node: &str) -> JoinRequest {
        let (_key, csr) = crate::pki::tests::csr(node);
        let spec = NodeSpec {
            os: "linux".into(),
            arch: "amd64".into(),
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
            ..Default::default()
        };
        JoinRequest { token: token.to_string(), node: node.into(), csr, spec }
    }

    fn secret(t: &CreatedToken) -> String {
        let p = JoinToken::parse(&t.token).unwrap();
        format!("{}.{}", p.id, p.secret)
    }

    #[test]
    fn tokens_gate_joining() {
        let (_t, f) = fleet();
        let tok = f.create_token(None).unwrap();
        assert!(tok.token.starts_with(&format!("SK1.{}.", f.ca_sha256)));
        f.join(&join_req(&secret(&tok), "pi-1")).unwrap();
        let wrong = format!("{}.{}", JoinToken::parse(&tok.token).unwrap().id, "0".repeat(32));
        assert_eq!(
            f.join(&join_req(&wrong, "pi-2")).unwrap_err(),
            FleetError::Unauthenticated("token: unknown token".into())
        );
        let short = f.create_token(Some(1)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(
            matches!(f.join(&join_req(&secret(&short), "pi-2")), Err(FleetError::Forbidden(m)) if m.contains("expired"))
        );
        f.store.revoke_token(&tok.id).unwrap();
        assert!(
            matches!(f.join(&join_req(&secret(&tok), "pi-3")), Err(FleetError::Forbidden(m)) if m.contains("revoked"))
        );
        let ok = f.create_token(None).unwrap();
        assert!(
            matches!(f.join(&join_req(&secret(&ok), "Bad Name")), Err(FleetError::Invalid(m)) if m.contains("node"))
        );
        let mut r = join_req(&secret(&ok), "pi-4");
        r.csr = "nonsense".into();
        assert!(matches!(f.join(&r), Err(FleetError::Invalid(m)) if m.contains("csr")));
        assert_eq!(f.create_token(Some(0)).unwrap_err(), FleetError::Invalid("ttl: must be more than 0".into()));
    }

    #[test]
    fn nodes_act_only_for_themselves_with_their_newest_certificate() {
        let (_t, f) = fleet();
        let tok = secret(&f.create_token(None).unwrap());
        f.join(&join_req(&tok, "a")).unwrap();
        f.join(&join_req(&tok, "b")).unwrap();
        let serial = f.store.node("a").unwrap().unwrap().cert_serial;
        let a = Peer { node: Some("a".into()), serial: Some(serial.clone()) };
        assert!(f.authorize(&a, "a").is_ok());
        assert!(
            matches!(f.authorize(&a, "b"), Err(FleetError::Forbidden(m)) if m.contains("may not act for node \"b\""))
        );
        assert!(matches!(f.authorize(&Peer::default(), "a"), Err(FleetError::Unauthenticated(_))));
        f.join(&join_req(&tok, "a")).unwrap(); // re-join: a new certificate
        assert!(matches!(f.authorize(&a, "a"), Err(FleetError::Forbidden(m)) if m.contains("replaced")));
        let fresh = Peer { node: Some("a".into()), serial: Some(f.store.node("a").unwrap().unwrap().cert_serial) };
        f.revoke_node("a").unwrap();
        assert!(matches!(f.authorize(&fresh, "a"), Err(FleetError::Forbidden(m)) if m.contains("revoked")));
    }

    #[test]
    fn assignments_follow_placement_and_revisions() {
        let (_t, f) = fleet();
        let tok = secret(&f.create_token(None).unwrap());
        f.join(&join_req(&tok, "a")).unwrap();
        f.join(&join_req(&tok, "b")).unwrap();
        f.heartbeat("a", NodeStatus::default()).unwrap();
        f.tick(false).unwrap();
        let mut web = Deployment::new("web", "img");
        web.replicas = 3;
        f.store.apply(&[web], None, false).unwrap();
        f.reschedule().unwrap();
        // Only `a` is Ready (b never sent a heartbeat): all three land there.
        let a = f.assignment("a").unwrap();
        assert_eq!(a.deployments[0].indexes, [1, 2, 3]);
        assert!(f.assignment("b").unwrap().deployments.is_empty());
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let same = rt.block_on(f.wait_assignment("a", a.revision, std::time::Duration::from_millis(20))).unwrap();
        assert_eq!(same, a, "nothing changed: the long-poll times out with the same assignment");
    }

    #[test]
    fn a_node_under_pressure_is_not_ready_and_takes_no_new_work() {
        let (_t, f) = fleet();
        let tok = secret(&f.create_token(None).unwrap());
        f.join(&join_req(&tok, "a")).unwrap();
        f.join(&join_req(&tok, "b")).unwrap();
        f.heartbeat("a", NodeStatus::default()).unwrap();
        let full =
            NodeStatus { problems: vec!["DiskPressure: 97% of the data filesystem used".into()], ..Default::default() };
        f.heartbeat("b", full.clone()).unwrap();
        let state = |f: &Fleet, n: &str| f.views().unwrap().into_iter().find(|v| v.name == n).unwrap().state;
        assert_eq!((state(&f, "a"), state(&f, "b")), (NodeState::Ready, NodeState::NotReady));
        assert_eq!(f.problems("b"), full.problems);
        let mut web = Deployment::new("web", "img");
        web.replicas = 2;
        f.store.apply(&[web], None, false).unwrap();
        f.reschedule().unwrap();
        assert_eq!(f.assignment("a").unwrap().deployments[0].indexes, [1, 2], "b is under pressure");
        // Heard from again (a pong) it stays NotReady; once the pressure is gone it is Ready.
        f.touch("b");
        assert_eq!(state(&f, "b"), NodeState::NotReady);
        f.heartbeat("b", NodeStatus::default()).unwrap();
        assert_eq!(state(&f, "b"), NodeState::Ready);
        assert!(f.problems("b").is_empty());
    }
}
