//! The WebAssembly host: runs one WASI program in this process, as the `wasm` runtime's
//! shim does for each instance.
//!
//! * Programs: a WASI preview 1 command module (`_start`), a preview 2 command
//!   component (`wasi:cli/run`), or a `wasi:http/proxy` component
//!   (`wasi:http/incoming-handler`), served over HTTP/1.1 with a fresh instance per
//!   request (or from a pool of pre-reserved slots).
//! * [`prepare`] does everything that can fail before the program runs — load or
//!   compile (the [`cache`]), check imports and exports, bind the HTTP ports — so a bad
//!   module is an error with nothing started. [`Prepared::run`] then runs it to its end.
//! * Limits: memory and CPU as in `limits.rs`; a wall-clock timeout per command or
//!   per request.
//!
//! Architecture Invariant: this crate knows nothing of bundles, images, the agent or the
//! hub. It is given a module path, an identity for the cache, the program's argv, env
//! and directories, its limits and two output streams; it returns how the program ended.
//! Architecture Invariant: the only `unsafe` is mapping a cached artifact
//! (`cache.rs`), after its checksum matched.
#![deny(unsafe_code)]

pub mod cache;
mod check;
pub mod egress;
pub mod engine;
mod http;
pub mod limits;
mod output;
mod run;

pub use check::Program;
pub use output::Output;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything needed to run one instance (written by the agent into `shim.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The module or component binary.
    pub module: PathBuf,
    /// A hex content identity of `module` (keys the compile cache).
    pub module_id: String,
    pub cache_dir: PathBuf,
    /// argv, argv[0] included.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub preopens: Vec<Preopen>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub cpus_millis: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// HTTP components: pooling-allocator slots (and the most requests served at once).
    #[serde(default)]
    pub pool: Option<u32>,
    /// HTTP components listen on these TCP ports (all addresses of the instance's
    /// network namespace).
    #[serde(default)]
    pub http_ports: Vec<u16>,
    /// Whether preview 2 programs may use sockets and name lookups (`wasi:sockets`) and
    /// send HTTP requests (`network: none` is false).
    #[serde(default)]
    pub network: bool,
    /// Whether the guest may reach loopback, link-local and the node's own addresses.
    #[serde(default)]
    pub allow_local: bool,
    /// The node's own addresses (out of bounds unless `allow_local`).
    #[serde(default)]
    pub node_addrs: Vec<std::net::IpAddr>,
}

impl Spec {
    /// Where the guest may connect.
    pub fn egress(&self) -> egress::Egress {
        egress::Egress {
            network: self.network,
            allow_local: self.allow_local,
            node_addrs: std::sync::Arc::new(self.node_addrs.clone()),
        }
    }
}

/// A host directory the guest sees at `guest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not a WebAssembly binary (no \\0asm module or component header)")]
    NotWasm { path: PathBuf },
    #[error("invalid WebAssembly in {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("unsupported imports: {} (the wasm runtime provides WASI preview 1, and WASI 0.2 with wasi:http)", .0.join(", "))]
    UnsupportedImports(Vec<String>),
    #[error("{0}")]
    Link(String),
    #[error("{0}")]
    MissingExport(String),
    #[error("preopening {host} as {guest}: {message}")]
    Preopen { host: PathBuf, guest: String, message: String },
    #[error("listening on port {port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("starting wasmtime: {0}")]
    Engine(String),
}

/// How a program ended (the shim turns it into `exit.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    /// Ended by the memory limit.
    pub oom: bool,
    pub message: Option<String>,
}

/// A program ready to run: compiled (or loaded from the cache), checked, its ports bound.
pub struct Prepared {
    engine: wasmtime::Engine,
    program: Program,
    spec: Spec,
    /// Whether the compiled program came from the cache.
    pub cached: bool,
    listeners: Vec<std::net::TcpListener>,
    /// A command's runtime, made ahead (a spare shim's).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Prepared {
    pub fn program(&self) -> &Program {
        &self.program
    }
}

/// What a shim can make before it knows its program: the default engine, its linkers and
/// a command's runtime. A spare shim holds one, so a start does not pay for them. Not to
/// be made (or dropped) inside a tokio runtime.
pub struct Warm {
    engine: wasmtime::Engine,
    linkers: check::Linkers,
    /// The one-thread runtime a command runs on.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Warm {
    pub fn new() -> Result<Self, WasmError> {
        let engine = engine::engine(None, None).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let linkers = check::Linkers::new(&engine)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
        Ok(Warm { engine, linkers, runtime })
    }
}

/// Loads and checks the program `spec` names and binds its ports; nothing runs yet.
pub fn prepare(spec: &Spec) -> Result<Prepared, WasmError> {
    prepare_with(spec, None)
}

/// `prepare`, using `warm`'s engine and linkers when `spec` needs the default engine (a
/// pooled HTTP component has an engine of its own).
pub fn prepare_with(spec: &Spec, warm: Option<Warm>) -> Result<Prepared, WasmError> {
    let warm = match warm {
        Some(w) if spec.pool.is_none() => w,
        _ => {
            let engine =
                engine::engine(spec.pool, spec.memory_bytes).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
            let linkers = check::Linkers::new(&engine)?;
            Warm { engine, linkers, runtime: None }
        }
    };
    let Warm { engine, linkers, runtime } = warm;
    let cache = cache::Cache::open(&spec.cache_dir)?;
    let (compiled, cached) = cache.load_or_compile(&engine, &spec.module, &spec.module_id)?;
    let program = check::program(&engine, &linkers, compiled)?;
    let mut listeners = vec![];
    if matches!(program, Program::Http(_)) {
        let ports = if spec.http_ports.is_empty() { vec![DEFAULT_HTTP_PORT] } else { spec.http_ports.clone() };
        for port in ports {
            let l =
                std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|source| WasmError::Listen { port, source })?;
            l.set_nonblocking(true).map_err(|source| WasmError::Listen { port, source })?;
            listeners.push(l);
        }
    }
    Ok(Prepared { engine, program, spec: spec.clone(), cached, listeners, runtime })
}

/// Where an HTTP component listens when the deployment publishes no port (as
/// `wasmtime serve` does).
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// Compiles (into the cache) and checks a program without running it: what `skiff run`
/// and `skiff apply` ask before anything is stored. Returns what the program is.
pub fn check(
    module: &std::path::Path,
    module_id: &str,
    cache_dir: &std::path::Path,
) -> Result<&'static str, WasmError> {
    // Not `Warm::new`: no runtime to make (the caller may be inside one).
    let engine = engine::engine(None, None).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
    let linkers = check::Linkers::new(&engine)?;
    let (compiled, _) = cache::Cache::open(cache_dir)?.load_or_compile(&engine, module, module_id)?;
    Ok(check::program(&engine, &linkers, compiled)?.describe())
}
