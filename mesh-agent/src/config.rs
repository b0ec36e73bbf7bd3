//! The agent's effective configuration, logged at start-up and shown by
//! the admin endpoint's `/config_dump`.
use std::{net::SocketAddr, path::PathBuf};

use serde::Serialize;

use crate::{cgroup, cli::RunArgs, policy::MeshSettings};

pub const ENV_BPFFS: &str = "MESH_BPFFS";
pub const ENV_CGROUP: &str = "MESH_CGROUP";
pub const ENV_LOG_FORMAT: &str = "MESH_LOG_FORMAT";
pub const ENV_STATE_DIR: &str = "MESH_STATE_DIR";
pub const ENV_CONFIG_DIR: &str = "MESH_CONFIG_DIR";
pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_INTERFACES: &str = "MESH_INTERFACES";
// Every other flag of `run`: `MESH_` and the flag's name, so a ConfigMap can
// configure the agent with `envFrom`.
pub const ENV_SHORT_CIRCUIT: &str = "MESH_SHORT_CIRCUIT";
pub const ENV_MAX_SOCKETS: &str = "MESH_MAX_SOCKETS";
pub const ENV_KUBERNETES: &str = "MESH_KUBERNETES";
pub const ENV_KUBECONFIG: &str = "MESH_KUBECONFIG";
pub const ENV_TRUST_DOMAIN: &str = "MESH_TRUST_DOMAIN";
pub const ENV_ROOT_NAMESPACE: &str = "MESH_ROOT_NAMESPACE";
pub const ENV_DEFAULT_POLICY: &str = "MESH_DEFAULT_POLICY";
pub const ENV_NON_MESH: &str = "MESH_NON_MESH";
pub const ENV_ESTABLISHED: &str = "MESH_ESTABLISHED";
pub const ENV_MAX_ENDPOINTS: &str = "MESH_MAX_ENDPOINTS";
pub const ENV_MAX_POLICY: &str = "MESH_MAX_POLICY";
pub const ENV_MAX_CONNTRACK: &str = "MESH_MAX_CONNTRACK";
pub const ENV_CA_DIR: &str = "MESH_CA_DIR";
pub const ENV_CA_ADDRESS: &str = "MESH_CA_ADDRESS";
pub const ENV_NODE_CREDENTIALS: &str = "MESH_NODE_CREDENTIALS";
pub const ENV_TUNNEL_PORT: &str = "MESH_TUNNEL_PORT";
pub const ENV_OUTBOUND_PORT: &str = "MESH_OUTBOUND_PORT";
pub const ENV_SVID_LIFETIME: &str = "MESH_SVID_LIFETIME";
pub const ENV_RENEW_FRACTION: &str = "MESH_RENEW_FRACTION";
pub const ENV_ADMIN_ADDRESS: &str = "MESH_ADMIN_ADDRESS";
pub const ENV_METRICS_ADDRESS: &str = "MESH_METRICS_ADDRESS";
pub const ENV_HEALTH_ADDRESS: &str = "MESH_HEALTH_ADDRESS";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/mesh";
pub const DEFAULT_STATE_DIR: &str = "/run/mesh";
/// Localhost only: the admin endpoint can change the agent's behaviour.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:15020";
pub const DEFAULT_HEALTH_ADDRESS: &str = "0.0.0.0:15021";

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
    /// The agent's socket and the names behind the maps' numbers.
    pub state_dir: PathBuf,
    /// cgroup v2 directory the socket programs attach to.
    pub cgroup: PathBuf,
    /// Standalone mode: the directory of Workload and MeshPolicy documents.
    pub config_dir: Option<PathBuf>,
    /// Kubernetes mode: where the API server is.
    pub kubernetes: Option<KubernetesConfig>,
    /// Interfaces where traffic from other nodes arrives.
    pub interfaces: Vec<String>,
    #[serde(serialize_with = "serialize_mesh")]
    pub mesh: MeshSettings,
    /// `Some` when given on the command line; `None` keeps what is pinned.
    pub short_circuit: Option<bool>,
    pub revoke_established: bool,
    pub max_sockets: u32,
    pub max_endpoints: u32,
    pub max_policy: u32,
    pub max_conntrack: u32,
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
}

mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl Config {
    pub fn from_args(bpffs: PathBuf, state_dir: PathBuf, args: RunArgs) -> anyhow::Result<Self> {
        let cgroup = match args.cgroup {
            Some(path) => path,
            None => cgroup::detect_cgroup2_mount()?,
        };
        anyhow::ensure!(
            !(args.kubernetes && args.config_dir.is_some()),
            "--config-dir (standalone mode) and --kubernetes exclude each other"
        );
        anyhow::ensure!(
            args.kubernetes || args.kubeconfig.is_none(),
            "--kubeconfig needs --kubernetes"
        );
        for (flag, value) in [
            ("--max-sockets", args.max_sockets),
            ("--max-endpoints", args.max_endpoints),
            ("--max-policy", args.max_policy),
            ("--max-conntrack", args.max_conntrack),
        ] {
            anyhow::ensure!(value > 0, "{flag} must be at least 1");
        }
        let node = match args.node {
            Some(node) => node,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        let m = args.mtls;
        let ca = match (m.ca_dir, m.ca_address, m.node_credentials) {
            (Some(ca_dir), None, _) => Some(CaSource::Local { ca_dir }),
            (None, Some(address), Some(node_credentials)) => Some(CaSource::Remote {
                address,
                node_credentials,
            }),
            (None, None, None) => None,
            (None, None, Some(_)) => anyhow::bail!("--node-credentials needs --ca-address"),
            _ => anyhow::bail!("give either --ca-dir or --ca-address, not both"),
        };
        if ca.is_some() {
            anyhow::ensure!(
                m.renew_fraction > 0.0 && m.renew_fraction < 1.0,
                "--renew-fraction must be between 0 and 1 (exclusive), got {}",
                m.renew_fraction
            );
            anyhow::ensure!(
                m.svid_lifetime >= std::time::Duration::from_secs(1),
                "--svid-lifetime must be at least 1s"
            );
            anyhow::ensure!(
                m.tunnel_port != 0 && m.outbound_port != 0 && m.tunnel_port != m.outbound_port,
                "--tunnel-port and --outbound-port must be two different non-zero ports"
            );
        }
        let mtls = ca.map(|ca| MtlsConfig {
            ca,
            tunnel_port: m.tunnel_port,
            outbound_port: m.outbound_port,
            svid_lifetime: m.svid_lifetime,
            renew_fraction: m.renew_fraction,
        });
        Ok(Self {
            mtls,
            bpffs,
            state_dir,
            cgroup,
            kubernetes: args.kubernetes.then(|| KubernetesConfig {
                kubeconfig: args.kubeconfig,
                lease_namespace: args
                    .status_lease_namespace
                    .unwrap_or_else(|| args.root_namespace.clone()),
            }),
            config_dir: args.config_dir,
            interfaces: args.interfaces,
            mesh: MeshSettings {
                trust_domain: args.trust_domain,
                node,
                root_namespace: args.root_namespace,
                default_action: args.default_policy,
                non_mesh_action: args.non_mesh,
            },
            short_circuit: args.short_circuit.map(|s| s == crate::cli::OnOff::On),
            revoke_established: args.established == crate::cli::Established::Revoke,
            max_sockets: args.max_sockets,
            max_endpoints: args.max_endpoints,
            max_policy: args.max_policy,
            max_conntrack: args.max_conntrack,
            log_format: args.log_format,
            endpoints: EndpointsConfig {
                admin: args.admin_address,
                metrics: args.metrics_address,
                health: args.health_address,
            },
        })
    }
}
