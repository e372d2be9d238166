//! Running a prepared program.
//!
//! Everything runs on wasmtime's async API over a tokio runtime of this process (one
//! thread for a command; a small pool for an HTTP component), so a CPU throttle is a
//! sleep of the guest's task and a timeout is an ordinary timer: at every epoch tick the
//! guest yields, and a command past its `timeout` is dropped right there, even in a
//! busy loop that never calls the host.
//!
//! Exit codes: `proc_exit(n)` / `wasi:cli/exit` give `n`; `_start` returning gives 0
//! (a component's `run` returning `err` gives 1); a trap gives 134 (as wasmtime's CLI,
//! an abort); the memory limit gives 137 with `oom` set (as an OOM-killed container);
//! the timeout gives 124.

use crate::check::{P1State, P2State, Program};
use crate::limits::{CpuShare, Memory};
use crate::{Outcome, Output, Prepared, Spec, WasmError};
use skiff_model::{WASM_TIMEOUT_EXIT_CODE, WASM_TRAP_EXIT_CODE};
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime::Engine;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

/// The exit code of an instance stopped by its memory limit (128 + SIGKILL, as Docker
/// reports an OOM-killed container).
pub const OOM_EXIT_CODE: i32 = 137;

/// The WASI context every store of `spec` starts from. `inline_io`: file operations run on
/// the calling thread rather than on tokio's blocking pool — right for a command, the one
/// guest of a one-thread runtime (no thread to start, no hand-over), unless a timeout must
/// be able to interrupt a read that never returns.
pub(crate) fn wasi(
    spec: &Spec,
    stdout: &Output,
    stderr: &Output,
    inline_io: bool,
) -> Result<WasiCtxBuilder, WasmError> {
    let mut b = WasiCtxBuilder::new();
    b.args(&spec.argv).envs(&spec.env).stdout(stdout.clone()).stderr(stderr.clone());
    b.allow_blocking_current_thread(inline_io);
    for p in &spec.preopens {
        let perms = if p.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
        b.preopened_dir(&p.host, &p.guest, perms).map_err(|e| WasmError::Preopen {
            host: p.host.clone(),
            guest: p.guest.clone(),
            message: format!("{e:#}"),
        })?;
    }
    if spec.network {
        b.socket_addr_check(crate::egress::socket_check(spec.egress())).allow_ip_name_lookup(true);
    }
    Ok(b)
}

pub(crate) fn p2_state(spec: &Spec, stdout: &Output, stderr: &Output, inline_io: bool) -> Result<P2State, WasmError> {
    Ok(P2State {
        wasi: wasi(spec, stdout, stderr, inline_io)?.build(),
        table: ResourceTable::new(),
        http: Default::default(),
        hooks: crate::egress::Hooks { egress: spec.egress() },
        memory: Memory::new(spec.memory_bytes),
    })
}

/// How a call into the guest ended. `exceeded`: what the memory limit stopped, if it did.
pub(crate) fn outcome(r: wasmtime::Result<i32>, exceeded: Option<String>, stderr: &Output) -> Outcome {
    let e = match r {
        Ok(code) => return Outcome { code, oom: false, message: None },
        Err(e) => e,
    };
    if let Some(msg) = exceeded {
        return Outcome { code: OOM_EXIT_CODE, oom: true, message: Some(msg) };
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Outcome { code: exit.0, oom: false, message: None };
    }
    // The whole error, with the guest's backtrace, goes to its log; the status keeps the gist.
    let _ = stderr.write_all(format!("{e:?}\n").as_bytes());
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => Outcome { code: WASM_TRAP_EXIT_CODE, oom: false, message: Some(trap.to_string()) },
        None => Outcome { code: WASM_TRAP_EXIT_CODE, oom: false, message: Some(format!("{e:#}")) },
    }
}

pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Advances the engine's epoch every tick, for as long as the engine lives.
fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    let _ = std::thread::Builder::new().name("wasm-epoch".into()).stack_size(64 << 10).spawn(move || loop {
        std::thread::sleep(crate::engine::EPOCH_TICK);
        match weak.upgrade() {
            Some(e) => e.increment_epoch(),
            None => return,
        }
    });
}

impl Prepared {
    /// Runs the program to its end: a command until it exits, an HTTP component until the
    /// process ends. Blocking; the caller gives the guest's stdout and stderr.
    pub fn run(self, stdout: Output, stderr: Output) -> Outcome {
        let cpu = self.spec.cpus_millis.map(CpuShare::new);
        let timeout = self.spec.timeout_ms.map(Duration::from_millis);
        if cpu.is_some() || timeout.is_some() {
            start_ticker(&self.engine);
        }
        let made = self.runtime;
        let rt = match (&self.program, made) {
            (Program::Module(_) | Program::Command(_), Some(rt)) => Ok(rt),
            (Program::Http(_), _) => {
                let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                let want = self.spec.cpus_millis.map(|m| m.div_ceil(1000) as usize).unwrap_or(cores);
                tokio::runtime::Builder::new_multi_thread().worker_threads(want.clamp(1, cores)).enable_all().build()
            }
            (_, _) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        };
        let rt = match rt {
            Ok(rt) => rt,
            Err(e) => return Outcome { code: 1, oom: false, message: Some(format!("starting the runtime: {e}")) },
        };
        let Prepared { program, spec, listeners, .. } = self;
        rt.block_on(async move {
            match program {
                Program::Http(pre) => crate::http::serve(pre, listeners, spec, cpu, stdout, stderr).await,
                Program::Module(pre) => {
                    let cx = Command { spec: &spec, cpu, yields: timeout.is_some(), stdout: &stdout, stderr: &stderr };
                    within(timeout, module(pre, cx)).await
                }
                Program::Command(pre) => {
                    let cx = Command { spec: &spec, cpu, yields: timeout.is_some(), stdout: &stdout, stderr: &stderr };
                    within(timeout, command(pre, cx)).await
                }
            }
        })
    }
}

async fn within(timeout: Option<Duration>, run: impl std::future::Future<Output = Outcome>) -> Outcome {
    let Some(t) = timeout else { return run.await };
    tokio::time::timeout(t, run).await.unwrap_or_else(|_| Outcome {
        code: WASM_TIMEOUT_EXIT_CODE,
        oom: false,
        message: Some(format!("timed out after {} (wasm.timeout)", human(t))),
    })
}

fn setup_failed(e: WasmError) -> Outcome {
    Outcome { code: WASM_TRAP_EXIT_CODE, oom: false, message: Some(e.to_string()) }
}

/// What running a command needs besides its pre-instantiated program.
struct Command<'a> {
    spec: &'a Spec,
    cpu: Option<CpuShare>,
    /// Yield at every tick (a timeout is watching).
    yields: bool,
    stdout: &'a Output,
    stderr: &'a Output,
}

async fn module(pre: wasmtime::InstancePre<P1State>, cx: Command<'_>) -> Outcome {
    let Command { spec, cpu, yields, stdout, stderr } = cx;
    let wasi = match wasi(spec, stdout, stderr, spec.timeout_ms.is_none()) {
        Ok(mut b) => b.build_p1(),
        Err(e) => return setup_failed(e),
    };
    let state = P1State { wasi, memory: Memory::new(spec.memory_bytes) };
    let mut store = crate::limits::store(pre.module().engine(), state, cpu, yields);
    let r = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await.map(|()| 0)
    }
    .await;
    outcome(r, store.data_mut().memory.exceeded.take(), stderr)
}

async fn command(pre: wasmtime_wasi::p2::bindings::CommandPre<P2State>, cx: Command<'_>) -> Outcome {
    let Command { spec, cpu, yields, stdout, stderr } = cx;
    let state = match p2_state(spec, stdout, stderr, spec.timeout_ms.is_none()) {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let mut store = crate::limits::store(pre.engine(), state, cpu, yields);
    let r = async {
        let cmd = pre.instantiate_async(&mut store).await?;
        cmd.wasi_cli_run().call_run(&mut store).await.map(|r| if r.is_ok() { 0 } else { 1 })
    }
    .await;
    outcome(r, store.data_mut().memory.exceeded.take(), stderr)
}
