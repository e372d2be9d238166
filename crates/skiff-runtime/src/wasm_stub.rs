//! The `wasm` backend when skiff is built without the `wasm` feature: the same names,
//! and every use says what is missing. The node does not offer the runtime, so the hub
//! places no WebAssembly instance here.

use crate::cgroup::{CgroupLimits, CgroupStats};
use crate::runc::ExecOutput;
use crate::shim::ShimConfig;
use crate::{CreateRequest, Liveness, Runtime, RuntimeError};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::wasm_user::{gid_for, uid_for};

pub const WASM_CONFIG: &str = "wasm.json";
pub const AVAILABLE: bool = false;
const MISSING: &str = "this skiff was built without WebAssembly support (cargo feature `wasm`)";

pub struct WasmRuntime {
    cache_dir: PathBuf,
}

impl WasmRuntime {
    pub fn new(
        _root: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        _skiff_bin: impl Into<PathBuf>,
    ) -> Result<Self, RuntimeError> {
        Ok(WasmRuntime { cache_dir: cache_dir.into() })
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    pub fn without_spares(self) -> Self {
        self
    }
}

pub fn argv(d: &skiff_model::Deployment, info: &skiff_image::ImageInfo) -> Vec<String> {
    crate::spec::argv(d, &info.config).unwrap_or_else(|_| vec![d.image.clone()])
}

fn missing(id: &str) -> RuntimeError {
    RuntimeError::Unsupported { id: id.to_string(), what: MISSING.into() }
}

impl Runtime for WasmRuntime {
    fn kind(&self) -> &'static str {
        "wasm"
    }
    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
        Err(missing(&req.id))
    }
    fn start(&self, id: &str) -> Result<i32, RuntimeError> {
        Err(missing(id))
    }
    fn watch_pid(&self, _id: &str) -> Option<i32> {
        None
    }

    fn liveness(&self, _id: &str) -> Liveness {
        Liveness::Gone
    }
    fn signal(&self, id: &str, _signal: &str) -> Result<(), RuntimeError> {
        Err(missing(id))
    }
    fn exec(&self, id: &str, _argv: &[String], _timeout: Duration) -> Result<ExecOutput, RuntimeError> {
        Err(missing(id))
    }
    fn update_hosts(&self, _id: &str, _hosts: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn log_path(&self, id: &str) -> PathBuf {
        PathBuf::from(id)
    }
    fn instance_dir(&self, id: &str) -> PathBuf {
        PathBuf::from(id)
    }
    fn stats(&self, _id: &str) -> CgroupStats {
        CgroupStats::default()
    }
    fn limits(&self, _id: &str) -> CgroupLimits {
        CgroupLimits::default()
    }
    fn known(&self) -> Vec<String> {
        vec![]
    }
}

pub fn check(_module: &skiff_image::WasmModule, _cache_dir: &Path) -> Result<&'static str, String> {
    Err(MISSING.into())
}

pub fn prune_cache(_cache_dir: &Path, _keep: impl Fn(&str) -> bool) -> u64 {
    0
}

/// The stand-in for a warmed-up wasmtime (nothing to warm here).
pub struct Warm;

pub(crate) fn run_shim(
    _bundle: &Path,
    _cfg: &ShimConfig,
    _report: &dyn Fn(String),
    _warm: Option<Warm>,
) -> Result<(), String> {
    Err(MISSING.into())
}

pub fn spare_main(_root: &Path) -> i32 {
    println!("err {MISSING}");
    1
}
