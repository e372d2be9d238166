//! The seam between the hub and one node: what the hub asks of it ([`NodeLink`]), what
//! an in-process node also offers ([`LocalNode`]), and how that fails ([`NodeError`]).

use crate::BoxFuture;
use skiff_model::proto::{ExecResult, SessionInput, SessionOutput, SessionSpec};
use skiff_model::{Deployment, EventRecord, InstanceStatus, LogLine, Protocol};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why a node could not do what the hub asked. The API answers by kind: an instance the
/// node does not have is a 404, a node that cannot be reached a 503, one that did not
/// answer in time a 504, a deployment the node refuses a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("instance {0:?} not found")]
    NoInstance(String),
    #[error("node {0:?} is not connected (its tunnel is down)")]
    Unreachable(String),
    #[error("node {0:?} did not answer in time")]
    Timeout(String),
    /// The node cannot run what it was given (an image it cannot get, a program its
    /// runtime refuses); the message says why.
    #[error("{0}")]
    Refused(String),
    /// Refused for what one field of the deployment asks (`device_requests`, `runtime`).
    #[error("{message}")]
    RefusedField { field: &'static str, message: String },
    /// The node failed doing it (its state, its tunnel); the message says how.
    #[error("{0}")]
    Failed(String),
}

/// The hub's view of one node: how it reaches its instances.
pub trait NodeLink: Send + Sync {
    fn name(&self) -> String;
    fn instances(&self) -> Result<Vec<InstanceStatus>, NodeError>;
    fn events(&self, limit: usize) -> Result<Vec<EventRecord>, NodeError>;
    fn has_instance(&self, instance: &str) -> bool;
    fn logs(&self, instance: &str, tail: Option<usize>, follow: bool) -> Result<mpsc::Receiver<LogLine>, NodeError>;
    fn exec(
        &self,
        instance: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecResult, NodeError>>;
    /// Starts an interactive exec (`skiff exec -i/-t`) and returns its channels once it
    /// runs.
    fn session(&self, instance: &str, spec: SessionSpec) -> BoxFuture<'_, Result<Session, NodeError>>;
    /// Opens a TCP connection to `port` inside the instance (`skiff port-forward`), as a
    /// session: output is what the instance sends, input what goes to it.
    fn connect(&self, instance: &str, port: u16, protocol: Protocol) -> BoxFuture<'_, Result<Session, NodeError>>;
    /// Restarts, stops or starts one instance (`skiff restart web-1`); returns once the
    /// node has begun.
    fn act(&self, instance: &str, action: skiff_model::proto::InstanceAction) -> BoxFuture<'_, Result<(), NodeError>>;
}

/// An interactive exec as the hub holds it: input in; output, then the exit code (or an
/// error), out. Dropping `output` ends the command.
pub struct Session {
    pub input: mpsc::Sender<SessionInput>,
    pub output: mpsc::Receiver<SessionOutput>,
}

/// A node in the hub's own process (`skiff up`'s agent): given its deployments directly,
/// asked before a deployment is stored whether it can run it, and watched directly.
pub trait LocalNode: NodeLink {
    /// The node's whole desired state, at the store's `revision`.
    fn assign(&self, deployments: Vec<Deployment>, revision: u64) -> Result<(), NodeError>;
    /// Whether the node can run `d` now: its image is present or pulled now (as `docker
    /// run` does), and a WebAssembly program is one its runtime accepts.
    fn admit<'a>(&'a self, d: &'a Deployment) -> BoxFuture<'a, Result<(), NodeError>>;
    /// Whether the node's store holds `image` for this machine (no pull needed).
    fn has_image(&self, image: &str) -> bool;
    /// Runtime backends it offers (`oci`, `wasm`).
    fn runtimes(&self) -> Vec<String>;
    /// Versions of what runs workloads (`runc` → `1.1.5`).
    fn versions(&self) -> BTreeMap<String, String>;
    /// CDI devices by kind.
    fn devices(&self) -> BTreeMap<String, u32> {
        BTreeMap::new()
    }
    /// Its newest resource sample.
    fn metrics(&self) -> Option<skiff_model::metrics::MetricsSample>;
    /// Changes whenever its state does (watches wait on it).
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub state: String,
    pub arch: String,
    pub os: String,
    /// Its labels (`skiff agent --label`), which placement selects on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub instances: usize,
    /// Runtime backends it offers (`oci`, `wasm`).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// CDI devices by kind (`nvidia.com/gpu` → 2).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, u32>,
    /// Why it is NotReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Versions of what runs workloads (`runc` → `1.1.5`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    /// What an operator should know (a runc with known container escapes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Warnings about a node's runtime versions.
pub fn version_warnings(versions: &BTreeMap<String, String>) -> Vec<String> {
    versions.get("runc").and_then(|v| skiff_model::platform::runc_advisory(v)).into_iter().collect()
}
