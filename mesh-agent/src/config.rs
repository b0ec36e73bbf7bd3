//! The agent's effective configuration, logged at start-up.
use std::path::PathBuf;

use serde::Serialize;

use crate::{cgroup, cli::RunArgs};

pub const ENV_BPFFS: &str = "MESH_BPFFS";
pub const ENV_CGROUP: &str = "MESH_CGROUP";
pub const ENV_LOG_FORMAT: &str = "MESH_LOG_FORMAT";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/mesh";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Pin directory for maps and links.
    pub bpffs: PathBuf,
    /// cgroup v2 directory the socket programs attach to.
    pub cgroup: PathBuf,
    /// `Some` when given on the command line; `None` keeps what is pinned.
    pub short_circuit: Option<bool>,
    pub max_sockets: u32,
    pub log_format: LogFormat,
}

impl Config {
    pub fn from_args(bpffs: PathBuf, args: RunArgs) -> anyhow::Result<Self> {
        let cgroup = match args.cgroup {
            Some(path) => path,
            None => cgroup::detect_cgroup2_mount()?,
        };
        anyhow::ensure!(args.max_sockets > 0, "--max-sockets must be at least 1");
        Ok(Self {
            bpffs,
            cgroup,
            short_circuit: args.short_circuit.map(|s| s == crate::cli::OnOff::On),
            max_sockets: args.max_sockets,
            log_format: args.log_format,
        })
    }
}
