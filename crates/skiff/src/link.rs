//! The embedded hub's link to the in-process agent (`skiff up`).

use skiff_agent::Agent;
use skiff_hub::{BoxFuture, ExecResult, NodeLink};
use skiff_image::Target;
use skiff_model::{Deployment, EventRecord, InstanceStatus, LogLine, RuntimeKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Makes sure `d`'s image is in the agent's store for `d`'s runtime: present, or pulled
/// now for that runtime's platform. The error says why when it cannot be.
pub async fn ensure_image(agent: &Agent, d: &Deployment) -> Result<(), String> {
    let image = &d.image;
    let Err(stored) = agent.images().inspect_for(image, Target::from(d.runtime)) else { return Ok(()) };
    let mut opts = agent.pull_options().cloned().unwrap_or_default();
    opts.platform = Some(Target::from(d.runtime).platform());
    skiff_image::registry::pull(Arc::clone(agent.images()), image, &opts).await.map(|_| ()).map_err(|e| match stored {
        // Stored, but not for this runtime: that is the telling part.
        skiff_image::ImageError::NotFound(_) => format!("{image} is not in the local store and pulling it failed: {e}"),
        stored => format!("{stored}, and pulling it failed: {e}"),
    })
}

pub struct LocalAgent {
    pub agent: Arc<Agent>,
}

impl NodeLink for LocalAgent {
    fn name(&self) -> String {
        self.agent.node_name().to_string()
    }

    fn assign(&self, deployments: Vec<Deployment>, revision: u64) -> Result<(), String> {
        self.agent.set_desired(&deployments, revision).map_err(|e| e.to_string())
    }

    fn instances(&self) -> Result<Vec<InstanceStatus>, String> {
        self.agent.instances().map_err(|e| e.to_string())
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.agent.subscribe())
    }

    fn events(&self, limit: usize) -> Result<Vec<EventRecord>, String> {
        self.agent.events(limit).map_err(|e| e.to_string())
    }

    fn has_instance(&self, instance: &str) -> bool {
        self.agent.has_instance(instance)
    }

    fn logs(&self, instance: &str, tail: Option<usize>, follow: bool) -> Result<mpsc::Receiver<LogLine>, String> {
        self.agent.log_stream(instance, tail, follow).map_err(|e| e.to_string())
    }

    fn exec(&self, instance: &str, argv: Vec<String>, timeout: Duration) -> BoxFuture<'_, Result<ExecResult, String>> {
        let instance = instance.to_string();
        Box::pin(async move { self.agent.exec_result(&instance, argv, timeout).await.map_err(|e| e.to_string()) })
    }

    fn metrics(&self) -> Option<skiff_model::metrics::MetricsSample> {
        self.agent.latest_metrics()
    }

    /// Present locally, or pulled now (as `docker run` does) so that a bad reference
    /// fails the request before anything is stored. A WebAssembly program is also compiled
    /// and checked here: a module this node cannot run is refused with nothing stored.
    fn check_image(&self, d: &Deployment) -> Result<(), String> {
        let image = &d.image;
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(ensure_image(&self.agent, d)))?;
        if d.runtime == RuntimeKind::Wasm {
            tokio::task::block_in_place(|| self.agent.check_wasm(d))
                .map_err(|e| format!("{image} is not a program the wasm runtime can run: {e}"))?;
        }
        Ok(())
    }

    fn runtimes(&self) -> Vec<String> {
        skiff_agent::runtimes()
    }

    fn versions(&self) -> std::collections::BTreeMap<String, String> {
        self.agent.versions().clone()
    }
}
