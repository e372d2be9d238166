//! The hub's nodes, one path: the API and the controllers reach every node through
//! [`Nodes`], whether the hub runs beside one in-process agent (`skiff up`,
//! [`Embedded`]) or serves a fleet that joins over the network (`skiff hub`,
//! [`Fleet`]). Nothing above this module asks which it is, except for what only a fleet
//! has (joining, its CA, its security events: [`Nodes::fleet`]).

use crate::fleet::{Fleet, FleetError};
use crate::node::{version_warnings, LocalNode, NodeError, NodeInfo, NodeLink};
use crate::schedule::Plan;
use crate::store::{Store, StoreError};
use crate::BoxFuture;
use skiff_model::metrics::MetricsSample;
use skiff_model::{Deployment, EventRecord, InstanceStatus};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Why placing deployments onto nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("placement: {0}")]
    Fleet(#[from] FleetError),
    #[error("handing the node its deployments: {0}")]
    Node(#[from] NodeError),
}

pub trait Nodes: Send + Sync {
    /// Places the stored deployments onto nodes and hands each node its share.
    fn place(&self, store: &dyn Store) -> Result<(), PlaceError>;
    /// Tells the nodes that the store's revision moved outside placement (a rollout's
    /// next wave).
    fn wake(&self, store: &dyn Store) -> Result<(), PlaceError>;
    /// Moves placement on with time (nodes that joined, came back or went quiet); with
    /// `force`, places again even if nothing is known to have changed.
    fn tick(&self, force: bool) -> Result<(), PlaceError>;
    /// Checks deployments before they are stored. `Err`: the one a node cannot run, and
    /// why; `Ok`: warnings about what placement will not know.
    fn admit<'a>(&'a self, deployments: &'a [Deployment]) -> BoxFuture<'a, Result<Vec<String>, (String, NodeError)>>;
    /// Every instance every node reports.
    fn instances(&self) -> Vec<InstanceStatus>;
    /// The newest resource sample of every node.
    fn metrics(&self) -> Vec<MetricsSample>;
    /// Every node's events, at most `limit` per node.
    fn events(&self, limit: usize) -> Vec<EventRecord>;
    /// What watches wait on: each changes when nodes' state does.
    fn changes(&self) -> Vec<watch::Receiver<u64>>;
    /// The nodes as `skiff get nodes` shows them, with their counts from `instances`.
    fn list(&self, instances: &[InstanceStatus]) -> Result<Vec<NodeInfo>, PlaceError>;
    /// Where `all` would run if it were the whole desired state (`None`: everything on
    /// the one node).
    fn plan(&self, all: &[Deployment]) -> Result<Option<Plan>, PlaceError>;
    /// Deployment → why some of its instances have no node.
    fn unschedulable(&self) -> BTreeMap<String, String>;
    /// Whether every node has reported since the hub started, so controllers judge
    /// instances by what nodes say rather than by their silence.
    fn settled(&self, now_ms: u64) -> bool;
    /// The node running `instance`, reached in-process or through its tunnel.
    fn link_of(&self, instance: &str) -> Option<Arc<dyn NodeLink>>;
    /// The nodes holding instances of `deployment`.
    fn nodes_of(&self, deployment: &str) -> Vec<String>;
    /// The fleet, when nodes join over the network.
    fn fleet(&self) -> Option<&Arc<Fleet>> {
        None
    }
    /// What a dry run of `ours` (placed by `plan`) would have each node pull: node → images.
    fn would_pull(&self, ours: &[Deployment], plan: Option<&Plan>) -> BTreeMap<String, Vec<String>>;
}

/// One node in the hub's process: it runs every deployment.
pub struct Embedded(pub Arc<dyn LocalNode>);

impl Nodes for Embedded {
    fn would_pull(&self, ours: &[Deployment], _plan: Option<&Plan>) -> BTreeMap<String, Vec<String>> {
        let mut images: Vec<String> = ours.iter().map(|d| d.image.clone()).filter(|i| !self.0.has_image(i)).collect();
        images.sort();
        images.dedup();
        if images.is_empty() {
            return BTreeMap::new();
        }
        BTreeMap::from([(self.0.name(), images)])
    }

    fn place(&self, store: &dyn Store) -> Result<(), PlaceError> {
        let rev = store.revision()?;
        let all: Vec<Deployment> = store.list()?.into_iter().map(|s| s.spec).collect();
        Ok(self.0.assign(all, rev)?)
    }

    fn wake(&self, store: &dyn Store) -> Result<(), PlaceError> {
        self.place(store)
    }

    fn tick(&self, _force: bool) -> Result<(), PlaceError> {
        Ok(())
    }

    fn admit<'a>(&'a self, deployments: &'a [Deployment]) -> BoxFuture<'a, Result<Vec<String>, (String, NodeError)>> {
        Box::pin(async move {
            for d in deployments {
                self.0.admit(d).await.map_err(|e| (d.name.clone(), e))?;
            }
            Ok(vec![])
        })
    }

    fn instances(&self) -> Vec<InstanceStatus> {
        self.0.instances().unwrap_or_default()
    }

    fn metrics(&self) -> Vec<MetricsSample> {
        self.0.metrics().into_iter().collect()
    }

    fn events(&self, limit: usize) -> Vec<EventRecord> {
        self.0.events(limit).unwrap_or_default()
    }

    fn changes(&self) -> Vec<watch::Receiver<u64>> {
        vec![self.0.changes()]
    }

    fn list(&self, instances: &[InstanceStatus]) -> Result<Vec<NodeInfo>, PlaceError> {
        let (name, versions) = (self.0.name(), self.0.versions());
        Ok(vec![NodeInfo {
            instances: instances.iter().filter(|i| i.node == name).count(),
            name,
            state: "Ready".into(),
            arch: skiff_model::platform::host_arch().0.into(),
            os: std::env::consts::OS.into(),
            labels: BTreeMap::new(),
            runtimes: self.0.runtimes(),
            devices: self.0.devices(),
            problems: vec![],
            warnings: version_warnings(&versions),
            versions,
        }])
    }

    fn plan(&self, _all: &[Deployment]) -> Result<Option<Plan>, PlaceError> {
        Ok(None)
    }

    fn unschedulable(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn settled(&self, _now_ms: u64) -> bool {
        true
    }

    fn link_of(&self, instance: &str) -> Option<Arc<dyn NodeLink>> {
        let node: Arc<dyn NodeLink> = Arc::clone(&self.0) as Arc<dyn NodeLink>;
        node.has_instance(instance).then_some(node)
    }

    fn nodes_of(&self, _deployment: &str) -> Vec<String> {
        vec![self.0.name()]
    }
}

/// The remote nodes that join over the network, behind their fleet.
pub struct Remote(pub Arc<Fleet>);

impl Nodes for Remote {
    /// Nodes report what runs, not what their stores hold: a node pulls an image none of
    /// its instances runs now.
    fn would_pull(&self, ours: &[Deployment], plan: Option<&Plan>) -> BTreeMap<String, Vec<String>> {
        let Some(plan) = plan else { return BTreeMap::new() };
        let running = self.instances();
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in &plan.slots {
            let Some(d) = ours.iter().find(|d| d.name == s.deployment) else { continue };
            let has = running.iter().any(|i| i.node == s.node && i.image == d.image);
            let list = out.entry(s.node.clone()).or_default();
            if !has && !list.contains(&d.image) {
                list.push(d.image.clone());
            }
        }
        out.retain(|_, l| !l.is_empty());
        out
    }

    fn place(&self, _store: &dyn Store) -> Result<(), PlaceError> {
        self.0.reschedule()?;
        Ok(())
    }

    fn wake(&self, _store: &dyn Store) -> Result<(), PlaceError> {
        self.0.revision_changed();
        Ok(())
    }

    fn tick(&self, force: bool) -> Result<(), PlaceError> {
        Ok(self.0.tick(force)?)
    }

    /// Learns the images' platforms from their registries (what placement matches nodes
    /// by); an image whose platforms cannot be found goes anywhere, with a warning.
    fn admit<'a>(&'a self, deployments: &'a [Deployment]) -> BoxFuture<'a, Result<Vec<String>, (String, NodeError)>> {
        let images: Vec<String> = deployments.iter().map(|d| d.image.clone()).collect();
        Box::pin(async move { Ok(self.0.learn_platforms(&images).await) })
    }

    fn instances(&self) -> Vec<InstanceStatus> {
        self.0.reported_instances()
    }

    fn metrics(&self) -> Vec<MetricsSample> {
        self.0.metrics()
    }

    fn events(&self, limit: usize) -> Vec<EventRecord> {
        let mut all = self.0.events(None, limit);
        all.extend(self.0.security.list());
        all
    }

    fn changes(&self) -> Vec<watch::Receiver<u64>> {
        vec![self.0.subscribe()]
    }

    fn list(&self, instances: &[InstanceStatus]) -> Result<Vec<NodeInfo>, PlaceError> {
        Ok(self
            .0
            .views()?
            .into_iter()
            .map(|v| NodeInfo {
                arch: match &v.variant {
                    Some(var) => format!("{}/{var}", v.arch),
                    None => v.arch.clone(),
                },
                instances: instances.iter().filter(|i| i.node == v.name).count(),
                problems: self.0.problems(&v.name),
                state: format!("{:?}", v.state),
                os: "linux".into(),
                labels: v.labels,
                runtimes: v.runtimes,
                devices: v.devices,
                warnings: version_warnings(&v.versions),
                versions: v.versions,
                name: v.name,
            })
            .collect())
    }

    fn plan(&self, all: &[Deployment]) -> Result<Option<Plan>, PlaceError> {
        Ok(Some(self.0.plan(all)?))
    }

    fn unschedulable(&self) -> BTreeMap<String, String> {
        self.0.unschedulable()
    }

    fn settled(&self, now_ms: u64) -> bool {
        self.0.settled(now_ms)
    }

    /// Only by the hub's own slot table, and only if that node reported the instance: a
    /// node cannot draw another node's logs or exec to itself.
    fn link_of(&self, instance: &str) -> Option<Arc<dyn NodeLink>> {
        let f = &self.0;
        let node = f.node_of_instance(instance)?;
        f.reported_instances().iter().any(|i| i.name == instance && i.node == node).then_some(())?;
        Some(Arc::new(crate::tunnel::RemoteLink { name: node, fleet: Arc::clone(f) }))
    }

    fn nodes_of(&self, deployment: &str) -> Vec<String> {
        self.0.nodes_of(deployment)
    }

    fn fleet(&self) -> Option<&Arc<Fleet>> {
        Some(&self.0)
    }
}
