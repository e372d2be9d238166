//! Request and response bodies of the hub's REST API (`/api/v1/...`).

use crate::{Deployment, InstanceStatus};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    pub deployments: Vec<Deployment>,
    /// When set, deployments of this stack that are not in `deployments` are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_stack: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// Autoscalers for deployments stored earlier (a Kubernetes HorizontalPodAutoscaler
    /// applied without its Deployment): each is set on its stored target in the same
    /// transaction as the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub autoscalers: Vec<AttachAutoscaler>,
    /// Kubernetes Services of these manifests, kept by the hub as kubectl keeps them: a
    /// workload applied later is selected by them as if they were in its files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<KeptService>,
}

/// A Kubernetes Service as applied (`GET /api/v1/k8s-services`): its namespace (stack),
/// name and document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptService {
    pub name: String,
    pub stack: String,
    /// The Service's YAML document: its name, namespace, type, selector and ports.
    pub document: String,
}

impl KeptService {
    /// The largest document kept.
    pub const MAX_DOCUMENT: usize = 64 * 1024;

    /// Checks what the hub stores: names as deployments' are, a bounded document.
    pub fn check(&self) -> Result<(), crate::ValidationError> {
        crate::validate::check_name("services.name", &self.name)?;
        crate::validate::check_name("services.stack", &self.stack)?;
        if self.document.len() > Self::MAX_DOCUMENT {
            return Err(crate::ValidationError::new(
                format!("services.{}", self.name),
                format!("the document is more than {} bytes", Self::MAX_DOCUMENT),
            ));
        }
        Ok(())
    }
}

/// An autoscaler for the stored deployment `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachAutoscaler {
    pub target: String,
    pub spec: crate::autoscale::AutoscaleSpec,
    /// Where it came from, for errors (`HorizontalPodAutoscaler/web`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    pub deleted: Vec<String>,
    /// With `dry_run` on a hub with remote nodes: where each instance would run
    /// (`web-2` → `site-b-1`), and why some would not be placed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub placement: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub unschedulable: std::collections::BTreeMap<String, String>,
    /// What was applied but deserves a look (an image whose platforms are unknown).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// With `dry_run`: node → the images it would still have to pull for what would run
    /// there (a node of the fleet: none of its instances runs that image now).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pulls: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentView {
    pub revision: u64,
    pub spec: Deployment,
    pub instances: Vec<InstanceStatus>,
    /// Why some of its instances have no node (on a hub with remote nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable: Option<String>,
    /// A pod's other container (`spec.pod_of`): how many instances it runs, as many as
    /// its first wants (its own `replicas` are not read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub time_ms: u64,
    pub object: String,
    pub reason: String,
    pub message: String,
    /// The node that reported it (set by the hub, whatever the node sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The interactive exec's WebSocket (`GET /api/v1/instances/{name}/exec`). The client's
/// first message is a [`crate::proto::SessionSpec`] (JSON text); after it, binary
/// messages are standard input (at most [`crate::proto::INPUT_CHUNK`] bytes each) and text
/// messages are [`ExecControl`]s. The hub sends output as binary messages whose first
/// byte names the stream ([`EXEC_STDOUT`], [`EXEC_STDERR`]), and ends with one
/// [`ExecEnd`] text message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ExecControl {
    /// The client's terminal has a new size.
    Resize { cols: u16, rows: u16 },
    /// Standard input ended.
    Eof,
}

/// The first byte of an output message: standard output (a terminal's only stream).
pub const EXEC_STDOUT: u8 = 1;
/// The first byte of an output message: standard error.
pub const EXEC_STDERR: u8 = 2;

/// A header of a hub's 503 that was cut off from its store before the request came: it
/// wrote nothing for it (every write is refused while cut off), so the request may go to
/// another hub of the store as it is. Its value is `cut-off`.
pub const UNCHANGED_HEADER: &str = "skiff-unchanged";

/// On a `421 Misdirected Request` for an instance whose node's tunnel another hub of the
/// store holds: that hub's URL (one of the store's hubs; the CLI sends the request there
/// only if its config names that hub too).
pub const NODE_HUB_HEADER: &str = "skiff-node-hub";

/// How an interactive exec ended: the command's exit code, or why it could not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEnd {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /api/v1/version`: the hub's own version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
}

/// `POST /api/v1/images?reference=REF`'s answer: the image a fleet's hub now offers its
/// nodes (an image built where no registry is named), by tag and by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePushed {
    /// The tag as stored (normalised).
    pub reference: String,
    /// The manifest (or index) digest: `NAME@DIGEST` names this build for good.
    pub digest: String,
}
