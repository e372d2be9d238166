//! `skiff`: the command line and the role entry points. Argument parsing and wiring only;
//! the logic lives in the library crates.
#![forbid(unsafe_code)]

mod agent;
mod cli;
mod client;
mod config;
mod hub;
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

fn main() {
    // The shim runs once per container for the container's whole life: enter it before
    // building the CLI parser so it touches as little of the binary as it can.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
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
