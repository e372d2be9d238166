//! The control plane: a versioned REST API over the desired-state store, placement of
//! deployments onto nodes, and the views (instances, logs, exec, events) that reach
//! through to nodes.
//!
//! Architecture Invariant: the hub never touches a container. Everything it knows about
//! instances comes through a [`NodeLink`]; in `skiff up` that link is the in-process agent,
//! for remote nodes it will be the agent's tunnel.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod autoscaler;
pub mod events;
pub mod fleet;
pub mod metrics;
pub mod pki;
pub mod rollouts;
pub mod schedule;
pub mod serve;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod tunnel;
pub mod validate;

use skiff_model::api::{ApplyRequest, ApplyResponse};
use skiff_model::{Deployment, EventRecord, InstanceStatus, LogLine};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::sync::mpsc;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub use skiff_model::proto::ExecResult;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub state: String,
    pub arch: String,
    pub os: String,
    pub instances: usize,
    /// Runtime backends it offers (`oci`, `wasm`).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// Why it is NotReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Versions of what runs workloads (`runc` → `1.1.5`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub versions: std::collections::BTreeMap<String, String>,
    /// What an operator should know (a runc with known container escapes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Warnings about a node's runtime versions.
pub fn version_warnings(versions: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    versions.get("runc").and_then(|v| skiff_model::platform::runc_advisory(v)).into_iter().collect()
}

/// The hub's view of one node: how it sends assignments and reaches instances.
pub trait NodeLink: Send + Sync {
    fn name(&self) -> String;
    fn assign(&self, deployments: Vec<Deployment>, revision: u64) -> Result<(), String>;
    fn instances(&self) -> Result<Vec<InstanceStatus>, String>;
    fn events(&self, limit: usize) -> Result<Vec<EventRecord>, String>;
    fn has_instance(&self, instance: &str) -> bool;
    fn logs(&self, instance: &str, tail: Option<usize>, follow: bool) -> Result<mpsc::Receiver<LogLine>, String>;
    fn exec(&self, instance: &str, argv: Vec<String>, timeout: Duration) -> BoxFuture<'_, Result<ExecResult, String>>;
    /// Whether the node can run `d`'s image now (present locally, or pullable; for a
    /// WebAssembly deployment, a program it can run).
    fn check_image(&self, d: &Deployment) -> Result<(), String>;
    /// Runtime backends the node offers.
    fn runtimes(&self) -> Vec<String> {
        vec![skiff_model::RuntimeKind::Oci.to_string()]
    }
    /// Versions of what runs workloads (`runc` → `1.1.5`).
    fn versions(&self) -> std::collections::BTreeMap<String, String> {
        Default::default()
    }
    /// The node's newest resource sample, when it is reached in-process (remote nodes
    /// ship theirs to the fleet).
    fn metrics(&self) -> Option<skiff_model::metrics::MetricsSample> {
        None
    }
    /// Changes whenever the node's state does, when it is reached in-process (watches
    /// wait on it; remote nodes are looked at again every second).
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

pub struct Hub {
    pub store: Arc<dyn Store>,
    /// Nodes reached in-process (`skiff up`'s embedded agent).
    pub nodes: Vec<Arc<dyn NodeLink>>,
    pub admin_token: String,
    /// Remote nodes that join over the network (`skiff hub`).
    pub fleet: Option<Arc<fleet::Fleet>>,
    pub autoscaler: autoscaler::Autoscaler,
    pub rollouts: rollouts::Rollouts,
    pub alerts: alerts::Alerts,
}

impl Hub {
    /// What a watch waits on besides its fallback timer: the in-process node's state and
    /// the stored revision.
    pub fn changes(&self) -> Vec<tokio::sync::watch::Receiver<u64>> {
        let mut v: Vec<_> = self.nodes.iter().filter_map(|n| n.changes()).collect();
        v.extend(self.fleet.as_ref().map(|f| f.subscribe()));
        v
    }

    /// Pushes every deployment to the node(s). Embedded mode has exactly one node, so
    /// placement is trivial; the scheduler for many nodes plugs in here.
    pub fn sync_nodes(&self) -> Result<(), String> {
        if let Some(f) = &self.fleet {
            f.reschedule().map_err(|e| format!("{e:?}"))?;
        }
        let rev = self.store.revision().map_err(|e| e.to_string())?;
        let all: Vec<Deployment> = self.store.list().map_err(|e| e.to_string())?.into_iter().map(|s| s.spec).collect();
        for n in &self.nodes {
            n.assign(all.clone(), rev)?;
        }
        Ok(())
    }

    pub fn instances(&self) -> Vec<InstanceStatus> {
        let mut all: Vec<InstanceStatus> = self.nodes.iter().flat_map(|n| n.instances().unwrap_or_default()).collect();
        if let Some(f) = &self.fleet {
            all.extend(f.reported_instances());
        }
        all
    }

    /// The newest resource sample of every node.
    pub fn metrics(&self) -> Vec<skiff_model::metrics::MetricsSample> {
        let mut all: Vec<_> = self.nodes.iter().filter_map(|n| n.metrics()).collect();
        if let Some(f) = &self.fleet {
            all.extend(f.metrics());
        }
        all
    }

    /// Validates the request against the whole desired state, stores it atomically and
    /// pushes the result to the nodes. Invalid input changes nothing.
    pub fn apply(&self, req: &ApplyRequest) -> Result<ApplyResponse, ApplyError> {
        let existing: Vec<_> =
            self.store.list().map_err(|e| ApplyError::Internal(e.to_string()))?.into_iter().map(|s| s.spec).collect();
        let kept: Vec<_> =
            existing.into_iter().filter(|e| req.prune_stack.as_deref() != Some(e.stack.as_str())).collect();
        validate::check_apply(&req.deployments, &kept).map_err(|e| ApplyError::Invalid(e.to_string()))?;
        for d in &req.deployments {
            if let Some(n) = self.nodes.first() {
                n.check_image(d).map_err(|e| ApplyError::Invalid(format!("deployments.{}.image: {e}", d.name)))?;
            }
        }
        if !req.dry_run {
            // A revision that finished before this change is recorded as complete rather
            // than superseded (the controller may not have looked yet).
            let stored: Vec<Deployment> =
                req.deployments.iter().filter_map(|d| self.store.get(&d.name).ok().flatten().map(|s| s.spec)).collect();
            let _ = self.settle_progressing(&stored, fleet::now_ms(), false);
        }
        let mut resp = self
            .store
            .apply(&req.deployments, req.prune_stack.as_deref(), req.dry_run)
            .map_err(|e| ApplyError::Internal(e.to_string()))?;
        if let (true, Some(f)) = (req.dry_run, &self.fleet) {
            let mut all: Vec<_> =
                kept.into_iter().filter(|k| !req.deployments.iter().any(|d| d.name == k.name)).collect();
            all.extend(req.deployments.iter().cloned());
            let plan = f.plan(&all).map_err(|e| ApplyError::Internal(format!("{e:?}")))?;
            for s in plan.slots.iter().filter(|s| req.deployments.iter().any(|d| d.name == s.deployment)) {
                resp.placement.insert(format!("{}-{}", s.deployment, s.index), s.node.clone());
            }
            resp.unschedulable =
                plan.unschedulable.into_iter().filter(|(d, _)| req.deployments.iter().any(|x| &x.name == d)).collect();
        }
        if !req.dry_run {
            self.sync_nodes().map_err(ApplyError::Internal)?;
            if let Some(f) = &self.fleet {
                resp.unschedulable = f
                    .unschedulable()
                    .into_iter()
                    .filter(|(d, _)| req.deployments.iter().any(|x| &x.name == d))
                    .collect();
            }
        }
        Ok(resp)
    }

    /// Whether the controllers may act: every node has reported since the hub started
    /// (see [`fleet::Fleet::settled`]); always, for in-process nodes.
    pub fn settled(&self, now_ms: u64) -> bool {
        self.fleet.as_ref().is_none_or(|f| f.settled(now_ms))
    }

    /// The node running `instance`: an in-process one, or a remote one (reached through
    /// its tunnel) that reported it with its last heartbeat.
    pub(crate) fn node_of(&self, instance: &str) -> Option<Arc<dyn NodeLink>> {
        if let Some(n) = self.nodes.iter().find(|n| n.has_instance(instance)) {
            return Some(Arc::clone(n));
        }
        // A remote node only by the hub's own slot table, and only if that node reported the
        // instance: a node cannot draw another node's logs or exec to itself.
        let f = self.fleet.as_ref()?;
        let node = f.node_of_instance(instance)?;
        f.reported_instances().iter().any(|i| i.name == instance && i.node == node).then_some(())?;
        Some(Arc::new(tunnel::RemoteLink { name: node, fleet: Arc::clone(f) }))
    }
}
