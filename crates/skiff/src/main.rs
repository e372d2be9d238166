//! `skiff`: the command line and the role entry points. Argument parsing and wiring only;
//! the logic lives in the library crates.
#![forbid(unsafe_code)]

mod cli;
mod client;
mod config;
mod link;
mod output;
mod up;

fn main() {
    let code = cli::main();
    std::process::exit(code);
}
