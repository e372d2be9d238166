//! Fleet services on the node ([`skiff_model::mesh`]): every deployment is a service its
//! peers reach by name, on this node or any other.
//!
//! - **Names:** `dns.rs` answers the instances on the bridge (at the gateway's address):
//!   a service they may reach resolves to its virtual address, other names go to the
//!   host's resolvers.
//! - **Virtual addresses:** the service range is made the host's own with one `local`
//!   route ("AnyIP"), and the agent listens on each `(virtual address, port)` a service
//!   answers on. A connection goes to an instance of this node that serves (round
//!   robin), else to another node with ready instances — one of this node's `site`
//!   first — directly to that node's agent over mutual TLS (`peer.rs`), else relayed
//!   through the hub (`relay.rs`) when no direct path works.
//! - **Who reaches what:** a caller must be an instance of this node sharing a network
//!   with the service (stacks stay apart as on one node); a node calling in must be one
//!   the hub listed as a client of that service.
//! - **Offline:** the hub's last [`MeshView`] is kept in `mesh.json`; while the hub is
//!   away, and after a restart, nodes that reach each other directly keep their services.
//!
//! Architecture Invariant: the mesh only ever connects to instances of this node that
//! serve the service asked for; it never reaches the host or another address for a peer.

pub mod dns;
mod peer;
pub mod relay;
pub mod udp;

use crate::join::Identity;
use crate::{Agent, AgentError};
use skiff_model::mesh::{answers_to, Dial, Endpoint, MeshView, Service, ServicePort, DATAGRAM_MAX, DIAL_LINE_MAX};
use skiff_model::{InstanceState, NetworkMode, Protocol};
use skiff_sys::connlimit::{ConnCounter, ConnLimits};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How the node takes part in the fleet's services beyond its own instances.
#[derive(Default, Clone)]
pub struct MeshConfig {
    /// Where other nodes' agents connect directly (`--mesh-listen`); none: this node's
    /// services are reached through the hub's relay only.
    pub listen: Option<SocketAddr>,
    /// The node's `site` label: endpoints of the same site are preferred.
    pub site: Option<String>,
    /// The node's identity (joined to a hub): needed to reach other nodes at all.
    pub identity: Option<Arc<Identity>>,
    /// The hub the agent's tunnel is connected to (the relay).
    pub hub: Option<Arc<RwLock<String>>>,
}

/// An instance of this node that may call services.
#[derive(Debug, Clone)]
struct Caller {
    stack: String,
    networks: BTreeSet<String>,
    /// Its deployment's own name servers (`dns`), asked for names not the fleet's.
    dns: Vec<SocketAddr>,
}

/// An instance's address on each network it joined, the one the host reaches it at
/// first (never empty).
type Addrs = Vec<(String, Ipv4Addr)>;

/// The address of `addrs` on the first of its networks among `networks`.
fn on_shared(addrs: &Addrs, networks: &BTreeSet<String>) -> Option<Ipv4Addr> {
    addrs.iter().find(|(n, _)| networks.contains(n)).map(|(_, a)| *a)
}

#[derive(Debug, Clone)]
struct Entry {
    service: Service,
    vip: Ipv4Addr,
    /// This node's instances that serve it.
    local: Vec<Addrs>,
}

/// An instance of this node as its peers' `/etc/hosts` name it.
#[derive(Debug, Clone)]
struct Peer {
    names: Vec<String>,
    addrs: Addrs,
}

/// What the node knows of the fleet's services at one moment.
#[derive(Debug, Default)]
struct Catalog {
    /// This node's instances, by the names `/etc/hosts` gives them.
    peers: Vec<Peer>,
    entries: BTreeMap<String, Entry>,
    by_vip: HashMap<Ipv4Addr, String>,
    callers: HashMap<Ipv4Addr, Caller>,
    /// Service → the nodes that may call it (the hub's word).
    clients: BTreeMap<String, BTreeSet<String>>,
    /// Node → the certificate serials it holds (the hub's word).
    certs: BTreeMap<String, Vec<String>>,
    /// This node's site (the hub's word, or `--label site=` at this start).
    site: Option<String>,
}

impl Catalog {
    /// The addresses `name` has for the instance at `caller`: as its `/etc/hosts` says
    /// (peers on this node sharing a network, any port), else a service's virtual
    /// address (its ports, on any node).
    fn resolve(&self, caller: Ipv4Addr, name: &str) -> Vec<Ipv4Addr> {
        let Some(c) = self.callers.get(&caller) else { return vec![] };
        let q = name.trim_end_matches('.').to_ascii_lowercase();
        let near: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .filter(|p| p.names.contains(&q))
            .filter_map(|p| on_shared(&p.addrs, &c.networks))
            .collect();
        if !near.is_empty() {
            return near;
        }
        // Swarm's `tasks.NAME`: the instances behind a service, those of this node that
        // serve (the only ones an instance can reach by address).
        if let Some(service) = q.strip_prefix("tasks.") {
            return self
                .entries
                .values()
                .filter(|e| e.service.shares_a_network(&c.networks) && answers_to(&e.service, &c.stack, service))
                .flat_map(|e| e.local.iter().filter_map(|a| on_shared(a, &c.networks)))
                .collect();
        }
        // A name of the caller's own stack first (`db-0.pg`, a stateful set's instance),
        // then another stack's qualified one (`db-0` of a stack named `pg`).
        let found = self
            .entries
            .values()
            .filter(|e| e.service.shares_a_network(&c.networks) && answers_to(&e.service, &c.stack, &q));
        let own = |e: &&Entry| e.service.stack == c.stack && (e.service.name == q || e.service.aliases.contains(&q));
        let (mut first, rest): (Vec<&Entry>, Vec<&Entry>) = found.partition(own);
        first.extend(rest);
        first.into_iter().map(|e| e.vip).take(1).collect()
    }
}

impl Agent {
    /// The hub's last word on the fleet's services (kept in `mesh.json`).
    pub fn set_mesh_view(&self, view: MeshView) -> Result<(), AgentError> {
        if **self.mesh_view.borrow() == view {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&view).map_err(|e| AgentError::Other(e.to_string()))?;
        skiff_sys::durable::write(&self.cfg.data_dir.join("mesh.json"), &bytes, 0o600)
            .map_err(|e| AgentError::Other(format!("keeping the fleet's services: {e}")))?;
        self.mesh_view.send_replace(Arc::new(view));
        Ok(())
    }

    fn catalog(&self, view: &MeshView, range: (Ipv4Addr, u8)) -> Result<Catalog, AgentError> {
        let desired = self.db(|s| s.desired_slots())?;
        let (rows, leases) = self.db(|s| Ok((s.instances()?, s.leases()?)))?;
        let serving = self.serving.lock().ok().and_then(|s| s.clone());
        let stopping: HashSet<String> = self.stopping.lock().map(|s| s.clone()).unwrap_or_default();
        // Every instance with an address on the bridge may call — by its lease, which it
        // has before it starts (and asks for names before its row says it runs); only
        // running ones are peers and serve.
        let addressed = rows.iter().filter(|r| r.spec.network == NetworkMode::Bridge).filter_map(|r| {
            let addrs: Addrs = match (&r.ip, leases.get(&r.name)) {
                (Some(_), _) => r.network_addresses(),
                // Not started yet: its leases, on its networks in their order.
                (None, Some(held)) => r
                    .spec
                    .joined_networks()
                    .into_iter()
                    .filter_map(|n| {
                        let a = held.iter().find(|(h, _)| *h == n)?.1;
                        Some((n, a))
                    })
                    .collect(),
                (None, None) => vec![],
            };
            (!addrs.is_empty()).then_some((r, addrs))
        });
        let mut local: BTreeMap<String, Vec<Addrs>> = BTreeMap::new();
        let mut callers = HashMap::new();
        let mut peers = vec![];
        for (r, addrs) in addressed {
            let networks: BTreeSet<String> = r.spec.joined_networks().into_iter().collect();
            let dns: Vec<SocketAddr> =
                r.spec.dns.servers.iter().filter_map(|s| s.parse().ok()).map(|ip| SocketAddr::new(ip, 53)).collect();
            // By whichever of its addresses it calls from.
            for (_, ip) in &addrs {
                callers
                    .insert(*ip, Caller { stack: r.spec.stack.clone(), networks: networks.clone(), dns: dns.clone() });
            }
            if r.state != InstanceState::Running {
                continue;
            }
            // As `hosts_for` names them: switched away from (blue-green), by its own name only.
            let mut names = vec![r.name.clone()];
            if r.retire_at_ms.is_none() {
                names.push(r.deployment.clone());
            }
            names.extend(crate::stable_names(r));
            peers.push(Peer { names, addrs: addrs.clone() });
            // Before the loop first judged (just after a start): those ready by their row.
            let serves = match &serving {
                Some(s) => crate::publish::serves(s, &stopping, r),
                None => !stopping.contains(&r.container_id) && r.ready_since_ms.is_some(),
            };
            if serves {
                // A stateful set's instance is also a service of its own.
                if let Some(stable) = crate::stable_names(r).into_iter().next() {
                    local.entry(stable).or_default().push(addrs.clone());
                }
                local.entry(r.deployment.clone()).or_default().push(addrs);
            }
        }
        let mut services: BTreeMap<String, Service> =
            desired.iter().filter_map(|(d, _)| Service::of(d)).map(|s| (s.name.clone(), s)).collect();
        // A stateful set's instances here, each a service of its own.
        for (d, slots) in desired.iter().filter(|(d, _)| d.stateful.is_some()) {
            services.extend(slots.iter().filter_map(|&n| Service::of_instance(d, n)).map(|s| (s.name.clone(), s)));
        }
        for s in &view.services {
            match services.get_mut(&s.name) {
                Some(mine) => mine.endpoints.clone_from(&s.endpoints),
                None => {
                    services.insert(s.name.clone(), s.clone());
                }
            }
        }
        let vips = skiff_model::mesh::virtual_addresses(range, services.keys().map(String::as_str));
        let mut entries = BTreeMap::new();
        let mut by_vip = HashMap::new();
        for (name, service) in services {
            let Some(vip) = vips.get(&name).copied() else { continue };
            let local = local.get(&name).cloned().unwrap_or_default();
            by_vip.insert(vip, name.clone());
            entries.insert(name, Entry { service, vip, local });
        }
        Ok(Catalog {
            peers,
            entries,
            by_vip,
            callers,
            clients: view.clients.clone(),
            certs: view.certs.clone(),
            site: view.site.clone(),
        })
    }
}

/// The fleet's services on this node: names, virtual addresses, and the paths to other
/// nodes. Runs beside the reconcile loop (`Mesh::run`).
pub struct Mesh {
    agent: Arc<Agent>,
    cfg: MeshConfig,
    range: (Ipv4Addr, u8),
    catalog: RwLock<Arc<Catalog>>,
    turn: AtomicUsize,
    /// Nodes whose direct path failed lately (tried again after a minute).
    unreachable: Mutex<HashMap<String, Instant>>,
    /// Calls open per calling instance.
    calls: ConnCounter,
    /// UDP flows open per calling instance (apart from calls: a resolver's queries, a
    /// flow each, do not crowd out its connections).
    flows: ConnCounter,
}

/// How long a node whose direct path failed is reached through the relay only.
const UNREACHABLE_FOR: Duration = Duration::from_secs(60);
/// Connecting to another node's agent (TCP and TLS) may take this long.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

impl Mesh {
    /// The mesh of `agent`, when it offers fleet services (`AgentConfig::services`).
    pub fn new(agent: Arc<Agent>, cfg: MeshConfig) -> Option<Arc<Self>> {
        let range = agent.cfg.services?;
        Some(Arc::new(Mesh {
            agent,
            cfg,
            range,
            catalog: Default::default(),
            turn: AtomicUsize::new(0),
            unreachable: Default::default(),
            calls: per_address(usize::MAX, CALLS_PER_INSTANCE),
            flows: per_address(FLOWS, FLOWS_PER_INSTANCE),
        }))
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().map(|c| Arc::clone(&c)).unwrap_or_default()
    }

    /// Keeps names, listeners and the direct path up until `shutdown`; then removes the
    /// service range's route (the listeners die with the process anyway).
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let (net, prefix) = self.range;
        // Without the route, names still resolve (instances were given this DNS), but
        // only to peers on this node: no virtual address can be listened on.
        let routed = crate::blocking(move || skiff_runtime::netlink::Rtnl::open()?.add_local_route(net, prefix)).await;
        if let Err(e) = &routed {
            warn!(
                "services on other nodes are out of reach: the service range {net}/{prefix} cannot be routed here: {e}"
            );
        }
        let mut tasks = tokio::task::JoinSet::new();
        if let Some((udp, tcp)) = self.agent.dns_socket.lock().ok().and_then(|mut s| s.take()) {
            let (m1, m2) = (Arc::clone(&self), Arc::clone(&self));
            let lookup: dns::Lookup = Arc::new(move |caller, name: &str| m1.catalog().resolve(caller, name));
            let client_of: dns::ClientOf =
                Arc::new(move |caller| m2.catalog().callers.get(&caller).map(|c| c.dns.clone()));
            match tokio::net::UdpSocket::from_std(udp) {
                Ok(socket) => {
                    tasks.spawn(dns::serve(socket, Arc::clone(&lookup), Arc::clone(&client_of)));
                }
                Err(e) => warn!("fleet DNS is off: {e}"),
            }
            if let Some(l) = tcp.and_then(|l| tokio::net::TcpListener::from_std(l).ok()) {
                tasks.spawn(dns::serve_tcp(l, lookup, client_of));
            }
        }
        if let (Some(addr), Some(_)) = (self.cfg.listen, &self.cfg.identity) {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    info!(%addr, "taking direct connections from other nodes' agents");
                    tasks.spawn(Arc::clone(&self).inbound(l));
                }
                Err(e) => warn!("--mesh-listen {addr}: {e}; other nodes reach this one through the hub"),
            }
        }
        let mut listeners: HashMap<Listened, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut refused: HashSet<Listened> = HashSet::new();
        let mut changes = self.agent.subscribe();
        let mut views = self.agent.mesh_view.subscribe();
        loop {
            let view = Arc::clone(&views.borrow_and_update());
            let (agent, range) = (Arc::clone(&self.agent), self.range);
            match crate::blocking(move || agent.catalog(&view, range)).await {
                Ok(mut c) => {
                    if routed.is_err() {
                        c.entries.clear();
                    }
                    let c = Arc::new(c);
                    self.sync_listeners(&c, &mut listeners, &mut refused);
                    if let Ok(mut slot) = self.catalog.write() {
                        *slot = c;
                    }
                }
                Err(e) => warn!("fleet services: {e}"),
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = views.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = shutdown.changed() => break,
            }
            // A burst of changes (a rollout) is taken in one step.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (_, h) in listeners {
            h.abort();
        }
        tasks.abort_all();
        if routed.is_ok() {
            let _ = crate::blocking(move || skiff_runtime::netlink::Rtnl::open()?.del_local_route(net, prefix)).await;
        }
    }

    /// Listens on every `(virtual address, port)` the catalog has, TCP or UDP, and on
    /// nothing else.
    fn sync_listeners(
        self: &Arc<Self>,
        c: &Catalog,
        listeners: &mut HashMap<Listened, tokio::task::JoinHandle<()>>,
        refused: &mut HashSet<Listened>,
    ) {
        let wanted: HashSet<Listened> = c
            .entries
            .values()
            .flat_map(|e| e.service.ports.iter().map(move |p| (SocketAddrV4::new(e.vip, p.port), p.protocol)))
            .collect();
        listeners.retain(|a, h| {
            let keep = wanted.contains(a) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        refused.retain(|a| wanted.contains(a));
        for key @ (a, protocol) in wanted {
            if listeners.contains_key(&key) {
                continue;
            }
            let task = match protocol {
                Protocol::Tcp => {
                    listen_beside_services(SocketAddr::V4(a)).map(|l| tokio::spawn(Arc::clone(self).accept(l, a)))
                }
                Protocol::Udp => udp::bind_beside_services(a)
                    .map(|s| tokio::spawn(Arc::clone(self).accept_datagrams(Arc::new(s), a))),
            };
            match task {
                Ok(task) => {
                    refused.remove(&key);
                    listeners.insert(key, task);
                }
                Err(e) => {
                    if refused.insert(key) {
                        warn!(address = %a, ?protocol, "a service's virtual address cannot be listened on: {e}");
                    }
                }
            }
        }
    }

    async fn accept(self: Arc<Self>, l: tokio::net::TcpListener, at: SocketAddrV4) {
        loop {
            match l.accept().await {
                Ok((conn, peer)) => {
                    let Ok(taken) = self.calls.try_enter(peer.ip()) else {
                        debug!(%peer, "too many calls open; refused");
                        continue;
                    };
                    let m = Arc::clone(&self);
                    tokio::spawn(async move {
                        let _taken = taken;
                        if let Err(e) = m.call(conn, peer, at).await {
                            debug!(%peer, service = %at, "fleet service call: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!(address = %at, "accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One instance's connection to a service's virtual address.
    async fn call(&self, mut conn: TcpStream, peer: SocketAddr, at: SocketAddrV4) -> Result<(), String> {
        let _ = conn.set_nodelay(true);
        let (name, port) = self.called(peer, at, Protocol::Tcp)?;
        match self.route(&name, port).await {
            Route::Local(to) => splice(&mut conn, &mut connect(to).await?).await,
            Route::Direct(mut to) => splice(&mut conn, &mut to).await,
            Route::Relay => self.relay(conn, &name, port).await,
        }
    }

    /// The service an instance calls at `at`, and its port there: only an instance of
    /// this node sharing a network with it.
    fn called(&self, peer: SocketAddr, at: SocketAddrV4, protocol: Protocol) -> Result<(String, ServicePort), String> {
        let c = self.catalog();
        let IpAddr::V4(from) = peer.ip() else { return Err("not an instance".into()) };
        let caller = c.callers.get(&from).ok_or("not an instance of this node")?;
        let name = c.by_vip.get(at.ip()).ok_or("no service at this address")?;
        let e = c.entries.get(name).ok_or("no service at this address")?;
        if !e.service.shares_a_network(&caller.networks) {
            return Err(format!("{from} shares no network with {name}"));
        }
        let port = e.service.port(at.port(), protocol).ok_or("not a port of the service")?;
        Ok((name.clone(), *port))
    }

    /// Where a call to `service`'s `port` goes: an instance of this node that serves it,
    /// else a node of this one's site, else any, directly; else the hub's relay.
    async fn route(&self, service: &str, port: ServicePort) -> Route {
        let c = self.catalog();
        let Some(e) = c.entries.get(service) else { return Route::Relay };
        if let Some(ip) = self.next_local(e) {
            return Route::Local(SocketAddr::from((ip, port.target)));
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let site = self.cfg.site.as_deref().or(c.site.as_deref());
        for ep in skiff_model::mesh::by_locality(&e.service.endpoints, site, turn).into_iter().take(3) {
            let Some(addr) = ep.mesh.as_deref().filter(|_| self.reachable(&ep.node)) else { continue };
            match self.direct(ep, addr, service, port).await {
                Ok(to) => return Route::Direct(Box::new(to)),
                // It answered, but serves none now (its word is newer than the hub's
                // view): the next endpoint.
                Err(Dialed::Refused(err)) => debug!(node = %ep.node, "{err}"),
                Err(Dialed::Unreachable(err)) => {
                    info!(node = %ep.node, %addr, "no direct path ({err}); relaying through the hub for a minute");
                    if let Ok(mut u) = self.unreachable.lock() {
                        u.insert(ep.node.clone(), Instant::now());
                    }
                }
            }
        }
        Route::Relay
    }

    /// Datagrams to a service's UDP port on its virtual address: a flow per instance
    /// address and port, each routed once as a connection is, the replies sent back
    /// from the virtual address. Only an instance that may call the service starts a
    /// flow; past its share of flows, its least recently used one here makes room. The
    /// flows end with this task (the listener going away).
    async fn accept_datagrams(self: Arc<Self>, sock: Arc<UdpSocket>, at: SocketAddrV4) {
        struct Flow {
            tx: mpsc::Sender<Vec<u8>>,
            task: tokio::task::AbortHandle,
            last: Instant,
            /// Its place in the instance's share, given back as the entry goes.
            _slot: skiff_sys::connlimit::ConnGuard,
        }
        let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            let (n, from) = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(address = %at, "receiving: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                // Ended flows are reaped as they end.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            let mut d = buf[..n].to_vec();
            if let Some(f) = flows.get_mut(&from) {
                f.last = Instant::now();
                match f.tx.try_send(d) {
                    // Its flow ended (idle): a new one.
                    Err(mpsc::error::TrySendError::Closed(back)) => d = back,
                    // Taken, or dropped for a full queue (as a full socket buffer drops).
                    _ => continue,
                }
            }
            // Ended flows give their places back.
            flows.retain(|_, f| !f.tx.is_closed());
            // Checked before any flow is made for it: a stranger's datagrams cost nothing.
            let (name, port) = match self.called(from, at, Protocol::Udp) {
                Ok(c) => c,
                Err(e) => {
                    debug!(%from, service = %at, "a datagram dropped: {e}");
                    continue;
                }
            };
            let slot = match self.flows.try_enter(from.ip()) {
                Ok(t) => t,
                Err(_) => {
                    // Its oldest flow here goes (a resolver's one-off queries, most likely).
                    let oldest = flows.iter().filter(|(a, _)| a.ip() == from.ip()).min_by_key(|(_, f)| f.last);
                    if let Some(f) = oldest.map(|(a, _)| *a).and_then(|a| flows.remove(&a)) {
                        f.task.abort();
                    }
                    match self.flows.try_enter(from.ip()) {
                        Ok(t) => t,
                        Err(_) => {
                            debug!(%from, "too many flows open; a datagram dropped");
                            continue;
                        }
                    }
                }
            };
            let (tx, rx) = mpsc::channel(udp::FLOW_QUEUE);
            let _ = tx.try_send(d);
            let (m, back) = (Arc::clone(&self), Arc::clone(&sock));
            let task = tasks.spawn(async move {
                let caller = udp::End { from: rx, to: udp::Sink::Udp(back, Some(from)) };
                if let Err(e) = m.flow(caller, &name, port).await {
                    debug!(%from, service = %name, "fleet service datagrams: {e}");
                }
            });
            flows.insert(from, Flow { tx, task, last: Instant::now(), _slot: slot });
        }
    }

    /// One instance's flow of datagrams to a service's UDP port.
    async fn flow(&self, caller: udp::End, name: &str, port: ServicePort) -> Result<(), String> {
        match self.route(name, port).await {
            Route::Local(to) => udp::bridge(caller, udp::socket(connect_udp(to).await?)).await,
            Route::Direct(to) => udp::bridge(caller, udp::stream(to)).await,
            Route::Relay => {
                let (near, far) = tokio::io::duplex(DATAGRAM_MAX * 2);
                tokio::select! {
                    r = self.relay(far, name, port) => return r,
                    () = udp::bridge(caller, udp::stream(near)) => {}
                }
            }
        }
        Ok(())
    }

    /// The next of this node's instances that serve `e` (round robin), if any.
    fn next_local(&self, e: &Entry) -> Option<Ipv4Addr> {
        let n = e.local.len();
        (n > 0).then(|| e.local[self.turn.fetch_add(1, Ordering::Relaxed) % n].first().map(|(_, a)| *a)).flatten()
    }

    fn reachable(&self, node: &str) -> bool {
        self.unreachable.lock().map(|u| u.get(node).is_none_or(|t| t.elapsed() > UNREACHABLE_FOR)).unwrap_or(true)
    }

    /// A connection to `service` through `ep`'s agent, at `addr`, once it said `ok`.
    async fn direct(
        &self,
        ep: &Endpoint,
        addr: &str,
        service: &str,
        port: ServicePort,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Dialed> {
        let id = self.cfg.identity.as_ref().ok_or(Dialed::Refused("this node has not joined a hub".into()))?;
        let serials = self.catalog().certs.get(&ep.node).cloned().unwrap_or_default();
        let tls = peer::client_config(id, &ep.node, &serials).map_err(Dialed::Refused)?;
        let dial = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from("skiff-node").map_err(|e| e.to_string())?;
            tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.map_err(|e| e.to_string())
        };
        let lost = Dialed::Unreachable;
        let mut s =
            tokio::time::timeout(DIAL_TIMEOUT, dial).await.map_err(|_| lost("timed out".into()))?.map_err(lost)?;
        let dial = Dial { service: service.to_string(), port: port.port, protocol: port.protocol };
        let mut line = serde_json::to_string(&dial).map_err(|e| Dialed::Refused(e.to_string()))?;
        line.push('\n');
        s.write_all(line.as_bytes()).await.map_err(|e| lost(e.to_string()))?;
        let answer = tokio::time::timeout(DIAL_TIMEOUT, read_line(&mut s))
            .await
            .map_err(|_| lost("no answer".into()))?
            .map_err(lost)?;
        match answer.as_str() {
            "ok" => Ok(s),
            other => Err(Dialed::Refused(format!("node {} said: {other}", ep.node))),
        }
    }

    /// The connection (or a flow's framed datagrams) carried by the hub to a node that
    /// runs the service.
    async fn relay<C>(&self, conn: C, service: &str, port: ServicePort) -> Result<(), String>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let (Some(id), Some(hub)) = (&self.cfg.identity, &self.cfg.hub) else {
            return Err(format!("no instance of {service} serves on this node"));
        };
        let base = hub.read().map(|h| h.clone()).unwrap_or_default();
        let node = &self.agent.cfg.node_name;
        let udp = if port.protocol == Protocol::Udp { "/udp" } else { "" };
        let url =
            format!("{base}/api/v1/nodes/{node}/mesh/{service}/{}{udp}", port.port).replacen("https://", "wss://", 1);
        let tls = id.current_tls().map_err(|e| e.to_string())?;
        let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls));
        let dial = tokio_tungstenite::connect_async_tls_with_config(url.as_str(), None, true, Some(connector));
        let (ws, _) = tokio::time::timeout(Duration::from_secs(10), dial)
            .await
            .map_err(|_| "the hub's relay: timed out".to_string())?
            .map_err(|e| format!("the hub's relay: {e}"))?;
        relay::splice(ws, conn).await
    }

    /// Direct connections from other nodes' agents.
    async fn inbound(self: Arc<Self>, l: tokio::net::TcpListener) {
        // Bounded: each holds a TLS session and a connection to an instance.
        let open = per_address(CONNS_FROM_PEERS, CONNS_PER_PEER);
        loop {
            let (tcp, peer) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("mesh: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(taken) = open.try_enter(peer.ip()) else { continue };
            let m = Arc::clone(&self);
            tokio::spawn(async move {
                let _taken = taken;
                if let Err(e) = m.serve_peer(tcp).await {
                    info!(%peer, "mesh: a direct connection refused: {e}");
                }
            });
        }
    }

    async fn serve_peer(&self, tcp: TcpStream) -> Result<(), String> {
        let _ = tcp.set_nodelay(true);
        let id = self.cfg.identity.as_ref().ok_or("not joined")?;
        let cfg = peer::server_config(id)?;
        let accept = tokio_rustls::TlsAcceptor::from(Arc::new(cfg)).accept(tcp);
        let mut s = tokio::time::timeout(Duration::from_secs(10), accept)
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS: {e}"))?;
        let (node, serial) = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(peer::identity)
            .ok_or("no node certificate")?;
        if !self.catalog().certs.get(&node).is_some_and(|known| known.contains(&serial)) {
            // A deleted node, or a certificate since replaced: nothing, not even a reason.
            return Err(format!("node {node}: certificate {serial} is not one the hub knows"));
        }
        let line = tokio::time::timeout(Duration::from_secs(10), read_line(&mut s))
            .await
            .map_err(|_| "no request".to_string())??;
        let dial: Dial = serde_json::from_str(&line).map_err(|e| format!("a bad request: {e}"))?;
        let c = self.catalog();
        let target = (|| {
            if !c.clients.get(&dial.service).is_some_and(|n| n.contains(&node)) {
                return Err(format!("node {node} may not reach {}", dial.service));
            }
            let e = c.entries.get(&dial.service);
            let (e, ip) = e
                .and_then(|e| Some((e, self.next_local(e)?)))
                .ok_or_else(|| format!("no instance of {} serves on this node", dial.service))?;
            let p = e.service.port(dial.port, dial.protocol);
            let p = p.ok_or_else(|| format!("{} has no port {} over {:?}", dial.service, dial.port, dial.protocol))?;
            Ok(SocketAddr::from((ip, p.target)))
        })();
        let to = match (target, dial.protocol) {
            (Ok(t), Protocol::Tcp) => connect(t).await.map(Called::Stream),
            (Ok(t), Protocol::Udp) => connect_udp(t).await.map(Called::Datagrams),
            (Err(e), _) => Err(e),
        };
        // The caller learns whether, not this node's addresses.
        let answer = match &to {
            Ok(_) => "ok\n".to_string(),
            Err(_) => format!("no instance of {} can take the call here\n", dial.service.replace('\n', " ")),
        };
        s.write_all(answer.as_bytes()).await.map_err(|e| e.to_string())?;
        match to {
            Ok(Called::Stream(mut to)) => splice(&mut s, &mut to).await,
            Ok(Called::Datagrams(to)) => {
                udp::bridge(udp::stream(s), udp::socket(to)).await;
                Ok(())
            }
            Err(e) => Err(format!("node {node}: {e}")),
        }
    }
}

/// Calls one instance may have open through the mesh, and direct connections one peer
/// address may hold (1,024 in all): one instance or peer cannot take all of the agent's
/// descriptors.
const CALLS_PER_INSTANCE: usize = 256;
/// UDP flows one instance may have open (its oldest goes for a new one), and all may.
const FLOWS_PER_INSTANCE: usize = 64;
const FLOWS: usize = 1024;
const CONNS_PER_PEER: usize = 256;
const CONNS_FROM_PEERS: usize = 1024;

/// At most `per_ip` open from one address (and `total` in all).
pub(crate) fn per_address(total: usize, per_ip: usize) -> ConnCounter {
    ConnCounter::new(ConnLimits { total, per_ip, rate_per_ip: None })
}

/// A `(virtual address, port)` the agent holds, over TCP or UDP.
type Listened = (SocketAddrV4, Protocol);

/// Where one call goes.
enum Route {
    /// An instance of this node (its address and target port).
    Local(SocketAddr),
    /// Another node's agent, which said it takes the call.
    Direct(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Through the hub.
    Relay,
}

/// What a direct connection from another node reaches here.
enum Called {
    Stream(TcpStream),
    Datagrams(UdpSocket),
}

/// Why a direct connection to another node's agent was not made.
enum Dialed {
    /// No TLS session with it (down, or behind NAT): the relay, for a while.
    Unreachable(String),
    /// It answered, but will not serve this call.
    Refused(String),
}

/// A TCP listener that may share its port with the services' listeners on their virtual
/// addresses (and theirs with the node's published ports): both set `SO_REUSEPORT`, so a
/// service on port 5432 and a published 5432 can both be. The kernel gives each
/// connection to the most specific address bound.
pub(crate) fn listen_beside_services(at: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = if at.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(at)?;
    s.listen(1024)
}

async fn connect(to: SocketAddr) -> Result<TcpStream, String> {
    let c = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(to)).await;
    let s = c.map_err(|_| format!("{to}: timed out"))?.map_err(|e| format!("{to}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A UDP socket connected to `to` (an instance of this node).
async fn connect_udp(to: SocketAddr) -> Result<UdpSocket, String> {
    let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await.map_err(|e| e.to_string())?;
    s.connect(to).await.map_err(|e| format!("{to}: {e}"))?;
    Ok(s)
}

async fn splice<A, B>(a: &mut A, b: &mut B) -> Result<(), String>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // 64 KiB a read (tokio's default is 8): a bulk transfer takes a few syscalls and TLS
    // records per read instead of many. (256 KiB and AES-128 first measured no better:
    // 894 against 844 MiB/s, within the noise, for four times the memory a call.)
    tokio::io::copy_bidirectional_with_sizes(a, b, 64 << 10, 64 << 10).await.map(|_| ()).map_err(|e| e.to_string())
}

/// One line (without its `\n`), read a byte at a time so nothing after it is taken.
async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await.map_err(|e| e.to_string())?;
        if b == b'\n' {
            return String::from_utf8(line).map_err(|_| "not text".to_string());
        }
        if line.len() >= DIAL_LINE_MAX {
            return Err("a line too long".into());
        }
        line.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::mesh::ServicePort;

    fn caller(stack: &str, nets: &[&str]) -> Caller {
        Caller { stack: stack.into(), networks: nets.iter().map(|n| n.to_string()).collect(), dns: vec![] }
    }

    fn entry(name: &str, stack: &str, vip: [u8; 4], local: &[[u8; 4]]) -> Entry {
        Entry {
            service: Service {
                name: name.into(),
                stack: stack.into(),
                aliases: vec!["pg".into()],
                networks: vec![format!("{stack}_default")],
                ports: vec![ServicePort::tcp(5432, 5432)],
                endpoints: vec![],
                instance: None,
            },
            vip: vip.into(),
            local: local.iter().map(|a| vec![(format!("{stack}_default"), Ipv4Addr::from(*a))]).collect(),
        }
    }

    #[test]
    fn names_resolve_to_peers_here_then_to_virtual_addresses_within_shared_networks() {
        let mut c = Catalog::default();
        c.callers.insert([10, 0, 0, 2].into(), caller("shop", &["shop_default"]));
        c.callers.insert([10, 0, 0, 9].into(), caller("other", &["other_default"]));
        c.peers.push(Peer {
            names: vec!["web-1".into(), "web".into()],
            addrs: vec![("shop_default".to_string(), [10, 0, 0, 3].into())],
        });
        c.entries.insert("db".into(), entry("db", "shop", [10, 213, 130, 1], &[]));
        c.entries.insert("web".into(), entry("web", "shop", [10, 213, 130, 2], &[[10, 0, 0, 3]]));
        let at = |from: [u8; 4], q: &str| c.resolve(from.into(), q);
        let ip = |a: [u8; 4]| vec![Ipv4Addr::from(a)];
        assert_eq!(at([10, 0, 0, 2], "web"), ip([10, 0, 0, 3]), "a peer on this node: its own address, any port");
        assert_eq!(at([10, 0, 0, 2], "db"), ip([10, 213, 130, 1]), "elsewhere: the virtual address");
        assert_eq!(at([10, 0, 0, 2], "pg.shop.svc.cluster.local."), ip([10, 213, 130, 1]));
        assert_eq!(at([10, 0, 0, 2], "tasks.web"), ip([10, 0, 0, 3]));
        assert!(at([10, 0, 0, 2], "tasks.db").is_empty(), "no instance of db here");
        assert!(at([10, 0, 0, 9], "db").is_empty() && at([10, 0, 0, 9], "db.shop").is_empty(), "another stack");
        assert!(at([10, 0, 0, 9], "web").is_empty(), "another stack's peer");
        assert!(at([192, 168, 1, 5], "db").is_empty(), "not an instance of this node");
        // A stateful set's instance `db-0.pg` of stack shop, and a deployment `db-0` of a
        // stack named `pg` on a network shop shares: the caller's own stack's name wins.
        let mut set = entry("db-0.pg", "shop", [10, 213, 130, 3], &[]);
        set.service.aliases.clear();
        c.entries.insert("db-0.pg".into(), set);
        let mut other = entry("db-0", "pg", [10, 213, 130, 4], &[]);
        other.service.networks = vec!["shop_default".into()];
        other.service.aliases.clear();
        c.entries.insert("db-0".into(), other);
        let at = |from: [u8; 4], q: &str| c.resolve(from.into(), q);
        assert_eq!(at([10, 0, 0, 2], "db-0.pg"), ip([10, 213, 130, 3]));
        assert_eq!(at([10, 0, 0, 2], "db-0.pg.svc"), ip([10, 213, 130, 4]), "the other by its full name");
        // A peer on two networks (an address on each): each caller gets the address on a
        // network it shares, by whichever of its own addresses it asks from.
        let two = vec![("shop_default".to_string(), [10, 0, 0, 4].into()), ("plant".to_string(), [10, 0, 1, 4].into())];
        c.peers.push(Peer { names: vec!["api-1".into(), "api".into()], addrs: two.clone() });
        let mut api = entry("api", "shop", [10, 213, 130, 5], &[]);
        api.service.networks.push("plant".into());
        api.local = vec![two];
        c.entries.insert("api".into(), api);
        c.callers.insert([10, 0, 1, 9].into(), caller("line", &["plant"]));
        c.callers.insert([10, 0, 2, 9].into(), caller("line", &["plant"]));
        let at = |from: [u8; 4], q: &str| c.resolve(from.into(), q);
        assert_eq!(at([10, 0, 0, 2], "api"), ip([10, 0, 0, 4]));
        assert_eq!(at([10, 0, 1, 9], "api"), ip([10, 0, 1, 4]), "on the network the caller shares");
        assert_eq!(at([10, 0, 2, 9], "api"), ip([10, 0, 1, 4]), "by its other address");
        assert_eq!(at([10, 0, 1, 9], "tasks.api.shop"), ip([10, 0, 1, 4]));
        assert_eq!(at([10, 0, 0, 2], "tasks.api"), ip([10, 0, 0, 4]));
    }
}
