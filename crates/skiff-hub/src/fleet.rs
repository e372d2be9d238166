//! Remote nodes (`skiff hub`): join tokens, joining, node authorization, heartbeats,
//! placement with [`crate::schedule`], and each node's assignments by revision.
//!
//! Architecture Invariant: a node reaches only its own assignments and status, and only
//! with the one certificate the hub last signed for it (a re-join or a revoke retires the
//! old one).

pub(crate) mod mesh;
mod ordered;
mod peers;

use crate::clock::Clock;
use crate::pki::Ca;
use crate::schedule::{self, NodeState, NodeView, Plan, Platforms};
use crate::store::{JoinRefused, NodeJoin, NodeRecord, Store};
use crate::tls::Peer;
use skiff_model::metrics::MetricsSample;
use skiff_model::proto::{Assigned, Assignment, JoinRequest, JoinResponse, NodeStatus, StatusAck};
use skiff_model::{Deployment, EventRecord, InstanceStatus};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

pub use mesh::serves;
pub use peers::{PeerNode, PeerState};

/// A node is Ready while its heartbeats arrive within this long of each other.
pub const HEARTBEAT_GRACE_MS: u64 = 40_000;
/// A forced tick places at least this long after the last placement, whatever changed
/// (see [`Fleet::tick`]).
const FORCED_PLACEMENT_EVERY_MS: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// 400: the request names what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// 401: no or unknown credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403: known, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 409: the name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 500
    #[error("{0}")]
    Internal(String),
    /// 503: the store is out of reach (nothing was changed).
    #[error("{0}")]
    Unavailable(String),
}

/// Says how long a pass over every node took, where it took long enough to matter: a
/// fleet of 100,000 nodes shows in the hub's log where an apply's time goes.
pub(crate) fn took(what: &str, nodes: usize, since: std::time::Instant) {
    let ms = since.elapsed().as_millis();
    if ms >= 100 {
        tracing::info!(nodes, ms, "{what}");
    }
}

fn failed(e: impl std::fmt::Display) -> FleetError {
    FleetError::Internal(e.to_string())
}

/// A token's lookup that failed: 503 while the hub is cut off from its store, else 500.
fn token_failed(e: crate::tokens::TokenError) -> FleetError {
    match e {
        crate::tokens::TokenError::Unavailable(m) => FleetError::Unavailable(m),
        e => failed(e),
    }
}

/// A store's failure: 503 while the hub is cut off from it, else 500.
fn internal(e: crate::store::StoreError) -> FleetError {
    match e {
        crate::store::StoreError::OutOfReach(m) => FleetError::Unavailable(m),
        e => FleetError::Internal(e.to_string()),
    }
}

/// Events kept per node on the hub.
pub const EVENTS_PER_NODE: usize = 1000;

/// A node's events on the hub, down to the newest [`EVENTS_PER_NODE`].
fn keep_newest(q: &mut std::collections::VecDeque<EventRecord>) {
    while q.len() > EVENTS_PER_NODE {
        q.pop_front();
    }
}
/// Nodes' events kept in the store, in all and per node: what a hub that starts or takes
/// over shows of what nodes shipped to the one before it.
pub const STORED_NODE_EVENTS: usize = 5_000;
pub const STORED_EVENTS_PER_NODE: usize = 100;
/// The longest message of a node's event in the store (the whole log is read back in one
/// request, within etcd's 4 MiB answers).
pub const STORED_EVENT_MESSAGE_MAX: usize = 256;
/// The longest event message kept from a node (longer ones are cut).
pub const EVENT_MESSAGE_MAX: usize = 4096;

/// A node's device counts are bounded as its other facts: at most 64 kinds, each a CDI
/// kind of up to 128 characters, at most 4096 of each.
fn check_devices(devices: &BTreeMap<String, u32>) -> Result<(), FleetError> {
    let ok = devices.len() <= 64
        && devices.iter().all(|(k, n)| {
            k.len() <= 128
                && *n <= 4096
                && skiff_model::DeviceRequest { kind: k.clone(), ids: vec![], count: 1 }.check().is_ok()
        });
    if ok {
        Ok(())
    } else {
        Err(FleetError::Invalid("spec.devices: at most 64 CDI kinds (vendor.com/class), up to 4096 of each".into()))
    }
}

/// What a node says about its runtimes and their versions is kept in the store and shown:
/// bounded in count and length.
fn check_facts(runtimes: &[String], versions: &BTreeMap<String, String>) -> Result<(), FleetError> {
    let short = |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control);
    if runtimes.len() > 16 || !runtimes.iter().all(|r| short(r, 32)) {
        return Err(FleetError::Invalid("spec.runtimes: at most 16 names of up to 32 characters".into()));
    }
    if versions.len() > 16 || !versions.iter().all(|(k, v)| short(k, 32) && short(v, 64)) {
        return Err(FleetError::Invalid("spec.versions: at most 16 entries, names of up to 32 characters".into()));
    }
    Ok(())
}

/// `s` cut to at most `max` bytes (at a character boundary).
fn cap_text(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[derive(Debug, Clone)]
struct Seen {
    last_ms: u64,
    state: NodeState,
    since_ms: u64,
    problems: Vec<String>,
    /// The site image cache the node serves, as it last reported.
    cache: Option<String>,
    /// Where its agent takes direct connections for the fleet's services.
    mesh: Option<String>,
    /// The hub that holds its tunnel and told this one about it; none: heard here.
    via: Option<String>,
    /// The state (and since when) that hub last told: what the node is again once that
    /// hub speaks for it after a silence here made it Unknown.
    told: (NodeState, u64),
}

impl Seen {
    /// First heard of at `now`, state not known yet.
    fn new(now: u64) -> Self {
        Seen {
            last_ms: now,
            state: NodeState::Unknown,
            since_ms: now,
            problems: vec![],
            cache: None,
            mesh: None,
            via: None,
            told: (NodeState::Unknown, now),
        }
    }

    /// Heard from through the hub that holds it (it says the node is as it last told):
    /// back to that state if a silence here turned it Unknown. Returns whether it did.
    fn heard_via(&mut self, now: u64) -> bool {
        self.last_ms = now;
        let back = (self.state, self.since_ms) != self.told;
        if back {
            (self.state, self.since_ms) = self.told;
        }
        back
    }

    /// Turns Unknown once silent past the heartbeat grace; whether it did just now.
    fn went_silent(&mut self, now: u64) -> bool {
        let silent = self.state != NodeState::Unknown && now.saturating_sub(self.last_ms) > HEARTBEAT_GRACE_MS;
        if silent {
            self.state = NodeState::Unknown;
            self.since_ms = self.last_ms + HEARTBEAT_GRACE_MS;
        }
        silent
    }

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

/// Joins a hub serves at once; the others wait their turn without a thread.
const JOINS_AT_ONCE: usize = 8;

pub struct Fleet {
    pub ca: Ca,
    pub ca_sha256: String,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// By node name (looked up on every frame, and for every node at each placement).
    seen: Mutex<HashMap<String, Seen>>,
    statuses: Mutex<BTreeMap<String, Vec<InstanceStatus>>>,
    events: Mutex<BTreeMap<String, std::collections::VecDeque<EventRecord>>>,
    started_ms: u64,
    /// The newest placement revision, for long-polls.
    changed: tokio::sync::watch::Sender<u64>,
    /// Wakes the tunnels: moves when a revision changed what nodes are told (their parts,
    /// or the services' table); see [`Fleet::wake_tunnels`].
    wake: tokio::sync::watch::Sender<u64>,
    /// The parts and the table the tunnels were last woken for.
    #[allow(clippy::type_complexity)]
    woken: Mutex<Option<(Arc<BTreeMap<String, Arc<Assignment>>>, Arc<mesh::MeshTable>)>>,
    tunnels: Mutex<BTreeMap<String, Arc<crate::tunnel::Tunnel>>>,
    /// Something placement depends on changed (a node joined or came back).
    dirty: std::sync::atomic::AtomicBool,
    /// The last placement held back part of an ordered stateful set: a change in what
    /// serves places again.
    ordered_held: std::sync::atomic::AtomicBool,
    /// Every node's assignment, and every deployment's templates, at one revision (see
    /// `assignment`).
    at_revision: Mutex<Option<Arc<AtRevision>>>,
    /// Held while `at_revision` or the services' table is made: the thousands of tunnels
    /// a change wakes wait for the one making it, rather than each making it again.
    making: Mutex<()>,
    tunnel_serial: std::sync::atomic::AtomicU64,
    /// How the platforms of an image are found out (the registry, in `skiff hub`).
    lookup: Option<PlatformLookup>,
    /// The image proxy agents pull through (the binary wires it to an image store).
    images: Option<ImageProxy>,
    /// The nodes the operator lets serve their site's image cache (`skiff hub
    /// --site-cache NODE`): a node's own word that it serves one is not enough, since it
    /// opens the site's images to it.
    site_cache_nodes: BTreeSet<String>,
    /// Image → the platforms it was last seen to have; absent: any architecture.
    platforms: Mutex<BTreeMap<String, Platforms>>,
    /// Deployment → why some of its instances have no node, as of the last placement.
    unschedulable: Mutex<BTreeMap<String, String>>,
    /// Each node's newest resource sample.
    samples: Mutex<BTreeMap<String, MetricsSample>>,
    /// How long a node certificate is valid.
    cert_ttl: std::time::Duration,
    /// When each node last renewed its certificate / changed its runtimes (rate limits).
    renewed: Mutex<BTreeMap<String, u64>>,
    runtimes_changed: Mutex<BTreeMap<String, u64>>,
    /// What nodes did that the hub refused: reports of instances not theirs, floods.
    pub security: crate::events::EventLog,
    /// The events nodes shipped, as the store keeps them ([`Fleet::persist_events`]).
    shipped: crate::events::EventLog,
    /// Whether the hub is cut off from its store (told to every node: they move to a
    /// hub that leads, should one answer them).
    cut_off: tokio::sync::watch::Sender<bool>,
    /// When each node last had a report refused with an event (one a minute at most, so a
    /// node cannot flush the security log or grow this with made-up names).
    refused: Mutex<HashMap<String, u64>>,
    /// Every hub of the store (the binary keeps it current): told to nodes at their join,
    /// when their tunnel opens and when it changes.
    hubs: tokio::sync::watch::Sender<Vec<String>>,
    /// Bumped when a node's instances that serve, or its mesh address, changed.
    mesh_gen: tokio::sync::watch::Sender<u64>,
    /// The services' table, and the revision and generation of node reports it is current at.
    #[allow(clippy::type_complexity)]
    mesh_table: Mutex<Option<((u64, u64), Arc<mesh::MeshTable>)>>,
    /// Whether this hub runs placement (see [`Fleet::set_leads`]).
    leads: std::sync::atomic::AtomicBool,
    /// The store's revision the last placement saw (a change made through another hub is
    /// placed at the next tick).
    placed_at: std::sync::atomic::AtomicU64,
    /// The hub clock's time just before the last placement read the nodes' states, and
    /// what time alone can change of that placement as it saw it ([`time_print`]).
    placed_ms: std::sync::atomic::AtomicU64,
    placed_print: std::sync::atomic::AtomicU64,
    /// What peers are told (see `peers.rs`): this start's epoch, and the newest
    /// generation with the generation of each node's last change and last sample.
    epoch: String,
    changes: Mutex<peers::Changes>,
    peers: Mutex<BTreeMap<String, peers::PeerView>>,
    /// The store's revision as last read, and when: every tunnel's wake, report and pull
    /// asks for it, and on etcd a read is a round trip (see [`Fleet::store_revision`]).
    revision_read: Mutex<Option<(u64, std::time::Instant)>>,
    /// When the hub last looked for its own nodes gone silent (`peers::sweep`).
    swept_ms: std::sync::atomic::AtomicU64,
    /// Joins in progress: a join waits on the store, one change of this hub's at a time,
    /// so thousands joining at once would hold every blocking thread of the hub (and
    /// nothing else that needs one, a tunnel's connect or a peer's question, would run).
    pub(crate) joining: tokio::sync::Semaphore,
}

/// How long a read of the store's revision stands for the fleet's many askers.
const REVISION_FRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// How long a node certificate is valid unless the hub is told otherwise.
pub const NODE_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// A node may renew its certificate and change its runtimes at most this often.
const NODE_CHANGE_EVERY_MS: u64 = 60_000;

/// What the hub derives from its store once per revision, for every node.
struct AtRevision {
    revision: u64,
    /// Each node's part (its `revision` is the one it was made at: [`Fleet::assignment`]
    /// tells the current one). Shared with the next revision when what it is made of did
    /// not change: a join moves the revision, and 100,000 parts are not made again.
    nodes: Arc<BTreeMap<String, Arc<Assignment>>>,
    /// The JSON of every spec in `nodes`, made with them.
    specs_json: Arc<crate::tunnel::SpecsJson>,
    /// Deployment → every template its history holds.
    templates: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// What agents scrape (see [`Assignment::metrics`]).
    metrics: Vec<String>,
    /// What `nodes` was made of, besides `templates`.
    made_of: PartsMadeOf,
}

/// The deployments, rolling waves and placement the nodes' parts were made from.
#[derive(Default)]
struct PartsMadeOf {
    specs: BTreeMap<String, Arc<Deployment>>,
    waves: BTreeMap<String, (std::collections::HashSet<String>, Arc<Deployment>)>,
    slots: Arc<Vec<crate::schedule::Slot>>,
}

impl PartsMadeOf {
    /// Whether the parts made of `self` are those made of `o`: the same slots, and the same
    /// spec and wave for every deployment placed (one stored but not placed yet, as at an
    /// apply's own revision before the placement's, is in no node's part).
    fn same(&self, o: &PartsMadeOf) -> bool {
        if !(Arc::ptr_eq(&self.slots, &o.slots) || self.slots == o.slots) {
            return false;
        }
        let placed: BTreeSet<&str> = self.slots.iter().map(|s| s.deployment.as_str()).collect();
        placed.into_iter().all(|d| self.specs.get(d) == o.specs.get(d) && self.waves.get(d) == o.waves.get(d))
    }
}

/// What a node may report: per deployment assigned to it, the numbers in its instances'
/// names (slot numbers, a stateful set's from 0) and every template the hub has had for
/// it (an old version still running during an update is the node's as well).
#[derive(Debug, Default)]
struct Allowed {
    deployments: BTreeMap<String, (std::collections::BTreeSet<u32>, std::collections::BTreeSet<String>)>,
}

impl Allowed {
    /// Why `i` is not the node's to report, if it is not.
    fn refuse(&self, node: &str, i: &InstanceStatus) -> Option<String> {
        if i.node != node {
            return Some(format!("it names node {:?}", i.node));
        }
        let Some((slots, templates)) = self.deployments.get(&i.deployment) else {
            return Some(format!("deployment {:?} is not assigned to it", i.deployment));
        };
        if !templates.contains(&i.template) {
            return Some(format!("template {} is not one the hub sent", i.template));
        }
        let rest = i.name.strip_prefix(&i.deployment).and_then(|r| r.strip_prefix('-')).unwrap_or("");
        let (slot, tag) = match rest.split_once('-') {
            Some((slot, tag)) => (slot, Some(tag)),
            None => (rest, None),
        };
        // As the agent writes it (`web-1`, never `web-01`): one name per slot.
        let slot_ok = slot.parse::<u32>().is_ok_and(|n| n.to_string() == slot && slots.contains(&n));
        let tag_ok = tag.is_none_or(|t| i.template.starts_with(t) && t.len() == 6);
        (!slot_ok || !tag_ok).then(|| "it is not in a slot assigned to the node".to_string())
    }
}

/// One call of the image proxy: the asking node and the request body in, the answer (or an
/// HTTP status and a message) out.
pub type ImageCall =
    Arc<dyn Fn(String, Vec<u8>) -> crate::BoxFuture<'static, Result<Vec<u8>, (u16, String)>> + Send + Sync>;

/// The hub's image proxy (`skiff_image::proxy`): `resolve` takes a JSON request and
/// answers JSON, `chunks` takes sha256 digests and answers the chunks' bytes.
#[derive(Clone)]
pub struct ImageProxy {
    pub resolve: ImageCall,
    pub chunks: ImageCall,
    /// Takes an image the operator built (an OCI archive, streamed) into the hub's store
    /// under a reference, to offer to nodes; none: this hub takes none.
    pub push: Option<ImagePush>,
}

/// `push`: the reference, the digest the pusher has (the hub answers without the archive
/// when it holds that build already: 404 asks for it) and the request's body in, the
/// stored image out.
pub type ImagePush = Arc<
    dyn Fn(
            String,
            Option<String>,
            axum::body::Body,
        ) -> crate::BoxFuture<'static, Result<skiff_model::api::ImagePushed, (u16, String)>>
        + Send
        + Sync,
>;

/// Finds out which `(architecture, variant)`s an image is built for.
pub type PlatformLookup = Arc<dyn Fn(String) -> crate::BoxFuture<'static, Result<Platforms, String>> + Send + Sync>;

/// How long a platform lookup may take before the image counts as "any architecture".
const LOOKUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Fleet {
    pub fn new(ca: Ca, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Self, FleetError> {
        let ca_sha256 = ca.fingerprint().map_err(failed)?;
        let rev = store.revision().map_err(internal)?;
        Ok(Fleet {
            ca,
            ca_sha256,
            store,
            seen: Mutex::new(HashMap::new()),
            statuses: Mutex::new(BTreeMap::new()),
            events: Mutex::new(BTreeMap::new()),
            started_ms: clock.now_ms(),
            clock,
            changed: tokio::sync::watch::channel(rev).0,
            wake: tokio::sync::watch::channel(0).0,
            woken: Mutex::new(None),
            tunnels: Mutex::new(BTreeMap::new()),
            at_revision: Mutex::new(None),
            making: Mutex::new(()),
            dirty: std::sync::atomic::AtomicBool::new(false),
            ordered_held: std::sync::atomic::AtomicBool::new(false),
            tunnel_serial: std::sync::atomic::AtomicU64::new(1),
            lookup: None,
            images: None,
            site_cache_nodes: BTreeSet::new(),
            platforms: Mutex::new(BTreeMap::new()),
            unschedulable: Mutex::new(BTreeMap::new()),
            samples: Mutex::new(BTreeMap::new()),
            cert_ttl: NODE_CERT_TTL,
            renewed: Mutex::new(BTreeMap::new()),
            runtimes_changed: Mutex::new(BTreeMap::new()),
            security: crate::events::EventLog::new("fleet", 1000),
            shipped: crate::events::EventLog::new("nodes", STORED_NODE_EVENTS).with_per_node(STORED_EVENTS_PER_NODE),
            cut_off: tokio::sync::watch::channel(false).0,
            refused: Mutex::new(Default::default()),
            hubs: tokio::sync::watch::channel(vec![]).0,
            mesh_gen: tokio::sync::watch::channel(0).0,
            mesh_table: Mutex::new(None),
            leads: std::sync::atomic::AtomicBool::new(true),
            placed_at: std::sync::atomic::AtomicU64::new(0),
            placed_ms: std::sync::atomic::AtomicU64::new(0),
            placed_print: std::sync::atomic::AtomicU64::new(0),
            epoch: crate::pki::random_hex().map_err(failed)?,
            changes: Default::default(),
            peers: Mutex::new(BTreeMap::new()),
            revision_read: Mutex::new(None),
            swept_ms: Default::default(),
            joining: tokio::sync::Semaphore::new(JOINS_AT_ONCE),
        })
    }

    /// The hubs of the store, as nodes should know them (usable entries only).
    pub fn set_hubs(&self, hubs: &[String]) {
        let list = skiff_model::proto::usable_hubs(hubs);
        self.hubs.send_if_modified(|h| {
            let changed = *h != list;
            *h = list;
            changed
        });
    }

    /// The hubs nodes are told of, and their changes.
    pub fn hubs(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.hubs.subscribe()
    }

    /// The hub is cut off from its store: every node is told.
    pub fn set_cut_off(&self) {
        self.cut_off.send_replace(true);
    }

    pub fn cut_off(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cut_off.subscribe()
    }

    /// Node certificates are valid this long (and renewed at two thirds of it).
    pub fn with_cert_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.cert_ttl = ttl;
        self
    }

    pub fn cert_ttl(&self) -> std::time::Duration {
        self.cert_ttl
    }

    pub fn with_platform_lookup(mut self, lookup: PlatformLookup) -> Self {
        self.lookup = Some(lookup);
        self
    }

    pub fn with_image_proxy(mut self, images: ImageProxy) -> Self {
        self.images = Some(images);
        self
    }

    pub fn with_site_caches(mut self, nodes: impl IntoIterator<Item = String>) -> Self {
        self.site_cache_nodes = nodes.into_iter().collect();
        self
    }

    pub fn image_proxy(&self) -> Option<&ImageProxy> {
        self.images.as_ref()
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
            // One tunnel per node: an older one (a second connection with the same
            // certificate, or a node that dialled again) is closed, so that closing the
            // node's tunnel on a delete or replacement really cuts it off.
            if let Some(old) = m.insert(node.to_string(), Arc::clone(&t)) {
                old.kick.notify_one();
            }
        }
        self.node_changed(node);
        t
    }

    /// Forgets a node's tunnel, unless a newer one has replaced it.
    pub fn close_tunnel(&self, node: &str, serial: u64) {
        if let Ok(mut m) = self.tunnels.lock() {
            if m.get(node).is_some_and(|t| t.serial == serial) {
                m.remove(node);
            } else {
                return;
            }
        }
        self.node_changed(node);
    }

    /// The hub's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub fn tunnel(&self, node: &str) -> Option<Arc<crate::tunnel::Tunnel>> {
        self.tunnels.lock().ok()?.get(node).cloned()
    }

    /// Checks the token and the request, signs the node's CSR and records the node, in
    /// one transaction with the token's use. A name that exists is refused unless the
    /// token was made to replace that node; a replaced node's certificates are revoked
    /// and its open tunnel is closed.
    pub fn join(&self, req: &JoinRequest) -> Result<JoinResponse, FleetError> {
        let now = self.clock.now_ms();
        let unauth = |m: &str| FleetError::Unauthenticated(format!("token: {m}"));
        let (id, secret) = req.token.split_once('.').ok_or_else(|| unauth("not <id>.<secret>"))?;
        let rec = crate::tokens::lookup(&*self.store, id, secret)
            .map_err(token_failed)?
            .ok_or_else(|| unauth("unknown token"))?;
        skiff_model::validate::check_name("node", &req.node).map_err(|e| FleetError::Invalid(e.to_string()))?;
        for (k, v) in &req.spec.labels {
            if !skiff_model::validate::is_label_key(k) || v.len() > 63 || v.chars().any(char::is_whitespace) {
                return Err(FleetError::Invalid(format!("spec.labels.{k}: not a valid label")));
            }
        }
        if req.spec.arch.is_empty() || req.spec.os.is_empty() {
            return Err(FleetError::Invalid("spec: os and arch are required".into()));
        }
        check_facts(&req.spec.runtimes, &req.spec.versions)?;
        check_devices(&req.spec.devices)?;
        let cert = self
            .ca
            .sign_node(&req.node, &req.csr, now, self.cert_ttl)
            .map_err(|e| FleetError::Invalid(e.to_string()))?;
        let j = NodeJoin {
            token_id: &rec.id,
            name: &req.node,
            serial: &cert.serial,
            key_sha256: &cert.key_sha256,
            not_after_ms: cert.not_after_ms,
            info: &req.spec,
            now_ms: now,
        };
        let joined = match self.store.join_node(&j).map_err(internal)? {
            Ok(j) => j,
            Err(r @ JoinRefused::UnknownToken(_)) => return Err(FleetError::Unauthenticated(r.to_string())),
            Err(r @ JoinRefused::NameTaken(_)) => return Err(FleetError::Conflict(r.to_string())),
            Err(r) => return Err(FleetError::Forbidden(r.to_string())),
        };
        skiff_sys::crash::point("hub.join.stored");
        if joined.replaced {
            self.forget(&req.node);
            let msg = format!("joined again with token {}; the certificates it had are revoked", rec.id);
            self.security.push(now, &req.node, "NodeReplaced", msg);
        }
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(JoinResponse { cert: cert.pem, ca: self.ca.pem().to_string(), hubs: self.hubs.borrow().clone() })
    }

    /// Closes the node's tunnel and drops what it reported (it was replaced or revoked).
    fn forget(&self, name: &str) {
        if let Some(t) = self.tunnel(name) {
            t.kick.notify_one();
        }
        if let Ok(mut m) = self.samples.lock() {
            m.remove(name);
        }
        if let Ok(mut m) = self.statuses.lock() {
            m.remove(name);
        }
    }

    /// Signs a renewed certificate for a node from a CSR it sent over its tunnel (at most
    /// once a minute), if the certificate the tunnel was opened with is still the node's
    /// (not revoked, not replaced). The node's current certificate stays accepted until
    /// it presents the new one.
    pub fn renew(&self, peer: &Peer, name: &str, csr: &str) -> Result<String, FleetError> {
        self.authorize(peer, name)?;
        let now = self.clock.now_ms();
        let recent = self.renewed.lock().ok().and_then(|m| m.get(name).copied());
        if recent.is_some_and(|t| now.saturating_sub(t) < NODE_CHANGE_EVERY_MS) {
            return Err(FleetError::Forbidden(format!("node {name:?} renewed its certificate less than a minute ago")));
        }
        let cert = self.ca.sign_node(name, csr, now, self.cert_ttl).map_err(|e| FleetError::Invalid(e.to_string()))?;
        self.store.renew_cert(name, &cert.serial, cert.not_after_ms, &cert.key_sha256).map_err(internal)?;
        // Peers take direct connections by serial: they learn the new one.
        self.mesh_moved();
        if let Ok(mut m) = self.renewed.lock() {
            m.insert(name.to_string(), now);
        }
        tracing::info!(node = %name, serial = %cert.serial, "node certificate renewed");
        Ok(cert.pem)
    }

    /// Whether the hub has heard how things stand: every node holding slots has reported
    /// its instances since the hub started, or a heartbeat grace has passed (the nodes
    /// still silent are then really away). Until then the controllers hold: after a
    /// restart, an empty report would look like a wave with nothing left to do, a global
    /// deployment with nothing to run, an autoscaler's target with no load.
    pub fn settled(&self, now: u64) -> bool {
        if now.saturating_sub(self.started_ms) > HEARTBEAT_GRACE_MS {
            return true;
        }
        let Ok(slots) = self.store.slots() else { return false };
        let Ok(reported) = self.statuses.lock() else { return false };
        slots.iter().all(|s| reported.contains_key(&s.node))
    }

    /// The node's record, if it is joined.
    pub fn store_node(&self, name: &str) -> Option<NodeRecord> {
        self.store.node(name).ok().flatten()
    }

    /// Whether the node's certificate should be renewed now: a third of its lifetime left,
    /// or valid for longer than this hub issues (one from before certificates expired).
    pub fn should_renew(&self, rec: &NodeRecord, now: u64) -> bool {
        let ttl = self.cert_ttl.as_millis() as u64;
        match rec.not_after_ms {
            None => true,
            Some(t) => t > now.saturating_add(ttl + ttl / 10) || t.saturating_sub(now) < ttl / 3,
        }
    }

    /// Records the runtimes a node says it has (in its hello) and the versions of what
    /// runs them, when they changed: a node upgraded to a build with WebAssembly takes
    /// wasm instances from then on, one whose runc was upgraded stops being flagged.
    /// A node may change them once a minute: each change is a new global revision, so a
    /// node that changed its hello every second would make every node's assignment move.
    pub fn set_node_facts(
        &self,
        name: &str,
        runtimes: Option<&[String]>,
        versions: Option<&BTreeMap<String, String>>,
        devices: Option<&BTreeMap<String, u32>>,
    ) -> Result<(), FleetError> {
        check_facts(runtimes.unwrap_or_default(), versions.unwrap_or(&BTreeMap::new()))?;
        check_devices(devices.unwrap_or(&BTreeMap::new()))?;
        let Some(rec) = self.store.node(name).map_err(internal)? else { return Ok(()) };
        let mut info = rec.info.clone();
        if let Some(r) = runtimes {
            info.runtimes = r.to_vec();
        }
        if let Some(v) = versions {
            info.versions = v.clone();
        }
        if let Some(d) = devices {
            info.devices = d.clone();
        }
        if info == rec.info {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let recent = self.runtimes_changed.lock().ok().and_then(|m| m.get(name).copied());
        if recent.is_some_and(|t| now.saturating_sub(t) < NODE_CHANGE_EVERY_MS) {
            return Err(FleetError::Forbidden(format!(
                "node {name:?} changed its runtimes less than a minute ago; ignored"
            )));
        }
        self.store.set_node_info(name, &info).map_err(internal)?;
        if let Ok(mut m) = self.runtimes_changed.lock() {
            m.insert(name.to_string(), now);
        }
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// [`Fleet::set_node_facts`] for runtimes only.
    pub fn set_runtimes(&self, name: &str, runtimes: &[String]) -> Result<(), FleetError> {
        self.set_node_facts(name, Some(runtimes), None, None)
    }

    /// The node record behind a connection's certificate, if it may act as `name`.
    pub fn authorize(&self, peer: &Peer, name: &str) -> Result<NodeRecord, FleetError> {
        self.check_node(peer, name, true)
    }

    /// [`Fleet::authorize`] again for a peer it let in moments ago, without the store's
    /// list of revoked certificates: every revocation also removes or changes the node's
    /// record (`revoke_node`, `promote_cert`), which is checked.
    pub fn authorize_again(&self, peer: &Peer, name: &str) -> Result<NodeRecord, FleetError> {
        self.check_node(peer, name, false)
    }

    fn check_node(&self, peer: &Peer, name: &str, revocations: bool) -> Result<NodeRecord, FleetError> {
        let (Some(who), Some(serial)) = (&peer.node, &peer.serial) else {
            return Err(FleetError::Unauthenticated("a node certificate is required (join first)".into()));
        };
        let rec = self
            .store
            .node(who)
            .map_err(internal)?
            .ok_or_else(|| FleetError::Forbidden(format!("node {who:?} is not joined")))?;
        if revocations && self.store.is_revoked(serial).map_err(internal)? {
            return Err(FleetError::Forbidden(format!("this certificate of node {who:?} has been revoked")));
        }
        if who != name {
            return Err(FleetError::Forbidden(format!("node {who:?} may not act for node {name:?}")));
        }
        if &rec.cert_serial == serial {
            return Ok(rec);
        }
        if rec.next_serial.as_ref() == Some(serial) {
            // The node uses its renewed certificate: the one before is retired.
            self.store.promote_cert(who, serial, self.clock.now_ms()).map_err(internal)?;
            self.mesh_moved();
            return self.store.node(who).map_err(internal)?.ok_or_else(|| FleetError::Forbidden("gone".into()));
        }
        Err(FleetError::Forbidden(format!("this certificate of node {who:?} has been replaced")))
    }

    /// `skiff delete node`: revokes the node's certificates for good, forgets it (its
    /// name may join again with a new token) and closes its tunnel.
    pub fn revoke_node(&self, name: &str) -> Result<(), FleetError> {
        if !self.store.revoke_node(name, self.clock.now_ms()).map_err(internal)? {
            return Err(FleetError::NotFound(format!("node {name:?} not found")));
        }
        // Its open connection goes too; a new one is refused at the handshake's authorize.
        self.forget(name);
        if let Ok(mut m) = self.seen.lock() {
            m.remove(name);
        }
        // What it shipped goes with it (a node joining later under its name starts clean).
        if let Ok(mut ev) = self.events.lock() {
            ev.remove(name);
        }
        self.shipped.forget_node(name);
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
        let now = self.clock.now_ms();
        let (changed, arrived) = match self.seen.lock() {
            Ok(mut seen) => {
                let s = seen.entry(node.to_string()).or_insert_with(|| Seen::new(now));
                // Held by another hub until now: heard here, it is this one's.
                let arrived = s.via.take().is_some();
                (s.heard(now), arrived)
            }
            Err(_) => (false, false),
        };
        if changed {
            // Placement runs on the next tick, once for however many nodes came up.
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if changed || arrived {
            self.node_changed(node);
        }
    }

    /// Stores what a node reports: its instances and the events it ships. Only instances
    /// in slots the hub assigned to the node, of templates the hub sent, are believed;
    /// the others are dropped with a security event (once each). Events carry the node
    /// that shipped them, whatever it wrote.
    pub fn report(&self, node: &str, status: NodeStatus) -> StatusAck {
        let ack = StatusAck { events_through: status.events_through };
        let shipped: Vec<EventRecord> = status
            .events
            .into_iter()
            .map(|e| EventRecord {
                time_ms: e.time_ms,
                object: cap_text(e.object, 256),
                reason: cap_text(e.reason, 128),
                message: cap_text(e.message, EVENT_MESSAGE_MAX),
                node: Some(node.to_string()),
            })
            .collect();
        // The newest of a big batch only, in the store (a node keeps at most its share).
        let now = self.clock.now_ms();
        for r in shipped.iter().skip(shipped.len().saturating_sub(STORED_EVENTS_PER_NODE)) {
            let message = cap_text(r.message.clone(), STORED_EVENT_MESSAGE_MAX);
            self.shipped.record(now, EventRecord { message, ..r.clone() });
        }
        self.remember_events(node, shipped);
        let allowed = self.allowed(node);
        let mut instances = status.instances;
        let mut refused: Vec<String> = vec![];
        instances.retain(|i| match allowed.refuse(node, i) {
            None => true,
            Some(why) => {
                refused.push(format!("{} ({why})", cap_text(i.name.clone(), 128)));
                false
            }
        });
        if !refused.is_empty() {
            let now = self.clock.now_ms();
            let due = self.refused.lock().is_ok_and(|mut r| {
                let last = r.entry(node.to_string()).or_insert(0);
                let due = *last == 0 || now.saturating_sub(*last) >= NODE_CHANGE_EVERY_MS;
                if due {
                    *last = now;
                }
                due
            });
            if due {
                let n = refused.len();
                refused.truncate(5);
                let more = if n > 5 { format!(" and {} more", n - 5) } else { String::new() };
                let msg = format!("reported {n} instance(s) not its own: {}{more}; ignored", refused.join(", "));
                self.security.push(now, node, "ReportRefused", msg);
            }
        }
        // What the fleet's services are made of: which instances serve, per deployment.
        let serving = |v: &[InstanceStatus]| -> BTreeMap<(String, String), bool> {
            v.iter().map(|i| ((i.deployment.clone(), i.name.clone()), mesh::serves(i))).collect()
        };
        let (mut moved, mut told) = (false, false);
        if let Ok(mut st) = self.statuses.lock() {
            let new = serving(&instances);
            let old = st.get(node);
            // A node reporting for the first time with nothing that serves changes no
            // service (thousands connecting at once would each rebuild every view).
            moved |= old.map(|o| serving(o)).unwrap_or_default() != new;
            told |= old != Some(&instances);
            st.insert(node.to_string(), instances);
        }
        if let Ok(mut seen) = self.seen.lock() {
            if let Some(s) = seen.get_mut(node) {
                let allowed = self.site_cache_nodes.contains(node);
                let cache = status.cache.filter(|u| allowed && skiff_model::proto::valid_cache_url(u));
                told |= s.cache != cache;
                s.cache = cache;
                let mesh = status.mesh.filter(|a| skiff_model::mesh::valid_mesh_addr(a));
                moved |= s.mesh != mesh;
                s.mesh = mesh;
                if s.problems != status.problems {
                    told = true;
                    s.problems = status.problems;
                    if s.heard(self.clock.now_ms()) {
                        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        if moved || told {
            self.node_changed(node);
        }
        if moved {
            self.mesh_moved();
            if self.ordered_held.load(std::sync::atomic::Ordering::Relaxed) {
                self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        ack
    }

    /// Keeps the newest of the samples a node shipped (older ones, buffered while it was
    /// offline, arrive first and are superseded).
    /// Only the node's own instances count, and no figure above what the node has: a node
    /// cannot make the autoscaler scale another node's work, or scale its own past what
    /// its CPUs could use.
    pub fn record_metrics(&self, node: &str, samples: Vec<MetricsSample>) {
        let Some(mut newest) = samples.into_iter().max_by_key(|m| m.time_ms) else { return };
        let allowed = self.allowed(node);
        let (cores, memory) = match self.store.node(node) {
            Ok(Some(rec)) => (rec.info.cpu_millis as f64 / 1000.0, rec.info.memory_bytes),
            _ => return,
        };
        newest.node = node.to_string();
        newest.instances.retain(|m| {
            allowed.deployments.get(&m.deployment).is_some_and(|(slots, _)| {
                let rest = m.instance.strip_prefix(&m.deployment).and_then(|r| r.strip_prefix('-')).unwrap_or("");
                let slot = rest.split('-').next().unwrap_or_default();
                slot.parse::<u32>().is_ok_and(|n| n.to_string() == slot && slots.contains(&n))
            })
        });
        for m in &mut newest.instances {
            m.series.retain(|s| s.value.is_finite());
            m.series.truncate(skiff_model::metrics::MAX_SERIES);
            m.cpu_cores = m.cpu_cores.map(|c| if c.is_finite() { c.clamp(0.0, cores) } else { 0.0 });
            m.memory_bytes = m.memory_bytes.min(memory);
        }
        newest.host.cpu_cores = newest.host.cpu_cores.map(|c| if c.is_finite() { c.clamp(0.0, cores) } else { 0.0 });
        if let Ok(mut all) = self.samples.lock() {
            if all.get(node).is_none_or(|m| m.time_ms < newest.time_ms) {
                all.insert(node.to_string(), newest);
            } else {
                return;
            }
        }
        self.node_sampled(node);
    }

    /// The newest sample of every node that shipped one.
    pub fn metrics(&self) -> Vec<MetricsSample> {
        self.samples.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Resolves when the placement revision may have moved past `after`.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn remember_events(&self, node: &str, events: Vec<EventRecord>) {
        if let Ok(mut ev) = self.events.lock() {
            let q = ev.entry(node.to_string()).or_default();
            q.extend(events);
            keep_newest(q);
        }
    }

    /// Keeps the fleet's security events and the events nodes ship in `store` too, and
    /// shows what it kept of them: a hub that starts or takes over shows what nodes
    /// shipped to the one before it, and what it refused of them.
    pub fn persist_events(&self, store: Arc<dyn Store>) {
        self.security.persist(Arc::clone(&store));
        self.shipped.persist(store);
        self.show_kept();
    }

    /// What the other hubs of the store kept of nodes' events and refusals since this
    /// one started (it takes the lead: it shows what nodes shipped to the one before).
    pub fn reload_events(&self) {
        self.security.reload(&*self.store);
        self.shipped.reload(&*self.store);
        self.show_kept();
    }

    /// Nodes' events as kept, each node's before what it shipped to this hub since.
    fn show_kept(&self) {
        let mut by_node: BTreeMap<String, Vec<EventRecord>> = BTreeMap::new();
        for r in self.shipped.list() {
            if let Some(n) = r.node.clone() {
                by_node.entry(n).or_default().push(r);
            }
        }
        if let Ok(mut ev) = self.events.lock() {
            for (n, kept) in by_node {
                let q = ev.entry(n).or_default();
                // Kept first, then what arrived since this hub started.
                let since: Vec<EventRecord> = q.drain(..).collect();
                q.extend(kept.into_iter().filter(|k| !since.contains(k)));
                q.extend(since);
                keep_newest(q);
            }
        }
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
                s.went_silent(now);
                (s.state, s.since_ms)
            }
            None => (NodeState::Unknown, self.started_ms),
        }
    }

    pub fn views(&self) -> Result<Vec<NodeView>, FleetError> {
        let now = self.clock.now_ms();
        Ok(self
            .store
            .nodes()
            .map_err(internal)?
            .iter()
            .map(|n| {
                let (state, since) = self.state_of(&n.name, now);
                let i = &n.info;
                NodeView {
                    name: n.name.clone(),
                    labels: i.labels.clone(),
                    arch: i.arch.clone(),
                    variant: i.variant.clone(),
                    cpu_millis: i.cpu_millis,
                    memory_bytes: i.memory_bytes,
                    runtimes: i.runtimes.clone(),
                    versions: i.versions.clone(),
                    devices: i.devices.clone(),
                    state,
                    state_since_ms: since,
                }
            })
            .collect())
    }

    /// The image caches of `node`'s site: the Ready nodes with the same `site` label
    /// that serve one (not `node` itself), and the site's token.
    pub fn site_caches(&self, node: &str) -> Result<skiff_model::proto::SiteCaches, FleetError> {
        let nodes = self.store.nodes().map_err(internal)?;
        let site = nodes.iter().find(|n| n.name == node).and_then(|n| n.info.labels.get("site").cloned());
        let Some(site) = site else { return Ok(Default::default()) };
        let now = self.clock.now_ms();
        let mut caches = vec![];
        for n in nodes.iter() {
            if n.name == node || n.info.labels.get("site") != Some(&site) {
                continue;
            }
            if self.state_of(&n.name, now).0 != NodeState::Ready {
                continue;
            }
            if let Some(url) = self.seen.lock().ok().and_then(|s| s.get(&n.name).and_then(|x| x.cache.clone())) {
                caches.push(url);
            }
        }
        Ok(skiff_model::proto::SiteCaches {
            token: self.ca.derive_secret(&format!("site-cache:{site}")),
            site: Some(site),
            caches,
        })
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
            .iter()
            .filter(|s| s.deployment == deployment)
            .map(|s| s.node.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The store's revision as it moves, where other hubs change the store too.
    pub fn store_revisions(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.store.revisions()
    }

    /// Wakes the nodes' long-polls and tunnels after a change of the store's revision made
    /// outside `reschedule` (a rollout's next wave).
    pub fn revision_changed(&self) {
        if let Ok(rev) = self.read_revision() {
            let newer = self.changed.send_if_modified(|r| {
                let newer = rev > *r;
                if newer {
                    *r = rev;
                }
                newer
            });
            if newer {
                self.wake_tunnels();
            }
        }
    }

    /// Moves when the tunnels have something to look at: see [`Fleet::wake_tunnels`].
    pub fn wakes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Wakes the tunnels if the current revision changed what nodes are told: every
    /// node's part, or the record of a node that holds one (`tells_the_same_of_nodes`; a
    /// node's report wakes them on its own, `mesh_changes`). Both are made here, once, on this thread,
    /// before any tunnel looks. A revision that moved neither (an apply not placed yet, a
    /// placement that moved no slot) wakes none of the thousands of tunnels; where they
    /// cannot be made (the store is not answering), the tunnels are woken as for a change.
    fn wake_tunnels(&self) {
        let made = self.at_revision().and_then(|at| Ok((Arc::clone(&at.nodes), self.mesh_table()?)));
        let moved = match made {
            Ok((nodes, table)) => self.woken.lock().map_or(true, |mut w| {
                let same = w.as_ref().is_some_and(|(n, t)| Arc::ptr_eq(n, &nodes) && t.tells_the_same_of_nodes(&table));
                *w = Some((nodes, table));
                !same
            }),
            Err(_) => true,
        };
        if moved {
            self.wake.send_modify(|g| *g += 1);
        }
    }

    /// Where `deployments` would run if they were the whole desired state, without
    /// storing anything (`apply --dry-run`): instance name → node, and the unplaceable.
    pub fn plan(&self, deployments: &[Deployment]) -> Result<Plan, FleetError> {
        let current = self.store.slots().map_err(internal)?;
        Ok(schedule::schedule(deployments, &self.known_platforms(), &self.views()?, &current, self.clock.now_ms()))
    }

    /// Places every deployment over the joined nodes and stores the result; wakes the
    /// nodes' long-polls and tunnels when the revision moved (by this placement or by any
    /// change to deployments before it, since `set_slots` returns the current revision).
    /// A hub that does not lead places nothing (the one that leads places what it
    /// stored at its next tick); it only wakes its own nodes.
    pub fn reschedule(&self) -> Result<Plan, FleetError> {
        if !self.leads() {
            self.revision_changed();
            return Ok(Plan::default());
        }
        let started = std::time::Instant::now();
        let deployments: Vec<Deployment> = self.store.list().map_err(internal)?.into_iter().map(|s| s.spec).collect();
        let current = self.store.slots().map_err(internal)?;
        // A stateful set's slot goes back to the node its volumes are on.
        let last = ordered::last_nodes(&*self.store, &deployments).map_err(internal)?;
        let placed = ordered::with_last_nodes(&deployments, &current, &last);
        let now = self.clock.now_ms();
        let views = self.views()?;
        let print =
            time_print(views.iter().map(|v| (v.name.as_str(), v.state, v.state_since_ms)), &afters(&deployments), now);
        took("read what placement is made of", views.len(), started);
        let started = std::time::Instant::now();
        let mut plan = schedule::schedule(&deployments, &self.known_platforms(), &views, &placed, now);
        took("placed", views.len(), started);
        let started = std::time::Instant::now();
        // Every node's report, read only when an ordered stateful set needs it.
        let held = deployments.iter().any(Deployment::ordered) && {
            let reported: Vec<(String, InstanceStatus)> = self
                .statuses
                .lock()
                .map(|s| s.iter().flat_map(|(n, v)| v.iter().map(|i| (n.clone(), i.clone()))).collect())
                .unwrap_or_default();
            ordered::hold(&deployments, &current, &reported, &mut plan)
        };
        self.ordered_held.store(held, std::sync::atomic::Ordering::Relaxed);
        ordered::remember(&*self.store, &deployments, &plan, &last).map_err(internal)?;
        let revision = self.store.set_slots(&plan.slots).map_err(internal)?;
        took("stored the placement", views.len(), started);
        self.placed_at.store(revision, std::sync::atomic::Ordering::Relaxed);
        self.placed_ms.store(now, std::sync::atomic::Ordering::Relaxed);
        self.placed_print.store(print, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut u) = self.unschedulable.lock() {
            u.clone_from(&plan.unschedulable);
        }
        self.revision_changed();
        Ok(plan)
    }

    /// Places again if a node joined or came back since the last placement, if the store
    /// changed since (through another hub of it), or if `force` and time alone may have
    /// moved the placement (see [`Fleet::time_moved_placement`]; and once a minute
    /// whatever it finds). Only on the hub that leads.
    pub fn tick(&self, force: bool) -> Result<(), FleetError> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.leads() {
            return Ok(());
        }
        let stored = || self.store.revision().is_ok_and(|r| r > self.placed_at.load(Relaxed));
        let now = self.clock.now_ms();
        let timed = || {
            let last = self.placed_ms.load(Relaxed);
            // A clock stepped back counts as a minute gone.
            now < last || now - last >= FORCED_PLACEMENT_EVERY_MS || self.time_moved_placement(now)
        };
        if self.dirty.swap(false, Relaxed) || stored() || (force && timed()) {
            if let Err(e) = self.reschedule() {
                // Tried again at the next tick, not at the next change.
                self.dirty.store(true, Relaxed);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether time alone may have moved the placement since the last one: a node's
    /// state is not the one it saw (one fell silent, whoever noticed it first), or a node
    /// not Ready has now been away for another of the deployments' `reschedule_after`s
    /// (see [`time_print`]). Everything else that moves it says so (`dirty`, the store's
    /// revision). A fleet at rest is not placed again every 5 s: at 100,000 nodes a
    /// placement is seconds of a core, taken from pushing an apply to the nodes.
    fn time_moved_placement(&self, now: u64) -> bool {
        let Ok(stored) = self.store.list() else { return true };
        let deployments: Vec<Deployment> = stored.into_iter().map(|s| s.spec).collect();
        let Ok(nodes) = self.store.nodes() else { return true };
        let Ok(mut seen) = self.seen.lock() else { return true };
        let states = nodes.iter().map(|n| match seen.get_mut(&n.name) {
            Some(s) => {
                s.went_silent(now);
                (n.name.as_str(), s.state, s.since_ms)
            }
            None => (n.name.as_str(), NodeState::Unknown, self.started_ms),
        });
        time_print(states, &afters(&deployments), now) != self.placed_print.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The node's assignment at the current revision. Every node's is computed in one pass
    /// per revision and shared, so a change that wakes thousands of long-polls reads the
    /// store once, not once per node.
    pub fn assignment(&self, node: &str) -> Result<Assignment, FleetError> {
        self.assignment_and_specs(node).map(|(a, _)| a)
    }

    /// [`Fleet::assignment`], and the JSON of the specs it holds (made once per revision,
    /// for every node's frame).
    pub fn assignment_and_specs(&self, node: &str) -> Result<(Assignment, Arc<crate::tunnel::SpecsJson>), FleetError> {
        let at = self.at_revision()?;
        let a = match at.nodes.get(node) {
            Some(a) => Assignment { revision: at.revision, ..(**a).clone() },
            None => {
                Assignment { revision: at.revision, deployments: vec![], metrics: at.metrics.clone(), digest: None }
            }
        };
        Ok((a, Arc::clone(&at.specs_json)))
    }

    /// Whether `node` may have the hub pull `image` for it: an image of a deployment the
    /// node is assigned — or, for a node serving its site's cache, assigned to any node of
    /// its site. A node never reaches images beyond its own work (and its site's).
    pub fn may_pull(&self, node: &str, image: &str) -> bool {
        let Ok(at) = self.at_revision() else { return false };
        let has = |n: &str| at.nodes.get(n).is_some_and(|a| a.deployments.iter().any(|d| d.spec.image == image));
        if has(node) {
            return true;
        }
        let serves_cache = self.seen.lock().is_ok_and(|s| s.get(node).is_some_and(|x| x.cache.is_some()));
        if !serves_cache {
            return false;
        }
        let Ok(nodes) = self.store.nodes() else { return false };
        let site = nodes.iter().find(|n| n.name == node).and_then(|n| n.info.labels.get("site"));
        site.is_some_and(|site| nodes.iter().any(|n| n.info.labels.get("site") == Some(site) && has(&n.name)))
    }

    /// What `node` may report, as of the current revision.
    fn allowed(&self, node: &str) -> Allowed {
        let Ok(at) = self.at_revision() else { return Allowed::default() };
        let mut allowed = Allowed::default();
        for a in at.nodes.get(node).iter().flat_map(|a| a.deployments.iter()) {
            let templates = at.templates.get(&a.spec.name).cloned().unwrap_or_default();
            let named = a.indexes.iter().map(|&n| a.spec.ordinal(n)).collect();
            allowed.deployments.insert(a.spec.name.clone(), (named, templates));
        }
        allowed
    }

    /// Every node's assignment and every deployment's templates at the current revision,
    /// computed in one pass per revision and shared: a change that wakes thousands of
    /// long-polls reads the store once, not once per node.
    /// While the store cannot be read (cut off from it, or not answering), the last one
    /// computed stands: what the hub last read, as its other reads then are.
    fn at_revision(&self) -> Result<Arc<AtRevision>, FleetError> {
        let last = || self.at_revision.lock().ok().and_then(|c| c.clone());
        match self.compute_at_revision() {
            Ok(at) => Ok(at),
            Err(e) => last().ok_or(e),
        }
    }

    fn compute_at_revision(&self) -> Result<Arc<AtRevision>, FleetError> {
        let revision = self.store_revision()?;
        let last = || self.at_revision.lock().ok().and_then(|c| c.clone());
        let current = |l: &Option<Arc<AtRevision>>| l.as_ref().filter(|c| c.revision == revision).cloned();
        if let Some(c) = current(&last()) {
            return Ok(c);
        }
        let _one = self.making.lock().map_err(|_| failed("a lock was poisoned"))?;
        let last = last();
        if let Some(c) = current(&last) {
            return Ok(c);
        }
        let started = std::time::Instant::now();
        let specs: BTreeMap<String, Arc<Deployment>> =
            self.store.list().map_err(internal)?.into_iter().map(|s| (s.spec.name.clone(), Arc::new(s.spec))).collect();
        // Deployments rolling out in waves: nodes not reached yet keep the old template.
        let mut waves = BTreeMap::new();
        let mut templates: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for (name, d) in &specs {
            let history = self.store.history(name).map_err(internal)?;
            let t = templates.entry(name.clone()).or_default();
            t.insert(skiff_model::rollout::template_hash(d));
            t.extend(history.iter().map(|r| r.template.clone()));
            if let Some((reached, base)) = crate::rollouts::wave_of(d, &history) {
                let reached: std::collections::HashSet<String> = reached.into_iter().collect();
                waves.insert(name.clone(), (reached, Arc::new(base)));
            }
        }
        // Every name an autoscaler reads from workloads' own metrics (any node's instance
        // may be the one an Object or External metric sums).
        let metrics = skiff_model::autoscale::scraped_names(specs.values().filter_map(|d| d.autoscale.as_ref()));
        let made_of = PartsMadeOf { specs, waves, slots: self.store.slots().map_err(internal)? };
        took("read what every node's part is made of", made_of.slots.len(), started);
        let (nodes, specs_json) = match last {
            Some(l) if l.made_of.same(&made_of) && l.metrics == metrics => {
                (Arc::clone(&l.nodes), Arc::clone(&l.specs_json))
            }
            _ => {
                let started = std::time::Instant::now();
                let specs = made_of.specs.values().chain(made_of.waves.values().map(|(_, base)| base));
                let made =
                    (Arc::new(parts(&made_of, &metrics, revision)), Arc::new(crate::tunnel::SpecsJson::of(specs)));
                took("made every node's part", made.0.len(), started);
                made
            }
        };
        let at = Arc::new(AtRevision { revision, nodes, specs_json, templates, metrics, made_of });
        if let Ok(mut c) = self.at_revision.lock() {
            *c = Some(Arc::clone(&at));
        }
        Ok(at)
    }
}

/// The deployments' distinct `reschedule_after`s.
fn afters(deployments: &[Deployment]) -> Vec<u64> {
    let set: BTreeSet<u64> = deployments.iter().filter_map(|d| d.placement.reschedule_after_ms).collect();
    set.into_iter().collect()
}

/// What time alone can change of a placement, as one number: each node's state, and for a
/// node not Ready, how many of `afters` it has been away for at `now` (each moves slots).
/// Order does not matter (a sum); a change of either changes it.
fn time_print<'a>(nodes: impl Iterator<Item = (&'a str, NodeState, u64)>, afters: &[u64], now: u64) -> u64 {
    use std::hash::BuildHasher;
    let h = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default();
    nodes.fold(0u64, |sum, (name, state, since)| {
        let away = match state {
            NodeState::Ready => 0,
            _ => afters.iter().filter(|&&a| since.saturating_add(a) <= now).count(),
        };
        let state = match state {
            NodeState::Ready => 0u8,
            NodeState::NotReady => 1,
            NodeState::Unknown => 2,
        };
        sum.wrapping_add(h.hash_one((name, state, away)))
    })
}

/// Each node's part of `m`.
fn parts(m: &PartsMadeOf, metrics: &[String], revision: u64) -> BTreeMap<String, Arc<Assignment>> {
    let mut per_node: BTreeMap<&str, BTreeMap<&str, Vec<u32>>> = BTreeMap::new();
    for s in m.slots.iter() {
        per_node.entry(&s.node).or_default().entry(&s.deployment).or_default().push(s.index);
    }
    per_node
        .into_iter()
        .map(|(n, deps)| {
            let deployments = deps
                .into_iter()
                .filter_map(|(d, indexes)| {
                    let spec = match m.waves.get(d) {
                        Some((reached, base)) if !reached.contains(n) => base,
                        _ => m.specs.get(d)?,
                    };
                    Some(Assigned { spec: Arc::clone(spec), indexes })
                })
                .collect();
            (n.to_string(), Arc::new(Assignment { revision, deployments, metrics: metrics.to_vec(), digest: None }))
        })
        .collect()
}

impl Fleet {
    /// The store's revision, read again at most every [`REVISION_FRESH`] (a change this
    /// hub makes reads it at once, through [`Fleet::revision_changed`]).
    fn store_revision(&self) -> Result<u64, FleetError> {
        let kept = self.revision_read.lock().ok().and_then(|r| *r);
        match kept {
            Some((rev, at)) if at.elapsed() < REVISION_FRESH => Ok(rev),
            _ => self.read_revision().map_err(internal),
        }
    }

    fn read_revision(&self) -> Result<u64, crate::store::StoreError> {
        let rev = self.store.revision()?;
        if let Ok(mut r) = self.revision_read.lock() {
            *r = Some((rev, std::time::Instant::now()));
        }
        Ok(rev)
    }

    /// The node an instance runs on, by the hub's own slot table (never by what nodes
    /// report): `web-2` and a retiring `web-2-<tag>` are slot 2 of `web`, a stateful set's
    /// `db-0` its slot 1.
    pub fn node_of_instance(&self, instance: &str) -> Option<String> {
        let at = self.at_revision().ok()?;
        at.nodes.iter().find_map(|(node, a)| {
            let holds = a.deployments.iter().any(|d| {
                let Some(rest) = instance.strip_prefix(&d.spec.name).and_then(|r| r.strip_prefix('-')) else {
                    return false;
                };
                let tag_ok =
                    rest.split_once('-').is_none_or(|(_, t)| t.len() == 6 && t.chars().all(|c| c.is_ascii_hexdigit()));
                tag_ok && d.spec.slot_named(instance).is_some_and(|s| d.indexes.contains(&s))
            });
            holds.then(|| node.clone())
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
    use crate::store::NodeSpec;
    use crate::store::SqliteStore;
    use crate::tokens::TokenRequest;
    use skiff_model::proto::JoinToken;
    use std::time::Duration;

    pub(super) fn fleet() -> (tempfile::TempDir, Fleet) {
        fleet_on(crate::clock::system())
    }

    /// A fleet on its own store, reading time from `clock`.
    fn fleet_on(clock: Arc<dyn crate::clock::Clock>) -> (tempfile::TempDir, Fleet) {
        let t = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.path().join("hub.db")).unwrap());
        let ca = Ca::load_or_create(&t.path().join("pki")).unwrap();
        let f = Fleet::new(ca, store, clock).unwrap();
        (t, f)
    }

    /// Node `a`, joined and heard from, running `web` alone.
    fn a_runs(f: &Fleet, tok: &str, web: &Deployment) {
        f.join(&join_req(tok, "a")).unwrap();
        f.heartbeat("a", NodeStatus::default()).unwrap();
        f.tick(false).unwrap();
        f.store.apply(std::slice::from_ref(web), None, false, 1).unwrap();
        f.reschedule().unwrap();
    }

    pub(super) fn join_req(token: &str, node: &str) -> JoinRequest {
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

    /// A join token's `<id>.<secret>`, as an agent presents it.
    fn token(f: &Fleet, req: TokenRequest) -> String {
        let t = crate::tokens::create(&*f.store, Some(&f.ca_sha256), &req, skiff_sys::time::now_ms()).unwrap();
        assert!(t.token.starts_with(&format!("SK1.{}.", f.ca_sha256)));
        JoinToken::parse(&t.token).unwrap().credential()
    }

    pub(super) fn any(f: &Fleet) -> String {
        token(f, TokenRequest::default())
    }

    fn peer(f: &Fleet, node: &str) -> Peer {
        Peer { node: Some(node.into()), serial: Some(f.store.node(node).unwrap().unwrap().cert_serial) }
    }

    /// What nodes shipped, and what the hub refused of them, outlive the hub: another
    /// on the same store shows both.
    #[test]
    fn shipped_and_security_events_outlive_the_hub() {
        let (t, f) = fleet();
        f.persist_events(Arc::clone(&f.store));
        let ev = |i: u64| EventRecord {
            time_ms: 1_000 + i,
            object: "web-1".into(),
            reason: "Started".into(),
            message: format!("pid {i}"),
            node: Some("forged".into()),
        };
        let status = NodeStatus { events: (0..3).map(ev).collect(), events_through: 3, ..Default::default() };
        f.report("pi-1", status);
        f.security.push(2_000, "pi-2", "ReportRefused", "not its own".into());
        f.shipped.flush();
        f.security.flush();
        let ca = Ca::load_or_create(&t.path().join("pki")).unwrap();
        let next = Fleet::new(ca, Arc::clone(&f.store), crate::clock::system()).unwrap();
        next.persist_events(Arc::clone(&f.store));
        let shown = next.events(Some("pi-1"), 100);
        assert_eq!(shown.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["pid 0", "pid 1", "pid 2"]);
        assert!(shown.iter().all(|e| e.node.as_deref() == Some("pi-1")), "the node that shipped them: {shown:?}");
        assert_eq!(next.security.list().iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), ["ReportRefused"]);
    }

    #[test]
    fn tokens_gate_joining() {
        let (_t, f) = fleet();
        let tok = any(&f);
        f.join(&join_req(&tok, "pi-1")).unwrap();
        let wrong = format!("{}.{}", tok.split('.').next().unwrap(), "0".repeat(32));
        assert_eq!(
            f.join(&join_req(&wrong, "pi-2")).unwrap_err(),
            FleetError::Unauthenticated("token: unknown token".into())
        );
        let short = token(&f, TokenRequest { ttl_seconds: Some(1), ..Default::default() });
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(matches!(f.join(&join_req(&short, "pi-2")), Err(FleetError::Forbidden(m)) if m.contains("expired")));
        f.store.revoke_token(tok.split('.').next().unwrap()).unwrap();
        assert!(matches!(f.join(&join_req(&tok, "pi-3")), Err(FleetError::Forbidden(m)) if m.contains("revoked")));
        let ok = any(&f);
        assert!(matches!(f.join(&join_req(&ok, "Bad Name")), Err(FleetError::Invalid(m)) if m.contains("node")));
        let mut r = join_req(&ok, "pi-4");
        r.csr = "nonsense".into();
        assert!(matches!(f.join(&r), Err(FleetError::Invalid(m)) if m.contains("csr")));
    }

    #[test]
    fn a_token_cannot_take_over_a_name_or_be_used_more_than_it_may() {
        let (_t, f) = fleet();
        let once = token(&f, TokenRequest { uses: Some(1), ..Default::default() });
        let first = join_req(&once, "pi-1");
        f.join(&first).unwrap();
        // The same device asking again (its answer was lost) gets its certificate with
        // the same token; the same key with any other token is just a taken name.
        f.join(&first).unwrap();
        let other = any(&f);
        let again = JoinRequest { token: other.clone(), ..first.clone() };
        assert!(matches!(f.join(&again), Err(FleetError::Conflict(_))), "another token cannot repeat a join");
        assert!(
            matches!(f.join(&join_req(&once, "pi-2")), Err(FleetError::Forbidden(m)) if m.contains("used 1 time")),
            "a single-use token joins one node"
        );
        // A stolen (reusable) token cannot take over an existing node's name.
        let old = peer(&f, "pi-1");
        let any_tok = any(&f);
        let taken = f.join(&join_req(&any_tok, "pi-1")).unwrap_err();
        assert!(
            matches!(&taken, FleetError::Conflict(m) if m.contains("skiff token create --replace pi-1")),
            "{taken:?}"
        );
        assert!(f.authorize(&old, "pi-1").is_ok(), "the refused join changed nothing");
        // Replacement, asked for by the admin: the old certificate is revoked for good.
        let replace = token(&f, TokenRequest { replace: Some("pi-1".into()), ..Default::default() });
        f.join(&join_req(&replace, "pi-1")).unwrap();
        assert!(matches!(f.authorize(&old, "pi-1"), Err(FleetError::Forbidden(m)) if m.contains("revoked")));
        assert!(f.security.list().iter().any(|e| e.reason == "NodeReplaced" && e.object == "pi-1"));
        // Deleting frees the name; joining again never brings back the old certificate.
        let newer = peer(&f, "pi-1");
        f.revoke_node("pi-1").unwrap();
        assert!(matches!(f.authorize(&newer, "pi-1"), Err(FleetError::Forbidden(_))));
        f.join(&join_req(&any_tok, "pi-1")).unwrap();
        assert!(matches!(f.authorize(&newer, "pi-1"), Err(FleetError::Forbidden(m)) if m.contains("revoked")));
        assert!(matches!(f.authorize(&old, "pi-1"), Err(FleetError::Forbidden(m)) if m.contains("revoked")));
        // The tunnel's second check, which skips the revoked list, refuses them as well:
        // the record they are checked against changed with every revocation.
        for (gone, what) in [(&old, "replaced"), (&newer, "deleted, then joined again")] {
            assert!(
                matches!(f.authorize_again(gone, "pi-1"), Err(FleetError::Forbidden(_))),
                "a certificate {what} passed the second check"
            );
        }
        let current = peer(&f, "pi-1");
        assert!(f.authorize(&current, "pi-1").is_ok() && f.authorize_again(&current, "pi-1").is_ok());
        f.revoke_node("pi-1").unwrap();
        assert!(
            matches!(f.authorize_again(&current, "pi-1"), Err(FleetError::Forbidden(m)) if m.contains("not joined"))
        );
    }

    #[test]
    fn nodes_act_only_for_themselves_with_their_newest_certificate() {
        let (_t, f) = fleet();
        let tok = any(&f);
        f.join(&join_req(&tok, "a")).unwrap();
        f.join(&join_req(&tok, "b")).unwrap();
        let a = peer(&f, "a");
        assert!(f.authorize(&a, "a").is_ok());
        assert!(
            matches!(f.authorize(&a, "b"), Err(FleetError::Forbidden(m)) if m.contains("may not act for node \"b\""))
        );
        assert!(matches!(f.authorize(&Peer::default(), "a"), Err(FleetError::Unauthenticated(_))));
        // Renewal: the old certificate works until the new one is first presented.
        let rec = f.store.node("a").unwrap().unwrap();
        assert!(!f.should_renew(&rec, skiff_sys::time::now_ms()), "a fresh 90-day certificate");
        assert!(f.should_renew(&rec, skiff_sys::time::now_ms() + 61 * 86_400_000), "a third of its life left");
        let (_key, csr) = crate::pki::tests::csr("a");
        let cert = f.renew(&a, "a", &csr).unwrap();
        let der = crate::pki::first_der(&cert).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let renewed = Peer { node: Some("a".into()), serial: Some(hex::encode(parsed.raw_serial())) };
        assert!(f.authorize(&a, "a").is_ok(), "still the current one");
        assert!(matches!(f.renew(&a, "a", &csr), Err(FleetError::Forbidden(m)) if m.contains("less than a minute")));
        // Another node's certificate cannot renew a's.
        let b = peer(&f, "b");
        assert!(matches!(f.renew(&b, "a", &csr), Err(FleetError::Forbidden(m)) if m.contains("may not act")));
        assert!(f.authorize(&renewed, "a").is_ok());
        assert!(matches!(f.authorize(&a, "a"), Err(FleetError::Forbidden(m)) if m.contains("revoked")));
        assert!(
            matches!(f.authorize_again(&a, "a"), Err(FleetError::Forbidden(m)) if m.contains("replaced")),
            "the certificate a renewal retired fails the second check too"
        );
        assert!(matches!(f.authorize_again(&renewed, "b"), Err(FleetError::Forbidden(m)) if m.contains("may not act")));
        f.revoke_node("a").unwrap();
        assert!(matches!(f.authorize(&renewed, "a"), Err(FleetError::Forbidden(_))));
        // A tunnel left open with a deleted node's certificate cannot get a certificate
        // for the device that joins under its name next.
        f.join(&join_req(&tok, "a")).unwrap();
        f.renewed.lock().unwrap().clear();
        assert!(matches!(f.renew(&renewed, "a", &csr), Err(FleetError::Forbidden(m)) if m.contains("revoked")));
    }

    #[tokio::test]
    async fn a_node_has_one_tunnel_and_a_newer_one_closes_the_older() {
        let (_t, f) = fleet();
        let (tx1, _rx1) = tokio::sync::mpsc::channel(1);
        let (tx2, _rx2) = tokio::sync::mpsc::channel(1);
        let first = f.open_tunnel("a", tx1);
        let second = f.open_tunnel("a", tx2);
        let kicked = tokio::time::timeout(Duration::from_secs(1), first.kick.notified()).await;
        assert!(kicked.is_ok(), "the older tunnel was told to close");
        f.close_tunnel("a", first.serial);
        assert_eq!(f.tunnel("a").map(|t| t.serial), Some(second.serial), "closing the older keeps the newer");
    }

    pub(super) fn status(node: &str, deployment: &str, name: &str, template: &str) -> InstanceStatus {
        InstanceStatus {
            name: name.into(),
            deployment: deployment.into(),
            node: node.into(),
            template: template.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nodes_learn_only_the_services_they_share_a_network_with_and_whom_to_serve() {
        use skiff_model::Protocol::{Tcp, Udp};
        let (_t, f) = fleet();
        let tok = any(&f);
        for (n, site) in [("a", "s1"), ("b", "s1"), ("c", "s2"), ("d", "s1")] {
            let mut req = join_req(&tok, n);
            req.spec.labels = [("site".to_string(), site.to_string()), ("role".to_string(), n.to_string())].into();
            f.join(&req).unwrap();
            f.heartbeat(n, NodeStatus::default()).unwrap();
        }
        let on = |d: &mut Deployment, n: &str| d.placement.node_selector = [("role".to_string(), n.to_string())].into();
        let mut db = Deployment::new("db", "img");
        db.stack = "shop".into();
        db.expose =
            vec![skiff_model::mesh::ServicePort::tcp(5432, 5432), skiff_model::mesh::ServicePort::udp(53, 5353)];
        on(&mut db, "b");
        let mut db_far = db.clone();
        db_far.name = "db2".into();
        on(&mut db_far, "c");
        let mut client = Deployment::new("client", "img");
        client.stack = "shop".into();
        on(&mut client, "a");
        let mut stranger = Deployment::new("stranger", "img");
        stranger.stack = "other".into();
        on(&mut stranger, "d");
        f.store.apply(&[db.clone(), db_far.clone(), client, stranger], None, false, 1).unwrap();
        f.reschedule().unwrap();
        let running = |node: &str, d: &Deployment, health| InstanceStatus {
            state: skiff_model::InstanceState::Running,
            pid: Some(42),
            health,
            ..status(node, &d.name, &format!("{}-1", d.name), &skiff_model::rollout::template_hash(d))
        };
        let report = |node: &str, i: InstanceStatus, mesh: Option<&str>| {
            let st = NodeStatus { instances: vec![i], mesh: mesh.map(str::to_string), ..Default::default() };
            f.heartbeat(node, st).unwrap();
        };
        report("b", running("b", &db, None), Some("10.0.0.2:7946"));
        report("c", running("c", &db_far, None), None);
        let view = f.mesh_view("a").unwrap();
        let names: Vec<&str> = view.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "db2"], "the services of a's stack that serve ports");
        let ep = &view.services[0].endpoints;
        assert_eq!(ep.len(), 1);
        assert_eq!((ep[0].node.as_str(), ep[0].ready, ep[0].total), ("b", 1, 1));
        assert_eq!((ep[0].site.as_deref(), ep[0].mesh.as_deref()), (Some("s1"), Some("10.0.0.2:7946")));
        assert!(view.clients.is_empty(), "a serves nothing");
        assert_eq!(view.site.as_deref(), Some("s1"), "its own site, as it joined");
        // Direct connections are made only with the certificate the hub knows b holds.
        let b_serial = f.store.node("b").unwrap().unwrap().cert_serial;
        assert_eq!(view.certs.get("b"), Some(&vec![b_serial]));
        assert!(!view.certs.contains_key("d"), "only the nodes the view names");
        // b serves db to the nodes of its stack (a, and c which runs db2), not to d.
        let b = f.mesh_view("b").unwrap();
        let callers: Vec<&str> = b.clients["db"].iter().map(String::as_str).collect();
        assert_eq!(callers, ["a", "c"]);
        assert!(b.services.iter().all(|s| s.endpoints.iter().all(|e| e.node != "b")), "its own are not endpoints");
        // Another stack's node learns nothing of them and cannot have them relayed.
        assert!(f.mesh_view("d").unwrap().services.is_empty());
        assert!(matches!(f.relay_target("d", "db", 5432, Tcp, 0), Err(FleetError::Forbidden(_))));
        assert_eq!(f.relay_target("a", "db", 5432, Tcp, 0).unwrap(), ("b".to_string(), "db-1".to_string(), 5432));
        assert!(matches!(f.relay_target("a", "db", 80, Tcp, 0), Err(FleetError::NotFound(_))));
        // A UDP port is relayed over UDP only, to its target.
        assert_eq!(f.relay_target("a", "db", 53, Udp, 0).unwrap().2, 5353);
        assert!(matches!(f.relay_target("a", "db", 53, Tcp, 0), Err(FleetError::NotFound(_))));
        assert!(matches!(f.relay_target("a", "db", 5432, Udp, 0), Err(FleetError::NotFound(_))));
        // An instance that stops serving is no endpoint any more, and the view changes.
        let gen = *f.mesh_changes().borrow();
        report("b", running("b", &db, Some(skiff_model::Health::Unhealthy)), Some("10.0.0.2:7946"));
        assert!(*f.mesh_changes().borrow() > gen, "a change of who serves wakes the tunnels");
        assert_eq!(f.mesh_view("a").unwrap().services[0].endpoints[0].ready, 0);
        assert!(matches!(f.relay_target("a", "db", 5432, Tcp, 0), Err(FleetError::NotFound(_))));
        // A mesh address that is not host:port is not believed.
        report("b", running("b", &db, None), Some("not an address"));
        assert_eq!(f.mesh_view("a").unwrap().services[0].endpoints[0].mesh, None);
    }

    /// A stateful set over two nodes: db-1 is placed once db-0 is reported ready on its
    /// node, and each instance is a service of its own (`db-0.pg`) whose endpoint and
    /// relay reach that instance only.
    #[test]
    fn a_stateful_sets_instances_are_placed_in_order_and_reached_by_name() {
        let (_t, f) = fleet();
        let tok = any(&f);
        for n in ["a", "b"] {
            f.join(&join_req(&tok, n)).unwrap();
            f.heartbeat(n, NodeStatus::default()).unwrap();
        }
        let mut db = Deployment::new("db", "img");
        db.replicas = 2;
        db.stateful =
            Some(skiff_model::stateful::Stateful { service: Some("pg".into()), pod_management: Default::default() });
        db.update.max_surge = skiff_model::rollout::IntOrPercent::Int(0);
        db.update.max_unavailable = skiff_model::rollout::IntOrPercent::Int(1);
        db.expose = vec![skiff_model::mesh::ServicePort::tcp(5432, 5432)];
        let client = Deployment::new("client", "img");
        f.store.apply(&[db.clone(), client], None, false, 1).unwrap();
        f.reschedule().unwrap();
        let placed = |f: &Fleet| -> Vec<(u32, String)> {
            f.store
                .slots()
                .unwrap()
                .iter()
                .filter(|s| s.deployment == "db")
                .map(|s| (s.index, s.node.clone()))
                .collect()
        };
        assert_eq!(placed(&f).len(), 1, "db-0 alone until it is ready");
        assert!(f.unschedulable()["db"].contains("1 instance(s) wait"), "{:?}", f.unschedulable());
        let node0 = placed(&f)[0].1.clone();
        let running = |node: &str, name: &str| InstanceStatus {
            state: skiff_model::InstanceState::Running,
            pid: Some(42),
            ..status(node, "db", name, &skiff_model::rollout::template_hash(&db))
        };
        f.heartbeat(&node0, NodeStatus { instances: vec![running(&node0, "db-0")], ..Default::default() }).unwrap();
        f.tick(false).unwrap();
        let now = placed(&f);
        assert_eq!(now.len(), 2, "db-0 ready: db-1 placed");
        let node1 = now.iter().find(|(i, _)| *i == 2).unwrap().1.clone();
        assert_ne!(node0, node1);
        assert_eq!(f.node_of_instance("db-0").as_deref(), Some(node0.as_str()), "exec and logs find it");
        assert_eq!(f.node_of_instance("db-1").as_deref(), Some(node1.as_str()));
        assert_eq!(f.node_of_instance("db-2"), None);
        f.heartbeat(&node1, NodeStatus { instances: vec![running(&node1, "db-1")], ..Default::default() }).unwrap();
        // The other node sees db-0.pg with db-0's node as its one endpoint.
        let view = f.mesh_view(&node1).unwrap();
        let zero = view.services.iter().find(|s| s.name == "db-0.pg").expect("db-0.pg");
        assert_eq!(zero.instance.as_deref(), Some("db-0"));
        let eps: Vec<(&str, u32, u32)> = zero.endpoints.iter().map(|e| (e.node.as_str(), e.ready, e.total)).collect();
        assert_eq!(eps, [(node0.as_str(), 1, 1)]);
        assert_eq!(
            f.relay_target(&node1, "db-0.pg", 5432, skiff_model::Protocol::Tcp, 0).unwrap(),
            (node0.clone(), "db-0".to_string(), 5432)
        );
        assert!(f.mesh_view(&node0).unwrap().clients.contains_key("db-0.pg"), "db-0's node serves it");
        // The set's own service still spreads over both.
        assert_eq!(f.relay_target(&node1, "db", 5432, skiff_model::Protocol::Tcp, 0).unwrap().0, node0);
        // Where each slot ran is kept: its volumes are there.
        let kept = f.store.states("stateful/").unwrap();
        let want = serde_json::json!({"1": node0, "2": node1}).to_string();
        assert_eq!(kept, [("stateful/db".to_string(), want)]);
    }

    #[test]
    fn a_node_is_believed_only_about_its_own_slots() {
        let (_t, f) = fleet();
        let tok = any(&f);
        f.join(&join_req(&tok, "a")).unwrap();
        f.join(&join_req(&tok, "b")).unwrap();
        f.heartbeat("a", NodeStatus::default()).unwrap();
        f.heartbeat("b", NodeStatus::default()).unwrap();
        let mut web = Deployment::new("web", "img");
        web.replicas = 2;
        f.store.apply(&[web.clone()], None, false, 1).unwrap();
        f.reschedule().unwrap();
        let tpl = skiff_model::rollout::template_hash(&web);
        let on = |n: &str| f.assignment(n).unwrap().deployments[0].indexes.clone();
        let (a_slot, b_slot) = (on("a")[0], on("b")[0]);
        let (mine, theirs) = (format!("web-{a_slot}"), format!("web-{b_slot}"));
        // Node a claims b's instance (so the admin's exec would go to a), a retiring twin of
        // its own with a template the hub never sent, and an instance under b's name.
        let forged = NodeStatus {
            instances: vec![
                status("a", "web", &mine, &tpl),
                status("a", "web", &format!("{mine}-{}", &tpl[..6]), &tpl),
                status("a", "web", &theirs, &tpl),
                status("a", "web", &format!("{mine}-abcdef"), "abcdef0123"),
                status("b", "db", "db-1", &tpl),
                // Its own slot spelt another way: a second instance of one slot.
                status("a", "web", &format!("web-0{a_slot}"), &tpl),
            ],
            ..Default::default()
        };
        f.heartbeat("a", forged).unwrap();
        let believed: Vec<String> = f.reported_instances().into_iter().map(|i| i.name).collect();
        assert_eq!(believed, [mine.clone(), format!("{mine}-{}", &tpl[..6])]);
        let refused = f.security.list();
        let events: Vec<_> = refused.iter().filter(|e| e.reason == "ReportRefused").collect();
        assert_eq!(events.len(), 1, "one event for one report: {refused:?}");
        assert!(events[0].message.contains("reported 4 instance(s) not its own"), "{:?}", events[0]);
        // Routing follows the slot table, not reports.
        assert_eq!(f.node_of_instance(&theirs).as_deref(), Some("b"));
        assert_eq!(f.node_of_instance(&mine).as_deref(), Some("a"));
        assert_eq!(f.node_of_instance("web-9"), None);
        // Samples: only its own instances count, and no more CPU than the node has.
        let mut sample = skiff_model::metrics::MetricsSample::example("b", skiff_sys::time::now_ms());
        sample.instances[0].instance = mine.clone();
        sample.instances[0].deployment = "web".into();
        sample.instances[0].cpu_cores = Some(1e9);
        sample.instances[1].instance = theirs.clone();
        sample.instances[1].deployment = "web".into();
        // Scraped series go with their instance: none for b's, no more than the bound and
        // only finite ones for its own.
        let series = |value: f64| skiff_model::metrics::Series { name: "q".into(), labels: Default::default(), value };
        sample.instances[0].series = (0..100).map(|i| series(f64::from(i))).chain([series(f64::NAN)]).collect();
        sample.instances[1].series = vec![series(1e12)];
        f.record_metrics("a", vec![sample]);
        let m = f.metrics();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].node.as_str(), m[0].instances.len()), ("a", 1), "named after the sender; b's dropped");
        assert_eq!(m[0].instances[0].cpu_cores, Some(2.0), "capped at the node's 2 CPUs");
        let kept = &m[0].instances[0].series;
        assert_eq!(kept.len(), skiff_model::metrics::MAX_SERIES);
        assert!(kept.iter().all(|s| s.value.is_finite() && s.value < 100.0), "{kept:?}");
        // Events carry the node that shipped them.
        let ev = EventRecord { time_ms: 1, object: theirs, reason: "Started".into(), message: "".into(), node: None };
        f.heartbeat("a", NodeStatus { events: vec![ev], events_through: 1, ..Default::default() }).unwrap();
        assert_eq!(f.events(None, 10)[0].node.as_deref(), Some("a"));
    }

    /// A node's device counts only steer placement onto that node, and are bounded: a
    /// node claiming a kind that is no CDI kind, or implausibly many devices, is refused and
    /// what the hub holds of it stays as it was.
    #[test]
    fn a_node_cannot_claim_unbounded_or_malformed_devices() {
        let (_t, f) = fleet();
        let tok = any(&f);
        let mut bad = join_req(&tok, "a");
        bad.spec.devices.insert("not a kind".into(), 1);
        assert!(matches!(f.join(&bad), Err(FleetError::Invalid(m)) if m.starts_with("spec.devices")));
        f.join(&join_req(&tok, "a")).unwrap();
        let claim = |k: &str, n: u32| f.set_node_facts("a", None, None, Some(&[(k.to_string(), n)].into()));
        assert!(matches!(claim("nvidia.com/gpu", 1_000_000), Err(FleetError::Invalid(_))));
        assert!(matches!(claim("../../etc", 1), Err(FleetError::Invalid(_))));
        assert!(f.store.node("a").unwrap().unwrap().info.devices.is_empty());
        claim("nvidia.com/gpu", 2).unwrap();
        assert_eq!(f.store.node("a").unwrap().unwrap().info.devices["nvidia.com/gpu"], 2);
    }

    #[test]
    fn a_node_changing_its_runtimes_every_second_moves_the_revision_once_a_minute() {
        let (_t, f) = fleet();
        f.join(&join_req(&any(&f), "a")).unwrap();
        let rev = f.store.revision().unwrap();
        f.set_runtimes("a", &["oci".into(), "wasm".into()]).unwrap();
        for i in 0..10 {
            let flip: Vec<String> = if i % 2 == 0 { vec!["oci".into()] } else { vec!["oci".into(), "wasm".into()] };
            let _ = f.set_runtimes("a", &flip);
        }
        assert_eq!(f.store.revision().unwrap(), rev + 1);
    }

    #[test]
    fn a_node_may_have_the_hub_pull_only_its_own_images_and_a_cache_its_sites() {
        let (_t, f) = fleet();
        let f = f.with_site_caches(["gw".to_string(), "n1".to_string()]);
        let tok = any(&f);
        for (n, site) in [("gw", "s1"), ("n1", "s1"), ("rogue", "s1"), ("other", "s2")] {
            let mut req = join_req(&tok, n);
            req.spec.labels = [("site".to_string(), site.to_string())].into();
            if n != "rogue" {
                req.spec.labels.insert("tier".into(), "edge".into());
            }
            f.join(&req).unwrap();
            f.heartbeat(n, NodeStatus::default()).unwrap();
        }
        let mut web = Deployment::new("web", "registry.example/web:1");
        web.placement.node_selector =
            [("site".to_string(), "s1".to_string()), ("tier".to_string(), "edge".to_string())].into();
        let mut db = Deployment::new("db", "registry.example/db:1");
        db.placement.node_selector = [("site".to_string(), "s2".to_string())].into();
        f.store.apply(&[web, db], None, false, 1).unwrap();
        f.reschedule().unwrap();
        let web_on = if f.may_pull("gw", "registry.example/web:1") { "gw" } else { "n1" };
        let web_off = if web_on == "gw" { "n1" } else { "gw" };
        assert!(f.may_pull(web_on, "registry.example/web:1"));
        assert!(!f.may_pull(web_off, "registry.example/web:1"), "not its work");
        assert!(!f.may_pull(web_on, "registry.example/db:1"), "another site's work");
        assert!(f.may_pull("other", "registry.example/db:1") && !f.may_pull("other", "registry.example/web:1"));
        assert!(!f.may_pull("gw", "registry.example/secret:1"));
        // Serving the site's cache: the site's images, not another site's.
        let cache = NodeStatus { cache: Some("http://10.0.0.2:5050".into()), ..Default::default() };
        f.heartbeat(web_off, cache.clone()).unwrap();
        assert!(f.may_pull(web_off, "registry.example/web:1"));
        assert!(!f.may_pull(web_off, "registry.example/db:1"));
        let site = f.site_caches(web_on).unwrap();
        assert_eq!((site.site.as_deref(), site.caches.clone()), (Some("s1"), vec!["http://10.0.0.2:5050".to_string()]));
        assert_eq!(site.token.len(), 64);
        assert_eq!(f.site_caches(web_off).unwrap().token, site.token, "one token per site");
        assert!(f.site_caches(web_off).unwrap().caches.is_empty(), "not its own cache");
        let other = f.site_caches("other").unwrap();
        assert!(other.caches.is_empty() && other.token != site.token);
        // A node of the site the operator did not name serves no cache, whatever it says.
        f.heartbeat("rogue", NodeStatus { cache: Some("http://10.0.0.9:5050".into()), ..Default::default() }).unwrap();
        assert!(!f.may_pull("rogue", "registry.example/web:1"));
        assert!(!f.site_caches(web_on).unwrap().caches.contains(&"http://10.0.0.9:5050".to_string()));
        // A cache address that is not http://host:port is not believed.
        f.heartbeat(web_off, NodeStatus { cache: Some("http://x/../evil".into()), ..Default::default() }).unwrap();
        assert!(f.site_caches(web_on).unwrap().caches.is_empty());
    }

    #[test]
    fn assignments_follow_placement_and_revisions() {
        let (_t, f) = fleet();
        let tok = any(&f);
        f.join(&join_req(&tok, "a")).unwrap();
        f.join(&join_req(&tok, "b")).unwrap();
        f.heartbeat("a", NodeStatus::default()).unwrap();
        f.tick(false).unwrap();
        let mut web = Deployment::new("web", "img");
        web.replicas = 3;
        f.store.apply(&[web], None, false, 1).unwrap();
        f.reschedule().unwrap();
        // Only `a` is Ready (b never sent a heartbeat): all three land there.
        let a = f.assignment("a").unwrap();
        assert_eq!(a.deployments[0].indexes, [1, 2, 3]);
        assert!(f.assignment("b").unwrap().deployments.is_empty());
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let same = rt.block_on(f.wait_assignment("a", a.revision, std::time::Duration::from_millis(20))).unwrap();
        assert_eq!(same, a, "nothing changed: the long-poll times out with the same assignment");
        assert!(a.metrics.is_empty());
        // An autoscaler on a workload's own metric: every node is told to scrape its name,
        // also one that runs none of it (an External metric may be anyone's).
        let mut q = Deployment::new("q", "img");
        q.scrape = Some(skiff_model::metrics::Scrape { port: 9100, path: "/metrics".into() });
        q.autoscale = Some(
            serde_json::from_value(serde_json::json!({"maxReplicas": 3, "metrics": [
                {"type": "Pods", "name": "queue_depth", "targetType": "AverageValue", "averageValue": "5"},
                {"type": "External", "name": "backlog", "targetType": "Value", "value": "5"}]}))
            .unwrap(),
        );
        f.store.apply(&[q], None, false, 2).unwrap();
        f.reschedule().unwrap();
        assert_eq!(f.assignment("a").unwrap().metrics, ["backlog", "queue_depth"]);
        assert_eq!(f.assignment("b").unwrap().metrics, ["backlog", "queue_depth"]);
    }

    /// A move of the store that changes no node's part (a join) tells every node the
    /// new revision without making 100,000 parts again; a placement that moves makes them.
    #[test]
    fn parts_are_made_again_only_when_what_they_are_made_of_changed() {
        let (_t, f) = fleet();
        let tok = any(&f);
        let mut web = Deployment::new("web", "img");
        web.replicas = 2;
        a_runs(&f, &tok, &web);
        let before = f.at_revision().unwrap();
        f.join(&join_req(&tok, "b")).unwrap();
        f.revision_changed();
        let after = f.at_revision().unwrap();
        assert!(after.revision > before.revision, "a join moves the revision");
        assert!(Arc::ptr_eq(&before.nodes, &after.nodes), "and changes no part: shared, not made again");
        let a = f.assignment("a").unwrap();
        assert_eq!(a.revision, after.revision, "a node is told the current revision");
        assert_eq!(a.deployments[0].indexes, [1, 2]);
        // The services' table: kept at another revision while the parts, the records and
        // the reports are the same (SQLite reads the records anew: compared); made again
        // when the reports move.
        let table = f.mesh_table().unwrap();
        assert!(Arc::ptr_eq(&table.parts, &after.nodes));
        if let Ok(mut t) = f.mesh_table.lock() {
            t.as_mut().unwrap().0 .0 = 0;
        }
        assert!(Arc::ptr_eq(&table, &f.mesh_table().unwrap()), "the same table: tunnels cut no new views");
        f.mesh_moved();
        assert!(!Arc::ptr_eq(&table, &f.mesh_table().unwrap()), "reports moved: a new table");
        // Another deployment stored but not placed yet (an apply's own revision): no part
        // holds it.
        f.store.apply(&[web.clone(), Deployment::new("db", "img")], None, false, 2).unwrap();
        f.revision_changed();
        let stored = f.at_revision().unwrap();
        assert!(stored.revision > after.revision);
        assert!(Arc::ptr_eq(&after.nodes, &stored.nodes), "a deployment not placed is in no part");
        web.replicas = 3;
        f.store.apply(&[web, Deployment::new("db", "img")], None, false, 3).unwrap();
        f.reschedule().unwrap();
        let moved = f.at_revision().unwrap();
        assert!(!Arc::ptr_eq(&after.nodes, &moved.nodes), "a new placement makes the parts again");
        let web = f.assignment("a").unwrap().deployments.into_iter().find(|d| d.spec.name == "web").unwrap();
        assert_eq!(web.indexes, [1, 2, 3]);
    }

    /// The tunnels wake when a revision changed what nodes are told: not at an apply's
    /// own revision (stored, not placed yet), at its placement.
    #[test]
    fn tunnels_wake_when_a_placement_moves_not_when_an_apply_waits_for_one() {
        let (_t, f) = fleet();
        let tok = any(&f);
        let web = Deployment::new("web", "img");
        a_runs(&f, &tok, &web);
        let mut wakes = f.wakes();
        wakes.borrow_and_update();
        let deployments = [web, Deployment::new("db", "img")];
        f.store.apply(&deployments, None, false, 2).unwrap();
        f.revision_changed();
        assert!(!wakes.has_changed().unwrap(), "a deployment stored and not placed changes no node's part");
        f.reschedule().unwrap();
        assert!(wakes.has_changed().unwrap(), "its placement does");
        assert_eq!(f.assignment("a").unwrap().deployments.len(), 2);
        wakes.borrow_and_update();
        f.reschedule().unwrap();
        assert!(!wakes.has_changed().unwrap(), "placing the same again changes nothing");
        // A node that joins runs nothing yet: no other node's view names it.
        f.join(&join_req(&tok, "b")).unwrap();
        f.revision_changed();
        assert!(!wakes.has_changed().unwrap(), "a node joining with no part wakes no tunnel");
        // A node that holds a part is named in views: a change to its record wakes them.
        f.set_node_facts("a", Some(&["oci".to_string(), "wasm".to_string()]), None, None).unwrap();
        f.revision_changed();
        assert!(wakes.has_changed().unwrap(), "a's record changed");
    }

    /// A forced tick places again only when time moved something: a node falling silent,
    /// a node away for each deployment's `reschedule_after`; else once a minute.
    #[test]
    fn a_fleet_at_rest_is_not_placed_again_at_every_forced_tick() {
        use std::sync::atomic::Ordering::Relaxed;
        let clock = crate::clock::ManualClock::at(1_000_000);
        let (_t, f) = fleet_on(clock.clone());
        let tok = any(&f);
        for n in ["a", "b"] {
            f.join(&join_req(&tok, n)).unwrap();
            f.heartbeat(n, NodeStatus::default()).unwrap();
        }
        let mut web = Deployment::new("web", "img");
        web.placement.reschedule_after_ms = Some(30_000);
        let mut api = Deployment::new("api", "img");
        api.placement.reschedule_after_ms = Some(50_000);
        f.store.apply(&[web, api], None, false, 1).unwrap();
        f.tick(true).unwrap();
        let placed = || f.placed_ms.load(Relaxed);
        let at_rest = placed();
        assert_eq!(at_rest, 1_000_000);
        let node_of = |d: &str| {
            f.store.slots().unwrap().iter().filter(|s| s.deployment == d).map(|s| s.node.clone()).collect::<Vec<_>>()
        };
        let gone = node_of("web")[0].clone();
        let stays = if gone == "a" { "b" } else { "a" };
        // Both heard from every 5 s: nothing to place again.
        for _ in 0..4 {
            clock.advance(5_000);
            f.heartbeat("a", NodeStatus::default()).unwrap();
            f.heartbeat("b", NodeStatus::default()).unwrap();
            f.tick(true).unwrap();
        }
        assert_eq!(placed(), at_rest, "nothing moved");
        // `gone` falls silent (last heard at +0): placed again a minute after the last
        // placement (+40 s), when it turns Unknown (silent past 40 s: at +45 s, Unknown
        // since +40 s), when it has been so for web's `reschedule_after` (+70 s), where
        // web's slot moves, and for api's (+90 s), where api's slot moves if it is there.
        let mut placements = vec![];
        for _ in 0..20 {
            clock.advance(5_000);
            f.heartbeat(stays, NodeStatus::default()).unwrap();
            let before = placed();
            f.tick(true).unwrap();
            if placed() != before {
                placements.push(placed() - 1_020_000);
            }
        }
        assert_eq!(placements, [40_000, 45_000, 70_000, 90_000], "the minute's pass, Unknown, each reschedule_after");
        assert_eq!((node_of("web"), node_of("api")), (vec![stays.to_string()], vec![stays.to_string()]));
    }

    #[test]
    fn a_node_under_pressure_is_not_ready_and_takes_no_new_work() {
        let (_t, f) = fleet();
        let tok = any(&f);
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
        f.store.apply(&[web], None, false, 1).unwrap();
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
