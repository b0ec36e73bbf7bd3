//! `mesh-agent`: the node agent of the in-kernel service mesh, and the
//! operator's CLI for inspecting what the kernel is doing.
#![deny(unsafe_code)]

mod agent;
mod cgroup;
mod cli;
mod config;
mod control;
mod datapath;
mod endpoints;
mod explain;
mod flags;
mod flows;
mod health;
mod inspect;
mod k8s;
mod mtls;
mod netns;
mod pki;
pub mod policy;
mod signal;
mod state;
mod table;
mod telemetry;
mod tunnel;

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
