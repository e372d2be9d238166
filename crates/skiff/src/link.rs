//! The embedded hub's link to the in-process agent (`skiff up`): each call maps onto the
//! agent's own method and its error onto the hub's [`NodeError`] kinds. No logic here.

use skiff_agent::{Agent, AgentError};
use skiff_hub::{BoxFuture, ExecResult, LocalNode, NodeError, NodeLink, Session};
use skiff_model::proto::SessionSpec;
use skiff_model::{Deployment, EventRecord, InstanceStatus, LogLine};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub struct LocalAgent {
    pub agent: Arc<Agent>,
}

fn node_error(e: AgentError) -> NodeError {
    match e {
        AgentError::NoInstance(name) => NodeError::NoInstance(name),
        e => NodeError::Failed(e.to_string()),
    }
}

impl NodeLink for LocalAgent {
    fn name(&self) -> String {
        self.agent.node_name().to_string()
    }

    fn instances(&self) -> Result<Vec<InstanceStatus>, NodeError> {
        self.agent.instances().map_err(node_error)
    }

    fn events(&self, limit: usize) -> Result<Vec<EventRecord>, NodeError> {
        self.agent.events(limit).map_err(node_error)
    }

    fn has_instance(&self, instance: &str) -> bool {
        self.agent.has_instance(instance)
    }

    fn logs(&self, instance: &str, tail: Option<usize>, follow: bool) -> Result<mpsc::Receiver<LogLine>, NodeError> {
        self.agent.log_stream(instance, tail, follow).map_err(node_error)
    }

    fn exec(
        &self,
        instance: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecResult, NodeError>> {
        let instance = instance.to_string();
        Box::pin(async move { self.agent.exec_result(&instance, argv, timeout).await.map_err(node_error) })
    }

    fn session(&self, instance: &str, spec: SessionSpec) -> BoxFuture<'_, Result<Session, NodeError>> {
        let instance = instance.to_string();
        Box::pin(async move {
            let (input, output) = self.agent.exec_session(&instance, spec).await.map_err(node_error)?;
            Ok(Session { input, output })
        })
    }

    fn connect(
        &self,
        instance: &str,
        port: u16,
        protocol: skiff_model::Protocol,
    ) -> BoxFuture<'_, Result<Session, NodeError>> {
        let instance = instance.to_string();
        Box::pin(async move {
            let (input, output) = self.agent.connect_session(&instance, port, protocol).await.map_err(node_error)?;
            Ok(Session { input, output })
        })
    }

    fn act(&self, instance: &str, action: skiff_model::proto::InstanceAction) -> BoxFuture<'_, Result<(), NodeError>> {
        let r = self.agent.act_on(instance, action).map_err(node_error);
        Box::pin(async move { r })
    }
}

impl LocalNode for LocalAgent {
    fn assign(&self, deployments: Vec<Deployment>, revision: u64) -> Result<(), NodeError> {
        // It runs everything, so every autoscaler's metric may be its instances'.
        self.agent.set_scraped_metrics(skiff_model::autoscale::scraped_names(
            deployments.iter().filter_map(|d| d.autoscale.as_ref()),
        ));
        self.agent.set_desired(&deployments, revision).map_err(node_error)
    }

    fn admit<'a>(&'a self, d: &'a Deployment) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.agent.admit(d).await.map_err(|e| match e.field() {
                "image" => NodeError::Refused(e.to_string()),
                field => NodeError::RefusedField { field, message: e.to_string() },
            })
        })
    }

    fn has_image(&self, image: &str) -> bool {
        self.agent.has_image(image)
    }

    fn runtimes(&self) -> Vec<String> {
        skiff_agent::runtimes()
    }

    fn versions(&self) -> std::collections::BTreeMap<String, String> {
        self.agent.versions().clone()
    }

    fn devices(&self) -> std::collections::BTreeMap<String, u32> {
        self.agent.device_counts()
    }

    fn metrics(&self) -> Option<skiff_model::metrics::MetricsSample> {
        self.agent.latest_metrics()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.agent.subscribe()
    }
}
