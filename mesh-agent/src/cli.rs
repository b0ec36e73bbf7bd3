//! Command-line interface: `run` (the node agent) and the operator commands
//! that read the pinned maps directly, so they work while the agent is down.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    agent,
    config::{self, Config},
    datapath::maps::PinnedMaps,
    inspect::{self, Output},
};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Node agent of the in-kernel service mesh"
)]
pub struct Cli {
    /// Pin directory of this node's mesh (on a bpf filesystem).
    #[arg(long, global = true, env = config::ENV_BPFFS, default_value = config::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load and attach the kernel programs, pin their
    /// maps and links, and keep them in step until stopped.
    Run(RunArgs),
    /// Show what the kernel holds, read from the pinned maps.
    Inspect {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
        output: Output,
        #[command(subcommand)]
        what: InspectWhat,
    },
    /// Switch the same-node short-circuit on or off at runtime, or show it.
    /// Open connections keep working either way.
    ShortCircuit {
        #[arg(value_enum)]
        state: SwitchState,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose sockets the mesh handles (the pods' cgroup
    /// subtree). Defaults to the cgroup2 mount point, found in /proc/mounts.
    #[arg(long, env = config::ENV_CGROUP)]
    pub cgroup: Option<PathBuf>,

    /// Redirect payload between local sockets, skipping the TCP/IP stack.
    /// Opt-in: see docs/short-circuit.md for the applications it does not
    /// suit. When not given, a restarted agent keeps the setting in force
    /// (an operator's runtime switch survives restarts); a new pin
    /// directory starts with `off`.
    #[arg(long, value_enum)]
    pub short_circuit: Option<OnOff>,

    /// Capacity of the socket maps (only used when they are created).
    #[arg(long, default_value_t = mesh_common::DEFAULT_MAX_SOCKETS)]
    pub max_sockets: u32,

    /// Log format.
    #[arg(long, value_enum, default_value_t = config::LogFormat::Plain, env = config::ENV_LOG_FORMAT)]
    pub log_format: config::LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum InspectWhat {
    /// Established sockets tracked for same-node short-circuit.
    Sockets,
    /// Counters of the kernel programs and how full each map is.
    Stats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SwitchState {
    On,
    Off,
    Status,
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let config = Config::from_args(cli.bpffs, args)?;
            agent::run(config)
        }
        Command::Inspect { output, what } => {
            let maps = PinnedMaps::open(&cli.bpffs)?;
            let text = match what {
                InspectWhat::Sockets => inspect::sockets(&maps, output)?,
                InspectWhat::Stats => inspect::stats(&maps, output)?,
            };
            print!("{text}");
            Ok(())
        }
        Command::ShortCircuit { state } => {
            let maps = PinnedMaps::open(&cli.bpffs)?;
            match state {
                SwitchState::On => maps.set_short_circuit(true)?,
                SwitchState::Off => maps.set_short_circuit(false)?,
                SwitchState::Status => {}
            }
            let on = maps
                .short_circuit()
                .context("reading the short-circuit setting")?;
            println!("short-circuit: {}", if on { "on" } else { "off" });
            Ok(())
        }
    }
}
