//! `skiff`: the command line and the role entry points. Argument parsing and wiring only;
//! the logic lives in the library crates.
#![forbid(unsafe_code)]

/// `println!` for the command's output: a reader that went away ends the command quietly
/// (exit 141, as SIGPIPE ends other tools) instead of a panic ([`output::emit`]).
macro_rules! outln {
    () => {
        $crate::output::emit("\n")
    };
    ($($arg:tt)*) => {
        $crate::output::emit(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`output::emit`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::emit(&format!($($arg)*))
    };
}

mod agent;
mod build;
mod cli;
mod client;
mod config;
mod hub;
mod hub_peers;
mod install;
mod jsonpath;
mod link;
mod output;
mod progress;
mod up;

/// Every role starts here: nothing it creates is readable by other local users unless
/// made so on purpose (umask 077), and the data directory is traversable but not listable,
/// everything in it its owner's alone (see `skiff_sys::perms`). The wasm tree and the
/// volumes stay traversable for WebAssembly shims, which drop their privileges after
/// setup (each instance's own part of them is its alone).
pub(crate) fn secure_data_dir(data: &std::path::Path) -> anyhow::Result<()> {
    skiff_sys::perms::restrict_umask();
    skiff_sys::perms::secure_data_dir(data, &["wasm", "volumes"])?;
    Ok(())
}

/// Tells systemd (a unit of `Type=notify`) the role is serving; nothing outside systemd.
pub(crate) fn notify_ready() {
    if let Err(e) = skiff_sys::notify::ready() {
        tracing::warn!("telling systemd the service is ready: {e}");
    }
}

/// What a role's task (the agent's loop, the API server) returned when it ended.
pub(crate) trait RoleOutcome {
    fn why(self) -> String;
}

impl RoleOutcome for () {
    fn why(self) -> String {
        "ended unexpectedly".into()
    }
}

impl<E: std::fmt::Display> RoleOutcome for Result<(), E> {
    fn why(self) -> String {
        match self {
            Ok(()) => "ended unexpectedly".into(),
            Err(e) => e.to_string(),
        }
    }
}

/// A role's task ended while the process was meant to go on serving: says why (log and
/// error) so the process exits non-zero and its supervisor (systemd, a container engine)
/// restarts it, instead of serving on with a dead loop.
pub(crate) fn role_died<T: RoleOutcome>(role: &str, r: Result<T, tokio::task::JoinError>) -> anyhow::Error {
    let why = match r {
        Ok(o) => o.why(),
        Err(e) if e.is_panic() => "panicked".to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(role, "{why}");
    anyhow::anyhow!("{role} stopped: {why}; skiff stops with it")
}

fn main() {
    // A container's process 1 (`--init`): the binary mounted as /sbin/docker-init.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.first().is_some_and(|a| skiff_sys::init::is_init(a)) {
        std::process::exit(skiff_sys::init::main(&args[1..]));
    }
    // Before any thread: no child (a shim, runc) may answer systemd for this service.
    skiff_sys::notify::take_from_env();
    // The shim runs once per container for the container's whole life: enter it before
    // building the CLI parser so it touches as little of the binary as it can.
    if args.len() == 4 && args[1] == "shim" && args[2] == "--spare" {
        std::process::exit(skiff_runtime::wasm::spare_main(std::path::Path::new(&args[3])));
    }
    if args.len() >= 4 && args[1] == "shim" && args[2] == "--bundle" {
        let bundle = std::path::PathBuf::from(&args[3]);
        let daemon = args.get(4).is_some_and(|a| a == "--daemon");
        std::process::exit(skiff_runtime::shim::main(&bundle, daemon));
    }
    let code = cli::main();
    std::process::exit(code);
}
