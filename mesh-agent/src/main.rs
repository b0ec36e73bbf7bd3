//! `mesh-agent`: the node agent of the in-kernel service mesh, and the
//! operator's CLI for inspecting what the kernel is doing. The agent itself
//! is the library (`lib.rs`); this binary is its command line and the
//! commands that read the pinned maps and the state directory.
#![forbid(unsafe_code)]

mod ca;
mod cli;
mod explain;
mod flags;
mod graph;
mod inspect;
mod status;
mod table;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
