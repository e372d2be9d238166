//! Runtime backends and what they need: OCI spec generation, the per-container shim,
//! container logs, cgroup statistics (v1 and v2) and node networking.
//!
//! Architecture Invariant: this crate never talks to the hub. It turns one instance
//! request into a running, supervised process and reports what happened to it.
//! Architecture Invariant: a container's stdio and exit status belong to its shim, never
//! to the agent; the agent learns about exits from `exit.json`.
#![forbid(unsafe_code)]

pub mod attach;
pub mod audit;
pub mod cdi;
pub mod cgroup;
pub mod conntrack;
pub mod fswrites;
pub mod isolation;
pub mod logs;
pub mod multicast;
pub mod nat;
pub mod netlink;
pub mod network;
pub mod oci;
pub mod ports;
pub mod procconn;
pub mod procfs;
pub mod runc;
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod time;
#[cfg(feature = "wasm")]
pub mod wasm;
#[cfg(not(feature = "wasm"))]
#[path = "wasm_stub.rs"]
pub mod wasm;
mod wasm_user;

use skiff_model::{Deployment, ExitStatus};
use std::path::PathBuf;
use std::time::Duration;

pub use oci::OciRuntime;
pub use wasm::WasmRuntime;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("mounting the rootfs of {id}: {message}")]
    Mount { id: String, message: String },
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Runc(#[from] runc::RuncError),
    #[error(transparent)]
    Shim(#[from] shim::ShimError),
    #[error("instance {0} is not running")]
    NotRunning(String),
    #[error("{id}: {what}")]
    Unsupported { id: String, what: String },
}

/// Everything a backend needs to create one instance.
pub struct CreateRequest<'a> {
    /// Unique on the host (runc id, cgroup and directory name).
    pub id: String,
    pub hostname: String,
    pub deployment: &'a Deployment,
    pub image: &'a skiff_image::ImageInfo,
    /// Unpacked layer directories, bottom layer first.
    pub layer_dirs: Vec<PathBuf>,
    /// Network namespace to join; None means a fresh one (or the host's in host mode).
    pub netns: Option<PathBuf>,
    pub hosts: String,
    pub resolv_conf: String,
    /// (host path, container path, read only), resolved and existing.
    pub volumes: Vec<(PathBuf, String, bool)>,
    /// (host path, container path) of volumes just made, to fill from the image's content
    /// at that path (as Docker fills a new volume) before the container runs.
    pub fill_volumes: Vec<(PathBuf, String)>,
    /// The WebAssembly program (the `wasm` backend only).
    pub wasm: Option<skiff_image::WasmModule>,
    /// CDI devices the instance gets (qualified names), and the edits that give them.
    pub cdi_devices: Vec<String>,
    pub cdi_edits: Vec<(String, cdi::ContainerEdits)>,
    /// What the container's seccomp filter reports to the audit log.
    pub seccomp_audit: seccomp::Audit,
}

/// What the backend knows about an instance right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Running {
        pid: i32,
    },
    Exited(ExitStatus),
    /// No process and no exit record (never started, or lost with a reboot).
    Gone,
}

/// A runtime backend: `oci` (runc) and `wasm` (wasmtime in the shim); `docker` is planned
/// beside them.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> &'static str;
    /// Prepares the instance (filesystem, spec). Idempotent.
    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError>;
    /// Starts (or restarts) a created instance and returns its main pid.
    fn start(&self, id: &str) -> Result<i32, RuntimeError>;
    fn liveness(&self, id: &str) -> Liveness;
    /// The process whose end means the instance ended (its shim), if it is alive: the
    /// agent watches it (a pidfd) instead of polling [`Runtime::liveness`].
    fn watch_pid(&self, id: &str) -> Option<i32>;
    fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError>;
    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<runc::ExecOutput, RuntimeError>;
    /// Starts `argv` in the instance on the given stdio and returns it running (see
    /// [`runc::Runc::exec_spawn`]); the command's host pid is written to `pid_file`.
    fn exec_spawn(
        &self,
        id: &str,
        argv: &[String],
        tty: bool,
        pid_file: &std::path::Path,
        stdio: [std::process::Stdio; 3],
    ) -> Result<std::process::Child, RuntimeError> {
        let _ = (argv, tty, pid_file, stdio);
        Err(RuntimeError::Unsupported {
            id: id.to_string(),
            what: format!("exec: the {} runtime has no processes to run a command in", self.kind()),
        })
    }
    /// Rewrites the instance's /etc/hosts in place (the bind mount keeps its inode).
    fn update_hosts(&self, id: &str, hosts: &str) -> Result<(), RuntimeError>;
    /// Stops nothing: removes what `create` made. Call after the instance has exited.
    fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    fn log_path(&self, id: &str) -> PathBuf;
    /// The instance's directory (what only the agent and the shim, as root, write).
    fn instance_dir(&self, id: &str) -> PathBuf;
    fn stats(&self, id: &str) -> cgroup::CgroupStats;
    fn limits(&self, id: &str) -> cgroup::CgroupLimits;
    /// Ids of instances this backend has state for (for adoption and cleanup).
    fn known(&self) -> Vec<String>;
}
