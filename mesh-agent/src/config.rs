//! The agent's effective configuration, logged at start-up and shown by
//! the admin endpoint's `/config_dump`. It knows nothing of the command
//! line: `cli` builds it from the flags and checks them.
use std::{net::SocketAddr, path::PathBuf};

use serde::Serialize;

use mesh_policy::MeshSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

impl LogFormat {
    pub const NAMES: [&str; 2] = ["plain", "json"];
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Self::Plain),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (plain or json)")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Pin directory for maps and links.
    pub bpffs: PathBuf,
    /// The agent's socket and the names behind the maps' numbers.
    pub state_dir: PathBuf,
    /// What the kernel side is given (cgroup, interfaces, map sizes…);
    /// shown flat in `/config_dump`.
    #[serde(flatten)]
    pub datapath: mesh_datapath::DatapathConfig,
    /// Standalone mode: the directory of Workload and MeshPolicy documents.
    pub config_dir: Option<PathBuf>,
    /// Kubernetes mode: where the API server is.
    pub kubernetes: Option<KubernetesConfig>,
    #[serde(serialize_with = "serialize_mesh")]
    pub mesh: MeshSettings,
    pub log_format: LogFormat,
    /// `None`: plaintext between nodes.
    pub mtls: Option<MtlsConfig>,
    pub endpoints: EndpointsConfig,
}

/// Where the agent's HTTP endpoints listen.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EndpointsConfig {
    /// `/config_dump`, `/logging`.
    pub admin: SocketAddr,
    /// `/metrics`.
    pub metrics: SocketAddr,
    /// `/live`, `/ready`.
    pub health: SocketAddr,
}

fn serialize_mesh<S: serde::Serializer>(m: &MeshSettings, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct as _;
    let mut out = s.serialize_struct("MeshSettings", 5)?;
    out.serialize_field("trust_domain", &m.trust_domain)?;
    out.serialize_field("node", &m.node)?;
    out.serialize_field("root_namespace", &m.root_namespace)?;
    out.serialize_field("default_policy", &m.default_action)?;
    out.serialize_field("non_mesh", &m.non_mesh_action)?;
    out.end()
}

#[derive(Debug, Clone, Serialize)]
pub struct KubernetesConfig {
    /// `None`: the in-cluster service account (or $KUBECONFIG).
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the Lease electing the status writer.
    pub lease_namespace: String,
    /// A pod's address is believed only inside its node's podCIDRs.
    pub enforce_pod_cidrs: bool,
}

/// Where the agent's workload certificates come from.
#[derive(Debug, Clone, Serialize)]
pub enum CaSource {
    /// The CA runs inside the agent (standalone mode).
    Local { ca_dir: PathBuf },
    /// The CA service, reached with the node's own credentials.
    Remote {
        address: String,
        node_credentials: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct MtlsConfig {
    pub ca: CaSource,
    pub tunnel_port: u16,
    pub outbound_port: u16,
    #[serde(with = "humantime_serde_secs")]
    pub svid_lifetime: std::time::Duration,
    pub renew_fraction: f64,
    /// Worker threads of the tunnels' runtime.
    pub tunnel_threads: usize,
    /// Destination ports whose connections get bulk tunnels (sorted).
    pub bulk_ports: Vec<u16>,
}

mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}
