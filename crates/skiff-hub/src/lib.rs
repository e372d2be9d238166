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
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod events;
pub mod fleet;
pub mod metrics;
pub mod node;
pub mod nodes;
pub mod pki;
pub mod remember;
pub mod rollouts;
pub mod schedule;
pub mod seal;
pub mod serve;
pub mod session;
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

pub use node::{version_warnings, LocalNode, NodeError, NodeInfo, NodeLink, Session};
pub use skiff_model::proto::ExecResult;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
    /// The store is out of reach: nothing was changed (503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<store::StoreError> for ApplyError {
    fn from(e: store::StoreError) -> Self {
        match e {
            store::StoreError::OutOfReach(m) => ApplyError::Unavailable(m),
            e => ApplyError::Internal(e.to_string()),
        }
    }
}

impl From<nodes::PlaceError> for ApplyError {
    fn from(e: nodes::PlaceError) -> Self {
        match e {
            nodes::PlaceError::Store(e) => e.into(),
            nodes::PlaceError::Fleet(fleet::FleetError::Unavailable(m)) => ApplyError::Unavailable(m),
            e => ApplyError::Internal(e.to_string()),
        }
    }
}

impl From<HubError> for ApplyError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::Store(e) => e.into(),
            HubError::Place(e) => e.into(),
            HubError::Apply(e) => e,
        }
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

/// Where the hub keeps Kubernetes Services as applied.
const KEPT_SERVICES: &str = "k8s-services/";
/// The most Services it keeps.
pub const MAX_KEPT_SERVICES: usize = 1000;

fn kept_key(stack: &str, name: &str) -> String {
    format!("{KEPT_SERVICES}{stack}/{name}")
}

impl Hub {
    /// A hub over `store` and `nodes` on the wall clock, with the autoscaler's default
    /// settings (and the history its autoscalers kept in the store) and no alert rules.
    pub fn new(store: Arc<dyn Store>, nodes: Arc<dyn Nodes>, admin_token: String) -> Self {
        let autoscaler = autoscaler::Autoscaler::new(Default::default()).load(&*store);
        let rollouts = rollouts::Rollouts::default();
        // The hub's events outlive it (as the controllers' state does).
        autoscaler.events.persist(Arc::clone(&store));
        rollouts.events.persist(Arc::clone(&store));
        if let Some(f) = nodes.fleet() {
            f.persist_events(Arc::clone(&store));
        }
        Hub { store, nodes, admin_token, clock: clock::system(), autoscaler, rollouts, alerts: Default::default() }
    }

    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        Hub { clock, ..self }
    }

    pub fn with_autoscaler(mut self, config: autoscaler::Config) -> Self {
        self.autoscaler.config = config;
        self
    }

    /// With these alert rules, and the active alerts and alert events the store kept.
    pub fn with_alerts(self, alerts: alerts::Alerts) -> Self {
        let alerts = alerts.load(&*self.store);
        alerts.events.persist(Arc::clone(&self.store));
        Hub { alerts, ..self }
    }

    /// What a watch waits on besides its fallback timer: the nodes' state and the stored
    /// revision.
    pub fn changes(&self) -> Vec<tokio::sync::watch::Receiver<u64>> {
        self.nodes.changes()
    }

    /// This hub takes the lead of its shared store: what the controllers remember (the
    /// autoscalers' windows, the active alerts) and the events, as the hub before it left
    /// them in the store, then placement, from now on here.
    pub fn take_lead(&self) -> Result<(), nodes::PlaceError> {
        self.autoscaler.reload(&*self.store);
        self.alerts.reload(&*self.store);
        for log in [&self.autoscaler.events, &self.rollouts.events, &self.alerts.events] {
            log.reload(&*self.store);
        }
        if let Some(f) = self.nodes.fleet() {
            f.reload_events();
            f.set_leads(true);
        }
        self.sync_nodes()
    }

    /// Places the stored deployments and hands every node its share.
    pub fn sync_nodes(&self) -> Result<(), nodes::PlaceError> {
        self.nodes.place(&*self.store)
    }

    pub fn instances(&self) -> Vec<InstanceStatus> {
        self.nodes.instances()
    }

    /// The newest resource sample of every node, with only the instances that exist now
    /// (a sample taken before an instance was removed does not show it again).
    pub fn metrics(&self) -> Vec<skiff_model::metrics::MetricsSample> {
        let live: std::collections::HashSet<String> = self.instances().into_iter().map(|i| i.name).collect();
        let mut samples = self.nodes.metrics();
        for s in &mut samples {
            s.instances.retain(|i| live.contains(&i.instance));
        }
        samples
    }

    /// Validates the request against the whole desired state, has the nodes admit its
    /// deployments (the in-process node pulls a missing image now, as `docker run` does;
    /// a fleet learns the images' platforms), then stores it atomically and places it.
    /// Invalid input changes nothing.
    pub async fn apply(&self, req: &ApplyRequest) -> Result<ApplyResponse, ApplyError> {
        let kept = self.carry_over(req)?;
        let req = kept.as_ref().unwrap_or(req);
        for d in &req.deployments {
            if let Some(field) = skiff_model::options::redacted_left(d) {
                return Err(ApplyError::Invalid(format!(
                    "deployments.{}.{field}: reads {}, and no stored secret is there to keep; give its content",
                    d.name,
                    skiff_model::options::REDACTED
                )));
            }
        }
        let attached = self.attach_autoscalers(req)?;
        self.check(&attached)?;
        // A dry run asks no node and no registry: it validates and plans, and says what
        // each node would still have to pull.
        let warnings = match req.dry_run {
            true => vec![],
            false => self.nodes.admit(&attached.deployments).await.map_err(|(name, e)| {
                let field = match &e {
                    NodeError::RefusedField { field, .. } => field,
                    _ => "image",
                };
                ApplyError::Invalid(format!("deployments.{name}.{field}: {e}"))
            })?,
        };
        // From the request again: a stored deployment an autoscaler attaches to is read
        // anew, not as it was before the admission (a pull may have taken minutes).
        let resp = self.commit(req)?;
        Ok(ApplyResponse { warnings, ..resp })
    }

    /// The request with what readers never see carried over from each stored deployment:
    /// its restart mark (`skiff restart`) when the applied spec has none, as `kubectl
    /// apply` keeps the annotation `kubectl rollout restart` set (re-applying an unchanged
    /// file replaces nothing), and the content of secret files given as redacted (a spec
    /// read back, scaled and applied again keeps its secrets). `None`: nothing to carry.
    fn carry_over(&self, req: &ApplyRequest) -> Result<Option<ApplyRequest>, ApplyError> {
        use skiff_model::options::REDACTED;
        use skiff_model::rollout::RESTARTED_AT;
        let mut out: Option<ApplyRequest> = None;
        for (i, d) in req.deployments.iter().enumerate() {
            let redacted = skiff_model::options::redacted_left(d).is_some();
            if d.labels.contains_key(RESTARTED_AT) && !redacted {
                continue;
            }
            // A stored secret that does not open is an error of its own, not "none kept".
            let Some(stored) = self.store.get(&d.name)? else {
                continue;
            };
            if let (Some(mark), false) = (stored.spec.labels.get(RESTARTED_AT), d.labels.contains_key(RESTARTED_AT)) {
                let o = out.get_or_insert_with(|| req.clone());
                o.deployments[i].labels.insert(RESTARTED_AT.into(), mark.clone());
            }
            if redacted {
                let o = out.get_or_insert_with(|| req.clone());
                let dep = &mut o.deployments[i];
                for k in &dep.secret_env {
                    if let (Some(v), Some(old)) = (dep.env.get_mut(k), stored.spec.env.get(k)) {
                        if v == REDACTED {
                            v.clone_from(old);
                        }
                    }
                }
                for m in dep.files.iter_mut().filter(|m| m.secret) {
                    let Some(was) = stored.spec.files.iter().find(|s| s.secret && s.target == m.target) else {
                        continue;
                    };
                    for f in m.files.iter_mut().filter(|f| f.data == REDACTED) {
                        if let Some(old) = was.files.iter().find(|o| o.path == f.path) {
                            f.data = old.data.clone();
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The request with its `autoscalers` set on their targets: one in the request itself,
    /// or the stored one (which then joins the request's deployments). Errors name the
    /// autoscaler by where it came from.
    fn attach_autoscalers(&self, req: &ApplyRequest) -> Result<ApplyRequest, ApplyError> {
        let mut out = ApplyRequest { autoscalers: vec![], ..req.clone() };
        for (i, a) in req.autoscalers.iter().enumerate() {
            let path = if a.path.is_empty() { format!("autoscalers[{i}]") } else { a.path.clone() };
            let at = match out.deployments.iter().position(|d| d.name == a.target) {
                Some(at) => at,
                None => {
                    let Some(stored) = self.store.get(&a.target)? else {
                        let e = format!("{path}.spec.scaleTargetRef: deployment {:?} not found", a.target);
                        return Err(ApplyError::Invalid(e));
                    };
                    out.deployments.push(stored.spec);
                    out.deployments.len() - 1
                }
            };
            let d = &mut out.deployments[at];
            d.autoscale = Some(a.spec.clone());
            d.validate().map_err(|e| ApplyError::Invalid(format!("{path}: {e}")))?;
        }
        Ok(out)
    }

    /// The request checked against the desired state it would leave.
    fn check(&self, req: &ApplyRequest) -> Result<Vec<Deployment>, ApplyError> {
        let existing: Vec<_> = self.store.list()?.into_iter().map(|s| s.spec).collect();
        validate::check_kind(&req.deployments, &existing).map_err(|e| ApplyError::Invalid(e.to_string()))?;
        for k in &req.services {
            k.check().map_err(|e| ApplyError::Invalid(e.to_string()))?;
        }
        if !req.services.is_empty() {
            let have = self.store.states(KEPT_SERVICES)?;
            let new = req.services.iter().filter(|k| !have.iter().any(|(key, _)| *key == kept_key(&k.stack, &k.name)));
            if have.len() + new.count() > MAX_KEPT_SERVICES {
                return Err(ApplyError::Invalid(format!(
                    "services: the hub keeps at most {MAX_KEPT_SERVICES} Services"
                )));
            }
        }
        let kept: Vec<_> =
            existing.into_iter().filter(|e| req.prune_stack.as_deref() != Some(e.stack.as_str())).collect();
        validate::check_apply(&req.deployments, &kept).map_err(|e| ApplyError::Invalid(e.to_string()))?;
        Ok(kept)
    }

    /// [`Hub::apply`] without asking the nodes first: for the controllers' own changes
    /// (a new replica count, a rollback to a template that ran before).
    pub fn commit(&self, req: &ApplyRequest) -> Result<ApplyResponse, ApplyError> {
        let req = &self.attach_autoscalers(req)?;
        let kept = self.check(req)?;
        let now = self.clock.now_ms();
        if !req.dry_run {
            // A revision that finished before this change is recorded as complete rather
            // than superseded (the controller may not have looked yet).
            let stored: Vec<Deployment> =
                req.deployments.iter().filter_map(|d| self.store.get(&d.name).ok().flatten().map(|s| s.spec)).collect();
            let _ = self.settle_progressing(&stored, now, false);
        }
        // The Services first: kept without their workloads is as kubectl keeps them; the
        // workloads never go in without them.
        if !req.dry_run && !req.services.is_empty() {
            self.keep_services(&req.services)?;
        }
        let mut resp = self.store.apply(&req.deployments, req.prune_stack.as_deref(), req.dry_run, now)?;
        let ours = |name: &str| req.deployments.iter().any(|d| d.name == name);
        if req.dry_run {
            let mut all: Vec<_> = kept.into_iter().filter(|k| !ours(&k.name)).collect();
            all.extend(req.deployments.iter().cloned());
            let plan = self.nodes.plan(&all)?;
            resp.pulls = self.nodes.would_pull(&req.deployments, plan.as_ref());
            if let Some(plan) = plan {
                for s in plan.slots.iter() {
                    if let Some(d) = req.deployments.iter().find(|d| d.name == s.deployment) {
                        resp.placement.insert(d.instance_name(s.index), s.node.clone());
                    }
                }
                resp.unschedulable = plan.unschedulable.into_iter().filter(|(d, _)| ours(d)).collect();
            }
        } else {
            self.sync_nodes()?;
            resp.unschedulable = self.nodes.unschedulable().into_iter().filter(|(d, _)| ours(d)).collect();
        }
        Ok(resp)
    }

    /// Keeps Kubernetes Services as applied (`k8s-services/STACK/NAME`; `check` keeps
    /// them to [`MAX_KEPT_SERVICES`] in all).
    fn keep_services(&self, services: &[skiff_model::api::KeptService]) -> Result<(), ApplyError> {
        let mut changes = vec![];
        for k in services {
            let json = serde_json::to_string(k).map_err(|e| ApplyError::Invalid(e.to_string()))?;
            changes.push((kept_key(&k.stack, &k.name), Some(json)));
        }
        Ok(self.store.put_states(&changes)?)
    }

    /// The Kubernetes Services kept (see [`Hub::keep_services`]).
    pub fn kept_services(&self) -> Result<Vec<skiff_model::api::KeptService>, store::StoreError> {
        Ok(self.store.states(KEPT_SERVICES)?.into_iter().filter_map(|(_, v)| serde_json::from_str(&v).ok()).collect())
    }

    /// Forgets a kept Service; whether there was one.
    pub fn forget_service(&self, stack: &str, name: &str) -> Result<bool, store::StoreError> {
        let key = kept_key(stack, name);
        if !self.store.states(&key)?.iter().any(|(k, _)| *k == key) {
            return Ok(false);
        }
        self.store.put_state(&key, None)?;
        Ok(true)
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

#[cfg(test)]
pub(crate) mod testing {
    use crate::clock::{Clock, ManualClock};
    use crate::fleet::Fleet;
    use crate::store::{SqliteStore, Store};
    use crate::Hub;
    use std::sync::Arc;

    /// A hub over a fleet of `nodes` that joined and reported once, on `clock`.
    pub(crate) fn fleet_hub(t: &std::path::Path, clock: Arc<ManualClock>, nodes: &[&str]) -> (Arc<Fleet>, Hub) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&t.join("hub.db")).unwrap());
        let ca = crate::pki::Ca::load_or_create(&t.join("pki")).unwrap();
        let f = Arc::new(Fleet::new(ca, Arc::clone(&store), clock.clone()).unwrap());
        for n in nodes {
            let tok = crate::tokens::create(&*store, Some(&f.ca_sha256), &Default::default(), clock.now_ms()).unwrap();
            let token = skiff_model::proto::JoinToken::parse(&tok.token).unwrap().credential();
            let (_key, csr) = crate::pki::tests::csr(n);
            let spec = skiff_model::proto::NodeSpec { os: "linux".into(), arch: "amd64".into(), ..Default::default() };
            f.join(&skiff_model::proto::JoinRequest { token, node: n.to_string(), csr, spec }).unwrap();
            f.heartbeat(n, Default::default()).unwrap();
        }
        let hub = Hub::new(store, Arc::new(crate::nodes::Remote(Arc::clone(&f))), "t".into()).with_clock(clock);
        (f, hub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_model::api::AttachAutoscaler;
    use skiff_model::autoscale::{AutoscaleSpec, MetricSpec};

    fn hpa(target: &str, min: i32, max: i32) -> AttachAutoscaler {
        let cpu = MetricSpec {
            resource: "cpu".into(),
            target_type: "AverageValue".into(),
            average_value: Some("100m".into()),
            ..Default::default()
        };
        let spec = AutoscaleSpec { min_replicas: min, max_replicas: max, metrics: vec![cpu], behavior: None };
        AttachAutoscaler { target: target.into(), spec, path: format!("HorizontalPodAutoscaler/{target}") }
    }

    /// An autoscaler whose Deployment was applied earlier is set on the stored one in the
    /// hub's own transaction; a missing target or a bad spec is refused by its path with
    /// nothing stored.
    #[tokio::test]
    async fn autoscalers_attach_to_stored_deployments_or_change_nothing() {
        let t = tempfile::tempdir().unwrap();
        let (_f, hub) = testing::fleet_hub(t.path(), clock::ManualClock::at(1_000_000), &["a"]);
        let only = |a: AttachAutoscaler| ApplyRequest { autoscalers: vec![a], ..Default::default() };
        let e = hub.apply(&only(hpa("web", 1, 4))).await.unwrap_err().to_string();
        assert_eq!(e, "HorizontalPodAutoscaler/web.spec.scaleTargetRef: deployment \"web\" not found");
        assert!(hub.store.list().unwrap().is_empty());
        let web = Deployment::new("web", "img:1");
        hub.apply(&ApplyRequest { deployments: vec![web], ..Default::default() }).await.unwrap();
        let rev = hub.store.revision().unwrap();
        let e = hub.apply(&only(hpa("web", 5, 2))).await.unwrap_err().to_string();
        assert!(e.starts_with("HorizontalPodAutoscaler/web: ") && e.contains("minReplicas"), "{e}");
        assert_eq!(hub.store.revision().unwrap(), rev, "a refused autoscaler changes nothing");
        let r = hub.apply(&only(hpa("web", 1, 4))).await.unwrap();
        assert_eq!(r.updated, ["web"]);
        let stored = hub.store.get("web").unwrap().unwrap().spec;
        assert_eq!(stored.autoscale.map(|a| (a.min_replicas, a.max_replicas)), Some((1, 4)));
        assert_eq!(stored.image, "img:1", "the rest of the stored deployment is kept");
    }
}
