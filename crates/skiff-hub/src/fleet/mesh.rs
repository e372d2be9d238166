//! The fleet's services as the hub sees them (`skiff_model::mesh`): what each node may
//! reach and who may reach its own ([`Fleet::mesh_view`]), the node a relayed call goes to
//! ([`Fleet::relay_target`]).
//!
//! Architecture Invariant: a node is told only of services that share a network with
//! something it runs, and only the nodes the hub lists as a service's clients may call
//! it directly; the relay asks the same view. What a node reaches through the mesh is
//! what its own workloads could reach on one machine.

use super::{internal, Fleet, FleetError};
use crate::store::NodeList;
use skiff_model::mesh::{by_locality, Endpoint, MeshView, Service};
use skiff_model::{Health, InstanceState, InstanceStatus, NetworkMode};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Every service with its endpoints, and every node's networks, at one revision and one
/// generation of node reports: views for thousands of nodes are cut from one table.
#[derive(Debug, Default)]
pub(crate) struct MeshTable {
    /// What it was made of: the generation of node reports, the nodes' parts (kept, so
    /// the pointer stays theirs) and the node records (in `nodes`).
    gen: u64,
    pub(super) parts: Arc<BTreeMap<String, Arc<skiff_model::proto::Assignment>>>,
    services: BTreeMap<String, (Service, BTreeMap<String, Endpoint>)>,
    nets: BTreeMap<String, BTreeSet<String>>,
    nodes: Arc<NodeFacts>,
    /// Which table this is: a tunnel keeps the id of the one it last cut its view from,
    /// not the table, so a table replaced is freed at once by the hub, and never held
    /// (with 100,000 records) by a tunnel that has not looked again yet.
    id: u64,
}

/// The id the next table gets.
static NEXT_TABLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl MeshTable {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Whether views cut from `other` are cut from the same node records as this table's
    /// (both made of the same parts): the same records, or the same for every node that
    /// holds a part. A node that runs nothing is no endpoint and no client, so its join,
    /// or its certificate's renewal, tells no other node anything (while 100,000 nodes
    /// join, every join would wake every tunnel); its own view is cut again when it says
    /// hello and when it gets a part.
    pub(super) fn tells_the_same_of_nodes(&self, other: &MeshTable) -> bool {
        let same = |a: Option<&crate::store::NodeRecord>, b: Option<&crate::store::NodeRecord>| match (a, b) {
            (Some(a), Some(b)) => std::ptr::eq(a, b) || a == b,
            (a, b) => a.is_none() && b.is_none(),
        };
        Arc::ptr_eq(&self.nodes, &other.nodes)
            || (self.nets.len() == other.nets.len()
                && self
                    .nets
                    .keys()
                    .zip(other.nets.keys())
                    .all(|(a, b)| a == b && same(self.nodes.get(a), other.nodes.get(b))))
    }
}

/// The node records the table was made with, looked up by name through an index made
/// at the first look (a binary search over 100,000 records costs a cache miss a step: at
/// an apply to every node, a tenth of a hub's time went to finding each node's site).
/// Kept from table to table while the records stay the same.
///
/// The index maps a hash of each name to its record's position: one allocation, not a
/// copy of every name (freeing 100,000 names, each on its own, took a third of a hub's
/// time at an apply to every node). Names that share a hash are found by binary search.
#[derive(Debug, Default)]
struct NodeFacts {
    records: NodeList,
    hasher: std::hash::RandomState,
    index: std::sync::OnceLock<HashMap<u64, u32>>,
}

/// In the index: more than one name has this hash.
const SHARED_HASH: u32 = u32::MAX;

impl NodeFacts {
    fn new(records: NodeList) -> Self {
        NodeFacts { records, hasher: Default::default(), index: Default::default() }
    }

    fn get(&self, node: &str) -> Option<&crate::store::NodeRecord> {
        use std::hash::BuildHasher;
        let index = self.index.get_or_init(|| {
            let mut index = HashMap::with_capacity(self.records.len());
            for (i, n) in self.records.iter().enumerate() {
                let at = u32::try_from(i).unwrap_or(SHARED_HASH);
                index.entry(self.hasher.hash_one(n.name.as_str())).and_modify(|p| *p = SHARED_HASH).or_insert(at);
            }
            index
        });
        match index.get(&self.hasher.hash_one(node)).copied()? {
            SHARED_HASH => crate::store::find_node(&self.records, node),
            i => self.records.get(i as usize).map(|n| &**n).filter(|n| n.name == node),
        }
    }

    fn joined(&self, node: &str) -> bool {
        self.get(node).is_some()
    }

    fn site(&self, node: &str) -> Option<String> {
        self.get(node)?.info.labels.get("site").cloned()
    }

    /// The node's certificate serials (current, and a renewal's).
    fn certs(&self, node: &str) -> Option<Vec<String>> {
        let n = self.get(node)?;
        Some(std::iter::once(n.cert_serial.clone()).chain(n.next_serial.clone()).collect())
    }
}

/// Whether a reported instance serves: running, and healthy where it is checked.
pub fn serves(i: &InstanceStatus) -> bool {
    i.state == InstanceState::Running
        && i.pid.is_some()
        && !matches!(i.health, Some(Health::Starting | Health::Unhealthy))
}

impl Fleet {
    /// Changes when what the services' endpoints are made of may have (a node's report or
    /// its mesh address); the revision's own changes come through `subscribe`.
    pub fn mesh_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.mesh_gen.subscribe()
    }

    pub(crate) fn mesh_moved(&self) {
        self.mesh_gen.send_modify(|g| *g += 1);
    }

    /// The table at the current revision and generation of node reports: the one made
    /// last while the nodes' parts, their records and what they serve are the same (a
    /// revision that moved none of them, as a join elsewhere, makes no new table, and
    /// tunnels cut no new views from it).
    pub(crate) fn mesh_table(&self) -> Result<Arc<MeshTable>, FleetError> {
        let at = self.at_revision()?;
        let gen = *self.mesh_gen.borrow();
        let key = (at.revision, gen);
        let last = || self.mesh_table.lock().ok().and_then(|t| t.clone());
        let current = |last: &Option<((u64, u64), Arc<MeshTable>)>| {
            last.as_ref().filter(|(k, _)| *k == key).map(|(_, t)| Arc::clone(t))
        };
        if let Some(t) = current(&last()) {
            return Ok(t);
        }
        let _one = self.making.lock().map_err(|_| super::failed("a lock was poisoned"))?;
        let last = last();
        if let Some(t) = current(&last) {
            return Ok(t);
        }
        let records = self.store.nodes().map_err(internal)?;
        let same_records = |t: &MeshTable| {
            let (a, b) = (&t.nodes.records, &records);
            Arc::ptr_eq(a, b)
                || (a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| Arc::ptr_eq(x, y) || x == y))
        };
        let remember = |t: &Arc<MeshTable>| {
            if let Ok(mut slot) = self.mesh_table.lock() {
                *slot = Some((key, Arc::clone(t)));
            }
        };
        if let Some((_, t)) = last.as_ref().filter(|(_, t)| t.gen == gen && Arc::ptr_eq(&t.parts, &at.nodes)) {
            if same_records(t) {
                remember(t);
                return Ok(Arc::clone(t));
            }
        }
        let nodes = match last {
            Some((_, t)) if Arc::ptr_eq(&t.nodes.records, &records) => Arc::clone(&t.nodes),
            _ => Arc::new(NodeFacts::new(records)),
        };
        let started = std::time::Instant::now();
        let id = NEXT_TABLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut t = MeshTable { gen, parts: Arc::clone(&at.nodes), nodes, id, ..Default::default() };
        // The nodes come in order: their networks are gathered in order, and the map is
        // made from them at once.
        let mut nets = Vec::new();
        for (node, a) in at.nodes.iter().filter(|(n, _)| t.nodes.joined(n)) {
            let bridge = a.deployments.iter().filter(|d| d.spec.network == NetworkMode::Bridge);
            let mut mine = BTreeSet::new();
            for d in bridge {
                mine.extend(d.spec.joined_networks());
                let Some(service) = Service::of(&d.spec) else { continue };
                // A stateful set's instances placed here, each a service of its own too.
                let each = d.indexes.iter().filter_map(|&n| Service::of_instance(&d.spec, n)).map(|s| (s, 1));
                for (service, total) in std::iter::once((service, d.indexes.len() as u32)).chain(each) {
                    // What the node reports and its mesh address, read for endpoints only.
                    let ready = self
                        .statuses
                        .lock()
                        .ok()
                        .and_then(|s| {
                            let v = s.get(node)?;
                            Some(v.iter().filter(|i| service.served_by(&i.deployment, &i.name) && serves(i)).count())
                        })
                        .unwrap_or_default() as u32;
                    let mesh = self.seen.lock().ok().and_then(|s| s.get(node)?.mesh.clone());
                    let endpoint = Endpoint { node: node.clone(), site: t.nodes.site(node), mesh, ready, total };
                    let (_, eps) = t.services.entry(service.name.clone()).or_insert_with(|| (service, BTreeMap::new()));
                    eps.insert(node.clone(), endpoint);
                }
            }
            nets.push((node.clone(), mine));
        }
        t.nets = nets.into_iter().collect();
        super::took("made the services' table", t.nets.len(), started);
        let t = Arc::new(t);
        remember(&t);
        Ok(t)
    }

    /// What `node` is told of the fleet's services: those sharing a network with
    /// something it runs (with their endpoints on other nodes), and for each service it
    /// runs the other nodes that may call it.
    pub fn mesh_view(&self, node: &str) -> Result<MeshView, FleetError> {
        Ok(Self::view_in(&*self.mesh_table()?, node))
    }

    /// `node`'s view cut from table `t` (a tunnel that holds the table it cut the last
    /// view from cuts none while the table stays the same).
    pub(crate) fn view_in(t: &MeshTable, node: &str) -> MeshView {
        let empty = BTreeSet::new();
        let mine = t.nets.get(node).unwrap_or(&empty);
        let mut view = MeshView { site: t.nodes.site(node), ..Default::default() };
        for (name, (s, eps)) in &t.services {
            if s.shares_a_network(mine) {
                let mut s = s.clone();
                s.endpoints = eps.values().filter(|e| e.node != node).cloned().collect();
                view.services.push(s);
            }
            if eps.contains_key(node) {
                let callers: BTreeSet<String> = t
                    .nets
                    .iter()
                    .filter(|(n, nets)| n.as_str() != node && s.shares_a_network(nets))
                    .map(|(n, _)| n.clone())
                    .collect();
                view.clients.insert(name.clone(), callers);
            }
        }
        let named = view
            .services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| &e.node))
            .chain(view.clients.values().flatten());
        for n in named {
            if let Some(c) = t.nodes.certs(n) {
                view.certs.insert(n.clone(), c);
            }
        }
        view
    }

    /// Where a call of `node` to `service:port` through the relay goes: a node with an
    /// instance that serves it (`node`'s site first), that instance, and its port.
    pub fn relay_target(
        &self,
        node: &str,
        service: &str,
        port: u16,
        protocol: skiff_model::Protocol,
        turn: usize,
    ) -> Result<(String, String, u16), FleetError> {
        let view = self.mesh_view(node)?;
        let s = view
            .services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| FleetError::Forbidden(format!("node {node:?} may not reach service {service:?}")))?;
        let p = s
            .port(port, protocol)
            .ok_or_else(|| FleetError::NotFound(format!("service {service:?} has no port {port} over {protocol:?}")))?;
        let site = self.mesh_table()?.nodes.site(node);
        let statuses = self.statuses.lock().map(|s| s.clone()).unwrap_or_default();
        for ep in by_locality(&s.endpoints, site.as_deref(), turn) {
            let mut ready: Vec<&InstanceStatus> = statuses
                .get(&ep.node)
                .map(|v| v.iter().filter(|i| s.served_by(&i.deployment, &i.name) && serves(i)).collect())
                .unwrap_or_default();
            // Instances being replaced only when no other serves.
            if ready.iter().any(|i| !i.retiring) {
                ready.retain(|i| !i.retiring);
            }
            if !ready.is_empty() {
                let i = ready[turn % ready.len()];
                return Ok((ep.node.clone(), i.name.clone(), p.target));
            }
        }
        Err(FleetError::NotFound(format!("no instance of {service:?} serves on another node")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> Arc<crate::store::NodeRecord> {
        Arc::new(crate::store::NodeRecord {
            name: name.into(),
            revision: 1,
            cert_serial: format!("serial-{name}"),
            joined_ms: 0,
            info: Default::default(),
            not_after_ms: None,
            next_serial: None,
            next_not_after_ms: None,
        })
    }

    /// Found by the hash of the name, and by binary search where names share a hash; a
    /// name whose hash is another's position is not taken for that other.
    #[test]
    fn node_records_are_found_by_name() {
        let names = ["edge-1", "edge-2", "edge-3"];
        let facts = NodeFacts::new(Arc::new(names.iter().map(|n| record(n)).collect()));
        for n in names {
            assert_eq!(facts.get(n).map(|r| r.name.as_str()), Some(n));
        }
        assert!(facts.get("edge-4").is_none());
        assert!(!facts.joined("nobody"));
        // Every name under one hash, and a stranger's hash pointing at edge-2.
        let shared = NodeFacts::new(Arc::clone(&facts.records));
        use std::hash::BuildHasher;
        let mut index: HashMap<u64, u32> = names.iter().map(|n| (shared.hasher.hash_one(*n), SHARED_HASH)).collect();
        index.insert(shared.hasher.hash_one("stranger"), 1);
        shared.index.set(index).unwrap();
        for n in names {
            assert_eq!(shared.get(n).map(|r| r.name.as_str()), Some(n));
        }
        assert!(shared.get("stranger").is_none(), "edge-2 is not the stranger");
    }
}
