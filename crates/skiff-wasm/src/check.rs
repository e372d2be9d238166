//! What a program is and whether this host can run it: checked before anything starts.
//!
//! * A core module must be a WASI preview 1 *command*: export `_start: [] -> []` and a
//!   `memory`, and import nothing but `wasi_snapshot_preview1` functions this host has.
//! * A component must export `wasi:cli/run` (a command) or `wasi:http/incoming-handler`
//!   (an HTTP handler) at a 0.2 version, and import only WASI 0.2 interfaces
//!   (`wasi:cli`, `clocks`, `filesystem`, `io`, `random`, `sockets`, `http`).
//!
//! Every import the host lacks is named in the error, not only the first.

use crate::cache::Compiled;
use crate::limits::Memory;
use crate::WasmError;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, ExternType, InstancePre, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Store data of a preview 1 module.
pub struct P1State {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) memory: Memory,
}

/// Store data of a component (command or HTTP handler).
pub struct P2State {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) http: WasiHttpCtx,
    /// Where outgoing HTTP requests may go ([`crate::egress`]).
    pub(crate) hooks: crate::egress::Hooks,
    pub(crate) memory: Memory,
}

impl crate::limits::Limited for P1State {
    fn memory(&mut self) -> &mut Memory {
        &mut self.memory
    }
}

impl crate::limits::Limited for P2State {
    fn memory(&mut self) -> &mut Memory {
        &mut self.memory
    }
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for P2State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// A checked program, pre-instantiated (imports resolved) so each start is only an
/// instantiation.
pub enum Program {
    /// A WASI preview 1 command module.
    Module(InstancePre<P1State>),
    /// A WASI 0.2 command component (`wasi:cli/run`).
    Command(CommandPre<P2State>),
    /// A WASI 0.2 HTTP handler (`wasi:http/proxy`).
    Http(ProxyPre<P2State>),
}

impl Program {
    pub fn describe(&self) -> &'static str {
        match self {
            Program::Module(_) => "WASI preview 1 command module",
            Program::Command(_) => "WASI 0.2 command component",
            Program::Http(_) => "WASI 0.2 HTTP component (wasi:http/proxy)",
        }
    }
}

/// The interface packages a component may import.
const WASI_PACKAGES: [&str; 7] =
    ["wasi:cli/", "wasi:clocks/", "wasi:filesystem/", "wasi:io/", "wasi:random/", "wasi:sockets/", "wasi:http/"];

fn link_err(e: wasmtime::Error) -> WasmError {
    WasmError::Link(format!("{e:#}"))
}

/// The linkers for one engine: WASI preview 1 for modules; WASI 0.2 and wasi:http for
/// components. Built once per engine (a spare shim builds them before it has work).
pub(crate) struct Linkers {
    p1: Linker<P1State>,
    p2: wasmtime::component::Linker<P2State>,
}

impl Linkers {
    pub(crate) fn new(engine: &Engine) -> Result<Self, WasmError> {
        let mut p1: Linker<P1State> = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |s: &mut P1State| &mut s.wasi).map_err(link_err)?;
        let mut p2 = wasmtime::component::Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2).map_err(link_err)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut p2).map_err(link_err)?;
        Ok(Linkers { p1, p2 })
    }
}

pub(crate) fn program(engine: &Engine, linkers: &Linkers, compiled: Compiled) -> Result<Program, WasmError> {
    match compiled {
        Compiled::Module(m) => module(engine, &linkers.p1, &m).map(Program::Module),
        Compiled::Component(c) => component(engine, &linkers.p2, &c),
    }
}

fn module(engine: &Engine, linker: &Linker<P1State>, m: &Module) -> Result<InstancePre<P1State>, WasmError> {
    let pre = linker.instantiate_pre(m).map_err(|e| {
        // Name every import the host lacks, not only the first (a store to look them up
        // in is made only now, on the way to an error).
        let mut store =
            Store::new(engine, P1State { wasi: WasiCtxBuilder::new().build_p1(), memory: Memory::default() });
        let missing: Vec<String> = m
            .imports()
            .filter(|i| linker.get_by_import(&mut store, i).is_none())
            .map(|i| format!("{}::{}", i.module(), i.name()))
            .collect();
        if missing.is_empty() {
            link_err(e)
        } else {
            WasmError::UnsupportedImports(missing)
        }
    })?;
    match m.get_export("_start") {
        Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
        Some(_) => {
            return Err(WasmError::MissingExport("the module's _start export is not a function [] -> []".into()))
        }
        None if m.get_export("_initialize").is_some() => {
            return Err(WasmError::MissingExport(
                "the module exports no _start function: it is a WASI reactor (a library), not a command".into(),
            ))
        }
        None => {
            return Err(WasmError::MissingExport("the module exports no _start function (a WASI command must)".into()))
        }
    }
    if m.imports().next().is_some() && !matches!(m.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err(WasmError::MissingExport(
            "the module exports no memory named \"memory\" (WASI passes data through it)".into(),
        ));
    }
    Ok(pre)
}

fn component(
    engine: &Engine,
    linker: &wasmtime::component::Linker<P2State>,
    c: &Component,
) -> Result<Program, WasmError> {
    let ty = c.component_type();
    let missing: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|n| !WASI_PACKAGES.iter().any(|p| n.starts_with(p)))
        .map(str::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(WasmError::UnsupportedImports(missing));
    }
    let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
    let exports_at = |iface: &str| exports.iter().any(|e| e.starts_with(&format!("{iface}@0.2")));
    let pre = linker.instantiate_pre(c).map_err(link_err)?;
    if exports_at("wasi:http/incoming-handler") {
        return ProxyPre::new(pre).map(Program::Http).map_err(link_err);
    }
    if exports_at("wasi:cli/run") {
        return CommandPre::new(pre).map(Program::Command).map_err(link_err);
    }
    Err(WasmError::MissingExport(format!(
        "the component exports neither wasi:cli/run nor wasi:http/incoming-handler (it exports: {})",
        if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
    )))
}
