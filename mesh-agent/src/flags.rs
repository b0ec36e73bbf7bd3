//! What the commands' flags share: the environment variable that can set
//! each flag (`MESH_` and the flag's name, so a ConfigMap can configure the
//! agent with `envFrom`), defaults, and the parser of named choices.

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
pub const ENV_TC_ATTACH: &str = "MESH_TC_ATTACH";
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
pub const ENV_FLOW_EVENTS_PER_SOURCE: &str = "MESH_FLOW_EVENTS_PER_SOURCE";
pub const ENV_SERVICE_CIDR: &str = "MESH_SERVICE_CIDR";
pub const ENV_POD_CIDRS: &str = "MESH_POD_CIDRS";
pub const ENV_CA_DIR: &str = "MESH_CA_DIR";
pub const ENV_CA_ADDRESS: &str = "MESH_CA_ADDRESS";
pub const ENV_NODE_CREDENTIALS: &str = "MESH_NODE_CREDENTIALS";
pub const ENV_TUNNEL_PORT: &str = "MESH_TUNNEL_PORT";
pub const ENV_OUTBOUND_PORT: &str = "MESH_OUTBOUND_PORT";
pub const ENV_SVID_LIFETIME: &str = "MESH_SVID_LIFETIME";
pub const ENV_RENEW_FRACTION: &str = "MESH_RENEW_FRACTION";
pub const ENV_TUNNEL_THREADS: &str = "MESH_TUNNEL_THREADS";
pub const ENV_BULK_PORTS: &str = "MESH_BULK_PORTS";
pub const ENV_ADMIN_ADDRESS: &str = "MESH_ADMIN_ADDRESS";
pub const ENV_METRICS_ADDRESS: &str = "MESH_METRICS_ADDRESS";
pub const ENV_HEALTH_ADDRESS: &str = "MESH_HEALTH_ADDRESS";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/mesh";
pub const DEFAULT_STATE_DIR: &str = "/run/mesh";
/// Localhost only: the admin endpoint can change the agent's behaviour.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:15020";
pub const DEFAULT_HEALTH_ADDRESS: &str = "0.0.0.0:15021";

/// A parser that lists `names` in `--help` and parses with `T`'s `FromStr`,
/// so the types it fills need not know clap.
pub fn one_of<T>(names: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(names).try_map(|name| name.parse::<T>())
}
