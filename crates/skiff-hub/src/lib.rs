//! The control plane: a versioned REST API over the desired-state store, placement of
//! deployments onto nodes, and the views (instances, logs, exec, events) that reach
//! through to nodes.
//!
//! Architecture Invariant: the hub never touches a container. Everything it knows about
//! instances comes through [`nodes::Nodes`]: in `skiff up` the in-process agent, for
//! remote nodes their tunnels.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod autoscaler;
pub mod clock;
pub mod controllers;
pub mod events;
pub mod fleet;
pub mod metrics;
pub mod node;
pub mod nodes;
pub mod pki;
pub mod rollouts;
pub mod schedule;
pub mod serve;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod tunnel;
pub mod validate;

use clock::Clock;
use nodes::Nodes;
use skiff_model::api::{ApplyRequest, ApplyResponse};
use skiff_model::{Deployment, InstanceStatus};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use store::Store;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub use node::{version_warnings, LocalNode, NodeError, NodeInfo, NodeLink};
pub use skiff_model::proto::ExecResult;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

impl From<store::StoreError> for ApplyError {
    fn from(e: store::StoreError) -> Self {
        ApplyError::Internal(e.to_string())
    }
}

impl From<nodes::PlaceError> for ApplyError {
    fn from(e: nodes::PlaceError) -> Self {
        ApplyError::Internal(e.to_string())
    }
}

/// Why one pass of a controller failed (it runs again at its next tick).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Place(#[from] nodes::PlaceError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

pub struct Hub {
    pub store: Arc<dyn Store>,
    /// Every node, in-process or remote, through one interface.
    pub nodes: Arc<dyn Nodes>,
    pub admin_token: String,
    /// What the controllers, the store's records and the API read the time from.
    pub clock: Arc<dyn Clock>,
    pub autoscaler: autoscaler::Autoscaler,
    pub rollouts: rollouts::Rollouts,
    pub alerts: alerts::Alerts,
}

impl Hub {
    /// A hub over `store` and `nodes` on the wall clock, with the autoscaler's default
    /// settings and no alert rules.
    pub fn new(store: Arc<dyn Store>, nodes: Arc<dyn Nodes>, admin_token: String) -> Self {
        Hub {
            store,
            nodes,
            admin_token,
            clock: clock::system(),
            autoscaler: autoscaler::Autoscaler::new(Default::default()),
            rollouts: Default::default(),
            alerts: Default::default(),
        }
    }

    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        Hub { clock, ..self }
    }

    pub fn with_autoscaler(self, config: autoscaler::Config) -> Self {
        Hub { autoscaler: autoscaler::Autoscaler::new(config), ..self }
    }

    pub fn with_alerts(self, alerts: alerts::Alerts) -> Self {
        Hub { alerts, ..self }
    }

    /// What a watch waits on besides its fallback timer: the nodes' state and the stored
    /// revision.
    pub fn changes(&self) -> Vec<tokio::sync::watch::Receiver<u64>> {
        self.nodes.changes()
    }

    /// Places the stored deployments and hands every node its share.
    pub fn sync_nodes(&self) -> Result<(), nodes::PlaceError> {
        self.nodes.place(&*self.store)
    }

    pub fn instances(&self) -> Vec<InstanceStatus> {
        self.nodes.instances()
    }

    /// The newest resource sample of every node.
    pub fn metrics(&self) -> Vec<skiff_model::metrics::MetricsSample> {
        self.nodes.metrics()
    }

    /// Validates the request against the whole desired state, has the nodes admit its
    /// deployments (the in-process node pulls a missing image now, as `docker run` does;
    /// a fleet learns the images' platforms), then stores it atomically and places it.
    /// Invalid input changes nothing.
    pub async fn apply(&self, req: &ApplyRequest) -> Result<ApplyResponse, ApplyError> {
        self.check(req)?;
        let warnings = self
            .nodes
            .admit(&req.deployments)
            .await
            .map_err(|(name, e)| ApplyError::Invalid(format!("deployments.{name}.image: {e}")))?;
        let resp = self.commit(req)?;
        Ok(ApplyResponse { warnings, ..resp })
    }

    /// The request checked against the desired state it would leave.
    fn check(&self, req: &ApplyRequest) -> Result<Vec<Deployment>, ApplyError> {
        let existing: Vec<_> = self.store.list()?.into_iter().map(|s| s.spec).collect();
        let kept: Vec<_> =
            existing.into_iter().filter(|e| req.prune_stack.as_deref() != Some(e.stack.as_str())).collect();
        validate::check_apply(&req.deployments, &kept).map_err(|e| ApplyError::Invalid(e.to_string()))?;
        Ok(kept)
    }

    /// [`Hub::apply`] without asking the nodes first: for the controllers' own changes
    /// (a new replica count, a rollback to a template that ran before).
    pub fn commit(&self, req: &ApplyRequest) -> Result<ApplyResponse, ApplyError> {
        let kept = self.check(req)?;
        let now = self.clock.now_ms();
        if !req.dry_run {
            // A revision that finished before this change is recorded as complete rather
            // than superseded (the controller may not have looked yet).
            let stored: Vec<Deployment> =
                req.deployments.iter().filter_map(|d| self.store.get(&d.name).ok().flatten().map(|s| s.spec)).collect();
            let _ = self.settle_progressing(&stored, now, false);
        }
        let mut resp = self.store.apply(&req.deployments, req.prune_stack.as_deref(), req.dry_run, now)?;
        let ours = |name: &str| req.deployments.iter().any(|d| d.name == name);
        if req.dry_run {
            let mut all: Vec<_> = kept.into_iter().filter(|k| !ours(&k.name)).collect();
            all.extend(req.deployments.iter().cloned());
            if let Some(plan) = self.nodes.plan(&all)? {
                for s in plan.slots.iter().filter(|s| ours(&s.deployment)) {
                    resp.placement.insert(format!("{}-{}", s.deployment, s.index), s.node.clone());
                }
                resp.unschedulable = plan.unschedulable.into_iter().filter(|(d, _)| ours(d)).collect();
            }
        } else {
            self.sync_nodes()?;
            resp.unschedulable = self.nodes.unschedulable().into_iter().filter(|(d, _)| ours(d)).collect();
        }
        Ok(resp)
    }

    /// Whether the controllers may act: every node has reported since the hub started
    /// (see [`fleet::Fleet::settled`]); always, for an in-process node.
    pub fn settled(&self, now_ms: u64) -> bool {
        self.nodes.settled(now_ms)
    }

    /// The node running `instance`: the in-process one, or a remote one (reached through
    /// its tunnel) that reported it with its last heartbeat.
    pub(crate) fn node_of(&self, instance: &str) -> Option<Arc<dyn NodeLink>> {
        self.nodes.link_of(instance)
    }
}
