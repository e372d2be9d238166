//! Observed state: what an agent reports about the instances it runs.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Desired, waiting for its image, a dependency or a restart delay.
    #[default]
    Pending,
    Running,
    /// Exited and will be started again after the backoff delay.
    Restarting,
    /// Exited; the restart policy does not bring it back.
    Exited,
    /// Could not be started (bad image, bad spec); see the message.
    Failed,
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Exited => "exited",
            Self::Failed => "failed",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    pub deployment: String,
    pub node: String,
    /// The runtime's id (runc container id, cgroup `/skiff/<id>`).
    pub container_id: String,
    pub state: InstanceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// The container's init process as seen from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// On the bridge, its address on its first network; on macvlan, its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// On the bridge, its address on each network it joined (each network has a subnet
    /// of its own on the node).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub networks: std::collections::BTreeMap<String, String>,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// The hash of the template it was made from (`rollout::template_hash`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template: String,
    /// Kept while its replacement comes up (or for a blue-green rollback window); not
    /// one of the deployment's replicas.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retiring: bool,
}

/// One log line as the shim records it (Docker's json-file shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// RFC 3339 timestamp with nanoseconds, UTC.
    pub time: String,
    pub stream: String,
    pub log: String,
}

/// How a container process ended, as the shim records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code; 128 + signal number when killed by a signal (Docker's convention).
    pub code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    pub finished_at_ms: u64,
    /// Why it ended, when the runtime knows more than the code says (a WebAssembly trap,
    /// the memory limit, the wall-clock timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
